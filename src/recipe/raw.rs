//! The recipe file as written: mergekit's shape, every key known, unknown keys rejected by serde
//! with their line and column.

use serde::Deserialize;

pub use crate::method::Importance;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipe {
    pub merge_method: String,
    pub base_model: Option<String>,
    #[serde(default)]
    pub models: Vec<RawModel>,
    #[serde(default)]
    pub forget: Vec<RawModel>,
    pub start_model: Option<String>,
    pub parameters: Option<RawParams>,
    pub dtype: Option<String>,
    pub out_dtype: Option<String>,
    /// mergekit's tokenizer handling: only `base` (copy the base model's tokenizer) is supported.
    pub tokenizer_source: Option<String>,
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
    pub parameters: Option<RawParams>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParams {
    pub weight: Option<f64>,
    pub density: Option<f64>,
    pub lambda: Option<f64>,
    pub normalize: Option<bool>,
    pub seed: Option<u64>,
    pub rescale: Option<bool>,
    pub selection: Option<Selection>,
    pub importance: Option<Importance>,
    pub missing_gradients: Option<MissingGradients>,
    pub nonfinite_scores: Option<NonFinite>,
    /// mergekit's memory-saving switch for TIES masks; it does not change results here.
    #[allow(dead_code)]
    pub int8_mask: Option<bool>,
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
