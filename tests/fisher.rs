//! `merge_method: fisher` against a reference restated from docs/SEMANTICS.md ("fisher") with
//! plain loops: fp32/fp16/bf16, single and sharded checkpoints, odd sizes, grid values (Fisher
//! weights of 0, where only the 1e-6 floor weighs), with and without `normalize_fisher_weight`;
//! the recipe errors and the CUDA refusal.

#![allow(clippy::needless_range_loop)]

mod common;

use std::collections::HashMap;

use common::scenario::{assert_matches, run_recipe, Loaded, Scenario};
use common::*;
use safetensors::Dtype;

fn merged(l: &Loaded) -> Vec<String> {
    l.order
        .iter()
        .filter(|n| l.models[0].contains_key(*n) && l.base[*n].dtype != Dtype::I64)
        .cloned()
        .collect()
}

/// Task t's statistic of tensor n; a tensor the statistic lacks is F = 0
/// (`missing_gradients: magnitude`).
fn stat(l: &Loaded, t: usize, n: &str) -> Vec<f32> {
    match l.grads[t].get(n) {
        Some(g) => g.values(),
        None => vec![0.0; l.models[t][n].values().len()],
    }
}

fn reference(l: &Loaded, w: &[f32], normalize: bool) -> HashMap<String, Vec<f32>> {
    let nt = w.len();
    let names = merged(l);
    // r̂_t = r_t / Σ r, r_t = 1 / (sqrt(Σ F²) + 1e-6), the sum over every merged tensor.
    let scale: Vec<f32> = if normalize {
        let r: Vec<f64> = (0..nt)
            .map(|t| {
                let sq: f64 = names.iter().fold(0.0, |a, n| {
                    let f: Vec<f32> = stat(l, t, n).iter().map(|x| x * x).collect();
                    a + det_sum(&f)
                });
                1.0 / (sq.sqrt() + 1e-6)
            })
            .collect();
        let total: f64 = r.iter().sum();
        r.iter().map(|x| (x / total) as f32).collect()
    } else {
        vec![1.0; nt]
    };
    let c: Vec<f32> = (0..nt).map(|t| w[t] * scale[t]).collect();
    names
        .iter()
        .map(|n| {
            let th: Vec<Vec<f32>> = l.models.iter().map(|m| m[n].values()).collect();
            let f: Vec<Vec<f32>> = (0..nt).map(|t| stat(l, t, n)).collect();
            let v = (0..th[0].len())
                .map(|i| {
                    let (mut num, mut den) = (0f32, 0f32);
                    for t in 0..nt {
                        let p = c[t] * (f[t][i] + 1e-6f32);
                        num += p * th[t][i];
                        den += p;
                    }
                    num / den
                })
                .collect();
            (n.clone(), v)
        })
        .collect()
}

fn recipe(w: &[f32], global: &str) -> String {
    let mut y = format!("merge_method: fisher\nbase_model: base\n{global}models:\n");
    for (t, w) in w.iter().enumerate() {
        y += &format!(
            "  - model: task_{t}\n    gradients: grads_{t}\n    parameters:\n      weight: {w}\n"
        );
    }
    y
}

#[test]
fn fisher_matches_reference() {
    let w = [1.0f32, 0.5, 0.75];
    for dt in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        for (shards, grid) in [(1, false), (3, true)] {
            let s = Scenario::new(dt, 3, shards, grid, 60 + shards as u64);
            let l = s.load();
            for (global, normalize) in [
                ("", true),
                ("parameters:\n  normalize_fisher_weight: false\n", false),
            ] {
                let text = recipe(&w, global);
                let out = s.path("out");
                run_recipe(s.dir.path(), &text, &out, None)
                    .unwrap_or_else(|e| panic!("{text}\n{e}"));
                assert_matches(&out, &reference(&l, &w, normalize), &l, None);
            }
        }
    }
}

/// A tensor missing from a statistic: an error naming it, or F = 0 with
/// `missing_gradients: magnitude`.
#[test]
fn missing_statistic_tensors_are_an_error_or_zero() {
    let s = Scenario::new(Dtype::BF16, 2, 1, false, 72);
    let l0 = s.load();
    let gone = "model.layers.0.mlp.up_proj.weight";
    let kept: Vec<T> = l0.grads[0]
        .values()
        .filter(|g| g.name != gone)
        .cloned()
        .collect();
    std::fs::remove_dir_all(s.path("grads_0")).unwrap();
    write_model(&s.path("grads_0"), &kept, 1, None);
    let l = s.load();
    let w = [1.0f32, 0.5];
    let e = run_recipe(s.dir.path(), &recipe(&w, ""), &s.path("out"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains(gone) && e.contains("missing_gradients"), "{e}");
    let text = recipe(&w, "parameters:\n  missing_gradients: magnitude\n");
    run_recipe(s.dir.path(), &text, &s.path("out"), None).unwrap();
    assert_matches(&s.path("out"), &reference(&l, &w, true), &l, None);
}

/// Equal weights and equal statistics give the plain average; a model whose Fisher weights
/// dwarf the others' takes over.
#[test]
fn fisher_weights_decide_between_the_models() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 70);
    let l = s.load();
    let names = merged(&l);
    // Task 1's statistic 1e4 times task 0's: the merge is (nearly) task 1.
    let dir = s.path("grads_1");
    let scaled: Vec<T> = names
        .iter()
        .map(|n| {
            let g = &l.grads[1][n];
            let v: Vec<f32> = l.grads[0][n].values().iter().map(|x| x * 1e4).collect();
            T::float(n, Dtype::F32, &g.shape, &v)
        })
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();
    write_model(&dir, &scaled, 1, None);
    let text = recipe(
        &[1.0, 1.0],
        "parameters:\n  normalize_fisher_weight: false\n",
    );
    run_recipe(s.dir.path(), &text, &s.path("out"), None).unwrap();
    let (got, _) = read_model(&s.path("out"));
    for n in &names {
        let (a, b, m) = (
            l.models[0][n].values(),
            l.models[1][n].values(),
            got[n].values(),
        );
        for i in 0..m.len() {
            let (lo, hi) = (a[i].min(b[i]), a[i].max(b[i]));
            assert!(
                m[i] >= lo - 1e-6 && m[i] <= hi + 1e-6,
                "{n}[{i}] outside the models"
            );
            if l.grads[0][n].values()[i] > 1e-3 {
                assert!(
                    (m[i] - b[i]).abs() <= 1e-3 * (a[i] - b[i]).abs() + 1e-7,
                    "{n}[{i}]"
                );
            }
        }
    }
}

#[test]
fn fisher_recipe_errors_and_no_cuda_refusal() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 71);
    std::fs::write(
        s.path("r.yml"),
        "merge_method: fisher\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\n    gradients: grads_1\n",
    )
    .unwrap();
    let ps: Vec<String> = stamerge::Recipe::from_file(&s.path("r.yml"))
        .unwrap_err()
        .into_iter()
        .map(|p| p.to_string())
        .collect();
    assert!(
        ps.len() == 1
            && ps[0].contains("`models[0]` (line 4)")
            && ps[0].contains("fisher needs the gradient statistic")
            && ps[0].contains("--mode sq"),
        "{ps:?}"
    );
    // sta's and the task-vector methods' parameters are not fisher's.
    std::fs::write(
        s.path("r.yml"),
        recipe(&[1.0, 1.0], "parameters:\n  density: 0.5\n"),
    )
    .unwrap();
    let r = stamerge::Recipe::from_file(&s.path("r.yml")).unwrap();
    assert!(
        r.notes.iter().any(|n| n.contains("density")),
        "{:?}",
        r.notes
    );
    // fisher runs on CUDA too (tests/gpu/fisher.rs): nothing in the plan is refused there.
    std::fs::write(s.path("r.yml"), recipe(&[1.0, 1.0], "")).unwrap();
    let recipe = stamerge::Recipe::from_file(&s.path("r.yml")).unwrap();
    let plan = stamerge::plan(&recipe, None, &Default::default()).unwrap();
    assert_eq!(stamerge::cuda_lacks(&plan), None);
}
