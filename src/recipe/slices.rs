//! `slices:`: output slices of source layer ranges, checked as mergekit checks them.

use std::path::Path;

use super::raw::RawSlice;
use super::read::{MapKind, Models, Reader};
use super::{path_in, same_path, InputRef, SliceSpec, SourceSpec, TaskSpec};
use crate::method::BasePolicy;

pub fn read(
    rd: &mut Reader,
    models: &mut Models,
    raw: &[RawSlice],
    base_model: Option<&str>,
    dir: &Path,
) -> Vec<SliceSpec> {
    let mut out = Vec::new();
    for (i, s) in raw.iter().enumerate() {
        let field = format!("slices[{i}]");
        let params = rd.params(
            s.parameters.as_ref(),
            &format!("{field}.parameters"),
            MapKind::Slice,
        );
        if let Some(b) = s.base_model.as_deref() {
            let same = base_model.is_some_and(|g| same_path(&path_in(dir, b), &path_in(dir, g)));
            if !same {
                rd.problem(
                    &format!("{field}.base_model"),
                    "a base model per slice is not supported: stamerge merges every slice against \
                     the top-level `base_model`",
                );
            }
        }
        if s.residual_weight.is_some() {
            rd.note(format!(
                "`{field}.residual_weight` is ignored (mergekit 0.1.5 reads it nowhere either)"
            ));
        }
        if s.sources.is_empty() {
            rd.problem(
                &format!("{field}.sources"),
                "a slice needs at least one source",
            );
        }
        let mut sources = Vec::new();
        for (j, src) in s.sources.iter().enumerate() {
            let sf = format!("{field}.sources[{j}]");
            let p = rd.params(
                src.parameters.as_ref(),
                &format!("{sf}.parameters"),
                MapKind::Source,
            );
            let (a, b) = src.layer_range;
            if a < 0 || b <= a {
                rd.problem(
                    &format!("{sf}.layer_range"),
                    format!("[{a}, {b}] is not a range of layers: give [first, one past the last] with first < last"),
                );
                continue;
            }
            let input = models.input(&src.model, &sf, false);
            if let InputRef::Task(t) = input {
                let g = src.gradients.as_deref().map(|g| path_in(dir, g));
                match (&models.tasks[t].gradients, g) {
                    (None, g) => models.tasks[t].gradients = g,
                    (Some(have), Some(g)) if !same_path(have, &g) => rd.problem(
                        &format!("{sf}.gradients"),
                        format!(
                            "`{}` has another gradient statistic at {}",
                            src.model, models.tasks[t].field
                        ),
                    ),
                    _ => {}
                }
            } else if src.gradients.is_some() {
                rd.problem(
                    &format!("{sf}.gradients"),
                    "the base model has no task vector to rank",
                );
            }
            if sources.iter().any(|x: &SourceSpec| x.input == input) {
                rd.problem(&sf, format!("`{}` is a source of this slice twice (mergekit refuses duplicate inputs too)", src.model));
            }
            sources.push(SourceSpec {
                field: sf,
                input,
                layers: (a as usize, b as usize),
                params: p,
            });
        }
        let lens: Vec<usize> = sources.iter().map(|s| s.layers.1 - s.layers.0).collect();
        if lens.windows(2).any(|w| w[0] != w[1]) {
            rd.problem(
                &format!("{field}.sources"),
                format!("every source of a slice has the same number of layers (as in mergekit), got {lens:?}"),
            );
        }
        // A base policy of `optional` needs the base in the slice when the recipe names one.
        let needs_base = match rd.method.contract().base {
            BasePolicy::Required => true,
            BasePolicy::Optional => base_model.is_some(),
            BasePolicy::Ignored => false,
        };
        if needs_base && !sources.is_empty() && !sources.iter().any(|s| s.input == InputRef::Base) {
            let what = if rd.method.uses_task_vectors() {
                "merges task vectors against the base"
            } else {
                "takes the base as an input of every slice"
            };
            rd.problem(
                &format!("{field}.sources"),
                format!(
                    "{} {what}: list `base_model` among the slice's sources with the layers to \
                     use (mergekit requires it too)",
                    rd.method.name()
                ),
            );
        }
        out.push(SliceSpec {
            field,
            sources,
            params,
        });
    }
    out
}

pub fn check_passthrough(rd: &mut Reader, tasks: &[TaskSpec], slices: &[SliceSpec]) {
    for s in slices {
        if s.sources.len() > 1 {
            rd.problem(
                &format!("{}.sources", s.field),
                "passthrough copies one source per slice (mergekit's limit too); list the others in slices of their own",
            );
        }
    }
    if slices.is_empty() && !tasks.is_empty() {
        rd.problem(
            "models",
            "passthrough copies one model: use `slices:` to take layers from several",
        );
    }
}
