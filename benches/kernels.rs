//! Criterion benches of the CPU kernels, per dtype and tensor size: radix select (tensor top-k),
//! score (sta |θ·G|, magnitude |θ−b|), fuse (linear, ties, dare) and one whole tensor group of a
//! TIES merge (select and fuse for 3 tasks), with the window select and the stored-keys one.
//!
//! Throughput counts elements and bytes: the bytes are those the kernel must read once from its
//! inputs plus those it writes (keys: 4 per element; outputs: the output dtype), so GB/s compares
//! with a memory copy. Run: `cargo bench --bench kernels` (a few minutes), or a subset with a
//! filter, e.g. `cargo bench --bench kernels -- fuse/ties`.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use stamerge::backend::cpu::{compute_keys, CpuBackend};
use stamerge::backend::{Compute, FuseSpec, Group, KeySpec, MaskJob, Raw, TaskInput};
use stamerge::dtype::{narrow, FloatType};
use stamerge::method::ScoreKind;
use stamerge::plan::work::resolve;
use stamerge::select::radix;
use stamerge::Recipe;

const SIZES: [(&str, usize); 3] = [("4k", 4096), ("1M", 1 << 20), ("16M", 1 << 24)];
const DTYPES: [(&str, FloatType); 3] = [
    ("fp32", FloatType::F32),
    ("fp16", FloatType::F16),
    ("bf16", FloatType::BF16),
];
const TASKS: usize = 3;

/// Deterministic normal-ish values (sum of four uniforms), scaled like fine-tuning weights.
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n).map(|_| (u() + u() + u() + u()) * scale).collect()
}

fn raw_bytes(ty: FloatType, v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * ty.size()];
    narrow(ty, v, &mut out);
    out
}

/// A base, TASKS fine-tuned tensors (base + a small task vector) and TASKS gradient tensors.
struct Inputs {
    ty: FloatType,
    n: usize,
    base: Vec<u8>,
    thetas: Vec<Vec<u8>>,
    grads: Vec<Vec<u8>>,
}

impl Inputs {
    fn new(ty: FloatType, n: usize) -> Self {
        let b = values(1, n, 0.04);
        let thetas = (0..TASKS)
            .map(|t| {
                let d = values(10 + t as u64, n, 0.004);
                raw_bytes(
                    ty,
                    &b.iter().zip(&d).map(|(x, y)| x + y).collect::<Vec<_>>(),
                )
            })
            .collect();
        let grads = (0..TASKS)
            .map(|t| raw_bytes(ty, &values(20 + t as u64, n, 1e-3)))
            .collect();
        Self {
            ty,
            n,
            base: raw_bytes(ty, &b),
            thetas,
            grads,
        }
    }

    fn group(&self) -> Group<'_> {
        let ty = self.ty;
        Group {
            name: "bench",
            seq: 0,
            n: self.n,
            base: Raw {
                ty,
                data: &self.base,
            },
            start: None,
            tasks: (0..TASKS)
                .map(|t| TaskInput {
                    theta: Raw {
                        ty,
                        data: &self.thetas[t],
                    },
                    grad: Some(Raw {
                        ty,
                        data: &self.grads[t],
                    }),
                })
                .collect(),
        }
    }
}

/// A recipe of TASKS models of weight 1 (and `density`, if given), λ 1, with the global
/// `params` (YAML flow-mapping entries).
fn recipe(method: &str, density: Option<f64>, params: &str) -> Recipe {
    let mut y = format!("merge_method: {method}\nbase_model: base\nmodels:\n");
    for t in 0..TASKS {
        y += &format!("  - model: task_{t}\n    parameters: {{weight: 1.0");
        if let Some(d) = density {
            y += &format!(", density: {d:?}");
        }
        y += "}\n";
    }
    y += &format!("parameters: {{lambda: 1.0, {params}}}\n");
    Recipe::parse(&y, Path::new(".")).unwrap_or_else(|e| panic!("{y}\n{e:?}"))
}

/// The mask jobs and fuse of `grp` under `recipe` (per-tensor selection), from the mapping
/// the pipeline uses, written as `out`.
fn work(recipe: &Recipe, grp: &Group, out: FloatType) -> (Vec<MaskJob>, FuseSpec) {
    let w = resolve(recipe, grp.name, grp.n as u64, out, &[true; TASKS]);
    (w.jobs(|_| unreachable!("per-tensor selection")), w.fuse)
}

fn config() -> Criterion {
    // Small samples: the 16M cases take tenths of a second per iteration on a 2-core machine.
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
}

fn bench_select(c: &mut Criterion) {
    let mut g = c.benchmark_group("select/radix");
    for (label, n) in SIZES {
        // Keys of |τ| from bf16 weights: realistic ties at the threshold.
        let inp = Inputs::new(FloatType::BF16, n);
        let mut keys = vec![0u32; n];
        let spec = KeySpec {
            score: ScoreKind::AbsTaskVector,
            mean: None,
            nonfinite_zero: false,
        };
        compute_keys(&inp.group(), 0, &spec, &mut keys).expect("finite inputs");
        let k = (n as u64 * 3 / 10).max(1);
        g.throughput(Throughput::ElementsAndBytes {
            elements: n as u64,
            bytes: n as u64 * 4,
        });
        let hist1 = radix::histogram(&keys, 21, 11, 0);
        let mut words = vec![0u64; n.div_ceil(64)];
        // What the backend runs after computing the keys (with the first digit's histogram):
        // the threshold and the keep mask.
        g.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter(|| {
                black_box(radix::select_masked(
                    black_box(&keys),
                    k,
                    &hist1,
                    &mut words,
                ))
            })
        });
    }
    g.finish();
}

fn bench_score(c: &mut Criterion) {
    for (kind, score) in [
        ("sta", ScoreKind::AbsWeightGrad),
        ("magnitude", ScoreKind::AbsTaskVector),
    ] {
        let mut g = c.benchmark_group(format!("score/{kind}"));
        for (dname, ty) in DTYPES {
            for (label, n) in SIZES {
                let inp = Inputs::new(ty, n);
                let grp = inp.group();
                let spec = KeySpec {
                    score,
                    mean: None,
                    nonfinite_zero: false,
                };
                let mut keys = vec![0u32; n];
                // Two inputs per element (θ and G, or θ and b) in, one u32 key out.
                g.throughput(Throughput::ElementsAndBytes {
                    elements: n as u64,
                    bytes: n as u64 * (2 * ty.size() as u64 + 4),
                });
                g.bench_function(BenchmarkId::new(dname, label), |b| {
                    b.iter(|| black_box(compute_keys(&grp, 0, &spec, &mut keys).expect("finite")))
                });
            }
        }
        g.finish();
    }
}

/// One `merge_group` call per iteration; bytes: the base and every task read once, the output
/// written once.
fn bench_merge(
    g: &mut BenchmarkGroup<'_, WallTime>,
    be: &CpuBackend,
    (dtype, size): (&str, &str),
    grp: &Group,
    jobs: &[MaskJob],
    spec: &FuseSpec,
) {
    let (n, width) = (grp.n as u64, spec.out.size() as u64);
    let mut out = vec![0u8; grp.n * spec.out.size()];
    g.throughput(Throughput::ElementsAndBytes {
        elements: n,
        bytes: n * width * (TASKS as u64 + 2),
    });
    g.bench_function(BenchmarkId::new(dtype, size), |b| {
        b.iter(|| black_box(be.merge_group(grp, jobs, spec, &mut out).expect("ok")))
    });
}

fn bench_fuse(c: &mut Criterion) {
    let be = CpuBackend::new();
    // Every entry kept (linear, ties), or DARE's random half rescaled (linear fuse).
    for (rule, r) in [
        (
            "linear",
            recipe("task_arithmetic", None, "normalize: false"),
        ),
        ("ties", recipe("ties", Some(1.0), "normalize: true")),
        (
            "dare",
            recipe("dare_linear", Some(0.5), "normalize: false, seed: 7"),
        ),
    ] {
        let mut g = c.benchmark_group(format!("fuse/{rule}"));
        for (dname, ty) in DTYPES {
            for (label, n) in SIZES {
                let inp = Inputs::new(ty, n);
                let grp = inp.group();
                let (jobs, spec) = work(&r, &grp, ty);
                bench_merge(&mut g, &be, (dname, label), &grp, &jobs, &spec);
            }
        }
        g.finish();
    }
}

/// One tensor of a TIES merge as the pipeline runs it: per task the top 30 % of |τ| by the
/// window select (a sample, one pass over the inputs for all tasks, a select among the window's
/// keys), then the fuse; and the same with the stored-keys select it replaced (keys of |τ|
/// stored, radix select over them), for comparison.
fn bench_group(c: &mut Criterion) {
    let ties = recipe("ties", Some(0.3), "normalize: true");
    for (name, be) in [
        ("group/ties_top30", CpuBackend::new()),
        (
            "group/ties_top30_stored_keys",
            CpuBackend::with_stored_keys(),
        ),
    ] {
        let mut g = c.benchmark_group(name);
        for (dname, ty) in DTYPES {
            for (label, n) in SIZES {
                let inp = Inputs::new(ty, n);
                let grp = inp.group();
                let (jobs, fuse) = work(&ties, &grp, ty);
                bench_merge(&mut g, &be, (dname, label), &grp, &jobs, &fuse);
            }
        }
        g.finish();
    }
}

criterion_group! {
    name = kernels;
    config = config();
    targets = bench_select, bench_score, bench_fuse, bench_group
}
criterion_main!(kernels);
