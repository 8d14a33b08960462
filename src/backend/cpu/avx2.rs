//! AVX2 kernels of the CPU backend's two passes over bf16 inputs, written with intrinsics where
//! the compiler's vectorisation of the portable loops left a store and a reload of every
//! widened value, mask lane and score between them (issue 19: ~53 instructions per element of a
//! 3-task TIES merge, against ~19 for the arithmetic itself).
//!
//! Every kernel does the IEEE operations of its portable loop, in the same order, lane by lane
//! (no fused multiply-add), so the bits are the same; the callers take them only where
//! `crate::simd::enabled()` (the CPU has AVX2) and fall back to the portable loops wherever a
//! value is not finite, so that faults are found and reported exactly as before.

use std::arch::x86_64::*;

use crate::select::Window;

/// The scores of the select pass: |θ − b|, |θ·G|, |(θ − b)·G| (`ScoreKind`).
pub(super) const TV: u8 = 0;
pub(super) const WG: u8 = 1;
pub(super) const TVG: u8 = 2;

/// 8 bf16 values at `p` (16 bytes, any alignment), widened exactly to f32.
#[inline(always)]
unsafe fn widen8(p: *const u8) -> __m256 {
    // SAFETY: the caller gives 16 readable bytes; unaligned loads are allowed.
    let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
}

/// The sign bits of four 8-lane masks (each lane all ones or zero) as 32 bits, lane order.
#[inline(always)]
unsafe fn bits32(v: [__m256i; 4]) -> u32 {
    // packs keeps -1 and 0; each 128-bit half interleaves its sources, so the packed bytes come
    // as dwords (v0 0-3, v1 0-3, v2 0-3, v3 0-3 | v0 4-7, …), which the permutation puts back.
    let p01 = _mm256_packs_epi32(v[0], v[1]);
    let p23 = _mm256_packs_epi32(v[2], v[3]);
    let p = _mm256_packs_epi16(p01, p23);
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_movemask_epi8(p) as u32
}

/// 64 lanes of the select pass: the scores (`KIND`) of bf16 θ (`th`, 128 bytes), the widened
/// base `b` (TV, TVG) and bf16 G (`g`, 128 bytes; WG, TVG), stored in `s`, and their keys
/// (`select::key`) against the window: (bits above it, bits inside it, whether some score is not
/// finite). The scores are absolute values, whose keys order as their bits do as i32 once the
/// window's bounds lose their top bit (as in `window::classify_scores_avx2`).
///
/// # Safety
/// The CPU has AVX2 (the caller is compiled with it); `th` (and `g` where read) hold 128 bytes,
/// `b` (where read) 64 values.
#[inline(always)]
unsafe fn score_classify_bf16<const KIND: u8>(
    th: &[u8],
    b: &[f32],
    g: &[u8],
    w: Window,
    s: &mut [f32; 64],
) -> (u64, u64, bool) {
    debug_assert!(th.len() >= 128);
    debug_assert!(KIND == WG || b.len() >= 64);
    debug_assert!(KIND == TV || g.len() >= 128);
    let hi = _mm256_set1_epi32((w.hi ^ 0x8000_0000) as i32);
    let lo = _mm256_set1_epi32((w.lo ^ 0x8000_0000) as i32);
    let abs = _mm256_set1_epi32(0x7fff_ffff);
    let max_finite = _mm256_set1_epi32(0x7f7f_ffff);
    let mut bad = _mm256_setzero_si256();
    let (mut above, mut outside) = (0u64, 0u64);
    for q in 0..2 {
        let mut a = [_mm256_setzero_si256(); 4];
        let mut o = [_mm256_setzero_si256(); 4];
        for j in 0..4 {
            let i = q * 32 + j * 8;
            // SAFETY: lanes i..i+8 are inside the 64 the caller gave.
            let x = unsafe {
                let t = widen8(th.as_ptr().add(2 * i));
                match KIND {
                    TV => _mm256_sub_ps(t, _mm256_loadu_ps(b.as_ptr().add(i))),
                    WG => _mm256_mul_ps(t, widen8(g.as_ptr().add(2 * i))),
                    _ => _mm256_mul_ps(
                        _mm256_sub_ps(t, _mm256_loadu_ps(b.as_ptr().add(i))),
                        widen8(g.as_ptr().add(2 * i)),
                    ),
                }
            };
            let k = _mm256_and_si256(_mm256_castps_si256(x), abs);
            // SAFETY: as above.
            unsafe { _mm256_storeu_si256(s.as_mut_ptr().add(i) as *mut __m256i, k) };
            bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(k, max_finite));
            a[j] = _mm256_cmpgt_epi32(k, hi);
            o[j] = _mm256_or_si256(a[j], _mm256_cmpgt_epi32(lo, k));
        }
        // SAFETY: AVX2 is enabled in this function.
        unsafe {
            above |= (bits32(a) as u64) << (32 * q);
            outside |= (bits32(o) as u64) << (32 * q);
        }
    }
    (above, !outside, _mm256_testz_si256(bad, bad) == 0)
}

/// What [`score_classify_block`] found in a block: keys above the window and inside it.
pub(super) struct Classified {
    pub above: u64,
    pub inside: u64,
}

/// [`score_classify_bf16`] over a block of `mw.len()` whole mask words (64 lanes each): the
/// bits above the window into `mw`, inside it into `iw`, and (`wide`: a window wider than one
/// key) the keys inside it appended to `keys` in index order. None, with `keys` as it was, where
/// some score is not finite (the words are then partly written; the caller redoes the block).
///
/// # Safety
/// The CPU has AVX2; `th` (and `g` where read) hold 128 bytes per word, `b` (where read) 64
/// values per word.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn score_classify_block<const KIND: u8>(
    th: &[u8],
    b: &[f32],
    g: &[u8],
    w: Window,
    mw: &mut [u64],
    iw: &mut [u64],
    keys: &mut Vec<u32>,
    wide: bool,
) -> Option<Classified> {
    let words = mw.len();
    assert!(iw.len() == words && th.len() >= 128 * words);
    assert!(KIND == WG || b.len() >= 64 * words);
    assert!(KIND == TV || g.len() >= 128 * words);
    let start = keys.len();
    let mut s = [0f32; 64];
    let mut found = Classified {
        above: 0,
        inside: 0,
    };
    for j in 0..words {
        // SAFETY: word j's 64 lanes are inside the slices (asserted above); AVX2 is enabled.
        let (above, ins, bad) = unsafe {
            score_classify_bf16::<KIND>(
                th.get_unchecked(128 * j..),
                if KIND == WG {
                    b
                } else {
                    b.get_unchecked(64 * j..)
                },
                if KIND == TV {
                    g
                } else {
                    g.get_unchecked(128 * j..)
                },
                w,
                &mut s,
            )
        };
        if bad {
            keys.truncate(start);
            return None;
        }
        mw[j] = above;
        iw[j] = ins;
        let c = ins.count_ones() as usize;
        found.above += above.count_ones() as u64;
        found.inside += c as u64;
        if wide && c != 0 {
            // Into room reserved for the word's keys (the capacities `push` would give): a
            // `push` per key checked the capacity each time.
            keys.reserve(c);
            let len = keys.len();
            let room = &mut keys.spare_capacity_mut()[..c];
            let mut bits = ins;
            let mut n = 0;
            while bits != 0 {
                room[n].write(crate::select::key(s[bits.trailing_zeros() as usize]));
                n += 1;
                bits &= bits - 1;
            }
            // SAFETY: the n slots after len were written just above.
            unsafe { keys.set_len(len + n) };
        }
    }
    Some(found)
}

/// The inputs of [`fuse_bf16`] for one block of `len` lanes (a multiple of 64), N tasks.
pub(super) struct FuseLanes<'a, const N: usize> {
    /// The base, bf16 (2·len bytes).
    pub b: &'a [u8],
    /// Each task's θ, bf16 (2·len bytes).
    pub th: [&'a [u8]; N],
    /// Each task's mask words for the block (len/64; unread unless `MASKED`).
    pub masks: [&'a [u64]; N],
    pub w: [f32; N],
    /// The divisor or factor of each task's τ (`fuse::scaling`).
    pub d: [f32; N],
    /// The sign bit of `forget:` tasks (linear only).
    pub neg: [u32; N],
    pub lambda: f32,
    /// Divide the sum (TIES: by the agreeing weights' sum, 1 where 0; linear: by `divisor`).
    pub normalize: bool,
    pub divisor: f32,
}

/// `fuse::lanes` for bf16 base, θ and output without a start model, written to `out` (bf16,
/// 2·len bytes): per 8 lanes, every input widened, every mask bit expanded and every step from
/// τ to the narrowed result done in registers, in `lanes`' operations and order. False where
/// some τ is not finite (then `out` is partly written and the caller redoes the block with the
/// portable loops, which find the fault).
///
/// Two steps differ in form, not in bits. The agreement `(u > 0 & S >= 0) | (u < 0 & S < 0)` is
/// `(u ^ sign(S)) > 0` where S is not NaN (a NaN u, from a zero divisor, agrees in neither
/// form), and a NaN S (where nothing agrees) clears the sums afterwards; S is never −0
/// (it starts at +0.0, and a sum is −0 only when both terms are), so its sign bit is its sign.
/// The agreeing terms' sum skips `lanes`' leading `0.0 +`: an agreeing term is never ±0, a
/// dropped one is +0.0, so that add changes nothing. And the narrowing to bf16 needs no NaN case:
/// every NaN is already the canonical one, which the rounding add leaves as it is.
///
/// # Safety
/// The CPU has AVX2; the slices are as described above, `out.len() == b.len()`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn fuse_bf16<
    const N: usize,
    const TIES: bool,
    const SCALE: u8,
    const MASKED: bool,
>(
    p: &FuseLanes<N>,
    out: &mut [u8],
) -> bool {
    use super::fuse::{DIVIDE, MULTIPLY};
    let len = out.len() / 2;
    debug_assert!(len % 64 == 0 && p.b.len() >= 2 * len);
    let zero = _mm256_setzero_ps();
    let one = _mm256_set1_ps(1.0);
    let sign = _mm256_set1_ps(-0.0);
    let canonical = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0_0000));
    let w: [__m256; N] = std::array::from_fn(|t| _mm256_set1_ps(p.w[t]));
    let d: [__m256; N] = std::array::from_fn(|t| _mm256_set1_ps(p.d[t]));
    let neg: [__m256; N] =
        std::array::from_fn(|t| _mm256_castsi256_ps(_mm256_set1_epi32(p.neg[t] as i32)));
    let lambda = _mm256_set1_ps(p.lambda);
    let divisor = _mm256_set1_ps(p.divisor);
    // Bit l of a 32-bit half of a mask word, for the lanes 8j..8j+8 of that half.
    let lane_bit: [__m256i; 4] = std::array::from_fn(|j| {
        let s = 8 * j as i32;
        _mm256_setr_epi32(
            1 << s,
            2 << s,
            4 << s,
            8 << s,
            16 << s,
            32 << s,
            64 << s,
            128 << s,
        )
    });
    let low16 = _mm256_set1_epi32(1);
    let round = _mm256_set1_epi32(0x7fff);
    let mut bad = _mm256_setzero_ps();
    for h in 0..len / 32 {
        // Each task's mask half-word, in every lane.
        let half: [__m256i; N] = std::array::from_fn(|t| {
            if MASKED {
                let word = p.masks[t][h / 2];
                _mm256_set1_epi32((word >> (32 * (h % 2))) as u32 as i32)
            } else {
                _mm256_setzero_si256()
            }
        });
        let mut narrowed = [_mm256_setzero_si256(); 4];
        for j in 0..4 {
            let i = 32 * h + 8 * j;
            // SAFETY: lanes i..i+8 are inside the block.
            let b = unsafe { widen8(p.b.as_ptr().add(2 * i)) };
            let mut u = [zero; N];
            for t in 0..N {
                // SAFETY: as above.
                let tau = _mm256_sub_ps(unsafe { widen8(p.th[t].as_ptr().add(2 * i)) }, b);
                // τ − τ is +0 where τ is finite, NaN where not.
                bad = _mm256_or_ps(bad, _mm256_sub_ps(tau, tau));
                let v = match SCALE {
                    DIVIDE => _mm256_mul_ps(w[t], _mm256_div_ps(tau, d[t])),
                    MULTIPLY => _mm256_mul_ps(w[t], _mm256_mul_ps(tau, d[t])),
                    _ => _mm256_mul_ps(w[t], tau),
                };
                u[t] = if MASKED {
                    let bit = _mm256_and_si256(half[t], lane_bit[j]);
                    let keep = _mm256_cmpeq_epi32(bit, lane_bit[j]);
                    _mm256_and_ps(v, _mm256_castsi256_ps(keep))
                } else {
                    v
                };
            }
            let sum = if TIES {
                let mut s = _mm256_add_ps(zero, u[0]);
                for x in &u[1..] {
                    s = _mm256_add_ps(s, *x);
                }
                let s_sign = _mm256_and_ps(s, sign);
                let ordered = _mm256_cmp_ps(s, s, _CMP_ORD_Q);
                let mut a = zero;
                let mut dw = zero;
                for t in 0..N {
                    let agree = _mm256_cmp_ps(_mm256_xor_ps(u[t], s_sign), zero, _CMP_GT_OQ);
                    let x = _mm256_and_ps(u[t], agree);
                    a = if t == 0 { x } else { _mm256_add_ps(a, x) };
                    dw = _mm256_add_ps(dw, _mm256_and_ps(w[t], agree));
                }
                let a = _mm256_and_ps(a, ordered);
                if p.normalize {
                    let dw = _mm256_and_ps(dw, ordered);
                    let dw = _mm256_blendv_ps(dw, one, _mm256_cmp_ps(dw, zero, _CMP_EQ_OQ));
                    _mm256_div_ps(a, dw)
                } else {
                    a
                }
            } else {
                let mut a = zero;
                for t in 0..N {
                    a = _mm256_add_ps(a, _mm256_xor_ps(u[t], neg[t]));
                }
                if p.normalize {
                    _mm256_div_ps(a, divisor)
                } else {
                    a
                }
            };
            let v = _mm256_add_ps(b, _mm256_mul_ps(lambda, sum));
            let v = _mm256_blendv_ps(v, canonical, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            // Round to nearest even: add 0x7fff plus the kept part's lowest bit (`dtype::bf16_bits`).
            let x = _mm256_castps_si256(v);
            let lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), low16);
            narrowed[j] = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, round), lsb), 16);
        }
        for k in 0..2 {
            // packus interleaves 128-bit halves; the permutation puts the 16 values in order.
            let packed = _mm256_packus_epi32(narrowed[2 * k], narrowed[2 * k + 1]);
            let packed = _mm256_permute4x64_epi64(packed, 0b11_01_10_00);
            // SAFETY: 16 lanes (32 bytes) at 32 h + 16 k, inside `out`; unaligned stores are allowed.
            unsafe {
                _mm256_storeu_si256(
                    out.as_mut_ptr().add(2 * (32 * h + 16 * k)) as *mut __m256i,
                    packed,
                )
            };
        }
    }
    let bad = _mm256_castps_si256(bad);
    _mm256_testz_si256(bad, bad) != 0
}
