//! The interpolating methods on the CPU (method/interp.rs; docs/SEMANTICS.md, "Interpolating
//! methods"), the reference a GPU must reproduce. Each method is a fixed sequence of passes:
//!
//! - reduction passes: each vector's chunks of `dot::CHUNK` elements are units spread over rayon;
//!   a unit loads its inputs and returns its partial dots (`dot::chunk_dot`, lanes in a fixed
//!   order), and the partials are combined per vector in chunk order, so the f64 results do not
//!   depend on the thread count (a GPU block per unit, the same lanes, gets the same bits);
//! - scalar math on the reductions' results, in method/interp.rs (every backend calls it);
//! - one element-wise pass writing the output, each element on its own.
//!
//! Inputs are read again by every pass instead of being kept in full-size buffers, so memory
//! stays a few chunks per thread (karcher keeps its mean and tangent: 8 bytes per element).
//! The first pass checks the inputs: a NaN or infinity is an error naming the input and the
//! lowest index, as in the other methods.

mod fusion;
mod sphere;

use std::cell::RefCell;

use rayon::prelude::*;

use super::{first_fault, load, CH};
use crate::backend::{BResult, BackendError, Fault, Group, GroupStats, Raw, Source, TaskStats};
use crate::dtype::{narrow, FloatType};
use crate::method::interp::{self as m, Interp, InterpSpec, Operand, Vectors};
use crate::select::dot;

/// A stretch of one vector's elements: contiguous (whole tensors and rows) or strided (vectors
/// along the first dimension).
#[derive(Clone, Copy, Debug)]
pub(super) enum Span {
    Range {
        off: usize,
        len: usize,
    },
    Strided {
        start: usize,
        stride: usize,
        len: usize,
    },
}

impl Span {
    fn len(self) -> usize {
        match self {
            Span::Range { len, .. } | Span::Strided { len, .. } => len,
        }
    }

    /// The tensor index of the span's j-th element.
    fn index(self, j: usize) -> usize {
        match self {
            Span::Range { off, .. } => off + j,
            Span::Strided { start, stride, .. } => start + j * stride,
        }
    }
}

fn load_span(raw: Raw, span: Span, dst: &mut Vec<f32>) {
    match span {
        Span::Range { off, len } => load(raw, off, len, dst),
        Span::Strided { len, .. } => {
            dst.resize(len, 0.0);
            let sz = raw.ty.size();
            for (j, d) in dst.iter_mut().enumerate() {
                let i = span.index(j);
                crate::dtype::widen(
                    raw.ty,
                    &raw.data[i * sz..(i + 1) * sz],
                    std::slice::from_mut(d),
                );
            }
        }
    }
}

/// Vector `v` whole.
fn vector_span(vs: Vectors, n: usize, v: usize) -> Span {
    match vs {
        Vectors::Whole => Span::Range { off: 0, len: n },
        Vectors::Rows { len } => Span::Range { off: v * len, len },
        Vectors::Columns { len, stride } => Span::Strided {
            start: v,
            stride,
            len,
        },
    }
}

/// The vector element `i` belongs to.
fn vector_of(vs: Vectors, i: usize) -> usize {
    match vs {
        Vectors::Whole => 0,
        Vectors::Rows { len } => i / len,
        Vectors::Columns { stride, .. } => i % stride,
    }
}

/// The reduction units: every vector's chunks of `dot::CHUNK` elements, vector by vector.
fn units(vs: Vectors, n: usize) -> Vec<(usize, Span)> {
    let mut out = Vec::new();
    for v in 0..vs.count(n) {
        let whole = vector_span(vs, n, v);
        let len = whole.len();
        for c in 0..len.div_ceil(dot::CHUNK) {
            let l = dot::CHUNK.min(len - c * dot::CHUNK);
            out.push((
                v,
                match whole {
                    Span::Range { off, .. } => Span::Range {
                        off: off + c * dot::CHUNK,
                        len: l,
                    },
                    Span::Strided { start, stride, .. } => Span::Strided {
                        start: start + c * dot::CHUNK * stride,
                        stride,
                        len: l,
                    },
                },
            ));
        }
    }
    out
}

/// Per-thread buffers of one unit or output chunk, alive for the whole run.
#[derive(Default)]
pub(super) struct Sc {
    pub b: Vec<f32>,
    pub x: Vec<Vec<f32>>,
    pub acc: Vec<f32>,
    pub tmp: Vec<f32>,
    pub tmp2: Vec<f32>,
}

thread_local! {
    static SC: RefCell<Sc> = RefCell::new(Sc::default());
}

pub(super) fn with_sc<R>(f: impl FnOnce(&mut Sc) -> R) -> R {
    SC.with_borrow_mut(f)
}

pub(super) fn raw_of<'a>(g: &Group<'a>, o: Operand) -> Raw<'a> {
    match o {
        Operand::Base => g.base,
        Operand::Task(t) => g.tasks[t].theta,
    }
}

fn source_of(o: Operand) -> Source {
    match o {
        Operand::Base => Source::Base,
        Operand::Task(t) => Source::Theta(t),
    }
}

/// The first non-finite value of `v` (read from `span` of input `source`) as a fault.
fn check(v: &[f32], span: Span, source: Source) -> Option<Fault> {
    if !v.iter().fold(false, |bad, x| bad | !x.is_finite()) {
        return None;
    }
    let j = v.iter().position(|x| !x.is_finite())?;
    Some(Fault {
        source,
        index: span.index(j) as u64,
        value_is_nan: v[j].is_nan(),
    })
}

/// Loads `span` of the base (when the method uses it) into `sc.b` and of every input into
/// `sc.x`; `checked`: looks for non-finite values (the base first, then the inputs in order);
/// `minus_base`: the inputs become task vectors `x − b`.
pub(super) fn load_all(
    g: &Group,
    s: &InterpSpec,
    span: Span,
    sc: &mut Sc,
    checked: bool,
    minus_base: bool,
) -> Option<Fault> {
    let mut fault = None;
    if s.uses_base {
        load_span(g.base, span, &mut sc.b);
        if checked {
            fault = check(&sc.b, span, Source::Base);
        }
    }
    sc.x.resize_with(s.inputs.len(), Vec::new);
    for (k, &o) in s.inputs.iter().enumerate() {
        load_span(raw_of(g, o), span, &mut sc.x[k]);
        if checked {
            fault = first_fault(fault, check(&sc.x[k], span, source_of(o)));
        }
        if minus_base {
            sc.x[k].iter_mut().zip(&sc.b).for_each(|(x, &b)| *x -= b);
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

/// One reduction pass: `f` fills the `m` partial sums of one unit; returns per vector its `m`
/// sums, the chunks combined in order.
pub(super) fn reduce(
    vs: Vectors,
    n: usize,
    m: usize,
    f: impl Fn(Span, &mut Sc, &mut [f64]) -> Option<Fault> + Sync,
) -> BResult<Vec<Vec<f64>>> {
    let us = units(vs, n);
    let parts: Vec<(Vec<f64>, Option<Fault>)> = us
        .par_iter()
        .map(|&(_, span)| {
            let mut r = vec![0f64; m];
            let fl = with_sc(|sc| crate::wide!(f(span, sc, &mut r)));
            (r, fl)
        })
        .collect();
    fault_result(parts.iter().fold(None, |a, p| first_fault(a, p.1)))?;
    let mut out = vec![vec![0f64; m]; vs.count(n)];
    for ((v, _), (r, _)) in us.iter().zip(&parts) {
        for (o, x) in out[*v].iter_mut().zip(r) {
            *o += x;
        }
    }
    Ok(out)
}

/// The element-wise pass: `f(off, sc)` leaves output elements `off..off + len` in `sc.acc`.
pub(super) fn write(
    out: &mut [u8],
    ty: FloatType,
    f: impl Fn(usize, usize, &mut Sc) -> Option<Fault> + Sync,
) -> BResult<()> {
    let fault = out
        .par_chunks_mut(CH * ty.size())
        .enumerate()
        .map(|(ci, oc)| {
            let len = oc.len() / ty.size();
            with_sc(|sc| {
                crate::wide!(
                    let fl = f(ci * CH, len, sc);
                    narrow(ty, &sc.acc[..len], oc);
                    fl
                )
            })
        })
        .reduce(|| None, first_fault);
    fault_result(fault)
}

/// Merges one tensor group with an interpolating method into `out`.
pub fn merge(g: &Group, s: &InterpSpec, ty: FloatType, out: &mut [u8]) -> BResult<GroupStats> {
    let n = g.n;
    let mut kept = vec![n as u64; g.tasks.len()];
    if n > 0 {
        match s.rule {
            Interp::Linear { normalize } => linear(g, s, normalize, ty, out)?,
            Interp::Slerp { t } => slerp(g, s, t, ty, out)?,
            Interp::Nuslerp { t } => nuslerp(g, s, t, ty, out)?,
            Interp::Nearswap { t } => nearswap(g, s, t, ty, out)?,
            Interp::ModelStock => model_stock(g, s, ty, out)?,
            Interp::Multislerp {
                normalize_weights,
                eps,
            } => sphere::multislerp(g, s, normalize_weights, eps, ty, out)?,
            Interp::Karcher { max_iter, tol } => sphere::karcher(g, s, max_iter, tol, ty, out)?,
            Interp::ArceeFusion => {
                let swapped = fusion::arcee_fusion(g, s, ty, out)?;
                if let Some(Operand::Task(t)) = s.inputs.first() {
                    kept[*t] = swapped;
                }
            }
        }
    }
    Ok(GroupStats {
        tasks: kept
            .into_iter()
            .map(|kept| TaskStats {
                kept,
                ..Default::default()
            })
            .collect(),
        combos: Vec::new(),
    })
}

/// `acc = Σ w_k x_k` in input order from +0.0, then `/ Σ w_k` (fp32, in order) with normalize.
fn linear(
    g: &Group,
    s: &InterpSpec,
    normalize: bool,
    ty: FloatType,
    out: &mut [u8],
) -> BResult<()> {
    let div = m::linear_div(&s.weights);
    write(out, ty, |off, len, sc| {
        let span = Span::Range { off, len };
        let fault = load_all(g, s, span, sc, true, false);
        sc.acc.clear();
        sc.acc.resize(len, 0.0);
        for (x, &w) in sc.x.iter().zip(&s.weights) {
            sc.acc.iter_mut().zip(x).for_each(|(a, &x)| *a += w * x);
        }
        if normalize {
            sc.acc.iter_mut().for_each(|a| *a /= div);
        }
        fault
    })
}

/// One angle for the whole tensor: `ca·base + cb·model`.
fn slerp(g: &Group, s: &InterpSpec, t: f32, ty: FloatType, out: &mut [u8]) -> BResult<()> {
    let d = reduce(Vectors::Whole, g.n, 3, |span, sc, r| {
        let f = load_all(g, s, span, sc, true, false);
        let (a, b) = (&sc.b, &sc.x[0]);
        r.copy_from_slice(&[
            dot::chunk_dot(a, a),
            dot::chunk_dot(b, b),
            dot::chunk_dot(a, b),
        ]);
        f
    })?;
    let (ca, cb) = m::slerp_coefs(d[0][0], d[0][1], d[0][2], t);
    write(out, ty, |off, len, sc| {
        load_all(g, s, Span::Range { off, len }, sc, false, false);
        sc.acc.resize(len, 0.0);
        for ((o, &a), &b) in sc.acc.iter_mut().zip(&sc.b).zip(&sc.x[0]) {
            *o = ca * a + cb * b;
        }
        None
    })
}

/// Two models (task vectors with a base) per vector: `(sa·v0 + sb·v1) / s`, or `ca·v0 + cb·v1`
/// where they are colinear; the base added back.
fn nuslerp(g: &Group, s: &InterpSpec, t: f64, ty: FloatType, out: &mut [u8]) -> BResult<()> {
    let vs = s.vectors;
    let d = reduce(vs, g.n, 3, |span, sc, r| {
        let f = load_all(g, s, span, sc, true, s.uses_base);
        let (a, b) = (&sc.x[0], &sc.x[1]);
        r.copy_from_slice(&[
            dot::chunk_dot(a, a),
            dot::chunk_dot(b, b),
            dot::chunk_dot(a, b),
        ]);
        f
    })?;
    let coefs: Vec<m::NuslerpCoefs> = d
        .iter()
        .map(|d| m::nuslerp_coefs(d[0], d[1], d[2], t))
        .collect();
    write(out, ty, |off, len, sc| {
        load_all(g, s, Span::Range { off, len }, sc, false, s.uses_base);
        sc.acc.resize(len, 0.0);
        for (j, o) in sc.acc.iter_mut().enumerate() {
            let c = &coefs[vector_of(vs, off + j)];
            let (v0, v1) = (sc.x[0][j], sc.x[1][j]);
            let r = if c.colinear {
                c.a * v0 + c.b * v1
            } else {
                (c.a * v0 + c.b * v1) / c.s
            };
            *o = if s.uses_base { sc.b[j] + r } else { r };
        }
        None
    })
}

/// `w = clamp((1 / max(|a − b|, 1e-6))·t, 0, 1)`, `w·b + (1 − w)·a` (a the base, b the model).
/// The reciprocal first is how torch evaluates mergekit's `t / tensor`.
fn nearswap(g: &Group, s: &InterpSpec, t: f32, ty: FloatType, out: &mut [u8]) -> BResult<()> {
    write(out, ty, |off, len, sc| {
        let fault = load_all(g, s, Span::Range { off, len }, sc, true, false);
        sc.acc.resize(len, 0.0);
        for ((o, &a), &b) in sc.acc.iter_mut().zip(&sc.b).zip(&sc.x[0]) {
            let w = ((1.0 / (a - b).abs().max(1e-6)) * t).clamp(0.0, 1.0);
            *o = w * b + (1.0 - w) * a;
        }
        fault
    })
}

/// The K task vectors' pairwise dots per vector, then `t·mean(models) + (1 − t)·base`.
fn model_stock(g: &Group, s: &InterpSpec, ty: FloatType, out: &mut [u8]) -> BResult<()> {
    let k = s.inputs.len();
    let pair = |a: usize, b: usize| a * k - a * (a + 1) / 2 + b;
    let vs = s.vectors;
    let d = reduce(vs, g.n, k * (k + 1) / 2, |span, sc, r| {
        let f = load_all(g, s, span, sc, true, true);
        for a in 0..k {
            for b in a..k {
                r[pair(a, b)] = dot::chunk_dot(&sc.x[a], &sc.x[b]);
            }
        }
        f
    })?;
    let ts: Vec<f32> = d
        .iter()
        .map(|d| m::model_stock_t(k, |a, b| d[pair(a, b)]))
        .collect();
    let kf = k as f32;
    write(out, ty, |off, len, sc| {
        load_all(g, s, Span::Range { off, len }, sc, false, false);
        sc.acc.resize(len, 0.0);
        for (j, o) in sc.acc.iter_mut().enumerate() {
            let t = ts[vector_of(vs, off + j)];
            let mut sum = sc.x[0][j];
            for x in &sc.x[1..] {
                sum += x[j];
            }
            *o = t * (sum / kf) + (1.0 - t) * sc.b[j];
        }
        None
    })
}
