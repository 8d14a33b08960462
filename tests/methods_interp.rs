//! The interpolating methods (linear, slerp, nuslerp, multislerp, karcher, model_stock,
//! nearswap, arcee_fusion) against references written here from docs/SEMANTICS.md
//! ("Interpolating methods"), bit for bit: plain loops, the deterministic dot product restated
//! lane by lane, a sort for arcee_fusion's quartiles. fp32/fp16/bf16, single and sharded
//! checkpoints, odd sizes, tensors of several reduction chunks, edge cases (colinear and
//! antipodal models, opposite task vectors, zero task vectors), the thread count, the recipe
//! errors and the CUDA refusal.

mod common;

use std::collections::HashMap;

use common::scenario::{assert_matches, run_recipe, Loaded, Scenario};
use common::*;
use safetensors::Dtype;
use stamerge::method::interp::{exp_f32, ln_f32};

// ------------------------------------------------------------------------------------------------
// The reference, restated from docs/SEMANTICS.md.

const CHUNK: usize = 65_536;
const LANES: usize = 256;

/// The deterministic dot product of two vectors: per chunk of 65 536, 256 f64 lanes (lane l
/// sums the products of elements l, l + 256, … in order), halved pairwise; chunks in order.
fn ddot(x: &[f32], y: &[f32]) -> f64 {
    let mut total = 0f64;
    for c in 0..x.len().div_ceil(CHUNK) {
        let mut lanes = [0f64; LANES];
        for j in c * CHUNK..((c + 1) * CHUNK).min(x.len()) {
            lanes[(j - c * CHUNK) % LANES] += x[j] as f64 * y[j] as f64;
        }
        let mut s = LANES / 2;
        while s > 0 {
            for l in 0..s {
                lanes[l] += lanes[l + s];
            }
            s /= 2;
        }
        total += lanes[0];
    }
    total
}

fn dsum(x: &[f32]) -> f64 {
    ddot(x, &vec![1.0; x.len()])
}

fn norm(x: &[f32]) -> f32 {
    ddot(x, x).sqrt() as f32
}

fn sub(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// The vectors of a tensor as index lists: whole, rows of the last dimension, or along the
/// first dimension.
#[derive(Clone, Copy)]
enum Layout {
    Whole,
    Rows,
    Columns,
}

fn vectors(shape: &[usize], l: Layout) -> Vec<Vec<usize>> {
    let n: usize = shape.iter().product();
    if shape.len() < 2 {
        return vec![(0..n).collect()];
    }
    match l {
        Layout::Whole => vec![(0..n).collect()],
        Layout::Rows => {
            let len = shape[shape.len() - 1];
            (0..n / len)
                .map(|r| (r * len..(r + 1) * len).collect())
                .collect()
        }
        Layout::Columns => {
            let stride = n / shape[0];
            (0..stride)
                .map(|c| (0..shape[0]).map(|j| c + j * stride).collect())
                .collect()
        }
    }
}

fn gather(x: &[f32], idx: &[usize]) -> Vec<f32> {
    idx.iter().map(|&i| x[i]).collect()
}

fn linear(xs: &[Vec<f32>], w: &[f32], normalize: bool) -> Vec<f32> {
    let div = w.iter().fold(0f32, |a, b| a + b);
    (0..xs[0].len())
        .map(|i| {
            let mut acc = 0f32;
            for (x, &wk) in xs.iter().zip(w) {
                acc += wk * x[i];
            }
            if normalize {
                acc / div
            } else {
                acc
            }
        })
        .collect()
}

fn slerp(a: &[f32], b: &[f32], t: f32) -> Vec<f32> {
    let na = norm(a);
    let nb = norm(b);
    let na = if na > 1e-8 { na as f64 } else { 1.0 };
    let nb = if nb > 1e-8 { nb as f64 } else { 1.0 };
    let cos = ((ddot(a, b) / (na * nb)) as f32).clamp(-1.0, 1.0);
    let (ca, cb) = if cos.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let th = (cos as f64).acos();
        let t = t as f64;
        (
            (((1.0 - t) * th).sin() / th.sin()) as f32,
            ((t * th).sin() / th.sin()) as f32,
        )
    };
    a.iter().zip(b).map(|(&x, &y)| ca * x + cb * y).collect()
}

fn nuslerp(
    x0: &[f32],
    x1: &[f32],
    base: Option<&[f32]>,
    (w0, w1): (f64, f64),
    shape: &[usize],
    l: Layout,
) -> Vec<f32> {
    let t = if (w0 + w1).abs() < 1e-6 {
        0.5
    } else {
        w1 / (w0 + w1)
    };
    let (v0, v1) = match base {
        Some(b) => (sub(x0, b), sub(x1, b)),
        None => (x0.to_vec(), x1.to_vec()),
    };
    let mut out = vec![0f32; x0.len()];
    for idx in vectors(shape, l) {
        let (a, b) = (gather(&v0, &idx), gather(&v1, &idx));
        let n0 = norm(&a).max(1e-7) as f64;
        let n1 = norm(&b).max(1e-7) as f64;
        let cos = ((ddot(&a, &b) / (n0 * n1)) as f32).clamp(-1.0, 1.0);
        for (j, &i) in idx.iter().enumerate() {
            out[i] = if 1.0 - cos * cos <= 1e-16 {
                ((1.0 - t) as f32) * a[j] + (t as f32) * b[j]
            } else {
                let th = (cos as f64).acos();
                let sa = ((1.0 - t) * th).sin() as f32;
                let sb = (t * th).sin() as f32;
                (sa * a[j] + sb * b[j]) / (th.sin() as f32)
            };
            if let Some(bb) = base {
                out[i] += bb[i];
            }
        }
    }
    out
}

fn multislerp(
    xs: &[Vec<f32>],
    base: Option<&[f32]>,
    w: &[f32],
    normalize: bool,
    eps: f32,
) -> Vec<f32> {
    if xs.len() == 1 {
        return xs[0].clone();
    }
    let v: Vec<Vec<f32>> = xs
        .iter()
        .map(|x| base.map_or(x.clone(), |b| sub(x, b)))
        .collect();
    let sum = w.iter().fold(0f32, |a, b| a + b);
    let w: Vec<f32> = w
        .iter()
        .map(|x| if normalize { x / sum } else { *x })
        .collect();
    let norms: Vec<f32> = v.iter().map(|x| norm(x)).collect();
    let u: Vec<Vec<f32>> = v
        .iter()
        .zip(&norms)
        .map(|(x, &n)| x.iter().map(|e| e / (n + eps)).collect())
        .collect();
    let n = xs[0].len();
    let mut mean = vec![0f32; n];
    for (uk, &wk) in u.iter().zip(&w) {
        for i in 0..n {
            mean[i] += uk[i] * wk;
        }
    }
    let mn = norm(&mean);
    let add_base = |r: f32, i: usize| base.map_or(r, |b| r + b[i]);
    if mn < eps {
        assert_eq!(xs.len(), 2, "the reference's fallback");
        return (0..n)
            .map(|i| add_base(v[0][i] * w[0] + v[1][i] * w[1], i))
            .collect();
    }
    mean.iter_mut().for_each(|m| *m /= mn);
    let dots: Vec<f32> = u.iter().map(|uk| ddot(uk, &mean) as f32).collect();
    let mut tan = vec![0f32; n];
    for k in 0..u.len() {
        for i in 0..n {
            tan[i] += (u[k][i] - dots[k] * mean[i]) * w[k];
        }
    }
    let tn = norm(&tan) + eps;
    let c = (tn as f64).cos() as f32;
    let q = ((tn as f64).sin() as f32) / tn;
    let avg = norms.iter().zip(&w).fold(0f32, |a, (n, w)| a + n * w);
    (0..n)
        .map(|i| add_base((mean[i] * c + tan[i] * q) * avg, i))
        .collect()
}

fn karcher(xs: &[Vec<f32>], max_iter: u32, tol: f64) -> Vec<f32> {
    if xs.len() == 1 {
        return xs[0].clone();
    }
    let n = xs[0].len();
    let norms: Vec<f32> = xs.iter().map(|x| norm(x)).collect();
    let alpha = 1.0 / xs.len() as f64;
    let valid: Vec<usize> = (0..xs.len()).filter(|&k| norms[k] as f64 > tol).collect();
    if valid.is_empty() {
        return vec![0.0; n];
    }
    let a: Vec<f32> = valid
        .iter()
        .map(|_| (alpha / (alpha * valid.len() as f64)) as f32)
        .collect();
    let u: Vec<Vec<f32>> = valid
        .iter()
        .map(|&k| xs[k].iter().map(|v| v / norms[k]).collect())
        .collect();
    let mut mean = vec![0f32; n];
    for (uk, &ak) in u.iter().zip(&a) {
        for i in 0..n {
            mean[i] += ak * uk[i];
        }
    }
    let mn = norm(&mean);
    if (mn as f64) < tol {
        mean = u[0].clone();
    } else {
        mean.iter_mut().for_each(|m| *m /= mn);
    }
    for _ in 0..max_iter {
        let mut tan = vec![0f32; n];
        for (uk, &ak) in u.iter().zip(&a) {
            let d = (ddot(&mean, uk) as f32).clamp(-1.0, 1.0);
            let th = (d as f64).acos() as f32;
            if (th as f64) < tol {
                continue;
            }
            let c = ak * (th / ((th as f64).sin() as f32));
            for i in 0..n {
                tan[i] += c * (uk[i] - d * mean[i]);
            }
        }
        let tn = norm(&tan);
        if (tn as f64) < tol {
            break;
        }
        let (c, s) = ((tn as f64).cos() as f32, (tn as f64).sin() as f32);
        for i in 0..n {
            mean[i] = c * mean[i] + s * (tan[i] / tn);
        }
        let un = norm(&mean);
        if un as f64 > tol {
            mean.iter_mut().for_each(|m| *m /= un);
        }
    }
    let scale = norms.iter().fold(0f32, |s, &nk| s + (alpha as f32) * nk);
    mean.iter().map(|m| scale * m).collect()
}

fn model_stock(base: &[f32], xs: &[Vec<f32>], shape: &[usize], l: Layout) -> Vec<f32> {
    let k = xs.len();
    let off: Vec<Vec<f32>> = xs.iter().map(|x| sub(x, base)).collect();
    let mut out = vec![0f32; base.len()];
    for idx in vectors(shape, l) {
        let o: Vec<Vec<f32>> = off.iter().map(|x| gather(x, &idx)).collect();
        let norms: Vec<f32> = o.iter().map(|x| norm(x)).collect();
        let mut sum = 0f32;
        let mut pairs = 0;
        for a in 0..k {
            for b in a + 1..k {
                let np = (norms[a] * norms[b]).max(1e-6);
                sum += ((ddot(&o[a], &o[b]) as f32) / np).clamp(-1.0, 1.0);
                pairs += 1;
            }
        }
        let cos = sum / pairs as f32;
        let den = 1.0 + (k - 1) as f32 * cos;
        let t = if den.abs() < 1e-6 {
            0.0
        } else {
            (k as f32 * cos) / den
        };
        for &i in &idx {
            let mut s = xs[0][i];
            for x in &xs[1..] {
                s += x[i];
            }
            out[i] = t * (s / k as f32) + (1.0 - t) * base[i];
        }
    }
    out
}

fn nearswap(a: &[f32], b: &[f32], t: f32) -> Vec<f32> {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| {
            let w = ((1.0 / (a - b).abs().max(1e-6)) * t).clamp(0.0, 1.0);
            w * b + (1.0 - w) * a
        })
        .collect()
}

fn softmax_eps(x: &[f32]) -> Vec<f32> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f32> = x.iter().map(|&v| exp_f32(v - m)).collect();
    let s = dsum(&e) as f32;
    e.iter().map(|v| v / s + 1e-8).collect()
}

fn arcee_fusion(b: &[f32], p: &[f32], shape: &[usize]) -> Vec<f32> {
    let mut imp = vec![0f32; b.len()];
    for idx in vectors(shape, Layout::Rows) {
        let (pr, br) = (gather(p, &idx), gather(b, &idx));
        let (sp, sq) = (softmax_eps(&pr), softmax_eps(&br));
        let terms: Vec<f32> = sp
            .iter()
            .zip(&sq)
            .map(|(&x, &y)| x * ln_f32(x / y))
            .collect();
        let kl = dsum(&terms) as f32;
        for &i in &idx {
            imp[i] = (p[i] - b[i]).abs() * kl;
        }
    }
    let mut sorted = imp.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    let q = |f: f64| sorted[(f * (sorted.len() - 1) as f64).floor() as usize];
    let th = q(0.5) + 1.5 * (q(0.75) - q(0.25));
    (0..b.len())
        .map(|i| b[i] + (p[i] - b[i]) * if imp[i] >= th { 1.0 } else { 0.0 })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Running recipes on random checkpoints.

/// Every merged tensor (those every input has) of a loaded scenario, by `f(name, shape,
/// base, models)`.
fn expect(
    l: &Loaded,
    f: impl Fn(&str, &[usize], &[f32], &[Vec<f32>]) -> Vec<f32>,
) -> HashMap<String, Vec<f32>> {
    l.base
        .iter()
        .filter(|(n, t)| {
            t.dtype != Dtype::I64 && l.models.iter().all(|m| m.contains_key(n.as_str()))
        })
        .map(|(n, t)| {
            let xs: Vec<Vec<f32>> = l.models.iter().map(|m| m[n].values()).collect();
            (n.clone(), f(n, &t.shape, &t.values(), &xs))
        })
        .collect()
}

fn models(n: usize, per: impl Fn(usize) -> String) -> String {
    (0..n)
        .map(|t| format!("  - model: task_{t}\n{}", per(t)))
        .collect()
}

const DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];

fn run(s: &Scenario, text: &str, expected: &HashMap<String, Vec<f32>>, l: &Loaded) {
    let out = s.path("out");
    run_recipe(s.dir.path(), text, &out, None).unwrap_or_else(|e| panic!("{text}\n{e}"));
    assert_matches(&out, expected, l, None);
}

#[test]
fn linear_with_and_without_a_base() {
    for (i, dt) in DTYPES.into_iter().enumerate() {
        let s = Scenario::new(dt, 3, 1 + 2 * (i % 2), false, 100 + i as u64);
        let l = s.load();
        let w = [1.0f32, 0.3, -0.5];
        // No base: the base folder is the first model (its weight 0.7), then the tasks.
        let text = format!(
            "merge_method: linear\nmodels:\n  - model: base\n    parameters: {{weight: 0.7}}\n{}",
            models(3, |t| format!("    parameters: {{weight: {}}}\n", w[t]))
        );
        let e = expect(&l, |_, _, b, xs| {
            let mut all = vec![b.to_vec()];
            all.extend(xs.iter().cloned());
            linear(&all, &[0.7, 1.0, 0.3, -0.5], true)
        });
        run(&s, &text, &e, &l);
        // A base named but not listed is the last input; normalize: false.
        let text = format!(
            "merge_method: linear\nbase_model: base\nparameters:\n  normalize: false\n  weight: 0.25\nmodels:\n{}",
            models(2, |t| format!("    parameters: {{weight: {}}}\n", w[t]))
        );
        let l2 = Loaded {
            models: l.models[..2].to_vec(),
            ..s.load()
        };
        let e = expect(&l2, |_, _, b, xs| {
            linear(
                &[xs[0].clone(), xs[1].clone(), b.to_vec()],
                &[1.0, 0.3, 0.25],
                false,
            )
        });
        run(&s, &text, &e, &l2);
    }
}

#[test]
fn slerp_and_nearswap_against_the_formulas() {
    for (i, dt) in DTYPES.into_iter().enumerate() {
        let s = Scenario::new(dt, 1, 2, i == 1, 200 + i as u64);
        let l = s.load();
        let text = "merge_method: slerp\nbase_model: base\nmodels:\n  - model: task_0\nparameters:\n  t:\n    - filter: mlp\n      value: [0.2, 0.9]\n    - value: 0.35\n";
        // Layer 0 of 2: t = 0 on the gradient's first entry; layer 1: its last.
        let e = expect(&l, |n, _, b, xs| {
            let t = if n.contains("mlp") {
                if n.contains("layers.1.") {
                    0.9
                } else {
                    0.2
                }
            } else {
                0.35
            };
            slerp(b, &xs[0], t)
        });
        run(&s, text, &e, &l);
        let text = "merge_method: nearswap\nbase_model: base\nmodels:\n  - model: task_0\nparameters:\n  t: 0.003\n";
        let e = expect(&l, |_, _, b, xs| nearswap(b, &xs[0], 0.003));
        run(&s, text, &e, &l);
    }
}

#[test]
fn nuslerp_flattened_by_rows_and_by_columns_with_and_without_a_base() {
    for (i, dt) in DTYPES.into_iter().enumerate() {
        let s = Scenario::new(dt, 2, 1 + i, false, 300 + i as u64);
        let l = s.load();
        for (flags, layout) in [
            ("{}", Layout::Whole),
            ("{nuslerp_flatten: false}", Layout::Rows),
            (
                "{nuslerp_flatten: false, nuslerp_row_wise: true}",
                Layout::Columns,
            ),
        ] {
            let text = format!(
                "merge_method: nuslerp\nbase_model: base\nparameters: {flags}\nmodels:\n  - model: task_0\n    parameters: {{weight: 0.4}}\n  - model: task_1\n    parameters: {{weight: 1.1}}\n"
            );
            let e = expect(&l, |_, shape, b, xs| {
                nuslerp(&xs[0], &xs[1], Some(b), (0.4, 1.1), shape, layout)
            });
            run(&s, &text, &e, &l);
        }
        // Without a base, the models themselves; weights that sum to 0 give t = 0.5.
        let text = "merge_method: nuslerp\nmodels:\n  - model: base\n    parameters: {weight: 2}\n  - model: task_1\n    parameters: {weight: -2}\n";
        let l2 = Loaded {
            models: vec![l.models[1].clone()],
            ..s.load()
        };
        let e = expect(&l2, |_, shape, b, xs| {
            nuslerp(b, &xs[0], None, (2.0, -2.0), shape, Layout::Whole)
        });
        run(&s, text, &e, &l2);
    }
}

#[test]
fn multislerp_karcher_and_model_stock_against_the_formulas() {
    for (i, dt) in DTYPES.into_iter().enumerate() {
        let s = Scenario::new(dt, 3, 1 + 2 * (i % 2), false, 400 + i as u64);
        let l = s.load();
        let w = [0.6f32, 1.3, 0.2];
        let text = format!(
            "merge_method: multislerp\nbase_model: base\nmodels:\n{}",
            models(3, |t| format!("    parameters: {{weight: {}}}\n", w[t]))
        );
        let e = expect(&l, |_, _, b, xs| multislerp(xs, Some(b), &w, true, 1e-8));
        run(&s, &text, &e, &l);
        // normalize_weights: false, no base: the models themselves.
        let text = format!(
            "merge_method: multislerp\nparameters: {{normalize_weights: false, eps: 1e-6}}\nmodels:\n  - model: base\n{}",
            models(2, |_| String::new())
        );
        let l2 = Loaded {
            models: l.models[..2].to_vec(),
            ..s.load()
        };
        let e = expect(&l2, |_, _, b, xs| {
            let mut all = vec![b.to_vec()];
            all.extend(xs.iter().cloned());
            multislerp(&all, None, &[1.0, 1.0, 1.0], false, 1e-6)
        });
        run(&s, &text, &e, &l2);
        // karcher: the base named but not listed is the last input.
        let text = format!(
            "merge_method: karcher\nbase_model: base\nparameters: {{max_iter: 7, tol: 1e-6}}\nmodels:\n{}",
            models(3, |_| String::new())
        );
        let e = expect(&l, |_, _, b, xs| {
            let mut all: Vec<Vec<f32>> = xs.to_vec();
            all.push(b.to_vec());
            karcher(&all, 7, 1e-6)
        });
        run(&s, &text, &e, &l);
        for (flag, layout) in [("false", Layout::Whole), ("true", Layout::Rows)] {
            let text = format!(
                "merge_method: model_stock\nbase_model: base\nparameters: {{filter_wise: {flag}}}\nmodels:\n{}",
                models(3, |_| String::new())
            );
            let e = expect(&l, |_, shape, b, xs| model_stock(b, xs, shape, layout));
            run(&s, &text, &e, &l);
        }
    }
}

#[test]
fn arcee_fusion_keeps_the_outlier_changes() {
    // Values on coarse grids (ties among the importances) and random ones.
    for (i, dt) in DTYPES.into_iter().enumerate() {
        for grid in [true, false] {
            let s = Scenario::new(dt, 1, 1 + i, grid, 500 + i as u64);
            let l = s.load();
            let text = "merge_method: arcee_fusion\nbase_model: base\nmodels:\n  - model: task_0\n";
            let e = expect(&l, |_, shape, b, xs| arcee_fusion(b, &xs[0], shape));
            // Not vacuous: in some tensor some entries take the model's value, most keep the
            // base's.
            let fused = e.iter().any(|(n, v)| {
                let b = l.base[n].values();
                let taken = v.iter().zip(&b).filter(|(x, y)| x != y).count();
                taken > 0 && taken < b.len() / 2
            });
            assert!(fused, "{dt:?} grid {grid}");
            run(&s, text, &e, &l);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Tensors of several reduction chunks, and the thread count.

fn big_set(dir: &std::path::Path, k: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
    let shapes: [(&str, &[usize]); 2] = [("a.weight", &[70_001]), ("b.weight", &[257, 301])];
    let mut rng = Rng(seed);
    let mut vals = Vec::new();
    for m in 0..=k {
        let tensors: Vec<T> = shapes
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.f() * 0.05 + 0.01).collect();
                T::float(name, Dtype::F32, shape, &v)
            })
            .collect();
        vals.push(tensors[0].values());
        let name = if m == 0 {
            "base".to_string()
        } else {
            format!("task_{}", m - 1)
        };
        write_model(&dir.join(name), &tensors, 2, None);
    }
    let base = vals.remove(0);
    (base, vals)
}

#[test]
fn reductions_over_several_chunks_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (b, xs) = big_set(d, 3, 9);
    let recipes = [
        ("multislerp", "merge_method: multislerp\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\n    parameters: {weight: 2}\n  - model: task_2\n"),
        ("karcher", "merge_method: karcher\nmodels:\n  - model: task_0\n  - model: task_1\n  - model: task_2\n"),
        ("model_stock", "merge_method: model_stock\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\n  - model: task_2\n"),
        ("slerp", "merge_method: slerp\nbase_model: base\nmodels:\n  - model: task_1\nparameters: {t: 0.7}\n"),
    ];
    for (m, text) in recipes {
        let want = match m {
            "multislerp" => multislerp(&xs, Some(&b), &[1.0, 2.0, 1.0], true, 1e-8),
            "karcher" => karcher(&xs, 10, 1e-5),
            "model_stock" => model_stock(&b, &xs, &[70_001], Layout::Whole),
            _ => slerp(&b, &xs[1], 0.7),
        };
        let mut outs = Vec::new();
        for threads in [1, 3] {
            let out = d.join(format!("out_{m}_{threads}"));
            run_recipe(d, text, &out, Some(threads)).unwrap_or_else(|e| panic!("{m}: {e}"));
            let (got, _) = read_model(&out);
            assert_eq!(
                got["a.weight"].bytes,
                encode(Dtype::F32, &want),
                "{m}, {threads} thread(s)"
            );
            outs.push(tree_bytes(&out));
        }
        let strip = |v: &Vec<(std::path::PathBuf, Vec<u8>)>| {
            v.iter()
                .filter(|(p, _)| p.extension().is_some_and(|e| e == "safetensors"))
                .map(|(p, b)| (p.file_name().unwrap().to_owned(), b.clone()))
                .collect::<Vec<_>>()
        };
        let (a, b) = (strip(&outs[0]), strip(&outs[1]));
        assert!(
            !a.is_empty() && a == b,
            "{m}: the output depends on the thread count"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Edge cases.

fn write_pair(dir: &std::path::Path, name: &str, v: &[f32]) {
    write_model(
        &dir.join(name),
        &[T::float("w.weight", Dtype::F32, &[v.len()], v)],
        1,
        None,
    );
}

fn merged(dir: &std::path::Path, text: &str) -> Vec<f32> {
    let out = dir.join("out");
    run_recipe(dir, text, &out, None).unwrap_or_else(|e| panic!("{text}\n{e}"));
    read_model(&out).0["w.weight"].values()
}

#[test]
fn colinear_antipodal_and_zero_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x: Vec<f32> = (0..1001).map(|i| ((i % 17) as f32 - 8.0) * 0.125).collect();
    let twice: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
    let minus: Vec<f32> = x.iter().map(|v| -v).collect();
    write_pair(d, "base", &x);
    let slerp_recipe =
        "merge_method: slerp\nbase_model: base\nmodels:\n  - model: m\nparameters: {t: 0.25}\n";
    for other in [&twice, &minus] {
        // Colinear and antipodal: |cos| = 1, the linear interpolation.
        write_pair(d, "m", other);
        let want: Vec<f32> = x
            .iter()
            .zip(other.iter())
            .map(|(a, b)| 0.75 * a + 0.25 * b)
            .collect();
        assert_eq!(merged(d, slerp_recipe), want);
        assert_eq!(merged(d, slerp_recipe), slerp(&x, other, 0.25));
    }
    // nuslerp of two colinear task vectors: (1 − t)·v0 + t·v1 added to the base.
    let y: Vec<f32> = x.iter().map(|v| v * 0.5 + 1.0).collect();
    write_pair(d, "base", &y);
    write_pair(d, "m", &x.iter().map(|v| 1.0 + v).collect::<Vec<_>>());
    write_pair(
        d,
        "m2",
        &x.iter().map(|v| 1.0 + 3.0 * v).collect::<Vec<_>>(),
    );
    let text = "merge_method: nuslerp\nbase_model: base\nmodels:\n  - model: m\n  - model: m2\n";
    let got = merged(d, text);
    let bm = (
        read_model(&d.join("m")).0["w.weight"].values(),
        read_model(&d.join("m2")).0["w.weight"].values(),
    );
    assert_eq!(
        got,
        nuslerp(&bm.0, &bm.1, Some(&y), (1.0, 1.0), &[1001], Layout::Whole)
    );
    // Zero task vectors: the models equal the base.
    write_pair(d, "m", &y);
    write_pair(d, "m2", &y);
    write_pair(d, "m3", &y);
    // nuslerp: both task vectors 0 → cos 0 (norms clamped), the result is the base.
    assert_eq!(merged(d, text), y);
    // multislerp of two zero task vectors: the mean is 0, the weighted sum (0) is added back.
    let text = "merge_method: multislerp\nbase_model: base\nmodels:\n  - model: m\n  - model: m2\n";
    assert_eq!(merged(d, text), y);
    // … of three: refused, naming the tensor and what to change.
    let text3 = format!("{text}  - model: m3\n");
    let e = run_recipe(d, &text3, &d.join("out3"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("w.weight") && e.contains("weights cancel"),
        "{e}"
    );
    assert!(!d.join("out3").exists());
    // model_stock: zero task vectors give cos 0, t = 0: the base.
    let text =
        "merge_method: model_stock\nbase_model: base\nmodels:\n  - model: m\n  - model: m2\n";
    assert_eq!(merged(d, text), y);
    // arcee_fusion: no change anywhere, the base.
    let text = "merge_method: arcee_fusion\nbase_model: base\nmodels:\n  - model: m\n";
    assert_eq!(merged(d, text), y);
    // karcher of zero vectors: zeros.
    write_pair(d, "z", &vec![0.0; 1001]);
    write_pair(d, "z2", &vec![0.0; 1001]);
    let text = "merge_method: karcher\nmodels:\n  - model: z\n  - model: z2\n";
    assert_eq!(merged(d, text), vec![0.0; 1001]);
}

#[test]
fn model_stock_keeps_the_base_where_the_task_vectors_cancel() {
    // Opposite task vectors: cos = −1, |1 + (N − 1)·cos| = 0 for N = 2: t = 0, the base.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b: Vec<f32> = (0..513).map(|i| (i as f32 * 0.37).sin()).collect();
    let tau: Vec<f32> = (0..513)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.0625)
        .collect();
    write_pair(d, "base", &b);
    write_pair(
        d,
        "m",
        &b.iter().zip(&tau).map(|(x, t)| x + t).collect::<Vec<_>>(),
    );
    write_pair(
        d,
        "m2",
        &b.iter().zip(&tau).map(|(x, t)| x - t).collect::<Vec<_>>(),
    );
    let text =
        "merge_method: model_stock\nbase_model: base\nmodels:\n  - model: m\n  - model: m2\n";
    assert_eq!(merged(d, text), b);
    // Nearly opposite (|den| just above 1e-6 is not special): matches the formula.
    let m: Vec<f32> = read_model(&d.join("m")).0["w.weight"].values();
    let mut m2: Vec<f32> = read_model(&d.join("m2")).0["w.weight"].values();
    m2[3] += 0.25;
    write_pair(d, "m2", &m2);
    assert_eq!(
        merged(d, text),
        model_stock(&b, &[m, m2], &[513], Layout::Whole)
    );
}

// ------------------------------------------------------------------------------------------------
// Recipe errors, the plan's printout and the device check.

#[test]
fn bad_parameters_and_input_counts_are_errors_from_the_recipe_naming_their_lines() {
    let s = Scenario::new(Dtype::F32, 3, 1, false, 1);
    let d = s.dir.path();
    let fail = |text: &str| -> String {
        let p = d.join("bad.yml");
        std::fs::write(&p, text).unwrap();
        let e = stamerge::Recipe::from_file(&p).unwrap_err();
        e.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    // slerp with three models and t outside [0, 1]: both at once, with their lines.
    let e = fail("merge_method: slerp\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\n  - model: task_2\nparameters:\n  t: [0.5, 1.5]\n");
    assert!(
        e.contains("`parameters.t[1]` (line 8)") && e.contains("must be in [0, 1]"),
        "{e}"
    );
    assert!(
        e.contains("`models` (line")
            && e.contains("exactly 2 inputs, the base and 1 model")
            && e.contains("the base and 3 models"),
        "{e}"
    );
    // model_stock with two inputs (the base and one model).
    let e = fail("merge_method: model_stock\nbase_model: base\nmodels:\n  - model: task_0\n");
    assert!(
        e.contains("`models` (line") && e.contains("at least 3 inputs"),
        "{e}"
    );
    // nuslerp with one model; slerp without t; nearswap without a base; a karcher max_iter
    // that is not a whole number.
    let e = fail("merge_method: nuslerp\nmodels:\n  - model: task_0\n");
    assert!(e.contains("exactly 2 models"), "{e}");
    let e = fail("merge_method: slerp\nbase_model: base\nmodels:\n  - model: task_0\n");
    assert!(e.contains("slerp needs `t`"), "{e}");
    let e = fail("merge_method: nearswap\nmodels:\n  - model: task_0\n  - model: task_1\nparameters: {t: 0.1}\n");
    assert!(e.contains("`base_model` is required: nearswap"), "{e}");
    let e =
        fail("merge_method: karcher\nmodels:\n  - model: task_0\nparameters:\n  max_iter: 2.5\n");
    assert!(
        e.contains("`parameters.max_iter`") && e.contains("whole number"),
        "{e}"
    );
    // A per-model parameter in the wrong place, and weights of task-vector methods.
    let e = fail("merge_method: slerp\nbase_model: base\nmodels:\n  - model: task_0\n    parameters:\n      t: 0.5\n      density: 0.5\n");
    assert!(
        e.contains("`models[0].parameters.t` (line 6)") && e.contains("global parameter"),
        "{e}"
    );
    // Slices: the base must be a source of slerp's slices, each with two inputs.
    let e = fail("merge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\nslices:\n  - sources:\n      - model: task_0\n        layer_range: [0, 2]\n      - model: task_1\n        layer_range: [0, 2]\n");
    assert!(
        e.contains("`slices[0].sources` (line") && e.contains("list `base_model`"),
        "{e}"
    );
    // A `t` filter that leaves tensors without a value: found by the plan, once.
    let p = d.join("gap.yml");
    std::fs::write(&p, "merge_method: slerp\nbase_model: base\nmodels:\n  - model: task_0\nparameters:\n  t:\n    - filter: mlp\n      value: 0.5\n").unwrap();
    let r = stamerge::Recipe::from_file(&p).unwrap();
    let e = stamerge::plan(&r, None, &stamerge::Options::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no setting of `t` applies to") && e.matches("no setting").count() == 1,
        "{e}"
    );
}

#[test]
fn plan_shows_each_model_s_values_and_cuda_refuses_before_any_work() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 2);
    let d = s.dir.path();
    let text = "merge_method: linear\nbase_model: base\nmodels:\n  - model: task_0\n    parameters: {weight: [0.5, 1]}\n  - model: base\n    parameters: {weight: 2}\n  - model: task_1\n";
    let p = d.join("r.yml");
    std::fs::write(&p, text).unwrap();
    let r = stamerge::Recipe::from_file(&p).unwrap();
    let plan = stamerge::plan(&r, None, &stamerge::Options::default()).unwrap();
    let shown = stamerge::plan::show::render(&plan, None);
    assert!(
        shown.contains("  base ") && shown.contains("weight 2"),
        "{shown}"
    );
    let line = shown
        .lines()
        .find(|l| l.starts_with("model.layers.1.mlp.gate_proj.weight "))
        .unwrap();
    // The base's weight, then each task's: the gradient's end at layer 1 of 2.
    assert!(line.ends_with("weight=2,1,1"), "{line}");
    // linear has CUDA kernels (tests/gpu/interp.rs compares them with the CPU); karcher and
    // arcee_fusion do not: --device cuda refuses them by name before the output folder exists.
    assert_eq!(stamerge::cuda_lacks(&plan), None);
    let p = d.join("k.yml");
    std::fs::write(
        &p,
        "merge_method: karcher\nmodels:\n  - model: task_0\n  - model: task_1\n",
    )
    .unwrap();
    let r = stamerge::Recipe::from_file(&p).unwrap();
    let out = d.join("out");
    let opts = stamerge::Options {
        device: stamerge::Device::Cuda,
        ..Default::default()
    };
    let e = stamerge::merge(&r, &out, &opts).unwrap_err().to_string();
    assert!(
        e.contains("`karcher` has no CUDA kernels yet") && e.contains("--device cpu"),
        "{e}"
    );
    assert!(!out.exists());
    // --device auto runs it on the CPU.
    let rep = stamerge::merge(&r, &out, &stamerge::Options::default()).unwrap();
    assert_eq!(rep.backend, "cpu");
}
