//! Element types stamerge reads and writes, and the exact widening/narrowing rules of
//! docs/SEMANTICS.md (widening is exact; narrowing rounds to nearest even).

use half::f16;
use safetensors::Dtype;

/// A float type the merge arithmetic understands. Other dtypes are copied, never merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

impl FloatType {
    pub fn from_safetensors(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(Self::F32),
            Dtype::F16 => Some(Self::F16),
            Dtype::BF16 => Some(Self::BF16),
            _ => None,
        }
    }

    pub fn to_safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// The name `config.json` uses for `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    /// Parses the names mergekit recipes use (`float16`, `bfloat16`, `float32`, and short forms).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "float32" | "fp32" | "f32" | "float" => Some(Self::F32),
            "float16" | "fp16" | "f16" | "half" => Some(Self::F16),
            "bfloat16" | "bf16" => Some(Self::BF16),
            _ => None,
        }
    }
}

/// Whether a safetensors dtype is a float type we cannot merge (it must not be silently copied).
pub fn is_unsupported_float(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::F64
            | Dtype::F8_E4M3
            | Dtype::F8_E5M2
            | Dtype::F8_E8M0
            | Dtype::F8_E4M3FNUZ
            | Dtype::F8_E5M2FNUZ
            | Dtype::F4
            | Dtype::F6_E2M3
            | Dtype::F6_E3M2
    )
}

/// Widens `src` (raw little-endian bytes of `ty`) into `dst`; `dst.len()` elements are converted.
/// Aligned input (the usual case: safetensors data is 8-byte aligned) takes half's vectorised
/// slice conversion; unaligned input the element-by-element path. Both are exact.
#[inline(always)]
pub fn widen(ty: FloatType, src: &[u8], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let n = dst.len();
    match ty {
        FloatType::F32 => match bytemuck::try_cast_slice::<u8, f32>(&src[..n * 4]) {
            Ok(s) => dst.copy_from_slice(s),
            Err(_) => {
                for (d, c) in dst.iter_mut().zip(src[..n * 4].chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        },
        FloatType::F16 => match bytemuck::try_cast_slice::<u8, f16>(&src[..n * 2]) {
            Ok(s) => s.convert_to_f32_slice(dst),
            Err(_) => {
                for (d, c) in dst.iter_mut().zip(src[..n * 2].chunks_exact(2)) {
                    *d = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        },
        FloatType::BF16 => match bytemuck::try_cast_slice::<u8, u16>(&src[..n * 2]) {
            Ok(s) => {
                for (d, &b) in dst.iter_mut().zip(s) {
                    *d = f32::from_bits((b as u32) << 16);
                }
            }
            Err(_) => {
                for (d, c) in dst.iter_mut().zip(src[..n * 2].chunks_exact(2)) {
                    *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
        },
    }
}

/// Narrows `src` into raw little-endian bytes of `ty`, rounding to nearest even.
#[inline(always)]
pub fn narrow(ty: FloatType, src: &[f32], dst: &mut [u8]) {
    use half::slice::HalfFloatSliceExt;
    let n = src.len();
    match ty {
        FloatType::F32 => match bytemuck::try_cast_slice_mut::<u8, f32>(&mut dst[..n * 4]) {
            Ok(d) => d.copy_from_slice(src),
            Err(_) => {
                for (v, c) in src.iter().zip(dst.chunks_exact_mut(4)) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
        },
        FloatType::F16 => match bytemuck::try_cast_slice_mut::<u8, f16>(&mut dst[..n * 2]) {
            Ok(d) => d.convert_from_f32_slice(src),
            Err(_) => {
                for (v, c) in src.iter().zip(dst.chunks_exact_mut(2)) {
                    c.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
        },
        FloatType::BF16 => match bytemuck::try_cast_slice_mut::<u8, u16>(&mut dst[..n * 2]) {
            Ok(d) => {
                for (o, &v) in d.iter_mut().zip(src) {
                    *o = bf16_bits(v).to_le();
                }
            }
            Err(_) => {
                for (v, c) in src.iter().zip(dst.chunks_exact_mut(2)) {
                    c.copy_from_slice(&bf16_bits(*v).to_le_bytes());
                }
            }
        },
    }
}

/// `half::bf16::from_f32(v).to_bits()` without branches, so that the narrowing loop vectorises
/// (half's version took ~3 instructions per element there, 30 % of a linear fuse): NaN keeps its
/// top bits with the quiet bit set; otherwise round to nearest, ties to even, by adding 0x7fff
/// plus the kept part's lowest bit (a carry out of the dropped half rounds up).
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    // Wraps only for NaNs, whose result is the other one.
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let nan = (x >> 16) | 0x40;
    (if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

/// Reads element `i` of a raw buffer as f32 (slow path for references and error messages).
pub fn get(ty: FloatType, src: &[u8], i: usize) -> f32 {
    let mut one = [0f32];
    let s = ty.size();
    widen(ty, &src[i * s..(i + 1) * s], &mut one);
    one[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// The branch-free narrowing against half's, on every low half-word under 2 048 high ones
    /// (signs, zero, subnormals, the largest finite values, infinities, NaNs) and 65 536 more
    /// spread over the rest: every rounding case at every exponent class.
    #[test]
    fn bf16_narrowing_matches_half_bit_for_bit() {
        let mut highs: Vec<u32> = (0..1024u32).map(|i| i * 64 + 0x7f).collect();
        highs.extend([0, 1, 0x7f7f, 0x7f80, 0x7f81, 0x7fc0, 0x7fff, 0x0080, 0x007f]);
        highs.extend(highs.clone().iter().map(|h| h | 0x8000));
        for h in highs {
            for lo in 0..=0xffffu32 {
                let v = f32::from_bits(h << 16 | lo);
                assert_eq!(
                    bf16_bits(v),
                    bf16::from_f32(v).to_bits(),
                    "{:#010x}",
                    h << 16 | lo
                );
            }
        }
        for i in 0..65_536u32 {
            let v = f32::from_bits(i.wrapping_mul(0x9e37_79b9) ^ (i << 7));
            assert_eq!(
                bf16_bits(v),
                bf16::from_f32(v).to_bits(),
                "{:#010x}",
                v.to_bits()
            );
        }
    }

    #[test]
    fn narrow_rounds_to_nearest_even_and_widen_is_exact() {
        // 1 + 2^-11 lies exactly between two f16 values: ties go to the even mantissa (1.0).
        let x = 1.0f32 + (2.0f32).powi(-11);
        let mut b = [0u8; 2];
        narrow(FloatType::F16, &[x], &mut b);
        assert_eq!(get(FloatType::F16, &b, 0), 1.0);
        // bf16: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 → 1.0; 1 + 3·2^-8 → 1 + 2^-6.
        narrow(FloatType::BF16, &[1.0 + (2.0f32).powi(-8)], &mut b);
        assert_eq!(get(FloatType::BF16, &b, 0), 1.0);
        narrow(FloatType::BF16, &[1.0 + 3.0 * (2.0f32).powi(-8)], &mut b);
        assert_eq!(get(FloatType::BF16, &b, 0), 1.0 + (2.0f32).powi(-6));
        for ty in [FloatType::F32, FloatType::F16, FloatType::BF16] {
            let mut raw = vec![0u8; 3 * ty.size()];
            narrow(ty, &[0.5, -2.0, 3.0], &mut raw);
            let mut back = [0f32; 3];
            widen(ty, &raw, &mut back);
            assert_eq!(back, [0.5, -2.0, 3.0]);
        }
    }
}
