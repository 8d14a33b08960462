//! Whole merges through the pipeline on the CPU and the GPU: the same files, byte for byte.

use stamerge::dtype::FloatType;

use crate::gpu;
use crate::sets::{same_as_cpu_under, synth, CHUNKED};

/// Every recipe `stamerge synth` writes (all methods, model-wide selection, forgetting), merged
/// with `--device cuda` and `--device cpu`: the same files, byte for byte, and the same report
/// rows, in one piece and in chunks (breadcrumbs: in one piece twice).
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn end_to_end_merges_are_identical() {
    let _ = gpu();
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), FloatType::BF16, FloatType::BF16, 5);
    for (name, _) in stamerge::synth::recipes(3) {
        let recipe = stamerge::Recipe::from_file(&dir.path().join(&name)).unwrap();
        // Methods and settings without kernels yet (della, sce…) are refused
        // on CUDA before any work (tests/methods_sparse.rs); the rest must match the CPU.
        let plan = stamerge::plan(&recipe, None, &Default::default()).unwrap();
        if let Some(why) = stamerge::cuda_lacks(&plan) {
            eprintln!("{name}: not on CUDA yet ({why})");
            continue;
        }
        // breadcrumbs' band runs in one piece only (a tensor over the budget is refused, as
        // tests/gpu/breadcrumbs.rs checks): its second run gets a budget that splits nothing.
        let band = matches!(recipe.method.name(), "breadcrumbs" | "breadcrumbs_ties");
        let budget = if band { 1 << 26 } else { CHUNKED };
        same_as_cpu_under(&recipe, dir.path(), &name, budget, |r| {
            serde_json::to_value((&r.tensors, &r.model_selection)).unwrap()
        });
    }
}
