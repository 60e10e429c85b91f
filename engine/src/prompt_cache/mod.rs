//! The prompt cache: K/V states of earlier requests, kept so that a new request starts
//! from the longest token prefix it shares with one of them and prefills only the rest.
//!
//! What a state must hold to be resumed at position `s`: every full-attention owner
//! layer's K/V of positions `0..s`, and every sliding layer's window before `s` (keys
//! `s - window < k < s`). Full layers only append, so a stored state holds them for its
//! whole length. A sliding layer keeps a ring of the last `window` positions, so a state
//! can resume a sliding layer only where its ring still holds that window: a
//! [`Snapshot`] of the rings taken after `at` positions resumes any `s <= at` when
//! `at <= window` (nothing was overwritten yet), else only `s = at` and `s = at - 1`. A
//! state therefore carries snapshots at the points worth resuming: the end of each
//! prompt (a regenerated answer, an edited last turn) and the end of the sequence (the
//! next turn of a chat). KV-shared layers read their source layer's cache and per-layer
//! inputs depend only on the tokens, so nothing else is needed: a resumed request
//! computes the same bits as a cold prefill (the forward pass does not depend on how the
//! positions are split into passes).
//!
//! The running sequence (the engine's cache) is itself the most recent state; it is
//! copied into this store only when another request would overwrite it. Stored states
//! are bounded by a RAM budget with least-recently-used eviction; they belong to one
//! MatFormer slice (the engine's quantization is fixed for its life) and to one user,
//! unless an administrator pinned them as shared. The disk tier (`disk.rs`) keeps long
//! states across restarts.

use std::sync::Arc;

use crate::kv_cache::{KvCache, KvSpan};

pub(crate) mod disk;

/// Settings of the prompt cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptCacheOptions {
    /// Reuse prefixes at all (off: every request prefills from zero).
    pub enabled: bool,
    /// Bytes of K/V states kept in RAM besides the running sequence.
    pub ram_bytes: usize,
    /// Bytes of K/V state files in the cache directory (0: no disk tier).
    pub disk_bytes: u64,
    /// Sequences shorter than this are not kept once another request replaces them.
    pub min_tokens: usize,
    /// States at least this long are also written to the disk tier when they are kept.
    pub disk_min_tokens: usize,
}

impl Default for PromptCacheOptions {
    fn default() -> Self {
        PromptCacheOptions {
            enabled: true,
            ram_bytes: default_ram_bytes(),
            disk_bytes: 0,
            min_tokens: 32,
            disk_min_tokens: 256,
        }
    }
}

/// The default RAM budget: 1/16 of the machine's RAM, between 64 MiB and 1 GiB (an 8 GB
/// laptop keeps 512 MiB: a dozen 2K-token E2B conversations).
pub fn default_ram_bytes() -> usize {
    let ram = crate::residency::mem_total().unwrap_or(8 << 30);
    (ram / 16).clamp(64 << 20, 1 << 30) as usize
}

/// Who may reuse a state: its user, or everyone when an administrator shared it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CacheOwner {
    /// The uid of the requests that made it; `None` for in-process callers.
    pub user: Option<u32>,
    pub shared: bool,
}

impl CacheOwner {
    pub fn user(user: Option<u32>) -> Self {
        CacheOwner {
            user,
            shared: false,
        }
    }

    fn admits(&self, user: Option<u32>) -> bool {
        self.shared || self.user == user
    }
}

/// A pinned prompt as reported in the engine's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedPrompt {
    /// The prompt's key (16 hex digits over its slice and tokens).
    pub key: String,
    pub tokens: usize,
    pub owner: CacheOwner,
    pub slice: String,
    /// Bytes in RAM (0 when only its file is left).
    pub ram_bytes: u64,
    pub on_disk: bool,
}

/// The prompt cache as reported in the engine's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptCacheState {
    pub enabled: bool,
    /// Bytes of kept states in RAM (the running sequence's own K/V is `kv_cache`).
    pub ram_bytes: u64,
    pub ram_budget: u64,
    pub entries: usize,
    pub disk_bytes: u64,
    pub disk_budget: u64,
    pub disk_entries: usize,
    /// Requests that resumed a kept state, and the prompt tokens they did not prefill.
    pub hits: u64,
    pub reused_tokens: u64,
    pub pinned: Vec<PinnedPrompt>,
}

/// The sliding rings after `at` positions (one span per sliding owner layer).
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub at: usize,
    pub rings: Vec<(usize, KvSpan)>,
}

impl Snapshot {
    /// The rings of `cache` as they are now (after `cache.len()` positions).
    pub fn capture(cache: &KvCache) -> Self {
        let at = cache.len();
        let rings = sliding_layers(cache)
            .filter_map(|(l, w)| Some((l, cache.export(l, at.saturating_sub(w), at)?)))
            .collect();
        Snapshot { at, rings }
    }

    pub fn bytes(&self) -> usize {
        self.rings.iter().map(|(_, s)| s.bytes()).sum()
    }

    fn resume_at(&self, window: Option<usize>, s: usize) -> Option<usize> {
        resume_at(self.at, window, s)
    }
}

/// The largest position `<= s` that rings snapshotted after `at` positions can resume
/// (see the module docs).
pub(crate) fn resume_at(at: usize, window: Option<usize>, s: usize) -> Option<usize> {
    let s = s.min(at);
    match window {
        Some(w) if at > w && s + 1 < at => None,
        _ => Some(s),
    }
}

fn sliding_layers(cache: &KvCache) -> impl Iterator<Item = (usize, usize)> + '_ {
    (0..cache.layers.len()).filter_map(|l| Some((l, cache.window(l)?)))
}

fn full_layers(cache: &KvCache) -> impl Iterator<Item = usize> + '_ {
    (0..cache.layers.len())
        .filter(|&l| cache.layers[l].as_ref().is_some_and(|x| x.window.is_none()))
}

/// The ring size of `cache`'s sliding layers (they share one), `None` without any.
pub(crate) fn window_of(cache: &KvCache) -> Option<usize> {
    sliding_layers(cache).map(|(_, w)| w).next()
}

/// A kept state: `tokens` and their K/V.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub tokens: Arc<[u32]>,
    /// Full-attention owner layers, positions `0..tokens.len()`.
    pub full: Arc<Vec<(usize, KvSpan)>>,
    /// Sorted by `at`; the last is at `tokens.len()`.
    pub snaps: Vec<Arc<Snapshot>>,
    pub owner: CacheOwner,
    pub slice: Arc<str>,
    /// The ring size the snapshots were taken with (0: no sliding layers).
    pub window: usize,
    pub pinned: bool,
    pub last_used: u64,
    /// Its file in the disk tier, once written.
    pub file: Option<String>,
}

/// Most snapshots one entry keeps (each is a window of every sliding layer: ~16 MiB for
/// E2B in f16).
const MAX_SNAPSHOTS: usize = 4;

impl Entry {
    /// The state of `cache` (holding `tokens`), with `snaps` taken earlier in the same
    /// sequence and a snapshot of the rings as they are now.
    pub fn capture(
        cache: &KvCache,
        tokens: &[u32],
        snaps: &[Arc<Snapshot>],
        owner: CacheOwner,
        slice: Arc<str>,
    ) -> Self {
        let len = cache.len();
        debug_assert_eq!(len, tokens.len());
        let full = full_layers(cache)
            .filter_map(|l| Some((l, cache.export(l, 0, len)?)))
            .collect();
        let mut all: Vec<Arc<Snapshot>> = snaps.iter().filter(|s| s.at < len).cloned().collect();
        all.push(Arc::new(Snapshot::capture(cache)));
        let mut e = Entry {
            tokens: tokens.into(),
            full: Arc::new(full),
            snaps: all,
            owner,
            slice,
            window: window_of(cache).unwrap_or(0),
            pinned: false,
            last_used: 0,
            file: None,
        };
        e.tidy_snaps();
        e
    }

    pub fn bytes(&self) -> usize {
        self.full.iter().map(|(_, s)| s.bytes()).sum::<usize>()
            + self.snaps.iter().map(|s| s.bytes()).sum::<usize>()
            + self.tokens.len() * 4
    }

    fn window(&self) -> Option<usize> {
        (self.window > 0).then_some(self.window)
    }

    /// Sorted, one per position, at most [`MAX_SNAPSHOTS`] (the first and the latest
    /// kept: a system prompt's and the recent turns').
    fn tidy_snaps(&mut self) {
        self.snaps.sort_by_key(|s| s.at);
        self.snaps.dedup_by_key(|s| s.at);
        while self.snaps.len() > MAX_SNAPSHOTS {
            self.snaps.remove(1);
        }
    }

    /// Where this entry can resume a prompt whose first `p` tokens it shares (at most
    /// `p`), and the snapshot to do it with.
    pub fn resume_point(&self, p: usize) -> Option<(usize, usize)> {
        let p = p.min(self.tokens.len());
        self.snaps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((s.resume_at(self.window(), p)?, i)))
            .max()
    }

    /// Brings `cache` to this entry's first `s` positions with snapshot `snap`.
    pub fn restore(&self, cache: &mut KvCache, snap: usize, s: usize) {
        for (l, span) in self.full.iter() {
            cache.import(*l, span, s);
        }
        for (l, span) in &self.snaps[snap].rings {
            cache.import(*l, span, s);
        }
        cache.set_len(s);
    }

    /// The key of a pinned prompt: its slice and tokens.
    pub fn key(&self) -> String {
        key_of(&self.slice, &self.tokens)
    }

    /// Whether `cache` can take this entry (same geometry and element type).
    pub fn fits(&self, cache: &KvCache) -> bool {
        window_of(cache).unwrap_or(0) == self.window
            && self.tokens.len() <= cache.max_len()
            && self.full.iter().all(|(l, s)| {
                cache
                    .layers
                    .get(*l)
                    .and_then(Option::as_ref)
                    .is_some_and(|x| {
                        x.window.is_none() && s.k.dtype() == cache.dtype() && s.k.len() == s.v.len()
                    })
            })
            && self
                .snaps
                .iter()
                .flat_map(|s| s.rings.iter())
                .all(|(l, s)| {
                    cache.window(*l).is_some_and(|w| s.hi - s.lo <= w)
                        && s.k.dtype() == cache.dtype()
                        && s.k.len() == s.v.len()
                })
    }
}

/// 16 hex digits over a slice name and token ids.
pub fn key_of(slice: &str, tokens: &[u32]) -> String {
    let mut b = Vec::with_capacity(slice.len() + 1 + tokens.len() * 4);
    b.extend_from_slice(slice.as_bytes());
    b.push(0);
    tokens
        .iter()
        .for_each(|t| b.extend_from_slice(&t.to_le_bytes()));
    format!("{:016x}", crate::derived::xxh64(&b, 0x70c4_c0de))
}

/// Tokens `a` and `b` share at the start.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The RAM tier: kept states, least recently used evicted first (pinned ones last).
#[derive(Debug, Default)]
pub(crate) struct Store {
    pub entries: Vec<Entry>,
    pub budget: usize,
    clock: u64,
    pub hits: u64,
    pub reused_tokens: u64,
}

impl Store {
    pub fn new(budget: usize) -> Self {
        Store {
            budget,
            ..Default::default()
        }
    }

    pub fn bytes(&self) -> usize {
        self.entries.iter().map(Entry::bytes).sum()
    }

    pub fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The entry that resumes the most of `prompt` for `user` on `slice`: its index, the
    /// position and the snapshot.
    pub fn best(
        &self,
        prompt: &[u32],
        user: Option<u32>,
        slice: &str,
        cache: &KvCache,
    ) -> Option<(usize, usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.owner.admits(user) && &*e.slice == slice && e.fits(cache))
            .filter_map(|(i, e)| {
                let (s, snap) = e.resume_point(common_prefix(&e.tokens, prompt))?;
                Some((s, i, snap))
            })
            .max()
            .map(|(s, i, snap)| (i, s, snap))
    }

    /// Keeps `e`, merged with the entries it extends (or that extend it), then evicts
    /// down to the budget. Returns the entries evicted (for the disk tier to note) and
    /// whether `e` itself was kept.
    pub fn insert(&mut self, mut e: Entry) -> (Vec<Entry>, bool) {
        e.last_used = self.tick();
        let same = |x: &Entry| x.owner == e.owner && x.slice == e.slice && x.window == e.window;
        // An entry whose tokens are a prefix of `e`'s: `e` holds all it holds; its
        // snapshots come along.
        let mut i = 0;
        while i < self.entries.len() {
            let x = &self.entries[i];
            // A pinned entry stays as it is (its key is its tokens) unless `e` is the same
            // tokens again.
            let free = !x.pinned || x.tokens == e.tokens;
            if same(x)
                && free
                && x.tokens.len() <= e.tokens.len()
                && e.tokens.starts_with(&x.tokens)
            {
                let x = self.entries.remove(i);
                e.snaps.extend(x.snaps);
                e.pinned |= x.pinned;
                if e.file.is_none() && x.tokens.len() == e.tokens.len() {
                    e.file = x.file;
                }
            } else {
                i += 1;
            }
        }
        // An entry that extends `e`: it takes `e`'s snapshots instead.
        if let Some(x) = self.entries.iter_mut().find(|x| {
            same(x)
                && !x.pinned
                && !e.pinned
                && e.tokens.len() < x.tokens.len()
                && x.tokens.starts_with(&e.tokens)
        }) {
            x.snaps.extend(e.snaps);
            x.last_used = e.last_used;
            x.tidy_snaps();
            return (self.evict(), true);
        }
        e.tidy_snaps();
        self.entries.push(e);
        let evicted = self.evict();
        let kept = self.entries.iter().any(|x| x.last_used == self.clock);
        (evicted, kept)
    }

    /// Drops least-recently-used entries (unpinned first) until the budget holds.
    pub fn evict(&mut self) -> Vec<Entry> {
        let mut out = Vec::new();
        while self.bytes() > self.budget {
            let Some(i) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| (e.pinned, e.last_used))
                .map(|(i, _)| i)
            else {
                break;
            };
            out.push(self.entries.remove(i));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(at: usize) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            at,
            rings: Vec::new(),
        })
    }

    fn entry(tokens: &[u32], ats: &[usize], window: usize) -> Entry {
        Entry {
            tokens: tokens.into(),
            full: Arc::new(Vec::new()),
            snaps: ats.iter().map(|&a| snap(a)).collect(),
            owner: CacheOwner::user(Some(1000)),
            slice: "full".into(),
            window,
            pinned: false,
            last_used: 0,
            file: None,
        }
    }

    #[test]
    fn resume_points_follow_the_rings() {
        let t: Vec<u32> = (0..20).collect();
        // Window 8: a snapshot after 20 positions resumes 19 or 20 only.
        let e = entry(&t, &[20], 8);
        assert_eq!(e.resume_point(20), Some((20, 0)));
        assert_eq!(e.resume_point(19), Some((19, 0)));
        assert_eq!(e.resume_point(18), None);
        // A snapshot inside the first window resumes anything before it.
        let e = entry(&t, &[6, 12, 20], 8);
        assert_eq!(e.resume_point(18), Some((12, 1)));
        assert_eq!(e.resume_point(9), Some((6, 0)));
        assert_eq!(e.resume_point(11), Some((11, 1)));
        assert_eq!(e.resume_point(4), Some((4, 0)));
        // No sliding layers: any prefix.
        let e = entry(&t, &[20], 0);
        assert_eq!(e.resume_point(13), Some((13, 0)));
    }

    #[test]
    fn keys_and_prefixes() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_ne!(key_of("full", &[1, 2]), key_of("full", &[1, 3]));
        assert_ne!(key_of("full", &[1, 2]), key_of("E2B", &[1, 2]));
        assert_eq!(key_of("full", &[1, 2]).len(), 16);
    }

    #[test]
    fn the_store_merges_prefixes_and_evicts_the_oldest_unpinned() {
        let mut s = Store::new(usize::MAX);
        let a: Vec<u32> = (0..10).collect();
        let b: Vec<u32> = (0..15).collect();
        s.insert(entry(&a, &[10], 8));
        s.insert(entry(&b, &[12, 15], 8));
        // `b` extends `a`: one entry with all three snapshots.
        assert_eq!(s.entries.len(), 1);
        let ats: Vec<usize> = s.entries[0].snaps.iter().map(|x| x.at).collect();
        assert_eq!(ats, [10, 12, 15]);
        // A prefix of a kept entry only adds its snapshot.
        s.insert(entry(&a[..5], &[5], 8));
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.entries[0].snaps.len(), 4);
        // Past the most snapshots, the second oldest goes.
        s.insert(entry(&b[..14], &[14], 8));
        let ats: Vec<usize> = s.entries[0].snaps.iter().map(|x| x.at).collect();
        assert_eq!(ats, [5, 12, 14, 15]);
        // Another user's identical tokens are a separate entry.
        let mut other = entry(&a, &[10], 8);
        other.owner = CacheOwner::user(Some(1001));
        s.insert(other);
        assert_eq!(s.entries.len(), 2);
        // Budget: the least recently used unpinned entry goes first.
        let c: Vec<u32> = (100..110).collect();
        let mut pinned = entry(&c, &[10], 8);
        pinned.pinned = true;
        s.insert(pinned);
        let one = s.entries[0].bytes();
        s.budget = s.bytes() - one;
        let gone = s.evict();
        assert_eq!(gone.len(), 1);
        assert!(s.entries.iter().any(|e| e.pinned));
        assert!(s
            .entries
            .iter()
            .all(|e| e.owner.user != Some(1000) || e.pinned));
    }
}
