//! The one place a recipe's method becomes per-tensor work: for each task its mask (keep all,
//! top-k with its key spec, a model-wide threshold still to find, or DARE's random keep) and the
//! fuse (rule, λ, weights, signs, rescale, output dtype). The plan resolves every merged tensor
//! here once; the pipeline, the CUDA memory planner, the GPU tests and the benches take their
//! jobs from the result, so no other code decides these rules. A new method is a row in
//! `method/` (its `select`, `fuse`, `score`), a fuse rule in each backend, and tests.

use crate::dtype::FloatType;
use crate::method::{keep_count, FuseSpec, KeySpec, MaskJob, SelectKind};
use crate::recipe::{NonFinite, Recipe, Selection, TaskSpec};
use crate::select::dare;

/// Whether a density selects at all: 1 keeps every entry, so no mask is made.
pub fn selects(density: f64) -> bool {
    density < 1.0
}

/// Whether task `t`'s threshold is found by the model-wide passes (`selection: model` on a
/// top-k method, with a density that selects).
pub fn model_wide(recipe: &Recipe, t: usize) -> bool {
    let spec = &recipe.tasks[t];
    recipe.method.select() == SelectKind::TopK
        && spec.selection == Selection::Model
        && selects(spec.density)
}

/// The tasks whose thresholds the model-wide passes find, in task order.
pub fn model_wide_tasks(recipe: &Recipe) -> Vec<usize> {
    (0..recipe.tasks.len())
        .filter(|&t| model_wide(recipe, t))
        .collect()
}

/// One task's mask in one tensor, as far as the plan can decide it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskPlan {
    /// Every entry kept.
    All,
    /// The k highest keys of this tensor.
    TopK { spec: KeySpec, k: u64 },
    /// `selection: model`: ranked by `spec` (divided by the tensor's mean score); the
    /// threshold comes from the model-wide passes.
    ModelWide { spec: KeySpec },
    /// DARE's counter-based keep.
    Random { stream: u64, threshold: u64 },
}

/// A task's model-wide threshold as one tensor's mask needs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelCut {
    /// The tensor's mean score (its keys are divided by it).
    pub mean: f32,
    /// The threshold key over the whole model.
    pub key: u32,
    /// Keys equal to `key` still to keep, lowest index (in plan order) first.
    pub tie_quota: u64,
}

/// What one merged tensor asks of a backend.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorWork {
    /// Per task.
    pub masks: Vec<MaskPlan>,
    pub fuse: FuseSpec,
}

impl TensorWork {
    /// The backend's mask jobs; `cut(t)` gives the model-wide threshold of each
    /// [`MaskPlan::ModelWide`] task (asked for those only).
    pub fn jobs(&self, mut cut: impl FnMut(usize) -> ModelCut) -> Vec<MaskJob> {
        self.masks
            .iter()
            .enumerate()
            .map(|(t, m)| match *m {
                MaskPlan::All => MaskJob::All,
                MaskPlan::TopK { spec, k } => MaskJob::TopK { spec, k },
                MaskPlan::ModelWide { spec } => {
                    let c = cut(t);
                    MaskJob::Fixed {
                        spec: KeySpec {
                            mean: Some(c.mean),
                            ..spec
                        },
                        key: c.key,
                        tie_quota: c.tie_quota,
                    }
                }
                MaskPlan::Random { stream, threshold } => MaskJob::Random { stream, threshold },
            })
            .collect()
    }

    /// The jobs before the model-wide thresholds are known (for memory planning): a
    /// model-wide task as a fixed threshold at key 0, which needs the same buffers as the job
    /// it becomes.
    pub fn shape_jobs(&self) -> Vec<MaskJob> {
        self.jobs(|_| ModelCut {
            mean: 1.0,
            key: 0,
            tie_quota: 0,
        })
    }

    /// Per task, k of a per-tensor top-k (None: model-wide, random or keep-all).
    pub fn k(&self) -> Vec<Option<u64>> {
        self.masks
            .iter()
            .map(|m| match m {
                MaskPlan::TopK { k, .. } => Some(*k),
                _ => None,
            })
            .collect()
    }

    /// Task `t`'s keys, if it ranks (top-k or model-wide).
    pub fn spec(&self, t: usize) -> Option<KeySpec> {
        match self.masks[t] {
            MaskPlan::TopK { spec, .. } | MaskPlan::ModelWide { spec } => Some(spec),
            _ => None,
        }
    }

    /// Whether some task ranks keys (a key buffer is needed).
    pub fn ranks(&self) -> bool {
        (0..self.masks.len()).any(|t| self.spec(t).is_some())
    }

    /// Whether some task has a mask (mask words are needed).
    pub fn masks_any(&self) -> bool {
        self.masks.iter().any(|m| *m != MaskPlan::All)
    }
}

/// One task's mask in tensor `name` of `n` elements; `has_grad`: the task's gradient statistic
/// has this tensor (else sta ranks it by abs(τ), as `missing_gradients: magnitude` allows).
fn mask_plan(recipe: &Recipe, t: usize, name: &str, n: u64, has_grad: bool) -> MaskPlan {
    let spec_t: &TaskSpec = &recipe.tasks[t];
    let method = recipe.method;
    if !selects(spec_t.density) {
        return MaskPlan::All;
    }
    match method.select() {
        SelectKind::All => MaskPlan::All,
        SelectKind::Random => MaskPlan::Random {
            stream: dare::stream(recipe.seed, t, name),
            threshold: dare::threshold(spec_t.density),
        },
        SelectKind::TopK => {
            let spec = KeySpec {
                score: method.score(spec_t.importance, has_grad),
                mean: None,
                nonfinite_zero: recipe.nonfinite_scores == NonFinite::Zero,
            };
            match spec_t.selection {
                Selection::Tensor => MaskPlan::TopK {
                    spec,
                    k: keep_count(spec_t.density, n),
                },
                Selection::Model => MaskPlan::ModelWide { spec },
            }
        }
    }
}

/// The fuse of every tensor of `recipe`, written as `out`.
fn fuse_spec(recipe: &Recipe, out: FloatType) -> FuseSpec {
    let dare = recipe.method.select() == SelectKind::Random;
    FuseSpec {
        rule: recipe.method.fuse(),
        lambda: recipe.lambda,
        normalize: recipe.normalize,
        weights: recipe.tasks.iter().map(|t| t.weight).collect(),
        forget: recipe.tasks.iter().map(|t| t.forget).collect(),
        rescale: recipe
            .tasks
            .iter()
            .map(|t| (dare && recipe.rescale && selects(t.density)).then_some(t.density as f32))
            .collect(),
        out,
    }
}

/// The work of tensor `name` (`n` elements, written as `out`); `has_grad[t]`: task t's
/// gradient statistic has the tensor.
pub fn resolve(
    recipe: &Recipe,
    name: &str,
    n: u64,
    out: FloatType,
    has_grad: &[bool],
) -> TensorWork {
    TensorWork {
        masks: (0..recipe.tasks.len())
            .map(|t| mask_plan(recipe, t, name, n, has_grad[t]))
            .collect(),
        fuse: fuse_spec(recipe, out),
    }
}
