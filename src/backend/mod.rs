//! The backend seam, split as candle splits storage ops from device plumbing: [`Compute`] is what
//! is computed on one tensor group (base, T task tensors, T statistics): score → select → fuse,
//! and the passes that `selection: model` needs; [`Backend`] is how a stream of groups is handed
//! over (the next group's inputs early, outputs one call late). `cpu` is the reference; `cuda`
//! must give the same bits.

pub mod cpu;
pub mod cuda;

use crate::dtype::FloatType;
pub use crate::method::{FuseSpec, KeySpec, MaskJob};
pub use crate::select::DigitPass;
use crate::select::Threshold;

/// A tensor's raw little-endian bytes as stored in its file.
#[derive(Clone, Copy, Debug)]
pub struct Raw<'a> {
    pub ty: FloatType,
    pub data: &'a [u8],
}

#[derive(Clone, Copy, Debug)]
pub struct TaskInput<'a> {
    pub theta: Raw<'a>,
    pub grad: Option<Raw<'a>>,
}

/// One output tensor's inputs, all with `n` elements.
#[derive(Clone, Debug)]
pub struct Group<'a> {
    pub name: &'a str,
    /// The caller's number for these inputs (a plan's item index): with `name`, the identity by
    /// which a backend recognises the group it was told comes next ([`Backend::submit`]). Two
    /// groups with the same name and `seq` must hold the same bytes; host addresses are never an
    /// identity (freed and reallocated buffers land at the same ones).
    pub seq: u64,
    pub n: usize,
    pub base: Raw<'a>,
    /// The checkpoint the result is added to (forgetting's `start_model`); the base otherwise.
    pub start: Option<Raw<'a>>,
    pub tasks: Vec<TaskInput<'a>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskStats {
    pub kept: u64,
    /// The threshold found (TopK/Fixed).
    pub threshold: Option<Threshold>,
    /// Keys equal to the threshold that were kept (Fixed: to charge against the model quota).
    pub ties_kept: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupStats {
    pub tasks: Vec<TaskStats>,
    /// Histogram of mask combinations (bit t set when task t kept the entry); empty when T > 8.
    pub combos: Vec<u64>,
}

impl GroupStats {
    /// Every one of `tasks` inputs kept all `n` entries (fisher and the interpolating methods,
    /// which mask nothing), with no combination histogram.
    pub fn all_kept(n: usize, tasks: usize) -> Self {
        let kept = TaskStats {
            kept: n as u64,
            ..Default::default()
        };
        Self {
            tasks: vec![kept; tasks],
            combos: Vec::new(),
        }
    }
}

/// Which input held a bad value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Base,
    Start,
    Theta(usize),
    Grad(usize),
    /// Finite inputs whose product overflowed.
    Score(usize),
}

/// A value error found while computing, with the lowest bad element index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub source: Source,
    pub index: u64,
    pub value_is_nan: bool,
}

/// Why a device backend could not do what it was asked; the variant decides what the caller
/// does (an out-of-memory is retried in smaller pieces), the message is for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The device had less free memory than an allocation needed (the message names it).
    #[error("{0}")]
    OutOfMemory(String),
    /// A driver call failed, or the driver or device cannot be used.
    #[error("{0}")]
    Driver(String),
    /// The work cannot run on this device under its settings (a budget too small, a digit
    /// schedule the kernels do not build, no kernels in this build).
    #[error("{0}")]
    Unsupported(String),
    /// A check between the host code and the kernels failed: a bug in stamerge.
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("non-finite value at index {}", .0.index)]
    Fault(Fault),
    #[error("{0}")]
    Device(#[from] DeviceError),
}

pub type BResult<T> = Result<T, BackendError>;

/// One model-wide task of a tensor group: the task's index and its key rule.
pub type RankTask = (usize, KeySpec);

/// Where a backend keeps `selection: model`'s keys between its passes
/// ([`Compute::begin_model_passes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeysHome {
    /// Computed again from the inputs in every pass.
    Recomputed,
    /// Kept in the backend's own memory from pass 1 to the last digit pass, so only pass 1
    /// reads the inputs (the GPU, when every task's keys fit its budget).
    Kept,
}

/// sta's `normalize_importance` (docs/SEMANTICS.md, "sta's selection options"), the rule both
/// backends share: the jobs with each normalised task's divisor c in its key spec, or None when
/// no task normalises. c is f32(sum / n) for `mean` (`select::tensor_mean`), f32(sum) for `sum`
/// and the largest score for `max`, each of the task's raw scores: `sum(t, raw)` and
/// `max(t, raw)` are the backend's own deterministic sum and maximum.
pub fn normalized_jobs(
    g: &Group,
    jobs: &[MaskJob],
    f: &FuseSpec,
    sum: impl Fn(usize, &KeySpec) -> BResult<f64>,
    max: impl Fn(usize, &KeySpec) -> BResult<f32>,
) -> BResult<Option<Vec<MaskJob>>> {
    use crate::method::Norm;
    if f.sta.norm.iter().all(|&n| n == Norm::None) {
        return Ok(None);
    }
    let mut out = jobs.to_vec();
    for (t, job) in jobs.iter().enumerate() {
        let norm = f.sta.norm.get(t).copied().unwrap_or_default();
        let Some(spec) = job.ranking_spec().filter(|_| norm != Norm::None) else {
            continue;
        };
        let raw = KeySpec { mean: None, ..spec };
        let c = match norm {
            Norm::None => unreachable!("filtered above"),
            Norm::Mean => crate::select::tensor_mean(sum(t, &raw)?, g.n),
            Norm::Sum => sum(t, &raw)? as f32,
            Norm::Max => max(t, &raw)?,
        };
        out[t] = job.with_ranking_spec(KeySpec {
            mean: Some(c),
            ..spec
        });
    }
    Ok(Some(out))
}

/// What a backend computes, each operation on one tensor group with the meaning of
/// docs/SEMANTICS.md; every backend gives the same bits. (The ops; [`Backend`] is the plumbing.)
pub trait Compute: Send + Sync {
    /// Selects each task's mask and writes the fused tensor into `out` (n × out.size() bytes)
    /// before it returns.
    fn merge_group(
        &self,
        g: &Group,
        masks: &[MaskJob],
        fuse: &FuseSpec,
        out: &mut [u8],
    ) -> BResult<GroupStats>;

    /// `selection: model`, pass 1: the deterministic sum of one task's scores in this tensor.
    fn score_sum(&self, g: &Group, task: usize, spec: &KeySpec) -> BResult<f64>;

    /// `selection: model`, digit passes: adds to `hist` (2^bits buckets) the digit `d` of the
    /// task's keys.
    fn histogram(
        &self,
        g: &Group,
        task: usize,
        spec: &KeySpec,
        d: DigitPass,
        hist: &mut [u64],
    ) -> BResult<()>;

    /// The digits (shift, bits) this backend prefers for the model-wide passes, from the top.
    fn model_digits(&self) -> &'static [(u32, u32)];

    /// [`Compute::score_sum`] for several tasks of one group, in their order (a device backend
    /// moves the group's inputs once for all of them).
    fn score_sums(&self, g: &Group, tasks: &[RankTask]) -> BResult<Vec<f64>> {
        tasks
            .iter()
            .map(|(t, s)| self.score_sum(g, *t, s))
            .collect()
    }

    /// [`Compute::histogram`] for several tasks of one group: `hists[i]` gains task i's digit
    /// `d[i]` (one digit position, each task's own prefix).
    fn histograms(
        &self,
        g: &Group,
        tasks: &[RankTask],
        d: &[DigitPass],
        hists: &mut [Vec<u64>],
    ) -> BResult<()> {
        for (((t, s), d), h) in tasks.iter().zip(d).zip(hists) {
            self.histogram(g, *t, s, *d, h)?;
        }
        Ok(())
    }

    /// The model-wide passes over `groups` (each with its ranking tasks) begin: where the keys
    /// will live between them. [`Compute::score_sums`] and [`Compute::histograms`] calls follow,
    /// then [`Compute::end_model_passes`], which the caller must reach on every path.
    fn begin_model_passes(&self, groups: &[(Group, Vec<RankTask>)]) -> BResult<KeysHome> {
        let _ = groups;
        Ok(KeysHome::Recomputed)
    }

    /// Frees what [`Compute::begin_model_passes`] kept.
    fn end_model_passes(&self) -> BResult<()> {
        Ok(())
    }
}

/// How a backend takes a stream of tensor groups from the pipeline (docs/STREAMING.md): the one
/// path the pipeline merges through. A backend with memory of its own moves the next group's
/// inputs in and this group's output back while other work runs; the defaults compute each
/// group at once with [`Compute::merge_group`].
pub trait Backend: Compute {
    fn name(&self) -> &'static str;

    /// Whether the backend maps its inputs' pages itself, on the threads that read them (the
    /// CUDA backend's staging threads populate each piece they copy). Otherwise the pipeline
    /// populates a group's inputs before its compute.
    fn populates_inputs(&self) -> bool {
        false
    }

    /// Why this backend cannot merge `g` with `masks` and `fuse`, known from the group's shape
    /// alone, so that the run can refuse before any work (None: it can).
    fn refuses(&self, g: &Group, masks: &[MaskJob], fuse: &FuseSpec) -> Option<String> {
        let _ = (g, masks, fuse);
        None
    }

    /// Merges `g`; `next` is the group the caller merges after it, if known (its inputs may be
    /// copied in early, and are used by the next call only if its group has `next`'s name and
    /// `seq`). The output buffer is handed over and its bytes may arrive one call
    /// later. Returns this group's statistics at once (a fault in `g` is this call's error), and
    /// the outputs finished so far, oldest first, each exactly once: this call's or an earlier
    /// call's. [`Backend::flush`] returns the rest. After an error, outputs still held are
    /// dropped.
    fn submit(
        &self,
        g: &Group,
        masks: &[MaskJob],
        fuse: &FuseSpec,
        mut out: Vec<u8>,
        next: Option<&Group>,
    ) -> BResult<(GroupStats, Vec<Vec<u8>>)> {
        let _ = next;
        let stats = self.merge_group(g, masks, fuse, &mut out)?;
        Ok((stats, vec![out]))
    }

    /// The outputs of [`Backend::submit`] not yet returned, oldest first (waits for them).
    fn flush(&self) -> BResult<Vec<Vec<u8>>> {
        Ok(Vec::new())
    }
}
