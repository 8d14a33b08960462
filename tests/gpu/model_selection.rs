//! `selection: model`: the model-wide passes (score sums, digit histograms, the threshold and
//! its tie quota) and the fixed-threshold fuse, on both backends.

use stamerge::backend::cpu::CpuBackend;
use stamerge::backend::cuda::CudaBackend;
use stamerge::backend::{Compute, DigitPass, Group, KeySpec};
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

/// `method`'s keys (with `nonfinite_scores: zero` if asked) ranked over the whole model.
fn check_model_selection(method: Method, nonfinite_zero: bool) {
    let cuda = gpu();
    check_model_selection_on(cuda, &sizes().collect::<Vec<_>>(), method, nonfinite_zero);
}

/// A model of one tensor per size in `sizes`, 2 tasks: the passes, the histograms at the
/// prefixes the device's passes chose, and the fuse of each tensor in plan order with the
/// tie quota spent as the pipeline spends it.
pub fn check_model_selection_on(
    cuda: &CudaBackend,
    sizes: &[usize],
    method: Method,
    nonfinite_zero: bool,
) {
    let cpu = CpuBackend::new();
    let nt = 2;
    let extra = Extra {
        model_wide: true,
        nonfinite_zero,
        ..Extra::default()
    };
    let recipe = recipe(method, nt, extra);
    assert_eq!(model_wide_tasks(&recipe), (0..nt).collect::<Vec<_>>());
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
