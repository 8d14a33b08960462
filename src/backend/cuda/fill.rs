//! The host side of staging (docs/STREAMING.md, "Host staging"): copying a tensor's bytes from
//! the memory-mapped input into a pinned slot, and a finished piece from a pinned slot into the
//! output buffer, on several threads. One thread doing `copy_from_slice` from a mapped file
//! moves 4–6 GB/s and takes the file's page faults itself; a PCIe 5 link takes 55 GB/s. So each
//! copy is cut into [`PIECE`]-sized pieces that the current rayon pool (`--threads`) copies in
//! parallel, each piece's pages populated in one call first (`checkpoint::prefault`) instead of
//! faulting every 64 KiB inside the copy.
//!
//! Also here: which of the two input paths and two output paths a backend takes
//! ([`InputPath`], [`OutputPath`]), and the process-wide counters of bytes queued over the link.

use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use crate::checkpoint::prefault::populate_read;

/// Bytes one thread copies at a time: large enough that the fork-join cost (~µs) is small
/// beside the copy (~0.2 ms at 5 GB/s), small enough that a 16 MiB slot keeps 16 threads busy.
pub const PIECE: usize = 1 << 20;

/// Copies `src` into `dst` (the same length): pinned slot ← mapped input. The pieces' pages are
/// populated first by the thread that copies them. Called with the CUDA backend's lock held: the
/// pieces make no driver call (no context needed on the pool's threads), and a pool thread
/// waiting here may run other jobs of the pool, which is safe while no pool job calls the backend
/// (the pipeline calls it from one thread at a time).
pub fn copy_in(dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    if src.len() <= PIECE || rayon::current_num_threads() == 1 {
        for (d, s) in dst.chunks_mut(PIECE).zip(src.chunks(PIECE)) {
            populate_read(s);
            d.copy_from_slice(s);
        }
        return;
    }
    dst.par_chunks_mut(PIECE)
        .zip(src.par_chunks(PIECE))
        .for_each(|(d, s)| {
            populate_read(s);
            d.copy_from_slice(s);
        });
}

/// Copies `src` into `dst` (the same length): output buffer ← pinned slot.
pub fn copy_out(dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    if src.len() <= PIECE || rayon::current_num_threads() == 1 {
        dst.copy_from_slice(src);
        return;
    }
    dst.par_chunks_mut(PIECE)
        .zip(src.par_chunks(PIECE))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// How input tensors reach the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputPath {
    /// Copied into the pinned ring by the thread pool, then DMA from the ring (the default:
    /// predicted faster, BENCHMARKS.md, issue 20).
    Copy,
    /// The whole pages inside a mapped input range registered read-only (`cuMemHostRegister`,
    /// `CU_MEMHOSTREGISTER_READ_ONLY`) and copied by DMA straight from the page cache, the
    /// partial pages at its ends through the ring; a tensor whose registration fails goes
    /// through the ring. `STAMERGE_CUDA_INPUTS=register`.
    Register,
}

/// How a finished output reaches the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputPath {
    /// Through the pinned ring, then copied into the buffer by the thread pool (the default:
    /// registering pins every page of the buffer per output, a serial cost predicted above the
    /// threaded copy's; unmeasured on a GPU, BENCHMARKS.md, issue 20).
    Ring,
    /// The output buffer registered (`cuMemHostRegister`) for the time of one DMA straight into
    /// it; smaller outputs, or a failed registration, take the ring.
    /// `STAMERGE_CUDA_OUTPUTS=register`.
    Register,
}

/// The paths `STAMERGE_CUDA_INPUTS` (`copy` | `register`) and `STAMERGE_CUDA_OUTPUTS`
/// (`ring` | `register`) choose; anything else is the default.
pub fn paths_from_env() -> (InputPath, OutputPath) {
    let var = |k: &str| std::env::var(k).unwrap_or_default().to_ascii_lowercase();
    let input = match var("STAMERGE_CUDA_INPUTS").as_str() {
        "register" => InputPath::Register,
        _ => InputPath::Copy,
    };
    let output = match var("STAMERGE_CUDA_OUTPUTS").as_str() {
        "register" => OutputPath::Register,
        _ => OutputPath::Ring,
    };
    (input, output)
}

/// Registration pins every page and maps it for the device: a fixed cost per call that only
/// pays off for large transfers, so smaller ones take the ring. 4 MiB unless
/// `STAMERGE_CUDA_REGISTER_MIN` (bytes) says otherwise: the fake-libcuda tests lower it to send
/// their small tensors the direct way, and a GPU run can look for the crossover.
pub fn register_min() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("STAMERGE_CUDA_REGISTER_MIN")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(4 << 20)
    })
}

/// Bytes every CUDA backend of this process queued host → device (inputs and the small
/// tables) and device → host (outputs and read-backs), for `stamerge bench merge` and the tests.
static BYTES_TO_DEVICE: AtomicU64 = AtomicU64::new(0);
static BYTES_TO_HOST: AtomicU64 = AtomicU64::new(0);

pub fn count_to_device(n: usize) {
    BYTES_TO_DEVICE.fetch_add(n as u64, Ordering::Relaxed);
}

pub fn count_to_host(n: usize) {
    BYTES_TO_HOST.fetch_add(n as u64, Ordering::Relaxed);
}

/// (host → device, device → host) bytes queued so far by this process's CUDA backends.
pub fn link_bytes() -> (u64, u64) {
    (
        BYTES_TO_DEVICE.load(Ordering::Relaxed),
        BYTES_TO_HOST.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_byte_on_any_pool() {
        let src: Vec<u8> = (0..3 * PIECE + 12_345)
            .map(|i| (i * 7 % 256) as u8)
            .collect();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut a = vec![0u8; src.len()];
            let mut b = vec![0u8; src.len()];
            pool.install(|| {
                copy_in(&mut a, &src);
                copy_out(&mut b, &a);
            });
            assert!(a == src && b == src, "{threads} threads");
        }
    }
}
