//! The one error type of `gemmad pull`. Each variant names the repo, file or URL it is
//! about and says what a person can do about it; [`Error::is_retryable`] tells the
//! download loop which ones a retry (with resume) may cure.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not `org/name`, or characters the Hub does not allow.
    #[error("{0:?} is not a Hugging Face repo id: expected `org/name` (letters, digits, `-`, `_`, `.`), e.g. google/gemma-3n-E2B-it")]
    BadRepoId(String),

    /// 401/403 from the Hub (Gemma is gated).
    #[error("{}", gated_message(.repo, *.status, .token, .server))]
    Gated {
        repo: String,
        status: u16,
        /// Whether a token was sent.
        token: bool,
        /// What the Hub said (X-Error-Message or the JSON body), if anything.
        server: String,
    },

    /// 404 from the Hub.
    #[error("{what} not found on {url} (HTTP 404{}){}", code_suffix(.code), if *.token { "" } else { "; a private or gated repo answers 404 without a token: set HF_TOKEN" })]
    NotFound {
        what: String,
        url: String,
        code: String,
        token: bool,
    },

    /// Any other HTTP status the client cannot use.
    #[error("{url}: HTTP {status}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Status {
        url: String,
        status: u16,
        message: String,
    },

    /// Connection refused, reset, timed out, TLS failure, ...
    #[error("{url}: {reason}")]
    Network { url: String, reason: String },

    /// A response that breaks the Hub's protocol (missing header, bad JSON, bad range).
    #[error("{url}: not a Hugging Face Hub answer: {reason}")]
    Protocol { url: String, reason: String },

    /// The file's bytes are not what the Hub's metadata says.
    #[error("{file}: {what} mismatch: expected {expected}, got {actual} (the download was deleted; pull again)")]
    Integrity {
        file: String,
        what: &'static str,
        expected: String,
        actual: String,
    },

    /// The repo lacks a file gemmad needs.
    #[error("{repo} at {commit}: {reason}")]
    Incomplete {
        repo: String,
        commit: String,
        reason: String,
    },

    /// HF_HUB_OFFLINE is set and the repo is not in the store.
    #[error("HF_HUB_OFFLINE is set and {repo} is not installed in {}: unset HF_HUB_OFFLINE to download it", .store.display())]
    Offline { repo: String, store: PathBuf },

    /// Another pull of the same repo into the same store is running.
    #[error("another pull of {repo} into {} is running (lock {})", .store.display(), .lock.display())]
    Busy {
        repo: String,
        store: PathBuf,
        lock: PathBuf,
    },

    /// The progress callback asked to stop (the client went away).
    #[error("pull of {0} cancelled; run it again to resume")]
    Cancelled(String),

    /// A local file operation failed.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `--model` named a repo id that is in none of the stores.
    #[error("{value:?} is neither a checkpoint folder nor a repo pulled into {}: run `gemmad pull {value}` first", stores_list(.searched))]
    ModelNotFound {
        value: String,
        searched: Vec<PathBuf>,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    /// Whether retrying (and resuming) may cure it: network failures, 5xx, 408 and 429.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Network { .. } => true,
            Error::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            _ => false,
        }
    }
}

fn code_suffix(code: &str) -> String {
    if code.is_empty() {
        String::new()
    } else {
        format!(", {code}")
    }
}

fn stores_list(stores: &[PathBuf]) -> String {
    let v: Vec<String> = stores.iter().map(|p| p.display().to_string()).collect();
    v.join(", ")
}

fn gated_message(repo: &str, status: u16, token: &bool, server: &str) -> String {
    let mut m = format!(
        "{repo}: access denied by the Hub (HTTP {status}). Gemma models are gated: open \
         https://huggingface.co/{repo} while logged in, accept the Gemma licence \
         (terms of use), create a read token at https://huggingface.co/settings/tokens \
         with that account, and set HF_TOKEN (or save it in $HF_HOME/token, default \
         ~/.cache/huggingface/token)."
    );
    if *token {
        m.push_str(
            " A token was sent: has this account accepted the licence, and is the token valid?",
        );
    } else {
        m.push_str(" No token was found.");
    }
    if !server.is_empty() {
        m.push_str(&format!(" The Hub said: {server}"));
    }
    m
}
