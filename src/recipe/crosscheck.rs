//! Rules that tie several parameters of one tensor together (della: density ± epsilon inside
//! (0, 1), which mergekit raises mid-merge). They run on resolved values twice: when the recipe is
//! read, at every position where a gradient of the recipe bends and for a tensor no filter names
//! (scalars and per-layer lists are checked there in full); and when the plan resolves each
//! tensor (what filters give). Each problem names the fields the values came from, with lines.

use super::{locate, Recipe, Resolved, Setting, Site};
use crate::error::Problem;
use crate::method::{sparse, MethodKind, SelectKind};

impl Recipe {
    /// The problems of the values resolved for the tensor at `at`, one message per task.
    pub fn check_tensor(&self, at: &Site, p: &Resolved) -> Vec<String> {
        let mut out = Vec::new();
        if self.method == MethodKind::Sta {
            out.extend(self.check_sta(at, p));
        }
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

impl Recipe {
    /// sta's selection options (docs/SEMANTICS.md, "sta's selection options"): a threshold
    /// selects instead of a density, not with one, and not with `selection: model`, which
    /// divides by the tensor's mean itself; a consensus no set of tasks can reach keeps nothing.
    fn check_sta(&self, at: &Site, p: &Resolved) -> Vec<String> {
        let mut out = Vec::new();
        let field = |t: usize, name: &str| {
            let input = at.inputs[t].as_deref().unwrap_or("");
            self.source_of(at, t, name)
                .map(|p| locate::field_at(&self.text, &entry(&p.setting, &p.field, input)))
        };
        for t in 0..self.tasks.len() {
            if !p.has_task(t) {
                continue;
            }
            let model = self.tasks[t].selection == super::Selection::Model;
            if let Some(th) = field(t, "threshold").filter(|_| p.task(t, "threshold").is_some()) {
                if let Some(d) = field(t, "density") {
                    out.push(format!(
                        "{th} and {d}: give one of them (for {}): a threshold selects the entries \
                         instead of a density",
                        self.tasks[t].field
                    ));
                } else if model {
                    out.push(format!(
                        "{th}: `threshold` does not work with `selection: model` ({}), which \
                         finds one threshold for a density of the whole model",
                        self.tasks[t].field
                    ));
                }
            }
            let norm = p
                .task(t, "normalize_importance")
                .map(|v| v.str().to_string());
            if let (true, Some(word)) = (model, norm.filter(|w| w != "mean")) {
                let f = field(t, "normalize_importance").unwrap_or_default();
                out.push(format!(
                    "{f}: `normalize_importance: {word}` does not work with `selection: model` \
                     ({}), which ranks each tensor's importance divided by its mean (`mean`)",
                    self.tasks[t].field
                ));
            }
        }
        if p.shared("overlap").map(|v| v.str()) == Some("consensus") {
            let k = p.num("consensus");
            let taking_part = (0..self.tasks.len())
                .filter(|&t| p.has_task(t) && !self.tasks[t].forget)
                .count();
            if k > taking_part as f64 {
                let slice = at.slice.and_then(|s| self.slices.get(s)).map(|s| &s.params);
                let from = slice
                    .into_iter()
                    .chain(std::iter::once(&self.params))
                    .find_map(|s| s.get("consensus"))
                    .map_or("the default consensus (2)".to_string(), |q| {
                        locate::field_at(&self.text, &entry(&q.setting, &q.field, at.name))
                    });
                out.push(format!(
                    "{from}: `overlap: consensus` keeps entries that at least {k} tasks select, \
                     but only {taking_part} models (not `forget:` entries) are merged here, so \
                     nothing would be kept"
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
