//! The CPU rules of the sparsifying methods (`method::sparse`, docs/SEMANTICS.md "Sparsifying
//! methods"): breadcrumbs' band of ranks and DELLA's per-row keeps (task masks), mergekit's L1
//! rescale (one factor per task, after the mask), and the sce and ram fuses (which make their
//! own masks from every task at once). cpu/mod.rs dispatches here; the loaders, the key pass and
//! the fixed-order sum are its own.
//!
//! What a GPU port must reproduce: every per-tensor sum is `dsum`'s tree over fp32 terms; counts
//! are exact; ranks break ties by the lowest index (largest first); element arithmetic is fp32
//! with one rounding per written operation, in the order written here.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{compute_keys, fault_result, first_fault, load, CpuBackend, CH};
use crate::backend::{BResult, Fault, FuseSpec, Group, GroupStats, MaskJob, Source, TaskStats};
use crate::dtype::narrow;
use crate::method::{sparse, FuseRule, KeySpec, Rows};
use crate::select::{self, dare, dsum, radix, Threshold};

thread_local! {
    static SPARSE_SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    b: Vec<f32>,
    th: Vec<f32>,
    s: Vec<f32>,
    /// Per input task: τ of the chunk.
    tau: Vec<Vec<f32>>,
    acc: Vec<f32>,
    /// DELLA's row order: (key << 32) | !j.
    order: Vec<u64>,
}

/// Whether the group's fuse is one of this module's whole-group rules (sce, ram).
pub(super) fn owns_fuse(f: &FuseSpec) -> bool {
    matches!(f.rule, FuseRule::Sce | FuseRule::Ram | FuseRule::RamPlus)
}

/// Task `t`'s mask for a `Band` or `Della` job, in `words` (reused buffer).
pub(super) fn mask(
    g: &Group,
    t: usize,
    job: &MaskJob,
    keys: &mut Vec<u32>,
    mut words: Vec<u64>,
) -> BResult<(Option<Vec<u64>>, TaskStats)> {
    let n = g.n;
    words.clear();
    words.resize(n.div_ceil(64), 0);
    match *job {
        MaskJob::Band { spec, drop, keep } => {
            let th = band(g, t, &spec, drop, keep, keys, &mut words)?;
            Ok((
                Some(words),
                TaskStats {
                    kept: keep,
                    threshold: th,
                    ties_kept: 0,
                },
            ))
        }
        MaskJob::Della {
            stream,
            rows,
            lo,
            eps,
        } => {
            della(g, t, stream, rows, lo, eps, &mut words);
            let kept = words.par_iter().map(|w| w.count_ones() as u64).sum();
            Ok((
                Some(words),
                TaskStats {
                    kept,
                    ..Default::default()
                },
            ))
        }
        _ => unreachable!("cpu/mod.rs makes the other masks"),
    }
}

/// Breadcrumbs: keep ranks `drop .. drop + keep` of the keys (largest first, lowest index
/// first among equals): the top `drop + keep` minus the top `drop`, two radix selects.
fn band(
    g: &Group,
    t: usize,
    spec: &KeySpec,
    drop: u64,
    keep: u64,
    keys: &mut Vec<u32>,
    words: &mut [u64],
) -> BResult<Option<Threshold>> {
    let n = g.n;
    if keep == 0 {
        return Ok(None);
    }
    keys.resize(n, 0);
    let keys = &mut keys[..n];
    compute_keys(g, t, spec, keys)?;
    let hi = radix::radix_select(keys, drop + keep);
    let lo = (drop > 0).then(|| radix::radix_select(keys, drop));
    let keys = &*keys;
    words
        .par_chunks_mut(CH / 64)
        .enumerate()
        .for_each(|(ci, wc)| {
            for (wi, w) in wc.iter_mut().enumerate() {
                let start = ci * CH + wi * 64;
                let mut bits = 0u64;
                for i in start..(start + 64).min(n) {
                    let (k, ix) = (keys[i], i as u64);
                    let kept = hi.keeps(k, ix) & !lo.is_some_and(|l| l.keeps(k, ix));
                    bits |= (kept as u64) << (i - start);
                }
                *w = bits;
            }
        });
    Ok(Some(hi))
}

/// DELLA: in each row (`Rows`), the entries ordered by |τ| ascending (among equal keys the
/// higher index first, so that the largest-first order is top-k's), entry of rank r kept where
/// `dare::keep` falls below `della_probability(r)`. The rows of one slab (`[i, .., ..]`) are
/// contiguous in memory; slabs are grouped so that each group starts on a mask word, and groups
/// run in parallel, each writing its own words (no per-element scratch beyond one slab).
fn della(g: &Group, t: usize, stream: u64, rows: Rows, lo: f32, eps: f32, words: &mut [u64]) {
    let n = g.n;
    let (len, stride) = (rows.len as usize, rows.stride as usize);
    let slab = len * stride;
    if n == 0 || slab == 0 {
        return;
    }
    // Slabs per group: the fewest whose total is a multiple of 64 entries.
    let per = 64 / gcd(slab, 64);
    words
        .par_chunks_mut(per * slab / 64)
        .enumerate()
        .for_each(|(gi, wc)| {
            SPARSE_SCRATCH.with_borrow_mut(|sc| {
                for s in 0..per {
                    let off = (gi * per + s) * slab;
                    if off >= n {
                        break;
                    }
                    load(g.base, off, slab, &mut sc.b);
                    load(g.tasks[t].theta, off, slab, &mut sc.th);
                    for r in 0..stride {
                        sc.order.clear();
                        for j in 0..len {
                            let x = j * stride + r;
                            let key = select::key((sc.th[x] - sc.b[x]).abs());
                            sc.order.push((key as u64) << 32 | (!(j as u32)) as u64);
                        }
                        sc.order.sort_unstable();
                        for (rank, &c) in sc.order.iter().enumerate() {
                            let x = (!(c as u32)) as usize * stride + r;
                            let p = sparse::della_probability(rank as u64, len as u64, lo, eps);
                            let keep = dare::keep(
                                stream,
                                (off + x) as u64,
                                sparse::probability_threshold(p),
                            );
                            let local = s * slab + x;
                            wc[local / 64] |= (keep as u64) << (local % 64);
                        }
                    }
                }
            })
        });
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// mergekit's L1 rescale: the fuse with `scale[t]` set for every `rescale_l1` task (None when
/// no task asks for it). Σ|τ| and Σ|kept τ| are `dsum`'s tree over the f32 |τ| (dropped
/// entries as +0.0), over the whole tensor.
pub(super) fn with_l1_scales(
    g: &Group,
    masks: &[Option<Vec<u64>>],
    f: &FuseSpec,
) -> Option<FuseSpec> {
    if !f.rescale_l1.iter().any(|&b| b) {
        return None;
    }
    let mut out = f.clone();
    for t in 0..g.tasks.len() {
        if f.rescale_l1[t] {
            let (before, after) = l1_sums(g, t, masks[t].as_deref());
            out.scale[t] = sparse::l1_factor(before, after);
        }
    }
    Some(out)
}

/// mergekit's L1 factors for a backend that applies them in its own fuse (the CUDA kernels'
/// `FuseTask::scale`): the masks this backend would make for the tasks that rescale (DARE's
/// counter-based keeps, or everything kept) and [`with_l1_scales`] over them, so the factors are
/// this backend's by construction. None when no task asks for the rescale; an error when a
/// rescaling task's mask needs the tensor's keys (top-k and the other ranked masks), which only
/// a merge computes.
pub fn l1_scales(g: &Group, jobs: &[MaskJob], f: &FuseSpec) -> Result<Option<FuseSpec>, String> {
    if !f.rescale_l1.iter().any(|&b| b) {
        return Ok(None);
    }
    let n = g.n;
    let mut masks: Vec<Option<Vec<u64>>> = Vec::with_capacity(jobs.len());
    for (t, job) in jobs.iter().enumerate() {
        let rescales = f.rescale_l1.get(t).copied().unwrap_or(false);
        masks.push(match *job {
            _ if !rescales => None,
            MaskJob::All => None,
            MaskJob::TopK { k, .. } if k >= n as u64 => None,
            MaskJob::Random { stream, threshold } => {
                Some(super::dare_mask(n, stream, threshold, Vec::new()))
            }
            ref job => {
                return Err(format!(
                    "the L1 rescale of task {t} of `{}` needs its {job:?} mask, which only a \
                     merge computes",
                    g.name
                ))
            }
        });
    }
    Ok(with_l1_scales(g, &masks, f))
}

fn l1_sums(g: &Group, t: usize, mask: Option<&[u64]>) -> (f64, f64) {
    let n = g.n;
    let parts: Vec<(f64, f64)> = (0..n.div_ceil(dsum::CHUNK))
        .into_par_iter()
        .map(|c| {
            let off = c * dsum::CHUNK;
            let len = dsum::CHUNK.min(n - off);
            SPARSE_SCRATCH.with_borrow_mut(|sc| {
                load(g.base, off, len, &mut sc.b);
                load(g.tasks[t].theta, off, len, &mut sc.th);
                sc.s.resize(len, 0.0);
                for ((s, &th), &b) in sc.s.iter_mut().zip(&sc.th).zip(&sc.b) {
                    *s = (th - b).abs();
                }
                let before = dsum::chunk_sum(&sc.s);
                let Some(m) = mask else {
                    return (before, before);
                };
                for (i, s) in sc.s.iter_mut().enumerate() {
                    if (m[(off + i) / 64] >> ((off + i) % 64)) & 1 == 0 {
                        *s = 0.0;
                    }
                }
                (before, dsum::chunk_sum(&sc.s))
            })
        })
        .collect();
    let (b, a): (Vec<f64>, Vec<f64>) = parts.into_iter().unzip();
    (dsum::combine(&b), dsum::combine(&a))
}

/// Loads the base and each input task's τ of elements `off..off+len` into `sc`; the first
/// non-finite τ as a fault (the base blamed when it is the bad input), as cpu/fuse.rs does.
fn load_taus(
    g: &Group,
    inputs: &[usize],
    off: usize,
    len: usize,
    sc: &mut Scratch,
) -> Option<Fault> {
    load(g.base, off, len, &mut sc.b);
    sc.tau.resize_with(inputs.len(), Vec::new);
    let mut fault = None;
    for (k, &t) in inputs.iter().enumerate() {
        load(g.tasks[t].theta, off, len, &mut sc.th);
        let tau = &mut sc.tau[k];
        tau.resize(len, 0.0);
        let mut bad = false;
        for ((o, &th), &b) in tau.iter_mut().zip(&sc.th).zip(&sc.b) {
            *o = th - b;
            bad |= !o.is_finite();
        }
        if bad {
            let i = tau
                .iter()
                .position(|v| !v.is_finite())
                .expect("a bad value");
            fault = first_fault(
                fault,
                Some(Fault {
                    source: if sc.b[i].is_finite() {
                        Source::Theta(t)
                    } else {
                        Source::Base
                    },
                    index: (off + i) as u64,
                    value_is_nan: tau[i].is_nan(),
                }),
            );
        }
    }
    fault
}

#[inline(always)]
fn bit(words: &[u64], i: usize) -> bool {
    (words[i / 64] >> (i % 64)) & 1 == 1
}

impl CpuBackend {
    /// The sce and ram fuses, masks included (their jobs are all `MaskJob::All`).
    pub(super) fn merge_sparse(
        &self,
        g: &Group,
        f: &FuseSpec,
        out: &mut [u8],
    ) -> BResult<GroupStats> {
        // The tensor's inputs: a task that is not one has weight 0 (work::fuse_spec).
        let inputs: Vec<usize> = (0..g.tasks.len())
            .filter(|&t| f.weights[t] != 0.0)
            .collect();
        let (kept, per_task) = match f.rule {
            FuseRule::Sce => self.sce(g, &inputs, f, out)?,
            FuseRule::Ram | FuseRule::RamPlus => ram(g, &inputs, f, out)?,
            _ => unreachable!("owns_fuse"),
        };
        let mut tasks = vec![TaskStats::default(); g.tasks.len()];
        for (k, &t) in inputs.iter().enumerate() {
            tasks[t].kept = per_task.get(k).copied().unwrap_or(kept);
        }
        Ok(GroupStats {
            tasks,
            combos: Vec::new(),
        })
    }

    /// sce (`merge_methods/sce.py`): returns the entries of the shared mask.
    fn sce(
        &self,
        g: &Group,
        inputs: &[usize],
        f: &FuseSpec,
        out: &mut [u8],
    ) -> BResult<(u64, Vec<u64>)> {
        let n = g.n;
        let nt = inputs.len();
        let topk = f.sparse.select_topk;
        // 1. Select: the positions of the largest variance across the tasks, shared by all.
        let mask: Option<Vec<u64>> = if topk >= 1.0 || nt == 0 {
            None
        } else if topk <= 0.0 {
            Some(vec![0u64; n.div_ceil(64)])
        } else {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.resize(n, 0);
            let nonzero: u64 = keys[..n]
                .par_chunks_mut(CH)
                .enumerate()
                .map(|(ci, kc)| {
                    SPARSE_SCRATCH.with_borrow_mut(|sc| {
                        let _ = load_taus(g, inputs, ci * CH, kc.len(), sc);
                        let mut nz = 0u64;
                        for (i, k) in kc.iter_mut().enumerate() {
                            let v = sce_variance(sc.tau.iter().map(|x| x[i]));
                            nz += (v != 0.0) as u64;
                            *k = select::key(v);
                        }
                        nz
                    })
                })
                .sum();
            let k = sparse::sce_count(nonzero, topk, n as u64);
            let mut words = vec![0u64; n.div_ceil(64)];
            if k > 0 {
                let th = radix::radix_select(&keys[..n], k);
                radix::fill_mask(&keys[..n], &th, &mut words);
            }
            Some(words)
        };
        let kept = mask.as_ref().map_or(n as u64, |m| {
            m.par_iter().map(|w| w.count_ones() as u64).sum()
        });
        // 2. Calculate: each task's energy mean(τ'²) over the masked tensor, then the weights.
        let mut energy = Vec::with_capacity(nt);
        for k in 0..nt {
            let t = [inputs[k]];
            let parts: Vec<f64> = (0..n.div_ceil(dsum::CHUNK))
                .into_par_iter()
                .map(|c| {
                    let off = c * dsum::CHUNK;
                    let len = dsum::CHUNK.min(n - off);
                    SPARSE_SCRATCH.with_borrow_mut(|sc| {
                        let _ = load_taus(g, &t, off, len, sc);
                        let Scratch { tau, s, .. } = sc;
                        s.resize(len, 0.0);
                        for (i, (o, &x)) in s.iter_mut().zip(&tau[0]).enumerate() {
                            let x = masked(x, mask.as_deref(), off + i);
                            *o = x * x;
                        }
                        dsum::chunk_sum(s)
                    })
                })
                .collect();
            energy.push((dsum::combine(&parts) / n as f64) as f32);
        }
        let w = sparse::sce_weights(&energy);
        // 3. Erase and fuse.
        let mask = mask.as_deref();
        fuse_chunks(g, inputs, f, out, |sc, off, acc| {
            let len = acc.len();
            for i in 0..len {
                let mut s = 0f32;
                for tau in &sc.tau {
                    s += masked(tau[i], mask, off + i);
                }
                let (mut num, mut den) = (0f32, 0f32);
                for (k, tau) in sc.tau.iter().enumerate() {
                    let x = masked(tau[i], mask, off + i);
                    let agree = if s >= 0.0 { x > 0.0 } else { x < 0.0 };
                    let ew = w[k] * agree as u8 as f32;
                    num += x * ew;
                    den += ew;
                }
                acc[i] = num / den.max(1e-6);
            }
        })?;
        Ok((kept, Vec::new()))
    }
}

/// τ·m as mergekit multiplies by the mask (+0.0 or −0.0 where dropped).
#[inline(always)]
fn masked(x: f32, mask: Option<&[u64]>, i: usize) -> f32 {
    match mask {
        Some(m) => x * bit(m, i) as u8 as f32,
        None => x,
    }
}

/// The population variance of the tasks' τ at one position, in f64 (torch's `var` accumulates
/// in double on the CPU), rounded once to f32: mean first, then the mean squared deviation.
#[inline(always)]
fn sce_variance(xs: impl Iterator<Item = f32> + Clone) -> f32 {
    let (mut sum, mut n) = (0f64, 0u32);
    for x in xs.clone() {
        sum += x as f64;
        n += 1;
    }
    let mean = sum / n as f64;
    let mut sq = 0f64;
    for x in xs {
        let d = x as f64 - mean;
        sq += d * d;
    }
    (sq / n as f64) as f32
}

/// ram and ramplus_tl (`merge_methods/ram.py`): per position, c tasks change it (|τ| > ε);
/// c = 1 keeps that task's τ (ramplus_tl: times its λ_t), c > 1 adds each changed τ / c.
/// Returns each task's count of changed entries.
fn ram(g: &Group, inputs: &[usize], f: &FuseSpec, out: &mut [u8]) -> BResult<(u64, Vec<u64>)> {
    let nt = inputs.len();
    let eps = f.sparse.epsilon;
    let changed = |x: f32| (x.abs() > eps) as u8 as f32;
    // Per task: entries it changes alone, entries it changes with others (exact counts).
    let counts: Vec<(u64, u64)> = (0..g.n.div_ceil(CH))
        .into_par_iter()
        .map(|c| {
            let off = c * CH;
            let len = CH.min(g.n - off);
            SPARSE_SCRATCH.with_borrow_mut(|sc| {
                let _ = load_taus(g, inputs, off, len, sc);
                let mut cnt = vec![(0u64, 0u64); nt];
                for i in 0..len {
                    let c: u32 = sc.tau.iter().map(|x| (x[i].abs() > eps) as u32).sum();
                    for (k, tau) in sc.tau.iter().enumerate() {
                        if tau[i].abs() > eps {
                            cnt[k].0 += (c == 1) as u64;
                            cnt[k].1 += (c > 1) as u64;
                        }
                    }
                }
                cnt
            })
        })
        .reduce(
            || vec![(0, 0); nt],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| {
                    x.0 += y.0;
                    x.1 += y.1
                });
                a
            },
        );
    let lambda: Option<Vec<f32>> = (f.rule == FuseRule::RamPlus).then(|| {
        counts
            .iter()
            .map(|&(unique, shared)| {
                sparse::ramplus_lambda(shared, unique, eps, f.sparse.r, f.sparse.alpha)
            })
            .collect()
    });
    fuse_chunks(g, inputs, f, out, |sc, _, acc| {
        for (i, a) in acc.iter_mut().enumerate() {
            let c: u32 = sc.tau.iter().map(|x| (x[i].abs() > eps) as u32).sum();
            let (unique, overlap) = ((c == 1) as u8 as f32, (c > 1) as u8 as f32);
            let div = c.max(1) as f32;
            let mut merged = 0f32;
            for (k, tau) in sc.tau.iter().enumerate() {
                let z = tau[i] * changed(tau[i]);
                let mut u = z * unique;
                if let Some(l) = &lambda {
                    u *= l[k];
                }
                merged += u + z * overlap / div;
            }
            *a = merged;
        }
    })?;
    Ok((0, counts.iter().map(|c| c.0 + c.1).collect()))
}

/// The element pass of the whole-group rules: per chunk, the tasks' τ into `sc.tau`, `rule`
/// writes each element's merged delta into `acc`, and the output is `narrow(b + acc)`.
fn fuse_chunks(
    g: &Group,
    inputs: &[usize],
    f: &FuseSpec,
    out: &mut [u8],
    rule: impl Fn(&Scratch, usize, &mut [f32]) + Sync,
) -> BResult<()> {
    let fault = out
        .par_chunks_mut(CH * f.out.size())
        .enumerate()
        .map(|(ci, oc)| {
            let off = ci * CH;
            let len = oc.len() / f.out.size();
            SPARSE_SCRATCH.with_borrow_mut(|sc| {
                let fault = load_taus(g, inputs, off, len, sc);
                if fault.is_some() {
                    return fault;
                }
                let mut acc = std::mem::take(&mut sc.acc);
                acc.clear();
                acc.resize(len, 0.0);
                rule(sc, off, &mut acc);
                for (a, &b) in acc.iter_mut().zip(&sc.b) {
                    *a += b;
                }
                narrow(f.out, &acc, oc);
                sc.acc = acc;
                None
            })
        })
        .reduce(|| None, first_fault);
    fault_result(fault)
}
