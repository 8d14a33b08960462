//! Synthetic checkpoint sets in a Llama-style layout (base, task models, gradient statistics and
//! one recipe per method), for the bundled example, the tests' larger cases and the benchmarks.
//! Values come from a counter-based generator, so a set is the same on every machine.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::checkpoint::writer::{OutTensor, ShardWriter};
use crate::dtype::{narrow, FloatType};
use crate::error::{IoContext, Result};
use crate::select::dare::fmix;

#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub tasks: usize,
    pub dtype: FloatType,
    pub grad_dtype: FloatType,
    pub shard_bytes: u64,
    pub seed: u64,
}

impl Default for SynthSpec {
    /// The bundled example: a few hundred KB in all.
    fn default() -> Self {
        Self {
            layers: 2,
            hidden: 32,
            intermediate: 64,
            vocab: 64,
            tasks: 3,
            dtype: FloatType::BF16,
            grad_dtype: FloatType::BF16,
            shard_bytes: 40_000,
            seed: 0,
        }
    }
}

impl SynthSpec {
    /// (name, shape) of every float tensor, in file order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                t.push((format!("{p}.self_attn.{n}.weight"), vec![h, h]));
            }
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        t.push(("model.norm.weight".to_string(), vec![h]));
        t.push(("lm_head.weight".to_string(), vec![v, h]));
        t
    }

    pub fn params(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }
}

/// Uniform in [-1, 1) from a counter.
#[inline]
fn uni(seed: u64, i: u64) -> f32 {
    let h = fmix(seed ^ fmix(i.wrapping_add(0x632b_e59b_d9b4_e019)));
    ((h >> 40) as f32 / (1u64 << 23) as f32) - 1.0
}

/// What a synthetic file holds for one tensor.
#[derive(Clone, Copy)]
enum Role {
    Base,
    /// Task t: base plus a sparse-ish, heavy-tailed delta whose scale varies per task and layer.
    Task(usize),
    /// Task t's gradient statistic: non-negative, correlated with that task's delta.
    Grad(usize),
}

fn values(spec: &SynthSpec, role: Role, tensor: usize, name: &str, n: usize) -> Vec<f32> {
    let ts = fmix(spec.seed ^ crate::select::dare::name_hash(name) ^ tensor as u64);
    let norm = name.contains("norm");
    let base = |i: u64| {
        if norm {
            1.0 + 0.1 * uni(ts, i)
        } else {
            0.02 * uni(ts, i)
        }
    };
    let delta = |t: usize, i: u64| {
        let s = fmix(ts ^ fmix(t as u64 + 17));
        let u = uni(s, i);
        // Cubing makes a heavy tail: a few large entries carry most of the change, as in fine-tunes.
        let scale = 0.004 * (1.0 + (t % 3) as f32) * (1.0 + (tensor % 5) as f32 * 0.25);
        scale * u * u * u * 4.0
    };
    (0..n as u64)
        .into_par_iter()
        .map(|i| match role {
            Role::Base => base(i),
            Role::Task(t) => base(i) + delta(t, i),
            Role::Grad(t) => {
                let g = fmix(ts ^ fmix(t as u64 + 1000));
                (delta(t, i).abs() * 50.0 + 0.05 * (uni(g, i) + 1.0)) * (1.0 + (t as f32))
            }
        })
        .collect()
}

fn write_checkpoint(spec: &SynthSpec, role: Role, dir: &Path, with_config: bool) -> Result<()> {
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let ty = if matches!(role, Role::Grad(_)) {
        spec.grad_dtype
    } else {
        spec.dtype
    };
    let outs: Vec<OutTensor> = spec
        .tensors()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            OutTensor {
                name,
                dtype: ty.to_safetensors(),
                shape,
                nbytes: (n * ty.size()) as u64,
            }
        })
        .collect();
    // No non-float buffer such as `model.position_ids`: transformers' Llama has none, and flags
    // one as an unexpected key on every load. Tests that need a copied tensor add their own.
    let mut w = ShardWriter::new(dir, outs.clone(), spec.shard_bytes);
    for (ti, t) in outs.iter().enumerate() {
        let n: usize = t.shape.iter().product();
        let v = values(spec, role, ti, &t.name, n);
        let mut raw = vec![0u8; n * ty.size()];
        narrow(ty, &v, &mut raw);
        w.write_next(&raw)?;
    }
    w.finish()?;
    if with_config {
        let cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": (spec.hidden / 8).max(1),
            "vocab_size": spec.vocab,
            "torch_dtype": spec.dtype.torch_name(),
        });
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&cfg).expect("json"),
        )
        .ctx(|| format!("writing {}", dir.join("config.json").display()))?;
        std::fs::write(
            dir.join("generation_config.json"),
            b"{\n  \"max_length\": 64\n}\n",
        )
        .ctx(|| "writing generation_config.json".into())?;
        std::fs::write(
            dir.join("tokenizer_config.json"),
            b"{\n  \"model_max_length\": 64\n}\n",
        )
        .ctx(|| "writing tokenizer_config.json".into())?;
    }
    Ok(())
}

/// The recipes written beside a synthetic set (name, YAML), paths relative to the set folder.
pub fn recipes(tasks: usize) -> Vec<(String, String)> {
    let models = |extra: &dyn Fn(usize) -> String| -> String {
        (0..tasks)
            .map(|t| format!("  - model: task_{t}\n{}", extra(t)))
            .collect()
    };
    let plain = |_t: usize| String::new();
    let weighted =
        |_t: usize| "    parameters:\n      weight: 1.0\n      density: 0.3\n".to_string();
    let grads = |t: usize| format!("    gradients: grads_{t}\n");
    let mut v = vec![
        ("task_arithmetic.yml".to_string(), format!("merge_method: task_arithmetic\nbase_model: base\nparameters:\n  lambda: 0.5\nmodels:\n{}", models(&plain))),
        ("ties.yml".to_string(), format!("merge_method: ties\nbase_model: base\nparameters:\n  normalize: true\nmodels:\n{}dtype: bfloat16\n", models(&weighted))),
        ("magnitude.yml".to_string(), format!("merge_method: magnitude\nbase_model: base\nparameters:\n  density: 0.2\n  lambda: 0.8\nmodels:\n{}", models(&plain))),
        ("dare_linear.yml".to_string(), format!("merge_method: dare_linear\nbase_model: base\nparameters:\n  density: 0.5\n  seed: 7\nmodels:\n{}", models(&plain))),
        ("dare_ties.yml".to_string(), format!("merge_method: dare_ties\nbase_model: base\nparameters:\n  density: 0.5\n  seed: 7\nmodels:\n{}", models(&plain))),
        ("sta.yml".to_string(), format!("merge_method: sta\nbase_model: base\nparameters:\n  density: 0.1\nmodels:\n{}", models(&grads))),
        ("sta_model.yml".to_string(), format!("merge_method: sta\nbase_model: base\nparameters:\n  density: 0.1\n  selection: model\n  importance: task_vector\nmodels:\n{}", models(&grads))),
        // mergekit's per-layer values: a gradient from the first layer to the last, and a filter
        // list (the first entry whose filter is a piece of the tensor's name applies).
        ("ties_layers.yml".to_string(), format!("merge_method: ties\nbase_model: base\nparameters:\n  weight: [0.5, 1.0]\n  density:\n    - filter: mlp\n      value: [0.2, 0.5]\n    - value: 0.3\nmodels:\n{}", models(&plain))),
        // mergekit's sparsifying methods (CPU only for now): della's keep probabilities run from
        // density − epsilon to density + epsilon by magnitude rank within each row; breadcrumbs
        // drops the largest gamma and the smallest entries; sce and ram weigh the tasks themselves.
        ("della.yml".to_string(), format!("merge_method: della\nbase_model: base\nparameters:\n  density: 0.5\n  epsilon: 0.1\n  lambda: 1.0\nmodels:\n{}", models(&plain))),
        ("breadcrumbs.yml".to_string(), format!("merge_method: breadcrumbs\nbase_model: base\nparameters:\n  density: 0.9\n  gamma: 0.01\nmodels:\n{}", models(&plain))),
        ("sce.yml".to_string(), format!("merge_method: sce\nbase_model: base\nparameters:\n  select_topk: 0.5\nmodels:\n{}", models(&plain))),
        ("ram.yml".to_string(), format!("merge_method: ram\nbase_model: base\nmodels:\n{}", models(&plain))),
        // A frankenmerge: layer 0 of the first task, then layer 0 of the last, stacked.
        ("frankenmerge.yml".to_string(), format!("merge_method: passthrough\nslices:\n  - sources:\n      - model: task_0\n        layer_range: [0, 1]\n  - sources:\n      - model: task_{}\n        layer_range: [0, 1]\n", tasks.saturating_sub(1))),
    ];
    if tasks >= 2 {
        let keep: String = (0..tasks - 1)
            .map(|t| format!("  - model: task_{t}\n    gradients: grads_{t}\n"))
            .collect();
        let last = tasks - 1;
        v.push((
            "forget.yml".to_string(),
            format!("merge_method: sta\nbase_model: base\nparameters:\n  density: 0.1\nmodels:\n{keep}forget:\n  - model: task_{last}\n    gradients: grads_{last}\n"),
        ));
    }
    v
}

/// Writes base/, task_i/, grads_i/ and the recipes into `dir`. Returns the paths written.
pub fn generate(spec: &SynthSpec, dir: &Path) -> Result<Vec<PathBuf>> {
    generate_with(spec, dir, |_, _| {})
}

/// As [`generate`], calling `done(name, i)` after the i-th of the 1 + 2·tasks checkpoints
/// (counting from 1) is written: the CLI's progress.
pub fn generate_with(
    spec: &SynthSpec,
    dir: &Path,
    mut done: impl FnMut(&str, usize),
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let mut written = vec![dir.join("base")];
    write_checkpoint(spec, Role::Base, &dir.join("base"), true)?;
    done("base", 1);
    for t in 0..spec.tasks {
        write_checkpoint(spec, Role::Task(t), &dir.join(format!("task_{t}")), true)?;
        done(&format!("task_{t}"), 2 + 2 * t);
        write_checkpoint(spec, Role::Grad(t), &dir.join(format!("grads_{t}")), false)?;
        done(&format!("grads_{t}"), 3 + 2 * t);
        written.push(dir.join(format!("task_{t}")));
        written.push(dir.join(format!("grads_{t}")));
    }
    for (name, text) in recipes(spec.tasks) {
        std::fs::write(dir.join(&name), text).ctx(|| format!("writing {name}"))?;
        written.push(dir.join(name));
    }
    Ok(written)
}
