//! Device selection, the plan's GPU memory budget and the CLI without a GPU (these run
//! everywhere).

use stamerge::backend::cuda::CudaBackend;
use stamerge::{select_backend, Device};

/// Without a GPU, `--device cuda` is a clear error and `--device auto` falls back to the CPU;
/// with one, both give the cuda backend.
#[test]
fn device_selection_is_clear_with_or_without_a_gpu() {
    match CudaBackend::new(0) {
        Err(reason) => {
            let reason = reason.to_string();
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
    let bin = crate::stamerge_cli();
    let dir = tempfile::tempdir().unwrap();
    stamerge::synth::generate(&stamerge::synth::SynthSpec::default(), dir.path()).unwrap();
    let recipe = dir.path().join("sta.yml");
    let plan = |mem: &str| {
        let o = std::process::Command::new(&bin)
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

/// `stamerge plan` says where `selection: model` keeps its keys on the GPU and what crosses the
/// link: with every task ranking, pass 1 and the merge move the inputs twice, five passes five
/// times; the line follows the budget and is absent for a per-tensor selection.
#[test]
fn plan_reports_where_model_wide_keys_live() {
    let bin = crate::stamerge_cli();
    let dir = tempfile::tempdir().unwrap();
    stamerge::synth::generate(&stamerge::synth::SynthSpec::default(), dir.path()).unwrap();
    let recipe = dir.path().join("sta_model.yml");
    let plan = stamerge::plan(
        &stamerge::Recipe::from_file(&recipe).unwrap(),
        None,
        &Default::default(),
    )
    .unwrap();
    let need = stamerge::plan::show::model_link(&plan).budget_needed;
    let line = |recipe: &std::path::Path, mem: Option<u64>| {
        let mut c = std::process::Command::new(&bin);
        c.args(["plan", recipe.to_str().unwrap()]);
        if let Some(m) = mem {
            c.args(["--max-memory", &m.to_string()]);
        }
        let o = c.output().expect("run stamerge");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.starts_with("cuda, selection: model:"))
            .map(str::to_string)
    };
    let kept = line(&recipe, Some(need)).expect("a model-wide line");
    assert!(
        kept.contains("stay on the GPU") && kept.contains("(2.00x"),
        "{kept}"
    );
    let over = line(&recipe, Some(need - 1)).expect("a model-wide line");
    assert!(
        over.contains("more than the budget") && over.contains("(5.00x)"),
        "{over}"
    );
    let either = line(&recipe, None).expect("a model-wide line");
    assert!(
        either.contains("(2.00x") && either.contains("(5.00x)"),
        "{either}"
    );
    assert_eq!(line(&dir.path().join("sta.yml"), None), None);
}

/// The CLI without a GPU: `merge --device cuda` and `bench kernels` exit non-zero with the
/// reason; `merge --device auto` merges on the CPU.
#[test]
fn cli_without_a_gpu_fails_clearly() {
    if CudaBackend::new(0).is_ok() {
        return; // covered by the tests above on this machine
    }
    let bin = crate::stamerge_cli();
    let dir = tempfile::tempdir().unwrap();
    stamerge::synth::generate(&stamerge::synth::SynthSpec::default(), dir.path()).unwrap();
    let recipe = dir.path().join("ties.yml");
    let run = |args: &[&str]| {
        std::process::Command::new(&bin)
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
