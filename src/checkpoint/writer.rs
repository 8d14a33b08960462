//! Streams tensors into output shards. The plan knows every output tensor's name, dtype and
//! shape before any data is computed, so each shard's header is written up front and the data
//! follows in plan order: no tensor is held back, and no shard is rewritten.

use std::fs::File;
use std::io::{BufWriter, Write};
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
    current: Option<(BufWriter<File>, PathBuf)>,
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
            let f = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
            let mut w = BufWriter::with_capacity(8 << 20, f);
            let header = shard_header(&self.tensors[self.plan.ranges[self.shard].clone()]);
            w.write_all(&header)
                .ctx(|| format!("writing {}", path.display()))?;
            self.current = Some((w, path));
        }
        let (w, path) = self.current.as_mut().expect("opened above");
        w.write_all(data)
            .ctx(|| format!("writing {}", path.display()))?;
        self.checksums.push(checksum(data));
        self.next += 1;
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((w, path)) = self.current.take() {
            let f = w
                .into_inner()
                .map_err(|e| e.into_error())
                .ctx(|| format!("writing {}", path.display()))?;
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

/// A fast 64-bit checksum of a tensor's bytes (integrity, not security): 8-byte words folded
/// with a multiply-rotate, then the tail and the length.
pub fn checksum(data: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = 0x243F_6A88_85A3_08D3u64 ^ data.len() as u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .wrapping_mul(K)
            .rotate_left(29);
    }
    for &b in words.remainder() {
        h = (h ^ b as u64).wrapping_mul(K).rotate_left(29);
    }
    crate::select::dare::fmix(h)
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

    #[test]
    fn shards_split_greedily_and_big_tensors_stand_alone() {
        let p = plan_shards(&[t(40), t(40), t(40), t(200), t(8)], 100);
        assert_eq!(p.ranges, vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(p.files[0], "model-00001-of-00004.safetensors");
        let p = plan_shards(&[t(40), t(40)], 100);
        assert_eq!(p.files, vec!["model.safetensors".to_string()]);
    }
}
