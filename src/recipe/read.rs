//! Reading a recipe: problems collected with their field and line, parameter maps checked
//! against the parameter table, and the models it names matched by path.

use std::path::{Path, PathBuf};

use serde_yaml_ng::Mapping;

use super::params::{self, Scope};
use super::setting::{self, Setting};
use super::{locate, path_in, same_path, InputRef, Param, Params, Selection, TaskSpec};
use crate::error::Problem;
use crate::method::MethodKind;

/// Where a parameter map sits, which decides what it may set.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    Global,
    Model,
    Slice,
    Source,
}

/// Collects problems (with the field's line) and notes while the recipe is read.
pub struct Reader<'a> {
    pub text: &'a str,
    pub method: MethodKind,
    pub problems: Vec<Problem>,
    pub notes: Vec<String>,
}

impl Reader<'_> {
    pub fn problem(&mut self, field: &str, msg: impl std::fmt::Display) {
        let at = locate::field_at(self.text, field);
        let p = Problem::new(format!("{at}: {msg}"));
        // A global setting several models read is one problem.
        if !self.problems.contains(&p) {
            self.problems.push(p);
        }
    }

    pub fn note(&mut self, msg: String) {
        if !self.notes.contains(&msg) {
            self.notes.push(msg);
        }
    }

    /// A `parameters` map, checked against the parameter table.
    pub fn params(&mut self, map: Option<&Mapping>, field: &str, kind: MapKind) -> Params {
        let mut out = Params::default();
        let Some(map) = map else {
            return out;
        };
        for (k, v) in map {
            let Some(name) = k.as_str() else {
                self.problem(
                    field,
                    format!(
                        "a parameter name must be a word, got {}",
                        setting::yaml_text(k)
                    ),
                );
                continue;
            };
            let f = format!("{field}.{name}");
            let Some(spec) = params::spec(self.method, name) else {
                let known: Vec<&str> = params::of(self.method).map(|p| p.name).collect();
                self.problem(
                    &f,
                    format!(
                        "unknown field `{name}`; the parameters of {} are: {}",
                        self.method.name(),
                        known.join(", ")
                    ),
                );
                continue;
            };
            if spec.scope == Scope::Shared && matches!(kind, MapKind::Model | MapKind::Source) {
                self.problem(
                    &f,
                    format!(
                        "`{name}` is a global parameter: move it to the top-level `parameters`"
                    ),
                );
                continue;
            }
            if !spec.per_tensor
                && kind != MapKind::Global
                && !(kind == MapKind::Model && spec.scope != Scope::Shared)
            {
                self.problem(
                    &f,
                    format!("`{name}` is one value for the whole merge: set it in the top-level `parameters`"),
                );
                continue;
            }
            let setting = match Setting::parse(v, spec, &f) {
                Ok(s) => s,
                Err(errs) => {
                    for (ef, msg) in errs {
                        self.problem(&ef, msg);
                    }
                    continue;
                }
            };
            if !spec.per_tensor && !setting.is_scalar() {
                self.problem(
                    &f,
                    format!(
                        "`{name}` is one value for the whole {}: give {}, not a per-layer list or a filter",
                        if spec.scope == Scope::Shared { "merge" } else { "model" },
                        spec.kind.describe()
                    ),
                );
                continue;
            }
            if !(spec.methods)(self.method) {
                self.note(format!("`{name}` is not used by {}", self.method.name()));
            }
            out.0.push(Param {
                spec,
                setting,
                field: f,
            });
        }
        out
    }
}

/// The models of the recipe so far, matched by path.
pub struct Models<'a> {
    pub dir: &'a Path,
    pub base: Option<PathBuf>,
    pub tasks: Vec<TaskSpec>,
}

impl Models<'_> {
    /// The input a path names: the base, a known task, or a new task.
    pub fn input(&mut self, spelled: &str, field: &str, forget: bool) -> InputRef {
        let model = path_in(self.dir, spelled);
        if !forget && self.base.as_deref().is_some_and(|b| same_path(&model, b)) {
            return InputRef::Base;
        }
        if let Some(t) = self
            .tasks
            .iter()
            .position(|t| t.forget == forget && same_path(&t.model, &model))
        {
            return InputRef::Task(t);
        }
        self.tasks.push(TaskSpec {
            field: field.to_string(),
            model,
            spelled: spelled.to_string(),
            gradients: None,
            forget,
            params: Params::default(),
            selection: Selection::Tensor,
            model_density: 1.0,
        });
        InputRef::Task(self.tasks.len() - 1)
    }
}
