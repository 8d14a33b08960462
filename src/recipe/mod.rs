//! YAML recipe → typed, validated recipe. Parameters stay settings (scalars, per-layer
//! gradients, filter lists) in their scopes; [`Recipe::resolve`] gives their values for one
//! tensor. Every problem is reported at once, with its recipe field and line.

pub mod chat;
mod crosscheck;
mod inputs;
mod locate;
mod mergekit;
pub mod params;
mod raw;
mod read;
mod resolve;
pub mod setting;
mod slices;

use std::path::{Path, PathBuf};

use serde_yaml_ng::Value as Yaml;

pub use chat::ChatTemplate;
pub use params::Value;
pub use params::{Kind, ParamSpec, Scope, PARAMS};
pub use raw::{Importance, MissingGradients, NonFinite, Selection};
pub use resolve::{Param, Params, Resolved, Site, Values};
pub use setting::Setting;

use raw::{RawModel, RawRecipe};
use read::{MapKind, Models, Reader};

use crate::dtype::FloatType;
use crate::error::Problem;
use crate::method::{BasePolicy, MethodKind};

/// One model entering the merge besides the base: a `models` entry or slice source (sign +1) or a
/// `forget` entry (sign −1). For `passthrough`, every model besides the first.
#[derive(Clone, Debug)]
pub struct TaskSpec {
    /// Where the recipe lists it first: `models[1]`, `forget[0]`, `slices[0].sources[1]`.
    pub field: String,
    pub model: PathBuf,
    /// The path as the recipe writes it (`buffer_source` names models so).
    pub spelled: String,
    pub gradients: Option<PathBuf>,
    pub forget: bool,
    /// Its own `parameters` (a `models:`/`forget:` entry; slice sources carry their own).
    pub params: Params,
    /// One value for the whole model.
    pub selection: Selection,
    /// `selection: model`: the one density of the whole model.
    pub model_density: f64,
}

/// Which input a slice source reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputRef {
    Base,
    Task(usize),
}

/// `slices[i].sources[j]`: layers `layers.0 .. layers.1` of one input.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    pub field: String,
    pub input: InputRef,
    pub layers: (usize, usize),
    pub params: Params,
}

/// `slices[i]`: its sources' layers merged (or passed through) into the next output layers.
#[derive(Clone, Debug)]
pub struct SliceSpec {
    pub field: String,
    pub sources: Vec<SourceSpec>,
    pub params: Params,
}

impl SliceSpec {
    pub fn len(&self) -> usize {
        self.sources.first().map_or(0, |s| s.layers.1 - s.layers.0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the output's tokenizer comes from (`tokenizer_source`, `tokenizer.source`).
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizerSource {
    Base,
    /// A model folder, and the path as the recipe writes it.
    Model(PathBuf, String),
}

#[derive(Clone, Debug)]
pub struct Recipe {
    /// The recipe file, when read from one; its text is copied into the output folder.
    pub path: Option<PathBuf>,
    pub text: String,
    pub method: MethodKind,
    /// The base model; for `passthrough` without `base_model`, the first model (config.json,
    /// tokenizer and non-layer tensors of a `models:` recipe come from it).
    pub base: PathBuf,
    /// The base as the recipe writes it.
    pub base_spelled: String,
    pub start: Option<PathBuf>,
    pub tasks: Vec<TaskSpec>,
    /// The top-level `parameters`.
    pub params: Params,
    /// The base's own `parameters` (its `models:` entry): per-input parameters of the base.
    pub base_params: Params,
    /// A method that needs no base, without `base_model`: `base` is the first model, read for
    /// the layout, config.json and tokenizer only; it is `tasks[0]` of the merge.
    pub baseless: bool,
    /// A `models:` recipe's inputs in mergekit's order: the models as listed (the base where
    /// it is listed), then a base the list leaves out. (`slices:`: each slice's sources.)
    pub order: Vec<InputRef>,
    /// `slices:` (empty for a `models:` recipe).
    pub slices: Vec<SliceSpec>,
    pub seed: u64,
    pub missing_gradients: MissingGradients,
    pub nonfinite_scores: NonFinite,
    pub dtype: Option<FloatType>,
    pub out_dtype: Option<FloatType>,
    /// None: the base's tokenizer files are copied as they are (mergekit's `--copy-tokenizer`).
    pub tokenizer: Option<TokenizerSource>,
    /// The field that sets it (`tokenizer_source` or `tokenizer.source`), for messages.
    pub tokenizer_field: &'static str,
    /// `tokenizer.pad_to_multiple_of`.
    pub pad_vocab_to: Option<u64>,
    pub chat_template: Option<ChatTemplate>,
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
        if let Ok(v) = serde_yaml_ng::from_str::<Yaml>(text) {
            let ps = mergekit::unsupported(&v);
            if !ps.is_empty() {
                return Err(ps);
            }
        }
        let raw: RawRecipe =
            serde_yaml_ng::from_str(text).map_err(|e| vec![Problem::new(e.to_string())])?;
        build(raw, text, dir)
    }

    /// Whether this is a `slices:` recipe.
    pub fn sliced(&self) -> bool {
        !self.slices.is_empty()
    }
}

pub(crate) fn path_in(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

pub(crate) fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn build(raw: RawRecipe, text: &str, dir: &Path) -> Result<Recipe, Vec<Problem>> {
    let Some(method) = MethodKind::parse(&raw.merge_method) else {
        return Err(vec![Problem::new(format!(
            "unknown merge_method `{}`; supported: {}",
            raw.merge_method,
            MethodKind::ALL.map(|m| m.name()).join(", ")
        ))]);
    };
    let mut rd = Reader {
        text,
        method,
        problems: Vec::new(),
        notes: Vec::new(),
    };
    let params = rd.params(raw.parameters.as_ref(), "parameters", MapKind::Global);
    let passthrough = method == MethodKind::Passthrough;
    let sliced = !raw.slices.is_empty();
    if sliced && !raw.models.is_empty() {
        rd.problem(
            "slices",
            "give `models:` or `slices:`, not both (as in mergekit)",
        );
    }
    if !sliced && raw.models.is_empty() && raw.forget.is_empty() {
        rd.problems.push(Problem::new(
            "no `models` (and no `forget` entries): nothing to merge",
        ));
    }
    // The base: `base_model`, or for passthrough the first model named.
    let first_model = raw
        .slices
        .first()
        .and_then(|s| s.sources.first())
        .map(|s| s.model.as_str())
        .or(raw.models.first().map(|m| m.model.as_str()));
    // Methods that need no base (mergekit's optional and ignored base policies) read the
    // first model's layout, config and tokenizer instead, and take it as a model like the others.
    let baseless = method.is_interp()
        && raw.base_model.is_none()
        && method.contract().base != BasePolicy::Required;
    let base_spelled = match (raw.base_model.as_deref(), first_model) {
        (Some(b), _) => Some(b.to_string()),
        (None, Some(m)) if passthrough || baseless => Some(m.to_string()),
        (None, None) if passthrough || baseless => None,
        _ => {
            let why = if method.is_interp() {
                "(mergekit requires it too): the path goes from the base to the models"
            } else {
                "works on task vectors (model − base)"
            };
            rd.problems.push(Problem::new(format!(
                "`base_model` is required: {} {why}",
                method.name()
            )));
            None
        }
    };
    let mut models = Models {
        dir,
        base: base_spelled
            .as_deref()
            .filter(|_| !baseless)
            .map(|b| path_in(dir, b)),
        tasks: Vec::new(),
    };
    let mut order = Vec::new();
    let mut base_params = Params::default();
    for (list, entries, forget) in [
        ("models", &raw.models, false),
        ("forget", &raw.forget, true),
    ] {
        for (i, m) in entries.iter().enumerate() {
            let field = format!("{list}[{i}]");
            let p = rd.params(
                m.parameters.as_ref(),
                &format!("{field}.parameters"),
                MapKind::Model,
            );
            let input = models.input(&m.model, &field, forget);
            if !forget && !order.contains(&input) {
                order.push(input);
            }
            match input {
                InputRef::Base => {
                    if method.uses_task_vectors() {
                        // mergekit recipes often list the base among the models; it has no task vector.
                        rd.note(format!(
                            "`{}` is the base model: skipped as a task (as mergekit does)",
                            m.model
                        ));
                    }
                    base_params = p;
                    if m.gradients.is_some() {
                        rd.problem(
                            &format!("{field}.gradients"),
                            "the base model has no task vector to rank",
                        );
                    }
                }
                InputRef::Task(t) => {
                    if models.tasks[t].field != field {
                        rd.problem(&field, format!("`{}` is listed twice", m.model));
                        continue;
                    }
                    models.tasks[t].params = p;
                    models.tasks[t].gradients = m.gradients.as_deref().map(|g| path_in(dir, g));
                }
            }
        }
    }
    let slices = slices::read(
        &mut rd,
        &mut models,
        &raw.slices,
        raw.base_model.as_deref(),
        dir,
    );
    let mut tasks = models.tasks;
    if passthrough {
        slices::check_passthrough(&mut rd, &tasks, &slices);
    }
    // mergekit adds a base that the models do not list as the last input.
    if raw.base_model.is_some() && !sliced && !order.contains(&InputRef::Base) {
        order.push(InputRef::Base);
    }
    if method.is_interp() {
        let has_t =
            |m: &Option<serde_yaml_ng::Mapping>| m.as_ref().is_some_and(|m| m.contains_key("t"));
        let writes_t =
            has_t(&raw.parameters) || (sliced && raw.slices.iter().all(|s| has_t(&s.parameters)));
        inputs::check(
            &mut rd,
            &params,
            &base_params,
            &order,
            &slices,
            !baseless,
            writes_t,
        );
    }
    if !raw.forget.is_empty() && !method.allows_forget() {
        rd.problems.push(Problem::new(format!(
            "`forget:` works with sta, magnitude and task_arithmetic, not {}",
            method.name()
        )));
    }
    if sliced && (!raw.forget.is_empty() || raw.start_model.is_some()) {
        rd.problem(
            "slices",
            "`forget:` and `start_model` work with `models:` recipes, not `slices:`",
        );
    }
    if raw.start_model.is_some() && raw.forget.is_empty() {
        rd.problems.push(Problem::new(
            "`start_model` is only used with `forget:` entries",
        ));
    }
    for t in 0..tasks.len() {
        check_task(&mut rd, &params, &slices, &mut tasks, t);
    }
    check_model_values(
        &mut rd,
        &params,
        &base_params,
        &tasks,
        &slices,
        base_spelled.as_deref(),
    );
    let dtype = parse_dtype(&mut rd, raw.dtype.as_deref(), "dtype");
    let out_dtype = parse_dtype(&mut rd, raw.out_dtype.as_deref(), "out_dtype");
    let (tokenizer, pad_vocab_to) = read_tokenizer(&mut rd, &raw, dir);
    let chat_template = raw
        .chat_template
        .as_deref()
        .and_then(|c| match ChatTemplate::parse(c) {
            Ok(t) => Some(t),
            Err(e) => {
                rd.problem("chat_template", e);
                None
            }
        });
    let scalar = |name: &str| params.scalar(name).cloned();
    let seed = scalar("seed").map_or(0, |v| v.num() as u64);
    let missing_gradients = match scalar("missing_gradients") {
        Some(v) if v.str() == "magnitude" => MissingGradients::Magnitude,
        _ => MissingGradients::Error,
    };
    let nonfinite_scores = match scalar("nonfinite_scores") {
        Some(v) if v.str() == "zero" => NonFinite::Zero,
        _ => NonFinite::Error,
    };
    let base = models
        .base
        .or_else(|| base_spelled.as_deref().map(|b| path_in(dir, b)));
    let (Some(base), Some(base_spelled)) = (base, base_spelled) else {
        rd.problems.extend(missing_inputs(&raw, dir));
        return Err(rd.problems);
    };
    if !rd.problems.is_empty() {
        // The inputs that can be located are checked too, so that one run reports everything.
        rd.problems.extend(missing_inputs(&raw, dir));
        return Err(rd.problems);
    }
    let recipe = Recipe {
        path: None,
        text: text.to_string(),
        method,
        base,
        base_spelled,
        start: raw.start_model.as_deref().map(|s| path_in(dir, s)),
        tasks,
        params,
        base_params,
        baseless,
        order,
        slices,
        seed,
        missing_gradients,
        nonfinite_scores,
        dtype,
        out_dtype,
        tokenizer,
        tokenizer_field: if raw.tokenizer_source.is_some() {
            "tokenizer_source"
        } else {
            "tokenizer.source"
        },
        pad_vocab_to,
        chat_template,
        notes: rd.notes,
    };
    let problems = crosscheck::check_recipe(&recipe);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(recipe)
}

/// A task's whole-model values and the checks that need the method.
fn check_task(
    rd: &mut Reader,
    global: &Params,
    slices: &[SliceSpec],
    tasks: &mut [TaskSpec],
    t: usize,
) {
    let method = rd.method;
    let spec = &tasks[t];
    let field = spec.field.clone();
    let selection = spec
        .params
        .scalar("selection")
        .or(global.scalar("selection"))
        .map_or(Selection::Tensor, |v| {
            if v.str() == "model" {
                Selection::Model
            } else {
                Selection::Tensor
            }
        });
    let mut density = 1.0;
    let ranks = method.select() == crate::method::SelectKind::TopK;
    if selection == Selection::Model && ranks {
        if !slices.is_empty() {
            rd.problem(
                "parameters.selection",
                "`selection: model` ranks whole models: it does not work with `slices:`",
            );
        } else {
            let first = spec.params.get("density").or(global.get("density"));
            match first {
                Some(p) if !p.setting.is_scalar() => rd.problem(
                    &p.field.clone(),
                    "`selection: model` keeps one density per model over the whole model: give \
                     one number, not a per-layer list or a filter",
                ),
                Some(p) => {
                    density = p
                        .setting
                        .evaluate("", 0.0, Kind::Float)
                        .map_or(1.0, |v| v.num())
                }
                None => {}
            }
        }
    }
    match (&spec.gradients, method.reads_gradients()) {
        (None, true) => rd.problem(
            &field,
            format!(
                "{} needs the gradient statistic of `{}`: add `gradients: PATH` (made by the \
                 stamerge-grads tool, see python/{})",
                method.name(),
                spec.spelled,
                if method == MethodKind::Fisher {
                    "; fisher weighs by `--mode sq`"
                } else {
                    ""
                }
            ),
        ),
        (Some(_), false) => rd.problem(
            &format!("{field}.gradients"),
            format!(
                "`gradients` is only used by sta and fisher, not {}",
                method.name()
            ),
        ),
        _ => {}
    }
    tasks[t].selection = selection;
    tasks[t].model_density = density;
}

/// `buffer_source` values must name a model of the recipe.
fn check_model_values(
    rd: &mut Reader,
    global: &Params,
    base_params: &Params,
    tasks: &[TaskSpec],
    slices: &[SliceSpec],
    base: Option<&str>,
) {
    let names: Vec<&str> = base
        .into_iter()
        .chain(tasks.iter().map(|t| t.spelled.as_str()))
        .collect();
    let scopes =
        std::iter::once(global)
            .chain(std::iter::once(base_params))
            .chain(tasks.iter().map(|t| &t.params))
            .chain(slices.iter().flat_map(|s| {
                std::iter::once(&s.params).chain(s.sources.iter().map(|x| &x.params))
            }));
    let mut bad = Vec::new();
    for scope in scopes {
        for p in scope.0.iter().filter(|p| p.spec.kind == Kind::Model) {
            for (f, v) in p.setting.scalars(&p.field) {
                if v.str() != "base" && !names.contains(&v.str()) {
                    bad.push((f, v.str().to_string()));
                }
            }
        }
    }
    for (f, v) in bad {
        rd.problem(
            &f,
            format!(
                "`{v}` is not a model of this recipe: give `base` or one of {}",
                names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
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

fn parse_dtype(rd: &mut Reader, s: Option<&str>, key: &str) -> Option<FloatType> {
    let s = s?;
    let d = FloatType::parse(s.strip_prefix("torch.").unwrap_or(s));
    if d.is_none() {
        rd.problem(
            key,
            format!("`{key}: {s}` is not supported; use float32, float16 or bfloat16"),
        );
    }
    d
}

fn read_tokenizer(
    rd: &mut Reader,
    raw: &RawRecipe,
    dir: &Path,
) -> (Option<TokenizerSource>, Option<u64>) {
    if raw.tokenizer_source.is_some() && raw.tokenizer.is_some() {
        rd.problem(
            "tokenizer",
            "give `tokenizer_source` or `tokenizer`, not both (as in mergekit)",
        );
    }
    let (source, field) = match (&raw.tokenizer_source, &raw.tokenizer) {
        (Some(s), _) => (s.clone(), "tokenizer_source"),
        // mergekit's default source of a `tokenizer:` block is `union`.
        (None, Some(t)) => (
            t.source.clone().unwrap_or_else(|| "union".into()),
            "tokenizer.source",
        ),
        (None, None) => return (None, None),
    };
    if let Some(t) = &raw.tokenizer {
        if t.tokens.is_some() {
            rd.problem(
                "tokenizer.tokens",
                "per-token embedding sources are not supported: stamerge merges models that share \
                 one vocabulary and keeps their embedding rows",
            );
        }
    }
    let pad = raw.tokenizer.as_ref().and_then(|t| t.pad_to_multiple_of);
    if pad == Some(0) {
        rd.problem("tokenizer.pad_to_multiple_of", "must be at least 1");
    }
    let src = match source.as_str() {
        "union" => {
            rd.problem(
                field,
                "`union` (a vocabulary made of every model's tokens, each model's embedding rows \
                 moved to it) is not supported: stamerge merges models that share one vocabulary. \
                 Use `base` or a model whose tokenizer to copy, or align the vocabularies first",
            );
            None
        }
        "base" => Some(TokenizerSource::Base),
        m => Some(TokenizerSource::Model(path_in(dir, m), m.to_string())),
    };
    (src, pad)
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
    let lists: [(&str, &Vec<RawModel>); 2] = [("models", &raw.models), ("forget", &raw.forget)];
    for (list, entries) in lists {
        for (i, m) in entries.iter().enumerate() {
            paths.push((format!("{list}[{i}].model"), &m.model, MISSING_MODEL));
            if let Some(g) = m.gradients.as_deref() {
                paths.push((format!("{list}[{i}].gradients"), g, MISSING_STATISTIC));
            }
        }
    }
    for (i, s) in raw.slices.iter().enumerate() {
        for (j, src) in s.sources.iter().enumerate() {
            paths.push((
                format!("slices[{i}].sources[{j}].model"),
                &src.model,
                MISSING_MODEL,
            ));
            if let Some(g) = src.gradients.as_deref() {
                paths.push((
                    format!("slices[{i}].sources[{j}].gradients"),
                    g,
                    MISSING_STATISTIC,
                ));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    paths
        .into_iter()
        .filter(|(_, p, _)| !path_in(dir, p).exists() && seen.insert(p.to_string()))
        .map(|(field, p, hint)| {
            Problem::in_file(
                &path_in(dir, p),
                format!("`{field}`: no such file or folder. {hint}"),
            )
        })
        .collect()
}
