//! Reading and writing checkpoints: safetensors files, sharded folders, the atomic output folder.

pub mod file;
pub mod guard;
pub mod model;
pub mod outdir;
pub mod paths;
pub mod prefault;
pub mod side;
pub mod writer;

pub use file::{SafetensorsFile, TensorEntry};
pub use model::{Checkpoint, Loc, MISSING_MODEL, MISSING_STATISTIC};
