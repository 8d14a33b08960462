//! One safetensors file: validated header, memory-mapped data, tensors in offset order.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::Problem;

/// A tensor's place in one file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

/// An open, validated safetensors file. The data is mapped read-only and paged in on demand,
/// so opening reads only the header.
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub map: Mmap,
    pub tensors: Vec<TensorEntry>,
    pub metadata: Option<std::collections::HashMap<String, String>>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, Problem> {
        let file =
            File::open(path).map_err(|e| Problem::in_file(path, format!("cannot open: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| Problem::in_file(path, format!("cannot stat: {e}")))?
            .len();
        if len < 8 {
            return Err(Problem::in_file(
                path,
                format!(
                    "not a safetensors file: {len} bytes, shorter than the 8-byte header length"
                ),
            ));
        }
        // SAFETY: the map is read-only; a file changed underneath us is detected by the report's
        // size/mtime record, and the kernel never lets us write through it.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| Problem::in_file(path, format!("cannot memory-map: {e}")))?;
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
            let hint = match e {
                safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                    " (the file is truncated or has trailing bytes: re-download or re-convert it)"
                }
                _ => "",
            };
            Problem::in_file(path, format!("corrupt safetensors header: {e}{hint}"))
        })?;
        let data_start = 8 + header_len;
        let mut tensors = Vec::new();
        for name in meta.offset_keys() {
            let info = meta.info(&name).expect("name comes from the metadata");
            tensors.push(TensorEntry {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + info.data_offsets.0,
                end: data_start + info.data_offsets.1,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            tensors,
            metadata: meta.metadata().clone(),
        })
    }

    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.map[t.start..t.end]
    }
}
