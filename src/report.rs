//! The JSON report written beside the merged model: what was kept where, and what was read.

use std::path::Path;

use serde::Serialize;

use crate::checkpoint::Checkpoint;

#[derive(Debug, Clone, Serialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    /// Modification time (seconds since the epoch), to detect an input changed after the merge.
    pub mtime: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct InputRecord {
    pub role: String,
    pub path: String,
    pub files: Vec<FileRecord>,
}

impl InputRecord {
    pub fn of(role: &str, ck: &Checkpoint) -> Self {
        let files = ck
            .files
            .iter()
            // As opened: the merge checks before committing that every file still matches.
            .map(|f| FileRecord {
                path: f.path.display().to_string(),
                size: f.stamp.size,
                mtime: (f.stamp.mtime_ns / 1_000_000_000).max(0) as u64,
            })
            .collect();
        Self {
            role: role.to_string(),
            path: ck.root.display().to_string(),
            files,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskRecord {
    /// Entries ranked for selection (tensor: k of this tensor; absent for model-wide selection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k: Option<u64>,
    /// The score at the threshold (the k-th largest, after normalisation for model-wide selection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    pub kept: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorRecord {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    /// "merge" or "copy".
    pub action: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskRecord>,
    /// Entries kept by both tasks i and j: [i, j, count], for every pair i < j.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub overlap: Vec<[u64; 3]>,
    /// Checksum of the tensor's bytes as written (checkpoint::writer::checksum), hex.
    pub checksum: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSelectionRecord {
    pub task: usize,
    pub total: u64,
    pub k: u64,
    pub threshold: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub stamerge_version: &'static str,
    pub method: String,
    pub backend: String,
    pub threads: usize,
    pub inputs: Vec<InputRecord>,
    pub output: String,
    pub shards: Vec<String>,
    pub seconds: f64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Input bytes processed per second (all passes).
    pub gb_per_s: f64,
    /// Highest anonymous (non-file) resident memory seen during the run, sampled every 10 ms.
    pub peak_rss_anon_bytes: u64,
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub model_selection: Vec<ModelSelectionRecord>,
    pub tensors: Vec<TensorRecord>,
}

/// Pairwise overlaps from the histogram of mask combinations.
pub fn overlaps(combos: &[u64], tasks: usize) -> Vec<[u64; 3]> {
    let mut out = Vec::new();
    if combos.is_empty() {
        return out;
    }
    for i in 0..tasks {
        for j in i + 1..tasks {
            let both = (1usize << i) | (1usize << j);
            let c = combos
                .iter()
                .enumerate()
                .filter(|(c, _)| c & both == both)
                .map(|(_, n)| n)
                .sum();
            out.push([i as u64, j as u64, c]);
        }
    }
    out
}

pub fn write(report: &Report, path: &Path) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    std::fs::write(path, text)
}

/// The report as the JSON text `write` writes.
pub fn to_json(report: &Report) -> crate::Result<Vec<u8>> {
    serde_json::to_vec_pretty(report)
        .map_err(|e| crate::Error::Other(format!("the report cannot be written as JSON: {e}")))
}
