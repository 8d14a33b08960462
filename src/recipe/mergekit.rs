//! mergekit's vocabulary that stamerge does not implement (yet): merge methods, method
//! parameters and recipe keys. A recipe that uses one is refused naming the feature, before the
//! typed parse, whose "unknown field `t`" would blame the spelling instead. Every such use is
//! reported at once, each with the recipe field it is in.

use serde_yaml_ng::Value;

use crate::error::Problem;
use crate::method::MethodKind;

/// mergekit 0.1.5's methods that stamerge lacks.
const METHODS: &[&str] = &[
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "sce",
    "ram",
];

/// Parameters of those methods, with the methods that take them.
const PARAMETERS: &[(&str, &str)] = &[
    ("epsilon", "della and della_linear"),
    ("gamma", "breadcrumbs and breadcrumbs_ties"),
    ("select_topk", "sce"),
];

/// Top-level recipe keys of mergekit that stamerge does not read.
const KEYS: &[(&str, &str)] = &[(
    "modules",
    "per-module recipes (several stacks of layers, e.g. a vision tower beside the language \
     model); `models:` and `slices:` are supported",
)];

/// One problem per mergekit feature the recipe uses that stamerge does not support.
pub fn unsupported(recipe: &Value) -> Vec<Problem> {
    let mut out = Vec::new();
    let Value::Mapping(top) = recipe else {
        return out;
    };
    if let Some(Value::String(m)) = top.get("merge_method") {
        if MethodKind::parse(m).is_none() && METHODS.contains(&m.as_str()) {
            out.push(Problem::new(format!(
                "unknown merge_method `{m}`: a mergekit method that stamerge does not support \
                 yet; supported: {}",
                MethodKind::ALL.map(|k| k.name()).join(", ")
            )));
        }
    }
    for (key, what) in KEYS {
        if top.contains_key(*key) {
            out.push(Problem::new(format!(
                "`{key}:` (mergekit's {what}) is not supported yet"
            )));
        }
    }
    params(top.get("parameters"), "parameters", &mut out);
    for list in ["models", "forget"] {
        if let Some(Value::Sequence(entries)) = top.get(list) {
            for (i, e) in entries.iter().enumerate() {
                params(
                    e.get("parameters"),
                    &format!("{list}[{i}].parameters"),
                    &mut out,
                );
            }
        }
    }
    if let Some(Value::Sequence(slices)) = top.get("slices") {
        for (i, s) in slices.iter().enumerate() {
            params(
                s.get("parameters"),
                &format!("slices[{i}].parameters"),
                &mut out,
            );
            if let Some(Value::Sequence(sources)) = s.get("sources") {
                for (j, src) in sources.iter().enumerate() {
                    params(
                        src.get("parameters"),
                        &format!("slices[{i}].sources[{j}].parameters"),
                        &mut out,
                    );
                }
            }
        }
    }
    out
}

fn params(p: Option<&Value>, field: &str, out: &mut Vec<Problem>) {
    let Some(Value::Mapping(p)) = p else {
        return;
    };
    for (name, methods) in PARAMETERS {
        if p.contains_key(*name) {
            out.push(Problem::new(format!(
                "`{field}.{name}` is a parameter of mergekit's {methods}, which stamerge does not \
                 support yet"
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<String> {
        let v: Value = serde_yaml_ng::from_str(yaml).unwrap();
        unsupported(&v).into_iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn names_each_unsupported_feature_with_its_field() {
        let ps = problems(
            "merge_method: della\nbase_model: b\nmodules: {}\nparameters:\n  epsilon: 0.1\n\
             models:\n  - model: a\n  - model: c\n    parameters:\n      select_topk: 0.5\n\
             slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n\
             \x20       parameters: {gamma: 0.1}\n",
        );
        assert_eq!(ps.len(), 5, "{ps:?}");
        assert!(
            ps[0].contains("merge_method `della`") && ps[0].contains("ties"),
            "{ps:?}"
        );
        assert!(ps[1].contains("`modules:`"), "{ps:?}");
        assert!(
            ps[2].contains("`parameters.epsilon`") && ps[2].contains("della"),
            "{ps:?}"
        );
        assert!(
            ps[3].contains("`models[1].parameters.select_topk`") && ps[3].contains("sce"),
            "{ps:?}"
        );
        assert!(
            ps[4].contains("`slices[0].sources[0].parameters.gamma`"),
            "{ps:?}"
        );
    }

    #[test]
    fn supported_recipes_and_typos_are_left_to_the_typed_parse() {
        assert!(problems("merge_method: ties\nparameters:\n  density: [0.5, 0.1]\n").is_empty());
        assert!(
            problems("merge_method: passthrough\nslices: []\ntokenizer_source: base\n").is_empty()
        );
        assert!(problems("merge_method: tiess\nparameters:\n  densty: 0.5\n").is_empty());
    }
}
