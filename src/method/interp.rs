//! The methods that combine whole models rather than masked task vectors: `linear`, `slerp`,
//! `nuslerp`, `multislerp`, `karcher`, `model_stock`, `nearswap` and `arcee_fusion`, with
//! mergekit 0.1.5's parameters and formulas (docs/SEMANTICS.md, "Interpolating methods").
//!
//! Each method is a fixed sequence of passes over the tensor: reductions (deterministic dot
//! products, `select::dot`), per-tensor or per-row scalar math between them, and one
//! element-wise pass that writes the output. The scalar math is here, in plain functions of the
//! reductions' results, so that every backend runs the same code for it (a GPU copies the few
//! reduction results back and asks these functions): transcendental functions of scalars then
//! give the same bits everywhere. The element-wise formulas are written out in SEMANTICS.md and
//! in `backend/cpu/interp.rs`, the reference.

/// One input of an interpolating method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Operand {
    Base,
    Task(usize),
}

/// The vectors a method's reductions run over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Vectors {
    /// The whole tensor, flattened.
    Whole,
    /// Rows of the last dimension: vector r is elements `r·len .. (r+1)·len`.
    Rows { len: usize },
    /// Vectors along the first dimension (mergekit's `transpose(0, -1)`): vector c is elements
    /// `c + j·stride` for `j < len`, with `len` the first dimension and `stride` the rest.
    Columns { len: usize, stride: usize },
}

impl Vectors {
    /// Rows of the last dimension of `shape` (one vector for 0-d and 1-d tensors).
    pub fn rows(shape: &[usize]) -> Self {
        match shape {
            [] | [_] => Self::Whole,
            [.., last] => Self::Rows { len: *last },
        }
    }

    /// Vectors along the first dimension of `shape` (one vector for 0-d and 1-d tensors).
    pub fn columns(shape: &[usize]) -> Self {
        match shape {
            [] | [_] => Self::Whole,
            [first, rest @ ..] => Self::Columns {
                len: *first,
                stride: rest.iter().product(),
            },
        }
    }

    /// How many vectors a tensor of `n` elements holds.
    pub fn count(self, n: usize) -> usize {
        match self {
            Self::Whole => 1,
            Self::Rows { len } => n.checked_div(len).unwrap_or(0),
            Self::Columns { stride, .. } => stride,
        }
    }
}

/// A method's rule with its parameters' values for one tensor.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Interp {
    /// `acc = Σ w_k x_k` (in input order), divided by `Σ w_k` with `normalize`.
    Linear { normalize: bool },
    /// `ca·base + cb·model`, the coefficients from one angle per tensor.
    Slerp { t: f32 },
    /// Spherical interpolation of two models at `t` (from their weights), of their task vectors
    /// when the recipe has a base.
    Nuslerp { t: f64 },
    /// Barycentric interpolation on the hypersphere.
    Multislerp { normalize_weights: bool, eps: f32 },
    /// The Karcher mean of the inputs' directions, scaled by their mean norm.
    Karcher { max_iter: u32, tol: f64 },
    /// The base moved towards the models' mean by `t` from their angles.
    ModelStock,
    /// The model's value where it is within `t` of the base's, blended further out.
    Nearswap { t: f32 },
    /// The model's change where its importance is an outlier of the tensor, the base elsewhere.
    ArceeFusion,
}

/// What an interpolating method computes for one tensor (the `interp` part of a
/// [`FuseSpec`](super::FuseSpec)).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct InterpSpec {
    pub rule: Interp,
    /// The inputs combined, in mergekit's order: the models as the recipe lists them (the base
    /// where it is listed, or last when the recipe names it only as `base_model`). For methods
    /// with a base (`uses_base`) the base is not among them.
    pub inputs: Vec<Operand>,
    /// Per input, its weight where the method has weights (linear, nuslerp, multislerp).
    pub weights: Vec<f32>,
    /// Whether the base takes part as the base: subtracted (nuslerp, multislerp), an end of the
    /// path (slerp, nearswap, arcee_fusion), the anchor (model_stock).
    pub uses_base: bool,
    /// The vectors the reductions run over.
    pub vectors: Vectors,
}

// ------------------------------------------------------------------------------------------------
// Scalar math between the passes. Reductions arrive as f64 (select::dot); where mergekit holds a
// scalar as a float32 tensor, it is rounded to f32 once and mergekit's float32 operations follow
// in its order; acos, sin and cos of scalars are computed in f64 from that f32 and rounded once.

/// linear's divisor with `normalize`: `Σ w_k` in f32, in input order from +0.0.
pub fn linear_div(weights: &[f32]) -> f32 {
    weights.iter().fold(0f32, |a, w| a + w)
}

/// `f32(sqrt(d))`: a norm as mergekit's float32 `vector_norm` holds it, from an exact-order dot.
pub fn norm32(d: f64) -> f32 {
    d.sqrt() as f32
}

fn acos32(x: f32) -> f64 {
    (x as f64).acos()
}

/// slerp's coefficients `(ca, cb)` of `ca·base + cb·model` (mergekit `slerp.py`): norms
/// `≤ 1e-8` count as 1, `cos = clamp(dot / (|a|·|b|), −1, 1)`; above mergekit's 0.9995 in
/// absolute value the inputs are (anti)colinear and the result is `(1 − t)·a + t·b`.
pub fn slerp_coefs(daa: f64, dbb: f64, dab: f64, t: f32) -> (f32, f32) {
    let eps = 1e-8f32;
    let na = norm32(daa);
    let nb = norm32(dbb);
    let na = if na > eps { na as f64 } else { 1.0 };
    let nb = if nb > eps { nb as f64 } else { 1.0 };
    let cos = ((dab / (na * nb)) as f32).clamp(-1.0, 1.0);
    if cos.abs() > 0.9995 {
        return (1.0 - t, t);
    }
    let theta = acos32(cos);
    let s = theta.sin();
    let t = t as f64;
    (
        (((1.0 - t) * theta).sin() / s) as f32,
        ((t * theta).sin() / s) as f32,
    )
}

/// multislerp's weights (mergekit `multislerp.py`): as given, or with `normalize_weights`
/// divided by their f32 sum (added in input order from +0.0).
pub fn multislerp_weights(weights: &[f32], normalize: bool) -> Vec<f32> {
    let mut w = weights.to_vec();
    if normalize {
        let sum = w.iter().fold(0f32, |a, x| a + x);
        w.iter_mut().for_each(|x| *x /= sum);
    }
    w
}

/// multislerp's norms `|v_k|` and the divisors `|v_k| + eps` of its unit vectors, from the
/// vectors' self-dots.
pub fn multislerp_norms(dots: &[f64], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let norms: Vec<f32> = dots.iter().map(|&d| norm32(d)).collect();
    let den = norms.iter().map(|&x| x + eps).collect();
    (norms, den)
}

/// What multislerp says when the weighted mean of the directions is zero with more than two
/// models (the two-model case falls back to the weighted sum).
pub const MULTISLERP_ZERO_MEAN: &str = "multislerp: the weighted mean of the models' directions \
    is zero (opposite models whose weights cancel); change the weights (mergekit refuses this too)";

/// multislerp's map back from the tangent space, from the tangent's self-dot: `(cos |t|,
/// sin |t| / |t|)` with `|t| = N(t) + eps` (f64 cos and sin of the f32, rounded once).
pub fn multislerp_exp(dtt: f64, eps: f32) -> (f32, f32) {
    let tn = norm32(dtt) + eps;
    (((tn as f64).cos()) as f32, ((tn as f64).sin() as f32) / tn)
}

/// multislerp's output scale: the weighted mean norm `Σ |v_k|·w_k` (f32, in order from +0.0).
pub fn multislerp_scale(norms: &[f32], w: &[f32]) -> f32 {
    norms.iter().zip(w).fold(0f32, |a, (&nk, &wk)| a + nk * wk)
}

/// nuslerp's interpolation point from the two models' weights (mergekit `nuslerp.py`):
/// `w1 / (w0 + w1)`, 0.5 when the sum is below 1e-6 in absolute value.
pub fn nuslerp_t(w0: f64, w1: f64) -> f64 {
    let total = w0 + w1;
    if total.abs() < 1e-6 {
        0.5
    } else {
        w1 / total
    }
}

/// One vector's nuslerp: `out = (sa·v0 + sb·v1) / s`, or with `colinear`, `ca·v0 + cb·v1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NuslerpCoefs {
    pub colinear: bool,
    /// `sin((1 − t)θ)`, or `1 − t` when colinear.
    pub a: f32,
    /// `sin(tθ)`, or `t` when colinear.
    pub b: f32,
    /// `sin θ` (1 when colinear, unused).
    pub s: f32,
}

/// nuslerp's scalars for one vector from its dots (mergekit `nuslerp.py`): unit vectors with
/// norms clamped to at least 1e-7, `cos = clamp(û0·û1, −1, 1)`, colinear where `1 − cos² ≤
/// 1e-16` in float32.
pub fn nuslerp_coefs(d00: f64, d11: f64, d01: f64, t: f64) -> NuslerpCoefs {
    let n0 = norm32(d00).max(1e-7) as f64;
    let n1 = norm32(d11).max(1e-7) as f64;
    let cos = ((d01 / (n0 * n1)) as f32).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= 1e-16f32 {
        return NuslerpCoefs {
            colinear: true,
            a: (1.0 - t) as f32,
            b: t as f32,
            s: 1.0,
        };
    }
    let theta = acos32(cos);
    NuslerpCoefs {
        colinear: false,
        a: ((1.0 - t) * theta).sin() as f32,
        b: (t * theta).sin() as f32,
        s: theta.sin() as f32,
    }
}

/// model_stock's `t` for one vector from the dots of the K task vectors `o_k = w_k − w_0`
/// (`dots(a, b)`, a ≤ b) (mergekit `model_stock.py`): the mean over pairs of
/// `clamp(o_a·o_b / max(|o_a||o_b|, 1e-6), −1, 1)`, then `K·cos / (1 + (K − 1)·cos)`, 0 where
/// the denominator is below 1e-6 in absolute value (the base is kept there).
pub fn model_stock_t(k: usize, dots: impl Fn(usize, usize) -> f64) -> f32 {
    let norms: Vec<f32> = (0..k).map(|a| norm32(dots(a, a))).collect();
    let mut sum = 0f32;
    let mut pairs = 0u32;
    for a in 0..k {
        for b in a + 1..k {
            let np = (norms[a] * norms[b]).max(1e-6);
            sum += ((dots(a, b) as f32) / np).clamp(-1.0, 1.0);
            pairs += 1;
        }
    }
    let cos = sum / pairs as f32;
    let den = 1.0 + (k - 1) as f32 * cos;
    if den.abs() < 1e-6 {
        0.0
    } else {
        (k as f32 * cos) / den
    }
}

/// arcee_fusion's outlier threshold from the tensor's sorted importances (`at(i)`: the i-th
/// smallest of `n`): `median + 1.5·(q3 − q1)`, each quantile the element at
/// `floor(q·(n − 1))` (mergekit `arcee_fusion.py`, exact where mergekit samples above 1M
/// elements).
pub fn fusion_ranks(n: u64) -> [u64; 3] {
    [0.25f64, 0.5, 0.75].map(|q| (q * (n.max(1) - 1) as f64).floor() as u64)
}

/// `median + 1.5·(q3 − q1)` in float32.
pub fn fusion_threshold(q1: f32, median: f32, q3: f32) -> f32 {
    median + 1.5 * (q3 - q1)
}

// ------------------------------------------------------------------------------------------------
// Element-wise exp and ln of arcee_fusion's softmax and KL divergence: Cephes' expf/logf
// polynomials (≤ 2 ulp), written with one rounding per operation so that a kernel repeating
// these lines gets the same bits (the platform's expf differs between libm and CUDA).

/// e^x for x ≤ 0 (softmax's shifted inputs); exactly 1 at 0, 0 below −103.97.
pub fn exp_f32(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > 88.72283 {
        return f32::INFINITY;
    }
    if x < -103.97208 {
        return 0.0;
    }
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4;
    let r = r - n * -2.121_944_4e-4;
    let z = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * z + r + 1.0;
    ldexp(y, n as i32)
}

/// `y · 2^e` with one rounding (only where the result is subnormal).
fn ldexp(y: f32, e: i32) -> f32 {
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    if e > 127 {
        y * pow2(127) * pow2(e - 127)
    } else if e < -126 {
        // y · 2^(e + 64) is still normal (|y| ≥ 0.5, e ≥ −151), so only the second rounds.
        y * pow2(e + 64) * pow2(-64)
    } else {
        y * pow2(e)
    }
}

/// ln x for x > 0 (arcee_fusion's ratios of probabilities ≥ 1e-8); NaN below 0, −∞ at 0.
pub fn ln_f32(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    // x = m · 2^e with m in [0.5, 1) (subnormals scaled up first).
    let (x, bias) = if x < f32::MIN_POSITIVE {
        (x * 16_777_216.0, 24)
    } else {
        (x, 0)
    };
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126 - bias;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    if m < std::f32::consts::FRAC_1_SQRT_2 {
        e -= 1;
        m = m + m - 1.0;
    } else {
        m -= 1.0;
    }
    let z = m * m;
    let mut p = 7.037_683_6e-2f32;
    p = p * m - 1.151_461e-1;
    p = p * m + 1.167_699_9e-1;
    p = p * m - 1.242_014_1e-1;
    p = p * m + 1.424_932_3e-1;
    p = p * m - 1.666_805_8e-1;
    p = p * m + 2.000_071_4e-1;
    p = p * m - 2.499_999_4e-1;
    p = p * m + 3.333_333e-1;
    let mut y = p * m * z;
    let ef = e as f32;
    y += ef * -2.121_944_4e-4;
    y += -0.5 * z;
    let mut r = m + y;
    r += ef * 0.693_359_4;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        ((a - b32).abs() / (b32.abs() * f32::EPSILON).max(f32::MIN_POSITIVE)) as f64
    }

    #[test]
    fn exp_and_ln_are_within_two_ulp_of_the_f64_functions() {
        let mut worst = (0f64, 0f64);
        let mut x = -103.0f32;
        while x <= 0.0 {
            let e = exp_f32(x);
            let want = (x as f64).exp();
            if want > f32::MIN_POSITIVE as f64 {
                worst.0 = worst.0.max(ulps(e, want));
            }
            x += 0.000_731;
        }
        let mut x = 1e-8f32;
        while x < 1e8 {
            worst.1 = worst.1.max(ulps(ln_f32(x), (x as f64).ln()));
            x *= 1.000_37;
        }
        assert!(worst.0 <= 2.0 && worst.1 <= 2.0, "{worst:?}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(ln_f32(1.0), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert!(exp_f32(-100.0) > 0.0 && exp_f32(-100.0) < 1e-43);
    }

    #[test]
    fn slerp_coefficients_follow_the_angle_and_fall_back_to_lerp() {
        // Orthogonal unit vectors: θ = π/2.
        let (a, b) = slerp_coefs(1.0, 1.0, 0.0, 0.25);
        let h = std::f64::consts::FRAC_PI_2;
        assert_eq!((a, b), ((0.75 * h).sin() as f32, (0.25 * h).sin() as f32));
        // Colinear: the linear coefficients.
        assert_eq!(slerp_coefs(4.0, 9.0, 6.0, 0.3), (0.7, 0.3));
        assert_eq!(slerp_coefs(4.0, 9.0, -6.0, 0.3), (0.7, 0.3));
        // A zero vector counts as norm 1: dot 0, orthogonal.
        let (a, _) = slerp_coefs(0.0, 9.0, 0.0, 0.5);
        assert_eq!(a, (0.5 * h).sin() as f32);
    }

    #[test]
    fn model_stock_t_is_zero_at_the_singularity() {
        // Two opposite task vectors: cos = −1, 1 + (2 − 1)(−1) = 0.
        let d = |a: usize, b: usize| if a == b { 1.0 } else { -1.0 };
        assert_eq!(model_stock_t(2, d), 0.0);
        // Equal task vectors: cos = 1, t = K / K = 1.
        assert_eq!(model_stock_t(3, |_, _| 2.0), 1.0);
    }

    #[test]
    fn ranks_of_the_quartiles() {
        assert_eq!(fusion_ranks(1), [0, 0, 0]);
        assert_eq!(fusion_ranks(5), [1, 2, 3]);
        assert_eq!(fusion_ranks(8), [1, 3, 5]);
    }
}
