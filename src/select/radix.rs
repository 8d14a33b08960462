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
            if top >= 32 {
                for &k in c {
                    h[((k >> shift) & mask) as usize] += 1;
                }
            } else {
                for &k in c {
                    if k >> top == prefix {
                        h[((k >> shift) & mask) as usize] += 1;
                    }
                }
            }
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
    let n = keys.len() as u64;
    assert!(k >= 1 && k <= n, "k = {k} out of 1..={n}");
    let digits = super::DIGITS_11;
    let (b1, above) = pick_bucket(hist1, k);
    let in_bucket = hist1[b1 as usize];
    let top = digits[0].0;
    if in_bucket > n / 4 || n > u32::MAX as u64 {
        return select_full(keys, k, b1, above, in_bucket);
    }
    // (index, key) of every key in the threshold's bucket, in index order.
    let cand: Vec<(u32, u32)> = keys
        .par_chunks(CHUNK)
        .enumerate()
        .flat_map_iter(|(ci, c)| {
            c.iter()
                .enumerate()
                .filter(move |(_, &x)| x >> top == b1)
                .map(move |(j, &x)| ((ci * CHUNK + j) as u32, x))
        })
        .collect();
    let hist = |shift: u32, bits: u32, prefix: u32| {
        let mask = (1u32 << bits) - 1;
        let mut h = vec![0u64; 1 << bits];
        for &(_, x) in &cand {
            if x >> (shift + bits) == prefix {
                h[((x >> shift) & mask) as usize] += 1;
            }
        }
        h
    };
    let nth = |key: u32, r: u64| {
        cand.iter()
            .filter(|c| c.1 == key)
            .nth(r as usize - 1)
            .expect("enough ties")
            .0 as u64
    };
    finish_select(n, k, b1, above, in_bucket, hist, nth)
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
        .map(|c| c.iter().filter(|&&k| k == key).count() as u64)
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
        ] {
            let keys: Vec<u32> = (0..n)
                .map(|_| 0x8000_0000 | ((lcg(&mut s) % distinct) as u32 * 977))
                .collect();
            for k in [1, n / 3 + 1, n / 2, n] {
                let k = k.max(1);
                let t = radix_select(&keys, k as u64);
                let got: Vec<bool> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| t.keeps(x, i as u64))
                    .collect();
                assert_eq!(got, reference_mask(&keys, k), "n={n} k={k}");
                assert_eq!(got.iter().filter(|&&b| b).count(), k);
            }
        }
    }
}
