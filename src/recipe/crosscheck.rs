//! Rules that tie several parameters of one tensor together (della: density ± epsilon inside
//! (0, 1), which mergekit raises mid-merge). They run on resolved values twice: when the recipe is
//! read, at every position where a gradient of the recipe bends and for a tensor no filter names
//! (scalars and per-layer lists are checked there in full); and when the plan resolves each
//! tensor (what filters give). Each problem names the fields the values came from, with lines.

use super::{locate, Recipe, Resolved, Setting, Site};
use crate::error::Problem;
use crate::method::{sparse, SelectKind};

impl Recipe {
    /// The problems of the values resolved for the tensor at `at`, one message per task.
    pub fn check_tensor(&self, at: &Site, p: &Resolved) -> Vec<String> {
        let mut out = Vec::new();
        if self.method.select() != SelectKind::Della {
            return out;
        }
        for t in 0..self.tasks.len() {
            if !p.has_task(t) {
                continue;
            }
            let (d, e) = (p.task_num(t, "density"), p.task_num(t, "epsilon"));
            if let Err(msg) = sparse::della_bounds(d, e) {
                let input = at.inputs[t].as_deref().unwrap_or("");
                let from = |name: &str| match self.source_of(at, t, name) {
                    Some(p) => locate::field_at(&self.text, &entry(&p.setting, &p.field, input)),
                    None => format!("the default {name}"),
                };
                out.push(format!(
                    "{} with {}: {msg}",
                    from("density"),
                    from("epsilon")
                ));
            }
        }
        out
    }
}

/// The recipe-time pass: every output slice (or the models), at positions 0, 1 and every
/// gradient's anchors, for a tensor that no filter names.
pub(super) fn check_recipe(r: &Recipe) -> Vec<Problem> {
    let mut ts = vec![0.0, 1.0];
    for p in r.scopes().flat_map(|s| s.0.iter()) {
        anchors(&p.setting, &mut ts);
    }
    ts.sort_by(f64::total_cmp);
    ts.dedup();
    let slices: Vec<Option<usize>> = if r.sliced() {
        (0..r.slices.len()).map(Some).collect()
    } else {
        vec![None]
    };
    let mut out: Vec<Problem> = Vec::new();
    for slice in slices {
        let inputs: Vec<Option<String>> = (0..r.tasks.len())
            .map(|t| {
                let present = slice.is_none_or(|s| {
                    r.slices[s]
                        .sources
                        .iter()
                        .any(|src| src.input == super::InputRef::Task(t))
                });
                present.then(String::new)
            })
            .collect();
        for &t in &ts {
            let site = Site {
                name: "",
                t,
                slice,
                base: Some(""),
                inputs: &inputs,
            };
            for msg in r.check_tensor(&site, &r.resolve(&site)) {
                let p = Problem::new(msg);
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// The field of the entry of `s` that gives tensor `name` its value: a filter list's matching
/// entry (`density[0].value`), else the setting itself.
fn entry(s: &Setting, field: &str, name: &str) -> String {
    match s {
        Setting::Filters(cs) => cs
            .iter()
            .position(|c| match c.filter.as_deref() {
                None | Some("*") => true,
                Some(f) => !name.is_empty() && name.contains(f),
            })
            .map_or(field.to_string(), |i| {
                entry(&cs[i].value, &format!("{field}[{i}].value"), name)
            }),
        _ => field.to_string(),
    }
}

/// The positions where a gradient's value bends: its anchors `i / (m − 1)`.
fn anchors(s: &Setting, ts: &mut Vec<f64>) {
    match s {
        Setting::Gradient(vs) if vs.len() > 1 => {
            let m = (vs.len() - 1) as f64;
            ts.extend((0..vs.len()).map(|i| i as f64 / m));
        }
        Setting::Filters(cs) => cs.iter().for_each(|c| anchors(&c.value, ts)),
        _ => {}
    }
}
