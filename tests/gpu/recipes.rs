//! The methods under test, each written as the recipe that states it, and a tensor's mask jobs
//! and fuse from the real mapping (`stamerge::plan::work::resolve`, which the pipeline and the
//! CUDA memory planner use too): nothing here decides a method's rules.

use std::path::Path;

use stamerge::backend::{FuseSpec, MaskJob};
use stamerge::dtype::FloatType;
use stamerge::plan::work::{resolve, TensorWork};
use stamerge::Recipe;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    TaskArithmetic,
    Magnitude,
    Ties,
    DareLinear,
    DareTies,
    StaFinetuned,
    StaTaskVector,
    /// sta with the last task under `forget:` and a start model.
    Forget,
}

pub const METHODS: [Method; 8] = [
    Method::TaskArithmetic,
    Method::Magnitude,
    Method::Ties,
    Method::DareLinear,
    Method::DareTies,
    Method::StaFinetuned,
    Method::StaTaskVector,
    Method::Forget,
];

/// Task t's density and weight: `DENSITIES[t % 4]`, `WEIGHTS[t % 4]`.
pub const DENSITIES: [f64; 4] = [0.3, 0.5, 0.1, 0.7];
pub const WEIGHTS: [f32; 4] = [1.0, 0.5, 0.75, 1.25];

impl Method {
    fn merge_method(self) -> &'static str {
        match self {
            Method::TaskArithmetic => "task_arithmetic",
            Method::Magnitude => "magnitude",
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::StaFinetuned | Method::StaTaskVector | Method::Forget => "sta",
        }
    }
    fn sta(self) -> bool {
        self.merge_method() == "sta"
    }
    fn dare(self) -> bool {
        matches!(self, Method::DareLinear | Method::DareTies)
    }
}

/// Recipe settings beyond the method.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extra {
    /// `selection: model`.
    pub model_wide: bool,
    /// `nonfinite_scores: zero`.
    pub nonfinite_zero: bool,
    /// DARE with `rescale_norm: inv_density` (τ / d) instead of the default L1 rescale.
    pub inv_density: bool,
}

/// The recipe of `method` with `nt` tasks: per task `WEIGHTS[t % 4]` and `DENSITIES[t % 4]` (none
/// for task arithmetic, which keeps everything);
/// λ 0.5 for task arithmetic, else 0.8; normalised for ties, dare_ties and dare_linear; seed 42
/// and the default rescale (mergekit's L1) for DARE; Forget is sta with the last of several tasks under `forget:` and a start model.
pub fn recipe_text(method: Method, nt: usize, extra: Extra) -> String {
    let forgets = method == Method::Forget && nt > 1;
    let entry = |t: usize| {
        let mut y = format!("  - model: task_{t}\n");
        if method.sta() {
            y += &format!("    gradients: grads_{t}\n");
        }
        y += &format!(
            "    parameters:\n      weight: {:?}\n",
            WEIGHTS[t % WEIGHTS.len()]
        );
        if method != Method::TaskArithmetic {
            y += &format!("      density: {:?}\n", DENSITIES[t % DENSITIES.len()]);
        }
        y
    };
    let added = if forgets { nt - 1 } else { nt };
    let mut y = format!(
        "merge_method: {}\nbase_model: base\nmodels:\n",
        method.merge_method()
    );
    (0..added).for_each(|t| y += &entry(t));
    if forgets {
        y += "forget:\n";
        y += &entry(nt - 1);
        y += "start_model: start\n";
    }
    let lambda = if method == Method::TaskArithmetic {
        0.5
    } else {
        0.8
    };
    let normalize = matches!(method, Method::Ties | Method::DareTies | Method::DareLinear);
    y += &format!("parameters:\n  lambda: {lambda:?}\n  normalize: {normalize}\n");
    if method.dare() {
        y += "  seed: 42\n";
        if extra.inv_density {
            y += "  rescale_norm: inv_density\n";
        }
    }
    if method == Method::StaTaskVector {
        y += "  importance: task_vector\n";
    }
    if extra.model_wide {
        y += "  selection: model\n";
    }
    if extra.nonfinite_zero {
        y += "  nonfinite_scores: zero\n";
    }
    y
}

pub fn recipe(method: Method, nt: usize, extra: Extra) -> Recipe {
    let text = recipe_text(method, nt, extra);
    let r = Recipe::parse(&text, Path::new("."))
        .unwrap_or_else(|e| panic!("the recipe of {method:?}:\n{text}\n{e:?}"));
    assert_eq!(r.tasks.len(), nt, "{method:?}: tasks of\n{text}");
    r
}

/// The work of a tensor `name` of `n` elements, written as `out`; every task's gradient
/// statistic has the tensor.
pub fn tensor_work(recipe: &Recipe, name: &str, n: usize, out: FloatType) -> TensorWork {
    resolve(recipe, name, n as u64, out, &vec![true; recipe.tasks.len()])
}

/// The jobs and fuse of `method` for a group of `nt` tasks and `n` elements (per-tensor
/// selection: every job is known).
pub fn method_jobs(
    method: Method,
    nt: usize,
    n: usize,
    name: &str,
    out: FloatType,
) -> (Vec<MaskJob>, FuseSpec) {
    method_jobs_with(method, nt, n, name, out, Extra::default())
}

/// As [`method_jobs`], with `extra` in the recipe (not `selection: model`).
pub fn method_jobs_with(
    method: Method,
    nt: usize,
    n: usize,
    name: &str,
    out: FloatType,
    extra: Extra,
) -> (Vec<MaskJob>, FuseSpec) {
    assert!(
        !extra.model_wide,
        "model-wide jobs need the model's threshold"
    );
    let work = tensor_work(&recipe(method, nt, extra), name, n, out);
    let jobs = work.jobs(|t| panic!("task {t}: a model-wide task in per-tensor selection"));
    (jobs, work.fuse)
}
