//! The CPU backend's hot loops, compiled a second time for AVX2 and taken when the CPU has it.
//!
//! The release build targets baseline x86-64 (SSE2: 4 f32 lanes per register), so the binary runs
//! on any x86-64 machine. [`wide`] runs a closure through a function compiled with AVX2 (8 lanes)
//! and POPCNT enabled. Only code inlined into that function is compiled for AVX2, so callers use
//! the crate-private `crate::wide!` macro (it marks the closure `#[inline(always)]`; without that
//! LLVM kept the closure as a separate, baseline function) and the loops it calls are
//! `#[inline(always)]`. The choice is made per call: one relaxed atomic load per chunk of
//! thousands of elements. No fused multiply-add is enabled, and Rust never contracts `a * b + c`
//! on its own, so both versions give the same bits (checked by
//! `pipeline::tests::avx2_loops_give_the_baseline_bytes`).
//!
//! `STAMERGE_SIMD=baseline` in the environment turns the AVX2 versions off, for comparisons.

use std::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const BASELINE: u8 = 1;
const AVX2: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether the CPU has AVX2, POPCNT and BMI2 (false off x86-64). Every CPU with AVX2 sold has
/// BMI2 too; the window select's bit deposit (`select::window`) uses its `pdep`.
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("popcnt")
            && std::arch::is_x86_feature_detected!("bmi2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Turns the AVX2 versions on (where the CPU has them) or off, for the whole process.
pub fn set_enabled(on: bool) {
    let mode = if on && avx2_available() {
        AVX2
    } else {
        BASELINE
    };
    MODE.store(mode, Ordering::Relaxed);
}

/// Held by the tests that switch the AVX2 versions off and back on (the switch is process-wide,
/// and each of them asserts what it set).
#[cfg(test)]
pub static TOGGLE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether [`wide`] takes the AVX2 version.
pub fn enabled() -> bool {
    match MODE.load(Ordering::Relaxed) {
        UNKNOWN => {
            let off = std::env::var_os("STAMERGE_SIMD").is_some_and(|v| v == "baseline");
            set_enabled(!off);
            MODE.load(Ordering::Relaxed) == AVX2
        }
        mode => mode == AVX2,
    }
}

/// `wide!(expr)`: evaluates `expr` through [`wide`] in a closure marked `#[inline(always)]`.
/// Crate-private: called as `crate::wide!` (the crate root re-exports it; it is defined under
/// another name because the function [`wide`] already holds this one in this module).
macro_rules! wide_macro {
    ($($body:tt)*) => {
        $crate::simd::wide(
            #[inline(always)]
            || { $($body)* },
        )
    };
}
pub(crate) use wide_macro as wide;

/// Runs `f`, compiled for AVX2 + POPCNT where the CPU supports them (and they are enabled).
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if enabled() {
            // SAFETY: `enabled` is true only when the CPU has AVX2 and POPCNT (and BMI2).
            return unsafe { avx2_popcnt(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn avx2_popcnt<R>(f: impl FnOnce() -> R) -> R {
    f()
}
