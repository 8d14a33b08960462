//! Values that cannot be merged, and the messages that say where they are: a NaN or an Inf in an
//! input, and finite inputs whose result the arithmetic made infinite (a task vector or a score
//! past float32's range, a merged value past the output dtype's). A backend reports the element
//! where it saw the fault; the message is built here from the inputs themselves at that element,
//! the same way for every backend, so that an Inf reads as Inf (not as the NaN that Inf − Inf
//! makes) in the file that holds it, and an overflow is never blamed on one input file.

use std::path::PathBuf;

use crate::backend::{BackendError, Source};
use crate::checkpoint::Checkpoint;
use crate::dtype::FloatType;
use crate::error::{Error, Problem};
use crate::plan::Plan;

/// "flat index 5 (element [1, 2])".
fn element(index: usize, shape: &[usize]) -> String {
    let mut coords = Vec::new();
    let mut rest = index;
    for &d in shape.iter().rev() {
        coords.push(rest % d.max(1));
        rest /= d.max(1);
    }
    coords.reverse();
    format!("flat index {index} (element {coords:?})")
}

/// The input value of `name` at `index` in `ck`, with the file holding it.
fn value(ck: &Checkpoint, name: &str, index: usize) -> Option<(PathBuf, f32)> {
    let (f, t) = ck.get(name)?;
    let ty = FloatType::from_safetensors(t.dtype)?;
    (index < t.numel()).then(|| (f.path.clone(), crate::dtype::get(ty, f.bytes(t), index)))
}

fn describe(v: f32) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "+Inf"
    } else {
        "-Inf"
    }
}

const HINT: &str =
    " (set `nonfinite_scores: zero` in the recipe's parameters to treat such scores as 0)";

/// Turns a backend's value fault into a problem naming the file, the tensor and the element.
pub fn fault_problem(plan: &Plan, name: &str, shape: &[usize], e: BackendError) -> Error {
    let f = match e {
        BackendError::Fault(f) => f,
        BackendError::Device(m) => {
            return Error::Other(format!("backend failed on tensor `{name}`: {m}"))
        }
    };
    let i = f.index as usize;
    let at = element(i, shape);
    let inputs = &plan.inputs;
    let tasks: Vec<usize> = match f.source {
        Source::Theta(t) | Source::Grad(t) | Source::Score(t) => vec![t],
        Source::Base | Source::Start => (0..inputs.tasks.len()).collect(),
    };
    // The first input holding a non-finite value: the base, the start model, then each task's
    // model and statistic.
    let mut looked: Vec<(&Checkpoint, bool)> = vec![(&inputs.base, false)];
    looked.extend(inputs.start.iter().map(|s| (s, false)));
    for &t in &tasks {
        looked.push((&inputs.tasks[t].model, false));
        looked.extend(inputs.tasks[t].grads.iter().map(|g| (g, true)));
    }
    for (ck, is_grad) in looked {
        if let Some((path, v)) = value(ck, name, i) {
            if !v.is_finite() {
                let msg = if is_grad {
                    format!("{} in the gradient statistic at {at}{HINT}", describe(v))
                } else {
                    format!("{} at {at}", describe(v))
                };
                return Error::Input(Problem::in_tensor(&path, name, msg));
            }
        }
    }
    // Every input there is finite: the arithmetic overflowed.
    let Some(&t) = tasks.first() else {
        return Error::Other(format!("tensor `{name}`: a non-finite value at {at}"));
    };
    let task = &inputs.tasks[t];
    let base = value(&inputs.base, name, i);
    let theta = value(&task.model, name, i);
    let grad = task.grads.as_ref().and_then(|g| value(g, name, i));
    match (f.source, theta) {
        (Source::Score(_), Some((path, th))) => {
            let (path, g) = grad.map_or((path, None), |(p, g)| (p, Some(g)));
            let g = g
                .map(|g| format!(", the gradient statistic {g:e}"))
                .unwrap_or_default();
            Error::Input(Problem::in_tensor(
                &path,
                name,
                format!(
                    "the score overflows float32 at {at}: the model has {th:e}{g}, every input \
                     finite{HINT}"
                ),
            ))
        }
        (_, Some((path, th))) => {
            let b = base.map(|(_, b)| format!("{b:e}")).unwrap_or_default();
            Error::Input(Problem::in_tensor(
                &path,
                name,
                format!(
                    "the task vector (this model - the base) overflows float32 at {at}: this \
                     model has {th:e}, the base {b}, both finite; the merge cannot represent \
                     the difference"
                ),
            ))
        }
        (_, None) => Error::Other(format!("tensor `{name}`: a non-finite value at {at}")),
    }
}

/// The first element of a merged tensor's output that is not finite, if any (exponent bits all
/// set: Inf or NaN). Inlined so that the pipeline's scan, next to the checksum, runs in its AVX2
/// copy (`crate::simd`).
#[inline(always)]
pub fn first_nonfinite(ty: FloatType, bytes: &[u8]) -> Option<usize> {
    #[inline(always)]
    fn find<const N: usize>(bytes: &[u8], mask: u32) -> Option<usize> {
        let bad = |c: &[u8]| {
            let mut w = [0u8; 4];
            w[..N].copy_from_slice(c);
            u32::from_le_bytes(w) & mask == mask
        };
        // A fold without early exit vectorises; the rare bad tensor is then searched again.
        if !bytes.chunks_exact(N).fold(false, |any, c| any | bad(c)) {
            return None;
        }
        bytes.chunks_exact(N).position(bad)
    }
    match ty {
        FloatType::F32 => find::<4>(bytes, 0x7f80_0000),
        FloatType::F16 => find::<2>(bytes, 0x7c00),
        FloatType::BF16 => find::<2>(bytes, 0x7f80),
    }
}

/// Decision (README "Decisions"): finite inputs whose merged value does not fit the output dtype
/// are an error, never an Inf saved into a model. Names the tensor, the element and the inputs
/// there.
pub fn overflow_problem(
    plan: &Plan,
    name: &str,
    shape: &[usize],
    ty: FloatType,
    index: usize,
) -> Error {
    let inputs = &plan.inputs;
    let mut there: Vec<String> = Vec::new();
    if let Some((_, b)) = value(&inputs.base, name, index) {
        there.push(format!("the base {b:e}"));
    }
    if let Some(s) = inputs.start.as_ref().and_then(|s| value(s, name, index)) {
        there.push(format!("start_model {:e}", s.1));
    }
    for (t, task) in inputs.tasks.iter().enumerate().take(8) {
        if let Some((_, v)) = value(&task.model, name, index) {
            there.push(format!("{} {v:e}", plan.recipe.tasks[t].field));
        }
    }
    let (range, fix) = match ty {
        FloatType::F16 => (
            "float16 (largest 65504)",
            "choose a wider output dtype (`dtype: bfloat16` or `float32`), or lower the weights or `lambda`",
        ),
        FloatType::BF16 => ("bfloat16 (largest 3.4e38)", "lower the weights or `lambda`"),
        FloatType::F32 => ("float32 (largest 3.4e38)", "lower the weights or `lambda`"),
    };
    Error::Input(Problem {
        file: None,
        tensor: Some(name.to_string()),
        message: format!(
            "the merged value at {} overflows {range} though every input there is finite ({}): \
             the output was not kept; {fix}",
            element(index, shape),
            there.join(", ")
        ),
    })
}
