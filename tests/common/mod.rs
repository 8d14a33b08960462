//! Test helpers: random checkpoints written with the `safetensors` crate (not stamerge's writer),
//! read back with it, and a straightforward reference of every method (sort-based top-k, plain
//! loops) restated from docs/SEMANTICS.md.
#![allow(dead_code)]
// Numeric loops index several parallel arrays at once, as the CUDA kernels do.
#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub mod scenario;

use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => panic!("not a float dtype"),
    }
}

pub fn decode(dtype: Dtype, b: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        _ => panic!("not a float dtype"),
    }
}

#[derive(Clone, Debug)]
pub struct T {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl T {
    pub fn float(name: &str, dtype: Dtype, shape: &[usize], v: &[f32]) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            bytes: encode(dtype, v),
        }
    }
    pub fn values(&self) -> Vec<f32> {
        decode(self.dtype, &self.bytes)
    }
}

/// Writes tensors as one file (`shards == 1`) or as `shards` files plus the index, with the
/// safetensors crate. `config` goes to config.json when given.
pub fn write_model(dir: &Path, tensors: &[T], shards: usize, config: Option<serde_json::Value>) {
    std::fs::create_dir_all(dir).unwrap();
    let per = tensors.len().div_ceil(shards.max(1)).max(1);
    let groups: Vec<&[T]> = tensors.chunks(per).collect();
    let n = groups.len();
    let mut map = serde_json::Map::new();
    for (i, g) in groups.iter().enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let views: Vec<(String, TensorView)> = g
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for t in g.iter() {
            map.insert(t.name.clone(), serde_json::Value::String(file.clone()));
        }
    }
    if shards > 1 {
        let total: usize = tensors.iter().map(|t| t.bytes.len()).sum();
        let idx = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec(&idx).unwrap(),
        )
        .unwrap();
    }
    if let Some(c) = config {
        std::fs::write(dir.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
    }
}

/// Every tensor of a folder (single or sharded) or file, read with the safetensors crate, plus
/// the tensor order (shards by file name, then data offset).
pub fn read_model(path: &Path) -> (HashMap<String, T>, Vec<String>) {
    let mut files: Vec<PathBuf> = if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        std::fs::read_dir(path)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().map(|e| e == "safetensors").unwrap_or(false))
            .collect()
    };
    files.sort();
    let mut out = HashMap::new();
    let mut order = Vec::new();
    for f in files {
        let buf = std::fs::read(&f).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&buf).unwrap();
        let st = SafeTensors::deserialize(&buf).unwrap();
        for name in meta.offset_keys() {
            let v = st.tensor(&name).unwrap();
            order.push(name.clone());
            out.insert(
                name.clone(),
                T {
                    name,
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                },
            );
        }
    }
    (out, order)
}

// ---------------------------------------------------------------------------------------------
// The reference: plain loops over f32, sort-based top-k.

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Method {
    TaskArithmetic,
    Magnitude,
    Ties,
    DareLinear,
    DareTies,
    Sta,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::TaskArithmetic => "task_arithmetic",
            Method::Magnitude => "magnitude",
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::Sta => "sta",
        }
    }
    fn ties(self) -> bool {
        matches!(self, Method::Ties | Method::DareTies)
    }
    fn dare(self) -> bool {
        matches!(self, Method::DareLinear | Method::DareTies)
    }
    fn topk(self) -> bool {
        matches!(self, Method::Magnitude | Method::Ties | Method::Sta)
    }
}

#[derive(Clone, Debug)]
pub struct RefTask {
    pub weight: f32,
    pub density: f64,
    pub forget: bool,
    pub task_vector_importance: bool,
}

#[derive(Clone, Debug)]
pub struct RefConfig {
    pub method: Method,
    pub tasks: Vec<RefTask>,
    pub lambda: f32,
    pub normalize: bool,
    pub rescale: bool,
    /// DARE's rescale by 1/d (`rescale_norm: inv_density`) instead of mergekit's L1 ratio.
    pub inv_density: bool,
    pub seed: u64,
    pub model_selection: bool,
}

pub fn k_of(d: f64, n: usize) -> usize {
    if d >= 1.0 {
        n
    } else {
        ((d * n as f64).floor() as usize).max(1)
    }
}

fn score(cfg: &RefConfig, t: usize, b: f32, th: f32, g: Option<f32>) -> f32 {
    match (cfg.method, g) {
        (Method::Sta, Some(g)) if cfg.tasks[t].task_vector_importance => ((th - b) * g).abs(),
        (Method::Sta, Some(g)) => (th * g).abs(),
        _ => (th - b).abs(),
    }
}

/// Sort-based mask: (score desc, position asc), first k.
pub fn topk_mask(scores: &[f32], k: usize) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    let mut m = vec![false; scores.len()];
    for &i in &idx[..k] {
        m[i] = true;
    }
    m
}

fn fmix(mut z: u64) -> u64 {
    z ^= z >> 30;
    z = z.wrapping_mul(0xbf58476d1ce4e5b9);
    z ^= z >> 27;
    z = z.wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

pub fn dare_keep(seed: u64, task: usize, name: &str, i: u64, d: f64) -> bool {
    if d >= 1.0 {
        return true;
    }
    let mut h = 0xcbf29ce484222325u64;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    let stream = fmix(fmix(seed ^ fmix(task as u64 + 1)) ^ h);
    let x = fmix(stream.wrapping_add((i + 1).wrapping_mul(0x9E3779B97F4A7C15)));
    (x >> 32) < (d * 4294967296.0).floor() as u64
}

/// The spec's deterministic sum, restated with plain loops.
fn det_sum(s: &[f32]) -> f64 {
    let mut total = 0f64;
    for chunk in s.chunks(65536) {
        let mut lanes = vec![0f64; 256];
        for (i, v) in chunk.iter().enumerate() {
            lanes[i % 256] += *v as f64;
        }
        let mut stride = 128;
        while stride > 0 {
            for l in 0..stride {
                lanes[l] += lanes[l + stride];
            }
            stride /= 2;
        }
        total += lanes[0];
    }
    total
}

pub struct RefInputs<'a> {
    pub order: &'a [String],
    pub base: &'a HashMap<String, T>,
    pub start: Option<&'a HashMap<String, T>>,
    pub models: Vec<&'a HashMap<String, T>>,
    pub grads: Vec<Option<&'a HashMap<String, T>>>,
}

/// Expected output values (before narrowing) for every merged tensor.
pub fn reference(cfg: &RefConfig, inp: &RefInputs) -> HashMap<String, Vec<f32>> {
    let nt = cfg.tasks.len();
    let merged: Vec<&String> = inp
        .order
        .iter()
        .filter(|n| {
            let t = &inp.base[*n];
            matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
                && inp.models.iter().all(|m| m.contains_key(*n))
        })
        .collect();
    // Scores per task per tensor.
    let mut scores: Vec<Vec<Vec<f32>>> = vec![vec![]; nt];
    for t in 0..nt {
        for name in &merged {
            let b = inp.base[*name].values();
            let th = inp.models[t][*name].values();
            let g = inp.grads[t].and_then(|g| g.get(*name)).map(|g| g.values());
            scores[t].push(
                (0..b.len())
                    .map(|i| score(cfg, t, b[i], th[i], g.as_ref().map(|g| g[i])))
                    .collect(),
            );
        }
    }
    // Masks.
    let mut masks: Vec<Vec<Vec<bool>>> = vec![vec![]; nt];
    for t in 0..nt {
        let d = cfg.tasks[t].density;
        if cfg.method.topk() && cfg.model_selection && d < 1.0 {
            let mut all: Vec<(f32, usize, usize)> = Vec::new();
            for (j, s) in scores[t].iter().enumerate() {
                let mean = (det_sum(s) / s.len() as f64) as f32;
                for (i, v) in s.iter().enumerate() {
                    all.push((if mean > 0.0 { v / mean } else { 0.0 }, j, i));
                }
            }
            let k = k_of(d, all.len());
            all.sort_by(|a, b| {
                b.0.partial_cmp(&a.0)
                    .unwrap()
                    .then((a.1, a.2).cmp(&(b.1, b.2)))
            });
            let mut m: Vec<Vec<bool>> = scores[t].iter().map(|s| vec![false; s.len()]).collect();
            for e in &all[..k] {
                m[e.1][e.2] = true;
            }
            masks[t] = m;
        } else {
            for (j, s) in scores[t].iter().enumerate() {
                let m = if cfg.method.topk() {
                    topk_mask(s, k_of(d, s.len()))
                } else if cfg.method.dare() {
                    (0..s.len())
                        .map(|i| dare_keep(cfg.seed, t, merged[j], i as u64, d))
                        .collect()
                } else {
                    vec![true; s.len()]
                };
                masks[t].push(m);
            }
        }
    }
    // Fuse.
    let mut out = HashMap::new();
    for (j, name) in merged.iter().enumerate() {
        let b = inp.base[*name].values();
        let st = inp
            .start
            .map(|s| s[*name].values())
            .unwrap_or_else(|| b.clone());
        let th: Vec<Vec<f32>> = (0..nt).map(|t| inp.models[t][*name].values()).collect();
        // mergekit's L1 rescale: f32(Σ|τ|) / f32(Σ|kept τ|), both sums in the spec's tree order.
        let l1: Vec<Option<f32>> = (0..nt)
            .map(|t| {
                let tau: Vec<f32> = (0..b.len()).map(|i| (th[t][i] - b[i]).abs()).collect();
                let kept: Vec<f32> = (0..b.len())
                    .map(|i| if masks[t][j][i] { tau[i] } else { 0.0 })
                    .collect();
                let (before, after) = (det_sum(&tau) as f32, det_sum(&kept) as f32);
                (before >= 1e-7 && after >= 1e-7).then(|| before / after)
            })
            .collect();
        let mut res = vec![0f32; b.len()];
        for i in 0..b.len() {
            let mut u = vec![0f32; nt];
            for t in 0..nt {
                let tau = th[t][i] - b[i];
                let q = match (
                    cfg.method.dare() && cfg.rescale && cfg.tasks[t].density < 1.0,
                    l1[t],
                ) {
                    (false, _) => tau,
                    (true, _) if cfg.inv_density => tau / cfg.tasks[t].density as f32,
                    (true, Some(s)) => tau * s,
                    (true, None) => tau,
                };
                u[t] = cfg.tasks[t].weight * q;
            }
            let kept = |t: usize| masks[t][j][i];
            let v = if cfg.method.ties() {
                let mut s = 0f32;
                for t in 0..nt {
                    if kept(t) {
                        s += u[t];
                    }
                }
                let pos = s >= 0.0;
                let (mut mixed, mut div) = (0f32, 0f32);
                for t in 0..nt {
                    if kept(t) && ((u[t] > 0.0 && pos) || (u[t] < 0.0 && !pos)) {
                        mixed += u[t];
                        div += cfg.tasks[t].weight;
                    }
                }
                if cfg.normalize {
                    mixed /= if div == 0.0 { 1.0 } else { div };
                }
                b[i] + cfg.lambda * mixed
            } else {
                let mut acc = 0f32;
                for t in 0..nt {
                    if kept(t) {
                        if cfg.tasks[t].forget {
                            acc -= u[t];
                        } else {
                            acc += u[t];
                        }
                    }
                }
                if cfg.normalize {
                    let mut d = 0f32;
                    for t in 0..nt {
                        if !cfg.tasks[t].forget {
                            d += cfg.tasks[t].weight;
                        }
                    }
                    acc /= if d.abs() < 1e-8 { 1.0 } else { d };
                }
                st[i] + cfg.lambda * acc
            };
            res[i] = v;
        }
        out.insert((*name).clone(), res);
    }
    out
}

/// Every file below `dir` with its bytes, sorted by path: "inputs unchanged" compares these.
pub fn tree_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(tree_bytes(&p));
        } else {
            v.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    v.sort();
    v
}

/// Names in `dir` that a run leaves only when it fails to clean up (temporary folder, lock).
pub fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("stamerge-"))
        .collect()
}

pub fn stamerge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stamerge"))
}

/// The names of the entries of `dir`, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A synthetic set written by `stamerge synth DIR ARGS`.
pub fn synth(dir: &Path, args: &[&str]) {
    let o = std::process::Command::new(stamerge_bin())
        .arg("-q")
        .arg("synth")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `stamerge ARGS` run in `dir`: (exit code, stdout, stderr).
pub fn stamerge_in(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = std::process::Command::new(stamerge_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A tmpfs mounted for a test (root only), unmounted when dropped however the test ends.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// None, saying SKIPPED, where this process cannot mount.
    pub fn mount(at: &Path, opts: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIPPED (cannot mount a tmpfs here): {}", at.display());
        }
        ok.then(|| Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
