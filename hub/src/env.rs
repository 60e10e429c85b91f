//! The Hub's own environment conventions (`HF_ENDPOINT`, `HF_TOKEN`, `HF_TOKEN_PATH`,
//! `HF_HOME`, `HF_HUB_OFFLINE`, as `huggingface_hub` reads them) and gemmad's model store
//! locations (`GEMMAD_MODEL_STORE`, the service's `/var/lib/gemmad/models`, a user's
//! `$XDG_DATA_HOME/gemmad/models`), and the `--model` lookup of a repo id in them.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::repo::RepoId;

/// The Hub when `HF_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The service's store (its `StateDirectory=`).
pub const SYSTEM_STORE: &str = "/var/lib/gemmad/models";

/// Overrides every default store.
pub const STORE_ENV: &str = "GEMMAD_MODEL_STORE";

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `HF_ENDPOINT` without trailing slashes, else the Hub.
pub fn endpoint() -> String {
    var("HF_ENDPOINT")
        .map(|e| e.trim().trim_end_matches('/').to_string())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
}

/// Python's `_is_true`: 1, ON, YES, TRUE in any case.
pub fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

/// `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is true.
pub fn offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
        .iter()
        .any(|n| var(n).is_some_and(|v| truthy(&v)))
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Option<PathBuf> {
    if let Some(h) = var("HF_HOME") {
        return Some(PathBuf::from(h));
    }
    if let Some(x) = var("XDG_CACHE_HOME") {
        return Some(Path::new(&x).join("huggingface"));
    }
    var("HOME").map(|h| Path::new(&h).join(".cache/huggingface"))
}

/// The token, as `huggingface_hub` finds it: `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, then
/// the file `$HF_TOKEN_PATH`, else `$HF_HOME/token`. Whitespace and line ends are
/// stripped; an empty value or file means no token. An unreadable file is no token too
/// (a 401 then says how to set one).
pub fn token() -> Option<String> {
    if let Some(t) = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")) {
        return Some(t.trim().to_string());
    }
    let path = var("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| hf_home().map(|h| h.join("token")))?;
    let text = std::fs::read_to_string(path).ok()?;
    let t: String = text.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Whether this process runs as root or as the service's own user (`gemmad`): those
/// use the service's store.
fn is_service_user() -> bool {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return true;
    }
    user_name(uid).is_some_and(|n| n == "gemmad")
}

fn user_name(uid: libc::uid_t) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: passwd is plain data; getpwuid_r writes only into `pw`, `buf` (its length
    // given) and `result`, and the name is read only when it reports success.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pw.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pw.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// A user's own store: `$XDG_DATA_HOME/gemmad/models`, else
/// `~/.local/share/gemmad/models`.
pub fn user_store() -> Option<PathBuf> {
    if let Some(x) = var("XDG_DATA_HOME") {
        return Some(Path::new(&x).join("gemmad/models"));
    }
    var("HOME").map(|h| Path::new(&h).join(".local/share/gemmad/models"))
}

/// Where `gemmad pull` installs by default: `$GEMMAD_MODEL_STORE`; else the service's
/// store for root and the `gemmad` user; else the user's own store.
pub fn default_store() -> PathBuf {
    if let Some(s) = var(STORE_ENV) {
        return PathBuf::from(s);
    }
    if is_service_user() {
        return PathBuf::from(SYSTEM_STORE);
    }
    user_store().unwrap_or_else(|| PathBuf::from(SYSTEM_STORE))
}

/// The stores `--model org/name` is looked up in, first match wins: `extra` (a config's
/// `[model] store`), then `$GEMMAD_MODEL_STORE` if set, else the user's store (not for
/// root or the service user) and the service's.
pub fn search_stores(extra: Option<&Path>) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = extra
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    if let Some(s) = var(STORE_ENV) {
        v.push(PathBuf::from(s));
    } else {
        if !is_service_user() {
            v.extend(user_store());
        }
        v.push(PathBuf::from(SYSTEM_STORE));
    }
    v.dedup();
    v
}

/// Resolves a `--model` value: an existing directory is used as it is; a repo id
/// (`org/name`) is looked up in `stores` (not found: an error naming what was searched
/// and suggesting `gemmad pull`); anything else is returned as it is, for the loader to
/// report what is missing.
pub fn resolve_model(value: &Path, stores: &[PathBuf]) -> Result<PathBuf> {
    if value.is_dir() {
        return Ok(value.to_path_buf());
    }
    let s = value.to_string_lossy();
    let looks_like_repo = !s.starts_with('/') && !s.starts_with('.') && s.matches('/').count() == 1;
    if looks_like_repo {
        if let Ok(repo) = RepoId::parse(&s) {
            for store in stores {
                let dir = repo.install_dir(store);
                if dir.join("config.json").is_file() {
                    return Ok(dir);
                }
            }
            return Err(Error::ModelNotFound {
                value: s.into_owned(),
                searched: stores.to_vec(),
            });
        }
    }
    // Not a folder and not a repo id: the loader says what is missing (the folder, or
    // its config.json), as precisely as it can.
    Ok(value.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truthy_values_follow_huggingface_hub() {
        for v in ["1", "on", "YES", "True"] {
            assert!(truthy(v), "{v}");
        }
        for v in ["0", "off", "no", "", "2"] {
            assert!(!truthy(v), "{v}");
        }
    }

    #[test]
    fn resolve_model_uses_dirs_then_stores() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        let dir = b.join("org/name");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::create_dir_all(&a).unwrap();
        let stores = vec![a.clone(), b.clone()];
        assert_eq!(resolve_model(Path::new("org/name"), &stores).unwrap(), dir);
        // An existing folder wins over the store.
        assert_eq!(resolve_model(&a.join(".."), &stores).unwrap(), a.join(".."));
        let e = resolve_model(Path::new("org/other"), &stores).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("gemmad pull org/other"), "{m}");
        assert!(m.contains(&a.display().to_string()), "{m}");
        assert!(m.contains(&b.display().to_string()), "{m}");
        // Paths that are no repo id go to the loader as they are, even when the store
        // holds a repo of that shape.
        for p in ["/no/such/dir", "./org/name"] {
            assert_eq!(resolve_model(Path::new(p), &stores).unwrap(), Path::new(p));
        }
    }
}
