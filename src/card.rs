//! The output's model card: a `README.md` in the Hugging Face layout (YAML front matter, then
//! Markdown), shaped like the one mergekit 0.1.5 writes (`mergekit/card.py`), so that a merged
//! folder pushed to the Hub shows where it came from: the method, the models and their
//! parameters, the stamerge version and the recipe.

use std::fmt::Write;
use std::path::{Component, Path};

use crate::error::{IoContext, Result};
use crate::method::MethodKind;
use crate::Plan;

pub const CARD_NAME: &str = "README.md";

/// The method's name as people write it, with its paper where there is one (mergekit's names and
/// links for the methods both have).
fn method_md(m: MethodKind) -> String {
    let (name, url) = match m {
        MethodKind::TaskArithmetic => ("Task Arithmetic", Some("https://arxiv.org/abs/2212.04089")),
        MethodKind::Ties => ("TIES", Some("https://arxiv.org/abs/2306.01708")),
        MethodKind::DareTies => ("DARE TIES", Some("https://arxiv.org/abs/2311.03099")),
        MethodKind::DareLinear => ("Linear DARE", Some("https://arxiv.org/abs/2311.03099")),
        MethodKind::Magnitude => ("Magnitude (top-k task-vector entries)", None),
        MethodKind::Sta => ("Selective Task Arithmetic (STA)", None),
        MethodKind::Passthrough => ("Passthrough", None),
        MethodKind::Breadcrumbs => (
            "Model Breadcrumbs",
            Some("https://arxiv.org/abs/2312.06795"),
        ),
        MethodKind::BreadcrumbsTies => (
            "Model Breadcrumbs with TIES",
            Some("https://arxiv.org/abs/2312.06795"),
        ),
        MethodKind::Della => ("DELLA", Some("https://arxiv.org/abs/2406.11617")),
        MethodKind::DellaLinear => ("Linear DELLA", Some("https://arxiv.org/abs/2406.11617")),
        MethodKind::Sce => ("SCE", Some("https://arxiv.org/abs/2408.07990")),
        MethodKind::Ram => (
            "Reinforced Agent Merging",
            Some("https://arxiv.org/abs/2601.13572"),
        ),
        MethodKind::Fisher => ("Fisher merging", Some("https://arxiv.org/abs/2111.09832")),
        MethodKind::RamplusTl => (
            "Reinforced Agent Merging Plus (Tensor-Local)",
            Some("https://arxiv.org/abs/2601.13572"),
        ),
        MethodKind::Linear => ("Linear", Some("https://arxiv.org/abs/2203.05482")),
        MethodKind::Slerp => ("SLERP", Some("https://en.wikipedia.org/wiki/Slerp")),
        MethodKind::Nuslerp => ("NuSLERP", None),
        MethodKind::Multislerp => (
            "Multi-SLERP",
            Some("https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
        ),
        MethodKind::Karcher => ("Karcher Mean", Some("https://arxiv.org/abs/2603.04972")),
        MethodKind::ModelStock => ("Model Stock", Some("https://arxiv.org/abs/2403.19522")),
        MethodKind::Nearswap => (
            "NearSwap",
            Some("https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
        ),
        MethodKind::ArceeFusion => ("Arcee Fusion", Some("https://arcee.ai")),
    };
    match url {
        Some(u) => format!("[{name}]({u})"),
        None => name.to_string(),
    }
}

/// A model as the card names it: its Hub id when the folder is a Hugging Face cache snapshot
/// (`…/models--ORG--NAME/snapshots/REV`), else the path as the recipe spells it (relative to
/// the recipe's folder).
fn model_name(path: &Path, recipe_dir: &Path) -> String {
    let comps: Vec<_> = path.components().collect();
    if comps.len() >= 3 {
        let (repo, snaps) = (comps[comps.len() - 3], comps[comps.len() - 2]);
        if let (Component::Normal(repo), Component::Normal(snaps)) = (repo, snaps) {
            if snaps == "snapshots" {
                if let Some(id) = repo.to_str().and_then(|r| r.strip_prefix("models--")) {
                    return id.replacen("--", "/", 1);
                }
            }
        }
    }
    let shown = path.strip_prefix(recipe_dir).unwrap_or(path);
    let shown = shown.strip_prefix(".").unwrap_or(shown);
    shown.display().to_string()
}

/// The card's text for a merge of `plan` into a folder called `name`.
pub fn render(plan: &Plan, name: &str) -> String {
    let r = &plan.recipe;
    let dir = r
        .path
        .as_deref()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let base = model_name(&r.base, dir);
    // Without a base, `base` is the first model, listed with the others.
    let mut models = if r.baseless {
        vec![]
    } else {
        vec![base.clone()]
    };
    models.extend(r.start.iter().map(|s| model_name(s, dir)));
    models.extend(r.tasks.iter().map(|t| model_name(&t.model, dir)));

    let mut meta = serde_yaml_ng::Mapping::new();
    meta.insert("base_model".into(), models.into());
    // transformers writes these into every config.json it saves.
    let transformers = plan.inputs.base.config.as_ref().is_some_and(|c| {
        ["architectures", "model_type", "transformers_version"]
            .iter()
            .any(|k| c.get(k).is_some())
    });
    if transformers {
        meta.insert("library_name".into(), "transformers".into());
    }
    meta.insert("tags".into(), vec!["merge", "stamerge"].into());
    let meta = serde_yaml_ng::to_string(&meta).expect("a YAML mapping of strings");

    let mut s = format!("---\n{meta}---\n# {name}\n\n");
    let _ = writeln!(
        s,
        "This is a merge of pre-trained language models created with \
         [stamerge](https://crates.io/crates/stamerge) {}.\n",
        crate::VERSION
    );
    let _ = writeln!(s, "## Merge Details\n### Merge Method\n");
    let _ = write!(
        s,
        "This model was merged using the {} merge method",
        method_md(r.method)
    );
    // As mergekit's card: slerp's base is one end of the path, not a base.
    if !r.baseless && r.method != MethodKind::Slerp {
        let _ = write!(s, " using `{base}` as a base");
    }
    if let Some(st) = &r.start {
        let _ = write!(s, ", added to `{}`", model_name(st, dir));
    }
    let _ = writeln!(s, ".\n");

    let md = |ps: Vec<(&str, String)>| -> Vec<String> {
        ps.into_iter().map(|(n, v)| format!("{n} {v}")).collect()
    };
    let per_task = |i: usize| {
        let t = &r.tasks[i];
        let mut p = md(r.task_parameters(i));
        if let Some(g) = &t.gradients {
            p.push(format!("gradients `{}`", model_name(g, dir)));
        }
        if p.is_empty() {
            p.push("default parameters".into());
        }
        format!("* `{}` ({})\n", model_name(&t.model, dir), p.join(", "))
    };
    let _ = writeln!(
        s,
        "### Models Merged\n\nThe following models were included in the merge:"
    );
    for i in (0..r.tasks.len()).filter(|&i| !r.tasks[i].forget) {
        s += &per_task(i);
    }
    if r.tasks.iter().any(|t| t.forget) {
        let _ = writeln!(
            s,
            "\nThe task vectors of the following models were subtracted (`forget`):"
        );
        for i in (0..r.tasks.len()).filter(|&i| r.tasks[i].forget) {
            s += &per_task(i);
        }
    }

    let mut global = md(r.shared_parameters());
    if r.method.is_dare() {
        global.push(format!("seed {}", r.seed));
    }
    match (r.out_dtype, r.dtype) {
        (Some(d), _) | (None, Some(d)) => global.push(format!("output dtype {}", d.torch_name())),
        (None, None) => global.push("output dtype: each base tensor's own".into()),
    }
    let _ = writeln!(s, "\n### Parameters\n\n{}.\n", global.join(", "));

    let _ = writeln!(
        s,
        "### Configuration\n\nThe following YAML configuration was used to produce this model:\n"
    );
    let _ = writeln!(s, "```yaml\n{}\n```", r.text.trim_end());
    let _ = writeln!(
        s,
        "\nPer-tensor statistics (entries kept per task, thresholds, mask overlaps) are in \
         `{}`.",
        crate::REPORT_NAME
    );
    s
}

/// Writes the card into the output folder being built (`dir`), named for the final folder.
pub fn write(plan: &Plan, dir: &Path, target: &Path) -> Result<()> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged model".into());
    std::fs::write(dir.join(CARD_NAME), render(plan, &name))
        .ctx(|| format!("writing the model card {CARD_NAME}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_come_from_cache_snapshots_and_paths_from_the_recipe() {
        let snap = Path::new("/h/hub/models--meta-llama--Llama-3.1-8B/snapshots/abc123");
        assert_eq!(model_name(snap, Path::new("/r")), "meta-llama/Llama-3.1-8B");
        assert_eq!(
            model_name(Path::new("/r/task_0"), Path::new("/r")),
            "task_0"
        );
        assert_eq!(model_name(Path::new("./base"), Path::new(".")), "base");
        assert_eq!(
            model_name(Path::new("/elsewhere/m"), Path::new("/r")),
            "/elsewhere/m"
        );
    }
}
