//! mergekit's vocabulary that stamerge does not implement (yet): since every merge method of
//! mergekit 0.1.5 and its parameters are implemented, only recipe keys. A recipe that uses one is
//! refused naming the feature, before the typed parse, whose "unknown field" would blame the
//! spelling instead. Every such use is reported at once, each with the recipe field it is in.

use serde_yaml_ng::Value;

use crate::error::Problem;

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
    for (key, what) in KEYS {
        if top.contains_key(*key) {
            out.push(Problem::new(format!(
                "`{key}:` (mergekit's {what}) is not supported yet"
            )));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::MethodKind;

    fn problems(yaml: &str) -> Vec<String> {
        let v: Value = serde_yaml_ng::from_str(yaml).unwrap();
        unsupported(&v).into_iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn names_each_unsupported_key() {
        let ps =
            problems("merge_method: ties\nbase_model: b\nmodules: {}\nmodels:\n  - model: a\n");
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert!(ps[0].contains("`modules:`"), "{ps:?}");
    }

    /// mergekit 0.1.5's registry (merge_methods/registry.py and the modules it registers):
    /// every name parses, so no recipe needs this module's method list any more.
    #[test]
    fn every_mergekit_method_is_a_stamerge_method() {
        for m in [
            "linear",
            "slerp",
            "nuslerp",
            "multislerp",
            "karcher",
            "task_arithmetic",
            "ties",
            "dare_ties",
            "dare_linear",
            "breadcrumbs",
            "breadcrumbs_ties",
            "della",
            "della_linear",
            "model_stock",
            "sce",
            "nearswap",
            "arcee_fusion",
            "passthrough",
            "ram",
            "ramplus_tl",
        ] {
            assert!(MethodKind::parse(m).is_some(), "{m}");
        }
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
