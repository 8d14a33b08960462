//! Checks across the inputs that do not fit one tensor's planning: quantized checkpoints,
//! vocabulary sizes, non-float tensors that differ between inputs, and what `dtype:` does
//! compared with mergekit.

use std::collections::BTreeMap;

use super::{Inputs, Item, ItemKind};
use crate::checkpoint::{Checkpoint, SafetensorsFile, TensorEntry};
use crate::dtype::FloatType;
use crate::error::Problem;
use crate::recipe::{Recipe, Resolved};

/// The inputs with the recipe field that names each.
pub fn named_inputs<'a>(recipe: &'a Recipe, inputs: &'a Inputs) -> Vec<(String, &'a Checkpoint)> {
    let mut v = vec![("base_model".to_string(), &inputs.base)];
    if let Some(s) = &inputs.start {
        v.push(("start_model".into(), s));
    }
    for (t, ti) in inputs.tasks.iter().enumerate() {
        v.push((format!("{}.model", recipe.tasks[t].field), &ti.model));
    }
    v
}

fn config_path(ck: &Checkpoint) -> std::path::PathBuf {
    ck.folder
        .as_ref()
        .map(|f| f.join("config.json"))
        .unwrap_or_else(|| ck.root.clone())
}

/// GPTQ, AWQ and bitsandbytes checkpoints store packed integers and scales, not the weights.
pub fn quantized(recipe: &Recipe, inputs: &Inputs, problems: &mut Vec<Problem>) {
    for (field, ck) in named_inputs(recipe, inputs) {
        let Some(cfg) = &ck.config else { continue };
        let q = cfg.get("quantization_config").or_else(|| {
            cfg.get("text_config")
                .and_then(|t| t.get("quantization_config"))
        });
        if let Some(q) = q {
            let how = q
                .get("quant_method")
                .and_then(|m| m.as_str())
                .unwrap_or("unknown method");
            problems.push(Problem::in_file(
                &config_path(ck),
                format!(
                    "`{field}` is a quantized checkpoint (`quantization_config`, {how}): its \
                     tensors are packed integers and scales, which cannot be merged. Merge the \
                     unquantized checkpoints (the float16/bfloat16 release it was made from), then \
                     quantize the merge"
                ),
            ));
        }
    }
}

/// config.json's `vocab_size` of every model against the base's.
pub fn vocab_sizes(recipe: &Recipe, inputs: &Inputs, problems: &mut Vec<Problem>) {
    let Some(a) = inputs.base.vocab_size() else {
        return;
    };
    for (i, t) in inputs.tasks.iter().enumerate() {
        if let Some(b) = t.model.vocab_size() {
            if a != b {
                problems.push(Problem::in_file(
                    &recipe.tasks[i].model.join("config.json"),
                    format!("vocab-size mismatch: vocab_size {b}, the base has {a}"),
                ));
            }
        }
    }
}

/// What makes a non-float tensor of an input differ from the base's, if anything.
fn difference(
    base: (&SafetensorsFile, &TensorEntry),
    other: (&SafetensorsFile, &TensorEntry),
) -> Option<String> {
    let (bf, bt) = base;
    let (of, ot) = other;
    if ot.dtype != bt.dtype {
        Some(format!("{:?} where the base has {:?}", ot.dtype, bt.dtype))
    } else if ot.shape != bt.shape {
        Some(format!(
            "shape {:?} where the base has {:?}",
            ot.shape, bt.shape
        ))
    } else if of.bytes(ot) != bf.bytes(bt) {
        Some("other values than the base's".to_string())
    } else {
        None
    }
}

/// Where a non-float tensor (position ids, masks, counters) comes from: the inputs must agree
/// (dtype, shape and bytes; these tensors are small and read here) unless the recipe's
/// `buffer_source` names the model to take it from. mergekit refuses differing ones outright.
/// Returns the input to copy from, or None after adding a problem.
pub fn buffer_source(
    recipe: &Recipe,
    inputs: &Inputs,
    name: &str,
    tasks: &[Option<String>],
    params: &Resolved,
    problems: &mut Vec<Problem>,
) -> Option<super::CopyFrom> {
    let base = inputs.base.get(name).expect("the caller found it");
    let mut differ = Vec::new();
    if let Some(s) = &inputs.start {
        if let Some(o) = s.get(name) {
            if let Some(d) = difference(base, o) {
                differ.push(format!("start_model has {d}"));
            }
        }
    }
    for (t, n) in tasks.iter().enumerate() {
        let Some(o) = n.as_deref().and_then(|n| inputs.tasks[t].model.get(n)) else {
            continue;
        };
        if let Some(d) = difference(base, o) {
            differ.push(format!(
                "{} (`{}`) has {d}",
                recipe.tasks[t].field, recipe.tasks[t].spelled
            ));
        }
    }
    let from_start = inputs.start.as_ref().is_some_and(|s| s.get(name).is_some());
    let default = if from_start {
        super::CopyFrom::Start
    } else {
        super::CopyFrom::Base
    };
    if differ.is_empty() {
        return Some(default);
    }
    let chosen = params.shared("buffer_source").map(|v| v.str().to_string());
    match chosen.as_deref() {
        None => {
            problems.push(Problem::in_tensor(
                &base.0.path,
                name,
                format!(
                    "non-float tensor that differs between the inputs: {}. Merging cannot \
                     average it; say which model to copy it from with `buffer_source: base` (or a \
                     model path) in `parameters`, or per tensor with a filter list",
                    differ.join("; ")
                ),
            ));
            None
        }
        Some("base") => Some(super::CopyFrom::Base),
        Some(m) => {
            let t = recipe.tasks.iter().position(|t| t.spelled == m);
            match t {
                Some(t) if tasks.get(t).is_some_and(|n| n.is_some()) => {
                    Some(super::CopyFrom::Task(t))
                }
                _ if m == recipe.base_spelled => Some(super::CopyFrom::Base),
                _ => {
                    problems.push(Problem::in_tensor(
                        &base.0.path,
                        name,
                        format!("`buffer_source: {m}` names a model that is not an input of this tensor"),
                    ));
                    None
                }
            }
        }
    }
}

/// torch.promote_types over float16, bfloat16 and float32.
fn promote(a: FloatType, b: FloatType) -> FloatType {
    if a == b {
        a
    } else {
        FloatType::F32
    }
}

/// The plan's account of `dtype:`/`out_dtype:` and warnings where the output dtype differs from
/// the one mergekit would write.
pub fn dtypes(
    recipe: &Recipe,
    inputs: &Inputs,
    items: &[Item],
    notes: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    match (recipe.dtype, recipe.out_dtype) {
        (Some(d), None) => notes.push(format!(
            "dtype: {}: mergekit computes in it; stamerge always computes in float32 (one rounding \
             per operation) and writes {} tensors, as mergekit does without `out_dtype`",
            d.torch_name(),
            d.torch_name()
        )),
        (d, Some(o)) => notes.push(format!(
            "out_dtype: {}: every merged tensor is written as {}{}",
            o.torch_name(),
            o.torch_name(),
            d.map(|d| format!(
                "; dtype: {} (mergekit's compute dtype) changes nothing here: stamerge computes in float32",
                d.torch_name()
            ))
            .unwrap_or_default()
        )),
        (None, None) => {}
    }
    // mergekit without dtype/out_dtype writes the promoted dtype of a tensor's inputs; stamerge
    // the base's.
    let mut promoted: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut cast_copies: Vec<&str> = Vec::new();
    let want = recipe.out_dtype.or(recipe.dtype);
    for it in items {
        match &it.kind {
            ItemKind::Merge { out, .. } if want.is_none() => {
                let ty = |ck: &Checkpoint, n: &str| {
                    ck.get(n)
                        .and_then(|(_, t)| FloatType::from_safetensors(t.dtype))
                };
                let mut mk = it
                    .slot
                    .base
                    .as_deref()
                    .and_then(|n| ty(&inputs.base, n))
                    .unwrap_or(*out);
                for (t, n) in it.slot.tasks.iter().enumerate() {
                    if let Some(d) = n.as_deref().and_then(|n| ty(&inputs.tasks[t].model, n)) {
                        mk = promote(mk, d);
                    }
                }
                if mk != *out {
                    let e = promoted
                        .entry(mk.torch_name().to_string())
                        .or_insert((0, it.name.clone()));
                    e.0 += 1;
                }
            }
            ItemKind::Copy { convert: None, .. }
                if want.is_some()
                    && recipe.method != crate::method::MethodKind::Passthrough
                    && FloatType::from_safetensors(it.out.dtype)
                        .is_some_and(|d| Some(d) != want) =>
            {
                cast_copies.push(&it.name);
            }
            _ => {}
        }
    }
    for (d, (n, first)) in promoted {
        warnings.push(format!(
            "{n} merged tensor(s) are written in the base's dtype, where mergekit would write {d} \
             (their inputs mix dtypes and mergekit promotes them), e.g. `{first}`: set `out_dtype: \
             {d}` to match mergekit"
        ));
    }
    if let (Some(w), Some(first)) = (want, cast_copies.first()) {
        warnings.push(format!(
            "{} float tensor(s) that only the base has are copied in their own dtype, where \
             mergekit would cast them to {}, e.g. `{first}`",
            cast_copies.len(),
            w.torch_name()
        ));
    }
}
