//! The CPU backend: the reference every other backend is checked against, and what GPU-less
//! users run. Work is split into fixed chunks spread over rayon's pool; results do not depend
//! on the split because every element is computed on its own (docs/SEMANTICS.md) and reductions
//! are exact counts or the fixed-order deterministic sum.

use std::cell::RefCell;
use std::sync::Mutex;

use rayon::prelude::*;

use super::{
    BResult, Backend, BackendError, Compute, DigitPass, Fault, FuseSpec, Group, GroupStats,
    KeySpec, MaskJob, Raw, Source, TaskStats,
};
use crate::dtype::{narrow, widen};
use crate::method::{FuseRule, ScoreKind};
use crate::select::{self, dare, dsum, radix, Threshold};

/// Elements per work item: a multiple of 64 (mask words) that divides the deterministic-sum chunk.
const CH: usize = 1 << 14;
const _: () = assert!(CH % 64 == 0 && dsum::CHUNK % CH == 0);

/// The CPU's digits for the model-wide passes: two 16-bit histograms (64 Ki buckets fit its
/// caches; fewer passes over the model beat smaller histograms).
pub const MODEL_DIGITS: [(u32, u32); 2] = [(16, 16), (0, 16)];

/// The most tasks whose mask combinations are counted for the overlap report.
pub const MAX_COMBO_TASKS: usize = 8;

#[derive(Default)]
pub struct CpuBackend {
    /// Key buffer reused across tasks and tensors, so a run allocates it once per size class.
    keys: Mutex<Vec<u32>>,
    /// Mask buffers returned after each group: fresh large allocations cost a page fault and a
    /// page clear per 4 KiB, which showed up as 12 % of a merge's time.
    masks: Mutex<Vec<Vec<u64>>>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
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
    let task = &g.tasks[t];
    load(task.theta, off, len, &mut sc.th);
    let uses_base = matches!(
        spec.score,
        ScoreKind::AbsTaskVector | ScoreKind::AbsTaskVectorGrad
    );
    if uses_base {
        load(g.base, off, len, &mut sc.b);
    }
    if spec.score.needs_grad() {
        load(
            task.grad.expect("the plan gives gradients to sta tensors"),
            off,
            len,
            &mut sc.g,
        );
    }
    sc.s.resize(len, 0.0);
    let (th, b, gr, s) = (&sc.th, &sc.b, &sc.g, &mut sc.s);
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

#[derive(Default)]
struct FuseScratch {
    b: Vec<f32>,
    st: Vec<f32>,
    th: Vec<f32>,
    u: Vec<Vec<f32>>,
    acc: Vec<f32>,
    sum: Vec<f32>,
    div: Vec<f32>,
}

/// For each byte of a mask word, the eight lanes as all-ones (keep) or zero (drop) bit masks:
/// `f32::from_bits(v.to_bits() & lane)` keeps v or makes it +0.0 without a branch.
const BYTE_LANES: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut i = 0;
        while i < 8 {
            t[b][i] = if (b >> i) & 1 == 1 { u32::MAX } else { 0 };
            i += 1;
        }
        b += 1;
    }
    t
};

/// Mask bit `i` of a chunk starting at element `off` (a multiple of 64).
#[inline(always)]
fn word(mask: &Option<Vec<u64>>, off: usize, j: usize) -> u64 {
    match mask {
        None => u64::MAX,
        Some(w) => w[(off >> 6) + j],
    }
}

/// The fuse of docs/SEMANTICS.md over elements `off..off+len`, into `out`.
///
/// Masked-out terms are stored as +0.0 and added: the sums start at +0.0 and, in round-to-nearest,
/// a sum of floats is -0.0 only when both operands are, so adding +0.0 gives the same bits as
/// skipping the term. That turns every loop below into a straight, vectorisable pass over a task.
#[inline(always)]
fn fuse_chunk(
    g: &Group,
    masks: &[Option<Vec<u64>>],
    f: &FuseSpec,
    off: usize,
    out: &mut [u8],
    sc: &mut FuseScratch,
    combos: &mut [u64],
) -> Option<Fault> {
    let len = out.len() / f.out.size();
    let nt = g.tasks.len();
    let mut fault = None;
    load(g.base, off, len, &mut sc.b);
    if let Some(s) = g.start {
        load(s, off, len, &mut sc.st);
        if let Some(i) = sc.st.iter().position(|v| !v.is_finite()) {
            fault = Some(Fault {
                source: Source::Start,
                index: (off + i) as u64,
                value_is_nan: sc.st[i].is_nan(),
            });
        }
    }
    sc.u.resize_with(nt, Vec::new);
    // u_t = w_t * tau_t' where kept, +0.0 elsewhere.
    for t in 0..nt {
        load(g.tasks[t].theta, off, len, &mut sc.th);
        let (b, th) = (&sc.b, &sc.th);
        let u = &mut sc.u[t];
        u.resize(len, 0.0);
        let w = f.weights[t];
        let mut bad = false;
        match f.rescale[t] {
            Some(d) => u
                .iter_mut()
                .zip(th.iter().zip(b))
                .for_each(|(o, (&t, &b))| {
                    let tau = t - b;
                    bad |= !tau.is_finite();
                    *o = w * (tau / d);
                }),
            None => u
                .iter_mut()
                .zip(th.iter().zip(b))
                .for_each(|(o, (&t, &b))| {
                    let tau = t - b;
                    bad |= !tau.is_finite();
                    *o = w * tau;
                }),
        }
        if bad {
            let i = (0..len)
                .find(|&i| !(th[i] - b[i]).is_finite())
                .expect("a bad element exists");
            let source = if !b[i].is_finite() {
                Source::Base
            } else {
                Source::Theta(t)
            };
            let tau = th[i] - b[i];
            fault = first_fault(
                fault,
                Some(Fault {
                    source,
                    index: (off + i) as u64,
                    value_is_nan: tau.is_nan(),
                }),
            );
        }
        if masks[t].is_some() {
            for (j, c) in u.chunks_mut(64).enumerate() {
                let m = word(&masks[t], off, j);
                for (byte, c8) in c.chunks_mut(8).enumerate() {
                    let lanes = &BYTE_LANES[((m >> (8 * byte)) & 0xff) as usize];
                    for (v, keep) in c8.iter_mut().zip(lanes) {
                        *v = f32::from_bits(v.to_bits() & keep);
                    }
                }
            }
        }
    }
    if fault.is_some() {
        return fault;
    }
    sc.acc.clear();
    sc.acc.resize(len, 0.0);
    let acc = &mut sc.acc;
    match f.rule {
        FuseRule::Linear => {
            for t in 0..nt {
                let u = &sc.u[t];
                if f.forget[t] {
                    acc.iter_mut().zip(u).for_each(|(a, x)| *a -= *x);
                } else {
                    acc.iter_mut().zip(u).for_each(|(a, x)| *a += *x);
                }
            }
            if f.normalize {
                let d = f.linear_divisor();
                acc.iter_mut().for_each(|a| *a /= d);
            }
        }
        FuseRule::Ties => {
            // The elected sign is the sign of the sum of every kept term.
            let sum = &mut sc.sum;
            sum.clear();
            sum.resize(len, 0.0);
            for t in 0..nt {
                sum.iter_mut().zip(&sc.u[t]).for_each(|(a, x)| *a += *x);
            }
            sc.div.clear();
            sc.div.resize(len, 0.0);
            let div = &mut sc.div;
            for t in 0..nt {
                let w = f.weights[t];
                for ((a, d), (&u, &s)) in acc
                    .iter_mut()
                    .zip(div.iter_mut())
                    .zip(sc.u[t].iter().zip(sum.iter()))
                {
                    let agree = ((u > 0.0) & (s >= 0.0)) | ((u < 0.0) & (s < 0.0));
                    *a += if agree { u } else { 0.0 };
                    *d += if agree { w } else { 0.0 };
                }
            }
            if f.normalize {
                acc.iter_mut()
                    .zip(div.iter())
                    .for_each(|(a, d)| *a /= if *d == 0.0 { 1.0 } else { *d });
            }
        }
    }
    let start = if g.start.is_some() { &sc.st } else { &sc.b };
    acc.iter_mut()
        .zip(start)
        .for_each(|(a, s)| *a = *s + f.lambda * *a);
    narrow(f.out, acc, out);
    if !combos.is_empty() {
        for j in 0..len.div_ceil(64) {
            let mut words = [0u64; MAX_COMBO_TASKS];
            for (w, m) in words.iter_mut().zip(masks) {
                *w = word(m, off, j);
            }
            let valid = u64::MAX >> (64 - 64.min(len - j * 64));
            count_combos(&words[..nt], valid, combos);
        }
    }
    None
}

/// Adds to `combos[c]` the number of valid lanes whose bits across the task words spell c
/// (bit t of c: task t kept the lane).
#[inline(always)]
fn count_combos(words: &[u64], valid: u64, combos: &mut [u64]) {
    let nt = words.len();
    if nt <= 5 {
        // Split the lanes task by task into 2^nt disjoint sets and count each set at once:
        // (2^(nt+1) + 2^nt popcounts) per 64 lanes, against 64 * nt bit steps below.
        let mut sets = [0u64; 1 << 5];
        sets[0] = valid;
        for (t, &w) in words.iter().enumerate() {
            for c in 0..1usize << t {
                sets[c | 1 << t] = sets[c] & w;
                sets[c] &= !w;
            }
        }
        for (n, s) in combos.iter_mut().zip(&sets[..1 << nt]) {
            *n += s.count_ones() as u64;
        }
    } else {
        for bit in 0..64 - valid.leading_zeros() {
            let mut c = 0usize;
            for (t, w) in words.iter().enumerate() {
                c |= (((w >> bit) & 1) as usize) << t;
            }
            combos[c] += 1;
        }
    }
}

fn fuse(g: &Group, masks: &[Option<Vec<u64>>], f: &FuseSpec, out: &mut [u8]) -> BResult<Vec<u64>> {
    let nt = g.tasks.len();
    let track = nt <= MAX_COMBO_TASKS && masks.iter().any(Option::is_some);
    let ncombo = if track { 1usize << nt } else { 0 };
    let (fault, combos) = out
        .par_chunks_mut(CH * f.out.size())
        .enumerate()
        .map(|(ci, oc)| {
            let mut combos = vec![0u64; ncombo];
            let fl = FUSE_SCRATCH.with_borrow_mut(|sc| {
                crate::wide!(fuse_chunk(g, masks, f, ci * CH, oc, sc, &mut combos))
            });
            (fl, combos)
        })
        .reduce(
            || (None, vec![0u64; ncombo]),
            |(fa, mut ca), (fb, cb)| {
                for (x, y) in ca.iter_mut().zip(cb) {
                    *x += y;
                }
                (first_fault(fa, fb), ca)
            },
        );
    fault_result(fault)?;
    Ok(combos)
}

/// The CPU computes each group when it is handed over: the default hand-over.
impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
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
        let n = g.n;
        let mut masks: Vec<Option<Vec<u64>>> = Vec::with_capacity(jobs.len());
        let mut stats = Vec::with_capacity(jobs.len());
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        for (t, job) in jobs.iter().enumerate() {
            let (mask, st) = match *job {
                MaskJob::All => (
                    None,
                    TaskStats {
                        kept: n as u64,
                        ..Default::default()
                    },
                ),
                MaskJob::TopK { k, .. } if k >= n as u64 => (
                    None,
                    TaskStats {
                        kept: n as u64,
                        ..Default::default()
                    },
                ),
                MaskJob::TopK { spec, k } => {
                    keys.resize(n, 0);
                    let hist1 = compute_keys(g, t, &spec, &mut keys[..n])?;
                    let mut m = self.spare_mask();
                    m.resize(n.div_ceil(64), 0);
                    let th = radix::select_masked(&keys[..n], k, &hist1, &mut m);
                    (
                        Some(m),
                        TaskStats {
                            kept: k,
                            threshold: Some(th),
                            ties_kept: th.count_eq.min(k - th.count_gt),
                        },
                    )
                }
                MaskJob::Fixed {
                    spec,
                    key,
                    tie_quota,
                } => {
                    keys.resize(n, 0);
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
                    let mut m = self.spare_mask();
                    m.resize(n.div_ceil(64), 0);
                    radix::fill_mask(&keys[..n], &th, &mut m);
                    (
                        Some(m),
                        TaskStats {
                            kept: gt + ties,
                            threshold: Some(th),
                            ties_kept: ties,
                        },
                    )
                }
                MaskJob::Random { stream, threshold } => {
                    let m = dare_mask(n, stream, threshold, self.spare_mask());
                    let kept = popcount(&m);
                    (
                        Some(m),
                        TaskStats {
                            kept,
                            ..Default::default()
                        },
                    )
                }
            };
            masks.push(mask);
            stats.push(st);
        }
        drop(keys);
        let combos = fuse(g, &masks, f, out);
        self.masks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(masks.into_iter().flatten());
        let combos = combos?;
        Ok(GroupStats {
            tasks: stats,
            combos,
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
mod tests {
    use super::*;

    #[test]
    fn combos_count_every_valid_lane_once_by_its_task_bits() {
        let mut s = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for nt in 1..=MAX_COMBO_TASKS {
            for lanes in [1u32, 17, 63, 64] {
                let words: Vec<u64> = (0..nt).map(|_| next()).collect();
                let valid = u64::MAX >> (64 - lanes);
                let mut got = vec![0u64; 1 << nt];
                count_combos(&words, valid, &mut got);
                let mut want = vec![0u64; 1 << nt];
                for lane in 0..lanes {
                    let c: usize = (0..nt)
                        .map(|t| (((words[t] >> lane) & 1) as usize) << t)
                        .sum();
                    want[c] += 1;
                }
                assert_eq!(got, want, "nt={nt} lanes={lanes}");
            }
        }
    }

    #[test]
    fn top_digit_counts_match_a_plain_count() {
        let keys: Vec<u32> = (0..10_007u32)
            .map(|i| i.wrapping_mul(2_654_435_761) | (i % 3) << 30)
            .collect();
        let mut got = vec![1u64; 1 << 11];
        count_top_digit(&keys, &mut got);
        let mut want = vec![1u64; 1 << 11];
        for k in &keys {
            want[(k >> 21) as usize] += 1;
        }
        assert_eq!(got, want);
    }
}
