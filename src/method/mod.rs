//! The merge methods as data: what each one ranks, how it picks the kept entries, and how kept
//! entries fuse. Backends interpret these rules; no backend re-implements a method by hand.
//! The bit-level definitions are in docs/SEMANTICS.md.

mod job;

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
    pub const ALL: [MethodKind; 7] = [
        Self::TaskArithmetic,
        Self::Magnitude,
        Self::Ties,
        Self::DareLinear,
        Self::DareTies,
        Self::Sta,
        Self::Passthrough,
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
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }

    pub fn select(self) -> SelectKind {
        match self {
            Self::TaskArithmetic | Self::Passthrough => SelectKind::All,
            Self::Magnitude | Self::Ties | Self::Sta => SelectKind::TopK,
            Self::DareLinear | Self::DareTies => SelectKind::Random,
        }
    }

    pub fn fuse(self) -> FuseRule {
        match self {
            Self::Ties | Self::DareTies => FuseRule::Ties,
            _ => FuseRule::Linear,
        }
    }

    /// mergekit's defaults: TIES-style methods normalise by the agreeing weights.
    pub fn default_normalize(self) -> bool {
        self.fuse() == FuseRule::Ties
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
