//! Recipes as mergekit users write them, against mergekit 0.1.5 itself.
//!
//! `tests/fixtures/mergekit_0.1.5.json` holds what mergekit's own planner decided for a set of
//! recipes on tiny Llama checkpoints (made by `benches/peers/mergekit_fixture.py` with mergekit
//! and PyTorch; CI needs neither): per output tensor, which tensor of which model feeds it and
//! every parameter value after filters, per-layer gradients and precedence; and per recipe the
//! output's layer count, tensor dtypes and chat template. These tests rebuild the checkpoints'
//! layouts, plan and merge the same recipes with stamerge, and compare.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::*;
use safetensors::Dtype;
use serde_json::Value as Json;
use stamerge::recipe::InputRef;
use stamerge::{Options, Plan, Recipe};

fn fixture() -> Json {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mergekit_0.1.5.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn dtype(s: &str) -> Dtype {
    match s {
        "float32" => Dtype::F32,
        "float16" => Dtype::F16,
        "bfloat16" => Dtype::BF16,
        other => panic!("dtype {other}"),
    }
}

/// The fixture's checkpoints (their layouts, configs and tokenizer files; random values).
fn write_models(dir: &Path, fx: &Json) {
    let mut rng = Rng(7);
    for (name, m) in fx["models"].as_object().unwrap() {
        let tensors: Vec<T> = m["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let shape: Vec<usize> = t[1]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                let n = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.f() * 0.1).collect();
                T::float(
                    t[0].as_str().unwrap(),
                    dtype(t[2].as_str().unwrap()),
                    &shape,
                    &v,
                )
            })
            .collect();
        let folder = dir.join(name);
        write_model(&folder, &tensors, 1, Some(m["config"].clone()));
        for (f, text) in m["tokenizer_files"].as_object().unwrap() {
            std::fs::write(folder.join(f), text.as_str().unwrap()).unwrap();
        }
    }
}

fn plan_of(dir: &Path, name: &str, text: &str) -> (Recipe, Plan) {
    let p = dir.join(format!("{name}.yml"));
    std::fs::write(&p, text).unwrap();
    let recipe = Recipe::from_file(&p).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    let plan = stamerge::plan(&recipe, None, &Options::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (recipe, plan)
}

/// Which of stamerge's inputs a fixture model label (its folder name) is.
fn input_of(recipe: &Recipe, label: &str) -> InputRef {
    // Without a base, `base_spelled` is the first model, which is a task.
    if recipe.base_spelled == label && !recipe.baseless {
        return InputRef::Base;
    }
    let t = recipe
        .tasks
        .iter()
        .position(|t| t.spelled == label)
        .unwrap_or_else(|| panic!("no input `{label}`"));
    InputRef::Task(t)
}

fn same(ours: &stamerge::recipe::Value, theirs: &Json) -> bool {
    match theirs {
        Json::Bool(b) => ours.bool() == *b && matches!(ours, stamerge::recipe::Value::Bool(_)),
        Json::Number(n) => ours.num() == n.as_f64().unwrap(),
        Json::String(s) => ours.str() == s,
        _ => false,
    }
}

/// Every tensor mergekit planned: the same output names, the same input tensor of each model,
/// and every parameter value stamerge's method reads, exactly (f64).
#[test]
fn resolution_matches_mergekit_on_every_fixture_recipe() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    write_models(dir.path(), &fx);
    let mut compared = HashMap::new();
    for r in fx["recipes"].as_array().unwrap() {
        let name = r["name"].as_str().unwrap();
        let (recipe, plan) = plan_of(dir.path(), name, r["text"].as_str().unwrap());
        let items: HashMap<&str, &stamerge::plan::Item> =
            plan.items.iter().map(|i| (i.name.as_str(), i)).collect();
        let theirs = r["tensors"].as_array().unwrap();
        assert_eq!(items.len(), theirs.len(), "{name}: tensor count");
        let mut values = 0;
        for t in theirs {
            let tname = t["name"].as_str().unwrap();
            let item = items
                .get(tname)
                .unwrap_or_else(|| panic!("{name}: stamerge has no `{tname}`"));
            for (label, input_name) in t["inputs"].as_object().unwrap() {
                let ours = match input_of(&recipe, label) {
                    InputRef::Base => item.slot.base.as_deref(),
                    InputRef::Task(k) => item.slot.tasks[k].as_deref(),
                };
                assert_eq!(
                    ours,
                    input_name.as_str(),
                    "{name}: `{tname}` reads which tensor of {label}"
                );
            }
            // Inputs stamerge adds that mergekit does not have.
            let n_inputs = item.slot.base.iter().filter(|_| !recipe.baseless).count()
                + item.slot.tasks.iter().filter(|n| n.is_some()).count();
            assert_eq!(
                n_inputs,
                t["inputs"].as_object().unwrap().len(),
                "{name}: `{tname}`'s inputs"
            );
            for (k, v) in t["shared"].as_object().unwrap() {
                if let Some(ours) = item.params.shared(k) {
                    assert!(
                        same(ours, v),
                        "{name}: `{tname}` {k}: ours {ours}, mergekit {v}"
                    );
                    values += 1;
                }
            }
            for (label, ps) in t["per_model"].as_object().unwrap() {
                for (k, v) in ps.as_object().unwrap() {
                    let ours = match input_of(&recipe, label) {
                        InputRef::Base => item.params.base(k),
                        InputRef::Task(i) => item.params.task(i, k),
                    };
                    match (ours, v) {
                        (None, Json::Null) => values += 1,
                        (Some(o), v) => {
                            assert!(
                                same(o, v),
                                "{name}: `{tname}` {label}.{k}: ours {o}, mergekit {v}"
                            );
                            values += 1;
                        }
                        // A parameter mergekit resolves that stamerge's method does not read
                        // (density of task_arithmetic).
                        (None, _) => assert!(
                            !stamerge::recipe::params::of(recipe.method).any(|p| p.name == k),
                            "{name}: `{tname}` {label}.{k}: stamerge has no value, mergekit {v}"
                        ),
                    }
                }
            }
        }
        compared.insert(name.to_string(), values);
    }
    // Not vacuous: each recipe compared many values (ties_example: 48 tensors × (3 shared + 3
    // models × 2)).
    for (name, n) in &compared {
        // arcee_fusion has no parameters.
        if name != "arcee_fusion" {
            assert!(*n >= 48, "{name}: only {n} values compared");
        }
    }
    assert!(compared["ties_example"] >= 48 * 9, "{compared:?}");
    assert_eq!(compared.len(), 25, "{compared:?}");
}

/// Merged with stamerge: the output's layer count, its tensors' dtypes and its chat template are
/// what mergekit wrote (where stamerge differs on purpose, it warns, and says what to write to
/// match).
#[test]
fn outputs_match_mergekit_s_config_dtypes_and_template() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    write_models(dir.path(), &fx);
    for r in fx["recipes"].as_array().unwrap() {
        let name = r["name"].as_str().unwrap();
        let (_, plan) = plan_of(dir.path(), name, r["text"].as_str().unwrap());
        let out = dir.path().join(format!("{name}.out"));
        let opts = Options {
            device: stamerge::Device::Cpu,
            ..Options::default()
        };
        stamerge::merge_planned(&plan, &out, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = &r["output"];
        let cfg: Json =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(
            cfg["num_hidden_layers"], want["num_hidden_layers"],
            "{name}"
        );
        assert_eq!(cfg["vocab_size"], want["vocab_size"], "{name}");
        let (tensors, _) = read_model(&out);
        let layers: std::collections::BTreeSet<usize> = tensors
            .keys()
            .filter_map(|n| n.strip_prefix("model.layers."))
            .map(|n| n.split('.').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(
            layers.iter().copied().collect::<Vec<_>>(),
            (0..cfg["num_hidden_layers"].as_u64().unwrap() as usize).collect::<Vec<_>>(),
            "{name}: config.json's layer count matches the tensors"
        );
        for (t, d) in want["tensor_dtypes"].as_object().unwrap() {
            let ours = tensors[t].dtype;
            if name == "mixed_dtypes" {
                // A bfloat16 base and a float32 model: mergekit promotes to float32, stamerge
                // keeps the base's dtype and says so.
                assert_eq!((ours, d.as_str().unwrap()), (Dtype::BF16, "float32"));
            } else {
                assert_eq!(ours, dtype(d.as_str().unwrap()), "{name}: `{t}`");
            }
        }
        if name == "mixed_dtypes" {
            let w = plan.warnings.join("\n");
            assert!(
                w.contains("mergekit would write float32") && w.contains("out_dtype: float32"),
                "{w}"
            );
        } else {
            assert!(plan.warnings.is_empty(), "{name}: {:?}", plan.warnings);
        }
        let tc: Json =
            serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap())
                .unwrap();
        match want["chat_template"].as_str() {
            // Different text (stamerge's own), the same renderings: checked by the fixture script
            // and `named_chat_templates_are_the_ones_checked_against_mergekit`.
            Some(_) => {
                let chatml = stamerge::recipe::chat::NAMED
                    .iter()
                    .find(|(n, _)| *n == "chatml")
                    .unwrap()
                    .1;
                assert_eq!(tc["chat_template"].as_str(), Some(chatml), "{name}");
                assert!(!out.join("chat_template.jinja").exists());
            }
            None => assert!(tc.get("chat_template").is_none(), "{name}"),
        }
    }
}

/// stamerge's template files are the texts the fixture script rendered beside mergekit's.
#[test]
fn named_chat_templates_are_the_ones_checked_against_mergekit() {
    let fx = fixture();
    let checked = fx["chat_templates"].as_object().unwrap();
    assert_eq!(checked.len(), stamerge::recipe::chat::NAMED.len());
    for (name, text) in stamerge::recipe::chat::NAMED {
        let c = &checked[*name];
        assert_eq!(
            c["checked_text"].as_str(),
            Some(*text),
            "{name}: changed since benches/peers/mergekit_fixture.py compared it with mergekit's; run it again"
        );
        assert!(c["renders_compared"].as_u64().unwrap() >= 10);
    }
}

/// The hub names of mergekit's examples as local folders beside the recipe: a synthetic Llama set
/// of `layers` layers, one folder per name (the first is the base of the set).
fn hub_models(dir: &Path, layers: usize, names: &[&str]) {
    let spec = stamerge::synth::SynthSpec {
        layers,
        hidden: 16,
        intermediate: 24,
        vocab: 32,
        tasks: names.len() - 1,
        dtype: stamerge::dtype::FloatType::F16,
        grad_dtype: stamerge::dtype::FloatType::F16,
        shard_bytes: 1 << 20,
        seed: 3,
    };
    let set = dir.join("set");
    stamerge::synth::generate(&spec, &set).unwrap();
    for (i, n) in names.iter().enumerate() {
        let from = if i == 0 {
            set.join("base")
        } else {
            set.join(format!("task_{}", i - 1))
        };
        let to = dir.join(n);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::rename(from, to).unwrap();
    }
}

/// The values `name=a,b,c` of a plan line (the last such column: `t=` is also the layer's
/// position).
fn values(line: &str, name: &str) -> Vec<f64> {
    let v = line
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {line}"));
    v.split(',').map(|x| x.parse().unwrap()).collect()
}

fn stamerge(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(stamerge_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// mergekit's examples/ that use these features, unchanged (the hub names are local folders):
/// ties.yml (per-layer gradients, filters), orcamini-platy-44layer.yml (a passthrough
/// frankenmerge of 40-layer models), gradient-slerp.yml (slerp over slices, `t` by filter and
/// layer), linear.yml (no base model). benches/peers/mergekit_fixture.py compares their outputs
/// with mergekit's.
#[test]
fn mergekit_examples_run_unchanged() {
    let ex = |f: &str| -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/mergekit-examples")
                .join(f),
        )
        .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    hub_models(
        d,
        40,
        &[
            "TheBloke/Llama-2-13B-fp16",
            "psmathur/orca_mini_v3_13b",
            "garage-bAInd/Platypus2-13B",
            "WizardLM/WizardMath-13B-V1.0",
            "WizardLM/WizardLM-13B-V1.2",
        ],
    );
    for f in [
        "ties.yml",
        "orcamini-platy-44layer.yml",
        "gradient-slerp.yml",
        "linear.yml",
    ] {
        std::fs::write(d.join(f), ex(f)).unwrap();
    }
    // ties.yml: the density and weight gradients over 40 layers, the mlp filter.
    let (ok, plan, err) = stamerge(d, &["plan", "ties.yml"]);
    assert!(ok, "{err}");
    let line = |name: &str| {
        plan.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` in\n{plan}"))
            .to_string()
    };
    // Layer 20 of 40 (t = 20/39): density [1, 0.7, 0.1] and weight [0, 0.3, 0.7, 1] interpolated
    // there; the third model's weight is 0.5 in the MLP (filter `mlp`), 0 elsewhere.
    let t = 20.0 / 39.0;
    // Between entries 1 and 2 of each list.
    let density = 0.7 + (0.1 - 0.7) * (t * 2.0 - 1.0);
    let weight = 0.3 + (0.7 - 0.3) * (t * 3.0 - 1.0);
    let l = line("model.layers.20.mlp.up_proj.weight ");
    assert!(l.contains("20/40 t=0.513"), "{l}");
    let w = values(&l, "weight");
    assert_eq!((w[0], w[2]), (1.0, 0.5), "{l}");
    assert!((w[1] - weight).abs() < 1e-12, "{l}: weight {weight}");
    let dens = values(&l, "density");
    assert!(
        (dens[0] - density).abs() < 1e-12 && dens[1..] == [0.5, 0.33],
        "{l}: density {density}"
    );
    let l = line("model.layers.20.self_attn.q_proj.weight ");
    assert_eq!(
        values(&l, "weight")[2],
        0.0,
        "the mlp filter does not match attention: {l}"
    );
    let (ok, _, err) = stamerge(d, &["merge", "ties.yml", "ties-out", "--device", "cpu"]);
    assert!(ok, "{err}");
    // The frankenmerge: 24 + 20 = 44 layers, loadable as such.
    let (ok, _, err) = stamerge(d, &["orcamini-platy-44layer.yml", "franken"]);
    assert!(ok, "{err}");
    let cfg: Json =
        serde_json::from_slice(&std::fs::read(d.join("franken/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 44);
    assert_eq!(cfg["torch_dtype"], "float16");
    let (out, _) = read_model(&d.join("franken"));
    let (orca, _) = read_model(&d.join("psmathur/orca_mini_v3_13b"));
    let (platy, _) = read_model(&d.join("garage-bAInd/Platypus2-13B"));
    assert_eq!(
        out["model.layers.23.mlp.up_proj.weight"].bytes,
        orca["model.layers.23.mlp.up_proj.weight"].bytes
    );
    assert_eq!(
        out["model.layers.24.mlp.up_proj.weight"].bytes,
        platy["model.layers.20.mlp.up_proj.weight"].bytes
    );
    assert_eq!(
        out["model.embed_tokens.weight"].bytes,
        orca["model.embed_tokens.weight"].bytes
    );
    assert_eq!(out["lm_head.weight"].bytes, platy["lm_head.weight"].bytes);
    assert_eq!(
        out["model.norm.weight"].bytes,
        platy["model.norm.weight"].bytes
    );
    assert!(!out.contains_key("model.layers.44.mlp.up_proj.weight"));
    // gradient-slerp.yml: t by filter over the 40 layers of the one slice (t = 20/39 at layer
    // 20: between entries 2 and 3 of [0, 0.5, 0.3, 0.7, 1] for attention, of the reversed list
    // for the MLP), 0.5 elsewhere.
    let (ok, plan, err) = stamerge(d, &["plan", "gradient-slerp.yml"]);
    assert!(ok, "{err}");
    let line = |name: &str| {
        plan.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` in\n{plan}"))
            .to_string()
    };
    let f = t * 4.0 - 2.0;
    let l = line("model.layers.20.self_attn.q_proj.weight ");
    assert!(
        (values(&l, "t")[0] - (0.3 + (0.7 - 0.3) * f)).abs() < 1e-12,
        "{l}"
    );
    let l = line("model.layers.20.mlp.up_proj.weight ");
    assert!(
        (values(&l, "t")[0] - (0.7 + (0.3 - 0.7) * f)).abs() < 1e-12,
        "{l}"
    );
    assert_eq!(values(&line("model.norm.weight "), "t"), [0.5]);
    let (ok, _, err) = stamerge(d, &["gradient-slerp.yml", "slerp", "--device", "cpu"]);
    assert!(ok, "{err}");
    let (out, _) = read_model(&d.join("slerp"));
    let (platy, _) = read_model(&d.join("garage-bAInd/Platypus2-13B"));
    // t = 0 gives the base (orca) exactly, t = 1 the model: coefficients 1 and 0.
    assert_eq!(
        out["model.layers.0.self_attn.q_proj.weight"].bytes,
        orca["model.layers.0.self_attn.q_proj.weight"].bytes
    );
    assert_eq!(
        out["model.layers.0.mlp.up_proj.weight"].bytes,
        platy["model.layers.0.mlp.up_proj.weight"].bytes
    );
    assert_eq!(out.len(), orca.len());
    // linear.yml: no base_model; (1·orca + 0.3·wizardlm + 0.5·platypus) / 1.8 in float32,
    // written as float16.
    let (ok, plan, err) = stamerge(d, &["plan", "linear.yml"]);
    assert!(ok, "{err}");
    assert!(plan.contains("base: none"), "{plan}");
    let (ok, _, err) = stamerge(d, &["linear.yml", "linear", "--device", "cpu"]);
    assert!(ok, "{err}");
    let (out, _) = read_model(&d.join("linear"));
    let (wiz, _) = read_model(&d.join("WizardLM/WizardLM-13B-V1.2"));
    for name in [
        "model.embed_tokens.weight",
        "model.layers.39.mlp.down_proj.weight",
    ] {
        let (a, b, c) = (
            orca[name].values(),
            wiz[name].values(),
            platy[name].values(),
        );
        let want: Vec<f32> = (0..a.len())
            .map(|i| (1.0 * a[i] + 0.3 * b[i] + 0.5 * c[i]) / (1.0 + 0.3 + 0.5))
            .collect();
        assert_eq!(out[name].dtype, Dtype::F16);
        assert_eq!(out[name].bytes, encode(Dtype::F16, &want), "{name}");
    }
}

/// `tokenizer_source: <model>` writes that model's tokenizer files (and only those);
/// `chat_template: auto` the template most inputs have, into tokenizer_config.json.
#[test]
fn tokenizer_source_and_auto_chat_template() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_models(d, &fx);
    let set_template = |m: &str, t: &str| {
        let p = d.join(m).join("tokenizer_config.json");
        let mut c: Json = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        c["chat_template"] = t.into();
        c["model_max_length"] = 4096.into();
        std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
    };
    set_template("m0", "{{ 'two' }} {% for m in messages %}{% endfor %}");
    set_template("m2", "{{ 'two' }} {% for m in messages %}{% endfor %}\n");
    set_template("m1", "{{ 'one' }} {% for m in messages %}{% endfor %}");
    std::fs::write(d.join("base/chat_template.jinja"), "{{ 'base' }}").unwrap();
    std::fs::write(d.join("base/tokenizer.model"), b"only the base has this").unwrap();
    std::fs::write(
        d.join("m1/special_tokens_map.json"),
        b"{\"eos_token\": \"</s>\"}",
    )
    .unwrap();
    let recipe = "merge_method: ties\nbase_model: base\nmodels:\n  - model: m0\n  - model: m1\n  - model: m2\ntokenizer_source: m1\nchat_template: auto\n";
    let (_, plan) = plan_of(d, "tok", recipe);
    let out = d.join("out");
    let opts = Options {
        device: stamerge::Device::Cpu,
        ..Options::default()
    };
    stamerge::merge_planned(&plan, &out, &opts).unwrap();
    let tc: Json =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(
        tc["chat_template"], "{{ 'two' }} {% for m in messages %}{% endfor %}",
        "two models have it (trimmed, as mergekit compares them)"
    );
    assert_eq!(tc["model_max_length"], 4096, "m1's tokenizer_config.json");
    assert_eq!(
        std::fs::read(out.join("special_tokens_map.json")).unwrap(),
        std::fs::read(d.join("m1/special_tokens_map.json")).unwrap()
    );
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(d.join("m1/tokenizer.json")).unwrap()
    );
    assert!(!out.join("tokenizer.model").exists(), "m1 has none");
    assert!(
        !out.join("chat_template.jinja").exists(),
        "it would win over the template"
    );
    let cfg: Json =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 32);
}

/// Per-layer values need the true layer count: config.json's must match the names.
#[test]
fn per_layer_values_need_a_config_that_matches_the_layers() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_models(d, &fx);
    let p = d.join("base/config.json");
    let mut c: Json = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    c["num_hidden_layers"] = 7.into();
    std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
    let r = |w: &str| {
        format!("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: m0\n    parameters:\n      weight: {w}\n")
    };
    let (ok, _, err) = stamerge(d, &["plan", &write(d, &r("[0, 1]"))]);
    assert!(!ok);
    assert!(
        err.contains("base/config.json")
            && err.contains("`num_hidden_layers: 7`, the tensor names have layers 0 to 4"),
        "{err}"
    );
    let (ok, _, err) = stamerge(d, &["plan", &write(d, &r("0.5"))]);
    assert!(ok, "one value needs no layer count: {err}");
}

fn write(d: &Path, text: &str) -> String {
    std::fs::write(d.join("r.yml"), text).unwrap();
    "r.yml".into()
}
