//! How bytes move between the host and the device (docs/STREAMING.md): the backend's device
//! arenas and pinned staging rings (`Work`), inputs put into the arena (from the previous call's
//! staging or through the ring), the next group staged while this one computes, and the
//! deferred output copied back on the download stream while the next call computes.

use std::sync::atomic::Ordering;

use cudarc::driver::{result, CudaEvent};

use super::device::{self, Arena, DResult, Gpu, Layout, Ptr};
use super::fill::{self, InputPath, OutputPath};
use super::model::KeyStore;
use super::staging::{self, Download, Ring, Scratch};
use super::{dev, internal, work_share, CudaBackend, MAX_FUSE_TASKS, OUT_SHARE};
use crate::backend::{BResult, BackendError, DeviceError, Group, GroupStats, Raw};

/// The backend's device memory and host staging, used by one tensor group at a time.
pub(super) struct Work {
    /// Everything a group (or chunk) needs on the device, its inputs included.
    pub(super) arena: Arena,
    /// The next group's inputs, copied in on the copy stream while the current group computes,
    /// then moved into `arena` by a device-to-device copy (docs/STREAMING.md).
    pub(super) ahead: Arena,
    /// What `ahead` holds, for the next call only.
    pub(super) staged: Option<Staged>,
    /// Pinned rings: inputs in (copy stream), results out (compute stream).
    pub(super) up: Ring,
    pub(super) down: Ring,
    /// The small uploads of a launch sequence, sent before its first launch.
    pub(super) scratch: Scratch,
    /// Recorded on the copy stream after a group's own input uploads.
    pub(super) inputs_ready: CudaEvent,
    /// Recorded on the copy stream after the uploads into `ahead`.
    pub(super) ahead_ready: CudaEvent,
    /// Recorded on the compute stream after the copies out of `ahead`: the next staging waits.
    pub(super) ahead_free: CudaEvent,
    /// The last deferred output, on its way to the host (docs/STREAMING.md, "Deferred output").
    pub(super) pending: Option<Pending>,
    /// Deferred outputs that have arrived and are not yet handed back, oldest first.
    pub(super) done: Vec<Vec<u8>>,
    /// A deferred output's bytes on the device while the download stream copies them out (freed
    /// by `CudaBackend`'s drop only once that stream is idle, as every arena).
    pub(super) outbuf: Arena,
    /// Recorded on the compute stream once the output is in `outbuf`; the download stream waits.
    pub(super) out_ready: CudaEvent,
    /// How inputs and outputs cross the link (`fill.rs`; `STAMERGE_CUDA_INPUTS` / `_OUTPUTS`).
    pub(super) inputs: InputPath,
    pub(super) outputs: OutputPath,
    /// `selection: model`'s keys between its passes, when they fit (`model.rs`).
    pub(super) keys: Option<KeyStore>,
}

/// The inputs of the group named as the next one, copied into `ahead`: whose they are (the
/// caller's identity of the group, never a host address) and, per input in `upload_group`'s
/// order, (bytes, offset in `ahead`).
pub(super) struct Staged {
    pub(super) name: String,
    pub(super) seq: u64,
    pub(super) inputs: Vec<(usize, usize)>,
}

/// A merged group's output being copied back on the download stream.
pub(super) struct Pending {
    pub(super) name: String,
    /// Declared before `buf` so that it drops first: a direct download's drop waits for the DMA
    /// into `buf` before `buf` is freed.
    pub(super) download: Download,
    pub(super) buf: Vec<u8>,
}

impl Work {
    pub(super) fn new(gpu: &Gpu, budget: usize) -> DResult<Self> {
        let work = work_share(budget as u64) as usize;
        let outbuf = budget / OUT_SHARE;
        let slot = staging::slot_bytes(budget);
        let event = || {
            gpu.ctx
                .new_event(None)
                .map_err(device::drv("creating a CUDA event"))
        };
        Ok(Self {
            arena: Arena::with_limit(work),
            ahead: Arena::with_limit(budget - work - outbuf),
            staged: None,
            up: Ring::new(gpu, slot)?,
            down: Ring::new(gpu, slot)?,
            scratch: Scratch::new(gpu)?,
            inputs_ready: event()?,
            ahead_ready: event()?,
            ahead_free: event()?,
            pending: None,
            done: Vec::new(),
            outbuf: Arena::with_limit(outbuf),
            out_ready: event()?,
            inputs: fill::paths_from_env().0,
            outputs: fill::paths_from_env().1,
            keys: None,
        })
    }
}

/// The bytes of `n` elements of a tensor, or an error if the tensor is shorter.
pub(super) fn elems<'a>(r: &Raw<'a>, n: usize, what: &str) -> BResult<&'a [u8]> {
    let len = n * r.ty.size();
    r.data.get(..len).ok_or_else(|| {
        internal(format!(
            "{what} has {} bytes, {n} elements of {:?} need {len}",
            r.data.len(),
            r.ty
        ))
    })
}

/// Where [`CudaBackend::merge_on_device`] puts a group's output.
pub(super) enum Sink<'a> {
    /// Into this buffer, before the call returns.
    Now(&'a mut [u8]),
    /// Into this buffer on the download stream while the next call computes (taken out of the
    /// option when the download is queued; handed back through `Work::done`); the inputs of
    /// the group merged next, if known, are staged meanwhile.
    Later(&'a mut Option<Vec<u8>>, Option<&'a Group<'a>>),
}

impl CudaBackend {
    /// Puts each `(arena offset, host bytes)` of group `g` into the arena, ordered before the
    /// compute stream's next work: from `ahead` by a device copy when the previous call staged
    /// this group's inputs (the same name and `seq`, the same inputs in the same order), else
    /// through the pinned ring on the copy stream. Either way what was staged is used up (it
    /// belongs to this call only).
    pub(super) fn put_inputs(
        &self,
        w: &mut Work,
        g: &Group,
        inputs: &[(usize, &[u8])],
    ) -> BResult<()> {
        let gpu = &self.gpu;
        let staged = w.staged.take().filter(|s| {
            s.name == g.name
                && s.seq == g.seq
                && s.inputs.len() == inputs.len()
                && s.inputs.iter().zip(inputs).all(|(a, b)| a.0 == b.1.len())
        });
        let mut from_ahead = Vec::new();
        let mut uploaded = false;
        for (i, &(off, data)) in inputs.iter().enumerate() {
            match staged.as_ref().map(|s| s.inputs[i]) {
                Some((len, src)) => from_ahead.push((off, src, len)),
                None => {
                    dev(w.arena.view(off, data.len()).map(|_| ()))?;
                    dev(w.up.upload(&gpu.copy, w.arena.at(off), data, w.inputs))?;
                    uploaded = true;
                }
            }
        }
        let ev = device::drv("ordering the CUDA streams");
        if uploaded {
            dev(w.inputs_ready.record(&gpu.copy).map_err(&ev))?;
            dev(gpu.stream.wait(&w.inputs_ready).map_err(&ev))?;
        }
        if !from_ahead.is_empty() {
            self.staged_hits
                .fetch_add(from_ahead.len() as u64, Ordering::Relaxed);
            dev(gpu.stream.wait(&w.ahead_ready).map_err(&ev))?;
            for (dst, src, len) in from_ahead {
                // SAFETY: `src..src + len` lies in `ahead` (staged there), `dst..dst + len` in
                // the arena (the caller's layout, reserved); the streams are ordered by events.
                dev(unsafe {
                    result::memcpy_dtod_async(
                        w.arena.at(dst),
                        w.ahead.at(src),
                        len,
                        gpu.stream.cu_stream(),
                    )
                }
                .map_err(device::drv("moving staged inputs on the GPU")))?;
            }
            dev(w.ahead_free.record(&gpu.stream).map_err(&ev))?;
        }
        Ok(())
    }

    /// Waits for the pending deferred output (its download ran while this call's kernels were
    /// queued) and moves it to `done`. Every use of the download ring or of `outbuf` comes after
    /// this.
    pub(super) fn finish_pending(&self, w: &mut Work) -> BResult<()> {
        if let Some(mut p) = w.pending.take() {
            w.down
                .finish(&self.gpu.down, p.download, &mut p.buf)
                .map_err(|e| {
                    BackendError::Device(match e {
                        DeviceError::Internal(m) => {
                            DeviceError::Internal(format!("copying `{}` back: {m}", p.name))
                        }
                        e => DeviceError::Driver(format!(
                            "copying `{}` back from the GPU: {e}",
                            p.name
                        )),
                    })
                })?;
            w.done.push(p.buf);
        }
        Ok(())
    }

    /// Merges a group whose output comes back at once (the CPU path, chunked groups) into the
    /// buffer in `slot`. The pending output is finished first, so outputs stay in call order.
    /// On an error the buffer is still queued; the caller drops every queued output then.
    pub(super) fn merge_now(
        &self,
        w: &mut Work,
        slot: &mut Option<Vec<u8>>,
        merge: impl FnOnce(&mut Work, &mut [u8]) -> BResult<GroupStats>,
    ) -> BResult<GroupStats> {
        self.finish_pending(w)?;
        let mut out = slot
            .take()
            .ok_or_else(|| internal("an output used twice".into()))?;
        let stats = merge(w, &mut out);
        w.done.push(out);
        stats
    }

    /// Hands `out` over to the download stream: the output at `src` is copied aside into
    /// `outbuf` behind this group's kernels, and its first pieces are queued to come back while
    /// the next call computes. An output larger than `outbuf` (or with no memory for it) comes
    /// back now instead. The pending output must be finished already.
    pub(super) fn defer_output(
        &self,
        w: &mut Work,
        src: Ptr,
        mut out: Vec<u8>,
        name: &str,
    ) -> BResult<()> {
        let gpu = &self.gpu;
        let len = out.len();
        if len > w.outbuf.limit() || w.outbuf.reserve(gpu, len).is_err() {
            let download = dev(w.down.download_into(&gpu.stream, src, &mut out, w.outputs))?;
            dev(w.down.finish(&gpu.stream, download, &mut out))?;
            w.done.push(out);
            return Ok(());
        }
        let ev = device::drv("ordering the CUDA streams");
        // SAFETY: `src..src + len` is the group's output in the arena, `outbuf` holds `len`
        // bytes and no download reads it any more (`finish_pending`).
        dev(unsafe {
            result::memcpy_dtod_async(w.outbuf.at(0), src, len, gpu.stream.cu_stream())
        }
        .map_err(device::drv("moving the output aside on the GPU")))?;
        dev(w.out_ready.record(&gpu.stream).map_err(&ev))?;
        dev(gpu.down.wait(&w.out_ready).map_err(&ev))?;
        // (A direct download writes `out`'s heap buffer, which moves with the Vec into
        // `pending` and is not touched before finish_pending.)
        let download = dev(w
            .down
            .download_into(&gpu.down, w.outbuf.at(0), &mut out, w.outputs))?;
        self.deferred_outputs.fetch_add(1, Ordering::Relaxed);
        w.pending = Some(Pending {
            name: name.to_string(),
            buf: out,
            download,
        });
        Ok(())
    }

    /// Copies the inputs of the group the caller merges next into `ahead` on the copy stream,
    /// while the compute stream works on the current group: reading them here pages them in
    /// from disk, and their transfer overlaps the kernels. Skipped when they do not fit `ahead`.
    pub(super) fn stage_next(&self, w: &mut Work, g: &Group) -> BResult<()> {
        let gpu = &self.gpu;
        let n = g.n;
        w.staged = None;
        if n == 0 || g.tasks.is_empty() || g.tasks.len() > MAX_FUSE_TASKS {
            return Ok(());
        }
        let mut all = vec![elems(&g.base, n, "the base tensor")?];
        if let Some(s) = g.start {
            all.push(elems(&s, n, "the start tensor")?);
        }
        for task in &g.tasks {
            all.push(elems(&task.theta, n, "a task tensor")?);
            if let Some(gr) = task.grad {
                all.push(elems(&gr, n, "a gradient tensor")?);
            }
        }
        let mut l = Layout::default();
        let offs: Vec<usize> = all.iter().map(|d| l.take(d.len())).collect();
        if l.bytes() > w.ahead.limit() {
            return Ok(());
        }
        let ev = device::drv("ordering the CUDA streams");
        // (Growing waits for every stream before it frees the old buffer.)
        if w.ahead.reserve(gpu, l.bytes()).is_err() {
            // No room to stage (less memory free than the budget said): upload it when it comes.
            return Ok(());
        }
        // Not before the compute stream has moved the previous staged inputs out.
        dev(gpu.copy.wait(&w.ahead_free).map_err(&ev))?;
        let mut inputs = Vec::with_capacity(all.len());
        for (data, off) in all.iter().zip(offs) {
            dev(w.up.upload(&gpu.copy, w.ahead.at(off), data, w.inputs))?;
            inputs.push((data.len(), off));
        }
        dev(w.ahead_ready.record(&gpu.copy).map_err(&ev))?;
        w.staged = Some(Staged {
            name: g.name.to_string(),
            seq: g.seq,
            inputs,
        });
        Ok(())
    }
}
