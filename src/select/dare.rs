//! DARE's keep decision from a counter-based generator keyed by (seed, task, tensor, index):
//! no state, so any thread count and any backend draw the same mask.

#[inline(always)]
pub fn fmix(mut z: u64) -> u64 {
    z ^= z >> 30;
    z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 27;
    z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a 64 of the tensor name.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The per-(seed, task, tensor) stream key.
pub fn stream(seed: u64, task: usize, name: &str) -> u64 {
    fmix(fmix(seed ^ fmix(task as u64 + 1)) ^ name_hash(name))
}

/// Entries with `(h >> 32) < threshold` are kept; density 1 keeps all.
pub fn threshold(density: f64) -> u64 {
    if density >= 1.0 {
        1u64 << 32
    } else {
        (density * 4_294_967_296.0).floor() as u64
    }
}

#[inline(always)]
pub fn keep(stream: u64, index: u64, threshold: u64) -> bool {
    let h = fmix(stream.wrapping_add((index + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    (h >> 32) < threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rate_is_density() {
        let s = stream(42, 0, "model.layers.0.mlp.up_proj.weight");
        let t = threshold(0.3);
        let kept = (0..1_000_000u64).filter(|&i| keep(s, i, t)).count();
        assert!((kept as f64 / 1e6 - 0.3).abs() < 0.003, "kept {kept}");
        assert_ne!(stream(42, 0, "a"), stream(42, 1, "a"));
        assert_ne!(stream(42, 0, "a"), stream(43, 0, "a"));
    }
}
