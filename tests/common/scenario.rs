//! A random checkpoint set on disk (base, tasks, gradients) and the comparison of stamerge's
//! output with the reference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::*;

pub struct Scenario {
    pub dir: tempfile::TempDir,
    pub tasks: usize,
    pub dtype: Dtype,
}

pub const SHAPES: &[(&str, &[usize])] = &[
    ("model.embed_tokens.weight", &[37, 16]),
    ("model.layers.0.self_attn.q_proj.weight", &[16, 16]),
    ("model.layers.0.mlp.up_proj.weight", &[4097]),
    ("model.layers.0.input_layernorm.weight", &[1]),
    ("model.layers.0.mlp.down_proj.weight", &[31]),
    ("model.layers.1.mlp.gate_proj.weight", &[3, 1000]),
    ("lm_head.weight", &[37, 16]),
];

impl Scenario {
    /// `grid`: values on coarse grids that every dtype stores exactly, so scores tie heavily,
    /// also at the threshold. `shards`: files per checkpoint.
    pub fn new(dtype: Dtype, tasks: usize, shards: usize, grid: bool, seed: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(seed);
        let cfg =
            serde_json::json!({"model_type": "llama", "vocab_size": 37, "torch_dtype": "float32"});
        let mut base_vals: Vec<Vec<f32>> = Vec::new();
        let mut base = Vec::new();
        for (name, shape) in SHAPES {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    if grid {
                        (rng.below(9) as f32 - 4.0) * 0.25
                    } else {
                        rng.f() * 0.05
                    }
                })
                .collect();
            base.push(T::float(name, dtype, shape, &v));
            base_vals.push(base.last().unwrap().values());
        }
        let mut with_extra = base.clone();
        // A non-float buffer (copied) and a float tensor only the base has (copied).
        with_extra.push(T {
            name: "model.position_ids".into(),
            dtype: Dtype::I64,
            shape: vec![2, 3],
            bytes: (0..6i64).flat_map(|v| v.to_le_bytes()).collect(),
        });
        with_extra.push(T::float(
            "model.rotary.inv_freq",
            Dtype::F32,
            &[5],
            &[1.0, 0.5, 0.25, 0.125, 0.0625],
        ));
        write_model(
            &dir.path().join("base"),
            &with_extra,
            shards,
            Some(cfg.clone()),
        );
        for t in 0..tasks {
            let mut model = Vec::new();
            let mut grads = Vec::new();
            for (j, (name, shape)) in SHAPES.iter().enumerate() {
                let v: Vec<f32> = base_vals[j]
                    .iter()
                    .map(|b| {
                        let d = if grid {
                            (rng.below(9) as f32 - 4.0) * 0.125
                        } else {
                            rng.f() * rng.f() * 0.02
                        };
                        b + d
                    })
                    .collect();
                model.push(T::float(name, dtype, shape, &v));
                let g: Vec<f32> = (0..v.len())
                    .map(|_| {
                        if grid {
                            rng.below(4) as f32
                        } else {
                            rng.f().abs() * 3.0
                        }
                    })
                    .collect();
                grads.push(T::float(name, Dtype::F32, shape, &g));
            }
            // The task also carries the int buffer (copied from the base, not merged).
            model.push(with_extra[SHAPES.len()].clone());
            write_model(
                &dir.path().join(format!("task_{t}")),
                &model,
                shards,
                Some(cfg.clone()),
            );
            write_model(&dir.path().join(format!("grads_{t}")), &grads, 1, None);
        }
        Self { dir, tasks, dtype }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn load(&self) -> Loaded {
        let (base, order) = read_model(&self.path("base"));
        let models = (0..self.tasks)
            .map(|t| read_model(&self.path(&format!("task_{t}"))).0)
            .collect();
        let grads = (0..self.tasks)
            .map(|t| read_model(&self.path(&format!("grads_{t}"))).0)
            .collect();
        Loaded {
            base,
            order,
            models,
            grads,
        }
    }
}

pub struct Loaded {
    pub base: HashMap<String, T>,
    pub order: Vec<String>,
    pub models: Vec<HashMap<String, T>>,
    pub grads: Vec<HashMap<String, T>>,
}

/// Runs a recipe through the library into `out`.
pub fn run_recipe(
    dir: &Path,
    text: &str,
    out: &Path,
    threads: Option<usize>,
) -> stamerge::Result<stamerge::Report> {
    let path = dir.join("recipe.yml");
    std::fs::write(&path, text).unwrap();
    let recipe = stamerge::Recipe::from_file(&path).map_err(stamerge::Error::Plan)?;
    let opts = stamerge::Options {
        device: stamerge::Device::Cpu,
        threads,
        out_shard_size: 3000,
        overwrite: true,
        ..Default::default()
    };
    stamerge::merge(&recipe, out, &opts)
}

/// Asserts that every merged tensor equals the reference bit for bit, and copied ones the base.
pub fn assert_matches(
    out: &Path,
    expected: &HashMap<String, Vec<f32>>,
    l: &Loaded,
    out_dtype: Option<Dtype>,
) {
    let (got, _) = read_model(out);
    assert_eq!(got.len(), l.base.len(), "output has every base tensor");
    for (name, b) in &l.base {
        let g = &got[name];
        assert_eq!(g.shape, b.shape, "{name}");
        match expected.get(name) {
            Some(v) => {
                let dt = out_dtype.unwrap_or(b.dtype);
                assert_eq!(g.dtype, dt, "{name}");
                let want = encode(dt, v);
                if g.bytes != want {
                    let gv = g.values();
                    let i = (0..v.len())
                        .find(|&i| encode(dt, &v[i..i + 1]) != encode(dt, &gv[i..i + 1]))
                        .unwrap();
                    panic!("{name}: element {i}: got {} want {}", gv[i], v[i]);
                }
            }
            None => assert_eq!(g.bytes, b.bytes, "copied tensor {name}"),
        }
    }
}
