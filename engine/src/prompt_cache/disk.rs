//! The prompt cache's disk tier: kept K/V states as files in `<cache_dir>/prompt-cache`,
//! so that a long system prompt or document survives a restart and comes back by a copy
//! instead of a prefill.
//!
//! A file is `prompt-<model folder hash>-<state key>.kv`: 8 bytes of magic, the length of
//! a JSON header (u64 LE), the header (version, the checkpoint key, element type and
//! geometry, owner, slice, tokens, the spans that follow), the spans' K and V as
//! little-endian elements, and an xxh64 of everything before it. Files are written by a
//! background thread through the cache directory's atomic path (temporary file, sync,
//! rename; mode 0600: they hold what users sent). At start only the headers are read; a
//! state's data is checked against its checksum when it is used. A file of another
//! checkpoint, version or geometry is stale and removed; an unreadable or corrupt one is
//! removed with a warning, and the request prefills as if it were not there.

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{resume_at, CacheOwner, Entry, Snapshot};
use crate::derived::{xxh64, CacheDir, Existing};
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvBuf, KvDType, KvSpan};

const MAGIC: &[u8; 8] = b"GMDKVC01";
const VERSION: u32 = 1;
/// The header is small (tokens are most of it); anything larger is not ours.
const MAX_HEADER: u64 = 64 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    checkpoint: String,
    dtype: String,
    kv_dim: usize,
    head_dim: usize,
    window: usize,
    slice: String,
    user: Option<u32>,
    shared: bool,
    pinned: bool,
    tokens: Vec<u32>,
    /// `[layer, lo, hi]` of each full-layer span, in data order.
    full: Vec<[usize; 3]>,
    snaps: Vec<SnapHeader>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapHeader {
    at: usize,
    rings: Vec<[usize; 3]>,
}

/// What the index knows of a file without reading its data.
#[derive(Clone, Debug)]
pub(crate) struct DiskEntry {
    pub name: String,
    pub tokens: Arc<[u32]>,
    pub owner: CacheOwner,
    pub slice: String,
    pub window: usize,
    pub pinned: bool,
    pub snaps: Vec<usize>,
    pub bytes: u64,
    pub last_used: SystemTime,
}

/// The geometry every file must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub checkpoint: String,
    pub dtype: KvDType,
    pub kv_dim: usize,
    pub head_dim: usize,
}

fn dtype_name(d: KvDType) -> &'static str {
    match d {
        KvDType::F32 => "f32",
        KvDType::F16 => "f16",
    }
}

struct Shared {
    dir: CacheDir,
    prefix: String,
    geometry: Geometry,
    budget: u64,
    index: Mutex<Vec<DiskEntry>>,
}

/// The disk tier: the index of files and the writer thread.
pub(crate) struct DiskTier {
    shared: Arc<Shared>,
    writer: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("dir", &self.shared.dir.path())
            .finish()
    }
}

impl DiskTier {
    /// Opens (creating) the tier's folder and reads the headers of its files.
    pub fn open(dir: CacheDir, folder: u64, geometry: Geometry, budget: u64) -> Result<DiskTier> {
        let prefix = format!("prompt-{folder:016x}-");
        let mut index = Vec::new();
        for name in dir.list(&prefix)? {
            match read_header(&dir, &name) {
                Ok(Some((h, bytes, mtime))) if matches(&h, &geometry) => index.push(DiskEntry {
                    name,
                    tokens: h.tokens.into(),
                    owner: CacheOwner {
                        user: h.user,
                        shared: h.shared,
                    },
                    slice: h.slice,
                    window: h.window,
                    pinned: h.pinned,
                    snaps: h.snaps.iter().map(|s| s.at).collect(),
                    bytes,
                    last_used: mtime,
                }),
                Ok(Some(_)) => {
                    tracing::info!(file = %dir.path_of(&name).display(),
                        "removing a prompt-cache file of another checkpoint or format");
                    let _ = dir.remove(&name);
                }
                Ok(None) => {}
                Err(reason) => {
                    tracing::warn!(file = %dir.path_of(&name).display(), %reason,
                        "removing an unreadable prompt-cache file");
                    let _ = dir.remove(&name);
                }
            }
        }
        tracing::info!(dir = %dir.path().display(), files = index.len(),
            bytes = index.iter().map(|e| e.bytes).sum::<u64>(), budget, "prompt cache disk tier");
        let shared = Arc::new(Shared {
            dir,
            prefix,
            geometry,
            budget,
            index: Mutex::new(index),
        });
        let (tx, thread) = spawn_writer(&shared)?;
        Ok(DiskTier {
            shared,
            writer: Some(tx),
            thread: Some(thread),
        })
    }

    /// The file name of `e`'s state.
    pub fn name_of(&self, e: &Entry) -> String {
        let owner = match (e.owner.shared, e.owner.user) {
            (true, _) => "shared".to_string(),
            (false, Some(u)) => format!("u{u}"),
            (false, None) => "local".to_string(),
        };
        format!(
            "{}{}-{}.kv",
            self.shared.prefix,
            owner,
            super::key_of(&e.slice, &e.tokens)
        )
    }

    /// Queues `e` to be written (unless a file of it is already there). Returns its name.
    pub fn save(&self, e: &Entry) -> String {
        let name = self.name_of(e);
        let known = self
            .shared
            .index
            .lock()
            .map(|ix| {
                ix.iter().any(|d| {
                    d.name == name && d.snaps.len() >= e.snaps.len() && d.pinned >= e.pinned
                })
            })
            .unwrap_or(false);
        if !known {
            if let Some(tx) = &self.writer {
                let _ = tx.send(Job::Write(name.clone(), e.clone()));
            }
        }
        name
    }

    /// Waits until every queued write is done (an explicit persist, tests).
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if let Some(tx) = &self.writer {
            if tx.send(Job::Flush(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }

    /// The file that resumes the most of `prompt` for `user` on `slice`, and where.
    pub fn best(
        &self,
        prompt: &[u32],
        user: Option<u32>,
        slice: &str,
        window: usize,
    ) -> Option<(String, usize)> {
        let ix = self.shared.index.lock().ok()?;
        ix.iter()
            .filter(|d| d.owner.admits(user) && d.slice == slice && d.window == window)
            .filter_map(|d| {
                let p = super::common_prefix(&d.tokens, prompt).min(d.tokens.len());
                let w = (window > 0).then_some(window);
                let s = d.snaps.iter().filter_map(|&at| resume_at(at, w, p)).max()?;
                Some((s, d.name.clone()))
            })
            .max()
            .map(|(s, n)| (n, s))
    }

    /// Reads the state in `name`, checked; a bad file is removed.
    pub fn load(&self, name: &str) -> Result<Entry> {
        let r = self.shared.read(name);
        match &r {
            Ok(_) => self.shared.touch(name),
            Err(e) => {
                tracing::warn!(file = %self.shared.dir.path_of(name).display(), error = %e,
                    "ignoring and removing a prompt-cache file");
                self.forget(name);
            }
        }
        r
    }

    /// Removes `name`'s file.
    pub fn forget(&self, name: &str) {
        let _ = self.shared.dir.remove(name);
        if let Ok(mut ix) = self.shared.index.lock() {
            ix.retain(|d| d.name != name);
        }
    }

    /// Files of pinned states, for the engine's state report.
    pub fn entries(&self) -> Vec<DiskEntry> {
        self.shared
            .index
            .lock()
            .map(|ix| ix.clone())
            .unwrap_or_default()
    }

    pub fn budget(&self) -> u64 {
        self.shared.budget
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        self.writer = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the writer thread is asked to do, in order.
enum Job {
    Write(String, Entry),
    /// Answer once everything queued before is written.
    Flush(mpsc::Sender<()>),
}

type Writer = (mpsc::Sender<Job>, std::thread::JoinHandle<()>);

/// The thread that writes queued states, in order.
fn spawn_writer(shared: &Arc<Shared>) -> Result<Writer> {
    let (tx, rx) = mpsc::channel::<Job>();
    let s2 = shared.clone();
    let thread = std::thread::Builder::new()
        .name("gemmad-kv-writer".into())
        .spawn(move || {
            for job in rx {
                match job {
                    Job::Write(name, e) => {
                        if let Err(err) = s2.write(&name, &e) {
                            tracing::warn!(file = %s2.dir.path_of(&name).display(), error = %err,
                                "cannot write a prompt-cache file");
                        }
                    }
                    Job::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        })
        .map_err(|e| EngineError::io(shared.dir.path(), e))?;
    Ok((tx, thread))
}

fn matches(h: &Header, g: &Geometry) -> bool {
    h.version == VERSION
        && h.checkpoint == g.checkpoint
        && h.dtype == dtype_name(g.dtype)
        && h.kv_dim == g.kv_dim
        && h.head_dim == g.head_dim
}

/// The header of `name`, its size and mtime; `None` when it is not a trusted file.
fn read_header(
    dir: &CacheDir,
    name: &str,
) -> std::result::Result<Option<(Header, u64, SystemTime)>, String> {
    use std::io::Read;
    let mut f = match dir.open_existing(name).map_err(|e| e.to_string())? {
        Existing::File(f) => f,
        Existing::Missing => return Ok(None),
        Existing::Untrusted(reason) => {
            tracing::warn!(file = %dir.path_of(name).display(), %reason, "ignoring a prompt-cache file");
            return Ok(None);
        }
    };
    let md = f.metadata().map_err(|e| e.to_string())?;
    let mut head = [0u8; 16];
    f.read_exact(&mut head).map_err(|e| e.to_string())?;
    if &head[..8] != MAGIC {
        return Err("not a prompt-cache file (bad magic)".into());
    }
    let n = u64::from_le_bytes(head[8..16].try_into().map_err(|_| "short header")?);
    if n > MAX_HEADER || 16 + n + 8 > md.len() {
        return Err(format!("header length {n} does not fit the file"));
    }
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json).map_err(|e| e.to_string())?;
    let h: Header = serde_json::from_slice(&json).map_err(|e| format!("bad header: {e}"))?;
    Ok(Some((
        h,
        md.len(),
        md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    )))
}

fn span_elems(kv_dim: usize, head_dim: usize, lo: usize, hi: usize) -> Option<usize> {
    (kv_dim / head_dim.max(1))
        .checked_mul(hi.checked_sub(lo)?)?
        .checked_mul(head_dim)
}

impl Shared {
    fn write(&self, name: &str, e: &Entry) -> Result<()> {
        let g = &self.geometry;
        let span_hdr = |(l, s): &(usize, KvSpan)| [*l, s.lo, s.hi];
        let h = Header {
            version: VERSION,
            checkpoint: g.checkpoint.clone(),
            dtype: dtype_name(g.dtype).into(),
            kv_dim: g.kv_dim,
            head_dim: g.head_dim,
            window: e.window,
            slice: e.slice.to_string(),
            user: e.owner.user,
            shared: e.owner.shared,
            pinned: e.pinned,
            tokens: e.tokens.to_vec(),
            full: e.full.iter().map(span_hdr).collect(),
            snaps: e
                .snaps
                .iter()
                .map(|s| SnapHeader {
                    at: s.at,
                    rings: s.rings.iter().map(span_hdr).collect(),
                })
                .collect(),
        };
        let json = serde_json::to_vec(&h).map_err(|err| EngineError::Config {
            path: self.dir.path_of(name),
            reason: err.to_string(),
        })?;
        let mut buf = Vec::with_capacity(e.bytes() + json.len() + 32);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(json.len() as u64).to_le_bytes());
        buf.extend_from_slice(&json);
        let spans = e
            .full
            .iter()
            .chain(e.snaps.iter().flat_map(|s| s.rings.iter()));
        for (_, s) in spans {
            s.k.write_le(&mut buf);
            s.v.write_le(&mut buf);
        }
        let sum = xxh64(&buf, 0);
        buf.extend_from_slice(&sum.to_le_bytes());
        // Room first: the least recently used files (unpinned first) go.
        self.make_room(buf.len() as u64, name);
        if buf.len() as u64 > self.budget {
            return Ok(());
        }
        let (tmp, mut f) = self.dir.create_private_temp(name)?;
        f.write_all(&buf)
            .map_err(|err| EngineError::io(tmp.path(), err))?;
        tmp.commit(f)?;
        let d = DiskEntry {
            name: name.to_string(),
            tokens: e.tokens.clone(),
            owner: e.owner,
            slice: e.slice.to_string(),
            window: e.window,
            pinned: e.pinned,
            snaps: e.snaps.iter().map(|s| s.at).collect(),
            bytes: buf.len() as u64,
            last_used: SystemTime::now(),
        };
        if let Ok(mut ix) = self.index.lock() {
            ix.retain(|x| x.name != name);
            ix.push(d);
        }
        tracing::debug!(file = %self.dir.path_of(name).display(), bytes = buf.len(), tokens = e.tokens.len(), "prompt-cache file written");
        Ok(())
    }

    fn make_room(&self, need: u64, replacing: &str) {
        let Ok(mut ix) = self.index.lock() else {
            return;
        };
        ix.retain(|x| x.name != replacing);
        loop {
            let used: u64 = ix.iter().map(|d| d.bytes).sum();
            if used + need <= self.budget {
                break;
            }
            let Some(i) = ix
                .iter()
                .enumerate()
                .min_by_key(|(_, d)| (d.pinned, d.last_used))
                .map(|(i, _)| i)
            else {
                break;
            };
            let d = ix.remove(i);
            let _ = self.dir.remove(&d.name);
            tracing::debug!(file = %self.dir.path_of(&d.name).display(), "prompt-cache file evicted");
        }
    }

    fn touch(&self, name: &str) {
        if let Ok(Existing::File(f)) = self.dir.open_existing(name) {
            let _ = f.set_modified(SystemTime::now());
        }
        if let Ok(mut ix) = self.index.lock() {
            if let Some(d) = ix.iter_mut().find(|d| d.name == name) {
                d.last_used = SystemTime::now();
            }
        }
    }

    fn read(&self, name: &str) -> Result<Entry> {
        let bad = |reason: String| EngineError::Config {
            path: self.dir.path_of(name),
            reason,
        };
        let f = match self.dir.open_existing(name)? {
            Existing::File(f) => f,
            Existing::Missing => return Err(bad("is gone".into())),
            Existing::Untrusted(r) => return Err(bad(r)),
        };
        // SAFETY: the file is ours (checked by open_existing) and only ever replaced by
        // rename, never written in place, so the mapping does not change under us.
        let map = unsafe { memmap2::Mmap::map(&f) }
            .map_err(|e| EngineError::io(self.dir.path_of(name), e))?;
        let mut e = parse(&map, &self.geometry).map_err(bad)?;
        e.file = Some(name.to_string());
        Ok(e)
    }
}

/// A state file's bytes as an [`Entry`], checked: magic, checksum, header, the geometry
/// it was made for, span sizes against the data, snapshots against the tokens.
pub(crate) fn parse(b: &[u8], geometry: &Geometry) -> std::result::Result<Entry, String> {
    if b.len() < 24 || &b[..8] != MAGIC {
        return Err("not a prompt-cache file".into());
    }
    let (body, tail) = b.split_at(b.len() - 8);
    let want = u64::from_le_bytes(tail.try_into().map_err(|_| "short")?);
    if xxh64(body, 0) != want {
        return Err("checksum mismatch (corrupt file)".into());
    }
    let n = u64::from_le_bytes(body[8..16].try_into().map_err(|_| "short")?);
    if n > MAX_HEADER || 16 + n > body.len() as u64 {
        return Err(format!("header length {n} does not fit the file"));
    }
    let n = n as usize;
    let h: Header =
        serde_json::from_slice(&body[16..16 + n]).map_err(|e| format!("bad header: {e}"))?;
    if !matches(&h, geometry) {
        return Err("made for another checkpoint or format".into());
    }
    let mut data = &body[16 + n..];
    let eb = geometry.dtype.bytes();
    let mut take = |[l, lo, hi]: [usize; 3]| -> std::result::Result<(usize, KvSpan), String> {
        let elems = span_elems(h.kv_dim, h.head_dim, lo, hi)
            .ok_or_else(|| format!("bad span {lo}..{hi}"))?;
        let need = elems.checked_mul(2 * eb).ok_or("span too large")?;
        if data.len() < need {
            return Err("shorter than its header says".into());
        }
        let (mut k, mut v) = (
            KvBuf::plain(geometry.dtype, elems),
            KvBuf::plain(geometry.dtype, elems),
        );
        k.read_le(&data[..elems * eb]);
        v.read_le(&data[elems * eb..need]);
        data = &data[need..];
        Ok((l, KvSpan { lo, hi, k, v }))
    };
    let full = h
        .full
        .iter()
        .map(|&s| take(s))
        .collect::<std::result::Result<Vec<_>, String>>()?;
    let mut snaps = Vec::new();
    for sh in &h.snaps {
        let rings = sh
            .rings
            .iter()
            .map(|&s| take(s))
            .collect::<std::result::Result<Vec<_>, String>>()?;
        snaps.push(Arc::new(Snapshot { at: sh.at, rings }));
    }
    if !data.is_empty() {
        return Err("longer than its header says".into());
    }
    if h.tokens.is_empty() {
        return Err("holds no tokens".into());
    }
    if snaps.is_empty() || snaps.iter().any(|s| s.at > h.tokens.len()) {
        return Err("snapshots do not fit its tokens".into());
    }
    if full
        .iter()
        .any(|(_, s)| s.lo != 0 || s.hi != h.tokens.len())
    {
        return Err("full-layer spans do not cover its tokens".into());
    }
    let mut e = Entry {
        tokens: h.tokens.into(),
        full: Arc::new(full),
        snaps,
        owner: CacheOwner {
            user: h.user,
            shared: h.shared,
        },
        slice: h.slice.into(),
        window: h.window,
        pinned: h.pinned,
        last_used: 0,
        file: None,
    };
    e.tidy_snaps();
    Ok(e)
}
