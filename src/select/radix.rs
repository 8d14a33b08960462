//! Exact top-k threshold by radix select: one histogram pass per digit, each restricted to the
//! keys that share the digits chosen so far, then the tie rank that keeps the lowest indices.
//! No sort: O(n) per digit, and the result depends only on the keys, so every backend agrees.

use rayon::prelude::*;

/// Keep rule for one task: `key > key_t || (key == key_t && index < cutoff)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub key: u32,
    /// One past the index of the last kept key equal to `key` (n when all equal keys are kept).
    pub cutoff: u64,
    /// Keys strictly above the threshold.
    pub count_gt: u64,
    /// Keys equal to the threshold (kept or not).
    pub count_eq: u64,
}

impl Threshold {
    /// The keep rule of a threshold found elsewhere (the model-wide passes, or the chunks of a
    /// tensor): keys above `key`, and of the `count_eq` keys equal to it the first
    /// min(count_eq, quota), lowest index first. `cutoff_of(ties)` is asked for one past the
    /// index of the last kept tie only when some but not all ties are kept; the cutoff is n when
    /// every tie is kept (also when there is none), 0 when none is. Returns the rule and the
    /// number of ties it keeps.
    pub fn fixed<E>(
        key: u32,
        n: u64,
        count_gt: u64,
        count_eq: u64,
        quota: u64,
        cutoff_of: impl FnOnce(u64) -> Result<u64, E>,
    ) -> Result<(Self, u64), E> {
        let ties = count_eq.min(quota);
        let cutoff = if ties == count_eq {
            n
        } else if ties == 0 {
            0
        } else {
            cutoff_of(ties)?
        };
        let th = Self {
            key,
            cutoff,
            count_gt,
            count_eq,
        };
        Ok((th, ties))
    }

    #[inline(always)]
    pub fn keeps(&self, key: u32, index: u64) -> bool {
        // Non-short-circuit operators: no branch per element in the mask loops.
        (key > self.key) | ((key == self.key) & (index < self.cutoff))
    }
}

/// Elements per parallel work item: big enough to amortise the 2048-bucket histogram.
const CHUNK: usize = 1 << 16;

/// Histogram of `bits` bits at `shift` over the keys whose bits above `shift + bits` equal
/// `prefix` (all keys on the first digit).
pub fn histogram(keys: &[u32], shift: u32, bits: u32, prefix: u32) -> Vec<u64> {
    let top = shift + bits;
    let buckets = 1usize << bits;
    let mask = (buckets - 1) as u32;
    keys.par_chunks(CHUNK)
        .map(|c| {
            let mut h = vec![0u32; buckets];
            crate::wide!(if top >= 32 {
                for &k in c {
                    h[((k >> shift) & mask) as usize] += 1;
                }
            } else {
                for &k in c {
                    if k >> top == prefix {
                        h[((k >> shift) & mask) as usize] += 1;
                    }
                }
            });
            h
        })
        .fold(
            || vec![0u64; buckets],
            |mut acc, h| {
                for (a, x) in acc.iter_mut().zip(h) {
                    *a += x as u64;
                }
                acc
            },
        )
        .reduce(
            || vec![0u64; buckets],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        )
}

/// One step of the select: in a histogram, the bucket that holds the `remaining`-th largest key.
/// Returns (bucket, keys in higher buckets).
pub fn pick_bucket(hist: &[u64], remaining: u64) -> (u32, u64) {
    let mut above = 0u64;
    for b in (0..hist.len()).rev() {
        if above + hist[b] >= remaining {
            return (b as u32, above);
        }
        above += hist[b];
    }
    unreachable!("remaining ({remaining}) exceeds the histogram's total ({above})")
}

/// The k-th largest key and the tie cutoff, for 1 <= k <= keys.len().
pub fn radix_select(keys: &[u32], k: u64) -> Threshold {
    let (shift, bits) = super::DIGITS_11[0];
    radix_select_from(keys, k, &histogram(keys, shift, bits, 0))
}

/// The select, given the first digit's histogram (the CPU backend builds it while computing the
/// keys). When the bucket holding the threshold is small, its keys are gathered once with their
/// indices (AIR top-k's candidate filtering) and the remaining digits and the tie rank run on
/// that short list; otherwise every digit rescans all keys.
pub fn radix_select_from(keys: &[u32], k: u64, hist1: &[u64]) -> Threshold {
    let mut words = vec![0u64; keys.len().div_ceil(64)];
    select_masked(keys, k, hist1, &mut words)
}

/// The select and its keep mask (bit i % 64 of word i / 64; `words` holds one word per 64 keys)
/// from one pass over the keys after the first digit's histogram: that pass already knows the
/// fate of every key outside the threshold's first-digit bucket, so it writes their mask bits
/// and gathers the bucket's keys as candidates; the select finishes on the candidates alone and
/// only their bits are set afterwards. Same result as `radix_select` + `fill_mask`.
pub fn select_masked(keys: &[u32], k: u64, hist1: &[u64], words: &mut [u64]) -> Threshold {
    let n = keys.len() as u64;
    assert!(k >= 1 && k <= n, "k = {k} out of 1..={n}");
    assert_eq!(
        words.len(),
        keys.len().div_ceil(64),
        "one mask word per 64 keys"
    );
    let (b1, above) = pick_bucket(hist1, k);
    let in_bucket = hist1[b1 as usize];
    let top = super::DIGITS_11[0].0;
    if in_bucket > n / 4 || n > u32::MAX as u64 {
        let th = select_full(keys, k, b1, above, in_bucket);
        fill_mask(keys, &th, words);
        return th;
    }
    // Per block, in index order: (index, key) of every key in the threshold's bucket.
    let blocks: Vec<Vec<(u32, u32)>> = keys
        .par_chunks(CHUNK)
        .zip(words.par_chunks_mut(CHUNK / 64))
        .enumerate()
        .map(|(ci, (kc, wc))| {
            let mut eq = [0u64; CHUNK / 64];
            let mut count = 0u32;
            crate::wide!(
                for ((w, e), c) in wc.iter_mut().zip(eq.iter_mut()).zip(kc.chunks(64)) {
                    *w = word_bits(c, |x| x >> top > b1);
                    *e = word_bits(c, |x| x >> top == b1);
                    count += e.count_ones();
                }
            );
            let mut cand = Vec::with_capacity(count as usize);
            for (wi, &e) in eq[..wc.len()].iter().enumerate() {
                let mut bits = e;
                while bits != 0 {
                    let j = wi * 64 + bits.trailing_zeros() as usize;
                    cand.push(((ci * CHUNK + j) as u32, kc[j]));
                    bits &= bits - 1;
                }
            }
            cand
        })
        .collect();
    let hist = |shift: u32, bits: u32, prefix: u32| {
        let mask = (1u32 << bits) - 1;
        let mut h = vec![0u64; 1 << bits];
        for &(_, x) in blocks.iter().flatten() {
            if x >> (shift + bits) == prefix {
                h[((x >> shift) & mask) as usize] += 1;
            }
        }
        h
    };
    let nth = |key: u32, r: u64| {
        blocks
            .iter()
            .flatten()
            .filter(|c| c.1 == key)
            .nth(r as usize - 1)
            .expect("enough ties")
            .0 as u64
    };
    let th = finish_select(n, k, b1, above, in_bucket, hist, nth);
    words
        .par_chunks_mut(CHUNK / 64)
        .zip(blocks.par_iter())
        .enumerate()
        .for_each(|(ci, (wc, cand))| {
            for &(i, x) in cand {
                let j = i as usize - ci * CHUNK;
                wc[j / 64] |= (th.keeps(x, i as u64) as u64) << (j % 64);
            }
        });
    th
}

/// The keep mask of a threshold over all keys (bit i % 64 of word i / 64).
pub fn fill_mask(keys: &[u32], th: &Threshold, words: &mut [u64]) {
    assert_eq!(
        words.len(),
        keys.len().div_ceil(64),
        "one mask word per 64 keys"
    );
    words
        .par_chunks_mut(CHUNK / 64)
        .zip(keys.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(ci, (wc, kc))| {
            crate::wide!(
                for (wi, (w, c)) in wc.iter_mut().zip(kc.chunks(64)).enumerate() {
                    let start = (ci * CHUNK + wi * 64) as u64;
                    let end = start + c.len() as u64;
                    // Only the word holding the tie cutoff needs the index; every other word keeps
                    // either all keys equal to the threshold or none of them.
                    let bits = if end <= th.cutoff {
                        word_bits(c, |x| x >= th.key)
                    } else if start >= th.cutoff {
                        word_bits(c, |x| x > th.key)
                    } else {
                        let mut b = 0u64;
                        for (j, &x) in c.iter().enumerate() {
                            b |= (th.keeps(x, start + j as u64) as u64) << j;
                        }
                        b
                    };
                    *w = bits;
                }
            )
        });
}

/// Bit j set where `keep(c[j])`, for up to 64 keys. The predicate goes to one byte per key
/// first (a loop the compiler vectorises), then each 8 bytes of 0/1 fold into 8 bits with one
/// multiply: shifting bits into a u64 one key at a time cost ~14 instructions per key.
#[inline(always)]
pub(super) fn word_bits(c: &[u32], keep: impl Fn(u32) -> bool) -> u64 {
    let mut flags = [0u8; 64];
    for (f, &x) in flags.iter_mut().zip(c) {
        *f = keep(x) as u8;
    }
    fold_bytes(&flags)
}

/// 64 bytes of 0/1 as the bits of a word (byte j to bit j).
#[inline(always)]
pub(super) fn fold_bytes(flags: &[u8; 64]) -> u64 {
    let mut bits = 0u64;
    for (i, f8) in flags.chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes(f8.try_into().expect("8 bytes"));
        // Byte k (0 or 1) lands on bit 56 + k of the product; no two bytes' terms overlap.
        bits |= (v.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * i);
    }
    bits
}

/// The select when the first bucket is large: every later digit rescans all keys.
fn select_full(keys: &[u32], k: u64, b1: u32, above: u64, in_bucket: u64) -> Threshold {
    let hist = |shift, bits, prefix| histogram(keys, shift, bits, prefix);
    finish_select(
        keys.len() as u64,
        k,
        b1,
        above,
        in_bucket,
        hist,
        |key, r| nth_equal(keys, key, r),
    )
}

/// The digits after the first and the tie rank, over whichever key set `hist` and `nth` read.
fn finish_select(
    n: u64,
    k: u64,
    b1: u32,
    above: u64,
    in_bucket: u64,
    hist: impl Fn(u32, u32, u32) -> Vec<u64>,
    nth: impl Fn(u32, u64) -> u64,
) -> Threshold {
    let mut prefix = b1;
    let mut remaining = k - above;
    let mut count_gt = above;
    let mut count_eq = in_bucket;
    for &(shift, bits) in &super::DIGITS_11[1..] {
        let h = hist(shift, bits, prefix);
        let (b, above) = pick_bucket(&h, remaining);
        count_gt += above;
        remaining -= above;
        count_eq = h[b as usize];
        prefix = (prefix << bits) | b;
    }
    let key = prefix;
    let cutoff = if remaining == count_eq {
        n
    } else {
        nth(key, remaining) + 1
    };
    Threshold {
        key,
        cutoff,
        count_gt,
        count_eq,
    }
}

/// Index of the r-th (1-based) key equal to `key`, in increasing index order.
pub fn nth_equal(keys: &[u32], key: u32, r: u64) -> u64 {
    let counts: Vec<u64> = keys
        .par_chunks(CHUNK)
        .map(|c| crate::wide!(c.iter().filter(|&&k| k == key).count() as u64))
        .collect();
    let mut seen = 0u64;
    for (ci, &c) in counts.iter().enumerate() {
        if seen + c >= r {
            let base = ci * CHUNK;
            for (j, &k) in keys[base..(base + CHUNK).min(keys.len())]
                .iter()
                .enumerate()
            {
                if k == key {
                    seen += 1;
                    if seen == r {
                        return (base + j) as u64;
                    }
                }
            }
        }
        seen += c;
    }
    unreachable!("fewer than {r} keys equal the threshold")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The obvious definition: sort indices by (key desc, index asc), keep the first k.
    fn reference_mask(keys: &[u32], k: usize) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..keys.len()).collect();
        idx.sort_by(|&a, &b| keys[b].cmp(&keys[a]).then(a.cmp(&b)));
        let mut m = vec![false; keys.len()];
        for &i in &idx[..k] {
            m[i] = true;
        }
        m
    }

    fn unpack(words: &[u64], n: usize) -> Vec<bool> {
        (0..n)
            .map(|i| (words[i / 64] >> (i % 64)) & 1 == 1)
            .collect()
    }

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn matches_sort_reference_with_heavy_ties() {
        let mut s = 7u64;
        for &(n, distinct) in &[
            (1usize, 1u64),
            (31, 3),
            (4097, 50),
            (200_003, 1 << 20),
            (70_000, 2),
            // Several blocks, a tail word, and a threshold bucket small enough for candidates.
            (3 * CHUNK + 77, 1 << 24),
        ] {
            let keys: Vec<u32> = (0..n)
                .map(|_| 0x8000_0000 | ((lcg(&mut s) % distinct) as u32).wrapping_mul(977))
                .collect();
            for k in [1, n / 3 + 1, n / 2, n] {
                let k = k.max(1);
                let t = radix_select(&keys, k as u64);
                let got: Vec<bool> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| t.keeps(x, i as u64))
                    .collect();
                let want = reference_mask(&keys, k);
                assert_eq!(got, want, "n={n} k={k}");
                assert_eq!(got.iter().filter(|&&b| b).count(), k);
                // Both mask builders against the reference, bit by bit (stale bits included).
                let hist1 = histogram(&keys, 21, 11, 0);
                let mut words = vec![0x5555_5555_5555_5555u64; n.div_ceil(64)];
                assert_eq!(select_masked(&keys, k as u64, &hist1, &mut words), t);
                assert_eq!(unpack(&words, n), want, "select_masked n={n} k={k}");
                let mut words = vec![u64::MAX; n.div_ceil(64)];
                fill_mask(&keys, &t, &mut words);
                assert_eq!(unpack(&words, n), want, "fill_mask n={n} k={k}");
            }
        }
    }
}
