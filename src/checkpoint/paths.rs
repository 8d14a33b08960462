//! Plan-time checks of the places a merge writes: the output folder and `--report`. Whatever
//! would make the write fail or land on the wrong file after the work (a symlink, a dangling
//! parent, a mount point, a name too long for the temporary suffix, a folder this process cannot
//! write, an input or the recipe under the report) is a problem found here, before any tensor is
//! read.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::Problem;

/// The files stamerge writes into an output folder besides the model's: the recipe and the
/// report (checked against the report path a user asks for, and written by run.rs).
pub const RECIPE_NAME: &str = "stamerge_recipe.yml";
pub const REPORT_NAME: &str = "stamerge_report.json";

/// `.NAME.stamerge-tmp-PID`: the output (or report) being written.
pub(crate) const TMP_TAG: &str = ".stamerge-tmp-";
/// `.NAME.stamerge-old-PID`: the replaced output, during a commit without exchange-rename.
pub(crate) const OLD_TAG: &str = ".stamerge-old-";
/// `.NAME.stamerge-lock`: the lock file of an output folder.
pub(crate) const LOCK_TAG: &str = ".stamerge-lock";
/// Bytes the longest tagged name adds to NAME: the dot, the tag, a pid of up to 10 digits.
const TAG_BYTES: usize = 1 + 14 + 10;

/// `path` made absolute against the working directory, without resolving anything.
pub fn absolute(path: &Path) -> Option<PathBuf> {
    if path.is_absolute() {
        Some(path.to_path_buf())
    } else {
        Some(std::env::current_dir().ok()?.join(path))
    }
}

/// Absolute, symlink-resolved form of a path that may not exist yet (its parent must resolve).
/// A final component that is a symlink is followed.
pub fn resolve(path: &Path) -> Option<PathBuf> {
    if let Ok(c) = path.canonicalize() {
        return Some(c);
    }
    resolve_parent(path)
}

/// The parent resolved (recursively, for parents that do not exist yet), the final component
/// kept as it is: the output folder's own name is never followed.
pub fn resolve_parent(path: &Path) -> Option<PathBuf> {
    let abs = absolute(path)?;
    let name = abs.file_name()?;
    let parent = abs.parent()?;
    Some(resolve(parent)?.join(name))
}

/// `DIR/.NAME{tag}{pid}` beside `target` (no pid: the lock's `DIR/.NAME{tag}`).
pub(crate) fn tagged(target: &Path, tag: &str, pid: Option<u32>) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let pid = pid.map(|p| p.to_string()).unwrap_or_default();
    target.with_file_name(format!(".{name}{tag}{pid}"))
}

/// Entries `.NAME{tag}PID` beside `target` (any pid), e.g. the temporary folders of killed runs.
pub(crate) fn tagged_entries(target: &Path, tag: &str) -> Vec<PathBuf> {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Vec::new();
    };
    let prefix = format!(".{}{tag}", name.to_string_lossy());
    let Ok(rd) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.strip_prefix(&prefix)
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// What a non-regular file is, in words ("a folder", "a FIFO", ...).
pub fn file_kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a folder"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symlink"
    } else {
        "a regular file"
    }
}

/// The nearest ancestor of `abs` (absolute) that exists, checked to be a folder that this process
/// can write; or the problem with the first one found.
fn writable_ancestor(abs: &Path, what: &str) -> Result<PathBuf, String> {
    let mut cur = abs.parent();
    while let Some(dir) = cur {
        match std::fs::symlink_metadata(dir) {
            Ok(md) => {
                let real = if md.is_symlink() {
                    match std::fs::metadata(dir) {
                        Ok(m) => m,
                        Err(_) => {
                            let to = std::fs::read_link(dir).unwrap_or_default();
                            return Err(format!(
                                "{what}: the folder {} is a dangling symlink (to {}, which does \
                                 not exist)",
                                dir.display(),
                                to.display()
                            ));
                        }
                    }
                } else {
                    md
                };
                if !real.is_dir() {
                    return Err(format!(
                        "{what}: {} is {}, not a folder",
                        dir.display(),
                        file_kind(real.file_type())
                    ));
                }
                return match access_write(dir) {
                    Ok(()) => Ok(dir.to_path_buf()),
                    Err(e) => Err(format!(
                        "{what}: the folder {} is not writable ({e}): choose a folder this user \
                         can write",
                        dir.display()
                    )),
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => cur = dir.parent(),
            Err(e) => return Err(format!("{what}: cannot look at {}: {e}", dir.display())),
        }
    }
    Err(format!("{what}: no folder of {} exists", abs.display()))
}

/// Whether this process may create entries in `dir` (effective ids; a read-only mount says so).
fn access_write(dir: &Path) -> Result<(), std::io::Error> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated path and plain flags.
    let r = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The longest file name the filesystem holding `dir` takes (255 where it does not say).
fn name_max(dir: &Path) -> usize {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return 255;
    };
    // SAFETY: a NUL-terminated path.
    let n = unsafe { libc::pathconf(c.as_ptr(), libc::_PC_NAME_MAX) };
    if n > 0 {
        n as usize
    } else {
        255
    }
}

/// A name to which stamerge adds its temporary suffix must leave room for it.
fn name_fits(abs: &Path, dir: &Path, what: &str) -> Result<(), String> {
    let len = abs.file_name().map(|n| n.len()).unwrap_or(0);
    let max = name_max(dir);
    if len + TAG_BYTES > max {
        return Err(format!(
            "{what}: the name is too long: {len} bytes, and the temporary name stamerge writes \
             first (`.NAME.stamerge-tmp-PID`, {TAG_BYTES} bytes more) passes this filesystem's \
             limit of {max} bytes; choose a name of at most {} bytes",
            max.saturating_sub(TAG_BYTES)
        ));
    }
    Ok(())
}

/// Whether `dir` (resolved) is a mount point: another device than its parent's, or listed in
/// this process's mount table (a bind mount of the same device).
fn is_mount_point(dir: &Path) -> bool {
    let (Ok(md), Some(parent)) = (std::fs::metadata(dir), dir.parent()) else {
        return false;
    };
    if std::fs::metadata(parent).is_ok_and(|p| p.dev() != md.dev()) {
        return true;
    }
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(&unescape_mount(m)) == dir)
}

/// Mount points in /proc/self/mountinfo escape space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let d = |j: usize| u32::from(b[i + j] - b'0');
            out.push((d(1) * 64 + d(2) * 8 + d(3)) as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the input paths are, resolved: (path as given, resolved, is a folder).
fn resolved_inputs(inputs: &[PathBuf]) -> Vec<(&PathBuf, PathBuf, bool)> {
    inputs
        .iter()
        .filter_map(|i| resolve(i).map(|r| (i, r.clone(), r.is_dir())))
        .collect()
}

/// Problems with the target folder, found at plan time: a symlink, a parent that cannot be
/// written or is a dangling link, a name too long for the temporary suffix, a mount point, a
/// file, not empty without `--overwrite` (or holding an interrupted commit's previous output),
/// equal to, inside, or holding one of the inputs.
pub fn check_target(target: &Path, overwrite: bool, inputs: &[PathBuf]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |m: String| problems.push(Problem::in_file(target, m));
    let Some(abs) = absolute(target) else {
        problem("cannot resolve the output folder".into());
        return problems;
    };
    if let Ok(md) = std::fs::symlink_metadata(&abs) {
        if md.is_symlink() {
            let to = std::fs::read_link(&abs).unwrap_or_default();
            let dangling = if abs.exists() {
                ""
            } else {
                ", which does not exist"
            };
            problem(format!(
                "the output folder is a symlink (to {}{dangling}): name the folder itself; \
                 stamerge replaces the folder it is given and never writes through a link",
                to.display()
            ));
            return problems;
        }
    }
    let dir = match writable_ancestor(&abs, "the output folder") {
        Ok(d) => d,
        Err(m) => {
            problem(m);
            return problems;
        }
    };
    if let Err(m) = name_fits(&abs, &dir, "the output folder") {
        problem(m);
    }
    let Some(t) = resolve_parent(&abs) else {
        problem("the output folder's parent cannot be resolved".into());
        return problems;
    };
    for (input, i, is_dir) in resolved_inputs(inputs) {
        // A single-file input (a gradient statistic, a one-file model) only forbids folders that
        // would hold it: `out/` beside `grads.safetensors` is the usual layout, not a clash.
        if is_dir && (t == i || t.starts_with(&i)) {
            problem(format!(
                "the output folder is inside the input {}: choose another folder",
                input.display()
            ));
        } else if i.starts_with(&t) {
            problem(format!(
                "the output folder holds the input {}: writing there would destroy it",
                input.display()
            ));
        }
    }
    match std::fs::metadata(&t) {
        Ok(md) if !md.is_dir() => problem(format!(
            "exists and is {}, not a folder",
            match file_kind(md.file_type()) {
                "a regular file" => "a file",
                k => k,
            }
        )),
        Ok(_) => {
            if is_mount_point(&t) {
                problem(
                    "the output folder is a mount point: stamerge builds the output beside it and \
                     renames it into place, which cannot replace a mount point; write into a \
                     folder inside it (e.g. OUT/merged)"
                        .into(),
                );
            } else if !overwrite {
                let non_empty = std::fs::read_dir(&t)
                    .map(|mut r| r.next().is_some())
                    .unwrap_or(true);
                if non_empty {
                    problem(
                        "exists and is not empty: pass --overwrite to replace it (it is replaced \
                         only after the new merge is complete)"
                            .into(),
                    );
                }
            }
        }
        Err(_) if !overwrite => {
            for old in tagged_entries(&t, OLD_TAG) {
                problem(format!(
                    "a run was interrupted while replacing this folder: its previous contents \
                     are kept in {}. Pass --overwrite to replace them (they are restored first \
                     and replaced only by a complete merge), or rename that folder back",
                    old.display()
                ));
            }
        }
        Err(_) => {}
    }
    problems
}

/// Problems with `--report PATH`, found at plan time: it must be a new or regular file in an
/// existing, writable folder, never an input, inside an input folder, the recipe, or inside the
/// output folder (which gets its own report), and its name must leave room for the temporary
/// suffix (the report is written beside its place and renamed there).
pub fn check_report(
    report: &Path,
    target: Option<&Path>,
    inputs: &[PathBuf],
    recipe: Option<&Path>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let found = std::cell::Cell::new(0);
    let mut problem = |m: String| {
        found.set(found.get() + 1);
        problems.push(Problem::in_file(report, format!("`--report`: {m}")))
    };
    let Some(abs) = absolute(report) else {
        problem("cannot resolve the path".into());
        return problems;
    };
    // The report goes where a symlink leads: check that place.
    let r = match std::fs::metadata(&abs) {
        Ok(md) if !md.is_file() => {
            problem(format!(
                "exists and is {}, not a regular file",
                file_kind(md.file_type())
            ));
            return problems;
        }
        Ok(_) => abs.canonicalize().unwrap_or(abs.clone()),
        Err(_) if std::fs::symlink_metadata(&abs).is_ok_and(|m| m.is_symlink()) => {
            problem("is a dangling symlink".into());
            return problems;
        }
        Err(_) => match resolve_parent(&abs) {
            Some(r) => r,
            None => {
                problem("cannot resolve its folder".into());
                return problems;
            }
        },
    };
    let before = found.get();
    if let Some(rec) = recipe.and_then(resolve) {
        if rec == r {
            problem(
                "is the recipe of this merge: writing the report there would destroy it".into(),
            );
        }
    }
    for (input, i, is_dir) in resolved_inputs(inputs) {
        if i == r {
            problem(format!(
                "is the input {}: writing the report there would destroy it",
                input.display()
            ));
        } else if is_dir && r.starts_with(&i) {
            problem(format!(
                "is inside the input folder {}: stamerge never writes into an input",
                input.display()
            ));
        }
    }
    if let Some(t) = target.and_then(resolve_parent) {
        if r.starts_with(&t) {
            problem(format!(
                "is inside the output folder, which gets its own `{}` (the folder is replaced \
                 as a whole when the merge is committed); choose a path outside it",
                REPORT_NAME
            ));
        }
    }
    if found.get() > before {
        return problems;
    }
    match r.parent() {
        Some(p) if !p.is_dir() => problem(format!(
            "its folder {} does not exist (the report's folder is not created)",
            p.display()
        )),
        _ => match writable_ancestor(&r, "its folder") {
            Ok(dir) => {
                if let Err(m) = name_fits(&r, &dir, "the report") {
                    problem(m);
                }
            }
            Err(m) => problem(m),
        },
    }
    problems
}

/// Whether `target` (resolved) is the model's own: inside `folder` (resolved), or a blob of the
/// Hugging Face cache repository that holds it.
pub(crate) fn inside(folder: &Path, target: &Path) -> bool {
    target.starts_with(folder) || in_hf_cache_blobs(folder, target)
}

/// Where `path`, a file of the model folder `folder` (resolved), leads when it stays inside the
/// folder (a symlink may lead into the same Hugging Face cache repository's blobs); else why it
/// may not be read. Shards, side files and config.json all follow this rule: a crafted folder
/// must not make stamerge read (and copy into the output) a file from elsewhere.
pub(crate) fn stays_inside(folder: &Path, path: &Path) -> Result<PathBuf, String> {
    match path.canonicalize() {
        Ok(c) if inside(folder, &c) => Ok(c),
        Ok(c) => Err(format!(
            "a symlink leading outside the model folder (to {}): not read; put the file itself \
             in the folder",
            c.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let to = std::fs::read_link(path).unwrap_or_default();
            Err(format!(
                "a dangling symlink (to {}, which does not exist)",
                to.display()
            ))
        }
        Err(e) => Err(format!("cannot resolve: {e}")),
    }
}

/// Whether `target` is a blob of the Hugging Face cache repository that holds the snapshot
/// `folder` (`REPO/snapshots/REV` → `REPO/blobs/…`): the hub client stores every file of a
/// snapshot as a symlink there, so this is the model's own data, not an escape.
fn in_hf_cache_blobs(folder: &Path, target: &Path) -> bool {
    let Some(snapshots) = folder.parent() else {
        return false;
    };
    let Some(repo) = snapshots.parent() else {
        return false;
    };
    snapshots.file_name().is_some_and(|n| n == "snapshots")
        && target.starts_with(repo.join("blobs"))
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

    #[test]
    fn mount_table_escapes_are_decoded() {
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
        assert_eq!(unescape_mount("/x\\134"), "/x\\");
    }

    #[test]
    fn tagged_entries_take_only_digits_after_the_tag() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("out");
        for n in [
            ".out.stamerge-tmp-12",
            ".out.stamerge-tmp-",
            ".out2.stamerge-tmp-3",
            ".out.stamerge-tmp-1x",
        ] {
            std::fs::create_dir(d.path().join(n)).unwrap();
        }
        assert_eq!(
            tagged_entries(&t, TMP_TAG),
            vec![d.path().join(".out.stamerge-tmp-12")]
        );
    }
}
