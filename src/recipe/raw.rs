//! The recipe file as written: mergekit's shape, every key known, unknown keys rejected by serde
//! with their line and column. Parameter maps stay YAML here: `setting.rs` reads them against the
//! parameter table (`params.rs`).

use serde::Deserialize;
use serde_yaml_ng::Mapping;

pub use crate::method::Importance;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipe {
    pub merge_method: String,
    pub base_model: Option<String>,
    #[serde(default)]
    pub models: Vec<RawModel>,
    #[serde(default)]
    pub slices: Vec<RawSlice>,
    #[serde(default)]
    pub forget: Vec<RawModel>,
    pub start_model: Option<String>,
    pub parameters: Option<Mapping>,
    pub dtype: Option<String>,
    pub out_dtype: Option<String>,
    /// mergekit's `base`, `union` or a model path.
    pub tokenizer_source: Option<String>,
    pub tokenizer: Option<RawTokenizer>,
    /// A template name (`chatml`, `llama3`, …), `auto`, or a Jinja template.
    pub chat_template: Option<String>,
    /// Free text, ignored (mergekit accepts it too).
    #[allow(dead_code)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub model: String,
    /// STA: the task's gradient statistic (a safetensors file or a sharded folder).
    pub gradients: Option<String>,
    pub parameters: Option<Mapping>,
}

/// An output slice: layers `layer_range` of each source, merged (or passed through) into the
/// next layers of the output.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSlice {
    pub sources: Vec<RawSource>,
    pub parameters: Option<Mapping>,
    pub base_model: Option<String>,
    /// Declared by mergekit 0.1.5 but read nowhere in it: accepted and ignored, with a note.
    pub residual_weight: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub model: String,
    /// `[start, end)`: layers start … end − 1 of the model.
    pub layer_range: (i64, i64),
    /// STA: as a model's `gradients`.
    pub gradients: Option<String>,
    pub parameters: Option<Mapping>,
}

/// mergekit's `tokenizer:` block. `source` defaults to `union` there.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenizer {
    pub source: Option<String>,
    pub tokens: Option<serde_yaml_ng::Value>,
    pub pad_to_multiple_of: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    #[default]
    Tensor,
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MissingGradients {
    #[default]
    Error,
    Magnitude,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NonFinite {
    #[default]
    Error,
    Zero,
}
