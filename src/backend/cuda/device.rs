//! The device side of the CUDA backend: the context, the stream, the kernels loaded from the
//! fatbins that build.rs embeds, one typed wrapper per kernel launch (argument order and grids as
//! in docs/KERNELS.md), and the grow-only device arena that holds one tensor group at a time.
//!
//! Every driver error becomes a [`DeviceError`] naming the call; nothing here unwraps a driver
//! result.

use std::sync::Arc;

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

pub use crate::backend::DeviceError;
use crate::dtype::FloatType;
use crate::method::FuseRule;

mod generated {
    // `HAVE_KERNELS` and `KERNELS` (module name → fatbin bytes), written by build.rs.
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
pub use generated::{HAVE_KERNELS, KERNELS};

pub type DResult<T> = Result<T, DeviceError>;

/// A device address as the kernels take it (`const void*`, `u64*`, …); 0 is NULL.
pub type Ptr = u64;

/// Threads per block of every kernel except `select_tie_cutoff`.
const BLOCK: u32 = 256;
/// `select_tie_cutoff` runs as one block of exactly this many threads.
const CUTOFF_BLOCK: u32 = 1024;
/// Keys per `select_tie_count` block (its grid is exactly ceil(n / TIE_TILE)).
pub const TIE_TILE: usize = 8192;
/// Elements per `score_sum` block (its grid is exactly ceil(n / SUM_CHUNK)).
pub const SUM_CHUNK: usize = 65_536;
/// Arena offsets are multiples of this (the kernels take 16-byte vector loads on aligned data).
const ALIGN: usize = 256;
/// The arena grows in steps of this much, so that slightly larger groups do not reallocate.
const GROW_STEP: usize = 64 << 20;
/// After an out-of-memory, an arena's budget becomes this share of the memory then free.
const SHRINK_SHARE: f64 = 0.9;
/// How an arena's out-of-memory message starts ([`DeviceError::OutOfMemory`]: the caller may
/// retry in chunks, since the budget has shrunk to what is free).
const OUT_OF_MEMORY: &str = "the GPU ran out of memory ";

/// Blocks of 256 threads per SM for the grid-stride kernels (docs/KERNELS.md, "Occupancy"): the
/// histogram-building launches use fewer blocks (fewer global atomics), the others fill the SMs.
pub(super) mod per_sm {
    pub const HISTOGRAM: u32 = 4;
    pub const SCORE: u32 = 4;
    pub const NORMALIZE: u32 = 6;
    pub const MASK: u32 = 8;
    pub const FUSE_LINEAR: u32 = 4;
    pub const FUSE_TIES: u32 = 3;
    /// The typed fuse kernels are held to 80 registers (`__launch_bounds__(256, 3)`).
    pub const FUSE_TYPED: u32 = 3;
    pub const FISHER: u32 = 4;
    pub const INTERP: u32 = 4;
    pub const OVERLAP: u32 = 4;
}

/// "CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected)".
pub fn describe(e: &DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// Maps a driver error to "`what`: CUDA_ERROR_… (…)".
pub fn drv(what: &str) -> impl Fn(DriverError) -> DeviceError + '_ {
    move |e| DeviceError::Driver(format!("{what}: {}", describe(&e)))
}

pub fn dtype_code(t: FloatType) -> i32 {
    match t {
        FloatType::F32 => 0,
        FloatType::F16 => 1,
        FloatType::BF16 => 2,
    }
}

/// The kernels the backend launches, by name (module → kernel in docs/KERNELS.md).
pub struct Kernels {
    score_keys: CudaFunction,
    keys_normalize: CudaFunction,
    score_sum: CudaFunction,
    select_init: CudaFunction,
    select_filter: CudaFunction,
    select_tie_count: CudaFunction,
    select_tie_cutoff: CudaFunction,
    select_mask: CudaFunction,
    select_mask_clear: CudaFunction,
    dare_mask: CudaFunction,
    fuse_linear: CudaFunction,
    fuse_ties: CudaFunction,
    /// The typed fuse kernels (loads in flight), by dtype code: f32, f16, bf16.
    fuse_linear_typed: [CudaFunction; 3],
    fuse_ties_typed: [CudaFunction; 3],
    fuse_fisher: CudaFunction,
    pub(super) interp_dots: CudaFunction,
    pub(super) interp_write: CudaFunction,
    masks_consensus: CudaFunction,
    masks_exclusive: CudaFunction,
}

/// An opened GPU: context, the stream every launch of this backend goes to, the copy stream that
/// moves inputs in beside it, the kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Host-to-device input copies (docs/STREAMING.md); `stream` waits for them with events.
    pub copy: Arc<CudaStream>,
    /// Device-to-host copies of a finished group's output while the next group computes
    /// (docs/STREAMING.md, "Deferred output").
    pub down: Arc<CudaStream>,
    pub(super) k: Kernels,
    /// Streaming multiprocessors, for the grid sizes.
    pub sms: u32,
    /// "NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB, driver 13.0)".
    pub description: String,
}

impl Gpu {
    /// Opens device `ordinal` and loads the kernels. The caller has checked that libcuda loads
    /// (the first driver call panics otherwise).
    pub fn open(ordinal: usize) -> DResult<Self> {
        let ctx = CudaContext::new(ordinal).map_err(|e| match e.0 {
            sys::CUresult::CUDA_ERROR_NO_DEVICE => {
                DeviceError::Driver(format!("no CUDA GPU: {}", describe(&e)))
            }
            _ => DeviceError::Driver(format!(
                "cannot open CUDA device {ordinal}: {}",
                describe(&e)
            )),
        })?;
        // A handful of arena allocations that never outlive the work that uses them (the
        // backend synchronises before it returns), and explicit events between the compute and
        // copy streams, so cudarc's per-slice events are not needed.
        // SAFETY: no slice of this context exists yet; the backend orders its streams itself.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("creating a CUDA stream"))?;
        let copy = ctx.new_stream().map_err(drv("creating a CUDA stream"))?;
        let down = ctx.new_stream().map_err(drv("creating a CUDA stream"))?;
        let name = ctx
            .name()
            .unwrap_or_else(|_| "an unnamed CUDA device".into());
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv("reading the compute capability"))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv("reading the SM count"))?
            .max(1) as u32;
        let total = ctx.total_mem().unwrap_or(0);
        let driver = driver_version()
            .map(|v| format!(", driver {}.{}", v / 1000, (v % 1000) / 10))
            .unwrap_or_default();
        let description = format!(
            "{name} (sm_{major}{minor}, {sms} SMs, {:.1} GiB{driver})",
            total as f64 / (1u64 << 30) as f64
        );
        let k = load_kernels(&ctx, (major, minor))?;
        Ok(Self {
            ctx,
            stream,
            copy,
            down,
            k,
            sms,
            description,
        })
    }

    /// Makes this GPU's context current on the calling thread (see `CudaBackend::enter`).
    pub fn bind(&self) -> DResult<()> {
        self.ctx
            .bind_to_thread()
            .map_err(drv("making the CUDA context current on this thread"))
    }

    /// Waits for every launch and copy of this backend; reports a failure of any of them.
    pub fn sync(&self) -> DResult<()> {
        self.stream
            .synchronize()
            .map_err(drv("waiting for the GPU (a kernel or copy failed)"))
    }

    /// Waits for all three streams (the compute, copy and download streams).
    pub fn sync_all(&self) -> DResult<()> {
        for s in [&self.stream, &self.copy, &self.down] {
            s.synchronize()
                .map_err(drv("waiting for the GPU (a kernel or copy failed)"))?;
        }
        Ok(())
    }

    /// Grid for a grid-stride kernel that would need `threads` threads to cover its work in one
    /// step: `max(1, min(ceil(threads / 256), blocks_per_sm × SMs))` (KERNELS.md's G(x)).
    pub(super) fn grid(&self, threads: u64, blocks_per_sm: u32) -> u32 {
        let cap = u64::from(blocks_per_sm.saturating_mul(self.sms).max(1));
        threads.div_ceil(u64::from(BLOCK)).clamp(1, cap) as u32
    }

    /// An exact grid of `blocks` blocks (kernels whose grid is fixed by the data size).
    pub(super) fn exact(blocks: usize, what: &str) -> DResult<u32> {
        u32::try_from(blocks.max(1)).map_err(|_| {
            DeviceError::Unsupported(format!(
                "{what}: {blocks} blocks exceed the CUDA grid limit"
            ))
        })
    }
}

/// The installed driver's CUDA version (e.g. 13000 for 13.0).
pub fn driver_version() -> Option<i32> {
    let mut v = 0i32;
    // SAFETY: cuDriverGetVersion only writes the int it is given; libcuda is loaded.
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
}

fn load_kernels(ctx: &Arc<CudaContext>, cc: (i32, i32)) -> DResult<Kernels> {
    let mut modules = Vec::new();
    for (name, fatbin) in KERNELS {
        let m = ctx
            .load_module(Ptx::from_binary(fatbin.to_vec()))
            .map_err(|e| {
                DeviceError::Driver(format!(
                    "loading the `{name}` kernels: {} (this GPU is sm_{}{}; the build has sm_80 \
                     and sm_90 machine code and compute_90 PTX, which needs a driver at least as \
                     new as the nvcc that built it: {})",
                    describe(&e),
                    cc.0,
                    cc.1,
                    option_env!("STAMERGE_NVCC_VERSION").unwrap_or("unknown"),
                ))
            })?;
        modules.push((*name, m));
    }
    let get = |module: &str, f: &str| -> DResult<CudaFunction> {
        let m = modules
            .iter()
            .find(|(n, _)| *n == module)
            .map(|(_, m)| m)
            .ok_or_else(|| {
                DeviceError::Internal(format!("this build's kernels have no `{module}` module"))
            })?;
        m.load_function(f).map_err(|e| {
            DeviceError::Driver(format!("kernel `{f}` in `{module}`: {}", describe(&e)))
        })
    };
    Ok(Kernels {
        score_keys: get("score", "score_keys")?,
        keys_normalize: get("score", "keys_normalize")?,
        score_sum: get("score", "score_sum")?,
        select_init: get("select", "select_init")?,
        select_filter: get("select", "select_filter")?,
        select_tie_count: get("select", "select_tie_count")?,
        select_tie_cutoff: get("select", "select_tie_cutoff")?,
        select_mask: get("select", "select_mask")?,
        select_mask_clear: get("select", "select_mask_clear")?,
        dare_mask: get("select", "dare_mask")?,
        fuse_linear: get("fuse", "fuse_linear")?,
        fuse_ties: get("fuse", "fuse_ties")?,
        fuse_linear_typed: [
            get("fuse", "fuse_linear_f32")?,
            get("fuse", "fuse_linear_f16")?,
            get("fuse", "fuse_linear_bf16")?,
        ],
        fuse_ties_typed: [
            get("fuse", "fuse_ties_f32")?,
            get("fuse", "fuse_ties_f16")?,
            get("fuse", "fuse_ties_bf16")?,
        ],
        fuse_fisher: get("fisher", "fuse_fisher")?,
        interp_dots: get("interp", "interp_dots")?,
        interp_write: get("interp", "interp_write")?,
        masks_consensus: get("overlap", "masks_consensus")?,
        masks_exclusive: get("overlap", "masks_exclusive")?,
    })
}

// ------------------------------------------------------------------------------------------------
// launches

/// Launches `$f` on the backend's stream with `$grid` × `$block` threads. The arguments must be
/// plain local variables (u64, i32, f32): cudarc keeps their addresses until the launch.
/// (`launch!(gpu, [function expr] "name", ...)` launches a function chosen at run time.)
macro_rules! launch {
    ($gpu:expr, $f:ident, $grid:expr, $block:expr; $($arg:ident),* $(,)?) => {
        launch!($gpu, [&$gpu.k.$f] stringify!($f), $grid, $block; $($arg),*)
    };
    ($gpu:expr, [$func:expr] $name:expr, $grid:expr, $block:expr; $($arg:ident),* $(,)?) => {{
        let cfg = LaunchConfig {
            grid_dim: ($grid, 1, 1),
            block_dim: ($block, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = $gpu.stream.launch_builder($func);
        $( b.arg(&$arg); )*
        // SAFETY: the argument list matches the kernel's C signature (docs/KERNELS.md); the
        // caller guarantees that every pointer addresses device memory of the size the kernel
        // reads or writes (see the `# Safety` sections below).
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| DeviceError::Driver(format!("launching `{}`: {}", $name, describe(&e))))
    }};
}
pub(super) use launch;

/// The inputs of `score_keys` for one task.
#[derive(Clone, Copy, Debug)]
pub struct ScoreInputs {
    pub theta: Ptr,
    pub theta_dtype: i32,
    /// NULL in mode 1.
    pub base: Ptr,
    pub base_dtype: i32,
    /// NULL in mode 0.
    pub grad: Ptr,
    pub grad_dtype: i32,
    /// 0: |θ − b|, 1: |θ·G|, 2: |(θ − b)·G|.
    pub mode: i32,
    pub nonfinite_zero: bool,
}

/// The arguments of `fuse_linear` / `fuse_ties`.
#[derive(Clone, Copy, Debug)]
pub struct FuseArgs {
    pub rule: FuseRule,
    pub base: Ptr,
    pub base_dtype: i32,
    /// NULL: start = base.
    pub start: Ptr,
    pub start_dtype: i32,
    /// Device array of `num_tasks` [`FuseTask`].
    pub tasks: Ptr,
    pub num_tasks: i32,
    pub n: u64,
    pub normalize: bool,
    pub linear_div: f32,
    pub lambda: f32,
    pub out: Ptr,
    pub out_dtype: i32,
    /// u64 × num_tasks, zeroed; or NULL.
    pub kept: Ptr,
    /// u64 × 2^num_tasks, zeroed; or NULL.
    pub combo_hist: Ptr,
    /// One u64 set to u64::MAX; or NULL.
    pub bad: Ptr,
    /// Base, start and every task's theta have dtype `base_dtype`, every address is 16-byte
    /// aligned and no task has a rescale or a scale: the typed kernel of that dtype takes the
    /// launch (loads in flight, docs/KERNELS.md), else the general one. (A typed kernel traps on
    /// anything else.)
    pub uniform: bool,
}

/// Per-task entry of `fuse_fisher`'s task table (kernels/fisher.cu; 32 bytes, `#[repr(C)]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FisherTask {
    pub theta: u64,
    /// 0: no statistic (F = 0).
    pub grad: u64,
    /// weight · the model's norm scale.
    pub c: f32,
    pub theta_dtype: i32,
    pub grad_dtype: i32,
    pub pad: i32,
}

const _: () = assert!(std::mem::size_of::<FisherTask>() == 32);

/// Per-task entry of the fuse kernels' task table (docs/KERNELS.md; 40 bytes, `#[repr(C)]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FuseTask {
    pub theta: u64,
    /// 0: every entry kept.
    pub mask: u64,
    pub weight: f32,
    /// Kept τ is divided by this (DARE's rescale); 1.0: no division.
    pub rescale: f32,
    /// +1 models, −1 forget.
    pub sign: i32,
    pub dtype: i32,
    /// Kept τ is multiplied by this before the weight (mergekit's L1 rescale, found on the host
    /// per tensor); 1.0: none. Never beside a `rescale` other than 1.0.
    pub scale: f32,
    pub pad: u32,
}

/// The first 96 bytes of the device `SelectState` (kernels/common.cuh; docs/KERNELS.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SelectHeader {
    pub n: u64,
    pub k: u64,
    pub k_rem: u64,
    pub count_gt: u64,
    pub count_eq: u64,
    pub cutoff: u64,
    pub cand_len: u64,
    pub cand_fill: u64,
    pub bad: u64,
    pub prefix: u32,
    pub threshold: u32,
    pub passes_done: u32,
    pub ticket: u32,
    pub flags: u32,
    pub pad: u32,
}

/// Size of the device `SelectState`: the header and three 2048-bucket u64 histograms.
pub const STATE_BYTES: usize = 96 + 3 * 2048 * 8;
/// Byte offset of `SelectState.bad`, the spare score-error word.
pub const STATE_BAD: u64 = 64;
/// Byte offset of `SelectState.prefix`.
pub const STATE_PREFIX: usize = 72;
/// Byte offset of `SelectState.hist[pass]`.
pub fn state_hist(pass: usize) -> usize {
    96 + pass * 2048 * 8
}

const _: () = assert!(std::mem::size_of::<SelectHeader>() == 96);
const _: () = assert!(std::mem::size_of::<FuseTask>() == 40);
// The byte offsets of kernels/fuse.cu's `FuseTask`.
const _: () = assert!(std::mem::offset_of!(FuseTask, rescale) == 20);
const _: () = assert!(std::mem::offset_of!(FuseTask, dtype) == 28);
const _: () = assert!(std::mem::offset_of!(FuseTask, scale) == 32);

// Each wrapper below launches one kernel.
//
// # Safety (all of them)
//
// Every `Ptr` must be 0 where the kernel allows NULL, or the address of live device memory of
// this context holding what docs/KERNELS.md says the kernel reads and writes (n elements of the
// given dtype, a 49 248-byte SelectState, ceil(n / 64) mask words, …), not freed before the
// stream has run the launch.
impl Gpu {
    /// Sets the u32 at `dst` (4-byte aligned) to `v`, stream-ordered on the compute stream: a
    /// memset, so no host memory is copied between launches.
    pub unsafe fn set_u32(&self, dst: Ptr, v: u32) -> DResult<()> {
        sys::cuMemsetD32Async(dst, v, 1, self.stream.cu_stream())
            .result()
            .map_err(drv("setting a word on the GPU"))
    }

    /// Sets `count` u32 words at `dst` to `v`, stream-ordered on the compute stream.
    pub unsafe fn fill_u32(&self, dst: Ptr, v: u32, count: usize) -> DResult<()> {
        sys::cuMemsetD32Async(dst, v, count, self.stream.cu_stream())
            .result()
            .map_err(drv("filling GPU memory"))
    }

    /// `masks_consensus`: sta's `overlap: consensus` over the `parts` masks of the table at
    /// `masks`, their kept counts before it added to `kept_before`.
    pub unsafe fn masks_consensus(
        &self,
        masks: Ptr,
        parts: i32,
        n: u64,
        k: u32,
        kept_before: Ptr,
    ) -> DResult<()> {
        let grid = self.grid(n.div_ceil(32), per_sm::OVERLAP);
        launch!(self, masks_consensus, grid, BLOCK; masks, parts, n, k, kept_before)
    }

    /// `masks_exclusive`: sta's `overlap: exclusive` by the keys of the table at `keys`.
    pub unsafe fn masks_exclusive(
        &self,
        masks: Ptr,
        keys: Ptr,
        parts: i32,
        n: u64,
        kept_before: Ptr,
    ) -> DResult<()> {
        let grid = self.grid(n.div_ceil(32), per_sm::OVERLAP);
        launch!(self, masks_exclusive, grid, BLOCK; masks, keys, parts, n, kept_before)
    }

    /// `select_init(st, n, k)`: zeroes the histograms and sets the header.
    pub unsafe fn select_init(&self, st: Ptr, n: u64, k: u64) -> DResult<()> {
        launch!(self, select_init, 1, BLOCK; st, n, k)
    }

    /// `score_keys`: scores → keys (stored when `keys` != 0), errors into `bad`, and with `st` the
    /// histogram of digit `pass` (the last block picks the digit when `pick`).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn score_keys(
        &self,
        s: &ScoreInputs,
        n: u64,
        keys: Ptr,
        bad: Ptr,
        st: Ptr,
        pass: i32,
        pick: bool,
    ) -> DResult<()> {
        let per_sm = if st != 0 {
            per_sm::HISTOGRAM
        } else {
            per_sm::SCORE
        };
        let grid = self.grid(n.div_ceil(8), per_sm);
        let (theta, theta_dtype, base, base_dtype) = (s.theta, s.theta_dtype, s.base, s.base_dtype);
        let (grad, grad_dtype, mode) = (s.grad, s.grad_dtype, s.mode);
        let nonfinite_zero = s.nonfinite_zero as i32;
        let pick = pick as i32;
        launch!(self, score_keys, grid, BLOCK;
            theta, theta_dtype, base, base_dtype, grad, grad_dtype, mode, nonfinite_zero,
            n, keys, bad, st, pass, pick)
    }

    /// `keys_normalize`: keys ← key(s / *mean) in place (`mean`: a device f32), optional histogram.
    pub unsafe fn keys_normalize(
        &self,
        keys: Ptr,
        n: u64,
        mean: Ptr,
        st: Ptr,
        pass: i32,
        pick: bool,
    ) -> DResult<()> {
        let per_sm = if st != 0 {
            per_sm::HISTOGRAM
        } else {
            per_sm::NORMALIZE
        };
        let grid = self.grid(n.div_ceil(4), per_sm);
        let pick = pick as i32;
        launch!(self, keys_normalize, grid, BLOCK; keys, n, mean, st, pass, pick)
    }

    /// `score_sum`: the deterministic sum of each 65 536-key chunk into `chunk_sums` (f64).
    pub unsafe fn score_sum(&self, keys: Ptr, n: u64, chunk_sums: Ptr) -> DResult<()> {
        let grid = Self::exact((n as usize).div_ceil(SUM_CHUNK), "score_sum")?;
        launch!(self, score_sum, grid, BLOCK; keys, n, chunk_sums)
    }

    /// `select_filter`: radix pass `pass` (1 or 2, or 0 over stored keys) and the last block's pick.
    pub unsafe fn select_filter(
        &self,
        keys: Ptr,
        n: u64,
        st: Ptr,
        pass: i32,
        cand: Ptr,
        cand_cap: u64,
    ) -> DResult<()> {
        let grid = self.grid(n.div_ceil(4), per_sm::HISTOGRAM);
        launch!(self, select_filter, grid, BLOCK; keys, n, st, pass, cand, cand_cap)
    }

    /// `select_tie_count`: keys == T per 8192-key tile into `tiles`, the total added to `*total`.
    pub unsafe fn select_tie_count(
        &self,
        keys: Ptr,
        n: u64,
        st: Ptr,
        tiles: Ptr,
        total: Ptr,
        skip_trivial: bool,
    ) -> DResult<()> {
        let grid = Self::exact((n as usize).div_ceil(TIE_TILE), "select_tie_count")?;
        let skip_trivial = skip_trivial as i32;
        launch!(self, select_tie_count, grid, BLOCK; keys, n, st, tiles, total, skip_trivial)
    }

    /// `select_tie_cutoff`: the tie cutoff of these keys, charged against the state's quota.
    pub unsafe fn select_tie_cutoff(&self, keys: Ptr, n: u64, st: Ptr, tiles: Ptr) -> DResult<()> {
        launch!(self, select_tie_cutoff, 1, CUTOFF_BLOCK; keys, n, st, tiles)
    }

    /// `select_mask`: the bit mask `key > T || (key == T && i < cutoff)`.
    pub unsafe fn select_mask(&self, keys: Ptr, n: u64, st: Ptr, mask: Ptr) -> DResult<()> {
        let grid = self.grid(32 * n.div_ceil(128), per_sm::MASK);
        launch!(self, select_mask, grid, BLOCK; keys, n, st, mask)
    }

    /// `select_mask_clear`: clears from `mask` what `select_mask` would keep for state `st`.
    pub unsafe fn select_mask_clear(&self, keys: Ptr, n: u64, st: Ptr, mask: Ptr) -> DResult<()> {
        let grid = self.grid(64 * n.div_ceil(64), per_sm::MASK);
        launch!(self, select_mask_clear, grid, BLOCK; keys, n, st, mask)
    }

    /// `dare_mask`: DARE's keep decisions as a bit mask, the count added to `*kept` (0: none).
    pub unsafe fn dare_mask(
        &self,
        n: u64,
        stream: u64,
        threshold: u64,
        mask: Ptr,
        kept: Ptr,
    ) -> DResult<()> {
        let grid = self.grid(n, per_sm::MASK);
        launch!(self, dare_mask, grid, BLOCK; n, stream, threshold, mask, kept)
    }

    /// `fuse_fisher`: fisher's weighted average of `nt` tasks (a table of [`FisherTask`]) into
    /// `out`, the lowest bad input into `bad`.
    pub unsafe fn fuse_fisher(
        &self,
        tasks: Ptr,
        nt: i32,
        n: u64,
        out: Ptr,
        out_dtype: i32,
        bad: Ptr,
    ) -> DResult<()> {
        let grid = self.grid(n, per_sm::FISHER);
        launch!(self, fuse_fisher, grid, BLOCK; tasks, nt, n, out, out_dtype, bad)
    }

    /// `fuse_linear` or `fuse_ties`. `num_tasks` must be in 1..=64 (the kernel traps otherwise,
    /// which poisons the context).
    pub unsafe fn fuse(&self, a: &FuseArgs) -> DResult<()> {
        if !(1..=64).contains(&a.num_tasks) {
            return Err(DeviceError::Internal(format!(
                "the fuse kernels take 1 to 64 tasks, not {}",
                a.num_tasks
            )));
        }
        let FuseArgs {
            base,
            base_dtype,
            start,
            start_dtype,
            tasks,
            num_tasks,
            n,
            linear_div,
            lambda,
            out,
            out_dtype,
            kept,
            combo_hist,
            bad,
            ..
        } = *a;
        let normalize = a.normalize as i32;
        let typed = usize::try_from(base_dtype).ok().filter(|_| a.uniform);
        let (func, name, per_sm) = match (a.rule, typed) {
            (FuseRule::Linear, None) => (&self.k.fuse_linear, "fuse_linear", per_sm::FUSE_LINEAR),
            (FuseRule::Ties, None) => (&self.k.fuse_ties, "fuse_ties", per_sm::FUSE_TIES),
            (FuseRule::Linear, Some(d)) => (
                &self.k.fuse_linear_typed[d],
                ["fuse_linear_f32", "fuse_linear_f16", "fuse_linear_bf16"][d],
                per_sm::FUSE_TYPED,
            ),
            (FuseRule::Ties, Some(d)) => (
                &self.k.fuse_ties_typed[d],
                ["fuse_ties_f32", "fuse_ties_f16", "fuse_ties_bf16"][d],
                per_sm::FUSE_TYPED,
            ),
            // The interpolating methods have kernels of their own (cuda/interp.rs), which
            // `merge_group` and `submit` hand them to before this launch sequence.
            (FuseRule::Interp, _) => {
                return Err(DeviceError::Internal(
                    "an interpolating method reached the fuse kernels (cuda/interp.rs runs them)"
                        .into(),
                ))
            }
            (FuseRule::Sce | FuseRule::Ram | FuseRule::RamPlus | FuseRule::Fisher, _) => {
                return Err(DeviceError::Unsupported(
                    "the sce, ram and fisher fuses have no CUDA kernels yet".into(),
                ))
            }
        };
        let grid = self.grid(n.div_ceil(8), per_sm);
        launch!(self, [func] name, grid, BLOCK;
            base, base_dtype, start, start_dtype, tasks, num_tasks, n, normalize,
            linear_div, lambda, out, out_dtype, kept, combo_hist, bad)
    }
}

// ------------------------------------------------------------------------------------------------
// the arena

/// Byte offsets of the buffers of one piece of work inside the arena, each aligned to 256 bytes.
#[derive(Default)]
pub struct Layout {
    end: usize,
}

impl Layout {
    /// Reserves `bytes` (at least one alignment unit, so that every buffer has its own address).
    pub fn take(&mut self, bytes: usize) -> usize {
        let off = self.end;
        self.end += bytes.max(1).next_multiple_of(ALIGN);
        off
    }

    pub fn bytes(&self) -> usize {
        self.end
    }
}

/// One device allocation that only grows: sized by the largest tensor group seen so far, reused
/// by every later group, so a merge makes a handful of allocations in all. It never grows past
/// `limit` (the `--max-memory` budget): work that would need more is split by the caller.
pub struct Arena {
    buf: Option<CudaSlice<u8>>,
    base: Ptr,
    limit: usize,
}

impl Default for Arena {
    fn default() -> Self {
        Self::with_limit(usize::MAX)
    }
}

impl Arena {
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buf: None,
            base: 0,
            limit,
        }
    }

    /// The most bytes this arena may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Changes the limit; an allocation already larger stays until the caller releases it.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Makes the arena at least `bytes` long. The old allocation is freed on the compute stream
    /// once every stream has finished with it (docs/STREAMING.md, "Teardown": the copy stream
    /// may be staging into an arena, the download stream reading one); arenas grow a handful of
    /// times per run, so the wait costs nothing that matters.
    pub fn reserve(&mut self, gpu: &Gpu, bytes: usize) -> DResult<()> {
        if self.capacity() >= bytes {
            return Ok(());
        }
        if bytes > self.limit {
            return Err(DeviceError::Internal(format!(
                "{bytes} bytes of device memory requested, over the budget of {}",
                self.limit
            )));
        }
        // Free the old allocation first: the peak is the new size, not old + new.
        if self.buf.is_some() {
            gpu.sync_all()?;
            self.release();
        }
        let mut size = bytes.next_multiple_of(GROW_STEP).min(self.limit);
        let buf = loop {
            // SAFETY: the bytes are uninitialised; every buffer carved out of the arena is
            // written (uploaded, initialised by a kernel, or fully written by a kernel) before it
            // is read.
            match unsafe { gpu.stream.alloc::<u8>(size) } {
                Ok(buf) => break buf,
                Err(e) => {
                    let (free, total) = gpu.ctx.mem_get_info().unwrap_or((0, 0));
                    let oom = e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY;
                    // Less memory is free than the budget assumed (another process, or a budget
                    // above the GPU's): the budget shrinks to what is there, and work that no
                    // longer fits is split into chunks by the caller.
                    let fits = (free as f64 * SHRINK_SHARE) as usize;
                    if oom && fits < self.limit {
                        self.limit = fits;
                        if bytes <= fits {
                            size = bytes.next_multiple_of(GROW_STEP).min(fits);
                            continue;
                        }
                    }
                    let msg = format!(
                        "{}allocating {:.2} GB of GPU memory: {} ({:.2} GB free of {:.2} GB; the \
                         budget is now {:.2} GB)",
                        if oom { OUT_OF_MEMORY } else { "" },
                        size as f64 / 1e9,
                        describe(&e),
                        free as f64 / 1e9,
                        total as f64 / 1e9,
                        self.limit as f64 / 1e9
                    );
                    return Err(if oom {
                        DeviceError::OutOfMemory(msg)
                    } else {
                        DeviceError::Driver(msg)
                    });
                }
            }
        };
        let (ptr, _) = buf.device_ptr(&gpu.stream);
        self.base = ptr;
        self.buf = Some(buf);
        // With memory pools the allocation (and the free before it) is ordered on the compute
        // stream only; the copy stream writes into arenas too. Waiting here (arenas grow a few
        // times per run) makes the memory valid for both streams.
        gpu.sync()
    }

    pub fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// Frees the allocation (stream-ordered on the compute stream). The caller has made sure
    /// that no stream still uses it.
    pub fn release(&mut self) {
        self.buf = None;
        self.base = 0;
    }

    /// The device address of byte `off`.
    pub fn at(&self, off: usize) -> Ptr {
        debug_assert!(off < self.capacity());
        self.base + off as u64
    }

    fn slice_bounds(&self, off: usize, len: usize) -> DResult<()> {
        if off + len > self.capacity() {
            return Err(DeviceError::Internal(format!(
                "arena access {off}..{} past its {} bytes",
                off + len,
                self.capacity()
            )));
        }
        Ok(())
    }

    /// Copies `data` to byte `off` (stream-ordered after earlier launches).
    pub fn upload(&mut self, gpu: &Gpu, off: usize, data: &[u8]) -> DResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.slice_bounds(off, data.len())?;
        super::fill::count_to_device(data.len());
        let buf = self.buf.as_mut().expect("checked by slice_bounds");
        let mut dst = buf.slice_mut(off..off + data.len());
        gpu.stream
            .memcpy_htod(data, &mut dst)
            .map_err(drv("copying inputs to the GPU"))
    }

    /// Copies `dst.len()` bytes from byte `off` into `dst` (waits for the stream up to this copy).
    pub fn download(&self, gpu: &Gpu, off: usize, dst: &mut [u8]) -> DResult<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.slice_bounds(off, dst.len())?;
        super::fill::count_to_host(dst.len());
        let buf = self.buf.as_ref().expect("checked by slice_bounds");
        let src = buf.slice(off..off + dst.len());
        gpu.stream
            .memcpy_dtoh(&src, dst)
            .map_err(drv("copying results from the GPU"))
    }

    /// The arena's bytes `off..off + len` as a view (for device-to-device copies).
    pub fn view(&self, off: usize, len: usize) -> DResult<cudarc::driver::CudaView<'_, u8>> {
        self.slice_bounds(off, len)?;
        Ok(self
            .buf
            .as_ref()
            .expect("checked by slice_bounds")
            .slice(off..off + len))
    }
}
