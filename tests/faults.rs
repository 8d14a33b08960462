//! Inputs that fail or change while the merge reads them: truncated (SIGBUS under the memory
//! map), modified in place, replaced, or unreadable (a real I/O error from a loop device).
//! Each run plans first (the inputs are open and mapped), then the test damages an input, then
//! the merge runs: it must fail naming the file, leave no output and no temporary folder, and
//! leave every other input byte for byte as it was.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;
use safetensors::Dtype;
use stamerge::{Device, Options, Recipe};

const TA: &str = "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\n";

/// Three checkpoints of `floats` f32 values each, in four tensors, plus the recipe.
fn models(dir: &Path, floats: usize) {
    let mut rng = Rng(floats as u64);
    for m in ["base", "task_0", "task_1"] {
        let ts: Vec<T> = (0..4)
            .map(|i| {
                let v: Vec<f32> = (0..floats / 4).map(|_| rng.f()).collect();
                T::float(&format!("layers.{i}.weight"), Dtype::F32, &[v.len()], &v)
            })
            .collect();
        write_model(&dir.join(m), &ts, 1, None);
    }
    std::fs::write(dir.join("r.yml"), TA).unwrap();
}

fn opts() -> Options {
    Options {
        device: Device::Cpu,
        threads: Some(1),
        ..Options::default()
    }
}

fn plan(dir: &Path) -> stamerge::Plan {
    let r = Recipe::from_file(&dir.join("r.yml")).unwrap();
    stamerge::plan(&r, Some(&dir.join("out")), &opts()).unwrap()
}

/// The merge failed with every `needles` in its message and left nothing in `dir` but inputs.
fn assert_failed_cleanly(dir: &Path, r: stamerge::Result<stamerge::Report>, needles: &[&str]) {
    let err = match r {
        Ok(_) => panic!("the merge succeeded on a damaged input"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(err.contains(n), "missing `{n}` in: {err}");
    }
    assert!(!dir.join("out").exists(), "an output folder was left");
    let left = leftovers(dir);
    assert!(left.is_empty(), "temporary folder or lock left: {left:?}");
}

fn without(v: &[(PathBuf, Vec<u8>)], p: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    v.iter().filter(|(q, _)| q != p).cloned().collect()
}

#[test]
fn input_truncated_during_the_merge() {
    let d = tempfile::tempdir().unwrap();
    models(d.path(), 1 << 18);
    let victim = d.path().join("task_1/model.safetensors");
    let before = tree_bytes(d.path());
    let p = plan(d.path());
    // Keeps the header and the first pages: the rest of the mapping now faults (SIGBUS).
    let full = std::fs::metadata(&victim).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(full / 3)
        .unwrap();
    let r = stamerge::merge_planned(&p, &d.path().join("out"), &opts());
    assert_failed_cleanly(
        d.path(),
        r,
        &[
            "task_1/model.safetensors",
            &format!("truncated from {full} to {} bytes", full / 3),
            "not kept",
        ],
    );
    assert!(
        without(&tree_bytes(d.path()), &victim) == without(&before, &victim),
        "another input changed"
    );
    let orig = &before.iter().find(|(q, _)| q == &victim).unwrap().1;
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        orig[..(full / 3) as usize],
        "the truncated input was written to"
    );
    drop(p);
    // The same inputs, undamaged, merge: the failure came from the truncation.
    std::fs::write(&victim, orig).unwrap();
    let r = stamerge::merge_planned(&plan(d.path()), &d.path().join("out"), &opts());
    assert!(r.is_ok(), "{:?}", r.err().map(|e| e.to_string()));
}

#[test]
fn input_modified_or_replaced_during_the_merge() {
    let d = tempfile::tempdir().unwrap();
    models(d.path(), 4096);
    let victim = d.path().join("task_0/model.safetensors");
    // An old mtime, so that the rewrite below changes it whatever the clock's granularity.
    let old = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let before = tree_bytes(d.path());
    let p = plan(d.path());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.seek(SeekFrom::Start(len - 8)).unwrap();
    f.write_all(&[0x7f; 8]).unwrap();
    drop(f);
    let r = stamerge::merge_planned(&p, &d.path().join("out"), &opts());
    assert_failed_cleanly(
        d.path(),
        r,
        &["task_0/model.safetensors", "modified while the merge"],
    );
    assert!(without(&tree_bytes(d.path()), &victim) == without(&before, &victim));
    drop(p);

    // Replaced by rename (how downloaders and editors save): a different file, same name.
    let d = tempfile::tempdir().unwrap();
    models(d.path(), 4096);
    let victim = d.path().join("task_1/model.safetensors");
    let before = tree_bytes(d.path());
    let p = plan(d.path());
    std::fs::copy(&victim, d.path().join("task_1/new")).unwrap();
    std::fs::rename(d.path().join("task_1/new"), &victim).unwrap();
    let r = stamerge::merge_planned(&p, &d.path().join("out"), &opts());
    assert_failed_cleanly(
        d.path(),
        r,
        &["task_1/model.safetensors", "replaced by another file"],
    );
    assert!(tree_bytes(d.path()) == before, "contents changed");
}

/// Detaches the loop device and unmounts when the test ends, however it ends.
struct Loop {
    mnt: PathBuf,
    dev: String,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).to_string())
}

/// A real read error: task_1 lives on an ext4 image on a loop device; once the merge has planned
/// (header read and cached), the device is shrunk so that the file's later blocks lie past its
/// end, and the kernel answers reads of them with EIO (SIGBUS under the memory map). Needs root
/// and loop devices; skipped, saying so, where they are missing.
#[test]
fn read_error_from_the_disk_during_the_merge() {
    let d = tempfile::tempdir().unwrap();
    // 4 MiB per model: far more than the read-ahead triggered by reading the header.
    models(d.path(), 1 << 20);
    let img = d.path().join("disk.img");
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let src = d.path().join("task_1");
    let skip = |why: &str| {
        let _ = writeln!(std::io::stderr(), "SKIPPED ({why}): read-error test");
    };
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let (img_s, src_s) = (img.to_str().unwrap(), src.to_str().unwrap());
    if run("mkfs.ext4", &["-q", "-F", "-b", "4096", "-d", src_s, img_s]).is_none() {
        return skip("no mkfs.ext4 with -d");
    }
    let Some(dev) = run("losetup", &["-f", "--show", img_s]) else {
        return skip("cannot set up a loop device");
    };
    let dev = dev.trim().to_string();
    let guard = Loop {
        mnt: mnt.clone(),
        dev: dev.clone(),
    };
    if run("mount", &["-o", "ro", &dev, mnt.to_str().unwrap()]).is_none() {
        return skip("cannot mount");
    }
    let on_disk = mnt.join("model.safetensors");
    // The physical block where the file starts, from `filefrag -v`'s first extent line.
    let frag = run("filefrag", &["-v", on_disk.to_str().unwrap()]).unwrap_or_default();
    let Some(first) = frag
        .lines()
        .find(|l| l.trim_start().starts_with("0:"))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|s| s.trim().split("..").next())
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return skip("filefrag gave no extent");
    };
    std::fs::write(
        d.path().join("r.yml"),
        TA.replace("model: task_1", &format!("model: {}", mnt.display())),
    )
    .unwrap();
    std::fs::remove_dir_all(&src).unwrap();
    let before = tree_bytes(d.path().join("base").as_path())
        .into_iter()
        .chain(tree_bytes(&d.path().join("task_0")))
        .collect::<Vec<_>>();
    let p = plan(d.path());
    // 1 MiB into the file: everything after is past the end of the shrunk device.
    let cut = (first + 256) * 4096;
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(cut)
        .unwrap();
    assert!(run("losetup", &["-c", &dev]).is_some(), "losetup -c failed");
    let r = stamerge::merge_planned(&p, &d.path().join("out"), &opts());
    assert_failed_cleanly(
        d.path(),
        r,
        &[
            &format!("{}", on_disk.display()),
            "a read failed",
            "not kept",
        ],
    );
    let after = tree_bytes(d.path().join("base").as_path())
        .into_iter()
        .chain(tree_bytes(&d.path().join("task_0")))
        .collect::<Vec<_>>();
    assert!(after == before, "an input changed");
    drop(p);
    drop(guard);
}

/// Issue 15 #8: the SIGBUS guard had 8192 slots; the mappings past them were unguarded, and a
/// truncation of one killed the process (no message, temporary folder and lock left). With
/// 8400 input files, the last one opened is truncated mid-merge: the usual clean error.
#[test]
fn a_truncated_input_past_the_8192nd_file_is_still_caught() {
    let d = tempfile::tempdir().unwrap();
    let n = 2800;
    for m in ["base", "task_0", "task_1"] {
        let ts: Vec<T> = (0..n)
            .map(|i| {
                T::float(
                    &format!("w.{i:05}"),
                    Dtype::F32,
                    &[4],
                    &[0.5, 1.0, 1.5, 2.0],
                )
            })
            .collect();
        write_model(&d.path().join(m), &ts, n, None);
    }
    std::fs::write(d.path().join("r.yml"), TA).unwrap();
    let p = plan(d.path());
    // The last shard of the last model: opened after every other input file.
    let victim = d
        .path()
        .join(format!("task_1/model-{n:05}-of-{n:05}.safetensors"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(0)
        .unwrap();
    let r = stamerge::merge_planned(&p, &d.path().join("out"), &opts());
    assert_failed_cleanly(
        d.path(),
        r,
        &[&victim.display().to_string(), "truncated from"],
    );
}
