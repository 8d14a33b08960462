//! The model-wide passes on the device (`selection: model`, and the per-tensor threshold of a
//! group too large for the memory budget): one task's score sum and one digit's histogram, the
//! twins of `cpu.rs`'s `score_sum` and `histogram`. The digit search over the pieces is
//! `select::DigitSearch`, run by the caller.

use super::device::{state_hist, STATE_PREFIX, SUM_CHUNK};
use super::faults::{fault_result, score_fault};
use super::group::score_inputs;
use super::layout::ScoreBufs;
use super::transfer::{elems, Work};
use super::{dev, launches, CudaBackend};
use crate::backend::{BResult, Group, KeySpec};
use crate::select::DIGITS_11;

impl CudaBackend {
    /// `score_sum` on the device: raw keys and the deterministic sum of each [`SUM_CHUNK`] keys
    /// (`score_sum_chunked` adds them in order from 0.0: the same bits as the CPU's `dsum`).
    pub(super) fn chunk_sums_on_device(
        &self,
        w: &mut Work,
        g: &Group,
        t: usize,
        spec: &KeySpec,
    ) -> BResult<Vec<f64>> {
        let gpu = &self.gpu;
        let n = g.n;
        let spec = KeySpec {
            mean: None,
            ..*spec
        };
        let l = ScoreBufs::for_sums(g, t, &spec);
        dev(w.arena.reserve(gpu, l.bytes))?;
        self.upload_inputs(w, g, t, &l)?;
        let mut bad = u64::MAX;
        dev(w.scratch.put(w.arena.at(l.small), bytemuck::bytes_of(&bad)))?;
        dev(w.scratch.send(&gpu.stream))?;
        let arena = &w.arena;
        let s = score_inputs(g, t, &spec, arena, l.base, l.theta, l.grad)?;
        let nchunks = n.div_ceil(SUM_CHUNK);
        let (n64, keys, chunks, bad_p) = (
            n as u64,
            arena.at(l.keys),
            arena.at(l.chunks),
            arena.at(l.small),
        );
        // SAFETY: keys (n u32), chunks (nchunks f64) and the bad word are arena buffers.
        launches(|| unsafe {
            gpu.score_keys(&s, n64, keys, bad_p, 0, 0, false)?;
            gpu.score_sum(keys, n64, chunks)
        })?;
        let mut sums = vec![0f64; nchunks];
        dev(arena.download(gpu, l.small, bytemuck::bytes_of_mut(&mut bad)))?;
        dev(arena.download(gpu, l.chunks, bytemuck::cast_slice_mut(&mut sums)))?;
        dev(gpu.sync())?;
        fault_result(score_fault(bad, t))?;
        Ok(sums)
    }

    /// `histogram` on the device, for one of the digits of [`DIGITS_11`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn histogram_on_device(
        &self,
        w: &mut Work,
        g: &Group,
        t: usize,
        spec: &KeySpec,
        pass: usize,
        prefix: u32,
        hist: &mut [u64],
    ) -> BResult<()> {
        let gpu = &self.gpu;
        let n = g.n;
        let (shift, bits) = DIGITS_11[pass];
        let l = ScoreBufs::for_histogram(g, t, spec);
        dev(w.arena.reserve(gpu, l.bytes))?;
        self.upload_inputs(w, g, t, &l)?;
        let mut words = [u64::MAX, u64::from(spec.mean.unwrap_or(0.0).to_bits())];
        dev(w
            .scratch
            .put(w.arena.at(l.small), bytemuck::cast_slice(&words)))?;
        dev(w.scratch.send(&gpu.stream))?;
        let arena = &w.arena;
        let s = score_inputs(g, t, spec, arena, l.base, l.theta, l.grad)?;
        let (n64, st, bad) = (n as u64, arena.at(l.state), arena.at(l.small));
        // The state's prefix holds the decided bits in place (the kernel compares the key bits
        // above the digit with it); the pipeline's prefix is those bits shifted down.
        let top = shift + bits;
        let placed: u32 = if top >= 32 { 0 } else { prefix << top };
        // SAFETY: `st` is a SelectState (its prefix word set by a memset behind `select_init`,
        // no host memory involved); keys (n u32) when normalising; `bad` and the mean are the
        // two words of `small` (the mean is the low half of the second, little endian).
        dev(unsafe { gpu.select_init(st, n64, n64) })?;
        dev(unsafe { gpu.set_u32(arena.at(l.state + STATE_PREFIX), placed) })?;
        let keys = arena.at(l.keys);
        launches(|| unsafe {
            if spec.mean.is_none() {
                gpu.score_keys(&s, n64, 0, bad, st, pass as i32, false)
            } else {
                gpu.score_keys(&s, n64, keys, bad, 0, 0, false)?;
                gpu.keys_normalize(keys, n64, bad + 8, st, pass as i32, false)
            }
        })?;
        let mut h = vec![0u64; 2048];
        dev(arena.download(
            gpu,
            l.state + state_hist(pass),
            bytemuck::cast_slice_mut(&mut h),
        ))?;
        dev(arena.download(gpu, l.small, bytemuck::cast_slice_mut(&mut words[..1])))?;
        dev(gpu.sync())?;
        fault_result(score_fault(words[0], t))?;
        for (x, y) in hist.iter_mut().zip(&h[..1 << bits]) {
            *x += y;
        }
        Ok(())
    }

    /// Task `t`'s score inputs into the arena buffers of `l`.
    pub(super) fn upload_inputs(
        &self,
        w: &mut Work,
        g: &Group,
        t: usize,
        l: &ScoreBufs,
    ) -> BResult<()> {
        let n = g.n;
        let mut inputs = vec![
            (l.base, elems(&g.base, n, "the base tensor")?),
            (l.theta, elems(&g.tasks[t].theta, n, "a task tensor")?),
        ];
        if let (Some(off), Some(gr)) = (l.grad, g.tasks[t].grad) {
            inputs.push((off, elems(&gr, n, "a gradient tensor")?));
        }
        self.put_inputs(w, g, &inputs)
    }
}
