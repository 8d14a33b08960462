//! The merge methods as data: what each one ranks, how it picks the kept entries, and how kept
//! entries fuse. Backends interpret these rules; no backend re-implements a method by hand.
//! The bit-level definitions are in docs/SEMANTICS.md.

pub mod interp;
mod job;
pub mod sparse;

pub use interp::{Interp, InterpSpec, Operand};
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
    // Methods that combine whole models rather than task vectors (method/interp.rs).
    /// Weighted mean of the inputs.
    Linear,
    /// Spherical interpolation of the base and one model, one angle per tensor.
    Slerp,
    /// Spherical interpolation of two models (or their task vectors), per tensor or per row.
    Nuslerp,
    /// Barycentric interpolation of several models on the hypersphere.
    Multislerp,
    /// The Karcher (Riemannian) mean of the inputs on the hypersphere.
    Karcher,
    /// Model Stock: the base moved towards the models' mean by their mutual angle.
    ModelStock,
    /// Takes the model's value where it is near the base's.
    Nearswap,
    /// Keeps the model's changes whose importance is an outlier.
    ArceeFusion,
}

/// What a method does with `base_model` (mergekit's `BasePolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasePolicy {
    /// The base is needed (task vectors are taken against it, or it is an end of the path).
    Required,
    /// With a base the method works on task vectors, without one on the models themselves.
    Optional,
    /// The base is one more input like the models, when the recipe names one.
    Ignored,
}

/// The inputs a method takes per output tensor (mergekit's `InputContract`): counts include
/// the base where it is an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contract {
    pub base: BasePolicy,
    pub min_inputs: usize,
    pub max_inputs: Option<usize>,
    /// Models besides the base.
    pub min_non_base: usize,
    pub max_non_base: Option<usize>,
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
    /// A method of method/interp.rs: the whole-tensor rule of `FuseSpec::interp`.
    Interp,
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
    pub const ALL: [MethodKind; 23] = [
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
        Self::Linear,
        Self::Slerp,
        Self::Nuslerp,
        Self::Multislerp,
        Self::Karcher,
        Self::ModelStock,
        Self::Nearswap,
        Self::ArceeFusion,
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
            Self::Linear => "linear",
            Self::Slerp => "slerp",
            Self::Nuslerp => "nuslerp",
            Self::Multislerp => "multislerp",
            Self::Karcher => "karcher",
            Self::ModelStock => "model_stock",
            Self::Nearswap => "nearswap",
            Self::ArceeFusion => "arcee_fusion",
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
            | Self::Fisher
            | Self::Linear
            | Self::Slerp
            | Self::Nuslerp
            | Self::Multislerp
            | Self::Karcher
            | Self::ModelStock
            | Self::Nearswap
            | Self::ArceeFusion => SelectKind::All,
            Self::Magnitude | Self::Ties | Self::Sta => SelectKind::TopK,
            Self::DareLinear | Self::DareTies => SelectKind::Random,
            Self::Breadcrumbs | Self::BreadcrumbsTies => SelectKind::Band,
            Self::Della | Self::DellaLinear => SelectKind::Della,
        }
    }

    pub fn fuse(self) -> FuseRule {
        match self {
            _ if self.is_interp() => FuseRule::Interp,
            Self::Ties | Self::DareTies | Self::BreadcrumbsTies | Self::Della => FuseRule::Ties,
            Self::Sce => FuseRule::Sce,
            Self::Ram => FuseRule::Ram,
            Self::RamplusTl => FuseRule::RamPlus,
            Self::Fisher => FuseRule::Fisher,
            _ => FuseRule::Linear,
        }
    }

    /// mergekit 0.1.5's `default_normalize` (merge_methods/registry.py): true for `ties`,
    /// `della` and `linear` (`dare_ties` and `breadcrumbs_ties` elect signs but do not
    /// normalise; `linear` divides by the sum of the weights).
    pub fn default_normalize(self) -> bool {
        matches!(self, Self::Ties | Self::Della | Self::Linear)
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

    /// The methods of method/interp.rs, which combine the inputs themselves (not task vectors
    /// kept by a mask).
    pub fn is_interp(self) -> bool {
        matches!(
            self,
            Self::Linear
                | Self::Slerp
                | Self::Nuslerp
                | Self::Multislerp
                | Self::Karcher
                | Self::ModelStock
                | Self::Nearswap
                | Self::ArceeFusion
        )
    }

    /// The methods that add masked task vectors (model − base) to the base: what `lambda`,
    /// `density`, `rescale` and the rest of the task-vector parameters are for.
    pub fn uses_task_vectors(self) -> bool {
        self != Self::Passthrough && !self.is_interp()
    }

    /// What the method needs of its inputs, as mergekit 0.1.5 declares it.
    pub fn contract(self) -> Contract {
        let c = |base, min_inputs, max_inputs, min_non_base, max_non_base| Contract {
            base,
            min_inputs,
            max_inputs,
            min_non_base,
            max_non_base,
        };
        use BasePolicy::*;
        match self {
            Self::Linear | Self::Karcher => c(Ignored, 1, None, 0, None),
            Self::Passthrough => c(Ignored, 1, Some(1), 0, None),
            Self::Slerp | Self::Nearswap | Self::ArceeFusion => c(Required, 2, Some(2), 0, None),
            Self::Nuslerp => c(Optional, 1, None, 2, Some(2)),
            Self::Multislerp => c(Optional, 1, None, 1, None),
            Self::ModelStock => c(Required, 3, None, 0, None),
            // forget-only recipes have no models besides the base.
            _ => c(Required, 1, None, 0, None),
        }
    }

    /// Whether `--device cuda` can run this method: the CUDA backend has kernels for the mask
    /// and fuse rules of the task-vector methods of DESIGN.md, fisher, and the interpolating
    /// methods whose passes are dot products and one element-wise formula (linear, slerp,
    /// nuslerp, multislerp, nearswap, model_stock: backend/cuda/interp.rs), and breadcrumbs
    /// (its band is two top-k selections; linear and TIES fuses); not (yet) for della, sce and
    /// ram (method/sparse.rs) nor for karcher and arcee_fusion.
    /// run.rs refuses the others before any work, by name; `--device auto` runs them on the CPU
    /// and says why. (passthrough copies tensors and needs none.)
    pub fn has_cuda_kernels(self) -> bool {
        let sparse = matches!(
            self,
            Self::Della | Self::DellaLinear | Self::Sce | Self::Ram | Self::RamplusTl
        );
        let interp = matches!(
            self,
            Self::Linear
                | Self::Slerp
                | Self::Nuslerp
                | Self::Multislerp
                | Self::Nearswap
                | Self::ModelStock
        );
        (self.uses_task_vectors() && !sparse)
            || interp
            || matches!(self, Self::Passthrough | Self::Fisher)
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
