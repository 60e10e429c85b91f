//! The AVX-512 VNNI products over packed row groups: one 512-bit register holds a
//! row group's 16 lanes.

use std::arch::x86_64::*;

use super::*;

/// Activation bytes `4k..4k+4` of a block broadcast to every lane.
#[inline(always)]
unsafe fn bcast(a: *const i8, k: usize) -> __m512i {
    _mm512_set1_epi32((a.add(4 * k) as *const i32).read_unaligned())
}

#[inline(always)]
unsafe fn load(p: *const u8) -> __m512i {
    _mm512_loadu_si512(p as *const __m512i)
}

#[inline(always)]
unsafe fn scales16(p: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

/// `lo[n] += wl · a_n[o..o+4]` and `hi[n] += wh · a_n[o+16..o+20]` for eight tokens, in
/// this order. Written out because LLVM regroups the same intrinsics per token (chains
/// of 8 again) and, given pointers it can share, re-derives them per block; here each
/// token's activations are a base register and the offsets immediates.
///
/// Safety: each `$p[n]` must address an activation block's 32 quant bytes, and the CPU
/// must have AVX-512 VNNI (the macro is used only in kernels that enable it).
macro_rules! dot16 {
    ($o:literal, $wl:expr, $wh:expr, $p:expr, $lo:expr, $hi:expr) => {
        std::arch::asm!(
            "vpdpbusd {l0}, {wl}, dword ptr [{p0} + {o}]{{1to16}}",
            "vpdpbusd {h0}, {wh}, dword ptr [{p0} + {o} + 16]{{1to16}}",
            "vpdpbusd {l1}, {wl}, dword ptr [{p1} + {o}]{{1to16}}",
            "vpdpbusd {h1}, {wh}, dword ptr [{p1} + {o} + 16]{{1to16}}",
            "vpdpbusd {l2}, {wl}, dword ptr [{p2} + {o}]{{1to16}}",
            "vpdpbusd {h2}, {wh}, dword ptr [{p2} + {o} + 16]{{1to16}}",
            "vpdpbusd {l3}, {wl}, dword ptr [{p3} + {o}]{{1to16}}",
            "vpdpbusd {h3}, {wh}, dword ptr [{p3} + {o} + 16]{{1to16}}",
            "vpdpbusd {l4}, {wl}, dword ptr [{p4} + {o}]{{1to16}}",
            "vpdpbusd {h4}, {wh}, dword ptr [{p4} + {o} + 16]{{1to16}}",
            "vpdpbusd {l5}, {wl}, dword ptr [{p5} + {o}]{{1to16}}",
            "vpdpbusd {h5}, {wh}, dword ptr [{p5} + {o} + 16]{{1to16}}",
            "vpdpbusd {l6}, {wl}, dword ptr [{p6} + {o}]{{1to16}}",
            "vpdpbusd {h6}, {wh}, dword ptr [{p6} + {o} + 16]{{1to16}}",
            "vpdpbusd {l7}, {wl}, dword ptr [{p7} + {o}]{{1to16}}",
            "vpdpbusd {h7}, {wh}, dword ptr [{p7} + {o} + 16]{{1to16}}",
            l0 = inout(zmm_reg) $lo[0], l1 = inout(zmm_reg) $lo[1],
            l2 = inout(zmm_reg) $lo[2], l3 = inout(zmm_reg) $lo[3],
            l4 = inout(zmm_reg) $lo[4], l5 = inout(zmm_reg) $lo[5],
            l6 = inout(zmm_reg) $lo[6], l7 = inout(zmm_reg) $lo[7],
            h0 = inout(zmm_reg) $hi[0], h1 = inout(zmm_reg) $hi[1],
            h2 = inout(zmm_reg) $hi[2], h3 = inout(zmm_reg) $hi[3],
            h4 = inout(zmm_reg) $hi[4], h5 = inout(zmm_reg) $hi[5],
            h6 = inout(zmm_reg) $hi[6], h7 = inout(zmm_reg) $hi[7],
            wl = in(zmm_reg) $wl, wh = in(zmm_reg) $wh,
            p0 = in(reg) $p[0], p1 = in(reg) $p[1], p2 = in(reg) $p[2], p3 = in(reg) $p[3],
            p4 = in(reg) $p[4], p5 = in(reg) $p[5], p6 = in(reg) $p[6], p7 = in(reg) $p[7],
            o = const $o,
            options(pure, readonly, nostack, preserves_flags),
        )
    };
}

/// One row group × tokens `t..t+n` into `direct`, or else into `res[i][row]`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn group(
    kind: QuantType,
    g: &[u8],
    nb: usize,
    x: &PackedX,
    t: usize,
    n: usize,
    direct: Option<Direct>,
    res: &mut [[f32; ROWS]; MAX_TOKENS],
) {
    let mut store = |acc: &[__m512]| match direct {
        Some(d) => {
            for (i, a) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(d.ptr.add(i * d.tok_stride), d.mask, *a);
            }
        }
        None => {
            for (r, a) in res.iter_mut().zip(acc) {
                _mm512_storeu_ps(r.as_mut_ptr(), *a);
            }
        }
    };
    macro_rules! run {
        ($f:ident; $($n:literal)*) => {
            match n { $($n => store(&$f::<$n>(g.as_ptr(), nb, x, t)),)* _ => {} }
        };
        ($f:ident, $q4:tt; $($n:literal)*) => {
            match n { $($n => store(&$f::<$n, $q4>(g.as_ptr(), nb, x, t)),)* _ => {} }
        };
    }
    match kind {
        QuantType::Q8_0 => run!(q32, false; 1 2 3 4 5 6 7 8),
        QuantType::Q4_0 => run!(q32, true; 1 2 3 4 5 6 7 8),
        QuantType::Q4K => run!(q4_k; 1 2 3 4 5 6 7 8),
        _ => {}
    }
}

/// `init + Σ_j w[j]·a[4j..4j+4]` in each of the 16 row lanes: one 32-quant block of a
/// row group against one activation block, in `CHAINS` (1 or 2) dependency chains.
/// The sums are exact integers, so the grouping does not change the result.
#[inline(always)]
unsafe fn dot_block<const CHAINS: usize>(w: &[__m512i; 8], a: *const i8, init: __m512i) -> __m512i {
    if CHAINS == 1 {
        let mut i = init;
        for (j, wj) in w.iter().enumerate() {
            i = _mm512_dpbusd_epi32(i, *wj, bcast(a, j));
        }
        return i;
    }
    let mut i0 = init;
    let mut i1 = _mm512_setzero_si512();
    for j in (0..8).step_by(2) {
        i0 = _mm512_dpbusd_epi32(i0, w[j], bcast(a, j));
        i1 = _mm512_dpbusd_epi32(i1, w[j + 1], bcast(a, j + 1));
    }
    _mm512_add_epi32(i0, i1)
}

/// Q4_0 (`Q4`) or Q8_0 row group: the block's quants as unsigned bytes (`w[j]` meets
/// activation bytes `4j..4j+4`), the integer sum started at `−offset · Σa`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q32<const N: usize, const Q4: bool>(
    g: *const u8,
    nb: usize,
    x: &PackedX,
    t: usize,
) -> [__m512; N] {
    let gbb = if Q4 { 288 } else { 544 };
    let mut acc = [_mm512_setzero_ps(); N];
    let m4 = _mm512_set1_epi8(0x0F);
    let flip = _mm512_set1_epi8(-128);
    // Weight registers `j` and `j + 4` (Q4_0: a byte's low and high nibbles).
    let wpair = |q: *const u8, j: usize| {
        if Q4 {
            let v = load(q.add(64 * j));
            (
                _mm512_and_si512(v, m4),
                _mm512_and_si512(_mm512_srli_epi16(v, 4), m4),
            )
        } else {
            (
                _mm512_xor_si512(load(q.add(64 * j)), flip),
                _mm512_xor_si512(load(q.add(64 * (j + 4))), flip),
            )
        }
    };
    let init = |m: *const XMeta| _mm512_set1_epi32(if Q4 { (*m).init_q4 } else { (*m).init_q8 });
    for b in 0..nb {
        if N == 1 {
            prefetch_ahead(g.add(b * gbb), gbb);
        }
        let dw = scales16(g.add(b * gbb));
        let q = g.add(b * gbb + 32);
        // Each token's sum in two chains (quants 0..16 from the offset, 16..32 from 0),
        // issued weight-major across the tokens. For a prefill, chains of 4 dependent
        // products instead of 8 keep both VNNI ports busy (one core, 8 tokens from cache:
        // 161 -> 190 GMAC/s). The sums are exact integers, so the grouping changes no bit.
        let mut am = [(std::ptr::null::<i8>(), std::ptr::null::<XMeta>()); N];
        for_tokens!(n => { am[n] = xat(x, t + n, b); });
        let mut lo = [_mm512_setzero_si512(); N];
        for_tokens!(n => { lo[n] = init(am[n].1); });
        let mut hi = [_mm512_setzero_si512(); N];
        if N == MAX_TOKENS {
            // (`min` only lets the other token counts compile; they never come here.)
            // SAFETY (dot16): `am` holds the quants of tokens t..t+8, block b (xat's
            // contract, the caller's); q32 runs only where AVX-512 VNNI is enabled.
            let p: [*const i8; MAX_TOKENS] = std::array::from_fn(|n| am[n.min(N - 1)].0);
            let (l, h) = (&mut lo[..], &mut hi[..]);
            let (wl, wh) = wpair(q, 0);
            dot16!(0, wl, wh, p, l, h);
            let (wl, wh) = wpair(q, 1);
            dot16!(4, wl, wh, p, l, h);
            let (wl, wh) = wpair(q, 2);
            dot16!(8, wl, wh, p, l, h);
            let (wl, wh) = wpair(q, 3);
            dot16!(12, wl, wh, p, l, h);
        } else {
            for j in 0..4 {
                let (wl, wh) = wpair(q, j);
                for_tokens!(n => {
                    lo[n] = _mm512_dpbusd_epi32(lo[n], wl, bcast(am[n].0, j));
                    hi[n] = _mm512_dpbusd_epi32(hi[n], wh, bcast(am[n].0, j + 4));
                });
            }
        }
        for_tokens!(n => {
            let s = _mm512_cvtepi32_ps(_mm512_add_epi32(lo[n], hi[n]));
            let d = _mm512_set1_ps((*am[n].1).d);
            acc[n] = _mm512_fmadd_ps(s, _mm512_mul_ps(dw, d), acc[n]);
        });
    }
    acc
}

/// Q4_K row group against Q8_K activations: per sub-block the integer sum scaled by
/// `d·sc` (high nibbles are masked in place, 16× their value, and the 1/16 folded into
/// the scale, exactly), per super-block `acc += d_a · (Σ − dmin · Σ_s m_s·Σa_s)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q4_k<const N: usize>(g: *const u8, nb: usize, x: &PackedX, t: usize) -> [__m512; N] {
    let mut acc = [_mm512_setzero_ps(); N];
    let (m4, mhi) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(-16));
    for b in 0..nb {
        let meta = g.add(b * 2368);
        if N == 1 {
            prefetch_ahead(meta, 320);
        }
        let d = scales16(meta.add(256));
        // High-nibble sub-blocks: d/16 (exact), so (d/16)·sc = d·sc/16 bit for bit.
        let d16 = _mm512_mul_ps(d, _mm512_set1_ps(1.0 / 16.0));
        let mut sub = [_mm512_setzero_ps(); N];
        for c in 0..4 {
            let q = meta.add(320 + c * 512);
            if N == 1 {
                prefetch_ahead(q, 512);
            }
            for half in 0..2 {
                let s = 2 * c + half;
                let mask = if half == 0 { m4 } else { mhi };
                let w: [__m512i; 8] =
                    std::array::from_fn(|j| _mm512_and_si512(load(q.add(64 * j)), mask));
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    meta.add(s * ROWS) as *const __m128i,
                )));
                let dsc = _mm512_mul_ps(if half == 0 { d } else { d16 }, sc);
                for_tokens!(n => {
                    let a = x.kblocks.get_unchecked((t + n) * x.nbx + b).qs.as_ptr().add(32 * s);
                    let i = if N == 1 {
                        dot_block::<2>(&w, a, _mm512_setzero_si512())
                    } else {
                        dot_block::<1>(&w, a, _mm512_setzero_si512())
                    };
                    sub[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), dsc, sub[n]);
                });
            }
        }
        // Mins: row lanes hold (m[2k], m[2k+1]) as i16 pairs against the token's
        // broadcast (Σa[2k], Σa[2k+1]).
        let mins: [__m512i; 4] = std::array::from_fn(|k| {
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(meta.add(128 + 32 * k) as *const __m256i))
        });
        let dmin = scales16(meta.add(288));
        for_tokens!(n => {
            let i = (t + n) * x.nbx + b;
            let sums = x.ksums.get_unchecked(i);
            let mut im = _mm512_setzero_si512();
            for (k, mk) in mins.iter().enumerate() {
                im = _mm512_dpwssd_epi32(im, *mk, _mm512_set1_epi32(sums[k]));
            }
            let total = _mm512_fnmadd_ps(dmin, _mm512_cvtepi32_ps(im), sub[n]);
            let da = _mm512_set1_ps(x.kblocks.get_unchecked(i).d);
            acc[n] = _mm512_fmadd_ps(total, da, acc[n]);
        });
    }
    acc
}
