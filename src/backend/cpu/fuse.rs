//! The CPU fuse (docs/SEMANTICS.md, "Fuse"): each chunk of the output from the base, every
//! task's masked task vector and the start model, in blocks small enough that every scratch
//! array stays in L1.

use rayon::prelude::*;

use super::{fault_result, first_fault, load, FuseScratch, CH, FUSE_SCRATCH};
use crate::backend::{BResult, Fault, FuseSpec, Group, Source};
use crate::dtype::narrow;
use crate::method::FuseRule;

/// The most tasks whose mask combinations are counted for the overlap report.
pub const MAX_COMBO_TASKS: usize = 8;

/// Elements per block: 4 KiB per f32 scratch array, the eight of them ~32 KiB of L1. At 16 Ki
/// (the chunk), each array was 64 KiB and every loop streamed through L2.
pub(super) const BLOCK: usize = 1024;
const _: () = assert!(BLOCK % 64 == 0 && CH % BLOCK == 0);

/// The NaN every merged tensor holds for a NaN result (docs/SEMANTICS.md, "Output dtype");
/// narrowed, it is the canonical f16 (0x7E00) and bf16 (0x7FC0) NaN.
pub(super) const CANONICAL_NAN: f32 = f32::from_bits(0x7FC0_0000);

/// `start + λ·sum`, a NaN (finite inputs whose task vectors overflow) written as the canonical
/// NaN whatever sign and payload the arithmetic left: the GPU writes that one too.
#[inline(always)]
fn finish(start: f32, lambda: f32, sum: f32) -> f32 {
    let v = start + lambda * sum;
    if v.is_nan() {
        CANONICAL_NAN
    } else {
        v
    }
}

/// How a task's τ is scaled before its weight: not (`NONE`), divided by DARE's density
/// (`DIVIDE`, `FuseSpec::rescale`), or multiplied by mergekit's L1 factor (`MULTIPLY`,
/// `FuseSpec::scale`); the rescale wins where a task has both, as in the rules.
pub(super) const NONE: u8 = 0;
pub(super) const DIVIDE: u8 = 1;
pub(super) const MULTIPLY: u8 = 2;

/// Task t's scaling and its factor.
fn scaling(f: &FuseSpec, t: usize) -> (u8, f32) {
    match (f.rescale[t], f.scale[t]) {
        (Some(d), _) => (DIVIDE, d),
        (None, Some(s)) => (MULTIPLY, s),
        (None, None) => (NONE, 1.0),
    }
}

/// The one scaling every task of the group can share, for the one-loop fuse: a task without
/// one divides or multiplies by 1, which leaves τ exactly as it is. None when tasks divide and
/// others multiply.
fn shared_scaling(f: &FuseSpec) -> Option<u8> {
    let divide = f.rescale.iter().any(Option::is_some);
    let multiply = (0..f.rescale.len()).any(|t| scaling(f, t).0 == MULTIPLY);
    match (divide, multiply) {
        (false, false) => Some(NONE),
        (true, false) => Some(DIVIDE),
        (false, true) => Some(MULTIPLY),
        (true, true) => None,
    }
}

/// Mask word `j` of a block starting at element `off` (a multiple of 64).
#[inline(always)]
fn word(mask: &Option<Vec<u64>>, off: usize, j: usize) -> u64 {
    match mask {
        None => u64::MAX,
        Some(w) => w[(off >> 6) + j],
    }
}

/// The fuse over elements `off..off+len` (at most one chunk), into `out`.
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
    let size = f.out.size();
    let len = out.len() / size;
    let nt = g.tasks.len();
    for (bi, ob) in out.chunks_mut(BLOCK * size).enumerate() {
        let boff = off + bi * BLOCK;
        // Blocks run in index order, so the first block with a fault holds the lowest index.
        if let Some(fault) = fuse_block(g, masks, f, boff, ob, sc) {
            return Some(fault);
        }
        if !combos.is_empty() {
            let blen = ob.len() / size;
            match nt {
                1 => block_combos::<1>(masks, boff, blen, combos),
                2 => block_combos::<2>(masks, boff, blen, combos),
                3 => block_combos::<3>(masks, boff, blen, combos),
                4 => block_combos::<4>(masks, boff, blen, combos),
                5 => block_combos::<5>(masks, boff, blen, combos),
                _ => {
                    for j in 0..blen.div_ceil(64) {
                        let mut words = [0u64; MAX_COMBO_TASKS];
                        for (w, m) in words.iter_mut().zip(masks) {
                            *w = word(m, boff, j);
                        }
                        let valid = u64::MAX >> (64 - 64.min(blen - j * 64));
                        count_combos(&words[..nt], valid, combos);
                    }
                }
            }
        }
    }
    debug_assert!(len == 0 || off % 64 == 0);
    None
}

/// One block of [`fuse_chunk`].
///
/// Masked-out terms are stored as +0.0 and added: the sums start at +0.0 and, in round-to-nearest,
/// a sum of floats is -0.0 only when both operands are, so adding +0.0 gives the same bits as
/// skipping the term. That turns every loop below into a straight, vectorisable pass over a task.
/// The first task's loop computes `0.0 + x` into the sums instead of adding to zeroed memory: the
/// same bits, without the memset.
#[inline(always)]
fn fuse_block(
    g: &Group,
    masks: &[Option<Vec<u64>>],
    f: &FuseSpec,
    off: usize,
    out: &mut [u8],
    sc: &mut FuseScratch,
) -> Option<Fault> {
    let len = out.len() / f.out.size();
    let nt = g.tasks.len();
    #[cfg(target_arch = "x86_64")]
    if fast_block(g, masks, f, off, out) {
        return None;
    }
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
    if (1..=MAX_ONE_LOOP).contains(&nt) && shared_scaling(f).is_some() {
        return one_loop(g, masks, f, off, out, sc, fault);
    }
    let linear = f.rule == FuseRule::Linear;
    sc.acc.resize(len, 0.0);
    if linear && nt == 0 {
        sc.acc.fill(0.0);
    }
    sc.u.resize_with(nt, Vec::new);
    for t in 0..nt {
        load(g.tasks[t].theta, off, len, &mut sc.th);
        let w = f.weights[t];
        let (mode, d) = scaling(f, t);
        // (`if let`, not `Option::map`: a closure left out of line is compiled without AVX2.)
        let m = if let Some(words) = &masks[t] {
            sc.lanes.resize(len, 0);
            expand(&words[off / 64..(off + len).div_ceil(64)], &mut sc.lanes);
            Some(&sc.lanes[..])
        } else {
            None
        };
        let bad = if linear {
            // Straight into the sum: acc ± u_t in task order, as the stored terms were added.
            let (acc, th, b) = (&mut sc.acc, &sc.th, &sc.b);
            let op = match (t == 0, f.forget[t]) {
                (true, false) => 1,
                (true, true) => 2,
                (false, false) => 3,
                (false, true) => 4,
            };
            match (mode, op) {
                (NONE, 1) => terms::<NONE, 1>(acc, th, b, w, d, m),
                (NONE, 2) => terms::<NONE, 2>(acc, th, b, w, d, m),
                (NONE, 3) => terms::<NONE, 3>(acc, th, b, w, d, m),
                (NONE, _) => terms::<NONE, 4>(acc, th, b, w, d, m),
                (DIVIDE, 1) => terms::<DIVIDE, 1>(acc, th, b, w, d, m),
                (DIVIDE, 2) => terms::<DIVIDE, 2>(acc, th, b, w, d, m),
                (DIVIDE, 3) => terms::<DIVIDE, 3>(acc, th, b, w, d, m),
                (DIVIDE, _) => terms::<DIVIDE, 4>(acc, th, b, w, d, m),
                (_, 1) => terms::<MULTIPLY, 1>(acc, th, b, w, d, m),
                (_, 2) => terms::<MULTIPLY, 2>(acc, th, b, w, d, m),
                (_, 3) => terms::<MULTIPLY, 3>(acc, th, b, w, d, m),
                (_, _) => terms::<MULTIPLY, 4>(acc, th, b, w, d, m),
            }
        } else {
            let u = &mut sc.u[t];
            u.resize(len, 0.0);
            match mode {
                NONE => terms::<NONE, 0>(u, &sc.th, &sc.b, w, d, m),
                DIVIDE => terms::<DIVIDE, 0>(u, &sc.th, &sc.b, w, d, m),
                _ => terms::<MULTIPLY, 0>(u, &sc.th, &sc.b, w, d, m),
            }
        };
        if bad {
            fault = first_fault(fault, tau_fault(t, off, &sc.th[..len], &sc.b[..len]));
        }
    }
    if fault.is_some() {
        return fault;
    }
    let acc = &mut sc.acc;
    match f.rule {
        FuseRule::Linear => {
            if f.normalize {
                let d = f.linear_divisor();
                acc.iter_mut().for_each(|a| *a /= d);
            }
        }
        FuseRule::Ties => {
            // The elected sign is the sign of the sum of every kept term.
            let sum = &mut sc.sum;
            sum.resize(len, 0.0);
            if nt == 0 {
                sum.fill(0.0);
            }
            for t in 0..nt {
                if t == 0 {
                    sum.iter_mut()
                        .zip(&sc.u[t])
                        .for_each(|(a, x)| *a = 0.0 + *x);
                } else {
                    sum.iter_mut().zip(&sc.u[t]).for_each(|(a, x)| *a += *x);
                }
            }
            sc.div.resize(len, 0.0);
            let div = &mut sc.div;
            if nt == 0 {
                acc.fill(0.0);
                div.fill(0.0);
            }
            for t in 0..nt {
                let w = f.weights[t];
                let pairs = acc
                    .iter_mut()
                    .zip(div.iter_mut())
                    .zip(sc.u[t].iter().zip(sum.iter()));
                if t == 0 {
                    for ((a, d), (&u, &s)) in pairs {
                        let agree = ((u > 0.0) & (s >= 0.0)) | ((u < 0.0) & (s < 0.0));
                        *a = 0.0 + if agree { u } else { 0.0 };
                        *d = 0.0 + if agree { w } else { 0.0 };
                    }
                } else {
                    for ((a, d), (&u, &s)) in pairs {
                        let agree = ((u > 0.0) & (s >= 0.0)) | ((u < 0.0) & (s < 0.0));
                        *a += if agree { u } else { 0.0 };
                        *d += if agree { w } else { 0.0 };
                    }
                }
            }
            if f.normalize {
                acc.iter_mut()
                    .zip(div.iter())
                    .for_each(|(a, d)| *a /= if *d == 0.0 { 1.0 } else { *d });
            }
        }
        FuseRule::Sce | FuseRule::Ram | FuseRule::RamPlus => unreachable!("cpu::sparse fuses"),
        FuseRule::Fisher => unreachable!("merge_group hands these to cpu::fisher"),
        FuseRule::Interp => unreachable!("merge_group hands these to cpu::interp"),
    }
    let start = if g.start.is_some() { &sc.st } else { &sc.b };
    acc.iter_mut()
        .zip(start)
        .for_each(|(a, s)| *a = finish(*s, f.lambda, *a));
    narrow(f.out, acc, out);
    None
}

/// The block by the AVX2 kernel (`avx2::fuse_bf16`) where it applies: bf16 base, θ and output,
/// no start model, 1 to [`MAX_ONE_LOOP`] tasks sharing a scaling, every task masked or none,
/// TIES or linear, whole mask words, AVX2 enabled. False where it does not apply, or where some
/// τ is not finite: the portable loops then do the block (and find the fault).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn fast_block(
    g: &Group,
    masks: &[Option<Vec<u64>>],
    f: &FuseSpec,
    off: usize,
    out: &mut [u8],
) -> bool {
    use crate::dtype::FloatType::BF16;
    let nt = g.tasks.len();
    let len = out.len() / f.out.size();
    if !(1..=MAX_ONE_LOOP).contains(&nt)
        || g.start.is_some()
        || f.out != BF16
        || g.base.ty != BF16
        || g.tasks.iter().any(|t| t.theta.ty != BF16)
        || len % 64 != 0
        || off % 64 != 0
        || !crate::simd::enabled()
    {
        return false;
    }
    let masked = masks[0].is_some();
    if masks[..nt].iter().any(|m| m.is_some() != masked) {
        return false;
    }
    let Some(mode) = shared_scaling(f) else {
        return false;
    };
    let ties = match f.rule {
        FuseRule::Linear => false,
        FuseRule::Ties => true,
        _ => return false,
    };
    match nt {
        1 => fast_n::<1>(g, masks, f, off, out, ties, mode, masked),
        2 => fast_n::<2>(g, masks, f, off, out, ties, mode, masked),
        3 => fast_n::<3>(g, masks, f, off, out, ties, mode, masked),
        _ => fast_n::<4>(g, masks, f, off, out, ties, mode, masked),
    }
}

/// [`fast_block`] for N tasks.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fast_n<const N: usize>(
    g: &Group,
    masks: &[Option<Vec<u64>>],
    f: &FuseSpec,
    off: usize,
    out: &mut [u8],
    ties: bool,
    mode: u8,
    masked: bool,
) -> bool {
    use super::avx2::{fuse_bf16, FuseLanes};
    let len = out.len() / 2;
    let bytes = off * 2..(off + len) * 2;
    let p = FuseLanes::<N> {
        b: &g.base.data[bytes.clone()],
        th: std::array::from_fn(|t| &g.tasks[t].theta.data[bytes.clone()]),
        masks: std::array::from_fn(|t| match &masks[t] {
            Some(w) => &w[off / 64..(off + len) / 64],
            None => &[][..],
        }),
        w: std::array::from_fn(|t| f.weights[t]),
        d: std::array::from_fn(|t| scaling(f, t).1),
        neg: std::array::from_fn(|t| if f.forget[t] { 0x8000_0000 } else { 0 }),
        lambda: f.lambda,
        normalize: f.normalize,
        divisor: f.linear_divisor(),
    };
    // SAFETY: the caller checked that AVX2 is enabled; every slice is the block's (`len`, a
    // multiple of 64, lanes from `off`).
    unsafe {
        match (ties, mode, masked) {
            (false, NONE, false) => fuse_bf16::<N, false, NONE, false>(&p, out),
            (false, NONE, true) => fuse_bf16::<N, false, NONE, true>(&p, out),
            (false, DIVIDE, false) => fuse_bf16::<N, false, DIVIDE, false>(&p, out),
            (false, DIVIDE, true) => fuse_bf16::<N, false, DIVIDE, true>(&p, out),
            (false, _, false) => fuse_bf16::<N, false, MULTIPLY, false>(&p, out),
            (false, _, true) => fuse_bf16::<N, false, MULTIPLY, true>(&p, out),
            (true, NONE, false) => fuse_bf16::<N, true, NONE, false>(&p, out),
            (true, NONE, true) => fuse_bf16::<N, true, NONE, true>(&p, out),
            (true, DIVIDE, false) => fuse_bf16::<N, true, DIVIDE, false>(&p, out),
            (true, DIVIDE, true) => fuse_bf16::<N, true, DIVIDE, true>(&p, out),
            (true, _, false) => fuse_bf16::<N, true, MULTIPLY, false>(&p, out),
            (true, _, true) => fuse_bf16::<N, true, MULTIPLY, true>(&p, out),
        }
    }
}

/// The first element of a block (at `off`) whose τ = θ − b is not finite, blamed on the base
/// where the base's value is the bad one.
fn tau_fault(t: usize, off: usize, th: &[f32], b: &[f32]) -> Option<Fault> {
    let i = (0..th.len()).find(|&i| !(th[i] - b[i]).is_finite())?;
    let source = if b[i].is_finite() {
        Source::Theta(t)
    } else {
        Source::Base
    };
    Some(Fault {
        source,
        index: (off + i) as u64,
        value_is_nan: (th[i] - b[i]).is_nan(),
    })
}

/// Up to this many tasks, a block is fused in one loop over its lanes ([`lanes`]).
const MAX_ONE_LOOP: usize = 4;

/// [`fuse_block`] for 1 to [`MAX_ONE_LOOP`] tasks that share a scaling ([`shared_scaling`]):
/// every task's θ widened and mask expanded, then one loop computes each lane from start to end
/// (the terms, the sums, the elected sign, the division, the start model) with nothing stored
/// between the steps. `fault` is the start model's, if any.
#[inline(always)]
fn one_loop(
    g: &Group,
    masks: &[Option<Vec<u64>>],
    f: &FuseSpec,
    off: usize,
    out: &mut [u8],
    sc: &mut FuseScratch,
    mut fault: Option<Fault>,
) -> Option<Fault> {
    let len = out.len() / f.out.size();
    let nt = g.tasks.len();
    sc.tt.resize_with(nt, Vec::new);
    sc.lt.resize_with(nt, Vec::new);
    sc.ones.resize(len, u32::MAX);
    for t in 0..nt {
        load(g.tasks[t].theta, off, len, &mut sc.tt[t]);
        if let Some(words) = &masks[t] {
            sc.lt[t].resize(len, 0);
            expand(&words[off / 64..(off + len).div_ceil(64)], &mut sc.lt[t]);
        }
    }
    sc.acc.resize(len, 0.0);
    let bad = match nt {
        1 => lanes_for::<1>(g, masks, f, len, sc),
        2 => lanes_for::<2>(g, masks, f, len, sc),
        3 => lanes_for::<3>(g, masks, f, len, sc),
        _ => lanes_for::<4>(g, masks, f, len, sc),
    };
    if bad {
        // The first bad τ of each task, in task order (as the task-by-task loops found them).
        for (t, th) in sc.tt.iter().enumerate() {
            fault = first_fault(fault, tau_fault(t, off, &th[..len], &sc.b[..len]));
        }
    }
    if fault.is_some() {
        return fault;
    }
    narrow(f.out, &sc.acc[..len], out);
    None
}

/// [`lanes`] for N tasks, with the recipe's switches (and the tasks' shared scaling,
/// [`shared_scaling`]: the caller checked there is one) as constants.
#[inline(always)]
fn lanes_for<const N: usize>(
    g: &Group,
    masks: &[Option<Vec<u64>>],
    f: &FuseSpec,
    len: usize,
    sc: &mut FuseScratch,
) -> bool {
    let FuseScratch {
        b,
        st,
        tt,
        lt,
        ones,
        acc,
        ..
    } = sc;
    let start = if g.start.is_some() {
        &st[..len]
    } else {
        &b[..len]
    };
    let p = Lanes {
        b: &b[..len],
        start,
        th: std::array::from_fn(|t| &tt[t][..len]),
        keep: std::array::from_fn(|t| match masks[t] {
            Some(_) => &lt[t][..len],
            None => &ones[..len],
        }),
        w: std::array::from_fn(|t| f.weights[t]),
        // τ/1 and τ·1 are τ exactly: tasks without a factor in a scaling recipe use 1.
        d: std::array::from_fn(|t| scaling(f, t).1),
        neg: std::array::from_fn(|t| if f.forget[t] { 0x8000_0000 } else { 0 }),
        lambda: f.lambda,
        divisor: f.linear_divisor(),
    };
    let acc = &mut acc[..len];
    let ties = match f.rule {
        FuseRule::Linear => false,
        FuseRule::Ties => true,
        FuseRule::Sce | FuseRule::Ram | FuseRule::RamPlus => unreachable!("cpu::sparse fuses"),
        FuseRule::Fisher => unreachable!("merge_group hands these to cpu::fisher"),
        FuseRule::Interp => unreachable!("merge_group hands these to cpu::interp"),
    };
    let mode = shared_scaling(f).expect("one_loop is used where the tasks share one");
    match (ties, mode, f.normalize) {
        (false, NONE, false) => lanes::<N, false, NONE, false>(acc, &p),
        (false, NONE, true) => lanes::<N, false, NONE, true>(acc, &p),
        (false, DIVIDE, false) => lanes::<N, false, DIVIDE, false>(acc, &p),
        (false, DIVIDE, true) => lanes::<N, false, DIVIDE, true>(acc, &p),
        (false, _, false) => lanes::<N, false, MULTIPLY, false>(acc, &p),
        (false, _, true) => lanes::<N, false, MULTIPLY, true>(acc, &p),
        (true, NONE, false) => lanes::<N, true, NONE, false>(acc, &p),
        (true, NONE, true) => lanes::<N, true, NONE, true>(acc, &p),
        (true, DIVIDE, false) => lanes::<N, true, DIVIDE, false>(acc, &p),
        (true, DIVIDE, true) => lanes::<N, true, DIVIDE, true>(acc, &p),
        (true, _, false) => lanes::<N, true, MULTIPLY, false>(acc, &p),
        (true, _, true) => lanes::<N, true, MULTIPLY, true>(acc, &p),
    }
}

/// The inputs of [`lanes`], each slice one block long.
struct Lanes<'a, const N: usize> {
    b: &'a [f32],
    start: &'a [f32],
    th: [&'a [f32]; N],
    /// All-ones (kept) or zero per lane ([`expand`]).
    keep: [&'a [u32]; N],
    w: [f32; N],
    /// The divisor or factor of each task's τ ([`scaling`]).
    d: [f32; N],
    /// The sign bit for `forget:` tasks (subtracting is adding the negation, exactly).
    neg: [u32; N],
    lambda: f32,
    divisor: f32,
}

/// The fuse of docs/SEMANTICS.md lane by lane, every operation in the order of the task-by-task
/// loops below (so the same bits): u_t = w_t·τ_t (or w_t·(τ_t/d_t), w_t·(τ_t·s_t) by `SCALE`),
/// +0.0 where dropped; TIES:
/// S = 0.0 + Σ u_t, the agreeing terms and weights summed from 0.0, divided by the weights' sum
/// (1 where 0); linear: 0.0 + Σ ±u_t, divided by the weights' sum; then start + λ·sum (a NaN as
/// the canonical one). Returns whether some τ is not finite.
#[inline(always)]
fn lanes<const N: usize, const TIES: bool, const SCALE: u8, const NORM: bool>(
    acc: &mut [f32],
    p: &Lanes<N>,
) -> bool {
    let len = acc.len();
    let (b, start) = (&p.b[..len], &p.start[..len]);
    let th = p.th.map(|s| &s[..len]);
    let keep = p.keep.map(|s| &s[..len]);
    let mut bad = false;
    for i in 0..len {
        let mut u = [0f32; N];
        for t in 0..N {
            let tau = th[t][i] - b[i];
            bad |= !tau.is_finite();
            let v = match SCALE {
                DIVIDE => p.w[t] * (tau / p.d[t]),
                MULTIPLY => p.w[t] * (tau * p.d[t]),
                _ => p.w[t] * tau,
            };
            u[t] = f32::from_bits(v.to_bits() & keep[t][i]);
        }
        let sum = if TIES {
            let mut s = 0.0f32;
            for x in u {
                s += x;
            }
            let (mut a, mut d) = (0.0f32, 0.0f32);
            for t in 0..N {
                let agree = ((u[t] > 0.0) & (s >= 0.0)) | ((u[t] < 0.0) & (s < 0.0));
                a += if agree { u[t] } else { 0.0 };
                d += if agree { p.w[t] } else { 0.0 };
            }
            if NORM {
                a / if d == 0.0 { 1.0 } else { d }
            } else {
                a
            }
        } else {
            let mut a = 0.0f32;
            for t in 0..N {
                a += f32::from_bits(u[t].to_bits() ^ p.neg[t]);
            }
            if NORM {
                a / p.divisor
            } else {
                a
            }
        };
        acc[i] = finish(start[i], p.lambda, sum);
    }
    bad
}

/// Bit l of a 32-bit half of a mask word, per lane: `bits & LANE_BIT[l] != 0` vectorises into an
/// AND and a compare per 8 lanes (a shift by the lane index took more, a byte table per 8 lanes
/// far more).
const LANE_BIT: [u32; 32] = {
    let mut t = [0u32; 32];
    let mut l = 0;
    while l < 32 {
        t[l] = 1 << l;
        l += 1;
    }
    t
};

/// The mask words of a block as one all-ones (keep) or zero (drop) u32 per lane, so that the
/// loops over the lanes are flat: nested per word, their set-up cost as much as their work.
#[inline(always)]
fn expand(mask: &[u64], lanes: &mut [u32]) {
    #[inline(always)]
    fn half(lanes: &mut [u32], bits: u32) {
        for (x, &lb) in lanes.iter_mut().zip(&LANE_BIT) {
            *x = if bits & lb != 0 { u32::MAX } else { 0 };
        }
    }
    let full = lanes.len() / 64;
    let mut whole = lanes.chunks_exact_mut(64);
    for (lc, &m) in (&mut whole).zip(mask) {
        // A whole word as an array: fixed trip counts, nothing but the vector work.
        let lc: &mut [u32; 64] = lc.try_into().expect("64 lanes");
        let (lo, hi) = lc.split_at_mut(32);
        half(lo, m as u32);
        half(hi, (m >> 32) as u32);
    }
    let rest = whole.into_remainder();
    if let Some(&m) = mask.get(full) {
        for (lh, bits) in rest.chunks_mut(32).zip([m as u32, (m >> 32) as u32]) {
            half(lh, bits);
        }
    }
}

/// One task's terms u = w·τ (w·(τ/d) where DARE rescales, w·(τ·d) for mergekit's L1 factor:
/// `SCALE`), +0.0 where `keep` (from [`expand`];
/// None: everything kept) is zero: stored into `out` (`OP` 0, for TIES), or added to the linear
/// sum in `out` (`OP` 1: the first task, 0.0 + u; 2: the first, 0.0 − u; 3: + u; 4: − u; the same
/// operations, in the same order, as a sum of stored terms). Returns whether some τ is not finite.
#[inline(always)]
fn terms<const SCALE: u8, const OP: u8>(
    out: &mut [f32],
    th: &[f32],
    b: &[f32],
    w: f32,
    d: f32,
    keep: Option<&[u32]>,
) -> bool {
    let mut bad = false;
    let pairs = out.iter_mut().zip(th.iter().zip(b));
    match keep {
        Some(keep) => pairs
            .zip(keep)
            .for_each(|((o, (&t, &b)), &k)| term::<SCALE, OP>(o, t, b, k, w, d, &mut bad)),
        None => pairs.for_each(|(o, (&t, &b))| term::<SCALE, OP>(o, t, b, !0, w, d, &mut bad)),
    }
    bad
}

/// One lane of [`terms`]. A function, not a closure: a closure left out of line is compiled
/// without AVX2 (crate::simd), and closures take no `#[inline(always)]` where they are bound.
#[inline(always)]
fn term<const SCALE: u8, const OP: u8>(
    o: &mut f32,
    t: f32,
    b: f32,
    keep: u32,
    w: f32,
    d: f32,
    bad: &mut bool,
) {
    let tau = t - b;
    *bad |= !tau.is_finite();
    let v = match SCALE {
        DIVIDE => w * (tau / d),
        MULTIPLY => w * (tau * d),
        _ => w * tau,
    };
    let v = f32::from_bits(v.to_bits() & keep);
    *o = match OP {
        0 => v,
        1 => 0.0 + v,
        2 => 0.0 - v,
        3 => *o + v,
        _ => *o - v,
    };
}

/// [`count_combos`] over the `blen` lanes of a block at `boff` for N tasks (at most 5), with
/// the task count a constant: the set splitting unrolled, the counts kept in registers for the
/// block. The loop over a run-time count was ~100 instructions per 64 lanes for 3 tasks.
#[inline(always)]
fn block_combos<const N: usize>(
    masks: &[Option<Vec<u64>>],
    boff: usize,
    blen: usize,
    combos: &mut [u64],
) {
    const { assert!(N >= 1 && N <= 5) };
    let nw = blen.div_ceil(64);
    let all = [u64::MAX; BLOCK / 64];
    let words: [&[u64]; N] = std::array::from_fn(|t| match &masks[t] {
        Some(w) => &w[boff / 64..boff / 64 + nw],
        None => &all[..nw],
    });
    let mut counts = [0u64; 1 << 5];
    for j in 0..nw {
        let mut sets = [0u64; 1 << 5];
        sets[0] = u64::MAX >> (64 - 64.min(blen - j * 64));
        for t in 0..N {
            let w = words[t][j];
            for c in 0..1usize << t {
                sets[c | 1 << t] = sets[c] & w;
                sets[c] &= !w;
            }
        }
        for c in 0..1usize << N {
            counts[c] += sets[c].count_ones() as u64;
        }
    }
    for (n, c) in combos.iter_mut().zip(&counts[..1 << N]) {
        *n += c;
    }
}

/// Adds to `combos[c]` the number of valid lanes whose bits across the task words spell c
/// (bit t of c: task t kept the lane).
#[inline(always)]
pub(super) fn count_combos(words: &[u64], valid: u64, combos: &mut [u64]) {
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

/// The fused tensor into `out`, and the histogram of mask combinations (empty when not tracked).
pub(super) fn fuse(
    g: &Group,
    masks: &[Option<Vec<u64>>],
    f: &FuseSpec,
    out: &mut [u8],
) -> BResult<Vec<u64>> {
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
}
