//! The x86-64 tiers of `kernels`: AVX2 and AVX-512 VNNI (256-bit).

use super::*;

/// `$pass::<P>(w, stride, b0, picks, y)` for the picks four at a time (P = 4, the rest
/// 1 to 3): the gathers' row passes.
macro_rules! by_fours {
    ($pass:ident, $w:expr, $stride:expr, $b0:expr, $picks:expr, $y:expr) => {
        for pc in $picks.chunks(4) {
            // SAFETY: the calling kernel's contract, for these picks.
            unsafe {
                match pc.len() {
                    4 => $pass::<4>($w, $stride, $b0, pc, $y),
                    3 => $pass::<3>($w, $stride, $b0, pc, $y),
                    2 => $pass::<2>($w, $stride, $b0, pc, $y),
                    _ => $pass::<1>($w, $stride, $b0, pc, $y),
                }
            }
        }
    };
}

/// `pub unsafe fn $name(w, stride, b0, picks, y)`: `y += Σ_p alpha_p · W[row_p][b0·$qk..]`
/// for the picked rows of `$block`s in order, up to four rows per pass over `y` (each
/// row's blocks read in sequence). `$body` adds one block of every pick of the pass
/// (`$blks: [&$block; P]`, `$picks`) into `$o`, that block's `$qk` values of `y`, so `y`
/// is loaded and stored once per pass instead of once per row.
///
/// The generated function's safety contract: blocks `r·stride + b0 .. + y.len()/$qk` of
/// every picked row `r` lie in `w`.
macro_rules! gather_kernel {
    ($feat:literal, $name:ident, $block:ty, $qk:expr, |$blks:ident, $picks:ident, $o:ident| $body:block) => {
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(
            w: &[$block],
            stride: usize,
            b0: usize,
            picks: &[(u32, f32)],
            y: &mut [f32],
        ) {
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn pass<const P: usize>(
                w: &[$block],
                stride: usize,
                b0: usize,
                $picks: &[(u32, f32)],
                y: &mut [f32],
            ) {
                for (k, $o) in y.chunks_exact_mut($qk).enumerate() {
                    // SAFETY: the caller's contract bounds block k of every pick.
                    let $blks: [&$block; P] = std::array::from_fn(|p| unsafe {
                        &*w.as_ptr().add($picks[p].0 as usize * stride + b0 + k)
                    });
                    $body
                }
            }
            by_fours!(pass, w, stride, b0, picks, y);
        }
    };
}

/// [`gather_kernel`] for 32-quant blocks with an f16 scale `d`, each dequantized as
/// `$parts` (four groups of 8 quants as bytes, from `$blk`): per element the same fused
/// multiply-adds in the same order as the row-by-row `axpy_*`.
macro_rules! gather_kernel_32 {
    ($feat:literal, $name:ident, $block:ty, $blk:ident => $parts:block) => {
        gather_kernel!($feat, $name, $block, 32, |blks, picks, o| {
            // SAFETY: o holds 32 floats (a whole block).
            let mut acc: [__m256; 4] =
                std::array::from_fn(|j| unsafe { _mm256_loadu_ps(o.as_ptr().add(8 * j)) });
            for (p, $blk) in blks.into_iter().enumerate() {
                let d = _mm256_set1_ps(picks[p].1 * h($blk.d));
                let parts: [__m128i; 4] = $parts;
                for (a, part) in acc.iter_mut().zip(parts) {
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part));
                    *a = _mm256_fmadd_ps(d, f, *a);
                }
            }
            for (j, a) in acc.iter().enumerate() {
                // SAFETY: as above.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * j), *a) };
            }
        });
    };
}

/// The score kernels' requests at element `i` of a group of keys `kk` (every 256- and
/// 512-bit `dot_f32_rows`): the same line of the key one group on, `ahead` bytes past
/// (the next keys, where they follow in memory as a cache block's do), and the line of
/// `tt`, the same keys' values, which the value kernel reads next. A decode step's single
/// pass over a block is otherwise bound by the lines a core keeps in flight.
#[inline(always)]
pub(super) fn request_keys<E, const K: usize>(
    kk: &[&[E]; K],
    tt: &[&[E]; K],
    i: usize,
    ahead: usize,
) {
    for (k, t) in kk.iter().zip(tt) {
        prefetch(k.as_ptr().wrapping_add(i).cast::<u8>().wrapping_add(ahead));
        prefetch(t.as_ptr().wrapping_add(i).cast());
    }
}

/// `then`'s slices for the keys of `kk` (`then` is as long as the keys).
#[inline(always)]
pub(super) fn group_of<'a, E, const K: usize>(
    then: Option<&[&'a [E]]>,
    j: usize,
    nk: usize,
) -> Option<[&'a [E]; K]> {
    then.map(|t| std::array::from_fn(|c| t[j + c.min(nk - 1)]))
}

/// Eight consecutive `E` (f32, or f16 bits widened in the register) from `$p` as floats;
/// for kernels generic over [`KvElem`], expanded inside their target-feature context.
macro_rules! ld8 {
    ($p:expr) => {{
        let p = $p;
        if E::F16 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>()))
        } else {
            _mm256_loadu_ps(p.cast::<f32>())
        }
    }};
}

/// The x86 kernels, written once and compiled twice: with AVX2 byte products
/// (`maddubs` + `madd`) and with AVX-512 VNNI's `vpdpbusd` on 256-bit registers.
macro_rules! x86_kernels {
    ($name:ident, $feat:literal, { $($dp:tt)* }) => {
        #[allow(dead_code)] // not every tier dispatches every kernel
        pub(crate) mod $name {
            use super::*;
            use std::arch::x86_64::*;

            $($dp)*

            #[inline]
            #[target_feature(enable = $feat)]
            pub(crate) fn hsum_ps(v: __m256) -> f32 {
                let lo = _mm256_castps256_ps128(v);
                let hi = _mm256_extractf128_ps(v, 1);
                let s = _mm_add_ps(lo, hi);
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s)
            }

            #[inline]
            #[target_feature(enable = $feat)]
            fn h(b: u16) -> f32 {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(b as i32)))
            }


            /// The 32 nibbles of a Q4_0 block as bytes 0..15 (low nibbles first).
            #[inline]
            #[target_feature(enable = $feat)]
            fn nibbles(qs: &[u8; 16]) -> __m256i {
                // SAFETY: 16-byte load from a 16-byte array.
                let tmp = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
                let b =
                    _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
                _mm256_and_si256(b, _mm256_set1_epi8(0x0F))
            }

            #[inline]
            #[target_feature(enable = $feat)]
            fn load32(p: &[i8; 32]) -> __m256i {
                // SAFETY: 32-byte load from a 32-byte array.
                unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) }
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
                let n = w.len().min(x.len());
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                let mut i = 0;
                while i + 16 <= n {
                    if i % 32 == 0 {
                        // A decode step streams bf16 rows back to back: each line once.
                        prefetch_ahead(w.as_ptr().wrapping_add(i).cast(), 64);
                    }
                    // SAFETY: i + 16 <= n bounds both loads.
                    unsafe {
                        let a = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
                        let b = _mm_loadu_si128(w.as_ptr().add(i + 8) as *const __m128i);
                        let fa =
                            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
                        let fb =
                            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
                        acc0 = _mm256_fmadd_ps(fa, _mm256_loadu_ps(x.as_ptr().add(i)), acc0);
                        acc1 = _mm256_fmadd_ps(fb, _mm256_loadu_ps(x.as_ptr().add(i + 8)), acc1);
                    }
                    i += 16;
                }
                let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
                while i < n {
                    s += f32::from_bits((w[i] as u32) << 16) * x[i];
                    i += 1;
                }
                s
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
                let n = x.len().min(y.len());
                let va = _mm256_set1_ps(alpha);
                let mut i = 0;
                while i + 8 <= n {
                    // SAFETY: i + 8 <= n bounds the loads and the store.
                    unsafe {
                        let p = y.as_mut_ptr().add(i);
                        _mm256_storeu_ps(p, _mm256_fmadd_ps(va, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p)));
                    }
                    i += 8;
                }
                while i < n {
                    y[i] += alpha * x[i];
                    i += 1;
                }
            }

            /// See `super::dot_f32_rows`: `K` keys at a time, one accumulator per pair;
            /// with `then`, requests as [`request_keys`] says.
            #[target_feature(enable = $feat)]
            pub unsafe fn dot_f32_rows<const R: usize, const K: usize, E: KvElem>(
                q: [&[f32]; R],
                k: &[&[E]],
                then: Option<&[&[E]]>,
                out: &mut [f32],
                stride: usize,
            ) {
                let n = q[0].len();
                let q = q.map(|x| &x[..n]);
                // Elements per cache line, and the distance to the same line of the key
                // one group on.
                let line = 64 / std::mem::size_of::<E>();
                let ahead = K * n * std::mem::size_of::<E>();
                assert!(then.is_none_or(|t| t.len() >= k.len()));
                let mut j = 0;
                while j < k.len() {
                    let nk = (k.len() - j).min(K);
                    // Past the last key the last one is repeated; those sums are dropped.
                    let kk: [&[E]; K] = std::array::from_fn(|c| &k[j + c.min(nk - 1)][..n]);
                    let tt = group_of::<E, K>(then, j, nk);
                    let mut acc = [[_mm256_setzero_ps(); K]; R];
                    let mut i = 0;
                    while i + 8 <= n {
                        if let Some(tt) = tt.as_ref().filter(|_| i % line == 0) {
                            request_keys(&kk, tt, i, ahead);
                        }
                        // SAFETY: i + 8 <= n and every row above is n long.
                        unsafe {
                            let a: [__m256; K] = std::array::from_fn(|c| ld8!(kk[c].as_ptr().add(i)));
                            for r in 0..R {
                                let x = _mm256_loadu_ps(q[r].as_ptr().add(i));
                                for c in 0..K {
                                    acc[r][c] = _mm256_fmadd_ps(x, a[c], acc[r][c]);
                                }
                            }
                        }
                        i += 8;
                    }
                    for r in 0..R {
                        for c in 0..nk {
                            out[r * stride + j + c] = dot_rest(hsum_ps(acc[r][c]), q[r], kk[c], i);
                        }
                    }
                    j += K;
                }
            }

            /// See `super::axpy_f32_rows`: `8·W` columns of every row stay in registers
            /// while all keys are added, so `acc` is read and written once per call.
            #[target_feature(enable = $feat)]
            pub unsafe fn axpy_f32_rows<const R: usize, const W: usize, E: KvElem>(
                p: &[f32],
                stride: usize,
                v: &[&[E]],
                scale: [f32; R],
                acc: &mut [f32],
            ) {
                let n = acc.len() / R;
                let nk = v.len();
                assert!(p.len() >= (R - 1) * stride + nk && v.iter().all(|x| x.len() >= n));
                let pp = p.as_ptr();
                let ap = acc.as_mut_ptr();
                let mut i = 0;
                while i + 8 * W <= n {
                    // SAFETY: rows are n long, i + 8·W <= n, and p holds ·stride + nk
                    // (asserted above).
                    unsafe {
                        let mut a = [[_mm256_setzero_ps(); W]; R];
                        for r in 0..R {
                            let s = _mm256_set1_ps(scale[r]);
                            for c in 0..W {
                                a[r][c] = _mm256_mul_ps(_mm256_loadu_ps(ap.add(r * n + i + 8 * c)), s);
                            }
                        }
                        for (j, vj) in v.iter().enumerate() {
                            let vc: [__m256; W] = std::array::from_fn(|c| ld8!(vj.as_ptr().add(i + 8 * c)));
                            for r in 0..R {
                                let b = _mm256_set1_ps(*pp.add(r * stride + j));
                                for c in 0..W {
                                    a[r][c] = _mm256_fmadd_ps(b, vc[c], a[r][c]);
                                }
                            }
                        }
                        for r in 0..R {
                            for c in 0..W {
                                _mm256_storeu_ps(ap.add(r * n + i + 8 * c), a[r][c]);
                            }
                        }
                    }
                    i += 8 * W;
                }
                while i + 8 <= n {
                    // SAFETY: as above, with i + 8 <= n.
                    unsafe {
                        let mut a = [_mm256_setzero_ps(); R];
                        for r in 0..R {
                            a[r] = _mm256_mul_ps(_mm256_loadu_ps(ap.add(r * n + i)), _mm256_set1_ps(scale[r]));
                        }
                        for (j, vj) in v.iter().enumerate() {
                            let v0 = ld8!(vj.as_ptr().add(i));
                            for r in 0..R {
                                a[r] = _mm256_fmadd_ps(_mm256_set1_ps(*pp.add(r * stride + j)), v0, a[r]);
                            }
                        }
                        for r in 0..R {
                            _mm256_storeu_ps(ap.add(r * n + i), a[r]);
                        }
                    }
                    i += 8;
                }
                axpy_rows_rest(p, stride, v, &scale, acc, i);
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn axpy_q8_0(w: &[BlockQ8_0], alpha: f32, y: &mut [f32]) {
                for (b, o) in w.iter().zip(y.chunks_exact_mut(QK8_0)) {
                    let d = _mm256_set1_ps(alpha * h(b.d));
                    for k in 0..4 {
                        // SAFETY: 8 bytes at 8k inside qs (32 bytes); 8 floats inside o (32).
                        unsafe {
                            let q = _mm_loadl_epi64(b.qs.as_ptr().add(8 * k) as *const __m128i);
                            let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                            let p = o.as_mut_ptr().add(8 * k);
                            _mm256_storeu_ps(p, _mm256_fmadd_ps(d, f, _mm256_loadu_ps(p)));
                        }
                    }
                }
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn axpy_q4_0(w: &[BlockQ4_0], alpha: f32, y: &mut [f32]) {
                let off = _mm256_set1_epi8(8);
                for (b, o) in w.iter().zip(y.chunks_exact_mut(QK4_0)) {
                    let d = _mm256_set1_ps(alpha * h(b.d));
                    let q = _mm256_sub_epi8(nibbles(&b.qs), off);
                    let lo = _mm256_castsi256_si128(q);
                    let hi = _mm256_extracti128_si256(q, 1);
                    let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                    for (k, part) in parts.iter().enumerate() {
                        let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(*part));
                        // SAFETY: 8 floats at 8k inside o (32).
                        unsafe {
                            let p = o.as_mut_ptr().add(8 * k);
                            _mm256_storeu_ps(p, _mm256_fmadd_ps(d, f, _mm256_loadu_ps(p)));
                        }
                    }
                }
            }

            gather_kernel_32!($feat, axpy_gather_q8_0, BlockQ8_0, blk => {
                // SAFETY: 8-byte loads at 8j inside qs (32 bytes).
                let p = blk.qs.as_ptr();
                unsafe {
                    [0, 8, 16, 24].map(|o| _mm_loadl_epi64(p.add(o) as *const __m128i))
                }
            });

            gather_kernel_32!($feat, axpy_gather_q4_0, BlockQ4_0, blk => {
                let q = _mm256_sub_epi8(nibbles(&blk.qs), _mm256_set1_epi8(8));
                let lo = _mm256_castsi256_si128(q);
                let hi = _mm256_extracti128_si256(q, 1);
                [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
            });

            // Q4_K rows (256-value blocks): per element `y = fma(alpha, d·sc·q − dmin·m, y)`,
            // the operations of `dequantize_q4_k` followed by `axpy_f32`.
            gather_kernel!($feat, axpy_gather_q4_k, BlockQ4K, QK_K, |blks, picks, ob| {
                let m4 = _mm256_set1_epi8(0x0F);
                // Per pick and sub-block: d·sc and dmin·m, as dequantize_q4_k.
                // Plain loops: as nested array::from_fn closures they were compiled out of
                // line, without the kernel's target features.
                let mut sm = [[(0.0f32, 0.0f32); 8]; P];
                for (b, smp) in blks.iter().zip(sm.iter_mut()) {
                    let (d, dmin) = (h(b.d), h(b.dmin));
                    for (s, v) in smp.iter_mut().enumerate() {
                        let (sc, m) = scale_min_k4(s, &b.scales);
                        *v = (d * sc as f32, dmin * m as f32);
                    }
                }
                // 64 values at a time: the low nibbles of 32 quant bytes are sub-block
                // 2j, the high nibbles 2j + 1.
                for (j, o) in ob.chunks_exact_mut(64).enumerate() {
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for (i, a) in acc.iter_mut().enumerate() {
                        // SAFETY: 8 floats at 8i inside o (64).
                        *a = unsafe { _mm256_loadu_ps(o.as_ptr().add(8 * i)) };
                    }
                    for p in 0..P {
                        // SAFETY: 32 bytes at 32j inside qs (128).
                        let q = unsafe {
                            _mm256_loadu_si256(blks[p].qs.as_ptr().add(32 * j) as *const __m256i)
                        };
                        let alpha = _mm256_set1_ps(picks[p].1);
                        let halves =
                            [_mm256_and_si256(q, m4), _mm256_and_si256(_mm256_srli_epi16(q, 4), m4)];
                        for (half, v) in halves.into_iter().enumerate() {
                            let (dsc, mm) = sm[p][2 * j + half];
                            let (dsc, mm) = (_mm256_set1_ps(dsc), _mm256_set1_ps(mm));
                            let lo = _mm256_castsi256_si128(v);
                            let hi = _mm256_extracti128_si256(v, 1);
                            let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                            for (i, part) in parts.into_iter().enumerate() {
                                let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                                let t = _mm256_sub_ps(_mm256_mul_ps(dsc, f), mm);
                                let a = &mut acc[4 * half + i];
                                *a = _mm256_fmadd_ps(alpha, t, *a);
                            }
                        }
                    }
                    for (i, a) in acc.iter().enumerate() {
                        // SAFETY: 8 floats at 8i inside o (64).
                        unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * i), *a) };
                    }
                }
            });

            /// f16 bits to f32, eight at a time (F16C); the tail through `half`.
            #[target_feature(enable = $feat)]
            pub unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
                let n = src.len().min(dst.len());
                let mut i = 0;
                while i + 8 <= n {
                    // SAFETY: i + 8 <= n bounds the load and the store.
                    unsafe {
                        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                    }
                    i += 8;
                }
                for (d, &h) in dst[i..n].iter_mut().zip(&src[i..n]) {
                    *d = half::f16::from_bits(h).to_f32();
                }
            }

            /// f32 to f16 bits rounded to nearest even (as `half`), eight at a time.
            #[target_feature(enable = $feat)]
            pub unsafe fn narrow_f16(src: &[f32], dst: &mut [u16]) {
                let n = src.len().min(dst.len());
                let mut i = 0;
                while i + 8 <= n {
                    // SAFETY: i + 8 <= n bounds the load and the store.
                    unsafe {
                        let v = _mm256_loadu_ps(src.as_ptr().add(i));
                        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                        _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
                    }
                    i += 8;
                }
                for (d, &v) in dst[i..n].iter_mut().zip(&src[i..n]) {
                    *d = half::f16::from_f32(v).to_bits();
                }
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn axpy_bf16(w: &[u16], alpha: f32, y: &mut [f32]) {
                let n = w.len().min(y.len());
                let va = _mm256_set1_ps(alpha);
                let mut i = 0;
                while i + 8 <= n {
                    // SAFETY: i + 8 <= n bounds the loads and the store.
                    unsafe {
                        let a = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
                        let f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
                        let p = y.as_mut_ptr().add(i);
                        _mm256_storeu_ps(p, _mm256_fmadd_ps(va, f, _mm256_loadu_ps(p)));
                    }
                    i += 8;
                }
                while i < n {
                    y[i] += alpha * f32::from_bits((w[i] as u32) << 16);
                    i += 1;
                }
            }

            /// Same accumulation order per token as `dot_bf16`, so a token's result does
            /// not depend on whether it was computed alone or in a group of four.
            #[target_feature(enable = $feat)]
            pub unsafe fn dot_bf16_x4(w: &[u16], x: [&[f32]; 4]) -> [f32; 4] {
                let n = x.iter().fold(w.len(), |m, v| m.min(v.len()));
                let mut acc0 = [_mm256_setzero_ps(); 4];
                let mut acc1 = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 16 <= n {
                    // SAFETY: i + 16 <= n bounds every load.
                    unsafe {
                        let a = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
                        let b = _mm_loadu_si128(w.as_ptr().add(i + 8) as *const __m128i);
                        let fa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
                        let fb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
                        for t in 0..4 {
                            acc0[t] = _mm256_fmadd_ps(fa, _mm256_loadu_ps(x[t].as_ptr().add(i)), acc0[t]);
                            acc1[t] = _mm256_fmadd_ps(fb, _mm256_loadu_ps(x[t].as_ptr().add(i + 8)), acc1[t]);
                        }
                    }
                    i += 16;
                }
                let mut out = [0.0f32; 4];
                for t in 0..4 {
                    out[t] = hsum_ps(_mm256_add_ps(acc0[t], acc1[t]));
                    for j in i..n {
                        out[t] += f32::from_bits((w[j] as u32) << 16) * x[t][j];
                    }
                }
                out
            }

            #[target_feature(enable = $feat)]
            fn hsum8(v: &[__m256i; 8]) -> __m256i {
                let a01 = _mm256_hadd_epi32(v[0], v[1]);
                let a23 = _mm256_hadd_epi32(v[2], v[3]);
                let a45 = _mm256_hadd_epi32(v[4], v[5]);
                let a67 = _mm256_hadd_epi32(v[6], v[7]);
                let b0 = _mm256_hadd_epi32(a01, a23);
                let b1 = _mm256_hadd_epi32(a45, a67);
                let lo = _mm256_permute2x128_si256(b0, b1, 0x20);
                let hi = _mm256_permute2x128_si256(b0, b1, 0x31);
                _mm256_add_epi32(lo, hi)
            }

            /// The f16 scales of 8 consecutive blocks as 8 f32 lanes.
            #[inline]
            #[target_feature(enable = $feat)]
            fn scales8(d: [u16; 8]) -> __m256 {
                let v = _mm_set_epi16(
                    d[7] as i16, d[6] as i16, d[5] as i16, d[4] as i16,
                    d[3] as i16, d[2] as i16, d[1] as i16, d[0] as i16,
                );
                _mm256_cvtph_ps(v)
            }

            /// N tokens against one Q8_0 row. Blocks go in groups of 8: their integer
            /// dot products are reduced together and scaled with one vector multiply.
            #[target_feature(enable = $feat)]
            pub unsafe fn dot_q8_0_n<const N: usize>(
                w: &[BlockQ8_0],
                x: [&[BlockQ8_0]; N],
                xm: [&[f32]; N],
            ) -> [f32; N] {
                let nb = w.len();
                let mut acc = [_mm256_setzero_ps(); N];
                let mut b = 0;
                while b + 8 <= nb {
                    let wd = scales8(std::array::from_fn(|k| w[b + k].d));
                    let qa: [__m256i; 8] = std::array::from_fn(|k| load32(&w[b + k].qs));
                    let aa: [__m256i; 8] = std::array::from_fn(|k| _mm256_sign_epi8(qa[k], qa[k]));
                    for t in 0..N {
                        let xb = &x[t][b..b + 8];
                        let p: [__m256i; 8] = std::array::from_fn(|k| {
                            dp(aa[k], _mm256_sign_epi8(load32(&xb[k].qs), qa[k]))
                        });
                        // SAFETY: b + 8 <= nb <= xm[t].len().
                        let xd = unsafe { _mm256_loadu_ps(xm[t].as_ptr().add(b)) };
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8(&p)), _mm256_mul_ps(wd, xd), acc[t]);
                    }
                    b += 8;
                }
                let mut out = [0.0f32; N];
                for t in 0..N {
                    out[t] = hsum_ps(acc[t]);
                    for k in b..nb {
                        let (a, xb) = (&w[k], &x[t][k]);
                        let qa = load32(&a.qs);
                        let p = dp(_mm256_sign_epi8(qa, qa), _mm256_sign_epi8(load32(&xb.qs), qa));
                        let s = _mm256_cvtepi32_ps(p);
                        out[t] += hsum_ps(s) * h(a.d) * h(xb.d);
                    }
                }
                out
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0], xm: &[f32]) -> f32 {
                // SAFETY: same features.
                unsafe { dot_q8_0_n::<1>(w, [x], [xm])[0] }
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn dot_q8_0_x4(w: &[BlockQ8_0], x: [&[BlockQ8_0]; 4], xm: [&[f32]; 4]) -> [f32; 4] {
                // SAFETY: same features.
                unsafe { dot_q8_0_n::<4>(w, x, xm) }
            }

            /// N tokens against one Q4_0 row: unsigned nibbles times the activations,
            /// minus 8·Σx per block (`xs`), blocks in groups of 8 as for Q8_0.
            #[target_feature(enable = $feat)]
            pub unsafe fn dot_q4_0_n<const N: usize>(
                w: &[BlockQ4_0],
                x: [&[BlockQ8_0]; N],
                xs: [&[f32]; N],
            ) -> [f32; N] {
                let nb = w.len();
                let mut acc = [_mm256_setzero_ps(); N];
                let mut corr = [_mm256_setzero_ps(); N];
                let mut b = 0;
                while b + 8 <= nb {
                    let wd = scales8(std::array::from_fn(|k| w[b + k].d));
                    let q: [__m256i; 8] = std::array::from_fn(|k| nibbles(&w[b + k].qs));
                    for t in 0..N {
                        let xb = &x[t][b..b + 8];
                        let p: [__m256i; 8] = std::array::from_fn(|k| dp(q[k], load32(&xb[k].qs)));
                        // SAFETY: b + 8 <= nb and xs[t] holds 2·nb values.
                        let (xd, sv) = unsafe {
                            (
                                _mm256_loadu_ps(xs[t].as_ptr().add(b)),
                                _mm256_loadu_ps(xs[t].as_ptr().add(nb + b)),
                            )
                        };
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8(&p)), _mm256_mul_ps(wd, xd), acc[t]);
                        corr[t] = _mm256_fmadd_ps(wd, sv, corr[t]);
                    }
                    b += 8;
                }
                let mut out = [0.0f32; N];
                for t in 0..N {
                    let mut c = hsum_ps(corr[t]);
                    out[t] = hsum_ps(acc[t]);
                    for k in b..nb {
                        let (a, xb) = (&w[k], &x[t][k]);
                        let da = h(a.d);
                        let p = _mm256_cvtepi32_ps(dp(nibbles(&a.qs), load32(&xb.qs)));
                        out[t] += hsum_ps(p) * da * h(xb.d);
                        c += da * xs[t][nb + k];
                    }
                    out[t] -= 8.0 * c;
                }
                out
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn dot_q4_0(w: &[BlockQ4_0], x: &[BlockQ8_0], xs: &[f32]) -> f32 {
                // SAFETY: same features.
                unsafe { dot_q4_0_n::<1>(w, [x], [xs])[0] }
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn dot_q4_0_x4(
                w: &[BlockQ4_0],
                x: [&[BlockQ8_0]; 4],
                xs: [&[f32]; 4],
            ) -> [f32; 4] {
                // SAFETY: same features.
                unsafe { dot_q4_0_n::<4>(w, x, xs) }
            }

            /// Σ over one Q4_K super-block's 4 chunks: i32 lanes of scale-weighted products.
            #[inline]
            #[target_feature(enable = $feat)]
            fn q4k_block(a: &BlockQ4K, b: &BlockQ8K, sc: &[i32; 8]) -> __m256i {
                let m4 = _mm256_set1_epi8(0x0F);
                let mut sumi = _mm256_setzero_si256();
                for j in 0..4 {
                    // SAFETY: 32-byte loads inside qs (128 bytes) and b.qs (256 bytes).
                    let (q4, q8l, q8h) = unsafe {
                        (
                            _mm256_loadu_si256(a.qs.as_ptr().add(32 * j) as *const __m256i),
                            _mm256_loadu_si256(b.qs.as_ptr().add(64 * j) as *const __m256i),
                            _mm256_loadu_si256(b.qs.as_ptr().add(64 * j + 32) as *const __m256i),
                        )
                    };
                    let q4l = _mm256_and_si256(q4, m4);
                    let q4h = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
                    let pl = _mm256_mullo_epi32(dp(q4l, q8l), _mm256_set1_epi32(sc[2 * j]));
                    let ph = _mm256_mullo_epi32(dp(q4h, q8h), _mm256_set1_epi32(sc[2 * j + 1]));
                    sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
                }
                sumi
            }

            #[inline]
            fn q4k_scales(a: &BlockQ4K) -> ([i32; 8], [i32; 8]) {
                let mut sc = [0i32; 8];
                let mut mn = [0i32; 8];
                for j in 0..8 {
                    let (s, m) = scale_min_k4(j, &a.scales);
                    sc[j] = s as i32;
                    mn[j] = m as i32;
                }
                (sc, mn)
            }

            #[inline]
            fn q4k_min_sum(mn: &[i32; 8], b: &BlockQ8K) -> i32 {
                (0..8)
                    .map(|j| mn[j] * (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32))
                    .sum()
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn dot_q4_k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
                let mut acc = _mm256_setzero_ps();
                let mut acc_m = 0.0f32;
                for (a, b) in w.iter().zip(x) {
                    let (sc, mn) = q4k_scales(a);
                    acc_m += b.d * h(a.dmin) * q4k_min_sum(&mn, b) as f32;
                    let sumi = q4k_block(a, b, &sc);
                    acc = _mm256_fmadd_ps(
                        _mm256_set1_ps(b.d * h(a.d)),
                        _mm256_cvtepi32_ps(sumi),
                        acc,
                    );
                }
                hsum_ps(acc) - acc_m
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn dot_q4_k_x4(w: &[BlockQ4K], x: [&[BlockQ8K]; 4]) -> [f32; 4] {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut acc_m = [0.0f32; 4];
                for (bi, a) in w.iter().enumerate() {
                    let (sc, mn) = q4k_scales(a);
                    let (d, dmin) = (h(a.d), h(a.dmin));
                    for t in 0..4 {
                        let b = &x[t][bi];
                        acc_m[t] += b.d * dmin * q4k_min_sum(&mn, b) as f32;
                        let sumi = q4k_block(a, b, &sc);
                        acc[t] = _mm256_fmadd_ps(
                            _mm256_set1_ps(b.d * d),
                            _mm256_cvtepi32_ps(sumi),
                            acc[t],
                        );
                    }
                }
                [0, 1, 2, 3].map(|t| hsum_ps(acc[t]) - acc_m[t])
            }
        }
    };
}

x86_kernels!(avx2, "avx2,fma,f16c", {
    /// Σ of u8·i8 products in groups of four, as 8 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dp(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }
});
x86_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni",
    {
        /// Σ of u8·i8 products in groups of four, as 8 i32 lanes (one `vpdpbusd`).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
        fn dp(a: __m256i, b: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
        }
    }
);
