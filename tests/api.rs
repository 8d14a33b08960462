//! The library as a program embedding it (the Python binding, a GUI) uses it: a progress hook that
//! sees every byte the bar counts, and a per-call cancel token that stops one merge from another
//! thread the way Ctrl-C stops the CLI: no output, no temporary folder, the previous output kept.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use common::leftovers;
use stamerge::synth::{generate, SynthSpec};
use stamerge::{CancelToken, Device, Error, Options, ProgressHook, Recipe};

fn set(dir: &Path) -> Recipe {
    generate(&SynthSpec::default(), dir).unwrap();
    Recipe::from_file(&dir.join("sta_model.yml")).unwrap()
}

#[test]
fn the_progress_hook_sees_every_byte_once_in_order() {
    let d = tempfile::tempdir().unwrap();
    let recipe = set(d.path());
    let calls: Arc<Mutex<Vec<(u64, u64, f64)>>> = Arc::default();
    let seen = calls.clone();
    let opts = Options {
        device: Device::Cpu,
        on_progress: Some(ProgressHook(Arc::new(move |done, total, rate| {
            seen.lock().unwrap().push((done, total, rate))
        }))),
        ..Options::default()
    };
    let rep = stamerge::merge(&recipe, &d.path().join("out"), &opts).unwrap();
    let calls = calls.lock().unwrap();
    // `selection: model` reads the model once per pass: more calls than tensors.
    assert!(calls.len() > rep.tensors.len(), "{} calls", calls.len());
    let total = calls[0].1;
    assert!(calls.iter().all(|c| c.1 == total && c.2 >= 0.0));
    assert!(calls.windows(2).all(|w| w[0].0 < w[1].0), "done must grow");
    assert_eq!(calls.last().unwrap().0, total, "the last call is the end");
    assert_eq!(
        total, rep.bytes_read,
        "the hook counts what the report does"
    );
}

#[test]
fn a_cancel_token_stops_one_merge_from_another_thread_and_keeps_the_old_output() {
    let d = tempfile::tempdir().unwrap();
    let recipe = set(d.path());
    let out = d.path().join("out");
    let old = stamerge::merge(
        &recipe,
        &out,
        &Options {
            device: Device::Cpu,
            ..Options::default()
        },
    )
    .unwrap();
    let old_bytes = std::fs::read(out.join(&old.shards[0])).unwrap();

    // The hook tells the other thread that the merge is under way and waits until it has
    // cancelled: the stop then lands mid-merge on every run, not by timing.
    let token = CancelToken::new();
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let (cancelled_tx, cancelled_rx) = mpsc::channel::<()>();
    let (started_tx, cancelled_rx) = (Mutex::new(started_tx), Mutex::new(cancelled_rx));
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let canceller = {
        let token = token.clone();
        std::thread::spawn(move || {
            started_rx.recv().unwrap();
            token.cancel();
            cancelled_tx.send(()).unwrap();
        })
    };
    let opts = Options {
        device: Device::Cpu,
        overwrite: true,
        cancel: Some(token.clone()),
        on_progress: Some(ProgressHook(Arc::new(move |_, _, _| {
            if counted.fetch_add(1, Ordering::SeqCst) == 2 {
                started_tx.lock().unwrap().send(()).unwrap();
                cancelled_rx.lock().unwrap().recv().unwrap();
            }
        }))),
        ..Options::default()
    };
    let err = stamerge::merge(&recipe, &out, &opts).unwrap_err();
    canceller.join().unwrap();
    assert!(matches!(err, Error::Interrupted), "{err}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "stopped at the next tensor"
    );
    assert!(token.is_cancelled());
    assert_eq!(
        std::fs::read(out.join(&old.shards[0])).unwrap(),
        old_bytes,
        "the previous output is kept"
    );
    assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));

    // The token belongs to that call: a merge without it runs.
    let again = Options {
        device: Device::Cpu,
        overwrite: true,
        ..Options::default()
    };
    stamerge::merge(&recipe, &out, &again).unwrap();
}

/// The output's README.md is a Hugging Face model card: front matter a Hub reads, then the
/// method, each model with its parameters, the version and the recipe as given.
#[test]
fn the_output_has_a_model_card_in_the_hub_layout() {
    let d = tempfile::tempdir().unwrap();
    generate(&SynthSpec::default(), d.path()).unwrap();
    let card = |recipe: &str, out: &str| -> (serde_yaml_ng::Value, String) {
        let r = Recipe::from_file(&d.path().join(recipe)).unwrap();
        let opts = Options {
            device: Device::Cpu,
            ..Options::default()
        };
        stamerge::merge(&r, &d.path().join(out), &opts).unwrap();
        let text = std::fs::read_to_string(d.path().join(out).join("README.md")).unwrap();
        let rest = text.strip_prefix("---\n").expect("front matter first");
        let (meta, body) = rest.split_once("\n---\n").expect("front matter closed");
        (serde_yaml_ng::from_str(meta).unwrap(), body.to_string())
    };
    let (meta, body) = card("ties.yml", "merged-ties");
    let names = |v: &serde_yaml_ng::Value| -> Vec<String> {
        v.as_sequence()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(&meta["base_model"]),
        ["base", "task_0", "task_1", "task_2"]
    );
    assert_eq!(names(&meta["tags"]), ["merge", "stamerge"]);
    assert_eq!(meta["library_name"].as_str(), Some("transformers"));
    assert!(body.starts_with("# merged-ties\n"), "{body}");
    let version = format!(
        "stamerge](https://crates.io/crates/stamerge) {}",
        env!("CARGO_PKG_VERSION")
    );
    assert!(body.contains(&version), "{body}");
    assert!(
        body.contains("[TIES](https://arxiv.org/abs/2306.01708)"),
        "{body}"
    );
    for t in 0..3 {
        let line = format!("* `task_{t}` (weight 1, density 0.3, selection tensor)");
        assert!(body.contains(&line), "{line} missing:\n{body}");
    }
    assert!(body.contains("output dtype bfloat16"), "{body}");
    let recipe = std::fs::read_to_string(d.path().join("ties.yml")).unwrap();
    assert!(
        body.contains(&format!("```yaml\n{}\n```", recipe.trim_end())),
        "{body}"
    );

    // A base folder without a config.json from transformers: no library_name.
    std::fs::remove_file(d.path().join("base/config.json")).unwrap();
    let (meta, body) = card("forget.yml", "merged-forget");
    assert!(meta.get("library_name").is_none(), "{meta:?}");
    assert!(
        body.contains("subtracted (`forget`):\n* `task_2`"),
        "{body}"
    );
}
