//! Dot-product kernels: bf16×f32, Q8_0×Q8_0, Q4_0×Q8_0 and Q4_K×Q8_K, each with a
//! portable scalar version (the reference the tests compare against) and SIMD versions
//! chosen at run time (x86-64 AVX2+FMA, aarch64 NEON).

use std::sync::OnceLock;

use super::blocks::*;

/// The instruction set the kernels use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "aarch64")]
    Neon,
}

/// Detected once; `GEMMAD_ISA=scalar` forces the portable kernels (for comparisons).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("GEMMAD_ISA").as_deref() == Ok("scalar") {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                return Isa::Neon;
            }
        }
        Isa::Scalar
    })
}

// ---------------------------------------------------------------- scalar references

pub fn dot_bf16_scalar(w: &[u16], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let cw = w.chunks_exact(8);
    let cx = x.chunks_exact(8);
    let (rw, rx) = (cw.remainder(), cx.remainder());
    for (a, b) in cw.zip(cx) {
        for k in 0..8 {
            acc[k] += f32::from_bits((a[k] as u32) << 16) * b[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in rw.iter().zip(rx) {
        s += f32::from_bits((*a as u32) << 16) * b;
    }
    s
}

pub fn dot_q8_0_scalar(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    let mut s = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let mut i = 0i32;
        for k in 0..QK8_0 {
            i += a.qs[k] as i32 * b.qs[k] as i32;
        }
        s += i as f32 * f16_to_f32(a.d) * f16_to_f32(b.d);
    }
    s
}

pub fn dot_q4_0_scalar(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    let mut s = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let mut i = 0i32;
        for j in 0..QK4_0 / 2 {
            let lo = (a.qs[j] & 0x0F) as i32 - 8;
            let hi = (a.qs[j] >> 4) as i32 - 8;
            i += lo * b.qs[j] as i32 + hi * b.qs[j + QK4_0 / 2] as i32;
        }
        s += i as f32 * f16_to_f32(a.d) * f16_to_f32(b.d);
    }
    s
}

pub fn dot_q4_k_scalar(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    let mut s = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let mut sumi = 0i32;
        let mut summ = 0i32;
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &a.scales);
            let chunk = j / 2;
            let hi = j % 2 == 1;
            let mut dot = 0i32;
            for l in 0..32 {
                let q = a.qs[32 * chunk + l];
                let q = if hi { q >> 4 } else { q & 0x0F } as i32;
                dot += q * b.qs[32 * j + l] as i32;
            }
            sumi += sc as i32 * dot;
            summ += m as i32 * (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32);
        }
        s += b.d * (f16_to_f32(a.d) * sumi as f32 - f16_to_f32(a.dmin) * summ as f32);
    }
    s
}

// ---------------------------------------------------------------- dispatch

#[inline]
pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified AVX2 and FMA at run time.
        Isa::Avx2 => unsafe { x86::dot_bf16(w, x) },
        _ => dot_bf16_scalar(w, x),
    }
}

#[inline]
pub fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified AVX2 and FMA at run time.
        Isa::Avx2 => unsafe { x86::dot_q8_0(w, x) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::dot_q8_0(w, x) },
        _ => dot_q8_0_scalar(w, x),
    }
}

#[inline]
pub fn dot_q4_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified AVX2 and FMA at run time.
        Isa::Avx2 => unsafe { x86::dot_q4_0(w, x) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::dot_q4_0(w, x) },
        _ => dot_q4_0_scalar(w, x),
    }
}

#[inline]
pub fn dot_q4_k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified AVX2 and FMA at run time.
        Isa::Avx2 => unsafe { x86::dot_q4_k(w, x) },
        _ => dot_q4_k_scalar(w, x),
    }
}

// ---------------------------------------------------------------- x86-64 AVX2

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum_ps(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Σ of products of signed bytes, as 8 f32 lanes (ggml `mul_sum_i8_pairs_float`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn mul_sum_i8_pairs(x: __m256i, y: __m256i) -> __m256 {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        let dot = _mm256_maddubs_epi16(ax, sy);
        let i32s = _mm256_madd_epi16(dot, _mm256_set1_epi16(1));
        _mm256_cvtepi32_ps(i32s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n bounds both loads.
            unsafe {
                let a = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
                let b = _mm_loadu_si128(w.as_ptr().add(i + 8) as *const __m128i);
                let fa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
                let fb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
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

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (a, b) in w.iter().zip(x) {
            let d = _mm256_set1_ps(f16_to_f32(a.d) * f16_to_f32(b.d));
            // SAFETY: each qs is exactly 32 bytes.
            let (qa, qb) = unsafe {
                (
                    _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i),
                    _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i),
                )
            };
            acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs(qa, qb), acc);
        }
        hsum_ps(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let m4 = _mm256_set1_epi8(0x0F);
        let off = _mm256_set1_epi8(8);
        for (a, b) in w.iter().zip(x) {
            let d = _mm256_set1_ps(f16_to_f32(a.d) * f16_to_f32(b.d));
            // SAFETY: qs is 16 bytes, b.qs 32 bytes.
            let (tmp, qb) = unsafe {
                (
                    _mm_loadu_si128(a.qs.as_ptr() as *const __m128i),
                    _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i),
                )
            };
            let bytes =
                _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
            let qa = _mm256_sub_epi8(_mm256_and_si256(bytes, m4), off);
            acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs(qa, qb), acc);
        }
        hsum_ps(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = 0.0f32;
        for (a, b) in w.iter().zip(x) {
            let d = b.d * f16_to_f32(a.d);
            let dmin = b.d * f16_to_f32(a.dmin);
            let mut sc = [0i16; 8];
            let mut summ = 0i32;
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &a.scales);
                sc[j] = s as i16;
                summ += m as i32 * (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32);
            }
            acc_m += dmin * summ as f32;
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
                let pl =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(q4l, q8l), _mm256_set1_epi16(sc[2 * j]));
                let ph = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(q4h, q8h),
                    _mm256_set1_epi16(sc[2 * j + 1]),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_ps(acc) - acc_m
    }
}

// ---------------------------------------------------------------- aarch64 NEON

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// Σ a·b over 16 signed bytes into 4 i32 lanes (widening multiplies; no dotprod
    /// extension needed).
    #[inline]
    #[target_feature(enable = "neon")]
    fn dot16(a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi))
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
        let mut acc = vdupq_n_f32(0.0);
        for (a, b) in w.iter().zip(x) {
            // SAFETY: qs are 32 bytes.
            let (a0, a1, b0, b1) = unsafe {
                (
                    vld1q_s8(a.qs.as_ptr()),
                    vld1q_s8(a.qs.as_ptr().add(16)),
                    vld1q_s8(b.qs.as_ptr()),
                    vld1q_s8(b.qs.as_ptr().add(16)),
                )
            };
            let s = vaddq_s32(dot16(a0, b0), dot16(a1, b1));
            acc = vmlaq_n_f32(acc, vcvtq_f32_s32(s), f16_to_f32(a.d) * f16_to_f32(b.d));
        }
        vaddvq_f32(acc)
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_q4_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
        let mut acc = vdupq_n_f32(0.0);
        let m4 = vdupq_n_u8(0x0F);
        let off = vdupq_n_s8(8);
        for (a, b) in w.iter().zip(x) {
            // SAFETY: a.qs is 16 bytes, b.qs 32 bytes.
            let (q, b0, b1) = unsafe {
                (
                    vld1q_u8(a.qs.as_ptr()),
                    vld1q_s8(b.qs.as_ptr()),
                    vld1q_s8(b.qs.as_ptr().add(16)),
                )
            };
            let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, m4)), off);
            let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), off);
            let s = vaddq_s32(dot16(lo, b0), dot16(hi, b1));
            acc = vmlaq_n_f32(acc, vcvtq_f32_s32(s), f16_to_f32(a.d) * f16_to_f32(b.d));
        }
        vaddvq_f32(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    fn rel(a: f32, b: f32) -> f32 {
        (a - b).abs() / b.abs().max(1.0)
    }

    #[test]
    fn simd_kernels_match_scalar_on_odd_lengths() {
        for &n_blocks in &[1usize, 3, 7, 64, 65] {
            let n = n_blocks * QK_K;
            let w = data(n, 1);
            let x = data(n, 2);
            let mut w8 = vec![BlockQ8_0::default(); n / 32];
            let mut x8 = vec![BlockQ8_0::default(); n / 32];
            quantize_q8_0(&w, &mut w8);
            quantize_q8_0(&x, &mut x8);
            assert!(rel(dot_q8_0(&w8, &x8), dot_q8_0_scalar(&w8, &x8)) < 1e-5);
            let mut w4 = vec![BlockQ4_0 { d: 0, qs: [0; 16] }; n / 32];
            quantize_q4_0(&w, &mut w4);
            assert!(rel(dot_q4_0(&w4, &x8), dot_q4_0_scalar(&w4, &x8)) < 1e-5);
            let mut wk = vec![
                BlockQ4K {
                    d: 0,
                    dmin: 0,
                    scales: [0; 12],
                    qs: [0; 128]
                };
                n / 256
            ];
            let mut xk = vec![BlockQ8K::default(); n / 256];
            quantize_q4_k(&w, &mut wk);
            quantize_q8_k(&x, &mut xk);
            assert!(rel(dot_q4_k(&wk, &xk), dot_q4_k_scalar(&wk, &xk)) < 1e-5);
            let wb: Vec<u16> = w
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            for len in [n, n - 5, 13] {
                assert!(
                    rel(
                        dot_bf16(&wb[..len], &x[..len]),
                        dot_bf16_scalar(&wb[..len], &x[..len])
                    ) < 1e-4
                );
            }
        }
    }

    #[test]
    fn quantized_dots_approximate_the_float_dot() {
        let n = 4096;
        let w = data(n, 3);
        let x = data(n, 4);
        let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
        let norm =
            (w.iter().map(|v| v * v).sum::<f32>() * x.iter().map(|v| v * v).sum::<f32>()).sqrt();
        let mut w8 = vec![BlockQ8_0::default(); n / 32];
        let mut x8 = vec![BlockQ8_0::default(); n / 32];
        quantize_q8_0(&w, &mut w8);
        quantize_q8_0(&x, &mut x8);
        assert!((dot_q8_0(&w8, &x8) - exact).abs() / norm < 2e-3);
        let mut w4 = vec![BlockQ4_0 { d: 0, qs: [0; 16] }; n / 32];
        quantize_q4_0(&w, &mut w4);
        assert!((dot_q4_0(&w4, &x8) - exact).abs() / norm < 2e-2);
        let mut wk = vec![
            BlockQ4K {
                d: 0,
                dmin: 0,
                scales: [0; 12],
                qs: [0; 128]
            };
            n / 256
        ];
        let mut xk = vec![BlockQ8K::default(); n / 256];
        quantize_q4_k(&w, &mut wk);
        quantize_q8_k(&x, &mut xk);
        assert!((dot_q4_k(&wk, &xk) - exact).abs() / norm < 2e-2);
    }

    #[test]
    fn dequantize_inverts_quantize_within_step() {
        let n = 512;
        let w = data(n, 5);
        let mut out = vec![0.0; n];
        let mut b = vec![
            BlockQ4K {
                d: 0,
                dmin: 0,
                scales: [0; 12],
                qs: [0; 128]
            };
            2
        ];
        quantize_q4_k(&w, &mut b);
        dequantize_q4_k(&b, &mut out);
        let err = w
            .iter()
            .zip(&out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 0.3, "q4_k max err {err}"); // range 4 / 15 levels ≈ 0.27 step
        let mut b = vec![BlockQ4_0 { d: 0, qs: [0; 16] }; n / 32];
        quantize_q4_0(&w, &mut b);
        dequantize_q4_0(&b, &mut out);
        let err = w
            .iter()
            .zip(&out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 0.3, "q4_0 max err {err}");
        let mut b = vec![BlockQ8_0::default(); n / 32];
        quantize_q8_0(&w, &mut b);
        dequantize_q8_0(&b, &mut out);
        let err = w
            .iter()
            .zip(&out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 0.01, "q8_0 max err {err}");
    }
}
