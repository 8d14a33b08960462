//! sta's selection options on the GPU (docs/SEMANTICS.md, "sta's selection options";
//! src/backend/cuda/sta.rs, the overlap step of group.rs, kernels/overlap.cu): whole merges
//! against the CPU's, byte for byte, with the report's rows, in one piece and in chunks.

use stamerge::dtype::FloatType;

use crate::gpu;
use crate::sets::{same_as_cpu, synth};

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn normalisation_and_thresholds_match_cpu() {
    let _ = gpu();
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), FloatType::BF16, FloatType::F32, 11);
    let models = "models:\n  - model: task_0\n    gradients: grads_0\n  - model: task_1\n    \
                  gradients: grads_1\n  - model: task_2\n    gradients: grads_2\n";
    // Each normalisation with a top-k; thresholds on mean- and max-normalised importance (a
    // mean-normalised threshold of 1 keeps about the entries above the tensor's mean; ŝ ≤ 1
    // under max); and per-model settings, one task left raw.
    let cases = [
        "  density: 0.3\n  normalize_importance: mean\n",
        "  density: 0.3\n  normalize_importance: sum\n",
        "  density: 0.2\n  normalize_importance: max\n  importance: task_vector\n",
        "  threshold: 1.0\n  normalize_importance: mean\n",
        "  threshold: 0.25\n  normalize_importance: max\n",
        // The overlap rules: consensus of 2 and of 3, exclusive on raw and normalised keys,
        // with thresholds, and with a task whose density keeps everything.
        "  density: 0.4\n  overlap: consensus\n  consensus: 2\n",
        "  density: 0.6\n  overlap: consensus\n  consensus: 3\n",
        "  density: 0.3\n  overlap: exclusive\n",
        "  density: 0.3\n  overlap: exclusive\n  normalize_importance: max\n",
        "  threshold: 0.5\n  normalize_importance: mean\n  overlap: exclusive\n",
    ];
    let per_model = "merge_method: sta\nbase_model: base\nmodels:\n  - model: task_0\n    \
                     gradients: grads_0\n    parameters:\n      density: 0.3\n      \
                     normalize_importance: max\n  - model: task_1\n    gradients: grads_1\n    \
                     parameters:\n      threshold: 2.0\n      normalize_importance: mean\n  - \
                     model: task_2\n    gradients: grads_2\n    parameters:\n      density: 0.3\n";
    // Task 1 keeps everything (density 1) yet takes part in the rule, so it can lose entries.
    let dense = "merge_method: sta\nbase_model: base\nparameters:\n  overlap: OVERLAP\n  \
                 normalize_importance: mean\nmodels:\n  - model: task_0\n    gradients: \
                 grads_0\n    parameters:\n      density: 0.3\n  - model: task_1\n    \
                 gradients: grads_1\n    parameters:\n      density: 1.0\n  - model: task_2\n    \
                 gradients: grads_2\n    parameters:\n      density: 0.5\n";
    let texts: Vec<String> = cases
        .iter()
        .map(|p| format!("merge_method: sta\nbase_model: base\nparameters:\n{p}{models}"))
        .chain([per_model.to_string()])
        .chain(["exclusive", "consensus"].map(|o| dense.replace("OVERLAP", o)))
        .collect();
    for (i, text) in texts.iter().enumerate() {
        let path = dir.path().join(format!("opt{i}.yml"));
        std::fs::write(&path, text).unwrap();
        let recipe = stamerge::Recipe::from_file(&path).unwrap();
        let plan = stamerge::plan(&recipe, None, &Default::default()).unwrap();
        assert_eq!(stamerge::cuda_lacks(&plan), None, "{text}");
        same_as_cpu(&recipe, dir.path(), &format!("opt{i}"), |r| {
            serde_json::to_value(&r.tensors).unwrap()
        });
    }
}
