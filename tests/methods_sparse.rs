//! breadcrumbs, della, sce, ram/ramplus_tl and DARE's L1 rescale against references restated
//! here from docs/SEMANTICS.md ("Sparsifying methods") with plain loops and sorts: fp32/fp16/bf16,
//! single and sharded checkpoints, odd sizes (1, 31, 4097, 3 × 1000), values on a coarse grid (heavy
//! ties), and the edge cases of each rule (d ± ε at its bounds, γ·n + d·n > n, zero task vectors).

// Numeric loops index several parallel arrays at once, as the formulas do.
#![allow(clippy::needless_range_loop)]

mod common;

use std::collections::HashMap;

use common::scenario::{assert_matches, run_recipe, Loaded, Scenario};
use common::*;
use safetensors::Dtype;

const DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];

// ---------------------------------------------------------------------------------------------
// The reference.

fn fmix(mut z: u64) -> u64 {
    z ^= z >> 30;
    z = z.wrapping_mul(0xbf58476d1ce4e5b9);
    z ^= z >> 27;
    z = z.wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// The counter-based draw of element `i` of tensor `name` for task `task` (docs/SEMANTICS.md,
/// "DARE keep decision"): its top 32 bits.
fn draw(seed: u64, task: usize, name: &str, i: u64) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    let stream = fmix(fmix(seed ^ fmix(task as u64 + 1)) ^ h);
    fmix(stream.wrapping_add((i + 1).wrapping_mul(0x9E3779B97F4A7C15))) >> 32
}

/// Indices by |τ| descending, the lower index first among equals.
fn order_desc(a: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..a.len()).collect();
    idx.sort_by(|&x, &y| a[y].partial_cmp(&a[x]).unwrap().then(x.cmp(&y)));
    idx
}

#[derive(Clone, Copy, Debug)]
struct Task {
    weight: f32,
    density: f64,
    gamma: f64,
    epsilon: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum M {
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
    Sce,
    Ram,
    RamPlus,
}

impl M {
    fn name(self) -> &'static str {
        match self {
            M::Breadcrumbs => "breadcrumbs",
            M::BreadcrumbsTies => "breadcrumbs_ties",
            M::Della => "della",
            M::DellaLinear => "della_linear",
            M::Sce => "sce",
            M::Ram => "ram",
            M::RamPlus => "ramplus_tl",
        }
    }
    fn ties(self) -> bool {
        matches!(self, M::BreadcrumbsTies | M::Della)
    }
}

#[derive(Clone, Debug)]
struct Cfg {
    method: M,
    tasks: Vec<Task>,
    lambda: f32,
    normalize: bool,
    rescale: bool,
    seed: u64,
    select_topk: f64,
    epsilon: f32,
    r: f32,
    alpha: f32,
}

/// Breadcrumbs' mask: of the entries by |τ| descending, skip `drop`, keep `keep`.
fn band_mask(tau: &[f32], d: f64, gamma: f64) -> Vec<bool> {
    let n = tau.len();
    if d >= 1.0 {
        return vec![true; n];
    }
    let keep = (d * n as f64) as usize;
    let top = (gamma * n as f64) as usize;
    let bottom = n.saturating_sub(keep + top);
    let abs: Vec<f32> = tau.iter().map(|x| x.abs()).collect();
    let order = order_desc(&abs);
    let mut m = vec![false; n];
    for &i in &order[n - bottom - keep..n - bottom] {
        m[i] = true;
    }
    m
}

/// DELLA's mask: along dimension 1 (a 1-D tensor is one row), rank r ascending by |τ| (the
/// higher index first among equals), probability (d − ε) + r/(len − 1) · 2ε in f32.
fn della_mask(cfg: &Cfg, t: usize, name: &str, shape: &[usize], tau: &[f32]) -> Vec<bool> {
    let d = cfg.tasks[t].density;
    let n = tau.len();
    if d >= 1.0 {
        return vec![true; n];
    }
    let eps = cfg.tasks[t].epsilon;
    let (lo, e) = ((d - eps) as f32, eps as f32);
    let (len, stride) = match shape {
        [n] => (*n, 1),
        [_, l, rest @ ..] => (*l, rest.iter().product()),
        [] => (1, 1),
    };
    let mut m = vec![false; n];
    for a in 0..n / (len * stride) {
        for r in 0..stride {
            let at = |j: usize| (a * len + j) * stride + r;
            let mut js: Vec<usize> = (0..len).collect();
            js.sort_by(|&x, &y| {
                tau[at(x)]
                    .abs()
                    .partial_cmp(&tau[at(y)].abs())
                    .unwrap()
                    .then(y.cmp(&x))
            });
            for (rank, &j) in js.iter().enumerate() {
                let norm = if len == 1 {
                    0.5f32
                } else {
                    ((rank + 1) as f32 - 1.0) / (len as f32 - 1.0)
                };
                let p = norm * 2.0 * e + lo;
                let th = (p as f64 * 4294967296.0).floor() as u64;
                m[at(j)] = draw(cfg.seed, t, name, at(j) as u64) < th;
            }
        }
    }
    m
}

fn values(l: &Loaded, name: &str) -> (Vec<f32>, Vec<Vec<f32>>) {
    let b = l.base[name].values();
    let th = l.models.iter().map(|m| m[name].values()).collect();
    (b, th)
}

/// Expected output values (before narrowing) of every merged tensor.
fn reference(cfg: &Cfg, l: &Loaded) -> HashMap<String, Vec<f32>> {
    let nt = cfg.tasks.len();
    let mut out = HashMap::new();
    for (name, bt) in &l.base {
        if !l.models[0].contains_key(name) || bt.dtype == Dtype::I64 {
            continue;
        }
        let (b, th) = values(l, name);
        let n = b.len();
        let tau: Vec<Vec<f32>> = (0..nt)
            .map(|t| (0..n).map(|i| th[t][i] - b[i]).collect())
            .collect();
        let res = match cfg.method {
            M::Sce => sce(cfg, &b, &tau),
            M::Ram | M::RamPlus => ram(cfg, &b, &tau),
            _ => {
                let masks: Vec<Vec<bool>> = (0..nt)
                    .map(|t| match cfg.method {
                        M::Della | M::DellaLinear => della_mask(cfg, t, name, &bt.shape, &tau[t]),
                        _ => band_mask(&tau[t], cfg.tasks[t].density, cfg.tasks[t].gamma),
                    })
                    .collect();
                task_arithmetic(cfg, &b, &tau, &masks)
            }
        };
        out.insert(name.clone(), res);
    }
    out
}

/// The masked task vectors fused (linear or TIES), with mergekit's L1 rescale when asked.
fn task_arithmetic(cfg: &Cfg, b: &[f32], tau: &[Vec<f32>], masks: &[Vec<bool>]) -> Vec<f32> {
    let nt = tau.len();
    let n = b.len();
    let scale: Vec<Option<f32>> = (0..nt)
        .map(|t| {
            if !cfg.rescale || cfg.tasks[t].density >= 1.0 {
                return None;
            }
            let abs: Vec<f32> = tau[t].iter().map(|x| x.abs()).collect();
            let kept: Vec<f32> = (0..n)
                .map(|i| if masks[t][i] { abs[i] } else { 0.0 })
                .collect();
            let (before, after) = (det_sum(&abs) as f32, det_sum(&kept) as f32);
            (before >= 1e-7 && after >= 1e-7).then(|| before / after)
        })
        .collect();
    (0..n)
        .map(|i| {
            let u: Vec<Option<f32>> = (0..nt)
                .map(|t| {
                    let q = match scale[t] {
                        Some(s) => tau[t][i] * s,
                        None => tau[t][i],
                    };
                    masks[t][i].then(|| cfg.tasks[t].weight * q)
                })
                .collect();
            let mixed = if cfg.method.ties() {
                let s: f32 = u.iter().flatten().fold(0.0, |a, x| a + x);
                let (mut mixed, mut div) = (0f32, 0f32);
                for t in 0..nt {
                    if let Some(x) = u[t] {
                        if (x > 0.0 && s >= 0.0) || (x < 0.0 && s < 0.0) {
                            mixed += x;
                            div += cfg.tasks[t].weight;
                        }
                    }
                }
                if cfg.normalize {
                    mixed / if div == 0.0 { 1.0 } else { div }
                } else {
                    mixed
                }
            } else {
                let acc: f32 = u.iter().flatten().fold(0.0, |a, x| a + x);
                if cfg.normalize {
                    let d: f32 = cfg.tasks.iter().fold(0.0, |a, t| a + t.weight);
                    acc / if d.abs() < 1e-8 { 1.0 } else { d }
                } else {
                    acc
                }
            };
            b[i] + cfg.lambda * mixed
        })
        .collect()
}

fn sce(cfg: &Cfg, b: &[f32], tau: &[Vec<f32>]) -> Vec<f32> {
    let nt = tau.len();
    let n = b.len();
    let mut keep = vec![true; n];
    if cfg.select_topk < 1.0 {
        let var: Vec<f32> = (0..n)
            .map(|i| {
                let mean = tau.iter().map(|x| x[i] as f64).sum::<f64>() / nt as f64;
                let sq: f64 = tau.iter().map(|x| (x[i] as f64 - mean).powi(2)).sum();
                (sq / nt as f64) as f32
            })
            .collect();
        let nonzero = var.iter().filter(|v| **v != 0.0).count();
        let k = ((nonzero as f32 * cfg.select_topk as f32) as usize).min(n);
        keep = vec![false; n];
        for &i in &order_desc(&var)[..k] {
            keep[i] = true;
        }
    }
    let tp: Vec<Vec<f32>> = tau
        .iter()
        .map(|x| (0..n).map(|i| x[i] * keep[i] as u8 as f32).collect())
        .collect();
    let energy: Vec<f32> = tp
        .iter()
        .map(|x| {
            let sq: Vec<f32> = x.iter().map(|v| v * v).collect();
            (det_sum(&sq) / n as f64) as f32
        })
        .collect();
    let total = energy.iter().fold(0f32, |a, e| a + e);
    let w: Vec<f32> = if (total as f64).abs() < 1e-6 {
        vec![1.0 / nt as f32; nt]
    } else {
        energy.iter().map(|e| e / total).collect()
    };
    (0..n)
        .map(|i| {
            let s: f32 = tp.iter().fold(0.0, |a, x| a + x[i]);
            let (mut num, mut den) = (0f32, 0f32);
            for t in 0..nt {
                let x = tp[t][i];
                if (x > 0.0 && s >= 0.0) || (x < 0.0 && s < 0.0) {
                    num += x * w[t];
                    den += w[t];
                }
            }
            b[i] + num / den.max(1e-6)
        })
        .collect()
}

fn ram(cfg: &Cfg, b: &[f32], tau: &[Vec<f32>]) -> Vec<f32> {
    let nt = tau.len();
    let n = b.len();
    let changed = |t: usize, i: usize| tau[t][i].abs() > cfg.epsilon;
    let count = |i: usize| (0..nt).filter(|&t| changed(t, i)).count();
    let lambda: Vec<f32> = (0..nt)
        .map(|t| {
            if cfg.method != M::RamPlus {
                return 1.0;
            }
            let alone = (0..n).filter(|&i| changed(t, i) && count(i) == 1).count();
            let shared = (0..n).filter(|&i| changed(t, i) && count(i) > 1).count();
            let rho = shared as f32 / (alone as f32).max(cfg.epsilon);
            1.0 + cfg.r * rho.max(0.0).min(cfg.alpha)
        })
        .collect();
    (0..n)
        .map(|i| {
            let c = count(i);
            let mut merged = 0f32;
            for t in 0..nt {
                if !changed(t, i) {
                    continue;
                }
                merged += match c {
                    1 => tau[t][i] * lambda[t],
                    _ => tau[t][i] / c as f32,
                };
            }
            b[i] + merged
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Running stamerge on a scenario.

fn recipe_text(cfg: &Cfg, global: &str) -> String {
    let mut y = format!(
        "merge_method: {}\nbase_model: base\nparameters:\n{global}models:\n",
        cfg.method.name()
    );
    for (t, task) in cfg.tasks.iter().enumerate() {
        y += &format!("  - model: task_{t}\n");
        match cfg.method {
            M::Sce | M::Ram | M::RamPlus => {}
            M::Breadcrumbs | M::BreadcrumbsTies => {
                y += &format!(
                    "    parameters:\n      weight: {}\n      density: {}\n      gamma: {}\n",
                    task.weight, task.density, task.gamma
                )
            }
            M::Della | M::DellaLinear => {
                y += &format!(
                    "    parameters:\n      weight: {}\n      density: {}\n      epsilon: {}\n",
                    task.weight, task.density, task.epsilon
                )
            }
        }
    }
    y
}

fn check(s: &Scenario, cfg: &Cfg, global: &str) -> stamerge::Report {
    let text = recipe_text(cfg, global);
    let expected = reference(cfg, &s.load());
    let out = s.path("out");
    let rep = run_recipe(s.dir.path(), &text, &out, None).unwrap_or_else(|e| panic!("{text}\n{e}"));
    assert_matches(&out, &expected, &s.load(), None);
    rep
}

fn tasks(ds: [f64; 3], gammas: [f64; 3], eps: [f64; 3]) -> Vec<Task> {
    (0..3)
        .map(|t| Task {
            weight: [1.0, 0.5, 0.75][t],
            density: ds[t],
            gamma: gammas[t],
            epsilon: eps[t],
        })
        .collect()
}

fn cfg(method: M, tasks: Vec<Task>) -> Cfg {
    Cfg {
        method,
        tasks,
        lambda: 1.0,
        normalize: method == M::Della,
        rescale: matches!(method, M::Della | M::DellaLinear),
        seed: 0,
        select_topk: 1.0,
        epsilon: 1e-5,
        r: 0.1,
        alpha: 0.2,
    }
}

/// Each dtype, single files with random values and three shards with grid values (ties).
fn scenarios(seed: u64) -> impl Iterator<Item = Scenario> {
    DTYPES.into_iter().flat_map(move |dt| {
        [(1, false), (3, true)]
            .into_iter()
            .map(move |(shards, grid)| Scenario::new(dt, 3, shards, grid, seed + shards as u64))
    })
}

#[test]
fn breadcrumbs_matches_reference() {
    for s in scenarios(40) {
        // mergekit's default γ, a γ·n + d·n > n case (task 1), and γ = 0 (task 2: top-k without
        // max(1, …), so the 1-element tensor keeps nothing at d = 0.4).
        let ts = tasks([0.5, 0.9, 0.4], [0.01, 0.3, 0.0], [0.0; 3]);
        let mut c = cfg(M::Breadcrumbs, ts.clone());
        c.lambda = 0.9;
        check(&s, &c, "  lambda: 0.9\n");
        let mut c = cfg(M::BreadcrumbsTies, ts.clone());
        c.normalize = true;
        c.rescale = true;
        let rep = check(&s, &c, "  normalize: true\n  rescale: true\n");
        for tr in rep.tensors.iter().filter(|t| t.action == "merge") {
            let n: usize = tr.shape.iter().product();
            for (t, task) in tr.tasks.iter().enumerate() {
                assert_eq!(
                    task.kept as usize,
                    (ts[t].density * n as f64) as usize,
                    "{}",
                    tr.name
                );
            }
        }
    }
}

#[test]
fn della_matches_reference() {
    for s in scenarios(50) {
        // Task 1 sits next to the bounds: d − ε = 0.01, d + ε = 0.99.
        let ts = tasks([0.5, 0.5, 0.3], [0.0; 3], [0.15, 0.49, 0.1]);
        let c = cfg(M::Della, ts.clone());
        check(&s, &c, "  seed: 0\n");
        let mut c = cfg(M::DellaLinear, ts.clone());
        c.seed = 11;
        c.lambda = 0.7;
        check(&s, &c, "  seed: 11\n  lambda: 0.7\n");
        // The default epsilon (0.15) and no rescale.
        let mut c = cfg(M::DellaLinear, tasks([0.5; 3], [0.0; 3], [0.15; 3]));
        c.rescale = false;
        let text = recipe_text(&c, "  rescale: false\n").replace("      epsilon: 0.15\n", "");
        let expected = reference(&c, &s.load());
        run_recipe(s.dir.path(), &text, &s.path("out"), None).unwrap();
        assert_matches(&s.path("out"), &expected, &s.load(), None);
    }
}

#[test]
fn della_keeps_d_on_average_and_favours_large_entries() {
    // One 4097-entry row: the keep rate is d ± a few σ, and the larger half keeps more.
    let s = Scenario::new(Dtype::F32, 3, 1, false, 77);
    let c = cfg(M::DellaLinear, tasks([0.5; 3], [0.0; 3], [0.4; 3]));
    let l = s.load();
    let name = "model.layers.0.mlp.up_proj.weight";
    let (b, th) = values(&l, name);
    let tau: Vec<f32> = (0..b.len()).map(|i| th[0][i] - b[i]).collect();
    let m = della_mask(&c, 0, name, &[b.len()], &tau);
    let kept = m.iter().filter(|&&k| k).count() as f64;
    let n = b.len() as f64;
    assert!(
        (kept / n - 0.5).abs() < 5.0 * (0.25 / n).sqrt(),
        "kept {kept} of {n}"
    );
    let abs: Vec<f32> = tau.iter().map(|x| x.abs()).collect();
    let order = order_desc(&abs);
    let big = order[..order.len() / 2].iter().filter(|&&i| m[i]).count() as f64;
    let small = order[order.len() / 2..].iter().filter(|&&i| m[i]).count() as f64;
    // Expected 0.7 vs 0.3 of 2048.
    assert!(
        big > small + 600.0,
        "large half kept {big}, small half {small}"
    );
    // And stamerge's report agrees with the reference's count.
    let rep = check(&s, &c, "");
    let tr = rep.tensors.iter().find(|t| t.name == name).unwrap();
    assert_eq!(tr.tasks[0].kept as f64, kept);
}

#[test]
fn dare_l1_rescale_matches_reference() {
    // Breadcrumbs with rescale: the L1 ratio after a deterministic mask (the DARE case is in
    // tests/methods.rs); d = 1 keeps all and is not rescaled.
    for s in scenarios(60) {
        let ts = tasks([0.3, 1.0, 0.7], [0.05, 0.05, 0.0], [0.0; 3]);
        let mut c = cfg(M::Breadcrumbs, ts);
        c.rescale = true;
        check(&s, &c, "  rescale: true\n  rescale_norm: l1\n");
    }
}

#[test]
fn sce_matches_reference() {
    for s in scenarios(70) {
        let ts = tasks([1.0; 3], [0.0; 3], [0.0; 3]);
        let c = cfg(M::Sce, ts.clone());
        check(&s, &c, "  int8_mask: true\n");
        for topk in [0.5, 0.1] {
            let mut c = cfg(M::Sce, ts.clone());
            c.select_topk = topk;
            check(&s, &c, &format!("  select_topk: {topk}\n"));
        }
    }
}

#[test]
fn ram_and_ramplus_match_reference() {
    for s in scenarios(80) {
        let ts = tasks([1.0; 3], [0.0; 3], [0.0; 3]);
        // An epsilon that splits the random τ (|τ| < 0.02) into changed and unchanged entries.
        let mut c = cfg(M::Ram, ts.clone());
        c.epsilon = 0.003;
        check(&s, &c, "  epsilon: 0.003\n");
        let c = cfg(M::Ram, ts.clone());
        check(&s, &c, "");
        let mut c = cfg(M::RamPlus, ts.clone());
        c.epsilon = 0.004;
        c.r = 0.5;
        c.alpha = 0.7;
        check(&s, &c, "  epsilon: 0.004\n  r: 0.5\n  alpha: 0.7\n");
    }
}

/// Rewrites task `t` with the base's values of its tensors: τ = 0 everywhere.
fn zero_task(s: &Scenario, t: usize) {
    let dir = s.path(&format!("task_{t}"));
    let (base, _) = read_model(&s.path("base"));
    let (task, order) = read_model(&dir);
    let tensors: Vec<T> = order.iter().map(|n| base[n].clone()).collect();
    assert_eq!(tensors.len(), task.len());
    let cfg = std::fs::read(dir.join("config.json")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    write_model(&dir, &tensors, 1, serde_json::from_slice(&cfg).ok());
}

fn zero_task_scenario(dt: Dtype) -> Scenario {
    let s = Scenario::new(dt, 3, 1, false, 90);
    zero_task(&s, 1);
    s
}

#[test]
fn zero_task_vectors_add_nothing() {
    for dt in DTYPES {
        let s = zero_task_scenario(dt);
        let ts = tasks([0.5, 0.5, 0.3], [0.01; 3], [0.2; 3]);
        for m in [M::Della, M::BreadcrumbsTies, M::Sce, M::Ram, M::RamPlus] {
            let mut c = cfg(m, ts.clone());
            let mut global = String::new();
            if m == M::Sce {
                c.select_topk = 0.5;
                global = "  select_topk: 0.5\n".into();
            }
            if m == M::BreadcrumbsTies {
                c.rescale = true;
                global = "  rescale: true\n".into();
            }
            check(&s, &c, &global);
        }
    }
    // Every task vector zero: sce's weights fall back to 1/T, ram keeps the base.
    let s = Scenario::new(Dtype::F32, 2, 1, false, 91);
    zero_task(&s, 0);
    zero_task(&s, 1);
    for m in [M::Sce, M::Ram, M::Della] {
        let mut c = cfg(m, tasks([0.5; 3], [0.0; 3], [0.1; 3]));
        c.tasks.truncate(2);
        c.select_topk = 0.3;
        let global = if m == M::Sce {
            "  select_topk: 0.3\n"
        } else {
            ""
        };
        check(&s, &c, global);
        let (got, _) = read_model(&s.path("out"));
        let l = s.load();
        for (name, b) in &l.base {
            assert_eq!(got[name].bytes, b.bytes, "{}: {name} is the base", m.name());
        }
    }
}

#[test]
fn one_thread_and_many_give_the_same_bytes() {
    let s = Scenario::new(Dtype::BF16, 3, 1, false, 99);
    let ts = tasks([0.5, 0.4, 0.3], [0.02; 3], [0.2; 3]);
    for m in [M::Della, M::Breadcrumbs, M::Sce, M::RamPlus] {
        let text = recipe_text(
            &cfg(m, ts.clone()),
            if m == M::Sce {
                "  select_topk: 0.4\n"
            } else {
                ""
            },
        );
        run_recipe(s.dir.path(), &text, &s.path("one"), Some(1)).unwrap();
        run_recipe(s.dir.path(), &text, &s.path("many"), Some(4)).unwrap();
        let tensors = |d: &str| -> Vec<Vec<u8>> {
            tree_bytes(&s.path(d))
                .into_iter()
                .filter(|(p, _)| p.extension().is_some_and(|e| e == "safetensors"))
                .map(|(_, b)| b)
                .collect()
        };
        assert_eq!(tensors("one"), tensors("many"), "{}", m.name());
    }
}

// ---------------------------------------------------------------------------------------------
// Recipe checks, the plan's printout, and the CUDA refusal.

fn parse(text: &str) -> Result<stamerge::Recipe, Vec<String>> {
    stamerge::Recipe::parse(text, std::path::Path::new("."))
        .map_err(|ps| ps.into_iter().map(|p| p.to_string()).collect())
}

#[test]
fn della_bounds_are_recipe_errors_naming_each_field() {
    let text = "merge_method: della\nbase_model: b\nparameters:\n  epsilon: 0.2\nmodels:\n  \
                - model: m0\n    parameters:\n      density: 0.1\n  - model: m1\n    \
                parameters:\n      density: 0.9\n  - model: m2\n    parameters:\n      \
                density: 0.5\n";
    let ps = parse(text).unwrap_err();
    assert_eq!(ps.len(), 2, "{ps:?}");
    assert!(
        ps[0].contains("`models[0].parameters.density` (line 8)")
            && ps[0].contains("`parameters.epsilon` (line 4)")
            && ps[0].contains("(0, 1)"),
        "{ps:?}"
    );
    assert!(
        ps[1].contains("`models[1].parameters.density` (line 11)"),
        "{ps:?}"
    );
    // The default epsilon (0.15), a per-layer density that leaves the bounds at its last layer,
    // and density 1 (nothing dropped, any epsilon).
    let text = "merge_method: della_linear\nbase_model: b\nmodels:\n  - model: m0\n    \
                parameters:\n      density: [0.5, 0.9]\n  - model: m1\n    parameters:\n      \
                density: 1.0\n      epsilon: 0.9\n";
    let ps = parse(text).unwrap_err();
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert!(
        ps[0].contains("`models[0].parameters.density` (line 6)")
            && ps[0].contains("the default epsilon"),
        "{ps:?}"
    );
    assert!(parse(
        "merge_method: della\nbase_model: b\nparameters:\n  density: 0.5\n  epsilon: 0.49\n\
         models:\n  - model: m0\n"
    )
    .is_ok());
}

#[test]
fn bad_parameters_are_reported_together() {
    let text = "merge_method: breadcrumbs\nbase_model: b\nparameters:\n  gamma: 1.5\n  \
                density: 0\n  select_topk: 0.5\nmodels:\n  - model: m0\n    parameters:\n      \
                gamma: -0.1\n";
    let ps = parse(text).unwrap_err();
    assert!(ps.len() >= 3, "{ps:?}");
    assert!(ps
        .iter()
        .any(|p| p.contains("`parameters.gamma` (line 4)") && p.contains("[0, 1]")));
    assert!(ps
        .iter()
        .any(|p| p.contains("`parameters.density` (line 5)")));
    assert!(ps
        .iter()
        .any(|p| p.contains("`models[0].parameters.gamma` (line 10)")));
    let ps = parse(
        "merge_method: sce\nbase_model: b\nparameters:\n  select_topk: 2\nmodels:\n  - model: m0\n",
    )
    .unwrap_err();
    assert!(
        ps[0].contains("`parameters.select_topk` (line 4)"),
        "{ps:?}"
    );
    // ram's epsilon is shared, della's per model: each method reads its own row.
    let ps = parse(
        "merge_method: ram\nbase_model: b\nmodels:\n  - model: m0\n    parameters:\n      \
         epsilon: 0.1\n",
    )
    .unwrap_err();
    assert!(ps[0].contains("global parameter"), "{ps:?}");
    let r = parse(
        "merge_method: ram\nbase_model: b\nparameters:\n  epsilon: 0.1\nmodels:\n  - model: m0\n",
    )
    .unwrap();
    assert!(r.notes.is_empty(), "{:?}", r.notes);
}

#[test]
fn della_bounds_from_a_filter_are_plan_errors_naming_the_tensor() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 5);
    let text = "merge_method: della\nbase_model: base\nparameters:\n  density:\n    - filter: \
                up_proj\n      value: 0.05\n    - value: 0.5\nmodels:\n  - model: task_0\n  \
                - model: task_1\n";
    let e = run_recipe(s.dir.path(), text, &s.path("out"), None).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("tensor `model.layers.0.mlp.up_proj.weight`")
            && msg.contains("`parameters.density[0].value` (line 6)")
            && msg.contains("the default epsilon"),
        "{msg}"
    );
    // One problem, not one per task.
    assert_eq!(msg.matches("della keeps").count(), 1, "{msg}");
    assert!(!s.path("out").exists());
}

#[test]
fn plan_shows_each_model_s_resolved_parameters() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 6);
    let text = "merge_method: della\nbase_model: base\nparameters:\n  epsilon: 0.1\nmodels:\n  \
                - model: task_0\n    parameters:\n      density: 0.4\n  - model: task_1\n";
    std::fs::write(s.path("r.yml"), text).unwrap();
    let out = std::process::Command::new(stamerge_bin())
        .arg("plan")
        .arg(s.path("r.yml"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    // Each model's values (the default density 1 of task_1 too), and per tensor epsilon's.
    for want in [
        "density 0.4  epsilon 0.1",
        "density 1  epsilon 0.1",
        "epsilon=0.1,0.1",
    ] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
}

#[test]
fn cuda_refuses_methods_and_rescales_without_kernels_before_any_work() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 7);
    for (text, what) in [
        ("merge_method: della\nbase_model: base\nparameters:\n  density: 0.5\nmodels:\n  - model: task_0\n", "merge_method `della`"),
        ("merge_method: sce\nbase_model: base\nmodels:\n  - model: task_0\n", "merge_method `sce`"),
        ("merge_method: ties\nbase_model: base\nparameters:\n  density: 0.5\n  rescale: true\nmodels:\n  - model: task_0\n", "L1 rescale after a top-k mask"),
        ("merge_method: breadcrumbs\nbase_model: base\nparameters:\n  density: 0.5\n  rescale: true\nmodels:\n  - model: task_0\n", "breadcrumbs' band"),
    ] {
        std::fs::write(s.path("r.yml"), text).unwrap();
        let recipe = stamerge::Recipe::from_file(&s.path("r.yml")).unwrap();
        let opts = stamerge::Options {
            device: stamerge::Device::Cuda,
            ..Default::default()
        };
        let e = stamerge::merge(&recipe, &s.path("out"), &opts).unwrap_err().to_string();
        assert!(e.contains(what) && e.contains("no CUDA kernels"), "{e}");
        assert!(!s.path("out").exists());
        // auto merges it on the CPU.
        let opts = stamerge::Options {
            device: stamerge::Device::Auto,
            ..Default::default()
        };
        stamerge::merge(&recipe, &s.path("out"), &opts).unwrap();
        std::fs::remove_dir_all(s.path("out")).unwrap();
    }
    // DARE with either rescale (mergekit's L1, the default, or 1/d) and breadcrumbs (no rescale
    // by default, or 1/d) are not refused for want of kernels (with no GPU here the merge fails
    // for that instead; tests/gpu compares the bytes).
    for norm in ["", "  rescale_norm: l1\n", "  rescale_norm: inv_density\n"] {
        for method in [
            "dare_linear",
            "dare_ties",
            "breadcrumbs",
            "breadcrumbs_ties",
        ] {
            let norm = match (method.starts_with("breadcrumbs"), norm) {
                (true, "  rescale_norm: l1\n") => "",
                (true, "  rescale_norm: inv_density\n") => {
                    "  rescale: true\n  rescale_norm: inv_density\n"
                }
                _ => norm,
            };
            std::fs::write(
                s.path("r.yml"),
                format!("merge_method: {method}\nbase_model: base\nparameters:\n  density: 0.5\n{norm}models:\n  - model: task_0\n"),
            )
            .unwrap();
            let recipe = stamerge::Recipe::from_file(&s.path("r.yml")).unwrap();
            let plan = stamerge::plan(&recipe, None, &Default::default()).unwrap();
            assert_eq!(stamerge::cuda_lacks(&plan), None, "{method} {norm}");
            let opts = stamerge::Options {
                device: stamerge::Device::Cuda,
                ..Default::default()
            };
            if let Err(e) = stamerge::merge(&recipe, &s.path("out"), &opts) {
                assert!(!e.to_string().contains("no CUDA kernels yet"), "{e}");
            }
            let _ = std::fs::remove_dir_all(s.path("out"));
        }
    }
}

#[test]
fn sums_over_many_chunks_match_reference() {
    // 300 × 301 = 90 300 entries: the L1 and energy sums combine two 65 536-entry chunks, and
    // della ranks 300 rows of 301 (and a [2, 7, 5] tensor: rows along dimension 1, stride 5).
    let dir = tempfile::tempdir().unwrap();
    let shapes: [(&str, &[usize]); 2] = [
        ("model.layers.0.mlp.up_proj.weight", &[300, 301]),
        ("model.layers.0.conv.weight", &[2, 7, 5]),
    ];
    let mut rng = Rng(5);
    let mut base_vals = Vec::new();
    let base: Vec<T> = shapes
        .iter()
        .map(|(n, s)| {
            let v: Vec<f32> = (0..s.iter().product()).map(|_| rng.f() * 0.05).collect();
            base_vals.push(v.clone());
            T::float(n, Dtype::F32, s, &v)
        })
        .collect();
    let cfg_json = serde_json::json!({"model_type": "llama", "torch_dtype": "float32"});
    write_model(&dir.path().join("base"), &base, 1, Some(cfg_json.clone()));
    for t in 0..3 {
        let m: Vec<T> = shapes
            .iter()
            .zip(&base_vals)
            .map(|((n, s), b)| {
                let v: Vec<f32> = b.iter().map(|x| x + rng.f() * rng.f() * 0.02).collect();
                T::float(n, Dtype::F32, s, &v)
            })
            .collect();
        write_model(
            &dir.path().join(format!("task_{t}")),
            &m,
            1,
            Some(cfg_json.clone()),
        );
        // Scenario::load reads gradient folders too; these methods have none.
        write_model(&dir.path().join(format!("grads_{t}")), &m, 1, None);
    }
    let s = Scenario {
        dir,
        tasks: 3,
        dtype: Dtype::F32,
    };
    let ts = tasks([0.5, 0.4, 0.3], [0.02; 3], [0.2; 3]);
    check(&s, &cfg(M::Della, ts.clone()), "");
    check(&s, &cfg(M::DellaLinear, ts.clone()), "");
    let mut c = cfg(M::Sce, ts.clone());
    c.select_topk = 0.3;
    check(&s, &c, "  select_topk: 0.3\n");
    let mut c = cfg(M::BreadcrumbsTies, ts);
    c.rescale = true;
    check(&s, &c, "  rescale: true\n");
}
