//! Pinned host staging rings (docs/STREAMING.md): tensor bytes move between host memory (the
//! memory-mapped inputs, the output buffers) and the device through a few page-locked buffers,
//! so that every transfer is a real asynchronous DMA copy and the host's part (reading the
//! mapped file, which pages it in from disk, or copying results out) overlaps the device's.
//!
//! Each slot has an event recorded after the transfer that uses it; a slot is only refilled once
//! its event has completed, so a ring of `SLOTS` buffers keeps up to `SLOTS` transfers in flight.
//!
//! [`Scratch`] carries a launch sequence's small uploads (the fuse's task table, the statistics
//! block, select-state headers, error words): gathered in one pinned buffer and queued before the
//! sequence's first launch, so that no copy from pageable memory sits between two launches
//! (there the driver stages the bytes and may make the host wait for the kernels before it).

use std::collections::VecDeque;

use cudarc::driver::{result, CudaEvent, CudaStream};

use super::device::{drv, DResult, Gpu, Ptr};

/// Buffers per ring: the host fills one while the copy engine drains the others.
pub const SLOTS: usize = 4;

/// Bytes per slot: 1/64 of the memory budget, between 64 KiB and 16 MiB (large enough that a
/// transfer runs at full PCIe speed, small enough that the first copy starts early).
pub fn slot_bytes(budget: usize) -> usize {
    (budget / 64).clamp(64 << 10, 16 << 20)
}

struct Slot {
    host: *mut u8,
    event: CudaEvent,
    /// A transfer using this slot was queued and its event not yet waited for.
    busy: bool,
}

pub struct Ring {
    slots: Vec<Slot>,
    bytes: usize,
    next: usize,
}

// SAFETY: the pinned buffers are plain host memory owned by the ring; the backend's mutex gives
// one thread at a time access to it.
unsafe impl Send for Ring {}

impl Ring {
    pub fn new(gpu: &Gpu, bytes: usize) -> DResult<Self> {
        let mut slots = Vec::with_capacity(SLOTS);
        for _ in 0..SLOTS {
            let event = gpu
                .ctx
                .new_event(None)
                .map_err(drv("creating a CUDA event"))?;
            // SAFETY: a fresh page-locked allocation of `bytes`, freed in Drop.
            let host = unsafe { result::malloc_host(bytes, 0) }
                .map_err(drv("allocating pinned host memory"))? as *mut u8;
            slots.push(Slot {
                host,
                event,
                busy: false,
            });
        }
        Ok(Self {
            slots,
            bytes,
            next: 0,
        })
    }

    /// The next slot, once the transfer that last used it has finished.
    fn take(&mut self) -> DResult<usize> {
        let i = self.next;
        self.next = (i + 1) % self.slots.len();
        let s = &mut self.slots[i];
        if s.busy {
            s.event
                .synchronize()
                .map_err(drv("waiting for a staged copy (a copy failed)"))?;
            s.busy = false;
        }
        Ok(i)
    }

    /// Marks slot i in use by the transfer just queued on `stream`.
    fn queued(&mut self, i: usize, stream: &CudaStream) -> DResult<()> {
        let s = &mut self.slots[i];
        s.event
            .record(stream)
            .map_err(drv("recording a CUDA event"))?;
        s.busy = true;
        Ok(())
    }

    fn host(&mut self, i: usize, len: usize) -> &mut [u8] {
        debug_assert!(len <= self.bytes);
        // SAFETY: slot i holds `self.bytes` bytes; no transfer is in flight on it (`take`).
        unsafe { std::slice::from_raw_parts_mut(self.slots[i].host, len) }
    }

    /// Queues the copy of `data` to device address `dst` on `stream`, piece by piece: the host
    /// fills slot j + 1 (reading `data`, perhaps from disk) while the copy of slot j runs.
    /// Returns once every piece is queued; `data` may then be dropped.
    pub fn upload(&mut self, stream: &CudaStream, dst: Ptr, data: &[u8]) -> DResult<()> {
        for (j, piece) in data.chunks(self.bytes).enumerate() {
            let i = self.take()?;
            let at = dst + (j * self.bytes) as u64;
            let host = self.host(i, piece.len());
            host.copy_from_slice(piece);
            // SAFETY: `host` is pinned and stays untouched until the slot's event completes;
            // the caller guarantees `dst` has room for `data`.
            unsafe { result::memcpy_htod_async(at, &*host, stream.cu_stream()) }
                .map_err(drv("copying inputs to the GPU"))?;
            self.queued(i, stream)?;
        }
        Ok(())
    }

    /// Starts copying `len` device bytes at `src` to the host on `stream` (after the work queued
    /// there before): up to [`SLOTS`] pieces are queued now, the rest by [`Download::finish`].
    pub fn download(&mut self, stream: &CudaStream, src: Ptr, len: usize) -> DResult<Download> {
        let mut d = Download {
            src,
            len,
            queued: 0,
            inflight: VecDeque::new(),
        };
        while d.inflight.len() < self.slots.len() && d.queued < len {
            self.queue_piece(stream, &mut d)?;
        }
        Ok(d)
    }

    fn queue_piece(&mut self, stream: &CudaStream, d: &mut Download) -> DResult<()> {
        let off = d.queued;
        let n = self.bytes.min(d.len - off);
        let i = self.take()?;
        let host = self.host(i, n);
        // SAFETY: as in `upload`, the other way round.
        unsafe { result::memcpy_dtoh_async(host, d.src + off as u64, stream.cu_stream()) }
            .map_err(drv("copying results from the GPU"))?;
        self.queued(i, stream)?;
        d.inflight.push_back((i, off, n));
        d.queued += n;
        Ok(())
    }

    /// Waits for each piece of `d` in turn and copies it into `out`, queueing the remaining
    /// pieces as slots free up.
    pub fn finish(&mut self, stream: &CudaStream, mut d: Download, out: &mut [u8]) -> DResult<()> {
        if out.len() != d.len {
            return Err(super::device::DeviceError::Internal(format!(
                "a {}-byte download into {} bytes",
                d.len,
                out.len()
            )));
        }
        while let Some((i, off, n)) = d.inflight.pop_front() {
            let s = &mut self.slots[i];
            s.event.synchronize().map_err(drv(
                "copying results from the GPU (a kernel or copy failed)",
            ))?;
            s.busy = false;
            out[off..off + n].copy_from_slice(self.host(i, n));
            if d.queued < d.len {
                self.queue_piece(stream, &mut d)?;
            }
        }
        Ok(())
    }
}

/// One pinned buffer for the small uploads of a launch sequence: [`Scratch::put`] gathers them,
/// [`Scratch::send`] queues one copy per piece, all before the sequence's first launch. The
/// buffer is rewritten only once those copies have run (its event).
pub struct Scratch {
    host: *mut u8,
    cap: usize,
    len: usize,
    /// (device address, offset in the buffer, bytes) of each piece gathered since the last send.
    pieces: Vec<(Ptr, usize, usize)>,
    event: CudaEvent,
    /// Copies from the buffer were queued and its event not yet waited for.
    busy: bool,
}

// SAFETY: as for `Ring`: plain pinned host memory, used under the backend's mutex.
unsafe impl Send for Scratch {}

impl Scratch {
    pub fn new(gpu: &Gpu) -> DResult<Self> {
        let event = gpu
            .ctx
            .new_event(None)
            .map_err(drv("creating a CUDA event"))?;
        Ok(Self {
            host: std::ptr::null_mut(),
            cap: 0,
            len: 0,
            pieces: Vec::new(),
            event,
            busy: false,
        })
    }

    /// Adds `bytes` to go to device address `dst` at the next [`Scratch::send`].
    pub fn put(&mut self, dst: Ptr, bytes: &[u8]) -> DResult<()> {
        if self.busy {
            self.event
                .synchronize()
                .map_err(drv("waiting for the GPU (a copy failed)"))?;
            self.busy = false;
        }
        let at = self.len.next_multiple_of(8);
        if at + bytes.len() > self.cap {
            self.grow(at + bytes.len())?;
        }
        // SAFETY: `at + bytes.len() <= cap`; no copy reads the buffer (`busy` is false).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.host.add(at), bytes.len()) };
        self.pieces.push((dst, at, bytes.len()));
        self.len = at + bytes.len();
        Ok(())
    }

    /// Queues the gathered pieces' copies on `stream` (stream-ordered before what is queued
    /// there next).
    pub fn send(&mut self, stream: &CudaStream) -> DResult<()> {
        if self.pieces.is_empty() {
            return Ok(());
        }
        for &(dst, at, n) in &self.pieces {
            // SAFETY: the piece lies in the pinned buffer, which stays untouched until the
            // event below completes; the caller guarantees `dst` has room for it.
            let host = unsafe { std::slice::from_raw_parts(self.host.add(at), n) };
            unsafe { result::memcpy_htod_async(dst, host, stream.cu_stream()) }
                .map_err(drv("copying the launch tables to the GPU"))?;
        }
        self.event
            .record(stream)
            .map_err(drv("recording a CUDA event"))?;
        self.busy = true;
        self.pieces.clear();
        self.len = 0;
        Ok(())
    }

    /// A larger buffer (the pieces gathered so far move along).
    fn grow(&mut self, need: usize) -> DResult<()> {
        let cap = need.next_power_of_two().max(64 << 10);
        // SAFETY: a fresh page-locked allocation, freed in `grow` or Drop.
        let host = unsafe { result::malloc_host(cap, 0) }
            .map_err(drv("allocating pinned host memory"))? as *mut u8;
        if !self.host.is_null() {
            // SAFETY: both hold at least `len` bytes; the old buffer is not in use (`busy` is
            // false when `put` grows).
            unsafe {
                std::ptr::copy_nonoverlapping(self.host, host, self.len);
                let _ = result::free_host(self.host as *mut std::ffi::c_void);
            }
        }
        self.host = host;
        self.cap = cap;
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.host.is_null() {
            return;
        }
        let _ = self.event.context().bind_to_thread();
        if self.busy {
            let _ = self.event.synchronize();
        }
        // SAFETY: allocated by malloc_host; no copy reads it any more.
        let _ = unsafe { result::free_host(self.host as *mut std::ffi::c_void) };
    }
}

/// A download in flight (see [`Ring::download`]).
pub struct Download {
    src: Ptr,
    len: usize,
    queued: usize,
    /// (slot, offset, bytes) of the queued pieces, oldest first.
    inflight: VecDeque<(usize, usize, usize)>,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The pinned memory belongs to the context, which may not be current on this thread.
        if let Some(s) = self.slots.first() {
            let _ = s.event.context().bind_to_thread();
        }
        for s in &self.slots {
            if s.busy {
                let _ = s.event.synchronize();
            }
            // SAFETY: allocated by malloc_host in `new`; no transfer uses it any more.
            let _ = unsafe { result::free_host(s.host as *mut std::ffi::c_void) };
        }
    }
}
