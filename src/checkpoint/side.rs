//! What a model folder holds besides its tensors: `config.json` (read for the plan and written,
//! with `torch_dtype` set, into the output) and the side files copied from the base (tokenizer,
//! generation config). Each must be a regular, readable file that stays inside the model folder,
//! under the rule of the shards (`paths::stays_inside`: a symlink may lead into the same Hugging
//! Face cache repository's blobs, nowhere else), checked at plan time: a broken side file is an
//! error before any tensor is read, never a warning after the work, and a crafted
//! `tokenizer.json -> /etc/shadow` is never copied into an output.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::paths::file_kind;
use super::paths::stays_inside;
use crate::error::{IoContext, Problem, Result};

/// Tokenizer files, replaced together when the tokenizer comes from another model
/// (`plan::side`).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Files copied from the base folder beside the merged weights: the tokenizer's and these
/// (config.json is written, not copied).
const OTHER_COPIED_FILES: &[&str] = &["generation_config.json", "preprocessor_config.json"];

pub const CONFIG_NAME: &str = "config.json";

/// One file of a model folder that will be read: the file it resolves to, checked.
pub struct SideFile {
    pub name: &'static str,
    pub source: PathBuf,
}

/// `folder/name` when it is there: the resolved file, if it may be read; None when absent.
fn checked(folder: &Path, canon: &Path, name: &str) -> Result<Option<PathBuf>, Problem> {
    let path = folder.join(name);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Problem::in_file(&path, format!("cannot be read: {e}"))),
        Ok(_) => {}
    }
    let source = stays_inside(canon, &path).map_err(|m| Problem::in_file(&path, m))?;
    let md = std::fs::metadata(&source)
        .map_err(|e| Problem::in_file(&path, format!("cannot be read: {e}")))?;
    if !md.is_file() {
        // Not opened: a FIFO would block the open until some writer came.
        return Err(Problem::in_file(
            &path,
            format!("not a regular file ({})", file_kind(md.file_type())),
        ));
    }
    File::open(&source).map_err(|e| Problem::in_file(&path, format!("cannot be read: {e}")))?;
    Ok(Some(source))
}

fn canonical(folder: &Path) -> Result<PathBuf, Problem> {
    folder
        .canonicalize()
        .map_err(|e| Problem::in_file(folder, format!("cannot resolve: {e}")))
}

/// The side files of the model folder `folder` that are present, or every problem with them.
pub fn scan(folder: &Path) -> Result<Vec<SideFile>, Vec<Problem>> {
    let canon = canonical(folder).map_err(|p| vec![p])?;
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for &name in TOKENIZER_FILES.iter().chain(OTHER_COPIED_FILES) {
        match checked(folder, &canon, name) {
            Ok(Some(source)) => files.push(SideFile { name, source }),
            Ok(None) => {}
            Err(mut p) => {
                p.message = format!(
                    "{} (a file of the base model copied into the output)",
                    p.message
                );
                problems.push(p);
            }
        }
    }
    if problems.is_empty() {
        Ok(files)
    } else {
        Err(problems)
    }
}

/// `config.json` of a model folder: None when there is none, else a JSON object, or the
/// problem with it (transformers could not load the folder either).
pub fn read_config(folder: &Path) -> Result<Option<serde_json::Value>, Problem> {
    let canon = canonical(folder)?;
    let Some(source) = checked(folder, &canon, CONFIG_NAME)? else {
        return Ok(None);
    };
    let path = folder.join(CONFIG_NAME);
    let bytes = std::fs::read(&source)
        .map_err(|e| Problem::in_file(&path, format!("cannot be read: {e}")))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Problem::in_file(&path, format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Problem::in_file(&path, "not a JSON object"));
    }
    Ok(Some(v))
}

/// Writes the base's `config.json` (`config`, the base's as read, with `torch_dtype` when the
/// recipe sets a dtype) and copies the side files of the base's `folder` into `dir` (nothing for
/// a base that is one file). The files are checked again here (the plan checked them first):
/// what is copied is the file inside the model folder, as a new file (never a link, never the
/// source's permissions).
pub fn write(
    folder: Option<&Path>,
    config: Option<&serde_json::Value>,
    torch_dtype: Option<&str>,
    dir: &Path,
) -> Result<()> {
    let Some(folder) = folder else {
        return Ok(());
    };
    if let Some(cfg) = config {
        let mut cfg = cfg.clone();
        if let (Some(d), Some(obj)) = (torch_dtype, cfg.as_object_mut()) {
            obj.insert("torch_dtype".into(), serde_json::Value::String(d.into()));
        }
        let text = serde_json::to_vec_pretty(&cfg).expect("json value");
        std::fs::write(dir.join(CONFIG_NAME), text).ctx(|| format!("writing {CONFIG_NAME}"))?;
    }
    let files = scan(folder).map_err(crate::error::Error::Plan)?;
    for f in files {
        let dst = dir.join(f.name);
        let copy = || -> std::io::Result<()> {
            let mut src = File::open(&f.source)?;
            let mut out = File::create(&dst)?;
            std::io::copy(&mut src, &mut out)?;
            Ok(())
        };
        copy().ctx(|| format!("copying {}", folder.join(f.name).display()))?;
    }
    Ok(())
}
