//! The output folder is built beside its target under a temporary name and renamed into place
//! only when everything is written: an interrupted or failed run leaves the target as it was.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Problem, Result};

const TMP_TAG: &str = ".stamerge-tmp-";
const OLD_TAG: &str = ".stamerge-old-";
const LOCK_TAG: &str = ".stamerge-lock";

/// Absolute, symlink-resolved form of a path that may not exist yet (its parent must resolve).
pub fn resolve(path: &Path) -> Option<PathBuf> {
    if let Ok(c) = path.canonicalize() {
        return Some(c);
    }
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    let parent = abs.parent()?;
    let name = abs.file_name()?;
    Some(resolve(parent)?.join(name))
}

/// Problems with the target folder, found at plan time: not empty without `--overwrite`,
/// equal to, inside, or holding one of the inputs.
pub fn check_target(target: &Path, overwrite: bool, inputs: &[PathBuf]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let Some(t) = resolve(target) else {
        return vec![Problem::in_file(
            target,
            "the output folder's parent does not exist",
        )];
    };
    for input in inputs {
        let Some(i) = resolve(input) else { continue };
        // A single-file input (a gradient statistic, a one-file model) only forbids folders that
        // would hold it: `out/` beside `grads.safetensors` is the usual layout, not a clash.
        if i.is_dir() && (t == i || t.starts_with(&i)) {
            problems.push(Problem::in_file(
                target,
                format!(
                    "the output folder is inside the input {}: choose another folder",
                    input.display()
                ),
            ));
        } else if i.starts_with(&t) {
            problems.push(Problem::in_file(
                target,
                format!(
                    "the output folder holds the input {}: writing there would destroy it",
                    input.display()
                ),
            ));
        }
    }
    if t.is_file() {
        problems.push(Problem::in_file(
            target,
            "exists and is a file, not a folder",
        ));
    } else if t.is_dir() && !overwrite {
        let non_empty = std::fs::read_dir(&t)
            .map(|mut r| r.next().is_some())
            .unwrap_or(true);
        if non_empty {
            problems.push(Problem::in_file(
                target,
                "exists and is not empty: pass --overwrite to replace it (it is replaced only \
                 after the new merge is complete)",
            ));
        }
    }
    problems
}

/// A temporary folder that becomes the target on `commit`, and is removed if dropped before.
/// While it exists, a lock file beside the target keeps a second run from writing there too.
pub struct OutputDir {
    target: PathBuf,
    tmp: PathBuf,
    lock: PathBuf,
    committed: bool,
}

/// Takes `.NAME.stamerge-lock` beside the target (created exclusively, holding our pid). A lock
/// whose process is gone is stale and taken over; a live one is a clear error.
fn take_lock(target: &Path) -> Result<PathBuf> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let lock = target.with_file_name(format!(".{name}{LOCK_TAG}"));
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(mut f) => {
                use std::io::Write;
                f.write_all(std::process::id().to_string().as_bytes())
                    .ctx(|| format!("writing {}", lock.display()))?;
                return Ok(lock);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&lock)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                match holder {
                    Some(pid) if pid_alive(pid) => {
                        return Err(Error::Input(Problem::in_file(
                            target,
                            format!(
                                "another stamerge run (pid {pid}) is writing this output folder: wait for \
                                 it or choose another folder (lock file {})",
                                lock.display()
                            ),
                        )))
                    }
                    _ => {
                        tracing::warn!("removing the stale lock {}", lock.display());
                        let _ = std::fs::remove_file(&lock);
                    }
                }
            }
            Err(e) => {
                return Err(Error::Io {
                    context: format!("creating {}", lock.display()),
                    source: e,
                })
            }
        }
    }
    Err(Error::Other(format!(
        "cannot take the lock {}",
        lock.display()
    )))
}

fn tagged(target: &Path, tag: &str, pid: u32) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}{tag}{pid}"))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes temporary folders left by runs that were killed (their process no longer exists).
fn remove_stale(target: &Path) {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    let prefix = format!(".{}", name.to_string_lossy());
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        let Some(rest) = n.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest
            .strip_prefix(TMP_TAG)
            .or_else(|| rest.strip_prefix(OLD_TAG));
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() && !pid_alive(pid) {
                tracing::warn!("removing {} left by an interrupted run", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl OutputDir {
    pub fn create(target: &Path) -> Result<Self> {
        let target = resolve(target).ok_or_else(|| {
            Error::Input(Problem::in_file(
                target,
                "the output folder's parent does not exist",
            ))
        })?;
        // Like `mkdir -p`: a fresh `runs/2026/merged` should not need a separate step.
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        let lock = take_lock(&target)?;
        remove_stale(&target);
        let tmp = tagged(&target, TMP_TAG, std::process::id());
        // From here on, Drop removes the lock (and the temporary folder) on every error path.
        let dir = Self {
            target,
            tmp,
            lock,
            committed: false,
        };
        if dir.tmp.exists() {
            std::fs::remove_dir_all(&dir.tmp).ctx(|| format!("removing {}", dir.tmp.display()))?;
        }
        std::fs::create_dir(&dir.tmp).ctx(|| format!("creating {}", dir.tmp.display()))?;
        Ok(dir)
    }

    /// Where files are written until `commit`.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the finished folder into place, replacing the target (if any) only now.
    pub fn commit(mut self) -> Result<PathBuf> {
        let old = tagged(&self.target, OLD_TAG, std::process::id());
        let had_old = self.target.exists();
        if had_old {
            std::fs::rename(&self.target, &old)
                .ctx(|| format!("moving aside {}", self.target.display()))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.target) {
            if had_old {
                let _ = std::fs::rename(&old, &self.target);
            }
            return Err(Error::Io {
                context: format!("moving the result to {}", self.target.display()),
                source: e,
            });
        }
        self.committed = true;
        if had_old {
            std::fs::remove_dir_all(&old)
                .ctx(|| format!("removing the replaced {}", old.display()))?;
        }
        Ok(self.target.clone())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// The temporary folder a run with this pid uses (for the interrupt handler and tests).
pub fn tmp_path_for(target: &Path, pid: u32) -> Option<PathBuf> {
    resolve(target).map(|t| tagged(&t, TMP_TAG, pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_beside_a_file_input_is_fine_but_one_holding_it_is_not() {
        let d = tempfile::tempdir().unwrap();
        let grads = d.path().join("grads.safetensors");
        std::fs::write(&grads, b"x").unwrap();
        let model = d.path().join("model");
        std::fs::create_dir(&model).unwrap();
        let inputs = [grads.clone(), model.clone()];
        assert!(check_target(&d.path().join("out"), false, &inputs).is_empty());
        let holding = check_target(d.path(), true, &inputs);
        assert!(holding
            .iter()
            .any(|p| p.to_string().contains("holds the input")));
        let inside = check_target(&model.join("out"), false, &inputs);
        assert!(inside
            .iter()
            .any(|p| p.to_string().contains("inside the input")));
    }
}
