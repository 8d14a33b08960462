//! fisher on the GPU (src/backend/cuda/fisher.rs, kernels/fisher.cu): whole merges against the
//! CPU's, byte for byte, with and without `normalize_fisher_weight`, f32 and bf16, in one piece
//! and in chunks; and a planted NaN reported as the CPU reports it.

use stamerge::dtype::FloatType;

use crate::gpu;
use crate::sets::{same_as_cpu, synth};

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn fisher_matches_cpu() {
    let _ = gpu();
    for dtype in [FloatType::BF16, FloatType::F32] {
        let dir = tempfile::tempdir().unwrap();
        synth(dir.path(), dtype, FloatType::F32, 13);
        let models = "models:\n  - model: task_0\n    gradients: grads_0\n    parameters:\n      \
                      weight: 0.7\n  - model: task_1\n    gradients: grads_1\n  - model: task_2\n    \
                      gradients: grads_2\n";
        for (i, params) in [
            "parameters:\n  normalize_fisher_weight: false\n  missing_gradients: magnitude\n",
            "parameters:\n  normalize_fisher_weight: true\n  missing_gradients: magnitude\n",
        ]
        .into_iter()
        .enumerate()
        {
            let text = format!("merge_method: fisher\nbase_model: base\n{params}{models}");
            let path = dir.path().join("fisher.yml");
            std::fs::write(&path, &text).unwrap();
            let recipe = stamerge::Recipe::from_file(&path).unwrap();
            same_as_cpu(&recipe, dir.path(), &format!("{dtype:?}-{i}"), |r| {
                serde_json::to_value(&r.tensors).unwrap()
            });
        }
    }
}

/// A NaN planted in a model's θ of one tensor (and an Inf later in another model's statistic of
/// the same tensor): both backends name the same input and index.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn fisher_faults_match_cpu() {
    use stamerge::backend::{BackendError, Compute, FuseSpec, Group, Raw, TaskInput};
    let cuda = gpu();
    let cpu = stamerge::backend::cpu::CpuBackend::new();
    let n = 5000;
    let vals = |s: u32| -> Vec<u8> {
        (0..n)
            .flat_map(|i| ((i as f32 * 0.37 + s as f32).sin()).to_le_bytes())
            .collect()
    };
    let (base, mut th1, th0) = (vals(0), vals(1), vals(2));
    let (g0, mut g1) = (vals(3), vals(4));
    th1[4 * 1234..4 * 1235].copy_from_slice(&f32::NAN.to_le_bytes());
    g1[4 * 4000..4 * 4001].copy_from_slice(&f32::INFINITY.to_le_bytes());
    fn raw(d: &[u8]) -> Raw<'_> {
        Raw {
            ty: FloatType::F32,
            data: d,
        }
    }
    let g = Group {
        name: "model.layers.0.mlp.up_proj.weight",
        seq: 1,
        n,
        base: raw(&base),
        start: None,
        tasks: vec![
            TaskInput {
                theta: raw(&th0),
                grad: Some(raw(&g0)),
            },
            TaskInput {
                theta: raw(&th1),
                grad: Some(raw(&g1)),
            },
        ],
    };
    // fisher's fuse rule as the plan makes it, for two models of an f32 set.
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), FloatType::F32, FloatType::F32, 13);
    std::fs::write(
        dir.path().join("f.yml"),
        "merge_method: fisher\nbase_model: base\nmodels:\n  - model: task_0\n    gradients: \
         grads_0\n  - model: task_1\n    gradients: grads_1\n",
    )
    .unwrap();
    let recipe = stamerge::Recipe::from_file(&dir.path().join("f.yml")).unwrap();
    let plan = stamerge::plan(&recipe, None, &Default::default()).unwrap();
    let f: FuseSpec = crate::sets::first_fuse(&plan);
    let mut oc = vec![0u8; 4 * n];
    let mut og = vec![0u8; 4 * n];
    let jobs = vec![stamerge::backend::MaskJob::All; 2];
    let fault = |r: Result<_, BackendError>| match r {
        Err(BackendError::Fault(x)) => x,
        r => panic!(
            "expected a fault, got {:?}",
            r.map(|_: stamerge::backend::GroupStats| ())
        ),
    };
    let want = fault(cpu.merge_group(&g, &jobs, &f, &mut oc));
    assert_eq!(want.index, 1234);
    assert_eq!(fault(cuda.merge_group(&g, &jobs, &f, &mut og)), want);
}
