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
    /// `FuseRule::Interp`: the method and its inputs. The fields above keep one entry per task
    /// then, but only `out` and this decide the result.
    pub interp: Option<InterpSpec>,
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
}
