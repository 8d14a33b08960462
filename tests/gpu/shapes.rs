//! Odd shapes and task counts, mask jobs beyond the methods', mixed dtypes and misaligned
//! buffers, and device buffers reused across groups.

use stamerge::backend::{KeySpec, MaskJob};
use stamerge::dtype::{get, FloatType};
use stamerge::method::ScoreKind;

use crate::compare::compare;
use crate::inputs::{make, Buf, Make};
use crate::recipes::{method_jobs, Method, METHODS};
use crate::{gpu, max_elems, TYPES};

/// Task counts 1, 2, 8 (the largest with a combination histogram) and 9, sizes around the
/// kernels' group (8), word (64), tile (8192) and chunk (65 536) boundaries, empty tensors, and
/// densities from a single kept entry to all.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn shapes_and_task_counts_match_cpu() {
    let cuda = gpu();
    for nt in [1usize, 2, 8, 9] {
        for n in [0usize, 1, 7, 8, 9, 64, 65, 8191, 8192, 8193, 65_537] {
            if n > max_elems() {
                continue;
            }
            for method in [Method::Ties, Method::StaFinetuned, Method::DareLinear] {
                let ty = [FloatType::F16, FloatType::BF16, FloatType::F32][(n + nt) % 3];
                let inp = make(n, Make::new(ty, nt, n % 2 == 1, 3 + nt as u64));
                let (mut jobs, fuse) = method_jobs(method, nt, n, &inp.name, ty);
                // k = 1, k = n - 1 and k = n (no select) among the tasks
                for (t, j) in jobs.iter_mut().enumerate() {
                    if let MaskJob::TopK { k, .. } = j {
                        *k = match t % 4 {
                            0 => 1,
                            1 => (n as u64).saturating_sub(1).max(1),
                            2 => n as u64,
                            _ => *k,
                        };
                    }
                }
                let what = format!("{method:?} T={nt} n={n} {ty:?}");
                compare(cuda, &inp.group(), &jobs, &fuse, &what);
            }
        }
    }
}

/// Mask jobs the pipeline does not produce today but the trait allows: top-k over mean-normalised
/// keys, and fixed thresholds with tie quotas of 0, part of the ties, all of them and more, at
/// keys that do and do not occur.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn other_mask_jobs_match_cpu() {
    let cuda = gpu();
    for ty in TYPES {
        for grid in [false, true] {
            let n = 4097.min(max_elems());
            let inp = make(n, Make::new(ty, 2, grid, 77));
            let g = inp.group();
            let (_, fuse) = method_jobs(Method::Magnitude, 2, n, &inp.name, ty);
            let mean = Some(0.37f32);
            let sp = |mean| KeySpec {
                score: ScoreKind::AbsTaskVector,
                mean,
                nonfinite_zero: false,
            };
            let jobs = [
                MaskJob::TopK {
                    spec: sp(mean),
                    k: n as u64 / 3 + 1,
                },
                MaskJob::TopK {
                    spec: sp(mean),
                    k: 1,
                },
            ];
            let what = format!("top-k with a mean {ty:?} grid={grid}");
            let stats = compare(cuda, &g, &jobs, &fuse, &what).expect("no fault");
            // A threshold that occurs (with its ties), and one between keys.
            let th = stats.tasks[0].threshold.expect("a threshold");
            let ties = th.count_eq;
            for (key, mean) in [(th.key, mean), (th.key + 1, mean), (th.key, None)] {
                for quota in [0, 1, ties / 2, ties, ties + 5] {
                    let jobs = [
                        MaskJob::Fixed {
                            spec: sp(mean),
                            key,
                            tie_quota: quota,
                        },
                        MaskJob::All,
                    ];
                    let what = format!("{what}: fixed key {key:#x} quota {quota} mean {mean:?}");
                    compare(cuda, &g, &jobs, &fuse, &what);
                }
            }
        }
    }
}

/// Each input in its own dtype, the output in another, and buffers at odd addresses.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn mixed_dtypes_and_misaligned_inputs_match_cpu() {
    let cuda = gpu();
    for (ty, grad_ty, start_ty, out) in [
        (
            FloatType::BF16,
            FloatType::F32,
            FloatType::F16,
            FloatType::F32,
        ),
        (
            FloatType::F16,
            FloatType::BF16,
            FloatType::F32,
            FloatType::BF16,
        ),
        (
            FloatType::F32,
            FloatType::F16,
            FloatType::BF16,
            FloatType::F16,
        ),
    ] {
        for misalign in [0usize, 1, 2] {
            for method in METHODS {
                let n = 100_003.min(max_elems());
                let mut m = Make::new(ty, 3, misalign == 2, 5);
                m.grad_ty = grad_ty;
                m.misalign = misalign;
                m.start = (method == Method::Forget).then_some(start_ty);
                let mut inp = make(n, m);
                // One task theta in yet another dtype.
                let other = if ty == FloatType::F16 {
                    FloatType::BF16
                } else {
                    FloatType::F16
                };
                let vals: Vec<f32> = (0..n)
                    .map(|i| get(ty, &inp.theta[1].bytes[misalign..], i))
                    .collect();
                inp.theta[1] = Buf::new(other, &vals, misalign);
                let (jobs, fuse) = method_jobs(method, 3, n, &inp.name, out);
                let what =
                    format!("{method:?} {ty:?}/{grad_ty:?}/{start_ty:?} → {out:?} +{misalign}");
                compare(cuda, &inp.group(), &jobs, &fuse, &what);
            }
        }
    }
}

/// One backend, many groups of growing and shrinking sizes: the reused device buffers must not
/// leak anything from one group into the next.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn buffer_reuse_across_groups_matches_cpu() {
    let cuda = gpu();
    for (i, n) in [1_000_003usize, 17, 300_001, 1, 2_000_000, 4097]
        .into_iter()
        .enumerate()
    {
        let n = n.min(max_elems());
        let method = METHODS[i % METHODS.len()];
        let mut m = Make::new(FloatType::BF16, 4, i % 2 == 0, 90 + i as u64);
        m.start = (method == Method::Forget).then_some(FloatType::BF16);
        let inp = make(n, m);
        let (jobs, fuse) = method_jobs(method, 4, n, &inp.name, FloatType::BF16);
        compare(
            cuda,
            &inp.group(),
            &jobs,
            &fuse,
            &format!("{method:?} n={n} (reuse)"),
        );
    }
}
