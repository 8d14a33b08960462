//! sta's selection options on the CPU (docs/SEMANTICS.md, "sta's selection options"): each
//! task's importance divided by a per-tensor constant (`normalize_importance`) before its keys
//! are made, and the cross-task rule (`overlap`) applied to the finished masks before the fuse.
//! cpu.rs dispatches here; the score pass, the fixed-order sum and the mask words are its own.
//!
//! What the CUDA twin (`cuda/sta.rs`) reproduces: the divisor is f32 of `dsum`'s f64 sum (mean:
//! that sum / n in f64 first), or the exact max; ŝ = s / c in fp32 (0 for c ≤ 0), the same
//! division the model-wide selection makes; the overlap rules (kernels/overlap.cu) compare ŝ
//! exactly and count exactly.

use rayon::prelude::*;

use super::{scores, CpuBackend, SCRATCH};
use crate::backend::{BResult, BackendError, Compute, FuseSpec, Group, MaskJob, TaskStats};
use crate::method::{KeySpec, Overlap};

/// The jobs with each normalised task's divisor in its key spec (None: no task normalises),
/// by this backend's score sum and maximum.
pub(super) fn normalized(
    cpu: &CpuBackend,
    g: &Group,
    jobs: &[MaskJob],
    f: &FuseSpec,
) -> BResult<Option<Vec<MaskJob>>> {
    crate::backend::normalized_jobs(
        g,
        jobs,
        f,
        |t, raw| cpu.score_sum(g, t, raw),
        |t, raw| score_max(g, t, raw),
    )
}

/// The largest score of task `t` (0 for an empty tensor); a bad score fails as in the key pass.
fn score_max(g: &Group, t: usize, spec: &KeySpec) -> BResult<f32> {
    let ch = super::CH;
    let parts: Vec<(f32, Option<crate::backend::Fault>)> = (0..g.n.div_ceil(ch))
        .into_par_iter()
        .map(|c| {
            let (off, len) = (c * ch, ch.min(g.n - c * ch));
            SCRATCH.with_borrow_mut(|sc| {
                let f = scores(g, t, spec, off, len, sc);
                (sc.s.iter().fold(0f32, |m, &v| m.max(v)), f)
            })
        })
        .collect();
    let fault = parts.iter().fold(None, |a, p| super::first_fault(a, p.1));
    if let Some(f) = fault {
        return Err(BackendError::Fault(f));
    }
    Ok(parts.iter().fold(0f32, |m, p| m.max(p.0)))
}

/// Applies `f.sta.overlap` to the masks of the tasks that take part (they rank keys and are not
/// `forget:` entries); a task that kept everything (no mask words) selected every entry.
pub(super) fn overlap(
    g: &Group,
    jobs: &[MaskJob],
    f: &FuseSpec,
    masks: &mut [Option<Vec<u64>>],
    stats: &mut [TaskStats],
) {
    let n = g.n;
    let words = n.div_ceil(64);
    let part: Vec<usize> = (0..jobs.len())
        .filter(|&t| jobs[t].ranking_spec().is_some() && !f.forget[t])
        .collect();
    if f.sta.overlap == Overlap::Sum || part.is_empty() {
        return;
    }
    for &t in &part {
        if masks[t].is_none() {
            let mut m = vec![u64::MAX; words];
            if n % 64 != 0 {
                m[words - 1] = u64::MAX >> (64 - n % 64);
            }
            masks[t] = Some(m);
        }
    }
    let wpc = super::CH / 64;
    let read: Vec<&[u64]> = part
        .iter()
        .map(|&t| masks[t].as_deref().expect("made above"))
        .collect();
    // Per chunk of CH entries, the new words of each taking-part task.
    let chunks: Vec<Vec<Vec<u64>>> = (0..words.div_ceil(wpc))
        .into_par_iter()
        .map(|c| {
            let (w0, w1) = (c * wpc, ((c + 1) * wpc).min(words));
            match f.sta.overlap {
                Overlap::Consensus(k) => consensus(&read, w0, w1, k),
                Overlap::Exclusive => exclusive(g, jobs, &part, &read, w0, w1),
                Overlap::Sum => unreachable!("returned above"),
            }
        })
        .collect();
    drop(read);
    for (i, &t) in part.iter().enumerate() {
        let m = masks[t].as_mut().expect("made above");
        for (c, ch) in chunks.iter().enumerate() {
            m[c * wpc..c * wpc + ch[i].len()].copy_from_slice(&ch[i]);
        }
        stats[t].kept = m.iter().map(|w| w.count_ones() as u64).sum();
    }
}

/// Words `w0..w1`: a bit stays where at least `k` of the masks have it.
fn consensus(masks: &[&[u64]], w0: usize, w1: usize, k: u32) -> Vec<Vec<u64>> {
    let mut out: Vec<Vec<u64>> = masks.iter().map(|m| m[w0..w1].to_vec()).collect();
    for j in 0..w1 - w0 {
        let mut keep = 0u64;
        for lane in 0..64 {
            let c: u32 = masks.iter().map(|m| ((m[w0 + j] >> lane) & 1) as u32).sum();
            keep |= ((c >= k) as u64) << lane;
        }
        out.iter_mut().for_each(|o| o[j] &= keep);
    }
    out
}

/// Words `w0..w1`: a bit stays only in the mask of the task with the largest ŝ there among
/// those that have it, the first such task (lowest index) among equals.
fn exclusive(
    g: &Group,
    jobs: &[MaskJob],
    part: &[usize],
    masks: &[&[u64]],
    w0: usize,
    w1: usize,
) -> Vec<Vec<u64>> {
    let off = w0 * 64;
    let len = (w1 * 64).min(g.n) - off;
    // The key pass computed these scores already and failed on a bad one, except for a task
    // whose density keeps everything, which ranks nothing: its non-finite scores count as 0
    // here (as the GPU scores them), never as NaN, which would lose or win every comparison.
    let s: Vec<Vec<f32>> = part
        .iter()
        .map(|&t| {
            let spec = jobs[t].ranking_spec().expect("taking part");
            let raw = KeySpec { mean: None, ..spec };
            SCRATCH.with_borrow_mut(|sc| {
                let _ = scores(g, t, &raw, off, len, sc);
                sc.s.iter()
                    .map(|&v| {
                        let v = if v.is_finite() { v } else { 0.0 };
                        match spec.mean {
                            Some(c) if c > 0.0 => v / c,
                            Some(_) => 0.0,
                            None => v,
                        }
                    })
                    .collect()
            })
        })
        .collect();
    let mut out = vec![vec![0u64; w1 - w0]; part.len()];
    for i in 0..len {
        let (w, bit) = (w0 + i / 64, i % 64);
        let mut best: Option<usize> = None;
        for p in 0..part.len() {
            if (masks[p][w] >> bit) & 1 == 1 && best.is_none_or(|b| s[p][i] > s[b][i]) {
                best = Some(p);
            }
        }
        if let Some(b) = best {
            out[b][i / 64] |= 1 << bit;
        }
    }
    out
}
