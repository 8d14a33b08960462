//! Top-k by radix select over sortable u32 keys, the tie rule, the deterministic score sum and
//! DARE's counter-based generator: everything the CPU backend and the CUDA kernels must agree on.

pub mod dare;
pub mod digits;
pub mod dot;
pub mod dsum;
pub mod radix;
pub mod window;

pub use digits::{DigitPass, DigitSearch};
pub use radix::{radix_select, Threshold};
pub use window::Window;

/// Maps an f32 to a u32 whose unsigned order is the float order (NaN excluded).
#[inline(always)]
pub fn key(s: f32) -> u32 {
    let b = s.to_bits();
    // Negative: all bits flipped; positive: the sign bit set. Branch-free, so key loops vectorise.
    b ^ (((b as i32) >> 31) as u32 | 0x8000_0000)
}

/// The float a key came from (for reports).
pub fn key_value(k: u32) -> f32 {
    if k & 0x8000_0000 != 0 {
        f32::from_bits(k & 0x7fff_ffff)
    } else {
        f32::from_bits(!k)
    }
}

/// The kernels' digit schedule (docs/KERNELS.md, SelectState, "Radix digits"): 11-bit digits from the top
/// (11 + 11 + 10 bits).
/// A tensor's mean score from its deterministic score sum (`selection: model` divides each
/// tensor's scores by it): f32(sum / n), rounded once, the same on every backend.
pub fn tensor_mean(sum: f64, n: usize) -> f32 {
    (sum / n as f64) as f32
}

pub const DIGITS_11: [(u32, u32); 3] = [(21, 11), (10, 11), (0, 10)];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_like_floats() {
        let xs = [
            -f32::INFINITY,
            -2.0,
            -1e-30,
            -0.0,
            0.0,
            1e-40,
            1e-30,
            1.0,
            3.5,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(key(w[0]) <= key(w[1]), "{} vs {}", w[0], w[1]);
        }
        for x in xs {
            assert_eq!(key_value(key(x)).to_bits(), x.to_bits());
        }
    }
}
