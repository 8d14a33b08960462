//! The pipeline's streaming hand-over (docs/STREAMING.md) through `Backend::submit` and
//! `Backend::flush`: the next group's inputs copied in while a group computes, and outputs
//! handed back one call late.

use stamerge::backend::cpu::CpuBackend;
use stamerge::backend::{Backend, BackendError, Compute};
use stamerge::dtype::FloatType;

use crate::chunked::budget_gpu;
use crate::compare::compare_then;
use crate::inputs::{make, Inputs, Make};
use crate::recipes::{method_jobs, Method, METHODS};
use crate::{max_elems, TYPES};

/// The pipeline's overlapped path: each group submitted with the next one named, so that its
/// inputs are read and copied in while this one computes (`submit(.., next)`), across groups of
/// changing sizes, methods and dtypes, with a wrong guess of the next group, groups too large to
/// stage, and a ring whose 128 KiB slots each tensor passes through in several pieces: the CPU's
/// bytes every time, and some inputs taken from what the previous call staged.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn pipelined_groups_match_cpu() {
    // 2 MiB for the next group's inputs: a 70 000-element f32 group with a start model is not
    // staged, the others are.
    let cuda = budget_gpu(8 << 20);
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

/// `submit`: outputs come back one call late (copied out while the next group computes) or at
/// once (larger than the 128 KiB kept aside under this budget, chunked, or on the CPU), always
/// in call order and each once, with the CPU's bytes; statistics and faults are the call's own;
/// after a fault nothing stale is handed back by `flush`.
#[test]
#[ignore = "needs a GPU: cargo test --test gpu -- --include-ignored (or scripts/emu-gpu-tests.sh)"]
fn deferred_outputs_match_cpu() {
    // 2 MiB: 1.5 MiB work arena (70 000 f32 elements run in chunks), 128 KiB for the output.
    let cuda = budget_gpu(2 << 20);
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
            got.extend(cuda.flush().expect("flush"));
        }
        let rg = cuda.submit(&g, &jobs, &fuse, vec![0xA5; expect.len()], next.as_ref());
        match (rc, rg) {
            (Ok(sc), Ok((sg, outs))) => {
                assert_eq!(sc, sg, "{what}: statistics");
                late += outs.is_empty() as usize;
                got.extend(outs);
                want.push(expect);
            }
            (Err(BackendError::Fault(x)), Err(BackendError::Fault(y))) => {
                assert_eq!(x, y, "{what}: fault");
                let stale = cuda.flush().expect("flush after a fault");
                assert!(
                    stale.is_empty(),
                    "{what}: {} outputs held after a fault",
                    stale.len()
                );
            }
            (x, y) => panic!("{what}: cpu {x:?} vs cuda {:?}", y.map(|r| r.0)),
        }
    }
    got.extend(cuda.flush().expect("flush"));
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
