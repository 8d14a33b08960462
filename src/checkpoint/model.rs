//! A checkpoint as users hand it over: a Hugging Face folder (single or sharded safetensors)
//! or one `.safetensors` file. Resolves the index, refuses what we must not read, and gives
//! every tensor in plan order (shards by file name, tensors by offset).

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use super::file::{SafetensorsFile, TensorEntry};
use super::paths::{inside, stays_inside};
use crate::error::Problem;

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

/// Where a tensor lives: (file index, tensor index in that file).
#[derive(Clone, Copy, Debug)]
pub struct Loc {
    pub file: usize,
    pub idx: usize,
}

pub struct Checkpoint {
    /// The path the user gave (folder or file).
    pub root: PathBuf,
    /// The folder holding config.json and tokenizer files, when the input is a folder.
    pub folder: Option<PathBuf>,
    pub files: Vec<SafetensorsFile>,
    pub order: Vec<Loc>,
    by_name: HashMap<String, Loc>,
    pub config: Option<serde_json::Value>,
    /// What the user should know about how the folder was read (shown with the plan).
    pub notes: Vec<String>,
}

const PICKLE_EXT: &[&str] = &["bin", "pt", "pth", "ckpt", "pkl"];

fn pickle_hint(path: &Path) -> Problem {
    Problem::in_file(
        path,
        "pickled PyTorch checkpoints are not read (unpickling runs arbitrary code); convert to \
         safetensors first, e.g. `model.save_pretrained(dir, safe_serialization=True)` in \
         transformers",
    )
}

/// What to do about a model path that does not exist.
pub const MISSING_MODEL: &str = "stamerge reads local folders: download a Hugging Face model \
                                 first (e.g. `huggingface-cli download ID --local-dir DIR`)";

/// What to do about a gradient statistic that does not exist.
pub const MISSING_STATISTIC: &str = "write the task's gradient statistic first: `python -m \
                                     stamerge.grads --model MODEL --data calib.jsonl --task \
                                     causal-lm --out PATH` (README, \"Gradient statistics\")";

impl Checkpoint {
    /// Opens a checkpoint, reading headers only. Every problem found is returned at once.
    pub fn open(path: &Path) -> Result<Self, Vec<Problem>> {
        Self::open_or(path, MISSING_MODEL)
    }

    /// As [`Checkpoint::open`]; `missing` says what to do when the path does not exist.
    pub fn open_or(path: &Path, missing: &str) -> Result<Self, Vec<Problem>> {
        let meta = std::fs::metadata(path).map_err(|e| {
            vec![Problem::in_file(
                path,
                format!("cannot read: {e}. {missing}"),
            )]
        })?;
        if meta.is_file() {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if PICKLE_EXT.contains(&ext) {
                return Err(vec![pickle_hint(path)]);
            }
            if ext != "safetensors" {
                return Err(vec![Problem::in_file(
                    path,
                    "expected a `.safetensors` file or a model folder",
                )]);
            }
            let f = SafetensorsFile::open(path).map_err(|p| vec![p])?;
            return Ok(Self::assemble(path, None, vec![f], None));
        }
        let folder = path;
        let index = folder.join(INDEX_NAME);
        let single = folder.join(SINGLE_NAME);
        let mut notes = Vec::new();
        // transformers' `from_pretrained` loads `model.safetensors` when both it and the index
        // are there; read what it would load.
        let shard_names: Vec<String> = if single.is_file() {
            if index.is_file() {
                notes.push(format!(
                    "{}: both `{SINGLE_NAME}` and `{INDEX_NAME}` are here: reading \
                     `{SINGLE_NAME}`, as transformers does; the index and its shards are ignored",
                    folder.display()
                ));
            }
            vec![SINGLE_NAME.to_string()]
        } else if index.is_file() {
            read_index(folder, &index).map_err(|p| vec![p])?
        } else {
            let mut st = Vec::new();
            let mut pickled = None;
            if let Ok(rd) = std::fs::read_dir(folder) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    let ext = Path::new(&name)
                        .extension()
                        .and_then(|e| e.to_str())
                        .unwrap_or("");
                    if ext == "safetensors" {
                        st.push(name);
                    } else if PICKLE_EXT.contains(&ext) && pickled.is_none() {
                        pickled = Some(folder.join(&name));
                    }
                }
            }
            st.sort();
            match (st.len(), pickled) {
                (1, _) if st[0].starts_with("adapter_") => {
                    return Err(vec![Problem::in_file(
                        &folder.join(&st[0]),
                        "this is a LoRA adapter, not a full checkpoint: merge the adapter into \
                         its base first (peft's `merge_and_unload()`), then save the full model",
                    )])
                }
                (1, _) => st,
                (0, Some(p)) => return Err(vec![pickle_hint(&p)]),
                (0, None) => {
                    return Err(vec![Problem::in_file(
                        folder,
                        format!(
                            "no `{SINGLE_NAME}`, `{INDEX_NAME}` or other `.safetensors` file here"
                        ),
                    )])
                }
                _ => {
                    return Err(vec![Problem::in_file(
                        folder,
                        format!(
                            "several `.safetensors` files ({}) but no `{INDEX_NAME}`: name the \
                             file to use, or add the index",
                            st.join(", ")
                        ),
                    )])
                }
            }
        };
        // As chosen above: the index is read only where `model.safetensors` is not.
        let indexed = !single.is_file() && index.is_file();
        let mut files = Vec::new();
        let mut problems = Vec::new();
        if !indexed {
            // The index's entries were checked by `read_index`; a file found without one
            // follows the same rule: it stays inside the model folder.
            let canon = folder
                .canonicalize()
                .map_err(|e| vec![Problem::in_file(folder, format!("cannot resolve: {e}"))])?;
            for name in &shard_names {
                if let Err(m) = stays_inside(&canon, &folder.join(name)) {
                    problems.push(Problem::in_file(&folder.join(name), m));
                }
            }
        }
        for name in &shard_names {
            // Between files: Ctrl-C during the plan of a model of thousands of shards.
            if crate::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(vec![Problem::in_file(folder, "interrupted")]);
            }
            match SafetensorsFile::open(&folder.join(name)) {
                Ok(f) => files.push(f),
                Err(p) => problems.push(p),
            }
        }
        if indexed && problems.is_empty() {
            problems.extend(check_index_against_shards(&index, &files));
        }
        let config = match super::side::read_config(folder) {
            Ok(c) => c,
            Err(p) => {
                problems.push(p);
                None
            }
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut ck = Self::assemble(path, Some(folder.to_path_buf()), files, config);
        ck.notes = notes;
        Ok(ck)
    }

    fn assemble(
        root: &Path,
        folder: Option<PathBuf>,
        files: Vec<SafetensorsFile>,
        config: Option<serde_json::Value>,
    ) -> Self {
        let mut order = Vec::new();
        let mut by_name = HashMap::new();
        for (fi, f) in files.iter().enumerate() {
            for ti in 0..f.tensors.len() {
                let loc = Loc { file: fi, idx: ti };
                // A name stored twice (two shards) keeps its first place; the index check reports it.
                if by_name.insert(f.tensors[ti].name.clone(), loc).is_none() {
                    order.push(loc);
                }
            }
        }
        Self {
            root: root.to_path_buf(),
            folder,
            files,
            order,
            by_name,
            config,
            notes: Vec::new(),
        }
    }

    pub fn get(&self, name: &str) -> Option<(&SafetensorsFile, &TensorEntry)> {
        self.by_name.get(name).map(|l| self.at(*l))
    }

    pub fn at(&self, l: Loc) -> (&SafetensorsFile, &TensorEntry) {
        let f = &self.files[l.file];
        (f, &f.tensors[l.idx])
    }

    pub fn tensors(&self) -> impl Iterator<Item = (&SafetensorsFile, &TensorEntry)> {
        self.order.iter().map(|l| self.at(*l))
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.map.len() as u64).sum()
    }

    /// `vocab_size` from config.json (top level or `text_config`), when present.
    pub fn vocab_size(&self) -> Option<u64> {
        let c = self.config.as_ref()?;
        c.get("vocab_size")
            .or_else(|| c.get("text_config").and_then(|t| t.get("vocab_size")))
            .and_then(|v| v.as_u64())
    }
}

/// Reads the shard index and returns its shard file names, sorted, after checking that each one
/// stays inside the model folder (no `..`, no absolute path, no symlink leading out).
fn read_index(folder: &Path, index: &Path) -> Result<Vec<String>, Problem> {
    let text =
        std::fs::read(index).map_err(|e| Problem::in_file(index, format!("cannot read: {e}")))?;
    let entries = parse_index(index, &text)?;
    let canon_folder = folder
        .canonicalize()
        .map_err(|e| Problem::in_file(folder, format!("cannot resolve: {e}")))?;
    let mut names = BTreeSet::new();
    for (tensor, file) in entries {
        // A missing file is reported when it is opened.
        let leads_out = folder
            .join(&file)
            .canonicalize()
            .map(|c| !inside(&canon_folder, &c))
            .unwrap_or(false);
        if leads_out {
            return Err(Problem::in_tensor(
                index,
                &tensor,
                format!("`weight_map` points outside the model folder (a symlink): `{file}`"),
            ));
        }
        names.insert(file);
    }
    Ok(names.into_iter().collect())
}

/// The index's `weight_map` as (tensor, file) pairs, after the checks that need no filesystem:
/// valid JSON, every entry a plain relative file name inside the folder (no `..`, no absolute
/// path, no NUL), at least one entry. `index` only names the file in messages.
pub fn parse_index(index: &Path, text: &[u8]) -> Result<Vec<(String, String)>, Problem> {
    let v: serde_json::Value = serde_json::from_slice(text)
        .map_err(|e| Problem::in_file(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Problem::in_file(index, "no `weight_map` object"))?;
    let mut entries = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(Problem::in_tensor(
                index,
                tensor,
                "`weight_map` entry is not a string",
            ));
        };
        let p = Path::new(file);
        if p.components().next().is_none() || file.contains('\0') {
            return Err(Problem::in_tensor(
                index,
                tensor,
                format!("`weight_map` entry is not a file name: {file:?}"),
            ));
        }
        if p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(Problem::in_tensor(
                index,
                tensor,
                format!("`weight_map` points outside the model folder: `{file}`"),
            ));
        }
        entries.push((tensor.clone(), file.to_string()));
    }
    if entries.is_empty() {
        return Err(Problem::in_file(index, "`weight_map` is empty"));
    }
    Ok(entries)
}

/// The index must agree with the shards: every mapped tensor in its shard, no tensor twice.
fn check_index_against_shards(index: &Path, files: &[SafetensorsFile]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let Ok(text) = std::fs::read(index) else {
        return problems;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return problems;
    };
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        return problems;
    };
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for f in files {
        for t in &f.tensors {
            if let Some(prev) = seen.insert(&t.name, &f.path) {
                problems.push(Problem::in_tensor(
                    &f.path,
                    &t.name,
                    format!("also stored in {}", prev.display()),
                ));
            }
        }
    }
    for (tensor, file) in map {
        let file = file.as_str().unwrap_or_default();
        let shard = files
            .iter()
            .find(|f| f.path.file_name().map(|n| n == file).unwrap_or(false));
        match shard {
            Some(f) if f.tensors.iter().any(|t| &t.name == tensor) => {}
            Some(f) => problems.push(Problem::in_tensor(
                &f.path,
                tensor,
                format!("listed in {} but missing from this shard", INDEX_NAME),
            )),
            None => {}
        }
    }
    problems
}
