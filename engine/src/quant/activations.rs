//! Activation quantization on the product path: Q8_0 blocks (for Q8_0/Q4_0 weights) and
//! Q8_K blocks (for Q4_K weights) of the f32 activations, bit-identical to the reference
//! `blocks::quantize_q8_0`/`quantize_q8_k` (half away from zero) but vectorized. Scalar,
//! `roundf` per value was 1.5% of a decode step.

use super::blocks::*;
#[cfg(target_arch = "x86_64")]
use super::kernels::avx512_vnni;

/// `blocks::quantize_q8_0`, on AVX-512 where the CPU has it.
pub fn quantize_q8_0_fast(x: &[f32], out: &mut [BlockQ8_0]) {
    #[cfg(target_arch = "x86_64")]
    if avx512_vnni() {
        // SAFETY: AVX-512 F/BW/DQ/VL checked at run time (part of the VNNI tier).
        return unsafe { avx512::quantize_q8_0(x, out) };
    }
    quantize_q8_0(x, out)
}

/// `blocks::quantize_q8_k`, on AVX-512 where the CPU has it.
pub fn quantize_q8_k_fast(x: &[f32], out: &mut [BlockQ8K]) {
    #[cfg(target_arch = "x86_64")]
    if avx512_vnni() {
        // SAFETY: AVX-512 F/BW/DQ/VL checked at run time (part of the VNNI tier).
        return unsafe { avx512::quantize_q8_k(x, out) };
    }
    quantize_q8_k(x, out)
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
            b.d = half::f16::from_f32(d).to_bits();
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

    #[test]
    fn fast_q8_0_is_the_reference_bit_for_bit() {
        // Random data, exact ties (k + 0.5 after scaling), zeros and a zero block.
        let mut x = data(32 * 40, 5);
        for (i, v) in x[..64].iter_mut().enumerate() {
            *v = (i as f32 - 32.0) * 0.5;
        }
        x[64..96].iter_mut().for_each(|v| *v = 0.0);
        x[100] = 0.0;
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
        let nb = x.len() / QK_K;
        let (mut a, mut b) = (vec![BlockQ8K::default(); nb], vec![BlockQ8K::default(); nb]);
        quantize_q8_k(&x, &mut a);
        quantize_q8_k_fast(&x, &mut b);
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert_eq!(
                (p.d.to_bits(), p.qs, p.bsums),
                (q.d.to_bits(), q.qs, q.bsums),
                "block {i}"
            );
        }
        assert!(
            a[2].d > 0.0 && a[3].d < 0.0,
            "the sign of the first extreme wins"
        );
    }
}
