//! The passes over the whole model before the merge pass: `selection: model`'s per-tensor means
//! and digit histograms, and fisher's per-model norms.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::pages::release;
use super::{check_interrupt, Progress};
use crate::backend::{Backend, Group, RankTask};
use crate::error::{Error, Result};
use crate::method::keep_count;
use crate::plan::work::model_wide_tasks;
use crate::plan::{Item, ItemKind, Plan};
use crate::select::{tensor_mean, DigitSearch};
use crate::values::fault_problem;

/// The model-wide threshold of one task: the key at the k-th place and how many keys equal to it
/// may still be kept (spent in plan order).
pub(super) struct ModelThreshold {
    pub(super) key: u32,
    pub(super) quota: u64,
    pub(super) k: u64,
    pub(super) total: u64,
}

pub(super) struct ModelSelection {
    /// Per merge item (by item index), per task: the tensor's mean score.
    pub(super) means: Vec<Vec<f32>>,
    pub(super) thresholds: Vec<Option<ModelThreshold>>,
}

/// fisher with `normalize_fisher_weight`: one pass over the statistics for each model's Fisher
/// norm over the whole model, then each model's scale (`backend::cpu::fisher::norm_scales`).
/// On the host for both backends (the CUDA backend's fisher fuse takes the scales from here).
pub(super) fn fisher_scales(
    plan: &Plan,
    progress: &mut Progress,
    stop: &[&AtomicBool],
) -> Result<Option<Vec<f32>>> {
    use crate::backend::cpu::fisher;
    let normalised = plan.items.iter().any(|item| match &item.kind {
        ItemKind::Merge { work, .. } => {
            work.fuse.rule == crate::method::FuseRule::Fisher && work.fuse.normalize
        }
        ItemKind::Copy { .. } => false,
    });
    if !normalised {
        return Ok(None);
    }
    progress.message("fisher — the Fisher norm of each model");
    let mut sums = vec![0f64; plan.recipe.tasks.len()];
    for item in &plan.items {
        check_interrupt(plan, stop)?;
        if !matches!(item.kind, ItemKind::Merge { .. }) {
            continue;
        }
        let g = plan.group(item);
        for (t, s) in sums.iter_mut().enumerate() {
            *s += fisher::sq_sum(&g, t)
                .map_err(|e| fault_problem(plan, &item.name, &item.shape, e))?;
        }
        release(plan, item);
    }
    let scales = fisher::norm_scales(&sums);
    tracing::info!(
        "fisher: the models' Fisher norms {:?}, scales {scales:?}",
        { sums.iter().map(|s| s.sqrt()).collect::<Vec<_>>() }
    );
    Ok(Some(scales))
}

/// `selection: model`: a pass for the per-tensor means, then one histogram pass per digit over
/// every tensor of the model, then the threshold of each task is known. Each pass hands the
/// backend every ranking task of a tensor at once, and the backend says first where it keeps
/// the keys between the passes (the GPU: on the device when they fit, so that only pass 1
/// moves the inputs).
pub(super) fn model_selection(
    plan: &Plan,
    backend: &dyn Backend,
    progress: &mut Progress,
    stop: &[&AtomicBool],
) -> Result<Option<ModelSelection>> {
    let tasks = model_wide_tasks(&plan.recipe);
    if tasks.is_empty() {
        return Ok(None);
    }
    let specs = |item: &Item| -> Vec<RankTask> {
        match &item.kind {
            ItemKind::Merge { work, .. } => tasks
                .iter()
                .map(|&t| (t, work.spec(t).expect("a model-wide task ranks")))
                .collect(),
            ItemKind::Copy { .. } => Vec::new(),
        }
    };
    let groups: Vec<(Group, Vec<RankTask>)> = plan
        .items
        .iter()
        .filter(|item| matches!(item.kind, ItemKind::Merge { .. }))
        .map(|item| (plan.group(item), specs(item)))
        .collect();
    let home = backend
        .begin_model_passes(&groups)
        .map_err(|e| Error::Other(format!("selection: model on {}: {e}", backend.name())))?;
    drop(groups);
    tracing::debug!("selection: model: keys {home:?} between the passes");
    let r = passes(plan, backend, progress, stop, &tasks, &specs);
    let end = backend
        .end_model_passes()
        .map_err(|e| Error::Other(format!("selection: model on {}: {e}", backend.name())));
    let r = r?;
    end?;
    Ok(Some(r))
}

fn passes(
    plan: &Plan,
    backend: &dyn Backend,
    progress: &mut Progress,
    stop: &[&AtomicBool],
    tasks: &[usize],
    specs: &dyn Fn(&Item) -> Vec<RankTask>,
) -> Result<ModelSelection> {
    let started = Instant::now();
    let nt = plan.recipe.tasks.len();
    let mut means = vec![vec![0f32; nt]; plan.items.len()];
    let mut total = 0u64;
    progress.message("selection: model — pass 1: per-tensor mean scores");
    for (ii, item) in plan.items.iter().enumerate() {
        check_interrupt(plan, stop)?;
        let ItemKind::Merge { n, .. } = item.kind else {
            continue;
        };
        total += n as u64;
        let g = plan.group(item);
        let sums = backend
            .score_sums(&g, &specs(item))
            .map_err(|e| fault_problem(plan, &item.name, &item.shape, e))?;
        for (&t, sum) in tasks.iter().zip(sums) {
            means[ii][t] = tensor_mean(sum, n);
        }
        release(plan, item);
        progress.inc(item.read_bytes, &item.name);
    }
    if total == 0 {
        // Only tensors without elements: nothing to rank, nothing kept, no threshold to find.
        let thresholds = (0..nt)
            .map(|t| {
                tasks.contains(&t).then_some(ModelThreshold {
                    key: 0,
                    quota: 0,
                    k: 0,
                    total: 0,
                })
            })
            .collect();
        return Ok(ModelSelection { means, thresholds });
    }
    let ks: Vec<u64> = (0..nt)
        .map(|t| keep_count(plan.recipe.tasks[t].model_density, total))
        .collect();
    let mut search: Vec<DigitSearch> = ks.iter().map(|&k| DigitSearch::new(k)).collect();
    for (pass, &(shift, bits)) in backend.model_digits().iter().enumerate() {
        progress.message(&format!(
            "selection: model — pass {}: histogram of bits {shift}..{}",
            pass + 2,
            shift + bits
        ));
        let mut hists = vec![vec![0u64; 1 << bits]; tasks.len()];
        let digits: Vec<_> = tasks.iter().map(|&t| search[t].pass(shift, bits)).collect();
        for (ii, item) in plan.items.iter().enumerate() {
            check_interrupt(plan, stop)?;
            if !matches!(item.kind, ItemKind::Merge { .. }) {
                continue;
            }
            let g = plan.group(item);
            let mut specs = specs(item);
            for (t, spec) in specs.iter_mut() {
                spec.mean = Some(means[ii][*t]);
            }
            backend
                .histograms(&g, &specs, &digits, &mut hists)
                .map_err(|e| fault_problem(plan, &item.name, &item.shape, e))?;
            release(plan, item);
            progress.inc(item.read_bytes, &item.name);
        }
        for (i, &t) in tasks.iter().enumerate() {
            search[t].advance(bits, &hists[i]).map_err(|e| {
                Error::Other(format!(
                    "internal error in the model-wide select of task {t}: {e}"
                ))
            })?;
        }
    }
    let mut thresholds: Vec<Option<ModelThreshold>> = (0..nt).map(|_| None).collect();
    for &t in tasks {
        tracing::debug!(
            "selection: model, task {t}: keep {} of {total}; threshold key {:#010x}, {} tie(s) \
             to keep, after {:.3} s",
            ks[t],
            search[t].prefix(),
            search[t].quota(),
            started.elapsed().as_secs_f64()
        );
        thresholds[t] = Some(ModelThreshold {
            key: search[t].prefix(),
            quota: search[t].quota(),
            k: ks[t],
            total,
        });
    }
    Ok(ModelSelection { means, thresholds })
}
