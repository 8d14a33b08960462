//! Non-finite inputs: the same fault (input, index, NaN or Inf) from both backends.

use stamerge::backend::{FuseSpec, Group, MaskJob};
use stamerge::dtype::FloatType;

use crate::compare::compare;
use crate::inputs::{make, Inputs, Make};
use crate::recipes::{method_jobs_with, Extra, Method};
use crate::{gpu, max_elems, TYPES};

#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn faults_match_cpu() {
    let cuda = gpu();
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
            let g = inp.group();
            let what = format!("{name} ({method:?} {ty:?})");
            let (jobs, fuse) = jobs_of(method, &g, Extra::default());
            assert!(
                compare(cuda, &g, &jobs, &fuse, &what).is_none(),
                "{what}: expected a fault"
            );
            // nonfinite_scores: zero — scores become 0; τ and start faults remain.
            let zero = Extra {
                nonfinite_zero: true,
                ..Extra::default()
            };
            let (jobs, fuse) = jobs_of(method, &g, zero);
            compare(cuda, &g, &jobs, &fuse, &format!("{what}, nonfinite zero"));
        }
    }
}

/// The method's jobs for `g`; a task without its gradient tensor keeps every entry.
fn jobs_of(method: Method, g: &Group, extra: Extra) -> (Vec<MaskJob>, FuseSpec) {
    let ty = g.base.ty;
    let (mut jobs, fuse) = method_jobs_with(method, g.tasks.len(), g.n, g.name, ty, extra);
    for (j, task) in jobs.iter_mut().zip(&g.tasks) {
        if task.grad.is_none() {
            *j = MaskJob::All;
        }
    }
    (jobs, fuse)
}
