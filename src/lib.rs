//! stamerge: merge fine-tuned checkpoints of one model into one multi-task model.
//!
//! Data flows one way: [`recipe`] (YAML → typed recipe) → [`plan`](mod@plan) (header-only
//! checks, work list) → [`pipeline`] (streaming executor) → [`backend`] (score → select → fuse)
//! → [`checkpoint`] (shard writer, atomic output folder). `run.rs` strings these together into
//! [`merge`], the whole merge as the CLI runs it; the CLI in `main.rs` is a thin layer over it.

// Numeric loops index several parallel arrays at once, as the CUDA kernels do.
#![allow(clippy::needless_range_loop)]

pub mod backend;
pub mod bench;
pub mod card;
pub mod checkpoint;
pub mod dtype;
pub mod error;
pub mod inspect;
pub mod interrupt;
pub mod memory;
pub mod method;
pub mod pipeline;
pub mod plan;
pub mod recipe;
pub mod report;
mod run;
pub mod select;
pub mod simd;
pub mod synth;
mod values;

pub use error::{Error, Problem, Result};
pub use plan::Plan;
pub use recipe::Recipe;
pub use report::Report;
// `plan` the function sits beside `plan` the module: a function is in the value namespace, a
// module in the type namespace.
pub use run::{
    cuda_lacks, merge, merge_planned, open_backend, plan, select_backend, CancelToken, Device,
    Options, ProgressFn, ProgressHook, DEFAULT_OUT_SHARD_BYTES, INTERRUPTED, RECIPE_NAME,
    REPORT_NAME,
};

pub(crate) use simd::wide;

/// This crate's version (the model card's and the Python wheel's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
