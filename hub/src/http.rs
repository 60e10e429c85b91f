//! The HTTP side of a pull: one blocking ureq agent that follows redirects itself, so
//! that the token goes only to the endpoint's origin (kept on relative and same-origin
//! redirects, never sent to a CDN), and that maps the Hub's error answers
//! (`X-Error-Code`, `X-Error-Message`, JSON `{"error"}`) to [`Error`]s.

use std::io::Read;
use std::time::Duration;

use ureq::http::{HeaderMap, Uri};

use crate::error::{Error, Result};

/// Redirects followed before giving up (as the Hub's own clients).
const MAX_REDIRECTS: usize = 10;

/// Scheme, host and port: what "same origin" compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    pub(crate) fn of(url: &str) -> Option<Origin> {
        let uri: Uri = url.parse().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let port = uri.port_u16().or(match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        })?;
        Some(Origin {
            host: uri.host()?.to_ascii_lowercase(),
            scheme,
            port,
        })
    }
}

/// `location` resolved against `base` (absolute, scheme-relative, absolute-path or
/// relative-path references).
pub(crate) fn resolve_location(base: &str, location: &str) -> Option<String> {
    let uri: Uri = base.parse().ok()?;
    let scheme = uri.scheme_str()?;
    let authority = uri.authority()?.as_str();
    if location.contains("://") {
        return Some(location.to_string());
    }
    if let Some(rest) = location.strip_prefix("//") {
        return Some(format!("{scheme}://{rest}"));
    }
    if location.starts_with('/') {
        return Some(format!("{scheme}://{authority}{location}"));
    }
    let path = uri.path();
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    Some(format!("{scheme}://{authority}{dir}{location}"))
}

/// A final (non-redirect) answer, with the Hub headers seen along the way (the
/// redirect from `/resolve/` carries them, the CDN's answer does not).
pub(crate) struct Fetched {
    pub url: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: ureq::Body,
    /// `X-Repo-Commit` of the first answer that had one.
    pub repo_commit: Option<String>,
    /// `X-Linked-Etag` (else the `ETag`) of the first Hub answer, unquoted.
    pub etag: Option<String>,
}

impl Fetched {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Reads a small body (JSON, an error text).
    pub(crate) fn read_small(self, limit: u64) -> Result<Vec<u8>> {
        let url = self.url;
        let mut out = Vec::new();
        self.body
            .into_reader()
            .take(limit)
            .read_to_end(&mut out)
            .map_err(|e| Error::Network {
                url,
                reason: format!("reading the answer: {e}"),
            })?;
        Ok(out)
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// Strips `W/` and quotes from an ETag.
pub(crate) fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_ascii_lowercase()
}

pub(crate) struct Http {
    agent: ureq::Agent,
    endpoint: Origin,
    token: Option<String>,
}

impl Http {
    pub(crate) fn new(endpoint: &str, token: Option<String>) -> Result<Http> {
        let origin = Origin::of(endpoint).ok_or_else(|| Error::Protocol {
            url: endpoint.into(),
            reason: "HF_ENDPOINT is not an http(s) URL".into(),
        })?;
        let config = ureq::Agent::config_builder()
            // Redirects are followed here (the token rule), and 4xx/5xx are answers to
            // read (X-Error-Code), not errors.
            .max_redirects(0)
            .max_redirects_will_error(false)
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .user_agent(format!(
                "gemmad/{}; hf_hub_compatible",
                env!("CARGO_PKG_VERSION")
            ))
            .build();
        Ok(Http {
            agent: config.into(),
            endpoint: origin,
            token,
        })
    }

    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// GET `url`, from byte `from` on when it is > 0, following redirects.
    pub(crate) fn get(&self, url: &str, from: u64) -> Result<Fetched> {
        let mut url = url.to_string();
        let mut repo_commit = None;
        let mut etag = None;
        for _ in 0..=MAX_REDIRECTS {
            let same_origin = Origin::of(&url).is_some_and(|o| o == self.endpoint);
            // Identity: byte offsets of a resumed download must be offsets in the file.
            let mut req = self.agent.get(&url).header("Accept-Encoding", "identity");
            if from > 0 {
                req = req.header("Range", format!("bytes={from}-"));
            }
            if let (true, Some(t)) = (same_origin, &self.token) {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let resp = req.call().map_err(|e| Error::Network {
                url: url.clone(),
                reason: e.to_string(),
            })?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            if repo_commit.is_none() {
                repo_commit = header(&headers, "x-repo-commit").map(str::to_ascii_lowercase);
            }
            if etag.is_none() && same_origin {
                etag = header(&headers, "x-linked-etag")
                    .or_else(|| header(&headers, "etag"))
                    .map(normalize_etag);
            }
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let loc = header(&headers, "location").ok_or_else(|| Error::Protocol {
                    url: url.clone(),
                    reason: format!("HTTP {status} without a Location"),
                })?;
                let next = resolve_location(&url, loc).ok_or_else(|| Error::Protocol {
                    url: url.clone(),
                    reason: format!("unusable Location {loc:?}"),
                })?;
                tracing::debug!(from = %url, to = %next, status, "redirect");
                url = next;
                continue;
            }
            return Ok(Fetched {
                url,
                status,
                headers,
                body: resp.into_body(),
                repo_commit,
                etag,
            });
        }
        Err(Error::Protocol {
            url,
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }
}

/// What a failed request was about, for the error message.
pub(crate) enum Target<'a> {
    /// The revision info of `repo` at `revision`.
    Revision { repo: &'a str, revision: &'a str },
    /// A file of `repo`.
    File { repo: &'a str, file: &'a str },
}

/// The error for a non-success answer.
pub(crate) fn status_error(f: Fetched, token: bool, target: Target<'_>) -> Error {
    let status = f.status;
    let url = f.url.clone();
    let code = f.header("x-error-code").unwrap_or("").to_string();
    let mut message = f.header("x-error-message").unwrap_or("").to_string();
    if let Ok(body) = f.read_small(64 << 10) {
        let body_msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from));
        if let Some(b) = body_msg.filter(|b| *b != message) {
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str(&b);
        }
    }
    let repo = match target {
        Target::Revision { repo, .. } | Target::File { repo, .. } => repo,
    };
    match status {
        401 | 403 if code != "RepoNotFound" => Error::Gated {
            repo: repo.into(),
            status,
            token,
            server: message,
        },
        401 | 404 => {
            let what = match (code.as_str(), target) {
                ("RevisionNotFound", Target::Revision { repo, revision }) => {
                    format!("revision {revision:?} of {repo}")
                }
                ("EntryNotFound", Target::File { repo, file }) => format!("file {file} of {repo}"),
                (_, Target::Revision { repo, revision }) => {
                    format!("repo {repo} (or its revision {revision:?})")
                }
                (_, Target::File { repo, file }) => format!("file {file} of {repo}"),
            };
            Error::NotFound {
                what,
                url,
                code,
                token,
            }
        }
        _ => Error::Status {
            url,
            status,
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let a = Origin::of("http://127.0.0.1:8080/x").unwrap();
        assert_eq!(a, Origin::of("http://127.0.0.1:8080/y?z").unwrap());
        assert_ne!(a, Origin::of("http://127.0.0.1:8081/x").unwrap());
        assert_ne!(a, Origin::of("http://127.0.0.2:8080/x").unwrap());
        assert_ne!(a, Origin::of("https://127.0.0.1:8080/x").unwrap());
        assert_eq!(
            Origin::of("https://HuggingFace.co/x").unwrap(),
            Origin::of("https://huggingface.co:443/").unwrap()
        );
    }

    #[test]
    fn locations() {
        let b = "http://h:1/a/b/c?q=1";
        assert_eq!(resolve_location(b, "/x/y").unwrap(), "http://h:1/x/y");
        assert_eq!(resolve_location(b, "d").unwrap(), "http://h:1/a/b/d");
        assert_eq!(resolve_location(b, "//cdn/z").unwrap(), "http://cdn/z");
        assert_eq!(
            resolve_location(b, "https://cdn.hf.co/z").unwrap(),
            "https://cdn.hf.co/z"
        );
    }

    #[test]
    fn etags() {
        assert_eq!(normalize_etag("W/\"AbC\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
    }
}
