//! The whole merge as the CLI runs it: plan (header-only checks of the inputs and the output
//! folder), open the backend, run the [`pipeline`], write the side files (config, tokenizer,
//! recipe), verify the output (`--verify`), write the report, and commit the output folder.
//!
//! The crate root re-exports everything public here, so `stamerge::merge`, `stamerge::Options`
//! and the rest keep their paths.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{self, Backend};
use crate::checkpoint::outdir::{OutputDir, PendingFile};
use crate::checkpoint::paths::{check_report, check_target};
use crate::{checkpoint, error, memory, pipeline, report};
use crate::{Error, Plan, Recipe, Report, Result};

/// Set by the interrupt handler; the pipeline stops at the next tensor and removes its output.
/// It stops every merge of the process; [`CancelToken`] stops one.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Stops one merge from another thread (the Python API's cancel, a caller's own Ctrl-C): the
/// pipeline stops at the next tensor, removes the partial output and [`merge`] returns
/// [`Error::Interrupted`], as on Ctrl-C. Clones share one flag.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub(crate) fn flag(&self) -> &AtomicBool {
        &self.0
    }
}

pub use crate::pipeline::ProgressFn;

/// A [`ProgressFn`] that [`Options`] can hold (cloned, printed by its `Debug`).
#[derive(Clone)]
pub struct ProgressHook(pub Arc<ProgressFn>);

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook(..)")
    }
}

/// Where the merge computes (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA when a usable GPU and kernels are present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// The default largest output shard (`--out-shard-size`): 5 GB.
pub const DEFAULT_OUT_SHARD_BYTES: u64 = 5_000_000_000;

#[derive(Clone, Debug)]
pub struct Options {
    pub device: Device,
    /// Worker threads for the CPU backend (default: all cores).
    pub threads: Option<usize>,
    pub out_shard_size: u64,
    pub overwrite: bool,
    /// Also write the report here (it is always written into the output folder).
    pub report: Option<PathBuf>,
    /// Show a progress bar (terminal) or periodic log lines.
    pub progress: bool,
    /// Re-read every output tensor before the folder is renamed into place and compare its
    /// checksum with the one computed while writing.
    pub verify: bool,
    /// GPU memory the cuda backend may use, in bytes (None:
    /// [`DEFAULT_BUDGET_SHARE`](backend::cuda::DEFAULT_BUDGET_SHARE) of the free memory, 90%);
    /// larger tensor groups are processed in chunks.
    pub max_memory: Option<u64>,
    /// Stops this merge when cancelled (besides [`INTERRUPTED`]).
    pub cancel: Option<CancelToken>,
    /// Receives the progress (besides or instead of the bar `progress` shows).
    pub on_progress: Option<ProgressHook>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            device: Device::Auto,
            threads: None,
            out_shard_size: DEFAULT_OUT_SHARD_BYTES,
            overwrite: false,
            report: None,
            progress: false,
            verify: false,
            max_memory: None,
            cancel: None,
            on_progress: None,
        }
    }
}

/// Picks the backend; `auto` uses CUDA when device 0 opens and runs the kernels, else the CPU,
/// and says why in an info line.
pub fn select_backend(device: Device) -> Result<Box<dyn Backend>> {
    open_backend(device, None)
}

/// As [`select_backend`], with the cuda backend's memory budget (`--max-memory`).
pub fn open_backend(device: Device, max_memory: Option<u64>) -> Result<Box<dyn Backend>> {
    use backend::cuda::CudaBackend;
    match device {
        Device::Cpu => Ok(Box::new(backend::cpu::CpuBackend::new())),
        Device::Cuda => match CudaBackend::with_max_memory(0, max_memory) {
            Ok(b) => {
                tracing::info!("using the cuda backend on {}", b.description());
                tracing::debug!("cuda: a GPU memory budget of {} bytes", b.max_memory());
                Ok(Box::new(b))
            }
            Err(reason) => Err(Error::Other(format!("--device cuda: {reason}"))),
        },
        Device::Auto => match CudaBackend::with_max_memory(0, max_memory) {
            Ok(b) => {
                tracing::info!("using the cuda backend on {}", b.description());
                tracing::debug!("cuda: a GPU memory budget of {} bytes", b.max_memory());
                Ok(Box::new(b))
            }
            Err(reason) => {
                tracing::info!("using the cpu backend (cuda is not available: {reason})");
                Ok(Box::new(backend::cpu::CpuBackend::new()))
            }
        },
    }
}

/// What of the plan's work the CUDA kernels lack (the method, or a setting such as sta's
/// `threshold` or ties' L1 rescale after its top-k mask), if anything.
pub fn cuda_lacks(plan: &Plan) -> Option<String> {
    let method = plan.recipe.method;
    if !method.has_cuda_kernels() {
        return Some(format!("merge_method `{}`", method.name()));
    }
    plan.items.iter().find_map(|item| match &item.kind {
        crate::plan::ItemKind::Merge { work, .. } => {
            crate::method::sparse::cuda_lacks(&work.shape_jobs(), &work.fuse)
        }
        _ => None,
    })
}

/// The device to open for `plan`: `--device cuda` refuses work without kernels before any work
/// (no silent CPU fallback); `auto` merges it on the CPU and says why.
fn kernels_for(plan: &Plan, device: Device) -> Result<Device> {
    let Some(why) = (device != Device::Cpu).then(|| cuda_lacks(plan)).flatten() else {
        return Ok(device);
    };
    if device == Device::Cuda {
        return Err(no_kernels(&why));
    }
    tracing::info!("using the cpu backend ({why} has no CUDA kernels yet)");
    Ok(Device::Cpu)
}

/// The first tensor the opened backend cannot merge (its memory budget is known only now), as
/// an error before the output folder exists.
fn refused(plan: &Plan, backend: &dyn Backend) -> Result<()> {
    let why = plan.items.iter().find_map(|item| match &item.kind {
        crate::plan::ItemKind::Merge { work, .. } => {
            backend.refuses(&plan.group(item), &work.shape_jobs(), &work.fuse)
        }
        _ => None,
    });
    match why {
        Some(why) => Err(Error::Other(format!("--device {}: {why}", backend.name()))),
        None => Ok(()),
    }
}

fn no_kernels(why: &str) -> Error {
    Error::Other(format!(
        "--device cuda: {why} has no CUDA kernels yet; merge with --device cpu (or auto, which \
         picks the CPU for it)"
    ))
}

/// Every input path of a recipe (for the output-folder checks).
fn input_paths(recipe: &Recipe) -> Vec<PathBuf> {
    let mut v = vec![recipe.base.clone()];
    if let Some(crate::recipe::TokenizerSource::Model(p, _)) = &recipe.tokenizer {
        v.push(p.clone());
    }
    v.extend(recipe.start.iter().cloned());
    for t in &recipe.tasks {
        v.push(t.model.clone());
        v.extend(t.gradients.iter().cloned());
    }
    v
}

/// Header-only plan: every problem of the inputs and of the output folder, at once.
pub fn plan(recipe: &Recipe, out_dir: Option<&Path>, opts: &Options) -> Result<Plan> {
    let mut problems = Vec::new();
    let inputs = input_paths(recipe);
    if let Some(out) = out_dir {
        problems.extend(check_target(out, opts.overwrite, &inputs));
    }
    if let Some(r) = &opts.report {
        problems.extend(check_report(r, out_dir, &inputs, recipe.path.as_deref()));
    }
    // Found here, not when they are copied after the work.
    if recipe.base.is_dir() {
        problems.extend(
            checkpoint::side::scan(&recipe.base)
                .err()
                .unwrap_or_default(),
        );
    }
    let built = Plan::build(recipe, opts.out_shard_size);
    if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    match built {
        Ok(mut p) if problems.is_empty() => {
            let notes: Vec<String> = p
                .inputs
                .checkpoints()
                .flat_map(|c| c.notes.clone())
                .collect();
            p.notes.extend(notes);
            Ok(p)
        }
        Ok(_) => Err(Error::Plan(problems)),
        Err(ps) => {
            problems.extend(ps);
            Err(Error::Plan(problems))
        }
    }
}

pub use crate::checkpoint::paths::{RECIPE_NAME, REPORT_NAME};

/// Re-reads every tensor of the output shards and compares it with the checksum taken while it
/// was written: a disk or filesystem that corrupts data is caught before the rename.
fn verify_output(plan: &Plan, outcome: &pipeline::Outcome, dir: &Path) -> Result<()> {
    let mut want = std::collections::HashMap::new();
    for (item, c) in plan.items.iter().zip(&outcome.checksums) {
        want.insert(item.name.as_str(), *c);
    }
    let mut seen = 0;
    for file in &outcome.shards.files {
        let f = checkpoint::SafetensorsFile::open(&dir.join(file))
            .map_err(|p| Error::Other(format!("--verify: {p}")))?;
        for t in &f.tensors {
            let got = checkpoint::writer::checksum(f.bytes(t));
            if want.get(t.name.as_str()) != Some(&got) {
                return Err(Error::Other(format!(
                    "--verify: tensor `{}` in {} does not read back as written; the output was not kept",
                    t.name, file
                )));
            }
            seen += 1;
        }
    }
    if seen != want.len() {
        return Err(Error::Other(format!(
            "--verify: {seen} tensors read back, {} written",
            want.len()
        )));
    }
    tracing::info!("verified {seen} tensors against their checksums");
    Ok(())
}

/// Runs a whole merge: plan, compute, write into a temporary folder, rename into `out_dir`.
pub fn merge(recipe: &Recipe, out_dir: &Path, opts: &Options) -> Result<Report> {
    // A method without kernels is refused before the plan reads any checkpoint; a setting
    // without them (`cuda_lacks`) once the plan has resolved it.
    if opts.device == Device::Cuda && !recipe.method.has_cuda_kernels() {
        return Err(no_kernels(&format!(
            "merge_method `{}`",
            recipe.method.name()
        )));
    }
    let plan = plan(recipe, Some(out_dir), opts)?;
    merge_planned(&plan, out_dir, opts)
}

/// [`merge`] after planning (the inputs are open; tests change them at this point).
pub fn merge_planned(plan: &Plan, out_dir: &Path, opts: &Options) -> Result<Report> {
    for n in &plan.notes {
        tracing::info!("note: {n}");
    }
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    let backend = open_backend(kernels_for(plan, opts.device)?, opts.max_memory)?;
    refused(plan, backend.as_ref())?;
    let pool = {
        let mut b = rayon::ThreadPoolBuilder::new();
        if let Some(t) = opts.threads {
            b = b.num_threads(worker_threads(t)?);
        }
        b.build()
            .map_err(|e| Error::Other(format!("cannot start worker threads: {e}")))?
    };
    let threads = pool.current_num_threads();
    tracing::debug!("{} backend, {threads} worker thread(s)", backend.name());
    let out = OutputDir::create(out_dir, opts.overwrite)?;
    tracing::debug!("building the output in {}", out.path().display());
    let sampler = memory::PeakSampler::start();
    let t0 = Instant::now();
    let mut stop = vec![&INTERRUPTED];
    stop.extend(opts.cancel.as_ref().map(CancelToken::flag));
    let control = pipeline::Control {
        show: opts.progress,
        stop: &stop,
        progress: opts.on_progress.as_ref().map(|h| &*h.0),
    };
    let outcome = pool.install(|| {
        pipeline::execute(
            plan,
            backend.as_ref(),
            out.path(),
            opts.out_shard_size,
            control,
        )
    })?;
    tracing::debug!(
        "tensors merged and written in {:.3} s",
        t0.elapsed().as_secs_f64()
    );
    let torch_dtype = plan.recipe.out_dtype.or(plan.recipe.dtype);
    let base = &plan.inputs.base;
    checkpoint::side::write(
        base.folder.as_deref(),
        base.config.as_ref(),
        torch_dtype.map(|d| d.torch_name()),
        out.path(),
    )?;
    // The recipe's changes to them: tokenizer_source, chat_template, the layer count of slices.
    crate::plan::side::write(&plan.side, out.path())?;
    crate::card::write(plan, out.path(), out.target())?;
    if opts.verify {
        let tv = Instant::now();
        verify_output(plan, &outcome, out.path())?;
        tracing::debug!(
            "--verify read the output back in {:.3} s",
            tv.elapsed().as_secs_f64()
        );
    }
    {
        use error::IoContext;
        std::fs::write(out.path().join(RECIPE_NAME), &plan.recipe.text)
            .ctx(|| format!("writing {RECIPE_NAME}"))?;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mut inputs = vec![report::InputRecord::of("base", &plan.inputs.base)];
    if let Some(s) = &plan.inputs.start {
        inputs.push(report::InputRecord::of("start", s));
    }
    for (i, t) in plan.inputs.tasks.iter().enumerate() {
        let role = if plan.recipe.tasks[i].forget {
            "forget"
        } else {
            "model"
        };
        inputs.push(report::InputRecord::of(&format!("{role}[{i}]"), &t.model));
        if let Some(g) = &t.grads {
            inputs.push(report::InputRecord::of(&format!("gradients[{i}]"), g));
        }
    }
    let rep = Report {
        stamerge_version: env!("CARGO_PKG_VERSION"),
        method: plan.recipe.method.name().into(),
        backend: backend.name().into(),
        threads,
        inputs,
        output: out.target().display().to_string(),
        shards: outcome.shards.files.clone(),
        seconds,
        bytes_read: outcome.bytes_read,
        bytes_written: plan.estimate.write_bytes,
        gb_per_s: outcome.bytes_read as f64 / seconds.max(1e-9) / 1e9,
        peak_rss_anon_bytes: sampler.peak(),
        notes: plan.notes.clone(),
        model_selection: outcome.model_selection,
        threshold_density: outcome.threshold_density,
        tensors: outcome.tensors,
    };
    {
        use error::IoContext;
        report::write(&rep, &out.path().join(REPORT_NAME))
            .ctx(|| format!("writing {REPORT_NAME}"))?;
    }
    // Written whole beside its place before the commit: a report that cannot be written stops
    // the commit, and never leaves a truncated file.
    let report = match &opts.report {
        Some(p) => Some(PendingFile::write(p, &report::to_json(&rep)?)?),
        None => None,
    };
    // Last: an input that changed while it was read must not yield an output presented as good.
    plan.inputs.check_intact()?;
    let target = out.target().to_path_buf();
    out.commit()?;
    tracing::debug!("committed {} after {seconds:.3} s", target.display());
    if let Some(r) = report {
        r.commit()?;
    }
    Ok(rep)
}

/// `--threads`: at least 1, at most the cores this process may use (more only cost memory and
/// time: the bytes are the same at any thread count).
fn worker_threads(asked: usize) -> Result<usize> {
    if asked == 0 {
        return Err(Error::Other("--threads must be at least 1".into()));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if asked > cores {
        tracing::info!(
            "note: --threads {asked} is more than the {cores} core(s) this process may use: \
             running {cores} worker thread(s) (the result is the same at any thread count)"
        );
        return Ok(cores);
    }
    Ok(asked)
}
