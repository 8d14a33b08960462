//! `stamerge inspect`: what a checkpoint holds, from its headers.

use std::fmt::Write;
use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

pub fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1000.0 && i < U.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

pub fn inspect(path: &Path) -> Result<String> {
    let ck = Checkpoint::open(path).map_err(Error::Unreadable)?;
    let mut s = String::new();
    let width = ck
        .tensors()
        .map(|(_, t)| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        s,
        "{:width$}  {:5}  {:>20}  {:>10}  file",
        "name", "dtype", "shape", "size"
    );
    let mut params = 0u64;
    let mut bytes = 0u64;
    for (f, t) in ck.tensors() {
        params += t.numel() as u64;
        bytes += t.nbytes() as u64;
        let file = f
            .path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:width$}  {:5}  {:>20}  {:>10}  {file}",
            t.name,
            format!("{:?}", t.dtype),
            format!("{:?}", t.shape),
            human_bytes(t.nbytes() as u64)
        );
    }
    let _ = writeln!(
        s,
        "{} tensors, {} parameters, {} of tensor data in {} file(s)",
        ck.len(),
        params,
        human_bytes(bytes),
        ck.files.len()
    );
    if let Some(v) = ck.vocab_size() {
        let _ = writeln!(s, "config.json: vocab_size {v}");
    }
    Ok(s)
}
