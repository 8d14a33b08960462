//! `stamerge bench kernels`: the kernels timed with CUDA events on fresh random data, each beside
//! a device-to-device copy measured in the same run (the bandwidth a memory-bound kernel can
//! reach on this GPU).
//!
//! Timed, each as the median of `iters` runs after 3 warm-up runs:
//! - `copy`: `memcpy_dtod` of the 4n-byte key buffer (4n read + 4n written);
//! - `score_keys`: STA's |θ·G| into stored keys with the first radix digit's histogram and pick
//!   fused in (the production launch; `select_init` runs before the timed region);
//! - `select`: the rest of the radix select from stored keys (passes 1 and 2 with candidates, tie
//!   count and cutoff, mask), i.e. everything after `score_keys` that turns keys into a mask;
//! - `dare_mask`: one task's DARE mask;
//! - `fuse_linear`, `fuse_ties`: T tasks with masks, with the kept counts, the combination
//!   histogram (T <= 8) and the error word, as a merge launches them: the general kernels and
//!   the typed ones of the dtype (loads in flight), which a merge of one-dtype inputs launches.
//!
//! GB/s counts the bytes each kernel must move (docs/KERNELS.md, "Bytes per element"); for the
//! select, the keys it reads (pass 1, the mask, the tie count when it runs) plus the candidates
//! written and read, from the state of an untimed run.

use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;

use super::device::{
    dtype_code, DResult, FuseArgs, FuseTask, Gpu, Layout, ScoreInputs, SelectHeader, STATE_BAD,
    STATE_BYTES, TIE_TILE,
};
use super::{guarded, read_header, CudaBackend};
use crate::backend::BackendError;
use crate::dtype::{narrow, FloatType};
use crate::method::FuseRule;
use crate::select::dare::fmix;

#[derive(Clone, Debug)]
pub struct KernelBenchSpec {
    /// Elements per tensor.
    pub size: usize,
    pub tasks: usize,
    pub dtype: FloatType,
    /// Timed runs per kernel (after 3 warm-up runs).
    pub iters: usize,
    /// Fraction of entries each task keeps (k = density · n for the select, DARE's density).
    pub density: f64,
    pub ordinal: usize,
}

impl Default for KernelBenchSpec {
    fn default() -> Self {
        Self {
            size: 1 << 27,
            tasks: 4,
            dtype: FloatType::BF16,
            iters: 20,
            density: 0.1,
            ordinal: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct KernelTiming {
    pub name: String,
    /// Median milliseconds.
    pub ms: f64,
    /// Bytes the kernel must read and write.
    pub bytes: f64,
}

impl KernelTiming {
    pub fn gb_per_s(&self) -> f64 {
        self.bytes / (self.ms * 1e-3) / 1e9
    }
}

#[derive(Clone, Debug)]
pub struct KernelBench {
    pub device: String,
    pub spec: KernelBenchSpec,
    /// The random data's seed (printed so that a run can be repeated).
    pub seed: u64,
    pub copy: KernelTiming,
    pub kernels: Vec<KernelTiming>,
    /// The select from stored keys (pass 1 to the mask), in ms per 1e9 keys.
    pub select_ms_per_1e9: f64,
    /// score_keys + select: a task's mask from its inputs, in ms per 1e9 keys.
    pub score_select_ms_per_1e9: f64,
    /// Candidates the select's pass 1 kept (u64::MAX: the top bucket was too large).
    pub candidates: u64,
}

const WARMUP: usize = 3;

/// Runs the benchmark on GPU `spec.ordinal`; Err with the reason when there is none.
pub fn bench_kernels(spec: &KernelBenchSpec) -> Result<KernelBench, String> {
    if spec.size == 0 || spec.tasks == 0 || spec.tasks > 64 || spec.iters == 0 {
        return Err("bench kernels: size, tasks (1..=64) and iters must be positive".into());
    }
    if !(spec.density > 0.0 && spec.density <= 1.0) {
        return Err("bench kernels: density must be in (0, 1]".into());
    }
    let backend = CudaBackend::new(spec.ordinal).map_err(|e| e.to_string())?;
    let mut w = backend.enter().map_err(|e| e.to_string())?;
    guarded(|| run(&backend.gpu, &mut w.arena, spec).map_err(BackendError::Device)).map_err(|e| {
        match e {
            BackendError::Device(m) => m.to_string(),
            BackendError::Fault(f) => format!("unexpected fault {f:?}"),
        }
    })
}

/// Counter-based uniform values in (-1, 1), never 0: `(h + 0.5) / 2^23 - 1` for 24 random bits.
fn uniform(seed: u64, i: u64) -> f32 {
    let h = fmix(seed ^ fmix(i.wrapping_add(1)));
    ((h >> 40) as f32 + 0.5) / (1u64 << 23) as f32 - 1.0
}

/// `n` elements of `ty` from `value(i)`, generated in parallel chunks.
fn tensor(n: usize, ty: FloatType, value: impl Fn(u64) -> f32 + Sync) -> Vec<u8> {
    const CH: usize = 1 << 16;
    let sz = ty.size();
    let mut out = vec![0u8; n * sz];
    out.par_chunks_mut(CH * sz)
        .enumerate()
        .for_each(|(c, bytes)| {
            let start = (c * CH) as u64;
            let vals: Vec<f32> = (0..bytes.len() / sz)
                .map(|j| value(start + j as u64))
                .collect();
            narrow(ty, &vals, bytes);
        });
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median milliseconds of `body` between two events, `setup` (untimed) before each run.
fn time(
    gpu: &Gpu,
    iters: usize,
    mut setup: impl FnMut() -> DResult<()>,
    mut body: impl FnMut() -> DResult<()>,
) -> DResult<f64> {
    use cudarc::driver::sys::CUevent_flags;
    let ev = || {
        gpu.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(super::device::drv("creating a CUDA event"))
    };
    let (start, end) = (ev()?, ev()?);
    let mut ms = Vec::with_capacity(iters);
    for i in 0..WARMUP + iters {
        setup()?;
        start
            .record(&gpu.stream)
            .map_err(super::device::drv("recording an event"))?;
        body()?;
        end.record(&gpu.stream)
            .map_err(super::device::drv("recording an event"))?;
        let t = start
            .elapsed_ms(&end)
            .map_err(super::device::drv("timing a kernel"))?;
        if i >= WARMUP {
            ms.push(f64::from(t));
        }
    }
    Ok(median(ms))
}

fn run(gpu: &Gpu, arena: &mut super::Arena, spec: &KernelBenchSpec) -> DResult<KernelBench> {
    let n = spec.size;
    let nt = spec.tasks;
    let ty = spec.dtype;
    let sz = ty.size();
    let n64 = n as u64;
    let k = crate::method::keep_count(spec.density, n64);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5eed);

    // Layout: inputs, keys, candidates, tiles, masks, a select state, the fuse's table and
    // statistics, the output, and the copy's destination.
    let mut l = Layout::default();
    let base = l.take(n * sz);
    let theta: Vec<usize> = (0..nt).map(|_| l.take(n * sz)).collect();
    let grad: Vec<usize> = (0..nt).map(|_| l.take(n * sz)).collect();
    let keys = l.take(4 * n);
    let cap = n.div_ceil(4);
    let cand = l.take(4 * cap);
    let tiles = l.take(4 * n.div_ceil(TIE_TILE));
    let masks: Vec<usize> = (0..nt).map(|_| l.take(8 * n.div_ceil(64))).collect();
    let state = l.take(STATE_BYTES);
    let table = l.take(32 * nt);
    let ncombo = if nt <= 8 { 1usize << nt } else { 0 };
    let stats = l.take(8 * (1 + nt + ncombo));
    let out = l.take(n * sz);
    arena.reserve(gpu, l.bytes())?;

    // Fresh random, non-zero data: base ~ 0.05·U, θ = base + 0.01·U (a small task vector),
    // G = |U| + 2^-8 (positive, as a squared-gradient statistic).
    let b = |i: u64| 0.05 * uniform(seed, i);
    arena.upload(gpu, base, &tensor(n, ty, b))?;
    for t in 0..nt {
        let s = seed ^ fmix(t as u64 + 1);
        let th = |i: u64| b(i) + 0.01 * uniform(s, i);
        arena.upload(gpu, theta[t], &tensor(n, ty, th))?;
        let gs = s ^ 0x9e37_79b9_7f4a_7c15;
        let g = |i: u64| uniform(gs, i).abs() + 1.0 / 256.0;
        arena.upload(gpu, grad[t], &tensor(n, ty, g))?;
    }
    gpu.sync()?;

    let st = arena.at(state);
    let keys_p = arena.at(keys);
    let (cand_p, tiles_p) = (arena.at(cand), arena.at(tiles));
    let score = |t: usize| ScoreInputs {
        theta: arena.at(theta[t]),
        theta_dtype: dtype_code(ty),
        base: 0,
        base_dtype: dtype_code(ty),
        grad: arena.at(grad[t]),
        grad_dtype: dtype_code(ty),
        mode: 1,
        nonfinite_zero: false,
    };
    let s0 = score(0);
    // SAFETY (every launch below): the pointers are buffers of the layout above, sized for n.
    let init = || unsafe { gpu.select_init(st, n64, k) };
    let score_pass0 = || unsafe { gpu.score_keys(&s0, n64, keys_p, st + STATE_BAD, st, 0, true) };
    let select_rest = |mask: u64| unsafe {
        gpu.select_filter(keys_p, n64, st, 1, cand_p, cap as u64)?;
        gpu.select_filter(keys_p, n64, st, 2, cand_p, cap as u64)?;
        gpu.select_tie_count(keys_p, n64, st, tiles_p, 0, true)?;
        gpu.select_tie_cutoff(keys_p, n64, st, tiles_p)?;
        gpu.select_mask(keys_p, n64, st, mask)
    };

    // The keys' copy: the reference bandwidth.
    let copy_ms = {
        // SAFETY: a copy destination, written before it is read (and never read).
        let mut dst = unsafe { gpu.stream.alloc::<u8>(4 * n) }
            .map_err(super::device::drv("allocating the copy's destination"))?;
        let src = arena.view(keys, 4 * n)?;
        time(
            gpu,
            spec.iters,
            || Ok(()),
            || {
                gpu.stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(super::device::drv("copying on the device"))
            },
        )?
    };
    let copy = KernelTiming {
        name: "copy (memcpy_dtod)".into(),
        ms: copy_ms,
        bytes: 8.0 * n as f64,
    };

    let mut kernels = Vec::new();
    let score_ms = time(gpu, spec.iters, init, score_pass0)?;
    kernels.push(KernelTiming {
        name: "score_keys |θ·G| + digit 0".into(),
        ms: score_ms,
        bytes: (n * (2 * sz + 4)) as f64,
    });

    // One untimed select, stopped after pass 2, for the bytes it moves.
    init()?;
    score_pass0()?;
    unsafe {
        gpu.select_filter(keys_p, n64, st, 1, cand_p, cap as u64)?;
        gpu.select_filter(keys_p, n64, st, 2, cand_p, cap as u64)?;
    }
    let h: SelectHeader = read_header(gpu, arena, state)?;
    if h.bad != u64::MAX || h.flags != 0 || h.passes_done != 3 {
        return Err(super::DeviceError::Internal(format!(
            "the select's state after pass 2 is wrong: {h:?}"
        )));
    }
    let keys_bytes = 4.0 * n as f64;
    let cand_bytes = if h.cand_len == u64::MAX {
        keys_bytes // pass 2 re-read the keys
    } else {
        8.0 * h.cand_len as f64 // written in pass 1, read in pass 2
    };
    let tie_bytes = if h.k_rem < h.count_eq {
        keys_bytes
    } else {
        0.0
    };
    let mask0 = arena.at(masks[0]);
    let select_ms = time(
        gpu,
        spec.iters,
        || {
            init()?;
            score_pass0()
        },
        || select_rest(mask0),
    )?;
    kernels.push(KernelTiming {
        name: "select (pass 1 → mask)".into(),
        ms: select_ms,
        bytes: 2.0 * keys_bytes + cand_bytes + tie_bytes + n as f64 / 8.0,
    });

    // Every task's mask for the fuse: a real top-k mask for task 0 (above), DARE for the others.
    let dare_threshold = crate::select::dare::threshold(spec.density);
    let dare_ms = time(
        gpu,
        spec.iters,
        || Ok(()),
        || unsafe { gpu.dare_mask(n64, fmix(seed), dare_threshold, arena.at(masks[0]), 0) },
    )?;
    kernels.push(KernelTiming {
        name: "dare_mask (one task)".into(),
        ms: dare_ms,
        bytes: n as f64 / 8.0,
    });
    for (t, m) in masks.iter().enumerate() {
        unsafe { gpu.dare_mask(n64, fmix(seed ^ t as u64), dare_threshold, arena.at(*m), 0) }?;
    }

    // The fuse's table and statistics are uploaded from pageable memory below: not behind
    // unwaited kernels (the driver may stage such a copy and wait for them; untimed here).
    gpu.sync()?;
    let tasks: Vec<FuseTask> = (0..nt)
        .map(|t| FuseTask {
            theta: arena.at(theta[t]),
            mask: arena.at(masks[t]),
            weight: 1.0,
            rescale: 1.0,
            sign: 1,
            dtype: dtype_code(ty),
            scale: 1.0,
            pad: 0,
        })
        .collect();
    arena.upload(gpu, table, bytemuck::cast_slice(&tasks))?;
    let mut init_stats = vec![0u64; 1 + nt + ncombo];
    init_stats[0] = u64::MAX;
    let stats_p = arena.at(stats);
    let fuse_bytes = (n * (sz * (1 + nt) + sz)) as f64 + (nt * n) as f64 / 8.0;
    for (rule, typed) in [
        (FuseRule::Linear, false),
        (FuseRule::Linear, true),
        (FuseRule::Ties, false),
        (FuseRule::Ties, true),
    ] {
        let args = FuseArgs {
            rule,
            base: arena.at(base),
            base_dtype: dtype_code(ty),
            start: 0,
            start_dtype: 0,
            tasks: arena.at(table),
            num_tasks: nt as i32,
            n: n64,
            normalize: rule == FuseRule::Ties,
            linear_div: 1.0,
            lambda: 1.0,
            out: arena.at(out),
            out_dtype: dtype_code(ty),
            kept: stats_p + 8,
            combo_hist: if ncombo > 0 {
                stats_p + 8 * (1 + nt as u64)
            } else {
                0
            },
            bad: stats_p,
            // one dtype, arena addresses, no rescale: the typed kernel is what a merge of these
            // inputs launches; the general one is timed beside it (issue 20's before/after)
            uniform: typed,
        };
        // The statistics start at zero (the error word at u64::MAX) before every run, untimed.
        let zero_stats = || arena.upload(gpu, stats, bytemuck::cast_slice(&init_stats));
        let ms = time(gpu, spec.iters, zero_stats, || unsafe { gpu.fuse(&args) })?;
        kernels.push(KernelTiming {
            name: format!(
                "{}{} (T = {nt}, masks)",
                if rule == FuseRule::Linear {
                    "fuse_linear"
                } else {
                    "fuse_ties"
                },
                if typed {
                    format!("_{}", ty.torch_name())
                } else {
                    String::new()
                }
            ),
            ms,
            bytes: fuse_bytes,
        });
    }
    gpu.sync()?;

    let per_1e9 = |ms: f64| ms * 1e9 / n as f64;
    Ok(KernelBench {
        device: gpu.description.clone(),
        spec: spec.clone(),
        seed,
        copy,
        kernels,
        select_ms_per_1e9: per_1e9(select_ms),
        score_select_ms_per_1e9: per_1e9(score_ms + select_ms),
        candidates: h.cand_len,
    })
}
