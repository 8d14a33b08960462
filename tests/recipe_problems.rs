//! mergekit recipe features stamerge refuses or checks: every problem comes from `plan`, from the
//! recipe and the inputs' headers (and small files), all at once, each naming its recipe field
//! and line, the file and the tensor.

mod common;

use std::path::Path;
use std::process::Command;

use common::scenario::Scenario;
use common::*;
use safetensors::Dtype;

fn plan(dir: &Path, recipe: &str) -> (bool, String, String) {
    std::fs::write(dir.join("r.yml"), recipe).unwrap();
    let o = Command::new(stamerge_bin())
        .args(["plan", "r.yml"])
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn refused(dir: &Path, recipe: &str, needles: &[&str]) -> String {
    let (ok, out, err) = plan(dir, recipe);
    assert!(!ok, "planned:\n{out}");
    for n in needles {
        assert!(err.contains(n), "missing `{n}` in:\n{err}");
    }
    err
}

/// Problems of the recipe alone: one run lists each with its field and line.
#[test]
fn recipe_problems_are_listed_at_once_with_field_and_line() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 5);
    let recipe = "merge_method: ties
base_model: base
models:
  - model: task_0
    parameters:
      lambda: 2
      weight:
        - filter: mlp
          value:
            - filter: up
              value: 1
  - model: task_1
    parameters:
      density: [0.5, 1.5]
parameters:
  seed: [1, 2]
  buffer_source: task_9
tokenizer_source: union
chat_template: vicuna
";
    let err = refused(
        s.dir.path(),
        recipe,
        &[
            "`models[0].parameters.lambda` (line 6): `lambda` is a global parameter",
            "`models[0].parameters.weight[0].value` (line 10): filter lists do not nest",
            "`models[1].parameters.density[1]` (line 14): `density` must be in (0, 1], got 1.5",
            "`parameters.seed` (line 16): `seed` is one value for the whole merge",
            "`parameters.buffer_source` (line 17): `task_9` is not a model of this recipe",
            "`tokenizer_source` (line 18): `union`",
            "`chat_template` (line 19): `vicuna` is neither a template name (alpaca, chatml",
        ],
    );
    assert!(err.contains("7 problem(s)"), "{err}");
    // tokenizer: blocks: their default source is union; per-token sources are not supported.
    refused(
        s.dir.path(),
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: task_0\ntokenizer:\n  tokens:\n    x: {source: base}\n",
        &["`tokenizer.source`", "`union`", "`tokenizer.tokens` (line 7)"],
    );
}

/// Slices: structure problems at once, each with its field.
#[test]
fn slice_problems_name_their_slice_and_source() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 6);
    let recipe = "merge_method: ties
base_model: base
slices:
  - sources:
      - model: task_0
        layer_range: [0, 2]
      - model: task_1
        layer_range: [0, 1]
  - sources:
      - model: base
        layer_range: [2, 1]
  - sources:
      - model: base
        layer_range: [0, 1]
    base_model: task_1
";
    refused(
        s.dir.path(),
        recipe,
        &[
            "`slices[0].sources` (line 5): every source of a slice has the same number of layers",
            "`slices[0].sources` (line 5): ties merges task vectors against the base",
            "`slices[1].sources[0].layer_range` (line 11): [2, 1] is not a range",
            "`slices[2].base_model` (line 15): a base model per slice is not supported",
        ],
    );
    // passthrough takes one source per slice and one model without slices.
    refused(
        s.dir.path(),
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: task_0\n        layer_range: [0, 1]\n      - model: task_1\n        layer_range: [0, 1]\n",
        &["`slices[0].sources` (line 4): passthrough copies one source per slice"],
    );
    refused(
        s.dir.path(),
        "merge_method: passthrough\nmodels:\n  - model: task_0\n  - model: task_1\n",
        &["passthrough copies one model: use `slices:`"],
    );
    // A range past the model's layers is found with the model's headers.
    refused(
        s.dir.path(),
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: task_0\n        layer_range: [0, 3]\n",
        &["task_0", "`slices[0].sources[0].layer_range` [0, 3] reaches past the model's 2 layers"],
    );
}

/// Rewrites the model in `dir` with one bit of its int buffer `model.position_ids` flipped;
/// returns the new bytes.
fn flip_position_ids(dir: &Path) -> Vec<u8> {
    let (m, order) = read_model(dir);
    let mut ts: Vec<T> = order.iter().map(|n| m[n].clone()).collect();
    let pos = ts
        .iter_mut()
        .find(|t| t.name == "model.position_ids")
        .unwrap();
    pos.bytes[0] ^= 1;
    let bytes = pos.bytes.clone();
    let cfg = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    write_model(dir, &ts, 1, Some(cfg));
    bytes
}

/// Problems of the inputs at once: a quantized checkpoint, a non-float tensor that differs, a
/// tokenizer of another vocabulary.
#[test]
fn input_problems_are_listed_at_once() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 7);
    let cfg = |p: &str| s.path(p).join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cfg("task_0")).unwrap()).unwrap();
    c["quantization_config"] = serde_json::json!({"quant_method": "gptq", "bits": 4});
    std::fs::write(cfg("task_0"), serde_json::to_vec(&c).unwrap()).unwrap();
    flip_position_ids(&s.path("task_1"));
    // Tokenizers: the base and task_1 share one, `other` has another vocabulary.
    let tok = |ids: &[(&str, u64)]| {
        let vocab: serde_json::Map<String, serde_json::Value> = ids
            .iter()
            .map(|(t, i)| (t.to_string(), (*i).into()))
            .collect();
        serde_json::to_vec(&serde_json::json!({"model": {"type": "WordLevel", "vocab": vocab}, "added_tokens": []})).unwrap()
    };
    std::fs::write(s.path("base/tokenizer.json"), tok(&[("a", 0), ("b", 1)])).unwrap();
    std::fs::write(s.path("task_1/tokenizer.json"), tok(&[("a", 0), ("b", 1)])).unwrap();
    std::fs::create_dir(s.path("other")).unwrap();
    std::fs::write(s.path("other/tokenizer.json"), tok(&[("a", 1), ("b", 0)])).unwrap();
    let err = refused(
        s.dir.path(),
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\ntokenizer_source: other\n",
        &[
            "task_0/config.json: `models[0].model` is a quantized checkpoint (`quantization_config`, gptq)",
            "Merge the unquantized checkpoints",
            "tensor `model.position_ids`: non-float tensor that differs between the inputs: models[1] (`task_1`) has other values than the base's",
            "`buffer_source: base`",
            "`tokenizer_source`: the vocabulary of `base_model` is not `other`'s (token \"a\" has id 0, not 1)",
        ],
    );
    assert!(err.contains("4 problem(s)"), "{err}");
}

/// `buffer_source` picks where a differing non-float tensor comes from, per tensor with a filter.
#[test]
fn buffer_source_copies_the_named_model_s_tensor() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 8);
    let want = flip_position_ids(&s.path("task_1"));
    let recipe = "merge_method: ties\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\nparameters:\n  buffer_source:\n    - filter: position_ids\n      value: task_1\n";
    let (ok, out, err) = plan(s.dir.path(), recipe);
    assert!(ok, "{err}");
    assert!(out.contains("← models[1] model.position_ids"), "{out}");
    let o = Command::new(stamerge_bin())
        .args(["merge", "r.yml", "out", "--device", "cpu"])
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (got, _) = read_model(&s.path("out"));
    assert_eq!(got["model.position_ids"].bytes, want);
}

/// `selection: model` keeps one density for the whole model: a per-layer one is refused.
#[test]
fn model_wide_selection_needs_one_density() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 9);
    refused(
        s.dir.path(),
        "merge_method: ties\nbase_model: base\nparameters:\n  selection: model\n  density: [0.2, 0.5]\nmodels:\n  - model: task_0\n  - model: task_1\n",
        &["`parameters.density` (line 5): `selection: model` keeps one density per model over the whole model"],
    );
}

/// A `slices:` recipe over every layer of the same models writes the `models:` recipe's tensors,
/// the ones only the base has (a float table, an int buffer the tasks share) included.
#[test]
fn one_slice_over_every_layer_is_the_models_recipe() {
    let s = Scenario::new(Dtype::BF16, 2, 1, false, 10);
    // A slices recipe rewrites the layer count, so config.json must have one.
    for m in ["base", "task_0", "task_1"] {
        let p = s.path(m).join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        c["num_hidden_layers"] = 2.into();
        std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
    }
    let run = |recipe: &str, out: &str| {
        std::fs::write(s.path("r.yml"), recipe).unwrap();
        let o = Command::new(stamerge_bin())
            .args(["merge", "r.yml", out, "--device", "cpu"])
            .current_dir(s.dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_model(&s.path(out)).0
    };
    let models = run(
        "merge_method: ties\nbase_model: base\nparameters:\n  density: 0.4\nmodels:\n  - model: task_0\n  - model: task_1\n",
        "a",
    );
    let sliced = run(
        "merge_method: ties\nbase_model: base\nparameters:\n  density: 0.4\nslices:\n  - sources:\n      - model: base\n        layer_range: [0, 2]\n      - model: task_0\n        layer_range: [0, 2]\n      - model: task_1\n        layer_range: [0, 2]\n",
        "b",
    );
    assert_eq!(models.len(), sliced.len());
    for (name, t) in &models {
        assert_eq!(t.bytes, sliced[name].bytes, "{name}");
    }
    assert!(
        sliced.contains_key("model.rotary.inv_freq") && sliced.contains_key("model.position_ids")
    );
}
