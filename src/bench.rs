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
    /// Bytes one merge queued host → device and device → host (the CUDA backend's counters,
    /// `backend::cuda::fill::link_bytes`; zero on the CPU).
    pub link_bytes: (u64, u64),
    /// Median seconds of the same merge on the CPU backend, when asked for (the ratio the GPU
    /// merge is judged by beside the warm read).
    pub cpu_seconds: Option<f64>,
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
/// `recipe_name` against the time to read the inputs from a warm page cache (and, with
/// `compare_cpu` and a GPU merge, against the same merge on the CPU).
pub fn bench_merge(
    spec: &SynthSpec,
    dir: &Path,
    recipe_name: &str,
    device: Device,
    runs: usize,
    compare_cpu: bool,
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
    let link0 = crate::backend::cuda::fill::link_bytes();
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let rep = crate::merge(&recipe, &out, &opts)?;
        merge_seconds.push(t0.elapsed().as_secs_f64());
        backend = rep.backend;
        peak = peak.max(rep.peak_rss_anon_bytes);
    }
    let link1 = crate::backend::cuda::fill::link_bytes();
    let n = merge_seconds.len() as u64;
    let link_bytes = ((link1.0 - link0.0) / n, (link1.1 - link0.1) / n);
    let cpu_seconds = if compare_cpu && backend != "cpu" {
        let cpu = Options {
            device: Device::Cpu,
            ..opts
        };
        let mut t = Vec::new();
        for _ in 0..runs.max(1) {
            let t0 = Instant::now();
            crate::merge(&recipe, &out, &cpu)?;
            t.push(t0.elapsed().as_secs_f64());
        }
        Some(median(t))
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&out);
    Ok(MergeBench {
        input_bytes: bytes,
        read_seconds,
        merge_seconds,
        backend,
        peak_rss_anon_bytes: peak,
        link_bytes,
        cpu_seconds,
    })
}

/// One row of `stamerge bench staging`.
pub struct StagingRow {
    /// Threads filling the slots (0: the old path, one thread with plain `copy_from_slice` and
    /// no populate call).
    pub threads: usize,
    /// Median seconds to stage the whole file.
    pub seconds: f64,
    /// Median CPU seconds (user + system, all threads) to stage it: unlike the wall time, not
    /// stretched by other processes on a loaded machine, so bytes ÷ this is the rate per busy
    /// core that a quiet machine with enough cores would scale (until memory bandwidth binds).
    pub cpu_seconds: f64,
}

/// User + system CPU seconds of this process so far (every thread).
fn cpu_time() -> f64 {
    // SAFETY: getrusage writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The host side of the CUDA backend's input staging, without a GPU: a memory-mapped file in the
/// page cache (its page tables dropped before each run, as the pipeline drops them after each
/// group) is copied slot by slot into four reused 16 MiB buffers, touched beforehand as pinned
/// memory is, by `backend::cuda::fill::copy_in` on a pool of each thread count. The copy engine
/// is left out: the figure is how fast the host can feed it (issue 20).
pub fn bench_staging(
    file: &Path,
    bytes: u64,
    threads: &[usize],
    runs: usize,
) -> Result<Vec<StagingRow>> {
    use crate::backend::cuda::fill::copy_in;
    let make = match std::fs::metadata(file) {
        Ok(m) => m.len() != bytes,
        Err(_) => true,
    };
    if make {
        if let Some(d) = file.parent() {
            std::fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
        }
        let mut block = vec![0u8; 1 << 20];
        for (i, b) in block.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let mut f = std::fs::File::create(file).ctx(|| format!("creating {}", file.display()))?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            std::io::Write::write_all(&mut f, &block[..n])
                .ctx(|| format!("writing {}", file.display()))?;
            left -= n as u64;
        }
    }
    read_inputs(&[file.to_path_buf()])?; // into the page cache
    let f = std::fs::File::open(file).ctx(|| format!("opening {}", file.display()))?;
    // SAFETY: a read-only mapping of a file this benchmark wrote and nobody else changes.
    let map = unsafe { memmap2::Mmap::map(&f) }.ctx(|| format!("mapping {}", file.display()))?;
    let slot = crate::backend::cuda::SLOT_MAX;
    let mut slots: Vec<Vec<u8>> = (0..4).map(|_| vec![1u8; slot]).collect();
    let mut rows = Vec::new();
    for &t in threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build()
            .map_err(|e| Error::Other(format!("cannot start worker threads: {e}")))?;
        let mut times = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..runs.max(1) {
            // SAFETY: a read-only shared file mapping: MADV_DONTNEED only drops this process's
            // page table entries; the next access maps the same bytes from the page cache.
            let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
            let (t0, c0) = (Instant::now(), cpu_time());
            pool.install(|| {
                for (j, piece) in map.chunks(slot).enumerate() {
                    let dst = &mut slots[j % 4][..piece.len()];
                    if t == 0 {
                        dst.copy_from_slice(piece);
                    } else {
                        copy_in(dst, piece);
                    }
                }
            });
            times.push(t0.elapsed().as_secs_f64());
            cpu.push(cpu_time() - c0);
        }
        std::hint::black_box(&slots);
        rows.push(StagingRow {
            threads: t,
            seconds: median(times),
            cpu_seconds: median(cpu),
        });
    }
    Ok(rows)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
