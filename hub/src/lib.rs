//! gemmad-hub: `gemmad pull`. Downloads a checkpoint from the Hugging Face Hub by repo id
//! into gemmad's model store, the way the Hub's own clients talk to it
//! (docs/models.md):
//!
//! 1. resolve `repo@revision` to a commit and its file list
//!    (`GET /api/models/{repo}/revision/{rev}?blobs=true`: sizes, LFS sha256, git blob ids);
//! 2. keep the files gemmad reads ([`repo::wanted`]);
//! 3. download each from `/{repo}/resolve/{commit}/{file}` into
//!    `<store>/.partial/<org>--<name>/<commit>/` (resumable, verified: [`download`]);
//! 4. write `.gemmad-pull.json` and swap the directory in as `<store>/<org>/<name>`.
//!
//! The token goes only to the endpoint's origin; `HF_HUB_OFFLINE` touches no network.
//! Progress is reported through [`Progress`], so the CLI draws bars and the daemon
//! streams messages; returning `Break` from it cancels (the partial download stays, and
//! the next pull resumes it).

mod download;
pub mod env;
mod error;
mod http;
pub mod install;
pub mod repo;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use env::{default_store, resolve_model, search_stores};
pub use error::{Error, Result};
pub use install::{Manifest, ManifestFile, MANIFEST};
pub use repo::{RemoteFile, RepoId};

/// What to pull, from where, into where.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit (default `main`).
    pub revision: String,
    /// The model store; the checkpoint lands in `<store>/<org>/<name>`.
    pub store: PathBuf,
    /// The Hub, without a trailing slash.
    pub endpoint: String,
    pub token: Option<String>,
    /// Do not touch the network: succeed only if already installed.
    pub offline: bool,
    /// Retries of one file after a network error or 5xx (the count starts over when an
    /// attempt made progress).
    pub retries: u32,
    /// The first retry's wait; it doubles, up to 8 s.
    pub retry_delay: Duration,
}

impl PullOptions {
    /// `repo` at `main` into `store`, with the endpoint, token and offline mode from the
    /// Hub's environment variables ([`env`]).
    pub fn from_env(repo: &str, store: PathBuf) -> PullOptions {
        PullOptions {
            repo: repo.to_string(),
            revision: "main".into(),
            store,
            endpoint: env::endpoint(),
            token: env::token(),
            offline: env::offline(),
            retries: 5,
            retry_delay: Duration::from_secs(1),
        }
    }
}

/// What a pull reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// The revision resolved; these files (`total` bytes) make the checkpoint.
    Resolved {
        commit: &'a str,
        files: &'a [RemoteFile],
        total: u64,
    },
    /// A file starts (from `resume_from` when a part was kept).
    FileStarted {
        name: &'a str,
        size: u64,
        resume_from: u64,
    },
    /// Bytes arrived: the file's and the whole pull's.
    Bytes {
        name: &'a str,
        file_done: u64,
        file_size: u64,
        done: u64,
        total: u64,
    },
    /// An attempt failed; the next resumes.
    Retrying {
        name: &'a str,
        attempt: u32,
        reason: &'a str,
    },
    /// A file is complete and verified.
    FileDone { name: &'a str, size: u64 },
    /// The checkpoint is in place (or already was).
    Installed { dir: &'a Path, already: bool },
}

/// Receives [`Event`]s; `Break` cancels the pull.
pub trait Progress {
    fn event(&mut self, e: &Event<'_>) -> ControlFlow<()>;
}

impl<F: FnMut(&Event<'_>) -> ControlFlow<()>> Progress for F {
    fn event(&mut self, e: &Event<'_>) -> ControlFlow<()> {
        self(e)
    }
}

/// What a pull did.
#[derive(Clone, Debug)]
pub struct Pulled {
    /// `<store>/<org>/<name>`.
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Nothing needed downloading: that commit was installed already.
    pub already_installed: bool,
    /// Bytes transferred by this run.
    pub downloaded: u64,
}

/// Pulls `o.repo` into the store (see the crate docs). Blocking.
pub fn pull(o: &PullOptions, progress: &mut dyn Progress) -> Result<Pulled> {
    let repo = RepoId::parse(&o.repo)?;
    let dest = repo.install_dir(&o.store);
    let installed = install::read_manifest(&dest).filter(|m| install::complete(&dest, m));
    if o.offline {
        return match installed {
            Some(m) if m.revision == o.revision || m.commit == o.revision => {
                already(progress, dest, m)
            }
            _ => Err(Error::Offline {
                repo: repo.to_string(),
                store: o.store.clone(),
            }),
        };
    }
    let partial = o.store.join(".partial");
    std::fs::create_dir_all(&partial).map_err(Error::io(&partial))?;
    let lock_path = partial.join(format!("{}.lock", repo.flat()));
    let lock = std::fs::File::create(&lock_path).map_err(Error::io(&lock_path))?;
    if lock.try_lock().is_err() {
        return Err(Error::Busy {
            repo: repo.to_string(),
            store: o.store.clone(),
            lock: lock_path,
        });
    }

    let http = http::Http::new(&o.endpoint, o.token.clone())?;
    let (commit, files) = resolve(&http, o, &repo)?;
    let total: u64 = files.iter().map(|f| f.size).sum();
    emit(
        progress,
        &repo,
        Event::Resolved {
            commit: &commit,
            files: &files,
            total,
        },
    )?;
    if let Some(m) = installed.filter(|m| m.commit == commit) {
        return already(progress, dest, m);
    }

    let work_root = partial.join(repo.flat());
    let work = work_root.join(&commit);
    std::fs::create_dir_all(&work).map_err(Error::io(&work))?;
    let mut ctx = download::Ctx {
        http: &http,
        progress,
        repo: &o.repo,
        commit: &commit,
        retries: o.retries,
        retry_delay: o.retry_delay,
        done: 0,
        total,
        downloaded: 0,
    };
    let mut records = Vec::with_capacity(files.len());
    for f in &files {
        let path = work.join(&f.name);
        let sha256 = match download::verify_existing(&path, f) {
            Some(s) => {
                ctx.done += f.size;
                s
            }
            None => {
                let url = format!(
                    "{}/{}/{}/resolve/{}/{}",
                    o.endpoint,
                    repo.org,
                    repo.name,
                    commit,
                    repo::encode_segment(&f.name)
                );
                download::fetch(&mut ctx, f, &url, &work)?
            }
        };
        if f.name == "model.safetensors.index.json" {
            check_index(&path, &files, &repo, &commit)?;
        }
        records.push(ManifestFile {
            name: f.name.clone(),
            size: f.size,
            sha256,
        });
    }
    let downloaded = ctx.downloaded;
    let manifest = Manifest {
        repo: repo.to_string(),
        revision: o.revision.clone(),
        commit: commit.clone(),
        endpoint: o.endpoint.clone(),
        pulled_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        files: records,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Io {
        path: work.join(MANIFEST),
        source: std::io::Error::other(e),
    })?;
    install::write_durably(&work.join(MANIFEST), &json)?;
    install::sync_dir(&work)?;
    let aside = work_root.join(format!("replaced-{}", std::process::id()));
    install::swap_in(&work, &dest, &aside)?;
    // Parts of other commits of this repo are stale now.
    let _ = std::fs::remove_dir_all(&work_root);
    tracing::info!(repo = %repo, %commit, dir = %dest.display(), downloaded, "installed");
    emit(
        progress,
        &repo,
        Event::Installed {
            dir: &dest,
            already: false,
        },
    )?;
    drop(lock);
    Ok(Pulled {
        dir: dest,
        manifest,
        already_installed: false,
        downloaded,
    })
}

fn emit(p: &mut dyn Progress, repo: &RepoId, e: Event<'_>) -> Result<()> {
    match p.event(&e) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(Error::Cancelled(repo.to_string())),
    }
}

fn already(p: &mut dyn Progress, dir: PathBuf, m: Manifest) -> Result<Pulled> {
    let _ = p.event(&Event::Installed {
        dir: &dir,
        already: true,
    });
    Ok(Pulled {
        dir,
        manifest: m,
        already_installed: true,
        downloaded: 0,
    })
}

/// The commit and files of `o.revision`, retrying network errors and 5xx.
fn resolve(http: &http::Http, o: &PullOptions, repo: &RepoId) -> Result<(String, Vec<RemoteFile>)> {
    let url = format!(
        "{}/api/models/{}/{}/revision/{}?blobs=true",
        o.endpoint,
        repo.org,
        repo.name,
        repo::encode_segment(&o.revision)
    );
    let mut attempt = 0;
    loop {
        let r = http.get(&url, 0).and_then(|r| {
            if r.status == 200 {
                Ok(r)
            } else {
                Err(http::status_error(
                    r,
                    http.has_token(),
                    http::Target::Revision {
                        repo: &o.repo,
                        revision: &o.revision,
                    },
                ))
            }
        });
        match r {
            Ok(r) => {
                let final_url = r.url.clone();
                let body = r.read_small(64 << 20)?;
                let info = serde_json::from_slice(&body).map_err(|e| Error::Protocol {
                    url: final_url.clone(),
                    reason: format!("revision info is not the expected JSON: {e}"),
                })?;
                return repo::plan(repo, info, &final_url);
            }
            Err(e) if e.is_retryable() && attempt < o.retries => {
                attempt += 1;
                tracing::warn!(url = %url, attempt, error = %e, "cannot resolve the revision; retrying");
                std::thread::sleep(o.retry_delay.saturating_mul(1 << (attempt - 1).min(3)));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Every shard the index names must be among the files being pulled.
fn check_index(path: &Path, files: &[RemoteFile], repo: &RepoId, commit: &str) -> Result<()> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    let incomplete = |reason: String| Error::Incomplete {
        repo: repo.to_string(),
        commit: commit.to_string(),
        reason,
    };
    match repo::missing_shards(&bytes, files) {
        Ok(m) if m.is_empty() => Ok(()),
        Ok(m) => Err(incomplete(format!(
            "model.safetensors.index.json names shards the repo lacks: {}",
            m.join(", ")
        ))),
        Err(e) => Err(incomplete(format!(
            "model.safetensors.index.json is not valid: {e}"
        ))),
    }
}
