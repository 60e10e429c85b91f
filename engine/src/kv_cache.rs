//! KV cache for the layers that own K/V (KV-shared layers read their source's cache).
//! Full-attention layers keep every position up to the context limit; sliding layers keep
//! a ring of `window` positions. Buffers are reserved up front as virtual memory and are
//! committed by the OS only as positions are written.
//!
//! K/V are kept as f32 or f16 ([`KvDType`]). f16 halves the cache and the bytes a long
//! context's decode step reads (at 32K positions those rival the weights); the new K/V
//! of a pass are rounded to f16 before it attends to them, so a prefill and a decode
//! still see the same values.

use crate::config::{LayerType, TextConfig};

/// Element type of the cached K/V.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDType {
    F32,
    F16,
}

impl KvDType {
    pub fn bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 => 2,
        }
    }
}

/// One owner layer's K or V positions (laid out by [`LayerKv`]).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum KvBuf {
    F32(Vec<f32>),
    /// IEEE half bits.
    F16(Vec<u16>),
}

impl KvBuf {
    pub(crate) fn new(dtype: KvDType, n: usize) -> Self {
        // Attention streams the cache once per token: 2 MiB pages spare a TLB miss every
        // few keys (E2B Q4_0 decode after 4K tokens: +3.6%, median of 5 interleaved pairs).
        match dtype {
            KvDType::F32 => {
                let v = vec![0.0; n];
                crate::residency::advise_huge(&v);
                KvBuf::F32(v)
            }
            KvDType::F16 => {
                let v = vec![0; n];
                crate::residency::advise_huge(&v);
                KvBuf::F16(v)
            }
        }
    }

    pub(crate) fn store(&mut self, at: usize, x: &[f32]) {
        match self {
            KvBuf::F32(b) => b[at..at + x.len()].copy_from_slice(x),
            KvBuf::F16(b) => crate::quant::kernels::narrow_f16(x, &mut b[at..at + x.len()]),
        }
    }

    /// Elements `at..at + out.len()` as f32.
    pub fn load(&self, at: usize, out: &mut [f32]) {
        match self {
            KvBuf::F32(b) => out.copy_from_slice(&b[at..at + out.len()]),
            KvBuf::F16(b) => crate::quant::kernels::widen_f16(&b[at..at + out.len()], out),
        }
    }

    /// A buffer without the huge-page advice (a kept copy, not a streamed cache).
    pub(crate) fn plain(dtype: KvDType, n: usize) -> Self {
        match dtype {
            KvDType::F32 => KvBuf::F32(vec![0.0; n]),
            KvDType::F16 => KvBuf::F16(vec![0; n]),
        }
    }

    pub(crate) fn dtype(&self) -> KvDType {
        match self {
            KvBuf::F32(_) => KvDType::F32,
            KvBuf::F16(_) => KvDType::F16,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            KvBuf::F32(b) => b.len(),
            KvBuf::F16(b) => b.len(),
        }
    }

    /// Copies `n` elements from `src` at `from` to `self` at `to` (same element type).
    fn copy_from(&mut self, to: usize, src: &KvBuf, from: usize, n: usize) {
        match (self, src) {
            (KvBuf::F32(d), KvBuf::F32(s)) => d[to..to + n].copy_from_slice(&s[from..from + n]),
            (KvBuf::F16(d), KvBuf::F16(s)) => d[to..to + n].copy_from_slice(&s[from..from + n]),
            // Spans are made by the cache they go back to: one element type.
            _ => unreachable!("K/V copied between caches of different element types"),
        }
    }

    /// Little-endian bytes of every element, appended to `out`.
    pub(crate) fn write_le(&self, out: &mut Vec<u8>) {
        match self {
            KvBuf::F32(b) => b
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            KvBuf::F16(b) => b
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        }
    }

    /// Fills every element from little-endian `bytes` (exactly `len() * dtype.bytes()`).
    pub(crate) fn read_le(&mut self, bytes: &[u8]) {
        match self {
            KvBuf::F32(b) => b
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(v, c)| *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            KvBuf::F16(b) => b
                .iter_mut()
                .zip(bytes.chunks_exact(2))
                .for_each(|(v, c)| *v = u16::from_le_bytes([c[0], c[1]])),
        }
    }

    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        match self {
            KvBuf::F32(b) => b.len() * 4,
            KvBuf::F16(b) => b.len() * 2,
        }
    }

    /// All elements as f16 bits, when stored as f16.
    pub fn f16_all(&self) -> Option<&[u16]> {
        match self {
            KvBuf::F32(_) => None,
            KvBuf::F16(b) => Some(b),
        }
    }

    /// Elements `at..at + n` in place, when stored as f32.
    pub fn f32_at(&self, at: usize, n: usize) -> Option<&[f32]> {
        match self {
            KvBuf::F32(b) => Some(&b[at..at + n]),
            KvBuf::F16(_) => None,
        }
    }
}

/// Rounds `x` to the nearest f16 values (kept as f32): what an f16 cache will return.
pub(crate) fn round_to_f16(x: &mut [f32]) {
    let mut bits = [0u16; 256];
    for c in x.chunks_mut(256) {
        let b = &mut bits[..c.len()];
        crate::quant::kernels::narrow_f16(c, b);
        crate::quant::kernels::widen_f16(b, c);
    }
}

#[derive(Debug)]
pub(crate) struct LayerKv {
    /// Ring size for sliding layers; `None` for full layers.
    pub window: Option<usize>,
    /// Slots per KV head.
    pub cap: usize,
    pub head_dim: usize,
    /// Head-major (`[kv head][slot][head_dim]`): a decode step's attention task for one
    /// KV head reads one contiguous stream (slot-major, each key's head was half of a
    /// 1 KiB row). E2B Q4_0 decode after 4K tokens: +15.6% over slot-major (median of 5
    /// interleaved pairs, two engines in one process).
    pub k: KvBuf,
    pub v: KvBuf,
}

impl LayerKv {
    pub fn new(
        window: Option<usize>,
        cap: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: KvDType,
    ) -> Self {
        LayerKv {
            window,
            cap,
            head_dim,
            k: KvBuf::new(dtype, kv_heads * cap * head_dim),
            v: KvBuf::new(dtype, kv_heads * cap * head_dim),
        }
    }

    /// Storage slot of absolute position `pos`.
    #[inline]
    pub fn slot(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => pos % w,
            None => pos,
        }
    }

    /// Element offset of KV head `kvh`'s vector at absolute position `pos`.
    #[inline]
    pub fn at(&self, pos: usize, kvh: usize) -> usize {
        (kvh * self.cap + self.slot(pos)) * self.head_dim
    }

    /// Stores the K and V rows (`[kv_dim]`, heads in order) of position `pos`.
    pub fn store(&mut self, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        for (h, (kh, vh)) in k.chunks_exact(hd).zip(v.chunks_exact(hd)).enumerate() {
            let s = self.at(pos, h);
            self.k.store(s, kh);
            self.v.store(s, vh);
        }
    }
}

/// K/V of positions `lo..hi` of one owner layer, copied out of a cache (head-major:
/// `[kv head][position - lo][head_dim]`), to be copied back by [`KvCache::import`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct KvSpan {
    pub lo: usize,
    pub hi: usize,
    pub k: KvBuf,
    pub v: KvBuf,
}

impl KvSpan {
    pub fn bytes(&self) -> usize {
        self.k.bytes() + self.v.bytes()
    }
}

/// Per-sequence K/V: that of the owner layers, and the K/V a forward pass is producing
/// (committed when it ends, so KV-shared layers see "cache after update" as transformers
/// does). `clear` keeps every buffer.
#[derive(Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerKv>>,
    /// New K and V of the current forward pass, per owner layer.
    pending: Vec<(Vec<f32>, Vec<f32>)>,
    pub(crate) kv_dim: usize,
    dtype: KvDType,
    len: usize,
    max_len: usize,
}

impl KvCache {
    /// Bytes a cache of `max_len` positions reserves (without allocating it), so that a
    /// context can be checked against the machine before it is allocated.
    pub fn reserved_bytes(cfg: &TextConfig, max_len: usize, dtype: KvDType) -> u128 {
        let first_shared = cfg.first_kv_shared_layer().min(cfg.num_hidden_layers);
        let per_pos = (cfg.num_key_value_heads * cfg.head_dim * dtype.bytes()) as u128 * 2;
        (0..first_shared)
            .map(|l| {
                let cap = match cfg.layer_types.get(l) {
                    Some(LayerType::Sliding) => cfg.sliding_window.min(max_len.max(1)),
                    _ => max_len,
                };
                per_pos * cap as u128
            })
            .sum()
    }

    pub fn new(cfg: &TextConfig, max_len: usize, dtype: KvDType) -> Self {
        let kv_dim = cfg.kv_dim();
        let first_shared = cfg.first_kv_shared_layer();
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                (l < first_shared).then(|| {
                    let window = match cfg.layer_types[l] {
                        LayerType::Sliding => Some(cfg.sliding_window.min(max_len.max(1))),
                        LayerType::Full => None,
                    };
                    let cap = window.unwrap_or(max_len);
                    LayerKv::new(window, cap, cfg.num_key_value_heads, cfg.head_dim, dtype)
                })
            })
            .collect();
        KvCache {
            pending: (0..cfg.num_hidden_layers)
                .map(|_| (Vec::new(), Vec::new()))
                .collect(),
            layers,
            kv_dim,
            dtype,
            len: 0,
            max_len,
        }
    }

    /// Positions held so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn dtype(&self) -> KvDType {
        self.dtype
    }

    /// Forget the sequence (buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps only the first `len` positions (at most the current length). Sliding rings
    /// are not touched: the caller knows they still hold the window before `len` (see
    /// [`crate::prompt_cache`]).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Sets the length after K/V were imported for `0..len`.
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len.min(self.max_len);
    }

    /// The sliding window (ring size) of owner layer `l`, `None` for a full layer or a
    /// KV-shared one.
    pub(crate) fn window(&self, l: usize) -> Option<usize> {
        self.layers.get(l)?.as_ref()?.window
    }

    /// Copies positions `lo..hi` of owner layer `l` out. The positions must be held:
    /// `hi <= len()`, and on a sliding layer `lo >= len() - window`.
    pub(crate) fn export(&self, l: usize, lo: usize, hi: usize) -> Option<KvSpan> {
        let layer = self.layers.get(l)?.as_ref()?;
        let hd = layer.head_dim;
        let heads = self.kv_dim / hd;
        let n = hi.saturating_sub(lo);
        let (mut k, mut v) = (
            KvBuf::plain(self.dtype, heads * n * hd),
            KvBuf::plain(self.dtype, heads * n * hd),
        );
        for h in 0..heads {
            for (i, pos) in (lo..hi).enumerate() {
                let (to, from) = ((h * n + i) * hd, layer.at(pos, h));
                k.copy_from(to, &layer.k, from, hd);
                v.copy_from(to, &layer.v, from, hd);
            }
        }
        Some(KvSpan { lo, hi, k, v })
    }

    /// Copies the positions of `span` below `upto` into owner layer `l` (their ring slots
    /// on a sliding layer). The length is not changed: see [`KvCache::set_len`].
    pub(crate) fn import(&mut self, l: usize, span: &KvSpan, upto: usize) {
        let kv_dim = self.kv_dim;
        let Some(layer) = self.layers.get_mut(l).and_then(Option::as_mut) else {
            return;
        };
        let hd = layer.head_dim;
        let heads = kv_dim / hd;
        let n = span.hi - span.lo;
        let hi = span.hi.min(upto).min(match layer.window {
            Some(_) => usize::MAX,
            None => layer.cap,
        });
        for h in 0..heads {
            for pos in span.lo..hi {
                let (to, from) = (layer.at(pos, h), (h * n + pos - span.lo) * hd);
                layer.k.copy_from(to, &span.k, from, hd);
                layer.v.copy_from(to, &span.v, from, hd);
            }
        }
    }

    /// Bytes of K/V actually holding positions (what a memory report should count).
    pub fn bytes_used(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| {
                let n = match l.window {
                    Some(w) => self.len.min(w),
                    None => self.len,
                };
                2 * n * self.kv_dim * self.dtype.bytes()
            })
            .sum()
    }

    /// Writes `t` new positions (`k`, `v` are `[t, kv_dim]`) for owner layer `l`, starting
    /// at the current length. Sliding rings keep only the last `window` of them.
    pub(crate) fn write(&mut self, l: usize, k: &[f32], v: &[f32], t: usize) {
        let d = self.kv_dim;
        let start = self.len;
        if let Some(layer) = self.layers[l].as_mut() {
            let skip = match layer.window {
                Some(w) => t.saturating_sub(w),
                None => 0,
            };
            for i in skip..t {
                layer.store(start + i, &k[i * d..(i + 1) * d], &v[i * d..(i + 1) * d]);
            }
        }
    }

    /// Buffers for the new K and V (`n` elements each) of owner layer `l`.
    pub(crate) fn pending_mut(&mut self, l: usize, n: usize) -> (&mut [f32], &mut [f32]) {
        let (k, v) = &mut self.pending[l];
        k.clear();
        k.resize(n, 0.0);
        v.clear();
        v.resize(n, 0.0);
        (k, v)
    }

    /// What layer `l`'s attention reads: its committed K/V and the pending new ones.
    pub(crate) fn view(&self, l: usize) -> Option<(&LayerKv, &[f32], &[f32])> {
        let layer = self.layers[l].as_ref()?;
        let (k, v) = &self.pending[l];
        Some((layer, k, v))
    }

    /// Commits the pending K/V of `t` positions for every owner layer.
    pub(crate) fn commit(&mut self, t: usize) {
        for l in 0..self.layers.len() {
            if self.layers[l].is_none() || self.pending[l].0.len() < t * self.kv_dim {
                continue;
            }
            let (k, v) = std::mem::take(&mut self.pending[l]);
            self.write(l, &k, &v, t);
            self.pending[l] = (k, v);
        }
        self.len += t;
    }

    /// Frees the pending K/V buffers (sized by the last forward pass; committed K/V
    /// stay).
    pub(crate) fn release_pending(&mut self) {
        for p in &mut self.pending {
            *p = (Vec::new(), Vec::new());
        }
    }

    /// Bytes of the pending K/V buffers.
    pub fn pending_bytes(&self) -> usize {
        self.pending
            .iter()
            .map(|(k, v)| (k.capacity() + v.capacity()) * 4)
            .sum::<usize>()
    }
}
