//! The CUDA backend against the CPU backend (the reference), bit for bit, on the same inputs:
//! every method × fp32/fp16/bf16 × sizes 1, 31, 4097, 1 000 003 × continuous and grid values
//! (forced ties at the threshold), model-wide selection across tensors, value faults, odd shapes
//! and task counts, mixed and misaligned inputs, groups processed in chunks under a small memory
//! budget, the pipelined path that copies the next group in early (docs/STREAMING.md), and whole
//! merges compared file by file.
//!
//! Without a usable GPU (no driver, no device, or a build without kernels) each GPU test prints
//! `SKIPPED (no GPU): <reason>` to stderr and passes, so the suite runs on CPU-only CI; the
//! device-selection tests at the end run everywhere.
//!
//! On a GPU machine: `cargo test --release --test gpu -- --nocapture --test-threads 1`, or the
//! prebuilt binary through scripts/gpu-check.sh.

use std::path::Path;
use std::sync::OnceLock;

use stamerge::backend::cpu::CpuBackend;
use stamerge::backend::cuda::CudaBackend;
use stamerge::backend::{
    Backend, BackendError, FuseSpec, Group, GroupStats, KeySpec, MaskJob, Raw, TaskInput,
};
use stamerge::dtype::{get, narrow, FloatType};
use stamerge::method::{keep_count, FuseRule, ScoreKind};
use stamerge::select::{dare, radix::pick_bucket, DIGITS_11};
use stamerge::{select_backend, Device};

/// The GPU backend, opened once for the whole test binary; None (with the SKIPPED line) without.
fn gpu() -> Option<&'static CudaBackend> {
    static GPU: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    match GPU.get_or_init(|| CudaBackend::new(0)) {
        Ok(b) => Some(b),
        Err(reason) => {
            // Straight to the stderr handle, not eprintln!: the test harness captures the macros,
            // and a skip must be visible in a plain `cargo test`.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED (no GPU): {reason}");
            None
        }
    }
}

const TYPES: [FloatType; 3] = [FloatType::F32, FloatType::F16, FloatType::BF16];
const SIZES: [usize; 4] = [1, 31, 4097, 1_000_003];

/// `STAMERGE_TEST_MAX_ELEMS` caps tensor sizes (scripts/emu-gpu-tests.sh runs these tests on an
/// emulated GPU, where a million elements take minutes); unset on a real GPU.
fn max_elems() -> usize {
    std::env::var("STAMERGE_TEST_MAX_ELEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX)
}

fn sizes() -> impl Iterator<Item = usize> {
    let max = max_elems();
    SIZES.into_iter().filter(move |&n| n <= max)
}

// ------------------------------------------------------------------------------------------------
// inputs

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        dare::fmix(self.0)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A tensor's bytes, optionally starting at an odd offset inside its allocation.
#[derive(Clone)]
struct Buf {
    ty: FloatType,
    bytes: Vec<u8>,
    off: usize,
}

impl Buf {
    fn new(ty: FloatType, v: &[f32], off: usize) -> Self {
        let mut bytes = vec![0u8; off + v.len() * ty.size()];
        narrow(ty, v, &mut bytes[off..]);
        Self { ty, bytes, off }
    }
    fn raw(&self) -> Raw<'_> {
        Raw {
            ty: self.ty,
            data: &self.bytes[self.off..],
        }
    }
    fn set(&mut self, i: usize, x: f32) {
        let sz = self.ty.size();
        let at = self.off + i * sz;
        narrow(self.ty, &[x], &mut self.bytes[at..at + sz]);
    }
}

/// One tensor group's inputs, owned.
#[derive(Clone)]
struct Inputs {
    name: String,
    n: usize,
    base: Buf,
    start: Option<Buf>,
    theta: Vec<Buf>,
    grad: Vec<Option<Buf>>,
}

#[derive(Clone, Copy)]
struct Make {
    ty: FloatType,
    grad_ty: FloatType,
    tasks: usize,
    /// Values on coarse grids that every dtype stores exactly: scores tie heavily, also at the
    /// threshold.
    grid: bool,
    start: Option<FloatType>,
    /// Byte offset of every buffer inside its allocation (1: misaligned for every dtype).
    misalign: usize,
    seed: u64,
}

impl Make {
    fn new(ty: FloatType, tasks: usize, grid: bool, seed: u64) -> Self {
        Self {
            ty,
            grad_ty: ty,
            tasks,
            grid,
            start: None,
            misalign: 0,
            seed,
        }
    }
}

fn make(n: usize, m: Make) -> Inputs {
    let mut r = Rng(m.seed ^ (n as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let base: Vec<f32> = (0..n)
        .map(|_| {
            if m.grid {
                (r.below(9) as f32 - 4.0) * 0.25
            } else {
                r.f() * 0.05
            }
        })
        .collect();
    let mut theta = Vec::new();
    let mut grad = Vec::new();
    for _ in 0..m.tasks {
        let th: Vec<f32> = base
            .iter()
            .map(|b| {
                let d = if m.grid {
                    (r.below(9) as f32 - 4.0) * 0.125
                } else {
                    r.f() * r.f() * 0.02
                };
                b + d
            })
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|_| {
                if m.grid {
                    r.below(4) as f32
                } else {
                    r.f().abs() * 3.0
                }
            })
            .collect();
        theta.push(Buf::new(m.ty, &th, m.misalign));
        grad.push(Some(Buf::new(m.grad_ty, &g, m.misalign)));
    }
    let start = m.start.map(|sty| {
        let s: Vec<f32> = base
            .iter()
            .map(|b| {
                if m.grid {
                    b + (r.below(3) as f32 - 1.0) * 0.5
                } else {
                    b + r.f() * 0.01
                }
            })
            .collect();
        Buf::new(sty, &s, m.misalign)
    });
    Inputs {
        name: format!("model.layers.{}.mlp.up_proj.weight", m.seed % 7),
        n,
        base: Buf::new(m.ty, &base, m.misalign),
        start,
        theta,
        grad,
    }
}

impl Inputs {
    fn group(&self) -> Group<'_> {
        Group {
            name: &self.name,
            n: self.n,
            base: self.base.raw(),
            start: self.start.as_ref().map(Buf::raw),
            tasks: self
                .theta
                .iter()
                .zip(&self.grad)
                .map(|(th, g)| TaskInput {
                    theta: th.raw(),
                    grad: g.as_ref().map(Buf::raw),
                })
                .collect(),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// methods as backend jobs

#[derive(Clone, Copy, Debug, PartialEq)]
enum Method {
    TaskArithmetic,
    Magnitude,
    Ties,
    DareLinear,
    DareTies,
    StaFinetuned,
    StaTaskVector,
    /// sta with the last task under `forget:` and a start model.
    Forget,
}

const METHODS: [Method; 8] = [
    Method::TaskArithmetic,
    Method::Magnitude,
    Method::Ties,
    Method::DareLinear,
    Method::DareTies,
    Method::StaFinetuned,
    Method::StaTaskVector,
    Method::Forget,
];

const DENSITIES: [f64; 4] = [0.3, 0.5, 0.1, 0.7];
const WEIGHTS: [f32; 4] = [1.0, 0.5, 0.75, 1.25];

fn spec(score: ScoreKind) -> KeySpec {
    KeySpec {
        score,
        mean: None,
        nonfinite_zero: false,
    }
}

/// The jobs and fuse of `method` for a group of `nt` tasks and `n` elements.
fn method_jobs(
    method: Method,
    nt: usize,
    n: usize,
    name: &str,
    out: FloatType,
) -> (Vec<MaskJob>, FuseSpec) {
    let d = |t: usize| DENSITIES[t % DENSITIES.len()];
    let topk = |score: ScoreKind| -> Vec<MaskJob> {
        (0..nt)
            .map(|t| MaskJob::TopK {
                spec: spec(score),
                k: keep_count(d(t), n as u64),
            })
            .collect()
    };
    let dare_jobs = || -> Vec<MaskJob> {
        (0..nt)
            .map(|t| MaskJob::Random {
                stream: dare::stream(42, t, name),
                threshold: dare::threshold(d(t)),
            })
            .collect()
    };
    let jobs = match method {
        Method::TaskArithmetic => vec![MaskJob::All; nt],
        Method::Magnitude | Method::Ties => topk(ScoreKind::AbsTaskVector),
        Method::DareLinear | Method::DareTies => dare_jobs(),
        Method::StaFinetuned | Method::Forget => topk(ScoreKind::AbsWeightGrad),
        Method::StaTaskVector => topk(ScoreKind::AbsTaskVectorGrad),
    };
    let rule = match method {
        Method::Ties | Method::DareTies => FuseRule::Ties,
        _ => FuseRule::Linear,
    };
    let is_dare = matches!(method, Method::DareLinear | Method::DareTies);
    let fuse = FuseSpec {
        rule,
        lambda: if method == Method::TaskArithmetic {
            0.5
        } else {
            0.8
        },
        normalize: rule == FuseRule::Ties || method == Method::DareLinear,
        weights: (0..nt).map(|t| WEIGHTS[t % WEIGHTS.len()]).collect(),
        forget: (0..nt)
            .map(|t| method == Method::Forget && nt > 1 && t == nt - 1)
            .collect(),
        rescale: (0..nt).map(|t| is_dare.then_some(d(t) as f32)).collect(),
        out,
    };
    (jobs, fuse)
}

// ------------------------------------------------------------------------------------------------
// comparison

fn first_difference(a: &[u8], b: &[u8], ty: FloatType) -> String {
    let sz = ty.size();
    let i = (0..a.len() / sz)
        .find(|&i| a[i * sz..(i + 1) * sz] != b[i * sz..(i + 1) * sz])
        .expect("the buffers differ");
    format!(
        "element {i}: cpu {} ({:02x?}) vs cuda {} ({:02x?})",
        get(ty, a, i),
        &a[i * sz..(i + 1) * sz],
        get(ty, b, i),
        &b[i * sz..(i + 1) * sz]
    )
}

/// Merges `g` on both backends and asserts the same bytes and statistics, or the same fault.
/// Returns the CPU's statistics (None on a fault).
fn compare(
    cuda: &CudaBackend,
    g: &Group,
    jobs: &[MaskJob],
    f: &FuseSpec,
    what: &str,
) -> Option<GroupStats> {
    compare_then(cuda, g, jobs, f, what, None)
}

/// As [`compare`], the cuda backend told that `next` comes after `g` (the pipeline's call).
fn compare_then(
    cuda: &CudaBackend,
    g: &Group,
    jobs: &[MaskJob],
    f: &FuseSpec,
    what: &str,
    next: Option<&Group>,
) -> Option<GroupStats> {
    let cpu = CpuBackend::new();
    let mut want = vec![0u8; g.n * f.out.size()];
    let mut got = vec![0xA5u8; g.n * f.out.size()];
    let rc = cpu.merge_group(g, jobs, f, &mut want);
    let rg = cuda.merge_group_with_next(g, jobs, f, &mut got, next);
    match (rc, rg) {
        (Ok(sc), Ok(sg)) => {
            if want != got {
                panic!(
                    "{what}: outputs differ at {}",
                    first_difference(&want, &got, f.out)
                );
            }
            assert_eq!(sc, sg, "{what}: statistics");
            Some(sc)
        }
        (Err(BackendError::Fault(x)), Err(BackendError::Fault(y))) => {
            assert_eq!(x, y, "{what}: fault");
            None
        }
        (x, y) => panic!("{what}: cpu {x:?} vs cuda {y:?}"),
    }
}

/// Every size and dtype, continuous and grid values, for one method.
fn check_method(method: Method) {
    let Some(cuda) = gpu() else { return };
    for ty in TYPES {
        for grid in [false, true] {
            for n in sizes() {
                let mut m = Make::new(ty, 3, grid, 11 + n as u64);
                if method == Method::Forget {
                    m.start = Some(ty);
                }
                // sta's gradient statistics are often fp32 beside bf16/fp16 weights.
                if matches!(method, Method::StaFinetuned | Method::Forget) && ty != FloatType::F32 {
                    m.grad_ty = FloatType::F32;
                }
                let inp = make(n, m);
                let (jobs, fuse) = method_jobs(method, 3, n, &inp.name, ty);
                let what = format!("{method:?} {ty:?} n={n} grid={grid}");
                let stats = compare(cuda, &inp.group(), &jobs, &fuse, &what)
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

#[test]
fn task_arithmetic_matches_cpu() {
    check_method(Method::TaskArithmetic);
}

#[test]
fn magnitude_matches_cpu() {
    check_method(Method::Magnitude);
}

#[test]
fn ties_matches_cpu() {
    check_method(Method::Ties);
}

#[test]
fn dare_linear_matches_cpu() {
    check_method(Method::DareLinear);
}

#[test]
fn dare_ties_matches_cpu() {
    check_method(Method::DareTies);
}

#[test]
fn sta_finetuned_matches_cpu() {
    check_method(Method::StaFinetuned);
}

#[test]
fn sta_task_vector_matches_cpu() {
    check_method(Method::StaTaskVector);
}

#[test]
fn forgetting_matches_cpu() {
    check_method(Method::Forget);
}

// ------------------------------------------------------------------------------------------------
// selection: model

struct ModelSelection {
    sums: Vec<u64>,
    means: Vec<f32>,
    key: u32,
    quota: u64,
    prefixes: Vec<u32>,
}

/// The pipeline's model-wide passes (src/pipeline.rs `model_selection`) for one task, with the
/// backend's own digits.
fn model_selection(
    b: &dyn Backend,
    groups: &[Group],
    t: usize,
    sp: KeySpec,
    d: f64,
) -> ModelSelection {
    let mut sums = Vec::new();
    let mut means = Vec::new();
    let mut total = 0u64;
    for g in groups {
        let s = b.score_sum(g, t, &sp).expect("score_sum");
        sums.push(s.to_bits());
        means.push((s / g.n as f64) as f32);
        total += g.n as u64;
    }
    let mut remaining = keep_count(d, total);
    let mut prefix = 0u32;
    let mut prefixes = vec![0];
    for &(shift, bits) in b.model_digits() {
        let mut hist = vec![0u64; 1 << bits];
        for (j, g) in groups.iter().enumerate() {
            let s = KeySpec {
                mean: Some(means[j]),
                ..sp
            };
            b.histogram(g, t, &s, shift, bits, prefix, &mut hist)
                .expect("histogram");
        }
        let (bucket, above) = pick_bucket(&hist, remaining);
        remaining -= above;
        prefix = (prefix << bits) | bucket;
        prefixes.push(prefix);
    }
    ModelSelection {
        sums,
        means,
        key: prefix,
        quota: remaining,
        prefixes,
    }
}

fn check_model_selection(score: ScoreKind, nonfinite_zero: bool) {
    let Some(cuda) = gpu() else { return };
    check_model_selection_on(cuda, &sizes().collect::<Vec<_>>(), score, nonfinite_zero);
}

fn check_model_selection_on(
    cuda: &CudaBackend,
    sizes: &[usize],
    score: ScoreKind,
    nonfinite_zero: bool,
) {
    let cpu = CpuBackend::new();
    for ty in TYPES {
        for grid in [false, true] {
            let nt = 2;
            let inputs: Vec<Inputs> = sizes
                .iter()
                .copied()
                .enumerate()
                .map(|(j, n)| {
                    let mut m = Make::new(ty, nt, grid, 100 + j as u64);
                    if ty != FloatType::F32 {
                        m.grad_ty = FloatType::F32;
                    }
                    make(n, m)
                })
                .collect();
            let groups: Vec<Group> = inputs.iter().map(Inputs::group).collect();
            let what = format!("model selection {score:?} {ty:?} grid={grid}");
            let sp = KeySpec {
                score,
                mean: None,
                nonfinite_zero,
            };
            let mut fixed = Vec::new();
            for (t, &d) in DENSITIES.iter().enumerate().take(nt) {
                let c = model_selection(&cpu, &groups, t, sp, d);
                let g = model_selection(cuda, &groups, t, sp, d);
                assert_eq!(c.sums, g.sums, "{what}: task {t}: deterministic sums");
                assert_eq!(c.key, g.key, "{what}: task {t}: threshold");
                assert_eq!(c.quota, g.quota, "{what}: task {t}: tie quota");
                // The 11/11/10-bit histograms themselves, on both backends, at the prefixes the
                // device's passes chose.
                for (p, &(shift, bits)) in DIGITS_11.iter().enumerate() {
                    for (j, grp) in groups.iter().enumerate() {
                        let s = KeySpec {
                            mean: Some(g.means[j]),
                            ..sp
                        };
                        let mut hc = vec![0u64; 1 << bits];
                        let mut hg = vec![0u64; 1 << bits];
                        cpu.histogram(grp, t, &s, shift, bits, g.prefixes[p], &mut hc)
                            .unwrap();
                        cuda.histogram(grp, t, &s, shift, bits, g.prefixes[p], &mut hg)
                            .unwrap();
                        assert!(
                            hc == hg,
                            "{what}: task {t} tensor {j} digit {p}: histograms"
                        );
                    }
                }
                fixed.push(c);
            }
            // The fuse pass: tensors in plan order, the tie quota spent as the pipeline does.
            let mut quota: Vec<u64> = fixed.iter().map(|m| m.quota).collect();
            for (j, grp) in groups.iter().enumerate() {
                let jobs: Vec<MaskJob> = (0..nt)
                    .map(|t| MaskJob::Fixed {
                        spec: KeySpec {
                            mean: Some(fixed[t].means[j]),
                            ..sp
                        },
                        key: fixed[t].key,
                        tie_quota: quota[t],
                    })
                    .collect();
                let (_, fuse) = method_jobs(Method::StaTaskVector, nt, grp.n, grp.name, ty);
                let stats = compare(cuda, grp, &jobs, &fuse, &format!("{what} tensor {j}"))
                    .unwrap_or_else(|| panic!("{what}: unexpected fault"));
                for (q, st) in quota.iter_mut().zip(&stats.tasks) {
                    *q -= st.ties_kept;
                }
            }
            assert!(
                quota.iter().all(|&q| q == 0),
                "{what}: every tie handed out"
            );
        }
    }
}

#[test]
fn model_selection_task_vector_matches_cpu() {
    check_model_selection(ScoreKind::AbsTaskVectorGrad, false);
}

#[test]
fn model_selection_finetuned_and_magnitude_match_cpu() {
    check_model_selection(ScoreKind::AbsWeightGrad, true);
    check_model_selection(ScoreKind::AbsTaskVector, false);
}

// ------------------------------------------------------------------------------------------------
// faults, shapes, mixed inputs

/// Non-finite inputs: the same fault (input, index, NaN or Inf) from both backends.
#[test]
fn faults_match_cpu() {
    let Some(cuda) = gpu() else { return };
    let n = 4097.min(max_elems());
    for ty in TYPES {
        let huge = if ty == FloatType::F16 { 6e4 } else { 3e38 };
        type Spoil = Box<dyn Fn(&mut Inputs)>;
        let cases: Vec<(&str, Method, Spoil)> = vec![
            (
                "theta NaN",
                Method::Magnitude,
                Box::new(|i| i.theta[1].set(700, f32::NAN)),
            ),
            (
                "base Inf",
                Method::Ties,
                Box::new(|i| i.base.set(33, f32::INFINITY)),
            ),
            (
                "grad NaN and a later theta Inf",
                Method::StaFinetuned,
                Box::new(|i| {
                    i.grad[0].as_mut().unwrap().set(4000, f32::NAN);
                    i.theta[0].set(4001, f32::INFINITY);
                }),
            ),
            (
                "score overflow",
                Method::StaFinetuned,
                Box::new(move |i| {
                    i.theta[2].set(9, huge);
                    i.grad[2].as_mut().unwrap().set(9, huge);
                }),
            ),
            (
                "base Inf under |θ·G| (found by the fuse)",
                Method::StaFinetuned,
                Box::new(|i| i.base.set(100, -f32::INFINITY)),
            ),
            (
                "start NaN and theta NaN at one index",
                Method::Forget,
                Box::new(|i| {
                    i.start.as_mut().unwrap().set(50, f32::NAN);
                    i.theta[0].set(50, f32::NAN);
                }),
            ),
            (
                "a later task's score fault beats an earlier fuse fault",
                Method::StaTaskVector,
                Box::new(|i| {
                    i.grad[0] = None; // task 0 keeps everything, see below
                    i.theta[0].set(2, f32::NAN);
                    i.grad[1].as_mut().unwrap().set(3000, f32::INFINITY);
                }),
            ),
            (
                "tau NaN without scores",
                Method::DareTies,
                Box::new(|i| i.theta[2].set(5, f32::NAN)),
            ),
        ];
        for (name, method, spoil) in cases {
            if name == "score overflow" && ty == FloatType::F16 {
                continue; // the largest f16 product (65504²) is a finite f32
            }
            let mut m = Make::new(ty, 3, false, 7);
            if method == Method::Forget {
                m.start = Some(ty);
            }
            let mut inp = make(n, m);
            spoil(&mut inp);
            let (mut jobs, fuse) = method_jobs(method, 3, n, &inp.name, ty);
            if inp.grad[0].is_none() {
                jobs[0] = MaskJob::All;
            }
            let what = format!("{name} ({method:?} {ty:?})");
            assert!(
                compare(cuda, &inp.group(), &jobs, &fuse, &what).is_none(),
                "{what}: expected a fault"
            );
            // nonfinite_scores: zero — scores become 0; τ and start faults remain.
            for j in jobs.iter_mut() {
                if let MaskJob::TopK { spec, .. } = j {
                    spec.nonfinite_zero = true;
                }
            }
            compare(
                cuda,
                &inp.group(),
                &jobs,
                &fuse,
                &format!("{what}, nonfinite zero"),
            );
        }
    }
}

/// Task counts 1, 2, 8 (the largest with a combination histogram) and 9, sizes around the
/// kernels' group (8), word (64), tile (8192) and chunk (65 536) boundaries, empty tensors, and
/// densities from a single kept entry to all.
#[test]
fn shapes_and_task_counts_match_cpu() {
    let Some(cuda) = gpu() else { return };
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
fn other_mask_jobs_match_cpu() {
    let Some(cuda) = gpu() else { return };
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
fn mixed_dtypes_and_misaligned_inputs_match_cpu() {
    let Some(cuda) = gpu() else { return };
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
fn buffer_reuse_across_groups_matches_cpu() {
    let Some(cuda) = gpu() else { return };
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

// ------------------------------------------------------------------------------------------------
// chunks under a memory budget

/// A budget that splits the synthetic model's embedding (64 000 bf16 elements, 3 tasks) into
/// chunks and still holds the 65 536-key chunks of the model-wide score sums.
const E2E_BUDGET: u64 = 1 << 20;

/// A second backend on the same GPU whose memory budget is `budget` bytes.
fn budget_gpu(budget: u64) -> Option<CudaBackend> {
    gpu()?;
    Some(CudaBackend::with_max_memory(0, Some(budget)).expect("a second backend on the GPU"))
}

/// Sizes for the chunked tests: large enough to need several chunks under the small budgets.
fn chunk_sizes() -> Vec<usize> {
    [4097usize, 70_000, 1_000_003]
        .into_iter()
        .filter(|&n| n <= max_elems())
        .collect()
}

/// Every method and dtype, continuous values and heavy ties, with a budget of 1 MiB (768 KiB of
/// it for the working arena): groups run in chunks of 8192 to 32 768 elements (per-tensor top-k from histogram passes over the
/// chunks, the ties handed out in index order), and must give the CPU's bytes and statistics.
#[test]
fn chunked_methods_match_cpu() {
    let Some(small) = budget_gpu(1 << 20) else {
        return;
    };
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
fn chunked_tie_quotas_match_cpu() {
    let Some(small) = budget_gpu(1 << 20) else {
        return;
    };
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
fn chunked_faults_match_cpu() {
    let Some(small) = budget_gpu(1 << 20) else {
        return;
    };
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
fn chunked_model_selection_matches_cpu() {
    let Some(small) = budget_gpu(2 << 20) else {
        return;
    };
    let sizes: Vec<usize> = [31usize, 70_000, 1_000_003]
        .into_iter()
        .filter(|&n| n <= max_elems())
        .collect();
    check_model_selection_on(&small, &sizes, ScoreKind::AbsTaskVectorGrad, false);
    check_model_selection_on(&small, &sizes, ScoreKind::AbsWeightGrad, true);
}

/// A GPU with less free memory than the budget says: the arena shrinks to what is free and the
/// groups that no longer fit run in chunks, with the CPU's bytes, never an out-of-memory failure.
/// Under the fake libcuda `FAKE_CUDA_FREE_BYTES` makes the GPU small; on a real GPU the 1 TB
/// budget is simply more than it has (its first allocations fit, so this is a plain comparison).
#[test]
fn less_memory_than_the_budget_falls_back_to_chunks() {
    if gpu().is_none() {
        return;
    }
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

/// A budget below one chunk's buffers: a clear error naming the tensor, never a crash.
#[test]
fn a_chunk_over_the_budget_is_a_clear_error() {
    let Some(small) = budget_gpu(stamerge::backend::cuda::MIN_BUDGET as u64) else {
        return;
    };
    let n = 20_000.min(max_elems());
    let inp = make(n, Make::new(FloatType::F32, 9, false, 4));
    let (jobs, fuse) = method_jobs(Method::StaTaskVector, 9, n, &inp.name, FloatType::F32);
    let mut out = vec![0u8; n * 4];
    match small.merge_group(&inp.group(), &jobs, &fuse, &mut out) {
        Err(BackendError::Device(m)) => {
            assert!(m.contains(&inp.name) && m.contains("--max-memory"), "{m}")
        }
        other => panic!("expected a budget error, got {other:?}"),
    }
}

/// The pipeline's overlapped path: each group merged while the next one's inputs are read and
/// copied in (`merge_group_with_next`), across groups of changing sizes, methods and dtypes, with
/// a wrong guess of the next group, groups too large to stage, and a ring whose 128 KiB slots
/// each tensor passes through in several pieces: the CPU's bytes every time.
#[test]
fn pipelined_groups_match_cpu() {
    // 2 MiB for the next group's inputs: a 70 000-element f32 group with a start model is not
    // staged, the others are.
    let Some(cuda) = budget_gpu(8 << 20) else {
        return;
    };
    let cases: Vec<(Inputs, Method, FloatType)> =
        [4097usize, 70_000, 31, 65_537, 1, 20_000, 70_000]
            .into_iter()
            .enumerate()
            .map(|(i, n)| {
                let n = n.min(max_elems());
                let method = METHODS[(i + 3) % METHODS.len()];
                let ty = TYPES[i % TYPES.len()];
                let mut m = Make::new(ty, 3, i % 2 == 0, 200 + i as u64);
                m.start = (method == Method::Forget).then_some(ty);
                (make(n, m), method, ty)
            })
            .collect();
    let decoy = make(
        20_000.min(max_elems()),
        Make::new(FloatType::F16, 3, false, 999),
    );
    for (i, (inp, method, ty)) in cases.iter().enumerate() {
        // The next group as the pipeline hands it over; once a group that never comes.
        let next = if i == 3 {
            Some(decoy.group())
        } else {
            cases.get(i + 1).map(|c| c.0.group())
        };
        let (jobs, fuse) = method_jobs(*method, 3, inp.n, &inp.name, *ty);
        let what = format!("pipelined {method:?} {ty:?} n={} (group {i})", inp.n);
        compare_then(&cuda, &inp.group(), &jobs, &fuse, &what, next.as_ref());
    }
    assert!(
        cuda.staged_inputs() > 0,
        "no input came from the staging of the previous call"
    );
}

/// `merge_group_deferred`: outputs come back one call late (copied out while the next group
/// computes) or at once (larger than the 128 KiB kept aside under this budget, chunked, or on the
/// CPU), always in call order and each once, with the CPU's bytes; statistics and faults are
/// the call's own; after a fault nothing stale is handed back.
#[test]
fn deferred_outputs_match_cpu() {
    // 2 MiB: 1.5 MiB work arena (70 000 f32 elements run in chunks), 128 KiB for the output.
    let Some(cuda) = budget_gpu(2 << 20) else {
        return;
    };
    let cpu = CpuBackend::new();
    let plan: [(usize, Method, FloatType, bool); 9] = [
        (4097, Method::Ties, FloatType::F32, false),
        (20_000, Method::StaFinetuned, FloatType::BF16, false),
        (31, Method::DareTies, FloatType::F16, false),
        (50_000, Method::Magnitude, FloatType::F32, false),
        (70_000, Method::StaTaskVector, FloatType::F32, false),
        (4097, Method::Magnitude, FloatType::F16, true),
        (1, Method::TaskArithmetic, FloatType::BF16, false),
        (20_000, Method::Forget, FloatType::F16, false),
        (4097, Method::Ties, FloatType::BF16, false),
    ];
    let cases: Vec<(Inputs, Method, FloatType, bool)> = plan
        .iter()
        .enumerate()
        .map(|(i, &(n, method, ty, fault))| {
            let mut m = Make::new(ty, 3, i % 3 == 1, 300 + i as u64);
            m.start = (method == Method::Forget).then_some(ty);
            let mut inp = make(n.min(max_elems()), m);
            if fault {
                inp.theta[1].set(inp.n / 2, f32::NAN);
            }
            (inp, method, ty, fault)
        })
        .collect();
    let (mut want, mut got) = (Vec::new(), Vec::new());
    let mut late = 0;
    for (i, (inp, method, ty, fault)) in cases.iter().enumerate() {
        let g = inp.group();
        let next = cases.get(i + 1).map(|c| c.0.group());
        let (jobs, fuse) = method_jobs(*method, 3, inp.n, &inp.name, *ty);
        let what = format!("deferred {method:?} {ty:?} n={} (group {i})", inp.n);
        let mut expect = vec![0u8; g.n * fuse.out.size()];
        let rc = cpu.merge_group(&g, &jobs, &fuse, &mut expect);
        if *fault {
            // Everything before the fault is collected first: an error drops what is held.
            got.extend(cuda.flush_outputs().expect("flush"));
        }
        let rg =
            cuda.merge_group_deferred(&g, &jobs, &fuse, vec![0xA5; expect.len()], next.as_ref());
        match (rc, rg) {
            (Ok(sc), Ok((sg, outs))) => {
                assert_eq!(sc, sg, "{what}: statistics");
                late += outs.is_empty() as usize;
                got.extend(outs);
                want.push(expect);
            }
            (Err(BackendError::Fault(x)), Err(BackendError::Fault(y))) => {
                assert_eq!(x, y, "{what}: fault");
                let stale = cuda.flush_outputs().expect("flush after a fault");
                assert!(
                    stale.is_empty(),
                    "{what}: {} outputs held after a fault",
                    stale.len()
                );
            }
            (x, y) => panic!("{what}: cpu {x:?} vs cuda {:?}", y.map(|r| r.0)),
        }
    }
    got.extend(cuda.flush_outputs().expect("flush"));
    assert_eq!(got.len(), want.len(), "outputs handed back");
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        if w != g {
            panic!(
                "deferred output {i} differs: {} bytes vs {}",
                w.len(),
                g.len()
            );
        }
    }
    assert!(
        cuda.deferred_outputs() > 0,
        "no output was copied back late"
    );
    assert!(late > 0, "every call handed its own output back");
}

// ------------------------------------------------------------------------------------------------
// end to end

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every recipe `stamerge synth` writes (all methods, model-wide selection, forgetting), merged
/// with `--device cuda` and `--device cpu`: the same files, byte for byte, and the same report
/// rows.
#[test]
fn end_to_end_merges_are_identical() {
    let Some(_) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let spec = stamerge::synth::SynthSpec {
        layers: 2,
        hidden: 64,
        intermediate: 176,
        vocab: 1000,
        tasks: 3,
        dtype: FloatType::BF16,
        grad_dtype: FloatType::BF16,
        shard_bytes: 200_000,
        seed: 5,
    };
    stamerge::synth::generate(&spec, dir.path()).unwrap();
    for (name, _) in stamerge::synth::recipes(spec.tasks) {
        let recipe = stamerge::Recipe::from_file(&dir.path().join(&name)).unwrap();
        let mut reports = Vec::new();
        // The third run has a GPU memory budget that splits the larger tensors into chunks.
        for (device, max_memory) in [
            (Device::Cpu, None),
            (Device::Cuda, None),
            (Device::Cuda, Some(E2E_BUDGET)),
        ] {
            let opts = stamerge::Options {
                device,
                out_shard_size: 300_000,
                overwrite: true,
                max_memory,
                ..Default::default()
            };
            let out = dir
                .path()
                .join(format!("out-{device:?}-{}", max_memory.unwrap_or(0)));
            let rep = stamerge::merge(&recipe, &out, &opts)
                .unwrap_or_else(|e| panic!("{name} on {device:?}: {e}"));
            assert_eq!(
                rep.backend,
                if device == Device::Cpu { "cpu" } else { "cuda" }
            );
            reports.push(rep);
        }
        let a = dir.path().join("out-Cpu-0");
        for (b, rep) in [
            (dir.path().join("out-Cuda-0"), &reports[1]),
            (
                dir.path().join(format!("out-Cuda-{E2E_BUDGET}")),
                &reports[2],
            ),
        ] {
            assert_eq!(files(&a), files(&b), "{name}: output files");
            for f in files(&a) {
                if f == stamerge::REPORT_NAME {
                    continue; // times and the backend name differ
                }
                let (x, y) = (
                    std::fs::read(a.join(&f)).unwrap(),
                    std::fs::read(b.join(&f)).unwrap(),
                );
                assert!(
                    x == y,
                    "{name}: {f} differs between cpu and {}",
                    b.display()
                );
            }
            let rows = |r: &stamerge::Report| {
                serde_json::to_value((&r.tensors, &r.model_selection)).unwrap()
            };
            assert_eq!(rows(&reports[0]), rows(rep), "{name}: report rows");
        }
    }
}

// ------------------------------------------------------------------------------------------------
// device selection (runs everywhere)

/// Without a GPU, `--device cuda` is a clear error and `--device auto` falls back to the CPU;
/// with one, both give the cuda backend.
#[test]
fn device_selection_is_clear_with_or_without_a_gpu() {
    match CudaBackend::new(0) {
        Err(reason) => {
            assert!(!reason.is_empty());
            match select_backend(Device::Cuda) {
                Ok(b) => panic!("--device cuda gave the {} backend without a GPU", b.name()),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("--device cuda") && msg.contains(&reason),
                        "{msg}"
                    );
                }
            }
            let auto = select_backend(Device::Auto).expect("auto falls back to the cpu");
            assert_eq!(auto.name(), "cpu");
        }
        Ok(_) => {
            assert_eq!(select_backend(Device::Cuda).unwrap().name(), "cuda");
            assert_eq!(select_backend(Device::Auto).unwrap().name(), "cuda");
        }
    }
    assert_eq!(select_backend(Device::Cpu).unwrap().name(), "cpu");
}

/// `stamerge plan --max-memory`: how many tensor groups would run in chunks (runs everywhere:
/// the plan reads headers only). A budget below every group's need chunks all merged tensors, a
/// huge one none.
#[test]
fn plan_reports_the_gpu_memory_budget() {
    let bin = env!("CARGO_BIN_EXE_stamerge");
    let dir = tempfile::tempdir().unwrap();
    stamerge::synth::generate(&stamerge::synth::SynthSpec::default(), dir.path()).unwrap();
    let recipe = dir.path().join("sta.yml");
    let plan = |mem: &str| {
        let o = std::process::Command::new(bin)
            .args(["plan", recipe.to_str().unwrap(), "--max-memory", mem])
            .output()
            .expect("run stamerge");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let merged = plan("1TB")
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("merge"))
        .count();
    assert!(merged > 0);
    let line = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("cuda: GPU memory budget"))
            .unwrap_or_else(|| panic!("no budget line in:\n{out}"))
            .to_string()
    };
    assert!(line(&plan("1TB")).ends_with("; 0 group(s) over the budget run in chunks"));
    let tiny = line(&plan("1KB"));
    assert!(
        tiny.ends_with(&format!(
            "; {merged} group(s) over the budget run in chunks"
        )),
        "{tiny} (expected all {merged} merged tensors)"
    );
}

/// The CLI without a GPU: `merge --device cuda` and `bench kernels` exit non-zero with the
/// reason; `merge --device auto` merges on the CPU.
#[test]
fn cli_without_a_gpu_fails_clearly() {
    if CudaBackend::new(0).is_ok() {
        return; // covered by the tests above on this machine
    }
    let bin = env!("CARGO_BIN_EXE_stamerge");
    let dir = tempfile::tempdir().unwrap();
    stamerge::synth::generate(&stamerge::synth::SynthSpec::default(), dir.path()).unwrap();
    let recipe = dir.path().join("ties.yml");
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .output()
            .expect("run stamerge")
    };
    let out = dir.path().join("out");
    let o = run(&[
        "merge",
        recipe.to_str().unwrap(),
        out.to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "merge --device cuda succeeded without a GPU"
    );
    assert!(err.contains("--device cuda:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "no output folder after a failed start");

    let o = run(&["bench", "kernels", "--size", "1000"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("bench kernels cannot run: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let o = run(&[
        "merge",
        recipe.to_str().unwrap(),
        out.to_str().unwrap(),
        "--device",
        "auto",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("using the cpu backend"), "{err}");
}
