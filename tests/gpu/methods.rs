//! Every method × dtype × size, continuous values and heavy ties.

use stamerge::backend::MaskJob;
use stamerge::dtype::FloatType;

use crate::compare::compare;
use crate::inputs::{make, Make};
use crate::recipes::{method_jobs_with, Extra, Method};
use crate::{gpu, sizes, TYPES};

/// Every size and dtype, continuous and grid values, for one method.
fn check_method(method: Method) {
    check_method_with(method, Extra::default());
}

fn check_method_with(method: Method, extra: Extra) {
    let cuda = gpu();
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
                let (jobs, fuse) = method_jobs_with(method, 3, n, &inp.name, ty, extra);
                let what = format!("{method:?} {extra:?} {ty:?} n={n} grid={grid}");
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
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn task_arithmetic_matches_cpu() {
    check_method(Method::TaskArithmetic);
}

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn magnitude_matches_cpu() {
    check_method(Method::Magnitude);
}

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn ties_matches_cpu() {
    check_method(Method::Ties);
}

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn dare_linear_matches_cpu() {
    check_method(Method::DareLinear);
}

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn dare_ties_matches_cpu() {
    check_method(Method::DareTies);
}

/// DARE's default is mergekit's L1 rescale (the tests above); this is the 1/d one.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn dare_inv_density_matches_cpu() {
    let extra = Extra {
        inv_density: true,
        ..Extra::default()
    };
    check_method_with(Method::DareLinear, extra);
    check_method_with(Method::DareTies, extra);
}

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn sta_finetuned_matches_cpu() {
    check_method(Method::StaFinetuned);
}

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn sta_task_vector_matches_cpu() {
    check_method(Method::StaTaskVector);
}

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn forgetting_matches_cpu() {
    check_method(Method::Forget);
}
