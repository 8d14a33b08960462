//! The merge methods as data: what each one ranks, how it picks the kept entries, and how kept
//! entries fuse. Backends interpret these rules; no backend re-implements a method by hand.
//! The bit-level definitions are in docs/SEMANTICS.md.

mod job;
pub mod sparse;

pub use job::{FuseSpec, KeySpec, MaskJob, Norm, Overlap, Rows, SparseParams, StaSelect};

/// STA's importance: what the gradient statistic multiplies (a recipe parameter, read here
/// because it decides a tensor's score).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Importance {
    /// abs(θ_t · G_t).
    #[default]
    Finetuned,
    /// abs(τ_t · G_t).
    TaskVector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MethodKind {
    TaskArithmetic,
    Magnitude,
    Ties,
    DareLinear,
    DareTies,
    Sta,
    /// Copies one input per tensor (frankenmerges with `slices:`), optionally scaled.
    Passthrough,
    /// Model Breadcrumbs: drops the largest γ·n and the smallest entries of each task vector.
    Breadcrumbs,
    BreadcrumbsTies,
    /// DELLA: random keeps with probabilities d ± ε by magnitude rank within each row.
    Della,
    DellaLinear,
    /// SCE: a variance mask shared by the tasks, TIES erase, τ²-energy weights.
    Sce,
    /// Reinforced Agent Merging: entries one task changes are kept, shared ones averaged.
    Ram,
    /// RAM+ (tensor-local): as `ram`, unique entries scaled by each task's overlap ratio.
    RamplusTl,
    /// Fisher merging: the models averaged entry by entry, weighted by w_t · F_t (the squared
    /// gradient statistic).
    Fisher,
}

/// How the kept entries of each task are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectKind {
    /// Every entry is kept.
    All,
    /// The k highest scores (radix select, lowest index wins ties).
    TopK,
    /// DARE: an independent random keep with probability `density`.
    Random,
    /// Breadcrumbs: a band of ranks, the largest γ·n dropped, then the next floor(d·n) kept.
    Band,
    /// DELLA: a random keep whose probability rises with the magnitude rank in the row.
    Della,
}

/// How kept entries combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FuseRule {
    /// start + λ Σ ±w m τ (optionally / Σ w).
    Linear,
    /// TIES: sign election, disjoint (optionally normalised) mean.
    Ties,
    /// SCE: variance mask, TIES erase, energy weights (docs/SEMANTICS.md, "sce").
    Sce,
    /// RAM: unique entries kept, overlapping ones averaged (docs/SEMANTICS.md, "ram").
    Ram,
    /// RAM+ tensor-local: `Ram` with unique entries scaled by λ_t.
    RamPlus,
    /// Fisher merging: Σ c_t F'_t θ_t / Σ c_t F'_t (docs/SEMANTICS.md, "fisher").
    Fisher,
}

/// What one task's entries are ranked by, for one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreKind {
    /// abs(θ − b): magnitude, ties, and sta's fallback for tensors without gradients.
    AbsTaskVector,
    /// abs(θ · G): sta, importance `finetuned`.
    AbsWeightGrad,
    /// abs((θ − b) · G): sta, importance `task_vector`.
    AbsTaskVectorGrad,
}

impl ScoreKind {
    pub fn needs_grad(self) -> bool {
        !matches!(self, Self::AbsTaskVector)
    }
}

impl MethodKind {
    pub const ALL: [MethodKind; 15] = [
        Self::TaskArithmetic,
        Self::Magnitude,
        Self::Ties,
        Self::DareLinear,
        Self::DareTies,
        Self::Sta,
        Self::Passthrough,
        Self::Breadcrumbs,
        Self::BreadcrumbsTies,
        Self::Della,
        Self::DellaLinear,
        Self::Sce,
        Self::Ram,
        Self::RamplusTl,
        Self::Fisher,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::TaskArithmetic => "task_arithmetic",
            Self::Magnitude => "magnitude",
            Self::Ties => "ties",
            Self::DareLinear => "dare_linear",
            Self::DareTies => "dare_ties",
            Self::Sta => "sta",
            Self::Passthrough => "passthrough",
            Self::Breadcrumbs => "breadcrumbs",
            Self::BreadcrumbsTies => "breadcrumbs_ties",
            Self::Della => "della",
            Self::DellaLinear => "della_linear",
            Self::Sce => "sce",
            Self::Ram => "ram",
            Self::RamplusTl => "ramplus_tl",
            Self::Fisher => "fisher",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }

    pub fn select(self) -> SelectKind {
        match self {
            // sce's variance mask is shared by the tasks: its fuse rule makes it.
            Self::TaskArithmetic
            | Self::Passthrough
            | Self::Sce
            | Self::Ram
            | Self::RamplusTl
            | Self::Fisher => SelectKind::All,
            Self::Magnitude | Self::Ties | Self::Sta => SelectKind::TopK,
            Self::DareLinear | Self::DareTies => SelectKind::Random,
            Self::Breadcrumbs | Self::BreadcrumbsTies => SelectKind::Band,
            Self::Della | Self::DellaLinear => SelectKind::Della,
        }
    }

    pub fn fuse(self) -> FuseRule {
        match self {
            Self::Ties | Self::DareTies | Self::BreadcrumbsTies | Self::Della => FuseRule::Ties,
            Self::Sce => FuseRule::Sce,
            Self::Ram => FuseRule::Ram,
            Self::RamplusTl => FuseRule::RamPlus,
            Self::Fisher => FuseRule::Fisher,
            _ => FuseRule::Linear,
        }
    }

    /// mergekit 0.1.5's `default_normalize` (merge_methods/registry.py): true for `ties` and
    /// `della` only (`dare_ties` and `breadcrumbs_ties` elect signs but do not normalise).
    pub fn default_normalize(self) -> bool {
        matches!(self, Self::Ties | Self::Della)
    }

    /// Whether the method reads mergekit's task-arithmetic parameters (`weight`, `lambda`,
    /// `normalize`): every method with a linear or TIES fuse (sce and ram weigh by rules of
    /// their own; passthrough copies).
    pub fn weighs_tasks(self) -> bool {
        matches!(self.fuse(), FuseRule::Linear | FuseRule::Ties) && self != Self::Passthrough
    }

    /// Whether the method reads `rescale` (mergekit's generalized task arithmetic with a
    /// sparsification: ties, dare, breadcrumbs, della).
    pub fn rescales(self) -> bool {
        matches!(
            self,
            Self::Ties
                | Self::DareLinear
                | Self::DareTies
                | Self::Breadcrumbs
                | Self::BreadcrumbsTies
                | Self::Della
                | Self::DellaLinear
        )
    }

    /// mergekit 0.1.5's `default_rescale`: the random keeps (dare, della) rescale.
    pub fn default_rescale(self) -> bool {
        self.random_keeps()
    }

    /// Whether kept entries are drawn at random (counter-based, keyed by `seed`).
    pub fn random_keeps(self) -> bool {
        matches!(self.select(), SelectKind::Random | SelectKind::Della)
    }

    /// Whether `--device cuda` has kernels for this method. The methods without are refused
    /// there before any work (`--device auto` runs them on the CPU and says why).
    pub fn has_cuda_kernels(self) -> bool {
        !matches!(
            self,
            Self::Breadcrumbs
                | Self::BreadcrumbsTies
                | Self::Della
                | Self::DellaLinear
                | Self::Sce
                | Self::Ram
                | Self::RamplusTl
                | Self::Fisher
        )
    }

    /// Whether each model needs a gradient statistic (`gradients:`): sta ranks by it, fisher
    /// weighs by it.
    pub fn reads_gradients(self) -> bool {
        matches!(self, Self::Sta | Self::Fisher)
    }

    /// Whether the method reads `weight` per model: the task-vector methods, and fisher (its
    /// scaling coefficients).
    pub fn reads_weight(self) -> bool {
        self.weighs_tasks() || self == Self::Fisher
    }

    pub fn is_dare(self) -> bool {
        self.select() == SelectKind::Random
    }

    pub fn uses_density(self) -> bool {
        self.select() != SelectKind::All
    }

    pub fn allows_forget(self) -> bool {
        matches!(self, Self::Sta | Self::Magnitude | Self::TaskArithmetic)
    }

    /// The score of a task's tensor; `has_grad` is false where the statistic lacks the tensor
    /// and `missing_gradients: magnitude` allowed the fallback.
    pub fn score(self, importance: Importance, has_grad: bool) -> ScoreKind {
        match (self, importance, has_grad) {
            (Self::Sta, Importance::Finetuned, true) => ScoreKind::AbsWeightGrad,
            (Self::Sta, Importance::TaskVector, true) => ScoreKind::AbsTaskVectorGrad,
            _ => ScoreKind::AbsTaskVector,
        }
    }
}

/// k = max(1, floor(d · n)) (mergekit's count); d = 1 keeps everything.
pub fn keep_count(density: f64, n: u64) -> u64 {
    if density >= 1.0 {
        return n;
    }
    ((density * n as f64).floor() as u64).clamp(1, n.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_count_matches_mergekit_and_never_drops_everything() {
        assert_eq!(keep_count(0.5, 7), 3);
        assert_eq!(keep_count(0.01, 7), 1);
        assert_eq!(keep_count(1.0, 7), 7);
        assert_eq!(keep_count(0.3, 10), 3);
    }
}
