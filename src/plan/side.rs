//! The output's files beside the weights that the recipe changes: the tokenizer of
//! `tokenizer_source`, the chat template, and config.json's layer count (slices) and vocabulary
//! size. Decided at plan time from the inputs' small JSON and tokenizer files; [`write`] applies
//! it after the base's config and tokenizer files were copied into the output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::layout::{checkpoint, Layout};
use super::Inputs;
use crate::checkpoint::side::TOKENIZER_FILES;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, IoContext, Problem, Result};
use crate::recipe::{ChatTemplate, Recipe, TokenizerSource};

/// The files that hold a vocabulary when there is no tokenizer.json.
const VOCAB_FILES: &[&str] = &[
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
];

/// Template files that transformers prefers over tokenizer_config.json's `chat_template`: they go
/// when the recipe sets a template.
const TEMPLATE_FILES: &[&str] = &["chat_template.jinja", "chat_template.json"];

#[derive(Clone, Debug, Default)]
pub struct SidePlan {
    /// The folder whose tokenizer files replace the base's (`tokenizer_source: <model>`).
    pub tokenizer_from: Option<PathBuf>,
    /// config.json keys to set (dotted paths: `text_config.num_hidden_layers`).
    pub config: Vec<(String, serde_json::Value)>,
    /// Written into tokenizer_config.json as `chat_template`.
    pub chat_template: Option<String>,
    /// What the plan prints about these files.
    pub lines: Vec<String>,
}

/// A tokenizer's vocabulary, as far as it can be read without a tokenizer library.
#[derive(Clone, Debug, PartialEq)]
enum Vocab {
    /// token → id, from tokenizer.json (`model.vocab` and `added_tokens`).
    Map(BTreeMap<String, u64>),
    /// The bytes of the vocabulary files (no tokenizer.json): equal bytes, equal vocabulary.
    Files(Vec<(String, Vec<u8>)>),
}

impl Vocab {
    fn len(&self) -> Option<usize> {
        match self {
            Vocab::Map(m) => Some(m.len()),
            Vocab::Files(_) => None,
        }
    }
}

fn read_vocab(folder: &Path) -> std::result::Result<Option<Vocab>, String> {
    let tj = folder.join("tokenizer.json");
    if tj.is_file() {
        let v: serde_json::Value = std::fs::read(&tj)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", tj.display()))?;
        let mut map = BTreeMap::new();
        match v.pointer("/model/vocab") {
            Some(serde_json::Value::Object(o)) => {
                for (tok, id) in o {
                    map.insert(tok.clone(), id.as_u64().unwrap_or(u64::MAX));
                }
            }
            // Unigram: [[piece, score], ...], the id is the position.
            Some(serde_json::Value::Array(a)) => {
                for (id, e) in a.iter().enumerate() {
                    let tok = e.get(0).and_then(|t| t.as_str()).unwrap_or_default();
                    map.insert(tok.to_string(), id as u64);
                }
            }
            _ => return Err(format!("{}: no `model.vocab`", tj.display())),
        }
        for a in v
            .get("added_tokens")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
        {
            if let (Some(tok), Some(id)) = (
                a.get("content").and_then(|c| c.as_str()),
                a.get("id").and_then(|i| i.as_u64()),
            ) {
                map.insert(tok.to_string(), id);
            }
        }
        return Ok(Some(Vocab::Map(map)));
    }
    let mut files = Vec::new();
    for name in VOCAB_FILES {
        let p = folder.join(name);
        if p.is_file() {
            files.push((
                name.to_string(),
                std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?,
            ));
        }
    }
    Ok((!files.is_empty()).then_some(Vocab::Files(files)))
}

/// Where two vocabularies first differ, in words.
fn vocab_difference(a: &Vocab, b: &Vocab) -> String {
    match (a, b) {
        (Vocab::Map(x), Vocab::Map(y)) => {
            if x.len() != y.len() {
                return format!("{} tokens against {}", y.len(), x.len());
            }
            for (tok, id) in x {
                match y.get(tok) {
                    Some(j) if j == id => {}
                    Some(j) => return format!("token {tok:?} has id {j}, not {id}"),
                    None => return format!("it lacks token {tok:?}"),
                }
            }
            "other tokens".into()
        }
        _ => "other vocabulary files".into(),
    }
}

fn folder_of(ck: &Checkpoint) -> Option<&Path> {
    ck.folder.as_deref()
}

/// The chat template of a model folder: chat_template.jinja, else tokenizer_config.json's
/// `chat_template` (a string, or the `default` of a list of named templates).
fn model_template(folder: &Path) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(folder.join("chat_template.jinja")) {
        return Some(t);
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("tokenizer_config.json")).ok()?).ok()?;
    match cfg.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|e| e.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// Decides the side files of `recipe`; problems and notes are added.
pub fn plan(
    recipe: &Recipe,
    inputs: &Inputs,
    layout: &Layout,
    problems: &mut Vec<Problem>,
    notes: &mut Vec<String>,
) -> SidePlan {
    let mut side = SidePlan::default();
    tokenizer(recipe, inputs, &mut side, problems, notes);
    if let Some(ct) = &recipe.chat_template {
        chat_template(inputs, ct, &mut side, notes);
    }
    if let Some(out_layers) = &layout.out_layers {
        layer_count(recipe, inputs, out_layers, &mut side, problems, notes);
    }
    side
}

fn tokenizer(
    recipe: &Recipe,
    inputs: &Inputs,
    side: &mut SidePlan,
    problems: &mut Vec<Problem>,
    notes: &mut Vec<String>,
) {
    let Some(src) = &recipe.tokenizer else { return };
    let field = recipe.tokenizer_field;
    let (donor, label) = match src {
        TokenizerSource::Base => match folder_of(&inputs.base) {
            Some(f) => (f.to_path_buf(), "the base".to_string()),
            None => return,
        },
        TokenizerSource::Model(p, spelled) => (p.clone(), format!("`{spelled}`")),
    };
    let donor_vocab = match read_vocab(&donor) {
        Ok(Some(v)) => v,
        Ok(None) if *src == TokenizerSource::Base => {
            notes.push(format!(
                "`{field}: base`: the base has no tokenizer files; none are written"
            ));
            return;
        }
        Ok(None) => {
            problems.push(Problem::in_file(
                &donor,
                format!("`{field}`: no tokenizer files here (tokenizer.json, tokenizer.model, vocab.json, …)"),
            ));
            return;
        }
        Err(e) => {
            problems.push(Problem::in_file(
                &donor,
                format!("`{field}`: cannot read the tokenizer: {e}"),
            ));
            return;
        }
    };
    let mut models = vec![("base_model".to_string(), &inputs.base)];
    for (t, ti) in inputs.tasks.iter().enumerate() {
        models.push((format!("{}.model", recipe.tasks[t].field), &ti.model));
    }
    for (f, ck) in models {
        let Some(folder) = folder_of(ck) else {
            continue;
        };
        match read_vocab(folder) {
            Ok(Some(v)) if v != donor_vocab => problems.push(Problem::in_file(
                folder,
                format!(
                    "`{field}`: the vocabulary of `{f}` is not {label}'s ({}). Moving embedding \
                     rows between vocabularies (mergekit's permutation) is not supported: merge \
                     models that share one vocabulary",
                    vocab_difference(&donor_vocab, &v)
                ),
            )),
            Ok(Some(_)) => {}
            Ok(None) => notes.push(format!(
                "`{f}` has no tokenizer files: taken to share {label}'s vocabulary (as mergekit does)"
            )),
            Err(e) => problems.push(Problem::in_file(folder, format!("`{field}`: cannot read the tokenizer: {e}"))),
        }
    }
    // mergekit resizes the vocabulary tensors to the tokenizer's token count (rounded up to
    // pad_to_multiple_of) and writes it as vocab_size.
    let rows = inputs.base.vocab_size();
    if let (Some(count), Some(rows)) = (donor_vocab.len(), rows) {
        let count = count as u64;
        let target = match recipe.pad_vocab_to {
            Some(m) if m > 0 => count.div_ceil(m) * m,
            _ => count,
        };
        if target == rows {
            side.config.push(("vocab_size".into(), target.into()));
        } else if recipe.pad_vocab_to.is_some() {
            problems.push(Problem::new(format!(
                "`tokenizer.pad_to_multiple_of`: the vocabulary would be {target} rows, the models \
                 have {rows}: resizing embeddings is not supported"
            )));
        } else {
            notes.push(format!(
                "the tokenizer has {count} tokens and the embeddings {rows} rows: mergekit would \
                 resize the vocabulary tensors to {count} rows; stamerge keeps the {rows} rows and \
                 config.json's vocab_size"
            ));
        }
    }
    if !matches!(src, TokenizerSource::Base) {
        side.lines.push(format!(
            "tokenizer: the files of {label} ({})",
            donor.display()
        ));
        side.tokenizer_from = Some(donor);
    } else {
        side.lines.push("tokenizer: the base's files".into());
    }
}

fn chat_template(inputs: &Inputs, ct: &ChatTemplate, side: &mut SidePlan, notes: &mut Vec<String>) {
    let text = match ct.text() {
        Some(t) => t.to_string(),
        None => {
            // `auto`: the template most input models have; ties go to the first in recipe order
            // (mergekit counts over a set of models, whose order is arbitrary).
            let mut counts: Vec<(String, usize)> = Vec::new();
            let models = std::iter::once(&inputs.base).chain(inputs.tasks.iter().map(|t| &t.model));
            for ck in models {
                let Some(t) = folder_of(ck).and_then(model_template) else {
                    continue;
                };
                let t = t.trim().to_string();
                match counts.iter_mut().find(|(s, _)| *s == t) {
                    Some(c) => c.1 += 1,
                    None => counts.push((t, 1)),
                }
            }
            let best = counts.iter().map(|c| c.1).max();
            match counts.into_iter().find(|c| Some(c.1) == best) {
                Some((t, n)) => {
                    side.lines.push(format!(
                        "chat template: auto, the one {n} input model(s) have"
                    ));
                    t
                }
                None => {
                    notes.push(
                        "chat_template: auto: no input model has a chat template, none is written"
                            .into(),
                    );
                    return;
                }
            }
        }
    };
    let donor = side
        .tokenizer_from
        .clone()
        .or_else(|| folder_of(&inputs.base).map(Path::to_path_buf));
    if !donor.is_some_and(|d| d.join("tokenizer_config.json").is_file()) {
        notes.push(
            "chat_template: the output has no tokenizer_config.json (the tokenizer's model has \
             none), so the template is not written (mergekit does the same)"
                .into(),
        );
        return;
    }
    if !matches!(ct, ChatTemplate::Auto) {
        side.lines.push(format!("chat template: {}", ct.describe()));
    }
    side.chat_template = Some(text);
}

fn layer_count(
    recipe: &Recipe,
    inputs: &Inputs,
    out_layers: &[(crate::recipe::InputRef, usize)],
    side: &mut SidePlan,
    problems: &mut Vec<Problem>,
    notes: &mut Vec<String>,
) {
    let Some(cfg) = &inputs.base.config else {
        notes.push(format!(
            "the base has no config.json: the output's layer count ({}) is written nowhere",
            out_layers.len()
        ));
        return;
    };
    let Some((key, _)) = super::layers::config_count(cfg) else {
        problems.push(Problem::in_file(
            &recipe.base.join("config.json"),
            format!(
                "slices: config.json has no layer count ({}), so the output's could not say its {} layers",
                super::layers::COUNT_KEYS.join(", "),
                out_layers.len()
            ),
        ));
        return;
    };
    side.config.push((key.to_string(), out_layers.len().into()));
    side.lines
        .push(format!("config.json: {key} = {}", out_layers.len()));
    // Per-layer fields (transformers' `layer_types`: full or sliding attention) follow the
    // layers they describe.
    if cfg.get("layer_types").is_some_and(|v| v.is_array()) {
        let mut out = Vec::new();
        for (input, i) in out_layers {
            let src = checkpoint(inputs, *input).config.as_ref().unwrap_or(cfg);
            match src.get("layer_types").and_then(|v| v.get(*i)) {
                Some(v) => out.push(v.clone()),
                None => {
                    problems.push(Problem::new(format!(
                        "slices: config.json's `layer_types` has no entry for layer {i} of a source"
                    )));
                    return;
                }
            }
        }
        side.config
            .push(("layer_types".into(), serde_json::Value::Array(out)));
        side.lines
            .push("config.json: layer_types follows the layers taken".into());
    }
}

fn set(cfg: &mut serde_json::Value, key: &str, v: serde_json::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("a key");
    let mut obj = cfg;
    for p in parts {
        obj = &mut obj[p];
    }
    obj[last] = v;
}

/// A regular file of `folder` that stays inside it (no symlink out of the model folder).
fn inside(folder: &Path, name: &str) -> Option<PathBuf> {
    let p = folder.join(name);
    let canon = p.canonicalize().ok()?;
    let f = folder.canonicalize().ok()?;
    (canon.starts_with(&f) && canon.is_file()).then_some(p)
}

/// Applies the side plan to the output folder `dir`, after the base's config.json and
/// tokenizer files were written there.
pub fn write(side: &SidePlan, dir: &Path) -> Result<()> {
    if let Some(from) = &side.tokenizer_from {
        for name in TOKENIZER_FILES {
            let out = dir.join(name);
            if out.exists() {
                std::fs::remove_file(&out).ctx(|| format!("replacing {}", out.display()))?;
            }
            if let Some(src) = inside(from, name) {
                std::fs::copy(&src, &out).ctx(|| format!("copying {}", src.display()))?;
            }
        }
    }
    if !side.config.is_empty() {
        let p = dir.join("config.json");
        if let Ok(bytes) = std::fs::read(&p) {
            let mut cfg: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Other(format!("{}: {e}", p.display())))?;
            for (k, v) in &side.config {
                set(&mut cfg, k, v.clone());
            }
            let text = serde_json::to_vec_pretty(&cfg).expect("json value");
            std::fs::write(&p, text).ctx(|| "writing config.json".into())?;
        }
    }
    if let Some(t) = &side.chat_template {
        let p = dir.join("tokenizer_config.json");
        let bytes = std::fs::read(&p).ctx(|| format!("reading {}", p.display()))?;
        let mut cfg: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Other(format!("{}: {e}", p.display())))?;
        cfg["chat_template"] = serde_json::Value::String(t.clone());
        let text = serde_json::to_vec_pretty(&cfg).expect("json value");
        std::fs::write(&p, text).ctx(|| "writing tokenizer_config.json".into())?;
        for name in TEMPLATE_FILES {
            let f = dir.join(name);
            if f.exists() {
                std::fs::remove_file(&f).ctx(|| format!("removing {}", f.display()))?;
            }
        }
    }
    Ok(())
}
