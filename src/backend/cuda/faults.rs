//! The kernels' error words → the [`Fault`] the CPU backend reports for the same input. The bit
//! layouts are in docs/KERNELS.md, "Error words"; the kernels write the lowest bad index with an
//! atomic min, so the decoded fault names the element the CPU's scan finds first.

use crate::backend::{BResult, BackendError, Fault, Source};

/// `score_keys`' word: `(i << 3) | (source << 1) | is_nan`; source 0 base, 1 theta, 2 grad,
/// 3 the score itself overflowed.
pub(super) fn score_fault(word: u64, task: usize) -> Option<Fault> {
    if word == u64::MAX {
        return None;
    }
    let source = match (word >> 1) & 3 {
        0 => Source::Base,
        1 => Source::Theta(task),
        2 => Source::Grad(task),
        _ => Source::Score(task),
    };
    Some(Fault {
        source,
        index: word >> 3,
        value_is_nan: word & 1 == 1,
    })
}

/// The fuse kernels' word: `(i << 9) | (slot << 2) | (base_bad << 1) | is_nan`; slot 0 the
/// start value, slot 1 + t task t's τ (blamed on the base when the base value is bad).
pub(super) fn fuse_fault(word: u64) -> Option<Fault> {
    if word == u64::MAX {
        return None;
    }
    let slot = ((word >> 2) & 0x7f) as usize;
    let source = match slot {
        0 => Source::Start,
        _ if (word >> 1) & 1 == 1 => Source::Base,
        t => Source::Theta(t - 1),
    };
    Some(Fault {
        source,
        index: word >> 9,
        value_is_nan: word & 1 == 1,
    })
}

pub(super) fn fault_result(f: Option<Fault>) -> BResult<()> {
    match f {
        Some(f) => Err(BackendError::Fault(f)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn error_words_decode_like_the_kernels_write_them() {
        // score_keys: (i << 3) | (source << 1) | is_nan
        let w = (12345u64 << 3) | (2 << 1) | 1;
        assert_eq!(
            score_fault(w, 4),
            Some(Fault {
                source: Source::Grad(4),
                index: 12345,
                value_is_nan: true
            })
        );
        assert_eq!(score_fault(3 << 1, 0).unwrap().source, Source::Score(0));
        assert_eq!(score_fault(u64::MAX, 0), None);
        // fuse: (i << 9) | (slot << 2) | (base_bad << 1) | is_nan
        let f = fuse_fault(7 << 9).unwrap();
        assert_eq!(
            (f.source, f.index, f.value_is_nan),
            (Source::Start, 7, false)
        );
        let f = fuse_fault((9 << 9) | (3 << 2) | 1).unwrap();
        assert_eq!(
            (f.source, f.index, f.value_is_nan),
            (Source::Theta(2), 9, true)
        );
        let f = fuse_fault((9 << 9) | (3 << 2) | 2).unwrap();
        assert_eq!(f.source, Source::Base);
        assert_eq!(fuse_fault(u64::MAX), None);
    }
}
