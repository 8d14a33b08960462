//! `stamerge plan`'s printout: the recipe's settings as it spells them, then per tensor its
//! action, layer and the parameter values it resolved to, so that a user can check filters and
//! per-layer gradients before merging.

use std::fmt::Write;

use super::{CopyFrom, ItemKind, Plan};
use crate::inspect::human_bytes;
use crate::recipe::{params, Recipe, Scope, Setting, Value};

/// A setting as the recipe writes it: `0.5`, `[1, 0.7, 0.1]`, `[mlp: 0.5, *: 0]`.
pub fn spell(s: &Setting) -> String {
    let list = |vs: &[Value]| {
        format!(
            "[{}]",
            vs.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    match s {
        Setting::Scalar(v) => v.to_string(),
        Setting::Gradient(vs) => list(vs),
        Setting::Filters(cs) => format!(
            "[{}]",
            cs.iter()
                .map(|c| format!(
                    "{}: {}",
                    c.filter.as_deref().unwrap_or("*"),
                    spell(&c.value)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The parameters shown per tensor: those the method reads that the recipe sets somewhere, and
/// weight and density, which every reader of a merge looks for (density's default not where
/// sta's `threshold` replaces it).
fn shown(recipe: &Recipe) -> Vec<&'static params::ParamSpec> {
    let set = |name: &str| recipe.scopes().any(|s| s.get(name).is_some());
    params::of(recipe.method)
        .filter(|p| {
            p.per_tensor
                && (p.name == "weight" || (p.name == "density" && !set("threshold")) || set(p.name))
        })
        .collect()
}

fn task_lines(out: &mut String, r: &Recipe) {
    // The base's own values where the method weighs it as an input (linear).
    let base_own: Vec<String> = params::of(r.method)
        .filter(|p| p.scope == Scope::Input && p.name != "scale" && !r.sliced())
        .filter_map(|p| {
            let v = match r.base_params.get(p.name).or(r.params.get(p.name)) {
                Some(q) => spell(&q.setting),
                None => (p.default)(r.method)?.to_string(),
            };
            Some(format!("  {} {v}", p.name))
        })
        .collect();
    if !r.baseless && r.order.contains(&crate::recipe::InputRef::Base) && !base_own.is_empty() {
        let _ = writeln!(out, "  base {}{}", r.base.display(), base_own.concat());
    }
    for (i, t) in r.tasks.iter().enumerate() {
        let role = if t.forget {
            "forget"
        } else if r.method == crate::method::MethodKind::Passthrough {
            "input"
        } else {
            "model"
        };
        let mut line = format!("  {role}[{i}] {}", t.model.display());
        // In slices, a model's values are its sources' (the slice lines below).
        let own = params::of(r.method).filter(|p| p.scope != Scope::Shared && !r.sliced());
        for p in own {
            let own = t.params.get(p.name).or(r.params.get(p.name));
            let thresholded = t.params.get("threshold").or(r.params.get("threshold"));
            let v = match own {
                Some(q) => spell(&q.setting),
                // A threshold selects instead of density's default: showing `density 1` beside
                // it would say every entry is kept.
                None if p.name == "density" && thresholded.is_some() => continue,
                None => match (p.default)(r.method) {
                    Some(v) => v.to_string(),
                    None => continue,
                },
            };
            let _ = write!(line, "  {} {v}", p.name);
        }
        if let Some(g) = &t.gradients {
            let _ = write!(line, "  gradients {}", g.display());
        }
        let _ = writeln!(out, "{line}");
    }
    let shared: Vec<String> = r
        .params
        .0
        .iter()
        .filter(|p| p.spec.scope == Scope::Shared && (p.spec.methods)(r.method))
        .map(|p| format!("{} {}", p.spec.name, spell(&p.setting)))
        .collect();
    if !shared.is_empty() {
        let _ = writeln!(out, "  parameters: {}", shared.join("  "));
    }
    for s in &r.slices {
        let srcs: Vec<String> = s
            .sources
            .iter()
            .map(|src| {
                let who = match src.input {
                    crate::recipe::InputRef::Base => "base".to_string(),
                    crate::recipe::InputRef::Task(t) => format!(
                        "{}[{t}]",
                        if r.method == crate::method::MethodKind::Passthrough {
                            "input"
                        } else {
                            "model"
                        }
                    ),
                };
                let mut x = format!("{who} layers {}..{}", src.layers.0, src.layers.1);
                for p in &src.params.0 {
                    let _ = write!(x, " {} {}", p.spec.name, spell(&p.setting));
                }
                x
            })
            .collect();
        let mut line = format!(
            "  {}: {} layer(s) from {}",
            s.field,
            s.len(),
            srcs.join(", ")
        );
        for p in &s.params.0 {
            let _ = write!(line, "  {} {}", p.spec.name, spell(&p.setting));
        }
        let _ = writeln!(out, "{line}");
    }
}

/// The value columns of one tensor: `name=v` for shared parameters, `name=v0,v1` per task
/// (`-` where a task is not an input of the tensor).
fn values(plan: &Plan, shown: &[&params::ParamSpec], item: &super::Item) -> String {
    let p = &item.params;
    let mut cols = Vec::new();
    for spec in shown {
        let text = match spec.scope {
            Scope::Shared => match p.shared(spec.name) {
                Some(v) => v.to_string(),
                None => continue,
            },
            _ => {
                let mut vs: Vec<String> = Vec::new();
                if spec.scope == Scope::Input && p.base.is_some() {
                    vs.push(p.base(spec.name).map_or("-".into(), |v| v.to_string()));
                }
                vs.extend(
                    (0..plan.recipe.tasks.len())
                        .map(|t| p.task(t, spec.name).map_or("-".into(), |v| v.to_string())),
                );
                if vs.iter().all(|v| v == "-") {
                    continue;
                }
                vs.join(",")
            }
        };
        cols.push(format!("{}={text}", spec.name));
    }
    cols.join(" ")
}

/// The whole printout of `stamerge plan`.
pub fn render(plan: &Plan, max_memory: Option<u64>) -> String {
    let mut out = String::new();
    let r = &plan.recipe;
    let base = if r.baseless {
        format!("none ({}'s layout, config and tokenizer)", r.base.display())
    } else {
        r.base.display().to_string()
    };
    let _ = writeln!(
        out,
        "method: {}   tasks: {}   base: {base}",
        r.method.name(),
        r.tasks.len(),
    );
    task_lines(&mut out, r);
    for l in &plan.side.lines {
        let _ = writeln!(out, "{l}");
    }
    let shown = shown(r);
    let _ = writeln!(
        out,
        "{:60} {:>8} {:>16} {:>10} {:>12}  values",
        "tensor", "action", "shape", "layer", "k per task"
    );
    for it in &plan.items {
        let (action, ks) = match &it.kind {
            ItemKind::Copy {
                from,
                name,
                convert,
            } => {
                let src = match from {
                    CopyFrom::Base => "base".to_string(),
                    CopyFrom::Start => "start".to_string(),
                    CopyFrom::Task(t) => r.tasks[*t].field.clone(),
                };
                let mut a = if *name != it.name || !matches!(from, CopyFrom::Base) {
                    format!("← {src} {name}")
                } else {
                    String::new()
                };
                if let Some(c) = convert {
                    let _ = write!(a, " as {}", c.to.torch_name());
                    if let Some(s) = c.scale {
                        let _ = write!(a, " ×{s}");
                    }
                }
                ("copy", a)
            }
            ItemKind::Merge { work, .. } => (
                "merge",
                work.k()
                    .iter()
                    .map(|k| k.map(|k| k.to_string()).unwrap_or_else(|| "-".into()))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        };
        let layer = match it.slot.layer {
            Some((i, n)) => format!("{i}/{n} t={:.3}", it.slot.t),
            None => "-".into(),
        };
        let vals = match &it.kind {
            ItemKind::Merge { .. } => values(plan, &shown, it),
            ItemKind::Copy { .. } => String::new(),
        };
        let _ = writeln!(
            out,
            "{:60} {:>8} {:>16} {:>10} {:>12}  {vals}",
            it.name,
            action,
            format!("{:?}", it.shape),
            layer,
            ks
        );
    }
    let e = &plan.estimate;
    // `selection: model` runs one pass per radix digit, and the backends' digits differ.
    let cuda_digits = crate::backend::cuda::MODEL_DIGITS.len();
    let (cuda_passes, cuda_read) = (e.passes_with(cuda_digits), e.read_bytes_with(cuda_digits));
    let (passes, read) = if cuda_passes == e.passes {
        (e.passes.to_string(), human_bytes(e.read_bytes))
    } else {
        // With its keys on the GPU, the cuda backend reads the inputs in pass 1 and the merge.
        let kept_read = 2 * e.merge_read_bytes + e.copy_read_bytes;
        (
            format!(
                "{} (cpu) or {cuda_passes} (cuda; 2 with the keys on the GPU)",
                e.passes
            ),
            format!(
                "{} (cpu) or {} (cuda; {} with the keys on the GPU)",
                human_bytes(e.read_bytes),
                human_bytes(cuda_read),
                human_bytes(kept_read)
            ),
        )
    };
    let _ = writeln!(
        out,
        "{} tensors merged ({} parameters), {} copied; {passes} pass(es)",
        e.tensors_merged, e.params_merged, e.tensors_copied
    );
    let _ = writeln!(
        out,
        "read {read}, write {} in {} shard(s); estimated peak memory {} (largest tensor group)",
        human_bytes(e.write_bytes),
        plan.shards.len(),
        human_bytes(e.peak_bytes)
    );
    if e.tensors_merged == 0 {
        // passthrough: no GPU work.
        end(&mut out, plan);
        return out;
    }
    let groups = plan.items.iter().filter_map(|it| match &it.kind {
        ItemKind::Merge { work, .. } => Some((plan.group(it), work.shape_jobs(), &work.fuse)),
        ItemKind::Copy { .. } => None,
    });
    let (gpu, chunked) = crate::backend::cuda::plan_memory(groups, max_memory);
    match max_memory {
        Some(b) => {
            let _ = writeln!(
                out,
                "cuda: GPU memory budget {} (--max-memory; {} of it for the tensor being merged); \
                 the largest tensor group needs up to {} in one piece; {chunked} group(s) over the \
                 budget run in chunks",
                human_bytes(b),
                human_bytes(crate::backend::cuda::work_share(b)),
                human_bytes(gpu)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "cuda: GPU memory budget {:.0}% of the free memory (--max-memory sets it); the \
                 largest tensor group needs up to {} in one piece, larger groups run in chunks",
                crate::backend::cuda::DEFAULT_BUDGET_SHARE * 100.0,
                human_bytes(gpu)
            );
        }
    }
    if e.model_wide {
        model_link_line(&mut out, plan, max_memory);
    }
    end(&mut out, plan);
    out
}

/// What `selection: model` would move to the GPU for this plan (`plan_model_link` over its
/// merged tensors).
pub fn model_link(plan: &Plan) -> crate::backend::cuda::ModelLink {
    use crate::backend::cuda::{plan_model_link, MODEL_DIGITS};
    let tasks = crate::plan::work::model_wide_tasks(&plan.recipe);
    let groups = plan.items.iter().filter_map(|it| match &it.kind {
        ItemKind::Merge { work, .. } => Some((
            plan.group(it),
            tasks
                .iter()
                .filter_map(|&t| work.spec(t).map(|s| (t, s)))
                .collect(),
            work.shape_jobs(),
            &work.fuse,
        )),
        ItemKind::Copy { .. } => None,
    });
    plan_model_link(groups, MODEL_DIGITS.len())
}

/// `selection: model` on the GPU: where the keys live between the passes and what crosses the
/// link either way.
fn model_link_line(out: &mut String, plan: &Plan, max_memory: Option<u64>) {
    let m = model_link(plan);
    let inputs = plan.estimate.merge_read_bytes.max(1) as f64;
    let kept = format!(
        "the keys ({}) stay on the GPU between the passes, which with the merge move {} over \
         the link ({:.2}x the merged inputs)",
        human_bytes(m.key_bytes),
        human_bytes(m.kept),
        m.kept as f64 / inputs
    );
    let recomputed = format!(
        "every pass moves each tensor once for all tasks: {} with the merge ({:.2}x)",
        human_bytes(m.recomputed),
        m.recomputed as f64 / inputs
    );
    let line = match max_memory {
        Some(b) if m.budget_needed <= b => kept,
        Some(_) => format!(
            "the keys ({}) and the largest tensor's pass need {}, more than the budget: \
             {recomputed}",
            human_bytes(m.key_bytes),
            human_bytes(m.budget_needed)
        ),
        None => format!(
            "with a budget of at least {}, {kept}; with less, {recomputed}",
            human_bytes(m.budget_needed)
        ),
    };
    let _ = writeln!(out, "cuda, selection: model: {line}");
}

fn end(out: &mut String, plan: &Plan) {
    for n in &plan.notes {
        let _ = writeln!(out, "note: {n}");
    }
    for w in &plan.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let _ = writeln!(out, "ok: the merge would run");
}
