//! The one place a recipe's method becomes per-tensor work: the recipe's parameters resolved
//! for the tensor (`Recipe::resolve`: filters, per-layer gradients, precedence), then for each
//! task its mask (keep all, top-k with its key spec, a model-wide threshold still to find, or
//! DARE's random keep) and the fuse (rule, λ, weights, signs, rescale, output dtype). The plan
//! resolves every merged tensor here once; the pipeline, the CUDA memory planner, the GPU tests
//! and the benches take their jobs from the result, so no other code decides these rules. A new
//! method is a row in `method/` (its `select`, `fuse`, `score`), its parameters' rows in
//! `recipe/params.rs`, a fuse rule in each backend, and tests.

use crate::dtype::FloatType;
use crate::method::interp::{self, Interp, InterpSpec, Operand, Vectors};
use crate::method::{keep_count, FuseSpec, KeySpec, MaskJob, MethodKind, SelectKind};
use crate::recipe::{NonFinite, Recipe, Resolved, Selection, Site};
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
        && selects(spec.model_density)
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
fn mask_plan(
    recipe: &Recipe,
    p: &Resolved,
    t: usize,
    name: &str,
    n: u64,
    has_grad: bool,
) -> MaskPlan {
    let method = recipe.method;
    // A task that is not an input of this tensor (a slice without it) adds nothing.
    if !p.has_task(t) || method.select() == SelectKind::All {
        return MaskPlan::All;
    }
    let density = p.task_num(t, "density");
    if !selects(density) {
        return MaskPlan::All;
    }
    match method.select() {
        SelectKind::All => MaskPlan::All,
        SelectKind::Random => MaskPlan::Random {
            stream: dare::stream(recipe.seed, t, name),
            threshold: dare::threshold(density),
        },
        SelectKind::TopK => {
            let importance = match p.task(t, "importance").map(|v| v.str()) {
                Some("task_vector") => crate::method::Importance::TaskVector,
                _ => crate::method::Importance::Finetuned,
            };
            let spec = KeySpec {
                score: method.score(importance, has_grad),
                mean: None,
                nonfinite_zero: recipe.nonfinite_scores == NonFinite::Zero,
            };
            match recipe.tasks[t].selection {
                Selection::Tensor => MaskPlan::TopK {
                    spec,
                    k: keep_count(density, n),
                },
                Selection::Model => MaskPlan::ModelWide { spec },
            }
        }
    }
}

/// The fuse of a tensor with parameters `p`, written as `out`. A task that is not an input of
/// the tensor gets weight 0 (its τ is 0 too: it reads the base), which adds nothing in either
/// rule: every sum starts at +0.0 and adding +0.0 changes no value it can hold.
fn fuse_spec(recipe: &Recipe, p: &Resolved, out: FloatType) -> FuseSpec {
    let dare = recipe.method.select() == SelectKind::Random;
    let nt = recipe.tasks.len();
    let weight = |t: usize| {
        if p.has_task(t) {
            p.task_num(t, "weight") as f32
        } else {
            0.0
        }
    };
    FuseSpec {
        rule: recipe.method.fuse(),
        lambda: p.num("lambda") as f32,
        normalize: p.flag("normalize"),
        weights: (0..nt).map(weight).collect(),
        forget: recipe.tasks.iter().map(|t| t.forget).collect(),
        rescale: (0..nt)
            .map(|t| {
                let d = p.task_num(t, "density");
                (dare && p.has_task(t) && p.flag("rescale") && selects(d)).then_some(d as f32)
            })
            .collect(),
        out,
        interp: None,
    }
}

/// The work of an interpolating method (method/interp.rs) on a tensor of `shape`, whose inputs
/// are `inputs` in mergekit's order (the base among them where the method weighs it as one
/// more input) and, with `uses_base`, the base as the base. Every task keeps every entry.
pub fn interp_work(
    recipe: &Recipe,
    p: &Resolved,
    inputs: &[Operand],
    uses_base: bool,
    shape: &[usize],
    out: FloatType,
) -> TensorWork {
    let method = recipe.method;
    let nt = recipe.tasks.len();
    let weight = |o: &Operand| -> f64 {
        match *o {
            Operand::Base => p.base("weight").map_or(1.0, |v| v.num()),
            Operand::Task(t) => p.task_num(t, "weight"),
        }
    };
    let weights: Vec<f64> = inputs.iter().map(weight).collect();
    let vectors = match method {
        MethodKind::Nuslerp if p.flag("nuslerp_flatten") => Vectors::Whole,
        MethodKind::Nuslerp if p.flag("nuslerp_row_wise") => Vectors::columns(shape),
        MethodKind::Nuslerp => Vectors::rows(shape),
        MethodKind::ModelStock if p.flag("filter_wise") => Vectors::rows(shape),
        MethodKind::ArceeFusion => Vectors::rows(shape),
        _ => Vectors::Whole,
    };
    let rule = match method {
        MethodKind::Linear => Interp::Linear {
            normalize: p.flag("normalize"),
        },
        MethodKind::Slerp => Interp::Slerp {
            t: p.num("t") as f32,
        },
        MethodKind::Nuslerp => Interp::Nuslerp {
            t: interp::nuslerp_t(weights[0], weights[1]),
        },
        MethodKind::Multislerp => Interp::Multislerp {
            normalize_weights: p.flag("normalize_weights"),
            eps: p.num("eps") as f32,
        },
        MethodKind::Karcher => Interp::Karcher {
            max_iter: p.num("max_iter") as u32,
            tol: p.num("tol"),
        },
        MethodKind::ModelStock => Interp::ModelStock,
        MethodKind::Nearswap => Interp::Nearswap {
            t: p.num("t") as f32,
        },
        MethodKind::ArceeFusion => Interp::ArceeFusion,
        other => unreachable!("{} is not an interpolating method", other.name()),
    };
    let mut task_weights = vec![0f32; nt];
    for (o, w) in inputs.iter().zip(&weights) {
        if let Operand::Task(t) = *o {
            task_weights[t] = *w as f32;
        }
    }
    TensorWork {
        masks: vec![MaskPlan::All; nt],
        fuse: FuseSpec {
            rule: method.fuse(),
            lambda: 1.0,
            normalize: false,
            weights: task_weights,
            forget: vec![false; nt],
            rescale: vec![None; nt],
            out,
            interp: Some(InterpSpec {
                rule,
                inputs: inputs.to_vec(),
                weights: weights.iter().map(|&w| w as f32).collect(),
                uses_base,
                vectors,
            }),
        },
    }
}

/// The work of the tensor at `site` (`n` elements, written as `out`), and the parameter values
/// it was made from; `has_grad[t]`: task t's gradient statistic has the tensor.
pub fn resolve_at(
    recipe: &Recipe,
    site: &Site,
    n: u64,
    out: FloatType,
    has_grad: &[bool],
) -> (TensorWork, Resolved) {
    let p = recipe.resolve(site);
    let work = TensorWork {
        masks: (0..recipe.tasks.len())
            .map(|t| mask_plan(recipe, &p, t, site.name, n, has_grad[t]))
            .collect(),
        fuse: fuse_spec(recipe, &p, out),
    };
    (work, p)
}

/// The work of tensor `name` of a `models:` recipe, every task an input, outside the layers
/// (position 0): for tests and benches, whose recipes set one value per parameter.
pub fn resolve(
    recipe: &Recipe,
    name: &str,
    n: u64,
    out: FloatType,
    has_grad: &[bool],
) -> TensorWork {
    let inputs = vec![Some(name.to_string()); recipe.tasks.len()];
    let site = Site {
        name,
        t: 0.0,
        slice: None,
        base: Some(name),
        inputs: &inputs,
    };
    resolve_at(recipe, &site, n, out, has_grad).0
}
