//! Cases where the right behaviour had to be decided (README "Decisions"): `normalize` over
//! weights that cancel, a folder holding both `model.safetensors` and a shard index, `--threads`
//! far beyond the cores, and a recipe that is not a regular file.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use safetensors::Dtype;

fn stamerge(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(stamerge_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

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
    let (code, out, err) = stamerge(d.path(), &["plan", "r.yml"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("model.safetensors.index.json") && out.contains("transformers"),
        "no note on the ignored index: {out}"
    );
}
