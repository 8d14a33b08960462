//! Header-only checks across every input, and the work list the pipeline executes. Nothing here
//! reads tensor data (but the few bytes of non-float tensors, which must agree between inputs): a
//! plan that fails costs seconds, not the hour a merge would.

mod checks;
mod interp;
pub mod layers;
pub mod layout;
pub mod show;
pub mod side;
pub mod work;

use std::collections::HashSet;
use std::path::PathBuf;

use crate::backend::{Group, Raw, TaskInput};
use crate::checkpoint::writer::OutTensor;
use crate::checkpoint::{Checkpoint, SafetensorsFile, TensorEntry};
use crate::dtype::{is_unsupported_float, FloatType};
use crate::error::{Error, Problem, Result};
use crate::method::MethodKind;
use crate::recipe::{InputRef, MissingGradients, Recipe, Resolved};
pub use layout::Slot;
pub use side::SidePlan;
pub use work::{MaskPlan, ModelCut, TensorWork};

pub struct TaskInputs {
    pub model: Checkpoint,
    pub grads: Option<Checkpoint>,
}

pub struct Inputs {
    pub base: Checkpoint,
    pub start: Option<Checkpoint>,
    pub tasks: Vec<TaskInputs>,
}

impl Inputs {
    /// Every input checkpoint: base, start, then each task's model and statistic.
    pub fn checkpoints(&self) -> impl Iterator<Item = &Checkpoint> {
        std::iter::once(&self.base).chain(self.start.iter()).chain(
            self.tasks
                .iter()
                .flat_map(|t| std::iter::once(&t.model).chain(t.grads.iter())),
        )
    }

    fn files(&self) -> impl Iterator<Item = &SafetensorsFile> {
        self.checkpoints().flat_map(|ck| ck.files.iter())
    }

    /// Between tensors (no system call): stops the merge as soon as a read of an input failed,
    /// instead of computing the rest of the model from the zeros that replaced the lost pages.
    pub fn check_readable(&self) -> Result<()> {
        self.files()
            .try_for_each(|f| f.check_readable())
            .map_err(Error::Input)
    }

    /// Before the output is committed: every input is still the file that was read.
    pub fn check_intact(&self) -> Result<()> {
        self.files()
            .try_for_each(|f| f.check_intact())
            .map_err(Error::Input)
    }
}

/// Which input a copied tensor comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFrom {
    Base,
    Start,
    Task(usize),
}

/// A float copy that changes the bytes: the output dtype (`dtype`/`out_dtype` of a passthrough
/// merge) and passthrough's `scale`, in fp32 with one rounding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Convert {
    pub from: FloatType,
    pub to: FloatType,
    pub scale: Option<f32>,
}

/// What happens to one output tensor.
#[derive(Clone, Debug)]
pub enum ItemKind {
    /// Merged from the base and every task.
    Merge {
        n: usize,
        out: FloatType,
        /// Each task's mask and the fuse (`work::resolve_at`).
        work: TensorWork,
    },
    /// Copied from one input's tensor `name` (non-float tensors, tensors only the base has,
    /// passthrough): byte for byte, or converted.
    Copy {
        from: CopyFrom,
        name: String,
        convert: Option<Convert>,
    },
}

#[derive(Clone, Debug)]
pub struct Item {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ItemKind,
    pub out: OutTensor,
    /// Input bytes the main pass reads for this tensor.
    pub read_bytes: u64,
    /// Its layer and the inputs' names of it.
    pub slot: Slot,
    /// The recipe's parameters resolved for it.
    pub params: Resolved,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Estimate {
    pub tensors_merged: usize,
    pub tensors_copied: usize,
    pub params_merged: u64,
    /// Bytes read by all passes together on the CPU backend (model-wide selection re-reads its
    /// inputs; [`Estimate::read_bytes_with`] for another backend's digits).
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Passes over the merged inputs on the CPU backend ([`Estimate::passes_with`]).
    pub passes: u32,
    /// One pass over the merged tensors' inputs.
    #[serde(skip)]
    pub merge_read_bytes: u64,
    /// The copied tensors' bytes (read once).
    #[serde(skip)]
    pub copy_read_bytes: u64,
    /// Whether `selection: model` adds passes (a mean pass and one per radix digit).
    #[serde(skip)]
    pub model_wide: bool,
    /// The largest working set of one tensor group (keys, masks, output buffers in flight).
    pub peak_bytes: u64,
}

impl Estimate {
    /// Passes over the merged inputs for a backend whose model-wide select has `digits` radix
    /// digits (`Compute::model_digits`): the fuse pass, plus a mean pass and one per digit.
    pub fn passes_with(&self, digits: usize) -> u32 {
        if self.model_wide {
            2 + digits as u32
        } else {
            1
        }
    }

    /// Bytes read by every pass together, for a backend with `digits` radix digits.
    pub fn read_bytes_with(&self, digits: usize) -> u64 {
        self.merge_read_bytes * self.passes_with(digits) as u64 + self.copy_read_bytes
    }
}

pub struct Plan {
    pub recipe: Recipe,
    pub inputs: Inputs,
    pub items: Vec<Item>,
    pub estimate: Estimate,
    pub notes: Vec<String>,
    /// Where the output differs from what mergekit would write.
    pub warnings: Vec<String>,
    /// Tokenizer, chat template and config.json changes.
    pub side: SidePlan,
    /// Output shard file names.
    pub shards: Vec<String>,
}

/// Output buffers alive at once: the one being computed and two more, queued for the writer or
/// held by a backend that hands outputs back one call late (the CUDA backend's deferred output).
pub const OUT_BUFFERS_IN_FLIGHT: u64 = 3;

fn open_all(recipe: &Recipe, problems: &mut Vec<Problem>) -> Option<Inputs> {
    use crate::checkpoint::{MISSING_MODEL, MISSING_STATISTIC};
    // Each input's problems name the recipe field that points at it.
    let mut open = |p: &PathBuf, field: &str, missing: &str| match Checkpoint::open_or(p, missing) {
        Ok(c) => Some(c),
        Err(ps) => {
            problems.extend(ps.into_iter().map(|mut q| {
                q.message = format!("`{field}`: {}", q.message);
                q
            }));
            None
        }
    };
    let base = open(&recipe.base, "base_model", MISSING_MODEL);
    let start = recipe
        .start
        .as_ref()
        .map(|p| open(p, "start_model", MISSING_MODEL));
    let mut tasks = Vec::new();
    for t in &recipe.tasks {
        let model = open(&t.model, &format!("{}.model", t.field), MISSING_MODEL);
        let grads = t
            .gradients
            .as_ref()
            .map(|p| open(p, &format!("{}.gradients", t.field), MISSING_STATISTIC));
        tasks.push((model, grads));
    }
    let base = base?;
    let start = match start {
        Some(None) => return None,
        Some(Some(s)) => Some(s),
        None => None,
    };
    let mut out = Vec::new();
    for (m, g) in tasks {
        let model = m?;
        let grads = match g {
            Some(None) => return None,
            Some(Some(g)) => Some(g),
            None => None,
        };
        out.push(TaskInputs { model, grads });
    }
    Some(Inputs {
        base,
        start,
        tasks: out,
    })
}

fn is_embedding_like(name: &str) -> bool {
    [
        "embed",
        "lm_head",
        "wte",
        "word_embeddings",
        "shared.weight",
    ]
    .iter()
    .any(|p| name.contains(p))
}

fn check_same_shape(
    base: &TensorEntry,
    file: &SafetensorsFile,
    t: &TensorEntry,
    what: &str,
    problems: &mut Vec<Problem>,
) -> bool {
    if t.shape == base.shape {
        return true;
    }
    let vocab =
        is_embedding_like(&t.name) && t.shape.len() == base.shape.len() && !t.shape.is_empty();
    let msg = if vocab && t.shape[1..] == base.shape[1..] {
        format!(
            "vocab-size mismatch: {what} has {} rows, the base has {} (tokens were added or removed; \
             resize the embeddings to the same vocabulary before merging)",
            t.shape[0], base.shape[0]
        )
    } else {
        format!(
            "shape mismatch: {what} has {:?}, the base has {:?}",
            t.shape, base.shape
        )
    };
    problems.push(Problem::in_tensor(&file.path, &t.name, msg));
    false
}

fn check_float(
    file: &SafetensorsFile,
    t: &TensorEntry,
    problems: &mut Vec<Problem>,
) -> Option<FloatType> {
    let f = FloatType::from_safetensors(t.dtype);
    if f.is_none() {
        problems.push(Problem::in_tensor(
            &file.path,
            &t.name,
            format!(
                "dtype {:?} is not supported for merging (F32, F16, BF16 are)",
                t.dtype
            ),
        ));
    }
    f
}

/// Running totals of the plan's tensors.
struct Tally {
    est: Estimate,
    missing_grad_fallbacks: usize,
    /// Tensors whose `normalize` would divide by (nearly) zero: the first one's name and
    /// reason, and how many.
    bad_normalize: Option<(String, String, usize)>,
    /// Tensors of slerp and nearswap that no setting of `t` applies to.
    missing_t: Vec<String>,
}

impl Plan {
    /// Opens every input (headers only), checks them against each other and the recipe, and
    /// returns the work list, or every problem found.
    pub fn build(recipe: &Recipe, out_shard_bytes: u64) -> Result<Plan, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut notes = recipe.notes.clone();
        let mut warnings = Vec::new();
        let Some(inputs) = open_all(recipe, &mut problems) else {
            return Err(problems);
        };
        checks::quantized(recipe, &inputs, &mut problems);
        checks::vocab_sizes(recipe, &inputs, &mut problems);
        let layout = layout::layout(recipe, &inputs, &mut problems);
        let side = side::plan(recipe, &inputs, &layout, &mut problems, &mut notes);
        let mut tally = Tally {
            est: Estimate {
                passes: 1,
                ..Default::default()
            },
            missing_grad_fallbacks: 0,
            bad_normalize: None,
            missing_t: Vec::new(),
        };
        let mut items = Vec::new();
        for slot in layout.slots {
            let item = if recipe.method == MethodKind::Passthrough {
                passthrough_item(recipe, &inputs, slot, &mut problems)
            } else if recipe.method.is_interp() {
                interp::item(recipe, &inputs, slot, &mut tally, &mut problems)
            } else {
                merge_item(recipe, &inputs, slot, &mut tally, &mut problems)
            };
            if let Some(item) = item {
                let e = &mut tally.est;
                e.write_bytes += item.out.nbytes;
                match &item.kind {
                    ItemKind::Copy { convert, .. } => {
                        e.tensors_copied += 1;
                        // A converted copy is built in memory (and an fp32 chunk of it).
                        if convert.is_some() {
                            e.peak_bytes = e.peak_bytes.max(item.out.nbytes + 4 * 65536);
                        }
                    }
                    ItemKind::Merge { n, .. } => {
                        e.tensors_merged += 1;
                        e.params_merged += *n as u64;
                        e.read_bytes += item.read_bytes;
                    }
                }
                items.push(item);
            }
        }
        if !recipe.sliced() {
            let names: HashSet<&str> = inputs
                .base
                .tensors()
                .map(|(_, t)| t.name.as_str())
                .collect();
            for t in &inputs.tasks {
                for (tf, tt) in t.model.tensors() {
                    if !names.contains(tt.name.as_str()) {
                        problems.push(Problem::in_tensor(
                            &tf.path,
                            &tt.name,
                            format!(
                                "not in the base model {} (architectures differ?)",
                                recipe.base.display()
                            ),
                        ));
                    }
                }
            }
        }
        if let Some((first, why, count)) = tally.bad_normalize {
            let others = match count {
                1 => String::new(),
                c => format!(" and {} other tensor(s)", c - 1),
            };
            problems.push(Problem::new(format!(
                "`parameters.normalize`: in tensor `{first}`{others}, {why}: set `normalize: \
                 false` (the task vectors are then added with their weights as given), or give \
                 weights that do not cancel"
            )));
        }
        if let Some(first) = tally.missing_t.first() {
            problems.push(Problem::new(format!(
                "`parameters.t`: no setting of `t` applies to {} tensor(s), e.g. `{first}` (its \
                 filters match none of them): add a last entry without a filter (`- value: …`) \
                 as a fallback",
                tally.missing_t.len()
            )));
        }
        if tally.missing_grad_fallbacks > 0 {
            notes.push(format!(
                "{} task tensor(s) have no gradient statistic: ranked by abs(task vector) \
                 (missing_gradients: magnitude)",
                tally.missing_grad_fallbacks
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        checks::dtypes(recipe, &inputs, &items, &mut notes, &mut warnings);
        let mut est = tally.est;
        est.model_wide = !work::model_wide_tasks(recipe).is_empty();
        est.merge_read_bytes = est.read_bytes;
        est.copy_read_bytes = items
            .iter()
            .filter(|i| matches!(i.kind, ItemKind::Copy { .. }))
            .map(|i| i.read_bytes)
            .sum::<u64>();
        let cpu_digits = crate::backend::cpu::MODEL_DIGITS.len();
        est.passes = est.passes_with(cpu_digits);
        est.read_bytes = est.read_bytes_with(cpu_digits);
        let outs: Vec<OutTensor> = items.iter().map(|i| i.out.clone()).collect();
        let shards = crate::checkpoint::writer::plan_shards(&outs, out_shard_bytes).files;
        Ok(Plan {
            recipe: recipe.clone(),
            inputs,
            items,
            estimate: est,
            notes,
            warnings,
            side,
            shards,
        })
    }
}

fn copy_item(
    slot: Slot,
    params: Resolved,
    from: CopyFrom,
    ck: &Checkpoint,
    name: &str,
    convert: Option<Convert>,
) -> Item {
    let (_, e) = ck.get(name).expect("the caller found it");
    let (dtype, nbytes) = match convert {
        Some(c) => (c.to.to_safetensors(), (e.numel() * c.to.size()) as u64),
        None => (e.dtype, e.nbytes() as u64),
    };
    Item {
        name: slot.name.clone(),
        shape: e.shape.clone(),
        kind: ItemKind::Copy {
            from,
            name: name.to_string(),
            convert,
        },
        out: OutTensor {
            name: slot.name.clone(),
            dtype,
            shape: e.shape.clone(),
            nbytes,
        },
        read_bytes: e.nbytes() as u64,
        slot,
        params,
    }
}

/// passthrough: the slot's one input, converted to the output dtype and scaled when asked.
fn passthrough_item(
    recipe: &Recipe,
    inputs: &Inputs,
    slot: Slot,
    problems: &mut Vec<Problem>,
) -> Option<Item> {
    let (input, name) = slot.first_input()?;
    let name = name.to_string();
    let ck = layout::checkpoint(inputs, input);
    let (f, e) = ck.get(&name)?;
    let params = recipe.resolve(&slot.site());
    let own = FloatType::from_safetensors(e.dtype);
    if own.is_none() && is_unsupported_float(e.dtype) {
        check_float(f, e, problems);
        return None;
    }
    let scale = match input {
        InputRef::Base => params.base("scale"),
        InputRef::Task(t) => params.task(t, "scale"),
    }
    .map(|v| v.num() as f32);
    let convert = own.and_then(|own| {
        let to = recipe.out_dtype.or(recipe.dtype).unwrap_or(own);
        (to != own || scale.is_some_and(|s| s != 1.0)).then_some(Convert {
            from: own,
            to,
            scale: scale.filter(|s| *s != 1.0),
        })
    });
    let from = match input {
        InputRef::Base => CopyFrom::Base,
        InputRef::Task(t) => CopyFrom::Task(t),
    };
    Some(copy_item(slot, params, from, ck, &name, convert))
}

/// A tensor of a task-vector method: merged, or copied (non-float, or no task has it).
fn merge_item(
    recipe: &Recipe,
    inputs: &Inputs,
    slot: Slot,
    tally: &mut Tally,
    problems: &mut Vec<Problem>,
) -> Option<Item> {
    let base_name = slot.base.clone()?;
    let (bf, bt) = inputs.base.get(&base_name)?;
    // Per task: None when the task is not an input of this tensor (a slice without it);
    // Some(None) when it should be and its model lacks the tensor.
    let present: Vec<Option<Option<(&SafetensorsFile, &TensorEntry)>>> = slot
        .tasks
        .iter()
        .enumerate()
        .map(|(t, n)| n.as_deref().map(|n| inputs.tasks[t].model.get(n)))
        .collect();
    let start_t = inputs.start.as_ref().map(|s| (s, s.get(&slot.name)));
    let in_any = present.iter().any(|p| matches!(p, Some(Some(_))));
    let base_float = FloatType::from_safetensors(bt.dtype);
    if base_float.is_none() && !is_unsupported_float(bt.dtype) {
        let params = recipe.resolve(&slot.site());
        let from =
            checks::buffer_source(recipe, inputs, &base_name, &slot.tasks, &params, problems)?;
        let (ck, name) = match from {
            CopyFrom::Base => (&inputs.base, base_name.as_str()),
            CopyFrom::Start => (inputs.start.as_ref().expect("start"), slot.name.as_str()),
            CopyFrom::Task(t) => (
                &inputs.tasks[t].model,
                slot.tasks[t].as_deref().expect("an input"),
            ),
        };
        let name = name.to_string();
        return Some(copy_item(slot, params, from, ck, &name, None));
    }
    if !in_any {
        let params = recipe.resolve(&slot.site());
        return Some(match start_t {
            Some((s, Some(_))) => {
                let name = slot.name.clone();
                copy_item(slot, params, CopyFrom::Start, s, &name, None)
            }
            _ => copy_item(slot, params, CopyFrom::Base, &inputs.base, &base_name, None),
        });
    }
    if let Some((s, None)) = start_t {
        problems.push(Problem::in_tensor(
            &s.root,
            &slot.name,
            "missing tensor: the models have it, start_model does not",
        ));
        return None;
    }
    let mut ok = check_float(bf, bt, problems).is_some();
    let mut has_grads = Vec::new();
    let mut read = bt.nbytes() as u64;
    if let Some((_, Some((sf, st)))) = start_t {
        read += st.nbytes() as u64;
        ok &= check_float(sf, st, problems).is_some();
        ok &= check_same_shape(bt, sf, st, "start_model", problems);
    }
    let n = bt.numel();
    for (ti, p) in present.iter().enumerate() {
        let spec = &recipe.tasks[ti];
        let (tf, tt) = match p {
            None => {
                has_grads.push(false);
                continue;
            }
            Some(None) => {
                problems.push(Problem::in_tensor(
                    &spec.model,
                    &slot.name,
                    "missing tensor: the base and other models have it, this model does not",
                ));
                ok = false;
                continue;
            }
            Some(Some(x)) => *x,
        };
        ok &= check_float(tf, tt, problems).is_some();
        ok &= check_same_shape(bt, tf, tt, "this model", problems);
        read += tt.nbytes() as u64;
        let mut has_grad = false;
        if let Some(g) = &inputs.tasks[ti].grads {
            match g.get(&tt.name) {
                Some((gf, gt)) => {
                    ok &= check_float(gf, gt, problems).is_some();
                    ok &= check_same_shape(bt, gf, gt, "the gradient statistic", problems);
                    read += gt.nbytes() as u64;
                    has_grad = true;
                }
                None if recipe.missing_gradients == MissingGradients::Magnitude => {
                    tally.missing_grad_fallbacks += 1;
                }
                None => {
                    problems.push(Problem::in_tensor(
                        &g.root,
                        &tt.name,
                        "missing tensor in the gradient statistic (add it, or set \
                         `missing_gradients: magnitude` to rank this tensor by abs(task vector))",
                    ));
                    ok = false;
                }
            }
        }
        has_grads.push(has_grad);
    }
    if !ok {
        return None;
    }
    let out = recipe
        .out_dtype
        .or(recipe.dtype)
        .unwrap_or_else(|| base_float.expect("checked float"));
    let nbytes = (n * out.size()) as u64;
    let (work, params) = work::resolve_shaped(recipe, &slot.site(), &bt.shape, out, &has_grads);
    if let Some(why) = work.fuse.normalize_problem() {
        let b = tally
            .bad_normalize
            .get_or_insert_with(|| (slot.name.clone(), why, 0));
        b.2 += 1;
    }
    // What filters give a tensor (the recipe checked the rest): one problem per message.
    for msg in recipe.check_tensor(&slot.site(), &params) {
        if !problems.iter().any(|p| p.message == msg) {
            problems.push(Problem {
                file: None,
                tensor: Some(slot.name.clone()),
                message: msg,
            });
        }
    }
    let nt = recipe.tasks.len() as u64;
    let peak = nbytes * OUT_BUFFERS_IN_FLIGHT
        + if work.ranks() { 4 * n as u64 } else { 0 }
        + if work.masks_any() {
            nt * (n as u64).div_ceil(64) * 8
        } else {
            0
        };
    tally.est.peak_bytes = tally.est.peak_bytes.max(peak);
    Some(Item {
        name: slot.name.clone(),
        shape: bt.shape.clone(),
        kind: ItemKind::Merge { n, out, work },
        out: OutTensor {
            name: slot.name.clone(),
            dtype: out.to_safetensors(),
            shape: bt.shape.clone(),
            nbytes,
        },
        read_bytes: read,
        slot,
        params,
    })
}

fn raw<'a>(ck: &'a Checkpoint, name: &str) -> Raw<'a> {
    let (f, t) = ck
        .get(name)
        .expect("the plan checked that the tensor exists");
    Raw {
        ty: FloatType::from_safetensors(t.dtype).expect("the plan checked the dtype"),
        data: f.bytes(t),
    }
}

impl Plan {
    /// The mapped inputs of a merged item (`ItemKind::Merge`) of this plan, as a backend takes
    /// them; its `seq` is the item's index. A task that is not an input of the tensor (a slice
    /// without it) reads the base: its τ is 0 and its weight 0 (`work::fuse_spec`).
    pub fn group<'a>(&'a self, item: &'a Item) -> Group<'a> {
        let name = item.name.as_str();
        let at = (item as *const Item as usize).wrapping_sub(self.items.as_ptr() as usize);
        debug_assert!(at / std::mem::size_of::<Item>() < self.items.len());
        // A slice of a method without a base has none: its first input stands in (unread).
        let first_task = || {
            item.slot
                .tasks
                .iter()
                .enumerate()
                .find_map(|(t, n)| Some(raw(&self.inputs.tasks[t].model, n.as_deref()?)))
        };
        let base = match item.slot.base.as_deref() {
            Some(b) => raw(&self.inputs.base, b),
            None => first_task().unwrap_or_else(|| raw(&self.inputs.base, name)),
        };
        Group {
            name,
            seq: (at / std::mem::size_of::<Item>()) as u64,
            n: item.shape.iter().product(),
            base,
            start: self.inputs.start.as_ref().map(|s| raw(s, name)),
            tasks: self
                .inputs
                .tasks
                .iter()
                .zip(&item.slot.tasks)
                .map(|(t, n)| match n.as_deref() {
                    Some(n) => TaskInput {
                        theta: raw(&t.model, n),
                        grad: t.grads.as_ref().and_then(|g| g.get(n).map(|_| raw(g, n))),
                    },
                    None => TaskInput {
                        theta: base,
                        grad: None,
                    },
                })
                .collect(),
        }
    }
}
