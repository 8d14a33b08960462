//! sta's selection options (`normalize_importance`, `threshold`, `overlap: exclusive |
//! consensus`) against a reference restated here from docs/SEMANTICS.md ("sta's selection
//! options") with plain loops and a sort: fp32/fp16/bf16, single and sharded checkpoints, odd
//! sizes (1, 31, 4097, 3 × 1000), values on a coarse grid (heavy ties, also between tasks), the
//! recipe errors naming their fields, and the CUDA refusal before any work.

// Numeric loops index several parallel arrays at once, as the formulas do.
#![allow(clippy::needless_range_loop)]

mod common;

use std::collections::HashMap;

use common::scenario::{assert_matches, run_recipe, Loaded, Scenario};
use common::*;
use safetensors::Dtype;

const DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Norm {
    None,
    Mean,
    Max,
    Sum,
}

#[derive(Clone, Copy, Debug)]
enum Select {
    Density(f64),
    Threshold(f32),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Overlap {
    Sum,
    Exclusive,
    Consensus(usize),
}

#[derive(Clone, Debug)]
struct Cfg {
    tasks: Vec<(f32, Norm, Select)>,
    overlap: Overlap,
    lambda: f32,
}

fn norm_word(n: Norm) -> &'static str {
    match n {
        Norm::None => "none",
        Norm::Mean => "mean",
        Norm::Max => "max",
        Norm::Sum => "sum",
    }
}

fn recipe_text(cfg: &Cfg) -> String {
    let mut y = format!(
        "merge_method: sta\nbase_model: base\nparameters:\n  lambda: {}\n",
        cfg.lambda
    );
    match cfg.overlap {
        Overlap::Sum => {}
        Overlap::Exclusive => y += "  overlap: exclusive\n",
        Overlap::Consensus(k) => y += &format!("  overlap: consensus\n  consensus: {k}\n"),
    }
    y += "models:\n";
    for (t, (w, norm, sel)) in cfg.tasks.iter().enumerate() {
        y += &format!("  - model: task_{t}\n    gradients: grads_{t}\n    parameters:\n");
        y += &format!("      weight: {w}\n");
        if *norm != Norm::None {
            y += &format!("      normalize_importance: {}\n", norm_word(*norm));
        }
        match sel {
            Select::Density(d) => y += &format!("      density: {d}\n"),
            Select::Threshold(x) => y += &format!("      threshold: {x}\n"),
        }
    }
    y
}

/// Each task's normalised importance ŝ = s / c (0 where c ≤ 0) of one tensor, s = |θ · G|.
fn normalised(cfg: &Cfg, th: &[Vec<f32>], g: &[Vec<f32>]) -> Vec<Vec<f32>> {
    (0..cfg.tasks.len())
        .map(|t| {
            let s: Vec<f32> = th[t]
                .iter()
                .zip(&g[t])
                .map(|(a, b)| (a * b).abs())
                .collect();
            let c = match cfg.tasks[t].1 {
                Norm::None => return s,
                Norm::Mean => (det_sum(&s) / s.len() as f64) as f32,
                Norm::Sum => det_sum(&s) as f32,
                Norm::Max => s.iter().cloned().fold(0f32, f32::max),
            };
            s.iter()
                .map(|&v| if c > 0.0 { v / c } else { 0.0 })
                .collect()
        })
        .collect()
}

/// Each task's own selection, then the overlap rule.
fn masks(cfg: &Cfg, shat: &[Vec<f32>]) -> (Vec<Vec<bool>>, Vec<Vec<bool>>) {
    let nt = cfg.tasks.len();
    let n = shat[0].len();
    let own: Vec<Vec<bool>> = (0..nt)
        .map(|t| match cfg.tasks[t].2 {
            Select::Density(d) => topk_mask(&shat[t], k_of(d, n)),
            Select::Threshold(x) => shat[t].iter().map(|&v| v >= x).collect(),
        })
        .collect();
    let mut m = own.clone();
    match cfg.overlap {
        Overlap::Sum => {}
        Overlap::Consensus(k) => {
            for i in 0..n {
                let c = (0..nt).filter(|&t| m[t][i]).count();
                if c < k {
                    (0..nt).for_each(|t| m[t][i] = false);
                }
            }
        }
        Overlap::Exclusive => {
            for i in 0..n {
                let mut best: Option<usize> = None;
                for t in 0..nt {
                    if m[t][i] && best.is_none_or(|b| shat[t][i] > shat[b][i]) {
                        best = Some(t);
                    }
                }
                (0..nt).for_each(|t| m[t][i] = best == Some(t));
            }
        }
    }
    (own, m)
}

fn count(m: &[bool]) -> u64 {
    m.iter().filter(|&&x| x).count() as u64
}

/// The expected values of each merged tensor, each task's kept count per tensor, and per task
/// (entries its own selection took, entries it ranked).
type Expected = (
    HashMap<String, Vec<f32>>,
    HashMap<String, Vec<u64>>,
    Vec<(u64, u64)>,
);

fn reference(cfg: &Cfg, l: &Loaded) -> Expected {
    let nt = cfg.tasks.len();
    let (mut out, mut kept) = (HashMap::new(), HashMap::new());
    let mut selected = vec![(0u64, 0u64); nt];
    for (name, bt) in &l.base {
        if !l.models[0].contains_key(name) || bt.dtype == Dtype::I64 {
            continue;
        }
        let b = bt.values();
        let th: Vec<Vec<f32>> = l.models.iter().map(|m| m[name].values()).collect();
        let g: Vec<Vec<f32>> = l.grads.iter().map(|m| m[name].values()).collect();
        let (own, m) = masks(cfg, &normalised(cfg, &th, &g));
        for t in 0..nt {
            selected[t].0 += count(&own[t]);
            selected[t].1 += b.len() as u64;
        }
        let v = (0..b.len())
            .map(|i| {
                let mut acc = 0f32;
                for t in 0..nt {
                    if m[t][i] {
                        acc += cfg.tasks[t].0 * (th[t][i] - b[i]);
                    }
                }
                b[i] + cfg.lambda * acc
            })
            .collect();
        out.insert(name.clone(), v);
        kept.insert(name.clone(), m.iter().map(|mt| count(mt)).collect());
    }
    (out, kept, selected)
}

fn check(s: &Scenario, cfg: &Cfg) {
    let text = recipe_text(cfg);
    let l = s.load();
    let (expected, kept, selected) = reference(cfg, &l);
    let out = s.path("out");
    let rep = run_recipe(s.dir.path(), &text, &out, None).unwrap_or_else(|e| panic!("{text}\n{e}"));
    assert_matches(&out, &expected, &l, None);
    for tr in rep.tensors.iter().filter(|t| t.action == "merge") {
        let got: Vec<u64> = tr.tasks.iter().map(|t| t.kept).collect();
        assert_eq!(got, kept[&tr.name], "kept per task in {}\n{text}", tr.name);
    }
    // The density each threshold produced (before the overlap rule), for those tasks only.
    let want: Vec<(usize, u64, u64)> = (0..cfg.tasks.len())
        .filter(|&t| matches!(cfg.tasks[t].2, Select::Threshold(_)))
        .map(|t| (t, selected[t].0, selected[t].1))
        .collect();
    let got: Vec<(usize, u64, u64)> = rep
        .threshold_density
        .iter()
        .map(|r| (r.task, r.selected, r.total))
        .collect();
    assert_eq!(got, want, "{text}");
}

/// Each dtype, single files with random values and three shards with grid values (ties).
fn scenarios(seed: u64) -> impl Iterator<Item = Scenario> {
    DTYPES.into_iter().flat_map(move |dt| {
        [(1, false), (3, true)]
            .into_iter()
            .map(move |(shards, grid)| Scenario::new(dt, 3, shards, grid, seed + shards as u64))
    })
}

fn cfg(tasks: [(Norm, Select); 3], overlap: Overlap) -> Cfg {
    Cfg {
        tasks: tasks
            .iter()
            .zip([1.0, 0.5, 0.75])
            .map(|(&(n, s), w)| (w, n, s))
            .collect(),
        overlap,
        lambda: 0.9,
    }
}

#[test]
fn normalised_density_selection_matches_reference() {
    use Select::Density as D;
    for s in scenarios(10) {
        let c = cfg(
            [
                (Norm::Mean, D(0.3)),
                (Norm::Max, D(0.5)),
                (Norm::Sum, D(0.2)),
            ],
            Overlap::Sum,
        );
        check(&s, &c);
    }
}

#[test]
fn thresholds_match_reference() {
    use Select::Threshold as X;
    for s in scenarios(20) {
        // Around the mean (≈ half kept), a fraction of the max, the raw score, and 0 (all).
        let c = cfg(
            [
                (Norm::Mean, X(1.0)),
                (Norm::Max, X(0.25)),
                (Norm::None, X(0.01)),
            ],
            Overlap::Sum,
        );
        check(&s, &c);
        let c = cfg(
            [
                (Norm::Sum, X(1e-4)),
                (Norm::Mean, X(0.0)),
                (Norm::Max, X(1.0)),
            ],
            Overlap::Sum,
        );
        check(&s, &c);
    }
}

#[test]
fn exclusive_masks_match_reference_and_are_disjoint() {
    use Select::{Density as D, Threshold as X};
    for s in scenarios(30) {
        let c = cfg(
            [
                (Norm::Max, D(0.5)),
                (Norm::Max, X(0.1)),
                (Norm::Max, D(0.3)),
            ],
            Overlap::Exclusive,
        );
        check(&s, &c);
        // Every task selecting everything: a partition by the largest ŝ (raw scores here).
        let c = cfg(
            [
                (Norm::None, D(1.0)),
                (Norm::Mean, D(1.0)),
                (Norm::None, D(0.4)),
            ],
            Overlap::Exclusive,
        );
        check(&s, &c);
    }
}

#[test]
fn consensus_masks_match_reference() {
    use Select::{Density as D, Threshold as X};
    for s in scenarios(40) {
        for k in [1, 2, 3] {
            let c = cfg(
                [
                    (Norm::Mean, D(0.5)),
                    (Norm::None, D(0.6)),
                    (Norm::Mean, X(0.8)),
                ],
                Overlap::Consensus(k),
            );
            check(&s, &c);
        }
    }
}

/// Setting the defaults by name changes no byte of the output.
#[test]
fn default_options_written_out_change_nothing() {
    let s = Scenario::new(Dtype::BF16, 3, 1, true, 50);
    let plain = "merge_method: sta\nbase_model: base\nparameters:\n  density: 0.3\nmodels:\n  \
                 - model: task_0\n    gradients: grads_0\n  - model: task_1\n    gradients: \
                 grads_1\n";
    let named = plain.replace(
        "  density: 0.3\n",
        "  density: 0.3\n  overlap: sum\n  consensus: 2\n  normalize_importance: none\n",
    );
    run_recipe(s.dir.path(), plain, &s.path("a"), None).unwrap();
    run_recipe(s.dir.path(), &named, &s.path("b"), None).unwrap();
    // The model card lists the parameters the recipe names; the tensors are what must agree.
    let tensors = |d: &str| {
        tree_bytes(&s.path(d))
            .into_iter()
            .filter(|(p, _)| p.extension().is_some_and(|e| e == "safetensors"))
            .map(|(p, b)| (p.file_name().unwrap().to_owned(), b))
            .collect::<Vec<_>>()
    };
    assert!(!tensors("a").is_empty());
    assert_eq!(tensors("a"), tensors("b"));
}

// ---------------------------------------------------------------------------------------------
// Recipe errors and the CUDA refusal.

/// Parses a recipe over a scenario's folders (base, task_i, grads_i): `m{i}` is task i with
/// its gradients on the next line.
fn parse(text: &str) -> Result<stamerge::Recipe, Vec<String>> {
    let s = Scenario::new(Dtype::F32, 3, 1, false, 3);
    let text = text.replace("base_model: b\n", "base_model: base\n");
    let text = (0..3).fold(text, |y, t| {
        y.replace(
            &format!("- model: m{t}\n"),
            &format!("- model: task_{t}\n    gradients: grads_{t}\n"),
        )
    });
    stamerge::Recipe::parse(&text, s.dir.path())
        .map_err(|ps| ps.into_iter().map(|p| p.to_string()).collect())
}

#[test]
fn option_misuse_is_a_recipe_error_naming_the_fields() {
    let head = "merge_method: sta\nbase_model: b\n";
    // Both a density and a threshold (the density from the top level).
    let ps = parse(&format!(
        "{head}parameters:\n  density: 0.3\nmodels:\n  - model: m0\n    parameters:\n      \
         threshold: 0.5\n  - model: m1\n"
    ))
    .unwrap_err();
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert!(
        ps[0].contains("`models[0].parameters.threshold` (line 9)")
            && ps[0].contains("`parameters.density` (line 4)")
            && ps[0].contains("one of them"),
        "{ps:?}"
    );
    // A threshold or a normalisation other than the mean with `selection: model`.
    let ps = parse(&format!(
        "{head}parameters:\n  selection: model\nmodels:\n  - model: m0\n    parameters:\n      \
         threshold: 0.5\n  - model: m1\n    parameters:\n      density: 0.2\n      \
         normalize_importance: max\n  - model: m2\n    parameters:\n      density: 0.2\n      \
         normalize_importance: mean\n"
    ))
    .unwrap_err();
    assert_eq!(ps.len(), 2, "{ps:?}");
    assert!(
        ps[0].contains("`models[0].parameters.threshold` (line 9)")
            && ps[0].contains("selection: model"),
        "{ps:?}"
    );
    assert!(
        ps[1].contains("`models[1].parameters.normalize_importance` (line 14)")
            && ps[1].contains("normalize_importance: max"),
        "{ps:?}"
    );
    // A consensus more tasks than the merge has; the default k = 2 with one model.
    let ps = parse(&format!(
        "{head}parameters:\n  overlap: consensus\n  consensus: 3\n  density: 0.5\nmodels:\n  \
         - model: m0\n  - model: m1\n"
    ))
    .unwrap_err();
    assert!(
        ps.len() == 1 && ps[0].contains("`parameters.consensus` (line 5)"),
        "{ps:?}"
    );
    let ps = parse(&format!(
        "{head}parameters:\n  overlap: consensus\nmodels:\n  - model: m0\n"
    ))
    .unwrap_err();
    assert!(
        ps.len() == 1 && ps[0].contains("the default consensus (2)"),
        "{ps:?}"
    );
    // Values out of range, and a word the option does not know.
    let ps = parse(&format!(
        "{head}parameters:\n  overlap: disjoint\n  consensus: 0\nmodels:\n  - model: m0\n    \
         parameters:\n      threshold: -1\n      normalize_importance: l2\n"
    ))
    .unwrap_err();
    for want in [
        "`parameters.overlap` (line 4)",
        "`parameters.consensus` (line 5)",
        "`models[0].parameters.threshold` (line 10)",
        "`models[0].parameters.normalize_importance` (line 11)",
    ] {
        assert!(ps.iter().any(|p| p.contains(want)), "{want} in {ps:?}");
    }
    // The same options are fine alone.
    assert!(parse(&format!(
        "{head}parameters:\n  overlap: consensus\n  consensus: 2\n  normalize_importance: max\n  \
         threshold: 0.5\nmodels:\n  - model: m0\n  - model: m1\n"
    ))
    .is_ok());
}

/// Every option runs on the GPU too (tests/gpu/sta_options.rs compares the bytes there): the
/// plan asks nothing the CUDA kernels lack.
#[test]
fn no_option_is_refused_on_cuda() {
    let s = Scenario::new(Dtype::F32, 2, 1, false, 7);
    let models = "models:\n  - model: task_0\n    gradients: grads_0\n  - model: task_1\n    \
                  gradients: grads_1\n";
    for params in [
        "  density: 0.5\n  normalize_importance: max\n",
        "  threshold: 0.5\n",
        "  density: 0.5\n  overlap: exclusive\n",
        "  density: 0.5\n  overlap: consensus\n",
    ] {
        let text = format!("merge_method: sta\nbase_model: base\nparameters:\n{params}{models}");
        std::fs::write(s.path("r.yml"), &text).unwrap();
        let recipe = stamerge::Recipe::from_file(&s.path("r.yml")).unwrap();
        let plan = stamerge::plan(&recipe, None, &Default::default()).unwrap();
        assert_eq!(stamerge::cuda_lacks(&plan), None, "{text}");
    }
}

/// `stamerge plan` shows a threshold where it selects, and no `density 1` beside it (density's
/// default would say every entry is kept); a recipe with a density still shows it.
#[test]
fn plan_shows_the_threshold_not_density_s_default() {
    let ex = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let dir = tempfile::tempdir().unwrap();
    let recipe = |select: &str| {
        format!(
            "merge_method: sta\nbase_model: {b}\nparameters:\n  normalize_importance: mean\n  \
             {select}\nmodels:\n  - model: {t}\n    gradients: {g}\n",
            b = ex.join("base").display(),
            t = ex.join("task_0").display(),
            g = ex.join("grads_0").display(),
        )
    };
    let plan = |text: &str| {
        let p = dir.path().join("r.yml");
        std::fs::write(&p, text).unwrap();
        let o = std::process::Command::new(stamerge_bin())
            .arg("plan")
            .arg(&p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let t = plan(&recipe("threshold: 2.0"));
    assert!(
        t.contains("threshold 2") && t.contains("threshold=2"),
        "{t}"
    );
    assert!(!t.contains("density"), "{t}");
    let d = plan(&recipe("density: 0.3"));
    assert!(
        d.contains("density 0.3") && d.contains("density=0.3"),
        "{d}"
    );
}
