//! The CLI end to end: interrupted and killed runs leave no output, outputs are sharded and
//! indexed as transformers expects, results do not depend on the thread count, mergekit recipes
//! run unchanged, and the bundled example merges.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

fn tmp_dirs(parent: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".stamerge-tmp-"))
        .map(|e| e.path())
        .collect()
}

/// Starts a merge and returns once it has begun writing into its temporary folder.
fn start_merge(dir: &Path, recipe: &str, out: &str) -> Child {
    let child = Command::new(stamerge_bin())
        .args(["-q", "merge", recipe, out, "--threads", "1"])
        .current_dir(dir)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while tmp_dirs(dir).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "merge never started writing"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

fn big_set() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    synth(
        d.path(),
        &[
            "--layers",
            "4",
            "--hidden",
            "512",
            "--intermediate",
            "1024",
            "--vocab",
            "4000",
            "--tasks",
            "2",
            "--shard-size",
            "10MB",
        ],
    );
    d
}

#[test]
fn killed_and_interrupted_runs_leave_no_output() {
    let d = big_set();
    // SIGKILL: no chance to clean up, yet the target does not exist...
    let mut c = start_merge(d.path(), "sta_model.yml", "out");
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(!d.path().join("out").exists());
    assert_eq!(
        tmp_dirs(d.path()).len(),
        1,
        "the killed run's temporary folder is still there"
    );
    // ...and the next run removes the stale temporary folder and completes.
    let o = Command::new(stamerge_bin())
        .args(["-q", "merge", "ties.yml", "out"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        d.path().join("out/model.safetensors.index.json").is_file()
            || d.path().join("out/model.safetensors").is_file()
    );
    assert!(tmp_dirs(d.path()).is_empty());

    // SIGINT: a clean stop, exit 130, nothing left, the existing output untouched.
    let before = std::fs::read(d.path().join("out/stamerge_report.json")).unwrap();
    let c = start_merge(d.path(), "sta_model.yml", "out2");
    let st = Command::new("kill")
        .args(["-INT", &c.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = c.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130));
    assert!(!d.path().join("out2").exists());
    assert!(tmp_dirs(d.path()).is_empty());
    assert_eq!(
        std::fs::read(d.path().join("out/stamerge_report.json")).unwrap(),
        before
    );
}

fn shard_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn same_bytes_on_any_thread_count_and_sharded_output_reloads() {
    let d = tempfile::tempdir().unwrap();
    synth(
        d.path(),
        &[
            "--layers",
            "2",
            "--hidden",
            "96",
            "--intermediate",
            "200",
            "--vocab",
            "300",
            "--tasks",
            "3",
        ],
    );
    for recipe in ["dare_ties.yml", "sta_model.yml", "ties.yml"] {
        let mut outs = Vec::new();
        for threads in ["1", "2"] {
            let out = d.path().join(format!("{recipe}-{threads}"));
            let o = Command::new(stamerge_bin())
                .args(["-q", "merge", recipe])
                .arg(&out)
                .args(["--threads", threads, "--out-shard-size", "100KB"])
                .current_dir(d.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            outs.push(shard_bytes(&out));
        }
        assert!(outs[0].len() > 1, "expected several shards");
        assert_eq!(outs[0], outs[1], "{recipe}: thread count changed the bytes");
    }
    // Another seed draws another DARE mask.
    let text = std::fs::read_to_string(d.path().join("dare_ties.yml"))
        .unwrap()
        .replace("seed: 7", "seed: 8");
    std::fs::write(d.path().join("dare8.yml"), text).unwrap();
    let o = Command::new(stamerge_bin())
        .args([
            "-q",
            "merge",
            "dare8.yml",
            "d8",
            "--out-shard-size",
            "100KB",
        ])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_ne!(
        shard_bytes(&d.path().join("d8")),
        shard_bytes(&d.path().join("dare_ties.yml-1"))
    );

    // The sharded output is what transformers loads: index with total_size and weight_map,
    // every shard with format pt, every mapped tensor in its shard.
    let out = d.path().join("ties.yml-1");
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let map = idx["weight_map"].as_object().unwrap();
    let mut total = 0u64;
    for (name, file) in map {
        let buf = std::fs::read(out.join(file.as_str().unwrap())).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&buf).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let info = meta
            .info(name)
            .unwrap_or_else(|| panic!("{name} not in {file}"));
        total += (info.data_offsets.1 - info.data_offsets.0) as u64;
    }
    assert_eq!(idx["metadata"]["total_size"].as_u64().unwrap(), total);
    let (base, _) = read_model(&d.path().join("base"));
    assert_eq!(map.len(), base.len());
    assert!(out.join("config.json").is_file() && out.join("tokenizer_config.json").is_file());
    assert!(
        out.join("generation_config.json").is_file() && out.join("stamerge_recipe.yml").is_file()
    );
}

#[test]
fn a_mergekit_recipe_runs_unchanged() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), &["--tasks", "2"]);
    // As mergekit users write them: the base listed among the models, int8_mask, dtype, etc.
    let recipe = "models:\n  - model: base\n  - model: task_0\n    parameters:\n      density: 0.5\n      weight: 0.5\n  - model: task_1\n    parameters:\n      density: 0.5\n      weight: 0.5\nmerge_method: ties\nbase_model: base\nparameters:\n  normalize: true\n  int8_mask: true\ndtype: bfloat16\ntokenizer_source: base\n";
    std::fs::write(d.path().join("mk.yml"), recipe).unwrap();
    let o = Command::new(stamerge_bin())
        .args(["merge", "mk.yml", "out"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("out/stamerge_report.json")).unwrap())
            .unwrap();
    assert!(rep["notes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n.as_str().unwrap().contains("is the base model")));
    let t = rep["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "lm_head.weight")
        .unwrap();
    assert_eq!(
        t["tasks"].as_array().unwrap().len(),
        2,
        "the base is not a task"
    );
}

#[test]
fn bundled_example_merges_with_every_recipe() {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut methods = std::collections::HashSet::new();
    for e in std::fs::read_dir(&ex).unwrap().flatten() {
        let p = e.path();
        if p.extension().map(|x| x == "yml").unwrap_or(false) {
            methods.insert(stamerge::Recipe::from_file(&p).unwrap().method.name());
            let out = tempfile::tempdir().unwrap();
            let o = Command::new(stamerge_bin())
                .arg("-q")
                .arg("merge")
                .arg(&p)
                .arg(out.path().join("m"))
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    // Every method has a bundled recipe; a variant shares its family's (the same parameters).
    let variants = ["breadcrumbs_ties", "della_linear", "ramplus_tl"];
    for m in stamerge::method::MethodKind::ALL {
        assert!(
            methods.contains(m.name()) || variants.contains(&m.name()),
            "no recipe for `{}` in examples/",
            m.name()
        );
    }
    let o = Command::new(stamerge_bin())
        .arg("inspect")
        .arg(ex.join("base"))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && s.contains("model.embed_tokens.weight"),
        "{s}"
    );
    // transformers' Llama has no `position_ids` buffer and flags one as unexpected on every load.
    assert!(!s.contains("position_ids"), "{s}");
}

#[test]
fn a_second_run_into_the_same_folder_is_refused_while_the_first_runs() {
    let d = big_set();
    let first = start_merge(d.path(), "sta_model.yml", "out");
    let o = Command::new(stamerge_bin())
        .args(["-q", "merge", "ties.yml", "out"])
        .current_dir(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("another stamerge run") && err.contains(&first.id().to_string()),
        "{err}"
    );
    let o = first.wait_with_output().unwrap();
    assert!(o.status.success(), "the first run must be unaffected");
    let recipe = std::fs::read_to_string(d.path().join("out/stamerge_recipe.yml")).unwrap();
    assert!(
        recipe.contains("selection: model"),
        "the output is the first run's"
    );
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".stamerge-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn verify_rereads_the_output_and_the_report_checksums_match_the_files() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), &["--tasks", "2"]);
    let o = Command::new(stamerge_bin())
        .args([
            "merge",
            "ties.yml",
            "out",
            "--verify",
            "--out-shard-size",
            "20KB",
        ])
        .current_dir(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("verified 21 tensors"), "{err}");
    let rep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("out/stamerge_report.json")).unwrap())
            .unwrap();
    let (got, _) = read_model(&d.path().join("out"));
    for t in rep["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let want = format!(
            "{:016x}",
            stamerge::checkpoint::writer::checksum(&got[name].bytes)
        );
        assert_eq!(t["checksum"].as_str().unwrap(), want, "{name}");
    }
}

#[test]
fn disk_full_fails_cleanly_and_keeps_the_previous_output() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), &["--tasks", "2"]);
    let small = tempfile::tempdir().unwrap();
    // A 32 KiB filesystem: the merged model (~50 KB) cannot fit. Needs root (CI runs as root).
    let Some(_mount) = Tmpfs::mount(small.path(), "size=32k") else {
        return;
    };
    let out = small.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("previous.txt"), b"an earlier merge").unwrap();
    let inputs_before = tree_bytes(d.path());
    let o = Command::new(stamerge_bin())
        .args(["-q", "merge", "ties.yml"])
        .arg(&out)
        .arg("--overwrite")
        .current_dir(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("No space left on device") && err.contains("model.safetensors"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("previous.txt")).unwrap(),
        b"an earlier merge"
    );
    let names: Vec<String> = std::fs::read_dir(small.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names,
        vec!["out".to_string()],
        "temporary folder or lock left behind"
    );
    assert!(tree_bytes(d.path()) == inputs_before, "inputs changed");
}

/// Bytes of every input file (the synthetic set's model and gradient folders), to show that no
/// interrupted run touched them.
fn input_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let input = name == "base" || name.starts_with("task_") || name.starts_with("grads_");
        if e.path().is_dir() && input {
            for f in std::fs::read_dir(e.path()).unwrap().flatten() {
                v.push((f.path(), std::fs::read(f.path()).unwrap()));
            }
        }
    }
    v.sort();
    v
}

#[test]
fn kills_and_interrupts_at_random_points_never_leave_a_partial_output() {
    let d = big_set();
    let inputs = input_bytes(d.path());
    let t0 = Instant::now();
    let o = Command::new(stamerge_bin())
        .args(["-q", "merge", "ties.yml", "ref", "--threads", "1"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full = t0.elapsed().as_micros() as u64;
    let reference = shard_bytes(&d.path().join("ref"));
    // Kill points spread from before the first write to after the commit; the seed is printed so
    // a failure can be replayed.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill-point seed {seed}");
    let (mut absent, mut complete) = (0, 0);
    for run in 0..8 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(seed % (full + full / 5));
        let out = format!("out{run}");
        let mut c = Command::new(stamerge_bin())
            .args(["-q", "merge", "ties.yml", &out, "--threads", "1"])
            .current_dir(d.path())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let signal = if run % 2 == 0 { "-KILL" } else { "-INT" };
        let _ = Command::new("kill")
            .args([signal, &c.id().to_string()])
            .status();
        c.wait().unwrap();
        let target = d.path().join(&out);
        if target.exists() {
            assert_eq!(
                shard_bytes(&target),
                reference,
                "run {run} ({signal} after {delay:?}) left {out} but it differs from a full run"
            );
            complete += 1;
        } else {
            absent += 1;
        }
        // The next run into the same folder removes whatever the stopped one left, and completes.
        let o = Command::new(stamerge_bin())
            .args(["-q", "merge", "ties.yml", &out, "--overwrite"])
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(shard_bytes(&target), reference);
    }
    eprintln!("kill points: {absent} stopped before the commit, {complete} after");
    assert!(tmp_dirs(d.path()).is_empty(), "a temporary folder survived");
    let locks: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".stamerge-lock"))
        .collect();
    assert!(locks.is_empty(), "a lock file survived");
    assert!(!inputs.is_empty());
    assert!(input_bytes(d.path()) == inputs, "an input changed");
}

fn signal(sig: &str, pid: u32) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Issue 15 #10: SIGTERM (`kill`, systemd, docker stop) and SIGHUP (a closed terminal or SSH
/// session) stop the run as SIGINT does: after the current tensor, the temporary folder and the
/// lock removed, exit 128 + the signal's number.
#[test]
fn sigterm_and_sighup_stop_as_cleanly_as_sigint() {
    let d = big_set();
    for (sig, code) in [("-TERM", 143), ("-HUP", 129), ("-INT", 130)] {
        let c = start_merge(d.path(), "sta_model.yml", "out");
        signal(sig, c.id());
        let o = c.wait_with_output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(code),
            "{sig}: {:?} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!d.path().join("out").exists(), "{sig}");
        assert!(
            leftovers(d.path()).is_empty(),
            "{sig}: {:?}",
            leftovers(d.path())
        );
    }
}

/// A pid no process has: a child that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    c.wait().unwrap();
    c.id()
}

/// Issue 15 #5: a run killed between the two renames of an `--overwrite` commit left the old
/// output in `.out.stamerge-old-PID`, its own in `.out.stamerge-tmp-PID` and no `out`; the next
/// run deleted both as leftovers. The old output is never deleted: `plan` says where it is,
/// a run without --overwrite refuses, and a run with --overwrite restores it before replacing it
/// (so that it is replaced only by a complete output).
#[test]
fn a_run_killed_between_the_renames_of_its_commit_loses_nothing() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), &["--tasks", "2"]);
    let p = d.path();
    let o = Command::new(stamerge_bin())
        .args(["-q", "merge", "ties.yml", "out"])
        .current_dir(p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let previous = shard_bytes(&p.join("out"));
    let pid = dead_pid();
    let old = p.join(format!(".out.stamerge-old-{pid}"));
    let tmp = p.join(format!(".out.stamerge-tmp-{pid}"));
    std::fs::rename(p.join("out"), &old).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"half a model").unwrap();
    for args in [
        &["plan", "task_arithmetic.yml", "out"][..],
        &["merge", "task_arithmetic.yml", "out"][..],
    ] {
        let o = Command::new(stamerge_bin())
            .args(args)
            .current_dir(p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("interrupted") && err.contains(&old.display().to_string()),
            "{args:?}: {err}"
        );
        assert_eq!(
            shard_bytes(&old),
            previous,
            "{args:?}: the old output changed"
        );
    }
    let o = Command::new(stamerge_bin())
        .args(["-q", "merge", "task_arithmetic.yml", "out", "--overwrite"])
        .current_dir(p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recipe = std::fs::read_to_string(p.join("out/stamerge_recipe.yml")).unwrap();
    assert!(recipe.contains("task_arithmetic"));
    assert!(leftovers(p).is_empty(), "{:?}", leftovers(p));
}

/// Holds `flock(LOCK_EX)` on a file until dropped, as a live run in any PID namespace would.
struct Held(#[allow(dead_code)] std::fs::File);

impl Held {
    fn take(path: &Path) -> Self {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        // SAFETY: a plain system call on a descriptor this struct owns.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, 0, "flock");
        Self(f)
    }
}

/// Issue 15 #3 and #4: liveness came from the pid written in the lock file, looked up in
/// `/proc` of the caller's PID namespace. Now the lock is the kernel's (`flock` on the lock
/// file): held while its holder lives, whatever the file says and wherever the holder runs, and
/// gone when it dies.
#[test]
fn the_lock_is_the_kernel_s_not_the_pid_written_in_the_file() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), &["--tasks", "2"]);
    let p = d.path();
    let lock = p.join(".out.stamerge-lock");
    // A live run that has not yet written its pid (or whose pid means nothing here), with its
    // temporary folder.
    let held = Held::take(&lock);
    let theirs = p.join(".out.stamerge-tmp-4000001");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("model.safetensors"), b"their work").unwrap();
    let o = Command::new(stamerge_bin())
        .args(["-q", "merge", "ties.yml", "out"])
        .current_dir(p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("another stamerge run"), "{err}");
    assert_eq!(
        std::fs::read(theirs.join("model.safetensors")).unwrap(),
        b"their work",
        "a live run's temporary folder was touched"
    );
    assert!(lock.exists(), "a live run's lock file was removed");
    // The holder dies (its folder stays), and the file names a live process: the lock is free.
    drop(held);
    std::fs::write(&lock, std::process::id().to_string()).unwrap();
    let o = Command::new(stamerge_bin())
        .args(["-q", "merge", "ties.yml", "out"])
        .current_dir(p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(leftovers(p).is_empty(), "{:?}", leftovers(p));
}

/// Issue 15 #4 with real namespaces: a run in a PID namespace of its own (as in a container
/// sharing the volume) sees no process with the first run's pid. It must still find the lock
/// held, refuse, and leave the first run's temporary folder alone. Needs root and unshare.
#[test]
fn a_run_in_another_pid_namespace_respects_the_lock() {
    let ok = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED (unshare --pid is not available here): namespace lock test");
        return;
    }
    let d = big_set();
    let first = start_merge(d.path(), "sta_model.yml", "out");
    let tmp = tmp_dirs(d.path());
    let o = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(stamerge_bin())
        .args(["-q", "merge", "ties.yml", "out"])
        .current_dir(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let tmp_kept = tmp.iter().all(|t| t.exists());
    let first = first.wait_with_output().unwrap();
    assert!(!o.status.success(), "the second run ran beside the first");
    assert!(err.contains("another stamerge run"), "{err}");
    assert!(tmp_kept, "the first run's temporary folder was removed");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let recipe = std::fs::read_to_string(d.path().join("out/stamerge_recipe.yml")).unwrap();
    assert!(recipe.contains("selection: model"));
    assert!(leftovers(d.path()).is_empty());
}

/// Issue 15 #2: emptiness was checked at plan time only, so an output that appeared while the
/// merge ran (another run's, finished) was silently replaced. It is checked again under the
/// lock just before the commit: refused without --overwrite, and left whole.
#[test]
fn an_output_that_appears_during_the_merge_is_not_replaced_without_overwrite() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), &["--tasks", "2"]);
    let p = d.path();
    let opts = stamerge::Options {
        device: stamerge::Device::Cpu,
        ..Default::default()
    };
    let r = stamerge::Recipe::from_file(&p.join("ties.yml")).unwrap();
    let out = p.join("out");
    let plan = stamerge::plan(&r, Some(&out), &opts).unwrap();
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("theirs.txt"), b"another merge").unwrap();
    let e = match stamerge::merge_planned(&plan, &out, &opts) {
        Ok(_) => panic!("replaced an output that appeared during the merge"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("--overwrite"), "{e}");
    assert_eq!(file_names(&out), vec!["theirs.txt"]);
    assert!(leftovers(p).is_empty(), "{:?}", leftovers(p));
    // An empty folder that appears is no one's output: it is filled.
    std::fs::remove_file(out.join("theirs.txt")).unwrap();
    stamerge::merge_planned(&plan, &out, &opts).unwrap();
    assert!(out.join(stamerge::REPORT_NAME).is_file());
}

/// A set of `n` single-tensor shards per checkpoint (three checkpoints): planning it opens and
/// maps 3n files.
fn many_files(dir: &Path, n: usize) {
    for m in ["base", "task_0", "task_1"] {
        let ts: Vec<T> = (0..n)
            .map(|i| {
                T::float(
                    &format!("w.{i:05}"),
                    safetensors::Dtype::F32,
                    &[2],
                    &[0.5, 1.0],
                )
            })
            .collect();
        write_model(&dir.join(m), &ts, n, None);
    }
    std::fs::write(
        dir.join("r.yml"),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: task_0\n  - model: task_1\n",
    )
    .unwrap();
}

/// Issue 15: Ctrl-C during a long plan (thousands of files) was honoured only once planning
/// ended; `plan` then printed "ok" and exited 0. The interrupt is seen between files.
#[test]
fn ctrl_c_during_a_long_plan_stops_it() {
    let d = tempfile::tempdir().unwrap();
    many_files(d.path(), 3000);
    let c = Command::new(stamerge_bin())
        .args(["plan", "r.yml"])
        .current_dir(d.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Planning has begun once the first shard is mapped.
    let maps = format!("/proc/{}/maps", c.id());
    let t0 = Instant::now();
    loop {
        let m = std::fs::read_to_string(&maps).unwrap_or_default();
        if m.contains("model-00001-of-03000") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "planning never began"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    signal("-INT", c.id());
    let o = c.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(130),
        "{:?}: {out}{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.contains("ok:"), "{out}");
}
