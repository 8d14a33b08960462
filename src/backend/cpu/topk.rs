//! The select pass: every top-k and fixed-threshold mask of a group without a key buffer
//! (`select::window`). A sample fixes each top-k task's window; then one pass over the group's
//! chunks, every selecting task per chunk with the base widened once, computes each key in L1 and
//! writes two bits: above the window (kept: the mask bit itself) and inside it. Keys inside a
//! window wider than one key are kept aside in index order; a select among them settles the
//! threshold. A window that missed the threshold (the pass's counts say so exactly) falls back to
//! the stored-keys select. Per element and task that is one read of the inputs, where the stored
//! keys took a write and two reads of 4 bytes more and a histogram increment.

use std::sync::atomic::Ordering;

use rayon::prelude::*;

use super::{
    fault_result, first_fault, load, scores_loaded, scores_on_base, uses_base, CpuBackend, Scratch,
    CH, SCRATCH,
};
use crate::backend::{BResult, BackendError, Fault, Group, KeySpec, MaskJob, TaskStats};
use crate::dtype::widen;
use crate::select::{self, window, Threshold, Window};

/// Elements per block of the pass: its scratch arrays (4 KiB each) stay in L1.
const BLOCK: usize = 1024;
const _: () = assert!(BLOCK % 64 == 0 && CH % BLOCK == 0);

/// What the pass found in one chunk for one task.
#[derive(Default)]
struct Found {
    above: u64,
    inside: u64,
    fault: Option<Fault>,
    /// The keys inside the window, in index order (kept only when the window is wider than a key).
    keys: Vec<u32>,
}

/// The window of task t's top-k (k < n) from a sample of its keys. The sample's blocks are
/// widened side by side into the scratch arrays and scored in one go: scored block by block,
/// the per-call overhead cost more than the pass over a 1 M-element tensor's keys.
fn sample_window(g: &Group, t: usize, spec: &KeySpec, k: u64) -> Window {
    let (len, starts) = window::sample_starts(g.n);
    let m = len * starts.len();
    let task = &g.tasks[t];
    let inputs = [
        Some((task.theta, 0)),
        uses_base(spec.score).then_some((g.base, 1)),
        task.grad
            .filter(|_| spec.score.needs_grad())
            .map(|r| (r, 2)),
    ];
    SCRATCH.with_borrow_mut(|sc| {
        crate::wide!(
            for (raw, which) in inputs.into_iter().flatten() {
                let dst = match which {
                    0 => &mut sc.th,
                    1 => &mut sc.b,
                    _ => &mut sc.g,
                };
                dst.resize(m, 0.0);
                let sz = raw.ty.size();
                for (d, &b) in dst.chunks_mut(len).zip(&starts) {
                    widen(raw.ty, &raw.data[b * sz..(b + len) * sz], d);
                }
            }
            // A bad value is reported by the pass, at its lowest index.
            let _ = scores_loaded(t, spec, 0, m, sc);
            let mut sample: Vec<u32> = sc.s[..m].iter().map(|&s| select::key(s)).collect();
            Window::from_sample(&mut sample, g.n as u64, k)
        )
    })
}

/// Selects the masks of the tasks `by_key` (top-k with k < n, or fixed thresholds) into
/// `masks[t]` and `stats[t]`. A fault is reported for the first such task (in task order) that
/// has one, at its lowest index, as the stored-keys select did.
pub(super) fn select(
    be: &CpuBackend,
    g: &Group,
    jobs: &[MaskJob],
    by_key: &[usize],
    masks: &mut [Option<Vec<u64>>],
    stats: &mut [TaskStats],
) -> BResult<()> {
    let n = g.n;
    let windows: Vec<Window> = by_key
        .par_iter()
        .map(|&t| match jobs[t] {
            MaskJob::TopK { spec, k } => sample_window(g, t, &spec, k),
            MaskJob::Fixed { key, .. } => Window::exact(key),
            _ => unreachable!("only key thresholds are selected by keys"),
        })
        .collect();
    let words = n.div_ceil(64);
    let fresh = || {
        let mut m = be.spare_mask();
        m.resize(words, 0);
        m
    };
    let mut mask: Vec<Vec<u64>> = by_key.iter().map(|_| fresh()).collect();
    let mut inside: Vec<Vec<u64>> = by_key.iter().map(|_| fresh()).collect();
    let found = pass(g, jobs, by_key, &windows, &mut mask, &mut inside);
    // Faults first, in task order, each at its lowest index (as the stored-keys select, which
    // met the tasks one after the other); then the tasks settle side by side.
    let mut result = by_key.iter().enumerate().try_for_each(|(i, _)| {
        fault_result(found.iter().fold(None, |a, c| first_fault(a, c[i].fault)))
    });
    if result.is_ok() {
        let settled: Vec<_> = by_key
            .par_iter()
            .zip(mask)
            .enumerate()
            .map(|(i, (&t, m))| settle(be, g, t, &jobs[t], windows[i], &found, i, &inside[i], m))
            .collect();
        for (&t, r) in by_key.iter().zip(settled) {
            match r {
                Ok((m, st)) => {
                    masks[t] = Some(m);
                    stats[t] = st;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
    }
    be.masks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(inside);
    result
}

/// One pass over the group: per chunk, per task (in `by_key` order), what [`Found`] holds; the
/// bits above each window go into `mask`, the bits inside into `inside`.
fn pass(
    g: &Group,
    jobs: &[MaskJob],
    by_key: &[usize],
    windows: &[Window],
    mask: &mut [Vec<u64>],
    inside: &mut [Vec<u64>],
) -> Vec<Vec<Found>> {
    let chunks = g.n.div_ceil(CH);
    let mut parts: Vec<Vec<(&mut [u64], &mut [u64])>> = (0..chunks)
        .map(|_| Vec::with_capacity(by_key.len()))
        .collect();
    for (m, w) in mask.iter_mut().zip(inside.iter_mut()) {
        for (p, mw) in parts
            .iter_mut()
            .zip(m.chunks_mut(CH / 64).zip(w.chunks_mut(CH / 64)))
        {
            p.push(mw);
        }
    }
    let spec = |t: usize| match jobs[t] {
        MaskJob::TopK { spec, .. } | MaskJob::Fixed { spec, .. } => spec,
        _ => unreachable!("only key thresholds are selected by keys"),
    };
    let base = by_key.iter().any(|&t| uses_base(spec(t).score));
    parts
        .into_par_iter()
        .enumerate()
        .map(|(ci, mut words)| {
            let off = ci * CH;
            let len = CH.min(g.n - off);
            SCRATCH.with_borrow_mut(|sc| {
                crate::wide!(chunk(
                    g, by_key, &spec, windows, base, off, len, &mut words, sc
                ))
            })
        })
        .collect()
}

/// The pass over one chunk.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn chunk(
    g: &Group,
    by_key: &[usize],
    spec: &impl Fn(usize) -> KeySpec,
    windows: &[Window],
    base: bool,
    off: usize,
    len: usize,
    words: &mut [(&mut [u64], &mut [u64])],
    sc: &mut Scratch,
) -> Vec<Found> {
    let mut found: Vec<Found> = by_key.iter().map(|_| Found::default()).collect();
    for bo in (0..len).step_by(BLOCK) {
        let l = BLOCK.min(len - bo);
        if base {
            load(g.base, off + bo, l, &mut sc.b);
        }
        for (i, &t) in by_key.iter().enumerate() {
            let w = windows[i];
            let fd = &mut found[i];
            let (mw, iw) = &mut words[i];
            let wide = w.lo < w.hi;
            #[cfg(target_arch = "x86_64")]
            if fast_block(g, t, &spec(t), w, off + bo, l, &sc.b, fd, mw, iw) {
                continue;
            }
            let f = scores_on_base(g, t, &spec(t), off + bo, l, sc);
            fd.fault = first_fault(fd.fault, f);
            for (j, c) in sc.s[..l].chunks(64).enumerate() {
                let (above, ins) = window::classify_scores(c, w);
                mw[bo / 64 + j] = above;
                iw[bo / 64 + j] = ins;
                fd.above += above.count_ones() as u64;
                fd.inside += ins.count_ones() as u64;
                if wide {
                    let mut bits = ins;
                    while bits != 0 {
                        fd.keys.push(select::key(c[bits.trailing_zeros() as usize]));
                        bits &= bits - 1;
                    }
                }
            }
        }
    }
    found
}

/// [`chunk`]'s work for task t over the block of `l` elements at `off`, by the AVX2 kernel
/// (`avx2::score_classify_bf16`), where it applies: bf16 θ (and G), no mean to divide by, whole
/// mask words, AVX2 enabled. `b`: the block's base, widened (where the score reads it). False
/// (with `fd` as it was) where the kernel does not apply or found a score that is not finite:
/// the portable loop then does the block and reports the fault, as before.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fast_block(
    g: &Group,
    t: usize,
    spec: &KeySpec,
    w: Window,
    off: usize,
    l: usize,
    b: &[f32],
    fd: &mut Found,
    mw: &mut [u64],
    iw: &mut [u64],
) -> bool {
    use super::avx2::{score_classify_block, TV, TVG, WG};
    use crate::dtype::FloatType;
    use crate::method::ScoreKind;
    let task = &g.tasks[t];
    let grad = if spec.score.needs_grad() {
        match task.grad {
            Some(r) if r.ty == FloatType::BF16 => r.data,
            _ => return false,
        }
    } else {
        &[]
    };
    if task.theta.ty != FloatType::BF16
        || spec.mean.is_some()
        || l % 64 != 0
        || !crate::simd::enabled()
    {
        return false;
    }
    let th = &task.theta.data[off * 2..(off + l) * 2];
    let gr = if grad.is_empty() {
        grad
    } else {
        &grad[off * 2..(off + l) * 2]
    };
    let b = if uses_base(spec.score) {
        &b[..l]
    } else {
        &[][..]
    };
    let words = (off % CH) / 64..(off % CH + l) / 64;
    let (mw, iw, keys) = (&mut mw[words.clone()], &mut iw[words], &mut fd.keys);
    let wide = w.lo < w.hi;
    // SAFETY: AVX2 is enabled (checked above); θ and G hold the block's l bf16 values (whole
    // words), the base its l widened values where the score reads it (`chunk` widened them).
    let found = unsafe {
        match spec.score {
            ScoreKind::AbsTaskVector => {
                score_classify_block::<TV>(th, b, gr, w, mw, iw, keys, wide)
            }
            ScoreKind::AbsWeightGrad => {
                score_classify_block::<WG>(th, b, gr, w, mw, iw, keys, wide)
            }
            ScoreKind::AbsTaskVectorGrad => {
                score_classify_block::<TVG>(th, b, gr, w, mw, iw, keys, wide)
            }
        }
    };
    let Some(found) = found else {
        return false;
    };
    fd.above += found.above;
    fd.inside += found.inside;
    true
}

/// Task t's (the i-th selecting task's) threshold and completed mask from the pass.
#[allow(clippy::too_many_arguments)]
fn settle(
    be: &CpuBackend,
    g: &Group,
    t: usize,
    job: &MaskJob,
    w: Window,
    found: &[Vec<Found>],
    i: usize,
    inside: &[u64],
    mut mask: Vec<u64>,
) -> BResult<(Vec<u64>, TaskStats)> {
    let n = g.n as u64;
    let above: u64 = found.iter().map(|c| c[i].above).sum();
    let count: u64 = found.iter().map(|c| c[i].inside).sum();
    let (th, st) = match *job {
        MaskJob::TopK { k, .. } => {
            let pieces: Vec<&[u32]> = found.iter().map(|c| c[i].keys.as_slice()).collect();
            let Some(th) = window::top_k(n, k, w, above, count, inside, &pieces) else {
                be.misses.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "`{}` task {t}: the sampled window {w:?} missed the threshold ({above} keys \
                     above it, {count} in it, k = {k}); selecting over stored keys",
                    g.name
                );
                let st = be.stored_select(g, t, job, &mut mask)?;
                return Ok((mask, st));
            };
            tracing::debug!(
                "`{}` task {t}: {above} keys above the sampled window, {count} in it ({:.2} % of \
                 {n}), k = {k}",
                g.name,
                100.0 * count as f64 / n as f64
            );
            let st = TaskStats {
                kept: k,
                threshold: Some(th),
                ties_kept: th.count_eq.min(k - th.count_gt),
            };
            (th, st)
        }
        MaskJob::Fixed { key, tie_quota, .. } => {
            let (th, ties) = Threshold::fixed(key, n, above, count, tie_quota, |ties| {
                Ok::<_, BackendError>(window::nth_set_bit(inside, ties) + 1)
            })?;
            let st = TaskStats {
                kept: above + ties,
                threshold: Some(th),
                ties_kept: ties,
            };
            (th, st)
        }
        _ => unreachable!("only key thresholds are selected by keys"),
    };
    mask.par_chunks_mut(CH / 64)
        .zip(inside.par_chunks(CH / 64))
        .zip(found.par_iter())
        .enumerate()
        .for_each(|(ci, ((m, ins), fc))| {
            let keys = (w.lo < w.hi).then_some(fc[i].keys.as_slice());
            window::keep_inside(&th, (ci * CH) as u64, ins, keys, m);
        });
    Ok((mask, st))
}
