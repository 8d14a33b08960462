//! The inputs of the interpolating methods (method/interp.rs), checked on the recipe alone as
//! mergekit's `InputContract` checks them: how many models each `models:` recipe or slice gives
//! the method, and the parameters it cannot do without. Every problem names its field and line.

use super::read::Reader;
use super::{InputRef, Params, SliceSpec};
use crate::method::BasePolicy;

fn models(n: usize) -> String {
    match n {
        1 => "1 model".into(),
        n => format!("{n} models"),
    }
}

/// What the method takes, in words: "exactly 2 inputs, the base and one model".
fn expectation(method: crate::method::MethodKind) -> String {
    let c = method.contract();
    let base = match c.base {
        BasePolicy::Required => "the base and ",
        _ => "",
    };
    match (c.min_non_base, c.max_non_base, c.min_inputs, c.max_inputs) {
        (a, Some(b), _, _) if a == b && a > 0 => {
            format!("exactly {} besides the base (when there is one)", models(a))
        }
        (a, None, _, _) if a > 0 => format!("at least {} besides the base", models(a)),
        (_, _, a, Some(b)) if a == b => format!(
            "exactly {a} inputs, {base}{}",
            models(a - (c.base == BasePolicy::Required) as usize)
        ),
        (_, _, a, _) => format!(
            "at least {a} inputs, {base}{} or more",
            models(a - (c.base == BasePolicy::Required) as usize)
        ),
    }
}

/// One group of inputs (a `models:` recipe, or one slice) against the method's contract.
fn count(rd: &mut Reader, field: &str, inputs: &[InputRef]) {
    let c = rd.method.contract();
    let has_base = c.base != BasePolicy::Ignored && inputs.contains(&InputRef::Base);
    let n = inputs.len();
    let non_base = n - has_base as usize;
    let ok = n >= c.min_inputs
        && c.max_inputs.is_none_or(|m| n <= m)
        && non_base >= c.min_non_base
        && c.max_non_base.is_none_or(|m| non_base <= m);
    if !ok {
        let got = if has_base {
            format!("the base and {}", models(non_base))
        } else {
            models(non_base)
        };
        rd.problem(
            field,
            format!(
                "{} takes {} (mergekit's limit too); this has {got}",
                rd.method.name(),
                expectation(rd.method)
            ),
        );
    }
}

/// The contract of an interpolating method over `order` (a `models:` recipe) or each slice, and
/// its required parameters. `base_given`: the recipe names `base_model`; `writes_t`: the recipe
/// writes `t` where every tensor can find it (a bad value is reported where it is written).
pub fn check(
    rd: &mut Reader,
    global: &Params,
    base_params: &Params,
    order: &[InputRef],
    slices: &[SliceSpec],
    base_given: bool,
    writes_t: bool,
) {
    let method = rd.method;
    if slices.is_empty() {
        if !order.is_empty() {
            count(rd, "models", order);
        }
    } else {
        for s in slices {
            let inputs: Vec<InputRef> = s.sources.iter().map(|x| x.input).collect();
            count(rd, &format!("{}.sources", s.field), &inputs);
        }
    }
    // `t` has no default: every tensor needs a value, from the top level or its slice.
    let needs_t = matches!(
        method,
        crate::method::MethodKind::Slerp | crate::method::MethodKind::Nearswap
    );
    if needs_t && !writes_t {
        let what = if method == crate::method::MethodKind::Slerp {
            "the interpolation point, 0 for the base and 1 for the model"
        } else {
            "the distance below which the model's value is taken"
        };
        rd.problem(
            "parameters",
            format!(
                "{} needs `t` ({what}): set it in the top-level `parameters`{} (mergekit requires \
                 it too)",
                method.name(),
                if slices.is_empty() {
                    ""
                } else {
                    " or in every slice's"
                }
            ),
        );
    }
    if method == crate::method::MethodKind::Linear
        && base_given
        && order.contains(&InputRef::Base)
        && base_params.get("weight").is_none()
        && global.get("weight").is_none()
    {
        rd.note(
            "`base_model` is an input of linear too (mergekit adds it to the models): weight 1, \
             the default; mergekit would ask for a weight for it"
                .into(),
        );
    }
}
