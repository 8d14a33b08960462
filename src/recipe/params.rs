//! Every parameter a recipe may set, as data: its name, kind, scope, default, valid range and
//! the methods that read it. The recipe reader checks settings against this table, and
//! [`Recipe::resolve`](super::Recipe::resolve) gives any method the per-tensor value of any of its
//! parameters by name. A new method declares its parameters here (one row each) and reads
//! them from [`Resolved`](super::Resolved); filters, gradients, precedence, checks and the plan's
//! printout come with the row.

use crate::method::MethodKind;

/// One value of a parameter, after its kind's conversion (mergekit's pydantic validation).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Num(f64),
    Bool(bool),
    Str(String),
}

impl Value {
    pub fn num(&self) -> f64 {
        match self {
            Value::Num(x) => *x,
            Value::Bool(b) => *b as u8 as f64,
            Value::Str(_) => f64::NAN,
        }
    }

    pub fn bool(&self) -> bool {
        match self {
            Value::Bool(b) => *b,
            Value::Num(x) => *x != 0.0,
            Value::Str(_) => false,
        }
    }

    pub fn str(&self) -> &str {
        match self {
            Value::Str(s) => s,
            _ => "",
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Num(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => write!(f, "{s}"),
        }
    }
}

/// What a parameter's values are (mergekit's `value_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Float,
    /// A whole number (interpolated gradients must land on one).
    Int,
    Bool,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A model of the recipe: `base`, or a `model:` path as the recipe writes it.
    Model,
}

impl Kind {
    /// Numeric gradients interpolate; others pick an entry.
    pub fn is_numeric(self) -> bool {
        matches!(self, Kind::Float | Kind::Int)
    }

    pub fn describe(self) -> String {
        match self {
            Kind::Float => "a number or a list of numbers".into(),
            Kind::Int => "a whole number".into(),
            Kind::Bool => "true or false (or a list of them)".into(),
            Kind::Choice(w) => format!("one of {}", w.join(", ")),
            Kind::Model => "`base` or a model path of the recipe".into(),
        }
    }
}

/// Along which inputs a parameter takes values (mergekit's `ParameterScope`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One value per tensor (mergekit's SHARED): read from an output slice's `parameters` and the
    /// top-level `parameters`; in a model's `parameters` it is an error.
    Shared,
    /// One value per input model other than the base, and tensor (mergekit's NON_BASE): a slice
    /// source's `parameters`, a model's `parameters`, an output slice's, then the top level.
    PerModel,
    /// As `PerModel`, for the base too (mergekit's INPUT).
    Input,
}

impl std::fmt::Debug for ParamSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParamSpec({})", self.name)
    }
}

pub struct ParamSpec {
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    /// Whether the value may change from tensor to tensor (gradients and filters). False: one
    /// value for the whole merge, which must be written as a plain scalar.
    pub per_tensor: bool,
    /// The value when no scope sets it (None: unset, the method's own behaviour).
    pub default: fn(MethodKind) -> Option<Value>,
    /// The valid range, checked on every scalar of every setting when the recipe is read:
    /// `Err("must be in (0, 1]")`.
    pub check: fn(&Value) -> Result<(), String>,
    /// The methods that read it (a recipe that sets it for another method gets a note).
    pub methods: fn(MethodKind) -> bool,
}

fn any(_: &Value) -> Result<(), String> {
    Ok(())
}

/// Values enter the fp32 arithmetic as `f32(value)`: 1e39 is a finite f64 but not an f32.
fn finite_f32(v: &Value) -> Result<(), String> {
    if (v.num() as f32).is_finite() {
        Ok(())
    } else {
        Err("must be a finite number (|x| < 3.4e38)".into())
    }
}

fn density(v: &Value) -> Result<(), String> {
    let d = v.num();
    if d > 0.0 && d <= 1.0 {
        Ok(())
    } else {
        Err("must be in (0, 1]".into())
    }
}

fn seed(v: &Value) -> Result<(), String> {
    let s = v.num();
    if (0.0..=u64::MAX as f64).contains(&s) {
        Ok(())
    } else {
        Err("must be a whole number from 0 to 2^64 − 1".into())
    }
}

fn task_vector_methods(m: MethodKind) -> bool {
    m.weighs_tasks()
}

fn non_negative(v: &Value) -> Result<(), String> {
    let x = v.num();
    if x >= 0.0 && (x as f32).is_finite() {
        Ok(())
    } else {
        Err("must be a finite number ≥ 0".into())
    }
}

fn at_least_one(v: &Value) -> Result<(), String> {
    let k = v.num();
    if k >= 1.0 && k <= u32::MAX as f64 && k.fract() == 0.0 {
        Ok(())
    } else {
        Err("must be a whole number ≥ 1".into())
    }
}

fn unit_interval(v: &Value) -> Result<(), String> {
    if (0.0..=1.0).contains(&v.num()) {
        Ok(())
    } else {
        Err("must be in [0, 1]".into())
    }
}

fn iterations(v: &Value) -> Result<(), String> {
    if (0.0..=1e6).contains(&v.num()) {
        Ok(())
    } else {
        Err("must be a whole number from 0 to 1000000".into())
    }
}

/// The parameter table (mergekit's names and defaults where mergekit has the parameter).
pub const PARAMS: &[ParamSpec] = &[
    // Per model besides the base (mergekit requires it; stamerge's default is 1).
    ParamSpec {
        name: "weight",
        kind: Kind::Float,
        scope: Scope::PerModel,
        per_tensor: true,
        default: |_| Some(Value::Num(1.0)),
        check: finite_f32,
        methods: |m| {
            MethodKind::reads_weight(m) || matches!(m, MethodKind::Nuslerp | MethodKind::Multislerp)
        },
    },
    // linear weighs every input, the base too where it is one (mergekit's INPUT scope).
    ParamSpec {
        name: "weight",
        kind: Kind::Float,
        scope: Scope::Input,
        per_tensor: true,
        default: |_| Some(Value::Num(1.0)),
        check: finite_f32,
        methods: |m| m == MethodKind::Linear,
    },
    ParamSpec {
        name: "density",
        kind: Kind::Float,
        scope: Scope::PerModel,
        per_tensor: true,
        default: |_| Some(Value::Num(1.0)),
        check: density,
        methods: MethodKind::uses_density,
    },
    ParamSpec {
        name: "lambda",
        kind: Kind::Float,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Num(1.0)),
        check: finite_f32,
        methods: task_vector_methods,
    },
    ParamSpec {
        name: "normalize",
        kind: Kind::Bool,
        scope: Scope::Shared,
        per_tensor: true,
        default: |m| Some(Value::Bool(m.default_normalize())),
        check: any,
        methods: |m| task_vector_methods(m) || m == MethodKind::Linear,
    },
    ParamSpec {
        name: "rescale",
        kind: Kind::Bool,
        scope: Scope::Shared,
        per_tensor: true,
        default: |m| Some(Value::Bool(m.default_rescale())),
        check: any,
        methods: MethodKind::rescales,
    },
    // stamerge: how `rescale` restores the kept entries' size. `l1` is mergekit's (the name and
    // the word are `sparsify.py`'s `rescale_norm`), `inv_density` DARE's paper (and stamerge's
    // before 0.2): kept τ / d.
    ParamSpec {
        name: "rescale_norm",
        kind: Kind::Choice(&["l1", "inv_density"]),
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Str("l1".into())),
        check: any,
        methods: MethodKind::rescales,
    },
    // mergekit's memory-saving switch for TIES masks; it does not change results.
    ParamSpec {
        name: "int8_mask",
        kind: Kind::Bool,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Bool(false)),
        check: any,
        methods: |m| task_vector_methods(m) || m == MethodKind::Sce,
    },
    ParamSpec {
        name: "seed",
        kind: Kind::Int,
        scope: Scope::Shared,
        per_tensor: false,
        default: |_| Some(Value::Num(0.0)),
        check: seed,
        methods: MethodKind::random_keeps,
    },
    // breadcrumbs: the fraction of largest |τ| dropped.
    ParamSpec {
        name: "gamma",
        kind: Kind::Float,
        scope: Scope::PerModel,
        per_tensor: true,
        default: |_| Some(Value::Num(0.01)),
        check: unit_interval,
        methods: |m| m.select() == crate::method::SelectKind::Band,
    },
    // della: keep probabilities run from density − epsilon to density + epsilon (checked
    // together with the density for every tensor, `method::sparse::della_bounds`).
    ParamSpec {
        name: "epsilon",
        kind: Kind::Float,
        scope: Scope::PerModel,
        per_tensor: true,
        default: |_| Some(Value::Num(0.15)),
        check: finite_f32,
        methods: |m| m.select() == crate::method::SelectKind::Della,
    },
    // ram and ramplus_tl: |τ| above it counts as a change. The same name as della's row, another
    // scope and default: the reader takes the row of the recipe's method (`spec`).
    ParamSpec {
        name: "epsilon",
        kind: Kind::Float,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Num(1e-5)),
        check: finite_f32,
        methods: |m| matches!(m, MethodKind::Ram | MethodKind::RamplusTl),
    },
    ParamSpec {
        name: "r",
        kind: Kind::Float,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Num(0.1)),
        check: finite_f32,
        methods: |m| m == MethodKind::RamplusTl,
    },
    ParamSpec {
        name: "alpha",
        kind: Kind::Float,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Num(0.2)),
        check: finite_f32,
        methods: |m| m == MethodKind::RamplusTl,
    },
    // sce: the fraction of positions (by variance across the tasks) kept.
    ParamSpec {
        name: "select_topk",
        kind: Kind::Float,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Num(1.0)),
        check: unit_interval,
        methods: |m| m == MethodKind::Sce,
    },
    // Per task, for the whole model: `model` ranks every tensor together.
    ParamSpec {
        name: "selection",
        kind: Kind::Choice(&["tensor", "model"]),
        scope: Scope::PerModel,
        per_tensor: false,
        default: |_| Some(Value::Str("tensor".into())),
        check: any,
        methods: |m| m.select() == crate::method::SelectKind::TopK,
    },
    ParamSpec {
        name: "importance",
        kind: Kind::Choice(&["finetuned", "task_vector"]),
        scope: Scope::PerModel,
        per_tensor: true,
        default: |_| Some(Value::Str("finetuned".into())),
        check: any,
        methods: |m| m == MethodKind::Sta,
    },
    // sta's selection options (docs/SEMANTICS.md, "sta's selection options"). Unset: `none`,
    // except under `selection: model`, whose ranking divides by the tensor's mean already.
    ParamSpec {
        name: "normalize_importance",
        kind: Kind::Choice(&["none", "mean", "max", "sum"]),
        scope: Scope::PerModel,
        per_tensor: true,
        default: |_| None,
        check: any,
        methods: |m| m == MethodKind::Sta,
    },
    // Keep entries whose normalised importance is ≥ it: instead of `density`.
    ParamSpec {
        name: "threshold",
        kind: Kind::Float,
        scope: Scope::PerModel,
        per_tensor: true,
        default: |_| None,
        check: non_negative,
        methods: |m| m == MethodKind::Sta,
    },
    ParamSpec {
        name: "overlap",
        kind: Kind::Choice(&["sum", "exclusive", "consensus"]),
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Str("sum".into())),
        check: any,
        methods: |m| m == MethodKind::Sta,
    },
    // `overlap: consensus`: how many tasks must select an entry (TALL masks' k).
    ParamSpec {
        name: "consensus",
        kind: Kind::Int,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Num(2.0)),
        check: at_least_one,
        methods: |m| m == MethodKind::Sta,
    },
    // fisher: divide each model's Fisher weights by their L2 norm over the whole model
    // (FusionBench's `normalize_fisher_weight`, default true there too).
    ParamSpec {
        name: "normalize_fisher_weight",
        kind: Kind::Bool,
        scope: Scope::Shared,
        per_tensor: false,
        default: |_| Some(Value::Bool(true)),
        check: any,
        methods: |m| m == MethodKind::Fisher,
    },
    ParamSpec {
        name: "missing_gradients",
        kind: Kind::Choice(&["error", "magnitude"]),
        scope: Scope::Shared,
        per_tensor: false,
        default: |_| Some(Value::Str("error".into())),
        check: any,
        // fisher: `magnitude` takes F = 0 for such a tensor (a frozen parameter's).
        methods: MethodKind::reads_gradients,
    },
    ParamSpec {
        name: "nonfinite_scores",
        kind: Kind::Choice(&["error", "zero"]),
        scope: Scope::Shared,
        per_tensor: false,
        default: |_| Some(Value::Str("error".into())),
        check: any,
        methods: |m| m.select() == crate::method::SelectKind::TopK,
    },
    // passthrough: the copied tensor is multiplied by it (mergekit's `scale`).
    ParamSpec {
        name: "scale",
        kind: Kind::Float,
        scope: Scope::Input,
        per_tensor: true,
        default: |_| None,
        check: finite_f32,
        methods: |m| m == MethodKind::Passthrough,
    },
    // slerp's interpolation point: 0 gives the base, 1 the model (mergekit requires it).
    ParamSpec {
        name: "t",
        kind: Kind::Float,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| None,
        check: unit_interval,
        methods: |m| m == MethodKind::Slerp,
    },
    // nearswap's distance: the model's value is taken where |model − base| ≤ t.
    ParamSpec {
        name: "t",
        kind: Kind::Float,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| None,
        check: finite_f32,
        methods: |m| m == MethodKind::Nearswap,
    },
    ParamSpec {
        name: "nuslerp_flatten",
        kind: Kind::Bool,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Bool(true)),
        check: any,
        methods: |m| m == MethodKind::Nuslerp,
    },
    ParamSpec {
        name: "nuslerp_row_wise",
        kind: Kind::Bool,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Bool(false)),
        check: any,
        methods: |m| m == MethodKind::Nuslerp,
    },
    ParamSpec {
        name: "normalize_weights",
        kind: Kind::Bool,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Bool(true)),
        check: any,
        methods: |m| m == MethodKind::Multislerp,
    },
    ParamSpec {
        name: "eps",
        kind: Kind::Float,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Num(1e-8)),
        check: finite_f32,
        methods: |m| m == MethodKind::Multislerp,
    },
    ParamSpec {
        name: "max_iter",
        kind: Kind::Int,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Num(10.0)),
        check: iterations,
        methods: |m| m == MethodKind::Karcher,
    },
    ParamSpec {
        name: "tol",
        kind: Kind::Float,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Num(1e-5)),
        check: finite_f32,
        methods: |m| m == MethodKind::Karcher,
    },
    ParamSpec {
        name: "filter_wise",
        kind: Kind::Bool,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| Some(Value::Bool(false)),
        check: any,
        methods: |m| m == MethodKind::ModelStock,
    },
    // stamerge: where a non-float tensor (position ids, …) that differs between the inputs is
    // taken from. mergekit refuses such tensors.
    ParamSpec {
        name: "buffer_source",
        kind: Kind::Model,
        scope: Scope::Shared,
        per_tensor: true,
        default: |_| None,
        check: any,
        methods: |_| true,
    },
];

/// The row of parameter `name` as `method` reads it (a name can have a row per method family:
/// `weight` per model for task vectors and per input for linear, `epsilon` per model for della
/// and shared for ram), else its first row.
pub fn spec(method: MethodKind, name: &str) -> Option<&'static ParamSpec> {
    PARAMS
        .iter()
        .find(|p| p.name == name && (p.methods)(method))
        .or_else(|| PARAMS.iter().find(|p| p.name == name))
}

/// The parameters `method` reads, in table order.
pub fn of(method: MethodKind) -> impl Iterator<Item = &'static ParamSpec> {
    PARAMS.iter().filter(move |p| (p.methods)(method))
}
