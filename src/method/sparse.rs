//! The scalar rules of the sparsifying methods (breadcrumbs, della, sce, ram/ramplus_tl and
//! DARE's rescale), written once so that the plan, every backend and the tests agree on them.
//! Each mirrors mergekit 0.1.5 (`sparsify.py`, `merge_methods/sce.py`, `merge_methods/ram.py`)
//! operation by operation in fp32 where mergekit computes in the tensor's dtype, so that with
//! `dtype: float32` the two give the same bits wherever the masks agree (docs/SEMANTICS.md).

use super::{FuseRule, FuseSpec, MaskJob};

/// What in this work the CUDA kernels do not compute yet, for the message that refuses it
/// (None: the kernels take it). Checked before any work (run.rs) and again by the backend.
pub fn cuda_lacks(jobs: &[MaskJob], f: &FuseSpec) -> Option<String> {
    let rule = match f.rule {
        FuseRule::Sce => Some("sce's fuse"),
        FuseRule::Ram | FuseRule::RamPlus => Some("ram's fuse"),
        // run.rs refuses the interpolating methods without kernels by name before it asks.
        FuseRule::Linear | FuseRule::Ties | FuseRule::Fisher | FuseRule::Interp => None,
    };
    let job = jobs.iter().find_map(|j| match j {
        MaskJob::Della { .. } => Some("della's rank-based keeps"),
        _ => None,
    });
    // The L1 factor is found on the host from the same keep decisions as the CPU's
    // (`cpu::l1_scales`): DARE's counter-based ones, which need no device pass. A top-k mask
    // (ties with `rescale: true`) or breadcrumbs' band is only known on the device.
    let l1 = jobs
        .iter()
        .zip(&f.rescale_l1)
        .any(|(j, &l1)| {
            l1 && matches!(
                j,
                MaskJob::TopK { .. } | MaskJob::Fixed { .. } | MaskJob::Band { .. }
            )
        })
        .then_some(
            "mergekit's L1 rescale after a top-k mask or breadcrumbs' band (`rescale: true` \
             with ties or breadcrumbs; `rescale_norm: inv_density` runs on the GPU)",
        );
    rule.or(job).or(l1).map(str::to_string)
}

/// Breadcrumbs (`sparsify.py::magnitude_outliers`): of `n` entries ranked by |τ|, the largest
/// `drop` are removed and the next `keep` kept, everything smaller removed. mergekit's counts:
/// `keep = int(d·n)`, `top = int(γ·n)`, `bottom = max(0, n − keep − top)`, so
/// `drop = n − bottom − keep`: γ·n + d·n > n drops fewer than γ·n and still keeps `keep`.
/// Unlike top-k there is no max(1, …): a density below 1/n keeps nothing.
pub fn breadcrumbs_counts(density: f64, gamma: f64, n: u64) -> (u64, u64) {
    let keep = ((density * n as f64) as u64).min(n);
    let top = (gamma * n as f64) as u64;
    let bottom = n.saturating_sub(keep).saturating_sub(top);
    (n - bottom - keep, keep)
}

/// DELLA's rule for its parameters (mergekit raises it for every tensor with `d < 1`).
pub fn della_bounds(density: f64, epsilon: f64) -> Result<(), String> {
    if density >= 1.0 || (density + epsilon < 1.0 && density - epsilon > 0.0) {
        Ok(())
    } else {
        Err(format!(
            "della keeps entries with probabilities from density − epsilon to density + \
             epsilon, which must lie inside (0, 1): density {density} with epsilon {epsilon} \
             gives [{}, {}]",
            short(density - epsilon),
            short(density + epsilon)
        ))
    }
}

/// A number for messages: at most 6 decimals, no trailing zeros (0.1 − 0.2 is not
/// -0.09999999999999999 to a reader).
fn short(x: f64) -> String {
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// DELLA's keep probability of the entry of 0-based rank `rank` (0: the smallest |τ|) in a row
/// of `len` (`sparsify.py::della_magprune` in fp32: ranks `f32(rank + 1)` normalised by the
/// row's smallest and largest rank, `1` and `len`, then `(d − ε) + rank_norm · 2 · ε`). A row of
/// one entry (where mergekit's 0/0 fails in torch.bernoulli) gets rank_norm 1/2: probability d.
#[inline(always)]
pub fn della_probability(rank: u64, len: u64, lo: f32, eps: f32) -> f32 {
    let norm = if len <= 1 {
        0.5
    } else {
        // torch: f32(argsort + 1) − min rank (1).
        let r = (rank + 1) as f32 - 1.0;
        let span = len as f32 - 1.0;
        (r / span).clamp(0.0, 1.0)
    };
    norm * 2.0 * eps + lo
}

/// The counter-based threshold of a keep probability (`select::dare::keep`):
/// `floor(p · 2^32)`, exact (p · 2^32 is p with its exponent moved) on every backend.
#[inline(always)]
pub fn probability_threshold(p: f32) -> u64 {
    if p <= 0.0 {
        0
    } else {
        (p as f64 * 4_294_967_296.0).floor().min(4_294_967_296.0) as u64
    }
}

/// mergekit's L1 rescale factor (`sparsify.py::rescaled_masked_tensor`, norm l1): the sums of
/// |τ| before and after the mask, each rounded to f32, and their f32 ratio; None (no rescale)
/// when either sum is below 1e-7, as mergekit returns the masked tensor as it is then.
pub fn l1_factor(before: f64, after: f64) -> Option<f32> {
    let (b, a) = (before as f32, after as f32);
    let eps = 1e-7f32;
    if b < eps || a < eps {
        None
    } else {
        Some(b / a)
    }
}

/// sce's count of kept positions (`sce.py::sce_mask`): `int(nonzero · select_topk)`, where
/// torch multiplies the int64 count by the Python float in float32.
pub fn sce_count(nonzero: u64, select_topk: f64, n: u64) -> u64 {
    let k = (nonzero as f32 * select_topk as f32) as u64;
    k.min(n)
}

/// sce's matrix weights from each task's energy `mean(τ'²)` (`sce.py::sce_weight`): each
/// energy over their f32 sum (summed in task order), or 1/T each when that sum is below 1e-6.
pub fn sce_weights(energy: &[f32]) -> Vec<f32> {
    let sum = energy.iter().fold(0f32, |a, &e| a + e);
    if (sum as f64).abs() < 1e-6 {
        let w = 1.0 / energy.len() as f32;
        vec![w; energy.len()]
    } else {
        energy.iter().map(|&e| e / sum).collect()
    }
}

/// ramplus_tl's per-task factor for the entries only that task changed (`ram.py`):
/// `ρ = f32(shared) / max(f32(unique), f32(ε))`, `λ = 1 + r · clamp(ρ, 0, α)`, in f32.
pub fn ramplus_lambda(shared: u64, unique: u64, epsilon: f32, r: f32, alpha: f32) -> f32 {
    let rho = shared as f32 / (unique as f32).max(epsilon);
    // torch.clamp(min, max): the max wins when alpha < 0.
    let c = rho.max(0.0).min(alpha);
    1.0 + r * c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breadcrumbs_counts_follow_mergekit() {
        // d = 0.9, γ = 0.01 over 1000: keep 900, drop the top 10, the bottom 90.
        assert_eq!(breadcrumbs_counts(0.9, 0.01, 1000), (10, 900));
        // γ·n + d·n > n: the outliers dropped shrink to n − keep.
        assert_eq!(breadcrumbs_counts(0.9, 0.2, 1000), (100, 900));
        // γ = 0 is plain top-k without max(1, …).
        assert_eq!(breadcrumbs_counts(0.5, 0.0, 7), (0, 3));
        assert_eq!(breadcrumbs_counts(0.1, 0.0, 7), (0, 0));
        assert_eq!(breadcrumbs_counts(0.3, 0.5, 10), (5, 3));
    }

    #[test]
    fn della_bounds_are_mergekit_s() {
        assert!(della_bounds(0.5, 0.15).is_ok());
        assert!(della_bounds(1.0, 0.5).is_ok());
        assert!(della_bounds(0.9, 0.1).is_err(), "0.9 + 0.1 >= 1");
        assert!(della_bounds(0.1, 0.1).is_err(), "0.1 − 0.1 <= 0");
        assert!(della_bounds(0.1, 0.15).is_err());
    }

    #[test]
    fn della_probabilities_span_d_minus_to_d_plus_epsilon() {
        let (lo, eps) = ((0.5f64 - 0.15) as f32, 0.15f32);
        assert_eq!(della_probability(0, 11, lo, eps), lo);
        assert!((della_probability(10, 11, lo, eps) - 0.65).abs() < 1e-7);
        assert!((della_probability(5, 11, lo, eps) - 0.5).abs() < 1e-7);
        assert!((della_probability(0, 1, lo, eps) - 0.5).abs() < 1e-7);
        assert_eq!(probability_threshold(0.5), 1 << 31);
        assert_eq!(probability_threshold(1.0), 1 << 32);
        assert_eq!(probability_threshold(0.0), 0);
    }

    #[test]
    fn sce_and_ram_scalars() {
        assert_eq!(sce_count(1000, 0.3, 1000), 300);
        assert_eq!(sce_weights(&[1.0, 3.0]), vec![0.25, 0.75]);
        assert_eq!(sce_weights(&[0.0, 1e-8]), vec![0.5, 0.5]);
        assert_eq!(ramplus_lambda(5, 10, 1e-5, 0.1, 0.2), 1.0 + 0.1 * 0.2);
        assert_eq!(ramplus_lambda(1, 10, 1e-5, 0.1, 0.2), 1.0 + 0.1 * 0.1);
        assert_eq!(l1_factor(0.0, 0.0), None);
        assert_eq!(l1_factor(2.0, 1.0), Some(2.0));
    }
}
