//! `stamerge bench merge`: a synthetic end-to-end merge timed beside the time it takes just to
//! read the same inputs, so the figure says how far the merge is from being bound by its reads.
//! `stamerge bench kernels`: the CUDA kernels alone, beside a device copy (in the cuda backend,
//! which owns the device; re-exported here).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, IoContext, Result};
use crate::synth::{generate, SynthSpec};
use crate::{Device, Options, Recipe};

pub use crate::backend::cuda::bench::{bench_kernels, KernelBench, KernelBenchSpec, KernelTiming};

pub struct MergeBench {
    pub input_bytes: u64,
    pub read_seconds: f64,
    pub merge_seconds: Vec<f64>,
    pub backend: String,
    pub peak_rss_anon_bytes: u64,
}

fn safetensors_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                safetensors_files(&p, out);
            } else if p.extension().map(|x| x == "safetensors").unwrap_or(false) {
                out.push(p);
            }
        }
    }
}

/// Reads every input file once through a reused 8 MiB buffer; returns (bytes, seconds).
pub fn read_inputs(files: &[PathBuf]) -> Result<(u64, f64)> {
    let mut buf = vec![0u8; 8 << 20];
    let t0 = Instant::now();
    let mut total = 0u64;
    for f in files {
        let mut h = std::fs::File::open(f).ctx(|| format!("opening {}", f.display()))?;
        loop {
            let n = h
                .read(&mut buf)
                .ctx(|| format!("reading {}", f.display()))?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok((total, t0.elapsed().as_secs_f64()))
}

/// Generates `spec` into `dir` (unless a set is already there), then times `runs` merges of
/// `recipe_name` against the time to read the inputs from a warm page cache.
pub fn bench_merge(
    spec: &SynthSpec,
    dir: &Path,
    recipe_name: &str,
    device: Device,
    runs: usize,
) -> Result<MergeBench> {
    if !dir.join(recipe_name).is_file() {
        generate(spec, dir)?;
    }
    let recipe_path = dir.join(recipe_name);
    let recipe = Recipe::from_file(&recipe_path).map_err(Error::Plan)?;
    let mut files = Vec::new();
    for p in std::iter::once(&recipe.base).chain(
        recipe
            .tasks
            .iter()
            .flat_map(|t| std::iter::once(&t.model).chain(t.gradients.iter())),
    ) {
        safetensors_files(p, &mut files);
    }
    read_inputs(&files)?; // warm the page cache
    let (bytes, read_seconds) = read_inputs(&files)?;
    let out = dir.join("bench-out");
    let opts = Options {
        device,
        overwrite: true,
        ..Options::default()
    };
    let mut merge_seconds = Vec::new();
    let mut backend = String::new();
    let mut peak = 0;
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let rep = crate::merge(&recipe, &out, &opts)?;
        merge_seconds.push(t0.elapsed().as_secs_f64());
        backend = rep.backend;
        peak = peak.max(rep.peak_rss_anon_bytes);
    }
    let _ = std::fs::remove_dir_all(&out);
    Ok(MergeBench {
        input_bytes: bytes,
        read_seconds,
        merge_seconds,
        backend,
        peak_rss_anon_bytes: peak,
    })
}
