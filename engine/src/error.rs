//! Errors of the engine. Every variant names the thing that failed and why, so a
//! daemon log line or a CLI message is actionable without a backtrace.

use std::path::PathBuf;

/// Result alias used across the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The I/O error is part of the message, not a `source`, so that error chains
    /// printed with `{:#}` do not repeat it.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: invalid config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("checkpoint {dir}: tensor `{tensor}` is missing (looked for `{looked_for}`)")]
    MissingTensor {
        dir: PathBuf,
        tensor: String,
        looked_for: String,
    },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("context full: {needed} positions needed, the context holds {max}")]
    ContextFull { needed: usize, max: usize },
    #[error("{0} is not available: this engine was loaded without it")]
    Unavailable(&'static str),
    /// The PLE cache file could not be built or used.
    #[error("{path}: PLE cache: {reason}")]
    PleCache { path: PathBuf, reason: String },
    /// The cache directory of derived files cannot be used (not its contents: those are
    /// rebuilt when stale).
    #[error("{path}: cache directory: {reason}")]
    CacheDir { path: PathBuf, reason: String },
    /// A long operation (e.g. building the PLE cache) was interrupted by its caller.
    #[error("{0} was cancelled")]
    Cancelled(&'static str),
    /// A MatFormer slice that is not offered or does not fit the checkpoint; `path` is
    /// the slicing file or the checkpoint's `config.json`.
    #[error("{path}: MatFormer slice: {reason}")]
    Slice { path: PathBuf, reason: String },
    /// An export's destination cannot be used (it exists and is not empty, ...).
    #[error("{path}: {reason}")]
    Export { path: PathBuf, reason: String },
    /// A request needs a modality (vision/audio) that cannot serve it now; the message says
    /// why and what to do.
    #[error("{0}")]
    ModalityUnavailable(String),
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            err: source,
        }
    }
}
