//! breadcrumbs and breadcrumbs_ties on the GPU (src/backend/cuda/group.rs `band_mask`,
//! kernels/select.cu `select_mask_clear`) against the CPU, byte for byte and statistic for
//! statistic: single tensor groups of every size and dtype, continuous and heavily tied values,
//! at the edges of the band (gamma 0, the default gamma, γ·N + d·N > N, d = 1, a density that
//! keeps nothing); then whole merges in fp32 and bf16. A tensor over the memory budget is refused
//! before anything is written (the band has no chunked path yet), with a message that says so.

use std::path::Path;

use stamerge::backend::MaskJob;
use stamerge::dtype::FloatType;
use stamerge::plan::work::resolve;
use stamerge::{Device, Recipe};

use crate::compare::compare;
use crate::inputs::{make, Make};
use crate::sets::{merge, synth, CHUNKED};
use crate::{gpu, sizes, TYPES};

/// (density, gamma; None: mergekit's default 0.01) of the cases: the default, gamma 0 (plain
/// top-k without max(1, …)), γ·N + d·N > N (fewer than γ·N dropped, the band reaching the
/// smallest entry: a first selection of all N), d = 1 (no mask, as mergekit), a wide top, and a
/// density below 1/N (nothing kept, nothing scored).
const CASES: [(f64, Option<f64>); 6] = [
    (0.5, None),
    (0.4, Some(0.0)),
    (0.9, Some(0.2)),
    (1.0, Some(0.0)),
    (0.3, Some(0.5)),
    (1e-7, Some(0.01)),
];

fn recipe_text(method: &str, density: f64, gamma: Option<f64>) -> String {
    let gamma = gamma.map_or(String::new(), |g| format!(", gamma: {g:?}"));
    let p = format!("density: {density:?}{gamma}");
    format!(
        "merge_method: {method}\nbase_model: base\nmodels:\n  - model: task_0\n    \
         parameters: {{weight: 1.0, {p}}}\n  - model: task_1\n    parameters: {{weight: 0.5, \
         density: 0.7}}\n  - model: task_2\n    parameters: {{weight: 0.75, {p}}}\n"
    )
}

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn breadcrumbs_groups_match_cpu() {
    let cuda = gpu();
    for method in ["breadcrumbs", "breadcrumbs_ties"] {
        for (density, gamma) in CASES {
            let recipe = Recipe::parse(&recipe_text(method, density, gamma), Path::new("."))
                .unwrap_or_else(|e| panic!("{method}: {e:?}"));
            for ty in TYPES {
                for grid in [false, true] {
                    for n in sizes() {
                        let inp = make(n, Make::new(ty, 3, grid, 5 + n as u64));
                        let work = resolve(&recipe, &inp.name, n as u64, ty, &[true; 3]);
                        let jobs = work.jobs(|t| panic!("task {t}: model-wide"));
                        // d = 1 keeps everything with no mask (`All`), on both backends.
                        assert!(
                            jobs.iter()
                                .all(|j| matches!(j, MaskJob::Band { .. } | MaskJob::All)),
                            "{jobs:?}"
                        );
                        let what =
                            format!("{method} d={density} γ={gamma:?} {ty:?} n={n} grid={grid}");
                        let stats = compare(cuda, &inp.group(), &jobs, &work.fuse, &what)
                            .unwrap_or_else(|| panic!("{what}: unexpected fault"));
                        for (t, job) in jobs.iter().enumerate() {
                            if let MaskJob::Band { keep, .. } = job {
                                assert_eq!(stats.tasks[t].kept, *keep, "{what}: task {t}");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Whole merges on the synthetic set (fp32 and bf16): the CPU's files and report rows; under a
/// budget that splits tensors, a refusal that names the missing chunked path.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn breadcrumbs_merges_match_cpu() {
    let _ = gpu();
    for dtype in [FloatType::F32, FloatType::BF16] {
        let dir = tempfile::tempdir().unwrap();
        synth(dir.path(), dtype, FloatType::F32, 17);
        for method in ["breadcrumbs", "breadcrumbs_ties"] {
            for (i, (density, gamma)) in CASES.into_iter().enumerate() {
                let label = format!("{dtype:?}-{method}-{i}");
                let path = dir.path().join(format!("{label}.yml"));
                std::fs::write(&path, recipe_text(method, density, gamma)).unwrap();
                let recipe = Recipe::from_file(&path).unwrap();
                let plan = stamerge::plan(&recipe, None, &Default::default()).unwrap();
                assert_eq!(stamerge::cuda_lacks(&plan), None, "{label}");
                let (a, ra) = merge(&recipe, dir.path(), &label, Device::Cpu, None);
                let (b, rb) = merge(&recipe, dir.path(), &label, Device::Cuda, None);
                assert_eq!(rb.backend, "cuda");
                for f in crate::common::file_names(&a) {
                    if f != stamerge::REPORT_NAME {
                        assert!(
                            std::fs::read(a.join(&f)).unwrap()
                                == std::fs::read(b.join(&f)).unwrap(),
                            "{label}: {f} differs between cpu and cuda"
                        );
                    }
                }
                let rows = |r: &stamerge::Report| serde_json::to_value(&r.tensors).unwrap();
                assert_eq!(rows(&ra), rows(&rb), "{label}: report rows");
            }
        }
        // A budget under the largest tensor group (fp32's embedding: base, three tasks and the
        // output alone pass 1 MiB): refused with the reason, not merged wrong.
        if dtype != FloatType::F32 {
            continue;
        }
        let path = dir.path().join("chunked.yml");
        std::fs::write(&path, recipe_text("breadcrumbs", 0.5, None)).unwrap();
        let recipe = Recipe::from_file(&path).unwrap();
        let opts = stamerge::Options {
            device: Device::Cuda,
            max_memory: Some(CHUNKED),
            ..Default::default()
        };
        let out = dir.path().join("chunked-out");
        let e = stamerge::merge(&recipe, &out, &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no chunked CUDA path"), "{e}");
        // Refused once the budget is known, before any tensor is merged (run.rs asks the backend
        // with the plan's shapes: its message gives the sizes), and nothing was written.
        assert!(
            e.contains("in one piece"),
            "{e}: not refused before the merge"
        );
        assert!(!out.exists(), "{e}: the output folder was made");
        let staged = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("chunked-out"))
            .count();
        assert_eq!(staged, 0, "{e}: a staging folder was left");
    }
}
