//! Activation quantization on the product path: Q8_0 blocks (for Q8_0/Q4_0 weights) and
//! Q8_K blocks (for Q4_K weights) of the f32 activations, bit-identical to the reference
//! `blocks::quantize_q8_0`/`quantize_q8_k` (half away from zero) but vectorized. Scalar,
//! `roundf` per value was 1.5% of a decode step (4% of an AVX2 prefill).

use super::blocks::*;
use super::kernels::{isa, Isa};

/// `blocks::quantize_q8_0`, on AVX-512, AVX2 or NEON where the CPU has it.
pub fn quantize_q8_0_fast(x: &[f32], out: &mut [BlockQ8_0]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F/BW/DQ/VL checked at run time (part of the VNNI tier).
        Isa::Avx512Vnni => unsafe { avx512::quantize_q8_0(x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2, FMA and F16C checked at run time (the AVX2 tier).
        Isa::Avx2 => unsafe { avx2::quantize_q8_0(x, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON checked at run time.
        Isa::Neon => unsafe { neon::quantize_q8_0(x, out) },
        _ => quantize_q8_0(x, out),
    }
}

/// `blocks::quantize_q8_k`, on AVX-512, AVX2 or NEON where the CPU has it.
pub fn quantize_q8_k_fast(x: &[f32], out: &mut [BlockQ8K]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F/BW/DQ/VL checked at run time (part of the VNNI tier).
        Isa::Avx512Vnni => unsafe { avx512::quantize_q8_k(x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2, FMA and F16C checked at run time (the AVX2 tier).
        Isa::Avx2 => unsafe { avx2::quantize_q8_k(x, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON checked at run time.
        Isa::Neon => unsafe { neon::quantize_q8_k(x, out) },
        _ => quantize_q8_k(x, out),
    }
}

/// NEON: `fcvtas` converts rounding half away from zero, which is `f32::round` exactly,
/// and the saturating narrows are Rust's saturating float-to-int casts.
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::*;

    /// 16 floats at `p` times `s`, rounded half away from zero, capped at `hi`, as bytes.
    #[inline(always)]
    unsafe fn round16(p: *const f32, s: f32, hi: i32) -> int8x16_t {
        let q: [int32x4_t; 4] = std::array::from_fn(|k| {
            let v = vcvtaq_s32_f32(vmulq_n_f32(vld1q_f32(p.add(4 * k)), s));
            vminq_s32(v, vdupq_n_s32(hi))
        });
        let lo = vcombine_s16(vqmovn_s32(q[0]), vqmovn_s32(q[1]));
        let hi = vcombine_s16(vqmovn_s32(q[2]), vqmovn_s32(q[3]));
        vcombine_s8(vqmovn_s16(lo), vqmovn_s16(hi))
    }

    /// The largest magnitude (NaN ignored, as `f32::max`; 0 if there is no other).
    #[inline(always)]
    unsafe fn amax(x: &[f32]) -> f32 {
        let mut m = vdupq_n_f32(0.0);
        for c in x.chunks_exact(4) {
            m = vmaxnmq_f32(m, vabsq_f32(vld1q_f32(c.as_ptr())));
        }
        vmaxnmvq_f32(m)
    }

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
        for (xb, b) in x.chunks_exact(QK8_0).zip(out.iter_mut()) {
            let d = amax(xb) / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b.d = f32_to_f16(d);
            for k in 0..2 {
                let q = round16(xb.as_ptr().add(16 * k), id, i32::MAX);
                vst1q_s8(b.qs.as_mut_ptr().add(16 * k), q);
            }
        }
    }

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
        for (xb, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            let a = amax(xb);
            if a == 0.0 {
                *b = BlockQ8K::default();
                continue;
            }
            // The first value of largest magnitude sets the scale's sign.
            let max = xb.iter().copied().find(|v| v.abs() == a).unwrap_or(a);
            let iscale = -127.0 / max;
            for (j, s) in b.bsums.iter_mut().enumerate() {
                let q = round16(xb.as_ptr().add(16 * j), iscale, 127);
                vst1q_s8(b.qs.as_mut_ptr().add(16 * j), q);
                *s = vaddlvq_s8(q);
            }
            b.d = 1.0 / iscale;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// `p` rounded half away from zero, exactly (as the AVX-512 version).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn round_away(p: __m256) -> __m256 {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
        let frac = _mm256_and_ps(_mm256_sub_ps(p, t), abs);
        let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
        let one = _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_andnot_ps(abs, p));
        _mm256_add_ps(t, _mm256_and_ps(up, one))
    }

    /// The largest lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
    }

    /// 16 rounded values (|q| ≤ 127 by construction) as bytes, in order, and their sum.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn narrow16(a: __m256i, b: __m256i) -> (__m128i, i32) {
        // packs works per 128-bit lane: [a0 b0 | a1 b1] as i16, then both halves as i8.
        let w = _mm256_packs_epi32(a, b);
        let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(w);
        let bytes = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
        let s = _mm256_add_epi32(a, b);
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        (bytes, _mm_cvtsi128_si32(s))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (xb, b) in x.chunks_exact(QK8_0).zip(out.iter_mut()) {
            // SAFETY: 8 floats at 8i inside the 32-value block.
            let v: [__m256; 4] =
                std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xb.as_ptr().add(8 * i)) });
            let m = v.iter().fold(_mm256_setzero_ps(), |m, &vi| {
                _mm256_max_ps(m, _mm256_and_ps(vi, abs))
            });
            let amax = hmax(m);
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b.d = f32_to_f16(d);
            let vid = _mm256_set1_ps(id);
            let q: [__m256i; 4] =
                std::array::from_fn(|i| _mm256_cvttps_epi32(round_away(_mm256_mul_ps(v[i], vid))));
            for h in 0..2 {
                let (bytes, _) = narrow16(q[2 * h], q[2 * h + 1]);
                // SAFETY: 16 bytes at 16h inside qs (32).
                unsafe { _mm_storeu_si128(b.qs.as_mut_ptr().add(16 * h) as *mut __m128i, bytes) };
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (xb, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            // SAFETY: 8 floats at 8i inside the 256-value block.
            let v: [__m256; 32] =
                std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xb.as_ptr().add(8 * i)) });
            let m = v.iter().fold(_mm256_setzero_ps(), |m, &vi| {
                _mm256_max_ps(m, _mm256_and_ps(vi, abs))
            });
            let amax = hmax(m);
            if amax == 0.0 {
                *b = BlockQ8K::default();
                continue;
            }
            // The first value of largest magnitude, sign included (signed_absmax).
            let top = _mm256_set1_ps(amax);
            let at = v
                .iter()
                .enumerate()
                .find_map(|(i, &vi)| {
                    let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(
                        _mm256_and_ps(vi, abs),
                        top,
                    ));
                    (hit != 0).then(|| 8 * i + hit.trailing_zeros() as usize)
                })
                .unwrap_or(0);
            let iscale = -127.0 / xb[at];
            let vis = _mm256_set1_ps(iscale);
            let top = _mm256_set1_epi32(127);
            for j in 0..QK_K / 16 {
                let q = [0, 1].map(|k| {
                    let r = round_away(_mm256_mul_ps(v[2 * j + k], vis));
                    _mm256_min_epi32(_mm256_cvttps_epi32(r), top)
                });
                let (bytes, sum) = narrow16(q[0], q[1]);
                b.bsums[j] = sum as i16;
                // SAFETY: 16 bytes at 16j inside qs (256).
                unsafe { _mm_storeu_si128(b.qs.as_mut_ptr().add(16 * j) as *mut __m128i, bytes) };
            }
            b.d = 1.0 / iscale;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::*;

    /// `p` rounded half away from zero, exactly: truncated, then stepped away from zero
    /// when the (exact) remainder is at least one half.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    fn round_away(p: __m512) -> __m512 {
        let abs = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fff_ffff));
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
        let frac = _mm512_and_ps(_mm512_sub_ps(p, t), abs);
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
        let one = _mm512_or_ps(_mm512_set1_ps(1.0), _mm512_andnot_ps(abs, p));
        _mm512_mask_add_ps(t, up, t, one)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
        let abs = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fff_ffff));
        for (xb, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            let v: [__m512; 16] = std::array::from_fn(|i| unsafe {
                // SAFETY: 16 floats at 16i inside the 256-value block.
                _mm512_loadu_ps(xb.as_ptr().add(16 * i))
            });
            let m = v.iter().fold(_mm512_setzero_ps(), |m, &vi| {
                _mm512_max_ps(m, _mm512_and_ps(vi, abs))
            });
            let amax = _mm512_reduce_max_ps(m);
            if amax == 0.0 {
                *b = BlockQ8K::default();
                continue;
            }
            // The first value of largest magnitude, sign included (signed_absmax).
            let top = _mm512_set1_ps(amax);
            let at = v
                .iter()
                .enumerate()
                .find_map(|(i, &vi)| {
                    let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_and_ps(vi, abs), top);
                    (hit != 0).then(|| 16 * i + hit.trailing_zeros() as usize)
                })
                .unwrap_or(0);
            let iscale = -127.0 / xb[at];
            let vis = _mm512_set1_ps(iscale);
            for (j, vj) in v.into_iter().enumerate() {
                let r = round_away(_mm512_mul_ps(vj, vis));
                let q = _mm512_min_epi32(_mm512_cvttps_epi32(r), _mm512_set1_epi32(127));
                b.bsums[j] = _mm512_reduce_add_epi32(q) as i16;
                // SAFETY: 16 bytes at 16j inside qs (256).
                unsafe {
                    _mm_storeu_si128(
                        b.qs.as_mut_ptr().add(16 * j) as *mut __m128i,
                        _mm512_cvtepi32_epi8(q),
                    )
                };
            }
            b.d = 1.0 / iscale;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,f16c")]
    pub(super) unsafe fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
        let abs = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fff_ffff));
        for (xb, b) in x.chunks_exact(QK8_0).zip(out.iter_mut()) {
            let v0 = _mm512_loadu_ps(xb.as_ptr());
            let v1 = _mm512_loadu_ps(xb.as_ptr().add(16));
            let m = _mm512_max_ps(_mm512_and_ps(v0, abs), _mm512_and_ps(v1, abs));
            let amax = _mm512_reduce_max_ps(m);
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b.d = f32_to_f16(d);
            let vid = _mm512_set1_ps(id);
            for (i, v) in [v0, v1].into_iter().enumerate() {
                let r = round_away(_mm512_mul_ps(v, vid));
                let q = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r));
                _mm_storeu_si128(b.qs.as_mut_ptr().add(16 * i) as *mut __m128i, q);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::data;

    /// Whether the AVX2 tier's instructions run here (tested whatever tier was chosen).
    #[cfg(target_arch = "x86_64")]
    fn avx2_here() -> bool {
        crate::quant::kernels::cpu_has(Isa::Avx2)
    }

    #[test]
    fn fast_q8_0_is_the_reference_bit_for_bit() {
        // Random data, exact ties (k + 0.5 after scaling), zeros and a zero block.
        let mut x = data(32 * 40, 5);
        for (i, v) in x[..64].iter_mut().enumerate() {
            *v = (i as f32 - 32.0) * 0.5;
        }
        x[64..96].iter_mut().for_each(|v| *v = 0.0);
        x[100] = 0.0;
        // A block whose scale is exactly 1: halves are ties after scaling.
        for (i, v) in x[128..160].iter_mut().enumerate() {
            *v = i as f32 - 15.5;
        }
        x[159] = 127.0;
        let nb = x.len() / QK8_0;
        let (mut a, mut b) = (
            vec![BlockQ8_0::default(); nb],
            vec![BlockQ8_0::default(); nb],
        );
        quantize_q8_0(&x, &mut a);
        quantize_q8_0_fast(&x, &mut b);
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert_eq!((p.d, p.qs), (q.d, q.qs), "block {i}");
        }
        #[cfg(target_arch = "x86_64")]
        if avx2_here() {
            let mut c = vec![BlockQ8_0::default(); nb];
            // SAFETY: AVX2, FMA and F16C checked just above.
            unsafe { avx2::quantize_q8_0(&x, &mut c) };
            for (i, (p, q)) in a.iter().zip(&c).enumerate() {
                assert_eq!((p.d, p.qs), (q.d, q.qs), "AVX2 block {i}");
            }
        }
    }

    #[test]
    fn fast_q8_k_is_the_reference_bit_for_bit() {
        // Random data, exact ties, a zero block, and blocks whose largest magnitude occurs
        // with both signs (the first one sets the scale's sign).
        let mut x = data(QK_K * 6, 6);
        for (i, v) in x[..QK_K].iter_mut().enumerate() {
            *v = (i as f32 - 128.0) * 0.25;
        }
        x[QK_K..2 * QK_K].iter_mut().for_each(|v| *v = 0.0);
        x[2 * QK_K + 3] = -9.0;
        x[2 * QK_K + 200] = 9.0;
        x[3 * QK_K + 7] = 9.0;
        x[3 * QK_K + 100] = -9.0;
        // A block whose scale is exactly 1 (largest value −127): halves are ties.
        for (i, v) in x[4 * QK_K..5 * QK_K].iter_mut().enumerate() {
            *v = (i % 64) as f32 - 31.5;
        }
        x[4 * QK_K + 255] = -127.0;
        let nb = x.len() / QK_K;
        let (mut a, mut b) = (vec![BlockQ8K::default(); nb], vec![BlockQ8K::default(); nb]);
        quantize_q8_k(&x, &mut a);
        quantize_q8_k_fast(&x, &mut b);
        #[cfg(target_arch = "x86_64")]
        let c = avx2_here().then(|| {
            let mut c = vec![BlockQ8K::default(); nb];
            // SAFETY: AVX2, FMA and F16C checked just above.
            unsafe { avx2::quantize_q8_k(&x, &mut c) };
            c
        });
        #[cfg(not(target_arch = "x86_64"))]
        let c: Option<Vec<BlockQ8K>> = None;
        for fast in std::iter::once(&b).chain(c.as_ref()) {
            for (i, (p, q)) in a.iter().zip(fast).enumerate() {
                assert_eq!(
                    (p.d.to_bits(), p.qs, p.bsums),
                    (q.d.to_bits(), q.qs, q.bsums),
                    "block {i}"
                );
            }
        }
        assert!(
            a[2].d > 0.0 && a[3].d < 0.0,
            "the sign of the first extreme wins"
        );
    }
}
