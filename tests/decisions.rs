//! Cases where the right behaviour had to be decided (README "Decisions"): `normalize` over
//! weights that cancel, a folder holding both `model.safetensors` and a shard index, `--threads`
//! far beyond the cores, and a recipe that is not a regular file.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use safetensors::Dtype;

fn small_models(dir: &Path) {
    for (i, m) in ["base", "task_0", "task_1"].iter().enumerate() {
        let v: Vec<f32> = (0..8).map(|j| (j * (i + 1)) as f32 * 0.125).collect();
        write_model(
            &dir.join(m),
            &[T::float("w", Dtype::F32, &[8], &v)],
            1,
            None,
        );
    }
}

/// `normalize: true` divides by the sum of the weights. Where that sum cancels to (nearly) zero,
/// mergekit either divides by 1 (|Σw| < 1e-8) or blows the task vectors up by 1/Σw; neither is
/// what the recipe asked for, so the plan refuses it, naming the weights and the way out.
#[test]
fn normalize_over_weights_that_cancel_is_refused_at_plan_time() {
    let d = tempfile::tempdir().unwrap();
    small_models(d.path());
    let recipe = |method: &str, w0: &str, w1: &str| {
        format!(
            "merge_method: {method}\nbase_model: base\nparameters:\n  normalize: true\n  density: 0.5\nmodels:\n  - model: task_0\n    parameters: {{weight: {w0}}}\n  - model: task_1\n    parameters: {{weight: {w1}}}\n"
        )
    };
    for (method, w0, w1) in [
        ("task_arithmetic", "1.0", "-1.0"),
        ("task_arithmetic", "0.5", "-0.49999"),
        ("ties", "1.0", "-1.0"),
        ("ties", "1.0", "-0.3"),
    ] {
        std::fs::write(d.path().join("r.yml"), recipe(method, w0, w1)).unwrap();
        let (code, _, err) = stamerge_in(d.path(), &["plan", "r.yml"]);
        assert_eq!(code, Some(1), "{method} {w0} {w1}: {err}");
        assert!(
            err.contains("normalize") && err.contains("normalize: false"),
            "{method} {w0} {w1}: {err}"
        );
    }
    // Weights that do not cancel are fine, and so is the same recipe without normalize.
    for (method, w0, w1) in [("task_arithmetic", "1.0", "-0.5"), ("ties", "0.3", "0.7")] {
        std::fs::write(d.path().join("r.yml"), recipe(method, w0, w1)).unwrap();
        let (code, _, err) = stamerge_in(d.path(), &["plan", "r.yml"]);
        assert_eq!(code, Some(0), "{method} {w0} {w1}: {err}");
    }
    let text =
        recipe("task_arithmetic", "1.0", "-1.0").replace("normalize: true", "normalize: false");
    std::fs::write(d.path().join("r.yml"), text).unwrap();
    let (code, _, err) = stamerge_in(d.path(), &["plan", "r.yml"]);
    assert_eq!(code, Some(0), "{err}");
}

/// Weights are per-tensor settings: a per-layer list that cancels in layer 0 only is refused
/// for the tensors where it cancels, and the message names one of them and counts the rest.
#[test]
fn normalize_over_weights_that_cancel_in_some_layers_names_the_tensors() {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let d = tempfile::tempdir().unwrap();
    let recipe = |w1: &str| {
        format!(
            "merge_method: task_arithmetic\nbase_model: {b}\nparameters:\n  normalize: true\n\
             models:\n  - model: {t0}\n    parameters: {{weight: 1.0}}\n  - model: {t1}\n    \
             parameters: {{weight: {w1}}}\n",
            b = ex.join("base").display(),
            t0 = ex.join("task_0").display(),
            t1 = ex.join("task_1").display(),
        )
    };
    // Layer 0 (and the tensors before the layers, at position 0) cancel; layer 1 does not.
    std::fs::write(d.path().join("r.yml"), recipe("[-1.0, 0.5]")).unwrap();
    let (code, _, err) = stamerge_in(d.path(), &["plan", "r.yml"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("parameters.normalize") && err.contains("other tensor(s)"),
        "{err}"
    );
    assert!(err.contains("layers.0.") || err.contains("embed"), "{err}");
    assert!(!err.contains("layers.1."), "{err}");
    // The same list without cancellation plans.
    std::fs::write(d.path().join("r.yml"), recipe("[0.5, 0.5]")).unwrap();
    let (code, _, err) = stamerge_in(d.path(), &["plan", "r.yml"]);
    assert_eq!(code, Some(0), "{err}");
}

/// transformers' `from_pretrained` loads `model.safetensors` when a folder holds both it and
/// `model.safetensors.index.json`; stamerge reads the same file, and says that it ignored the
/// index.
#[test]
fn a_folder_with_both_a_single_file_and_an_index_is_read_as_transformers_reads_it() {
    let d = tempfile::tempdir().unwrap();
    small_models(d.path());
    let base = d.path().join("base");
    // Stale shards and an index beside the real single file, holding other values.
    let stale: Vec<T> = (0..2)
        .map(|i| T::float("w", Dtype::F32, &[8], &[9.0 + i as f32; 8]))
        .take(1)
        .collect();
    let tmp = d.path().join("stale");
    write_model(
        &tmp,
        &[stale[0].clone(), T::float("x", Dtype::F32, &[1], &[1.0])],
        2,
        None,
    );
    for e in std::fs::read_dir(&tmp).unwrap().flatten() {
        std::fs::rename(e.path(), base.join(e.file_name())).unwrap();
    }
    let ck = stamerge::checkpoint::Checkpoint::open(&base).unwrap_or_else(|p| panic!("{p:?}"));
    assert_eq!(ck.files.len(), 1);
    assert!(ck.files[0].path.ends_with("model.safetensors"));
    assert_eq!(ck.len(), 1, "the index's tensor `x` was read");
    std::fs::write(
        d.path().join("r.yml"),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\n",
    )
    .unwrap();
    let (code, out, err) = stamerge_in(d.path(), &["plan", "r.yml"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("model.safetensors.index.json") && out.contains("transformers"),
        "no note on the ignored index: {out}"
    );
}

/// `--threads` beyond the cores this process may use is lowered to them, with a note: the result
/// is the same bytes at any thread count, and thousands of threads only cost memory and time.
/// `--threads 0` is refused.
#[test]
fn threads_far_beyond_the_cores_are_capped_and_zero_is_refused() {
    let d = tempfile::tempdir().unwrap();
    small_models(d.path());
    std::fs::write(
        d.path().join("r.yml"),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\n",
    )
    .unwrap();
    let (code, _, err) = stamerge_in(d.path(), &["merge", "r.yml", "one", "--threads", "1"]);
    assert_eq!(code, Some(0), "{err}");
    let t0 = Instant::now();
    let (code, _, err) = stamerge_in(
        d.path(),
        &[
            "merge",
            "r.yml",
            "many",
            "--threads",
            "1000000",
            "--device",
            "cpu",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("--threads 1000000") && err.contains("core"),
        "no note: {err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(60));
    assert_eq!(
        std::fs::read(d.path().join("one/model.safetensors")).unwrap(),
        std::fs::read(d.path().join("many/model.safetensors")).unwrap()
    );
    let (code, _, err) = stamerge_in(d.path(), &["merge", "r.yml", "zero", "--threads", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!d.path().join("zero").exists());
}

/// A recipe is read from a regular file or a pipe (`<(...)`, a FIFO with a writer), up to 1 MiB;
/// a device (/dev/zero, /dev/urandom), a folder or an endless pipe is refused without reading
/// it to the end.
#[test]
fn a_recipe_that_is_a_device_or_an_endless_pipe_is_refused_quickly() {
    let d = tempfile::tempdir().unwrap();
    small_models(d.path());
    let run = |recipe: &str| {
        // A cap on the address space: reading /dev/zero to its end must not be how this fails.
        let mut c = Command::new("timeout");
        c.args(["60", "prlimit", "--as=2000000000", "--"])
            .arg(stamerge_bin())
            .args(["plan", recipe])
            .current_dir(d.path())
            .stdout(Stdio::null());
        let o = c.output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    for dev in ["/dev/zero", "/dev/urandom", "."] {
        let t0 = Instant::now();
        let (code, err) = run(dev);
        assert_eq!(code, Some(1), "{dev}: {err}");
        assert!(
            err.contains(dev) && err.contains("not a regular file"),
            "{dev}: {err}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{dev} took {:?}",
            t0.elapsed()
        );
    }
    // A FIFO with a writer is read like a file.
    let fifo = d.path().join("r.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let text = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\n";
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::write(fifo, text))
    };
    let (code, err) = run("r.fifo");
    assert_eq!(code, Some(0), "{err}");
    writer.join().unwrap().unwrap();
    // An endless pipe stops at the limit.
    let endless = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
            let chunk = vec![b'#'; 1 << 16];
            while f.write_all(&chunk).is_ok() {}
        })
    };
    let t0 = Instant::now();
    let (code, err) = run("r.fifo");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("1 MiB"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    endless.join().unwrap();
}
