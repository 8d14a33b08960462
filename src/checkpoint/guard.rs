//! Survives the two ways a memory-mapped input can fail under us: the file shrinks (another
//! program truncates or rewrites it) or the disk returns a read error. Either way the kernel
//! raises SIGBUS on the next access to the missing page, which by default kills the process
//! with no message and leaves the temporary output folder behind.
//!
//! Inputs stay memory-mapped (zero-copy reads, pages reclaimable under memory pressure; see
//! HARDENING.md for why not positional reads). Every mapping is registered here; the SIGBUS
//! handler replaces the failed page and the rest of that mapping with anonymous zero pages,
//! marks the mapping as faulted and returns, so the faulting read completes with zeros. The
//! pipeline polls the marks between tensors and stops with an error naming the file; the zeros
//! are never written out. A SIGBUS at an address outside every registered mapping is handed to
//! the handler that was installed before ours.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Slots come in chunks, allocated as needed and never freed, so that the handler can walk them
/// without a lock while another thread adds one: room for every input a merge may map (18 000
/// shard files are real; the kernel's default limit is 65 530 maps), a small cost when few are.
const CHUNK: usize = 4096;
/// Up to 1 M mappings.
const CHUNKS: usize = 256;

/// `start == FREE`: unused; `start == CLAIMED`: being filled in; otherwise a live mapping.
const FREE: usize = 0;
const CLAIMED: usize = 1;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(FREE),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

type Chunk = [Slot; CHUNK];

#[allow(clippy::declare_interior_mutable_const)]
const NO_CHUNK: AtomicPtr<Chunk> = AtomicPtr::new(std::ptr::null_mut());

/// The chunks in use, in order; the first null ends the list.
static TABLE: [AtomicPtr<Chunk>; CHUNKS] = [NO_CHUNK; CHUNKS];
/// Where the next search for a free slot starts (slots are mostly taken in order).
static HINT: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS action found at installation, restored for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALLED: OnceLock<bool> = OnceLock::new();
static WARNED_FULL: AtomicBool = AtomicBool::new(false);

/// The chunks allocated so far (async-signal-safe: loads only).
fn chunks() -> impl Iterator<Item = &'static Chunk> {
    TABLE
        .iter()
        .map(|c| c.load(Ordering::Acquire))
        .take_while(|p| !p.is_null())
        // SAFETY: a published chunk is leaked, never freed or moved.
        .map(|p| unsafe { &*p })
}

/// Chunk `i`, allocating it (once, whichever thread wins) when it does not exist yet.
fn chunk(i: usize) -> &'static Chunk {
    let p = TABLE[i].load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: as in `chunks`.
        return unsafe { &*p };
    }
    let fresh = Box::into_raw(Box::new([EMPTY; CHUNK]));
    match TABLE[i].compare_exchange(
        std::ptr::null_mut(),
        fresh,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        // SAFETY: just published; leaked from here on.
        Ok(_) => unsafe { &*fresh },
        Err(won) => {
            // SAFETY: ours was never published; the winner's is leaked like ours would be.
            unsafe {
                drop(Box::from_raw(fresh));
                &*won
            }
        }
    }
}

/// A registered mapping; unregisters on drop (drop it before the mapping is unmapped).
#[derive(Debug)]
pub struct Guard {
    slot: Option<&'static Slot>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl Guard {
    /// Whether an access to the mapping has failed since it was registered.
    pub fn faulted(&self) -> bool {
        self.slot
            .map(|s| s.faulted.load(Ordering::Acquire))
            .unwrap_or(false)
    }

    /// Whether the mapping is covered by the handler (false only past a million mappings).
    pub fn is_active(&self) -> bool {
        self.slot.is_some()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            s.start.store(FREE, Ordering::Release);
        }
    }
}

/// Registers the mapping `[ptr, ptr + len)`, installing the handler on first use.
pub fn register(ptr: *const u8, len: usize) -> Guard {
    if !*INSTALLED.get_or_init(install) || len == 0 {
        return Guard { slot: None };
    }
    // A free slot of the chunks there are (from the hint, wrapping around), else a new chunk.
    let n = chunks().count() * CHUNK;
    let from = HINT.load(Ordering::Relaxed) % n.max(1);
    let there = (0..n).map(|k| (from + k) % n);
    for i in there.chain(n..CHUNK * CHUNKS) {
        let s = &chunk(i / CHUNK)[i % CHUNK];
        if s.start
            .compare_exchange(FREE, CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.faulted.store(false, Ordering::Relaxed);
            s.end.store(ptr as usize + len, Ordering::Relaxed);
            // Publishes `end` and `faulted` together with the start the handler matches on.
            s.start.store(ptr as usize, Ordering::Release);
            HINT.store(i + 1, Ordering::Relaxed);
            return Guard { slot: Some(s) };
        }
    }
    if !WARNED_FULL.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "more than {} input files mapped at once: later ones are not protected against \
             truncation while the merge runs",
            CHUNK * CHUNKS
        );
    }
    Guard { slot: None }
}

fn install() -> bool {
    // SAFETY: plain libc calls on zero-initialised structs; the handler only touches atomics and
    // makes async-signal-safe system calls (mmap is a bare system call on Linux).
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE);
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
            return false;
        }
        let _ = PREVIOUS.set(old);
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = on_sigbus as *const () as usize;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut new.sa_mask);
        libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) == 0
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for s in chunks().flat_map(|c| c.iter()) {
        let start = s.start.load(Ordering::Acquire);
        if start <= CLAIMED || addr < start {
            continue;
        }
        let end = s.end.load(Ordering::Relaxed);
        if addr >= end {
            continue;
        }
        let from = addr & !(page - 1);
        let to = end.div_ceil(page) * page;
        // SAFETY: [from, to) lies inside a live read-only mapping registered by its owner; the
        // fixed anonymous mapping replaces those pages with zeros and nothing else.
        let r = unsafe {
            libc::mmap(
                from as *mut libc::c_void,
                to - from,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            s.faulted.store(true, Ordering::Release);
            return;
        }
        break;
    }
    // Not ours (or the page could not be replaced): restore the previous action; returning
    // re-runs the access, which faults again and gets the default behaviour.
    if let Some(prev) = PREVIOUS.get() {
        // SAFETY: restoring an action the kernel gave us.
        unsafe { libc::sigaction(libc::SIGBUS, prev, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_marked_faulted_alone() {
        let page = PAGE.load(Ordering::Relaxed).max(4096);
        let mut a = tempfile::NamedTempFile::new().unwrap();
        let mut b = tempfile::NamedTempFile::new().unwrap();
        a.write_all(&vec![7u8; 3 * page]).unwrap();
        b.write_all(&vec![9u8; 3 * page]).unwrap();
        // SAFETY: test files nobody else touches.
        let (ma, mb) = unsafe {
            (
                memmap2::Mmap::map(a.as_file()).unwrap(),
                memmap2::Mmap::map(b.as_file()).unwrap(),
            )
        };
        let (ga, gb) = (
            register(ma.as_ptr(), ma.len()),
            register(mb.as_ptr(), mb.len()),
        );
        assert!(ga.is_active() && gb.is_active());
        assert_eq!(ma[page + 1], 7);
        a.as_file().set_len(100).unwrap();
        // Past the end of the file now: without the guard this read kills the process.
        let after_end = std::hint::black_box(&ma[2 * page + 5]);
        assert_eq!(*after_end, 0);
        assert_eq!(ma[50], 7, "the bytes still in the file are kept");
        assert!(ga.faulted());
        assert!(!gb.faulted());
        assert_eq!(mb[2 * page + 5], 9);
        drop(ga);
        drop(gb);
    }

    /// A SIGBUS outside every registered mapping is not swallowed: the process still dies of it.
    /// Runs itself as a child (the death would end this test binary).
    #[test]
    fn a_fault_outside_the_guarded_mappings_still_kills() {
        use std::os::unix::process::ExitStatusExt;
        const CHILD: &str = "STAMERGE_GUARD_STRAY_FAULT";
        if std::env::var_os(CHILD).is_some() {
            let guarded = tempfile::NamedTempFile::new().unwrap();
            guarded.as_file().set_len(4096).unwrap();
            // SAFETY: test files nobody else touches.
            let mg = unsafe { memmap2::Mmap::map(guarded.as_file()).unwrap() };
            let _g = register(mg.as_ptr(), mg.len());
            let mut stray = tempfile::NamedTempFile::new().unwrap();
            stray.write_all(&vec![1u8; 3 * 4096]).unwrap();
            // SAFETY: as above; this mapping is deliberately not registered.
            let ms = unsafe { memmap2::Mmap::map(stray.as_file()).unwrap() };
            stray.as_file().set_len(0).unwrap();
            let v = std::hint::black_box(ms[2 * 4096]);
            // Reached only if the guard swallowed a fault that was not its own.
            std::process::exit(i32::from(v) + 10);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "checkpoint::guard::tests::a_fault_outside_the_guarded_mappings_still_kills",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGBUS),
            "{:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
