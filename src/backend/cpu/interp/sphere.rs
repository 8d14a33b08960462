//! multislerp and karcher: means of the inputs' directions on the hypersphere, each a few
//! reduction passes with scalar steps between them (mergekit `multislerp.py`, `karcher.py`).

use rayon::prelude::*;

use super::{load_all, reduce, with_sc, write, Span};
use crate::backend::{BResult, BackendError, DeviceError, Group};
use crate::dtype::FloatType;
use crate::method::interp::{self as m, norm32, InterpSpec, Vectors};
use crate::select::dot;

/// karcher's work on one piece of a full buffer: (offset, piece, the inputs' units, partials).
type PieceFn<'a> = dyn Fn(usize, &mut [f32], &mut super::Sc, &mut [f64]) + Sync + 'a;

/// Output = the first input as it is (one model: nothing to interpolate, as mergekit).
fn copy_first(g: &Group, s: &InterpSpec, ty: FloatType, out: &mut [u8]) -> BResult<()> {
    let s1 = InterpSpec {
        uses_base: false,
        ..s.clone()
    };
    write(out, ty, |off, len, sc| {
        let f = load_all(g, &s1, Span::Range { off, len }, sc, true, false);
        sc.acc.clear();
        sc.acc.extend_from_slice(&sc.x[0]);
        f
    })
}

/// The unit vectors `u_k = v_k / (|v_k| + eps)` of `sc.x` (task vectors with a base), in place.
fn units(sc: &mut super::Sc, den: &[f32]) {
    for (x, &d) in sc.x.iter_mut().zip(den) {
        x.iter_mut().for_each(|v| *v /= d);
    }
}

/// `mean = Σ_k u_k·w_k` (from the first term, in order) into `sc.tmp`.
fn weighted_mean(sc: &mut super::Sc, w: &[f32]) {
    let len = sc.x[0].len();
    sc.tmp.clear();
    sc.tmp.resize(len, 0.0);
    for (x, &w) in sc.x.iter().zip(w) {
        sc.tmp.iter_mut().zip(x).for_each(|(m, &u)| *m += u * w);
    }
}

/// `tangent = Σ_k (u_k − dot_k·m̂)·w_k` into `sc.tmp2`, with `m̂ = mean / |mean|` in `sc.tmp`.
fn tangent(sc: &mut super::Sc, w: &[f32], dots: &[f32]) {
    let len = sc.x[0].len();
    sc.tmp2.clear();
    sc.tmp2.resize(len, 0.0);
    for ((x, &w), &d) in sc.x.iter().zip(w).zip(dots) {
        for ((t, &u), &m) in sc.tmp2.iter_mut().zip(x).zip(&sc.tmp) {
            *t += (u - d * m) * w;
        }
    }
}

/// Barycentric interpolation: the inputs' unit vectors averaged with their weights, projected
/// to the tangent space at the mean's direction, averaged there and mapped back, scaled by the
/// weighted mean norm (mergekit `multislerp.py`). Five passes over the inputs.
pub fn multislerp(
    g: &Group,
    s: &InterpSpec,
    normalize_weights: bool,
    eps: f32,
    ty: FloatType,
    out: &mut [u8],
) -> BResult<()> {
    let k = s.inputs.len();
    if k == 1 {
        return copy_first(g, s, ty, out);
    }
    let n = g.n;
    let base = s.uses_base;
    let w = m::multislerp_weights(&s.weights, normalize_weights);
    // 1: the norms of the (task) vectors.
    let d = reduce(Vectors::Whole, n, k, |span, sc, r| {
        let f = load_all(g, s, span, sc, true, base);
        for (o, x) in r.iter_mut().zip(&sc.x) {
            *o = dot::chunk_dot(x, x);
        }
        f
    })?;
    let (norms, den) = m::multislerp_norms(&d[0], eps);
    // 2: the weighted mean of the unit vectors and its norm.
    let d = reduce(Vectors::Whole, n, 1, |span, sc, r| {
        load_all(g, s, span, sc, false, base);
        units(sc, &den);
        weighted_mean(sc, &w);
        r[0] = dot::chunk_dot(&sc.tmp, &sc.tmp);
        None
    })?;
    let mean_norm = norm32(d[0][0]);
    if mean_norm < eps {
        if k == 2 {
            // mergekit's fallback: the weighted sum of the two (task) vectors.
            return write(out, ty, |off, len, sc| {
                load_all(g, s, Span::Range { off, len }, sc, false, base);
                sc.acc.resize(len, 0.0);
                for (j, o) in sc.acc.iter_mut().enumerate() {
                    let r = sc.x[0][j] * w[0] + sc.x[1][j] * w[1];
                    *o = if base { r + sc.b[j] } else { r };
                }
                None
            });
        }
        return Err(BackendError::Device(DeviceError::Unsupported(
            m::MULTISLERP_ZERO_MEAN.into(),
        )));
    }
    let unit_mean = |sc: &mut super::Sc| {
        units(sc, &den);
        weighted_mean(sc, &w);
        sc.tmp.iter_mut().for_each(|m| *m /= mean_norm);
    };
    // 3: each unit vector's dot with the mean's direction.
    let d = reduce(Vectors::Whole, n, k, |span, sc, r| {
        load_all(g, s, span, sc, false, base);
        unit_mean(sc);
        for (o, x) in r.iter_mut().zip(&sc.x) {
            *o = dot::chunk_dot(x, &sc.tmp);
        }
        None
    })?;
    let dots: Vec<f32> = d[0].iter().map(|&d| d as f32).collect();
    // 4: the weighted tangent and its norm.
    let d = reduce(Vectors::Whole, n, 1, |span, sc, r| {
        load_all(g, s, span, sc, false, base);
        unit_mean(sc);
        tangent(sc, &w, &dots);
        r[0] = dot::chunk_dot(&sc.tmp2, &sc.tmp2);
        None
    })?;
    let (c, q) = m::multislerp_exp(d[0][0], eps);
    let avg = m::multislerp_scale(&norms, &w);
    // 5: back onto the sphere, scaled, the base added back.
    write(out, ty, |off, len, sc| {
        load_all(g, s, Span::Range { off, len }, sc, false, base);
        unit_mean(sc);
        tangent(sc, &w, &dots);
        sc.acc.resize(len, 0.0);
        for (j, o) in sc.acc.iter_mut().enumerate() {
            let r = (sc.tmp[j] * c + sc.tmp2[j] * q) * avg;
            *o = if base { r + sc.b[j] } else { r };
        }
        None
    })
}

/// The Karcher mean of the inputs' directions (equal weights), iterated from their normalised
/// mean by at most `max_iter` tangent steps, scaled by the inputs' mean norm (mergekit
/// `karcher.py`). The mean and the tangent are kept as full buffers between passes.
pub fn karcher(
    g: &Group,
    s: &InterpSpec,
    max_iter: u32,
    tol: f64,
    ty: FloatType,
    out: &mut [u8],
) -> BResult<()> {
    let k = s.inputs.len();
    if k == 1 {
        return copy_first(g, s, ty, out);
    }
    let n = g.n;
    let d = reduce(Vectors::Whole, n, k, |span, sc, r| {
        let f = load_all(g, s, span, sc, true, false);
        for (o, x) in r.iter_mut().zip(&sc.x) {
            *o = dot::chunk_dot(x, x);
        }
        f
    })?;
    let norms: Vec<f32> = d[0].iter().map(|&d| norm32(d)).collect();
    let alpha = 1.0 / k as f64;
    let valid: Vec<usize> = (0..k).filter(|&i| norms[i] as f64 > tol).collect();
    if valid.is_empty() {
        // mergekit returns Σ x·0.
        return write(out, ty, |_, len, sc| {
            sc.acc.clear();
            sc.acc.resize(len, 0.0);
            None
        });
    }
    let alpha_sum = valid.iter().fold(0f64, |a, _| a + alpha);
    let alphas: Vec<f32> = valid.iter().map(|_| (alpha / alpha_sum) as f32).collect();
    // u_k = x_k / |x_k| for the valid inputs, in `sc.x` (the others are left as read).
    let unit = |sc: &mut super::Sc| {
        for &i in &valid {
            let nk = norms[i];
            sc.x[i].iter_mut().for_each(|v| *v /= nk);
        }
    };
    let mut mean = vec![0f32; n];
    let mut tan = vec![0f32; n];
    // One pass over contiguous pieces of `buf` (the units of a whole vector), with the inputs'
    // units loaded: returns the pieces' partial dots combined in order.
    let pass = |buf: &mut [f32], m: usize, f: &PieceFn| -> Vec<f64> {
        let parts: Vec<Vec<f64>> = buf
            .par_chunks_mut(dot::CHUNK)
            .enumerate()
            .map(|(c, piece)| {
                let mut r = vec![0f64; m];
                with_sc(|sc| {
                    crate::wide!({
                        let span = Span::Range {
                            off: c * dot::CHUNK,
                            len: piece.len(),
                        };
                        load_all(g, s, span, sc, false, false);
                        unit(sc);
                        f(c * dot::CHUNK, piece, sc, &mut r);
                    })
                });
                r
            })
            .collect();
        (0..m)
            .map(|j| dot::combine(&parts.iter().map(|p| p[j]).collect::<Vec<_>>()))
            .collect()
    };
    // The weighted mean of the unit vectors.
    let d = pass(&mut mean, 1, &|_, piece, sc, r| {
        piece.iter_mut().for_each(|v| *v = 0.0);
        for (&i, &a) in valid.iter().zip(&alphas) {
            piece
                .iter_mut()
                .zip(&sc.x[i])
                .for_each(|(m, &u)| *m += a * u);
        }
        r[0] = dot::chunk_dot(piece, piece);
    });
    let mean_norm = norm32(d[0]);
    if (mean_norm as f64) < tol {
        pass(&mut mean, 0, &|_, piece, sc, _| {
            piece.copy_from_slice(&sc.x[valid[0]]);
        });
    } else {
        mean.par_iter_mut().for_each(|m| *m /= mean_norm);
    }
    for _ in 0..max_iter {
        // The mean's dot with each unit vector.
        let d = pass(&mut mean, valid.len(), &|_, piece, sc, r| {
            for (o, &i) in r.iter_mut().zip(&valid) {
                *o = dot::chunk_dot(piece, &sc.x[i]);
            }
        });
        // Per input: its coefficient α·θ/sin θ, or None where θ < tol (skipped).
        let steps: Vec<Option<(f32, f32)>> = d
            .iter()
            .zip(&alphas)
            .map(|(&dd, &a)| {
                let dotk = (dd as f32).clamp(-1.0, 1.0);
                let theta = (dotk as f64).acos() as f32;
                if (theta as f64) < tol {
                    return None;
                }
                let q = theta / ((theta as f64).sin() as f32);
                Some((a * q, dotk))
            })
            .collect();
        let mean_ref = &mean;
        let d = pass(&mut tan, 1, &|off, piece, sc, r| {
            piece.iter_mut().for_each(|v| *v = 0.0);
            let m = &mean_ref[off..off + piece.len()];
            for (&i, st) in valid.iter().zip(&steps) {
                let Some((c, dotk)) = *st else { continue };
                for ((t, &u), &mv) in piece.iter_mut().zip(&sc.x[i]).zip(m) {
                    *t += c * (u - dotk * mv);
                }
            }
            r[0] = dot::chunk_dot(piece, piece);
        });
        let tn = norm32(d[0]);
        if (tn as f64) < tol {
            break;
        }
        let (c, sn) = ((tn as f64).cos() as f32, (tn as f64).sin() as f32);
        let parts: Vec<f64> = mean
            .par_chunks_mut(dot::CHUNK)
            .zip(tan.par_chunks(dot::CHUNK))
            .map(|(m, t)| {
                crate::wide!({
                    for (mv, &tv) in m.iter_mut().zip(t) {
                        *mv = c * *mv + sn * (tv / tn);
                    }
                    dot::chunk_dot(m, m)
                })
            })
            .collect();
        let un = norm32(dot::combine(&parts));
        if un as f64 > tol {
            mean.par_iter_mut().for_each(|m| *m /= un);
        }
    }
    let scale = norms
        .iter()
        .fold(0f32, |acc, &nk| acc + (alpha as f32) * nk);
    let mean = &mean;
    write(out, ty, |off, len, sc| {
        sc.acc.clear();
        sc.acc
            .extend(mean[off..off + len].iter().map(|&m| scale * m));
        None
    })
}
