//! Values that are legal in a safetensors file but degenerate for a merge: tensors with no
//! elements, NaN and Inf in an input, and finite inputs whose merged value does not fit the
//! output dtype. Each must give the same bytes on every run or an error naming the input that
//! holds the value (HARDENING.md, "Hardening II").

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use safetensors::Dtype;

fn merge(dir: &Path, recipe: &str, out: &str) -> (bool, String) {
    std::fs::write(dir.join("r.yml"), recipe).unwrap();
    let o = Command::new(stamerge_bin())
        .args(["-q", "merge", "r.yml", out, "--device", "cpu"])
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

const TA: &str = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\n";

/// base, task_0 and task_1 holding `tensors(model index)`.
fn models(dir: &Path, tensors: impl Fn(usize) -> Vec<T>) {
    for (i, m) in ["base", "task_0", "task_1"].iter().enumerate() {
        write_model(&dir.join(m), &tensors(i), 1, None);
    }
}

/// Five zero-element float tensors between real ones: their order in a file cannot come from
/// their offsets (all equal), so it must come from something other than a hash map's order.
fn with_empty_tensors(i: usize) -> Vec<T> {
    let mut v = vec![T::float(
        "a.weight",
        Dtype::F32,
        &[4],
        &[1.0, 2.0, 3.0, i as f32],
    )];
    for name in ["e.q", "e.k", "e.v", "e.o", "e.gate"] {
        v.push(T::float(name, Dtype::F32, &[0, 8], &[]));
    }
    v.push(T::float("z.weight", Dtype::BF16, &[2], &[0.5, i as f32]));
    v
}

#[test]
fn zero_element_tensors_give_the_same_bytes_on_every_run() {
    let d = tempfile::tempdir().unwrap();
    models(d.path(), with_empty_tensors);
    let mut outs = Vec::new();
    for run in 0..6 {
        let out = format!("out{run}");
        let (ok, err) = merge(d.path(), TA, &out);
        assert!(ok, "run {run}: {err}");
        outs.push(std::fs::read(d.path().join(&out).join("model.safetensors")).unwrap());
    }
    for (run, o) in outs.iter().enumerate() {
        assert!(o == &outs[0], "run {run} wrote other bytes than run 0");
    }
    // The order is the offsets', ties by name (the header as written, in its own order).
    let (got, _) = read_model(&d.path().join("out0"));
    assert_eq!(got["e.q"].shape, vec![0, 8]);
    let b = &outs[0];
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&b[8..8 + n]).unwrap();
    let names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    assert_eq!(
        names,
        ["a.weight", "e.gate", "e.k", "e.o", "e.q", "e.v", "z.weight"]
    );
}

#[test]
fn selection_model_over_tensors_without_elements_does_not_panic() {
    let d = tempfile::tempdir().unwrap();
    models(d.path(), |_| {
        vec![
            T::float("e.q", Dtype::BF16, &[0], &[]),
            T::float("e.k", Dtype::F32, &[3, 0], &[]),
            T {
                name: "ids".into(),
                dtype: Dtype::I64,
                shape: vec![2],
                bytes: [7i64, 9].iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
        ]
    });
    for method in ["magnitude", "ties"] {
        let recipe = format!(
            "merge_method: {method}\nbase_model: base\nparameters:\n  density: 0.5\n  selection: model\nmodels:\n  - model: task_0\n  - model: task_1\n"
        );
        let out = format!("out-{method}");
        let (ok, err) = merge(d.path(), &recipe, &out);
        assert!(ok, "{method}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let (got, _) = read_model(&d.path().join(&out));
        assert_eq!(got["e.k"].shape, vec![3, 0]);
        assert_eq!(
            got["ids"].bytes,
            read_model(&d.path().join("base")).0["ids"].bytes
        );
    }
}

/// Sets element 1 of `w` to `v` in the checkpoint `m` (others: 0.25, 0.5, ...).
fn one_value(dir: &Path, m: &str, dtype: Dtype, v: f32) {
    let vals = [0.25, v, 0.75, 1.0];
    write_model(
        &dir.join(m),
        &[T::float("w", dtype, &[2, 2], &vals)],
        1,
        None,
    );
}

fn plain(dir: &Path, m: &str, dtype: Dtype) {
    one_value(dir, m, dtype, 0.5)
}

/// Inf is reported as Inf, in the input that holds it; NaN as NaN; a value that only the
/// arithmetic makes infinite is reported as an overflow with the finite inputs, never blamed on
/// one file.
#[test]
fn non_finite_values_are_named_as_what_they_are_where_they_are() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let sta = "merge_method: sta\nbase_model: base\nparameters:\n  density: 0.5\nmodels:\n  - model: task_0\n    gradients: grads_0\n  - model: task_1\n    gradients: grads_1\n";
    /// (recipe, [base, task_0, task_1, grads_0, grads_1], the folder blamed, must say, must not).
    type Case<'a> = (&'a str, [f32; 5], &'a str, &'a [&'a str], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            TA,
            [f32::INFINITY, f32::INFINITY, 0.5, 1.0, 1.0],
            "base",
            &["+Inf", "element [0, 1]"],
            &["NaN"],
        ),
        (
            TA,
            [0.5, f32::NEG_INFINITY, 0.5, 1.0, 1.0],
            "task_0",
            &["-Inf"],
            &["NaN"],
        ),
        (
            TA,
            [0.5, 0.5, f32::NAN, 1.0, 1.0],
            "task_1",
            &["NaN"],
            &["Inf"],
        ),
        (
            sta,
            [f32::INFINITY, f32::INFINITY, 0.5, 1.0, 1.0],
            "base",
            &["+Inf"],
            &["NaN"],
        ),
        (
            sta,
            [0.5, 0.5, 0.5, 1.0, f32::INFINITY],
            "grads_1",
            &["+Inf", "gradient statistic"],
            &["NaN"],
        ),
        (
            TA,
            [-3.0e38, 3.0e38, -3.0e38, 1.0, 1.0],
            "task_0",
            &["overflows", "finite", "3e38"],
            &["NaN", "an infinite value"],
        ),
    ];
    for (recipe, v, blamed, says, not) in cases {
        for (m, x) in ["base", "task_0", "task_1", "grads_0", "grads_1"]
            .iter()
            .zip(v)
        {
            one_value(p, m, Dtype::F32, *x);
        }
        let (ok, err) = merge(p, recipe, "out");
        assert!(!ok, "{v:?} merged");
        // Recipe paths are relative to the recipe's folder, the working directory here.
        let file = format!("{blamed}/model.safetensors: tensor `w`");
        assert!(
            err.contains(&file),
            "{v:?}: expected {blamed} blamed, got: {err}"
        );
        for s in *says {
            assert!(err.contains(s), "{v:?}: missing `{s}` in: {err}");
        }
        for s in *not {
            assert!(!err.contains(s), "{v:?}: `{s}` in: {err}");
        }
        assert!(!p.join("out").exists());
    }
}

/// Decision (README "Decisions"): finite inputs whose merged value does not fit the output dtype
/// (the sum overflows float32, or the result exceeds float16's 65504) are an error naming the
/// tensor, the element and the inputs there; the output is not kept. An Inf the user did not
/// write is never saved into a model.
#[test]
fn finite_inputs_whose_result_overflows_are_refused_naming_the_element() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // float32: 2e38 + (3e38 - 2e38) + (3e38 - 2e38) = 4e38 > f32::MAX.
    one_value(p, "base", Dtype::F32, 2.0e38);
    one_value(p, "task_0", Dtype::F32, 3.0e38);
    one_value(p, "task_1", Dtype::F32, 3.0e38);
    let (ok, err) = merge(p, TA, "out");
    assert!(!ok, "merged into Inf");
    for s in [
        "tensor `w`",
        "element [0, 1]",
        "overflow",
        "float32",
        "finite",
    ] {
        assert!(err.contains(s), "missing `{s}` in: {err}");
    }
    assert!(!p.join("out").exists());
    // float16 output: 7e4 fits float32 and bfloat16 but not float16.
    for m in ["base", "task_0", "task_1"] {
        plain(p, m, Dtype::F32);
    }
    one_value(p, "task_0", Dtype::F32, 7.0e4);
    let (ok, err) = merge(p, &format!("{TA}dtype: float16\n"), "out");
    assert!(!ok, "merged into an f16 Inf");
    for s in ["tensor `w`", "element [0, 1]", "float16", "65504"] {
        assert!(err.contains(s), "missing `{s}` in: {err}");
    }
    assert!(!p.join("out").exists());
    // The same recipe in bfloat16 fits, and merges.
    let (ok, err) = merge(p, &format!("{TA}dtype: bfloat16\n"), "out");
    assert!(ok, "{err}");
}
