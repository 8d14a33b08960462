//! `stamerge._native`: the Python wheel's compiled half. It runs the `stamerge` command (the very
//! source of src/main.rs, compiled in here) and exposes the library to the Python API in
//! `python/stamerge/__init__.py`, which turns the JSON these functions return into Python objects
//! and `NativeError` into its own exceptions.
//!
//! A merge runs on a thread of its own while the calling thread, holding the GIL only briefly,
//! forwards progress to the Python callback and checks for signals: Ctrl-C in Python (or an
//! exception from the callback) cancels the merge, which stops after the current tensor and
//! removes its output, as on the command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use serde_json::{json, Value};
use stamerge::plan::ItemKind;
use stamerge::{Device, Error, Options, ProgressHook, Recipe};

/// The CLI, exactly as the `stamerge` binary builds it; its `main` is the binary's entry point and
/// unused here.
#[allow(dead_code)]
#[path = "../../../src/main.rs"]
mod command;

create_exception!(
    _native,
    NativeError,
    PyException,
    "A stamerge error: (kind, message, problems as (file, tensor, message) tuples)."
);

/// Set once the API has routed log lines to Python's `logging`; the CLI then refuses to run in
/// this process (it installs its own log subscriber, which cannot coexist).
static API_LOGGING: AtomicBool = AtomicBool::new(false);

/// Library log lines go to Python's `logging` (logger `stamerge.*`) from the first API call on.
fn init_logging(py: Python<'_>) {
    if API_LOGGING.swap(true, Ordering::SeqCst) {
        return;
    }
    // Loggers cached, levels not: a level set later with logging.getLogger(...).setLevel applies.
    if let Ok(logger) = pyo3_log::Logger::new(py, pyo3_log::Caching::Loggers) {
        let _ = logger.install();
    }
}

fn to_py(e: Error) -> PyErr {
    let (kind, problems) = match &e {
        Error::Plan(ps) => ("plan", ps.clone()),
        Error::Unreadable(ps) => ("unreadable", ps.clone()),
        Error::Input(p) => ("input", vec![p.clone()]),
        Error::Interrupted => ("interrupted", vec![]),
        Error::Io { .. } => ("io", vec![]),
        _ => ("other", vec![]),
    };
    let problems: Vec<(Option<String>, Option<String>, String)> = problems
        .into_iter()
        .map(|p| (p.file.map(|f| f.display().to_string()), p.tensor, p.message))
        .collect();
    NativeError::new_err((kind, e.to_string(), problems))
}

/// A recipe from a file (`path`), YAML text (`yaml`) or JSON text of a dict (`json`); paths in
/// text are relative to the current folder.
fn load_recipe(kind: &str, value: &str) -> PyResult<Recipe> {
    let text = match kind {
        "path" => return Recipe::from_file(Path::new(value)).map_err(|ps| to_py(Error::Plan(ps))),
        "yaml" => value.to_string(),
        // The output keeps the recipe as YAML (stamerge_recipe.yml, the model card) either way.
        "json" => {
            let v: serde_yaml_ng::Value = serde_json::from_str(value)
                .map_err(|e| PyValueError::new_err(format!("the recipe dict: {e}")))?;
            serde_yaml_ng::to_string(&v)
                .map_err(|e| PyValueError::new_err(format!("the recipe dict: {e}")))?
        }
        other => return Err(PyValueError::new_err(format!("recipe kind `{other}`"))),
    };
    Recipe::parse(&text, Path::new("")).map_err(|ps| to_py(Error::Plan(ps)))
}

fn device(s: &str) -> PyResult<Device> {
    match s {
        "auto" => Ok(Device::Auto),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda),
        _ => Err(PyValueError::new_err(format!(
            "device must be \"auto\", \"cpu\" or \"cuda\", not {s:?}"
        ))),
    }
}

/// The plan as `stamerge plan` prints it, as JSON.
fn plan_json(plan: &stamerge::Plan) -> Value {
    let r = &plan.recipe;
    let tasks: Vec<Value> = r
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let params: serde_json::Map<String, Value> = r
                .task_parameters(i)
                .into_iter()
                .map(|(n, v)| (n.to_string(), Value::String(v)))
                .collect();
            json!({
                "field": t.field,
                "model": t.model,
                "gradients": t.gradients,
                "parameters": params,
                "forget": t.forget,
            })
        })
        .collect();
    let tensors: Vec<Value> = plan
        .items
        .iter()
        .map(|it| {
            let (action, k) = match &it.kind {
                ItemKind::Copy { .. } => ("copy", Value::Null),
                ItemKind::Merge { work, .. } => ("merge", json!(work.k())),
            };
            json!({
                "name": it.name,
                "action": action,
                "shape": it.shape,
                "dtype": format!("{:?}", it.out.dtype),
                "k": k,
            })
        })
        .collect();
    let cuda_digits = stamerge::backend::cuda::MODEL_DIGITS.len();
    let e = &plan.estimate;
    json!({
        "method": r.method.name(),
        "base": r.base,
        "start": r.start,
        "tasks": tasks,
        "tensors": tensors,
        "estimate": {
            "tensors_merged": e.tensors_merged,
            "tensors_copied": e.tensors_copied,
            "params_merged": e.params_merged,
            "passes": e.passes,
            "passes_cuda": e.passes_with(cuda_digits),
            "read_bytes": e.read_bytes,
            "read_bytes_cuda": e.read_bytes_with(cuda_digits),
            "write_bytes": e.write_bytes,
            "peak_bytes": e.peak_bytes,
        },
        "shards": plan.shards,
        "notes": plan.notes,
    })
}

/// `stamerge plan`: every problem (raised at once) or the plan.
#[pyfunction]
#[pyo3(signature = (kind, recipe, out_dir, overwrite, out_shard_size))]
fn plan(
    py: Python<'_>,
    kind: &str,
    recipe: &str,
    out_dir: Option<PathBuf>,
    overwrite: bool,
    out_shard_size: u64,
) -> PyResult<String> {
    init_logging(py);
    let recipe = load_recipe(kind, recipe)?;
    let opts = Options {
        out_shard_size,
        overwrite,
        ..Options::default()
    };
    let plan = py
        .detach(|| stamerge::plan(&recipe, out_dir.as_deref(), &opts))
        .map_err(to_py)?;
    Ok(plan_json(&plan).to_string())
}

/// Stops one merge from any thread (`stamerge.merge(..., cancel=token)`).
#[pyclass(frozen, module = "stamerge")]
struct CancelToken(stamerge::CancelToken);

#[pymethods]
impl CancelToken {
    #[new]
    fn new() -> Self {
        Self(stamerge::CancelToken::new())
    }
    /// Asks the merge to stop after the tensor it is working on; it then removes its output and
    /// raises `stamerge.Interrupted`. Safe from any thread, any number of times.
    fn cancel(&self) {
        self.0.cancel()
    }
    #[getter]
    fn cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
    fn __repr__(&self) -> String {
        format!("CancelToken(cancelled={})", self.cancelled())
    }
}

type Event = (u64, u64, f64);

/// Waits up to 100 ms without the GIL for the next progress event; returns the receiver, the
/// event, and whether the merge has finished (its end of the channel dropped).
fn wait(rx: Receiver<Event>) -> (Receiver<Event>, Option<Event>, bool) {
    match rx.recv_timeout(Duration::from_millis(100)) {
        Ok(ev) => (rx, Some(ev), false),
        Err(RecvTimeoutError::Timeout) => (rx, None, false),
        Err(RecvTimeoutError::Disconnected) => (rx, None, true),
    }
}

/// `stamerge merge`; returns the report as JSON.
#[pyfunction]
#[pyo3(signature = (kind, recipe, out_dir, device_name, threads, max_memory, out_shard_size,
                    overwrite, verify, report, progress, cancel))]
#[allow(clippy::too_many_arguments)]
fn merge(
    py: Python<'_>,
    kind: &str,
    recipe: &str,
    out_dir: PathBuf,
    device_name: &str,
    threads: Option<usize>,
    max_memory: Option<u64>,
    out_shard_size: u64,
    overwrite: bool,
    verify: bool,
    report: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
    cancel: Option<Py<CancelToken>>,
) -> PyResult<String> {
    init_logging(py);
    let recipe = load_recipe(kind, recipe)?;
    // A token of our own when the caller has none: Ctrl-C and a raising callback need one.
    let token = cancel.map(|c| c.get().0.clone()).unwrap_or_default();
    // With a callback, each event waits until the callback has run and signals were checked:
    // a KeyboardInterrupt or exception there stops the merge at the very next tensor, and the
    // callback's numbers are where the merge is. Without one, this thread wakes every 100 ms.
    let (tx, rx) = mpsc::channel::<Event>();
    // The merge thread holds a sender until it ends, callback or not: the loop's end signal.
    let alive = tx.clone();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let ack_rx = Mutex::new(ack_rx);
    let on_progress = progress.is_some().then(|| {
        ProgressHook(Arc::new(move |done, total, rate| {
            if tx.send((done, total, rate)).is_ok() {
                let _ = ack_rx.lock().map(|rx| rx.recv());
            }
        }) as Arc<stamerge::ProgressFn>)
    });
    let opts = Options {
        device: device(device_name)?,
        threads,
        out_shard_size,
        overwrite,
        report,
        progress: false,
        verify,
        max_memory,
        cancel: Some(token.clone()),
        on_progress,
    };
    let worker = std::thread::Builder::new()
        .name("stamerge-merge".into())
        .spawn(move || {
            let result = stamerge::merge(&recipe, &out_dir, &opts);
            drop((opts, alive)); // every sender gone: the loop below ends
            result
        })
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the merge thread: {e}")))?;
    let mut raised: Option<PyErr> = None;
    let mut rx = rx;
    loop {
        let (back, latest, done) = py.detach(move || wait(rx));
        rx = back;
        if raised.is_none() {
            if let (Some(ev), Some(cb)) = (latest, &progress) {
                if let Err(e) = cb.call1(py, ev) {
                    raised = Some(e);
                    token.cancel();
                }
            }
        }
        if raised.is_none() {
            // Runs Python's signal handlers: Ctrl-C raises KeyboardInterrupt here.
            if let Err(e) = py.check_signals() {
                raised = Some(e);
                token.cancel();
            }
        }
        if latest.is_some() {
            let _ = ack_tx.send(());
        }
        if done {
            break;
        }
    }
    // Never wait on the merge while holding the GIL: its log lines need it.
    let result = py.detach(move || worker.join());
    match (raised, result) {
        (Some(e), _) => Err(e),
        (None, Err(_)) => Err(PyRuntimeError::new_err("the merge thread panicked")),
        (None, Ok(Ok(rep))) => serde_json::to_string(&rep)
            .map_err(|e| PyRuntimeError::new_err(format!("the report: {e}"))),
        (None, Ok(Err(e))) => Err(to_py(e)),
    }
}

/// `stamerge inspect`: the tensors of a checkpoint folder or file, as JSON (with the CLI's text).
#[pyfunction]
fn inspect(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    init_logging(py);
    let ck =
        stamerge::checkpoint::Checkpoint::open(&path).map_err(|ps| to_py(Error::Unreadable(ps)))?;
    let text = stamerge::inspect::inspect(&path).map_err(to_py)?;
    let tensors: Vec<Value> = ck
        .tensors()
        .map(|(f, t)| {
            json!({
                "name": t.name,
                "dtype": format!("{:?}", t.dtype),
                "shape": t.shape,
                "nbytes": t.nbytes(),
                "file": f.path,
            })
        })
        .collect();
    Ok(json!({
        "path": path,
        "files": ck.files.iter().map(|f| &f.path).collect::<Vec<_>>(),
        "tensors": tensors,
        "vocab_size": ck.vocab_size(),
        "text": text,
    })
    .to_string())
}

/// "5GB" → 5_000_000_000, as the CLI's `--out-shard-size` and `--max-memory` read sizes.
#[pyfunction]
fn parse_size(s: &str) -> PyResult<u64> {
    command::parse_size(s).map_err(PyValueError::new_err)
}

/// The `stamerge` command with `argv` (program name first); returns its exit status.
#[pyfunction]
fn cli(py: Python<'_>, argv: Vec<OsString>) -> PyResult<u8> {
    if API_LOGGING.load(Ordering::SeqCst) {
        return Err(PyRuntimeError::new_err(
            "the stamerge command runs in a process of its own (run `stamerge ...` or \
             `python -m stamerge ...`); in a program, call stamerge.merge()",
        ));
    }
    Ok(py.detach(move || command::cli_main(argv)))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("core_version", stamerge::VERSION)?;
    m.add("has_kernels", stamerge::backend::cuda::HAVE_KERNELS)?;
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add_class::<CancelToken>()?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(cli, m)?)?;
    Ok(())
}
