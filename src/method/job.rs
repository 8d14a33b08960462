//! What a backend is asked to compute for one tensor group: each task's mask job and the fuse.
//! Plain data with the meaning of docs/SEMANTICS.md; `plan::work` is the one place that builds
//! them from a recipe, and every backend interprets them the same way.

use super::{FuseRule, InterpSpec, ScoreKind};
use crate::dtype::FloatType;

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
    /// Breadcrumbs: in the order of the keys (largest first, lowest index first among equals),
    /// drop the first `drop` entries and keep the next `keep`.
    Band { spec: KeySpec, drop: u64, keep: u64 },
    /// DELLA: in each row, entry j of rank r (0 for the smallest |τ|) is kept where the
    /// counter-based generator falls below its probability `lo + (r / (len − 1)) · 2 · eps`.
    Della {
        stream: u64,
        rows: Rows,
        /// f32(d − ε), the smallest keep probability.
        lo: f32,
        /// f32(ε).
        eps: f32,
    },
}

impl MaskJob {
    /// The key rule of a job that ranks keys by a threshold (top-k or a known threshold): the
    /// jobs sta's selection options apply to.
    pub fn ranking_spec(&self) -> Option<KeySpec> {
        match *self {
            MaskJob::TopK { spec, .. } | MaskJob::Fixed { spec, .. } => Some(spec),
            _ => None,
        }
    }

    /// The same job with another key rule (only top-k and known-threshold jobs have one here).
    pub fn with_ranking_spec(&self, spec: KeySpec) -> MaskJob {
        match *self {
            MaskJob::TopK { k, .. } => MaskJob::TopK { spec, k },
            MaskJob::Fixed { key, tie_quota, .. } => MaskJob::Fixed {
                spec,
                key,
                tie_quota,
            },
            other => other,
        }
    }
}

/// How a tensor splits into the rows DELLA ranks within (mergekit ranks along dimension 1 of
/// the tensor, a 1-D tensor being one row): shape `[a, len, rest…]` has `a · stride` rows of
/// `len` entries, entry j of row (i, r) at flat index `(i · len + j) · stride + r`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub len: u64,
    /// The product of the dimensions after dimension 1 (1 for a matrix).
    pub stride: u64,
}

impl Rows {
    /// The rows of a tensor of this shape (a scalar or 1-D tensor: one row of every entry).
    pub fn of(shape: &[usize]) -> Self {
        match shape {
            [] => Rows { len: 1, stride: 1 },
            [n] => Rows {
                len: *n as u64,
                stride: 1,
            },
            [_, len, rest @ ..] => Rows {
                len: *len as u64,
                stride: rest.iter().product::<usize>() as u64,
            },
        }
    }

    /// Flat index of entry `j` of row `row`.
    #[inline(always)]
    pub fn index(&self, row: u64, j: u64) -> u64 {
        let (i, r) = (row / self.stride, row % self.stride);
        (i * self.len + j) * self.stride + r
    }
}

/// How the kept entries fuse (docs/SEMANTICS.md, "Fuse").
#[derive(Clone, Debug, PartialEq)]
pub struct FuseSpec {
    pub rule: FuseRule,
    pub lambda: f32,
    /// `normalize` (fisher: `normalize_fisher_weight`).
    pub normalize: bool,
    pub weights: Vec<f32>,
    /// True for `forget:` entries (subtracted).
    pub forget: Vec<bool>,
    /// Per task, DARE's rescale: kept τ is divided by this density.
    pub rescale: Vec<Option<f32>>,
    /// Per task, mergekit's rescale (`rescale_norm: l1`): kept τ is multiplied by
    /// f32(Σ|τ|) / f32(Σ|kept τ|), which the backend finds once the mask is known.
    pub rescale_l1: Vec<bool>,
    /// Per task, a factor kept τ is multiplied by (before the weight): the backend's result of
    /// `rescale_l1`; the plan leaves every entry None.
    pub scale: Vec<Option<f32>>,
    /// What the sce and ram rules read.
    pub sparse: SparseParams,
    /// sta's normalisation and cross-task mask rule (the defaults change nothing).
    pub sta: StaSelect,
    pub out: FloatType,
    /// `FuseRule::Interp`: the method and its inputs. The fields above keep one entry per task
    /// then, but only `out` and this decide the result.
    pub interp: Option<Box<InterpSpec>>,
}

/// How one task's importance is normalised in one tensor before it is compared with a
/// threshold or with other tasks (`normalize_importance`, docs/SEMANTICS.md "sta's selection
/// options"): ŝ = f32(s / c) for c > 0, else 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Norm {
    /// ŝ = s.
    #[default]
    None,
    /// c = f32(Σs / n) (Σ the deterministic sum): what `selection: model` divides by.
    Mean,
    /// c = max s.
    Max,
    /// c = f32(Σs).
    Sum,
}

/// How the tasks' masks combine after each task selected its own (`overlap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Each task keeps what it selected (masks may overlap).
    #[default]
    Sum,
    /// An entry stays only in the mask of the task with the largest ŝ among those that
    /// selected it (the lowest task index among equals): masks are disjoint.
    Exclusive,
    /// An entry stays (in every mask that has it) only where at least k tasks selected it.
    Consensus(u32),
}

/// sta's selection options for one tensor. Only tasks that rank keys (`MaskJob::TopK` or
/// `Fixed`) and are not `forget:` entries take part in the overlap rule.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct StaSelect {
    /// Per task.
    pub norm: Vec<Norm>,
    /// Per task, the `threshold` its `Fixed` job keeps ŝ ≥ of (for reports and refusals).
    pub threshold: Vec<Option<f32>>,
    pub overlap: Overlap,
}

/// The parameters of the fuse rules of `method::sparse` (docs/SEMANTICS.md).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct SparseParams {
    /// sce's `select_topk` (f64, as the count is found from it).
    pub select_topk: f64,
    /// ram's `epsilon`: |τ| above f32(epsilon) counts as changed.
    pub epsilon: f32,
    /// ramplus_tl's `r` and `alpha`.
    pub r: f32,
    pub alpha: f32,
}

impl FuseSpec {
    /// The linear rule's normalisation divisor: the sum of the added tasks' weights (`forget:`
    /// entries excluded), 1 when that sum is (nearly) zero.
    pub fn linear_divisor(&self) -> f32 {
        let mut d = 0f32;
        for (w, &forget) in self.weights.iter().zip(&self.forget) {
            if !forget {
                d += *w;
            }
        }
        if d.abs() < 1e-8 {
            1.0
        } else {
            d
        }
    }

    /// Why normalising would not give a normalised merge of this tensor, if it would not (the
    /// plan refuses such a recipe; README "Decisions"). The linear rule divides by Σw, which
    /// under 1% of Σ|w| blows the task vectors up more than 100-fold (mergekit divides by 1
    /// only under 1e-8); TIES divides each entry by the weights of the tasks that agree on it,
    /// which with weights of both signs can be any signed partial sum, zero or of either sign.
    pub fn normalize_problem(&self) -> Option<String> {
        if !self.normalize {
            return None;
        }
        let w: Vec<f32> = self
            .weights
            .iter()
            .zip(&self.forget)
            .filter(|(_, &forget)| !forget)
            .map(|(&w, _)| w)
            .collect();
        let listed = w
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        match self.rule {
            FuseRule::Ties => {
                let (pos, neg) = (w.iter().any(|&w| w > 0.0), w.iter().any(|&w| w < 0.0));
                (pos && neg).then(|| {
                    format!(
                        "the TIES fuse divides each entry by the sum of the weights of the tasks \
                         that agree on it, and with weights of both signs ({listed}) that sum can \
                         cancel to zero or flip the sign"
                    )
                })
            }
            // Their weights come from their own rules, never from a division by Σw; linear's
            // zero sum of weights is refused by plan/interp.rs, which sees the base's weight.
            FuseRule::Sce
            | FuseRule::Ram
            | FuseRule::RamPlus
            | FuseRule::Fisher
            | FuseRule::Interp => None,
            FuseRule::Linear => {
                let sum: f64 = w.iter().map(|&w| w as f64).sum();
                let abs: f64 = w.iter().map(|&w| (w as f64).abs()).sum();
                (abs > 0.0 && sum.abs() < 0.01 * abs).then(|| {
                    format!(
                        "the weights ({listed}) sum to {sum:e}, so normalising would divide the \
                         task vectors by (nearly) zero"
                    )
                })
            }
        }
    }
}
