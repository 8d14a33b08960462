//! Pinned host staging rings (docs/STREAMING.md): tensor bytes move between host memory (the
//! memory-mapped inputs, the output buffers) and the device through a few page-locked buffers,
//! so that every transfer is a real asynchronous DMA copy and the host's part (reading the
//! mapped file, which pages it in from disk, or copying results out) overlaps the device's.
//!
//! Each slot has an event recorded after the transfer that uses it; a slot is only refilled once
//! its event has completed, so a ring of `SLOTS` buffers keeps up to `SLOTS` transfers in flight.
//!
//! The host's side of a copy (reading the mapped file into a slot, a slot into the output buffer)
//! runs on the thread pool (`fill.rs`). Where registration is chosen (`fill::InputPath`,
//! `fill::OutputPath`), a large transfer skips the ring: the caller's own memory is registered
//! with the driver (`cuMemHostRegister`) for the time of one DMA straight from or into it
//! ([`Direct`]).
//!
//! [`Scratch`] carries a launch sequence's small uploads (the fuse's task table, the statistics
//! block, select-state headers, error words): gathered in one pinned buffer and queued before the
//! sequence's first launch, so that no copy from pageable memory sits between two launches
//! (there the driver stages the bytes and may make the host wait for the kernels before it).

use std::collections::VecDeque;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};

use super::device::{drv, DResult, Gpu, Ptr};
use super::fill::{self, register_min, InputPath, OutputPath};
use crate::checkpoint::prefault::page_size;

/// Buffers per ring: the host fills one while the copy engine drains the others.
pub const SLOTS: usize = 4;

/// Bytes per slot: 1/64 of the memory budget, between 64 KiB and 16 MiB (large enough that a
/// transfer runs at full PCIe speed, small enough that the first copy starts early).
pub fn slot_bytes(budget: usize) -> usize {
    (budget / 64).clamp(64 << 10, SLOT_MAX)
}

/// The largest slot: what a budget of 1 GiB or more stages with.
pub const SLOT_MAX: usize = 16 << 20;

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
    ctx: Arc<CudaContext>,
    /// Events for direct transfers, reused.
    spare: Vec<CudaEvent>,
    /// Inputs copied straight from their registered mapping, until their copies are known done.
    held: Vec<Direct>,
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
            ctx: gpu.ctx.clone(),
            spare: Vec::new(),
            held: Vec::new(),
        })
    }

    fn event(&mut self) -> DResult<CudaEvent> {
        match self.spare.pop() {
            Some(e) => Ok(e),
            None => self
                .ctx
                .new_event(None)
                .map_err(drv("creating a CUDA event")),
        }
    }

    /// Queues one copy between `host` (registered now, if it can be) and the device on
    /// `stream`; None (nothing queued) when the driver refuses the registration.
    fn direct(
        &mut self,
        stream: &CudaStream,
        host: *mut u8,
        len: usize,
        dev: Ptr,
        to_device: bool,
    ) -> DResult<Option<Direct>> {
        // The event first: once the copy is queued, nothing may unregister the memory before
        // the copy is known done.
        let event = self.event()?;
        let Some(reg) = Registration::new(host, len, to_device) else {
            self.spare.push(event);
            return Ok(None);
        };
        // SAFETY: `host..host + len` is the caller's memory, registered above; it stays valid
        // and untouched by the host until the event below completes (the caller keeps it, and
        // Direct's drop waits for the event before unregistering).
        let queued = unsafe {
            if to_device {
                sys::cuMemcpyHtoDAsync_v2(dev, host as *const _, len, stream.cu_stream())
            } else {
                sys::cuMemcpyDtoHAsync_v2(host as *mut _, dev, len, stream.cu_stream())
            }
        }
        .result();
        // A refused copy queued nothing: dropping `reg` unregisters at once.
        queued.map_err(drv(if to_device {
            "copying inputs to the GPU"
        } else {
            "copying results from the GPU"
        }))?;
        if let Err(e) = event.record(stream) {
            // Without the event, only the stream says when the DMA is over.
            let _ = stream.synchronize();
            return Err(drv("recording a CUDA event")(e));
        }
        let d = Direct {
            reg: Some(reg),
            event: Some(event),
            host: host as usize,
        };
        Ok(Some(d))
    }

    /// Waits for the direct input copies still held and unregisters their memory.
    pub fn release_held(&mut self) -> DResult<()> {
        let mut first_err = Ok(());
        for mut d in std::mem::take(&mut self.held) {
            let r = d.wait();
            if let Some(e) = d.event.take() {
                self.spare.push(e);
            }
            if first_err.is_ok() {
                first_err = r;
            }
        }
        first_err
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

    /// Queues the copy of `data` to device address `dst` on `stream`, piece by piece: the thread
    /// pool fills slot j + 1 (reading `data`, perhaps from disk) while the copy of slot j runs.
    /// With [`InputPath::Register`] the whole pages inside a large `data` are instead registered
    /// read-only and copied straight from where they lie (the partial pages at either end, which
    /// may hold other memory that must stay writable by the device, take the ring). Returns once
    /// every piece is queued; `data` may then be dropped unless part of it went the direct way
    /// (then the caller keeps it until [`Ring::release_held`]).
    pub fn upload(
        &mut self,
        stream: &CudaStream,
        dst: Ptr,
        data: &[u8],
        path: InputPath,
    ) -> DResult<()> {
        fill::count_to_device(data.len());
        if path == InputPath::Register && data.len() >= register_min() {
            let page = page_size();
            let start = data.as_ptr() as usize;
            let (a, b) = (
                start.next_multiple_of(page) - start,
                (start + data.len()) / page * page - start,
            );
            if b > a {
                let host = data[a..].as_ptr() as *mut u8;
                if let Some(d) = self.direct(stream, host, b - a, dst + a as u64, true)? {
                    self.held.push(d);
                    self.through_ring(stream, dst, &data[..a])?;
                    return self.through_ring(stream, dst + b as u64, &data[b..]);
                }
            }
        }
        self.through_ring(stream, dst, data)
    }

    fn through_ring(&mut self, stream: &CudaStream, dst: Ptr, data: &[u8]) -> DResult<()> {
        for (j, piece) in data.chunks(self.bytes).enumerate() {
            let i = self.take()?;
            let at = dst + (j * self.bytes) as u64;
            let host = self.host(i, piece.len());
            fill::copy_in(host, piece);
            // SAFETY: `host` is pinned and stays untouched until the slot's event completes;
            // the caller guarantees `dst` has room for `data`.
            unsafe { result::memcpy_htod_async(at, &*host, stream.cu_stream()) }
                .map_err(drv("copying inputs to the GPU"))?;
            self.queued(i, stream)?;
        }
        Ok(())
    }

    /// Starts copying `len` device bytes at `src` to the host on `stream` (after the work queued
    /// there before) through the ring: up to [`SLOTS`] pieces are queued now, the rest by
    /// [`Ring::finish`].
    pub fn download(&mut self, stream: &CudaStream, src: Ptr, len: usize) -> DResult<Download> {
        fill::count_to_host(len);
        let mut d = Download {
            src,
            len,
            queued: 0,
            inflight: VecDeque::new(),
            direct: None,
        };
        while d.inflight.len() < self.slots.len() && d.queued < len {
            self.queue_piece(stream, &mut d)?;
        }
        Ok(d)
    }

    /// As [`Ring::download`], into `out`, which [`Ring::finish`] must be given: with
    /// [`OutputPath::Register`] a large output is one DMA straight into `out` (registered until
    /// then), else through the ring. The caller must not read or free `out` before `finish`.
    pub fn download_into(
        &mut self,
        stream: &CudaStream,
        src: Ptr,
        out: &mut [u8],
        path: OutputPath,
    ) -> DResult<Download> {
        let len = out.len();
        if path == OutputPath::Register && len >= register_min() {
            if let Some(d) = self.direct(stream, out.as_mut_ptr(), len, src, false)? {
                fill::count_to_host(len);
                return Ok(Download {
                    src,
                    len,
                    queued: len,
                    inflight: VecDeque::new(),
                    direct: Some(d),
                });
            }
        }
        self.download(stream, src, len)
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

    /// Waits for each piece of `d` in turn and copies it into `out` (the thread pool), queueing
    /// the remaining pieces as slots free up; a direct download is waited for and its buffer
    /// unregistered.
    pub fn finish(&mut self, stream: &CudaStream, mut d: Download, out: &mut [u8]) -> DResult<()> {
        if out.len() != d.len {
            return Err(super::device::DeviceError::Internal(format!(
                "a {}-byte download into {} bytes",
                d.len,
                out.len()
            )));
        }
        if let Some(mut direct) = d.direct.take() {
            if direct.host != out.as_ptr() as usize {
                return Err(super::device::DeviceError::Internal(
                    "a direct download finished into another buffer".into(),
                ));
            }
            let r = direct.wait();
            if let Some(e) = direct.event.take() {
                self.spare.push(e);
            }
            return r;
        }
        while let Some((i, off, n)) = d.inflight.pop_front() {
            let s = &mut self.slots[i];
            s.event.synchronize().map_err(drv(
                "copying results from the GPU (a kernel or copy failed)",
            ))?;
            s.busy = false;
            fill::copy_out(&mut out[off..off + n], self.host(i, n));
            if d.queued < d.len {
                self.queue_piece(stream, &mut d)?;
            }
        }
        Ok(())
    }
}

/// Host memory registered with the driver (`cuMemHostRegister`) over the whole pages of a
/// range, so that a DMA copies straight from or into it. A read-only registration must cover
/// only the caller's bytes (a copy into other memory on its pages would fault); a writable one
/// may round out to pages shared with other memory.
struct Registration {
    base: *mut std::ffi::c_void,
}

impl Registration {
    /// None when the driver refuses (pages already registered by another transfer, read-only
    /// registration unsupported, ...): the caller takes the ring instead.
    fn new(host: *mut u8, len: usize, read_only: bool) -> Option<Self> {
        let page = page_size();
        let start = host as usize / page * page;
        let end = (host as usize + len).next_multiple_of(page);
        // Inputs are read-only file mappings: the flag lets the driver register them.
        let flags = if read_only {
            sys::CU_MEMHOSTREGISTER_READ_ONLY
        } else {
            0
        };
        // SAFETY: the pages hold the caller's live memory; registration pins them, changing
        // no contents, and is undone (after the DMA) by Drop.
        let r = unsafe { sys::cuMemHostRegister_v2(start as *mut _, end - start, flags) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(Self {
            base: start as *mut _,
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: registered in `new`; the DMA that used it has completed (Direct::wait).
        let _ = unsafe { sys::cuMemHostUnregister(self.base) };
    }
}

/// One DMA straight between registered host memory and the device.
pub struct Direct {
    reg: Option<Registration>,
    event: Option<CudaEvent>,
    /// The host address copied from or into.
    host: usize,
}

// SAFETY: the registered memory is the caller's; the backend's mutex gives one thread at a time
// access to the transfer.
unsafe impl Send for Direct {}

impl Direct {
    /// Waits for the copy, then unregisters the memory (also on an error: the copy is over).
    fn wait(&mut self) -> DResult<()> {
        let r = match &self.event {
            Some(e) => e
                .synchronize()
                .map_err(drv("waiting for a copy (a kernel or copy failed)")),
            None => Ok(()),
        };
        self.reg = None;
        r
    }
}

impl Drop for Direct {
    /// Never unregisters (or lets the caller free) memory a DMA may still use.
    fn drop(&mut self) {
        if self.reg.is_some() {
            if let Some(e) = &self.event {
                let _ = e.context().bind_to_thread();
            }
            let _ = self.wait();
        }
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
            fill::count_to_device(n);
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
    /// A direct download into the caller's registered buffer (then no pieces).
    direct: Option<Direct>,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The pinned memory belongs to the context, which may not be current on this thread.
        let _ = self.ctx.bind_to_thread();
        let _ = self.release_held();
        for s in &self.slots {
            if s.busy {
                let _ = s.event.synchronize();
            }
            // SAFETY: allocated by malloc_host in `new`; no transfer uses it any more.
            let _ = unsafe { result::free_host(s.host as *mut std::ffi::c_void) };
        }
    }
}
