//! The merge methods as data: what each one ranks, how it picks the kept entries, and how kept
//! entries fuse. Backends interpret these rules; no backend re-implements a method by hand.
//! The bit-level definitions are in docs/SEMANTICS.md.

pub mod interp;
mod job;

pub use interp::{Interp, InterpSpec, Operand};
pub use job::{FuseSpec, KeySpec, MaskJob};

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
}

/// How kept entries combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FuseRule {
    /// start + λ Σ ±w m τ (optionally / Σ w).
    Linear,
    /// TIES: sign election, disjoint (optionally normalised) mean.
    Ties,
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
    pub const ALL: [MethodKind; 15] = [
        Self::TaskArithmetic,
        Self::Magnitude,
        Self::Ties,
        Self::DareLinear,
        Self::DareTies,
        Self::Sta,
        Self::Passthrough,
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
            Self::TaskArithmetic
            | Self::Passthrough
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
        }
    }

    pub fn fuse(self) -> FuseRule {
        match self {
            _ if self.is_interp() => FuseRule::Interp,
            Self::Ties | Self::DareTies => FuseRule::Ties,
            _ => FuseRule::Linear,
        }
    }

    /// mergekit's defaults: TIES-style methods normalise by the agreeing weights, `linear`
    /// divides by the sum of the weights.
    pub fn default_normalize(self) -> bool {
        self.fuse() == FuseRule::Ties || self == Self::Linear
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
    /// and fuse rules of the task-vector methods only (yet). run.rs refuses the others before
    /// any work, by name; `--device auto` runs them on the CPU and says why.
    /// (passthrough copies tensors and needs none.)
    pub fn has_cuda_kernels(self) -> bool {
        self.uses_task_vectors() || self == Self::Passthrough
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
