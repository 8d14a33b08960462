//! Planning one output tensor of an interpolating method (method/interp.rs): its inputs in
//! mergekit's order, the checks on them (float dtype, equal shapes), the parameters it cannot
//! do without, and its work (`work::interp_work`). Non-float tensors are copied as in the other
//! methods; a tensor that only one input has is copied from it (mergekit's passthrough of a
//! singleton).

use super::{
    check_float, check_same_shape, checks, copy_item, work, CopyFrom, Inputs, Item, ItemKind, Slot,
    Tally, OUT_BUFFERS_IN_FLIGHT,
};
use crate::checkpoint::writer::OutTensor;
use crate::checkpoint::{Checkpoint, SafetensorsFile, TensorEntry};
use crate::dtype::{is_unsupported_float, FloatType};
use crate::error::Problem;
use crate::method::interp::Operand;
use crate::method::{BasePolicy, MethodKind};
use crate::recipe::{InputRef, Recipe, Site};

/// The inputs of `slot` in mergekit's order: a `models:` recipe's order, or the slice's sources.
fn order(recipe: &Recipe, slot: &Slot) -> Vec<Operand> {
    let listed: Vec<InputRef> = match slot.slice.and_then(|s| recipe.slices.get(s)) {
        Some(s) => s.sources.iter().map(|x| x.input).collect(),
        None => recipe.order.clone(),
    };
    listed
        .into_iter()
        .filter(|i| match *i {
            InputRef::Base => !recipe.baseless && slot.base.is_some(),
            InputRef::Task(t) => slot.tasks[t].is_some(),
        })
        .map(|i| match i {
            InputRef::Base => Operand::Base,
            InputRef::Task(t) => Operand::Task(t),
        })
        .collect()
}

fn entry<'a>(
    inputs: &'a Inputs,
    slot: &Slot,
    o: Operand,
) -> Option<(&'a Checkpoint, &'a SafetensorsFile, &'a TensorEntry)> {
    let (ck, name) = match o {
        Operand::Base => (&inputs.base, slot.base.as_deref()?),
        Operand::Task(t) => (&inputs.tasks[t].model, slot.tasks[t].as_deref()?),
    };
    let (f, e) = ck.get(name)?;
    Some((ck, f, e))
}

fn copy_from(o: Operand) -> CopyFrom {
    match o {
        Operand::Base => CopyFrom::Base,
        Operand::Task(t) => CopyFrom::Task(t),
    }
}

/// A tensor of an interpolating method: merged from its inputs, or copied.
pub(super) fn item(
    recipe: &Recipe,
    inputs: &Inputs,
    slot: Slot,
    tally: &mut Tally,
    problems: &mut Vec<Problem>,
) -> Option<Item> {
    let method = recipe.method;
    let all = order(recipe, &slot);
    let site = Site {
        base: if recipe.baseless {
            None
        } else {
            slot.base.as_deref()
        },
        ..slot.site()
    };
    let params = recipe.resolve(&site);
    let mut present = Vec::new();
    let mut missing = Vec::new();
    for &o in &all {
        match entry(inputs, &slot, o) {
            Some(x) => present.push((o, x)),
            None => missing.push(o),
        }
    }
    // A tensor that only the first input has (the base, or the first model without one) is
    // copied from it, as the task-vector methods copy tensors only the base has; a tensor that
    // some models have and others lack is an error.
    let lead = |o: Operand| o == Operand::Base || (recipe.baseless && Some(&o) == all.first());
    let copied_from_lead = present.len() == 1 && lead(present[0].0);
    if !missing.is_empty() && !copied_from_lead {
        for o in missing {
            let path = match o {
                Operand::Base => &recipe.base,
                Operand::Task(t) => &recipe.tasks[t].model,
            };
            problems.push(Problem::in_tensor(
                path,
                &slot.name,
                "missing tensor: the other inputs have it, this model does not",
            ));
        }
        return None;
    }
    let (first, (first_ck, first_f, first_e)) = *present.first()?;
    let own = FloatType::from_safetensors(first_e.dtype);
    if own.is_none() && !is_unsupported_float(first_e.dtype) {
        // A non-float buffer: the inputs must agree, or `buffer_source` says which to copy.
        let from = match slot.base.as_deref() {
            Some(b) => checks::buffer_source(recipe, inputs, b, &slot.tasks, &params, problems)?,
            None => {
                let differs = present.iter().any(|(_, (_, f, e))| {
                    e.dtype != first_e.dtype
                        || e.shape != first_e.shape
                        || f.bytes(e) != first_f.bytes(first_e)
                });
                if differs {
                    problems.push(Problem::in_tensor(
                        &first_f.path,
                        &slot.name,
                        "non-float tensor that differs between the inputs of this slice: merging \
                         cannot average it",
                    ));
                    return None;
                }
                copy_from(first)
            }
        };
        let (ck, name) = match from {
            CopyFrom::Base => (&inputs.base, slot.base.clone()?),
            CopyFrom::Task(t) => (&inputs.tasks[t].model, slot.tasks[t].clone()?),
            CopyFrom::Start => return None,
        };
        return Some(copy_item(slot, params, from, ck, &name, None));
    }
    if present.len() == 1 {
        let name = first_e.name.clone();
        return Some(copy_item(
            slot,
            params,
            copy_from(first),
            first_ck,
            &name,
            None,
        ));
    }
    let mut ok = true;
    for (_, (_, f, e)) in &present {
        ok &= check_float(f, e, problems).is_some();
        ok &= check_same_shape(first_e, f, e, "this model", problems);
    }
    if !ok {
        return None;
    }
    // The base is the base for the methods that have one; linear and karcher weigh it as one
    // more input.
    let uses_base = method.contract().base != BasePolicy::Ignored && all.contains(&Operand::Base);
    let operands: Vec<Operand> = all
        .iter()
        .copied()
        .filter(|o| !(uses_base && *o == Operand::Base))
        .collect();
    if matches!(method, MethodKind::Slerp | MethodKind::Nearswap) && params.shared("t").is_none() {
        tally.missing_t.push(slot.name.clone());
        return None;
    }
    let out = recipe
        .out_dtype
        .or(recipe.dtype)
        .unwrap_or_else(|| own.expect("checked float"));
    let shape = first_e.shape.clone();
    let n: usize = shape.iter().product();
    let work = work::interp_work(recipe, &params, &operands, uses_base, &shape, out);
    let spec = work.fuse.interp.as_ref().expect("interp work");
    if let crate::method::Interp::Linear { normalize: true } = spec.rule {
        if spec.weights.iter().fold(0f32, |a, w| a + w) == 0.0 {
            problems.push(Problem::in_tensor(
                &recipe.base,
                &slot.name,
                "linear with `normalize: true` divides by the sum of the weights, which is 0 \
                 here: change the weights or set `normalize: false`",
            ));
            return None;
        }
    }
    let nbytes = (n * out.size()) as u64;
    // Karcher keeps its mean and tangent, arcee_fusion the importances' keys.
    let scratch = match method {
        MethodKind::Karcher => 8 * n as u64,
        MethodKind::ArceeFusion => 4 * n as u64,
        _ => 0,
    };
    tally.est.peak_bytes = tally
        .est
        .peak_bytes
        .max(nbytes * OUT_BUFFERS_IN_FLIGHT + scratch);
    let read = present.iter().map(|(_, (_, _, e))| e.nbytes() as u64).sum();
    Some(Item {
        name: slot.name.clone(),
        shape: shape.clone(),
        kind: ItemKind::Merge { n, out, work },
        out: OutTensor {
            name: slot.name.clone(),
            dtype: out.to_safetensors(),
            shape,
            nbytes,
        },
        read_bytes: read,
        slot,
        params,
    })
}
