//! Per-tensor parameter values: the scopes a recipe sets parameters in, in mergekit's order of
//! precedence, and the values of every parameter a method reads for one output tensor.
//!
//! Precedence (mergekit 0.1.5 `ConfigReader.parameter_sources`), highest first:
//! - a per-model parameter: the output slice's sources of that model (`slices[i].sources[j]
//!   .parameters`, or the model's own `models[j].parameters`), the output slice's
//!   `parameters`, the top-level `parameters`, the table's default;
//! - a shared parameter: the output slice's `parameters`, the top-level `parameters`, the default.
//!
//! A scope that sets the parameter but says nothing for this tensor (no filter matches, an empty
//! list) passes to the next one.

use super::params::Value;
use super::params::{self, ParamSpec, Scope};
use super::setting::Setting;
use super::{InputRef, Recipe};

/// One parameter as one scope sets it.
#[derive(Clone, Debug)]
pub struct Param {
    pub spec: &'static ParamSpec,
    pub setting: Setting,
    /// Where the recipe sets it: `models[0].parameters.density`.
    pub field: String,
}

/// The parameters one scope sets.
#[derive(Clone, Debug, Default)]
pub struct Params(pub Vec<Param>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.0.iter().find(|p| p.spec.name == name)
    }

    /// The value when the scope sets the parameter as one scalar.
    pub fn scalar(&self, name: &str) -> Option<&Value> {
        match self.get(name).map(|p| &p.setting) {
            Some(Setting::Scalar(v)) => Some(v),
            _ => None,
        }
    }
}

/// Where an output tensor sits, as resolution needs it.
#[derive(Clone, Copy, Debug)]
pub struct Site<'a> {
    /// The output tensor's name: shared parameters' filters match it.
    pub name: &'a str,
    /// The position of its layer, in [0, 1] (mergekit's `t`): gradients interpolate over it.
    pub t: f64,
    /// The output slice it belongs to (`slices:` recipes).
    pub slice: Option<usize>,
    /// The tensor's name in the base, or None when the base is not an input of this tensor.
    pub base: Option<&'a str>,
    /// Per task: the tensor's name in that task's model (per-model filters match it, as mergekit
    /// matches the input's name), or None when the task is not an input of this tensor.
    pub inputs: &'a [Option<String>],
}

/// A parameter's value for one tensor (None: unset and no default).
pub type Values = Vec<(&'static str, Option<Value>)>;

/// The values of every parameter a method reads, for one output tensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolved {
    /// Shared parameters, in table order.
    pub shared: Values,
    /// Per task: its per-model and per-input parameters, None for a task that is not an input
    /// of the tensor.
    pub tasks: Vec<Option<Values>>,
    /// The base's per-input parameters (`Scope::Input`), when the base is an input.
    pub base: Option<Values>,
}

fn find<'v>(vs: &'v Values, name: &str) -> Option<&'v Value> {
    vs.iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.as_ref())
}

impl Resolved {
    /// A shared parameter's value.
    pub fn shared(&self, name: &str) -> Option<&Value> {
        find(&self.shared, name)
    }

    /// Task `t`'s value of a per-model parameter (None for an absent task or an unset value).
    pub fn task(&self, t: usize, name: &str) -> Option<&Value> {
        self.tasks.get(t)?.as_ref().and_then(|vs| find(vs, name))
    }

    /// A shared number that has a default (the table guarantees it).
    pub fn num(&self, name: &str) -> f64 {
        self.shared(name).map(Value::num).unwrap_or(f64::NAN)
    }

    pub fn flag(&self, name: &str) -> bool {
        self.shared(name).is_some_and(Value::bool)
    }

    /// Task `t`'s number of a parameter that has a default.
    pub fn task_num(&self, t: usize, name: &str) -> f64 {
        self.task(t, name).map(Value::num).unwrap_or(f64::NAN)
    }

    /// The base's value of a per-input parameter.
    pub fn base(&self, name: &str) -> Option<&Value> {
        self.base.as_ref().and_then(|vs| find(vs, name))
    }

    /// Whether task `t` is an input of this tensor.
    pub fn has_task(&self, t: usize) -> bool {
        self.tasks.get(t).is_some_and(Option::is_some)
    }
}

fn evaluate(
    spec: &'static ParamSpec,
    scopes: &[&Params],
    name: &str,
    t: f64,
    method: crate::method::MethodKind,
) -> Option<Value> {
    scopes
        .iter()
        .filter_map(|s| s.get(spec.name))
        .find_map(|p| p.setting.evaluate(name, t, spec.kind))
        .or_else(|| (spec.default)(method))
}

impl Recipe {
    /// The scopes of task `t`'s per-model parameters in output slice `slice`, highest first
    /// (without the top level).
    fn input_scopes(&self, input: InputRef, slice: Option<usize>) -> Vec<&Params> {
        match slice.and_then(|s| self.slices.get(s)) {
            Some(s) => s
                .sources
                .iter()
                .filter(|src| src.input == input)
                .map(|src| &src.params)
                .chain(std::iter::once(&s.params))
                .collect(),
            None => match input {
                InputRef::Task(t) => vec![&self.tasks[t].params],
                InputRef::Base => vec![&self.base_params],
            },
        }
    }

    /// The values of every parameter this recipe's method reads, for the tensor at `at`.
    pub fn resolve(&self, at: &Site) -> Resolved {
        let slice = at.slice.and_then(|s| self.slices.get(s)).map(|s| &s.params);
        let mut shared_scopes: Vec<&Params> = slice.into_iter().collect();
        shared_scopes.push(&self.params);
        let ps: Vec<&'static ParamSpec> = params::of(self.method).collect();
        let shared = ps
            .iter()
            .filter(|p| p.scope == Scope::Shared)
            .map(|p| {
                (
                    p.name,
                    evaluate(p, &shared_scopes, at.name, at.t, self.method),
                )
            })
            .collect();
        let per_input = |input: InputRef, name: &str, base: bool| -> Values {
            let mut scopes = self.input_scopes(input, at.slice);
            scopes.push(&self.params);
            ps.iter()
                .filter(|p| p.scope == Scope::Input || (!base && p.scope == Scope::PerModel))
                .map(|p| (p.name, evaluate(p, &scopes, name, at.t, self.method)))
                .collect()
        };
        let tasks = (0..self.tasks.len())
            .map(|t| {
                let name = at.inputs.get(t)?.as_deref()?;
                Some(per_input(InputRef::Task(t), name, false))
            })
            .collect();
        let base = at.base.map(|name| per_input(InputRef::Base, name, true));
        Resolved {
            shared,
            tasks,
            base,
        }
    }

    /// The setting that gives task `t`'s value of per-model parameter `name` at `at` (None: the
    /// default), for messages that name the field.
    pub(super) fn source_of(&self, at: &Site, t: usize, name: &str) -> Option<&Param> {
        let input = at.inputs.get(t)?.as_deref()?;
        let mut scopes = self.input_scopes(InputRef::Task(t), at.slice);
        scopes.push(&self.params);
        scopes
            .into_iter()
            .filter_map(|s| s.get(name))
            .find(|p| p.setting.evaluate(input, at.t, p.spec.kind).is_some())
    }

    /// Every setting of parameter `name` that can apply to task `t` (its own scopes and the top
    /// level), for checks that need one value for the whole model.
    pub fn settings_of(&self, t: usize, name: &str) -> Vec<&Param> {
        let mut scopes: Vec<&Params> = if self.slices.is_empty() {
            vec![&self.tasks[t].params]
        } else {
            (0..self.slices.len())
                .flat_map(|s| self.input_scopes(InputRef::Task(t), Some(s)))
                .collect()
        };
        scopes.push(&self.params);
        scopes.into_iter().filter_map(|s| s.get(name)).collect()
    }
}

impl Setting {
    /// Whether the value can change from layer to layer (a gradient of two or more entries).
    pub fn per_layer(&self) -> bool {
        match self {
            Setting::Gradient(v) => v.len() > 1,
            Setting::Filters(cs) => cs.iter().any(|c| c.value.per_layer()),
            Setting::Scalar(_) => false,
        }
    }
}

impl Recipe {
    /// Every scope the recipe sets parameters in.
    pub fn scopes(&self) -> impl Iterator<Item = &Params> {
        std::iter::once(&self.params)
            .chain(std::iter::once(&self.base_params))
            .chain(self.tasks.iter().map(|t| &t.params))
            .chain(self.slices.iter().flat_map(|s| {
                std::iter::once(&s.params).chain(s.sources.iter().map(|x| &x.params))
            }))
    }

    /// Whether some value changes over the layers (then the layer count matters).
    pub fn per_layer(&self) -> bool {
        self.scopes()
            .flat_map(|s| s.0.iter())
            .any(|p| p.setting.per_layer())
    }
}

/// Every parameter the method reads in `scopes` (most specific first), as the merge takes it
/// where it is one value for the whole model: the first scope's setting, else the table's
/// default. `shared`: the per-tensor parameters (mergekit's SHARED), else the per-model ones.
/// Parameters with neither a setting nor a default are left out. For summaries (the model card,
/// the Python plan); the per-tensor values are [`Recipe::resolve`]'s.
fn effective(
    method: crate::method::MethodKind,
    scopes: &[&Params],
    shared: bool,
) -> Vec<(&'static str, String)> {
    params::PARAMS
        .iter()
        .filter(|spec| (spec.methods)(method) && (spec.scope == Scope::Shared) == shared)
        .filter_map(|spec| {
            let text = match scopes.iter().find_map(|ps| ps.get(spec.name)) {
                Some(p) => p.setting.to_string(),
                None => (spec.default)(method)?.to_string(),
            };
            Some((spec.name, text))
        })
        .collect()
}

impl Recipe {
    /// Task `t`'s per-model parameters as the recipe sets them (its own, else the top level's,
    /// else the default).
    pub fn task_parameters(&self, t: usize) -> Vec<(&'static str, String)> {
        effective(self.method, &[&self.tasks[t].params, &self.params], false)
    }

    /// The shared parameters as the top level sets them, else their defaults.
    pub fn shared_parameters(&self) -> Vec<(&'static str, String)> {
        effective(self.method, &[&self.params], true)
    }
}
