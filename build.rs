//! Build script: compiles `kernels/*.cu` to fatbins with nvcc and embeds them.
//!
//! Writes `$OUT_DIR/kernels.rs`, which the crate `include!`s:
//!
//! ```ignore
//! pub const HAVE_KERNELS: bool = true;
//! pub const KERNELS: &[(&str, &[u8])] = &[("fuse", include_bytes!("…/fuse.fatbin")), …];
//! ```
//!
//! nvcc is looked for in this order: `$NVCC`; `$CUDA_HOME/bin/nvcc`; `$CUDA_PATH/bin/nvcc`; `nvcc`
//! on `PATH`; `/usr/local/cuda/bin/nvcc`; the wheels `scripts/install-nvcc.sh` puts in this
//! checkout (`.cache/nvcc-13.0/nvidia/cu13/bin/nvcc`, or under `$STAMERGE_NVCC_DIR`); the PyPI
//! wheels of the Python on PATH (`pip install nvidia-cuda-nvcc`, found through
//! `python3 -c 'import nvidia'`, e.g. `site-packages/nvidia/cu13/bin/nvcc`). The pip
//! layout needs no extra flags: its `nvcc.profile` points nvcc at the wheel's cicc, libdevice and
//! headers. Without a usable nvcc (or with `STAMERGE_NO_KERNELS=1`) the crate builds without
//! kernels (`HAVE_KERNELS = false`) and says so in a cargo warning.
//!
//! With nvcc, a kernel that fails to compile, or that ptxas reports spilling registers, fails the
//! build. The ptxas report (registers, stack, spills, shared memory per kernel and architecture)
//! is written to `$OUT_DIR/ptxas-summary.txt`; `STAMERGE_KERNEL_REPORT=1` also prints it as cargo
//! warnings. nvcc's own NVCC_APPEND_FLAGS adds flags (e.g. `-lineinfo` for source-level profiles).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags for every kernel file: sm_90 machine code + compute_90 PTX (for newer GPUs, JIT-compiled
/// by the driver), sm_80 machine code; no FMA contraction (results must match the CPU bit for
/// bit); ptxas statistics for the spill check.
const NVCC_FLAGS: &[&str] = &[
    "-fatbin",
    "-gencode",
    "arch=compute_90,code=[sm_90,compute_90]",
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-O3",
    "-fmad=false",
    "-Xptxas",
    "-v",
];

/// compute_90 needs CUDA 11.8 or newer.
const MIN_NVCC: (u32, u32) = (11, 8);

const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "NVCC_CCBIN",
    "NVCC_PREPEND_FLAGS",
    "NVCC_APPEND_FLAGS",
    "STAMERGE_NO_KERNELS",
    "STAMERGE_KERNEL_REPORT",
    "STAMERGE_NVCC_DIR",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let kernels_dir = manifest_dir.join("kernels");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let mut sources = Vec::new();
    if let Ok(entries) = fs::read_dir(&kernels_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            println!("cargo:rerun-if-changed={}", path.display());
            if path.extension().is_some_and(|e| e == "cu") {
                sources.push(path);
            }
        }
    }
    sources.sort();

    if env::var("STAMERGE_NO_KERNELS").is_ok_and(|v| !v.is_empty() && v != "0") {
        println!(
            "cargo:warning=STAMERGE_NO_KERNELS is set: building without CUDA kernels (the cuda backend will report this)"
        );
        write_no_kernels(&out_dir);
        return;
    }
    if sources.is_empty() {
        println!("cargo:warning=no kernels/*.cu found: building without CUDA kernels");
        write_no_kernels(&out_dir);
        return;
    }
    let Some(nvcc) = find_nvcc() else {
        println!(
            "cargo:warning=nvcc not found: building without CUDA kernels (the cuda backend will report this)"
        );
        // Look again when PATH changes. A pip install does not change PATH: set NVCC (see
        // scripts/find-nvcc.sh) or touch build.rs after installing nvcc.
        println!("cargo:rerun-if-env-changed=PATH");
        write_no_kernels(&out_dir);
        return;
    };
    println!("cargo:rustc-env=STAMERGE_NVCC_VERSION={}", nvcc.version);
    println!("cargo:rerun-if-changed={}", nvcc.path.display()); // a CUDA upgrade rebuilds

    // Compile the files in parallel: each nvcc run compiles two architectures.
    let results: Vec<Result<Compiled, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let nvcc = &nvcc.path;
                let (kernels_dir, out_dir) = (&kernels_dir, &out_dir);
                scope.spawn(move || compile(nvcc, src, kernels_dir, out_dir))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("compile thread panicked"))
            .collect()
    });

    let mut compiled = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(c) => compiled.push(c),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        panic!(
            "compiling the CUDA kernels with {} failed:\n\n{}\n\n(set STAMERGE_NO_KERNELS=1 to build without the CUDA backend's kernels)",
            nvcc.path.display(),
            errors.join("\n\n")
        );
    }

    // The ptxas report: fail on any spill, keep a summary.
    let mut summary = format!("nvcc {} ({})\n", nvcc.version, nvcc.path.display());
    let mut spills = Vec::new();
    for c in &compiled {
        let stats = parse_ptxas(&c.log);
        if stats.is_empty() {
            panic!(
                "no ptxas statistics in the output of nvcc for {}: cannot check for register spills\n{}",
                c.source.display(),
                c.log
            );
        }
        for s in &stats {
            let _ = writeln!(
                summary,
                "{:<8} {:<20} {:<6} {:>3} registers  {:>4} B stack  {:>4} B spill stores  {:>4} B spill loads  {:>6} B smem",
                c.name, s.function, s.arch, s.registers, s.stack, s.spill_stores, s.spill_loads, s.smem
            );
            if s.spill_stores > 0 || s.spill_loads > 0 {
                spills.push(format!(
                    "{}: {} ({}): {} bytes spill stores, {} bytes spill loads ({} registers)",
                    c.source.display(),
                    s.function,
                    s.arch,
                    s.spill_stores,
                    s.spill_loads,
                    s.registers
                ));
            }
        }
    }
    fs::write(out_dir.join("ptxas-summary.txt"), &summary).expect("write ptxas-summary.txt");
    if env::var("STAMERGE_KERNEL_REPORT").is_ok_and(|v| !v.is_empty() && v != "0") {
        for line in summary.lines() {
            println!("cargo:warning={line}");
        }
    }
    if !spills.is_empty() {
        panic!(
            "CUDA kernels spill registers (the kernels must not spill; reduce what is live or change launch bounds):\n{}\n\nfull ptxas summary:\n{}",
            spills.join("\n"),
            summary
        );
    }

    let mut code = String::from("// Generated by build.rs: the CUDA kernels, compiled by nvcc.\n");
    let _ = writeln!(code, "// nvcc {}", nvcc.version);
    code.push_str("pub const HAVE_KERNELS: bool = true;\n");
    code.push_str("pub const KERNELS: &[(&str, &[u8])] = &[\n");
    for c in &compiled {
        let path = c.fatbin.to_str().expect("OUT_DIR is not valid UTF-8");
        let _ = writeln!(code, "    ({:?}, include_bytes!({:?})),", c.name, path);
    }
    code.push_str("];\n");
    write_if_changed(&out_dir.join("kernels.rs"), &code);
}

fn write_no_kernels(out_dir: &Path) {
    let code = "// Generated by build.rs: built without nvcc, so without CUDA kernels.\n\
                pub const HAVE_KERNELS: bool = false;\n\
                pub const KERNELS: &[(&str, &[u8])] = &[];\n";
    write_if_changed(&out_dir.join("kernels.rs"), code);
}

fn write_if_changed(path: &Path, contents: &str) {
    if fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return;
    }
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

// ------------------------------------------------------------------------------------------------
// finding nvcc

struct Nvcc {
    path: PathBuf,
    version: String,
}

fn nvcc_file_name() -> String {
    format!("nvcc{}", env::consts::EXE_SUFFIX)
}

fn find_nvcc() -> Option<Nvcc> {
    // An explicit NVCC must work: a typo should not silently build a binary without kernels.
    if let Some(path) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return match probe(&path) {
            Ok(nvcc) => Some(nvcc),
            Err(e) => panic!(
                "NVCC={} is not a usable nvcc: {e} (unset NVCC to search, or set STAMERGE_NO_KERNELS=1)",
                path.display()
            ),
        };
    }
    let mut tried = Vec::new();
    for candidate in candidates() {
        if !candidate.is_file() {
            continue;
        }
        match probe(&candidate) {
            Ok(nvcc) => return Some(nvcc),
            Err(e) => tried.push(format!("{}: {e}", candidate.display())),
        }
    }
    for t in tried {
        println!("cargo:warning=skipped nvcc {t}");
    }
    None
}

/// Every place nvcc may be, in order of preference (CUDA_HOME/CUDA_PATH, PATH, /usr/local/cuda,
/// the PyPI wheels).
fn candidates() -> Vec<PathBuf> {
    let exe = nvcc_file_name();
    let mut out = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(dir) = env::var_os(var).filter(|d| !d.is_empty()) {
            out.push(PathBuf::from(dir).join("bin").join(&exe));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            out.push(dir.join(&exe));
        }
    }
    out.push(PathBuf::from("/usr/local/cuda/bin").join(&exe));
    out.push(project_wheels().join("nvidia/cu13/bin").join(&exe));
    out.extend(pypi_candidates());
    out
}

/// Where `scripts/install-nvcc.sh` installs the pinned wheels (`pip install --target`).
fn project_wheels() -> PathBuf {
    match env::var_os("STAMERGE_NVCC_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"))
            .join(".cache/nvcc-13.0"),
    }
}

/// nvcc from the PyPI wheels: `nvidia-cuda-nvcc` 13.x puts it in `site-packages/nvidia/cu13/bin`,
/// the 12.x `nvidia-cuda-nvcc-cu12` in `site-packages/nvidia/cuda_nvcc/bin`. `nvidia` is a
/// namespace package, so ask Python where its parts are.
fn pypi_candidates() -> Vec<PathBuf> {
    let exe = nvcc_file_name();
    let script = "import nvidia\nfor p in nvidia.__path__: print(p)";
    let mut out = Vec::new();
    for python in ["python3", "python"] {
        let Ok(output) = Command::new(python).args(["-c", script]).output() else {
            continue;
        };
        if !output.status.success() {
            continue;
        }
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let root = PathBuf::from(line.trim());
            // the newest layout first, then anything else that has a bin/nvcc
            for sub in ["cu13", "cu12", "cuda_nvcc"] {
                out.push(root.join(sub).join("bin").join(&exe));
            }
            if let Ok(entries) = fs::read_dir(&root) {
                let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                dirs.sort();
                out.extend(dirs.into_iter().map(|d| d.join("bin").join(&exe)));
            }
        }
        break;
    }
    out
}

/// Runs `nvcc --version`; Ok when it answers with a version new enough for compute_90.
fn probe(path: &Path) -> Result<Nvcc, String> {
    let output = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`nvcc --version` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version(&text)
        .ok_or_else(|| format!("unrecognised `nvcc --version` output: {text}"))?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < MIN_NVCC {
        return Err(format!(
            "CUDA {version} is too old (sm_90 needs {}.{} or newer)",
            MIN_NVCC.0, MIN_NVCC.1
        ));
    }
    Ok(Nvcc {
        path: path.to_path_buf(),
        version,
    })
}

/// "Cuda compilation tools, release 13.0, V13.0.88" -> "13.0.88" (or "13.0" without the V part).
fn parse_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.contains("release"))?;
    if let Some(v) = line.split_whitespace().find_map(|w| w.strip_prefix('V')) {
        if v.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            return Some(v.trim_end_matches(',').to_string());
        }
    }
    let after = line.split("release").nth(1)?;
    Some(
        after
            .trim()
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .split(',')
            .next()?
            .trim()
            .to_string(),
    )
}

// ------------------------------------------------------------------------------------------------
// compiling

struct Compiled {
    name: String,
    source: PathBuf,
    fatbin: PathBuf,
    log: String,
}

fn compile(
    nvcc: &Path,
    source: &Path,
    kernels_dir: &Path,
    out_dir: &Path,
) -> Result<Compiled, String> {
    let name = source
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("kernel file name")
        .to_string();
    let fatbin = out_dir.join(format!("{name}.fatbin"));
    let output = Command::new(nvcc)
        .args(NVCC_FLAGS)
        .arg("-I")
        .arg(kernels_dir)
        .arg("-o")
        .arg(&fatbin)
        .arg(source)
        .output()
        .map_err(|e| format!("{}: cannot run {}: {e}", source.display(), nvcc.display()))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        return Err(format!("{} ({}):\n{log}", source.display(), output.status));
    }
    Ok(Compiled {
        name,
        source: source.to_path_buf(),
        fatbin,
        log,
    })
}

/// What ptxas -v says about one function for one architecture.
#[derive(Default)]
struct PtxasStats {
    function: String,
    arch: String,
    registers: u64,
    stack: u64,
    spill_stores: u64,
    spill_loads: u64,
    smem: u64,
}

/// Parses `ptxas info` lines:
/// ```text
/// ptxas info    : Compiling entry function 'fuse_linear' for 'sm_90'
/// ptxas info    : Function properties for fuse_linear
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 48 registers, used 1 barriers, 3328 bytes smem
/// ```
/// Every "Function properties" block (entry or not) becomes one record.
fn parse_ptxas(log: &str) -> Vec<PtxasStats> {
    let mut stats: Vec<PtxasStats> = Vec::new();
    let mut arch = String::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut it = rest.split('\'');
            let _function = it.next();
            arch = it.nth(1).unwrap_or("").to_string();
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            stats.push(PtxasStats {
                function: rest.trim().to_string(),
                arch: arch.clone(),
                ..Default::default()
            });
        } else if line.contains("bytes spill stores") {
            if let Some(s) = stats.last_mut() {
                s.stack = number_before(line, "bytes stack frame");
                s.spill_stores = number_before(line, "bytes spill stores");
                s.spill_loads = number_before(line, "bytes spill loads");
            }
        } else if line.contains("Used ") && line.contains(" registers") {
            if let Some(s) = stats.last_mut() {
                s.registers = number_after(line, "Used ");
                s.smem = number_before(line, "bytes smem");
            }
        }
    }
    stats
}

/// The integer just before `marker` in `line` ("… 8 bytes spill stores" -> 8), 0 if absent.
fn number_before(line: &str, marker: &str) -> u64 {
    line.split(marker)
        .next()
        .filter(|_| line.contains(marker))
        .and_then(|head| {
            head.split(|c: char| !c.is_ascii_digit())
                .rfind(|w| !w.is_empty())
        })
        .and_then(|w| w.parse().ok())
        .unwrap_or(0)
}

/// The integer just after `marker` in `line` ("Used 48 registers" -> 48), 0 if absent.
fn number_after(line: &str, marker: &str) -> u64 {
    line.split(marker)
        .nth(1)
        .and_then(|tail| {
            tail.split(|c: char| !c.is_ascii_digit())
                .find(|w| !w.is_empty())
        })
        .and_then(|w| w.parse().ok())
        .unwrap_or(0)
}
