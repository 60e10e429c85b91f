//! What a pull is about: the repo id, the Hub's revision info
//! (`/api/models/{repo}/revision/{rev}?blobs=true`), the files gemmad needs from it, and
//! the URLs to fetch them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// `org/name` as the Hub spells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoId {
    pub org: String,
    pub name: String,
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && !s.starts_with(['.', '-'])
        && !s.contains("..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl RepoId {
    /// Parses `org/name`; refuses anything that could escape the store as a path.
    pub fn parse(s: &str) -> Result<RepoId> {
        match s.split_once('/') {
            Some((org, name)) if valid_part(org) && valid_part(name) => Ok(RepoId {
                org: org.into(),
                name: name.into(),
            }),
            _ => Err(Error::BadRepoId(s.into())),
        }
    }

    /// `<store>/<org>/<name>`.
    pub fn install_dir(&self, store: &Path) -> PathBuf {
        store.join(&self.org).join(&self.name)
    }

    /// `org--name`: one path component for the partial area.
    pub fn flat(&self) -> String {
        format!("{}--{}", self.org, self.name)
    }
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.org, self.name)
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (Python's
/// `quote(s, safe="")`): a revision such as `refs/pr/1` becomes one path segment.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Deserialize)]
pub(crate) struct RevisionInfo {
    pub sha: Option<String>,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Sibling {
    pub rfilename: String,
    pub size: Option<u64>,
    #[serde(rename = "blobId")]
    pub blob_id: Option<String>,
    pub lfs: Option<LfsInfo>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct LfsInfo {
    pub sha256: String,
    pub size: u64,
}

/// One file to download, with what the Hub says it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    pub name: String,
    pub size: u64,
    /// sha256 of the content (LFS files).
    pub sha256: Option<String>,
    /// Git blob id, `sha1("blob <len>\0" + content)` (files kept in git).
    pub git_sha1: Option<String>,
}

/// The exact names gemmad reads, besides `*.safetensors`.
const WANTED: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Whether gemmad needs `name`: top-level files only (a `/` would be a subfolder,
/// such as another format's export).
pub fn wanted(name: &str) -> bool {
    !name.contains('/')
        && !name.starts_with('.')
        && (WANTED.contains(&name) || name.ends_with(".safetensors"))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit and the wanted files of a revision-info answer from `url`.
pub(crate) fn plan(
    repo: &RepoId,
    info: RevisionInfo,
    url: &str,
) -> Result<(String, Vec<RemoteFile>)> {
    let protocol = |reason: String| Error::Protocol {
        url: url.to_string(),
        reason,
    };
    let commit = info
        .sha
        .filter(|s| is_hex(s, 40))
        .ok_or_else(|| protocol("no 40-hex `sha` (commit) in the revision info".into()))?
        .to_ascii_lowercase();
    let mut files = Vec::new();
    for s in info.siblings {
        if !wanted(&s.rfilename) {
            continue;
        }
        let (size, sha256, git_sha1) = match s.lfs {
            Some(l) => {
                if !is_hex(&l.sha256, 64) {
                    return Err(protocol(format!(
                        "{}: lfs.sha256 is not 64 hex",
                        s.rfilename
                    )));
                }
                (l.size, Some(l.sha256.to_ascii_lowercase()), None)
            }
            None => {
                let size = s.size.ok_or_else(|| {
                    protocol(format!(
                        "{}: no size (was ?blobs=true ignored?)",
                        s.rfilename
                    ))
                })?;
                let sha1 = s
                    .blob_id
                    .filter(|b| is_hex(b, 40))
                    .map(|b| b.to_ascii_lowercase());
                (size, None, sha1)
            }
        };
        files.push(RemoteFile {
            name: s.rfilename,
            size,
            sha256,
            git_sha1,
        });
    }
    let incomplete = |reason: &str| Error::Incomplete {
        repo: repo.to_string(),
        commit: commit.clone(),
        reason: reason.into(),
    };
    if !files.iter().any(|f| f.name == "config.json") {
        return Err(incomplete("no config.json: not a transformers checkpoint"));
    }
    if !files.iter().any(|f| f.name.ends_with(".safetensors")) {
        return Err(incomplete(
            "no *.safetensors weights (gemmad reads safetensors only)",
        ));
    }
    // Small files first: the index is read before the big shards are fetched.
    files.sort_by(|a, b| a.size.cmp(&b.size).then_with(|| a.name.cmp(&b.name)));
    Ok((commit, files))
}

#[derive(Deserialize)]
struct Index {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The shards `model.safetensors.index.json` names that are not among `files`.
pub(crate) fn missing_shards(index: &[u8], files: &[RemoteFile]) -> Result<Vec<String>, String> {
    let idx: Index = serde_json::from_slice(index).map_err(|e| e.to_string())?;
    let mut missing: Vec<String> = idx
        .weight_map
        .into_values()
        .filter(|shard| !files.iter().any(|f| &f.name == shard))
        .collect();
    missing.sort();
    missing.dedup();
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        let r = RepoId::parse("google/gemma-3n-E2B-it").unwrap();
        assert_eq!(r.to_string(), "google/gemma-3n-E2B-it");
        assert_eq!(r.flat(), "google--gemma-3n-E2B-it");
        for bad in [
            "",
            "google",
            "a/b/c",
            "../x",
            "a/..",
            "a/.hidden",
            "/abs",
            "a b/c",
            "a/-x",
        ] {
            assert!(RepoId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selection() {
        for w in [
            "config.json",
            "model-00001-of-00003.safetensors",
            "tokenizer.model",
            "chat_template.jinja",
        ] {
            assert!(wanted(w), "{w}");
        }
        for n in [
            "README.md",
            ".gitattributes",
            "onnx/model.safetensors",
            "model.gguf",
        ] {
            assert!(!wanted(n), "{n}");
        }
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_segment("main"), "main");
        assert_eq!(encode_segment("a b#"), "a%20b%23");
    }
}
