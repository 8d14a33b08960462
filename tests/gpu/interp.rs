//! The interpolating methods on the GPU (src/backend/cuda/interp.rs, kernels/interp.cu) against
//! the CPU, byte for byte: whole merges of linear, slerp, nuslerp (whole, rows, columns, with and
//! without a base), nearswap and model_stock (whole and filter-wise) in fp32/fp16/bf16; single
//! tensors of several reduction units split into pieces under a small budget; planted NaN/Inf
//! reported as the CPU reports them.

use stamerge::backend::cpu::CpuBackend;
use stamerge::backend::{BackendError, Compute, FuseSpec, Group, MaskJob, Raw, TaskInput};
use stamerge::dtype::FloatType;
use stamerge::method::interp::{Operand, Vectors};

use crate::chunked::budget_gpu;
use crate::gpu;
use crate::sets::{same_as_cpu_under, synth, CHUNKED};

const MODELS_3: &str = "  - model: task_0\n  - model: task_1\n  - model: task_2\n";

/// (label, recipe) of every method with kernels, on the synthetic set.
fn recipes() -> Vec<(&'static str, String)> {
    let nus = "  - model: task_0\n    parameters: {weight: 0.4}\n  - model: task_1\n    parameters: {weight: 1.1}\n";
    vec![
        ("linear-all", "merge_method: linear\nmodels:\n  - model: base\n    parameters: {weight: 0.7}\n  - model: task_0\n  - model: task_1\n    parameters: {weight: 0.3}\n  - model: task_2\n    parameters: {weight: -0.5}\n".into()),
        ("linear-raw", "merge_method: linear\nbase_model: base\nparameters:\n  normalize: false\n  weight: 0.25\nmodels:\n  - model: task_0\n  - model: task_1\n".into()),
        ("slerp", "merge_method: slerp\nbase_model: base\nmodels:\n  - model: task_0\nparameters:\n  t:\n    - filter: mlp\n      value: [0.2, 0.9]\n    - value: 0.35\n".into()),
        ("nuslerp-flat", format!("merge_method: nuslerp\nbase_model: base\nmodels:\n{nus}")),
        ("nuslerp-rows", format!("merge_method: nuslerp\nbase_model: base\nparameters: {{nuslerp_flatten: false}}\nmodels:\n{nus}")),
        ("nuslerp-cols", format!("merge_method: nuslerp\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\nmodels:\n{nus}")),
        ("nearswap", "merge_method: nearswap\nbase_model: base\nmodels:\n  - model: task_0\nparameters: {t: 0.01}\n".into()),
        ("model_stock", format!("merge_method: model_stock\nbase_model: base\nmodels:\n{MODELS_3}")),
        ("multislerp", "merge_method: multislerp\nbase_model: base\nmodels:\n  - model: task_0\n    parameters: {weight: 0.5}\n  - model: task_1\n    parameters: {weight: 0.3}\n  - model: task_2\n    parameters: {weight: 0.2}\n".into()),
        ("multislerp-nobase", "merge_method: multislerp\nparameters: {normalize_weights: false}\nmodels:\n  - model: task_0\n    parameters: {weight: 0.6}\n  - model: task_1\n    parameters: {weight: 0.6}\n".into()),
        ("model_stock-rows", format!("merge_method: model_stock\nbase_model: base\nparameters: {{filter_wise: true}}\nmodels:\n{MODELS_3}")),
    ]
}

/// Every recipe merged on the CPU, on the GPU and on the GPU under a small budget: the same
/// files. (fp32 gets twice the budget: one 64 000-element tensor with a base, three models and
/// the output is one reduction unit, which is never split.)
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn interp_merges_match_cpu() {
    let _ = gpu();
    for dtype in [FloatType::F32, FloatType::BF16, FloatType::F16] {
        let dir = tempfile::tempdir().unwrap();
        synth(dir.path(), dtype, FloatType::F32, 21);
        let budget = if dtype == FloatType::F32 {
            2 * CHUNKED
        } else {
            CHUNKED
        };
        for (label, text) in recipes() {
            if dtype == FloatType::F16 && !matches!(label, "slerp" | "nuslerp-rows" | "model_stock")
            {
                continue;
            }
            let path = dir.path().join(format!("{label}.yml"));
            std::fs::write(&path, &text).unwrap();
            let recipe = stamerge::Recipe::from_file(&path).unwrap();
            let plan = stamerge::plan(&recipe, None, &Default::default()).unwrap();
            assert_eq!(stamerge::cuda_lacks(&plan), None, "{label}");
            same_as_cpu_under(
                &recipe,
                dir.path(),
                &format!("{dtype:?}-{label}"),
                budget,
                |r| serde_json::to_value(&r.tensors).unwrap(),
            );
        }
    }
}

/// The fuse the plan makes for `text` (a recipe on a synthetic set), for its first merged
/// tensor, with the reduction vectors replaced by `vectors`.
fn planned_fuse(dir: &std::path::Path, text: &str, vectors: Vectors) -> FuseSpec {
    let path = dir.join("p.yml");
    std::fs::write(&path, text).unwrap();
    let recipe = stamerge::Recipe::from_file(&path).unwrap();
    let plan = stamerge::plan(&recipe, None, &Default::default()).unwrap();
    let mut f = crate::sets::first_fuse(&plan);
    f.interp.as_mut().expect("an interpolating method").vectors = vectors;
    f
}

/// Deterministic values of input `s`: related across inputs (so the angles are not all π/2),
/// never exactly equal.
fn values(n: usize, s: u32, ty: FloatType) -> Vec<u8> {
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let x = i as f32 * 0.0137;
            x.sin() + 0.3 * (x * (1.0 + s as f32) + s as f32).cos()
        })
        .collect();
    let mut out = vec![0u8; n * ty.size()];
    stamerge::dtype::narrow(ty, &v, &mut out);
    out
}

fn raw(ty: FloatType, d: &[u8]) -> Raw<'_> {
    Raw { ty, data: d }
}

/// One group of `n` elements: the base and `nt` models.
fn group<'a>(n: usize, ty: FloatType, data: &'a [Vec<u8>]) -> Group<'a> {
    Group {
        name: "model.layers.0.mlp.up_proj.weight",
        seq: 7,
        n,
        base: raw(ty, &data[0]),
        start: None,
        tasks: data[1..]
            .iter()
            .map(|d| TaskInput {
                theta: raw(ty, d),
                grad: None,
            })
            .collect(),
    }
}

/// Tensors of several 65 536-element units (whole, rows of two units, columns along the first
/// dimension), split into pieces of whole units under a small budget: the CPU's bytes, and a
/// planted NaN and Inf in a later piece named as the CPU names them.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn interp_pieces_match_cpu() {
    let cpu = CpuBackend::new();
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), FloatType::F32, FloatType::F32, 3);
    let n = 200_000;
    let nus = "  - model: task_0\n    parameters: {weight: 0.4}\n  - model: task_1\n    parameters: {weight: 1.1}\n";
    let cases = [
        ("slerp".to_string(), "merge_method: slerp\nbase_model: base\nmodels:\n  - model: task_0\nparameters: {t: 0.3}\n".to_string(), Vectors::Whole),
        ("nuslerp-rows".into(), format!("merge_method: nuslerp\nbase_model: base\nparameters: {{nuslerp_flatten: false}}\nmodels:\n{nus}"), Vectors::Rows { len: 100_000 }),
        ("nuslerp-cols".into(), format!("merge_method: nuslerp\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\nmodels:\n{nus}"), Vectors::Columns { len: 100_000, stride: 2 }),
        ("model_stock".into(), format!("merge_method: model_stock\nbase_model: base\nmodels:\n{MODELS_3}"), Vectors::Whole),
        ("multislerp".into(), format!("merge_method: multislerp\nbase_model: base\nmodels:\n{MODELS_3}"), Vectors::Whole),
        ("linear".into(), format!("merge_method: linear\nmodels:\n  - model: base\n    parameters: {{weight: 0.7}}\n{MODELS_3}"), Vectors::Whole),
    ];
    for (label, text, vectors) in cases {
        for ty in [FloatType::F32, FloatType::BF16] {
            // Room for one unit (or chunk row) of every buffer, not for the whole tensor.
            let budget = CHUNKED * if ty == FloatType::F32 { 5 } else { 3 } / 2;
            let small = budget_gpu(budget);
            let f = planned_fuse(dir.path(), &text, vectors);
            let nt = f.weights.len();
            let mut data: Vec<Vec<u8>> = (0..=nt).map(|s| values(n, s as u32, ty)).collect();
            let jobs = vec![MaskJob::All; nt];
            let pieces = {
                let g = group(n, ty, &data);
                let pieces = small
                    .pieces(&g, &jobs, &f)
                    .unwrap_or_else(|e| panic!("{label} {ty:?}: {e}"));
                assert!(pieces > 1, "{label} {ty:?}: {pieces} piece");
                // `stamerge plan`'s estimate: this group does not fit in one piece.
                let (largest, over) = stamerge::backend::cuda::plan_memory(
                    [(g.clone(), jobs.clone(), &f)],
                    Some(budget),
                );
                assert_eq!(over, 1, "{label} {ty:?}: plan_memory");
                assert!(
                    largest > stamerge::backend::cuda::work_share(budget),
                    "{label}"
                );
                eprintln!("{label} {ty:?}: {pieces} pieces");
                let mut want = vec![0u8; n * f.out.size()];
                let sw = cpu.merge_group(&g, &jobs, &f, &mut want).unwrap();
                for b in [gpu(), &small] {
                    let mut got = vec![0u8; n * f.out.size()];
                    let sg = b.merge_group(&g, &jobs, &f, &mut got).unwrap();
                    assert!(got == want, "{label} {ty:?}: output differs");
                    assert_eq!(sg, sw, "{label} {ty:?}: statistics");
                }
                pieces
            };
            // A NaN in the last input and an Inf in the base, both past the first piece.
            let (at, later) = (n - 1000, n - 10);
            let sz = ty.size();
            let put = |d: &mut Vec<u8>, i: usize, x: f32| {
                stamerge::dtype::narrow(ty, &[x], &mut d[i * sz..(i + 1) * sz]);
            };
            let last = match f.interp.as_ref().unwrap().inputs.last() {
                Some(Operand::Task(t)) => 1 + t,
                _ => 0,
            };
            put(&mut data[last], at, f32::NAN);
            put(&mut data[0], later, f32::INFINITY);
            let g = group(n, ty, &data);
            let fault = |r: Result<_, BackendError>| match r {
                Err(BackendError::Fault(x)) => x,
                r => panic!(
                    "{label}: expected a fault, got {:?}",
                    r.map(|_: stamerge::backend::GroupStats| ())
                ),
            };
            let mut o = vec![0u8; n * f.out.size()];
            let want = fault(cpu.merge_group(&g, &jobs, &f, &mut o));
            assert_eq!(want.index, at as u64, "{label}");
            for b in [gpu(), &small] {
                assert_eq!(
                    fault(b.merge_group(&g, &jobs, &f, &mut o)),
                    want,
                    "{label} ({pieces} pieces)"
                );
            }
        }
    }
}

/// multislerp's edge cases (cpu/interp/sphere.rs): two opposite models of equal weight, whose
/// directions' mean is zero (the weighted sum instead), and three whose mean is zero (an error):
/// the CPU's bytes and the CPU's error, in one piece and in several.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn multislerp_zero_mean_matches_cpu() {
    let cpu = CpuBackend::new();
    let small = budget_gpu(CHUNKED * 5 / 2);
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), FloatType::F32, FloatType::F32, 3);
    let n = 140_000;
    let ty = FloatType::F32;
    let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin()).collect();
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let neg: Vec<f32> = x.iter().map(|v| -v).collect();
    // The base is zero, so the task vectors are the models, exactly opposite.
    let zero = vec![0f32; n];
    for (models, w) in [(2, "1.0"), (3, "1.0")] {
        let text = format!(
            "merge_method: multislerp\nbase_model: base\nmodels:\n{}",
            (0..models)
                .map(|t| format!("  - model: task_{t}\n    parameters: {{weight: {w}}}\n"))
                .collect::<String>()
        );
        let f = planned_fuse(dir.path(), &text, Vectors::Whole);
        // Three models: x, −x and 0·x (a zero vector is a unit vector of zeros).
        let mut data = vec![bytes(&zero), bytes(&x), bytes(&neg)];
        if models == 3 {
            data.push(bytes(&zero));
        }
        let g = group(n, ty, &data);
        let jobs = vec![MaskJob::All; models];
        let mut want = vec![0u8; n * f.out.size()];
        let rc = cpu.merge_group(&g, &jobs, &f, &mut want).map(|_| ());
        assert_eq!(rc.is_ok(), models == 2, "{rc:?}");
        for b in [gpu(), &small] {
            let mut got = vec![0u8; n * f.out.size()];
            let rg = b.merge_group(&g, &jobs, &f, &mut got).map(|_| ());
            assert_eq!(format!("{rg:?}"), format!("{rc:?}"), "{models} models");
            assert!(
                got == want || rc.is_err(),
                "{models} models: output differs"
            );
        }
    }
}
