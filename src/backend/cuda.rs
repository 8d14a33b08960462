//! The CUDA backend: the score → select → fuse of `cpu.rs`, bit for bit, with the kernels of
//! `kernels/*.cu` (their launch contract is docs/KERNELS.md).
//!
//! Per tensor group, [`CudaBackend::merge_group`] puts the inputs into a grow-only device arena,
//! launches every kernel on the compute stream (no host round trip between the selection passes:
//! the radix picks happen on the device), then copies the output and the statistics back and
//! turns the kernels' error words into the same [`Fault`] the CPU backend reports.
//!
//! Bytes move as docs/STREAMING.md describes: inputs through a pinned staging ring on a copy
//! stream (the compute stream waits on an event), the output back through a second ring; with
//! `merge_group_with_next` the next group's inputs are read and copied into a second arena while
//! this group's kernels run. The device memory stays within the `--max-memory` budget: a group
//! that does not fit runs in chunks (`chunked.rs`) with the same bits.
//!
//! Groups the kernels do not take (no elements, no task, more than 64 tasks) go to the CPU
//! backend, which gives the same bytes.

mod chunked;
mod device;
mod staging;

pub mod bench;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use cudarc::driver::{result, CudaEvent};

pub use device::HAVE_KERNELS;
use device::{
    dtype_code, state_hist, Arena, DResult, FuseArgs, FuseTask, Gpu, Layout, Ptr, ScoreInputs,
    SelectHeader, STATE_BAD, STATE_BYTES, STATE_PREFIX, SUM_CHUNK, TIE_TILE,
};

use staging::{Download, Ring};

use super::cpu::{CpuBackend, MAX_COMBO_TASKS};
use super::{
    BResult, Backend, BackendError, Fault, FuseSpec, Group, GroupStats, KeySpec, MaskJob, Raw,
    Source, TaskStats,
};
use crate::method::ScoreKind;
use crate::select::{Threshold, DIGITS_11};

/// The message of a build without kernels.
pub const NO_KERNELS: &str = "this build has no CUDA kernels (nvcc was not found at build time: \
                              run scripts/install-nvcc.sh and rebuild)";

/// The share of the free device memory the backend uses when `--max-memory` is not given: the
/// rest stays for the driver, other processes and fragmentation.
pub const DEFAULT_BUDGET_SHARE: f64 = 0.9;

/// The share of the budget set aside for the next group's inputs (`Work::ahead`) and a deferred
/// output (`Work::outbuf`, 1/OUT_SHARE of it, taken out of the 1/AHEAD_SHARE); the rest is the
/// working arena, which decides when a group runs in chunks.
const AHEAD_SHARE: usize = 4;
const OUT_SHARE: usize = 16;

/// Below this budget not even the selection state and one small chunk fit.
pub const MIN_BUDGET: usize = 256 << 10;

/// The most tasks the fuse kernels take in one launch.
const MAX_FUSE_TASKS: usize = 64;

/// `SelectState.flags` bits (kernels/common.cuh).
const FLAG_PICK_FAILED: u32 = 1;
const FLAG_TIE_FAILED: u32 = 2;

pub struct CudaBackend {
    gpu: Gpu,
    /// Device memory and staging; the lock also makes one group's launches exclusive on the
    /// streams.
    work: Mutex<Work>,
    /// `--max-memory`, or the default share of the free memory.
    budget: u64,
    /// Inputs taken from the previous call's staging (for the tests and benches).
    staged_hits: AtomicU64,
    /// Outputs copied back while the next call computed (for the tests and benches).
    deferred_outputs: AtomicU64,
    /// For the groups the kernels do not take (see the module comment).
    cpu: CpuBackend,
}

impl CudaBackend {
    /// Opens CUDA device `ordinal` and loads the kernels; a clear message when this build has
    /// no kernels, the machine has no driver or GPU, or the kernels do not run on this GPU.
    /// Never panics.
    pub fn new(ordinal: usize) -> Result<Self, String> {
        Self::with_max_memory(ordinal, None)
    }

    /// As [`CudaBackend::new`], with the device memory this backend may use (`--max-memory`);
    /// None: [`DEFAULT_BUDGET_SHARE`] of the memory free once the kernels are loaded. Tensor
    /// groups that do not fit are processed in chunks.
    pub fn with_max_memory(ordinal: usize, max_memory: Option<u64>) -> Result<Self, String> {
        if !HAVE_KERNELS {
            return Err(NO_KERNELS.into());
        }
        // SAFETY: only tries to load libcuda (dlopen) and releases it again.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no CUDA driver (libcuda) on this machine".into());
        }
        // The driver bindings panic on a missing symbol (a driver older than the bindings):
        // the last guard against a crash while probing.
        match catch_unwind(|| Self::open(ordinal, max_memory)) {
            Ok(r) => r,
            Err(p) => Err(format!(
                "the CUDA driver failed while starting: {}",
                panic_message(p.as_ref())
            )),
        }
    }

    fn open(ordinal: usize, max_memory: Option<u64>) -> Result<Self, String> {
        let gpu = Gpu::open(ordinal)?;
        let budget = match max_memory {
            Some(b) => b,
            None => {
                let (free, _) = gpu
                    .ctx
                    .mem_get_info()
                    .map_err(device::drv("reading the free GPU memory"))?;
                (free as f64 * DEFAULT_BUDGET_SHARE) as u64
            }
        };
        let budget = usize::try_from(budget).unwrap_or(usize::MAX);
        if budget < MIN_BUDGET {
            return Err(format!(
                "--max-memory {budget} bytes is too small for the cuda backend (at least {} \
                 bytes: one chunk's buffers and the selection state)",
                MIN_BUDGET
            ));
        }
        let work = Work::new(&gpu, budget)?;
        let backend = Self {
            gpu,
            work: Mutex::new(work),
            budget: budget as u64,
            staged_hits: AtomicU64::new(0),
            deferred_outputs: AtomicU64::new(0),
            cpu: CpuBackend::new(),
        };
        backend.self_test()?;
        Ok(backend)
    }

    /// One tiny launch and read-back at start-up, so that a GPU the kernels cannot run on (or a
    /// broken driver) is found here, where `--device auto` can still fall back to the CPU.
    fn self_test(&self) -> DResult<()> {
        let mut w = self.lock();
        let arena = &mut w.arena;
        arena.reserve(&self.gpu, STATE_BYTES)?;
        let st = arena.at(0);
        // SAFETY: `st` is a SelectState-sized buffer of the arena.
        unsafe { self.gpu.select_init(st, 5, 3) }?;
        let h = read_header(&self.gpu, arena, 0)?;
        if (h.n, h.k, h.k_rem, h.count_eq, h.cand_len, h.bad) != (5, 3, 3, 5, u64::MAX, u64::MAX) {
            return Err(format!(
                "the GPU self-test failed: select_init wrote {h:?} (the kernels do not run \
                 correctly on {})",
                self.gpu.description
            ));
        }
        Ok(())
    }

    /// "NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB, driver 13.0)".
    pub fn description(&self) -> &str {
        &self.gpu.description
    }

    /// The device memory budget in bytes (`--max-memory`, or the default share of free memory).
    pub fn max_memory(&self) -> u64 {
        self.budget
    }

    /// How many input tensors so far were copied in while the previous group computed.
    pub fn staged_inputs(&self) -> u64 {
        self.staged_hits.load(Ordering::Relaxed)
    }

    /// How many outputs so far were copied back while the next call computed.
    pub fn deferred_outputs(&self) -> u64 {
        self.deferred_outputs.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Work> {
        self.work.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The part of a memory budget that holds the group being merged (the rest stages the next).
pub fn work_share(budget: u64) -> u64 {
    budget - budget / AHEAD_SHARE as u64
}

/// The GPU memory the largest merged tensor group of `plan` needs in one piece, and how many
/// groups need more than the working share of `budget` (those run in chunks). Counts a top-k mask for every ranked
/// task (a model-wide threshold needs less), so it is an upper bound.
pub fn plan_memory(plan: &crate::plan::Plan, budget: Option<u64>) -> (u64, usize) {
    use crate::method::SelectKind;
    let r = &plan.recipe;
    let nt = r.tasks.len();
    let (mut largest, mut over) = (0u64, 0usize);
    for item in &plan.items {
        let crate::plan::ItemKind::Merge { n, out, scores, .. } = &item.kind else {
            continue;
        };
        let g = crate::pipeline::group(plan, item, *n);
        let jobs: Vec<MaskJob> = (0..nt)
            .map(|t| match (r.method.select(), scores[t]) {
                (SelectKind::Random, _) => MaskJob::Random {
                    stream: 0,
                    threshold: 0,
                },
                (SelectKind::TopK, Some(score)) => MaskJob::TopK {
                    spec: KeySpec {
                        score,
                        mean: None,
                        nonfinite_zero: false,
                    },
                    k: 1,
                },
                _ => MaskJob::All,
            })
            .collect();
        let f = FuseSpec {
            rule: r.method.fuse(),
            lambda: 1.0,
            normalize: false,
            weights: vec![1.0; nt],
            forget: vec![false; nt],
            rescale: vec![None; nt],
            out: *out,
        };
        let bytes = group_bytes(&g, &jobs, &f).unwrap_or(0) as u64;
        largest = largest.max(bytes);
        over += budget.is_some_and(|b| bytes > work_share(b)) as usize;
    }
    (largest, over)
}

/// Why `--device cuda` cannot run here, or None when it can (opens device 0 to find out).
pub fn unavailable_reason() -> Option<String> {
    CudaBackend::new(0).err()
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The backend's device memory and host staging, used by one tensor group at a time.
struct Work {
    /// Everything a group (or chunk) needs on the device, its inputs included.
    arena: Arena,
    /// The next group's inputs, copied in on the copy stream while the current group computes,
    /// then moved into `arena` by a device-to-device copy (docs/STREAMING.md).
    ahead: Arena,
    /// What `ahead` holds: (host address, bytes, offset in `ahead`) per input, for the next
    /// call only.
    staged: Option<Vec<(usize, usize, usize)>>,
    /// Pinned rings: inputs in (copy stream), results out (compute stream).
    up: Ring,
    down: Ring,
    /// Recorded on the copy stream after a group's own input uploads.
    inputs_ready: CudaEvent,
    /// Recorded on the copy stream after the uploads into `ahead`.
    ahead_ready: CudaEvent,
    /// Recorded on the compute stream after the copies out of `ahead`: the next staging waits.
    ahead_free: CudaEvent,
    /// The last deferred output, on its way to the host (docs/STREAMING.md, "Deferred output").
    pending: Option<Pending>,
    /// Deferred outputs that have arrived and are not yet handed back, oldest first.
    done: Vec<Vec<u8>>,
    /// A deferred output's bytes on the device while the download stream copies them out. It is
    /// declared after `down`, whose drop waits for the slots' transfers, so it is freed after.
    outbuf: Arena,
    /// Recorded on the compute stream once the output is in `outbuf`; the download stream waits.
    out_ready: CudaEvent,
}

/// A merged group's output being copied back on the download stream.
struct Pending {
    name: String,
    buf: Vec<u8>,
    download: Download,
}

impl Work {
    fn new(gpu: &Gpu, budget: usize) -> Result<Self, String> {
        let work = work_share(budget as u64) as usize;
        let outbuf = budget / OUT_SHARE;
        let slot = staging::slot_bytes(budget);
        let event = || {
            gpu.ctx
                .new_event(None)
                .map_err(device::drv("creating a CUDA event"))
        };
        Ok(Self {
            arena: Arena::with_limit(work),
            ahead: Arena::with_limit(budget - work - outbuf),
            staged: None,
            up: Ring::new(gpu, slot)?,
            down: Ring::new(gpu, slot)?,
            inputs_ready: event()?,
            ahead_ready: event()?,
            ahead_free: event()?,
            pending: None,
            done: Vec::new(),
            outbuf: Arena::with_limit(outbuf),
            out_ready: event()?,
        })
    }
}

/// Runs device work, turning a panic (a bug, or a driver binding that panics) into an error
/// instead of unwinding through the pipeline.
fn guarded<T>(f: impl FnOnce() -> BResult<T>) -> BResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(BackendError::Device(format!(
            "internal error in the cuda backend: {}",
            panic_message(p.as_ref())
        )))
    })
}

/// Runs `f` again (twice at most) when the GPU had less memory than the budget: the arena's
/// limit has shrunk to what is free by then, so the retry works in smaller chunks.
fn retry_smaller<T>(mut f: impl FnMut() -> BResult<T>) -> BResult<T> {
    let mut tries = 0;
    loop {
        match f() {
            Err(BackendError::Device(m)) if m.starts_with(device::OUT_OF_MEMORY) && tries < 2 => {
                tracing::info!("{m}; retrying in smaller chunks");
                tries += 1;
            }
            r => return r,
        }
    }
}

fn dev<T>(r: DResult<T>) -> BResult<T> {
    r.map_err(BackendError::Device)
}

/// Runs a sequence of launches, stopping at the first driver error.
fn launches(f: impl FnOnce() -> DResult<()>) -> BResult<()> {
    dev(f())
}

fn read_header(gpu: &Gpu, arena: &Arena, off: usize) -> DResult<SelectHeader> {
    let mut h = SelectHeader::default();
    arena.download(gpu, off, bytemuck::bytes_of_mut(&mut h))?;
    Ok(h)
}

fn score_mode(s: ScoreKind) -> i32 {
    match s {
        ScoreKind::AbsTaskVector => 0,
        ScoreKind::AbsWeightGrad => 1,
        ScoreKind::AbsTaskVectorGrad => 2,
    }
}

/// The bytes of `n` elements of a tensor, or an error if the tensor is shorter.
fn elems<'a>(r: &Raw<'a>, n: usize, what: &str) -> BResult<&'a [u8]> {
    let len = n * r.ty.size();
    r.data.get(..len).ok_or_else(|| {
        BackendError::Device(format!(
            "internal error: {what} has {} bytes, {n} elements of {:?} need {len}",
            r.data.len(),
            r.ty
        ))
    })
}

// ------------------------------------------------------------------------------------------------
// error words → faults (the bit layouts are in docs/KERNELS.md, "Error words")

/// `score_keys`' word: `(i << 3) | (source << 1) | is_nan`; source 0 base, 1 theta, 2 grad,
/// 3 the score itself overflowed.
fn score_fault(word: u64, task: usize) -> Option<Fault> {
    if word == u64::MAX {
        return None;
    }
    let source = match (word >> 1) & 3 {
        0 => Source::Base,
        1 => Source::Theta(task),
        2 => Source::Grad(task),
        _ => Source::Score(task),
    };
    Some(Fault {
        source,
        index: word >> 3,
        value_is_nan: word & 1 == 1,
    })
}

/// The fuse kernels' word: `(i << 9) | (slot << 2) | (base_bad << 1) | is_nan`; slot 0 the
/// start value, slot 1 + t task t's τ (blamed on the base when the base value is bad).
fn fuse_fault(word: u64) -> Option<Fault> {
    if word == u64::MAX {
        return None;
    }
    let slot = ((word >> 2) & 0x7f) as usize;
    let source = match slot {
        0 => Source::Start,
        _ if (word >> 1) & 1 == 1 => Source::Base,
        t => Source::Theta(t - 1),
    };
    Some(Fault {
        source,
        index: word >> 9,
        value_is_nan: word & 1 == 1,
    })
}

fn fault_result(f: Option<Fault>) -> BResult<()> {
    match f {
        Some(f) => Err(BackendError::Fault(f)),
        None => Ok(()),
    }
}

// ------------------------------------------------------------------------------------------------
// merge_group

/// What one task's mask needs on the device.
#[derive(Clone, Copy, Debug)]
enum Sel {
    /// No mask: every entry kept (`All`, or top-k with k >= n, as the CPU).
    Keep,
    TopK {
        spec: KeySpec,
        k: u64,
    },
    Fixed {
        spec: KeySpec,
        key: u32,
        quota: u64,
    },
    Random {
        stream: u64,
        threshold: u64,
    },
}

impl Sel {
    fn of(job: &MaskJob, n: usize) -> BResult<Self> {
        Ok(match *job {
            MaskJob::All => Sel::Keep,
            MaskJob::TopK { k, .. } if k >= n as u64 => Sel::Keep,
            MaskJob::TopK { k: 0, .. } => {
                return Err(BackendError::Device(
                    "internal error: top-k with k = 0".into(),
                ))
            }
            MaskJob::TopK { spec, k } => Sel::TopK { spec, k },
            MaskJob::Fixed {
                spec,
                key,
                tie_quota,
            } => Sel::Fixed {
                spec,
                key,
                quota: tie_quota,
            },
            MaskJob::Random { stream, threshold } => Sel::Random { stream, threshold },
        })
    }

    fn spec(&self) -> Option<&KeySpec> {
        match self {
            Sel::TopK { spec, .. } | Sel::Fixed { spec, .. } => Some(spec),
            _ => None,
        }
    }

    fn has_mask(&self) -> bool {
        !matches!(self, Sel::Keep)
    }
}

/// Where one group's buffers live in the arena.
struct GroupLayout {
    base: usize,
    start: Option<usize>,
    theta: Vec<usize>,
    grad: Vec<Option<usize>>,
    keys: usize,
    cand: usize,
    cand_cap: usize,
    tiles: usize,
    mask: Vec<Option<usize>>,
    state: Vec<Option<usize>>,
    /// FuseTask × T, then the f32 mean of each task (for `keys_normalize`).
    params: usize,
    /// u64 words: [fuse bad, tie total × T, kept × T, combos × 2^T].
    stats: usize,
    stats_words: usize,
    out: usize,
    bytes: usize,
}

/// Offsets of the words in the stats block.
struct StatsWords {
    nt: usize,
}

impl StatsWords {
    const FUSE_BAD: usize = 0;
    fn tie_total(&self, t: usize) -> usize {
        1 + t
    }
    fn kept(&self, t: usize) -> usize {
        1 + self.nt + t
    }
    fn combos(&self) -> usize {
        1 + 2 * self.nt
    }
}

/// The selections of `jobs` and how many mask-combination buckets are counted (as the CPU: when
/// some task has a mask and T <= 8).
fn selections(jobs: &[MaskJob], n: usize) -> BResult<(Vec<Sel>, usize)> {
    let sels = jobs
        .iter()
        .map(|j| Sel::of(j, n))
        .collect::<BResult<Vec<_>>>()?;
    let track = jobs.len() <= MAX_COMBO_TASKS && sels.iter().any(Sel::has_mask);
    Ok((sels, if track { 1usize << jobs.len() } else { 0 }))
}

/// The device bytes [`CudaBackend::merge_on_device`] needs for this group in one piece.
fn group_bytes(g: &Group, jobs: &[MaskJob], f: &FuseSpec) -> BResult<usize> {
    let (sels, ncombo) = selections(jobs, g.n)?;
    Ok(group_layout(g, &sels, f, ncombo).bytes)
}

fn group_layout(g: &Group, sels: &[Sel], fuse: &FuseSpec, ncombo: usize) -> GroupLayout {
    let n = g.n;
    let nt = g.tasks.len();
    let mut l = Layout::default();
    let base = l.take(n * g.base.ty.size());
    let start = g.start.map(|s| l.take(n * s.ty.size()));
    let theta = g
        .tasks
        .iter()
        .map(|t| l.take(n * t.theta.ty.size()))
        .collect();
    let grad = g
        .tasks
        .iter()
        .zip(sels)
        .map(|(t, s)| match (s.spec(), t.grad) {
            (Some(spec), Some(gr)) if spec.score.needs_grad() => Some(l.take(n * gr.ty.size())),
            _ => None,
        })
        .collect();
    let any_keys = sels.iter().any(|s| s.spec().is_some());
    let any_topk = sels.iter().any(|s| matches!(s, Sel::TopK { .. }));
    // Keys, candidates and tile counts are shared by the tasks: their launches run in order on
    // one stream, so each task's selection is done with them before the next one starts.
    let keys = if any_keys { l.take(4 * n) } else { 0 };
    // A quarter of the keys: pass 2 reads the candidates when the threshold's top-digit bucket
    // fits, the keys again otherwise (the CPU switches at the same size).
    let cand_cap = n.div_ceil(4);
    let cand = if any_topk { l.take(4 * cand_cap) } else { 0 };
    let tiles = if any_keys {
        l.take(4 * n.div_ceil(TIE_TILE))
    } else {
        0
    };
    let mask = sels
        .iter()
        .map(|s| s.has_mask().then(|| l.take(8 * n.div_ceil(64))))
        .collect();
    let state = sels
        .iter()
        .map(|s| s.spec().is_some().then(|| l.take(STATE_BYTES)))
        .collect();
    let params = l.take(nt * std::mem::size_of::<FuseTask>() + nt * 4);
    let stats_words = 1 + 2 * nt + ncombo;
    let stats = l.take(8 * stats_words);
    let out = l.take(n * fuse.out.size());
    GroupLayout {
        base,
        start,
        theta,
        grad,
        keys,
        cand,
        cand_cap,
        tiles,
        mask,
        state,
        params,
        stats,
        stats_words,
        out,
        bytes: l.bytes(),
    }
}

/// A select state whose three radix passes are done at `key`, with `quota` ties still to keep
/// and the ties not yet visited unknown (u64::MAX): `select_tie_cutoff` then keeps the first
/// min(e, quota) of a tensor's e ties.
fn fixed_header(n: u64, key: u32, quota: u64) -> SelectHeader {
    SelectHeader {
        n,
        k: quota,
        k_rem: quota,
        count_eq: u64::MAX,
        cand_len: u64::MAX,
        bad: u64::MAX,
        prefix: key,
        threshold: key,
        passes_done: 3,
        ..Default::default()
    }
}

/// The score kernel's inputs for task `t` under `spec`.
fn score_inputs(
    g: &Group,
    t: usize,
    spec: &KeySpec,
    arena: &Arena,
    base: usize,
    theta: usize,
    grad: Option<usize>,
) -> BResult<ScoreInputs> {
    let mode = score_mode(spec.score);
    let task = &g.tasks[t];
    let grad_ptr: Ptr = match (spec.score.needs_grad(), grad) {
        (false, _) => 0,
        (true, Some(off)) => arena.at(off),
        (true, None) => {
            return Err(BackendError::Device(format!(
                "internal error: task {t} has no gradient for tensor `{}`",
                g.name
            )))
        }
    };
    Ok(ScoreInputs {
        theta: arena.at(theta),
        theta_dtype: dtype_code(task.theta.ty),
        base: if mode == 1 { 0 } else { arena.at(base) },
        base_dtype: dtype_code(g.base.ty),
        grad: grad_ptr,
        grad_dtype: task.grad.map_or(0, |gr| dtype_code(gr.ty)),
        mode,
        nonfinite_zero: spec.nonfinite_zero,
    })
}

/// Where [`CudaBackend::merge_on_device`] puts a group's output.
enum Sink<'a> {
    /// Into this buffer, before the call returns.
    Now(&'a mut [u8]),
    /// Into this buffer on the download stream while the next call computes (taken out of the
    /// option when the download is queued; handed back through `Work::done`).
    Later(&'a mut Option<Vec<u8>>),
}

impl CudaBackend {
    fn merge_on_device(
        &self,
        w: &mut Work,
        g: &Group,
        jobs: &[MaskJob],
        f: &FuseSpec,
        mut sink: Sink,
        next: Option<&Group>,
    ) -> BResult<GroupStats> {
        let gpu = &self.gpu;
        let n = g.n;
        let out_len = match &sink {
            Sink::Now(o) => o.len(),
            Sink::Later(Some(o)) => o.len(),
            Sink::Later(None) => usize::MAX,
        };
        let nt = g.tasks.len();
        if jobs.len() != nt
            || f.weights.len() != nt
            || f.forget.len() != nt
            || f.rescale.len() != nt
        {
            return Err(BackendError::Device(format!(
                "internal error: {nt} tasks but {} jobs, {} weights",
                jobs.len(),
                f.weights.len()
            )));
        }
        if out_len != n * f.out.size() {
            return Err(BackendError::Device(format!(
                "internal error: output buffer of {out_len} bytes for {n} elements of {:?}",
                f.out
            )));
        }
        let (sels, ncombo) = selections(jobs, n)?;
        let track = ncombo > 0;
        let lay = group_layout(g, &sels, f, ncombo);
        let sw = StatsWords { nt };
        dev(w.arena.reserve(gpu, lay.bytes))?;

        // 1. inputs: staged by the previous call, or through the pinned ring now
        let mut inputs = vec![(lay.base, elems(&g.base, n, "the base tensor")?)];
        if let (Some(s), Some(off)) = (g.start, lay.start) {
            inputs.push((off, elems(&s, n, "the start tensor")?));
        }
        for (t, task) in g.tasks.iter().enumerate() {
            inputs.push((lay.theta[t], elems(&task.theta, n, "a task tensor")?));
            if let (Some(gr), Some(off)) = (task.grad, lay.grad[t]) {
                inputs.push((off, elems(&gr, n, "a gradient tensor")?));
            }
        }
        self.put_inputs(w, &inputs)?;
        let arena = &mut w.arena;
        // The fuse's task table and the means that normalise model-wide keys.
        let table: Vec<FuseTask> = (0..nt)
            .map(|t| FuseTask {
                theta: arena.at(lay.theta[t]),
                mask: lay.mask[t].map_or(0, |off| arena.at(off)),
                weight: f.weights[t],
                rescale: f.rescale[t].unwrap_or(1.0),
                sign: if f.forget[t] { -1 } else { 1 },
                dtype: dtype_code(g.tasks[t].theta.ty),
            })
            .collect();
        let means: Vec<f32> = sels
            .iter()
            .map(|s| s.spec().and_then(|sp| sp.mean).unwrap_or(0.0))
            .collect();
        let mut params = bytemuck::cast_slice::<FuseTask, u8>(&table).to_vec();
        params.extend_from_slice(bytemuck::cast_slice(&means));
        dev(arena.upload(gpu, lay.params, &params))?;
        let means_addr = arena.at(lay.params + nt * std::mem::size_of::<FuseTask>());
        let mean_ptr = |t: usize| means_addr + 4 * t as u64;
        // Error word at u64::MAX, counters at zero.
        let mut stats = vec![0u64; lay.stats_words];
        stats[StatsWords::FUSE_BAD] = u64::MAX;
        dev(arena.upload(gpu, lay.stats, bytemuck::cast_slice(&stats)))?;
        let stats_addr = arena.at(lay.stats);
        let stat_ptr = |word: usize| stats_addr + 8 * word as u64;

        // 2. one mask per task
        for (t, sel) in sels.iter().enumerate() {
            let n64 = n as u64;
            match *sel {
                Sel::Keep => {}
                Sel::Random { stream, threshold } => {
                    let mask = arena.at(lay.mask[t].expect("a mask"));
                    // SAFETY: `mask` holds ceil(n / 64) words.
                    dev(unsafe { gpu.dare_mask(n64, stream, threshold, mask, 0) })?;
                }
                Sel::TopK { spec, k } => {
                    let st = arena.at(lay.state[t].expect("a state"));
                    let keys = arena.at(lay.keys);
                    let cand = arena.at(lay.cand);
                    let tiles = arena.at(lay.tiles);
                    let mask = arena.at(lay.mask[t].expect("a mask"));
                    let s = score_inputs(g, t, &spec, arena, lay.base, lay.theta[t], lay.grad[t])?;
                    let cap = lay.cand_cap as u64;
                    // SAFETY: every pointer is a buffer of the layout, sized for n elements
                    // (docs/KERNELS.md, host sequencing (a)); score errors go to `st.bad`.
                    launches(|| unsafe {
                        gpu.select_init(st, n64, k)?;
                        match spec.mean {
                            // pass 0's histogram and pick fused into the scores
                            None => gpu.score_keys(&s, n64, keys, st + STATE_BAD, st, 0, true)?,
                            Some(_) => {
                                gpu.score_keys(&s, n64, keys, st + STATE_BAD, 0, 0, false)?;
                                gpu.keys_normalize(keys, n64, mean_ptr(t), st, 0, true)?;
                            }
                        }
                        gpu.select_filter(keys, n64, st, 1, cand, cap)?;
                        gpu.select_filter(keys, n64, st, 2, cand, cap)?;
                        // The total (keys == T) is only counted when some but not all ties are
                        // kept; `task_stats` accounts for that.
                        gpu.select_tie_count(
                            keys,
                            n64,
                            st,
                            tiles,
                            stat_ptr(sw.tie_total(t)),
                            true,
                        )?;
                        gpu.select_tie_cutoff(keys, n64, st, tiles)?;
                        gpu.select_mask(keys, n64, st, mask)
                    })?;
                }
                Sel::Fixed { spec, key, quota } => {
                    let st_off = lay.state[t].expect("a state");
                    let st = arena.at(st_off);
                    let keys = arena.at(lay.keys);
                    let tiles = arena.at(lay.tiles);
                    let mask = arena.at(lay.mask[t].expect("a mask"));
                    // The model-wide threshold is known: a state that has done its three radix
                    // passes, with the task's remaining tie quota. count_eq ("ties not yet
                    // visited") is unknown here, so it is set to u64::MAX: select_tie_cutoff
                    // then keeps min(e, quota) of this tensor's e ties, lowest index first,
                    // which is the CPU's rule for `MaskJob::Fixed`.
                    let h = fixed_header(n64, key, quota);
                    dev(arena.upload(gpu, st_off, bytemuck::bytes_of(&h)))?;
                    let s = score_inputs(g, t, &spec, arena, lay.base, lay.theta[t], lay.grad[t])?;
                    // SAFETY: as for TopK; the tie count always runs (skip_trivial = false), so
                    // its total is this tensor's number of keys equal to the threshold.
                    launches(|| unsafe {
                        gpu.score_keys(&s, n64, keys, st + STATE_BAD, 0, 0, false)?;
                        if spec.mean.is_some() {
                            gpu.keys_normalize(keys, n64, mean_ptr(t), 0, 0, false)?;
                        }
                        gpu.select_tie_count(
                            keys,
                            n64,
                            st,
                            tiles,
                            stat_ptr(sw.tie_total(t)),
                            false,
                        )?;
                        gpu.select_tie_cutoff(keys, n64, st, tiles)?;
                        gpu.select_mask(keys, n64, st, mask)
                    })?;
                }
            }
        }

        // 3. the fuse
        let linear_div = {
            let mut d = 0f32;
            for (t, wt) in f.weights.iter().enumerate() {
                if !f.forget[t] {
                    d += *wt;
                }
            }
            if d.abs() < 1e-8 {
                1.0
            } else {
                d
            }
        };
        let args = FuseArgs {
            rule: f.rule,
            base: arena.at(lay.base),
            base_dtype: dtype_code(g.base.ty),
            start: lay.start.map_or(0, |off| arena.at(off)),
            start_dtype: g.start.map_or(0, |s| dtype_code(s.ty)),
            tasks: arena.at(lay.params),
            num_tasks: nt as i32,
            n: n as u64,
            normalize: f.normalize,
            linear_div,
            lambda: f.lambda,
            out: arena.at(lay.out),
            out_dtype: dtype_code(f.out),
            kept: stat_ptr(sw.kept(0)),
            combo_hist: if track { stat_ptr(sw.combos()) } else { 0 },
            bad: stat_ptr(StatsWords::FUSE_BAD),
        };
        // SAFETY: the task table holds nt entries whose theta/mask addresses are buffers of the
        // layout; kept, combos and bad are words of the stats block.
        dev(unsafe { gpu.fuse(&args) })?;

        // 4. results. Now: the output's first pieces are queued behind the kernels, the next
        // group's inputs are read and copied in while they run, then the rest of the output comes
        // back. Later: while the kernels run, the previous group's output comes back and the next
        // group's inputs go in; then this output is moved aside on the device and its download
        // is queued on the download stream, to run while the next call computes.
        let out_dev = arena.at(lay.out);
        match sink {
            Sink::Now(out) => {
                let download = dev(w.down.download(&gpu.stream, out_dev, out.len()))?;
                if let Some(nx) = next {
                    self.stage_next(w, nx)?;
                }
                dev(w.down.finish(&gpu.stream, download, out))?;
            }
            Sink::Later(ref mut slot) => {
                self.finish_pending(w)?;
                if let Some(nx) = next {
                    self.stage_next(w, nx)?;
                }
                let out = slot.take().ok_or_else(|| {
                    BackendError::Device("internal error: a deferred output used twice".into())
                })?;
                self.defer_output(w, out_dev, out, g.name)?;
            }
        }
        let arena = &mut w.arena;
        dev(arena.download(gpu, lay.stats, bytemuck::cast_slice_mut(&mut stats)))?;
        let mut headers = vec![None; nt];
        for (t, off) in lay.state.iter().enumerate() {
            if let Some(off) = off {
                headers[t] = Some(dev(read_header(gpu, arena, *off))?);
            }
        }
        dev(gpu.sync())?;

        // Score errors first, task by task (the CPU fails while computing the keys of the
        // first bad task, before it fuses), then the fuse's check of start values and τ.
        for (t, h) in headers.iter().enumerate() {
            if let Some(h) = h {
                fault_result(score_fault(h.bad, t))?;
            }
        }
        fault_result(fuse_fault(stats[StatsWords::FUSE_BAD]))?;

        let tasks = sels
            .iter()
            .enumerate()
            .map(|(t, sel)| {
                task_stats(
                    sel,
                    n as u64,
                    headers[t].as_ref(),
                    stats[sw.tie_total(t)],
                    stats[sw.kept(t)],
                )
                .map_err(|e| {
                    BackendError::Device(format!(
                        "internal error in the selection of task {t} for `{}` ({n} elements): {e}",
                        g.name
                    ))
                })
            })
            .collect::<BResult<Vec<_>>>()?;
        let combos = stats[sw.combos()..sw.combos() + ncombo].to_vec();
        Ok(GroupStats { tasks, combos })
    }

    /// `score_sum` on the device: raw keys and the deterministic sum of each [`SUM_CHUNK`] keys
    /// (the caller adds them in order from 0.0, as `score_mean` would: the same bits).
    fn chunk_sums_on_device(
        &self,
        w: &mut Work,
        g: &Group,
        t: usize,
        spec: &KeySpec,
    ) -> BResult<Vec<f64>> {
        let gpu = &self.gpu;
        let n = g.n;
        let spec = KeySpec {
            mean: None,
            ..*spec
        };
        let l = ScoreBufs::for_sums(g, t, &spec);
        dev(w.arena.reserve(gpu, l.bytes))?;
        self.upload_inputs(w, g, t, &l)?;
        let arena = &mut w.arena;
        let mut bad = u64::MAX;
        dev(arena.upload(gpu, l.small, bytemuck::bytes_of(&bad)))?;
        let s = score_inputs(g, t, &spec, arena, l.base, l.theta, l.grad)?;
        let nchunks = n.div_ceil(SUM_CHUNK);
        let (n64, keys, chunks, bad_p) = (
            n as u64,
            arena.at(l.keys),
            arena.at(l.chunks),
            arena.at(l.small),
        );
        // SAFETY: keys (n u32), chunks (nchunks f64) and the bad word are arena buffers.
        launches(|| unsafe {
            gpu.score_keys(&s, n64, keys, bad_p, 0, 0, false)?;
            gpu.score_sum(keys, n64, chunks)
        })?;
        let mut sums = vec![0f64; nchunks];
        dev(arena.download(gpu, l.small, bytemuck::bytes_of_mut(&mut bad)))?;
        dev(arena.download(gpu, l.chunks, bytemuck::cast_slice_mut(&mut sums)))?;
        dev(gpu.sync())?;
        fault_result(score_fault(bad, t))?;
        Ok(sums)
    }

    /// `histogram` on the device, for one of the digits of [`DIGITS_11`].
    #[allow(clippy::too_many_arguments)]
    fn histogram_on_device(
        &self,
        w: &mut Work,
        g: &Group,
        t: usize,
        spec: &KeySpec,
        pass: usize,
        prefix: u32,
        hist: &mut [u64],
    ) -> BResult<()> {
        let gpu = &self.gpu;
        let n = g.n;
        let (shift, bits) = DIGITS_11[pass];
        let l = ScoreBufs::for_histogram(g, t, spec);
        dev(w.arena.reserve(gpu, l.bytes))?;
        self.upload_inputs(w, g, t, &l)?;
        let arena = &mut w.arena;
        let mut words = [u64::MAX, u64::from(spec.mean.unwrap_or(0.0).to_bits())];
        dev(arena.upload(gpu, l.small, bytemuck::cast_slice(&words)))?;
        let s = score_inputs(g, t, spec, arena, l.base, l.theta, l.grad)?;
        let (n64, st, bad) = (n as u64, arena.at(l.state), arena.at(l.small));
        // The state's prefix holds the decided bits in place (the kernel compares the key bits
        // above the digit with it); the pipeline's prefix is those bits shifted down.
        let top = shift + bits;
        let placed: u32 = if top >= 32 { 0 } else { prefix << top };
        // SAFETY: `st` is a SelectState; keys (n u32) when normalising; `bad` and the mean are
        // the two words of `small` (the mean is the low half of the second, little endian).
        dev(unsafe { gpu.select_init(st, n64, n64) })?;
        dev(arena.upload(gpu, l.state + STATE_PREFIX, &placed.to_le_bytes()))?;
        let keys = arena.at(l.keys);
        launches(|| unsafe {
            if spec.mean.is_none() {
                gpu.score_keys(&s, n64, 0, bad, st, pass as i32, false)
            } else {
                gpu.score_keys(&s, n64, keys, bad, 0, 0, false)?;
                gpu.keys_normalize(keys, n64, bad + 8, st, pass as i32, false)
            }
        })?;
        let mut h = vec![0u64; 2048];
        dev(arena.download(
            gpu,
            l.state + state_hist(pass),
            bytemuck::cast_slice_mut(&mut h),
        ))?;
        dev(arena.download(gpu, l.small, bytemuck::cast_slice_mut(&mut words[..1])))?;
        dev(gpu.sync())?;
        fault_result(score_fault(words[0], t))?;
        for (x, y) in hist.iter_mut().zip(&h[..1 << bits]) {
            *x += y;
        }
        Ok(())
    }
}

impl CudaBackend {
    /// Task `t`'s score inputs into the arena buffers of `l`.
    fn upload_inputs(&self, w: &mut Work, g: &Group, t: usize, l: &ScoreBufs) -> BResult<()> {
        let n = g.n;
        let mut inputs = vec![
            (l.base, elems(&g.base, n, "the base tensor")?),
            (l.theta, elems(&g.tasks[t].theta, n, "a task tensor")?),
        ];
        if let (Some(off), Some(gr)) = (l.grad, g.tasks[t].grad) {
            inputs.push((off, elems(&gr, n, "a gradient tensor")?));
        }
        self.put_inputs(w, &inputs)
    }

    /// Puts each `(arena offset, host bytes)` into the arena, ordered before the compute
    /// stream's next work: from `ahead` by a device copy when the previous call staged those
    /// bytes, else through the pinned ring on the copy stream. Either way what was staged is
    /// used up (it belongs to this call only).
    fn put_inputs(&self, w: &mut Work, inputs: &[(usize, &[u8])]) -> BResult<()> {
        let gpu = &self.gpu;
        let staged = w.staged.take().unwrap_or_default();
        let mut from_ahead = Vec::new();
        let mut uploaded = false;
        for &(off, data) in inputs {
            let hit = staged
                .iter()
                .find(|&&(ptr, len, _)| ptr == data.as_ptr() as usize && len == data.len());
            match hit {
                Some(&(_, len, src)) => from_ahead.push((off, src, len)),
                None => {
                    dev(w.arena.view(off, data.len()).map(|_| ()))?;
                    dev(w.up.upload(&gpu.copy, w.arena.at(off), data))?;
                    uploaded = true;
                }
            }
        }
        let ev = device::drv("ordering the CUDA streams");
        if uploaded {
            dev(w.inputs_ready.record(&gpu.copy).map_err(&ev))?;
            dev(gpu.stream.wait(&w.inputs_ready).map_err(&ev))?;
        }
        if !from_ahead.is_empty() {
            self.staged_hits
                .fetch_add(from_ahead.len() as u64, Ordering::Relaxed);
            dev(gpu.stream.wait(&w.ahead_ready).map_err(&ev))?;
            for (dst, src, len) in from_ahead {
                // SAFETY: `src..src + len` lies in `ahead` (staged there), `dst..dst + len` in
                // the arena (the caller's layout, reserved); the streams are ordered by events.
                dev(unsafe {
                    result::memcpy_dtod_async(
                        w.arena.at(dst),
                        w.ahead.at(src),
                        len,
                        gpu.stream.cu_stream(),
                    )
                }
                .map_err(device::drv("moving staged inputs on the GPU")))?;
            }
            dev(w.ahead_free.record(&gpu.stream).map_err(&ev))?;
        }
        Ok(())
    }

    /// Waits for the pending deferred output (its download ran while this call's kernels were
    /// queued) and moves it to `done`. Every use of the download ring or of `outbuf` comes after
    /// this.
    fn finish_pending(&self, w: &mut Work) -> BResult<()> {
        if let Some(mut p) = w.pending.take() {
            w.down
                .finish(&self.gpu.down, p.download, &mut p.buf)
                .map_err(|e| {
                    BackendError::Device(format!("copying `{}` back from the GPU: {e}", p.name))
                })?;
            w.done.push(p.buf);
        }
        Ok(())
    }

    /// Merges a group whose output comes back at once (the CPU path, chunked groups) into the
    /// buffer in `slot`. The pending output is finished first, so outputs stay in call order.
    /// On an error the buffer is still queued; the caller drops every queued output then.
    fn merge_now(
        &self,
        w: &mut Work,
        slot: &mut Option<Vec<u8>>,
        merge: impl FnOnce(&mut Work, &mut [u8]) -> BResult<GroupStats>,
    ) -> BResult<GroupStats> {
        self.finish_pending(w)?;
        let mut out = slot
            .take()
            .ok_or_else(|| BackendError::Device("internal error: an output used twice".into()))?;
        let stats = merge(w, &mut out);
        w.done.push(out);
        stats
    }

    /// Hands `out` over to the download stream: the output at `src` is copied aside into
    /// `outbuf` behind this group's kernels, and its first pieces are queued to come back while
    /// the next call computes. An output larger than `outbuf` (or with no memory for it) comes
    /// back now instead. The pending output must be finished already.
    fn defer_output(&self, w: &mut Work, src: Ptr, mut out: Vec<u8>, name: &str) -> BResult<()> {
        let gpu = &self.gpu;
        let len = out.len();
        if len > w.outbuf.limit() || w.outbuf.reserve(gpu, len).is_err() {
            let download = dev(w.down.download(&gpu.stream, src, len))?;
            dev(w.down.finish(&gpu.stream, download, &mut out))?;
            w.done.push(out);
            return Ok(());
        }
        let ev = device::drv("ordering the CUDA streams");
        // SAFETY: `src..src + len` is the group's output in the arena, `outbuf` holds `len`
        // bytes and no download reads it any more (`finish_pending`).
        dev(unsafe {
            result::memcpy_dtod_async(w.outbuf.at(0), src, len, gpu.stream.cu_stream())
        }
        .map_err(device::drv("moving the output aside on the GPU")))?;
        dev(w.out_ready.record(&gpu.stream).map_err(&ev))?;
        dev(gpu.down.wait(&w.out_ready).map_err(&ev))?;
        let download = dev(w.down.download(&gpu.down, w.outbuf.at(0), len))?;
        self.deferred_outputs.fetch_add(1, Ordering::Relaxed);
        w.pending = Some(Pending {
            name: name.to_string(),
            buf: out,
            download,
        });
        Ok(())
    }

    /// Copies the inputs of the group the caller merges next into `ahead` on the copy stream,
    /// while the compute stream works on the current group: reading them here pages them in
    /// from disk, and their transfer overlaps the kernels. Skipped when they do not fit `ahead`.
    fn stage_next(&self, w: &mut Work, g: &Group) -> BResult<()> {
        let gpu = &self.gpu;
        let n = g.n;
        w.staged = None;
        if n == 0 || g.tasks.is_empty() || g.tasks.len() > MAX_FUSE_TASKS {
            return Ok(());
        }
        let mut all = vec![elems(&g.base, n, "the base tensor")?];
        if let Some(s) = g.start {
            all.push(elems(&s, n, "the start tensor")?);
        }
        for task in &g.tasks {
            all.push(elems(&task.theta, n, "a task tensor")?);
            if let Some(gr) = task.grad {
                all.push(elems(&gr, n, "a gradient tensor")?);
            }
        }
        let mut l = Layout::default();
        let offs: Vec<usize> = all.iter().map(|d| l.take(d.len())).collect();
        if l.bytes() > w.ahead.limit() {
            return Ok(());
        }
        let ev = device::drv("ordering the CUDA streams");
        if w.ahead.capacity() < l.bytes() {
            // Growing frees the old buffer, which the compute stream may still be reading.
            dev(w.ahead_free.synchronize().map_err(&ev))?;
        }
        if w.ahead.reserve(gpu, l.bytes()).is_err() {
            // No room to stage (less memory free than the budget said): upload it when it comes.
            return Ok(());
        }
        // Not before the compute stream has moved the previous staged inputs out.
        dev(gpu.copy.wait(&w.ahead_free).map_err(&ev))?;
        let mut staged = Vec::with_capacity(all.len());
        for (data, off) in all.iter().zip(offs) {
            dev(w.up.upload(&gpu.copy, w.ahead.at(off), data))?;
            staged.push((data.as_ptr() as usize, data.len(), off));
        }
        dev(w.ahead_ready.record(&gpu.copy).map_err(&ev))?;
        w.staged = Some(staged);
        Ok(())
    }
}

/// Where the buffers of one task's score pass live in the arena (`score_sum`, `histogram`, and
/// the chunked path's tie search).
struct ScoreBufs {
    base: usize,
    theta: usize,
    grad: Option<usize>,
    /// n u32 keys (histogram: only with a mean; else unused, offset 0).
    keys: usize,
    /// score_sum's per-chunk f64 sums; histogram: none.
    chunks: usize,
    /// A SelectState (histogram, tie search); score_sum: none.
    state: usize,
    /// Tie-count tiles (tie search only).
    tiles: usize,
    /// 8 bytes: the score error word; histogram and tie search: 16 (the mean after it).
    small: usize,
    bytes: usize,
}

impl ScoreBufs {
    fn inputs(g: &Group, t: usize, spec: &KeySpec) -> (Layout, Self) {
        let mut l = Layout::default();
        let (base, theta, grad) = input_layout(&mut l, g, t, spec);
        let b = Self {
            base,
            theta,
            grad,
            keys: 0,
            chunks: 0,
            state: 0,
            tiles: 0,
            small: 0,
            bytes: 0,
        };
        (l, b)
    }

    fn for_sums(g: &Group, t: usize, spec: &KeySpec) -> Self {
        let (mut l, mut b) = Self::inputs(g, t, spec);
        b.keys = l.take(4 * g.n);
        b.chunks = l.take(8 * g.n.div_ceil(SUM_CHUNK));
        b.small = l.take(8);
        b.bytes = l.bytes();
        b
    }

    fn for_histogram(g: &Group, t: usize, spec: &KeySpec) -> Self {
        let (mut l, mut b) = Self::inputs(g, t, spec);
        if spec.mean.is_some() {
            b.keys = l.take(4 * g.n);
        }
        b.state = l.take(STATE_BYTES);
        b.small = l.take(16);
        b.bytes = l.bytes();
        b
    }

    fn for_tie_search(g: &Group, t: usize, spec: &KeySpec) -> Self {
        let (mut l, mut b) = Self::inputs(g, t, spec);
        b.keys = l.take(4 * g.n);
        b.tiles = l.take(4 * g.n.div_ceil(TIE_TILE));
        b.state = l.take(STATE_BYTES);
        b.small = l.take(16);
        b.bytes = l.bytes();
        b
    }
}

/// Offsets of the inputs that task `t`'s scores read: (base, theta, grad).
fn input_layout(
    l: &mut Layout,
    g: &Group,
    t: usize,
    spec: &KeySpec,
) -> (usize, usize, Option<usize>) {
    let n = g.n;
    let base = l.take(n * g.base.ty.size());
    let theta = l.take(n * g.tasks[t].theta.ty.size());
    let grad = match (spec.score.needs_grad(), g.tasks[t].grad) {
        (true, Some(gr)) => Some(l.take(n * gr.ty.size())),
        _ => None,
    };
    (base, theta, grad)
}

/// One task's statistics, as the CPU backend reports them, from what the device left behind:
/// the select state's header, the tie total of `select_tie_count` and the fuse's count of mask
/// bits. Checks the counts against each other (an Err is a kernel or host bug).
fn task_stats(
    sel: &Sel,
    n: u64,
    h: Option<&SelectHeader>,
    tie_total: u64,
    kept: u64,
) -> DResult<TaskStats> {
    let flags = |h: &SelectHeader| -> DResult<()> {
        if h.flags & FLAG_PICK_FAILED != 0 {
            return Err(format!(
                "a radix pick found fewer keys than it needed ({h:?})"
            ));
        }
        if h.flags & FLAG_TIE_FAILED != 0 {
            return Err(format!("the tie count exceeded the state's ties ({h:?})"));
        }
        Ok(())
    };
    match *sel {
        Sel::Keep => {
            if kept != n {
                return Err(format!("{kept} entries kept without a mask, expected {n}"));
            }
            Ok(TaskStats {
                kept: n,
                ..Default::default()
            })
        }
        Sel::Random { .. } => Ok(TaskStats {
            kept,
            ..Default::default()
        }),
        Sel::TopK { k, .. } => {
            let h = h.ok_or("no select state")?;
            flags(h)?;
            if h.passes_done != 3 {
                return Err(format!(
                    "{} radix passes done, not 3 ({h:?})",
                    h.passes_done
                ));
            }
            // The tie count ran (and select_tie_cutoff took its total e off count_eq) only when
            // some but not all keys equal to T are kept; otherwise count_eq is untouched and the
            // total was never added to. Either way their sum is the number of keys == T.
            let count_eq = h.count_eq + tie_total;
            let th = Threshold {
                key: h.threshold,
                cutoff: h.cutoff,
                count_gt: h.count_gt,
                count_eq,
            };
            if kept != k {
                return Err(format!(
                    "the mask keeps {kept} entries, not k = {k} ({h:?})"
                ));
            }
            Ok(TaskStats {
                kept: k,
                threshold: Some(th),
                ties_kept: count_eq.min(k - h.count_gt),
            })
        }
        Sel::Fixed { key, quota, .. } => {
            let h = h.ok_or("no select state")?;
            flags(h)?;
            let eq = tie_total;
            let ties = eq.min(quota);
            if kept < ties {
                return Err(format!(
                    "the mask keeps {kept} entries, fewer than the {ties} ties it must keep"
                ));
            }
            // The CPU reports cutoff = n when every tie is kept (also when there is none), 0
            // when none is; the device's cutoff is 0 whenever the quota is spent.
            let cutoff = if ties == eq { n } else { h.cutoff };
            Ok(TaskStats {
                kept,
                threshold: Some(Threshold {
                    key,
                    cutoff,
                    count_gt: kept - ties,
                    count_eq: eq,
                }),
                ties_kept: ties,
            })
        }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn merge_group(
        &self,
        g: &Group,
        jobs: &[MaskJob],
        f: &FuseSpec,
        out: &mut [u8],
    ) -> BResult<GroupStats> {
        if g.n == 0 || g.tasks.is_empty() || g.tasks.len() > MAX_FUSE_TASKS {
            return self.cpu.merge_group(g, jobs, f, out);
        }
        self.merge_group_with_next(g, jobs, f, out, None)
    }

    fn merge_group_with_next(
        &self,
        g: &Group,
        jobs: &[MaskJob],
        f: &FuseSpec,
        out: &mut [u8],
        next: Option<&Group>,
    ) -> BResult<GroupStats> {
        if g.n == 0 || g.tasks.is_empty() || g.tasks.len() > MAX_FUSE_TASKS {
            return self.cpu.merge_group(g, jobs, f, out);
        }
        let mut w = self.lock();
        guarded(|| {
            self.finish_pending(&mut w)?;
            retry_smaller(|| {
                if group_bytes(g, jobs, f)? <= w.arena.limit() {
                    self.merge_on_device(&mut w, g, jobs, f, Sink::Now(out), next)
                } else {
                    self.merge_chunked(&mut w, g, jobs, f, out)
                }
            })
        })
    }

    fn merge_group_deferred(
        &self,
        g: &Group,
        jobs: &[MaskJob],
        f: &FuseSpec,
        out: Vec<u8>,
        next: Option<&Group>,
    ) -> BResult<(GroupStats, Vec<Vec<u8>>)> {
        let mut w = self.lock();
        let r = guarded(|| {
            let mut slot = Some(out);
            let stats = if g.n == 0 || g.tasks.is_empty() || g.tasks.len() > MAX_FUSE_TASKS {
                self.merge_now(&mut w, &mut slot, |_, out| {
                    self.cpu.merge_group(g, jobs, f, out)
                })?
            } else {
                retry_smaller(|| {
                    if group_bytes(g, jobs, f)? <= w.arena.limit() {
                        self.merge_on_device(&mut w, g, jobs, f, Sink::Later(&mut slot), next)
                    } else {
                        self.merge_now(&mut w, &mut slot, |w, out| {
                            self.merge_chunked(w, g, jobs, f, out)
                        })
                    }
                })?
            };
            Ok((stats, std::mem::take(&mut w.done)))
        });
        if r.is_err() {
            // The caller's run is over: what is still in flight is waited for and dropped.
            let _ = self.finish_pending(&mut w);
            w.done.clear();
        }
        r
    }

    fn flush_outputs(&self) -> BResult<Vec<Vec<u8>>> {
        let mut w = self.lock();
        let r = guarded(|| {
            self.finish_pending(&mut w)?;
            Ok(std::mem::take(&mut w.done))
        });
        if r.is_err() {
            w.done.clear();
        }
        r
    }

    fn score_sum(&self, g: &Group, task: usize, spec: &KeySpec) -> BResult<f64> {
        if g.n == 0 {
            return self.cpu.score_sum(g, task, spec);
        }
        let mut w = self.lock();
        guarded(|| {
            self.finish_pending(&mut w)?;
            retry_smaller(|| self.score_sum_chunked(&mut w, g, task, spec))
        })
    }

    fn histogram(
        &self,
        g: &Group,
        task: usize,
        spec: &KeySpec,
        shift: u32,
        bits: u32,
        prefix: u32,
        hist: &mut [u64],
    ) -> BResult<()> {
        let Some(pass) = DIGITS_11.iter().position(|&d| d == (shift, bits)) else {
            return Err(BackendError::Device(format!(
                "the cuda backend builds histograms of the digits {DIGITS_11:?} only, not \
                 (shift {shift}, bits {bits})"
            )));
        };
        if g.n == 0 {
            return Ok(());
        }
        let mut w = self.lock();
        guarded(|| {
            self.finish_pending(&mut w)?;
            retry_smaller(|| self.histogram_chunked(&mut w, g, task, spec, pass, prefix, hist))
        })
    }

    /// The kernels' radix digits: 11, 11 and 10 bits from the top.
    fn model_digits(&self) -> &'static [(u32, u32)] {
        &DIGITS_11
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_words_decode_like_the_kernels_write_them() {
        // score_keys: (i << 3) | (source << 1) | is_nan
        let w = (12345u64 << 3) | (2 << 1) | 1;
        assert_eq!(
            score_fault(w, 4),
            Some(Fault {
                source: Source::Grad(4),
                index: 12345,
                value_is_nan: true
            })
        );
        assert_eq!(score_fault(3 << 1, 0).unwrap().source, Source::Score(0));
        assert_eq!(score_fault(u64::MAX, 0), None);
        // fuse: (i << 9) | (slot << 2) | (base_bad << 1) | is_nan
        let f = fuse_fault(7 << 9).unwrap();
        assert_eq!(
            (f.source, f.index, f.value_is_nan),
            (Source::Start, 7, false)
        );
        let f = fuse_fault((9 << 9) | (3 << 2) | 1).unwrap();
        assert_eq!(
            (f.source, f.index, f.value_is_nan),
            (Source::Theta(2), 9, true)
        );
        let f = fuse_fault((9 << 9) | (3 << 2) | 2).unwrap();
        assert_eq!(f.source, Source::Base);
        assert_eq!(fuse_fault(u64::MAX), None);
    }

    #[test]
    fn statistics_follow_the_cpu_rules() {
        let spec = KeySpec {
            score: ScoreKind::AbsTaskVector,
            mean: None,
            nonfinite_zero: false,
        };
        // top-k, partial ties: the tie kernels took e = 5 off count_eq.
        let h = SelectHeader {
            threshold: 0x8000_1234,
            count_gt: 7,
            count_eq: 0,
            k_rem: 0,
            cutoff: 40,
            passes_done: 3,
            ..Default::default()
        };
        let s = task_stats(&Sel::TopK { spec, k: 10 }, 100, Some(&h), 5, 10).unwrap();
        let th = s.threshold.unwrap();
        assert_eq!(
            (th.count_eq, th.count_gt, th.cutoff, s.ties_kept),
            (5, 7, 40, 3)
        );
        // top-k, every tie kept: the tie count was skipped, count_eq untouched.
        let h = SelectHeader {
            count_eq: 3,
            count_gt: 7,
            k_rem: 3,
            cutoff: 100,
            passes_done: 3,
            ..h
        };
        let s = task_stats(&Sel::TopK { spec, k: 10 }, 100, Some(&h), 0, 10).unwrap();
        assert_eq!((s.threshold.unwrap().count_eq, s.ties_kept), (3, 3));
        assert!(task_stats(&Sel::TopK { spec, k: 10 }, 100, Some(&h), 0, 9).is_err());
        // fixed threshold, no tie at all and no quota: the CPU's cutoff is n.
        let fixed = Sel::Fixed {
            spec,
            key: 5,
            quota: 0,
        };
        let h = SelectHeader::default();
        let s = task_stats(&fixed, 100, Some(&h), 0, 12).unwrap();
        let th = s.threshold.unwrap();
        assert_eq!(
            (s.kept, th.count_gt, th.cutoff, s.ties_kept),
            (12, 12, 100, 0)
        );
        // fixed threshold, 4 ties and a quota of 2: cutoff from the device.
        let fixed = Sel::Fixed {
            spec,
            key: 5,
            quota: 2,
        };
        let h = SelectHeader {
            cutoff: 17,
            ..Default::default()
        };
        let s = task_stats(&fixed, 100, Some(&h), 4, 12).unwrap();
        let th = s.threshold.unwrap();
        assert_eq!(
            (th.count_gt, th.count_eq, th.cutoff, s.ties_kept),
            (10, 4, 17, 2)
        );
    }

    #[test]
    fn new_fails_cleanly_without_a_gpu() {
        // Where there is a GPU this opens it; elsewhere it must be an Err, never a panic.
        match CudaBackend::new(0) {
            Ok(b) => assert!(!b.description().is_empty()),
            Err(e) => assert!(!e.is_empty()),
        }
    }
}
