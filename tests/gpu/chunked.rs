//! Groups larger than the GPU memory budget, processed in chunks: every method, tie quotas
//! running out inside and at the edge of a chunk, faults in later chunks, the model-wide passes,
//! a GPU with less free memory than the budget, and a budget below one chunk.

use stamerge::backend::cpu::CpuBackend;
use stamerge::backend::cuda::CudaBackend;
use stamerge::backend::{
    BackendError, Compute, DeviceError, KeySpec, KeysHome, MaskJob, RankTask, Source,
};
use stamerge::dtype::FloatType;
use stamerge::method::ScoreKind;
use stamerge::select::dare;

use crate::compare::{compare, compare_then};
use crate::inputs::{make, Inputs, Make};
use crate::model_selection::check_model_selection_on;
use crate::recipes::{method_jobs, recipe, tensor_work, Extra, Method, METHODS};
use crate::{gpu, max_elems, TYPES};

/// A second backend on the same GPU whose memory budget is `budget` bytes.
pub fn budget_gpu(budget: u64) -> CudaBackend {
    gpu();
    CudaBackend::with_max_memory(0, Some(budget)).expect("a second backend on the GPU")
}

/// Sizes for the chunked tests: large enough to need several chunks under the small budgets.
fn chunk_sizes() -> Vec<usize> {
    [4097usize, 70_000, 1_000_003]
        .into_iter()
        .filter(|&n| n <= max_elems())
        .collect()
}

/// Every method and dtype, continuous values and heavy ties, with a budget of 1 MiB (768 KiB of
/// it for the working arena): groups run in chunks of 8192 to 32 768 elements (per-tensor top-k
/// from histogram passes over the chunks, the ties handed out in index order), and must give the
/// CPU's bytes and statistics.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn chunked_methods_match_cpu() {
    let small = budget_gpu(1 << 20);
    let mut most = 1;
    for method in METHODS {
        for ty in TYPES {
            for grid in [false, true] {
                for n in chunk_sizes() {
                    let mut m = Make::new(ty, 3, grid, 31 + n as u64);
                    if method == Method::Forget {
                        m.start = Some(ty);
                    }
                    if matches!(method, Method::StaFinetuned | Method::Forget)
                        && ty != FloatType::F32
                    {
                        m.grad_ty = FloatType::F32;
                    }
                    let inp = make(n, m);
                    let (jobs, fuse) = method_jobs(method, 3, n, &inp.name, ty);
                    let g = inp.group();
                    let pieces = small.pieces(&g, &jobs, &fuse).expect("fits in chunks");
                    most = most.max(pieces);
                    // DARE's default L1 rescale: one factor per tensor, the same in every chunk
                    // (fp32 at 70 000 elements needs more than the budget; fp16/bf16 fit it).
                    let dare = matches!(method, Method::DareLinear | Method::DareTies);
                    if dare && ty == FloatType::F32 && n >= 70_000 {
                        assert!(fuse.rescale_l1.iter().all(|&b| b), "{method:?}: L1 rescale");
                        assert!(pieces > 1, "{method:?} {ty:?} n={n}: not chunked");
                    }
                    let what = format!("{method:?} {ty:?} n={n} grid={grid} in {pieces} chunks");
                    let stats = compare(&small, &g, &jobs, &fuse, &what)
                        .unwrap_or_else(|| panic!("{what}: unexpected fault"));
                    for (t, job) in jobs.iter().enumerate() {
                        if let MaskJob::TopK { k, .. } = job {
                            assert_eq!(stats.tasks[t].kept, *k, "{what}: task {t} keeps k");
                        }
                    }
                }
            }
        }
    }
    if max_elems() >= 70_000 {
        assert!(
            most >= 4,
            "the budget split no group into 4 or more chunks ({most})"
        );
    }
}

/// Densities from one kept entry to all, top-k over mean-normalised keys, and fixed thresholds
/// whose tie quota runs out inside a chunk, exactly at a chunk's last tie, or not at all.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn chunked_tie_quotas_match_cpu() {
    let small = budget_gpu(1 << 20);
    let n = 70_000.min(max_elems());
    for ty in TYPES {
        let inp = make(n, Make::new(ty, 2, true, 123));
        let g = inp.group();
        let (_, fuse) = method_jobs(Method::Magnitude, 2, n, &inp.name, ty);
        let sp = |mean| KeySpec {
            score: ScoreKind::AbsTaskVector,
            mean,
            nonfinite_zero: false,
        };
        for k in [1u64, 2, n as u64 / 2, n as u64 - 1] {
            let jobs = [
                MaskJob::TopK { spec: sp(None), k },
                MaskJob::TopK {
                    spec: sp(Some(0.37)),
                    k: (n as u64 / 3).max(1),
                },
            ];
            compare(&small, &g, &jobs, &fuse, &format!("{ty:?} top-k {k}"));
        }
        let cpu = CpuBackend::new();
        let mut out = vec![0u8; n * ty.size()];
        let probe = [
            MaskJob::TopK {
                spec: sp(None),
                k: n as u64 / 2,
            },
            MaskJob::All,
        ];
        let th = cpu.merge_group(&g, &probe, &fuse, &mut out).unwrap().tasks[0]
            .threshold
            .unwrap();
        // The ties of the first chunks: a quota spent exactly at a chunk boundary's last tie.
        let per_chunk = n.div_ceil(small.pieces(&g, &probe, &fuse).unwrap());
        let keys_eq_in_first = {
            let jobs = [
                MaskJob::Fixed {
                    spec: sp(None),
                    key: th.key,
                    tie_quota: u64::MAX,
                },
                MaskJob::All,
            ];
            let sub = Inputs {
                n: per_chunk.min(n),
                ..inp.clone()
            };
            let mut o = vec![0u8; sub.n * ty.size()];
            let st = cpu.merge_group(&sub.group(), &jobs, &fuse, &mut o).unwrap();
            st.tasks[0].threshold.unwrap().count_eq
        };
        for quota in [
            0,
            1,
            keys_eq_in_first,
            keys_eq_in_first + 1,
            th.count_eq / 2,
            th.count_eq,
            th.count_eq + 3,
        ] {
            let jobs = [
                MaskJob::Fixed {
                    spec: sp(None),
                    key: th.key,
                    tie_quota: quota,
                },
                MaskJob::Random {
                    stream: dare::stream(1, 1, &inp.name),
                    threshold: dare::threshold(0.3),
                },
            ];
            compare(
                &small,
                &g,
                &jobs,
                &fuse,
                &format!("{ty:?} fixed quota {quota}"),
            );
        }
    }
}

/// Value faults in a later chunk, and a score fault of an earlier task behind a fuse fault of
/// an earlier chunk: the same fault as the CPU.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn chunked_faults_match_cpu() {
    let small = budget_gpu(1 << 20);
    let n = 70_000.min(max_elems());
    if n < 40_000 {
        return;
    }
    let mut inp = make(n, Make::new(FloatType::F32, 3, false, 9));
    inp.theta[2].set(100, f32::NAN); // a fuse fault (τ) in chunk 0 of task 2
    inp.grad[1].as_mut().unwrap().set(n - 5, f32::INFINITY); // a score fault late in task 1
    for method in [Method::StaFinetuned, Method::DareTies, Method::Magnitude] {
        let (jobs, fuse) = method_jobs(method, 3, n, &inp.name, FloatType::F32);
        let what = format!("chunked faults {method:?}");
        assert!(
            small.pieces(&inp.group(), &jobs, &fuse).unwrap() > 1,
            "{what}"
        );
        compare(&small, &inp.group(), &jobs, &fuse, &what);
    }
}

/// `selection: model` with every pass in chunks: the score sums in 65 536-key pieces, the
/// histograms and the fixed-threshold fuse in smaller ones.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn chunked_model_selection_matches_cpu() {
    let small = budget_gpu(2 << 20);
    let sizes: Vec<usize> = [31usize, 70_000, 1_000_003]
        .into_iter()
        .filter(|&n| n <= max_elems())
        .collect();
    let mut homes = check_model_selection_on(&small, &sizes, Method::StaTaskVector, false);
    homes.extend(check_model_selection_on(
        &small,
        &sizes,
        Method::StaFinetuned,
        true,
    ));
    // Under 1.8 MiB the keys of the 70 000-element tensors do not fit beside their pass 1:
    // every pass from the inputs, f32's two tasks one at a time.
    let smaller = budget_gpu(1_887_436);
    homes.extend(check_model_selection_on(
        &smaller,
        &sizes,
        Method::StaTaskVector,
        false,
    ));
    eprintln!("keys under the 2 and 1.8 MiB budgets: {homes:?}");
    if sizes.contains(&70_000) {
        assert!(homes.contains(&KeysHome::Kept) && homes.contains(&KeysHome::Recomputed));
    }
}

/// A pass over every task at once, in chunks, that meets a later task's fault first (task 1 in
/// the first chunk, task 0 in the second): the error is the CPU's, task 0's.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn chunked_model_passes_report_the_first_task_s_fault() {
    let n = 70_000;
    if n > max_elems() {
        eprintln!("skipped: needs {n} elements (STAMERGE_TEST_MAX_ELEMS)");
        return;
    }
    // f32 with f32 gradients, 2 tasks: 24 bytes an element, so 65 536 fit 1.65 MB, 70 000 not.
    let b = budget_gpu(2_200_000);
    let extra = Extra {
        model_wide: true,
        ..Extra::default()
    };
    let recipe = recipe(Method::StaTaskVector, 2, extra);
    let mut inputs = make(n, Make::new(FloatType::F32, 2, false, 77));
    inputs.theta[1].set(5, f32::NAN);
    inputs.theta[0].set(66_000, f32::INFINITY);
    let g = inputs.group();
    let work = tensor_work(&recipe, g.name, n, FloatType::F32);
    let tasks: Vec<RankTask> = (0..2).map(|t| (t, work.spec(t).unwrap())).collect();
    let cpu = CpuBackend::new();
    let fault = |r: Result<Vec<f64>, BackendError>| match r {
        Err(BackendError::Fault(f)) => f,
        r => panic!("expected a fault, got {r:?}"),
    };
    let want = fault(cpu.score_sums(&g, &tasks));
    assert_eq!(want.source, Source::Theta(0));
    assert_eq!(want.index, 66_000);
    assert_eq!(fault(b.score_sums(&g, &tasks)), want);
}

/// A GPU with less free memory than the budget says: the arena shrinks to what is free and the
/// groups that no longer fit run in chunks, with the CPU's bytes, never an out-of-memory failure.
/// Under the fake libcuda `FAKE_CUDA_FREE_BYTES` makes the GPU small; on a real GPU the 1 TB
/// budget is simply more than it has (its first allocations fit, so this is a plain comparison).
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn less_memory_than_the_budget_falls_back_to_chunks() {
    gpu();
    struct Unset;
    impl Drop for Unset {
        fn drop(&mut self) {
            std::env::remove_var("FAKE_CUDA_FREE_BYTES");
        }
    }
    let _unset = Unset;
    std::env::set_var("FAKE_CUDA_FREE_BYTES", "1200000");
    let b = CudaBackend::with_max_memory(0, Some(1 << 40)).expect("opens with a shrunken budget");
    let fake = b.description().contains("fake libcuda");
    for (i, method) in [Method::Ties, Method::StaFinetuned, Method::DareLinear]
        .into_iter()
        .enumerate()
    {
        let n = 70_000.min(max_elems());
        let inp = make(n, Make::new(FloatType::F32, 3, i == 1, 55 + i as u64));
        let (jobs, fuse) = method_jobs(method, 3, n, &inp.name, FloatType::F32);
        let pieces = b.pieces(&inp.group(), &jobs, &fuse).unwrap();
        if fake && n == 70_000 {
            assert!(
                pieces > 1,
                "{method:?}: the shrunken budget should split the group"
            );
        }
        let next = (i == 0).then(|| inp.group());
        let what = format!("{method:?} with less memory than the budget ({pieces} pieces)");
        compare_then(&b, &inp.group(), &jobs, &fuse, &what, next.as_ref());
    }
}

/// A budget below one chunk's buffers: a clear error naming the tensor, never a crash; the
/// work does not fit this device (not an out-of-memory to retry).
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn a_chunk_over_the_budget_is_a_clear_error() {
    let small = budget_gpu(stamerge::backend::cuda::MIN_BUDGET as u64);
    let n = 20_000.min(max_elems());
    let inp = make(n, Make::new(FloatType::F32, 9, false, 4));
    let (jobs, fuse) = method_jobs(Method::StaTaskVector, 9, n, &inp.name, FloatType::F32);
    let mut out = vec![0u8; n * 4];
    match small.merge_group(&inp.group(), &jobs, &fuse, &mut out) {
        Err(BackendError::Device(e @ DeviceError::Unsupported(_))) => {
            let m = e.to_string();
            assert!(m.contains(&inp.name) && m.contains("--max-memory"), "{m}")
        }
        other => panic!("expected a budget error, got {other:?}"),
    }
}
