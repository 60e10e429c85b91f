//! Pull through the service: an admin asks the daemon to download a checkpoint from the
//! Hugging Face Hub into its model store (`[model] store`). `gemmad_hub::pull` does the
//! work on a thread of its own; its progress comes back as [`PullUpdate`]s on a channel
//! that a front end streams. The daemon's own environment supplies the Hub settings
//! (HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE): a caller cannot point the daemon elsewhere.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use gemmad_hub::{Event, PullOptions};
use tokio::sync::mpsc;

use super::types::Peer;
use super::{Core, ServiceError};

/// How often byte counts are sent (files starting and ending are always sent).
const BYTES_EVERY: Duration = Duration::from_millis(250);

/// One step of a pull, as the front ends send it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PullUpdate {
    pub commit: String,
    pub file: String,
    pub file_bytes: u64,
    pub file_size: u64,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub message: String,
    /// Set on the last update.
    pub installed_dir: Option<PathBuf>,
    pub already_installed: bool,
}

/// The updates of a running pull, ending with the installed one or an error. Dropping
/// it cancels the pull at its next progress step (the partial download stays).
pub type PullUpdates = mpsc::Receiver<Result<PullUpdate, gemmad_hub::Error>>;

impl Core {
    /// Where Pull installs (`[model] store`; set at start and at reload).
    pub fn set_model_store(&self, store: PathBuf) {
        if let Ok(mut s) = self.model_store.write() {
            *s = store;
        }
    }

    pub fn model_store(&self) -> PathBuf {
        self.model_store
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|_| PathBuf::from(gemmad_hub::env::SYSTEM_STORE))
    }

    /// Starts pulling `repo` at `revision` ("" = main) into the model store (admins only).
    pub fn pull(
        &self,
        peer: &Peer,
        repo: &str,
        revision: &str,
    ) -> Result<PullUpdates, ServiceError> {
        tracing::debug!(op = "pull", via = peer.via, peer = %peer, repo, revision, "core call");
        if !self.is_admin(peer) {
            return Err(ServiceError::PermissionDenied(format!(
                "{peer} may not pull models: it takes uid 0, gemmad's own user or a member \
                 of access.admin_groups (or run `gemmad pull` yourself)"
            )));
        }
        let repo_id =
            gemmad_hub::RepoId::parse(repo).map_err(|e| ServiceError::invalid(e.to_string()))?;
        let store = self.model_store();
        let mut o = PullOptions::from_env(&repo_id.to_string(), store.clone());
        if !revision.is_empty() {
            o.revision = revision.to_string();
        }
        tracing::info!(peer = %peer, repo = %repo_id, revision = %o.revision, store = %store.display(), endpoint = %o.endpoint, "pull started");
        let (tx, rx) = mpsc::channel(64);
        std::thread::Builder::new()
            .name("gemmad-pull".into())
            .spawn(move || run(o, tx))
            .map_err(|e| ServiceError::Internal(format!("cannot start the pull thread: {e}")))?;
        Ok(rx)
    }
}

/// The pull thread: runs the download, turning its events into updates.
fn run(o: PullOptions, tx: mpsc::Sender<Result<PullUpdate, gemmad_hub::Error>>) {
    let mut cur = PullUpdate::default();
    let mut last_bytes: Option<Instant> = None;
    let r = gemmad_hub::pull(&o, &mut |e: &Event<'_>| {
        let mut send = true;
        cur.message.clear();
        match e {
            Event::Resolved {
                commit,
                files,
                total,
            } => {
                cur.commit = commit.to_string();
                cur.total_bytes = *total;
                cur.message = format!("resolved {}@{}: {} files", o.repo, o.revision, files.len());
            }
            Event::FileStarted {
                name,
                size,
                resume_from,
            } => {
                cur.file = name.to_string();
                cur.file_size = *size;
                cur.file_bytes = *resume_from;
                if *resume_from > 0 {
                    cur.message = format!("{name}: resuming at byte {resume_from}");
                }
            }
            Event::Bytes {
                file_done, done, ..
            } => {
                cur.file_bytes = *file_done;
                cur.done_bytes = *done;
                send = last_bytes.is_none_or(|t| t.elapsed() >= BYTES_EVERY);
                if send {
                    last_bytes = Some(Instant::now());
                }
            }
            Event::Retrying {
                name,
                attempt,
                reason,
            } => cur.message = format!("{name}: retry {attempt}: {reason}"),
            Event::FileDone { name, size } => {
                cur.file_bytes = *size;
                cur.message = format!("{name}: verified");
            }
            // The final update is sent below, with the result.
            Event::Installed { .. } => send = false,
        }
        if !send {
            return ControlFlow::Continue(());
        }
        // A closed channel: the caller went away; stop (the part stays for a resume).
        match tx.blocking_send(Ok(cur.clone())) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    });
    let last = match r {
        Ok(p) => {
            tracing::info!(repo = %o.repo, commit = %p.manifest.commit, dir = %p.dir.display(), downloaded = p.downloaded, already = p.already_installed, "pull done");
            Ok(PullUpdate {
                commit: p.manifest.commit.clone(),
                file: String::new(),
                file_bytes: 0,
                file_size: 0,
                done_bytes: p.manifest.files.iter().map(|f| f.size).sum(),
                total_bytes: p.manifest.files.iter().map(|f| f.size).sum(),
                message: format!(
                    "{} {} in {}",
                    if p.already_installed {
                        "already installed:"
                    } else {
                        "installed"
                    },
                    o.repo,
                    p.dir.display()
                ),
                installed_dir: Some(p.dir),
                already_installed: p.already_installed,
            })
        }
        Err(e) => {
            tracing::warn!(repo = %o.repo, error = %e, "pull failed");
            Err(e)
        }
    };
    let _ = tx.blocking_send(last);
}
