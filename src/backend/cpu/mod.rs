//! The CPU backend: the reference every other backend is checked against, and what GPU-less
//! users run. Work is split into fixed chunks spread over rayon's pool; results do not depend
//! on the split because every element is computed on its own (docs/SEMANTICS.md) and reductions
//! are exact counts or the fixed-order deterministic sum.
//!
//! A group is two passes over its inputs: the select pass (`topk.rs`: every task's mask, without
//! a key buffer) and the fuse (`fuse.rs`). The sparsifying methods' masks, L1 rescale and
//! whole-group fuses live in `sparse.rs`, the interpolating methods in `interp.rs`.

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod fisher;
mod fuse;
mod interp;
mod sparse;
mod sta;
mod topk;

pub use sparse::l1_scales;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use super::{
    BResult, Backend, BackendError, Compute, DigitPass, Fault, FuseSpec, Group, GroupStats,
    KeySpec, MaskJob, Raw, Source, TaskStats,
};
use crate::dtype::widen;
use crate::method::{FuseRule, ScoreKind};
use crate::select::{self, dare, dsum, radix, Threshold};
pub use fuse::MAX_COMBO_TASKS;

/// Elements per work item: a multiple of 64 (mask words) that divides the deterministic-sum chunk.
const CH: usize = 1 << 14;
const _: () = assert!(CH % 64 == 0 && dsum::CHUNK % CH == 0);

/// The CPU's digits for the model-wide passes: two 16-bit histograms (64 Ki buckets fit its
/// caches; fewer passes over the model beat smaller histograms).
pub const MODEL_DIGITS: [(u32, u32); 2] = [(16, 16), (0, 16)];

#[derive(Default)]
pub struct CpuBackend {
    /// Key buffer for the stored-keys select (a missed window, or [`CpuBackend::with_stored_keys`]),
    /// reused across tasks and tensors.
    keys: Mutex<Vec<u32>>,
    /// Mask and window-bit buffers returned after each group: fresh large allocations cost a page
    /// fault and a page clear per 4 KiB, which showed up as 12 % of a merge's time.
    masks: Mutex<Vec<Vec<u64>>>,
    /// Select the way before issue 19: every key stored, then selected (tests and benches compare
    /// the two; the window select falls back to it when its sample misled it).
    stored_keys: bool,
    /// Top-k selects whose sampled window missed the threshold (each cost a stored-keys select).
    misses: AtomicU64,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend with the stored-keys select for every top-k and fixed-threshold mask: the
    /// reference the window select is checked against, bit for bit.
    pub fn with_stored_keys() -> Self {
        Self {
            stored_keys: true,
            ..Self::default()
        }
    }

    /// How many top-k selects fell back to the stored-keys select so far.
    pub fn window_misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    fn spare_mask(&self) -> Vec<u64> {
        self.masks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }
}

thread_local! {
    // Per-thread scratch, alive for the whole run: allocating it per rayon job made the allocator
    // hand back fresh pages over and over, and clearing them was 10-18 % of a merge's time.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    static FUSE_SCRATCH: RefCell<FuseScratch> = RefCell::new(FuseScratch::default());
}

#[derive(Default)]
struct Scratch {
    b: Vec<f32>,
    th: Vec<f32>,
    g: Vec<f32>,
    s: Vec<f32>,
}

#[derive(Default)]
struct FuseScratch {
    b: Vec<f32>,
    st: Vec<f32>,
    th: Vec<f32>,
    u: Vec<Vec<f32>>,
    acc: Vec<f32>,
    sum: Vec<f32>,
    div: Vec<f32>,
    lanes: Vec<u32>,
    /// Per task: θ widened, and the mask as lanes (fuse::one_loop).
    tt: Vec<Vec<f32>>,
    lt: Vec<Vec<u32>>,
    /// All-ones lanes for the tasks without a mask.
    ones: Vec<u32>,
}

#[inline(always)]
fn load(raw: Raw, off: usize, len: usize, dst: &mut Vec<f32>) {
    dst.resize(len, 0.0);
    let sz = raw.ty.size();
    widen(raw.ty, &raw.data[off * sz..(off + len) * sz], dst);
}

fn first_fault(a: Option<Fault>, b: Option<Fault>) -> Option<Fault> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if x.index <= y.index { x } else { y }),
        (x, None) => x,
        (None, y) => y,
    }
}

fn uses_base(score: ScoreKind) -> bool {
    matches!(
        score,
        ScoreKind::AbsTaskVector | ScoreKind::AbsTaskVectorGrad
    )
}

/// Scores of task `t` for elements `off..off+len` into `sc.s`; the first bad index as a fault.
#[inline(always)]
fn scores(
    g: &Group,
    t: usize,
    spec: &KeySpec,
    off: usize,
    len: usize,
    sc: &mut Scratch,
) -> Option<Fault> {
    if uses_base(spec.score) {
        load(g.base, off, len, &mut sc.b);
    }
    scores_on_base(g, t, spec, off, len, sc)
}

/// [`scores`] with the base (where the score reads it) already widened into `sc.b`: the select
/// pass widens it once for every task.
#[inline(always)]
fn scores_on_base(
    g: &Group,
    t: usize,
    spec: &KeySpec,
    off: usize,
    len: usize,
    sc: &mut Scratch,
) -> Option<Fault> {
    let task = &g.tasks[t];
    load(task.theta, off, len, &mut sc.th);
    if spec.score.needs_grad() {
        load(
            task.grad.expect("the plan gives gradients to sta tensors"),
            off,
            len,
            &mut sc.g,
        );
    }
    scores_loaded(t, spec, off, len, sc)
}

/// [`scores`] of inputs already widened into `sc` (`th`, and `b` and `g` where the score reads
/// them): elements `off..off+len` of the tensor, at `0..len` of the scratch arrays.
#[inline(always)]
fn scores_loaded(
    t: usize,
    spec: &KeySpec,
    off: usize,
    len: usize,
    sc: &mut Scratch,
) -> Option<Fault> {
    let uses_base = uses_base(spec.score);
    sc.s.resize(len, 0.0);
    let (th, b, gr, s) = (&sc.th[..len], &sc.b[..], &sc.g[..], &mut sc.s[..len]);
    // Zipped, not indexed: inlined into the AVX2 copy (crate::simd), the indexed forms kept
    // their bounds checks and ran scalar, 3x the instructions of the baseline copy.
    match spec.score {
        ScoreKind::AbsTaskVector => s
            .iter_mut()
            .zip(th.iter().zip(b))
            .for_each(|(o, (&t, &b))| *o = (t - b).abs()),
        ScoreKind::AbsWeightGrad => s
            .iter_mut()
            .zip(th.iter().zip(gr))
            .for_each(|(o, (&t, &g))| *o = (t * g).abs()),
        ScoreKind::AbsTaskVectorGrad => s
            .iter_mut()
            .zip(th.iter().zip(b).zip(gr))
            .for_each(|(o, ((&t, &b), &g))| *o = ((t - b) * g).abs()),
    }
    let mut fault = None;
    // A fold, not `any`: without the early exit the check vectorises (it was ~4 % of a merge's
    // instructions), and bad values are rare enough that finding the first one can rescan.
    if s.iter().fold(false, |bad, v| bad | !v.is_finite()) {
        for i in 0..len {
            if s[i].is_finite() {
                continue;
            }
            if spec.nonfinite_zero {
                s[i] = 0.0;
                continue;
            }
            let source = if uses_base && !b[i].is_finite() {
                Source::Base
            } else if !th[i].is_finite() {
                Source::Theta(t)
            } else if spec.score.needs_grad() && !gr[i].is_finite() {
                Source::Grad(t)
            } else {
                Source::Score(t)
            };
            fault = Some(Fault {
                source,
                index: (off + i) as u64,
                value_is_nan: s[i].is_nan(),
            });
            break;
        }
    }
    if let Some(mean) = spec.mean {
        if mean > 0.0 {
            s.iter_mut().for_each(|v| *v /= mean);
        } else {
            s.iter_mut().for_each(|v| *v = 0.0);
        }
    }
    fault
}

fn fault_result(f: Option<Fault>) -> BResult<()> {
    match f {
        Some(f) => Err(BackendError::Fault(f)),
        None => Ok(()),
    }
}

/// Adds the first radix digit (11 bits) of `keys` to `h`. Four interleaved counters: runs of
/// keys in one bucket (common: scores cluster) would otherwise wait on each other's increments.
#[inline(always)]
fn count_top_digit(keys: &[u32], h: &mut [u64]) {
    const _: () = assert!(select::DIGITS_11[0].0 == 21 && select::DIGITS_11[0].1 == 11);
    let mut c = [[0u32; 1 << 11]; 4];
    let mut quads = keys.chunks_exact(4);
    for q in &mut quads {
        c[0][(q[0] >> 21) as usize] += 1;
        c[1][(q[1] >> 21) as usize] += 1;
        c[2][(q[2] >> 21) as usize] += 1;
        c[3][(q[3] >> 21) as usize] += 1;
    }
    for &k in quads.remainder() {
        c[0][(k >> 21) as usize] += 1;
    }
    for (b, x) in h.iter_mut().enumerate() {
        *x += (c[0][b] + c[1][b] + c[2][b] + c[3][b]) as u64;
    }
}

/// Fills `keys[..n]` with task t's sortable keys and returns the histogram of their first
/// radix digit, built in the same pass. Public for the kernel benches (benches/kernels.rs).
pub fn compute_keys(g: &Group, t: usize, spec: &KeySpec, keys: &mut [u32]) -> BResult<Vec<u64>> {
    let bits = select::DIGITS_11[0].1;
    let (hist, f) = keys
        .par_chunks_mut(CH)
        .enumerate()
        .fold(
            || (vec![0u64; 1 << bits], None),
            |(mut h, fa), (ci, kc)| {
                let f = SCRATCH.with_borrow_mut(|sc| {
                    crate::wide!(
                        let f = scores(g, t, spec, ci * CH, kc.len(), sc);
                        // Keys first, in a loop that vectorises; counting them in the same loop
                        // kept the compiler from it (the key stores may alias the histogram).
                        for (k, &s) in kc.iter_mut().zip(&sc.s) {
                            *k = select::key(s);
                        }
                        count_top_digit(kc, &mut h);
                        f
                    )
                });
                (h, first_fault(fa, f))
            },
        )
        .reduce(
            || (vec![0u64; 1 << bits], None),
            |(mut a, fa), (b, fb)| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                (a, first_fault(fa, fb))
            },
        );
    fault_result(f)?;
    Ok(hist)
}

fn dare_mask(n: usize, stream: u64, threshold: u64, mut words: Vec<u64>) -> Vec<u64> {
    words.resize(n.div_ceil(64), 0);
    words
        .par_chunks_mut(CH / 64)
        .enumerate()
        .for_each(|(ci, wc)| {
            crate::wide!(for (wi, w) in wc.iter_mut().enumerate() {
                let start = ci * CH + wi * 64;
                let end = (start + 64).min(n);
                let mut bits = 0u64;
                for i in start..end {
                    bits |= (dare::keep(stream, i as u64, threshold) as u64) << (i - start);
                }
                *w = bits;
            })
        });
    words
}

fn popcount(words: &[u64]) -> u64 {
    words.par_iter().map(|w| w.count_ones() as u64).sum()
}

/// The CPU computes each group when it is handed over: the default hand-over.
impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
}

impl CpuBackend {
    /// Each task's mask (None: everything kept) and statistics, before the fuse.
    fn masks(
        &self,
        g: &Group,
        jobs: &[MaskJob],
        masks: &mut [Option<Vec<u64>>],
        stats: &mut [TaskStats],
    ) -> BResult<()> {
        let n = g.n;
        let mut by_key = Vec::new();
        for (t, job) in jobs.iter().enumerate() {
            match *job {
                MaskJob::All => stats[t].kept = n as u64,
                MaskJob::TopK { k, .. } if k >= n as u64 => stats[t].kept = n as u64,
                MaskJob::TopK { .. } | MaskJob::Fixed { .. } if self.stored_keys => {
                    let mut m = self.spare_mask();
                    m.resize(n.div_ceil(64), 0);
                    stats[t] = self.stored_select(g, t, job, &mut m)?;
                    masks[t] = Some(m);
                }
                MaskJob::TopK { .. } | MaskJob::Fixed { .. } => by_key.push(t),
                MaskJob::Random { stream, threshold } => {
                    let m = dare_mask(n, stream, threshold, self.spare_mask());
                    stats[t].kept = popcount(&m);
                    masks[t] = Some(m);
                }
                MaskJob::Band { .. } | MaskJob::Della { .. } => {
                    let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
                    let (m, st) = sparse::mask(g, t, job, &mut keys, self.spare_mask())?;
                    masks[t] = m;
                    stats[t] = st;
                }
            }
        }
        if !by_key.is_empty() {
            topk::select(self, g, jobs, &by_key, masks, stats)?;
        }
        Ok(())
    }

    /// Task t's top-k or fixed-threshold mask into `mask` the way before the window select: every
    /// key stored, then a select over them.
    fn stored_select(
        &self,
        g: &Group,
        t: usize,
        job: &MaskJob,
        mask: &mut [u64],
    ) -> BResult<TaskStats> {
        let n = g.n;
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.resize(n, 0);
        match *job {
            MaskJob::TopK { spec, k } => {
                let hist1 = compute_keys(g, t, &spec, &mut keys[..n])?;
                let th = radix::select_masked(&keys[..n], k, &hist1, mask);
                Ok(TaskStats {
                    kept: k,
                    threshold: Some(th),
                    ties_kept: th.count_eq.min(k - th.count_gt),
                })
            }
            MaskJob::Fixed {
                spec,
                key,
                tie_quota,
            } => {
                compute_keys(g, t, &spec, &mut keys[..n])?;
                let (gt, eq) = keys[..n]
                    .par_chunks(CH)
                    .map(|c| {
                        crate::wide!(c.iter().fold((0u64, 0u64), |(g2, e), &x| {
                            (g2 + (x > key) as u64, e + (x == key) as u64)
                        }))
                    })
                    .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
                let (th, ties) = Threshold::fixed(key, n as u64, gt, eq, tie_quota, |ties| {
                    Ok::<_, BackendError>(radix::nth_equal(&keys[..n], key, ties) + 1)
                })?;
                radix::fill_mask(&keys[..n], &th, mask);
                Ok(TaskStats {
                    kept: gt + ties,
                    threshold: Some(th),
                    ties_kept: ties,
                })
            }
            _ => unreachable!("only key thresholds are selected by keys"),
        }
    }
}

impl Compute for CpuBackend {
    fn merge_group(
        &self,
        g: &Group,
        jobs: &[MaskJob],
        f: &FuseSpec,
        out: &mut [u8],
    ) -> BResult<GroupStats> {
        if let Some(spec) = &f.interp {
            return interp::merge(g, spec, f.out, out);
        }
        if sparse::owns_fuse(f) {
            return self.merge_sparse(g, f, out);
        }
        if f.rule == FuseRule::Fisher {
            return fisher::merge(g, f, out);
        }
        // sta's `normalize_importance`: each task's divisor found before its keys are made.
        let normalized = sta::normalized(self, g, jobs, f)?;
        let jobs = normalized.as_deref().unwrap_or(jobs);
        let mut masks: Vec<Option<Vec<u64>>> = (0..jobs.len()).map(|_| None).collect();
        let mut stats = vec![TaskStats::default(); jobs.len()];
        let combos = self.masks(g, jobs, &mut masks, &mut stats).and_then(|()| {
            sta::overlap(g, jobs, f, &mut masks, &mut stats);
            let l1 = sparse::with_l1_scales(g, &masks, f);
            fuse::fuse(g, &masks, l1.as_ref().unwrap_or(f), out)
        });
        self.masks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(masks.into_iter().flatten());
        Ok(GroupStats {
            tasks: stats,
            combos: combos?,
        })
    }

    fn score_sum(&self, g: &Group, t: usize, spec: &KeySpec) -> BResult<f64> {
        let spec = KeySpec {
            mean: None,
            ..*spec
        };
        let n = g.n;
        let chunks = n.div_ceil(dsum::CHUNK);
        let parts: Vec<(f64, Option<Fault>)> = (0..chunks)
            .into_par_iter()
            .map(|c| {
                let off = c * dsum::CHUNK;
                let len = dsum::CHUNK.min(n - off);
                SCRATCH.with_borrow_mut(|sc| {
                    crate::wide!(
                        let f = scores(g, t, &spec, off, len, sc);
                        (dsum::chunk_sum(&sc.s), f)
                    )
                })
            })
            .collect();
        let fault = parts.iter().fold(None, |a, p| first_fault(a, p.1));
        fault_result(fault)?;
        Ok(dsum::combine(
            &parts.iter().map(|p| p.0).collect::<Vec<_>>(),
        ))
    }

    fn histogram(
        &self,
        g: &Group,
        t: usize,
        spec: &KeySpec,
        d: DigitPass,
        hist: &mut [u64],
    ) -> BResult<()> {
        let DigitPass {
            shift,
            bits,
            prefix,
        } = d;
        let top = shift + bits;
        let mask = (1u32 << bits) - 1;
        let chunks = g.n.div_ceil(CH);
        // One histogram per rayon job (not per chunk): 2^16 buckets are too many to allocate often.
        let (h, fault) = (0..chunks)
            .into_par_iter()
            .fold(
                || (vec![0u64; 1 << bits], None),
                |(mut h, fa), c| {
                    let off = c * CH;
                    let len = CH.min(g.n - off);
                    let f = SCRATCH.with_borrow_mut(|sc| {
                        crate::wide!(
                            let f = scores(g, t, spec, off, len, sc);
                            for &s in &sc.s {
                                let k = select::key(s);
                                if top >= 32 || k >> top == prefix {
                                    h[((k >> shift) & mask) as usize] += 1;
                                }
                            }
                            f
                        )
                    });
                    (h, first_fault(fa, f))
                },
            )
            .reduce(
                || (vec![0u64; 1 << bits], None),
                |(mut a, fa), (b, fb)| {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                    (a, first_fault(fa, fb))
                },
            );
        fault_result(fault)?;
        for (x, y) in hist.iter_mut().zip(h) {
            *x += y;
        }
        Ok(())
    }

    fn model_digits(&self) -> &'static [(u32, u32)] {
        &MODEL_DIGITS
    }
}

#[cfg(test)]
mod tests;
