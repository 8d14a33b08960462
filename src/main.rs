//! The `stamerge` command line: parses flags, calls the library, prints errors.
//!
//! The Python wheel compiles this same file into its native module (python/native) and runs
//! [`cli_main`] as the `stamerge` command it installs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stamerge::{dtype::FloatType, synth::SynthSpec, Device, Error, Options, Recipe};

/// `--out-shard-size`'s default as the help shows it; `parse_size` of it is
/// [`stamerge::DEFAULT_OUT_SHARD_BYTES`] (checked by a test below).
const DEFAULT_OUT_SHARD_SIZE: &str = "5GB";

/// `--device`: the command line's twin of [`stamerge::Device`] (the library does not derive
/// clap's traits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
enum DeviceArg {
    /// CUDA when a usable GPU and kernels are present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl From<DeviceArg> for Device {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Auto => Device::Auto,
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
        }
    }
}

#[derive(Parser)]
#[command(
    name = "stamerge",
    version,
    about = "Merge fine-tuned checkpoints (STA, TIES, DARE, task arithmetic) on CUDA or the CPU"
)]
struct Cli {
    /// More log lines (debug level).
    #[arg(short, long, global = true)]
    verbose: bool,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Merge the checkpoints a recipe names into OUT_DIR.
    Merge {
        /// The recipe (mergekit's YAML); paths in it are relative to its folder.
        recipe: PathBuf,
        /// The output folder (Hugging Face layout); created, or replaced with --overwrite.
        out_dir: PathBuf,
        /// Where to compute.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// CPU worker threads (default: every core; more than the cores are lowered to them).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        threads: Option<usize>,
        /// Largest output shard, e.g. 5GB, 500MB, 2GiB.
        #[arg(long, default_value = DEFAULT_OUT_SHARD_SIZE, value_parser = parse_size)]
        out_shard_size: u64,
        /// Replace a non-empty OUT_DIR (only once the new merge is complete).
        #[arg(long)]
        overwrite: bool,
        /// Also write the JSON report here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Re-read the output and compare each tensor's checksum before keeping it.
        #[arg(long)]
        verify: bool,
        /// GPU memory the cuda backend may use, e.g. 40GiB (default: 90% of the free memory);
        /// larger tensor groups are processed in chunks.
        #[arg(long, value_parser = parse_size)]
        max_memory: Option<u64>,
    },
    /// Check a recipe and its inputs from headers only and print the plan; exit 0 only when the
    /// merge would run.
    Plan {
        /// The recipe (mergekit's YAML); paths in it are relative to its folder.
        recipe: PathBuf,
        /// Also check this output folder.
        out_dir: Option<PathBuf>,
        /// Largest output shard to plan for, e.g. 5GB, 500MB, 2GiB.
        #[arg(long, default_value = DEFAULT_OUT_SHARD_SIZE, value_parser = parse_size)]
        out_shard_size: u64,
        /// Plan as `merge --overwrite`: a non-empty output folder is not a problem.
        #[arg(long)]
        overwrite: bool,
        /// The cuda backend's GPU memory budget to plan for (as `merge --max-memory`).
        #[arg(long, value_parser = parse_size)]
        max_memory: Option<u64>,
        /// Also check this `merge --report` path.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// List the tensors of a checkpoint folder or safetensors file.
    Inspect {
        /// A checkpoint folder (sharded or not) or one safetensors file.
        path: PathBuf,
    },
    /// Benchmarks: `merge` (synthetic end to end vs. reading the inputs), `kernels` (the CUDA
    /// kernels vs. a device copy).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Write a synthetic Llama-style checkpoint set (base, tasks, gradients, recipes).
    Synth {
        /// The folder to write the set into.
        out_dir: PathBuf,
        /// Decoder layers.
        #[arg(long, default_value_t = 2)]
        layers: usize,
        /// Hidden size (rows and columns of the attention projections).
        #[arg(long, default_value_t = 32)]
        hidden: usize,
        /// MLP intermediate size.
        #[arg(long, default_value_t = 64)]
        intermediate: usize,
        /// Vocabulary size (rows of the embeddings and lm_head).
        #[arg(long, default_value_t = 64)]
        vocab: usize,
        /// Task models (fine-tuned copies of the base), each with a gradient statistic.
        #[arg(long, default_value_t = 3)]
        tasks: usize,
        /// Element type of the weights: float32, float16 or bfloat16 (also fp32, fp16, bf16).
        #[arg(long, default_value = "bfloat16", value_parser = parse_dtype)]
        dtype: FloatType,
        /// Element type of the gradient statistics: float32, float16 or bfloat16.
        #[arg(long, default_value = "bfloat16", value_parser = parse_dtype)]
        grad_dtype: FloatType,
        /// Largest shard of each model, e.g. 40KB, 1GB (default: a quarter of the model, at least
        /// 40KB: about four shards, so that sharded reads are exercised at any size).
        #[arg(long, value_parser = parse_size)]
        shard_size: Option<u64>,
        /// Seed of the random weights (the same seed writes the same bytes).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Time a synthetic merge beside the time to read its inputs once from a warm page cache.
    Merge {
        /// Where the synthetic set is generated (reused when present).
        #[arg(long, default_value = "bench-data/bench-merge")]
        dir: PathBuf,
        /// Recipe of the set: ties, sta, sta_model, magnitude, task_arithmetic, dare_ties, ...
        #[arg(long, default_value = "ties")]
        recipe: String,
        /// Where to compute.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// Decoder layers of the synthetic set.
        #[arg(long, default_value_t = 8)]
        layers: usize,
        /// Hidden size of the synthetic set.
        #[arg(long, default_value_t = 1024)]
        hidden: usize,
        /// MLP intermediate size of the synthetic set.
        #[arg(long, default_value_t = 2816)]
        intermediate: usize,
        /// Vocabulary size of the synthetic set.
        #[arg(long, default_value_t = 32000)]
        vocab: usize,
        /// Task models of the synthetic set.
        #[arg(long, default_value_t = 3)]
        tasks: usize,
        /// Element type of the synthetic set: float32, float16 or bfloat16.
        #[arg(long, default_value = "bfloat16", value_parser = parse_dtype)]
        dtype: FloatType,
        /// Timed merges (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Skip the CPU merge that a GPU merge is compared with.
        #[arg(long)]
        no_cpu: bool,
    },
    /// Time the host side of the CUDA backend's input staging (no GPU needed): a warm,
    /// memory-mapped file copied into 16 MiB slots by 1, 2, ... threads, in GB/s, beside the old
    /// single-thread copy. Compare with the host-to-device link (about 55 GB/s on PCIe 5).
    Staging {
        /// The file staged (written when absent or of another size; stays in the page cache).
        #[arg(long, default_value = "bench-data/staging.bin")]
        file: PathBuf,
        /// Size of the file in MiB.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Thread counts to time, comma-separated (default: 1, 2, 4, ... up to the cores).
        #[arg(long, value_delimiter = ',')]
        threads: Vec<usize>,
        /// Timed runs per thread count (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Time the CUDA kernels (scores, radix select, fuse) on random data with CUDA events, each
    /// beside a device-to-device copy measured in the same run. Needs a GPU.
    Kernels {
        /// Elements per tensor.
        #[arg(long, default_value_t = 1 << 27)]
        size: usize,
        /// Task models fused (1 to 64; the combination histogram is built up to 8).
        #[arg(long, default_value_t = 4)]
        tasks: usize,
        /// Element type of the tensors: float32, float16 or bfloat16.
        #[arg(long, default_value = "bfloat16", value_parser = parse_dtype)]
        dtype: FloatType,
        /// Timed runs per kernel (the median is reported; 3 warm-up runs come first).
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Fraction of entries kept (k of the select, DARE's density).
        #[arg(long, default_value_t = 0.1)]
        density: f64,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        gpu: usize,
    },
}

/// mergekit's flags that mean nothing here, with why (accepted so that a mergekit command line
/// runs, each explained in one line).
const MERGEKIT_NO_OPS: &[(&str, &str)] = &[
    (
        "--copy-tokenizer",
        "the tokenizer files are always written (the base's, or `tokenizer_source`'s)",
    ),
    (
        "--lazy-unpickle",
        "stamerge never unpickles: it memory-maps safetensors",
    ),
    (
        "--allow-crimes",
        "stamerge merges checkpoints of one architecture and refuses mismatched shapes",
    ),
    ("--trust-remote-code", "stamerge runs no model code"),
    ("--no-lazy-unpickle", "stamerge never unpickles"),
];

/// mergekit-yaml's command line (`RECIPE OUT_DIR [--cuda] ...`) as stamerge's: `merge` is
/// implied when the first argument is a YAML file, `--cuda` is `--device cuda`, and the flags
/// of [`MERGEKIT_NO_OPS`] are dropped with a note saying why.
fn from_mergekit(mut args: Vec<std::ffi::OsString>) -> (Vec<std::ffi::OsString>, Vec<String>) {
    let mut notes = Vec::new();
    let is_yaml = |a: &std::ffi::OsString| {
        let p = std::path::Path::new(a);
        matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml")) && p.is_file()
    };
    if args.len() > 1 && is_yaml(&args[1]) {
        args.insert(1, "merge".into());
        notes.push("mergekit-yaml's form `RECIPE OUT_DIR`: running `stamerge merge`".into());
    }
    if args.get(1).is_some_and(|a| a == "merge") {
        let mut out = Vec::with_capacity(args.len() + 1);
        for a in args {
            if a == "--cuda" {
                notes.push("mergekit's --cuda: running with --device cuda".into());
                out.push("--device".into());
                out.push("cuda".into());
            } else if let Some((flag, why)) = MERGEKIT_NO_OPS.iter().find(|(f, _)| a == *f) {
                notes.push(format!("mergekit's {flag} is ignored: {why}"));
            } else {
                out.push(a);
            }
        }
        args = out;
    }
    (args, notes)
}

fn parse_dtype(s: &str) -> Result<FloatType, String> {
    FloatType::parse(s).ok_or_else(|| format!("unknown dtype `{s}` (float32, float16, bfloat16)"))
}

/// "5GB" → 5e9, "2GiB" → 2·2^30, "123" → 123 bytes.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 5GB or 500MB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" => 1.0,
        // mergekit's `--out-shard-size 5B` means 5 billion bytes: bytes here would be a trap.
        "b" => {
            return Err(format!(
                "`{s}`: a B suffix is ambiguous (mergekit reads it as billions of bytes): write \
                 {}GB, or the bytes without a unit",
                num.trim()
            ))
        }
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1048576.0,
        "gib" => 1073741824.0,
        u => return Err(format!("unknown size unit `{u}` in `{s}`")),
    };
    if v <= 0.0 {
        return Err(format!("size must be positive: `{s}`"));
    }
    Ok((v * mult) as u64)
}

fn load_recipe(path: &std::path::Path) -> Result<Recipe, Error> {
    Recipe::from_file(path).map_err(Error::Plan)
}

fn print_plan(plan: &stamerge::Plan, max_memory: Option<u64>) {
    print!("{}", stamerge::plan::show::render(plan, max_memory));
}

fn print_kernel_bench(b: &stamerge::bench::KernelBench) {
    let s = &b.spec;
    println!("device: {}", b.device);
    println!(
        "n = {} elements per tensor, T = {} tasks, {:?}, density {}, median of {} runs (after 3 \
         warm-up runs), data seed {:#x}",
        s.size, s.tasks, s.dtype, s.density, s.iters, b.seed
    );
    let copy = b.copy.gb_per_s();
    println!(
        "{:<32} {:>10} {:>10} {:>12}",
        "kernel", "ms", "GB/s", "% of copy"
    );
    for k in std::iter::once(&b.copy).chain(&b.kernels) {
        println!(
            "{:<32} {:>10.4} {:>10.1} {:>11.1}%",
            k.name,
            k.ms,
            k.gb_per_s(),
            100.0 * k.gb_per_s() / copy
        );
    }
    let cand = if b.candidates == u64::MAX {
        "none (the top bucket was larger than the candidate buffer)".to_string()
    } else {
        b.candidates.to_string()
    };
    println!(
        "select from keys: {:.2} ms per 1e9 keys; score_keys + select: {:.2} ms per 1e9 keys \
         (candidates after pass 1: {cand})",
        b.select_ms_per_1e9, b.score_select_ms_per_1e9
    );
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.cmd {
        Cmd::Merge {
            recipe,
            out_dir,
            device,
            threads,
            out_shard_size,
            overwrite,
            report,
            verify,
            max_memory,
        } => {
            let r = load_recipe(&recipe)?;
            let opts = Options {
                device: device.into(),
                threads,
                out_shard_size,
                overwrite,
                report,
                progress: !cli.quiet,
                verify,
                max_memory,
                ..Options::default()
            };
            let rep = stamerge::merge(&r, &out_dir, &opts)?;
            // The one line --quiet keeps.
            eprintln!(
                "merged {} tensors with {} on {} in {:.2} s ({:.2} GB/s of input, peak anonymous memory {}) → {}",
                rep.tensors.len(),
                rep.method,
                rep.backend,
                rep.seconds,
                rep.gb_per_s,
                stamerge::inspect::human_bytes(rep.peak_rss_anon_bytes),
                rep.output
            );
            Ok(())
        }
        Cmd::Plan {
            recipe,
            out_dir,
            out_shard_size,
            overwrite,
            max_memory,
            report,
        } => {
            let r = load_recipe(&recipe)?;
            let opts = Options {
                out_shard_size,
                overwrite,
                report,
                ..Options::default()
            };
            let plan = stamerge::plan(&r, out_dir.as_deref(), &opts)?;
            print_plan(&plan, max_memory);
            Ok(())
        }
        Cmd::Inspect { path } => {
            print!("{}", stamerge::inspect::inspect(&path)?);
            Ok(())
        }
        Cmd::Bench(BenchCmd::Merge {
            dir,
            recipe,
            device,
            layers,
            hidden,
            intermediate,
            vocab,
            tasks,
            dtype,
            runs,
            no_cpu,
        }) => {
            let spec = SynthSpec {
                layers,
                hidden,
                intermediate,
                vocab,
                tasks,
                dtype,
                grad_dtype: dtype,
                shard_bytes: 1_000_000_000,
                seed: 0,
            };
            let name = if recipe.ends_with(".yml") {
                recipe
            } else {
                format!("{recipe}.yml")
            };
            let b = stamerge::bench::bench_merge(&spec, &dir, &name, device.into(), runs, !no_cpu)?;
            let mut s = b.merge_seconds.clone();
            s.sort_by(|a, b| a.total_cmp(b));
            let med = s[s.len() / 2];
            let gb = b.input_bytes as f64 / 1e9;
            println!(
                "inputs: {gb:.2} GB in {} ({} parameters per checkpoint)",
                dir.display(),
                spec.params()
            );
            println!(
                "read once (warm page cache): {:.3} s  {:.2} GB/s",
                b.read_seconds,
                gb / b.read_seconds
            );
            println!(
                "merge {name} on {} (median of {}): {med:.3} s  {:.2} GB/s  = {:.1}x the read time; peak anonymous memory {}",
                b.backend,
                s.len(),
                gb / med,
                med / b.read_seconds,
                stamerge::inspect::human_bytes(b.peak_rss_anon_bytes)
            );
            let (up, down) = b.link_bytes;
            if up + down > 0 {
                println!(
                    "over the link per merge: {:.2} GB to the GPU ({:.2}x the inputs), {:.2} GB back; \
                     {:.2} GB/s to the GPU averaged over the merge",
                    up as f64 / 1e9,
                    up as f64 / b.input_bytes as f64,
                    down as f64 / 1e9,
                    up as f64 / 1e9 / med
                );
            }
            if let Some(cpu) = b.cpu_seconds {
                println!(
                    "same merge on the CPU (median): {cpu:.3} s; {} merge / CPU merge = {:.2}",
                    b.backend,
                    med / cpu
                );
            }
            Ok(())
        }
        Cmd::Bench(BenchCmd::Staging {
            file,
            mib,
            mut threads,
            runs,
        }) => {
            if threads.is_empty() {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                threads = std::iter::successors(Some(1), |t| Some(t * 2))
                    .take_while(|&t| t < cores)
                    .chain([cores])
                    .collect();
            }
            // 0: the path before issue 20 (one thread, no populate call), as the baseline.
            threads.insert(0, 0);
            let bytes = mib << 20;
            let rows = stamerge::bench::bench_staging(&file, bytes, &threads, runs)?;
            println!(
                "staging {} ({} MiB, warm page cache) into 16 MiB slots, median of {runs}:",
                file.display(),
                mib
            );
            for r in rows {
                let what = match r.threads {
                    0 => "1 thread, copy_from_slice (before)".to_string(),
                    t => format!("{t} thread(s), fill::copy_in"),
                };
                println!(
                    "  {what:<36} {:.3} s  {:.2} GB/s   {:.3} CPU s  {:.2} GB per CPU s",
                    r.seconds,
                    bytes as f64 / 1e9 / r.seconds,
                    r.cpu_seconds,
                    bytes as f64 / 1e9 / r.cpu_seconds
                );
            }
            Ok(())
        }
        Cmd::Bench(BenchCmd::Kernels {
            size,
            tasks,
            dtype,
            iters,
            density,
            gpu,
        }) => {
            let spec = stamerge::bench::KernelBenchSpec {
                size,
                tasks,
                dtype,
                iters,
                density,
                ordinal: gpu,
            };
            let b = stamerge::bench::bench_kernels(&spec)
                .map_err(|e| Error::Other(format!("bench kernels cannot run: {e}")))?;
            print_kernel_bench(&b);
            Ok(())
        }
        Cmd::Synth {
            out_dir,
            layers,
            hidden,
            intermediate,
            vocab,
            tasks,
            dtype,
            grad_dtype,
            shard_size,
            seed,
        } => {
            let spec = SynthSpec {
                layers,
                hidden,
                intermediate,
                vocab,
                tasks,
                dtype,
                grad_dtype,
                shard_bytes: 0,
                seed,
            };
            let spec = SynthSpec {
                shard_bytes: shard_size
                    .unwrap_or_else(|| (spec.params() * spec.dtype.size() as u64 / 4).max(40_000)),
                ..spec
            };
            // A bar on a terminal, else a line per checkpoint (large sets take minutes).
            let total = 1 + 2 * tasks;
            let tty = !cli.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let bar = if tty {
                let b = indicatif::ProgressBar::new(total as u64);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} checkpoints {msg}",
                    )
                    .expect("static template"),
                );
                b
            } else {
                indicatif::ProgressBar::hidden()
            };
            stamerge::synth::generate_with(&spec, &out_dir, |name, i| {
                bar.set_position(i as u64);
                bar.set_message(name.to_string());
                if !tty {
                    tracing::info!("wrote {name} ({i} of {total} checkpoints)");
                }
            })?;
            bar.finish_and_clear();
            if !cli.quiet {
                eprintln!(
                    "wrote a synthetic set of {} parameters per checkpoint ({} tasks) to {}",
                    spec.params(),
                    tasks,
                    out_dir.display()
                );
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    ExitCode::from(cli_main(std::env::args_os().collect()))
}

/// The whole command for `args` (the program name first); returns the exit status.
pub fn cli_main(args: Vec<std::ffi::OsString>) -> u8 {
    let (args, mergekit_notes) = from_mergekit(args);
    let cli = Cli::parse_from(args);
    let level = if cli.verbose {
        "debug"
    } else if cli.quiet {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STAMERGE_LOG")
                .unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    for n in &mergekit_notes {
        tracing::info!("{n}");
    }
    stamerge::interrupt::install();
    match run(cli) {
        Ok(()) => 0,
        Err(Error::Interrupted) => {
            eprintln!("error: {}", Error::Interrupted);
            stamerge::interrupt::exit_code()
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of every subcommand has a help line (clap prints blanks otherwise).
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id != "help" && id != "version" && a.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "stamerge", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn mergekit_command_lines_become_stamerge_ones() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.yml");
        std::fs::write(&recipe, "merge_method: ties\n").unwrap();
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let r = recipe.to_str().unwrap();
        let (got, notes) =
            from_mergekit(args(&["stamerge", r, "out", "--cuda", "--lazy-unpickle"]));
        assert_eq!(
            got,
            args(&["stamerge", "merge", r, "out", "--device", "cuda"])
        );
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[2].contains("--lazy-unpickle") && notes[2].contains("never unpickles"));
        // stamerge's own command lines pass unchanged; other subcommands are not rewritten.
        let own = args(&["stamerge", "merge", r, "out", "--device", "cpu"]);
        assert_eq!(from_mergekit(own.clone()), (own, vec![]));
        let plan = args(&["stamerge", "plan", r, "--cuda"]);
        assert_eq!(from_mergekit(plan.clone()).0, plan);
        // A path that is not an existing YAML file is left for clap to report.
        let missing = args(&["stamerge", "nope.yml", "out"]);
        assert_eq!(from_mergekit(missing.clone()).0, missing);
        let parsed = Cli::try_parse_from(from_mergekit(args(&["stamerge", r, "out"])).0);
        assert!(parsed.is_ok());
    }

    #[test]
    fn sizes_parse_and_mergekit_s_b_is_refused() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("123"), Ok(123));
        let e = parse_size("5B").unwrap_err();
        assert!(e.contains("5GB") && e.contains("mergekit"), "{e}");
    }

    #[test]
    fn out_shard_default_is_the_library_default() {
        assert_eq!(
            parse_size(DEFAULT_OUT_SHARD_SIZE),
            Ok(stamerge::DEFAULT_OUT_SHARD_BYTES)
        );
        assert_eq!(
            Options::default().out_shard_size,
            stamerge::DEFAULT_OUT_SHARD_BYTES
        );
    }

    /// The `--max-memory` help states the default budget share in words.
    #[test]
    fn max_memory_help_names_the_default_share() {
        let share = format!(
            "(default: {:.0}% of the free memory)",
            stamerge::backend::cuda::DEFAULT_BUDGET_SHARE * 100.0
        );
        let cmd = Cli::command();
        let merge = cmd.find_subcommand("merge").expect("merge");
        let arg = merge
            .get_arguments()
            .find(|a| a.get_id() == "max_memory")
            .expect("--max-memory");
        let help = arg.get_help().expect("a help text").to_string();
        assert!(help.contains(&share), "{help}");
    }

    #[test]
    fn device_arg_maps_each_variant() {
        assert_eq!(Device::from(DeviceArg::default()), Device::default());
        assert_eq!(Device::from(DeviceArg::Cpu), Device::Cpu);
        assert_eq!(Device::from(DeviceArg::Cuda), Device::Cuda);
    }
}
