//! The deterministic dot product of the interpolating methods (norms, angles, KL sums): the
//! deterministic sum's reduction tree (`dsum`: chunks of 65 536, 256 f64 lanes, halving) over the
//! exact f64 products of f32 pairs, so that a GPU block that sums the same lanes in the same
//! order gets the same f64 (docs/SEMANTICS.md, "Deterministic dot product").

pub use super::dsum::{CHUNK, LANES};

use super::dsum;

/// Σ x[j]·y[j] of one chunk (at most CHUNK pairs) in the lane/tree order; each product of two
/// f32 is exact in f64, so only the additions round.
#[inline(always)]
pub fn chunk_dot(x: &[f32], y: &[f32]) -> f64 {
    debug_assert!(x.len() <= CHUNK && x.len() == y.len());
    let mut lane = [0f64; LANES];
    // Lane l takes j = l, l + 256, …: one pass over 256-element blocks adds block element l to
    // lane l, which is the same order and vectorises.
    for (xb, yb) in x.chunks(LANES).zip(y.chunks(LANES)) {
        for ((acc, &a), &b) in lane.iter_mut().zip(xb).zip(yb) {
            *acc += a as f64 * b as f64;
        }
    }
    tree(lane)
}

/// Σ x[j] of one chunk in the lane/tree order (as `dsum::chunk_sum`).
#[inline(always)]
pub fn chunk_sum(x: &[f32]) -> f64 {
    dsum::chunk_sum(x)
}

#[inline(always)]
fn tree(mut lane: [f64; LANES]) -> f64 {
    let mut stride = LANES / 2;
    while stride > 0 {
        for l in 0..stride {
            lane[l] += lane[l + stride];
        }
        stride /= 2;
    }
    lane[0]
}

/// The chunks' results summed in chunk order.
pub fn combine(chunks: &[f64]) -> f64 {
    dsum::combine(chunks)
}

/// The deterministic dot product of two whole vectors (tests, and vectors gathered whole).
pub fn dot(x: &[f32], y: &[f32]) -> f64 {
    let parts: Vec<f64> = x
        .chunks(CHUNK)
        .zip(y.chunks(CHUNK))
        .map(|(a, b)| chunk_dot(a, b))
        .collect();
    combine(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_order_is_the_deterministic_sum_s() {
        // Straight-line restatement for a vector longer than one chunk.
        let n = CHUNK + 1000;
        let x: Vec<f32> = (0..n).map(|i| 1.0 / (1.0 + i as f32)).collect();
        let y: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.5).collect();
        let mut chunks = Vec::new();
        for c in 0..n.div_ceil(CHUNK) {
            let mut lanes = vec![0f64; LANES];
            for j in c * CHUNK..((c + 1) * CHUNK).min(n) {
                lanes[(j - c * CHUNK) % LANES] += x[j] as f64 * y[j] as f64;
            }
            let mut s = LANES / 2;
            while s > 0 {
                for l in 0..s {
                    lanes[l] += lanes[l + s];
                }
                s /= 2;
            }
            chunks.push(lanes[0]);
        }
        let want = chunks.iter().fold(0.0, |a, c| a + c);
        assert_eq!(dot(&x, &y).to_bits(), want.to_bits());
        // The products of squares: the sum of squares is dsum's sum of x².
        let sq: Vec<f32> = x.iter().map(|v| v * v).collect();
        let exact: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        assert!((dot(&x, &x) - exact).abs() < 1e-12 * exact);
        assert!((dsum::sum(&sq) - exact).abs() < 1e-6 * exact);
    }
}
