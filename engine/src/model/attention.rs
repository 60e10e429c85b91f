//! The scaled dot-product part of `Gemma3nTextAttention` (transformers'
//! `eager_attention_forward`, scaling 1, no softcap), computed flash-attention style:
//! queries are tiled, each tile walks its keys in blocks with an online softmax, so a
//! block of K/V is read from memory once per tile instead of once per query. A long
//! prefill would otherwise stream the whole cache once per token.
//!
//! Key blocks are aligned on absolute positions and a query's arithmetic only involves
//! keys it may attend to (others enter as exact zeros), so a query's output does not
//! depend on the tile it landed in: a prefill of any chunk size and token-by-token decode
//! give the same bits.

use std::cell::RefCell;

use super::scratch::Scratch;
use crate::kv_cache::LayerKv;
use crate::quant::kernels;

/// Most keys per block (the block's slice tables live on the stack).
const MAX_BLOCK_KEYS: usize = 128;

/// `exp(d)` for a score `d` below the row's running maximum, and 0 where that is below
/// e^-44 (8·10⁻²⁰): such weights cannot move an f32 sum that holds the maximum's weight,
/// 1, and those under e^-87 are subnormal floats, which send each multiply-add that meets
/// them through the x86 cores' slow microcode path. Scores spread as a long context's are
/// made E2B-shaped attention up to 7× slower (one decode step after 32K keys, K/V cold:
/// 29.4 ms, 4.0 ms with the cut).
#[inline]
fn weight(d: f32) -> f32 {
    if d < -44.0 {
        0.0
    } else {
        d.exp()
    }
}

/// Query tokens per tile and keys per block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tiling {
    pub queries: usize,
    pub keys: usize,
}

/// On E2B (4 query heads per KV head, head_dim 256): a tile's accumulators are 128 KiB
/// and a block's K and V 64 KiB each, so all stay in L2 while every query row of the
/// tile reuses the block.
pub(crate) const TILING: Tiling = Tiling {
    queries: 32,
    keys: 64,
};

/// Keys and values one pass attends to: positions before `pos0` in the committed cache
/// (a ring on sliding layers), the pass's own `[t, kv_dim]` in `new_k` / `new_v`.
pub(crate) struct KvView<'a> {
    pub cached: &'a LayerKv,
    pub new_k: &'a [f32],
    pub new_v: &'a [f32],
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window (keys `p - window < k <= p`), `None` on full-attention layers.
    pub window: Option<usize>,
}

thread_local! {
    /// Scores, running max, running sum and rescale factors of one tile's rows; sized
    /// by the largest tile, so decode stops allocating once any pass has run here.
    static TILE_STATE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A block's cached K and V widened to f32 when the cache holds f16.
    static KV_BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Causal (and windowed) attention of the `t` queries `q` (`[t, num_heads·head_dim]`, at
/// positions `pos0..pos0+t`) into `out` (same shape).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_forward(
    q: &[f32],
    t: usize,
    pos0: usize,
    kv: &KvView,
    heads: Heads,
    tiling: Tiling,
    out: &mut [f32],
    sc: &mut Scratch,
) {
    let Heads {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        window,
    } = heads;
    if t == 0 {
        return;
    }
    let group = nh / nkv;
    assert!((1..=MAX_BLOCK_KEYS).contains(&tiling.keys) && tiling.queries > 0);
    let tq = tiling.queries.min(t);
    let ntiles = t.div_ceil(tq);
    // One task per (KV head, tile): it owns the tile's `tq·group` query rows of that KV
    // head (the GQA group shares every key it reads), laid out row after row.
    let chunk = tq * group * hd;
    let task = |idx: usize, acc: &mut [f32]| {
        let (kvh, tile) = (idx / ntiles, idx % ntiles);
        let ta = tile * tq;
        let tb = (ta + tq).min(t);
        let rows = (tb - ta) * group;
        attend_tile(
            q,
            ta..tb,
            pos0,
            kvh,
            kv,
            heads,
            tiling.keys,
            &mut acc[..rows * hd],
        );
    };
    let work = t * nh * (pos0 + t).min(window.unwrap_or(usize::MAX)) * hd;
    let run = |buf: &mut [f32]| {
        if work < 1 << 15 {
            buf.chunks_mut(chunk)
                .enumerate()
                .for_each(|(i, c)| task(i, c));
        } else {
            crate::par::chunks_mut(buf, chunk, task);
        }
    };
    if t == 1 {
        // One token: the task layout [KV head][group·hd] is the output layout.
        run(out);
        return;
    }
    let mut tiles = sc.take(nkv * ntiles * chunk);
    run(&mut tiles);
    let gd = group * hd;
    for kvh in 0..nkv {
        for ti in 0..t {
            let s = (kvh * ntiles * tq + ti) * gd;
            let d = ti * nh * hd + kvh * gd;
            out[d..d + gd].copy_from_slice(&tiles[s..s + gd]);
        }
    }
    sc.give(tiles);
}

/// Attention of the query rows of tokens `toks` for KV head `kvh` into `acc`
/// (`[rows, head_dim]`, zeroed). Row `r` is query head `kvh·group + r % group` of token
/// `toks.start + r / group`.
#[allow(clippy::too_many_arguments)]
fn attend_tile(
    q: &[f32],
    toks: std::ops::Range<usize>,
    pos0: usize,
    kvh: usize,
    kv: &KvView,
    heads: Heads,
    kb: usize,
    acc: &mut [f32],
) {
    let hd = heads.head_dim;
    let group = heads.num_heads / heads.num_kv_heads;
    let (qd, kvd) = (heads.num_heads * hd, heads.num_kv_heads * hd);
    let rows = toks.len() * group;
    let pos = |r: usize| pos0 + toks.start + r / group;
    let lo_of = |p: usize| heads.window.map_or(0, |w| (p + 1).saturating_sub(w));
    let q_row = |r: usize| {
        let s = (toks.start + r / group) * qd + (kvh * group + r % group) * hd;
        &q[s..s + hd]
    };
    // Key `kp` in place (f32 cache or this pass's new keys), or `None` for an f16
    // cached key, which is widened into the block buffer first.
    let kv_at = |kp: usize| -> Option<(&[f32], &[f32])> {
        if kp < pos0 {
            let s = kv.cached.at(kp, kvh);
            Some((kv.cached.k.f32_at(s, hd)?, kv.cached.v.f32_at(s, hd)?))
        } else {
            let s = (kp - pos0) * kvd + kvh * hd;
            Some((&kv.new_k[s..s + hd], &kv.new_v[s..s + hd]))
        }
    };

    KV_BLOCK.with(|wide| {
        let mut wide = wide.borrow_mut();
        if wide.len() < 2 * kb * hd {
            wide.resize(2 * kb * hd, 0.0);
        }
        TILE_STATE.with(|cell| {
            let mut st = cell.borrow_mut();
            if st.len() < rows * (kb + 3) {
                st.resize(rows * (kb + 3), 0.0);
            }
            let (s, rest) = st.split_at_mut(rows * kb);
            let (m, rest) = rest.split_at_mut(rows);
            let (l, rest) = rest.split_at_mut(rows);
            let scale = &mut rest[..rows];
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);

            let (klo, khi) = (lo_of(pos(0)), pos(rows - 1));
            for b in klo / kb..=khi / kb {
                // Keys ba..=bz of block b that some row of the tile attends to.
                let (ba, bz) = ((b * kb).max(klo), (b * kb + kb - 1).min(khi));
                // A block of f16 cached keys only is read in place, widened in the
                // kernels' registers (the same bits as widening it first, without
                // writing and re-reading it as f32). Full attention over 32K keys: -15%
                // per call; E2B Q4_0 decode after 8K tokens: +3.8% (steps alternated).
                let mut ks16: [&[u16]; MAX_BLOCK_KEYS] = [&[]; MAX_BLOCK_KEYS];
                let mut vs16: [&[u16]; MAX_BLOCK_KEYS] = [&[]; MAX_BLOCK_KEYS];
                let in_place = match (kv.cached.k.f16_all(), kv.cached.v.f16_all()) {
                    (Some(k16), Some(v16)) if bz < pos0 => {
                        for kp in ba..=bz {
                            let s = kv.cached.at(kp, kvh);
                            (ks16[kp - ba], vs16[kp - ba]) = (&k16[s..s + hd], &v16[s..s + hd]);
                        }
                        true
                    }
                    _ => false,
                };
                // Otherwise cached keys stored as f16 are widened a run of consecutive
                // slots at a time (one stream per call; a ring wraps at most once per
                // block). E2B Q4_0 decode after 3K tokens: +3.6% over one key per call.
                let mut ks: [&[f32]; MAX_BLOCK_KEYS] = [&[]; MAX_BLOCK_KEYS];
                let mut vs: [&[f32]; MAX_BLOCK_KEYS] = [&[]; MAX_BLOCK_KEYS];
                if !in_place {
                    let (mut kp, end) = (ba, (bz + 1).min(pos0));
                    while kp < end && kv_at(kp).is_none() {
                        let s = kv.cached.at(kp, kvh);
                        // Consecutive slots until the block's cached keys end or the ring
                        // wraps.
                        let n = (end - kp).min(kv.cached.cap - kv.cached.slot(kp));
                        let j = kp - ba;
                        let (wk, wv) = wide.split_at_mut(kb * hd);
                        kv.cached.k.load(s, &mut wk[j * hd..(j + n) * hd]);
                        kv.cached.v.load(s, &mut wv[j * hd..(j + n) * hd]);
                        kp += n;
                    }
                    let (wk, wv) = wide.split_at(kb * hd);
                    for kp in ba..=bz {
                        let j = kp - ba;
                        (ks[j], vs[j]) = kv_at(kp)
                            .unwrap_or((&wk[j * hd..(j + 1) * hd], &wv[j * hd..(j + 1) * hd]));
                    }
                }
                // Rows four at a time (the kernels' register block); a group of rows skips
                // the keys none of its rows sees.
                for r0 in (0..rows).step_by(4) {
                    let r1 = (r0 + 4).min(rows);
                    let (ka, kz) = (ba.max(lo_of(pos(r0))), bz.min(pos(r1 - 1)));
                    if ka > kz {
                        continue;
                    }
                    let (j0, j1) = (ka - ba, kz - ba + 1);
                    let qs = [0, 1, 2, 3].map(|i| q_row((r0 + i).min(r1 - 1)));
                    let sb = &mut s[r0 * kb + j0..];
                    // The first rows' pass requests the keys ahead (the next block, where
                    // it follows in memory) and this block's values; the later rows find
                    // them in cache.
                    let first = r0 == 0;
                    if in_place {
                        let ahead = first.then_some(&vs16[j0..j1]);
                        kernels::dot_f32_rows(&qs[..r1 - r0], &ks16[j0..j1], ahead, sb, kb);
                    } else {
                        let ahead = first.then_some(&vs[j0..j1]);
                        kernels::dot_f32_rows(&qs[..r1 - r0], &ks[j0..j1], ahead, sb, kb);
                    }
                    for r in r0..r1 {
                        let sr = &mut s[r * kb + j0..r * kb + j1];
                        let (lo, hi) = (lo_of(pos(r)).max(ka), pos(r).min(kz));
                        if lo > hi {
                            // Nothing for this row here: weights 0, state untouched.
                            sr.fill(0.0);
                            scale[r] = 1.0;
                            continue;
                        }
                        let own = lo - ka..hi - ka + 1;
                        let bm = sr[own.clone()]
                            .iter()
                            .copied()
                            .fold(f32::NEG_INFINITY, f32::max);
                        let mn = m[r].max(bm);
                        // 0 (from -inf) on the row's first block, whose state is all zero.
                        scale[r] = weight(m[r] - mn);
                        let mut sum = l[r] * scale[r];
                        for (j, x) in sr.iter_mut().enumerate() {
                            *x = if own.contains(&j) {
                                weight(*x - mn)
                            } else {
                                0.0
                            };
                            sum += *x;
                        }
                        (m[r], l[r]) = (mn, sum);
                    }
                    let (sb, sc, ab) = (
                        &s[r0 * kb + j0..],
                        &scale[r0..r1],
                        &mut acc[r0 * hd..r1 * hd],
                    );
                    if in_place {
                        kernels::axpy_f32_rows(sb, kb, &vs16[j0..j1], sc, ab);
                    } else {
                        kernels::axpy_f32_rows(sb, kb, &vs[j0..j1], sc, ab);
                    }
                }
            }
            // Every row saw at least its own key, so l > 0.
            for (row, &lr) in acc.chunks_exact_mut(hd).zip(l.iter()) {
                let inv = 1.0 / lr;
                row.iter_mut().for_each(|x| *x *= inv);
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{round_to_f16, KvDType};
    use crate::test_util::data;

    /// Keys/values of every position `0..n` (`[n, kv_dim]`), and a cache holding those
    /// before `pos0` as the engine would (a ring of `ring` slots on sliding layers).
    fn cache_of(
        k: &[f32],
        v: &[f32],
        kvd: usize,
        hd: usize,
        pos0: usize,
        ring: Option<usize>,
        dtype: KvDType,
    ) -> LayerKv {
        let cap = ring.unwrap_or(pos0.max(1));
        let mut c = LayerKv::new(ring, cap, kvd / hd, hd, dtype);
        c.k.store(0, &vec![f32::NAN; cap * kvd]);
        c.v.store(0, &vec![f32::NAN; cap * kvd]);
        for p in pos0.saturating_sub(cap)..pos0 {
            c.store(p, &k[p * kvd..(p + 1) * kvd], &v[p * kvd..(p + 1) * kvd]);
        }
        c
    }

    /// Full softmax in f64 over each query's visible keys.
    fn reference(q: &[f32], k: &[f32], v: &[f32], t: usize, pos0: usize, h: Heads) -> Vec<f32> {
        let (hd, nh) = (h.head_dim, h.num_heads);
        let (qd, kvd, group) = (nh * hd, h.num_kv_heads * hd, nh / h.num_kv_heads);
        let mut out = vec![0.0; t * qd];
        for ti in 0..t {
            let p = pos0 + ti;
            let lo = h.window.map_or(0, |w| (p + 1).saturating_sub(w));
            for head in 0..nh {
                let qv = &q[ti * qd + head * hd..][..hd];
                let kvo = (head / group) * hd;
                let sc: Vec<f64> = (lo..=p)
                    .map(|kp| {
                        let kr = &k[kp * kvd + kvo..][..hd];
                        qv.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum()
                    })
                    .collect();
                let mx = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let acc: f64 = (lo..=p)
                        .zip(&e)
                        .map(|(kp, w)| w * v[kp * kvd + kvo + d] as f64)
                        .sum();
                    out[ti * qd + head * hd + d] = (acc / z) as f32;
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        pos0: usize,
        h: Heads,
        tiling: Tiling,
        dtype: KvDType,
    ) -> Vec<f32> {
        let kvd = h.num_kv_heads * h.head_dim;
        let ring = h.window;
        let cached = cache_of(k, v, kvd, h.head_dim, pos0, ring, dtype);
        let kv = KvView {
            cached: &cached,
            new_k: &k[pos0 * kvd..(pos0 + t) * kvd],
            new_v: &v[pos0 * kvd..(pos0 + t) * kvd],
        };
        let mut out = vec![0.0; t * h.num_heads * h.head_dim];
        let mut sc = Scratch::default();
        attention_forward(q, t, pos0, &kv, h, tiling, &mut out, &mut sc);
        out
    }

    #[test]
    fn tiled_attention_matches_full_softmax_and_is_tiling_invariant() {
        for (window, nh, nkv, hd) in [
            (Some(7), 6, 2, 40),
            (None, 6, 2, 40),
            (Some(5), 8, 2, 256),
            (None, 4, 4, 37),
            (Some(70), 4, 1, 16),
        ] {
            let heads = Heads {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                window,
            };
            let (qd, kvd) = (nh * hd, nkv * hd);
            for (pos0, t, dtype) in [
                (0, 13, KvDType::F32),
                (21, 13, KvDType::F32),
                (130, 37, KvDType::F32),
                (3, 1, KvDType::F32),
                (150, 1, KvDType::F32),
                (21, 13, KvDType::F16),
                (130, 37, KvDType::F16),
                (150, 1, KvDType::F16),
            ] {
                let n = pos0 + t;
                let (mut k, mut v) = (data(n * kvd, 1 + n as u64), data(n * kvd, 2 + n as u64));
                if dtype == KvDType::F16 {
                    // As the engine rounds a pass's new K/V for an f16 cache.
                    round_to_f16(&mut k);
                    round_to_f16(&mut v);
                }
                // Scores of order one, as after q_norm/k_norm, and spread over hundreds
                // (weights far below e^-44 are dropped: within tolerance, same bits).
                let spread = if n % 2 == 0 { 1.0 } else { 60.0 };
                let q: Vec<f32> = data(t * qd, 3 + n as u64)
                    .iter()
                    .map(|x| x * spread / (hd as f32).sqrt())
                    .collect();
                let want = reference(&q, &k, &v, t, pos0, heads);
                let tilings = [
                    TILING,
                    Tiling {
                        queries: 4,
                        keys: 5,
                    },
                    Tiling {
                        queries: 3,
                        keys: 128,
                    },
                ];
                for tiling in tilings {
                    let got = run(&q, &k, &v, t, pos0, heads, tiling, dtype);
                    let d = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0f32, f32::max);
                    // f32 scores in the hundreds carry ~1e-5 absolute error into exp.
                    let tol = if spread > 1.0 { 1e-4 } else { 1e-5 };
                    assert!(d <= tol, "{heads:?} pos0 {pos0} t {t} {tiling:?}: {d}");
                    // Token by token (decode) gives the same bits as the whole pass.
                    for ti in [0, t / 2, t - 1] {
                        let one = run(
                            &q[ti * qd..(ti + 1) * qd],
                            &k,
                            &v,
                            1,
                            pos0 + ti,
                            heads,
                            tiling,
                            dtype,
                        );
                        let same = one
                            .iter()
                            .zip(&got[ti * qd..(ti + 1) * qd])
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{heads:?} pos0 {pos0} token {ti} {tiling:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_weights_are_never_subnormal() {
        // Subnormal weights would make every value multiply-add that meets them slow.
        let mut d = 0.0f32;
        while d > -200.0 {
            let w = weight(d);
            assert!(w == 0.0 || w.is_normal(), "weight({d}) = {w:e}");
            assert!(
                d < -44.0 || w == d.exp(),
                "weight({d}) = {w:e}, exp = {:e}",
                d.exp()
            );
            d -= 0.01;
        }
        assert_eq!(weight(f32::NEG_INFINITY), 0.0);
    }
}
