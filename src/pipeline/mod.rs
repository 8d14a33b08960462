//! The streaming executor: read → backend → write, one tensor group computing while the next is
//! paged in and the previous one is written. Memory holds a few tensor groups, never the model.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, SyncSender};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::backend::{Backend, MaskJob};
use crate::checkpoint::writer::{ShardPlan, ShardWriter};
use crate::dtype::FloatType;
use crate::error::{Error, Result};
use crate::plan::{Convert, CopyFrom, ItemKind, ModelCut, Plan};
use crate::report::{
    overlaps, ModelSelectionRecord, TaskRecord, TensorRecord, ThresholdDensityRecord,
};
use crate::select::key_value;
use crate::values::{fault_problem, first_nonfinite, overflow_problem};

mod model_wide;
mod pages;

use model_wide::{fisher_scales, model_selection};
use pages::{populate, prefetch, release};

/// A copy that converts: widened to fp32, scaled (one rounding), narrowed to the output dtype.
fn convert(c: &Convert, src: &[u8]) -> Vec<u8> {
    const CHUNK: usize = 1 << 16;
    let n = src.len() / c.from.size();
    let mut out = vec![0u8; n * c.to.size()];
    let mut buf = vec![0f32; CHUNK.min(n)];
    for start in (0..n).step_by(CHUNK) {
        let m = CHUNK.min(n - start);
        let b = &mut buf[..m];
        crate::dtype::widen(c.from, &src[start * c.from.size()..], b);
        if let Some(s) = c.scale {
            for x in b.iter_mut() {
                *x *= s;
            }
        }
        crate::dtype::narrow(
            c.to,
            b,
            &mut out[start * c.to.size()..(start + m) * c.to.size()],
        );
    }
    out
}

/// Called after each tensor of each pass with (bytes done, bytes in all, bytes per second since
/// the start): the numbers the progress bar shows, for a caller's own display. It runs on the
/// merge's thread, so it should return quickly.
pub type ProgressFn = dyn Fn(u64, u64, f64) + Send + Sync;

/// How a caller follows and stops a running [`execute`].
#[derive(Clone, Copy)]
pub struct Control<'a> {
    /// A bar on a terminal, else a log line every few seconds.
    pub show: bool,
    /// Stop at the next tensor when any of these is set (Ctrl-C's flag, a caller's cancel).
    pub stop: &'a [&'a AtomicBool],
    /// Told the progress after each tensor of each pass.
    pub progress: Option<&'a ProgressFn>,
}

impl<'a> Control<'a> {
    /// No bar, no hook; stopped by `stop` alone.
    pub fn quiet(stop: &'a [&'a AtomicBool]) -> Self {
        Self {
            show: false,
            stop,
            progress: None,
        }
    }
}

pub struct Progress<'a> {
    bar: ProgressBar,
    plain: bool,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
    hook: Option<&'a ProgressFn>,
}

impl<'a> Progress<'a> {
    pub fn new(total: u64, show: bool, hook: Option<&'a ProgressFn>) -> Self {
        let tty = show && std::io::stderr().is_terminal();
        let bar = if tty {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} ETA {eta} {msg}",
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
            started: Instant::now(),
            last_log: Instant::now(),
            hook,
        }
    }

    fn inc(&mut self, bytes: u64, what: &str) {
        self.done += bytes;
        self.bar.inc(bytes);
        if let Some(hook) = self.hook {
            let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            hook(self.done, self.total, rate);
        }
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

/// Between tensors: Ctrl-C (`stop`, set by the caller's signal handler), or an input that could
/// not be read (see `checkpoint::guard`).
fn check_interrupt(plan: &Plan, stop: &[&AtomicBool]) -> Result<()> {
    if stop.iter().any(|s| s.load(Ordering::Relaxed)) {
        Err(Error::Interrupted)
    } else {
        plan.inputs.check_readable()
    }
}

/// A tensor for the writer (sent with its checksum by `ToWriter`).
enum Payload<'a> {
    /// An output buffer of the circulating set (sent back after writing).
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
    /// A converted copy, dropped after writing.
    Converted(Vec<u8>),
}

/// The compute side of the writer's channel. Tensors go in plan order, each with its checksum
/// and, if merged, checked for non-finite values: both in one pass, here on the worker threads
/// while the bytes are hot (`sealed`), so that the writer thread only writes.
struct ToWriter<'a, 'p> {
    tx: SyncSender<(Payload<'a>, u64)>,
    plan: &'p Plan,
    /// Tensors sent so far: the plan index of the next one.
    sent: usize,
}

impl<'a> ToWriter<'a, '_> {
    /// Sends the next tensor; `Ok(false)` when the writer has stopped (its error is the one to
    /// report), an error when a merged tensor holds a non-finite value.
    fn send(&mut self, p: Payload<'a>) -> Result<bool> {
        let item = &self.plan.items[self.sent];
        let (bytes, merged) = match (&p, &item.kind) {
            (Payload::Owned(v), ItemKind::Merge { out, .. }) => (&v[..], Some(*out)),
            (Payload::Owned(v) | Payload::Converted(v), _) => (&v[..], None),
            (Payload::Borrowed(b), _) => (*b, None),
        };
        let (sum, bad) = sealed(bytes, merged);
        if let (Some(at), Some(ty)) = (bad, merged) {
            // Finite inputs can still overflow (copies are not checked: their inputs were).
            return Err(overflow_problem(self.plan, &item.name, &item.shape, ty, at));
        }
        self.sent += 1;
        Ok(self.tx.send((p, sum)).is_ok())
    }
}

/// A tensor's checksum (`writer::checksum`, a tree over leaves) and, when `check` gives its
/// float type, the index of its first non-finite element: one parallel pass over the leaves.
fn sealed(bytes: &[u8], check: Option<FloatType>) -> (u64, Option<usize>) {
    use crate::checkpoint::writer::{leaf, root, LEAF};
    use rayon::prelude::*;
    let leaves: Vec<(u64, Option<usize>)> = bytes
        .par_chunks(LEAF)
        .map(|l| {
            let bad = check.and_then(|ty| crate::wide!(first_nonfinite(ty, l)));
            (leaf(l), bad)
        })
        .collect();
    let bad = check.and_then(|ty| {
        // Leaves hold whole elements (LEAF is a multiple of every element size).
        let per_leaf = LEAF / ty.size();
        leaves
            .iter()
            .enumerate()
            .find_map(|(i, l)| l.1.map(|at| i * per_leaf + at))
    });
    let hashes: Vec<u64> = leaves.iter().map(|l| l.0).collect();
    (root(bytes.len() as u64, &hashes), bad)
}

pub struct Outcome {
    pub tensors: Vec<TensorRecord>,
    pub shards: ShardPlan,
    /// Checksum of each output tensor, in plan order.
    pub checksums: Vec<u64>,
    pub model_selection: Vec<ModelSelectionRecord>,
    /// Per task that set sta's `threshold` somewhere: the density it produced.
    pub threshold_density: Vec<ThresholdDensityRecord>,
    pub bytes_read: u64,
}

/// Runs every pass and writes the shards into `dir`.
pub fn execute(
    plan: &Plan,
    backend: &dyn Backend,
    dir: &Path,
    out_shard_bytes: u64,
    control: Control,
) -> Result<Outcome> {
    let stop = control.stop;
    let total = plan.estimate.read_bytes_with(backend.model_digits().len());
    let mut progress = Progress::new(total, control.show, control.progress);
    let mut ms = model_selection(plan, backend, &mut progress, stop)?;
    let fisher = fisher_scales(plan, &mut progress, stop)?;
    let nt = plan.recipe.tasks.len();
    progress.message("merging");
    let outs = plan.items.iter().map(|i| i.out.clone()).collect();
    let mut records = Vec::with_capacity(plan.items.len());
    // Per task: entries sta's `threshold` selected, and the entries it looked at.
    let mut selected = vec![(0u64, 0u64); plan.recipe.tasks.len()];
    let result: Result<(ShardPlan, Vec<u64>)> = std::thread::scope(|s| {
        let (tx, rx) =
            sync_channel::<(Payload, u64)>(crate::plan::OUT_BUFFERS_IN_FLIGHT as usize - 1);
        let mut tx = ToWriter { tx, plan, sent: 0 };
        let (ret_tx, ret_rx) = channel::<Vec<u8>>();
        let writer = s.spawn(move || -> Result<(ShardPlan, Vec<u64>)> {
            let mut w = ShardWriter::new(dir, outs, out_shard_bytes);
            for (p, sum) in rx {
                match p {
                    Payload::Owned(v) => {
                        w.write_summed(&v, sum)?;
                        let _ = ret_tx.send(v);
                    }
                    Payload::Borrowed(b) => w.write_summed(b, sum)?,
                    Payload::Converted(v) => w.write_summed(&v, sum)?,
                }
            }
            w.finish()
        });
        let mut made = 0u64;
        // Output buffers sent to the writer and not yet back.
        let mut at_writer = 0u64;
        let compute = (|| -> Result<()> {
            for (ii, item) in plan.items.iter().enumerate() {
                check_interrupt(plan, stop)?;
                if let Some(next) = plan.items.get(ii + 1) {
                    prefetch(plan, next);
                }
                let mut payloads = Vec::with_capacity(2);
                match &item.kind {
                    ItemKind::Copy {
                        from,
                        name,
                        convert: conv,
                    } => {
                        let ck = match from {
                            CopyFrom::Base => &plan.inputs.base,
                            CopyFrom::Start => plan.inputs.start.as_ref().expect("start"),
                            CopyFrom::Task(t) => &plan.inputs.tasks[*t].model,
                        };
                        let (f, t) = ck.get(name).expect("planned");
                        tracing::debug!(
                            "copied `{}` from `{name}` of the {}{}",
                            item.name,
                            match from {
                                CopyFrom::Base => "base".to_string(),
                                CopyFrom::Start => "start model".to_string(),
                                CopyFrom::Task(t) => plan.recipe.tasks[*t].field.clone(),
                            },
                            conv.map(|c| format!(" as {:?}, scaled by {:?}", c.to, c.scale))
                                .unwrap_or_default()
                        );
                        records.push(TensorRecord {
                            name: item.name.clone(),
                            shape: item.shape.clone(),
                            dtype: format!("{:?}", item.out.dtype),
                            action: "copy",
                            tasks: vec![],
                            overlap: vec![],
                            checksum: String::new(),
                        });
                        // The writer takes tensors in order: merged outputs the backend still
                        // holds go first.
                        for out in backend
                            .flush()
                            .map_err(|e| fault_problem(plan, &item.name, &item.shape, e))?
                        {
                            payloads.push(Payload::Owned(out));
                        }
                        match conv {
                            Some(c) => payloads.push(Payload::Converted(convert(c, f.bytes(t)))),
                            None => payloads.push(Payload::Borrowed(f.bytes(t))),
                        }
                    }
                    ItemKind::Merge { out, work, .. } => {
                        let started = Instant::now();
                        if !backend.populates_inputs() {
                            populate(plan, item);
                        }
                        let g = plan.group(item);
                        let jobs = work.jobs(|t| {
                            let m = ms.as_ref().expect("model-wide tasks have a selection");
                            let th = m.thresholds[t].as_ref().expect("a model-wide task");
                            ModelCut {
                                mean: m.means[ii][t],
                                key: th.key,
                                tie_quota: th.quota,
                            }
                        });
                        let k = work.k();
                        // fisher's norm scales, found by the pass before the merge.
                        let fuse = match &fisher {
                            Some(sc) if work.fuse.rule == crate::method::FuseRule::Fisher => {
                                std::borrow::Cow::Owned(crate::method::FuseSpec {
                                    scale: sc.iter().map(|&s| Some(s)).collect(),
                                    ..work.fuse.clone()
                                })
                            }
                            _ => std::borrow::Cow::Borrowed(&work.fuse),
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
                                    for out in backend.flush().map_err(|e| {
                                        fault_problem(plan, &item.name, &item.shape, e)
                                    })? {
                                        at_writer += 1;
                                        if !tx.send(Payload::Owned(out))? {
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
                        // Every byte is the backend's to write: no zeroing of a reused buffer
                        // (a memset of the whole output per tensor), only of a grown one.
                        buf.resize(item.out.nbytes as usize, 0);
                        // The next merged tensor, so that the backend can copy it in early.
                        let next = plan.items.get(ii + 1).and_then(|it| match it.kind {
                            ItemKind::Merge { .. } => Some(plan.group(it)),
                            ItemKind::Copy { .. } => None,
                        });
                        // The output may come back one call later (while the next tensor
                        // computes); the statistics come now.
                        let (stats, done) = backend
                            .submit(&g, &jobs, &fuse, buf, next.as_ref())
                            .map_err(|e| fault_problem(plan, &item.name, &item.shape, e))?;
                        payloads.extend(done.into_iter().map(Payload::Owned));
                        release(plan, item);
                        let mut tasks = Vec::with_capacity(nt);
                        for (t, st) in stats.tasks.iter().enumerate() {
                            // Before `overlap`: every entry at or above the threshold.
                            if let (Some(_), Some(th)) = (
                                work.fuse.sta.threshold.get(t).copied().flatten(),
                                st.threshold,
                            ) {
                                selected[t].0 += th.count_gt + st.ties_kept;
                                selected[t].1 += g.n as u64;
                            }
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
                        tracing::debug!(
                            "merged `{}` ({} elements → {out:?}) in {:.3} s: masks {jobs:?}; kept {:?}",
                            item.name,
                            g.n,
                            started.elapsed().as_secs_f64(),
                            tasks.iter().map(|t| t.kept).collect::<Vec<_>>()
                        );
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
                    at_writer += matches!(payload, Payload::Owned(..)) as u64;
                    if !tx.send(payload)? {
                        // The writer stopped: its error is the one to report.
                        return Ok(());
                    }
                }
                progress.inc(item.read_bytes, &item.name);
            }
            let last = plan.items.last();
            for out in backend.flush().map_err(|e| match last {
                Some(it) => fault_problem(plan, &it.name, &it.shape, e),
                None => Error::Other(e.to_string()),
            })? {
                if !tx.send(Payload::Owned(out))? {
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
    let threshold_density = selected
        .iter()
        .enumerate()
        .filter(|(_, &(_, total))| total > 0)
        .map(|(task, &(selected, total))| ThresholdDensityRecord {
            task,
            selected,
            total,
            density: selected as f64 / total as f64,
        })
        .inspect(|r: &ThresholdDensityRecord| {
            tracing::info!(
                "models[{}]: its threshold selected {} of {} entries (density {:.4})",
                r.task,
                r.selected,
                r.total,
                r.density
            )
        })
        .collect();
    Ok(Outcome {
        tensors: records,
        shards,
        checksums,
        model_selection,
        threshold_density,
        bytes_read: progress.done,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{BResult, Compute, DigitPass, FuseSpec, Group, GroupStats, KeySpec};

    /// The pass before the writer: the writer's checksum, and the first non-finite element as
    /// a serial scan of the whole tensor finds it, wherever it lies among the leaves.
    #[test]
    fn sealed_gives_the_checksum_and_the_first_nonfinite_element() {
        use crate::checkpoint::writer::{checksum, LEAF};
        for ty in [FloatType::F32, FloatType::F16, FloatType::BF16] {
            let n = 3 * LEAF / ty.size() + 5;
            let ones: Vec<f32> = vec![1.0; n];
            let mut bytes = vec![0u8; n * ty.size()];
            crate::dtype::narrow(ty, &ones, &mut bytes);
            assert_eq!(sealed(&bytes, Some(ty)), (checksum(&bytes), None), "{ty:?}");
            let bad: Vec<u8> = match ty {
                FloatType::F32 => f32::INFINITY.to_le_bytes().to_vec(),
                FloatType::F16 => vec![0x00, 0x7c],
                FloatType::BF16 => vec![0x80, 0xff],
            };
            for at in [0, LEAF / ty.size() - 1, 2 * LEAF / ty.size() + 3, n - 1] {
                let mut b = bytes.clone();
                b[at * ty.size()..(at + 1) * ty.size()].copy_from_slice(&bad);
                // A later one too: the first is reported.
                b[(n - 1) * ty.size()..].copy_from_slice(&bad);
                assert_eq!(first_nonfinite(ty, &b), Some(at));
                assert_eq!(
                    sealed(&b, Some(ty)),
                    (checksum(&b), Some(at)),
                    "{ty:?} {at}"
                );
                // Copies are not checked.
                assert_eq!(sealed(&b, None), (checksum(&b), None));
            }
        }
    }

    static NO_STOP: AtomicBool = AtomicBool::new(false);

    /// The CPU backend, but every output comes back `hold` calls late (as the CUDA backend's
    /// deferred outputs do, one call late): the pipeline must still write each tensor's bytes
    /// under its own name, in order, around the copied tensors.
    struct Late {
        cpu: CpuBackend,
        hold: usize,
        held: Mutex<VecDeque<Vec<u8>>>,
    }

    impl Compute for Late {
        fn merge_group(
            &self,
            g: &Group,
            m: &[MaskJob],
            f: &FuseSpec,
            out: &mut [u8],
        ) -> BResult<GroupStats> {
            self.cpu.merge_group(g, m, f, out)
        }
        fn score_sum(&self, g: &Group, t: usize, s: &KeySpec) -> BResult<f64> {
            self.cpu.score_sum(g, t, s)
        }
        fn histogram(
            &self,
            g: &Group,
            t: usize,
            s: &KeySpec,
            d: DigitPass,
            hist: &mut [u64],
        ) -> BResult<()> {
            self.cpu.histogram(g, t, s, d, hist)
        }
        fn model_digits(&self) -> &'static [(u32, u32)] {
            self.cpu.model_digits()
        }
    }

    impl Backend for Late {
        fn name(&self) -> &'static str {
            "late"
        }
        fn submit(
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
        fn flush(&self) -> BResult<Vec<Vec<u8>>> {
            Ok(self.held.lock().unwrap().drain(..).collect())
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

    /// Adds a non-float tensor only the base has (`position_ids`, as BERT-style checkpoints carry)
    /// in a shard of its own that sorts after the others: the plan copies it from the base after
    /// the merged tensors. The synthetic set has none (transformers' Llama would flag it).
    fn add_base_buffer(base: &Path) {
        let name = "model.position_ids";
        let file = "zz-buffers.safetensors";
        let ids: Vec<u8> = (0..16i64).flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 16], &ids)
            .unwrap();
        safetensors::serialize_to_file([(name, view)], None, &base.join(file)).unwrap();
        let index = base.join(crate::checkpoint::model::INDEX_NAME);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index).expect("a sharded base")).unwrap();
        v["weight_map"][name] = file.into();
        std::fs::write(&index, serde_json::to_vec(&v).unwrap()).unwrap();
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
        add_base_buffer(&dir.join("base"));
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
            if !plan
                .items
                .iter()
                .any(|i| matches!(i.kind, ItemKind::Merge { .. }))
            {
                continue; // passthrough: nothing computes late
            }
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
            let want = execute(
                &plan,
                &CpuBackend::new(),
                &want_dir,
                30_000,
                Control::quiet(&[&NO_STOP]),
            )
            .unwrap();
            for hold in [1, 2, 5] {
                let late = Late {
                    cpu: CpuBackend::new(),
                    hold,
                    held: Mutex::new(VecDeque::new()),
                };
                let got_dir = dir.path().join(format!("{name}-late{hold}"));
                std::fs::create_dir(&got_dir).unwrap();
                let got =
                    execute(&plan, &late, &got_dir, 30_000, Control::quiet(&[&NO_STOP])).unwrap();
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
        let _toggle = crate::simd::TOGGLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        for ty in [crate::dtype::FloatType::BF16, crate::dtype::FloatType::F16] {
            let set = dir.path().join(ty.torch_name());
            for (name, plan) in synth_plans(&set, 96, ty) {
                let mut runs = Vec::new();
                for on in [false, true] {
                    crate::simd::set_enabled(on);
                    let out = set.join(format!("{name}-{on}"));
                    std::fs::create_dir(&out).unwrap();
                    let r = execute(
                        &plan,
                        &CpuBackend::new(),
                        &out,
                        30_000,
                        Control::quiet(&[&NO_STOP]),
                    );
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
