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
use crate::method::{
    keep_count, sparse, FuseSpec, KeySpec, MaskJob, MethodKind, Norm, Overlap, Rows, SelectKind,
    SparseParams, StaSelect,
};
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
    /// sta's `threshold`: keys of normalised importance ≥ x (`MaskJob::Fixed` at key(x), every
    /// tie kept).
    Threshold { spec: KeySpec, x: f32 },
    /// DARE's counter-based keep.
    Random { stream: u64, threshold: u64 },
    /// Breadcrumbs' band of ranks (`MaskJob::Band`).
    Band { spec: KeySpec, drop: u64, keep: u64 },
    /// DELLA's per-row rank-based random keep (`MaskJob::Della`).
    Della {
        stream: u64,
        rows: Rows,
        lo: f32,
        eps: f32,
    },
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
                MaskPlan::Threshold { spec, x } => MaskJob::Fixed {
                    spec,
                    key: crate::select::key(x),
                    tie_quota: u64::MAX,
                },
                MaskPlan::Random { stream, threshold } => MaskJob::Random { stream, threshold },
                MaskPlan::Band { spec, drop, keep } => MaskJob::Band { spec, drop, keep },
                MaskPlan::Della {
                    stream,
                    rows,
                    lo,
                    eps,
                } => MaskJob::Della {
                    stream,
                    rows,
                    lo,
                    eps,
                },
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

    /// Task `t`'s keys, if it ranks (top-k, model-wide or breadcrumbs' band).
    pub fn spec(&self, t: usize) -> Option<KeySpec> {
        match self.masks[t] {
            MaskPlan::TopK { spec, .. }
            | MaskPlan::ModelWide { spec }
            | MaskPlan::Threshold { spec, .. }
            | MaskPlan::Band { spec, .. } => Some(spec),
            _ => None,
        }
    }

    /// Whether some task ranks keys (a key buffer is needed; sce ranks its variances).
    pub fn ranks(&self) -> bool {
        (0..self.masks.len()).any(|t| self.spec(t).is_some())
            || self.fuse.rule == crate::method::FuseRule::Sce
    }

    /// Whether some task has a mask (mask words are needed; sce's shared mask counts as one).
    pub fn masks_any(&self) -> bool {
        self.masks.iter().any(|m| *m != MaskPlan::All)
            || self.fuse.rule == crate::method::FuseRule::Sce
    }
}

/// One task's mask in tensor `name` of shape `shape`; `has_grad`: the task's gradient statistic
/// has this tensor (else sta ranks it by abs(τ), as `missing_gradients: magnitude` allows).
fn mask_plan(
    recipe: &Recipe,
    p: &Resolved,
    t: usize,
    name: &str,
    shape: &[usize],
    has_grad: bool,
) -> MaskPlan {
    let method = recipe.method;
    let n = shape.iter().product::<usize>() as u64;
    // A task that is not an input of this tensor (a slice without it) adds nothing.
    if !p.has_task(t) || method.select() == SelectKind::All {
        return MaskPlan::All;
    }
    let density = p.task_num(t, "density");
    // sta's `threshold` replaces the density; a cross-task rule needs every taking-part task's
    // keys even where it keeps everything.
    let threshold = (method == MethodKind::Sta)
        .then(|| p.task(t, "threshold").map(|v| v.num() as f32))
        .flatten();
    let crosses =
        method == MethodKind::Sta && overlap(p) != Overlap::Sum && !recipe.tasks[t].forget;
    if !selects(density) && threshold.is_none() && !crosses {
        return MaskPlan::All;
    }
    match method.select() {
        SelectKind::All => MaskPlan::All,
        SelectKind::Random => MaskPlan::Random {
            stream: dare::stream(recipe.seed, t, name),
            threshold: dare::threshold(density),
        },
        SelectKind::Band => {
            let (drop, keep) = sparse::breadcrumbs_counts(density, p.task_num(t, "gamma"), n);
            if drop == 0 && keep == n {
                return MaskPlan::All;
            }
            MaskPlan::Band {
                spec: KeySpec {
                    score: crate::method::ScoreKind::AbsTaskVector,
                    mean: None,
                    nonfinite_zero: false,
                },
                drop,
                keep,
            }
        }
        SelectKind::Della => {
            let eps = p.task_num(t, "epsilon");
            MaskPlan::Della {
                stream: dare::stream(recipe.seed, t, name),
                rows: Rows::of(shape),
                // mergekit: `(density - epsilon)` in Python floats, then f32 in torch.
                lo: (density - eps) as f32,
                eps: eps as f32,
            }
        }
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
            match (threshold, recipe.tasks[t].selection) {
                (Some(x), _) => MaskPlan::Threshold { spec, x },
                (None, Selection::Model) if model_wide(recipe, t) => MaskPlan::ModelWide { spec },
                // k = n keeps every entry (no mask); the keys serve the overlap rule.
                _ => MaskPlan::TopK {
                    spec,
                    k: keep_count(density, n),
                },
            }
        }
    }
}

/// sta's `overlap` rule for a tensor (`sum` for every other method).
fn overlap(p: &Resolved) -> Overlap {
    match p.shared("overlap").map(|v| v.str()) {
        Some("exclusive") => Overlap::Exclusive,
        Some("consensus") => Overlap::Consensus(p.num("consensus") as u32),
        _ => Overlap::Sum,
    }
}

/// sta's selection options for a tensor: `normalize_importance` per task (left to the
/// model-wide mean under `selection: model`), the thresholds, the overlap rule.
fn sta_select(recipe: &Recipe, p: &Resolved) -> StaSelect {
    let nt = recipe.tasks.len();
    if recipe.method != MethodKind::Sta {
        return StaSelect {
            norm: vec![Norm::None; nt],
            threshold: vec![None; nt],
            overlap: Overlap::Sum,
        };
    }
    let norm = |t: usize| match p.task(t, "normalize_importance").map(|v| v.str()) {
        _ if recipe.tasks[t].selection == Selection::Model => Norm::None,
        Some("mean") => Norm::Mean,
        Some("max") => Norm::Max,
        Some("sum") => Norm::Sum,
        _ => Norm::None,
    };
    StaSelect {
        norm: (0..nt).map(norm).collect(),
        threshold: (0..nt)
            .map(|t| p.task(t, "threshold").map(|v| v.num() as f32))
            .collect(),
        overlap: overlap(p),
    }
}

/// The fuse of a tensor with parameters `p`, written as `out`. A task that is not an input of
/// the tensor gets weight 0 (its τ is 0 too: it reads the base), which adds nothing in either
/// rule: every sum starts at +0.0 and adding +0.0 changes no value it can hold.
///
/// sce and ram read no weights: their `weights` are 1 for the tensor's inputs (0 for a task that
/// is not one, which their rules then leave out, as mergekit's group lacks it).
fn fuse_spec(recipe: &Recipe, p: &Resolved, out: FloatType) -> FuseSpec {
    let method = recipe.method;
    let nt = recipe.tasks.len();
    let weighs = method.weighs_tasks();
    let weight = |t: usize| match (p.has_task(t), method.reads_weight()) {
        (false, _) => 0.0,
        (true, true) => p.task_num(t, "weight") as f32,
        (true, false) => 1.0,
    };
    // `rescale` after a mask that drops something: by `rescale_norm`, l1 (mergekit's) unless
    // inv_density is asked for.
    let rescaled = |t: usize| {
        let d = p.task_num(t, "density");
        let on = method.rescales() && p.has_task(t) && p.flag("rescale") && selects(d);
        let inv = p.shared("rescale_norm").map(|v| v.str()) == Some("inv_density");
        (on && inv, on && !inv, d)
    };
    let shared = |name: &str, default: f64| p.shared(name).map_or(default, |v| v.num());
    FuseSpec {
        rule: method.fuse(),
        lambda: if weighs { p.num("lambda") as f32 } else { 1.0 },
        // fisher: `normalize_fisher_weight` (the pipeline's norm pass fills `scale`).
        normalize: if method == MethodKind::Fisher {
            p.flag("normalize_fisher_weight")
        } else {
            p.flag("normalize")
        },
        weights: (0..nt).map(weight).collect(),
        forget: recipe.tasks.iter().map(|t| t.forget).collect(),
        rescale: (0..nt)
            .map(|t| {
                let (inv, _, d) = rescaled(t);
                inv.then_some(d as f32)
            })
            .collect(),
        rescale_l1: (0..nt).map(|t| rescaled(t).1).collect(),
        scale: vec![None; nt],
        sparse: SparseParams {
            select_topk: shared("select_topk", 1.0),
            epsilon: shared("epsilon", 0.0) as f32,
            r: shared("r", 0.0) as f32,
            alpha: shared("alpha", 0.0) as f32,
        },
        sta: sta_select(recipe, p),
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
            rescale_l1: vec![false; nt],
            scale: vec![None; nt],
            sparse: SparseParams::default(),
            sta: StaSelect::default(),
            out,
            interp: Some(Box::new(InterpSpec {
                rule,
                inputs: inputs.to_vec(),
                weights: weights.iter().map(|&w| w as f32).collect(),
                uses_base,
                vectors,
            })),
        },
    }
}

/// The work of the tensor at `site` (`n` elements, written as `out`), and the parameter values
/// it was made from; `has_grad[t]`: task t's gradient statistic has the tensor. The tensor is
/// taken as 1-D (della ranks it as one row): [`resolve_shaped`] for a tensor of known shape.
pub fn resolve_at(
    recipe: &Recipe,
    site: &Site,
    n: u64,
    out: FloatType,
    has_grad: &[bool],
) -> (TensorWork, Resolved) {
    resolve_shaped(recipe, site, &[n as usize], out, has_grad)
}

/// [`resolve_at`] for a tensor of shape `shape`.
pub fn resolve_shaped(
    recipe: &Recipe,
    site: &Site,
    shape: &[usize],
    out: FloatType,
    has_grad: &[bool],
) -> (TensorWork, Resolved) {
    let p = recipe.resolve(site);
    let work = TensorWork {
        masks: (0..recipe.tasks.len())
            .map(|t| mask_plan(recipe, &p, t, site.name, shape, has_grad[t]))
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
