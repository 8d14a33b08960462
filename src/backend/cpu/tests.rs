//! The window select (topk.rs) against the stored-keys select it replaced, through the whole
//! backend: the same output bytes, statistics (threshold, kept, ties kept), overlap counts and
//! faults, on key distributions chosen to break a top-k.

use super::*;
use crate::dtype::FloatType;
use crate::method::{FuseRule, ScoreKind};
use crate::select::window;

#[test]
fn top_digit_counts_match_a_plain_count() {
    let keys: Vec<u32> = (0..10_007u32)
        .map(|i| i.wrapping_mul(2_654_435_761) | (i % 3) << 30)
        .collect();
    let mut got = vec![1u64; 1 << 11];
    count_top_digit(&keys, &mut got);
    let mut want = vec![1u64; 1 << 11];
    for k in &keys {
        want[(k >> 21) as usize] += 1;
    }
    assert_eq!(got, want);
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Task vectors (fp32, so that every value is exactly the one chosen) with adversarial |τ|.
fn task_vectors(n: usize, seed: u64) -> Vec<(&'static str, Vec<f32>)> {
    let mut s = seed | 1;
    let mut r = move || (xorshift(&mut s) >> 40) as f32 / (1u64 << 24) as f32;
    let mut uniform = |scale: f32| (0..n).map(|_| (r() - 0.5) * scale).collect::<Vec<_>>();
    let noise = uniform(1.0);
    let (len, starts) = window::sample_starts(n);
    let mut fooled = uniform(0.001);
    // Large values exactly where the sample looks: it places the threshold far too high.
    for &b in &starts {
        for v in &mut fooled[b..b + len] {
            *v = 7.0;
        }
    }
    vec![
        ("all equal", vec![0.5; n]),
        ("all zero", vec![0.0; n]),
        (
            "one first-digit bucket",
            noise.iter().map(|x| 1.0 + (x + 0.5) * 0.2).collect(),
        ),
        (
            "ties straddling chunks",
            (0..n)
                .map(|i| if (i + 40) % CH < 80 { 0.75 } else { noise[i] })
                .collect(),
        ),
        (
            "three values",
            noise.iter().map(|x| (x * 6.0).round() * 0.25).collect(),
        ),
        (
            "zero rows",
            (0..n)
                .map(|i| if (i / 500) % 3 == 0 { 0.0 } else { noise[i] })
                .collect(),
        ),
        ("the sample fooled", fooled),
        ("uniform", noise),
    ]
}

struct Set {
    base: Vec<u8>,
    tasks: Vec<Vec<u8>>,
    grads: Vec<Vec<u8>>,
}

impl Set {
    fn group(&self, n: usize) -> Group<'_> {
        fn raw(data: &[u8]) -> Raw<'_> {
            Raw {
                ty: FloatType::F32,
                data,
            }
        }
        Group {
            name: "t",
            seq: 0,
            n,
            base: raw(&self.base),
            start: None,
            tasks: self
                .tasks
                .iter()
                .zip(&self.grads)
                .map(|(th, g)| crate::backend::TaskInput {
                    theta: raw(th),
                    grad: Some(raw(g)),
                })
                .collect(),
        }
    }
}

fn fuse_spec(rule: FuseRule, nt: usize) -> FuseSpec {
    FuseSpec {
        rule,
        lambda: 1.0,
        normalize: rule == FuseRule::Ties,
        weights: vec![1.0; nt],
        forget: vec![false; nt],
        rescale: vec![None; nt],
        rescale_l1: vec![false; nt],
        scale: vec![None; nt],
        sparse: Default::default(),
        sta: Default::default(),
        out: FloatType::F32,
        interp: None,
    }
}

type Outcome = Result<(Vec<u8>, GroupStats), String>;

fn both(g: &Group, jobs: &[MaskJob], f: &FuseSpec) -> (Outcome, Outcome, u64) {
    let run = |be: &CpuBackend| {
        let mut out = vec![0u8; g.n * 4];
        be.merge_group(g, jobs, f, &mut out)
            .map(|st| (out, st))
            .map_err(|e| match e {
                BackendError::Fault(f) => format!("{f:?}"),
                e => e.to_string(),
            })
    };
    let window = CpuBackend::new();
    let got = run(&window);
    (
        got,
        run(&CpuBackend::with_stored_keys()),
        window.window_misses(),
    )
}

/// Every distribution as each of three tasks' τ, with top-k counts from 1 to n, fixed thresholds
/// with tie quotas, and a tensor that spans several chunks with a partial last word.
#[test]
fn the_window_select_gives_the_stored_keys_results_on_adversarial_inputs() {
    let n = 3 * CH + 1000 + 37;
    let base: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01 - 0.5).collect();
    let dists = task_vectors(n, 42);
    let spec = |score| KeySpec {
        score,
        mean: None,
        nonfinite_zero: false,
    };
    let mut misses = 0;
    for (i, (what, tau)) in dists.iter().enumerate() {
        // Three tasks: this distribution, its negation (ties across signs), and the next one.
        let (_, next) = &dists[(i + 1) % dists.len()];
        let taus = [tau.clone(), tau.iter().map(|x| -x).collect(), next.clone()];
        let set = Set {
            base: bytes(&base),
            tasks: taus
                .iter()
                .map(|t| bytes(&t.iter().zip(&base).map(|(t, b)| b + t).collect::<Vec<_>>()))
                .collect(),
            grads: taus
                .iter()
                .map(|t| bytes(&t.iter().map(|x| x * x).collect::<Vec<_>>()))
                .collect(),
        };
        let g = set.group(n);
        let mut keys = vec![0u32; n];
        compute_keys(&g, 0, &spec(ScoreKind::AbsTaskVector), &mut keys).unwrap();
        let mid = {
            let mut k = keys.clone();
            k.sort_unstable();
            k[n / 2]
        };
        for k in [1, 2, n as u64 / 10, n as u64 * 3 / 10, n as u64 - 1] {
            for (score, rule) in [
                (ScoreKind::AbsTaskVector, FuseRule::Ties),
                (ScoreKind::AbsWeightGrad, FuseRule::Linear),
                (ScoreKind::AbsTaskVectorGrad, FuseRule::Linear),
            ] {
                let jobs = [
                    MaskJob::TopK {
                        spec: spec(score),
                        k,
                    },
                    MaskJob::TopK {
                        spec: spec(score),
                        k: (k * 7 / 5).clamp(1, n as u64),
                    },
                    MaskJob::Fixed {
                        spec: spec(score),
                        key: mid,
                        tie_quota: k / 3,
                    },
                ];
                let (got, want, m) = both(&g, &jobs, &fuse_spec(rule, 3));
                assert_eq!(got, want, "{what}: k={k} {score:?}");
                misses += m;
            }
        }
    }
    assert!(misses > 0, "a fooled sample must have taken the fallback");
}

/// Bad values: the first task (in task order) with one reports its lowest index, as before; with
/// `nonfinite_zero` NaN scores select as 0.
#[test]
fn faults_and_nan_scores_match_the_stored_keys_select() {
    let n = 2 * CH + 333;
    let base = vec![0.25f32; n];
    let mut s = 9u64;
    let tau: Vec<f32> = (0..n)
        .map(|_| (xorshift(&mut s) % 1000) as f32 * 0.001)
        .collect();
    let mut th: Vec<Vec<f32>> = (0..3)
        .map(|_| tau.iter().zip(&base).map(|(t, b)| b + t).collect())
        .collect();
    let mut grads: Vec<Vec<f32>> = (0..3).map(|_| tau.clone()).collect();
    th[1][CH + 5] = f32::NAN;
    th[2][17] = f32::INFINITY;
    for i in (0..n).step_by(101) {
        grads[0][i] = f32::NAN;
    }
    let set = Set {
        base: bytes(&base),
        tasks: th.iter().map(|v| bytes(v)).collect(),
        grads: grads.iter().map(|v| bytes(v)).collect(),
    };
    let g = set.group(n);
    for zero in [false, true] {
        for (score, rule) in [
            (ScoreKind::AbsTaskVector, FuseRule::Ties),
            (ScoreKind::AbsWeightGrad, FuseRule::Linear),
        ] {
            let spec = KeySpec {
                score,
                mean: None,
                nonfinite_zero: zero,
            };
            for k in [1u64, n as u64 / 4] {
                // Only task 0 selects (its gradient has the NaNs), then all three.
                let one = [MaskJob::TopK { spec, k }, MaskJob::All, MaskJob::All];
                let all = [MaskJob::TopK { spec, k }; 3];
                for jobs in [&one[..], &all[..]] {
                    let (got, want, _) = both(&g, jobs, &fuse_spec(rule, 3));
                    assert_eq!(got, want, "{score:?} zero={zero} k={k} {jobs:?}");
                }
            }
        }
    }
}

/// docs/SEMANTICS.md, "Output dtype": a NaN from finite inputs (±3e38 task vectors weighted
/// by 2 overflow and cancel) is written as the canonical NaN, not x86's negative one: by the
/// one-loop fuse (2 tasks) and the task-by-task one (5: three more that leave the base as is).
#[test]
fn nan_outputs_are_the_canonical_nan() {
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (base, a, b) = (f32s(&[0.0, 0.0]), f32s(&[3e38, 0.5]), f32s(&[-3e38, 0.25]));
    let raw = |data| Raw {
        ty: FloatType::F32,
        data,
    };
    for nt in [2, 5] {
        let tasks = (0..nt)
            .map(|t| crate::backend::TaskInput {
                theta: raw([&a, &b].get(t).copied().unwrap_or(&base)),
                grad: None,
            })
            .collect();
        let g = Group {
            name: "w",
            seq: 0,
            n: 2,
            base: raw(&base),
            start: None,
            tasks,
        };
        for (ty, nan, one_and_half) in [
            (
                FloatType::F32,
                vec![0x00, 0x00, 0xc0, 0x7f],
                1.5f32.to_le_bytes().to_vec(),
            ),
            (FloatType::F16, vec![0x00, 0x7e], vec![0x00, 0x3e]),
            (FloatType::BF16, vec![0xc0, 0x7f], vec![0xc0, 0x3f]),
        ] {
            let f = FuseSpec {
                rule: FuseRule::Linear,
                lambda: 1.0,
                normalize: false,
                weights: vec![2.0; nt],
                forget: vec![false; nt],
                rescale: vec![None; nt],
                rescale_l1: vec![false; nt],
                scale: vec![None; nt],
                sparse: Default::default(),
                sta: Default::default(),
                out: ty,
                interp: None,
            };
            let mut out = vec![0u8; 2 * ty.size()];
            CpuBackend::new()
                .merge_group(&g, &vec![MaskJob::All; nt], &f, &mut out)
                .unwrap();
            assert_eq!(out, [nan, one_and_half].concat(), "{ty:?}, {nt} tasks");
        }
    }
}

/// The fuse with DARE's divisor, mergekit's L1 factor, both in one group (tasks that divide and
/// tasks that multiply: the task-by-task loops) or neither, for 1 to 5 tasks (the one-loop fuse
/// up to 4), TIES and linear, against docs/SEMANTICS.md's formulas written out per element.
#[test]
fn scaled_task_vectors_fuse_as_the_rules_say() {
    let n = 3 * 1024 + 77;
    let mut s = 0x5eed_u64;
    let mut r = move || (xorshift(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
    let base: Vec<f32> = (0..n).map(|_| r()).collect();
    let thetas: Vec<Vec<f32>> = (0..5)
        .map(|_| base.iter().map(|b| b + r() * 0.1).collect())
        .collect();
    for nt in 1..=5 {
        let tb: Vec<Vec<u8>> = thetas[..nt].iter().map(|t| bytes(t)).collect();
        let set = Set {
            base: bytes(&base),
            tasks: tb.clone(),
            grads: tb,
        };
        let g = set.group(n);
        let weights: Vec<f32> = (0..nt).map(|t| 0.3 + 0.25 * t as f32).collect();
        let factor = |t: usize| 0.4 + 0.37 * t as f32;
        for scaling in ["none", "divide", "multiply", "mixed"] {
            for rule in [FuseRule::Linear, FuseRule::Ties] {
                let mut f = fuse_spec(rule, nt);
                f.weights = weights.clone();
                f.lambda = 0.9;
                for t in 0..nt {
                    match scaling {
                        "divide" => f.rescale[t] = Some(factor(t)),
                        "multiply" => f.scale[t] = Some(factor(t)),
                        "mixed" if t % 2 == 0 => f.rescale[t] = Some(factor(t)),
                        "mixed" => f.scale[t] = Some(factor(t)),
                        _ => {}
                    }
                }
                let mut out = vec![0u8; n * 4];
                CpuBackend::new()
                    .merge_group(&g, &vec![MaskJob::All; nt], &f, &mut out)
                    .unwrap();
                let want: Vec<f32> = (0..n)
                    .map(|i| {
                        let u: Vec<f32> = (0..nt)
                            .map(|t| {
                                let tau = thetas[t][i] - base[i];
                                let tau = match (f.rescale[t], f.scale[t]) {
                                    (Some(d), _) => tau / d,
                                    (None, Some(s)) => tau * s,
                                    (None, None) => tau,
                                };
                                f.weights[t] * tau
                            })
                            .collect();
                        let sum = if rule == FuseRule::Ties {
                            let s = u.iter().fold(0.0f32, |a, x| a + x);
                            let (mut a, mut d) = (0.0f32, 0.0f32);
                            for t in 0..nt {
                                if (u[t] > 0.0 && s >= 0.0) || (u[t] < 0.0 && s < 0.0) {
                                    a += u[t];
                                    d += f.weights[t];
                                }
                            }
                            a / if d == 0.0 { 1.0 } else { d }
                        } else {
                            u.iter().fold(0.0f32, |a, x| a + x)
                        };
                        base[i] + f.lambda * sum
                    })
                    .collect();
                assert_eq!(out, bytes(&want), "{nt} tasks, {scaling}, {rule:?}");
            }
        }
    }
}

/// The AVX2 kernels for bf16 inputs (avx2.rs: the select pass's scores and the one-loop fuse)
/// against the portable loops, bit for bit and fault for fault: 1 to 5 tasks (5: no kernel),
/// TIES and linear, normalised or not, τ divided, multiplied or neither, negative, zero and
/// forgotten weights, masked and unmasked, with τ = ±0, τ and sums that overflow (NaN and Inf
/// results), and Inf and NaN inputs; whole blocks, a block of whole words and a partial word.
#[test]
fn bf16_kernels_give_the_portable_bytes_and_faults() {
    if !crate::simd::avx2_available() {
        eprintln!("SKIPPED: this CPU has no AVX2");
        return;
    }
    let _toggle = crate::simd::TOGGLE
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let bf = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect()
    };
    let n = 2 * CH + 1024 + 3 * 64 + 37;
    let mut s = 0xbf16u64;
    let mut r = move || (xorshift(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
    let base: Vec<f32> = (0..n).map(|i| if i % 7 == 0 { 0.0 } else { r() }).collect();
    let thetas: Vec<Vec<f32>> = (0..5)
        .map(|t| {
            (0..n)
                .map(|i| match (i + 3 * t) % 23 {
                    0 => base[i],                             // τ = 0
                    1 if base[i] == 0.0 => -0.0,              // τ = −0
                    2 => [3.0e38, -3.0e38][(i / 23 + t) % 2], // overflows once weighted
                    _ => base[i] + r() * 0.1,
                })
                .collect()
        })
        .collect();
    let grads: Vec<Vec<f32>> = (0..5)
        .map(|_| (0..n).map(|_| r() * 1e-3).collect())
        .collect();
    let (b16, th16, g16) = (
        bf(&base),
        thetas.iter().map(|v| bf(v)).collect::<Vec<_>>(),
        grads.iter().map(|v| bf(v)).collect::<Vec<_>>(),
    );
    let bad = |v: &[u8], i: usize, x: f32| {
        let mut v = v.to_vec();
        v[2 * i..2 * i + 2].copy_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
        v
    };
    // (what, θ of task 1, G of task 0): clean, an Inf θ, a NaN θ, a NaN and an Inf gradient.
    let inputs = [
        ("clean", th16[1].clone(), g16[0].clone()),
        (
            "inf θ",
            bad(&th16[1], CH + 70, f32::INFINITY),
            g16[0].clone(),
        ),
        (
            "nan θ",
            bad(&th16[1], 2 * CH + 1030, f32::NAN),
            g16[0].clone(),
        ),
        ("nan G", th16[1].clone(), bad(&g16[0], 5, f32::NAN)),
        (
            "inf G",
            th16[1].clone(),
            bad(&g16[0], CH + 1, f32::NEG_INFINITY),
        ),
    ];
    let raw = |data| Raw {
        ty: FloatType::BF16,
        data,
    };
    for (what, th1, g0) in &inputs {
        for nt in 1..=5 {
            let g = Group {
                name: "t",
                seq: 0,
                n,
                base: raw(&b16),
                start: None,
                tasks: (0..nt)
                    .map(|t| crate::backend::TaskInput {
                        theta: raw(if t == 1 { th1 } else { &th16[t] }),
                        grad: Some(raw(if t == 0 { g0 } else { &g16[t] })),
                    })
                    .collect(),
            };
            for (rule, score) in [
                (FuseRule::Ties, Some(ScoreKind::AbsTaskVector)),
                (FuseRule::Ties, None),
                (FuseRule::Linear, Some(ScoreKind::AbsWeightGrad)),
                (FuseRule::Linear, Some(ScoreKind::AbsTaskVectorGrad)),
                (FuseRule::Linear, None),
            ] {
                let jobs: Vec<MaskJob> = (0..nt)
                    .map(|t| match score {
                        Some(score) => MaskJob::TopK {
                            spec: KeySpec {
                                score,
                                mean: None,
                                nonfinite_zero: false,
                            },
                            k: (n as u64 * (2 + t as u64)) / 10,
                        },
                        None => MaskJob::All,
                    })
                    .collect();
                for (normalize, scaling) in
                    [(true, 0), (false, 0), (true, 1), (false, 2), (true, 3)]
                {
                    let mut f = fuse_spec(rule, nt);
                    f.out = FloatType::BF16;
                    f.normalize = normalize;
                    f.lambda = 0.75;
                    f.weights = [1.0, -0.5, 0.0, 2.0, 1.25][..nt].to_vec();
                    f.forget = (0..nt).map(|t| t == 2).collect();
                    match scaling {
                        1 => f.rescale = (0..nt).map(|t| Some([0.5, 0.0, 0.3][t % 3])).collect(),
                        2 => f.scale = (0..nt).map(|t| Some(1.0 + t as f32 * 0.37)).collect(),
                        // Divide and multiply in one group: the task-by-task loops.
                        3 => f.scale = (0..nt).map(|t| (t > 0).then_some(1.5)).collect(),
                        _ => {}
                    }
                    if scaling == 3 {
                        f.rescale[0] = Some(0.5);
                    }
                    let run = |on: bool| {
                        crate::simd::set_enabled(on);
                        let mut out = vec![0u8; n * 2];
                        let r = CpuBackend::new()
                            .merge_group(&g, &jobs, &f, &mut out)
                            .map(|st| (out, st))
                            .map_err(|e| match e {
                                BackendError::Fault(f) => format!("{f:?}"),
                                e => e.to_string(),
                            });
                        crate::simd::set_enabled(true);
                        r
                    };
                    let (wide, portable) = (run(true), run(false));
                    if wide != portable {
                        // The first differing byte, not megabytes of both.
                        let first = match (&wide, &portable) {
                            (Ok((a, _)), Ok((b, _))) => a.iter().zip(b).position(|(x, y)| x != y),
                            _ => None,
                        };
                        let brief = |o: &Outcome| match o {
                            Ok((_, st)) => format!("Ok({st:?})"),
                            Err(e) => e.clone(),
                        };
                        panic!(
                            "{what}: {nt} tasks, {rule:?} {score:?} normalize={normalize} \
                             scaling={scaling}: AVX2 {} against portable {}, first differing \
                             byte {first:?}",
                            brief(&wide),
                            brief(&portable)
                        );
                    }
                }
            }
        }
    }
    assert!(crate::simd::enabled());
}
