//! SIGINT (Ctrl-C), SIGTERM (`kill`, `docker stop`, systemd) and SIGHUP (a closed terminal or SSH
//! session) all stop a run the same clean way: the handler only sets [`crate::INTERRUPTED`]; the
//! plan notices it between files, the merge between tensors, and the run ends with
//! [`crate::Error::Interrupted`], removing its temporary folder and lock. A second signal ends the
//! process at once (the next run into the same folder removes what it left).
//!
//! The handler does only what is async-signal-safe: atomic stores, `write(2)` and `_exit(2)`.

use std::sync::atomic::{AtomicI32, Ordering};

/// The first signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

const HANDLED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Installs the handler for SIGINT, SIGTERM and SIGHUP (the command line calls this once).
pub fn install() {
    for sig in HANDLED {
        // SAFETY: a zeroed sigaction with a handler that is async-signal-safe (see above).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    let first = SIGNAL
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    if crate::INTERRUPTED.swap(true, Ordering::SeqCst) && !first {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    let msg: &[u8] = match sig {
        libc::SIGTERM => b"\nSIGTERM: stopping after the current tensor and removing the partial output (a second signal stops at once)\n",
        libc::SIGHUP => b"\nSIGHUP: stopping after the current tensor and removing the partial output (a second signal stops at once)\n",
        _ => b"\ninterrupted: stopping after the current tensor and removing the partial output (Ctrl-C again stops at once)\n",
    };
    // SAFETY: write(2) on stderr is async-signal-safe; a closed stderr only fails the write.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// The exit status of a run stopped by a signal: 128 + its number, as a shell reports a process
/// the signal killed (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP).
pub fn exit_code() -> u8 {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => 128 + libc::SIGINT as u8,
        s => 128 + s as u8,
    }
}
