//! The deterministic sum of scores (docs/SEMANTICS.md): a fixed reduction tree that a GPU block
//! reproduces exactly, so `selection: model` normalises by the same mean on every backend.

use rayon::prelude::*;

pub const CHUNK: usize = 65_536;
pub const LANES: usize = 256;

/// Sum of one chunk (at most CHUNK values) in the fixed lane/tree order.
#[inline(always)]
pub fn chunk_sum(s: &[f32]) -> f64 {
    debug_assert!(s.len() <= CHUNK);
    let mut lane = [0f64; LANES];
    for (l, acc) in lane.iter_mut().enumerate() {
        let mut i = l;
        while i < s.len() {
            *acc += s[i] as f64;
            i += LANES;
        }
    }
    let mut stride = LANES / 2;
    while stride > 0 {
        for l in 0..stride {
            lane[l] += lane[l + stride];
        }
        stride /= 2;
    }
    lane[0]
}

/// Sums per-chunk results in chunk order.
pub fn combine(chunks: &[f64]) -> f64 {
    chunks.iter().fold(0.0, |a, &c| a + c)
}

/// The deterministic sum of a whole slice (reference and tests).
pub fn sum(s: &[f32]) -> f64 {
    let parts: Vec<f64> = s.par_chunks(CHUNK).map(chunk_sum).collect();
    combine(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_order_is_as_specified() {
        // Straight-line restatement of the spec for a small odd size.
        let s: Vec<f32> = (0..1000).map(|i| 1.0 / (1.0 + i as f32)).collect();
        let mut lanes = vec![0f64; 256];
        for (i, v) in s.iter().enumerate() {
            lanes[i % 256] += *v as f64;
        }
        for stride in [128, 64, 32, 16, 8, 4, 2, 1] {
            for l in 0..stride {
                lanes[l] += lanes[l + stride];
            }
        }
        assert_eq!(sum(&s).to_bits(), lanes[0].to_bits());
        let exact: f64 = s.iter().map(|&v| v as f64).sum();
        assert!((sum(&s) - exact).abs() < 1e-9);
    }
}
