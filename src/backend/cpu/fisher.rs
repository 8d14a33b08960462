//! fisher's fuse on the CPU (docs/SEMANTICS.md, "fisher"): each entry is the average of the
//! models weighted by c_t · (F_t + 1e-6), with F_t the squared-gradient statistic, and the pass
//! that finds each model's Fisher norm over the whole model (`normalize_fisher_weight`).
//! cpu/mod.rs dispatches here; the loaders and the fixed-order sum are its own.
//!
//! Its CUDA twin, `cuda/fisher.rs` with `kernels/fisher.cu`, reproduces per element, in task
//! order from +0.0, `p = c_t * (F + 1e-6)`, `num += p * θ`, `den += p`, then `num / den`, each
//! one fp32 rounding; the norm pass (`dsum`'s tree over fp32 squares) runs on the host for both.

use rayon::prelude::*;

use super::fuse::CANONICAL_NAN;
use super::{fault_result, first_fault, load, CH};
use crate::backend::{BResult, Fault, FuseSpec, Group, GroupStats, Source};
use crate::dtype::narrow;
use crate::select::dsum;

/// FusionBench's `minimal_fisher_weight`, added to every Fisher weight.
pub const MIN_FISHER: f32 = 1e-6;

/// Σ f32(F)² over task `t`'s statistic of the group, as `dsum` adds it (f64).
pub fn sq_sum(g: &Group, t: usize) -> BResult<f64> {
    let Some(grad) = g.tasks[t].grad else {
        return Ok(0.0);
    };
    let parts: Vec<(f64, Option<Fault>)> = (0..g.n.div_ceil(dsum::CHUNK))
        .into_par_iter()
        .map(|c| {
            let (off, len) = (c * dsum::CHUNK, dsum::CHUNK.min(g.n - c * dsum::CHUNK));
            let mut f = Vec::new();
            load(grad, off, len, &mut f);
            let fault = f.iter().position(|v| !v.is_finite()).map(|i| Fault {
                source: Source::Grad(t),
                index: (off + i) as u64,
                value_is_nan: f[i].is_nan(),
            });
            f.iter_mut().for_each(|v| *v *= *v);
            (dsum::chunk_sum(&f), fault)
        })
        .collect();
    fault_result(parts.iter().fold(None, |a, p| first_fault(a, p.1)))?;
    Ok(dsum::combine(
        &parts.iter().map(|p| p.0).collect::<Vec<_>>(),
    ))
}

/// Each task's scale r̂_t from its Fisher norm N_t = sqrt(Σ F²) over the whole model:
/// r_t = 1 / (N_t + 1e-6), r̂_t = r_t / Σ_u r_u (f64, then rounded to f32 once).
pub fn norm_scales(sq_sums: &[f64]) -> Vec<f32> {
    let r: Vec<f64> = sq_sums
        .iter()
        .map(|&s| 1.0 / (s.sqrt() + MIN_FISHER as f64))
        .collect();
    let total: f64 = r.iter().sum();
    r.iter().map(|&x| (x / total) as f32).collect()
}

/// The fisher fuse of a group into `out`.
pub(super) fn merge(g: &Group, f: &FuseSpec, out: &mut [u8]) -> BResult<GroupStats> {
    let nt = g.tasks.len();
    // c_t = f32(w_t) · r̂_t (the norm pass's scale, when normalised).
    let c: Vec<f32> = (0..nt)
        .map(|t| f.weights[t] * f.scale[t].unwrap_or(1.0))
        .collect();
    let fault = out
        .par_chunks_mut(CH * f.out.size())
        .enumerate()
        .map(|(ci, oc)| {
            let off = ci * CH;
            let len = oc.len() / f.out.size();
            let (mut th, mut gr) = (Vec::new(), Vec::new());
            let mut num = vec![0f32; len];
            let mut den = vec![0f32; len];
            let mut fault = None;
            for t in 0..nt {
                // No statistic: F = 0 (`missing_gradients: magnitude`; a task that is not an
                // input of this tensor has weight 0 too, and adds nothing).
                load(g.tasks[t].theta, off, len, &mut th);
                match g.tasks[t].grad {
                    Some(grad) => load(grad, off, len, &mut gr),
                    None => {
                        gr.clear();
                        gr.resize(len, 0.0);
                    }
                }
                let bad = |v: &[f32], source| {
                    v.iter().position(|x| !x.is_finite()).map(|i| Fault {
                        source,
                        index: (off + i) as u64,
                        value_is_nan: v[i].is_nan(),
                    })
                };
                fault = first_fault(fault, bad(&th, Source::Theta(t)));
                fault = first_fault(fault, bad(&gr, Source::Grad(t)));
                let ct = c[t];
                for i in 0..len {
                    let p = ct * (gr[i] + MIN_FISHER);
                    num[i] += p * th[i];
                    den[i] += p;
                }
            }
            if fault.is_none() {
                num.iter_mut().zip(&den).for_each(|(a, &d)| {
                    let v = *a / d;
                    *a = if v.is_nan() { CANONICAL_NAN } else { v };
                });
                narrow(f.out, &num, oc);
            }
            fault
        })
        .reduce(|| None, first_fault);
    fault_result(fault)?;
    Ok(GroupStats::all_kept(g.n, nt))
}
