//! Streams tensors into output shards. The plan knows every output tensor's name, dtype and
//! shape before any data is computed, so each shard's header is written up front and the data
//! follows in plan order: no tensor is held back, and no shard is rewritten.

use std::fs::File;
use std::io::Write;

use rayon::prelude::*;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{json, Map, Value};

use super::model::INDEX_NAME;
use crate::error::{IoContext, Result};

#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub nbytes: u64,
}

/// Which tensors go to which shard file.
#[derive(Clone, Debug)]
pub struct ShardPlan {
    pub files: Vec<String>,
    /// For each shard, the range of tensor indices (plan order) it holds.
    pub ranges: Vec<std::ops::Range<usize>>,
}

/// Greedy split in plan order: a shard closes when the next tensor would pass `max_bytes`
/// (a tensor larger than the limit gets a shard of its own), as transformers does.
pub fn plan_shards(tensors: &[OutTensor], max_bytes: u64) -> ShardPlan {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        if i > start && size + t.nbytes > max_bytes {
            ranges.push(start..i);
            start = i;
            size = 0;
        }
        size += t.nbytes;
    }
    if start < tensors.len() || ranges.is_empty() {
        ranges.push(start..tensors.len());
    }
    let n = ranges.len();
    let files = if n == 1 {
        vec![super::model::SINGLE_NAME.to_string()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };
    ShardPlan { files, ranges }
}

fn dtype_name(d: Dtype) -> String {
    // safetensors' serde names (F16, BF16, I64, ...) are the Debug names.
    format!("{d:?}")
}

/// The header bytes (length prefix included) of one shard, padded to 8 bytes as the format asks.
fn shard_header(tensors: &[OutTensor]) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for t in tensors {
        m.insert(
            t.name.clone(),
            json!({"dtype": dtype_name(t.dtype), "shape": t.shape, "data_offsets": [off, off + t.nbytes]}),
        );
        off += t.nbytes;
    }
    let mut h = serde_json::to_vec(&Value::Object(m)).expect("json of plain values");
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out
}

pub struct ShardWriter {
    dir: PathBuf,
    tensors: Vec<OutTensor>,
    plan: ShardPlan,
    next: usize,
    /// Checksum of every tensor written, in plan order (for the report and `--verify`).
    checksums: Vec<u64>,
    shard: usize,
    current: Option<(File, PathBuf)>,
}

impl ShardWriter {
    pub fn new(dir: &Path, tensors: Vec<OutTensor>, max_shard_bytes: u64) -> Self {
        let plan = plan_shards(&tensors, max_shard_bytes);
        Self {
            dir: dir.to_path_buf(),
            tensors,
            plan,
            next: 0,
            checksums: Vec::new(),
            shard: 0,
            current: None,
        }
    }

    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// Writes the next tensor in plan order; `data` must have the planned byte size.
    pub fn write_next(&mut self, data: &[u8]) -> Result<()> {
        self.write_summed(data, checksum(data))
    }

    /// [`ShardWriter::write_next`] with the tensor's [`checksum`] taken by the caller (the
    /// pipeline takes it on its worker threads, not serially on the writer's).
    pub fn write_summed(&mut self, data: &[u8], sum: u64) -> Result<()> {
        let i = self.next;
        let t = &self.tensors[i];
        if data.len() as u64 != t.nbytes {
            return Err(crate::error::Error::Other(format!(
                "internal error: tensor `{}` has {} bytes, planned {}",
                t.name,
                data.len(),
                t.nbytes
            )));
        }
        while !self.plan.ranges[self.shard].contains(&i) {
            self.close_shard()?;
            self.shard += 1;
        }
        if self.current.is_none() {
            let path = self.dir.join(&self.plan.files[self.shard]);
            tracing::debug!(
                "writing {} ({} tensors)",
                path.display(),
                self.plan.ranges[self.shard].len()
            );
            let mut f = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
            let header = shard_header(&self.tensors[self.plan.ranges[self.shard].clone()]);
            f.write_all(&header)
                .ctx(|| format!("writing {}", path.display()))?;
            self.current = Some((f, path));
        }
        // Straight from the caller's buffer: a BufWriter copied every tensor under its capacity
        // once more before the kernel's own copy.
        let (f, path) = self.current.as_mut().expect("opened above");
        f.write_all(data)
            .ctx(|| format!("writing {}", path.display()))?;
        self.checksums.push(sum);
        self.next += 1;
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((f, path)) = self.current.take() {
            f.sync_all().ctx(|| format!("syncing {}", path.display()))?;
            tracing::debug!("closed and synced {}", path.display());
        }
        Ok(())
    }

    /// Closes the last shard and writes the index (when there is more than one shard).
    pub fn finish(mut self) -> Result<(ShardPlan, Vec<u64>)> {
        if self.next != self.tensors.len() {
            return Err(crate::error::Error::Other(format!(
                "internal error: {} of {} tensors written",
                self.next,
                self.tensors.len()
            )));
        }
        if self.tensors.is_empty() {
            // An empty model still gets a valid (empty) file.
            let path = self.dir.join(&self.plan.files[0]);
            std::fs::write(&path, shard_header(&[]))
                .ctx(|| format!("writing {}", path.display()))?;
        }
        self.close_shard()?;
        if self.plan.files.len() > 1 {
            let mut map = Map::new();
            for (s, r) in self.plan.ranges.iter().enumerate() {
                for t in &self.tensors[r.clone()] {
                    map.insert(t.name.clone(), Value::String(self.plan.files[s].clone()));
                }
            }
            let total: u64 = self.tensors.iter().map(|t| t.nbytes).sum();
            let index = json!({"metadata": {"total_size": total}, "weight_map": map});
            let path = self.dir.join(INDEX_NAME);
            let text = serde_json::to_vec_pretty(&index).expect("json of plain values");
            std::fs::write(&path, text).ctx(|| format!("writing {}", path.display()))?;
        }
        self.verify()?;
        Ok((self.plan, self.checksums))
    }

    /// Reopens every shard written and checks its header and byte ranges against the plan, so a
    /// short write or a damaged file is caught before the folder is presented as a result.
    fn verify(&self) -> Result<()> {
        for (s, r) in self.plan.ranges.iter().enumerate() {
            let path = self.dir.join(&self.plan.files[s]);
            let f = super::file::SafetensorsFile::open(&path)
                .map_err(|p| crate::error::Error::Other(format!("verifying the output: {p}")))?;
            let want = &self.tensors[r.clone()];
            // By name and place, not by the order a reader lists them in: tensors without
            // elements share their offsets, and their order among themselves is the reader's.
            let data_start = f.tensors.iter().map(|t| t.start).min().unwrap_or(0);
            let mut off = 0u64;
            let mut places = std::collections::HashMap::new();
            for w in want {
                places.insert(w.name.as_str(), (w, off));
                off += w.nbytes;
            }
            let same = f.tensors.len() == want.len()
                && f.tensors.iter().all(|got| {
                    places.get(got.name.as_str()).is_some_and(|&(w, at)| {
                        got.dtype == w.dtype
                            && got.shape == w.shape
                            && (got.start - data_start) as u64 == at
                            && got.nbytes() as u64 == w.nbytes
                    })
                });
            if !same {
                return Err(crate::error::Error::Other(format!(
                    "verifying the output: {} does not hold the tensors planned for it",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

/// Bytes per leaf of the checksum tree.
pub const LEAF: usize = 1 << 16;

const K: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline(always)]
fn step(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(K).rotate_left(29)
}

/// A fast 64-bit checksum of a tensor's bytes (integrity, not security), as a tree so that it
/// is computed in parallel: the bytes are cut into [`LEAF`]-byte leaves (the last one shorter);
/// each leaf is hashed by [`leaf`]; the root folds the byte length and the leaf hashes in order
/// with the same multiply-rotate step and finishes with `fmix`. `--verify` and the report use
/// this one definition (docs/SEMANTICS.md, "Checksums").
pub fn checksum(data: &[u8]) -> u64 {
    let leaves: Vec<u64> = data.par_chunks(LEAF).map(leaf).collect();
    root(data.len() as u64, &leaves)
}

/// The root of the tree over `len` bytes with these leaf hashes, in order.
pub fn root(len: u64, leaves: &[u64]) -> u64 {
    let h = leaves
        .iter()
        .fold(0x243F_6A88_85A3_08D3u64 ^ len, |h, &l| step(h, l));
    crate::select::dare::fmix(h)
}

/// One leaf: four independent lanes over its 8-byte words (word i to lane i % 4), so that four
/// multiplies are in flight where one chain of them waited on each other; then the lanes, the
/// words of a tail under 32 bytes and its last bytes, folded in order; then the leaf's length.
pub fn leaf(data: &[u8]) -> u64 {
    let mut lanes = [
        0x1319_8A2E_0370_7344u64,
        0xA409_3822_299F_31D0,
        0x082E_FA98_EC4E_6C89,
        0x4528_21E6_38D0_1377,
    ];
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        for (l, w) in lanes.iter_mut().zip(b.chunks_exact(8)) {
            *l = step(*l, u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
    }
    let mut h = lanes
        .iter()
        .fold(0xBE54_66CF_34E9_0C6Cu64, |h, &l| step(h, l));
    let mut words = blocks.remainder().chunks_exact(8);
    for w in &mut words {
        h = step(h, u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    for &b in words.remainder() {
        h = step(h, b as u64);
    }
    crate::select::dare::fmix(step(h, data.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u64) -> OutTensor {
        OutTensor {
            name: format!("t{n}"),
            dtype: Dtype::F32,
            shape: vec![n as usize / 4],
            nbytes: n,
        }
    }

    /// The tree's definition, written out serially: leaves of LEAF bytes, each four lanes then
    /// the tail, then the root; every byte counts, in place.
    #[test]
    fn the_checksum_is_its_tree_and_sees_every_byte() {
        let data: Vec<u8> = (0..3 * LEAF as u64 + 1234)
            .map(|i| crate::select::dare::fmix(i) as u8)
            .collect();
        for len in [
            0,
            1,
            7,
            8,
            31,
            32,
            33,
            100,
            LEAF - 1,
            LEAF,
            LEAF + 1,
            data.len(),
        ] {
            let d = &data[..len];
            let leaves: Vec<u64> = d.chunks(LEAF).map(leaf).collect();
            assert_eq!(checksum(d), root(len as u64, &leaves), "len {len}");
        }
        let want = checksum(&data);
        for i in [0, 5, 31, 32, LEAF - 1, LEAF, 2 * LEAF + 17, data.len() - 1] {
            let mut d = data.clone();
            d[i] ^= 1;
            assert_ne!(checksum(&d), want, "a flipped bit at {i}");
        }
        // Two leaves swapped, and a zero byte appended, change it too.
        let mut d = data.clone();
        d[..2 * LEAF].rotate_left(LEAF);
        assert_ne!(checksum(&d), want);
        let mut d = data.clone();
        d.push(0);
        assert_ne!(checksum(&d), want);
    }

    #[test]
    fn shards_split_greedily_and_big_tensors_stand_alone() {
        let p = plan_shards(&[t(40), t(40), t(40), t(200), t(8)], 100);
        assert_eq!(p.ranges, vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(p.files[0], "model-00001-of-00004.safetensors");
        let p = plan_shards(&[t(40), t(40)], 100);
        assert_eq!(p.files, vec!["model.safetensors".to_string()]);
    }
}
