//! The backend seam: score → select → fuse on one tensor group (base, T task tensors, T
//! statistics), plus the streaming passes that `selection: model` needs. `cpu` is the reference;
//! `cuda` must give the same bits.

pub mod cpu;
pub mod cuda;

use crate::dtype::FloatType;
use crate::method::{FuseRule, ScoreKind};
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
    pub n: usize,
    pub base: Raw<'a>,
    /// The checkpoint the result is added to (forgetting's `start_model`); the base otherwise.
    pub start: Option<Raw<'a>>,
    pub tasks: Vec<TaskInput<'a>>,
}

/// How one task's keys are computed for one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeySpec {
    pub score: ScoreKind,
    /// `selection: model`: the tensor's mean score (scores are divided by it); None otherwise.
    pub mean: Option<f32>,
    /// Treat NaN/Inf scores as 0 instead of failing.
    pub nonfinite_zero: bool,
}

/// What decides one task's mask in this tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskJob {
    /// Keep everything.
    All,
    /// Keep the k best of this tensor.
    TopK { spec: KeySpec, k: u64 },
    /// `selection: model`: the model-wide threshold is known; keep keys above it and at most
    /// `tie_quota` keys equal to it, lowest index first.
    Fixed {
        spec: KeySpec,
        key: u32,
        tie_quota: u64,
    },
    /// DARE: keep where the counter-based generator says so.
    Random { stream: u64, threshold: u64 },
}

/// How the kept entries fuse (docs/SEMANTICS.md, "Fuse").
#[derive(Clone, Debug, PartialEq)]
pub struct FuseSpec {
    pub rule: FuseRule,
    pub lambda: f32,
    pub normalize: bool,
    pub weights: Vec<f32>,
    /// True for `forget:` entries (subtracted).
    pub forget: Vec<bool>,
    /// Per task, DARE's rescale: kept τ is divided by this density.
    pub rescale: Vec<Option<f32>>,
    pub out: FloatType,
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

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("non-finite value at index {}", .0.index)]
    Fault(Fault),
    #[error("{0}")]
    Device(String),
}

pub type BResult<T> = Result<T, BackendError>;

pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    /// Selects each task's mask and writes the fused tensor into `out` (n × out.size() bytes).
    fn merge_group(
        &self,
        g: &Group,
        masks: &[MaskJob],
        fuse: &FuseSpec,
        out: &mut [u8],
    ) -> BResult<GroupStats>;

    /// As `merge_group`, told which group the caller merges next (the pipeline's next tensor),
    /// so that a backend with memory of its own can move that group's inputs while this one
    /// computes. The results are the same; the default ignores `next`.
    fn merge_group_with_next(
        &self,
        g: &Group,
        masks: &[MaskJob],
        fuse: &FuseSpec,
        out: &mut [u8],
        next: Option<&Group>,
    ) -> BResult<GroupStats> {
        let _ = next;
        self.merge_group(g, masks, fuse, out)
    }

    /// As `merge_group_with_next`, but the output buffer is handed over and its bytes may arrive
    /// one call later, so that a backend can copy this group's output back while the next group
    /// computes. Returns this group's statistics at once (a fault in `g` is this call's error),
    /// and the outputs finished so far, oldest first, each exactly once: this call's or an
    /// earlier call's. [`Backend::flush_outputs`] returns the rest. After an error, outputs
    /// still held are dropped. The default finishes every output at once.
    fn merge_group_deferred(
        &self,
        g: &Group,
        masks: &[MaskJob],
        fuse: &FuseSpec,
        mut out: Vec<u8>,
        next: Option<&Group>,
    ) -> BResult<(GroupStats, Vec<Vec<u8>>)> {
        let stats = self.merge_group_with_next(g, masks, fuse, &mut out, next)?;
        Ok((stats, vec![out]))
    }

    /// The outputs of `merge_group_deferred` calls not yet returned, oldest first (waits for
    /// them).
    fn flush_outputs(&self) -> BResult<Vec<Vec<u8>>> {
        Ok(Vec::new())
    }

    /// `selection: model`, pass 1: the deterministic sum of one task's scores in this tensor.
    fn score_sum(&self, g: &Group, task: usize, spec: &KeySpec) -> BResult<f64>;

    /// `selection: model`, digit passes: add to `hist` (2^bits buckets) the digit at `shift` of
    /// the keys whose bits above `shift + bits` equal `prefix`.
    #[allow(clippy::too_many_arguments)]
    fn histogram(
        &self,
        g: &Group,
        task: usize,
        spec: &KeySpec,
        shift: u32,
        bits: u32,
        prefix: u32,
        hist: &mut [u64],
    ) -> BResult<()>;

    /// The digits this backend prefers for the model-wide passes, from the top.
    fn model_digits(&self) -> &'static [(u32, u32)];
}
