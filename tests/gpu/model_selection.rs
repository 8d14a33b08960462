//! `selection: model`: the model-wide passes (score sums, digit histograms, the threshold and
//! its tie quota) and the fixed-threshold fuse, on both backends.

use stamerge::backend::cpu::CpuBackend;
use stamerge::backend::cuda::CudaBackend;
use stamerge::backend::{Compute, DigitPass, Group, KeySpec, KeysHome, RankTask};
use stamerge::dtype::FloatType;
use stamerge::method::keep_count;
use stamerge::plan::work::{model_wide_tasks, ModelCut, TensorWork};
use stamerge::select::{DigitSearch, DIGITS_11};

use crate::compare::compare;
use crate::inputs::{make, Inputs, Make};
use crate::recipes::{recipe, tensor_work, Extra, Method};
use crate::{gpu, sizes, TYPES};

/// What the model-wide passes of one task found.
pub struct ModelSelection {
    /// The deterministic score sum of each tensor (as bits).
    pub sums: Vec<u64>,
    pub means: Vec<f32>,
    /// The threshold key and how many keys equal to it are kept.
    pub key: u32,
    pub quota: u64,
    /// The prefix before each digit pass, then the key.
    pub prefixes: Vec<u32>,
}

/// The pipeline's model-wide passes (src/pipeline.rs `model_selection`) for task `t` over
/// `groups` (their work in `works`), keeping `density` of the model's keys, with the backend's
/// own digits.
fn model_selection(
    b: &dyn Compute,
    groups: &[Group],
    works: &[TensorWork],
    t: usize,
    density: f64,
) -> ModelSelection {
    let spec = |j: usize| works[j].spec(t).expect("a model-wide task ranks");
    let mut sums = Vec::new();
    let mut means = Vec::new();
    let mut total = 0u64;
    for (j, g) in groups.iter().enumerate() {
        let s = b.score_sum(g, t, &spec(j)).expect("score_sum");
        sums.push(s.to_bits());
        means.push((s / g.n as f64) as f32);
        total += g.n as u64;
    }
    let mut search = DigitSearch::new(keep_count(density, total));
    let mut prefixes = vec![search.prefix()];
    for &(shift, bits) in b.model_digits() {
        let mut hist = vec![0u64; 1 << bits];
        for (j, g) in groups.iter().enumerate() {
            let s = KeySpec {
                mean: Some(means[j]),
                ..spec(j)
            };
            b.histogram(g, t, &s, search.pass(shift, bits), &mut hist)
                .expect("histogram");
        }
        search.advance(bits, &hist).expect("the digit search");
        prefixes.push(search.prefix());
    }
    ModelSelection {
        sums,
        means,
        key: search.prefix(),
        quota: search.quota(),
        prefixes,
    }
}

/// The passes as the pipeline runs them: every task of a tensor in one call, the keys where
/// `begin_model_passes` puts them. Per task: the sums (as bits), the threshold key and quota.
fn model_selection_all(
    b: &dyn Compute,
    groups: &[Group],
    works: &[TensorWork],
    densities: &[f64],
) -> (KeysHome, Vec<(Vec<u64>, u32, u64)>) {
    let nt = densities.len();
    let specs =
        |j: usize| -> Vec<RankTask> { (0..nt).map(|t| (t, works[j].spec(t).unwrap())).collect() };
    let all: Vec<(Group, Vec<RankTask>)> = groups
        .iter()
        .enumerate()
        .map(|(j, g)| (g.clone(), specs(j)))
        .collect();
    let home = b.begin_model_passes(&all).expect("begin_model_passes");
    let mut sums = vec![Vec::new(); nt];
    let mut means = vec![Vec::new(); nt];
    let mut total = 0u64;
    for (j, g) in groups.iter().enumerate() {
        let s = b.score_sums(g, &specs(j)).expect("score_sums");
        for t in 0..nt {
            sums[t].push(s[t].to_bits());
            means[t].push((s[t] / g.n as f64) as f32);
        }
        total += g.n as u64;
    }
    let mut search: Vec<DigitSearch> = densities
        .iter()
        .map(|&d| DigitSearch::new(keep_count(d, total)))
        .collect();
    for &(shift, bits) in b.model_digits() {
        let mut hists = vec![vec![0u64; 1 << bits]; nt];
        let d: Vec<DigitPass> = search.iter().map(|s| s.pass(shift, bits)).collect();
        for (j, g) in groups.iter().enumerate() {
            let mut sp = specs(j);
            for (t, s) in sp.iter_mut() {
                s.mean = Some(means[*t][j]);
            }
            b.histograms(g, &sp, &d, &mut hists).expect("histograms");
        }
        for (s, h) in search.iter_mut().zip(&hists) {
            s.advance(bits, h).expect("the digit search");
        }
    }
    b.end_model_passes().expect("end_model_passes");
    let found = (0..nt)
        .map(|t| (sums[t].clone(), search[t].prefix(), search[t].quota()))
        .collect();
    (home, found)
}

/// `method`'s keys (with `nonfinite_scores: zero` if asked) ranked over the whole model.
fn check_model_selection(method: Method, nonfinite_zero: bool) {
    let cuda = gpu();
    let homes =
        check_model_selection_on(cuda, &sizes().collect::<Vec<_>>(), method, nonfinite_zero);
    assert!(homes.iter().all(|&h| h == KeysHome::Kept), "{homes:?}");
}

/// A model of one tensor per size in `sizes`, 2 tasks: the passes, the histograms at the
/// prefixes the device's passes chose, and the fuse of each tensor in plan order with the
/// tie quota spent as the pipeline spends it.
pub fn check_model_selection_on(
    cuda: &CudaBackend,
    sizes: &[usize],
    method: Method,
    nonfinite_zero: bool,
) -> Vec<KeysHome> {
    let cpu = CpuBackend::new();
    let nt = 2;
    let extra = Extra {
        model_wide: true,
        nonfinite_zero,
        ..Extra::default()
    };
    let recipe = recipe(method, nt, extra);
    assert_eq!(model_wide_tasks(&recipe), (0..nt).collect::<Vec<_>>());
    let mut homes = Vec::new();
    for ty in TYPES {
        for grid in [false, true] {
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
            let works: Vec<TensorWork> = groups
                .iter()
                .map(|g| tensor_work(&recipe, g.name, g.n, ty))
                .collect();
            let what = format!("model selection {method:?} {extra:?} {ty:?} grid={grid}");
            let mut fixed = Vec::new();
            for t in 0..nt {
                let d = recipe.tasks[t].model_density;
                let c = model_selection(&cpu, &groups, &works, t, d);
                let g = model_selection(cuda, &groups, &works, t, d);
                assert_eq!(c.sums, g.sums, "{what}: task {t}: deterministic sums");
                assert_eq!(c.key, g.key, "{what}: task {t}: threshold");
                assert_eq!(c.quota, g.quota, "{what}: task {t}: tie quota");
                // The 11/11/10-bit histograms themselves, on both backends, at the prefixes the
                // device's passes chose.
                for (p, &(shift, bits)) in DIGITS_11.iter().enumerate() {
                    for (j, grp) in groups.iter().enumerate() {
                        let s = KeySpec {
                            mean: Some(g.means[j]),
                            ..works[j].spec(t).unwrap()
                        };
                        let d = DigitPass {
                            shift,
                            bits,
                            prefix: g.prefixes[p],
                        };
                        let mut hc = vec![0u64; 1 << bits];
                        let mut hg = vec![0u64; 1 << bits];
                        cpu.histogram(grp, t, &s, d, &mut hc).unwrap();
                        cuda.histogram(grp, t, &s, d, &mut hg).unwrap();
                        assert!(
                            hc == hg,
                            "{what}: task {t} tensor {j} digit {p}: histograms"
                        );
                    }
                }
                fixed.push(c);
            }
            // Every task at once, with the keys kept on the device when the budget holds them.
            let densities: Vec<f64> = (0..nt).map(|t| recipe.tasks[t].model_density).collect();
            let (home, all) = model_selection_all(cuda, &groups, &works, &densities);
            homes.push(home);
            for (t, (sums, key, quota)) in all.into_iter().enumerate() {
                let c = &fixed[t];
                assert_eq!(
                    (&c.sums, c.key, c.quota),
                    (&sums, key, quota),
                    "{what}: task {t}: all tasks at once, keys {home:?}"
                );
            }
            // The fuse pass: tensors in plan order, the tie quota spent as the pipeline does.
            let mut quota: Vec<u64> = fixed.iter().map(|m| m.quota).collect();
            for (j, grp) in groups.iter().enumerate() {
                let jobs = works[j].jobs(|t| ModelCut {
                    mean: fixed[t].means[j],
                    key: fixed[t].key,
                    tie_quota: quota[t],
                });
                let stats = compare(
                    cuda,
                    grp,
                    &jobs,
                    &works[j].fuse,
                    &format!("{what} tensor {j}"),
                )
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
    homes
}

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn model_selection_task_vector_matches_cpu() {
    check_model_selection(Method::StaTaskVector, false);
}

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn model_selection_finetuned_and_magnitude_match_cpu() {
    check_model_selection(Method::StaFinetuned, true);
    check_model_selection(Method::Magnitude, false);
}

/// `selection: model` through the pipeline, as `plan` predicts it (docs/STREAMING.md,
/// "Model-wide passes"): with a budget that holds every task's keys, the inputs cross the link
/// in pass 1 and the merge only; with one byte less, each pass moves each tensor once for all
/// tasks. The bytes measured are the prediction plus the small tables (error words, means, the
/// fuse's task table), and the files are the CPU's either way.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn model_selection_moves_its_inputs_as_planned() {
    let _ = gpu();
    let dir = tempfile::tempdir().unwrap();
    crate::sets::synth(dir.path(), FloatType::BF16, FloatType::F32, 9);
    let recipe = stamerge::Recipe::from_file(&dir.path().join("sta_model.yml")).unwrap();
    let plan = stamerge::plan(&recipe, None, &Default::default()).unwrap();
    let link = stamerge::plan::show::model_link(&plan);
    let inputs = plan.estimate.merge_read_bytes;
    let merge = |device, max_memory: Option<u64>, name: &str| {
        let opts = stamerge::Options {
            device,
            overwrite: true,
            max_memory,
            ..Default::default()
        };
        let out = dir.path().join(name).join("out");
        let before = stamerge::backend::cuda::fill::link_bytes().0;
        stamerge::merge(&recipe, &out, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        (out, stamerge::backend::cuda::fill::link_bytes().0 - before)
    };
    let (cpu, _) = merge(stamerge::Device::Cpu, None, "cpu");
    let (kept, kept_bytes) = merge(stamerge::Device::Cuda, Some(link.budget_needed), "kept");
    let (recomputed, recomputed_bytes) = merge(
        stamerge::Device::Cuda,
        Some(link.budget_needed - 1),
        "recomputed",
    );
    for (out, measured, predicted, most) in [
        (&kept, kept_bytes, link.kept, 2.0),
        (&recomputed, recomputed_bytes, link.recomputed, 5.0),
    ] {
        let what = format!(
            "{}: {measured} bytes to the GPU, {predicted} predicted, {inputs} of inputs",
            out.display()
        );
        assert!(
            measured >= predicted && measured - predicted <= predicted / 50,
            "{what}"
        );
        assert!(predicted as f64 <= most * inputs as f64, "{what}");
        for f in crate::common::file_names(&cpu) {
            if f != stamerge::REPORT_NAME {
                assert!(
                    std::fs::read(cpu.join(&f)).unwrap() == std::fs::read(out.join(&f)).unwrap(),
                    "{what}: {f} differs from the cpu's"
                );
            }
        }
    }
    eprintln!(
        "selection: model moved {:.3}x its inputs with the keys kept, {:.3}x without",
        kept_bytes as f64 / inputs as f64,
        recomputed_bytes as f64 / inputs as f64
    );
}
