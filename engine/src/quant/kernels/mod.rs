//! Dot-product kernels: bf16×f32, Q8_0×Q8_0, Q4_0×Q8_0 and Q4_K×Q8_K, each with a
//! portable scalar version (the reference the tests compare against) and SIMD versions
//! chosen at run time (x86-64 AVX2+FMA, aarch64 NEON); attention's row kernels and the
//! f16 conversions beside them.

use super::blocks::*;

mod attention;
mod f16;
mod isa;
#[cfg(target_arch = "x86_64")]
mod prefetch;
mod scalar;

#[cfg(target_arch = "x86_64")]
mod attn512;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{avx2, vnni};

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;

pub use attention::{axpy_f32_rows, dot_f32_rows, KvElem};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use attention::{axpy_rows_rest, dot_rest};
pub use f16::{narrow_f16, widen_f16};
pub use isa::{avx512_vnni, configure, cpu_has, isa, Isa, IsaChoice};
pub(crate) use isa::{choice, pack};
#[cfg(target_arch = "x86_64")]
pub(crate) use prefetch::{prefetch, prefetch_ahead};
pub use scalar::*;

/// Per-token metadata of activation blocks (`nb` blocks per token): the `nb` scales as
/// f32, then the `nb` sums `d·Σq` (the Q4_0 kernels use unsigned nibbles and subtract
/// `8·d_w·d_x·Σq_x` per block instead of re-centring every weight).
pub fn q8_0_meta(x: &[BlockQ8_0], nb: usize, out: &mut Vec<f32>) {
    out.clear();
    for tok in x.chunks(nb.max(1)) {
        out.extend(tok.iter().map(|b| f16_to_f32(b.d)));
        out.extend(
            tok.iter()
                .map(|b| f16_to_f32(b.d) * b.qs.iter().map(|&q| q as i32).sum::<i32>() as f32),
        );
    }
}

#[inline]
pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::dot_bf16(w, x) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::dot_bf16(w, x) },
        _ => dot_bf16_scalar(w, x),
    }
}

#[inline]
/// `xm` is the token's metadata from [`q8_0_meta`].
pub fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0], xm: &[f32]) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { avx2::dot_q8_0(w, x, xm) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { vnni::dot_q8_0(w, x, xm) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::dot_q8_0(w, x) },
        _ => {
            let _ = xm;
            dot_q8_0_scalar(w, x)
        }
    }
}

/// `xs` is the token's metadata from [`q8_0_meta`].
#[inline]
pub fn dot_q4_0(w: &[BlockQ4_0], x: &[BlockQ8_0], xs: &[f32]) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { avx2::dot_q4_0(w, x, xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { vnni::dot_q4_0(w, x, xs) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::dot_q4_0(w, x) },
        _ => {
            let _ = xs;
            dot_q4_0_scalar(w, x)
        }
    }
}

#[inline]
pub fn dot_q4_k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { avx2::dot_q4_k(w, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { vnni::dot_q4_k(w, x) },
        _ => dot_q4_k_scalar(w, x),
    }
}

/// `y += alpha · x` (attention's weighted sum of values).
#[inline]
pub fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::axpy_f32(alpha, x, y) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::axpy_f32(alpha, x, y) },
        _ => {
            for (o, &v) in y.iter_mut().zip(x) {
                *o += alpha * v;
            }
        }
    }
}

/// `y += alpha · dequant(w)` for a row of Q8_0 / Q4_0 / bf16 weights (the sparse down
/// projection reads only the rows of surviving FFN neurons).
#[inline]
pub fn axpy_q8_0(w: &[BlockQ8_0], alpha: f32, y: &mut [f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::axpy_q8_0(w, alpha, y) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::axpy_q8_0(w, alpha, y) },
        _ => {
            for (b, o) in w.iter().zip(y.chunks_exact_mut(QK8_0)) {
                let d = alpha * f16_to_f32(b.d);
                for (a, &q) in o.iter_mut().zip(&b.qs) {
                    *a += d * q as f32;
                }
            }
        }
    }
}

/// `y += alpha · dequant(w)` for a row of Q4_K blocks: per element `dequantize_q4_k`'s
/// value, then [`axpy_f32`]'s fused multiply-add.
pub fn axpy_q4_k(w: &[BlockQ4K], alpha: f32, y: &mut [f32]) {
    let mut tmp = [0.0f32; QK_K];
    for (blk, o) in w.iter().zip(y.chunks_exact_mut(QK_K)) {
        dequantize_q4_k(std::slice::from_ref(blk), &mut tmp);
        axpy_f32(alpha, &tmp, o);
    }
}

/// `pub fn $name(w, stride, b0, picks, y)`: `y += Σ_p alpha_p · W[r_p][b0.. + y.len()]`
/// (`b0` in blocks of `$qk`) for the picks `(r_p, alpha_p)` in order, `W` with `stride`
/// blocks per row: the sparse down projection's surviving rows, a few per pass over `y`,
/// per element the same operations as `$row` row by row (the portable path).
macro_rules! gather_dispatch {
    ($name:ident, $block:ty, $qk:expr, $row:ident) => {
        pub fn $name(w: &[$block], stride: usize, b0: usize, picks: &[(u32, f32)], y: &mut [f32]) {
            let nb = y.len() / $qk;
            check_gather(w.len(), stride, b0, nb, y.len(), picks);
            match isa() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: features verified by isa(); check_gather bounds every block read.
                Isa::Avx2 => unsafe { avx2::$name(w, stride, b0, picks, y) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx512Vnni => unsafe { vnni::$name(w, stride, b0, picks, y) },
                _ => {
                    for &(r, a) in picks {
                        let s = r as usize * stride + b0;
                        $row(&w[s..s + nb], a, y);
                    }
                }
            }
        }
    };
}

gather_dispatch!(axpy_gather_q8_0, BlockQ8_0, QK8_0, axpy_q8_0);
gather_dispatch!(axpy_gather_q4_0, BlockQ4_0, QK4_0, axpy_q4_0);
gather_dispatch!(axpy_gather_q4_k, BlockQ4K, QK_K, axpy_q4_k);

fn check_gather(
    blocks: usize,
    stride: usize,
    b0: usize,
    nb: usize,
    n: usize,
    picks: &[(u32, f32)],
) {
    let rows = picks
        .iter()
        .map(|&(r, _)| r as usize + 1)
        .max()
        .unwrap_or(0);
    assert!(
        n.is_multiple_of(32) && b0 + nb <= stride && rows * stride <= blocks,
        "axpy_gather: picks or part outside the matrix"
    ); // ok: internal contract of Matrix::sparse_axpy
}

#[inline]
pub fn axpy_q4_0(w: &[BlockQ4_0], alpha: f32, y: &mut [f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::axpy_q4_0(w, alpha, y) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::axpy_q4_0(w, alpha, y) },
        _ => {
            for (b, o) in w.iter().zip(y.chunks_exact_mut(QK4_0)) {
                let d = alpha * f16_to_f32(b.d);
                for j in 0..QK4_0 / 2 {
                    o[j] += d * ((b.qs[j] & 0x0F) as i32 - 8) as f32;
                    o[j + 16] += d * ((b.qs[j] >> 4) as i32 - 8) as f32;
                }
            }
        }
    }
}

#[inline]
pub fn axpy_bf16(w: &[u16], alpha: f32, y: &mut [f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::axpy_bf16(w, alpha, y) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::axpy_bf16(w, alpha, y) },
        _ => {
            for (o, &b) in y.iter_mut().zip(w) {
                *o += alpha * f32::from_bits((b as u32) << 16);
            }
        }
    }
}

/// Four tokens against one weight row (prefill): each weight block is unpacked once.
#[inline]
pub fn dot_q8_0_x4(w: &[BlockQ8_0], x: [&[BlockQ8_0]; 4], xm: [&[f32]; 4]) -> [f32; 4] {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { avx2::dot_q8_0_x4(w, x, xm) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { vnni::dot_q8_0_x4(w, x, xm) },
        _ => [0, 1, 2, 3].map(|i| dot_q8_0(w, x[i], xm[i])),
    }
}

#[inline]
pub fn dot_q4_0_x4(w: &[BlockQ4_0], x: [&[BlockQ8_0]; 4], xs: [&[f32]; 4]) -> [f32; 4] {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { avx2::dot_q4_0_x4(w, x, xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { vnni::dot_q4_0_x4(w, x, xs) },
        _ => [0, 1, 2, 3].map(|i| dot_q4_0(w, x[i], xs[i])),
    }
}

#[inline]
pub fn dot_q4_k_x4(w: &[BlockQ4K], x: [&[BlockQ8K]; 4]) -> [f32; 4] {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { avx2::dot_q4_k_x4(w, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { vnni::dot_q4_k_x4(w, x) },
        _ => x.map(|x| dot_q4_k(w, x)),
    }
}

#[inline]
pub fn dot_bf16_x4(w: &[u16], x: [&[f32]; 4]) -> [f32; 4] {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::dot_bf16_x4(w, x) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::dot_bf16_x4(w, x) },
        _ => x.map(|x| dot_bf16_scalar(w, x)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::data;

    fn rel(a: f32, b: f32) -> f32 {
        (a - b).abs() / b.abs().max(1.0)
    }

    #[test]
    fn simd_kernels_match_scalar_on_odd_lengths() {
        for &n_blocks in &[1usize, 3, 7, 64, 65] {
            let n = n_blocks * QK_K;
            let w = data(n, 1);
            let xs4: Vec<Vec<f32>> = (0..4).map(|i| data(n, 2 + i)).collect();
            let x = &xs4[0];
            let mut w8 = vec![BlockQ8_0::default(); n / 32];
            quantize_q8_0(&w, &mut w8);
            let x8: Vec<Vec<BlockQ8_0>> = xs4
                .iter()
                .map(|x| {
                    let mut b = vec![BlockQ8_0::default(); n / 32];
                    quantize_q8_0(x, &mut b);
                    b
                })
                .collect();
            let sums: Vec<Vec<f32>> = x8
                .iter()
                .map(|b| {
                    let mut s = Vec::new();
                    q8_0_meta(b, b.len(), &mut s);
                    s
                })
                .collect();
            let mut w4 = vec![BlockQ4_0 { d: 0, qs: [0; 16] }; n / 32];
            quantize_q4_0(&w, &mut w4);
            let mut wk = vec![
                BlockQ4K {
                    d: 0,
                    dmin: 0,
                    scales: [0; 12],
                    qs: [0; 128]
                };
                n / 256
            ];
            quantize_q4_k(&w, &mut wk);
            let xk: Vec<Vec<BlockQ8K>> = xs4
                .iter()
                .map(|x| {
                    let mut b = vec![BlockQ8K::default(); n / 256];
                    quantize_q8_k(x, &mut b);
                    b
                })
                .collect();
            let wb: Vec<u16> = w
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            // Cancellation makes an error relative to the result meaningless: it is
            // relative to the magnitude of the terms (Σ|w·x|) instead.
            let mag: Vec<f32> = xs4
                .iter()
                .map(|x| w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum())
                .collect();
            let rel_t = |a: f32, b: f32, t: usize| (a - b).abs() / mag[t].max(1.0);

            // The dispatched kernels (best ISA here) against the scalar references.
            assert!(
                rel_t(
                    dot_q8_0(&w8, &x8[0], &sums[0]),
                    dot_q8_0_scalar(&w8, &x8[0]),
                    0
                ) < 1e-5
            );
            assert!(
                rel_t(
                    dot_q4_0(&w4, &x8[0], &sums[0]),
                    dot_q4_0_scalar(&w4, &x8[0]),
                    0
                ) < 1e-5
            );
            assert!(rel_t(dot_q4_k(&wk, &xk[0]), dot_q4_k_scalar(&wk, &xk[0]), 0) < 1e-5);
            let r8 = dot_q8_0_x4(
                &w8,
                [&x8[0], &x8[1], &x8[2], &x8[3]],
                [&sums[0], &sums[1], &sums[2], &sums[3]],
            );
            let r4 = dot_q4_0_x4(
                &w4,
                [&x8[0], &x8[1], &x8[2], &x8[3]],
                [&sums[0], &sums[1], &sums[2], &sums[3]],
            );
            let rk = dot_q4_k_x4(&wk, [&xk[0], &xk[1], &xk[2], &xk[3]]);
            let rb = dot_bf16_x4(&wb, [&xs4[0], &xs4[1], &xs4[2], &xs4[3]]);
            for t in 0..4 {
                assert!(rel_t(r8[t], dot_q8_0_scalar(&w8, &x8[t]), t) < 1e-5);
                assert!(rel_t(r4[t], dot_q4_0_scalar(&w4, &x8[t]), t) < 1e-5);
                assert!(rel_t(rk[t], dot_q4_k_scalar(&wk, &xk[t]), t) < 1e-5);
                assert!(rel(rb[t], dot_bf16_scalar(&wb, &xs4[t])) < 1e-4);
                // Grouping must not change a token's result (prefill batch size
                // independence, which the PLE cache relies on).
                assert_eq!(rb[t].to_bits(), dot_bf16(&wb, &xs4[t]).to_bits());
                assert_eq!(r8[t].to_bits(), dot_q8_0(&w8, &x8[t], &sums[t]).to_bits());
                assert_eq!(r4[t].to_bits(), dot_q4_0(&w4, &x8[t], &sums[t]).to_bits());
                assert_eq!(rk[t].to_bits(), dot_q4_k(&wk, &xk[t]).to_bits());
            }
            for len in [n, n - 5, 13] {
                assert!(
                    rel(
                        dot_bf16(&wb[..len], &x[..len]),
                        dot_bf16_scalar(&wb[..len], &x[..len])
                    ) < 1e-4
                );
            }
            // Both x86 tiers explicitly, where this CPU has them.
            #[cfg(target_arch = "x86_64")]
            {
                let f = |feat: &str| {
                    std::arch::is_x86_feature_detected!("avx2") && feat == "avx2"
                        || (std::arch::is_x86_feature_detected!("avx512vnni")
                            && std::arch::is_x86_feature_detected!("avx512vl")
                            && feat == "vnni")
                };
                if f("avx2") {
                    // SAFETY: features checked above.
                    unsafe {
                        assert!(
                            rel_t(
                                avx2::dot_q8_0(&w8, &x8[0], &sums[0]),
                                dot_q8_0_scalar(&w8, &x8[0]),
                                0
                            ) < 1e-5
                        );
                        assert!(
                            rel_t(
                                avx2::dot_q4_0(&w4, &x8[0], &sums[0]),
                                dot_q4_0_scalar(&w4, &x8[0]),
                                0
                            ) < 1e-5
                        );
                        assert!(
                            rel_t(avx2::dot_q4_k(&wk, &xk[0]), dot_q4_k_scalar(&wk, &xk[0]), 0)
                                < 1e-5
                        );
                    }
                }
                if f("vnni") {
                    // SAFETY: features checked above.
                    unsafe {
                        assert!(
                            rel_t(
                                vnni::dot_q8_0(&w8, &x8[0], &sums[0]),
                                dot_q8_0_scalar(&w8, &x8[0]),
                                0
                            ) < 1e-5
                        );
                        assert!(
                            rel_t(
                                vnni::dot_q4_0(&w4, &x8[0], &sums[0]),
                                dot_q4_0_scalar(&w4, &x8[0]),
                                0
                            ) < 1e-5
                        );
                        assert!(
                            rel_t(vnni::dot_q4_k(&wk, &xk[0]), dot_q4_k_scalar(&wk, &xk[0]), 0)
                                < 1e-5
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn axpy_kernels_match_dequantize() {
        let n = 1024;
        let w = data(n, 9);
        let mut w8 = vec![BlockQ8_0::default(); n / 32];
        quantize_q8_0(&w, &mut w8);
        let mut w4 = vec![BlockQ4_0 { d: 0, qs: [0; 16] }; n / 32];
        quantize_q4_0(&w, &mut w4);
        let wb: Vec<u16> = w
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let mut deq = vec![0.0; n];
        let check = |y: &[f32], deq: &[f32]| {
            for (a, b) in y.iter().zip(deq) {
                assert!((a - (1.0 + 0.5 * b)).abs() < 1e-5, "{a} vs {b}");
            }
        };
        let mut y = vec![1.0; n];
        axpy_q8_0(&w8, 0.5, &mut y);
        dequantize_q8_0(&w8, &mut deq);
        check(&y, &deq);
        let mut y = vec![1.0; n];
        axpy_q4_0(&w4, 0.5, &mut y);
        dequantize_q4_0(&w4, &mut deq);
        check(&y, &deq);
        let mut y = vec![1.0; n];
        axpy_bf16(&wb, 0.5, &mut y);
        let deq: Vec<f32> = wb
            .iter()
            .map(|&b| f32::from_bits((b as u32) << 16))
            .collect();
        check(&y, &deq);
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
        let mut meta = Vec::new();
        q8_0_meta(&x8, x8.len(), &mut meta);
        assert!((dot_q8_0(&w8, &x8, &meta) - exact).abs() / norm < 2e-3);
        let mut w4 = vec![BlockQ4_0 { d: 0, qs: [0; 16] }; n / 32];
        quantize_q4_0(&w, &mut w4);
        assert!((dot_q4_0(&w4, &x8, &meta) - exact).abs() / norm < 2e-2);
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
