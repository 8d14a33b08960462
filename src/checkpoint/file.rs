//! One safetensors file: validated header, memory-mapped data, tensors in offset order.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::guard::{self, Guard};
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

/// What identifies a file's contents without reading them: a file truncated, rewritten or
/// replaced after it was opened gets a different stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification and status-change times, nanoseconds since the epoch. The change time
    /// cannot be set back by `touch`, so a write that restores the old mtime still shows.
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Stamp {
    fn of(md: &std::fs::Metadata) -> Self {
        Self {
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
            ctime_ns: md.ctime() as i128 * 1_000_000_000 + md.ctime_nsec() as i128,
        }
    }
}

/// An open, validated safetensors file. The data is mapped read-only and paged in on demand,
/// so opening reads only the header.
pub struct SafetensorsFile {
    pub path: PathBuf,
    /// Declared before `map` so that it unregisters before the mapping is unmapped.
    guard: Guard,
    pub map: Mmap,
    /// The file as it was when opened; the data read must still be this file's at commit.
    pub stamp: Stamp,
    pub tensors: Vec<TensorEntry>,
    pub metadata: Option<std::collections::HashMap<String, String>>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, Problem> {
        // Before opening: a FIFO named by a crafted index would block `open` forever.
        match std::fs::metadata(path) {
            Ok(md) if !md.is_file() => {
                return Err(Problem::in_file(path, "not a regular file"));
            }
            _ => {}
        }
        let file =
            File::open(path).map_err(|e| Problem::in_file(path, format!("cannot open: {e}")))?;
        let stamp = Stamp::of(
            &file
                .metadata()
                .map_err(|e| Problem::in_file(path, format!("cannot stat: {e}")))?,
        );
        let len = stamp.size;
        if len < 8 {
            return Err(Problem::in_file(
                path,
                format!(
                    "not a safetensors file: {len} bytes, shorter than the 8-byte header length"
                ),
            ));
        }
        // SAFETY: the map is read-only and the kernel never lets us write through it. A file
        // changed underneath us is caught by `check_intact` (stamp) and, when it shrinks or a
        // read fails, by the SIGBUS guard registered right here, before the first access.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| Problem::in_file(path, format!("cannot memory-map: {e}")))?;
        let guard = guard::register(map.as_ptr(), map.len());
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        let parsed = parse_header(&map);
        if guard.faulted() {
            return Err(Problem::in_file(path, UNREADABLE));
        }
        let Header { tensors, metadata } = parsed.map_err(|m| Problem::in_file(path, m))?;
        Ok(Self {
            path: path.to_path_buf(),
            guard,
            map,
            stamp,
            tensors,
            metadata,
        })
    }

    pub fn bytes(&self, t: &TensorEntry) -> &[u8] {
        &self.map[t.start..t.end]
    }

    /// Cheap (no system call): whether a read of the mapped data has failed since opening.
    pub fn check_readable(&self) -> Result<(), Problem> {
        if self.guard.faulted() {
            let now = std::fs::metadata(&self.path).map(|m| m.len()).ok();
            let msg = match now {
                Some(n) if n < self.stamp.size => format!(
                    "truncated from {} to {n} bytes while the merge was reading it; {RERUN}",
                    self.stamp.size
                ),
                _ => UNREADABLE.to_string(),
            };
            return Err(Problem::in_file(&self.path, msg));
        }
        Ok(())
    }

    /// Whether the file is still the one that was opened: no failed read, and the same device,
    /// inode, size, modification and change time. Called before the output is committed, so
    /// an output computed from a file that changed meanwhile is never presented as good.
    pub fn check_intact(&self) -> Result<(), Problem> {
        self.check_readable()?;
        let now = std::fs::metadata(&self.path)
            .map_err(|e| Problem::in_file(&self.path, format!("cannot stat any more: {e}")))?;
        let now = Stamp::of(&now);
        if now == self.stamp {
            return Ok(());
        }
        let what = if (now.dev, now.ino) != (self.stamp.dev, self.stamp.ino) {
            "replaced by another file".to_string()
        } else if now.size != self.stamp.size {
            format!("resized from {} to {} bytes", self.stamp.size, now.size)
        } else {
            "modified".to_string()
        };
        Err(Problem::in_file(
            &self.path,
            format!("{what} while the merge was reading it; {RERUN}"),
        ))
    }
}

const RERUN: &str = "the output was not kept: run the merge again once the file is stable";
const UNREADABLE: &str = "a read failed (I/O error from the disk, or the file shrank and grew \
     back) while the merge was reading it; the output was not kept: check the disk and the file";

/// A validated header: the tensors in offset order, and the free-form metadata.
pub struct Header {
    pub tensors: Vec<TensorEntry>,
    pub metadata: Option<std::collections::HashMap<String, String>>,
}

/// Validates a whole safetensors file image: header length, JSON, dtypes, shapes against byte
/// sizes, offsets contiguous and ending at the end of the file, names unique. No allocation
/// depends on a declared size, only on the header's real bytes. The message names no file.
pub fn parse_header(buf: &[u8]) -> Result<Header, String> {
    let (header_len, meta) = SafeTensors::read_metadata(buf).map_err(|e| {
        if let safetensors::SafeTensorError::MetadataIncompleteBuffer = e {
            if let Some(m) = data_extent_problem(buf) {
                return format!("corrupt safetensors header: {m}");
            }
            return format!(
                "corrupt safetensors header: {e} (the file is truncated or has trailing bytes: \
                 re-download or re-convert it)"
            );
        }
        format!("corrupt safetensors header: {e}")
    })?;
    // The parser keeps the last of two entries with one name; a second tensor of that name
    // would silently vanish (or surface as a puzzling offset error), so refuse it by name.
    serde_json::from_slice::<UniqueKeys>(&buf[8..8 + header_len])
        .map_err(|e| format!("corrupt safetensors header: {e}"))?;
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
    // Offsets, then names: tensors without elements share their offsets, and the parser's
    // order among them comes from a hash map (another order on every run).
    tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    Ok(Header {
        tensors,
        metadata: meta.metadata().clone(),
    })
}

/// When the header is well-formed but its tensors do not end where the file ends: which tensor
/// lies past the end (the file was cut short), or how many bytes follow the last one. None when
/// the header cannot be read this far (the parser's own message is then the one to give).
fn data_extent_problem(buf: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(buf.get(8..end)?).ok()?;
    let data = (buf.len() - end) as u64;
    let mut last: Option<(&str, u64, u64)> = None;
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offs = info.get("data_offsets")?.as_array()?;
        let (a, b) = (offs.first()?.as_u64()?, offs.get(1)?.as_u64()?);
        if b > data {
            return Some(format!(
                "tensor `{name}` (data_offsets [{a}, {b}]) ends past the end of the file, which \
                 holds {data} bytes of data: the file is truncated (re-download or re-convert it)"
            ));
        }
        if last.is_none_or(|(_, _, e)| b > e) {
            last = Some((name, a, b));
        }
    }
    let (name, a, b) = last.unwrap_or(("", 0, 0));
    (b < data).then(|| {
        format!(
            "{} bytes follow the last tensor `{name}` (data_offsets [{a}, {b}]): the file has \
             trailing bytes (re-download or re-convert it)",
            data - b
        )
    })
}

/// Parses a header object only to fail on a name given twice.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(UniqueKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(k) = m.next_key::<String>()? {
            m.next_value::<serde::de::IgnoredAny>()?;
            if let Some(k) = seen.replace(k) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate tensor name `{k}` (declared twice)"
                )));
            }
        }
        Ok(UniqueKeys)
    }
}
