//! The streaming executor: read → backend → write, one tensor group computing while the next is
//! paged in and the previous one is written. Memory holds a few tensor groups, never the model.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, sync_channel};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use memmap2::Mmap;

use crate::backend::{Backend, BackendError, FuseSpec, Group, KeySpec, MaskJob, Raw, Source};
use crate::checkpoint::writer::{ShardPlan, ShardWriter};
use crate::checkpoint::Checkpoint;
use crate::dtype::FloatType;
use crate::error::{Error, Problem, Result};
use crate::method::{keep_count, SelectKind};
use crate::plan::{Item, ItemKind, Plan};
use crate::recipe::{NonFinite, Selection};
use crate::report::{overlaps, ModelSelectionRecord, TaskRecord, TensorRecord};
use crate::select::{dare, key_value, radix::pick_bucket};

fn raw<'a>(ck: &'a Checkpoint, name: &str) -> Raw<'a> {
    let (f, t) = ck
        .get(name)
        .expect("the plan checked that the tensor exists");
    Raw {
        ty: FloatType::from_safetensors(t.dtype).expect("the plan checked the dtype"),
        data: f.bytes(t),
    }
}

pub(crate) fn group<'a>(plan: &'a Plan, item: &'a Item, n: usize) -> Group<'a> {
    let name = item.name.as_str();
    Group {
        name,
        n,
        base: raw(&plan.inputs.base, name),
        start: plan.inputs.start.as_ref().map(|s| raw(s, name)),
        tasks: plan
            .inputs
            .tasks
            .iter()
            .map(|t| crate::backend::TaskInput {
                theta: raw(&t.model, name),
                grad: t
                    .grads
                    .as_ref()
                    .and_then(|g| g.get(name).map(|_| raw(g, name))),
            })
            .collect(),
    }
}

/// The mapped input tensors an item reads: base (and start) for a copy, every input for a merge.
fn inputs_of<'a>(plan: &'a Plan, item: &Item) -> Vec<(&'a Mmap, usize, usize)> {
    let mut cks: Vec<&Checkpoint> = vec![&plan.inputs.base];
    cks.extend(plan.inputs.start.iter());
    for t in &plan.inputs.tasks {
        cks.push(&t.model);
        cks.extend(t.grads.iter());
    }
    if matches!(item.kind, ItemKind::Copy { .. }) {
        cks.truncate(1 + plan.inputs.start.is_some() as usize);
    }
    cks.into_iter()
        .filter_map(|ck| ck.get(&item.name))
        .map(|(f, t)| (&f.map, t.start, t.nbytes()))
        .collect()
}

/// Asks the kernel to start reading the next group's inputs while this one computes.
fn prefetch(plan: &Plan, item: &Item) {
    for (map, start, len) in inputs_of(plan, item) {
        let _ = map.advise_range(memmap2::Advice::WillNeed, start, len);
    }
}

/// Drops a processed merge group's input pages from this process's resident set. They stay in
/// the page cache, so a later pass refaults them cheaply; without this, mapped inputs that were
/// read once count in RSS until the end and the process looks as large as the model.
fn release(plan: &Plan, item: &Item) {
    for (map, start, len) in inputs_of(plan, item) {
        // SAFETY: the maps are read-only shared file mappings: MADV_DONTNEED only drops our page
        // table entries; the next access reads the same bytes back from the page cache.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }
}

/// Turns a value fault into a problem naming the file, the tensor and the element.
fn fault_problem(plan: &Plan, name: &str, shape: &[usize], e: BackendError) -> Error {
    let f = match e {
        BackendError::Fault(f) => f,
        BackendError::Device(m) => {
            return Error::Other(format!("backend failed on tensor `{name}`: {m}"))
        }
    };
    let path_of = |ck: &Checkpoint| {
        ck.get(name)
            .map(|(f, _)| f.path.clone())
            .unwrap_or(ck.root.clone())
    };
    let what = if f.value_is_nan {
        "NaN"
    } else {
        "an infinite value"
    };
    let mut coords = Vec::new();
    let mut rest = f.index as usize;
    for &d in shape.iter().rev() {
        coords.push(rest % d.max(1));
        rest /= d.max(1);
    }
    coords.reverse();
    let at = format!("flat index {} (element {:?})", f.index, coords);
    let hint =
        " (set `nonfinite_scores: zero` in the recipe's parameters to treat such scores as 0)";
    let (path, msg) = match f.source {
        Source::Base => (path_of(&plan.inputs.base), format!("{what} at {at}")),
        Source::Start => (
            path_of(plan.inputs.start.as_ref().expect("start")),
            format!("{what} at {at}"),
        ),
        Source::Theta(t) => (
            path_of(&plan.inputs.tasks[t].model),
            format!("{what} at {at}"),
        ),
        Source::Grad(t) => (
            path_of(plan.inputs.tasks[t].grads.as_ref().expect("grads")),
            format!("{what} in the gradient statistic at {at}{hint}"),
        ),
        Source::Score(t) => (
            path_of(
                plan.inputs.tasks[t]
                    .grads
                    .as_ref()
                    .unwrap_or(&plan.inputs.tasks[t].model),
            ),
            format!("the score abs(w·g) overflows to {what} at {at}{hint}"),
        ),
    };
    Error::Input(Problem::in_tensor(&path, name, msg))
}

pub struct Progress {
    bar: ProgressBar,
    plain: bool,
    total: u64,
    done: u64,
    last_log: Instant,
}

impl Progress {
    pub fn new(total: u64, show: bool) -> Self {
        let tty = show && std::io::stderr().is_terminal();
        let bar = if tty {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("static template"),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        Self {
            bar,
            plain: show && !tty,
            total,
            done: 0,
            last_log: Instant::now(),
        }
    }

    fn inc(&mut self, bytes: u64, what: &str) {
        self.done += bytes;
        self.bar.inc(bytes);
        if self.plain && self.last_log.elapsed() > Duration::from_secs(5) {
            self.last_log = Instant::now();
            tracing::info!(
                "{:.1}% ({:.2} of {:.2} GB) {what}",
                100.0 * self.done as f64 / self.total.max(1) as f64,
                self.done as f64 / 1e9,
                self.total as f64 / 1e9
            );
        }
    }

    fn message(&self, m: &str) {
        self.bar.set_message(m.to_string());
        if self.plain {
            tracing::info!("{m}");
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Between tensors: Ctrl-C, or an input that could not be read (see `checkpoint::guard`).
fn check_interrupt(plan: &Plan) -> Result<()> {
    if crate::INTERRUPTED.load(Ordering::Relaxed) {
        Err(Error::Interrupted)
    } else {
        plan.inputs.check_readable()
    }
}

/// The model-wide threshold of one task: the key at the k-th place and how many keys equal to it
/// may still be kept (spent in plan order).
struct ModelThreshold {
    key: u32,
    quota: u64,
    k: u64,
    total: u64,
}

struct ModelSelection {
    /// Per merge item (by item index), per task: the tensor's mean score.
    means: Vec<Vec<f32>>,
    thresholds: Vec<Option<ModelThreshold>>,
}

fn key_spec(plan: &Plan, item: &Item, t: usize, mean: Option<f32>) -> Option<KeySpec> {
    let ItemKind::Merge { scores, .. } = &item.kind else {
        return None;
    };
    scores[t].map(|score| KeySpec {
        score,
        mean,
        nonfinite_zero: plan.recipe.nonfinite_scores == NonFinite::Zero,
    })
}

/// `selection: model`: a pass for the per-tensor means, then one histogram pass per digit over
/// every tensor of the model, then the threshold of each task is known.
fn model_selection(
    plan: &Plan,
    backend: &dyn Backend,
    progress: &mut Progress,
) -> Result<Option<ModelSelection>> {
    let tasks: Vec<usize> = (0..plan.recipe.tasks.len())
        .filter(|&t| {
            let s = &plan.recipe.tasks[t];
            s.selection == Selection::Model
                && s.density < 1.0
                && plan.recipe.method.select() == SelectKind::TopK
        })
        .collect();
    if tasks.is_empty() {
        return Ok(None);
    }
    let nt = plan.recipe.tasks.len();
    let mut means = vec![vec![0f32; nt]; plan.items.len()];
    let mut total = 0u64;
    progress.message("selection: model — pass 1: per-tensor mean scores");
    for (ii, item) in plan.items.iter().enumerate() {
        check_interrupt(plan)?;
        let ItemKind::Merge { n, .. } = item.kind else {
            continue;
        };
        total += n as u64;
        let g = group(plan, item, n);
        for &t in &tasks {
            let spec = key_spec(plan, item, t, None).expect("top-k method");
            let sum = backend
                .score_sum(&g, t, &spec)
                .map_err(|e| fault_problem(plan, &item.name, &item.shape, e))?;
            means[ii][t] = (sum / n as f64) as f32;
        }
        release(plan, item);
        progress.inc(item.read_bytes, &item.name);
    }
    let mut prefix = vec![0u32; nt];
    let mut remaining: Vec<u64> = (0..nt)
        .map(|t| keep_count(plan.recipe.tasks[t].density, total))
        .collect();
    let ks = remaining.clone();
    let mut last_eq = vec![0u64; nt];
    for (pass, &(shift, bits)) in backend.model_digits().iter().enumerate() {
        progress.message(&format!(
            "selection: model — pass {}: histogram of bits {shift}..{}",
            pass + 2,
            shift + bits
        ));
        let mut hists = vec![vec![0u64; 1 << bits]; nt];
        for (ii, item) in plan.items.iter().enumerate() {
            check_interrupt(plan)?;
            let ItemKind::Merge { n, .. } = item.kind else {
                continue;
            };
            let g = group(plan, item, n);
            for &t in &tasks {
                let spec = key_spec(plan, item, t, Some(means[ii][t])).expect("top-k method");
                backend
                    .histogram(&g, t, &spec, shift, bits, prefix[t], &mut hists[t])
                    .map_err(|e| fault_problem(plan, &item.name, &item.shape, e))?;
            }
            release(plan, item);
            progress.inc(item.read_bytes, &item.name);
        }
        for &t in &tasks {
            let (b, above) = pick_bucket(&hists[t], remaining[t]);
            remaining[t] -= above;
            last_eq[t] = hists[t][b as usize];
            prefix[t] = (prefix[t] << bits) | b;
        }
    }
    let mut thresholds: Vec<Option<ModelThreshold>> = (0..nt).map(|_| None).collect();
    for &t in &tasks {
        thresholds[t] = Some(ModelThreshold {
            key: prefix[t],
            quota: remaining[t],
            k: ks[t],
            total,
        });
    }
    Ok(Some(ModelSelection { means, thresholds }))
}

enum Payload<'a> {
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
}

pub struct Outcome {
    pub tensors: Vec<TensorRecord>,
    pub shards: ShardPlan,
    /// Checksum of each output tensor, in plan order.
    pub checksums: Vec<u64>,
    pub model_selection: Vec<ModelSelectionRecord>,
    pub bytes_read: u64,
}

/// Runs every pass and writes the shards into `dir`.
pub fn execute(
    plan: &Plan,
    backend: &dyn Backend,
    dir: &Path,
    out_shard_bytes: u64,
    show: bool,
) -> Result<Outcome> {
    let mut progress = Progress::new(plan.estimate.read_bytes, show);
    let mut ms = model_selection(plan, backend, &mut progress)?;
    let recipe = &plan.recipe;
    let nt = recipe.tasks.len();
    let fuse_base = FuseSpec {
        rule: recipe.method.fuse(),
        lambda: recipe.lambda,
        normalize: recipe.normalize,
        weights: recipe.tasks.iter().map(|t| t.weight).collect(),
        forget: recipe.tasks.iter().map(|t| t.forget).collect(),
        rescale: recipe
            .tasks
            .iter()
            .map(|t| {
                (recipe.method.is_dare() && recipe.rescale && t.density < 1.0)
                    .then_some(t.density as f32)
            })
            .collect(),
        out: FloatType::F32,
    };
    progress.message("merging");
    let outs = plan.items.iter().map(|i| i.out.clone()).collect();
    let mut records = Vec::with_capacity(plan.items.len());
    let result: Result<(ShardPlan, Vec<u64>)> = std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<Payload>(crate::plan::OUT_BUFFERS_IN_FLIGHT as usize - 1);
        let (ret_tx, ret_rx) = channel::<Vec<u8>>();
        let writer = s.spawn(move || -> Result<(ShardPlan, Vec<u64>)> {
            let mut w = ShardWriter::new(dir, outs, out_shard_bytes);
            for p in rx {
                match p {
                    Payload::Owned(v) => {
                        w.write_next(&v)?;
                        let _ = ret_tx.send(v);
                    }
                    Payload::Borrowed(b) => w.write_next(b)?,
                }
            }
            w.finish()
        });
        let mut made = 0u64;
        // Output buffers sent to the writer and not yet back.
        let mut at_writer = 0u64;
        let compute = (|| -> Result<()> {
            for (ii, item) in plan.items.iter().enumerate() {
                check_interrupt(plan)?;
                if let Some(next) = plan.items.get(ii + 1) {
                    prefetch(plan, next);
                }
                let mut payloads = Vec::with_capacity(2);
                match &item.kind {
                    ItemKind::Copy { from_start } => {
                        let ck = if *from_start {
                            plan.inputs.start.as_ref().expect("start")
                        } else {
                            &plan.inputs.base
                        };
                        let (f, t) = ck.get(&item.name).expect("planned");
                        records.push(TensorRecord {
                            name: item.name.clone(),
                            shape: item.shape.clone(),
                            dtype: format!("{:?}", t.dtype),
                            action: "copy",
                            tasks: vec![],
                            overlap: vec![],
                            checksum: String::new(),
                        });
                        // The writer takes tensors in order: merged outputs the backend still
                        // holds go first.
                        for out in backend
                            .flush_outputs()
                            .map_err(|e| fault_problem(plan, &item.name, &item.shape, e))?
                        {
                            payloads.push(Payload::Owned(out));
                        }
                        payloads.push(Payload::Borrowed(f.bytes(t)));
                    }
                    ItemKind::Merge { n, out, k, .. } => {
                        let g = group(plan, item, *n);
                        let mut jobs = Vec::with_capacity(nt);
                        for t in 0..nt {
                            let spec_t = &recipe.tasks[t];
                            let job = match recipe.method.select() {
                                SelectKind::All => MaskJob::All,
                                SelectKind::Random if spec_t.density >= 1.0 => MaskJob::All,
                                SelectKind::Random => MaskJob::Random {
                                    stream: dare::stream(recipe.seed, t, &item.name),
                                    threshold: dare::threshold(spec_t.density),
                                },
                                SelectKind::TopK => match (&mut ms, k[t]) {
                                    (_, Some(k)) => MaskJob::TopK {
                                        spec: key_spec(plan, item, t, None).expect("top-k"),
                                        k,
                                    },
                                    (Some(m), None) if m.thresholds[t].is_some() => {
                                        let th = m.thresholds[t].as_ref().expect("checked");
                                        MaskJob::Fixed {
                                            spec: key_spec(plan, item, t, Some(m.means[ii][t]))
                                                .expect("top-k"),
                                            key: th.key,
                                            tie_quota: th.quota,
                                        }
                                    }
                                    _ => MaskJob::All,
                                },
                            };
                            jobs.push(job);
                        }
                        let fuse = FuseSpec {
                            out: *out,
                            ..fuse_base.clone()
                        };
                        // A fixed set of output buffers circulates between here and the writer.
                        // A backend that returns outputs late may hold every buffer: then it
                        // hands them over first, or waiting for the writer would never end.
                        let mut buf = match ret_rx.try_recv() {
                            Ok(b) => {
                                at_writer -= 1;
                                b
                            }
                            Err(_) if made < crate::plan::OUT_BUFFERS_IN_FLIGHT => {
                                made += 1;
                                Vec::new()
                            }
                            Err(_) => {
                                if at_writer == 0 {
                                    for out in backend.flush_outputs().map_err(|e| {
                                        fault_problem(plan, &item.name, &item.shape, e)
                                    })? {
                                        at_writer += 1;
                                        if tx.send(Payload::Owned(out)).is_err() {
                                            return Ok(());
                                        }
                                    }
                                }
                                if at_writer == 0 {
                                    made += 1;
                                    Vec::new()
                                } else {
                                    match ret_rx.recv() {
                                        Ok(b) => {
                                            at_writer -= 1;
                                            b
                                        }
                                        // the writer stopped; its error is reported
                                        Err(_) => return Ok(()),
                                    }
                                }
                            }
                        };
                        buf.clear();
                        buf.resize(item.out.nbytes as usize, 0);
                        // The next merged tensor, so that the backend can copy it in early.
                        let next = plan.items.get(ii + 1).and_then(|it| match it.kind {
                            ItemKind::Merge { n, .. } => Some(group(plan, it, n)),
                            ItemKind::Copy { .. } => None,
                        });
                        // The output may come back one call later (while the next tensor
                        // computes); the statistics come now.
                        let (stats, done) = backend
                            .merge_group_deferred(&g, &jobs, &fuse, buf, next.as_ref())
                            .map_err(|e| fault_problem(plan, &item.name, &item.shape, e))?;
                        payloads.extend(done.into_iter().map(Payload::Owned));
                        release(plan, item);
                        let mut tasks = Vec::with_capacity(nt);
                        for (t, st) in stats.tasks.iter().enumerate() {
                            if let (MaskJob::Fixed { .. }, Some(m)) = (&jobs[t], ms.as_mut()) {
                                let th = m.thresholds[t].as_mut().expect("fixed has a threshold");
                                th.quota -= st.ties_kept;
                            }
                            tasks.push(TaskRecord {
                                k: k[t],
                                threshold: st.threshold.map(|th| key_value(th.key)),
                                kept: st.kept,
                            });
                        }
                        records.push(TensorRecord {
                            name: item.name.clone(),
                            shape: item.shape.clone(),
                            dtype: format!("{:?}", out.to_safetensors()),
                            action: "merge",
                            tasks,
                            overlap: overlaps(&stats.combos, nt),
                            checksum: String::new(),
                        });
                    }
                }
                for payload in payloads {
                    at_writer += matches!(payload, Payload::Owned(_)) as u64;
                    if tx.send(payload).is_err() {
                        // The writer stopped: its error is the one to report.
                        return Ok(());
                    }
                }
                progress.inc(item.read_bytes, &item.name);
            }
            let last = plan.items.last();
            for out in backend.flush_outputs().map_err(|e| match last {
                Some(it) => fault_problem(plan, &it.name, &it.shape, e),
                None => Error::Other(e.to_string()),
            })? {
                if tx.send(Payload::Owned(out)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        })();
        drop(tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Other("the writer thread panicked".into())));
        compute?;
        written
    });
    progress.finish();
    let (shards, checksums) = result?;
    for (r, c) in records.iter_mut().zip(&checksums) {
        r.checksum = format!("{c:016x}");
    }
    let model_selection = ms
        .map(|m| {
            m.thresholds
                .iter()
                .enumerate()
                .filter_map(|(t, th)| {
                    th.as_ref().map(|th| ModelSelectionRecord {
                        task: t,
                        total: th.total,
                        k: th.k,
                        threshold: key_value(th.key),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Outcome {
        tensors: records,
        shards,
        checksums,
        model_selection,
        bytes_read: progress.done,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{BResult, GroupStats, KeySpec};

    /// The CPU backend, but every output comes back `hold` calls late (as the CUDA backend's
    /// deferred outputs do, one call late): the pipeline must still write each tensor's bytes
    /// under its own name, in order, around the copied tensors.
    struct Late {
        cpu: CpuBackend,
        hold: usize,
        held: Mutex<VecDeque<Vec<u8>>>,
    }

    impl Backend for Late {
        fn name(&self) -> &'static str {
            "late"
        }
        fn merge_group(
            &self,
            g: &Group,
            m: &[MaskJob],
            f: &FuseSpec,
            out: &mut [u8],
        ) -> BResult<GroupStats> {
            self.cpu.merge_group(g, m, f, out)
        }
        fn merge_group_deferred(
            &self,
            g: &Group,
            m: &[MaskJob],
            f: &FuseSpec,
            mut out: Vec<u8>,
            _next: Option<&Group>,
        ) -> BResult<(GroupStats, Vec<Vec<u8>>)> {
            let stats = self.cpu.merge_group(g, m, f, &mut out)?;
            let mut held = self.held.lock().unwrap();
            held.push_back(out);
            let ready = held.len().saturating_sub(self.hold);
            Ok((stats, held.drain(..ready).collect()))
        }
        fn flush_outputs(&self) -> BResult<Vec<Vec<u8>>> {
            Ok(self.held.lock().unwrap().drain(..).collect())
        }
        fn score_sum(&self, g: &Group, t: usize, s: &KeySpec) -> BResult<f64> {
            self.cpu.score_sum(g, t, s)
        }
        fn histogram(
            &self,
            g: &Group,
            t: usize,
            s: &KeySpec,
            shift: u32,
            bits: u32,
            prefix: u32,
            hist: &mut [u64],
        ) -> BResult<()> {
            self.cpu.histogram(g, t, s, shift, bits, prefix, hist)
        }
        fn model_digits(&self) -> &'static [(u32, u32)] {
            self.cpu.model_digits()
        }
    }

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// A small synthetic set in `dir` (every tensor a few thousand elements or less), and the
    /// plan of each recipe `stamerge synth` writes for it.
    fn synth_plans(
        dir: &Path,
        hidden: usize,
        dtype: crate::dtype::FloatType,
    ) -> Vec<(String, Plan)> {
        let spec = crate::synth::SynthSpec {
            layers: 2,
            hidden,
            intermediate: hidden * 3 / 2,
            vocab: 100,
            tasks: 3,
            dtype,
            grad_dtype: dtype,
            shard_bytes: 20_000,
            seed: 11,
        };
        crate::synth::generate(&spec, dir).unwrap();
        crate::synth::recipes(spec.tasks)
            .into_iter()
            .map(|(name, _)| {
                let recipe = crate::Recipe::from_file(&dir.join(&name)).unwrap();
                let plan = crate::plan(&recipe, None, &crate::Options::default()).unwrap();
                (name, plan)
            })
            .collect()
    }

    #[test]
    fn outputs_that_come_back_late_are_written_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for (name, plan) in synth_plans(dir.path(), 32, crate::dtype::FloatType::BF16) {
            let copies = plan
                .items
                .iter()
                .position(|i| matches!(i.kind, ItemKind::Copy { .. }));
            assert!(
                copies.is_some_and(|p| p > 0),
                "{name}: the test needs a copied tensor after merged ones"
            );
            let want_dir = dir.path().join(format!("{name}-cpu"));
            std::fs::create_dir(&want_dir).unwrap();
            let want = execute(&plan, &CpuBackend::new(), &want_dir, 30_000, false).unwrap();
            for hold in [1, 2, 5] {
                let late = Late {
                    cpu: CpuBackend::new(),
                    hold,
                    held: Mutex::new(VecDeque::new()),
                };
                let got_dir = dir.path().join(format!("{name}-late{hold}"));
                std::fs::create_dir(&got_dir).unwrap();
                let got = execute(&plan, &late, &got_dir, 30_000, false).unwrap();
                assert_eq!(got.checksums, want.checksums, "{name}, {hold} late");
                assert_eq!(files(&got_dir), files(&want_dir), "{name}, {hold} late");
            }
        }
    }

    /// The CPU backend's AVX2 loops (crate::simd) against its baseline ones: every synthetic
    /// recipe, bf16 and fp16, the same bytes and checksums.
    #[test]
    fn avx2_loops_give_the_baseline_bytes() {
        if !crate::simd::avx2_available() {
            eprintln!("SKIPPED: this CPU has no AVX2, so there is only the baseline version");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for ty in [crate::dtype::FloatType::BF16, crate::dtype::FloatType::F16] {
            let set = dir.path().join(ty.torch_name());
            for (name, plan) in synth_plans(&set, 96, ty) {
                let mut runs = Vec::new();
                for on in [false, true] {
                    crate::simd::set_enabled(on);
                    let out = set.join(format!("{name}-{on}"));
                    std::fs::create_dir(&out).unwrap();
                    let r = execute(&plan, &CpuBackend::new(), &out, 30_000, false);
                    crate::simd::set_enabled(true);
                    runs.push((r.unwrap().checksums, files(&out)));
                }
                assert!(crate::simd::enabled());
                assert_eq!(
                    runs[0], runs[1],
                    "{name} ({ty:?}): AVX2 and baseline differ"
                );
            }
        }
    }
}
