//! What the whole-merge tests share: the small synthetic set, and the comparison of one recipe
//! merged on the CPU, on the GPU, and on the GPU under a budget that splits the larger tensors
//! into chunks (the same files, byte for byte, and the same report rows).

use std::path::{Path, PathBuf};

use stamerge::dtype::FloatType;
use stamerge::{Device, Recipe, Report};

use crate::common::file_names;

/// A budget that splits the set's embedding (64 000 elements, 3 tasks) into chunks and still
/// holds the 65 536-key chunks of the model-wide score sums.
pub const CHUNKED: u64 = 1 << 20;

/// 2 layers, hidden 64, vocab 1000, 3 tasks with gradients, in several shards.
pub fn synth(dir: &Path, dtype: FloatType, grad_dtype: FloatType, seed: u64) {
    let spec = stamerge::synth::SynthSpec {
        layers: 2,
        hidden: 64,
        intermediate: 176,
        vocab: 1000,
        tasks: 3,
        dtype,
        grad_dtype,
        shard_bytes: 200_000,
        seed,
    };
    stamerge::synth::generate(&spec, dir).unwrap();
}

/// `recipe` merged on `device` under `max_memory` into `dir/runs/label/<device>-<budget>/out`:
/// one folder name (`out`) for every run, since the model card is titled with it.
pub fn merge(
    recipe: &Recipe,
    dir: &Path,
    label: &str,
    device: Device,
    max_memory: Option<u64>,
) -> (PathBuf, Report) {
    let opts = stamerge::Options {
        device,
        out_shard_size: 300_000,
        overwrite: true,
        max_memory,
        ..Default::default()
    };
    let out = dir
        .join("runs")
        .join(label)
        .join(format!("{device:?}-{}", max_memory.unwrap_or(0)))
        .join("out");
    let rep = stamerge::merge(recipe, &out, &opts)
        .unwrap_or_else(|e| panic!("{label} on {device:?} ({max_memory:?}): {e}"));
    (out, rep)
}

/// `recipe` on the CPU, on the GPU and on the GPU in chunks ([`CHUNKED`]): the same files and the
/// same report rows (`rows` picks them; times and the backend name differ).
pub fn same_as_cpu(
    recipe: &Recipe,
    dir: &Path,
    label: &str,
    rows: impl Fn(&Report) -> serde_json::Value,
) {
    same_as_cpu_under(recipe, dir, label, CHUNKED, rows)
}

/// [`same_as_cpu`] with `budget` for the chunked run.
pub fn same_as_cpu_under(
    recipe: &Recipe,
    dir: &Path,
    label: &str,
    budget: u64,
    rows: impl Fn(&Report) -> serde_json::Value,
) {
    let (a, ra) = merge(recipe, dir, label, Device::Cpu, None);
    assert_eq!(ra.backend, "cpu");
    for budget in [None, Some(budget)] {
        let (b, rb) = merge(recipe, dir, label, Device::Cuda, budget);
        assert_eq!(rb.backend, "cuda");
        assert_eq!(file_names(&a), file_names(&b), "{label}: output files");
        for f in file_names(&a) {
            if f != stamerge::REPORT_NAME {
                assert!(
                    std::fs::read(a.join(&f)).unwrap() == std::fs::read(b.join(&f)).unwrap(),
                    "{label}: {f} differs between cpu and {}",
                    b.display()
                );
            }
        }
        assert_eq!(rows(&ra), rows(&rb), "{label}: report rows");
    }
}

/// The fuse settings of `plan`'s first merged tensor (tests that drive one group by hand).
pub fn first_fuse(plan: &stamerge::Plan) -> stamerge::backend::FuseSpec {
    plan.items
        .iter()
        .find_map(|it| match &it.kind {
            stamerge::plan::ItemKind::Merge { work, .. } => Some(work.fuse.clone()),
            _ => None,
        })
        .expect("a merged tensor")
}
