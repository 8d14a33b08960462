//! The CUDA backend: the score → select → fuse of `cpu.rs`, bit for bit, with the kernels of
//! `kernels/*.cu` (their launch contract is docs/KERNELS.md).
//!
//! This file is the front: opening the device (with a self-test, so `--device auto` can fall
//! back), the budget, and the [`Compute`] and [`Backend`] entry points. Behind it, one file a
//! concern:
//! - `group.rs`: one tensor group's launch sequence as named steps, the twin of `cpu.rs`'s
//!   `merge_group`, and the statistics the CPU would report;
//! - `model.rs`: the model-wide passes (score sum, one digit's histogram);
//! - `chunked.rs`: a group larger than the memory budget, in chunks with the same bits;
//! - `sta.rs`: sta's `normalize_importance` divisors, from the model-wide passes;
//! - `fisher.rs`: fisher's fuse (`kernels/fisher.cu`), in chunks;
//! - `interp.rs`: the interpolating methods (`kernels/interp.cu`): device reductions, the CPU's
//!   scalar functions between them, the element-wise pass;
//! - `transfer.rs`: how bytes move (docs/STREAMING.md): pinned rings, the next group staged
//!   while this one computes, the output copied back while the next call computes;
//! - `layout.rs`: where each buffer lives in the device arena;
//! - `faults.rs`: the kernels' error words → the CPU's [`crate::backend::Fault`];
//! - `device.rs`: the context, streams, kernel launches and the arena; `staging.rs`: the rings.
//!
//! The device memory stays within the `--max-memory` budget. Groups the kernels do not take
//! (no elements, no task, more than 64 tasks) go to the CPU backend, which gives the same bytes.

mod chunked;
mod device;
mod faults;
pub mod fill;
mod fisher;
mod group;
mod interp;
mod layout;
mod model;
mod sta;
mod staging;
mod transfer;

pub mod bench;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

pub use device::HAVE_KERNELS;
use device::{Arena, DResult, Gpu, SelectHeader, STATE_BYTES};
use layout::{group_bytes, ModelBufs, ModelPass};
pub use staging::SLOT_MAX;
use transfer::{Sink, Work};

use super::cpu::CpuBackend;
use super::{
    BResult, Backend, BackendError, Compute, DeviceError, DigitPass, FuseSpec, Group, GroupStats,
    KeySpec, KeysHome, MaskJob, RankTask,
};
use crate::method::FuseRule;
use crate::select::DIGITS_11;

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

/// The kernels' digits for the model-wide passes: 11, 11 and 10 bits from the top (a 2048-bucket
/// histogram fits a block's shared memory).
pub const MODEL_DIGITS: [(u32, u32); 3] = DIGITS_11;

/// The most tasks the fuse kernels take in one launch.
const MAX_FUSE_TASKS: usize = 64;

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
    pub fn new(ordinal: usize) -> Result<Self, DeviceError> {
        Self::with_max_memory(ordinal, None)
    }

    /// As [`CudaBackend::new`], with the device memory this backend may use (`--max-memory`);
    /// None: [`DEFAULT_BUDGET_SHARE`] of the memory free once the kernels are loaded. Tensor
    /// groups that do not fit are processed in chunks.
    pub fn with_max_memory(ordinal: usize, max_memory: Option<u64>) -> Result<Self, DeviceError> {
        if !HAVE_KERNELS {
            return Err(DeviceError::Unsupported(NO_KERNELS.into()));
        }
        // SAFETY: only tries to load libcuda (dlopen) and releases it again.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(DeviceError::Driver(
                "no CUDA driver (libcuda) on this machine".into(),
            ));
        }
        // The driver bindings panic on a missing symbol (a driver older than the bindings):
        // the last guard against a crash while probing.
        match catch_unwind(|| Self::open(ordinal, max_memory)) {
            Ok(r) => r,
            Err(p) => Err(DeviceError::Driver(format!(
                "the CUDA driver failed while starting: {}",
                panic_message(p.as_ref())
            ))),
        }
    }

    fn open(ordinal: usize, max_memory: Option<u64>) -> Result<Self, DeviceError> {
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
            return Err(DeviceError::Unsupported(format!(
                "--max-memory {budget} bytes is too small for the cuda backend (at least {} \
                 bytes: one chunk's buffers and the selection state)",
                MIN_BUDGET
            )));
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
        let mut w = self.enter()?;
        let arena = &mut w.arena;
        arena.reserve(&self.gpu, STATE_BYTES)?;
        let st = arena.at(0);
        // SAFETY: `st` is a SelectState-sized buffer of the arena.
        unsafe { self.gpu.select_init(st, 5, 3) }?;
        let h = read_header(&self.gpu, arena, 0)?;
        if (h.n, h.k, h.k_rem, h.count_eq, h.cand_len, h.bad) != (5, 3, 3, 5, u64::MAX, u64::MAX) {
            return Err(DeviceError::Driver(format!(
                "the GPU self-test failed: select_init wrote {h:?} (the kernels do not run \
                 correctly on {})",
                self.gpu.description
            )));
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

    /// The work state, with this backend's context current on the calling thread. Every driver
    /// call needs it there, and the caller may be any thread: the CLI opens the backend on one
    /// thread and merges on rayon workers, libtest runs each test on a thread of its own. cudarc
    /// binds the context in its safe calls, but not in the raw `result::` calls used here
    /// (pinned copies, device-to-device moves) nor when a `CudaSlice` frees its memory, so
    /// every entry point binds it first.
    fn enter(&self) -> DResult<MutexGuard<'_, Work>> {
        let w = self.lock();
        self.gpu.bind()?;
        Ok(w)
    }
}

impl Drop for CudaBackend {
    /// Tears down in the order of docs/STREAMING.md ("Teardown"): an arena is freed only once
    /// every stream that wrote or read it has finished. The arenas are freed on the compute
    /// stream (stream-ordered, with memory pools), while the copy stream may still be staging the
    /// next group into `ahead` and the download stream reading `outbuf`: freed first, another
    /// user of the context could be handed that memory mid-copy. So every stream is waited for,
    /// then the arenas are freed and that free waited for (the memory is back when the drop
    /// returns), and only then do the pinned rings and streams go. The context is made current
    /// first, since this may run on any thread (`CudaSlice` frees without binding it).
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        let _ = self.gpu.sync_all();
        let w = self.work.get_mut().unwrap_or_else(|p| p.into_inner());
        w.keys = None;
        w.arena.release();
        w.ahead.release();
        w.outbuf.release();
        let _ = self.gpu.sync();
    }
}

/// The part of a memory budget that holds the group being merged (the rest stages the next).
pub fn work_share(budget: u64) -> u64 {
    budget - budget / AHEAD_SHARE as u64
}

/// The GPU memory the largest of `groups` (each with its jobs and fuse) needs in one piece,
/// and how many of them need more than the working share of `budget` (those run in chunks).
pub fn plan_memory<'a>(
    groups: impl IntoIterator<Item = (Group<'a>, Vec<MaskJob>, &'a FuseSpec)>,
    budget: Option<u64>,
) -> (u64, usize) {
    let (mut largest, mut over) = (0u64, 0usize);
    for (g, jobs, f) in groups {
        let bytes = match f.interp.as_deref() {
            Some(spec) if g.n > 0 => CudaBackend::one_piece_bytes(&g, f, spec),
            _ => group_bytes(&g, &jobs, f),
        };
        let bytes = bytes.unwrap_or(0) as u64;
        largest = largest.max(bytes);
        over += budget.is_some_and(|b| bytes > work_share(b)) as usize;
    }
    (largest, over)
}

/// What `selection: model` moves to the GPU (`stamerge plan`; docs/STREAMING.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelLink {
    /// Every model-wide task's keys of every tensor, as the key store holds them.
    pub key_bytes: u64,
    /// The budget that keeps the keys on the device: they and the largest tensor's pass 1.
    pub budget_needed: u64,
    /// Input bytes to the device over the model-wide passes and the merge, with the keys kept
    /// on the device between the passes.
    pub kept: u64,
    /// The same when the keys do not fit: each pass moves each tensor's inputs once.
    pub recomputed: u64,
}

/// [`ModelLink`] of the merged tensor groups `groups` (each with its ranking tasks and its
/// merge jobs), for a model-wide select of `digits` digit passes. Tensors without elements run
/// on the CPU and move nothing.
pub fn plan_model_link<'a>(
    groups: impl IntoIterator<Item = (Group<'a>, Vec<RankTask>, Vec<MaskJob>, &'a FuseSpec)>,
    digits: usize,
) -> ModelLink {
    let (mut m, mut largest, mut pass1, mut digit, mut merge) = (ModelLink::default(), 0, 0, 0, 0);
    for (g, tasks, jobs, f) in groups {
        if g.n == 0 {
            continue;
        }
        m.key_bytes += (tasks.len() * model::run_bytes(g.n)) as u64;
        let first = ModelBufs::new(&g, &tasks, ModelPass::Sums, &vec![true; tasks.len()]);
        largest = largest.max(kept_pass_bytes(&g, &tasks));
        pass1 += first.input_bytes as u64;
        digit += ModelBufs::new(&g, &tasks, ModelPass::Digit, &vec![false; tasks.len()]).input_bytes
            as u64;
        merge += layout::group_input_bytes(&g, &jobs, f).unwrap_or(0) as u64;
    }
    m.budget_needed = m.key_bytes + largest as u64;
    m.kept = pass1 + merge;
    m.recomputed = pass1 + digits as u64 * digit + merge;
    m
}

/// The working arena a model-wide pass over `g` needs with its keys in the key store: pass 1
/// (the inputs, chunk sums) or a digit pass (a select state per task), whichever is larger.
fn kept_pass_bytes(g: &Group, tasks: &[RankTask]) -> usize {
    let stored = vec![true; tasks.len()];
    let sums = ModelBufs::new(g, tasks, ModelPass::Sums, &stored).bytes;
    sums.max(ModelBufs::new(g, tasks, ModelPass::Digit, &stored).bytes)
}

/// Why `--device cuda` cannot run here, or None when it can (opens device 0 to find out).
pub fn unavailable_reason() -> Option<String> {
    CudaBackend::new(0).err().map(|e| e.to_string())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs device work, turning a panic (a bug, or a driver binding that panics) into an error
/// instead of unwinding through the pipeline.
fn guarded<T>(f: impl FnOnce() -> BResult<T>) -> BResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(BackendError::Device(DeviceError::Internal(format!(
            "in the cuda backend: {}",
            panic_message(p.as_ref())
        ))))
    })
}

/// Runs `f` again (twice at most) when the GPU had less memory than the budget: the arena's
/// limit has shrunk to what is free by then, so the retry works in smaller chunks.
fn retry_smaller<T>(mut f: impl FnMut() -> BResult<T>) -> BResult<T> {
    let mut tries = 0;
    loop {
        match f() {
            Err(BackendError::Device(DeviceError::OutOfMemory(m))) if tries < 2 => {
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

/// Work the kernels do not compute yet is refused, not handed to the CPU (`method::sparse`).
fn lacks(jobs: &[MaskJob], f: &FuseSpec) -> BResult<()> {
    match crate::method::sparse::cuda_lacks(jobs, f) {
        Some(what) => Err(BackendError::Device(DeviceError::Unsupported(format!(
            "{what} has no CUDA kernels yet: merge with --device cpu"
        )))),
        None => Ok(()),
    }
}

/// The fuse with mergekit's L1 factors (`FuseSpec::scale`) filled in, or None when no task
/// rescales so. They are found on the host by the CPU backend's own code (`cpu::l1_scales`: the
/// same DARE keeps, the same `dsum` trees over f32 |τ|), once per tensor, so they are the CPU's
/// bits by construction and every chunk of a chunked merge uses the same ones; the kernels only
/// multiply (`FuseTask::scale`). This reads each rescaled task's inputs once more on the host.
fn l1_scaled(g: &Group, jobs: &[MaskJob], f: &FuseSpec) -> BResult<Option<FuseSpec>> {
    guarded(|| super::cpu::l1_scales(g, jobs, f).map_err(internal))
}

/// A failed check between the host code and the kernels (a bug, never the user's input).
fn internal(msg: String) -> BackendError {
    BackendError::Device(DeviceError::Internal(msg))
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

impl Compute for CudaBackend {
    fn merge_group(
        &self,
        g: &Group,
        jobs: &[MaskJob],
        f: &FuseSpec,
        out: &mut [u8],
    ) -> BResult<GroupStats> {
        lacks(jobs, f)?;
        if !takes(g) {
            return self.cpu.merge_group(g, jobs, f, out);
        }
        if f.rule == FuseRule::Fisher {
            let mut w = dev(self.enter())?;
            let r = guarded(|| {
                self.finish_pending(&mut w)?;
                retry_smaller(|| self.fisher_group(&mut w, g, f, out))
            });
            return leave(&mut w, r);
        }
        if let Some(spec) = &f.interp {
            let mut w = dev(self.enter())?;
            let r = guarded(|| {
                self.finish_pending(&mut w)?;
                retry_smaller(|| self.interp_group(&mut w, g, f, spec, out))
            });
            return leave(&mut w, r);
        }
        let normalized = self.sta_normalized(g, jobs, f)?;
        let jobs = normalized.as_deref().unwrap_or(jobs);
        let l1 = l1_scaled(g, jobs, f)?;
        let f = l1.as_ref().unwrap_or(f);
        let mut w = dev(self.enter())?;
        let r = guarded(|| {
            self.finish_pending(&mut w)?;
            retry_smaller(|| {
                if group_bytes(g, jobs, f)? <= w.arena.limit() {
                    self.merge_on_device(&mut w, g, jobs, f, Sink::Now(out))
                } else {
                    self.merge_chunked(&mut w, g, jobs, f, out)
                }
            })
        });
        leave(&mut w, r)
    }

    fn score_sum(&self, g: &Group, task: usize, spec: &KeySpec) -> BResult<f64> {
        Ok(self.score_sums(g, &[(task, *spec)])?[0])
    }

    fn histogram(
        &self,
        g: &Group,
        task: usize,
        spec: &KeySpec,
        d: DigitPass,
        hist: &mut [u64],
    ) -> BResult<()> {
        let mut h = vec![vec![0u64; hist.len()]];
        self.histograms(g, &[(task, *spec)], &[d], &mut h)?;
        for (x, y) in hist.iter_mut().zip(&h[0]) {
            *x += y;
        }
        Ok(())
    }

    fn score_sums(&self, g: &Group, tasks: &[RankTask]) -> BResult<Vec<f64>> {
        if g.n == 0 {
            return self.cpu.score_sums(g, tasks);
        }
        let mut w = dev(self.enter())?;
        let r = guarded(|| {
            self.finish_pending(&mut w)?;
            in_task_order(tasks, |tasks| {
                retry_smaller(|| self.score_sums_chunked(&mut w, g, tasks))
            })
        });
        leave(&mut w, r)
    }

    fn histograms(
        &self,
        g: &Group,
        tasks: &[RankTask],
        d: &[DigitPass],
        hists: &mut [Vec<u64>],
    ) -> BResult<()> {
        let Some(first) = d.first() else {
            return Ok(());
        };
        let Some(pass) = DIGITS_11
            .iter()
            .position(|&x| x == (first.shift, first.bits))
            .filter(|_| {
                d.iter()
                    .all(|x| (x.shift, x.bits) == (first.shift, first.bits))
            })
        else {
            return Err(BackendError::Device(DeviceError::Unsupported(format!(
                "the cuda backend builds histograms of one of the digits {DIGITS_11:?} at a \
                 time, not (shift {}, bits {})",
                first.shift, first.bits
            ))));
        };
        if g.n == 0 {
            return Ok(());
        }
        let prefixes: Vec<u32> = d.iter().map(|x| x.prefix).collect();
        let mut w = dev(self.enter())?;
        let r = guarded(|| {
            self.finish_pending(&mut w)?;
            in_task_order(tasks, |tasks| {
                // Into zeroed histograms, added to the caller's only once complete: a retry in
                // smaller chunks starts again from zero.
                retry_smaller(|| {
                    let mut got: Vec<Vec<u64>> = hists.iter().map(|h| vec![0; h.len()]).collect();
                    self.histograms_chunked(&mut w, g, tasks, pass, &prefixes, &mut got)?;
                    Ok(got)
                })
            })
        });
        let got = leave(&mut w, r)?;
        for (h, x) in hists.iter_mut().zip(got) {
            for (a, b) in h.iter_mut().zip(x) {
                *a += b;
            }
        }
        Ok(())
    }

    fn begin_model_passes(&self, groups: &[(Group, Vec<RankTask>)]) -> BResult<KeysHome> {
        let (mut key_bytes, mut largest) = (0usize, 0usize);
        for (g, tasks) in groups.iter().filter(|(g, _)| g.n > 0) {
            key_bytes += tasks.len() * model::run_bytes(g.n);
            largest = largest.max(kept_pass_bytes(g, tasks));
        }
        let mut w = dev(self.enter())?;
        let r = guarded(|| self.open_key_store(&mut w, key_bytes, largest));
        let kept = leave(&mut w, r)?;
        tracing::info!(
            "selection: model on cuda: the keys ({}) {}",
            crate::inspect::human_bytes(key_bytes as u64),
            if kept {
                "kept on the GPU between the passes (the inputs cross the link in pass 1 only)"
            } else {
                "do not fit the budget beside the passes: every pass moves each tensor group once"
            }
        );
        Ok(if kept {
            KeysHome::Kept
        } else {
            KeysHome::Recomputed
        })
    }

    fn end_model_passes(&self) -> BResult<()> {
        let mut w = dev(self.enter())?;
        let r = guarded(|| self.close_key_store(&mut w));
        leave(&mut w, r)
    }

    fn model_digits(&self) -> &'static [(u32, u32)] {
        &MODEL_DIGITS
    }
}

/// Runs `f` over all of `tasks` at once; on a value fault, again one task at a time in their
/// order, so the fault reported is the CPU's: the first task's lowest bad index (a chunk of a
/// later task may have met its fault first).
fn in_task_order<T>(
    tasks: &[RankTask],
    mut f: impl FnMut(&[RankTask]) -> BResult<T>,
) -> BResult<T> {
    let r = f(tasks);
    if matches!(r, Err(BackendError::Fault(_))) && tasks.len() > 1 {
        for t in tasks {
            f(std::slice::from_ref(t))?;
        }
    }
    r
}

/// The end of every entry point: inputs copied straight from the caller's memory
/// (`fill::InputPath::Register`) are waited for and unregistered, so that the caller may drop them
/// once the call returns, as after a copy through the ring.
fn leave<T>(w: &mut Work, r: BResult<T>) -> BResult<T> {
    let released = dev(w.up.release_held());
    r.and_then(|v| released.map(|_| v))
}

/// Whether the kernels take this group (see the module comment); the CPU merges the others.
fn takes(g: &Group) -> bool {
    g.n > 0 && !g.tasks.is_empty() && g.tasks.len() <= MAX_FUSE_TASKS
}

impl Backend for CudaBackend {
    fn populates_inputs(&self) -> bool {
        true
    }

    /// A band (breadcrumbs) over a tensor that would run in chunks: chunked.rs has no path for
    /// it yet, and the run must say so before it writes anything, not when it reaches the tensor.
    fn refuses(&self, g: &Group, jobs: &[MaskJob], f: &FuseSpec) -> Option<String> {
        let band = jobs.iter().any(|j| matches!(j, MaskJob::Band { .. }));
        let bytes = group_bytes(g, jobs, f).ok()? as u64;
        (band && bytes > work_share(self.budget)).then(|| {
            format!(
                "tensor `{}`: breadcrumbs' band over a tensor larger than the GPU memory budget \
                 ({} in one piece, {} for the tensor being merged) has no chunked CUDA path \
                 yet; raise --max-memory, or use --device cpu",
                g.name,
                crate::inspect::human_bytes(bytes),
                crate::inspect::human_bytes(work_share(self.budget))
            )
        })
    }

    fn name(&self) -> &'static str {
        "cuda"
    }

    /// The deferred output of docs/STREAMING.md: while this group's kernels run, the previous
    /// group's output comes back and the next group's inputs go in; this output follows on the
    /// download stream while the next call computes.
    fn submit(
        &self,
        g: &Group,
        jobs: &[MaskJob],
        f: &FuseSpec,
        out: Vec<u8>,
        next: Option<&Group>,
    ) -> BResult<(GroupStats, Vec<Vec<u8>>)> {
        lacks(jobs, f)?;
        // sta's divisors first: their passes take the backend's lock themselves.
        let normalized = if takes(g) {
            self.sta_normalized(g, jobs, f)?
        } else {
            None
        };
        let jobs = normalized.as_deref().unwrap_or(jobs);
        let l1 = if takes(g) {
            l1_scaled(g, jobs, f)?
        } else {
            None
        };
        let f = l1.as_ref().unwrap_or(f);
        let mut w = dev(self.enter())?;
        let r = guarded(|| {
            let mut slot = Some(out);
            let stats = if !takes(g) {
                self.merge_now(&mut w, &mut slot, |_, out| {
                    self.cpu.merge_group(g, jobs, f, out)
                })?
            } else if f.rule == FuseRule::Fisher {
                // Output at once, in chunks: fisher's fuse is its own short sequence.
                self.merge_now(&mut w, &mut slot, |w, out| {
                    retry_smaller(|| self.fisher_group(w, g, f, out))
                })?
            } else if let Some(spec) = &f.interp {
                // Output at once: the passes read the reductions back between them anyway.
                self.merge_now(&mut w, &mut slot, |w, out| {
                    retry_smaller(|| self.interp_group(w, g, f, spec, out))
                })?
            } else {
                retry_smaller(|| {
                    if group_bytes(g, jobs, f)? <= w.arena.limit() {
                        self.merge_on_device(&mut w, g, jobs, f, Sink::Later(&mut slot, next))
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
            // The caller's run is over: what is still in flight is waited for and dropped, and
            // nothing staged for it is kept.
            let _ = self.finish_pending(&mut w);
            w.done.clear();
            w.staged = None;
        }
        leave(&mut w, r)
    }

    fn flush(&self) -> BResult<Vec<Vec<u8>>> {
        let mut w = dev(self.enter())?;
        let r = guarded(|| {
            self.finish_pending(&mut w)?;
            Ok(std::mem::take(&mut w.done))
        });
        if r.is_err() {
            w.done.clear();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_fails_cleanly_without_a_gpu() {
        // Where there is a GPU this opens it; elsewhere it must be an Err, never a panic.
        match CudaBackend::new(0) {
            Ok(b) => assert!(!b.description().is_empty()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
