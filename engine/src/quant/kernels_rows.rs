//! Register-blocked Q8_0 / Q4_0 products on AVX-512 VNNI: `R` weight rows × `N` tokens
//! per call, two blocks per 512-bit `vpdpbusd`.
//!
//! Why a separate family from `kernels`: these read the activations in a layout prepared
//! once per product ([`prepare_x`]) so that one 64-byte load feeds every row of a group,
//! and they keep one float accumulator per (row, token) with per-block scales applied
//! lane-wise, so no horizontal reduction happens until the end of the row. Weights stay in
//! ggml's layout (GGUF-compatible, nothing repacked).
//!
//! Every (row, token) result is computed with the same operations in the same order
//! whatever `R` and `N` are, so decode (one token) and prefill (many) give identical bits.
//! Both weight types use unsigned weight bytes against signed activations (Q4_0: the raw
//! nibble, Q8_0: the byte + 128) and subtract the offset times the activation block sums
//! (`q8_0_meta`) once per row, which removes every per-block sign fix-up.

use std::ops::Range;

use super::blocks::*;
use super::kernels::{isa, Isa};

/// Blocks are paired for 512-bit steps in groups of this many; the row's remaining
/// `nb % GROUP` blocks go one at a time (activations in natural order there).
const GROUP: usize = 8;

/// Whether the CPU can run [`tile_q8_0`] / [`tile_q4_0`] (runtime feature detection).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa() == Isa::Avx512Vnni
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa();
        false
    }
}

/// Whether `Matrix::matmul` uses these kernels: only with `GEMMAD_ROW_KERNELS=1`. They
/// beat the per-row `kernels` tiers on cache-resident data, but end to end on synthetic
/// E2B (2 threads, quiet machine) they decoded Q4_0 at 7.4 vs 14.1 tok/s and prefilled
/// at 26 vs 33 tok/s; kept, tested, for the follow-up that finds out why.
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    supported() && *ON.get_or_init(|| std::env::var("GEMMAD_ROW_KERNELS").as_deref() == Ok("1"))
}

/// Weight offsets: the kernels multiply unsigned weight bytes (Q8_0: byte + 128, Q4_0:
/// the raw nibble, i.e. value + 8) and start each block's integer sum at
/// `−offset · Σ activation bytes`, so the integer dot is exact and needs no float fix-up.
pub const OFFSET_Q8_0: i32 = 128;
pub const OFFSET_Q4_0: i32 = 8;

/// Activation bytes of all tokens (`nb` blocks each) without the interleaved scales, so
/// one 64-byte load covers two blocks, and per block 8 i32 lanes that seed `vpdpbusd`
/// (lane 0 is `−offset · Σq`, the rest 0).
pub fn prepare_x(x: &[BlockQ8_0], nb: usize, offset: i32, qs: &mut Vec<i8>, fix: &mut Vec<i32>) {
    let x = &x[..x.len() / nb.max(1) * nb];
    qs.clear();
    qs.extend(x.iter().flat_map(|b| b.qs));
    fix.clear();
    fix.extend(x.iter().flat_map(|b| {
        let s: i32 = b.qs.iter().map(|&q| q as i32).sum();
        [-offset * s, 0, 0, 0, 0, 0, 0, 0]
    }));
}

/// Prepared activations of all tokens of a product.
#[derive(Clone, Copy)]
pub struct PreparedX<'a> {
    /// From [`prepare_x`] (with the offset of the weight type).
    pub qs: &'a [i8],
    pub fix: &'a [i32],
    /// From `kernels::q8_0_meta` (per token: `nb` scales, then `nb` sums).
    pub meta: &'a [f32],
    /// Blocks per token.
    pub nb: usize,
}

impl<'a> PreparedX<'a> {
    fn tok(&self, t: usize) -> (&'a [i8], &'a [f32], &'a [i32]) {
        let nb = self.nb;
        (
            &self.qs[t * nb * QK8_0..(t + 1) * nb * QK8_0],
            &self.meta[2 * t * nb..2 * (t + 1) * nb],
            &self.fix[t * nb * 8..(t + 1) * nb * 8],
        )
    }
}

/// Tokens per call in prefill tiles (rows per call is [`ROWS`]).
pub const TOKENS: usize = 4;
/// Rows per call for a single token. One: several rows at once measured faster from
/// cache but about 40% slower decode from memory (interleaved row streams defeat the
/// hardware prefetcher), so decode reads one row at a time.
pub const ROWS: usize = 1;
/// Rows per call with [`TOKENS`] tokens (more would spill the accumulators).
const ROWS_P: usize = 2;

macro_rules! tile_fn {
    ($name:ident, $blk:ty, $kern:ident) => {
        /// `out[(r - rows.start) * out_stride + tok] = row r · token tok` for the rows and
        /// tokens given; `w` is the whole matrix with rows `stride` blocks apart.
        ///
        /// Panics (a caller bug) if [`supported`] is false.
        #[cfg(target_arch = "x86_64")]
        pub fn $name(
            w: &[$blk],
            stride: usize,
            rows: Range<usize>,
            x: &PreparedX,
            toks: Range<usize>,
            out: &mut [f32],
            out_stride: usize,
        ) {
            assert!(
                supported(),
                "AVX-512 VNNI row kernels on a CPU without them"
            );
            let nb = x.nb;
            let row = |r: usize| &w[r * stride..r * stride + nb];
            let mut put = |r: usize, t0: usize, v: &[f32]| {
                let o = (r - rows.start) * out_stride + t0;
                out[o..o + v.len()].copy_from_slice(v);
            };
            let mut r = rows.start;
            while r < rows.end {
                let many = toks.len() >= TOKENS;
                let g = if many { ROWS_P } else { ROWS };
                let nr = if r + g <= rows.end { g } else { 1 };
                let mut t = toks.start;
                while t < toks.end {
                    let nt = if t + TOKENS <= toks.end { TOKENS } else { 1 };
                    // SAFETY: `supported()` checked the CPU features above.
                    unsafe {
                        match (nr, nt) {
                            (ROWS_P, TOKENS) => {
                                let v = x86::$kern::<ROWS_P, TOKENS>(
                                    std::array::from_fn(|i| row(r + i)),
                                    std::array::from_fn(|j| x.tok(t + j)),
                                );
                                for (i, vi) in v.iter().enumerate() {
                                    put(r + i, t, vi);
                                }
                            }
                            (ROWS_P, _) => {
                                let v = x86::$kern::<ROWS_P, 1>(
                                    std::array::from_fn(|i| row(r + i)),
                                    [x.tok(t)],
                                );
                                for (i, vi) in v.iter().enumerate() {
                                    put(r + i, t, vi);
                                }
                            }
                            (_, TOKENS) => {
                                let v = x86::$kern::<1, TOKENS>(
                                    [row(r)],
                                    std::array::from_fn(|j| x.tok(t + j)),
                                );
                                put(r, t, &v[0]);
                            }
                            _ => {
                                let v = x86::$kern::<1, 1>([row(r)], [x.tok(t)]);
                                put(r, t, &v[0]);
                            }
                        }
                    }
                    t += nt;
                }
                r += nr;
            }
        }

        #[cfg(not(target_arch = "x86_64"))]
        pub fn $name(
            _: &[$blk],
            _: usize,
            _: Range<usize>,
            _: &PreparedX,
            _: Range<usize>,
            _: &mut [f32],
            _: usize,
        ) {
            unreachable!("row kernels need AVX-512 VNNI; callers check supported()")
        }
    };
}

tile_fn!(tile_q8_0, BlockQ8_0, q8_0);
tile_fn!(tile_q4_0, BlockQ4_0, q4_0);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::kernels::vnni::{h, hsum_ps, scales8};
    use super::*;
    use std::arch::x86_64::*;

    /// One (row, token) pair's running state.
    #[derive(Clone, Copy)]
    struct Acc {
        /// Σ over paired blocks of (integer dot) × (weight scale × activation scale).
        v: __m512,
        /// The same for the blocks past the last group, as a scalar.
        tail: f32,
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn hsum512(v: __m512) -> f32 {
        hsum_ps(_mm256_add_ps(
            _mm512_castps512_ps256(v),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
        ))
    }

    /// The shared loop: `unpack(row, k)` gives blocks k, k+1 of a row as 64 unsigned
    /// bytes in the prepared activation order; `lanes[p]` maps the 16 dot-product lanes
    /// of pair p to its two blocks' scale lanes; `single(block, x, fix)` is the i32 lanes
    /// of one block against its 32 activation bytes, seeded with `fix`.
    #[inline(always)]
    // Blocks are indexed in several rows and tokens at once.
    #[allow(clippy::needless_range_loop)]
    unsafe fn run<B, const R: usize, const N: usize>(
        w: [&[B]; R],
        x: [(&[i8], &[f32], &[i32]); N],
        d: impl Fn(&B) -> u16,
        unpack: impl Fn(&[B], usize) -> __m512i,
        single: impl Fn(&B, __m256i, __m256i) -> __m256i,
        lanes: [__m512i; 4],
    ) -> [[f32; N]; R] {
        let nb = w[0].len();
        let full = nb / GROUP * GROUP;
        let zero = Acc {
            v: _mm512_setzero_ps(),
            tail: 0.0,
        };
        let mut acc = [[zero; N]; R];
        let mut b = 0;
        while b < full {
            let wd: [__m256; R] =
                std::array::from_fn(|i| scales8(std::array::from_fn(|k| d(&w[i][b + k]))));
            // SAFETY: b + 8 <= nb and each token's meta holds 2·nb floats.
            let xd: [__m256; N] =
                std::array::from_fn(|j| unsafe { _mm256_loadu_ps(x[j].1.as_ptr().add(b)) });
            let mut sc = [[_mm512_setzero_ps(); N]; R];
            for i in 0..R {
                for j in 0..N {
                    sc[i][j] = _mm512_castps256_ps512(_mm256_mul_ps(wd[i], xd[j]));
                }
            }
            for (p, lane) in lanes.iter().enumerate() {
                let k = b + 2 * p;
                let q: [__m512i; R] = std::array::from_fn(|i| unpack(w[i], k));
                for j in 0..N {
                    // SAFETY: blocks k, k+1 < nb, so 64 bytes at 32k are inside the token.
                    let xv = unsafe { _mm512_loadu_si512(x[j].0.as_ptr().add(k * QK8_0) as _) };
                    // SAFETY: blocks k, k+1 < nb, so 16 lanes at 8k are inside the token.
                    let fix = unsafe { _mm512_loadu_si512(x[j].2.as_ptr().add(k * 8) as _) };
                    for i in 0..R {
                        let dp = _mm512_dpbusd_epi32(fix, q[i], xv);
                        let s = _mm512_permutexvar_ps(*lane, sc[i][j]);
                        acc[i][j].v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), s, acc[i][j].v);
                    }
                }
            }
            b += GROUP;
        }
        for k in full..nb {
            let wd: [f32; R] = std::array::from_fn(|i| h(d(&w[i][k])));
            for j in 0..N {
                // SAFETY: block k < nb: 32 bytes at 32k and 8 lanes at 8k are inside the
                // token.
                let (xv, fix) = unsafe {
                    (
                        _mm256_loadu_si256(x[j].0.as_ptr().add(k * QK8_0) as *const _),
                        _mm256_loadu_si256(x[j].2.as_ptr().add(k * 8) as *const _),
                    )
                };
                for i in 0..R {
                    let p = _mm256_cvtepi32_ps(single(&w[i][k], xv, fix));
                    acc[i][j].tail += hsum_ps(p) * wd[i] * x[j].1[k];
                }
            }
        }
        acc.map(|row| row.map(|a| hsum512(a.v) + a.tail))
    }

    /// Scale-lane maps for the four pairs of a group: lane l of pair p belongs to block
    /// `2p + l / 8` (each block's 32 activation bytes are one 256-bit half).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn lanes_q8_0() -> [__m512i; 4] {
        std::array::from_fn(|p| {
            let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
            _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a)
        })
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn q8_0<const R: usize, const N: usize>(
        w: [&[BlockQ8_0]; R],
        x: [(&[i8], &[f32], &[i32]); N],
    ) -> [[f32; N]; R] {
        let flip = _mm512_set1_epi8(-128);
        let flip256 = _mm256_set1_epi8(-128);
        // SAFETY: same features; the closures only load inside the blocks they are given.
        unsafe {
            run(
                w,
                x,
                |b: &BlockQ8_0| b.d,
                |w: &[BlockQ8_0], k: usize| {
                    let lo = _mm256_loadu_si256(w[k].qs.as_ptr() as *const __m256i);
                    let hi = _mm256_loadu_si256(w[k + 1].qs.as_ptr() as *const __m256i);
                    let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    _mm512_xor_si512(v, flip)
                },
                |b: &BlockQ8_0, xv: __m256i, fix: __m256i| {
                    let q = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
                    _mm256_dpbusd_epi32(fix, _mm256_xor_si256(q, flip256), xv)
                },
                lanes_q8_0(),
            )
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn q4_0<const R: usize, const N: usize>(
        w: [&[BlockQ4_0]; R],
        x: [(&[i8], &[f32], &[i32]); N],
    ) -> [[f32; N]; R] {
        let m4 = _mm512_set1_epi8(0x0F);
        let shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
        let m4_256 = _mm256_set1_epi8(0x0F);
        // SAFETY: same features; the closures only load inside the blocks they are given.
        unsafe {
            run(
                w,
                x,
                |b: &BlockQ4_0| b.d,
                |w: &[BlockQ4_0], k: usize| {
                    // Each block's 16 bytes in both 128-bit halves of a 256-bit half, the
                    // upper copy shifted down a nibble: broadcast loads and a per-lane
                    // shift instead of three shuffles.
                    let a = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                        w[k].qs.as_ptr() as *const __m128i
                    ));
                    let b = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                        w[k + 1].qs.as_ptr() as *const __m128i
                    ));
                    let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
                    _mm512_and_si512(_mm512_srlv_epi64(z, shift), m4)
                },
                |b: &BlockQ4_0, xv: __m256i, fix: __m256i| {
                    let t = _mm_loadu_si128(b.qs.as_ptr() as *const __m128i);
                    let v = _mm256_inserti128_si256::<1>(
                        _mm256_castsi128_si256(t),
                        _mm_srli_epi16::<4>(t),
                    );
                    _mm256_dpbusd_epi32(fix, _mm256_and_si256(v, m4_256), xv)
                },
                lanes_q8_0(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::{dot_q4_0_scalar, dot_q8_0_scalar, q8_0_meta};
    use super::*;
    use crate::test_util::data;

    /// Odd row counts (tails of the 4-row groups), odd token counts (tails of the
    /// 4-token groups) and block counts with and without a partial group.
    #[test]
    fn tiles_match_scalar_and_do_not_depend_on_grouping() {
        if !supported() {
            eprintln!("no AVX-512 VNNI here: row kernels not exercised");
            return;
        }
        for &(rows, nb, t) in &[
            (7usize, 16usize, 5usize),
            (9, 11, 3),
            (5, 3, 1),
            (13, 64, 6),
        ] {
            let cols = nb * 32;
            let w = data(rows * cols, 11);
            let xf = data(t * cols, 12);
            let mut w8 = vec![BlockQ8_0::default(); rows * nb];
            let mut w4 = vec![BlockQ4_0 { d: 0, qs: [0; 16] }; rows * nb];
            for r in 0..rows {
                quantize_q8_0(&w[r * cols..(r + 1) * cols], &mut w8[r * nb..(r + 1) * nb]);
                quantize_q4_0(&w[r * cols..(r + 1) * cols], &mut w4[r * nb..(r + 1) * nb]);
            }
            let mut xq = vec![BlockQ8_0::default(); t * nb];
            for i in 0..t {
                quantize_q8_0(&xf[i * cols..(i + 1) * cols], &mut xq[i * nb..(i + 1) * nb]);
            }
            let mut meta = Vec::new();
            q8_0_meta(&xq, nb, &mut meta);
            for q8 in [true, false] {
                let (mut qs, mut fix) = (Vec::new(), Vec::new());
                let off = if q8 { OFFSET_Q8_0 } else { OFFSET_Q4_0 };
                prepare_x(&xq, nb, off, &mut qs, &mut fix);
                let px = PreparedX {
                    qs: &qs,
                    fix: &fix,
                    meta: &meta,
                    nb,
                };
                let mut all = vec![0.0; rows * t];
                let mut one = vec![0.0; rows * t];
                let tile = |rows: Range<usize>, toks: Range<usize>, out: &mut [f32], os| {
                    if q8 {
                        tile_q8_0(&w8, nb, rows, &px, toks, out, os)
                    } else {
                        tile_q4_0(&w4, nb, rows, &px, toks, out, os)
                    }
                };
                tile(0..rows, 0..t, &mut all, t);
                // Each token alone, each row alone (decode-shaped calls).
                for r in 0..rows {
                    for i in 0..t {
                        tile(r..r + 1, i..i + 1, &mut one[r * t..], t);
                    }
                }
                for r in 0..rows {
                    for i in 0..t {
                        let (wr, xr) = (r * nb..(r + 1) * nb, i * nb..(i + 1) * nb);
                        let want = if q8 {
                            dot_q8_0_scalar(&w8[wr], &xq[xr])
                        } else {
                            dot_q4_0_scalar(&w4[wr], &xq[xr])
                        };
                        // Lanes are scaled before they are summed, so rounding differs from
                        // the reference's order: compare against the terms' magnitude.
                        let mag: f32 = (0..cols)
                            .map(|c| (w[r * cols + c] * xf[i * cols + c]).abs())
                            .sum();
                        let got = all[r * t + i];
                        assert!(
                            (got - want).abs() < 1e-6 * mag.max(1.0),
                            "q8 {q8} {rows}x{nb} t={t} r={r} i={i}: {got} vs {want}"
                        );
                        assert_eq!(got.to_bits(), one[r * t + i].to_bits());
                    }
                }
            }
        }
    }
}
