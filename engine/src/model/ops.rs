//! Elementwise and per-row primitives of the Gemma 3n text decoder, in f32.

/// Gemma 3n RMSNorm: `x · (mean(x²) + eps)^-½ · w` (plain `w`, not `1 + w`). `w = None` is
/// a norm "without scale". Applied to every `dim`-sized row of `x` in place.
pub fn rms_norm(x: &mut [f32], dim: usize, w: Option<&[f32]>, eps: f32) {
    for_rows(
        x,
        dim,
        #[inline(always)]
        |_, row| {
            let ms = sum_sq_f64(row) / dim as f64;
            let r = ((ms as f32) + eps).powf(-0.5);
            match w {
                Some(w) => {
                    for (v, &g) in row.iter_mut().zip(w) {
                        *v = (*v * r) * g;
                    }
                }
                None => {
                    for v in row.iter_mut() {
                        *v *= r;
                    }
                }
            }
        },
    );
}

/// Elements from which row-wise work is split over the thread pool (32 rows of E2B's
/// hidden size): below it (decode, short prompts) the fork/join costs more than it saves.
const PAR_ELEMS: usize = 1 << 16;

/// `f(i, row i)` for each `dim`-wide row of `x`: over the thread pool when there is much
/// of it (a prefill, where these row-wise steps otherwise ran on one thread while the
/// others waited), in order on this thread otherwise. Rows are independent, so the
/// results do not depend on the split. `f` runs in [`wide`]'s context; mark it
/// `#[inline(always)]` so that its loops are compiled there.
pub fn for_rows(x: &mut [f32], dim: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if x.len() >= PAR_ELEMS && x.len() > dim && crate::par::threads() > 1 {
        crate::par::chunks_mut(
            x,
            dim,
            #[inline(always)]
            |i, row| {
                wide(
                    #[inline(always)]
                    || f(i, row),
                )
            },
        );
    } else {
        x.chunks_mut(dim).enumerate().for_each(
            #[inline(always)]
            |(i, r)| {
                wide(
                    #[inline(always)]
                    || f(i, r),
                )
            },
        );
    }
}

/// Most arrays [`for_rows_of`] takes at once (AltUp's streams: 4 in Gemma 3n).
pub const MAX_ROW_SETS: usize = 8;

/// `f(i, rows)` where `rows[k]` is row `i` of `xs[k]` (every array `[n, dim]`): one pass
/// over several arrays that are computed together (AltUp's four streams), split over the
/// pool like [`for_rows`], in [`wide`]'s context.
pub fn for_rows_of(xs: &mut [Vec<f32>], dim: usize, f: impl Fn(usize, &mut [&mut [f32]]) + Sync) {
    let k = xs.len();
    assert!(k <= MAX_ROW_SETS, "for_rows_of: {k} arrays"); // ok: internal contract
    let n = xs.first().map_or(0, |x| x.len() / dim.max(1));
    assert!(
        xs.iter().all(|x| x.len() == n * dim),
        "for_rows_of: shapes differ"
    ); // ok: internal contract
    let ptrs: [crate::par::SendPtr<f32>; MAX_ROW_SETS] = std::array::from_fn(|j| {
        crate::par::SendPtr(
            xs.get_mut(j)
                .map_or(std::ptr::null_mut(), |x| x.as_mut_ptr()),
        )
    });
    let row = |i: usize| {
        // SAFETY: row `i` of each array is handed to one call only, inside the arrays,
        // which stay mutably borrowed until every call has returned.
        let mut rows: [&mut [f32]; MAX_ROW_SETS] = std::array::from_fn(|j| {
            if j < k {
                unsafe { std::slice::from_raw_parts_mut(ptrs[j].0.add(i * dim), dim) }
            } else {
                &mut []
            }
        });
        wide(
            #[inline(always)]
            || f(i, &mut rows[..k]),
        )
    };
    if n * dim * k >= PAR_ELEMS && n > 1 && crate::par::threads() > 1 {
        crate::par::for_each(n, row);
    } else {
        (0..n).for_each(row);
    }
}

/// Runs `f` compiled for AVX2 (with FMA and F16C) where the CPU has it, detected once at
/// run time: the elementwise loops inlined into `f` (closures marked `#[inline(always)]`)
/// then work on 8 floats at a time instead of the x86-64 baseline's 4 (SSE2). The results
/// are the same bits: the compiler neither reorders float reductions nor fuses a multiply
/// and an add. E2B Q4_0 prefill: +3% (median of 4 runs of interleaved pairs).
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        use crate::quant::kernels::{isa, Isa};
        if matches!(isa(), Isa::Avx2 | Isa::Avx512Vnni) {
            // SAFETY: isa() found AVX2, FMA and F16C on this CPU.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Out-of-place RMSNorm of `x` into `out`.
pub fn rms_norm_into(x: &[f32], out: &mut [f32], dim: usize, w: Option<&[f32]>, eps: f32) {
    out.copy_from_slice(x);
    rms_norm(out, dim, w, eps);
}

/// PyTorch `gelu(approximate="tanh")`, as `x · sigmoid(2u)` (= `0.5·x·(1 + tanh u)`)
/// with [`exp_f32`], so loops over it vectorize: with libm's `tanhf` it was ~5% of a
/// decode step.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = C * (x + 0.044715 * x * x * x);
    x / (1.0 + exp_f32(-2.0 * u))
}

/// `tanh x` from [`exp_f32`], branch-free (vectorizes): `(1 − e)/(1 + e)` with
/// `e = e^{−2|x|}`, sign restored. Absolute error ≤ 2e-7 (relative error grows below
/// |x| ≈ 1e-3, where the absolute error still holds); used for the logit softcap.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let e = exp_f32(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

/// `e^x` without libm (Cephes `expf`: round-to-nearest range reduction by ln 2 in two
/// parts, degree-5 polynomial; within 2 ulp of `f32::exp` over its range), branch-free
/// so that the compiler can vectorize callers. Saturates outside ±87.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer (|x·log2 e| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 87.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the exponent bits; n is in [-126, 126] after the clamp. `shifted` is
    // 1.5·2^23 + n exactly, so its bits are 0x4B40_0000 + n: integer lanes that
    // vectorize (`n as i32` is a saturating conversion the compiler left scalar, 5 of
    // the 6 cycles per element of the FFN activation and the logit softcap).
    y * f32::from_bits(shifted.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

/// Root mean square of a row (AltUp magnitudes).
#[inline]
pub fn mean_sq(x: &[f32]) -> f32 {
    (sum_sq_f64(x) / x.len() as f64) as f32
}

/// `Σ x²` in f64, in 8 interleaved partial sums so that it vectorises (one running sum
/// was a 4-cycle dependency per element: ~2 µs per 2048-wide norm, ~300 norms per
/// decode step). f64 keeps it as close to the reference's f32 mean as before.
#[inline]
pub fn sum_sq_f64(x: &[f32]) -> f64 {
    sum8(x, |v| v * v)
}

/// `Σ x` in f64, in 8 interleaved partial sums (vectorises, as [`sum_sq_f64`]).
#[inline(always)]
pub fn sum_f64(x: &[f32]) -> f64 {
    sum8(x, |v| v)
}

/// `Σ (x − mean)²` in f64, in 8 interleaved partial sums (the Gaussian top-k's variance:
/// one running sum per element was 7 µs of each 8192-wide E2B FFN row in a decode step).
#[inline(always)]
pub fn sum_sq_dev_f64(x: &[f32], mean: f64) -> f64 {
    sum8(x, |v| (v - mean) * (v - mean))
}

#[inline(always)]
fn sum8(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] += f(c[k] as f64);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    acc.iter().sum::<f64>() + tail
}

/// RoPE frequencies `1 / θ^(2i/d)` for i in 0..d/2, computed as transformers does (f32).
pub fn rope_inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / head_dim as f32;
            1.0 / (theta as f32).powf(e)
        })
        .collect()
}

/// RoPE angles of positions `pos0..pos0+t` into `out` (`[t, 2, d/2]`: each position's
/// cosines then sines), computed once per forward pass and shared by every head of every
/// layer with these frequencies (per head and layer, `sin_cos` was 6 µs of each E2B
/// decode layer).
pub fn rope_table(pos0: usize, t: usize, inv_freq: &[f32], out: &mut [f32]) {
    let half = inv_freq.len();
    for (ti, row) in out.chunks_exact_mut(2 * half).take(t).enumerate() {
        let p = (pos0 + ti) as f32;
        let (cos, sin) = row.split_at_mut(half);
        for i in 0..half {
            (sin[i], cos[i]) = (p * inv_freq[i]).sin_cos();
        }
    }
}

/// Rotate-half RoPE on one head vector with its position's row `cs` of a
/// [`rope_table`] (cosines, then sines).
#[inline(always)]
pub fn apply_rope(x: &mut [f32], cs: &[f32]) {
    let half = x.len() / 2;
    let (cos, sin) = cs.split_at(half);
    let (x1, x2) = x.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (x1[i], x2[i]);
        x1[i] = a * cos[i] - b * sin[i];
        x2[i] = b * cos[i] + a * sin[i];
    }
}

/// Inverse of the standard normal CDF (Acklam's rational approximation refined by one
/// Halley step; |error| < 1e-15 in f64), used for the Gaussian top-k cutoff.
pub fn normal_icdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e+01,
        2.209460984245205e+02,
        -2.759285104469687e+02,
        1.383_577_518_672_69e2,
        -3.066479806614716e+01,
        2.506628277459239e+00,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e+01,
        1.615858368580409e+02,
        -1.556989798598866e+02,
        6.680131188771972e+01,
        -1.328068155288572e+01,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e+00,
        -2.549732539343734e+00,
        4.374664141464968e+00,
        2.938163982698783e+00,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-03,
        3.224671290700398e-01,
        2.445134137142996e+00,
        3.754408661907416e+00,
    ];
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let plow = 0.02425;
    let x = if p < plow {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - plow {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    // Halley refinement with erfc.
    let e = 0.5 * erfc(-x / std::f64::consts::SQRT_2) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

/// Complementary error function (Numerical Recipes `erfcc`, rel. error < 1.2e-7, refined
/// enough for one Halley step of `normal_icdf`).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_matches_libm_within_a_few_ulp() {
        let mut x = -87.0f32;
        while x <= 87.0 {
            let (got, want) = (exp_f32(x), x.exp());
            assert!(
                ((got - want) / want).abs() <= 4.0 * f32::EPSILON,
                "exp({x}) = {got}, libm {want}"
            );
            x += 0.0137;
        }
    }

    #[test]
    fn gelu_tanh_matches_the_tanh_formula() {
        let reference = |x: f64| {
            0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh())
        };
        let mut x = -30.0f32;
        while x <= 30.0 {
            let (got, want) = (gelu_tanh(x) as f64, reference(x as f64));
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "gelu({x}) = {got}, reference {want}"
            );
            x += 0.0071;
        }
    }

    #[test]
    fn tanh_matches_libm_within_its_bound() {
        let mut x = -40.0f32;
        while x <= 40.0 {
            let (got, want) = (tanh(x), (x as f64).tanh());
            assert!(
                (got as f64 - want).abs() <= 2e-7,
                "tanh({x}) = {got}, libm {want}"
            );
            x += 0.00731;
        }
        assert_eq!(tanh(0.0), 0.0);
    }

    #[test]
    fn icdf_of_095_matches_reference_constant() {
        let z = normal_icdf(0.95);
        assert!((z - 1.6448536269514715).abs() < 1e-6, "{z}");
        assert_eq!(half::bf16::from_f32(z as f32).to_f32(), 1.6484375);
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let inv = rope_inv_freq(10000.0, 4);
        let mut cs = vec![0.0; 3 * 4];
        rope_table(1, 3, &inv, &mut cs);
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        apply_rope(&mut x, &cs[8..]);
        let n: f32 = x.iter().map(|v| v * v).sum();
        assert!((n - 1.0).abs() < 1e-6);
        assert!((x[0] - 3f32.cos()).abs() < 1e-6 && (x[2] - 3f32.sin()).abs() < 1e-6);
    }
}
