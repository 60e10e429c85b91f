//! bf16 × f32 products blocked over 4 weight rows × 4 tokens (AVX-512), for prefill.
//!
//! `kernels::dot_bf16_x4` reads one row against four tokens: per 16 weights it loads and
//! widens the row once and the four tokens' activations once, for only 4 FMAs, so the
//! loads, not the FMA units, set the pace (bf16 prefill ran at ~40% of FMA peak). Four
//! rows × four tokens give 16 FMAs per 8 loads. Each (row, token) keeps one 16-lane
//! accumulator whose low and high halves are exactly `dot_bf16`'s two 8-lane ones, summed
//! and reduced the same way, with the same scalar tail: results are bit-identical to the
//! one-row kernels, so prefill and decode still agree.

use super::kernels;

/// `out[r][t] = w[r] · x[t]`.
pub fn dot_bf16_4x4(w: [&[u16]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
    #[cfg(target_arch = "x86_64")]
    if kernels::avx512_vnni() {
        // SAFETY: AVX-512F (with AVX2/FMA) checked at run time by the VNNI tier.
        return unsafe { avx512::dot_bf16_4x4(w, x) };
    }
    w.map(|w| kernels::dot_bf16_x4(w, x))
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot_bf16_4x4(w: [&[u16]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
        let n = w
            .iter()
            .map(|v| v.len())
            .chain(x.iter().map(|v| v.len()))
            .min()
            .unwrap_or(0);
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n bounds every load.
            unsafe {
                let xs: [__m512; 4] =
                    std::array::from_fn(|t| _mm512_loadu_ps(x[t].as_ptr().add(i)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let raw = _mm256_loadu_si256(w[r].as_ptr().add(i) as *const __m256i);
                    let wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
                    for (a, xv) in acc.iter_mut().zip(xs.iter()) {
                        *a = _mm512_fmadd_ps(wv, *xv, *a);
                    }
                }
            }
            i += 16;
        }
        let mut out = [[0.0f32; 4]; 4];
        for r in 0..4 {
            for t in 0..4 {
                let a = acc[r][t];
                let halves = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
                let mut s = crate::quant::kernels::vnni::hsum_ps(halves);
                for j in i..n {
                    s += f32::from_bits((w[r][j] as u32) << 16) * x[t][j];
                }
                out[r][t] = s;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::data;

    #[test]
    fn blocked_bf16_is_the_one_row_kernel_bit_for_bit() {
        for &n in &[16usize, 48, 2048 + 5, 7] {
            let wf = data(4 * n, 3);
            let wb: Vec<u16> = wf
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let xs = data(4 * n, 8);
            let w: [&[u16]; 4] = std::array::from_fn(|r| &wb[r * n..(r + 1) * n]);
            let x: [&[f32]; 4] = std::array::from_fn(|t| &xs[t * n..(t + 1) * n]);
            let got = dot_bf16_4x4(w, x);
            for r in 0..4 {
                for t in 0..4 {
                    let one = kernels::dot_bf16(w[r], x[t]);
                    assert_eq!(got[r][t].to_bits(), one.to_bits(), "n={n} row {r} tok {t}");
                    let reference = kernels::dot_bf16_scalar(w[r], x[t]);
                    assert!((got[r][t] - reference).abs() <= 1e-4 * (1.0 + reference.abs()));
                }
            }
        }
    }
}
