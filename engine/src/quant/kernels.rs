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
    /// AVX-512 VNNI byte dot products on 256-bit registers (plus AVX2 for the rest).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "aarch64")]
    Neon,
}

/// Detected once; `GEMMAD_ISA=scalar|avx2` forces a lower tier (for comparisons).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("GEMMAD_ISA").as_deref() == Ok("scalar") {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let vnni = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            if vnni && std::env::var("GEMMAD_ISA").as_deref() != Ok("avx2") {
                return Isa::Avx512Vnni;
            }
            if avx2 {
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

/// Reference for `dot_f32_rows`.
pub fn dot_f32_rows_scalar(q: &[&[f32]], k: &[&[f32]], out: &mut [f32], stride: usize) {
    for (r, qr) in q.iter().enumerate() {
        for (j, kj) in k.iter().enumerate() {
            out[r * stride + j] = qr.iter().zip(kj.iter()).map(|(a, b)| a * b).sum();
        }
    }
}

/// Reference for `axpy_f32_rows`.
pub fn axpy_f32_rows_scalar(
    p: &[f32],
    stride: usize,
    v: &[&[f32]],
    scale: &[f32],
    acc: &mut [f32],
) {
    let n = acc.len() / scale.len();
    for (r, (row, &s)) in acc.chunks_exact_mut(n).zip(scale).enumerate() {
        for (i, a) in row.iter_mut().enumerate() {
            let mut x = *a * s;
            for (j, vj) in v.iter().enumerate() {
                x += p[r * stride + j] * vj[i];
            }
            *a = x;
        }
    }
}

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
        _ => {
            for (o, &v) in y.iter_mut().zip(x) {
                *o += alpha * v;
            }
        }
    }
}

/// `out[r·stride + j] = q[r] · k[j]` for 1 to 4 query rows and any number of keys (the
/// score block of tiled attention). Each pair is summed in an order that depends on
/// neither the number of rows nor the number of keys in the call, so a query's scores
/// do not depend on how queries and keys were tiled (prefill and decode agree bit for bit).
pub fn dot_f32_rows(q: &[&[f32]], k: &[&[f32]], out: &mut [f32], stride: usize) {
    #[cfg(target_arch = "x86_64")]
    macro_rules! rows {
        ($m:ident, $k:literal) => {
            match q.len() {
                1 => $m::dot_f32_rows::<1, $k>([q[0]], k, out, stride),
                2 => $m::dot_f32_rows::<2, $k>([q[0], q[1]], k, out, stride),
                3 => $m::dot_f32_rows::<3, $k>([q[0], q[1], q[2]], k, out, stride),
                4 => $m::dot_f32_rows::<4, $k>([q[0], q[1], q[2], q[3]], k, out, stride),
                n => panic!("dot_f32_rows: {n} rows (1 to 4)"),
            }
        };
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { rows!(avx2, 2) },
        // AVX-512VL gives 32 vector registers: 4×4 accumulators fit.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { rows!(vnni, 4) },
        _ => dot_f32_rows_scalar(q, k, out, stride),
    }
}

/// `acc[r] = acc[r]·scale[r] + Σ_j p[r·stride + j]·v[j]` for 1 to 4 rows of `acc` (each
/// `acc.len() / rows` long): tiled attention's rescaled weighted sum of values. Per
/// element the operations are the same (a multiply, then one fused multiply-add per key
/// in key order) whatever the number of rows, for the same reason as `dot_f32_rows`.
pub fn axpy_f32_rows(p: &[f32], stride: usize, v: &[&[f32]], scale: &[f32], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    macro_rules! rows {
        ($m:ident, $w:literal) => {
            match *scale {
                [a] => $m::axpy_f32_rows::<1, $w>(p, stride, v, [a], acc),
                [a, b] => $m::axpy_f32_rows::<2, $w>(p, stride, v, [a, b], acc),
                [a, b, c] => $m::axpy_f32_rows::<3, $w>(p, stride, v, [a, b, c], acc),
                [a, b, c, d] => $m::axpy_f32_rows::<4, $w>(p, stride, v, [a, b, c, d], acc),
                _ => panic!("axpy_f32_rows: {} rows (1 to 4)", scale.len()),
            }
        };
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { rows!(avx2, 2) },
        // 32 registers: 4 rows × 32 columns of accumulators.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { rows!(vnni, 4) },
        _ => axpy_f32_rows_scalar(p, stride, v, scale, acc),
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

#[inline]
pub fn axpy_q4_0(w: &[BlockQ4_0], alpha: f32, y: &mut [f32]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::axpy_q4_0(w, alpha, y) },
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
        _ => x.map(|x| dot_bf16_scalar(w, x)),
    }
}

// ---------------------------------------------------------------- x86-64 AVX2 / AVX-512 VNNI

/// The x86 kernels, written once and compiled twice: with AVX2 byte products
/// (`maddubs` + `madd`) and with AVX-512 VNNI's `vpdpbusd` on 256-bit registers.
#[cfg(target_arch = "x86_64")]
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
            pub(crate) fn h(b: u16) -> f32 {
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

            /// See `super::dot_f32_rows`: `K` keys at a time, one accumulator per pair.
            #[target_feature(enable = $feat)]
            pub unsafe fn dot_f32_rows<const R: usize, const K: usize>(
                q: [&[f32]; R],
                k: &[&[f32]],
                out: &mut [f32],
                stride: usize,
            ) {
                let n = q[0].len();
                let q = q.map(|x| &x[..n]);
                let mut j = 0;
                while j < k.len() {
                    let nk = (k.len() - j).min(K);
                    // Past the last key the last one is repeated; those sums are dropped.
                    let kk: [&[f32]; K] = std::array::from_fn(|c| &k[j + c.min(nk - 1)][..n]);
                    let mut acc = [[_mm256_setzero_ps(); K]; R];
                    let mut i = 0;
                    while i + 8 <= n {
                        // SAFETY: i + 8 <= n and every row above is n long.
                        unsafe {
                            let a: [__m256; K] = std::array::from_fn(|c| _mm256_loadu_ps(kk[c].as_ptr().add(i)));
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
                            let mut s = hsum_ps(acc[r][c]);
                            for e in i..n {
                                s += q[r][e] * kk[c][e];
                            }
                            out[r * stride + j + c] = s;
                        }
                    }
                    j += K;
                }
            }

            /// See `super::axpy_f32_rows`: `8·W` columns of every row stay in registers
            /// while all keys are added, so `acc` is read and written once per call.
            #[target_feature(enable = $feat)]
            pub unsafe fn axpy_f32_rows<const R: usize, const W: usize>(
                p: &[f32],
                stride: usize,
                v: &[&[f32]],
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
                            let vc: [__m256; W] = std::array::from_fn(|c| _mm256_loadu_ps(vj.as_ptr().add(i + 8 * c)));
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
                            let v0 = _mm256_loadu_ps(vj.as_ptr().add(i));
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
                for e in i..n {
                    for r in 0..R {
                        let mut x = acc[r * n + e] * scale[r];
                        for (j, vj) in v.iter().enumerate() {
                            x = p[r * stride + j].mul_add(vj[e], x);
                        }
                        acc[r * n + e] = x;
                    }
                }
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
            pub(crate) fn scales8(d: [u16; 8]) -> __m256 {
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

#[cfg(target_arch = "x86_64")]
x86_kernels!(avx2, "avx2,fma,f16c", {
    /// Σ of u8·i8 products in groups of four, as 8 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dp(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    }
});
#[cfg(target_arch = "x86_64")]
x86_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    {
        /// Σ of u8·i8 products in groups of four, as 8 i32 lanes (one `vpdpbusd`).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        fn dp(a: __m256i, b: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
        }
    }
);

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

            // The dispatched kernels (best ISA here) against the scalar references.
            assert!(
                rel(
                    dot_q8_0(&w8, &x8[0], &sums[0]),
                    dot_q8_0_scalar(&w8, &x8[0])
                ) < 1e-5
            );
            assert!(
                rel(
                    dot_q4_0(&w4, &x8[0], &sums[0]),
                    dot_q4_0_scalar(&w4, &x8[0])
                ) < 1e-5
            );
            assert!(rel(dot_q4_k(&wk, &xk[0]), dot_q4_k_scalar(&wk, &xk[0])) < 1e-5);
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
                assert!(rel(r8[t], dot_q8_0_scalar(&w8, &x8[t])) < 1e-5);
                assert!(rel(r4[t], dot_q4_0_scalar(&w4, &x8[t])) < 1e-5);
                assert!(rel(rk[t], dot_q4_k_scalar(&wk, &xk[t])) < 1e-5);
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
                            rel(
                                avx2::dot_q8_0(&w8, &x8[0], &sums[0]),
                                dot_q8_0_scalar(&w8, &x8[0])
                            ) < 1e-5
                        );
                        assert!(
                            rel(
                                avx2::dot_q4_0(&w4, &x8[0], &sums[0]),
                                dot_q4_0_scalar(&w4, &x8[0])
                            ) < 1e-5
                        );
                        assert!(
                            rel(avx2::dot_q4_k(&wk, &xk[0]), dot_q4_k_scalar(&wk, &xk[0])) < 1e-5
                        );
                    }
                }
                if f("vnni") {
                    // SAFETY: features checked above.
                    unsafe {
                        assert!(
                            rel(
                                vnni::dot_q8_0(&w8, &x8[0], &sums[0]),
                                dot_q8_0_scalar(&w8, &x8[0])
                            ) < 1e-5
                        );
                        assert!(
                            rel(
                                vnni::dot_q4_0(&w4, &x8[0], &sums[0]),
                                dot_q4_0_scalar(&w4, &x8[0])
                            ) < 1e-5
                        );
                        assert!(
                            rel(vnni::dot_q4_k(&wk, &xk[0]), dot_q4_k_scalar(&wk, &xk[0])) < 1e-5
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn attention_row_kernels_match_scalar_and_ignore_grouping() {
        for &n in &[256usize, 40, 37, 8, 3] {
            let q: Vec<Vec<f32>> = (0..4).map(|i| data(n, 10 + i)).collect();
            let kv: Vec<Vec<f32>> = (0..7).map(|i| data(n, 20 + i)).collect();
            let qs: Vec<&[f32]> = q.iter().map(|x| &x[..]).collect();
            let ks: Vec<&[f32]> = kv.iter().map(|x| &x[..]).collect();
            let stride = 9;
            for rows in 1..=4 {
                for nk in [1usize, 2, 3, 7] {
                    let mut got = vec![0.0; 4 * stride];
                    let mut want = vec![0.0; 4 * stride];
                    dot_f32_rows(&qs[..rows], &ks[..nk], &mut got, stride);
                    dot_f32_rows_scalar(&qs[..rows], &ks[..nk], &mut want, stride);
                    for r in 0..rows {
                        for j in 0..nk {
                            let (g, w) = (got[r * stride + j], want[r * stride + j]);
                            assert!(rel(g, w) < 1e-5, "n {n} rows {rows} nk {nk}: {g} vs {w}");
                            // One row and one key alone give the same bits.
                            let mut one = [0.0f32];
                            dot_f32_rows(&qs[r..r + 1], &ks[j..j + 1], &mut one, 1);
                            assert_eq!(one[0].to_bits(), g.to_bits());
                        }
                    }

                    let p = data(4 * stride, 30 + nk as u64);
                    let scale = [0.5f32, 1.0, 0.25, 2.0];
                    let acc0 = data(rows * n, 40);
                    let mut got = acc0.clone();
                    let mut want = acc0.clone();
                    axpy_f32_rows(&p, stride, &ks[..nk], &scale[..rows], &mut got);
                    axpy_f32_rows_scalar(&p, stride, &ks[..nk], &scale[..rows], &mut want);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(rel(*g, *w) < 1e-5, "n {n} rows {rows} nk {nk}: {g} vs {w}");
                    }
                    // The AVX2 tier explicitly (this CPU may dispatch to AVX-512).
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                        && rows == 4
                    {
                        let mut a = acc0.clone();
                        let mut d = vec![0.0; 4 * stride];
                        // SAFETY: features checked above.
                        unsafe {
                            avx2::axpy_f32_rows::<4, 2>(&p, stride, &ks[..nk], scale, &mut a);
                            avx2::dot_f32_rows::<4, 2>(
                                [qs[0], qs[1], qs[2], qs[3]],
                                &ks[..nk],
                                &mut d,
                                stride,
                            );
                        }
                        assert!(a.iter().zip(&want).all(|(g, w)| rel(*g, *w) < 1e-5));
                        let mut dw = vec![0.0; 4 * stride];
                        dot_f32_rows_scalar(&qs[..4], &ks[..nk], &mut dw, stride);
                        assert!(d.iter().zip(&dw).all(|(g, w)| rel(*g, *w) < 1e-5));
                    }
                    for r in 0..rows {
                        let mut one = acc0[r * n..(r + 1) * n].to_vec();
                        axpy_f32_rows(
                            &p[r * stride..],
                            stride,
                            &ks[..nk],
                            &scale[r..r + 1],
                            &mut one,
                        );
                        assert!(one
                            .iter()
                            .zip(&got[r * n..(r + 1) * n])
                            .all(|(a, b)| a.to_bits() == b.to_bits()));
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
