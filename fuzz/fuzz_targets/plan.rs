//! The plan and the report built from it, over the bundled example models. The first byte picks
//! the mode: even, the rest is a recipe over the examples; odd, the rest is a safetensors image
//! used as a third task next to the examples (hostile shapes, dtypes and names against a real
//! base), planned with a fixed recipe per method.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use stamerge::report::{overlaps, InputRecord};
use stamerge::{Options, Recipe};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("stamerge-fuzz-plan-{}", std::process::id()));
        std::fs::create_dir_all(d.join("evil")).unwrap();
        d
    })
}

const METHODS: &[&str] = &[
    "task_arithmetic",
    "ties",
    "magnitude",
    "dare_linear",
    "dare_ties",
    "sta",
];

fn check(recipe: &Recipe) {
    let Ok(plan) = stamerge::plan(recipe, None, &Options::default()) else {
        return;
    };
    let nt = plan.recipe.tasks.len();
    let mut inputs = vec![InputRecord::of("base", &plan.inputs.base)];
    for t in &plan.inputs.tasks {
        inputs.push(InputRecord::of("model", &t.model));
    }
    let mut write = 0u64;
    for item in &plan.items {
        write += item.out.nbytes;
        let combos = vec![1u64; if nt <= 8 { 1 << nt } else { 0 }];
        let o = overlaps(&combos, nt);
        assert!(combos.is_empty() || o.len() == nt * (nt - 1) / 2);
    }
    assert_eq!(write, plan.estimate.write_bytes);
    let _ = serde_json::to_vec(&inputs).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let ex = examples();
    if mode % 2 == 0 {
        if let Ok(text) = std::str::from_utf8(rest) {
            if let Ok(r) = Recipe::parse(text, &ex) {
                check(&r);
            }
        }
        return;
    }
    let d = scratch();
    std::fs::write(d.join("evil/model.safetensors"), rest).unwrap();
    let method = METHODS[(mode as usize / 2) % METHODS.len()];
    let grads = if method == "sta" {
        "\n    gradients: GRADS"
    } else {
        ""
    };
    let text = format!(
        "merge_method: {method}\nbase_model: {b}\nparameters:\n  density: 0.5\nmodels:\n  - model: {t0}{g0}\n  - model: {evil}{g1}\n",
        b = ex.join("base").display(),
        t0 = ex.join("task_0").display(),
        evil = d.join("evil").display(),
        g0 = grads.replace("GRADS", &ex.join("grads_0").display().to_string()),
        g1 = grads.replace("GRADS", &ex.join("grads_1").display().to_string()),
    );
    let r = Recipe::parse(&text, d).expect("fixed recipe");
    check(&r);
});
