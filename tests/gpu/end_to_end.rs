//! Whole merges through the pipeline on the CPU and the GPU: the same files, byte for byte.

use stamerge::dtype::FloatType;
use stamerge::Device;

use crate::common::file_names;
use crate::gpu;

/// A budget that splits the synthetic model's embedding (64 000 bf16 elements, 3 tasks) into
/// chunks and still holds the 65 536-key chunks of the model-wide score sums.
const E2E_BUDGET: u64 = 1 << 20;

/// Every recipe `stamerge synth` writes (all methods, model-wide selection, forgetting), merged
/// with `--device cuda` and `--device cpu`: the same files, byte for byte, and the same report
/// rows.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn end_to_end_merges_are_identical() {
    let _ = gpu();
    let dir = tempfile::tempdir().unwrap();
    let spec = stamerge::synth::SynthSpec {
        layers: 2,
        hidden: 64,
        intermediate: 176,
        vocab: 1000,
        tasks: 3,
        dtype: FloatType::BF16,
        grad_dtype: FloatType::BF16,
        shard_bytes: 200_000,
        seed: 5,
    };
    stamerge::synth::generate(&spec, dir.path()).unwrap();
    for (name, _) in stamerge::synth::recipes(spec.tasks) {
        let recipe = stamerge::Recipe::from_file(&dir.path().join(&name)).unwrap();
        // Methods and settings without kernels yet (della, sce…) are refused
        // on CUDA before any work (tests/methods_sparse.rs); the rest must match the CPU.
        let plan = stamerge::plan(&recipe, None, &Default::default()).unwrap();
        if let Some(why) = stamerge::cuda_lacks(&plan) {
            eprintln!("{name}: not on CUDA yet ({why})");
            continue;
        }
        let mut reports = Vec::new();
        // The third run has a GPU memory budget that splits the larger tensors into chunks.
        for (device, max_memory) in [
            (Device::Cpu, None),
            (Device::Cuda, None),
            (Device::Cuda, Some(E2E_BUDGET)),
        ] {
            let opts = stamerge::Options {
                device,
                out_shard_size: 300_000,
                overwrite: true,
                max_memory,
                ..Default::default()
            };
            // One folder name for every run: the model card is titled with it.
            let out = dir
                .path()
                .join(format!("{device:?}-{}", max_memory.unwrap_or(0)))
                .join("out");
            let rep = stamerge::merge(&recipe, &out, &opts)
                .unwrap_or_else(|e| panic!("{name} on {device:?}: {e}"));
            assert_eq!(
                rep.backend,
                if device == Device::Cpu { "cpu" } else { "cuda" }
            );
            reports.push(rep);
        }
        let a = dir.path().join("Cpu-0/out");
        for (b, rep) in [
            (dir.path().join("Cuda-0/out"), &reports[1]),
            (
                dir.path().join(format!("Cuda-{E2E_BUDGET}/out")),
                &reports[2],
            ),
        ] {
            assert_eq!(file_names(&a), file_names(&b), "{name}: output files");
            for f in file_names(&a) {
                if f == stamerge::REPORT_NAME {
                    continue; // times and the backend name differ
                }
                let (x, y) = (
                    std::fs::read(a.join(&f)).unwrap(),
                    std::fs::read(b.join(&f)).unwrap(),
                );
                assert!(
                    x == y,
                    "{name}: {f} differs between cpu and {}",
                    b.display()
                );
            }
            let rows = |r: &stamerge::Report| {
                serde_json::to_value((&r.tensors, &r.model_selection)).unwrap()
            };
            assert_eq!(rows(&reports[0]), rows(rep), "{name}: report rows");
        }
    }
}
