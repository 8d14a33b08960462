//! A parameter's value as a mergekit recipe writes it, and its evaluation for one tensor
//! (mergekit 0.1.5's `config.py::evaluate_setting`):
//!
//! - a scalar: that value everywhere;
//! - a list of scalars (a *gradient*): numbers are interpolated over the position `t ∈ [0, 1]` of
//!   the tensor's layer (`x = t·(m−1)`, linear between the neighbouring entries); a list of
//!   booleans or words picks entry `⌊t·(m−1)⌋`;
//! - a list of `{filter, value}` (or one such mapping): the first entry whose `filter` is absent,
//!   `"*"` or a substring of the tensor's name gives the value (itself a scalar or a gradient);
//!   when none matches the setting says nothing and the next scope is asked.
//!
//! Every scalar is checked against its parameter's kind and range when the recipe is read (the
//! ranges are intervals, so a gradient's interpolations stay inside when its entries do), which
//! makes the per-tensor evaluation infallible.

use serde_yaml_ng::Value as Yaml;

use super::params::{Kind, ParamSpec, Value};

/// A setting as people read it: a value, a per-layer list, or filters (`{self_attn: 0.5; *: 1}`).
impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Setting::Scalar(v) => write!(f, "{v}"),
            Setting::Gradient(vs) => {
                let vs: Vec<String> = vs.iter().map(Value::to_string).collect();
                write!(f, "[{}] over the layers", vs.join(", "))
            }
            Setting::Filters(cs) => {
                let cs: Vec<String> = cs
                    .iter()
                    .map(|c| format!("{}: {}", c.filter.as_deref().unwrap_or("*"), c.value))
                    .collect();
                write!(f, "{{{}}}", cs.join("; "))
            }
        }
    }
}

/// A `{filter, value}` entry of a filter list.
#[derive(Clone, Debug, PartialEq)]
pub struct Conditional {
    pub filter: Option<String>,
    /// A scalar or a gradient (mergekit does not nest filter lists).
    pub value: Setting,
}

/// A parameter's setting in one scope (global, an output slice, a model or a slice source).
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    Scalar(Value),
    /// Empty: says nothing, as in mergekit.
    Gradient(Vec<Value>),
    Filters(Vec<Conditional>),
}

impl Setting {
    /// Parses a YAML value as a setting of `spec`; `field` names it in messages
    /// (`models[1].parameters.density`). Every problem is returned, each with its exact field.
    pub fn parse(v: &Yaml, spec: &ParamSpec, field: &str) -> Result<Self, Vec<(String, String)>> {
        match v {
            Yaml::Sequence(items) if items.iter().any(|i| matches!(i, Yaml::Mapping(_))) => {
                let mut out = Vec::new();
                let mut errs = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match conditional(item, spec, &format!("{field}[{i}]")) {
                        Ok(c) => out.push(c),
                        Err(e) => errs.extend(e),
                    }
                }
                if errs.is_empty() {
                    Ok(Setting::Filters(out))
                } else {
                    Err(errs)
                }
            }
            Yaml::Mapping(_) => conditional(v, spec, field).map(|c| Setting::Filters(vec![c])),
            other => scalar_or_gradient(other, spec, field),
        }
    }

    /// Whether the setting is one value for every tensor.
    pub fn is_scalar(&self) -> bool {
        matches!(self, Setting::Scalar(_))
    }

    /// The value for tensor `name` at layer position `t` (None: this setting says nothing).
    pub fn evaluate(&self, name: &str, t: f64, kind: Kind) -> Option<Value> {
        match self {
            Setting::Scalar(v) => Some(v.clone()),
            Setting::Gradient(vs) if vs.is_empty() => None,
            Setting::Gradient(vs) => Some(gradient(vs, t, kind)),
            Setting::Filters(cs) => cs
                .iter()
                .find(|c| match c.filter.as_deref() {
                    None | Some("*") => true,
                    // mergekit: `tensor_name and cond.filter in tensor_name`.
                    Some(f) => !name.is_empty() && name.contains(f),
                })
                .and_then(|c| c.value.evaluate(name, t, kind)),
        }
    }

    /// Every scalar of the setting with its field (for checks and messages).
    pub fn scalars(&self, field: &str) -> Vec<(String, Value)> {
        match self {
            Setting::Scalar(v) => vec![(field.to_string(), v.clone())],
            Setting::Gradient(vs) => vs
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{field}[{i}]"), v.clone()))
                .collect(),
            Setting::Filters(cs) => cs
                .iter()
                .enumerate()
                .flat_map(|(i, c)| c.value.scalars(&format!("{field}[{i}].value")))
                .collect(),
        }
    }
}

/// mergekit's interpolation, operation for operation in f64 (Python floats), so that the
/// resolved values are the same numbers: `scaled = t·(m−1)`, `i0 = ⌊scaled⌋`,
/// `i1 = min(m−1, i0+1)`, `frac = scaled − i0`, `(1−frac)·v[i0] + frac·v[i1]`.
fn gradient(vs: &[Value], t: f64, kind: Kind) -> Value {
    let m = vs.len();
    let scaled = t * (m - 1) as f64;
    if !kind.is_numeric() {
        return vs[(scaled as usize).min(m - 1)].clone();
    }
    let i0 = (scaled as usize).min(m - 1);
    let i1 = (i0 + 1).min(m - 1);
    let frac = scaled - i0 as f64;
    Value::Num((1.0 - frac) * vs[i0].num() + frac * vs[i1].num())
}

fn conditional(
    v: &Yaml,
    spec: &ParamSpec,
    field: &str,
) -> Result<Conditional, Vec<(String, String)>> {
    let Yaml::Mapping(m) = v else {
        return Err(vec![(
            field.to_string(),
            "a filter list holds only `{filter: ..., value: ...}` entries".into(),
        )]);
    };
    let mut errs = Vec::new();
    for k in m.keys() {
        match k.as_str() {
            Some("filter" | "value") => {}
            _ => errs.push((
                field.to_string(),
                format!(
                    "unknown key `{}` in a filter entry (it has `filter` and `value`)",
                    yaml_text(k)
                ),
            )),
        }
    }
    let filter = match m.get("filter") {
        None | Some(Yaml::Null) => None,
        Some(Yaml::String(s)) => Some(s.clone()),
        Some(other) => {
            errs.push((
                format!("{field}.filter"),
                format!(
                    "a filter is a piece of a tensor name, got {}",
                    yaml_text(other)
                ),
            ));
            None
        }
    };
    let value = match m.get("value") {
        None => {
            errs.push((
                field.to_string(),
                "a filter entry needs a `value`".to_string(),
            ));
            None
        }
        Some(Yaml::Sequence(s)) if s.iter().any(|i| matches!(i, Yaml::Mapping(_))) => {
            errs.push((
                format!("{field}.value"),
                "filter lists do not nest (as in mergekit): give a value or a list of values"
                    .into(),
            ));
            None
        }
        Some(Yaml::Mapping(_)) => {
            errs.push((
                format!("{field}.value"),
                "filter lists do not nest (as in mergekit): give a value or a list of values"
                    .into(),
            ));
            None
        }
        Some(v) => match scalar_or_gradient(v, spec, &format!("{field}.value")) {
            Ok(s) => Some(s),
            Err(e) => {
                errs.extend(e);
                None
            }
        },
    };
    match value {
        Some(value) if errs.is_empty() => Ok(Conditional { filter, value }),
        _ => Err(errs),
    }
}

fn scalar_or_gradient(
    v: &Yaml,
    spec: &ParamSpec,
    field: &str,
) -> Result<Setting, Vec<(String, String)>> {
    match v {
        Yaml::Sequence(items) => {
            let mut out = Vec::new();
            let mut errs = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let f = format!("{field}[{i}]");
                match scalar(item, spec) {
                    Ok(x) => out.push(x),
                    Err(e) => errs.push((f, e)),
                }
            }
            if errs.is_empty() {
                Ok(Setting::Gradient(out))
            } else {
                Err(errs)
            }
        }
        other => scalar(other, spec)
            .map(Setting::Scalar)
            .map_err(|e| vec![(field.to_string(), e)]),
    }
}

/// One scalar converted to the parameter's kind as mergekit's validation does: numbers (also
/// written as strings, `"1e-3"`) for numeric parameters, `true`/`false` (and pydantic's `yes`,
/// `on`, `1`, …) for booleans, the listed words for choices. The range is checked here too.
fn scalar(v: &Yaml, spec: &ParamSpec) -> Result<Value, String> {
    let bad = || {
        format!(
            "`{}` takes {}, got {}",
            spec.name,
            spec.kind.describe(),
            yaml_text(v)
        )
    };
    let value = match (spec.kind, v) {
        (Kind::Float | Kind::Int, Yaml::Number(n)) => Value::Num(n.as_f64().ok_or_else(bad)?),
        (Kind::Float | Kind::Int, Yaml::String(s)) => {
            Value::Num(s.trim().parse::<f64>().map_err(|_| bad())?)
        }
        (Kind::Bool, Yaml::Bool(b)) => Value::Bool(*b),
        (Kind::Bool, Yaml::Number(n)) => match n.as_f64() {
            Some(0.0) => Value::Bool(false),
            Some(1.0) => Value::Bool(true),
            _ => return Err(bad()),
        },
        (Kind::Bool, Yaml::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "t" | "y" | "1" => Value::Bool(true),
            "false" | "no" | "off" | "f" | "n" | "0" => Value::Bool(false),
            _ => return Err(bad()),
        },
        (Kind::Choice(words), Yaml::String(s)) if words.contains(&s.as_str()) => {
            Value::Str(s.clone())
        }
        (Kind::Model, Yaml::String(s)) => Value::Str(s.clone()),
        _ => return Err(bad()),
    };
    if spec.kind == Kind::Int && value.num().fract() != 0.0 {
        return Err(format!(
            "`{}` takes a whole number, got {}",
            spec.name,
            yaml_text(v)
        ));
    }
    (spec.check)(&value).map_err(|e| format!("`{}` {e}, got {}", spec.name, yaml_text(v)))?;
    Ok(value)
}

/// A YAML value as the recipe would show it, for messages.
pub fn yaml_text(v: &Yaml) -> String {
    match v {
        Yaml::Null => "nothing".into(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Number(n) => n.to_string(),
        Yaml::String(s) => format!("\"{s}\""),
        other => serde_yaml_ng::to_string(other)
            .map(|s| s.trim().replace('\n', " "))
            .unwrap_or_else(|_| "?".into()),
    }
}
