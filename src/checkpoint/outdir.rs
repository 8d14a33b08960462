//! The output folder is built beside its target under a temporary name and moved into place
//! only when everything is written: an interrupted or failed run leaves the target as it was.
//!
//! Three rules keep concurrent and killed runs from destroying each other's data:
//! - one writer per target: an advisory `flock` on `.NAME.stamerge-lock`, held on an open
//!   descriptor. The kernel releases it when the process dies, however it dies, and every
//!   process that opens the file sees it, whatever its PID namespace (a container sharing the
//!   volume). Whatever sits beside the target under stamerge's names while the lock is free
//!   belongs to a dead run.
//! - the target is checked again under the lock just before the commit: an output that appeared
//!   during the merge is replaced only with `--overwrite`.
//! - the commit is one `renameat2(RENAME_EXCHANGE)` where the filesystem has it: no moment
//!   exists without a complete target. Elsewhere it is two renames through `.NAME.stamerge-old-PID`,
//!   and a run killed between them leaves that folder, which the next run restores, never deletes.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::paths::{resolve, resolve_parent, tagged, tagged_entries, LOCK_TAG, OLD_TAG, TMP_TAG};
use crate::error::{Error, IoContext, Problem, Result};

/// The lock of one output folder, released (and its file removed) on drop.
struct Lock {
    path: PathBuf,
    /// Holds the `flock`; closing it releases the lock.
    _file: File,
}

impl Lock {
    fn take(target: &Path) -> Result<Self> {
        let path = tagged(target, LOCK_TAG, None);
        // A run that finishes removes the file before it releases the lock, so the file we lock
        // may be gone from the path by the time we hold it: then lock the new one.
        for _ in 0..100 {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                // A symlink planted under the lock's name must not make us truncate its target.
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .ctx(|| format!("opening the lock file {}", path.display()))?;
            // SAFETY: a plain system call on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(Error::Io {
                        context: format!("locking {}", path.display()),
                        source: e,
                    });
                }
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default();
                return Err(Error::Input(Problem::in_file(
                    target,
                    format!(
                        "another stamerge run{holder} is writing this output folder: wait for it \
                         or choose another folder (lock file {})",
                        path.display()
                    ),
                )));
            }
            let same = match (file.metadata(), std::fs::symlink_metadata(&path)) {
                (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
                _ => false,
            };
            if !same {
                continue;
            }
            // For messages only: the lock is the flock, not this number.
            let mut f = &file;
            let _ = file.set_len(0);
            let _ = f.write_all(std::process::id().to_string().as_bytes());
            return Ok(Self { path, _file: file });
        }
        Err(Error::Other(format!(
            "cannot take the lock {}: it keeps being replaced",
            path.display()
        )))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still held: a run that opens the file after this sees it gone once it
        // holds the lock, and tries again with a new one.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A temporary folder that becomes the target on `commit`, and is removed if dropped before.
/// While it exists, the lock keeps every other run from writing the same target.
pub struct OutputDir {
    target: PathBuf,
    tmp: PathBuf,
    overwrite: bool,
    committed: bool,
    _lock: Lock,
}

/// Under the lock: what dead runs left beside the target. A previous output moved aside by a
/// commit that was killed halfway is put back when the target is missing (removed when the
/// target is there: that commit completed); temporary folders are removed.
fn clean_up_after_dead_runs(target: &Path) -> Result<()> {
    for old in tagged_entries(target, OLD_TAG) {
        if std::fs::symlink_metadata(target).is_err() {
            std::fs::rename(&old, target)
                .ctx(|| format!("restoring {} to {}", old.display(), target.display()))?;
            tracing::warn!(
                "restored {} from {} (a run was interrupted while replacing it)",
                target.display(),
                old.display()
            );
        } else {
            tracing::warn!(
                "removing {}: the output that replaced it was committed",
                old.display()
            );
            std::fs::remove_dir_all(&old).ctx(|| format!("removing {}", old.display()))?;
        }
    }
    for tmp in tagged_entries(target, TMP_TAG) {
        tracing::warn!("removing {} left by an interrupted run", tmp.display());
        std::fs::remove_dir_all(&tmp).ctx(|| format!("removing {}", tmp.display()))?;
    }
    Ok(())
}

fn c_path(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

/// `renameat2(from, to, flags)`; Err(None) where the kernel or filesystem does not take the flag.
fn rename2(
    from: &Path,
    to: &Path,
    flags: libc::c_uint,
) -> std::result::Result<(), Option<std::io::Error>> {
    let (f, t) = (c_path(from).map_err(Some)?, c_path(to).map_err(Some)?);
    // SAFETY: NUL-terminated paths; the raw system call avoids depending on glibc's wrapper.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Err(None),
        _ => Err(Some(e)),
    }
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut r| r.next().is_none())
        .unwrap_or(false)
}

impl OutputDir {
    /// Takes the lock, cleans up after dead runs, and creates the temporary folder. With
    /// `overwrite`, a non-empty target may be replaced at `commit`; without, only an absent or
    /// empty one.
    pub fn create(target: &Path, overwrite: bool) -> Result<Self> {
        let target = resolve_parent(target).ok_or_else(|| {
            Error::Input(Problem::in_file(
                target,
                "the output folder's parent does not exist",
            ))
        })?;
        // Like `mkdir -p`: a fresh `runs/2026/merged` should not need a separate step.
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        let lock = Lock::take(&target)?;
        clean_up_after_dead_runs(&target)?;
        let tmp = tagged(&target, TMP_TAG, Some(std::process::id()));
        // From here on, Drop removes the lock (and the temporary folder) on every error path.
        let dir = Self {
            target,
            tmp,
            overwrite,
            committed: false,
            _lock: lock,
        };
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

    /// Moves the finished folder into place. The target is looked at again here, under the lock:
    /// one that is not empty is replaced only with `--overwrite`, and never by a half-done move.
    pub fn commit(mut self) -> Result<PathBuf> {
        let t = self.target.clone();
        let filled = || {
            Error::Input(Problem::in_file(
                &t,
                "was filled by another program while this merge ran: it is left as it is and \
                 this merge's output is not kept; pass --overwrite to replace it, or choose \
                 another folder",
            ))
        };
        match std::fs::symlink_metadata(&self.target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match rename2(&self.tmp, &self.target, libc::RENAME_NOREPLACE) {
                    Ok(()) => {}
                    // Without the flag, a plain rename replaces at most an empty folder.
                    Err(None) => self.rename_plain(&filled)?,
                    Err(Some(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                        return self.commit_again_after(&filled)
                    }
                    Err(Some(e)) => return Err(self.move_error(e)),
                }
            }
            Err(e) => {
                return Err(Error::Io {
                    context: format!("looking at {}", self.target.display()),
                    source: e,
                })
            }
            Ok(md) if md.is_dir() => {
                let empty = is_empty_dir(&self.target);
                if !self.overwrite && !empty {
                    return Err(filled());
                }
                if empty {
                    self.rename_plain(&filled)?;
                } else {
                    match rename2(&self.tmp, &self.target, libc::RENAME_EXCHANGE) {
                        Ok(()) => {
                            // The temporary name now holds the replaced output.
                            self.committed = true;
                            if let Err(e) = std::fs::remove_dir_all(&self.tmp) {
                                tracing::warn!(
                                    "the merge is in {}; removing the output it replaced ({}) \
                                     failed: {e}",
                                    self.target.display(),
                                    self.tmp.display()
                                );
                            }
                        }
                        Err(None) => self.commit_by_two_renames()?,
                        Err(Some(e)) => return Err(self.move_error(e)),
                    }
                }
            }
            Ok(md) => {
                return Err(Error::Input(Problem::in_file(
                    &self.target,
                    format!(
                        "is {} now, not a folder (it changed while this merge ran): nothing was \
                         replaced and this merge's output is not kept",
                        super::paths::file_kind(md.file_type())
                    ),
                )))
            }
        }
        self.committed = true;
        Ok(self.target.clone())
    }

    /// The target appeared between the look and the move: look again (it may be empty).
    fn commit_again_after(self, filled: &dyn Fn() -> Error) -> Result<PathBuf> {
        if self.overwrite || is_empty_dir(&self.target) {
            self.commit()
        } else {
            Err(filled())
        }
    }

    /// `rename(tmp, target)`: the target is absent or an empty folder, which the kernel replaces
    /// only while it is empty.
    fn rename_plain(&mut self, filled: &dyn Fn() -> Error) -> Result<()> {
        match std::fs::rename(&self.tmp, &self.target) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                Err(filled())
            }
            Err(e) => Err(self.move_error(e)),
        }
    }

    /// Where the filesystem has no exchange-rename: the old output is moved aside, the new one
    /// in, the old one removed. Killed between the two renames, the run leaves the old output
    /// in `.NAME.stamerge-old-PID`, which the next run restores (`clean_up_after_dead_runs`).
    fn commit_by_two_renames(&mut self) -> Result<()> {
        let old = tagged(&self.target, OLD_TAG, Some(std::process::id()));
        std::fs::rename(&self.target, &old)
            .ctx(|| format!("moving aside {}", self.target.display()))?;
        if let Err(e) = std::fs::rename(&self.tmp, &self.target) {
            let _ = std::fs::rename(&old, &self.target);
            return Err(self.move_error(e));
        }
        self.committed = true;
        if let Err(e) = std::fs::remove_dir_all(&old) {
            tracing::warn!(
                "the merge is in {}; removing the output it replaced ({}) failed: {e}",
                self.target.display(),
                old.display()
            );
        }
        Ok(())
    }

    fn move_error(&self, source: std::io::Error) -> Error {
        Error::Io {
            context: format!("moving the result to {}", self.target.display()),
            source,
        }
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// A file written whole beside its destination (`.NAME.stamerge-tmp-PID`, synced) and renamed
/// over it by `commit`: a failed write never leaves a truncated file, and the old one stays
/// until the new one is complete. Removed if dropped before `commit`.
pub struct PendingFile {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl PendingFile {
    /// Writes `bytes` beside `dest` (where a symlink at `dest` leads, as the plan checked).
    pub fn write(dest: &Path, bytes: &[u8]) -> Result<Self> {
        let dest = resolve(dest).unwrap_or_else(|| dest.to_path_buf());
        let tmp = tagged(&dest, TMP_TAG, Some(std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let pending = Self {
            tmp,
            dest,
            done: false,
        };
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&pending.tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        };
        write().ctx(|| format!("writing {}", pending.dest.display()))?;
        Ok(pending)
    }

    /// Renames the written file over its destination.
    pub fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.dest)
            .ctx(|| format!("moving the written file to {}", self.dest.display()))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(p: &Path, file: &str, text: &str) {
        std::fs::create_dir_all(p).unwrap();
        std::fs::write(p.join(file), text).unwrap();
    }

    fn read(p: &Path, file: &str) -> String {
        std::fs::read_to_string(p.join(file)).unwrap()
    }

    #[test]
    fn commit_exchanges_with_overwrite_and_refuses_a_filled_target_without() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("out");
        folder(&t, "a", "old");
        let o = OutputDir::create(&t, true).unwrap();
        std::fs::write(o.path().join("a"), "new").unwrap();
        o.commit().unwrap();
        assert_eq!(read(&t, "a"), "new");
        let o = OutputDir::create(&t, false).unwrap();
        std::fs::write(o.path().join("a"), "newer").unwrap();
        let e = o.commit().unwrap_err().to_string();
        assert!(e.contains("--overwrite"), "{e}");
        assert_eq!(read(&t, "a"), "new");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "leftovers");
    }

    /// The fallback commit killed between its renames, then the next run's start.
    #[test]
    fn a_commit_killed_between_two_renames_is_restored_not_deleted() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("out");
        folder(&tagged(&t, OLD_TAG, Some(999_999_999)), "a", "previous");
        folder(&tagged(&t, TMP_TAG, Some(999_999_999)), "a", "half");
        let o = OutputDir::create(&t, true).unwrap();
        assert_eq!(read(&t, "a"), "previous", "not restored");
        drop(o);
        assert_eq!(read(&t, "a"), "previous");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "leftovers");
        // After the second rename the old folder is what the commit replaced.
        folder(&tagged(&t, OLD_TAG, Some(999_999_998)), "a", "older");
        drop(OutputDir::create(&t, false).unwrap());
        assert_eq!(read(&t, "a"), "previous");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "leftovers");
    }

    #[test]
    fn the_two_rename_commit_replaces_whole() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("out");
        folder(&t, "a", "old");
        let mut o = OutputDir::create(&t, true).unwrap();
        std::fs::write(o.path().join("a"), "new").unwrap();
        o.commit_by_two_renames().unwrap();
        drop(o);
        assert_eq!(read(&t, "a"), "new");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "leftovers");
    }

    #[test]
    fn a_second_lock_on_the_same_target_is_refused_and_the_first_is_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("out");
        let a = OutputDir::create(&t, false).unwrap();
        // flock locks are per open file description: a second open in this process conflicts.
        let e = OutputDir::create(&t, false).err().unwrap().to_string();
        assert!(e.contains("another stamerge run"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(a);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "leftovers");
        drop(OutputDir::create(&t, false).unwrap());
    }

    #[test]
    fn a_symlink_under_the_lock_s_name_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let t = d.path().join("out");
        std::os::unix::fs::symlink(&victim, tagged(&t, LOCK_TAG, None)).unwrap();
        assert!(OutputDir::create(&t, false).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }

    #[test]
    fn a_pending_file_replaces_whole_or_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("r.json");
        std::fs::write(&r, "old").unwrap();
        let p = PendingFile::write(&r, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&r).unwrap(), "old");
        drop(p);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        PendingFile::write(&r, b"new").unwrap().commit().unwrap();
        assert_eq!(std::fs::read_to_string(&r).unwrap(), "new");
    }
}
