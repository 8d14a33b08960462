//! Crafted files, as a stranger could upload them: every one gets an error naming the file, no
//! panic, and no allocation proportional to a size the file declares but does not have. The
//! corpus is generated here (one function per kind of damage) so that each case says what it is.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use safetensors::Dtype;
use stamerge::checkpoint::Checkpoint;

/// A safetensors file: declared header length, header bytes, then `data` zero bytes.
fn raw(declared: u64, header: &[u8], data: usize) -> Vec<u8> {
    let mut b = declared.to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.resize(b.len() + data, 0);
    b
}

fn st(header: &str, data: usize) -> Vec<u8> {
    raw(header.len() as u64, header.as_bytes(), data)
}

/// Well-formed JSON headers that describe impossible files: (name, header, data bytes, error).
const JSON_CASES: &[(&str, &str, usize, &str)] = &[
    (
        "unknown_dtype",
        r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
        16,
        "corrupt safetensors header",
    ),
    (
        "negative_offset",
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}"#,
        4,
        "corrupt safetensors header",
    ),
    (
        "offsets_out_of_bounds",
        r#"{"a":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}}"#,
        16,
        "corrupt safetensors header",
    ),
    (
        "offsets_reversed",
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#,
        8,
        "corrupt safetensors header",
    ),
    (
        "offsets_overlapping",
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        12,
        "corrupt safetensors header",
    ),
    (
        "offsets_with_a_gap",
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
        12,
        "corrupt safetensors header",
    ),
    (
        "offset_past_u64",
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551616]}}"#,
        4,
        "corrupt safetensors header",
    ),
    (
        "shape_product_overflows_u64",
        r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#,
        0,
        "corrupt safetensors header",
    ),
    (
        "byte_size_overflows",
        r#"{"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}}"#,
        0,
        "corrupt safetensors header",
    ),
    (
        "dtype_shape_size_mismatch",
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#,
        8,
        "corrupt safetensors header",
    ),
    (
        "duplicate_names_different_data",
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        8,
        "duplicate",
    ),
    (
        "duplicate_names_same_data",
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        4,
        "duplicate",
    ),
    (
        "metadata_not_strings",
        r#"{"__metadata__":{"format":5}}"#,
        0,
        "corrupt safetensors header",
    ),
    (
        "trailing_bytes",
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        12,
        "corrupt safetensors header",
    ),
];

/// (name, bytes, a phrase the error must contain).
fn corpus() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let deep = format!(
        "{{\"a\":{{\"dtype\":\"F32\",\"shape\":{}1{},\"data_offsets\":[0,4]}}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    vec![
        ("empty", vec![], "shorter than the 8-byte header length"),
        ("seven_bytes", vec![1, 0, 0, 0, 0, 0, 0], "shorter than"),
        (
            "header_length_past_the_end",
            raw(1000, b"{}", 0),
            "corrupt safetensors header",
        ),
        (
            "header_length_u64_max",
            raw(u64::MAX, b"{}", 0),
            "corrupt safetensors header",
        ),
        (
            "header_length_one_terabyte",
            raw(1 << 40, b"{}", 64),
            "corrupt safetensors header",
        ),
        (
            "header_length_zero",
            raw(0, b"", 16),
            "corrupt safetensors header",
        ),
        (
            "invalid_utf8",
            raw(4, &[0xff, 0xfe, 0xfd, 0xfc], 0),
            "corrupt safetensors header",
        ),
        (
            "invalid_json",
            st("{\"a\": [1, 2", 0),
            "corrupt safetensors header",
        ),
        (
            "json_array",
            st("[1, 2, 3]", 0),
            "corrupt safetensors header",
        ),
        (
            "tensor_not_an_object",
            st("{\"a\": 5}", 0),
            "corrupt safetensors header",
        ),
        ("deeply_nested", st(&deep, 4), "corrupt safetensors header"),
    ]
    .into_iter()
    .chain(
        JSON_CASES
            .iter()
            .map(|&(name, header, data, want)| (name, st(header, data), want)),
    )
    .collect()
}

fn write_corpus(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    corpus()
        .into_iter()
        .map(|(name, bytes, want)| {
            let p = dir.join(format!("{name}.safetensors"));
            std::fs::write(&p, bytes).unwrap();
            (p, want)
        })
        .collect()
}

#[test]
fn every_crafted_header_is_refused_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    for (p, want) in write_corpus(d.path()) {
        let problems = match Checkpoint::open(&p) {
            Ok(ck) => panic!("{} opened ({} tensors)", p.display(), ck.len()),
            Err(ps) => ps,
        };
        let msg = problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            msg.contains(&p.display().to_string()) && msg.contains(want),
            "{}: expected `{want}`, got: {msg}",
            p.display()
        );
    }
}

/// The same corpus through the CLI, with the address space capped at 1 GiB: a declared size
/// turned into an allocation would abort the process instead of failing with a message.
#[test]
fn the_cli_refuses_the_corpus_within_a_small_address_space() {
    let d = tempfile::tempdir().unwrap();
    for (p, want) in write_corpus(d.path()) {
        let mut cmd = Command::new(stamerge_bin());
        cmd.args(["-q", "inspect"]).arg(&p);
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 1 << 30,
                    rlim_max: 1 << 30,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", p.display());
        assert!(
            err.contains(&p.display().to_string()) && err.contains(want),
            "{}: {err}",
            p.display()
        );
    }
}

/// A sharded folder whose index is `index` (two real shards beside it).
fn sharded(dir: &Path, index: &[u8]) -> PathBuf {
    let m = dir.join("m");
    let ts: Vec<T> = (0..2)
        .map(|i| T::float(&format!("w{i}"), Dtype::F32, &[2], &[1.0, 2.0]))
        .collect();
    write_model(&m, &ts, 2, None);
    std::fs::write(m.join("model.safetensors.index.json"), index).unwrap();
    m
}

fn index_error(index: &[u8]) -> String {
    let d = tempfile::tempdir().unwrap();
    let m = sharded(d.path(), index);
    // A FIFO in the folder: opening it for reading would wait forever for a writer.
    assert!(Command::new("mkfifo")
        .arg(m.join("fifo"))
        .status()
        .unwrap()
        .success());
    match Checkpoint::open(&m) {
        Ok(_) => panic!("opened with index {}", String::from_utf8_lossy(index)),
        Err(ps) => ps
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

const S1: &str = "model-00001-of-00002.safetensors";
const S2: &str = "model-00002-of-00002.safetensors";

#[test]
fn crafted_indexes_are_refused_naming_the_index() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\xff\xfe not utf-8".to_vec(), "not valid JSON"),
        (b"{\"weight_map\": ".to_vec(), "not valid JSON"),
        (
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
            "not valid JSON",
        ),
        (b"{\"weight_map\": [1]}".to_vec(), "no `weight_map` object"),
        (b"{\"weight_map\": {}}".to_vec(), "`weight_map` is empty"),
        (
            format!(r#"{{"weight_map": {{"w0": "{S1}", "w1": 7}}}}"#).into_bytes(),
            "not a string",
        ),
        (
            format!(r#"{{"weight_map": {{"w0": "{S1}", "w1": "../m/{S2}"}}}}"#).into_bytes(),
            "outside the model folder",
        ),
        (
            format!(r#"{{"weight_map": {{"w0": "{S1}", "w1": "./{S2}"}}}}"#).into_bytes(),
            "outside the model folder",
        ),
        (
            br#"{"weight_map": {"w0": "/etc/passwd"}}"#.to_vec(),
            "outside the model folder",
        ),
        (br#"{"weight_map": {"w0": ""}}"#.to_vec(), "not a file name"),
        (
            format!(r#"{{"weight_map": {{"w0": "{S1}", "w1": "{S1}\u0000"}}}}"#).into_bytes(),
            "not a file name",
        ),
        (
            format!(r#"{{"weight_map": {{"w0": "{S1}", "w1": "fifo"}}}}"#).into_bytes(),
            "not a regular file",
        ),
        (
            format!(r#"{{"weight_map": {{"w0": "{S1}", "w1": "missing.safetensors"}}}}"#)
                .into_bytes(),
            "missing.safetensors",
        ),
        (
            format!(r#"{{"weight_map": {{"w0": "{S1}", "w1": "{S1}"}}}}"#).into_bytes(),
            "missing from this shard",
        ),
    ];
    for (index, want) in cases {
        let msg = index_error(&index);
        assert!(
            msg.contains(want),
            "index {:?}: expected `{want}`, got: {msg}",
            String::from_utf8_lossy(&index[..index.len().min(80)])
        );
    }
}

#[test]
fn a_shard_symlinked_outside_the_folder_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let index = format!(r#"{{"weight_map": {{"w0": "{S1}", "w1": "{S2}"}}}}"#);
    let m = sharded(d.path(), index.as_bytes());
    let elsewhere = d.path().join("elsewhere.safetensors");
    std::fs::rename(m.join(S2), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, m.join(S2)).unwrap();
    let msg = index_error_at(&m);
    assert!(
        msg.contains("outside the model folder") && msg.contains(S2),
        "{msg}"
    );
    // A symlink that stays inside the folder is fine.
    std::fs::remove_file(m.join(S2)).unwrap();
    std::fs::create_dir(m.join("sub")).unwrap();
    std::fs::rename(&elsewhere, m.join("sub/real.safetensors")).unwrap();
    std::os::unix::fs::symlink("sub/real.safetensors", m.join(S2)).unwrap();
    assert_eq!(Checkpoint::open(&m).map(|c| c.len()).ok(), Some(2));
}

/// How `huggingface-cli download` (without --local-dir) lays out a model: every file in
/// `snapshots/REV/` is a symlink into the repository's `blobs/`. That is outside the snapshot
/// folder, yet the model's own files; it must open.
#[test]
fn a_hugging_face_cache_snapshot_opens() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("models--org--name");
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots/0123abcd");
    let index = format!(r#"{{"weight_map": {{"w0": "{S1}", "w1": "{S2}"}}}}"#);
    let m = sharded(d.path(), index.as_bytes());
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for (i, f) in [S1, S2, "model.safetensors.index.json"].iter().enumerate() {
        std::fs::rename(m.join(f), blobs.join(format!("blob{i}"))).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snap.join(f)).unwrap();
    }
    let ck = Checkpoint::open(&snap).unwrap_or_else(|ps| panic!("{ps:?}"));
    assert_eq!(ck.len(), 2);
    // But not a blob of another repository.
    let other = d.path().join("models--evil--x/blobs");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::rename(blobs.join("blob1"), other.join("blob1")).unwrap();
    std::fs::remove_file(snap.join(S2)).unwrap();
    std::os::unix::fs::symlink(other.join("blob1"), snap.join(S2)).unwrap();
    let msg = index_error_at(&snap);
    assert!(msg.contains("outside the model folder"), "{msg}");
}

fn index_error_at(m: &Path) -> String {
    match Checkpoint::open(m) {
        Ok(_) => panic!("{} opened", m.display()),
        Err(ps) => ps
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// Numbers that YAML reads as finite f64 but that overflow the f32 the merge computes in, and
/// recipe text built to blow up a parser (alias expansion, deep nesting).
#[test]
fn crafted_recipes_are_refused() {
    let dir = Path::new("/nonexistent");
    let cases: &[(&str, &str)] = &[
        (
            "merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: t\n    parameters:\n      weight: 1e39\n",
            "`weight` must be a finite number",
        ),
        (
            "merge_method: task_arithmetic\nbase_model: b\nparameters:\n  lambda: -1e300\nmodels:\n  - model: t\n",
            "`lambda` must be a finite number",
        ),
        (
            "merge_method: task_arithmetic\nbase_model: b\nparameters:\n  weight: .nan\nmodels:\n  - model: t\n",
            "`weight` must be a finite number",
        ),
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]\n",
            "",
        ),
    ];
    for (text, want) in cases {
        let msg = match stamerge::Recipe::parse(text, dir) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(ps) => ps
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        };
        assert!(msg.contains(want), "expected `{want}`, got: {msg}");
    }
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(stamerge::Recipe::parse(&deep, dir).is_err());
}

/// Issue 15: "offsets past EOF name no tensor". A file cut short after its header names the
/// tensor whose data is missing, and what is missing.
#[test]
fn data_past_the_end_of_the_file_names_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[4],"data_offsets":[4,20]}}"#;
    let p = d.path().join("cut.safetensors");
    std::fs::write(&p, st(header, 9)).unwrap();
    let msg = match Checkpoint::open(&p) {
        Ok(_) => panic!("opened a cut file"),
        Err(ps) => ps[0].to_string(),
    };
    assert!(
        msg.contains("`b`") && msg.contains("truncated") && msg.contains("[4, 20]"),
        "{msg}"
    );
    // Trailing bytes name the last tensor too.
    std::fs::write(&p, st(header, 24)).unwrap();
    let msg = match Checkpoint::open(&p) {
        Ok(_) => panic!("opened a file with trailing bytes"),
        Err(ps) => ps[0].to_string(),
    };
    assert!(msg.contains("`b`") && msg.contains("4 bytes"), "{msg}");
}

/// Issue 15: 300 000 problems printed 47 MB. The list is capped, with the count of the rest.
#[test]
fn a_flood_of_problems_is_capped_with_a_count() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    write_model(
        &p.join("base"),
        &[T::float("w", Dtype::F32, &[1], &[1.0])],
        1,
        None,
    );
    // A task with 100 000 tensors the base lacks (zero-size: a small file).
    let mut h = String::from(r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#);
    for i in 0..100_000 {
        h.push_str(&format!(
            r#","extra.{i}":{{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}"#
        ));
    }
    h.push('}');
    std::fs::create_dir(p.join("task")).unwrap();
    std::fs::write(p.join("task/model.safetensors"), st(&h, 4)).unwrap();
    std::fs::write(
        p.join("r.yml"),
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: task\n",
    )
    .unwrap();
    let o = Command::new(stamerge_bin())
        .args(["plan", "r.yml"])
        .current_dir(p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.len() < 64 << 10, "{} bytes of problems", err.len());
    assert!(
        err.contains("100000 problem(s)") && err.contains("99950 more"),
        "{}",
        &err[..err.len().min(2000)]
    );
}

/// Issue 15 #6: `tokenizer.json -> /etc/shadow` in the base put a copy of /etc/shadow into the
/// output. Side files, config.json and an unindexed model file follow the shards' rule: a
/// symlink must stay inside the model folder (or be a Hugging Face cache blob of the same
/// repository).
#[test]
fn side_files_and_unindexed_weights_must_stay_inside_the_model_folder() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    synth(p, &["--tasks", "2"]);
    std::fs::write(p.join("secret.txt"), b"TOP SECRET").unwrap();
    let secret = p.join("secret.txt");
    for side in [
        "tokenizer.json",
        "vocab.txt",
        "config.json",
        "generation_config.json",
    ] {
        let link = p.join("base").join(side);
        let saved = std::fs::read(&link).ok();
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        for cmd in ["plan", "merge"] {
            let o = Command::new(stamerge_bin())
                .args([cmd, "ties.yml", "out"])
                .current_dir(p)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{side} {cmd}: {err}");
            // Recipe paths are relative to the recipe's folder, the working directory here.
            assert!(
                err.contains(&format!("base/{side}")) && err.contains("outside the model folder"),
                "{side} {cmd}: {err}"
            );
            assert!(!p.join("out").exists(), "{side}: merged");
        }
        std::fs::remove_file(&link).unwrap();
        if let Some(b) = saved {
            std::fs::write(&link, b).unwrap();
        }
    }
    // A symlink that stays inside the folder is copied (its contents, not the link).
    std::fs::create_dir(p.join("base/tok")).unwrap();
    std::fs::write(p.join("base/tok/tokenizer.json"), b"{\"inside\": true}").unwrap();
    std::os::unix::fs::symlink("tok/tokenizer.json", p.join("base/tokenizer.json")).unwrap();
    let o = Command::new(stamerge_bin())
        .args(["-q", "merge", "ties.yml", "out"])
        .current_dir(p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let copied = p.join("out/tokenizer.json");
    assert!(!std::fs::symlink_metadata(&copied).unwrap().is_symlink());
    assert_eq!(std::fs::read(&copied).unwrap(), b"{\"inside\": true}");

    // An unindexed model file (`model.safetensors`, or a folder's only `.safetensors`).
    for name in ["model.safetensors", "weights.safetensors"] {
        let m = p.join(format!("m-{name}"));
        std::fs::create_dir(&m).unwrap();
        let elsewhere = p.join(format!("elsewhere-{name}"));
        write_model(
            &p.join("tmp-model"),
            &[T::float("w", Dtype::F32, &[1], &[1.0])],
            1,
            None,
        );
        std::fs::rename(p.join("tmp-model/model.safetensors"), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, m.join(name)).unwrap();
        let msg = index_error_at(&m);
        assert!(
            msg.contains("outside the model folder") && msg.contains(name),
            "{name}: {msg}"
        );
    }
}

/// Hugging Face cache snapshots symlink every file into `../../blobs/`: side files there are the
/// model's own and are copied, as shards there are read.
#[test]
fn a_hugging_face_cache_snapshot_s_side_files_are_copied() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    synth(p, &["--tasks", "2"]);
    let repo = p.join("models--org--base");
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(p.join("base/tokenizer.json"), b"{\"model\": \"bpe\"}").unwrap();
    for (i, e) in std::fs::read_dir(p.join("base"))
        .unwrap()
        .flatten()
        .enumerate()
    {
        std::fs::rename(e.path(), blobs.join(format!("blob{i}"))).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snap.join(e.file_name()))
            .unwrap();
    }
    let recipe = std::fs::read_to_string(p.join("ties.yml"))
        .unwrap()
        .replace(
            "base_model: base",
            "base_model: models--org--base/snapshots/0123abcd",
        );
    std::fs::write(p.join("snap.yml"), recipe).unwrap();
    let o = Command::new(stamerge_bin())
        .args(["-q", "merge", "snap.yml", "out"])
        .current_dir(p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(p.join("out/tokenizer.json")).unwrap(),
        b"{\"model\": \"bpe\"}"
    );
    assert!(p.join("out/config.json").is_file());
}
