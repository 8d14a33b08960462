//! Header-only checks across every input, and the work list the pipeline executes. Nothing here
//! reads tensor data: a plan that fails costs seconds, not the hour a merge would.

pub mod work;

use std::collections::HashSet;
use std::path::PathBuf;

use crate::backend::{Group, Raw, TaskInput};
use crate::checkpoint::writer::OutTensor;
use crate::checkpoint::{Checkpoint, SafetensorsFile, TensorEntry};
use crate::dtype::{is_unsupported_float, FloatType};
use crate::error::{Error, Problem, Result};
use crate::recipe::{MissingGradients, Recipe};
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

/// What happens to one output tensor.
#[derive(Clone, Debug)]
pub enum ItemKind {
    /// Merged from the base and every task.
    Merge {
        n: usize,
        out: FloatType,
        /// Each task's mask and the fuse (`work::resolve`).
        work: TensorWork,
    },
    /// Copied byte for byte (non-float tensors, tensors only the base has).
    Copy { from_start: bool },
}

#[derive(Clone, Debug)]
pub struct Item {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ItemKind,
    pub out: OutTensor,
    /// Input bytes the main pass reads for this tensor.
    pub read_bytes: u64,
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

impl Plan {
    /// Opens every input (headers only), checks them against each other and the recipe, and
    /// returns the work list, or every problem found.
    pub fn build(recipe: &Recipe, out_shard_bytes: u64) -> Result<Plan, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut notes = recipe.notes.clone();
        let Some(inputs) = open_all(recipe, &mut problems) else {
            return Err(problems);
        };
        let base = &inputs.base;
        let base_vocab = base.vocab_size();
        for (i, t) in inputs.tasks.iter().enumerate() {
            if let (Some(a), Some(b)) = (base_vocab, t.model.vocab_size()) {
                if a != b {
                    problems.push(Problem::in_file(
                        &recipe.tasks[i].model.join("config.json"),
                        format!("vocab-size mismatch: vocab_size {b}, the base has {a}"),
                    ));
                }
            }
        }
        let mut items = Vec::new();
        let mut est = Estimate {
            passes: 1,
            ..Default::default()
        };
        let mut names: HashSet<&str> = HashSet::new();
        let mut missing_grad_fallbacks = 0usize;
        for (bf, bt) in base.tensors() {
            names.insert(&bt.name);
            let present: Vec<Option<(&SafetensorsFile, &TensorEntry)>> =
                inputs.tasks.iter().map(|t| t.model.get(&bt.name)).collect();
            let start_t = inputs.start.as_ref().map(|s| (s, s.get(&bt.name)));
            let in_any = present.iter().any(Option::is_some);
            let base_float = FloatType::from_safetensors(bt.dtype);
            let copy = !in_any || (base_float.is_none() && !is_unsupported_float(bt.dtype));
            if copy {
                let entry = match start_t {
                    Some((_, Some((_, st)))) => st,
                    _ => bt,
                };
                est.tensors_copied += 1;
                est.write_bytes += entry.nbytes() as u64;
                items.push(Item {
                    name: bt.name.clone(),
                    shape: bt.shape.clone(),
                    kind: ItemKind::Copy {
                        from_start: matches!(start_t, Some((_, Some(_)))),
                    },
                    out: OutTensor {
                        name: bt.name.clone(),
                        dtype: entry.dtype,
                        shape: entry.shape.clone(),
                        nbytes: entry.nbytes() as u64,
                    },
                    read_bytes: entry.nbytes() as u64,
                });
                continue;
            }
            if let Some((s, None)) = start_t {
                problems.push(Problem::in_tensor(
                    &s.root,
                    &bt.name,
                    "missing tensor: the models have it, start_model does not",
                ));
                continue;
            }
            let mut ok = check_float(bf, bt, &mut problems).is_some();
            let mut has_grads = Vec::new();
            let mut read = bt.nbytes() as u64;
            if let Some((_, Some((sf, st)))) = start_t {
                read += st.nbytes() as u64;
                ok &= check_float(sf, st, &mut problems).is_some();
                ok &= check_same_shape(bt, sf, st, "start_model", &mut problems);
            }
            let n = bt.numel();
            for (ti, p) in present.iter().enumerate() {
                let spec = &recipe.tasks[ti];
                let Some((tf, tt)) = p else {
                    problems.push(Problem::in_tensor(
                        &spec.model,
                        &bt.name,
                        "missing tensor: the base and other models have it, this model does not",
                    ));
                    ok = false;
                    continue;
                };
                ok &= check_float(tf, tt, &mut problems).is_some();
                ok &= check_same_shape(bt, tf, tt, "this model", &mut problems);
                read += tt.nbytes() as u64;
                let mut has_grad = false;
                if let Some(g) = &inputs.tasks[ti].grads {
                    match g.get(&bt.name) {
                        Some((gf, gt)) => {
                            ok &= check_float(gf, gt, &mut problems).is_some();
                            ok &= check_same_shape(
                                bt,
                                gf,
                                gt,
                                "the gradient statistic",
                                &mut problems,
                            );
                            read += gt.nbytes() as u64;
                            has_grad = true;
                        }
                        None if recipe.missing_gradients == MissingGradients::Magnitude => {
                            missing_grad_fallbacks += 1;
                        }
                        None => {
                            problems.push(Problem::in_tensor(
                                &g.root,
                                &bt.name,
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
                continue;
            }
            let out = recipe
                .out_dtype
                .or(recipe.dtype)
                .unwrap_or_else(|| base_float.expect("checked float"));
            let nbytes = (n * out.size()) as u64;
            let work = work::resolve(recipe, &bt.name, n as u64, out, &has_grads);
            let nt = recipe.tasks.len() as u64;
            let peak = nbytes * OUT_BUFFERS_IN_FLIGHT
                + if work.ranks() { 4 * n as u64 } else { 0 }
                + if work.masks_any() {
                    nt * (n as u64).div_ceil(64) * 8
                } else {
                    0
                };
            est.peak_bytes = est.peak_bytes.max(peak);
            est.tensors_merged += 1;
            est.params_merged += n as u64;
            est.read_bytes += read;
            est.write_bytes += nbytes;
            items.push(Item {
                name: bt.name.clone(),
                shape: bt.shape.clone(),
                kind: ItemKind::Merge { n, out, work },
                out: OutTensor {
                    name: bt.name.clone(),
                    dtype: out.to_safetensors(),
                    shape: bt.shape.clone(),
                    nbytes,
                },
                read_bytes: read,
            });
        }
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
        if missing_grad_fallbacks > 0 {
            notes.push(format!(
                "{missing_grad_fallbacks} task tensor(s) have no gradient statistic: ranked by abs(task vector) \
                 (missing_gradients: magnitude)"
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
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
            shards,
        })
    }
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
    /// The mapped inputs of a merged item (`ItemKind::Merge`), as a backend takes them.
    pub fn group<'a>(&'a self, item: &'a Item) -> Group<'a> {
        let name = item.name.as_str();
        Group {
            name,
            n: item.shape.iter().product(),
            base: raw(&self.inputs.base, name),
            start: self.inputs.start.as_ref().map(|s| raw(s, name)),
            tasks: self
                .inputs
                .tasks
                .iter()
                .map(|t| TaskInput {
                    theta: raw(&t.model, name),
                    grad: t
                        .grads
                        .as_ref()
                        .and_then(|g| g.get(name).map(|_| raw(g, name))),
                })
                .collect(),
        }
    }
}
