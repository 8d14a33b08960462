//! sta's `normalize_importance` on the device, the twin of `cpu/sta.rs`'s `normalized`: each
//! normalised task's divisor c from the device's own model-wide passes over the tensor, then the
//! usual launch sequence with c as the key spec's divisor (`keys_normalize` makes ŝ = s / c,
//! 0 for c ≤ 0, the CPU's division). `threshold` needs nothing more: it is a known-threshold job
//! (`MaskJob::Fixed` with every tie kept), which the kernels already take.
//!
//! Each divisor costs passes over the task's inputs before the merge: one for `mean` and `sum`
//! (the deterministic score sum), three for `max` (a select of the one largest key by the 11/11/10
//! bit digit passes). The overlap rules run in the group's launch sequence (group.rs, step 3b).

use super::CudaBackend;
use crate::backend::{BResult, BackendError, Compute, DeviceError, FuseSpec, Group, MaskJob};
use crate::method::KeySpec;
use crate::select::{key_value, DigitSearch, DIGITS_11};

impl CudaBackend {
    /// The jobs with each normalised task's divisor in its key spec (None: no task normalises),
    /// by the device's score sum and maximum.
    pub(super) fn sta_normalized(
        &self,
        g: &Group,
        jobs: &[MaskJob],
        f: &FuseSpec,
    ) -> BResult<Option<Vec<MaskJob>>> {
        crate::backend::normalized_jobs(
            g,
            jobs,
            f,
            |t, raw| self.score_sum(g, t, raw),
            |t, raw| self.score_max(g, t, raw),
        )
    }

    /// Task `t`'s largest score (0 for an empty tensor): the key a select of one finds, by the
    /// digit passes `selection: model` runs, read back as its float (keys order the scores
    /// exactly, so it is the CPU's maximum, bit for bit).
    fn score_max(&self, g: &Group, t: usize, spec: &KeySpec) -> BResult<f32> {
        if g.n == 0 {
            return Ok(0.0);
        }
        let mut search = DigitSearch::new(1);
        for &(shift, bits) in &DIGITS_11 {
            let mut hist = vec![0u64; 1 << bits];
            self.histogram(g, t, spec, search.pass(shift, bits), &mut hist)?;
            search.advance(bits, &hist).map_err(|e| {
                BackendError::Device(DeviceError::Internal(format!(
                    "the largest score of task {t} in `{}`: {e}",
                    g.name
                )))
            })?;
        }
        Ok(key_value(search.prefix()))
    }
}
