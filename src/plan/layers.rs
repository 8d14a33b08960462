//! Layers from tensor names, without architecture tables: the first `.N.` of a Hugging Face name
//! is its layer (mergekit's `RE_LAYER_INDEX = \.(\d+)\.`, also how mergekit infers an unknown
//! architecture), the text before it the stack the layer belongs to (`model.layers`,
//! `vision_model.encoder.layers`). The number of layers is config.json's (`num_hidden_layers` or
//! an alias) when the model has one stack, else the names'.

use std::collections::BTreeMap;

/// A tensor's layer: the stack (`model.layers`), the index, and where `.N.` sits in the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerName {
    pub stack: String,
    pub index: usize,
    /// Byte range of the digits in the name.
    pub digits: (usize, usize),
}

/// The first `.N.` of `name`.
pub fn layer_of(name: &str) -> Option<LayerName> {
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'.' {
            let start = i + 1;
            let mut j = start;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if j > start && j < b.len() && b[j] == b'.' {
                if let Ok(index) = name[start..j].parse() {
                    return Some(LayerName {
                        stack: name[..i].to_string(),
                        index,
                        digits: (start, j),
                    });
                }
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    None
}

/// `name` with its layer index replaced by `index`.
pub fn with_layer(name: &str, l: &LayerName, index: usize) -> String {
    format!("{}{index}{}", &name[..l.digits.0], &name[l.digits.1..])
}

/// mergekit's position of layer `index` of `count` for gradients: `index / (count − 1)`, and 1
/// for a single layer (`plan.py::plan_slice`). Tensors outside the layers take 0.
pub fn position(index: usize, count: usize) -> f64 {
    if count > 1 {
        index as f64 / (count - 1) as f64
    } else {
        1.0
    }
}

/// Whether a tensor outside the layers comes before them (embeddings) rather than after (final
/// norm, `lm_head`, classifier heads). mergekit's architecture files list embeddings, their
/// norms and position tables first and everything else last; `embed_out` is GPT-NeoX's head.
pub fn before_layers(name: &str) -> bool {
    (name.contains("embed") && !name.contains("embed_out"))
        || ["wte", "wpe", "pos_emb", "relative_pe", "position_ids"]
            .iter()
            .any(|p| name.contains(p))
}

/// config.json keys holding the number of layers, in the order they are looked for (the names
/// mergekit's architecture files use).
pub const COUNT_KEYS: &[&str] = &[
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "text_config.num_hidden_layers",
];

fn get<'a>(cfg: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    key.split('.').try_fold(cfg, |v, k| v.get(k))
}

/// The layer count in config.json, and its key.
pub fn config_count(cfg: &serde_json::Value) -> Option<(&'static str, usize)> {
    COUNT_KEYS.iter().find_map(|k| {
        get(cfg, k)
            .and_then(|v| v.as_u64())
            .map(|n| (*k, n as usize))
    })
}

/// The stacks of a model's tensor names and their layer counts (highest index + 1).
pub fn stacks<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for n in names {
        if let Some(l) = layer_of(n) {
            let c = out.entry(l.stack).or_insert(0);
            *c = (*c).max(l.index + 1);
        }
    }
    out
}

/// The layers of one model: its stacks, each with its count (config.json's when there is one
/// stack and the config says).
#[derive(Clone, Debug, Default)]
pub struct Layers {
    pub stacks: BTreeMap<String, usize>,
    /// The config key of the count, when config.json has one.
    pub key: Option<&'static str>,
}

impl Layers {
    /// From a model's names and config; `Err` when config.json's count and the names disagree.
    pub fn of<'a>(
        names: impl Iterator<Item = &'a str>,
        cfg: Option<&serde_json::Value>,
    ) -> Result<Self, String> {
        let stacks = stacks(names);
        let key = cfg.and_then(config_count);
        if let (Some((k, n)), 1) = (key, stacks.len()) {
            let (stack, m) = stacks.iter().next().expect("one stack");
            if *m != n {
                return Err(format!(
                    "config.json says `{k}: {n}`, the tensor names have layers 0 to {} of `{stack}`",
                    m - 1
                ));
            }
        }
        Ok(Self {
            stacks,
            key: key.map(|(k, _)| k),
        })
    }

    /// The single stack of layers (slices need one).
    pub fn single(&self) -> Option<(&str, usize)> {
        match self.stacks.len() {
            1 => self.stacks.iter().next().map(|(s, n)| (s.as_str(), *n)),
            _ => None,
        }
    }

    /// Layer count of `stack`.
    pub fn count(&self, stack: &str) -> usize {
        self.stacks.get(stack).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_as_mergekit_reads_them() {
        let l = layer_of("model.layers.12.mlp.experts.3.w1.weight").unwrap();
        assert_eq!((l.stack.as_str(), l.index), ("model.layers", 12));
        assert_eq!(
            with_layer("model.layers.12.mlp.experts.3.w1.weight", &l, 7),
            "model.layers.7.mlp.experts.3.w1.weight"
        );
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(layer_of("h.0"), None, "needs a dot after the digits");
        assert_eq!(layer_of("0.x"), None, "needs a dot before");
        assert_eq!(
            layer_of("layers.0.x").map(|l| l.stack),
            Some("layers".into())
        );
        assert_eq!(layer_of("a.b1.2.x").map(|l| l.index), Some(2));
        assert_eq!(position(0, 5), 0.0);
        assert_eq!(position(4, 5), 1.0);
        assert_eq!(position(0, 1), 1.0);
        assert!(before_layers("model.embed_tokens.weight"));
        assert!(before_layers("transformer.wte.weight"));
        assert!(!before_layers("gpt_neox.embed_out.weight"));
        assert!(!before_layers("model.norm.weight"));
        assert!(!before_layers("lm_head.weight"));
    }

    #[test]
    fn counts_come_from_config_or_names() {
        let names = ["model.layers.0.a", "model.layers.1.a", "model.norm.weight"];
        let cfg = serde_json::json!({"num_hidden_layers": 2});
        let l = Layers::of(names.iter().copied(), Some(&cfg)).unwrap();
        assert_eq!(
            (l.single(), l.key),
            (Some(("model.layers", 2)), Some("num_hidden_layers"))
        );
        let bad = serde_json::json!({"n_layer": 3});
        assert!(Layers::of(names.iter().copied(), Some(&bad))
            .unwrap_err()
            .contains("n_layer: 3"));
        let two = ["vision.layers.0.a", "model.layers.0.a", "model.layers.1.a"];
        let l = Layers::of(two.iter().copied(), Some(&cfg)).unwrap();
        assert_eq!((l.count("vision.layers"), l.count("model.layers")), (1, 2));
        assert_eq!(l.single(), None);
    }
}
