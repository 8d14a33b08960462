//! Top-k without a key buffer, as the CPU backend runs it. A sample of the keys fixes a window
//! [lo, hi] expected to hold the k-th largest key. One pass over the inputs then settles every
//! key above the window (kept) and below it (dropped) on the spot, and keeps only the keys inside
//! it, in index order, for an exact select among them. The result is the `Threshold` (and so the
//! mask) that `radix::select_masked` finds over all keys: the pass's counts say exactly whether
//! the k-th key is inside the window, and when a misleading sample left it outside, the caller
//! selects the old way. A window of one key (`lo == hi`: a tensor small enough to sample whole,
//! keys that are all equal, or the fixed threshold of `selection: model`) needs no keys at all.

use super::dare::fmix;
use super::radix::{self, word_bits, Threshold};

/// An inclusive key range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub lo: u32,
    pub hi: u32,
}

/// Tensors up to this many keys are sampled whole, which makes their window exact.
pub const SAMPLE_ALL: usize = 4096;
/// Larger tensors: blocks of `SAMPLE_BLOCK` consecutive keys, one in each of as many equal
/// strides, at a hashed offset inside it (a fixed offset could keep meeting the same column of
/// a weight matrix). Short blocks, many of them: rows of a weight matrix differ in scale, and a
/// sample of few long blocks would know few rows.
pub const SAMPLE_BLOCK: usize = 8;
/// At most this many blocks (131 072 keys).
pub const SAMPLE_BLOCKS: usize = 16_384;

/// The window's half-width in standard deviations of the sample's rank of the k-th key. A miss
/// costs a second select over the tensor, a wider window only more keys kept aside: 5 misses an
/// unbiased sample about once in 10^6 tensors and keeps ~3.5 % of the keys of a 2048-block
/// sample at density 0.3.
const SIGMAS: f64 = 5.0;

impl Window {
    /// The window of a fixed threshold key (`selection: model`).
    pub fn exact(key: u32) -> Self {
        Self { lo: key, hi: key }
    }

    /// Whether `x` lies in the window.
    #[inline(always)]
    pub fn holds(&self, x: u32) -> bool {
        x.wrapping_sub(self.lo) <= self.hi.wrapping_sub(self.lo)
    }

    /// The window for the k-th largest of `n` keys, from the keys at [`sample_starts`]'s
    /// positions (reordered in place). Exact (one key) when the sample is every key.
    pub fn from_sample(sample: &mut [u32], n: u64, k: u64) -> Self {
        let m = sample.len();
        assert!(
            m > 0 && k >= 1 && k <= n,
            "a sample, and 1 <= k = {k} <= n = {n}"
        );
        // The r-th largest (0-based) of the sample.
        let mut desc = |r: usize| *sample.select_nth_unstable(m - 1 - r).1;
        if m as u64 == n {
            return Self::exact(desc(k as usize - 1));
        }
        let p = k as f64 / n as f64;
        let centre = p * m as f64;
        let delta = SIGMAS * (m as f64 * p * (1.0 - p)).sqrt() + 4.0;
        let top = centre - delta;
        let bottom = (centre + delta).ceil();
        // The upper bound first: its select leaves every key below it in front of its position,
        // and the lower bound, the r-th largest for a larger r, is then the same order
        // statistic of that front part alone (a select over less than the whole sample again).
        let (hi, front) = if top < 0.0 {
            (u32::MAX, m)
        } else {
            let r = top.floor() as usize;
            (desc(r), m - 1 - r)
        };
        let lo = if bottom >= m as f64 {
            0
        } else {
            let pos = m - 1 - bottom as usize;
            *sample[..front].select_nth_unstable(pos).1
        };
        Self { lo, hi }
    }
}

/// The sample of a tensor of `n` keys: (block length, block starts), blocks disjoint and in
/// increasing order. One block of all `n` keys up to [`SAMPLE_ALL`].
///
/// Its size balances two costs: a key sampled (gathered, scored, twice quickselected: ~40
/// instructions) against a key kept in the window (collected, selected among, its bit set: ~70),
/// of which a sample of m keys leaves about 10·sqrt(p(1-p)/m)·n. The sum is least near
/// m = (4n)^(2/3): 10 k keys of a 262 k-element tensor, 65 k of 4 M; never more than n/8.
pub fn sample_starts(n: usize) -> (usize, Vec<usize>) {
    if n <= SAMPLE_ALL {
        return (n, vec![0]);
    }
    let m = icbrt(16 * (n as u128) * (n as u128)) as usize;
    let blocks = (m / SAMPLE_BLOCK)
        .min(SAMPLE_BLOCKS)
        .min(n / (8 * SAMPLE_BLOCK))
        .max(1);
    let stride = n / blocks;
    let starts = (0..blocks)
        .map(|b| {
            let room = (stride - SAMPLE_BLOCK + 1) as u64;
            b * stride + (fmix(b as u64 ^ 0x5851_f42d_4c95_7f2d) % room) as usize
        })
        .collect();
    (SAMPLE_BLOCK, starts)
}

/// The integer cube root (the largest r with r³ <= x).
fn icbrt(x: u128) -> u128 {
    let mut r = (x as f64).cbrt() as u128;
    while r * r * r > x {
        r -= 1;
    }
    while (r + 1) * (r + 1) * (r + 1) <= x {
        r += 1;
    }
    r
}

/// Up to 64 keys against a window: (bits of the keys above it, bits of the keys inside it).
#[inline(always)]
pub fn classify(keys: &[u32], w: Window) -> (u64, u64) {
    (
        word_bits(keys, |x| x > w.hi),
        word_bits(keys, |x| w.holds(x)),
    )
}

/// [`classify`] of the keys of up to 64 scores (`super::key`), without storing the keys.
#[inline(always)]
pub fn classify_scores(s: &[f32], w: Window) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    if s.len() == 64 && crate::simd::enabled() {
        let s: &[f32; 64] = s.try_into().expect("64 scores");
        // SAFETY: `enabled` is true only when the CPU has AVX2.
        return unsafe { classify_scores_avx2(s, w) };
    }
    classify_scores_portable(s, w)
}

#[inline(always)]
fn classify_scores_portable(s: &[f32], w: Window) -> (u64, u64) {
    let mut keys = [0u32; 64];
    for (k, &x) in keys.iter_mut().zip(s) {
        *k = super::key(x);
    }
    classify(&keys[..s.len()], w)
}

/// [`classify_scores`] with AVX2: a compare and a `movemask` per 8 keys give 8 bits at once,
/// where the portable loop builds a byte per key and folds bytes into bits.
///
/// AVX2 compares signed integers only: `key ^ 0x8000_0000`, which is the float's bits with the
/// magnitude bits flipped when negative, orders as i32 as the keys do as u32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn classify_scores_avx2(s: &[f32; 64], w: Window) -> (u64, u64) {
    use std::arch::x86_64::*;
    let hi = _mm256_set1_epi32((w.hi ^ 0x8000_0000) as i32);
    let lo = _mm256_set1_epi32((w.lo ^ 0x8000_0000) as i32);
    let (mut above, mut outside) = (0u64, 0u64);
    for i in 0..8 {
        // SAFETY: 8 floats at 8 i, inside the 64; unaligned loads are allowed.
        let b = unsafe { _mm256_loadu_si256(s.as_ptr().add(8 * i) as *const __m256i) };
        let k = _mm256_xor_si256(b, _mm256_srli_epi32(_mm256_srai_epi32(b, 31), 1));
        let a = _mm256_cmpgt_epi32(k, hi);
        let out = _mm256_or_si256(a, _mm256_cmpgt_epi32(lo, k));
        above |= (_mm256_movemask_ps(_mm256_castsi256_ps(a)) as u8 as u64) << (8 * i);
        outside |= (_mm256_movemask_ps(_mm256_castsi256_ps(out)) as u8 as u64) << (8 * i);
    }
    (above, !outside)
}

/// Index of the r-th (1-based) set bit of `words`.
pub fn nth_set_bit(words: &[u64], r: u64) -> u64 {
    let mut seen = 0u64;
    for (i, &w) in words.iter().enumerate() {
        let c = w.count_ones() as u64;
        if seen + c >= r {
            let mut bits = w;
            for _ in 0..r - seen - 1 {
                bits &= bits - 1;
            }
            return i as u64 * 64 + bits.trailing_zeros() as u64;
        }
        seen += c;
    }
    panic!("fewer than {r} bits set")
}

/// The top-k threshold from one pass's findings: `above` keys above the window, `inside` in it
/// (their bits in `inside_words`; when lo < hi their keys in index order, in consecutive
/// `pieces`). None when the k-th largest key is not in the window.
pub fn top_k(
    n: u64,
    k: u64,
    w: Window,
    above: u64,
    inside: u64,
    inside_words: &[u64],
    pieces: &[&[u32]],
) -> Option<Threshold> {
    if above >= k || above + inside < k {
        return None;
    }
    let r = k - above;
    if w.lo == w.hi {
        let cutoff = if r == inside {
            n
        } else {
            nth_set_bit(inside_words, r) + 1
        };
        return Some(Threshold {
            key: w.lo,
            cutoff,
            count_gt: above,
            count_eq: inside,
        });
    }
    assert_eq!(
        pieces.iter().map(|p| p.len() as u64).sum::<u64>(),
        inside,
        "every key of the window, in order"
    );
    // The same select over the window's keys alone; a position among them maps back to an index.
    let c = select_among(pieces, r);
    let cutoff = if c.cutoff == inside {
        n
    } else {
        nth_set_bit(inside_words, c.cutoff) + 1
    };
    Some(Threshold {
        key: c.key,
        cutoff,
        count_gt: above + c.count_gt,
        count_eq: c.count_eq,
    })
}

/// `radix_select(keys, r)` for the few keys of a window, given in consecutive pieces: one
/// quickselect for the key (on a copy), one counting pass and a scan for the tie cutoff over the
/// pieces (the radix select's digit passes and mask cost ~50 instructions per key here, where
/// all keys share their top digits).
fn select_among(pieces: &[&[u32]], r: u64) -> Threshold {
    let mut copy = pieces.concat();
    let m = copy.len();
    let key = *copy.select_nth_unstable(m - r as usize).1;
    let keys = || pieces.iter().flat_map(|p| p.iter().copied());
    let (count_gt, count_eq) = pieces.iter().fold((0u64, 0u64), |(g, e), p| {
        p.iter().fold((g, e), |(g, e), &x| {
            (g + (x > key) as u64, e + (x == key) as u64)
        })
    });
    let ties = r - count_gt;
    let cutoff = if ties == count_eq {
        m as u64
    } else {
        let (i, _) = keys()
            .enumerate()
            .filter(|&(_, x)| x == key)
            .nth(ties as usize - 1)
            .expect("enough ties");
        i as u64 + 1
    };
    Threshold {
        key,
        cutoff,
        count_gt,
        count_eq,
    }
}

/// Sets in `mask` the bits of the window's keys that `th` keeps, for the words of one piece of
/// the tensor starting at index `start` (a multiple of 64). `keys`: the piece's window keys in
/// index order, or None when every window key equals `th.key` (a one-key window).
///
/// Branch-free: each key's fate is decided in key order (a byte per key folded into bits), then
/// each word's share of those bits is deposited at its window bits. One loop over the set bits
/// per word instead mispredicted its exit about once a word.
pub fn keep_inside(
    th: &Threshold,
    start: u64,
    inside: &[u64],
    keys: Option<&[u32]>,
    mask: &mut [u64],
) {
    let below = |first: u64| {
        if first + 64 <= th.cutoff {
            u64::MAX
        } else if first < th.cutoff {
            u64::MAX >> (64 - (th.cutoff - first))
        } else {
            0
        }
    };
    let Some(keys) = keys else {
        for (i, (m, &w)) in mask.iter_mut().zip(inside).enumerate() {
            *m |= w & below(start + 64 * i as u64);
        }
        return;
    };
    // Keys equal to the threshold are kept while their index is below the cutoff: they are the
    // piece's first `ties_before` window keys, by position.
    // A piece wholly below the cutoff (or wholly above it) needs no count: all (none) of its
    // window keys come before it.
    let end = start + 64 * inside.len() as u64;
    let ties_before: u64 = if th.cutoff >= end {
        keys.len() as u64
    } else if th.cutoff <= start {
        0
    } else {
        inside
            .iter()
            .enumerate()
            .map(|(i, &w)| (w & below(start + 64 * i as u64)).count_ones() as u64)
            .sum()
    };
    let mut fate = vec![0u64; keys.len().div_ceil(64) + 1];
    for (j, (f, c)) in fate.iter_mut().zip(keys.chunks(64)).enumerate() {
        let first = 64 * j as u64;
        let mut bytes = [0u8; 64];
        // Whole runs of 64 keys before (after) the tie cutoff: one compare per key.
        if first + 64 <= ties_before {
            for (b, &x) in bytes.iter_mut().zip(c) {
                *b = (x >= th.key) as u8;
            }
        } else if first >= ties_before {
            for (b, &x) in bytes.iter_mut().zip(c) {
                *b = (x > th.key) as u8;
            }
        } else {
            for (p, (b, &x)) in bytes.iter_mut().zip(c).enumerate() {
                *b = ((x > th.key) | ((x == th.key) & (first + (p as u64) < ties_before))) as u8;
            }
        }
        *f = radix::fold_bytes(&bytes);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::enabled() {
        // SAFETY: `enabled` is true only when the CPU has BMI2 (with AVX2).
        unsafe { deposit_bmi2(&fate, inside, mask) };
        return;
    }
    deposit(&fate, inside, mask, pdep_portable);
}

/// `pdep`: the low bits of `bits`, in order, at the set bits of `w`.
#[inline(always)]
fn pdep_portable(bits: u64, w: u64) -> u64 {
    let (mut out, mut w, mut bits) = (0u64, w, bits);
    while w != 0 {
        out |= (bits & 1).wrapping_neg() & (w & w.wrapping_neg());
        bits >>= 1;
        w &= w - 1;
    }
    out
}

/// For each word of `inside`, the next popcount(word) bits of `fate` placed at its set bits
/// (`pdep`), ORed into `mask`.
#[inline(always)]
fn deposit(fate: &[u64], inside: &[u64], mask: &mut [u64], pdep: impl Fn(u64, u64) -> u64) {
    let mut pos = 0usize;
    for (m, &w) in mask.iter_mut().zip(inside) {
        let c = w.count_ones() as usize;
        let (i, o) = (pos / 64, pos % 64);
        let lo = fate[i] >> o;
        let hi = if o == 0 { 0 } else { fate[i + 1] << (64 - o) };
        let bits = (lo | hi) & u64::MAX.checked_shr(64 - c as u32).unwrap_or(0);
        *m |= pdep(bits, w);
        pos += c;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "bmi2,popcnt")]
unsafe fn deposit_bmi2(fate: &[u64], inside: &[u64], mask: &mut [u64]) {
    deposit(fate, inside, mask, |bits, w| {
        std::arch::x86_64::_pdep_u64(bits, w)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::radix::{fill_mask, histogram, radix_select, select_masked};

    /// The window select as the CPU backend runs it, over keys in pieces of `piece` (a multiple
    /// of 64): classify, then settle and fill.
    fn by_window(keys: &[u32], k: u64, w: Window, piece: usize) -> Option<(Threshold, Vec<u64>)> {
        let n = keys.len();
        let mut mask = vec![0u64; n.div_ceil(64)];
        let mut inside = vec![0u64; n.div_ceil(64)];
        let (mut above, mut ins) = (0u64, 0u64);
        let mut pieces: Vec<Vec<u32>> = Vec::new();
        for (pi, kc) in keys.chunks(piece).enumerate() {
            let mut kept = Vec::new();
            for (wi, c) in kc.chunks(64).enumerate() {
                let (a, b) = classify(c, w);
                let word = pi * piece / 64 + wi;
                mask[word] = a;
                inside[word] = b;
                above += a.count_ones() as u64;
                ins += b.count_ones() as u64;
                let mut bits = b;
                while bits != 0 {
                    kept.push(c[bits.trailing_zeros() as usize]);
                    bits &= bits - 1;
                }
            }
            pieces.push(kept);
        }
        let refs: Vec<&[u32]> = pieces.iter().map(|p| p.as_slice()).collect();
        let th = top_k(n as u64, k, w, above, ins, &inside, &refs)?;
        for (pi, kept) in pieces.iter().enumerate() {
            let words = pi * piece / 64..((pi + 1) * piece / 64).min(mask.len());
            let keys = (w.lo < w.hi).then_some(kept.as_slice());
            let (m, i) = (&mut mask[words.clone()], &inside[words.clone()]);
            keep_inside(&th, (pi * piece) as u64, i, keys, m);
        }
        Some((th, mask))
    }

    fn sampled(keys: &[u32], k: u64) -> Window {
        let (len, starts) = sample_starts(keys.len());
        let mut s: Vec<u32> = starts
            .iter()
            .flat_map(|&b| keys[b..b + len].iter().copied())
            .collect();
        Window::from_sample(&mut s, keys.len() as u64, k)
    }

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// Key sets that have broken top-k selects: every key equal, every key in one first-digit
    /// bucket, few distinct values, runs of equal keys across pieces, zeros (NaN scores as 0),
    /// a row-structured tensor (whole rows of zeros, as in an embedding's unseen tokens).
    fn adversarial(n: usize, seed: u64) -> Vec<(&'static str, Vec<u32>)> {
        let mut s = seed | 1;
        let zero = crate::select::key(0.0);
        let mut sets = vec![
            ("all equal", vec![crate::select::key(0.25); n]),
            (
                "one first-digit bucket",
                (0..n)
                    .map(|_| 0xC000_0000 | (xorshift(&mut s) as u32 & 0x001F_FFFF))
                    .collect(),
            ),
            (
                "three values",
                (0..n)
                    .map(|_| 0x9000_0000 + (xorshift(&mut s) % 3) as u32)
                    .collect(),
            ),
            (
                "ties straddling pieces",
                (0..n)
                    .map(|i| {
                        if (i + 40) % 16_384 < 80 {
                            0xA000_0000
                        } else {
                            0x8000_0000 | (xorshift(&mut s) as u32 >> 1)
                        }
                    })
                    .collect(),
            ),
            (
                "mostly zero scores",
                (0..n)
                    .map(|_| {
                        let r = xorshift(&mut s);
                        if r % 4 == 0 {
                            zero
                        } else {
                            crate::select::key((r >> 40) as f32 / (1u64 << 24) as f32)
                        }
                    })
                    .collect(),
            ),
            (
                "zero rows",
                (0..n)
                    .map(|i| {
                        let r = xorshift(&mut s);
                        if (i / 1000) % 3 == 0 {
                            zero
                        } else {
                            crate::select::key((r >> 40) as f32 / (1u64 << 24) as f32)
                        }
                    })
                    .collect(),
            ),
            (
                "distinct",
                (0..n)
                    .map(|_| 0x8000_0000 | (xorshift(&mut s) as u32 >> 1))
                    .collect(),
            ),
        ];
        sets.push(("descending", (0..n as u32).rev().collect()));
        sets
    }

    #[test]
    fn the_window_select_equals_the_radix_select_on_adversarial_keys() {
        let (mut sampled_hits, mut sampled_tries) = (0, 0);
        for n in [1usize, 63, 64, 4096, 4097, 50_001, 70_000] {
            for (what, keys) in adversarial(n, n as u64) {
                let mut ks: Vec<u64> = vec![1, n as u64, (n as u64 * 3) / 10, n as u64 / 2];
                if n > 1 {
                    ks.push(n as u64 - 1);
                }
                for k in ks.into_iter().filter(|&k| k >= 1) {
                    let want = radix_select(&keys, k);
                    let mut want_mask = vec![0u64; n.div_ceil(64)];
                    fill_mask(&keys, &want, &mut want_mask);
                    let w = sampled(&keys, k);
                    if n <= SAMPLE_ALL {
                        assert_eq!(w, Window::exact(want.key), "{what} n={n} k={k}");
                    }
                    // The sampled window, and windows that must miss or barely hold the key.
                    let windows = [
                        w,
                        Window::exact(want.key),
                        Window {
                            lo: want.key,
                            hi: u32::MAX,
                        },
                        Window {
                            lo: 0,
                            hi: want.key,
                        },
                        Window {
                            lo: 0,
                            hi: u32::MAX,
                        },
                        Window {
                            lo: want.key.saturating_add(1),
                            hi: u32::MAX,
                        },
                        Window {
                            lo: 0,
                            hi: want.key.saturating_sub(1),
                        },
                    ];
                    for (wi, w) in windows.into_iter().enumerate() {
                        let holds = w.holds(want.key);
                        for piece in [64usize, 16_384] {
                            sampled_tries += (wi == 0) as usize;
                            match by_window(&keys, k, w, piece) {
                                Some((th, mask)) => {
                                    assert!(holds, "{what} n={n} k={k} {w:?}: found outside");
                                    assert_eq!(th, want, "{what} n={n} k={k} {w:?}");
                                    assert_eq!(mask, want_mask, "{what} n={n} k={k} {w:?}");
                                    sampled_hits += (wi == 0) as usize;
                                }
                                None => assert!(!holds, "{what} n={n} k={k} {w:?}: missed"),
                            }
                        }
                    }
                }
            }
        }
        // The sample is there to be right: it held the threshold in most cases above.
        assert!(
            sampled_hits * 10 >= sampled_tries * 9,
            "the sampled window held the key {sampled_hits} times of {sampled_tries}"
        );
    }

    #[test]
    fn scores_classify_like_their_keys_in_both_versions() {
        let mut s = 5u64;
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::MIN_POSITIVE,
            1e-42,
            f32::MAX,
            -f32::MAX,
        ];
        for round in 0..400 {
            let scores: Vec<f32> = (0..64)
                .map(|_| {
                    let r = xorshift(&mut s);
                    if r % 5 == 0 {
                        specials[(r >> 8) as usize % specials.len()]
                    } else {
                        f32::from_bits(r as u32) // any bits, NaN and infinities included
                    }
                })
                .map(|x: f32| if round % 2 == 0 { x.abs() } else { x })
                .collect();
            let keys: Vec<u32> = scores.iter().map(|&x| crate::select::key(x)).collect();
            let mut edges = keys.clone();
            edges.extend([0, u32::MAX, 0x8000_0000, 0x7fff_ffff]);
            let lo = edges[(xorshift(&mut s) % edges.len() as u64) as usize];
            let hi = edges[(xorshift(&mut s) % edges.len() as u64) as usize];
            let w = Window {
                lo: lo.min(hi),
                hi: lo.max(hi),
            };
            let want = classify(&keys, w);
            assert_eq!(classify_scores_portable(&scores, w), want, "{w:?}");
            assert_eq!(
                classify_scores_portable(&scores[..37], w),
                classify(&keys[..37], w)
            );
            #[cfg(target_arch = "x86_64")]
            if crate::simd::avx2_available() {
                let s64: &[f32; 64] = scores.as_slice().try_into().unwrap();
                // SAFETY: the CPU has AVX2.
                assert_eq!(unsafe { classify_scores_avx2(s64, w) }, want, "{w:?} avx2");
            }
        }
    }

    #[test]
    fn the_bit_deposit_places_the_fates_in_order_in_both_versions() {
        let mut s = 77u64;
        let inside: Vec<u64> = (0..300)
            .map(|i| match i % 5 {
                0 => 0,
                1 => u64::MAX,
                _ => xorshift(&mut s) & xorshift(&mut s),
            })
            .collect();
        let total: u32 = inside.iter().map(|w| w.count_ones()).sum();
        let fate: Vec<u64> = (0..total.div_ceil(64) + 1)
            .map(|_| xorshift(&mut s))
            .collect();
        // The reference: walk the window bits in order, the j-th takes fate bit j.
        let mut want = vec![0u64; inside.len()];
        let mut j = 0;
        for (m, &w) in want.iter_mut().zip(&inside) {
            for b in 0..64 {
                if (w >> b) & 1 == 1 {
                    *m |= ((fate[j / 64] >> (j % 64)) & 1) << b;
                    j += 1;
                }
            }
        }
        let mut got = vec![0u64; inside.len()];
        deposit(&fate, &inside, &mut got, pdep_portable);
        assert_eq!(got, want);
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx2_available() {
            let mut got = vec![0u64; inside.len()];
            // SAFETY: the CPU has BMI2.
            unsafe { deposit_bmi2(&fate, &inside, &mut got) };
            assert_eq!(got, want);
        }
    }

    #[test]
    fn the_select_among_a_windows_keys_is_the_radix_select() {
        for (what, keys) in adversarial(20_000, 3) {
            let pieces: Vec<&[u32]> = keys.chunks(777).collect();
            for r in [1u64, 2, 777, 10_000, 19_999, 20_000] {
                assert_eq!(
                    select_among(&pieces, r),
                    radix_select(&keys, r),
                    "{what} r={r}"
                );
            }
        }
    }

    #[test]
    fn the_sample_stays_inside_the_tensor_and_in_order() {
        for n in [4097usize, 10_000, 65_536, 1 << 20, 123_456_789] {
            let (len, starts) = sample_starts(n);
            assert_eq!(len, SAMPLE_BLOCK);
            assert!(!starts.is_empty() && starts.len() <= SAMPLE_BLOCKS);
            assert!(starts.windows(2).all(|w| w[0] + len <= w[1]), "n={n}");
            assert!(starts.last().unwrap() + len <= n, "n={n}");
        }
        assert_eq!(sample_starts(100), (100, vec![0]));
    }

    #[test]
    fn the_window_select_agrees_with_the_masked_select_on_random_keys() {
        let mut s = 99u64;
        for n in [5000usize, 33_000, 200_000] {
            let keys: Vec<u32> = (0..n)
                .map(|_| 0x8000_0000 | ((xorshift(&mut s) % 100_000) as u32 * 977))
                .collect();
            for k in [1, n as u64 / 10, n as u64 / 3] {
                let mut want_mask = vec![0u64; n.div_ceil(64)];
                let want = select_masked(&keys, k, &histogram(&keys, 21, 11, 0), &mut want_mask);
                let (th, mask) = by_window(&keys, k, sampled(&keys, k), 16_384)
                    .expect("a random sample holds the threshold");
                assert_eq!((th, mask), (want, want_mask), "n={n} k={k}");
            }
        }
    }
}
