//! Problems found in user input. The planner collects every problem before failing, so a user
//! fixes them all in one round instead of one per run.

use std::fmt;
use std::path::{Path, PathBuf};

/// One thing wrong with the input, naming the file and tensor when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: Option<PathBuf>,
    pub tensor: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            file: None,
            tensor: None,
            message: message.into(),
        }
    }
    pub fn in_file(file: &Path, message: impl Into<String>) -> Self {
        Self {
            file: Some(file.to_path_buf()),
            tensor: None,
            message: message.into(),
        }
    }
    pub fn in_tensor(file: &Path, tensor: &str, message: impl Into<String>) -> Self {
        Self {
            file: Some(file.to_path_buf()),
            tensor: Some(tensor.to_string()),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            if let Some(t) = &self.tensor {
                write!(f, ": tensor `{t}`")?;
            }
            write!(f, ": ")?;
        } else if let Some(t) = &self.tensor {
            write!(f, "tensor `{t}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// The error type of the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plan found problems; nothing was read beyond headers and nothing was written.
    #[error("{} problem(s) found, nothing was written:\n{}", .0.len(), list(.0))]
    Plan(Vec<Problem>),
    /// Problems of a checkpoint that was only looked at (`inspect`: nothing is ever written).
    #[error("{} problem(s) found:\n{}", .0.len(), list(.0))]
    Unreadable(Vec<Problem>),
    /// A problem found while the merge ran (bad values in a tensor, I/O failure).
    #[error("{0}")]
    Input(Problem),
    #[error("interrupted: the output folder was left as it was")]
    Interrupted,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// Problems listed in an error message; the rest are counted. A checkpoint of another
/// architecture can give hundreds of thousands (one per tensor), and 47 MB of them hide the
/// first, which usually says what is wrong.
pub const LISTED_PROBLEMS: usize = 50;

fn list(p: &[Problem]) -> String {
    let mut lines: Vec<String> = p
        .iter()
        .take(LISTED_PROBLEMS)
        .map(|p| format!("  - {p}"))
        .collect();
    if p.len() > LISTED_PROBLEMS {
        let rest = &p[LISTED_PROBLEMS..];
        let files: std::collections::HashSet<_> =
            rest.iter().filter_map(|p| p.file.as_ref()).collect();
        lines.push(format!(
            "  … and {} more problem(s) in {} file(s), not listed",
            rest.len(),
            files.len()
        ));
    }
    lines.join("\n")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a human context ("writing /out/model.safetensors") to an I/O error.
pub trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}
