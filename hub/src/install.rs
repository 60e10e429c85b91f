//! The store side of a pull: the `.gemmad-pull.json` manifest an install carries, the
//! check that an install is complete, and the atomic swap of a finished download
//! directory into `<store>/<org>/<name>`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The manifest's file name inside an installed checkpoint.
pub const MANIFEST: &str = ".gemmad-pull.json";

/// What `gemmad pull` installed: written last into the download directory, so an
/// install without it is not one of ours.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub repo: String,
    /// The revision asked for (`main`, a tag, a commit).
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
    pub endpoint: String,
    /// Seconds since the epoch.
    pub pulled_at: u64,
    pub files: Vec<ManifestFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The manifest of the install at `dir`, if it is one of ours.
pub fn read_manifest(dir: &Path) -> Option<Manifest> {
    let text = std::fs::read(dir.join(MANIFEST)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Whether every file the manifest lists is in `dir` with its size (a cheap check;
/// the hashes were checked when it was downloaded).
pub fn complete(dir: &Path, m: &Manifest) -> bool {
    m.files.iter().all(|f| {
        std::fs::metadata(dir.join(&f.name)).is_ok_and(|md| md.is_file() && md.len() == f.size)
    })
}

/// Writes `bytes` to `path` through a temporary file, fsynced, then renamed.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(Error::io(&tmp))?;
    f.write_all(bytes).map_err(Error::io(&tmp))?;
    f.sync_all().map_err(Error::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io(path))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))
}

/// Atomically exchanges two paths (both must exist). `Err` with the errno when the
/// file system cannot (then the caller falls back to rename-aside).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Puts the finished download `work` at `dest`. A previous install at `dest` (ours:
/// it has a manifest) is swapped out in one step where the file system can
/// (`renameat2(RENAME_EXCHANGE)`), else renamed aside first, and then removed; a
/// reader never sees a half-written checkpoint. A `dest` that is not ours is refused.
pub(crate) fn swap_in(work: &Path, dest: &Path, aside: &Path) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::rename(work, dest).map_err(Error::io(dest))?;
        }
        Err(e) => return Err(Error::io(dest)(e)),
        Ok(_) if read_manifest(dest).is_none() => {
            return Err(Error::Io {
                path: dest.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and was not installed by `gemmad pull` (no .gemmad-pull.json); \
                     move it away or pull into another --store",
                ),
            });
        }
        Ok(_) => {
            let old: PathBuf = match exchange(work, dest) {
                // `work` now holds the old install.
                Ok(()) => work.to_path_buf(),
                Err(e) => {
                    tracing::debug!(error = %e, "RENAME_EXCHANGE unavailable; renaming aside");
                    std::fs::rename(dest, aside).map_err(Error::io(aside))?;
                    std::fs::rename(work, dest).map_err(Error::io(dest))?;
                    aside.to_path_buf()
                }
            };
            if let Err(e) = std::fs::remove_dir_all(&old) {
                tracing::warn!(path = %old.display(), error = %e, "cannot remove the replaced install");
            }
        }
    }
    sync_dir(parent)
}
