//! The safetensors header path: any bytes as a whole file image. Accepted headers must describe
//! tensors that lie inside the image, back to back in offset order, under unique names.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use stamerge::checkpoint::file::parse_header;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = parse_header(data) else {
        return;
    };
    let mut names = HashSet::new();
    let mut next = None;
    for t in &h.tensors {
        assert!(t.start <= t.end && t.end <= data.len(), "{t:?}");
        if let Some(n) = next {
            assert_eq!(t.start, n, "gap or overlap before {}", t.name);
        }
        next = Some(t.end);
        let n = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .expect("an accepted shape has no overflowing product");
        let bits = n
            .checked_mul(t.dtype.bitsize())
            .expect("an accepted byte size does not overflow");
        assert_eq!(bits.div_ceil(8), t.nbytes(), "{t:?}");
        assert!(names.insert(t.name.clone()), "duplicate {}", t.name);
    }
    if let Some(n) = next {
        assert_eq!(n, data.len(), "data must end at the end of the file");
    }
});
