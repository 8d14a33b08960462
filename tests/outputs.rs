//! Where a merge writes: the output folder and `--report`. Every path problem that can be seen
//! before the merge is a plan-time error (the merge never starts), and no write, failed or not,
//! touches an input, the recipe or a file it was not asked to write.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn stamerge(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let (code, out, err) = stamerge_in(dir, args);
    (code, format!("{out}{err}"))
}

/// Every entry below `dir`: files with their bytes, symlinks with their target (not followed:
/// some are dangling on purpose).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            v.push((p, t.to_string_lossy().as_bytes().to_vec()));
        } else if md.is_dir() {
            v.push((p.clone(), b"/".to_vec()));
            v.extend(snapshot(&p));
        } else {
            v.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    v.sort();
    v
}

fn first_shard(model: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(model)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v.remove(0)
}

/// Issue 15 #1: `--report` once overwrote a base shard with JSON, or the recipe. Each bad report
/// path is refused before the merge, and nothing in the folder changes.
#[test]
fn report_paths_that_would_destroy_an_input_or_the_recipe_are_refused_at_plan_time() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), &["--tasks", "2"]);
    let shard = first_shard(&d.path().join("base"));
    let shard = shard.strip_prefix(d.path()).unwrap().to_str().unwrap();
    std::os::unix::fs::symlink(shard, d.path().join("link.json")).unwrap();
    std::fs::create_dir(d.path().join("reports")).unwrap();
    let before = snapshot(d.path());
    for (report, needle) in [
        (shard, "input"),
        ("link.json", "input"),
        ("ties.yml", "recipe"),
        ("base/report.json", "inside the input"),
        ("task_1/report.json", "inside the input"),
        ("out/report.json", "inside the output folder"),
        ("missing/report.json", "does not exist"),
        ("reports", "not a regular file"),
    ] {
        let (code, err) = stamerge(d.path(), &["merge", "ties.yml", "out", "--report", report]);
        assert_eq!(code, Some(1), "--report {report}: {err}");
        assert!(
            err.contains("--report") && err.contains(needle),
            "--report {report}: expected `{needle}` in: {err}"
        );
        assert!(!d.path().join("out").exists(), "--report {report}: merged");
        assert!(
            snapshot(d.path()) == before,
            "--report {report}: a file changed"
        );
        assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));
        // `plan` finds the same problem.
        let (code, err) = stamerge(d.path(), &["plan", "ties.yml", "out", "--report", report]);
        assert_eq!(code, Some(1), "plan --report {report}: {err}");
        assert!(err.contains(needle), "plan --report {report}: {err}");
    }
    // A good one is written, whole, with nothing left beside it.
    let (code, err) = stamerge(
        d.path(),
        &[
            "-q",
            "merge",
            "ties.yml",
            "out",
            "--report",
            "reports/r.json",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("reports/r.json")).unwrap()).unwrap();
    assert_eq!(r["method"], "ties");
    assert_eq!(file_names(&d.path().join("reports")), vec!["r.json"]);
}

/// A report is written beside its place and renamed there: a full disk leaves the previous report
/// whole (not truncated), and the output is not committed without the report it asked for.
#[test]
fn a_report_that_cannot_be_written_leaves_the_old_one_and_no_output() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), &["--tasks", "2"]);
    let small = d.path().join("small");
    let Some(_m) = Tmpfs::mount(&small, "size=12k") else {
        return;
    };
    std::fs::write(small.join("r.json"), b"the previous report").unwrap();
    // Fill the rest of the 12 KiB.
    std::fs::write(small.join("filler"), vec![0u8; 8192]).unwrap();
    let (code, err) = stamerge(
        d.path(),
        &["-q", "merge", "ties.yml", "out", "--report", "small/r.json"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(
        std::fs::read(small.join("r.json")).unwrap(),
        b"the previous report"
    );
    assert_eq!(file_names(&small), vec!["filler", "r.json"]);
    assert!(
        !d.path().join("out").exists(),
        "committed without its report"
    );
    assert!(leftovers(d.path()).is_empty());
}

/// The read-only check: a report or an output in a folder this process cannot write is refused
/// at plan time (a tmpfs mounted read-only: root writes anywhere else).
#[test]
fn unwritable_places_are_refused_at_plan_time() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), &["--tasks", "2"]);
    let ro = d.path().join("ro");
    let Some(_m) = Tmpfs::mount(&ro, "ro,size=64k") else {
        return;
    };
    for args in [
        &["plan", "ties.yml", "ro/out"][..],
        &["plan", "ties.yml", "ro/deeper/out"][..],
        &["plan", "ties.yml", "out", "--report", "ro/r.json"][..],
        &["merge", "ties.yml", "ro/out"][..],
    ] {
        let (code, err) = stamerge(d.path(), args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("not writable"), "{args:?}: {err}");
    }
}

/// Output paths whose problems used to surface after the work (or never): each is refused by
/// `plan` and by `merge` before any tensor is read, and what the path points at is untouched.
#[test]
fn output_paths_that_cannot_be_committed_are_refused_at_plan_time() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), &["--tasks", "2"]);
    let p = d.path();
    std::os::unix::fs::symlink("nowhere", p.join("dangling")).unwrap();
    std::os::unix::fs::symlink("nowhere", p.join("dangling-parent")).unwrap();
    std::fs::create_dir(p.join("real")).unwrap();
    std::fs::write(p.join("real/keep.txt"), b"keep me").unwrap();
    std::os::unix::fs::symlink("real", p.join("linked")).unwrap();
    let long = "a".repeat(240);
    let before = snapshot(p);
    for (out, overwrite, needle) in [
        ("dangling", false, "symlink"),
        ("dangling-parent/out", false, "symlink"),
        ("linked", true, "symlink"),
        (long.as_str(), false, "too long"),
        ("ties.yml", true, "is a file"),
    ] {
        for cmd in ["plan", "merge"] {
            let mut args = vec![cmd, "ties.yml", out];
            if overwrite {
                args.push("--overwrite");
            }
            let (code, err) = stamerge(p, &args);
            assert_eq!(code, Some(1), "{cmd} {out}: {err}");
            assert!(
                err.contains(needle),
                "{cmd} {out}: expected `{needle}` in: {err}"
            );
            assert!(snapshot(p) == before, "{cmd} {out}: a file changed");
            assert!(leftovers(p).is_empty(), "{cmd} {out}: {:?}", leftovers(p));
        }
    }
    assert!(std::fs::symlink_metadata(p.join("linked"))
        .unwrap()
        .is_symlink());
    // A mount point cannot be renamed over, with or without --overwrite.
    let mnt = p.join("mnt");
    let Some(_m) = Tmpfs::mount(&mnt, "size=4m") else {
        return;
    };
    for overwrite in [false, true] {
        let mut args = vec!["plan", "ties.yml", "mnt"];
        if overwrite {
            args.push("--overwrite");
        }
        let (code, err) = stamerge(p, &args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("mount point"), "{args:?}: {err}");
    }
    // Inside it is fine.
    let (code, err) = stamerge(p, &["-q", "merge", "ties.yml", "mnt/out"]);
    assert_eq!(code, Some(0), "{err}");
}

/// Side files and config.json that are broken in the base: plan-time errors naming the file, no
/// longer a warning after the merge (or an output silently without config.json).
#[test]
fn broken_config_and_side_files_are_plan_time_errors() {
    let cases: &[(&str, &str)] = &[
        ("base/config.json", "not valid JSON"),
        ("task_1/config.json", "not valid JSON"),
        ("base/config.json/", "not a regular file"),
        ("base/tokenizer.json/", "not a regular file"),
        ("base/vocab.txt@", "dangling symlink"),
        ("base/merges.txt|", "not a regular file"),
    ];
    for (what, needle) in cases {
        let d = tempfile::tempdir().unwrap();
        synth(d.path(), &["--tasks", "2"]);
        let p = d.path();
        let name = what.trim_end_matches(['/', '@', '|']);
        let _ = std::fs::remove_file(p.join(name));
        match what.chars().last().unwrap() {
            '/' => std::fs::create_dir(p.join(name)).unwrap(),
            '@' => std::os::unix::fs::symlink("gone.txt", p.join(name)).unwrap(),
            '|' => assert!(Command::new("mkfifo")
                .arg(p.join(name))
                .status()
                .unwrap()
                .success()),
            _ => std::fs::write(p.join(name), b"{\"vocab_size\": 64,").unwrap(),
        }
        let (code, err) = stamerge(p, &["plan", "ties.yml"]);
        assert_eq!(code, Some(1), "{what}: {err}");
        // Recipe paths are relative to the recipe's folder, the working directory here.
        let named = name.to_string();
        assert!(
            err.contains(&named) && err.contains(needle),
            "{what}: expected {named} and `{needle}` in: {err}"
        );
        let (code, err) = stamerge(p, &["merge", "ties.yml", "out"]);
        assert_eq!(code, Some(1), "{what}: {err}");
        assert!(!p.join("out").exists());
    }
}

/// The same for a side file or config.json that exists but cannot be read. Root reads every
/// file, so the command runs as `nobody` (setpriv); skipped, saying so, where that is not
/// possible.
#[test]
fn unreadable_config_and_side_files_are_plan_time_errors() {
    use std::os::unix::fs::PermissionsExt;
    let works = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        eprintln!("SKIPPED (cannot run as nobody with setpriv): unreadable side files");
        return;
    }
    for name in ["base/tokenizer.json", "base/config.json"] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        synth(p, &["--tasks", "2"]);
        Command::new("chmod")
            .args(["-R", "a+rwX"])
            .arg(p)
            .status()
            .unwrap();
        std::fs::write(p.join(name), b"{}").unwrap();
        std::fs::set_permissions(p.join(name), std::fs::Permissions::from_mode(0o000)).unwrap();
        for cmd in ["plan", "merge"] {
            let o = Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(stamerge_bin())
                .args([cmd, "ties.yml", "out"])
                .current_dir(p)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{name} {cmd}: {err}");
            assert!(
                err.contains(name) && err.contains("Permission denied"),
                "{name} {cmd}: {err}"
            );
            assert!(!p.join("out").exists());
        }
    }
}
