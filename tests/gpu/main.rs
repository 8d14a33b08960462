//! The CUDA backend against the CPU backend (the reference), bit for bit, on the same inputs:
//! every method × fp32/fp16/bf16 × sizes 1, 31, 4097, 1 000 003 × continuous and grid values
//! (forced ties at the threshold), model-wide selection across tensors, value faults, odd shapes
//! and task counts, mixed and misaligned inputs, groups processed in chunks under a small memory
//! budget, the pipelined path that copies the next group in early and hands outputs back late
//! (docs/STREAMING.md), and whole merges compared file by file.
//!
//! Each method's mask jobs and fuse come from the real mapping (`stamerge::plan::work::resolve`
//! on a recipe that states the method, see `recipes.rs`), and the model-wide passes from the
//! real digit search (`stamerge::select::DigitSearch`): the tests restate no method rule.
//!
//! The GPU tests are `#[ignore]`d, so a plain `cargo test` on a machine without a GPU reports
//! them as ignored, not passed; the device-selection tests (`device.rs`) run everywhere. They run
//! when asked for with `--include-ignored`, and then a missing GPU fails them with its reason:
//! on a GPU machine `cargo test --release --test gpu -- --include-ignored --nocapture
//! --test-threads 1`, or the prebuilt binary through scripts/gpu-check.sh; without one,
//! scripts/emu-gpu-tests.sh runs them on an emulated GPU.
//!
//! The files: `inputs.rs` (random groups), `recipes.rs` (methods as recipes → jobs and fuse),
//! `compare.rs` (one group on both backends), then the tests: `methods.rs`, `breadcrumbs.rs`,
//! `model_selection.rs`, `faults.rs`, `shapes.rs`, `chunked.rs` (memory budgets),
//! `streaming.rs` (pipelined and deferred groups), `end_to_end.rs`, `device.rs`, `host.rs` (the
//! host code's contract with the driver: threads, staging identity, teardown, NaN, uploads).

#[path = "../common/mod.rs"]
mod common;

mod breadcrumbs;
mod chunked;
mod compare;
mod device;
mod end_to_end;
mod faults;
mod fisher;
mod host;
mod huge;
mod inputs;
mod interp;
mod methods;
mod model_selection;
mod recipes;
mod sets;
mod shapes;
mod sta_options;
mod streaming;

use std::sync::OnceLock;

use stamerge::backend::cuda::CudaBackend;
use stamerge::backend::DeviceError;
use stamerge::dtype::FloatType;

/// The GPU backend, opened once for the whole test binary. The tests that call this are
/// ignored unless asked for, so a missing GPU here is a failure, with the reason.
fn gpu() -> &'static CudaBackend {
    static GPU: OnceLock<Result<CudaBackend, DeviceError>> = OnceLock::new();
    match GPU.get_or_init(|| CudaBackend::new(0)) {
        Ok(b) => b,
        Err(reason) => panic!(
            "this GPU test was asked for (--include-ignored) but there is no usable GPU: {reason}"
        ),
    }
}

const TYPES: [FloatType; 3] = [FloatType::F32, FloatType::F16, FloatType::BF16];
const SIZES: [usize; 4] = [1, 31, 4097, 1_000_003];

/// `STAMERGE_TEST_MAX_ELEMS` caps tensor sizes (scripts/emu-gpu-tests.sh runs these tests on an
/// emulated GPU, where a million elements take minutes); unset on a real GPU.
fn max_elems() -> usize {
    std::env::var("STAMERGE_TEST_MAX_ELEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX)
}

/// The `stamerge` binary: `STAMERGE_BIN` where the tests run away from their build (the GPU
/// machine of scripts/gpu-check.sh), else the one cargo built beside this test.
fn stamerge_cli() -> std::path::PathBuf {
    std::env::var_os("STAMERGE_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_stamerge").into())
}

fn sizes() -> impl Iterator<Item = usize> {
    let max = max_elems();
    SIZES.into_iter().filter(move |&n| n <= max)
}
