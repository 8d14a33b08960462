//! A radix select whose keys come in pieces: the tensors of a model (`selection: model`) or the
//! chunks of a tensor larger than the GPU memory budget. Each digit's histogram is added up over
//! every piece, then one bucket is picked; after the last digit the threshold key is known, with
//! the number of keys equal to it that may still be kept (lowest index first). The CPU backend's
//! in-memory select (`radix.rs`) is the same search over one slice.

use super::radix::pick_bucket;

/// One histogram pass of a radix select: the digit of `bits` bits at `shift`, counted over the
/// keys whose bits above `shift + bits` equal `prefix` (every key on the first digit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DigitPass {
    pub shift: u32,
    pub bits: u32,
    pub prefix: u32,
}

/// The state of one search for the k-th largest key, digit by digit from the top.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DigitSearch {
    /// The digits decided so far (the key's top bits, shifted down).
    prefix: u32,
    /// Keys still to place at or below the decided prefix.
    remaining: u64,
    /// Keys in the bucket picked last.
    count_eq: u64,
}

impl DigitSearch {
    /// A search for the k-th largest key (1 <= k <= the number of keys).
    pub fn new(k: u64) -> Self {
        Self {
            prefix: 0,
            remaining: k,
            count_eq: 0,
        }
    }

    /// The histogram to count next, for the digit (shift, bits).
    pub fn pass(&self, shift: u32, bits: u32) -> DigitPass {
        DigitPass {
            shift,
            bits,
            prefix: self.prefix,
        }
    }

    /// Picks the bucket of this digit's histogram (2^bits buckets, summed over every piece)
    /// that holds the remaining-th largest key. An Err says the histogram cannot hold it (a
    /// bug in whatever counted it).
    pub fn advance(&mut self, bits: u32, hist: &[u64]) -> Result<(), String> {
        let total: u64 = hist.iter().sum();
        if self.remaining == 0 || self.remaining > total {
            return Err(format!(
                "{} keys to place among the {total} of a digit's histogram",
                self.remaining
            ));
        }
        let (b, above) = pick_bucket(hist, self.remaining);
        self.remaining -= above;
        self.count_eq = hist[b as usize];
        self.prefix = (self.prefix << bits) | b;
        Ok(())
    }

    /// The digits decided so far; after the last digit, the threshold key.
    pub fn prefix(&self) -> u32 {
        self.prefix
    }

    /// Keys equal to the threshold that are kept (after the last digit): the tie quota.
    pub fn quota(&self) -> u64 {
        self.remaining
    }

    /// Keys in the last picked bucket (after the last digit: keys equal to the threshold).
    pub fn count_eq(&self) -> u64 {
        self.count_eq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::{radix_select, DIGITS_11};

    #[test]
    fn a_search_over_pieces_finds_the_threshold_of_the_whole() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let keys: Vec<u32> = (0..50_000)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // few distinct values, so that ties at the threshold are common
                (s >> 40) as u32 % 3000 * 997
            })
            .collect();
        for k in [1u64, 17, 12_345, 50_000] {
            let want = radix_select(&keys, k);
            let mut search = DigitSearch::new(k);
            for &(shift, bits) in &DIGITS_11 {
                let p = search.pass(shift, bits);
                let mut hist = vec![0u64; 1 << bits];
                for piece in keys.chunks(7_001) {
                    for &key in piece {
                        let top = p.shift + p.bits;
                        if top >= 32 || key >> top == p.prefix {
                            hist[((key >> p.shift) & ((1 << p.bits) - 1)) as usize] += 1;
                        }
                    }
                }
                search.advance(bits, &hist).unwrap();
            }
            assert_eq!(search.prefix(), want.key, "k = {k}");
            assert_eq!(search.count_eq(), want.count_eq, "k = {k}");
            assert_eq!(search.quota(), k - want.count_gt, "k = {k}");
        }
        let mut search = DigitSearch::new(5);
        assert!(search.advance(11, &[1, 2]).is_err());
    }
}
