//! Downloading one file: into `<file>.part` in the pull's work directory, resumed with
//! `Range: bytes=N-` (a 206 must start at N; a 200 restarts from zero), hashed while it
//! is written (a resumed part is hashed first), retried with backoff on network errors
//! and 5xx, then checked against the Hub's size and sha256 (LFS) or git blob id, fsynced
//! and renamed to its name.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::ControlFlow;
use std::path::Path;

use sha1::Digest;

use crate::error::{Error, Result};
use crate::http::{status_error, Fetched, Http, Target};
use crate::repo::RemoteFile;
use crate::{Event, Progress};

/// How often (bytes) a file's progress is reported.
const REPORT_EVERY: u64 = 256 << 10;

/// The shared state of a pull's downloads.
pub(crate) struct Ctx<'a> {
    pub http: &'a Http,
    pub progress: &'a mut dyn Progress,
    pub repo: &'a str,
    pub commit: &'a str,
    pub retries: u32,
    pub retry_delay: std::time::Duration,
    /// Bytes of all files done so far (this run and earlier ones).
    pub done: u64,
    pub total: u64,
    /// Bytes actually transferred in this run.
    pub downloaded: u64,
}

impl Ctx<'_> {
    pub(crate) fn emit(&mut self, e: Event<'_>) -> Result<()> {
        match self.progress.event(&e) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(Error::Cancelled(self.repo.to_string())),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of the content and, for files kept in git, their blob id as git hashes it.
struct Hashers {
    sha256: sha2::Sha256,
    git: Option<sha1::Sha1>,
}

impl Hashers {
    fn new(f: &RemoteFile) -> Hashers {
        Hashers {
            sha256: sha2::Sha256::new(),
            git: f.git_sha1.as_ref().map(|_| {
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {}\0", f.size).as_bytes());
                h
            }),
        }
    }

    fn update(&mut self, b: &[u8]) {
        self.sha256.update(b);
        if let Some(g) = &mut self.git {
            g.update(b);
        }
    }
}

/// The open part file and what is known of it.
struct Part<'p> {
    path: &'p Path,
    file: File,
    have: u64,
    hash: Hashers,
}

impl Part<'_> {
    /// Back to an empty file.
    fn restart(&mut self, f: &RemoteFile) -> Result<()> {
        self.file.set_len(0).map_err(Error::io(self.path))?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(Error::io(self.path))?;
        self.have = 0;
        self.hash = Hashers::new(f);
        Ok(())
    }
}

/// Opens `path` for appending and hashes what it already holds.
fn open_part<'p>(path: &'p Path, f: &RemoteFile) -> Result<Part<'p>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(Error::io(path))?;
    let mut part = Part {
        path,
        file,
        have: 0,
        hash: Hashers::new(f),
    };
    let len = part.file.metadata().map_err(Error::io(path))?.len();
    if len > f.size {
        part.restart(f)?;
        return Ok(part);
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = part.file.read(&mut buf[..want]).map_err(Error::io(path))?;
        if n == 0 {
            break;
        }
        part.hash.update(&buf[..n]);
        left -= n as u64;
    }
    part.have = len - left;
    part.file
        .set_len(part.have)
        .and_then(|_| part.file.seek(SeekFrom::Start(part.have)))
        .map_err(Error::io(path))?;
    Ok(part)
}

/// Downloads `f` from `url` into `dir/<name>`; returns its sha256.
pub(crate) fn fetch(ctx: &mut Ctx<'_>, f: &RemoteFile, url: &str, dir: &Path) -> Result<String> {
    let part_path = dir.join(format!("{}.part", f.name));
    let dest = dir.join(&f.name);
    let mut part = open_part(&part_path, f)?;
    if part.have > 0 {
        tracing::info!(file = %f.name, from = part.have, size = f.size, "resuming");
    }
    ctx.emit(Event::FileStarted {
        name: &f.name,
        size: f.size,
        resume_from: part.have,
    })?;
    ctx.done += part.have;
    let mut attempt = 0u32;
    while part.have < f.size {
        let before = part.have;
        match transfer(ctx, f, url, &mut part) {
            Ok(()) if part.have == f.size => break,
            // A clean end before the size: the connection was cut; resume.
            Ok(()) => {
                let e = Error::Network {
                    url: url.into(),
                    reason: format!("the answer ended after {} of {} bytes", part.have, f.size),
                };
                retry_or_fail(ctx, f, &mut attempt, before != part.have, e)?;
            }
            Err(e) if e.is_retryable() => {
                retry_or_fail(ctx, f, &mut attempt, before != part.have, e)?
            }
            Err(e) => return Err(e),
        }
    }
    let sha256 = hex(&part.hash.sha256.finalize_reset());
    let git = part.hash.git.take().map(|g| hex(&g.finalize()));
    let bad = |what, expected: &str, actual: &str| {
        let _ = std::fs::remove_file(&part_path);
        Error::Integrity {
            file: f.name.clone(),
            what,
            expected: expected.into(),
            actual: actual.into(),
        }
    };
    if let Some(want) = &f.sha256 {
        if *want != sha256 {
            return Err(bad("sha256", want, &sha256));
        }
    }
    if let (Some(want), Some(got)) = (&f.git_sha1, &git) {
        if want != got {
            return Err(bad("git blob sha1", want, got));
        }
    }
    part.file.sync_all().map_err(Error::io(&part_path))?;
    drop(part);
    std::fs::rename(&part_path, &dest).map_err(Error::io(&dest))?;
    ctx.emit(Event::FileDone {
        name: &f.name,
        size: f.size,
    })?;
    Ok(sha256)
}

/// Counts a failed attempt (the count starts over when the attempt made progress) and
/// waits before the next, or gives up with `e`.
fn retry_or_fail(
    ctx: &mut Ctx<'_>,
    f: &RemoteFile,
    attempt: &mut u32,
    progressed: bool,
    e: Error,
) -> Result<()> {
    if progressed {
        *attempt = 0;
    }
    *attempt += 1;
    if *attempt > ctx.retries {
        return Err(e);
    }
    let reason = e.to_string();
    tracing::warn!(file = %f.name, attempt = *attempt, error = %reason, "download failed; retrying");
    ctx.emit(Event::Retrying {
        name: &f.name,
        attempt: *attempt,
        reason: &reason,
    })?;
    let wait = ctx
        .retry_delay
        .saturating_mul(1 << (*attempt - 1).min(3))
        .min(std::time::Duration::from_secs(8));
    std::thread::sleep(wait);
    Ok(())
}

/// Checks a 206's `Content-Range: bytes a-b/total` against what was asked for.
fn range_matches(r: &Fetched, from: u64, size: u64) -> bool {
    let Some(v) = r.header("content-range") else {
        return false;
    };
    let Some(rest) = v.strip_prefix("bytes ") else {
        return false;
    };
    let Some((range, total)) = rest.split_once('/') else {
        return false;
    };
    let start = range.split_once('-').map(|(a, _)| a.trim());
    start.and_then(|s| s.parse::<u64>().ok()) == Some(from)
        && (total.trim() == "*" || total.trim().parse::<u64>().ok() == Some(size))
}

/// One request: appends what it gets to the part. `Ok` when the body ended cleanly.
fn transfer(ctx: &mut Ctx<'_>, f: &RemoteFile, url: &str, part: &mut Part<'_>) -> Result<()> {
    let r = ctx.http.get(url, part.have)?;
    match r.status {
        200 => {
            if part.have > 0 {
                tracing::info!(file = %f.name, from = part.have, "the server ignored the Range; restarting from byte 0");
                ctx.done -= part.have;
                part.restart(f)?;
            }
        }
        206 if range_matches(&r, part.have, f.size) => {}
        206 => {
            let got = r.header("content-range").unwrap_or("").to_string();
            return Err(Error::Protocol {
                url: r.url,
                reason: format!(
                    "asked for bytes {}- of {}, got Content-Range {got:?}",
                    part.have, f.size
                ),
            });
        }
        416 => {
            // Past the end: the part cannot be right (it is shorter than the size).
            ctx.done -= part.have;
            part.restart(f)?;
            return Err(Error::Status {
                url: r.url,
                status: 416,
                message: "range not satisfiable; restarting the file".into(),
            });
        }
        _ => {
            let token = ctx.http.has_token();
            return Err(status_error(
                r,
                token,
                Target::File {
                    repo: ctx.repo,
                    file: &f.name,
                },
            ));
        }
    }
    check_hub_headers(ctx, f, &r)?;
    let url = r.url.clone();
    let mut body = r.body.into_reader();
    let mut buf = vec![0u8; 256 << 10];
    let mut reported = part.have;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Network {
                    url,
                    reason: format!("connection lost after {} bytes: {e}", part.have),
                })
            }
        };
        if part.have + n as u64 > f.size {
            ctx.done -= part.have;
            part.restart(f)?;
            return Err(Error::Protocol {
                url,
                reason: format!("more bytes than the {} the Hub announced", f.size),
            });
        }
        part.file
            .write_all(&buf[..n])
            .map_err(Error::io(part.path))?;
        part.hash.update(&buf[..n]);
        part.have += n as u64;
        ctx.done += n as u64;
        ctx.downloaded += n as u64;
        if part.have - reported >= REPORT_EVERY || part.have == f.size {
            reported = part.have;
            ctx.emit(Event::Bytes {
                name: &f.name,
                file_done: part.have,
                file_size: f.size,
                done: ctx.done,
                total: ctx.total,
            })?;
        }
    }
    Ok(())
}

/// The Hub's headers on the `/resolve/` answer: the commit must be the one resolved (a
/// Hub always sends it), and an LFS file's etag its sha256.
fn check_hub_headers(ctx: &Ctx<'_>, f: &RemoteFile, r: &Fetched) -> Result<()> {
    match &r.repo_commit {
        None => {
            return Err(Error::Protocol {
                url: r.url.clone(),
                reason: "no X-Repo-Commit header on the file's answer".into(),
            })
        }
        Some(c) if c != ctx.commit => {
            return Err(Error::Protocol {
                url: r.url.clone(),
                reason: format!("X-Repo-Commit is {c}, expected {}", ctx.commit),
            })
        }
        Some(_) => {}
    }
    if let (Some(want), Some(etag)) = (&f.sha256, &r.etag) {
        if etag.len() == 64 && etag != want {
            return Err(Error::Protocol {
                url: r.url.clone(),
                reason: format!(
                    "{}: the Hub's etag {etag} is not the sha256 {want} its metadata gave",
                    f.name
                ),
            });
        }
    }
    Ok(())
}

/// Whether a file already complete in the work directory (an earlier run stopped after
/// it) is right; returns its sha256.
pub(crate) fn verify_existing(path: &Path, f: &RemoteFile) -> Option<String> {
    if std::fs::metadata(path).ok()?.len() != f.size {
        return None;
    }
    let mut file = File::open(path).ok()?;
    let mut h = Hashers::new(f);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let sha256 = hex(&h.sha256.finalize());
    let ok = f.sha256.as_ref().is_none_or(|w| *w == sha256)
        && match (&f.git_sha1, h.git) {
            (Some(w), Some(g)) => *w == hex(&g.finalize()),
            _ => true,
        };
    ok.then_some(sha256)
}
