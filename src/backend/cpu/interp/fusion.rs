//! arcee_fusion (mergekit `arcee_fusion.py`): each element's importance is |model − base| times
//! its row's KL divergence between the softmaxes of the model's and the base's row; the model's
//! change is kept where the importance reaches `median + 1.5·(q3 − q1)` of the tensor's
//! importances, the exact quartiles (mergekit samples 1M elements above that size).

use rayon::prelude::*;

use super::{load_all, vector_of, vector_span, with_sc, write, Span};
use crate::backend::{BResult, Group};
use crate::dtype::FloatType;
use crate::method::interp::{self as m, InterpSpec};
use crate::select::{self, dot, radix};

/// The deterministic sum of a vector of any length (chunks of `dot::CHUNK` in order).
fn sum(v: &[f32]) -> f64 {
    dot::combine(&v.chunks(dot::CHUNK).map(dot::chunk_sum).collect::<Vec<_>>())
}

/// `softmax(x) + 1e-8` of one row into `p` (exp of x − max, divided by the row's sum).
fn softmax_eps(x: &[f32], p: &mut Vec<f32>) {
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    p.clear();
    p.extend(x.iter().map(|&v| m::exp_f32(v - max)));
    let s = sum(p) as f32;
    p.iter_mut().for_each(|v| *v = *v / s + 1e-8);
}

/// The KL divergence `Σ p·ln(p / q)` of one row of the model (`x`) against the base (`b`).
pub fn row_kl(x: &[f32], b: &[f32]) -> f32 {
    let (mut p, mut q) = (Vec::new(), Vec::new());
    softmax_eps(x, &mut p);
    softmax_eps(b, &mut q);
    p.iter_mut()
        .zip(&q)
        .for_each(|(pv, &qv)| *pv = *pv * m::ln_f32(*pv / qv));
    sum(&p) as f32
}

/// Writes the fused tensor; returns how many elements took the model's value.
pub fn arcee_fusion(g: &Group, s: &InterpSpec, ty: FloatType, out: &mut [u8]) -> BResult<u64> {
    let n = g.n;
    let vs = s.vectors;
    // 1: per row, the KL divergence (rows are read whole; the inputs are checked here).
    let kls: Vec<(f32, Option<crate::backend::Fault>)> = (0..vs.count(n))
        .into_par_iter()
        .map(|r| {
            with_sc(|sc| {
                let f = load_all(g, s, vector_span(vs, n, r), sc, true, false);
                (crate::wide!(row_kl(&sc.x[0], &sc.b)), f)
            })
        })
        .collect();
    let fault = kls.iter().fold(None, |a, k| super::first_fault(a, k.1));
    super::fault_result(fault)?;
    // 2: the importances as sortable keys, and their quartiles.
    let mut keys = vec![0u32; n];
    keys.par_chunks_mut(super::CH)
        .enumerate()
        .for_each(|(ci, kc)| {
            with_sc(|sc| {
                let off = ci * super::CH;
                load_all(g, s, Span::Range { off, len: kc.len() }, sc, false, false);
                for (j, k) in kc.iter_mut().enumerate() {
                    let kl = kls[vector_of(vs, off + j)].0;
                    *k = select::key((sc.x[0][j] - sc.b[j]).abs() * kl);
                }
            })
        });
    let (shift, bits) = select::DIGITS_11[0];
    let hist = radix::histogram(&keys, shift, bits, 0);
    // The i-th smallest of n is the (n − i)-th largest.
    let [q1, med, q3] = m::fusion_ranks(n as u64)
        .map(|i| select::key_value(radix::radix_select_from(&keys, n as u64 - i, &hist).key));
    let threshold = m::fusion_threshold(q1, med, q3);
    // 3: the model's change where the importance reaches the threshold.
    let keys = &keys;
    write(out, ty, |off, len, sc| {
        load_all(g, s, Span::Range { off, len }, sc, false, false);
        sc.acc.resize(len, 0.0);
        for (j, o) in sc.acc.iter_mut().enumerate() {
            let keep = select::key_value(keys[off + j]) >= threshold;
            let (b, p) = (sc.b[j], sc.x[0][j]);
            *o = b + (p - b) * if keep { 1.0 } else { 0.0 };
        }
        None
    })?;
    Ok(keys
        .par_iter()
        .filter(|&&k| select::key_value(k) >= threshold)
        .count() as u64)
}
