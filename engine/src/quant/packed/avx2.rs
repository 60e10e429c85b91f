//! The 256-bit products over packed row groups, for x86-64 CPUs without AVX-512 VNNI
//! (most laptops): a row group is two 256-bit halves of 8 row lanes. With AVX-VNNI (Intel
//! 12th generation and later, AMD Zen 5) the byte products are `vpdpbusd` as on the
//! AVX-512 path ([`group_vnni`]); with plain AVX2 they are `vpmaddubsw` pairs widened by
//! `vpmaddwd` ([`group`]). Both compute the AVX-512 path's integers and the same float
//! steps in the same order, so every path gives the same bits. One body serves both: the
//! kernels are generic over `V` (AVX-VNNI or not) and inlined into the entry that enables
//! the instructions.
//!
//! `vpmaddubsw` saturates its 16-bit pair sums, which bounds what each type may add in
//! 16 bits: a 4-bit quant (0..15) against an activation byte (|a| ≤ 127, ggml's Q8_0 and
//! Q8_K never give −128) is at most 2·15·127 = 3810 per pair, so a 32-quant block's eight
//! pair sums (≤ 30480) add up in 16 bits and widen once; Q8_0 weights meet the
//! activations as `|w| · sign(a, w)` (≤ 2·128·127 = 32512 per pair) and widen per step.

use std::arch::x86_64::*;

use super::*;

/// Tokens one pass keeps in registers (16 ymm registers: eight weight vectors, the
/// accumulators and temporaries).
const TOKENS: usize = 4;

/// Activation bytes `4k..4k+4` of a block broadcast to every lane.
#[inline(always)]
unsafe fn bcast(a: *const i8, k: usize) -> __m256i {
    _mm256_set1_epi32((a.add(4 * k) as *const i32).read_unaligned())
}

#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Eight f16 scales (one per row lane) as floats.
#[inline(always)]
unsafe fn scales8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// The two entries into [`group_on`], each compiled with its instructions enabled.
macro_rules! entries {
    ($($(#[$doc:meta])* $name:ident: $feat:literal, $v:literal;)*) => {$(
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn $name(
            kind: QuantType,
            g: &[u8],
            nb: usize,
            x: &PackedX,
            t: usize,
            n: usize,
            direct: Option<Direct>,
            res: &mut [[f32; ROWS]; MAX_TOKENS],
        ) {
            group_on::<$v>(kind, g, nb, x, t, n, direct, res)
        }
    )*};
}

entries! {
    /// One row group × tokens `t..t+n` into `direct`, or else into `res[i][row]` (rows
    /// 0..8 from the first half, 8..16 from the second). A decode step's groups take both
    /// halves in one pass (+10-17% from cache here, in alternated runs of `kernel_speed`).
    group: "avx2,fma,f16c", false;
    /// [`group`] with AVX-VNNI byte products.
    group_vnni: "avx2,fma,f16c,avxvnni", true;
}

/// The body of [`group`] (`V` false) and [`group_vnni`] (`V` true).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn group_on<const V: bool>(
    kind: QuantType,
    g: &[u8],
    nb: usize,
    x: &PackedX,
    t: usize,
    n: usize,
    direct: Option<Direct>,
    res: &mut [[f32; ROWS]; MAX_TOKENS],
) {
    let mut store = |i: usize, half: usize, acc: __m256| match direct {
        Some(d) => {
            let p = d.ptr.add(i * d.tok_stride + 8 * half);
            if d.mask == u16::MAX {
                _mm256_storeu_ps(p, acc);
            } else {
                // A ragged last group: only the lanes of its rows in this half.
                let sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
                let bits = _mm256_set1_epi32((d.mask as i32 >> (8 * half)) & 0xFF);
                let lanes = _mm256_cmpeq_epi32(_mm256_and_si256(bits, sel), sel);
                _mm256_maskstore_ps(p, lanes, acc);
            }
        }
        None => _mm256_storeu_ps(res[i].as_mut_ptr().add(8 * half), acc),
    };
    let one = match kind {
        _ if n != 1 => None,
        QuantType::Q4_0 => Some(q4_0_one::<V>(g.as_ptr(), nb, x, t)),
        QuantType::Q4K => Some(q4_k_one::<V>(g.as_ptr(), nb, x, t)),
        QuantType::Q8_0 => Some(q8_0_one::<V>(g.as_ptr(), nb, x, t)),
        _ => None,
    };
    if let Some(acc) = one {
        for (half, a) in acc.into_iter().enumerate() {
            store(0, half, a);
        }
        return;
    }
    let mut t0 = 0;
    while t0 < n {
        let m = (n - t0).min(TOKENS);
        for half in 0..2 {
            let mut put = |acc: &[__m256]| {
                for (i, a) in acc.iter().enumerate() {
                    store(t0 + i, half, *a);
                }
            };
            macro_rules! run {
                ($f:ident; $($n:literal)*) => {
                    match m { $($n => put(&$f::<$n, V>(g.as_ptr(), half, nb, x, t + t0)),)* _ => {} }
                };
                ($f:ident, $q4:tt; $($n:literal)*) => {
                    match m { $($n => put(&$f::<$n, $q4, V>(g.as_ptr(), half, nb, x, t + t0)),)* _ => {} }
                };
            }
            match kind {
                QuantType::Q8_0 => run!(q32, false; 1 2 3 4),
                QuantType::Q4_0 => run!(q32, true; 1 2 3 4),
                QuantType::Q4K => run!(q4_k; 1 2 3 4),
                _ => {}
            }
        }
        t0 += m;
    }
}

/// `init + Σ_j w[j]·a[4j..4j+4]` of unsigned weight bytes in the 8 lanes, by `vpdpbusd`.
#[inline(always)]
unsafe fn dot_vnni(w: &[__m256i; 8], a: *const i8, init: __m256i) -> __m256i {
    let mut i = init;
    for (j, wj) in w.iter().enumerate() {
        i = _mm256_dpbusd_avx_epi32(i, *wj, bcast(a, j));
    }
    i
}

/// `Σ_j w[j]·a[4j..4j+4]` of 4-bit quants (`w[j]` unsigned bytes 0..15) in the 8 lanes:
/// by `vpdpbusd` (`V`), or summed in 16 bits (see the module docs) and widened once.
#[inline(always)]
unsafe fn dot4<const V: bool>(w: &[__m256i; 8], a: *const i8) -> __m256i {
    if V {
        return dot_vnni(w, a, _mm256_setzero_si256());
    }
    let mut s = _mm256_maddubs_epi16(w[0], bcast(a, 0));
    for (j, wj) in w.iter().enumerate().skip(1) {
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(*wj, bcast(a, j)));
    }
    _mm256_madd_epi16(s, _mm256_set1_epi16(1))
}

/// `w·a` of signed Q8_0 weight bytes and one broadcast step of activation bytes, as 32-bit
/// lane sums (`|w| · sign(a, w)`, see the module docs).
#[inline(always)]
unsafe fn dot_q8_step(w: __m256i, a: __m256i) -> __m256i {
    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

/// Sub-block `s`'s 6-bit scales of half `h` of a Q4_K block's metadata, as floats.
#[inline(always)]
unsafe fn q4k_scales(meta: *const u8, s: usize, h: usize) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
        meta.add(s * ROWS + 8 * h) as *const __m128i,
    )))
}

/// The mins of sub-blocks `2k`, `2k+1` of half `h` of a Q4_K block, as i16 pairs.
#[inline(always)]
unsafe fn q4k_mins(meta: *const u8, k: usize, h: usize) -> __m256i {
    _mm256_cvtepu8_epi16(_mm_loadu_si128(
        meta.add(128 + 32 * k + 16 * h) as *const __m128i
    ))
}

/// Q4_0 (`Q4`) or Q8_0 half row group: the AVX-512 path's sums (`init + Σ w·a` for Q4_0's
/// raw nibbles, `Σ w·a` for Q8_0: with `vpdpbusd` as that path, over `w + 128` from
/// `−128·Σa`) and its float steps.
#[inline(always)]
unsafe fn q32<const N: usize, const Q4: bool, const V: bool>(
    g: *const u8,
    half: usize,
    nb: usize,
    x: &PackedX,
    t: usize,
) -> [__m256; N] {
    let gbb = if Q4 { 288 } else { 544 };
    let mut acc = [_mm256_setzero_ps(); N];
    let m4 = _mm256_set1_epi8(0x0F);
    for b in 0..nb {
        let dw = scales8(g.add(b * gbb + 16 * half));
        let q = g.add(b * gbb + 32 + 32 * half);
        let w: [__m256i; 8] = if Q4 {
            let v: [__m256i; 4] = std::array::from_fn(|j| load(q.add(64 * j)));
            std::array::from_fn(|j| match j {
                0..4 => _mm256_and_si256(v[j], m4),
                _ => _mm256_and_si256(_mm256_srli_epi16(v[j - 4], 4), m4),
            })
        } else if V {
            let flip = _mm256_set1_epi8(-128);
            std::array::from_fn(|j| _mm256_xor_si256(load(q.add(64 * j)), flip))
        } else {
            std::array::from_fn(|j| load(q.add(64 * j)))
        };
        for_tokens!(n => {
            let (a, m) = xat(x, t + n, b);
            let i = if V {
                let init = if Q4 { (*m).init_q4 } else { (*m).init_q8 };
                dot_vnni(&w, a, _mm256_set1_epi32(init))
            } else if Q4 {
                _mm256_add_epi32(dot4::<V>(&w, a), _mm256_set1_epi32((*m).init_q4))
            } else {
                let mut s = _mm256_setzero_si256();
                for (j, wj) in w.iter().enumerate() {
                    s = _mm256_add_epi32(s, dot_q8_step(*wj, bcast(a, j)));
                }
                s
            };
            let s = _mm256_cvtepi32_ps(i);
            acc[n] = _mm256_fmadd_ps(s, _mm256_mul_ps(dw, _mm256_set1_ps((*m).d)), acc[n]);
        });
    }
    acc
}

/// Q4_0 row group, one token (a decode step): both halves in one pass over the block,
/// sharing its activation broadcasts. The same sums and float steps as [`q32`].
/// With `V` the 32-bit sums start at `init` (one `vpdpbusd` chain per half).
#[inline(always)]
unsafe fn q4_0_one<const V: bool>(g: *const u8, nb: usize, x: &PackedX, t: usize) -> [__m256; 2] {
    let mut acc = [_mm256_setzero_ps(); 2];
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let blk = g.add(b * 288);
        prefetch_ahead(blk, 288);
        let (a, m) = xat(x, t, b);
        let init = _mm256_set1_epi32((*m).init_q4);
        let mut s = [if V { init } else { _mm256_setzero_si256() }; 2];
        for j in 0..4 {
            let (lo, hi) = (bcast(a, j), bcast(a, j + 4));
            for (h, sh) in s.iter_mut().enumerate() {
                let v = load(blk.add(32 + 64 * j + 32 * h));
                let (wl, wu) = (
                    _mm256_and_si256(v, m4),
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                );
                if V {
                    *sh = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(*sh, wl, lo), wu, hi);
                } else {
                    let (l, u) = (_mm256_maddubs_epi16(wl, lo), _mm256_maddubs_epi16(wu, hi));
                    *sh = _mm256_add_epi16(*sh, _mm256_add_epi16(l, u));
                }
            }
        }
        let da = _mm256_set1_ps((*m).d);
        for (h, (acc, sh)) in acc.iter_mut().zip(s).enumerate() {
            let i = if V {
                sh
            } else {
                _mm256_add_epi32(_mm256_madd_epi16(sh, ones), init)
            };
            let dw = scales8(blk.add(16 * h));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(dw, da), *acc);
        }
    }
    acc
}

/// Q8_0 row group, one token (a decode step): both halves in one pass over the block,
/// sharing its activation broadcasts. The same sums and float steps as [`q32`].
/// With `V`, `vpdpbusd` over `w + 128` from `−128·Σa`, as [`q32`].
#[inline(always)]
unsafe fn q8_0_one<const V: bool>(g: *const u8, nb: usize, x: &PackedX, t: usize) -> [__m256; 2] {
    let mut acc = [_mm256_setzero_ps(); 2];
    let flip = _mm256_set1_epi8(-128);
    for b in 0..nb {
        let blk = g.add(b * 544);
        prefetch_ahead(blk, 544);
        let (a, m) = xat(x, t, b);
        let mut s = [if V {
            _mm256_set1_epi32((*m).init_q8)
        } else {
            _mm256_setzero_si256()
        }; 2];
        for j in 0..8 {
            let aj = bcast(a, j);
            for (h, sh) in s.iter_mut().enumerate() {
                let w = load(blk.add(32 + 64 * j + 32 * h));
                *sh = if V {
                    _mm256_dpbusd_avx_epi32(*sh, _mm256_xor_si256(w, flip), aj)
                } else {
                    _mm256_add_epi32(*sh, dot_q8_step(w, aj))
                };
            }
        }
        let da = _mm256_set1_ps((*m).d);
        for (h, (acc, sh)) in acc.iter_mut().zip(s).enumerate() {
            let dw = scales8(blk.add(16 * h));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sh), _mm256_mul_ps(dw, da), *acc);
        }
    }
    acc
}

/// Q4_K row group, one token (a decode step): both halves in one pass over each
/// sub-block, sharing its activation broadcasts. The same sums and float steps as
/// [`q4_k`].
#[inline(always)]
unsafe fn q4_k_one<const V: bool>(g: *const u8, nb: usize, x: &PackedX, t: usize) -> [__m256; 2] {
    let mut acc = [_mm256_setzero_ps(); 2];
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let meta = g.add(b * 2368);
        prefetch_ahead(meta, 320);
        let kb = x.kblocks.get_unchecked(t * x.nbx + b);
        let d = [0, 1].map(|h| scales8(meta.add(256 + 16 * h)));
        let mut sub = [_mm256_setzero_ps(); 2];
        for s in 0..8 {
            let q = meta.add(320 + s / 2 * 512);
            if s % 2 == 0 {
                prefetch_ahead(q, 512);
            }
            let a = kb.qs.as_ptr().add(32 * s);
            let mut sums = [_mm256_setzero_si256(); 2];
            for j in 0..8 {
                let aj = bcast(a, j);
                for (h, ih) in sums.iter_mut().enumerate() {
                    let v = load(q.add(64 * j + 32 * h));
                    let v = if s % 2 == 0 {
                        v
                    } else {
                        _mm256_srli_epi16(v, 4)
                    };
                    let w = _mm256_and_si256(v, m4);
                    *ih = if V {
                        _mm256_dpbusd_avx_epi32(*ih, w, aj)
                    } else {
                        _mm256_add_epi16(*ih, _mm256_maddubs_epi16(w, aj))
                    };
                }
            }
            for h in 0..2 {
                let sc = q4k_scales(meta, s, h);
                // With `V` the sums are already 32-bit.
                let i = if V {
                    sums[h]
                } else {
                    _mm256_madd_epi16(sums[h], ones)
                };
                sub[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(d[h], sc), sub[h]);
            }
        }
        let sums = x.ksums.get_unchecked(t * x.nbx + b);
        let da = _mm256_set1_ps(kb.d);
        for h in 0..2 {
            let mut im = _mm256_setzero_si256();
            for (k, &sk) in sums.iter().enumerate() {
                let mk = q4k_mins(meta, k, h);
                im = _mm256_add_epi32(im, _mm256_madd_epi16(mk, _mm256_set1_epi32(sk)));
            }
            let dmin = scales8(meta.add(288 + 16 * h));
            let total = _mm256_fnmadd_ps(dmin, _mm256_cvtepi32_ps(im), sub[h]);
            acc[h] = _mm256_fmadd_ps(total, da, acc[h]);
        }
    }
    acc
}

/// Q4_K half row group against Q8_K activations, as the VNNI path: per sub-block the
/// integer sum scaled by `d·sc` (the high nibbles shifted down rather than masked in
/// place: `Σ(16q)·a · (d/16)·sc` and `Σq·a · d·sc` are the same float, as 16 and 1/16
/// scale exactly), per super-block `acc += d_a · (Σ − dmin · Σ_s m_s·Σa_s)`.
#[inline(always)]
unsafe fn q4_k<const N: usize, const V: bool>(
    g: *const u8,
    half: usize,
    nb: usize,
    x: &PackedX,
    t: usize,
) -> [__m256; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    let m4 = _mm256_set1_epi8(0x0F);
    for b in 0..nb {
        let meta = g.add(b * 2368);
        let d = scales8(meta.add(256 + 16 * half));
        let mut sub = [_mm256_setzero_ps(); N];
        for c in 0..4 {
            let q = meta.add(320 + c * 512 + 32 * half);
            let v: [__m256i; 8] = std::array::from_fn(|j| load(q.add(64 * j)));
            for hi in 0..2 {
                let s = 2 * c + hi;
                let w: [__m256i; 8] = std::array::from_fn(|j| {
                    let vj = if hi == 0 {
                        v[j]
                    } else {
                        _mm256_srli_epi16(v[j], 4)
                    };
                    _mm256_and_si256(vj, m4)
                });
                let dsc = _mm256_mul_ps(d, q4k_scales(meta, s, half));
                for_tokens!(n => {
                    let a = x.kblocks.get_unchecked((t + n) * x.nbx + b).qs.as_ptr().add(32 * s);
                    sub[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4::<V>(&w, a)), dsc, sub[n]);
                });
            }
        }
        // Mins: row lanes hold (m[2k], m[2k+1]) as i16 pairs against the token's
        // broadcast (Σa[2k], Σa[2k+1]).
        let mins: [__m256i; 4] = std::array::from_fn(|k| q4k_mins(meta, k, half));
        let dmin = scales8(meta.add(288 + 16 * half));
        for_tokens!(n => {
            let i = (t + n) * x.nbx + b;
            let sums = x.ksums.get_unchecked(i);
            let mut im = _mm256_setzero_si256();
            for (k, mk) in mins.iter().enumerate() {
                im = _mm256_add_epi32(im, _mm256_madd_epi16(*mk, _mm256_set1_epi32(sums[k])));
            }
            let total = _mm256_fnmadd_ps(dmin, _mm256_cvtepi32_ps(im), sub[n]);
            let da = _mm256_set1_ps(x.kblocks.get_unchecked(i).d);
            acc[n] = _mm256_fmadd_ps(total, da, acc[n]);
        });
    }
    acc
}
