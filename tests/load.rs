//! Many merges at once on one machine: eight processes into eight folders, each contending for
//! cores and the page cache of the same inputs, all succeed and write the same bytes as the same
//! merge run alone; the shared inputs are left as they were.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::*;

const RUNS: usize = 8;

fn spawn(recipe: &Path, out: &Path) -> Child {
    Command::new(stamerge_bin())
        .args(["-q", "merge", "--device", "cpu"])
        .arg(recipe)
        .arg(out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(c: Child, what: &str) {
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Every file of an output folder, by name; the report only by what it says about the tensors
/// and shards (its timings, memory and output path differ from run to run).
fn output(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let bytes = std::fs::read(e.path()).unwrap();
            if name == stamerge::REPORT_NAME {
                let r: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let kept = serde_json::json!([r["tensors"], r["shards"], r["inputs"]]);
                (name, serde_json::to_vec(&kept).unwrap())
            } else {
                (name, bytes)
            }
        })
        .collect();
    v.sort();
    v
}

#[test]
fn eight_merges_at_once_write_what_each_writes_alone() {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut recipes: Vec<PathBuf> = std::fs::read_dir(&ex)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .collect();
    recipes.sort();
    assert!(!recipes.is_empty());
    // One run per recipe, cycling when there are fewer recipes than runs.
    let runs: Vec<&PathBuf> = recipes.iter().cycle().take(RUNS).collect();
    let inputs_before = tree_bytes(&ex);
    let d = tempfile::tempdir().unwrap();
    // Same folder names (the model card is titled with it), in folders of their own.
    let out = |what: &str, i: usize| {
        let parent = d.path().join(format!("{what}{i}"));
        std::fs::create_dir(&parent).unwrap();
        parent.join("merged")
    };
    let alone: Vec<PathBuf> = (0..RUNS).map(|i| out("alone", i)).collect();
    let together: Vec<PathBuf> = (0..RUNS).map(|i| out("together", i)).collect();
    for (r, out) in runs.iter().zip(&alone) {
        finish(spawn(r, out), &r.display().to_string());
    }
    let children: Vec<Child> = runs
        .iter()
        .zip(&together)
        .map(|(r, o)| spawn(r, o))
        .collect();
    for (c, r) in children.into_iter().zip(&runs) {
        finish(c, &r.display().to_string());
    }
    for i in 0..RUNS {
        let (a, t) = (output(&alone[i]), output(&together[i]));
        assert!(
            a.iter().any(|(n, _)| n.ends_with(".safetensors")),
            "no weights in {}",
            alone[i].display()
        );
        let names = |v: &[(String, Vec<u8>)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&a), names(&t), "{}", runs[i].display());
        for ((n, x), (_, y)) in a.iter().zip(&t) {
            assert!(
                x == y,
                "{}: {n} differs between alone and together",
                runs[i].display()
            );
        }
    }
    let left = leftovers(d.path());
    assert!(left.is_empty(), "temporary folders or locks left: {left:?}");
    assert!(tree_bytes(&ex) == inputs_before, "an input changed");
}

/// Issue 15 #2 under real contention: three merges of different recipes into one folder at
/// once, round after round. Exactly one may succeed each round (the others find the lock held,
/// or the folder filled when they come to commit), and the folder then holds that run's output
/// whole: its recipe with its own bytes, never one run's weights under another's recipe.
#[test]
fn three_merges_into_one_folder_never_replace_each_other() {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let recipes: Vec<PathBuf> = ["ties.yml", "task_arithmetic.yml", "magnitude.yml"]
        .iter()
        .map(|r| ex.join(r))
        .collect();
    let d = tempfile::tempdir().unwrap();
    let alone: Vec<Vec<(String, Vec<u8>)>> = recipes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            // The shared target's folder name: the model card is titled with it.
            let out = d.path().join(format!("alone{i}")).join("shared");
            finish(spawn(r, &out), &r.display().to_string());
            output(&out)
        })
        .collect();
    let target = d.path().join("shared");
    for round in 0..10 {
        let _ = std::fs::remove_dir_all(&target);
        let children: Vec<Child> = recipes.iter().map(|r| spawn(r, &target)).collect();
        let ok: Vec<usize> = children
            .into_iter()
            .enumerate()
            .filter_map(|(i, c)| c.wait_with_output().unwrap().status.success().then_some(i))
            .collect();
        assert_eq!(
            ok.len(),
            1,
            "round {round}: runs {ok:?} all reported success"
        );
        assert!(
            output(&target) == alone[ok[0]],
            "round {round}: the folder is not run {}'s output",
            ok[0]
        );
        let left = leftovers(d.path());
        assert!(left.is_empty(), "round {round}: {left:?}");
    }
}
