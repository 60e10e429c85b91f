//! The prompt cache in the engine: before a prefill, the cache is brought to the longest
//! prefix of the prompt that the running sequence, a kept state or a state file holds;
//! the sequence a new request replaces is kept; pinned prompts; the governor's drop. The
//! states themselves and their rules are in [`crate::prompt_cache`].

use std::sync::Arc;

use super::Engine;
use crate::error::{EngineError, Result};
use crate::matformer::SlicePlan;
use crate::prompt_cache::disk::{DiskTier, Geometry};
use crate::prompt_cache::{
    common_prefix, key_of, resume_at, window_of, CacheOwner, Entry, PinnedPrompt,
    PromptCacheOptions, PromptCacheState, Snapshot, Store,
};

/// What the engine's cache holds now, as a state that can be resumed or kept.
#[derive(Debug)]
pub(super) struct Live {
    /// The tokens of the cache's positions.
    pub tokens: Vec<u32>,
    pub user: Option<u32>,
    pub slice: Arc<str>,
    /// Ring snapshots taken during this sequence (prompt ends).
    pub snaps: Vec<Arc<Snapshot>>,
    /// Tokens of it already kept in the store (nothing new to keep below that).
    pub saved: usize,
}

/// Most prompt-end snapshots the running sequence carries (the first and the latest).
const LIVE_SNAPSHOTS: usize = 3;

/// A pinned prompt's extra snapshot this many tokens before its end, so that a request
/// whose tokenization differs at the boundary still resumes most of it.
const PIN_MARGIN: usize = 8;

#[derive(Debug)]
pub(super) struct PromptCache {
    pub opts: PromptCacheOptions,
    pub store: Store,
    pub disk: Option<DiskTier>,
    pub live: Option<Live>,
}

impl PromptCache {
    pub fn new(opts: PromptCacheOptions, disk: Option<DiskTier>) -> Self {
        PromptCache {
            store: Store::new(opts.ram_bytes),
            opts,
            disk,
            live: None,
        }
    }
}

/// Opens the disk tier under `cache_dir` for a model, or says why not.
pub(super) fn open_disk(
    opts: &PromptCacheOptions,
    cache_dir: Option<&std::path::Path>,
    ckpt: &crate::checkpoint::Checkpoint,
    cfg: &crate::config::TextConfig,
    dtype: crate::kv_cache::KvDType,
) -> std::result::Result<Option<DiskTier>, String> {
    if opts.disk_bytes == 0 || !opts.enabled {
        return Ok(None);
    }
    let Some(dir) = cache_dir else {
        return Err("the prompt cache's disk tier needs a cache directory (cache_dir)".into());
    };
    let path = dir.join("prompt-cache");
    let go = || -> Result<DiskTier> {
        let d = crate::derived::CacheDir::open(&path)?;
        let key = crate::derived::checkpoint_key(ckpt, b"gemmad prompt cache")?;
        let geometry = Geometry {
            checkpoint: key.iter().map(|b| format!("{b:02x}")).collect(),
            dtype,
            kv_dim: cfg.kv_dim(),
            head_dim: cfg.head_dim,
        };
        DiskTier::open(
            d,
            crate::derived::folder_hash(&ckpt.dir),
            geometry,
            opts.disk_bytes,
        )
    };
    go().map(Some).map_err(|e| {
        format!(
            "{}: the prompt cache's disk tier is off ({e}); kept prompts stay in RAM only",
            path.display()
        )
    })
}

/// Where a request resumes from.
enum Source {
    /// The running sequence: its rings as they are (`None`) or one of its snapshots.
    Live(Option<usize>),
    /// A kept state in RAM: entry and snapshot.
    Ram(usize, usize),
    /// A state file.
    Disk(String),
}

impl Engine {
    /// Brings the cache to the longest prefix of `prompt` (all but its last token, whose
    /// logits start the generation) that a state `user` may use holds on `slice`, and
    /// makes the running sequence that prefix. Returns its length (0: prefill it all).
    pub(super) fn resume_prefix(
        &mut self,
        prompt: &[u32],
        user: Option<u32>,
        use_cache: bool,
        slice: &SlicePlan,
    ) -> usize {
        let slice_name: Arc<str> = slice.name.as_str().into();
        if !self.prompts.opts.enabled || !use_cache || prompt.is_empty() {
            self.keep_live();
            self.cache.clear();
            self.prompts.live = None;
            return 0;
        }
        let want = &prompt[..prompt.len() - 1];
        let window = window_of(&self.cache);
        let mut best: (usize, u8, Option<Source>) = (0, 0, None);
        let mut offer = |s: usize, rank: u8, src: Source| {
            if s > 0 && (s, rank) > (best.0, best.1) {
                best = (s, rank, Some(src));
            }
        };
        if let Some(live) = &self.prompts.live {
            if live.user == user
                && live.slice == slice_name
                && live.tokens.len() == self.cache.len()
            {
                let p = common_prefix(&live.tokens, want);
                if let Some(s) = resume_at(self.cache.len(), window, p) {
                    offer(s, 3, Source::Live(None));
                }
                for (i, sn) in live.snaps.iter().enumerate() {
                    if let Some(s) = resume_at(sn.at, window, p) {
                        offer(s, 3, Source::Live(Some(i)));
                    }
                }
            }
        }
        if let Some((i, s, snap)) = self
            .prompts
            .store
            .best(want, user, &slice_name, &self.cache)
        {
            offer(s, 2, Source::Ram(i, snap));
        }
        if let Some(d) = &self.prompts.disk {
            if let Some((name, s)) = d.best(want, user, &slice_name, window.unwrap_or(0)) {
                offer(s, 1, Source::Disk(name));
            }
        }
        let (s, _, src) = best;
        let Some(src) = src else {
            self.keep_live();
            self.cache.clear();
            self.start_live(user, slice);
            return 0;
        };
        match src {
            Source::Live(snap) => {
                let min = self.prompts.opts.min_tokens;
                if let Some(live) = &self.prompts.live {
                    // The rest of the running sequence is a branch worth keeping when
                    // the new prompt leaves it inside its last prompt (another
                    // conversation with the same start, an edited turn); not when it
                    // only drops what was generated after that prompt (the next turn of
                    // a chat whose answer came back tokenized differently).
                    let last_prompt = live.snaps.last().map_or(0, |x| x.at);
                    if live.tokens.len() >= s + min && s < last_prompt {
                        self.keep_live();
                    }
                }
                let Some(live) = self.prompts.live.as_mut() else {
                    return 0;
                };
                match snap {
                    None => self.cache.truncate(s),
                    Some(i) => {
                        for (l, span) in &live.snaps[i].rings {
                            self.cache.import(*l, span, s);
                        }
                        self.cache.set_len(s);
                    }
                }
                live.tokens.truncate(s);
                live.snaps.retain(|x| x.at <= s);
                live.saved = live.saved.min(s);
            }
            Source::Ram(i, snap) => {
                // Keeping the running sequence may merge or evict entries: work on a
                // copy (its data is shared, not copied) and touch it by identity after.
                let e = self.prompts.store.entries[i].clone();
                self.keep_live();
                let t = self.prompts.store.tick();
                if let Some(x) = self
                    .prompts
                    .store
                    .entries
                    .iter_mut()
                    .find(|x| Arc::ptr_eq(&x.full, &e.full))
                {
                    x.last_used = t;
                }
                self.resume_entry(&e, snap, s, user, slice_name);
            }
            Source::Disk(name) => {
                self.keep_live();
                let loaded = self.prompts.disk.as_ref().map(|d| d.load(&name));
                // The file is checked as it is read: one that does not fit, or no longer
                // resumes this prompt, costs a prefill.
                let resumed = match loaded {
                    Some(Ok(e)) if e.fits(&self.cache) => e
                        .resume_point(common_prefix(&e.tokens, want))
                        .map(|(s, snap)| (e, s, snap)),
                    _ => None,
                };
                let Some((e, s, snap)) = resumed else {
                    self.cache.clear();
                    self.start_live(user, slice);
                    return 0;
                };
                self.resume_entry(&e, snap, s, user, slice_name);
                self.prompts.store.insert(e);
                tracing::debug!(file = %name, tokens = s, "prompt resumed from the disk tier");
                self.count_hit(s);
                return s;
            }
        }
        self.count_hit(s);
        s
    }

    fn count_hit(&mut self, s: usize) {
        self.prompts.store.hits += 1;
        self.prompts.store.reused_tokens += s as u64;
    }

    /// Brings the cache to `e`'s first `s` positions (with snapshot `snap`) and makes
    /// them the running sequence of `user` (already kept when `e` is that user's own).
    fn resume_entry(
        &mut self,
        e: &Entry,
        snap: usize,
        s: usize,
        user: Option<u32>,
        slice: Arc<str>,
    ) {
        e.restore(&mut self.cache, snap, s);
        self.prompts.live = Some(Live {
            tokens: e.tokens[..s].to_vec(),
            user,
            slice,
            snaps: e.snaps.iter().filter(|x| x.at <= s).cloned().collect(),
            saved: if e.owner == CacheOwner::user(user) {
                s
            } else {
                0
            },
        });
    }

    /// Keeps the running sequence in the store (and the disk tier when it is long) if it
    /// holds something not kept yet.
    pub(super) fn keep_live(&mut self) {
        let Some(live) = self.prompts.live.as_mut() else {
            return;
        };
        let n = live.tokens.len();
        if n < self.prompts.opts.min_tokens || n <= live.saved || n != self.cache.len() {
            return;
        }
        let e = Entry::capture(
            &self.cache,
            &live.tokens,
            &live.snaps,
            CacheOwner::user(live.user),
            live.slice.clone(),
        );
        live.saved = n;
        self.store_entry(e);
    }

    fn store_entry(&mut self, mut e: Entry) {
        if let Some(d) = &self.prompts.disk {
            if e.tokens.len() >= self.prompts.opts.disk_min_tokens || e.pinned {
                e.file = Some(d.save(&e));
            }
        }
        let (evicted, kept) = self.prompts.store.insert(e);
        if !evicted.is_empty() {
            tracing::debug!(
                evicted = evicted.len(),
                kept,
                bytes = self.prompts.store.bytes(),
                "prompt cache over its RAM budget"
            );
        }
    }

    /// Notes tokens appended to the running sequence (after a forward pass).
    pub(super) fn live_push(&mut self, ids: &[u32]) {
        if let Some(live) = self.prompts.live.as_mut() {
            live.tokens.extend_from_slice(ids);
            if live.tokens.len() != self.cache.len() {
                self.prompts.live = None;
            }
        }
    }

    /// Takes a ring snapshot of the running sequence where it is now.
    pub(super) fn live_snapshot(&mut self) {
        if !self.prompts.opts.enabled {
            return;
        }
        if let Some(live) = self.prompts.live.as_mut() {
            if live.tokens.len() == self.cache.len()
                && live.snaps.last().is_none_or(|s| s.at < self.cache.len())
            {
                live.snaps.push(Arc::new(Snapshot::capture(&self.cache)));
                while live.snaps.len() > LIVE_SNAPSHOTS {
                    live.snaps.remove(1);
                }
            }
        }
    }

    /// Makes the (cleared) cache a new running sequence of `user` on `slice`.
    pub(super) fn start_live(&mut self, user: Option<u32>, slice: &SlicePlan) {
        self.prompts.live = self.prompts.opts.enabled.then(|| Live {
            tokens: Vec::new(),
            user,
            slice: slice.name.as_str().into(),
            snaps: Vec::new(),
            saved: 0,
        });
    }

    /// The running sequence is no longer a state anyone can resume (the cache was
    /// cleared or reallocated, a pass failed).
    pub(super) fn forget_live(&mut self) {
        self.prompts.live = None;
    }

    /// Keeps `ids` as a pinned state (prefilled now unless a kept state holds it), owned
    /// by `user` or shared; written to the disk tier when `persist` and there is one.
    pub(super) fn pin_prompt(
        &mut self,
        ids: &[u32],
        user: Option<u32>,
        shared: bool,
        persist: bool,
    ) -> Result<()> {
        if !self.prompts.opts.enabled {
            return Err(EngineError::Unavailable(
                "the prompt cache (cache.enabled = false)",
            ));
        }
        if ids.len() < 2 {
            return Err(EngineError::InvalidRequest(
                "a prompt to cache needs at least 2 tokens".into(),
            ));
        }
        if ids.len() > self.cache.max_len() {
            return Err(EngineError::ContextFull {
                needed: ids.len(),
                max: self.cache.max_len(),
            });
        }
        let slice = self.slice.clone();
        self.active = None;
        let s = self.resume_prefix(ids, user, true, &slice);
        let n = ids.len();
        let marks: Vec<usize> = [n.saturating_sub(PIN_MARGIN), n]
            .into_iter()
            .filter(|&m| m > s)
            .collect();
        if let Err(e) = self.prefill_from(ids, s, &slice, &marks) {
            self.cache.clear();
            self.forget_live();
            return Err(e);
        }
        let Some(live) = self.prompts.live.as_mut() else {
            return Err(EngineError::InvalidRequest(
                "the prompt could not be kept".into(),
            ));
        };
        let mut e = Entry::capture(
            &self.cache,
            ids,
            &live.snaps,
            CacheOwner { user, shared },
            slice.name.as_str().into(),
        );
        e.pinned = true;
        if !shared {
            live.saved = n;
        }
        let key = e.key();
        if persist && self.prompts.disk.is_none() {
            tracing::info!(
                key,
                "prompt pinned in RAM only: the disk tier is off (cache.disk_bytes)"
            );
        }
        if !persist {
            // Kept in RAM only: store_entry writes pinned entries when there is a disk.
            let (evicted, _) = self.prompts.store.insert(e);
            drop(evicted);
        } else {
            self.store_entry(e);
            // An explicit persist returns once the file is there (and Status says so).
            self.flush_prompt_cache();
        }
        if !self
            .prompts
            .store
            .entries
            .iter()
            .any(|x| x.pinned && x.key() == key)
        {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt's K/V state ({n} tokens) is larger than the prompt cache's RAM \
                 budget (cache.ram_bytes = {})",
                self.prompts.store.budget
            )));
        }
        tracing::info!(
            key,
            tokens = n,
            resumed = s,
            shared,
            persist,
            "prompt pinned"
        );
        Ok(())
    }

    /// Unpins and drops the pinned prompts with `key` (all when empty) that `user` owns,
    /// or any when `admin`; their files too. Returns how many.
    pub(super) fn drop_pinned(&mut self, key: &str, user: Option<u32>, admin: bool) -> usize {
        let mine = |o: &CacheOwner| admin || (!o.shared && o.user == user);
        let keyed = |k: &str| key.is_empty() || k == key;
        let mut n = 0;
        let mut files = Vec::new();
        self.prompts.store.entries.retain(|e| {
            let hit = e.pinned && mine(&e.owner) && keyed(&e.key());
            if hit {
                n += 1;
                files.extend(e.file.clone());
            }
            !hit
        });
        if let Some(d) = &self.prompts.disk {
            for f in d.entries() {
                let k = key_of(&f.slice, &f.tokens);
                if f.pinned && mine(&f.owner) && keyed(&k) {
                    if !files.contains(&f.name) {
                        n += 1;
                    }
                    d.forget(&f.name);
                }
            }
            for f in files {
                d.forget(&f);
            }
        }
        n
    }

    /// Drops every kept state in RAM (the governor, under memory pressure): files stay.
    pub(super) fn drop_prompt_cache(&mut self) {
        let bytes = self.prompts.store.bytes();
        self.prompts.store.entries.clear();
        if let Some(live) = self.prompts.live.as_mut() {
            live.snaps.clear();
        }
        crate::residency::trim_heap();
        tracing::info!(bytes, "prompt cache dropped from RAM");
    }

    /// Kept states of other slices cannot be resumed on `slice`: they go.
    pub(super) fn prompt_cache_slice_switched(&mut self, slice: &str) {
        self.prompts.live = None;
        self.prompts.store.entries.retain(|e| &*e.slice == slice);
    }

    /// Bytes of kept states in RAM (the store and the running sequence's snapshots).
    pub(super) fn prompt_cache_bytes(&self) -> usize {
        self.prompts.store.bytes()
            + self
                .prompts
                .live
                .as_ref()
                .map_or(0, |l| l.snaps.iter().map(|s| s.bytes()).sum())
    }

    /// Waits for queued state files to be written.
    pub fn flush_prompt_cache(&self) {
        if let Some(d) = &self.prompts.disk {
            d.flush();
        }
    }

    pub(super) fn prompt_cache_state(&self) -> PromptCacheState {
        let p = &self.prompts;
        let mut pinned: Vec<PinnedPrompt> = p
            .store
            .entries
            .iter()
            .filter(|e| e.pinned)
            .map(|e| PinnedPrompt {
                key: e.key(),
                tokens: e.tokens.len(),
                owner: e.owner,
                slice: e.slice.to_string(),
                ram_bytes: e.bytes() as u64,
                on_disk: false,
            })
            .collect();
        let files = p.disk.as_ref().map(|d| d.entries()).unwrap_or_default();
        for f in files.iter().filter(|f| f.pinned) {
            let key = key_of(&f.slice, &f.tokens);
            match pinned
                .iter_mut()
                .find(|x| x.key == key && x.owner == f.owner)
            {
                Some(x) => x.on_disk = true,
                None => pinned.push(PinnedPrompt {
                    key,
                    tokens: f.tokens.len(),
                    owner: f.owner,
                    slice: f.slice.clone(),
                    ram_bytes: 0,
                    on_disk: true,
                }),
            }
        }
        pinned.sort_by(|a, b| a.key.cmp(&b.key));
        PromptCacheState {
            enabled: p.opts.enabled,
            ram_bytes: self.prompt_cache_bytes() as u64,
            ram_budget: p.store.budget as u64,
            entries: p.store.entries.len(),
            disk_bytes: files.iter().map(|f| f.bytes).sum(),
            disk_budget: p.disk.as_ref().map_or(0, |d| d.budget()),
            disk_entries: files.len(),
            hits: p.store.hits,
            reused_tokens: p.store.reused_tokens,
            pinned,
        }
    }
}
