//! Attention's score and value kernels on 512-bit registers (the AVX-512 tier). A decode
//! step's attention is bound by the vector units once its keys stream in time: the
//! 256-bit kernels spend a port cycle per 8 multiply-adds and widen f16 in the same
//! ports, so twice the width nearly halves the cycles.
//!
//! The value kernel computes every element as the 256-bit one does (a multiply by the
//! row's rescale, then one fused multiply-add per key in key order), so it gives the same
//! bits. The score kernel sums 16 lanes per pair and reduces them in its own fixed tree:
//! other bits than the 256-bit tier, but as there, the same for a pair whatever the rows
//! and keys of the call (prefill and decode agree).

use super::x86::{group_of, request_keys};
use super::{axpy_rows_rest, dot_rest, KvElem};
use std::arch::x86_64::*;

/// 16 keys' elements from `p` widened to f32.
macro_rules! ld16 {
    ($p:expr) => {{
        let p = $p;
        if E::F16 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast::<__m256i>()))
        } else {
            _mm512_loadu_ps(p.cast::<f32>())
        }
    }};
}

/// The sums of four accumulators' lanes, one per output lane, each by the same tree (the
/// two halves, then adjacent pairs, then the two 128-bit halves): a pair's sum does not
/// depend on which of the four it was.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512dq")]
fn hsum4(a: [__m512; 4]) -> __m128 {
    let h = a.map(|x| _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps::<1>(x)));
    let u01 = _mm256_hadd_ps(h[0], h[1]);
    let u23 = _mm256_hadd_ps(h[2], h[3]);
    let v = _mm256_hadd_ps(u01, u23);
    _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v))
}

/// See `super::dot_f32_rows`: four keys at a time, one 16-lane accumulator per pair;
/// the elements past the last multiple of 16 are added after the lanes' sum, in order.
/// With `then`, requests as [`request_keys`] says.
///
/// # Safety
/// The CPU has AVX-512 F, VL, DQ, F16C and FMA.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512dq")]
pub unsafe fn dot_f32_rows<const R: usize, const K: usize, E: KvElem>(
    q: [&[f32]; R],
    k: &[&[E]],
    then: Option<&[&[E]]>,
    out: &mut [f32],
    stride: usize,
) {
    const { assert!(K == 4) };
    let n = q[0].len();
    let q = q.map(|x| &x[..n]);
    let line = 64 / std::mem::size_of::<E>();
    let ahead = K * n * std::mem::size_of::<E>();
    assert!(then.is_none_or(|t| t.len() >= k.len()));
    let mut j = 0;
    while j < k.len() {
        let nk = (k.len() - j).min(K);
        // Past the last key the last one is repeated; those sums are dropped.
        let kk: [&[E]; K] = std::array::from_fn(|c| &k[j + c.min(nk - 1)][..n]);
        let tt = group_of::<E, K>(then, j, nk);
        let mut acc = [[_mm512_setzero_ps(); K]; R];
        let mut i = 0;
        while i + 16 <= n {
            if let Some(tt) = tt.as_ref().filter(|_| i % line == 0) {
                request_keys(&kk, tt, i, ahead);
            }
            // SAFETY: i + 16 <= n and every row above is n long.
            unsafe {
                let a: [__m512; K] = std::array::from_fn(|c| ld16!(kk[c].as_ptr().add(i)));
                for r in 0..R {
                    let x = _mm512_loadu_ps(q[r].as_ptr().add(i));
                    for c in 0..K {
                        acc[r][c] = _mm512_fmadd_ps(x, a[c], acc[r][c]);
                    }
                }
            }
            i += 16;
        }
        for r in 0..R {
            let mut s = [0.0f32; 4];
            // SAFETY: s holds 4 floats.
            unsafe {
                _mm_storeu_ps(
                    s.as_mut_ptr(),
                    hsum4([acc[r][0], acc[r][1], acc[r][2], acc[r][3]]),
                )
            };
            for c in 0..nk {
                out[r * stride + j + c] = dot_rest(s[c], q[r], kk[c], i);
            }
        }
        j += K;
    }
}

/// See `super::axpy_f32_rows`: `16·W` columns of every row stay in registers while all
/// keys are added; the same operations per element as the 256-bit kernel.
///
/// # Safety
/// The CPU has AVX-512 F, VL, F16C and FMA.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512dq")]
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
    let mut i = 0;
    while i + 16 * W <= n {
        // SAFETY: i + 16·W <= n; the rest asserted above.
        unsafe { axpy_strip::<R, W, E>(p, stride, v, scale, acc, i) };
        i += 16 * W;
    }
    while i + 16 <= n {
        // SAFETY: i + 16 <= n; the rest asserted above.
        unsafe { axpy_strip::<R, 1, E>(p, stride, v, scale, acc, i) };
        i += 16;
    }
    axpy_rows_rest(p, stride, v, &scale, acc, i);
}

/// Columns `i..i + 16·W` of `axpy_f32_rows`.
///
/// # Safety
/// As `axpy_f32_rows`, and `i + 16·W <= acc.len() / R`, `p` holds `(R-1)·stride +
/// v.len()` and every `v` is at least `acc.len() / R` long.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512dq")]
unsafe fn axpy_strip<const R: usize, const W: usize, E: KvElem>(
    p: &[f32],
    stride: usize,
    v: &[&[E]],
    scale: [f32; R],
    acc: &mut [f32],
    i: usize,
) {
    let n = acc.len() / R;
    let (pp, ap) = (p.as_ptr(), acc.as_mut_ptr());
    // SAFETY: the caller's contract.
    unsafe {
        let mut a: [[__m512; W]; R] = std::array::from_fn(|r| {
            let s = _mm512_set1_ps(scale[r]);
            std::array::from_fn(|c| _mm512_mul_ps(_mm512_loadu_ps(ap.add(r * n + i + 16 * c)), s))
        });
        for (j, vj) in v.iter().enumerate() {
            let vc: [__m512; W] = std::array::from_fn(|c| ld16!(vj.as_ptr().add(i + 16 * c)));
            for (r, ar) in a.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*pp.add(r * stride + j));
                for (x, vx) in ar.iter_mut().zip(&vc) {
                    *x = _mm512_fmadd_ps(b, *vx, *x);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
            for (c, x) in ar.iter().enumerate() {
                _mm512_storeu_ps(ap.add(r * n + i + 16 * c), *x);
            }
        }
    }
}
