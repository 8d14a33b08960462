//! YAML recipe → typed, validated recipe. Parameters resolve per model (a model's own value wins
//! over the global one); every problem is reported at once, with the recipe's name.

mod mergekit;
mod raw;

use std::path::{Path, PathBuf};

pub use raw::{Importance, MissingGradients, NonFinite, Selection};
use raw::{RawModel, RawParams, RawRecipe};

use crate::dtype::FloatType;
use crate::error::Problem;
use crate::method::MethodKind;

/// One task vector entering the merge: a `models` entry (sign +1) or a `forget` entry (sign −1).
#[derive(Clone, Debug)]
pub struct TaskSpec {
    /// Where the recipe lists it: `models[1]` or `forget[0]` (for messages).
    pub field: String,
    pub model: PathBuf,
    pub gradients: Option<PathBuf>,
    pub weight: f32,
    pub density: f64,
    pub importance: Importance,
    pub selection: Selection,
    pub forget: bool,
}

#[derive(Clone, Debug)]
pub struct Recipe {
    /// The recipe file, when read from one; its text is copied into the output folder.
    pub path: Option<PathBuf>,
    pub text: String,
    pub method: MethodKind,
    pub base: PathBuf,
    pub start: Option<PathBuf>,
    pub tasks: Vec<TaskSpec>,
    pub lambda: f32,
    pub normalize: bool,
    pub seed: u64,
    pub rescale: bool,
    pub missing_gradients: MissingGradients,
    pub nonfinite_scores: NonFinite,
    pub dtype: Option<FloatType>,
    pub out_dtype: Option<FloatType>,
    /// Things worth telling the user that do not stop the merge.
    pub notes: Vec<String>,
}

impl Recipe {
    /// Reads and validates a recipe file; paths inside it are relative to its folder.
    pub fn from_file(path: &Path) -> Result<Self, Vec<Problem>> {
        let text = read_text(path).map_err(|m| vec![Problem::in_file(path, m)])?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut r = Self::parse(&text, dir).map_err(|ps| {
            ps.into_iter()
                .map(|mut p| {
                    p.file.get_or_insert_with(|| path.to_path_buf());
                    p
                })
                .collect::<Vec<_>>()
        })?;
        r.path = Some(path.to_path_buf());
        Ok(r)
    }

    /// Parses recipe text; relative model paths are resolved against `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<Self, Vec<Problem>> {
        if let Ok(v) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
            let ps = mergekit::unsupported(&v);
            if !ps.is_empty() {
                return Err(ps);
            }
        }
        let raw: RawRecipe = serde_yaml_ng::from_str(text).map_err(|e| {
            let mut msg = e.to_string();
            if msg.contains("invalid type: sequence") || msg.contains("invalid type: map") {
                msg.push_str(
                    " (per-layer parameter lists and filters from mergekit are not supported: \
                     give one number)",
                );
            }
            vec![Problem::new(msg)]
        })?;
        resolve(raw, text, dir)
    }
}

fn path_in(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn resolve(raw: RawRecipe, text: &str, dir: &Path) -> Result<Recipe, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let method = match MethodKind::parse(&raw.merge_method) {
        Some(m) => m,
        None => {
            return Err(vec![Problem::new(format!(
                "unknown merge_method `{}`; supported: {}",
                raw.merge_method,
                MethodKind::ALL
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))])
        }
    };
    let g = raw.parameters.clone().unwrap_or_default();
    let Some(base) = raw.base_model.as_deref() else {
        return Err(vec![Problem::new(format!(
            "`base_model` is required: {} works on task vectors (model − base)",
            method.name()
        ))]);
    };
    let base = path_in(dir, base);
    if let Some(ts) = &raw.tokenizer_source {
        if ts != "base" {
            problems.push(Problem::new(format!(
                "tokenizer_source `{ts}` is not supported: stamerge copies the base model's tokenizer \
                 (`tokenizer_source: base`)"
            )));
        }
    }
    let dtype = parse_dtype(raw.dtype.as_deref(), "dtype", &mut problems);
    let out_dtype = parse_dtype(raw.out_dtype.as_deref(), "out_dtype", &mut problems);

    let lambda = g.lambda.unwrap_or(1.0);
    // Checked after the cast: 1e39 is a finite f64 but an infinite f32, and the merge runs in f32.
    if !(lambda as f32).is_finite() {
        problems.push(Problem::new(format!(
            "`lambda` must be a finite number (|lambda| < 3.4e38), got {lambda}"
        )));
    }
    let normalize = g.normalize.unwrap_or(method.default_normalize());
    if g.seed.is_some() && !method.is_dare() {
        notes.push(format!(
            "`seed` is only used by dare methods; {} ignores it",
            method.name()
        ));
    }
    if !raw.forget.is_empty() && !method.allows_forget() {
        problems.push(Problem::new(format!(
            "`forget:` works with sta, magnitude and task_arithmetic, not {}",
            method.name()
        )));
    }
    if raw.start_model.is_some() && raw.forget.is_empty() {
        problems.push(Problem::new(
            "`start_model` is only used with `forget:` entries",
        ));
    }
    if raw.models.is_empty() && raw.forget.is_empty() {
        problems.push(Problem::new(
            "no `models` (and no `forget` entries): nothing to merge",
        ));
    }
    let mut tasks = Vec::new();
    let entries = raw
        .models
        .iter()
        .map(|m| (m, false))
        .chain(raw.forget.iter().map(|m| (m, true)));
    for (i, (m, forget)) in entries.enumerate() {
        let where_ = if forget { "forget" } else { "models" };
        let model = path_in(dir, &m.model);
        if !forget && same_path(&model, &base) {
            // mergekit recipes often list the base among the models; it has no task vector.
            notes.push(format!(
                "`{}` is the base model: skipped as a task (as mergekit does)",
                m.model
            ));
            continue;
        }
        match resolve_task(m, forget, &g, method, dir, model) {
            Ok(t) => tasks.push(TaskSpec {
                field: format!("{where_}[{i}]"),
                ..t
            }),
            Err(msgs) => problems.extend(
                msgs.into_iter()
                    .map(|msg| Problem::new(format!("{where_}[{i}] (`{}`): {msg}", m.model))),
            ),
        }
    }
    if normalize {
        problems.extend(normalize_problem(method, &tasks));
    }
    if let Some(p) = raw.parameters.as_ref() {
        if p.density.is_some() && !method.uses_density() {
            notes.push(format!("`density` is not used by {}", method.name()));
        }
    }
    if !problems.is_empty() {
        // The inputs that can be located are checked too, so that one run reports everything.
        problems.extend(missing_inputs(&raw, dir));
        return Err(problems);
    }
    Ok(Recipe {
        path: None,
        text: text.to_string(),
        method,
        base,
        start: raw.start_model.as_deref().map(|s| path_in(dir, s)),
        tasks,
        lambda: lambda as f32,
        normalize,
        seed: g.seed.unwrap_or(0),
        rescale: g.rescale.unwrap_or(true),
        missing_gradients: g.missing_gradients.unwrap_or_default(),
        nonfinite_scores: g.nonfinite_scores.unwrap_or_default(),
        dtype,
        out_dtype,
        notes,
    })
}

/// The largest recipe read: real ones are a few KB; the cap ends an endless pipe.
const MAX_RECIPE_BYTES: u64 = 1 << 20;

/// A recipe's text, from a regular file or a pipe (a FIFO, `<(...)`), up to
/// [`MAX_RECIPE_BYTES`]. A device (/dev/zero) or a folder is refused before it is read.
fn read_text(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let md = std::fs::metadata(path).map_err(|e| format!("cannot read recipe: {e}"))?;
    let ft = md.file_type();
    if !(ft.is_file() || ft.is_fifo()) {
        return Err(format!(
            "not a regular file ({}): a recipe is read from a file or a pipe",
            crate::checkpoint::paths::file_kind(ft)
        ));
    }
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_RECIPE_BYTES + 1).read_to_end(&mut buf))
        .map_err(|e| format!("cannot read recipe: {e}"))?;
    if buf.len() as u64 > MAX_RECIPE_BYTES {
        return Err("longer than 1 MiB: not a recipe (a recipe is a few KB of YAML)".into());
    }
    String::from_utf8(buf).map_err(|e| format!("not UTF-8 text: {e}"))
}

/// `normalize: true` divides the task vectors by the sum of their weights. Where that sum can
/// cancel, the result is not a normalised merge: the linear methods' `Σw` under 1% of `Σ|w|`
/// would blow the task vectors up more than 100-fold (mergekit divides by 1 only under 1e-8),
/// and TIES divides each entry by the weights of the tasks that agree on it, which with weights
/// of both signs can be any signed partial sum, even flip the sign.
fn normalize_problem(method: MethodKind, tasks: &[TaskSpec]) -> Option<Problem> {
    let w: Vec<f32> = tasks
        .iter()
        .filter(|t| !t.forget)
        .map(|t| t.weight)
        .collect();
    let listed = w
        .iter()
        .map(|w| w.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let fix = "set `normalize: false` (the task vectors are then added with their weights as \
               given), or give weights that do not cancel";
    if method.fuse() == crate::method::FuseRule::Ties {
        let (pos, neg) = (w.iter().any(|&w| w > 0.0), w.iter().any(|&w| w < 0.0));
        return (pos && neg).then(|| {
            Problem::new(format!(
                "`parameters.normalize`: {} divides each entry by the sum of the weights of the \
                 tasks that agree on it, and with weights of both signs ({listed}) that sum can \
                 cancel to zero or flip the sign: {fix}",
                method.name()
            ))
        });
    }
    let sum: f64 = w.iter().map(|&w| w as f64).sum();
    let abs: f64 = w.iter().map(|&w| (w as f64).abs()).sum();
    (abs > 0.0 && sum.abs() < 0.01 * abs).then(|| {
        Problem::new(format!(
            "`parameters.normalize`: the weights ({listed}) sum to {sum:e}, so normalising would \
             divide the task vectors by (nearly) zero: {fix}"
        ))
    })
}

fn parse_dtype(s: Option<&str>, key: &str, problems: &mut Vec<Problem>) -> Option<FloatType> {
    let s = s?;
    let d = FloatType::parse(s);
    if d.is_none() {
        problems.push(Problem::new(format!(
            "`{key}: {s}` is not supported; use float32, float16 or bfloat16"
        )));
    }
    d
}

/// Every input path of the recipe that does not exist, named by its field (for a recipe that has
/// problems of its own; otherwise the plan opens the inputs and says more).
fn missing_inputs(raw: &RawRecipe, dir: &Path) -> Vec<Problem> {
    use crate::checkpoint::{MISSING_MODEL, MISSING_STATISTIC};
    let mut paths: Vec<(String, &str, &str)> = Vec::new();
    if let Some(b) = raw.base_model.as_deref() {
        paths.push(("base_model".into(), b, MISSING_MODEL));
    }
    if let Some(s) = raw.start_model.as_deref() {
        paths.push(("start_model".into(), s, MISSING_MODEL));
    }
    for (list, entries) in [("models", &raw.models), ("forget", &raw.forget)] {
        for (i, m) in entries.iter().enumerate() {
            paths.push((format!("{list}[{i}].model"), &m.model, MISSING_MODEL));
            if let Some(g) = m.gradients.as_deref() {
                paths.push((format!("{list}[{i}].gradients"), g, MISSING_STATISTIC));
            }
        }
    }
    paths
        .into_iter()
        .filter(|(_, p, _)| !path_in(dir, p).exists())
        .map(|(field, p, hint)| {
            Problem::in_file(
                &path_in(dir, p),
                format!("`{field}`: no such file or folder. {hint}"),
            )
        })
        .collect()
}

fn resolve_task(
    m: &RawModel,
    forget: bool,
    g: &RawParams,
    method: MethodKind,
    dir: &Path,
    model: PathBuf,
) -> Result<TaskSpec, Vec<String>> {
    let mut errs = Vec::new();
    let p = m.parameters.clone().unwrap_or_default();
    for (key, set) in [
        ("lambda", p.lambda.is_some()),
        ("normalize", p.normalize.is_some()),
        ("seed", p.seed.is_some()),
        ("rescale", p.rescale.is_some()),
        ("missing_gradients", p.missing_gradients.is_some()),
        ("nonfinite_scores", p.nonfinite_scores.is_some()),
    ] {
        if set {
            errs.push(format!(
                "`{key}` is a global parameter: move it to the top-level `parameters`"
            ));
        }
    }
    let weight = p.weight.or(g.weight).unwrap_or(1.0);
    if !(weight as f32).is_finite() {
        errs.push(format!(
            "`weight` must be a finite number (|weight| < 3.4e38), got {weight}"
        ));
    }
    let density = p.density.or(g.density).unwrap_or(1.0);
    if !(density > 0.0 && density <= 1.0) {
        errs.push(format!("`density` must be in (0, 1], got {density}"));
    }
    let gradients = m.gradients.as_deref().map(|s| path_in(dir, s));
    if method == MethodKind::Sta && gradients.is_none() {
        errs.push(
            "sta needs the task's gradient statistic: add `gradients: PATH` (made by the \
             stamerge-grads tool, see python/)"
                .to_string(),
        );
    }
    if method != MethodKind::Sta && gradients.is_some() {
        errs.push(format!(
            "`gradients` is only used by sta, not {}",
            method.name()
        ));
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(TaskSpec {
        field: String::new(),
        model,
        gradients,
        weight: weight as f32,
        density,
        importance: p.importance.or(g.importance).unwrap_or_default(),
        selection: p.selection.or(g.selection).unwrap_or_default(),
        forget,
    })
}
