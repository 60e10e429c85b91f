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

/// Detected once; `GEMMAD_ISA=scalar|avx2|avxvnni` forces a lower tier (for comparisons;
/// `avxvnni` is the AVX2 tier whose packed products use AVX-VNNI where the CPU has it).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("GEMMAD_ISA").as_deref() == Ok("scalar") {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let lower = matches!(
                std::env::var("GEMMAD_ISA").as_deref(),
                Ok("avx2" | "avxvnni")
            );
            if cpu_has(Isa::Avx512Vnni) && !lower {
                return Isa::Avx512Vnni;
            }
            if cpu_has(Isa::Avx2) {
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

/// Whether this CPU has the instructions of `tier` (whatever [`isa`] chose; tests run
/// a lower tier's kernels on a CPU that has a higher one).
pub fn cpu_has(tier: Isa) -> bool {
    match tier {
        Isa::Scalar => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            cpu_has(Isa::Avx2)
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
    }
}

/// Whether this CPU runs the 512-bit kernels outside this file (`packed`, `kernels_bf16`,
/// `activations`): the AVX-512 VNNI tier, which implies F, BW and VL.
pub fn avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa() == Isa::Avx512Vnni
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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
pub fn dot_f32_rows_scalar<E: KvElem>(q: &[&[f32]], k: &[&[E]], out: &mut [f32], stride: usize) {
    for (r, qr) in q.iter().enumerate() {
        for (j, kj) in k.iter().enumerate() {
            out[r * stride + j] = qr.iter().zip(kj.iter()).map(|(a, b)| a * b.to_f32()).sum();
        }
    }
}

/// Keys and values as attention's kernels read them: f32, or f16 bits (`u16`) widened
/// in the registers, exactly, so both give the same bits for the same values.
pub trait KvElem: Copy + Sync {
    /// Whether the bits are IEEE half.
    const F16: bool;
    fn to_f32(self) -> f32;
}

impl KvElem for f32 {
    const F16: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElem for u16 {
    const F16: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self)
    }
}

/// Reference for `axpy_f32_rows`.
pub fn axpy_f32_rows_scalar<E: KvElem>(
    p: &[f32],
    stride: usize,
    v: &[&[E]],
    scale: &[f32],
    acc: &mut [f32],
) {
    let n = acc.len() / scale.len();
    for (r, (row, &s)) in acc.chunks_exact_mut(n).zip(scale).enumerate() {
        for (i, a) in row.iter_mut().enumerate() {
            let mut x = *a * s;
            for (j, vj) in v.iter().enumerate() {
                x += p[r * stride + j] * vj[i].to_f32();
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

/// `out[r·stride + j] = q[r] · k[j]` for 1 to 4 query rows and any number of keys (the
/// score block of tiled attention; keys f32 or f16, see [`KvElem`]). Each pair is summed
/// in an order that depends on neither the number of rows nor the number of keys in the
/// call, so a query's scores do not depend on how queries and keys were tiled (prefill
/// and decode agree bit for bit). With `then` (the slices read next: the same keys'
/// values), the x86 kernels request the keys one group ahead and `then`'s lines as they
/// read the keys; `None` where they are in cache already.
pub fn dot_f32_rows<E: KvElem>(
    q: &[&[f32]],
    k: &[&[E]],
    then: Option<&[&[E]]>,
    out: &mut [f32],
    stride: usize,
) {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    macro_rules! rows {
        ($m:ident, $k:literal) => {
            match q.len() {
                1 => $m::dot_f32_rows::<1, $k, E>([q[0]], k, then, out, stride),
                2 => $m::dot_f32_rows::<2, $k, E>([q[0], q[1]], k, then, out, stride),
                3 => $m::dot_f32_rows::<3, $k, E>([q[0], q[1], q[2]], k, then, out, stride),
                4 => $m::dot_f32_rows::<4, $k, E>([q[0], q[1], q[2], q[3]], k, then, out, stride),
                n => panic!("dot_f32_rows: {n} rows (1 to 4)"),
            }
        };
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { rows!(avx2, 2) },
        // 32 vector registers: 4×4 accumulators of 16 lanes fit.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { rows!(attn512, 4) },
        // 32 registers: 4×4 accumulators fit.
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { rows!(neon, 4) },
        _ => dot_f32_rows_scalar(q, k, out, stride),
    }
}

/// `acc[r] = acc[r]·scale[r] + Σ_j p[r·stride + j]·v[j]` for 1 to 4 rows of `acc` (each
/// `acc.len() / rows` long): tiled attention's rescaled weighted sum of values. Per
/// element the operations are the same (a multiply, then one fused multiply-add per key
/// in key order) whatever the number of rows, for the same reason as `dot_f32_rows`.
pub fn axpy_f32_rows<E: KvElem>(
    p: &[f32],
    stride: usize,
    v: &[&[E]],
    scale: &[f32],
    acc: &mut [f32],
) {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    macro_rules! rows {
        ($m:ident, $w:literal) => {
            match *scale {
                [a] => $m::axpy_f32_rows::<1, $w, E>(p, stride, v, [a], acc),
                [a, b] => $m::axpy_f32_rows::<2, $w, E>(p, stride, v, [a, b], acc),
                [a, b, c] => $m::axpy_f32_rows::<3, $w, E>(p, stride, v, [a, b, c], acc),
                [a, b, c, d] => $m::axpy_f32_rows::<4, $w, E>(p, stride, v, [a, b, c, d], acc),
                _ => panic!("axpy_f32_rows: {} rows (1 to 4)", scale.len()),
            }
        };
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 => unsafe { rows!(avx2, 2) },
        // 32 registers: 4 rows × 64 columns of accumulators.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512Vnni => unsafe { rows!(attn512, 4) },
        // 32 registers: 4 rows × 16 columns of accumulators.
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { rows!(neon, 4) },
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

/// f16 bits to f32 (the f16 KV cache's reads), vectorized where the CPU has F16C.
pub fn widen_f16(src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen_f16: lengths differ"); // ok: internal contract
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::widen_f16(src, dst) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::widen_f16(src, dst) },
        _ => {
            for (d, &h) in dst.iter_mut().zip(src) {
                *d = half::f16::from_bits(h).to_f32();
            }
        }
    }
}

/// f32 to f16 bits, rounded to nearest even on every path (the f16 KV cache's writes).
pub fn narrow_f16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "narrow_f16: lengths differ"); // ok: internal contract
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: isa() verified the features at run time.
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::narrow_f16(src, dst) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: isa() verified NEON at run time.
        Isa::Neon => unsafe { neon::narrow_f16(src, dst) },
        _ => {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = half::f16::from_f32(v).to_bits();
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

/// Requests into L1 the cache line holding `p` (the x86 kernels' prefetches).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    use std::arch::x86_64::*;
    // SAFETY: a prefetch never faults, whatever the address; SSE is x86-64's baseline.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
}

/// How far ahead of a decode step's reads the kernels request weight bytes. A core of
/// this project's 2-core Xeon (Emerald Rapids) streams only ~15 GB/s, bounded by the
/// lines it keeps in flight, and its hardware prefetchers alone kept too few in flight
/// for a one-token product. With requests 2 KiB ahead (alternated runs): streaming
/// E2B-sized Q4_0 layers (the `decode_stream` example, 1.1 GB) 17-20 → 23 GB/s; the
/// bench's E2B Q4_0 decode 11.2/11.4 → 13.2/12.6 tok/s (products 79 → 65-69 ms of a
/// token). 4 KiB did no better then; Q8_0, with half the work per byte, streamed at the
/// memory's speed either way. Later, on the same VM with faster memory (~29 GB/s for
/// two threads), 3 KiB beat 2 KiB in each of 4 alternated pairs (E2B decode after a
/// 64-token prompt: Q4_K 17.95/18.74 → 18.59/19.05, Q4_0 19.17/19.99 → 19.78/20.17
/// tok/s); 4 KiB was no better than 3.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 3072;

/// Requests into L1 the `bytes` bytes [`PREFETCH_AHEAD`] past `p` (the span a kernel is
/// about to read), one request per cache line; past a row group's (or a bf16 row's) end
/// that is the next one (contiguous), past the matrix harmless. Packed Q4_K asks per
/// 512-byte chunk rather than per 2368-byte block, so the requests come spread out as
/// the reads do.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8, bytes: usize) {
    let p = p.wrapping_add(PREFETCH_AHEAD);
    for k in 0..bytes.div_ceil(64) {
        prefetch(p.wrapping_add(64 * k));
    }
}

/// A score after its lanes' sum `s`: the elements `from..` past a kernel's last whole
/// register, added in order (every tier's `dot_f32_rows`).
#[inline(always)]
fn dot_rest<E: KvElem>(mut s: f32, q: &[f32], k: &[E], from: usize) -> f32 {
    for (a, b) in q[from..].iter().zip(&k[from..]) {
        s += a * b.to_f32();
    }
    s
}

/// Columns `from..` of `axpy_f32_rows` (`acc` holds `scale.len()` rows), past a kernel's
/// last whole register: the registers' operations per element, a multiply by the rescale
/// then one fused multiply-add per key in key order, so the same bits.
#[inline(always)]
fn axpy_rows_rest<E: KvElem>(
    p: &[f32],
    stride: usize,
    v: &[&[E]],
    scale: &[f32],
    acc: &mut [f32],
    from: usize,
) {
    let n = acc.len() / scale.len();
    if n == 0 {
        return;
    }
    for (r, (row, &s)) in acc.chunks_exact_mut(n).zip(scale).enumerate() {
        for (e, a) in row.iter_mut().enumerate().skip(from) {
            let mut x = *a * s;
            for (j, vj) in v.iter().enumerate() {
                x = p[r * stride + j].mul_add(vj[e].to_f32(), x);
            }
            *a = x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod attn512;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{avx2, vnni};

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::data;

    fn rel(a: f32, b: f32) -> f32 {
        (a - b).abs() / b.abs().max(1.0)
    }

    /// The KV cache's f16 conversions are `half`'s, bit for bit: every f16 widened, and
    /// f32s narrowed at ties, subnormals, overflow, infinities and NaN (NaN stays NaN).
    #[test]
    fn f16_conversions_match_half() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut wide = vec![0.0f32; all.len()];
        widen_f16(&all, &mut wide);
        for (&h, &w) in all.iter().zip(&wide) {
            let want = half::f16::from_bits(h).to_f32();
            assert!(
                w.to_bits() == want.to_bits() || (w.is_nan() && want.is_nan()),
                "{h:#06x}"
            );
        }
        let mut x = data(1003, 9);
        for (i, v) in x.iter_mut().enumerate().take(200) {
            // Halfway between neighbouring f16s, around 1, subnormal and huge.
            let h = half::f16::from_bits(i as u16 * 7 + 0x3c00).to_f32();
            *v = match i % 4 {
                0 => h * (1.0 + 1.0 / 2048.0),
                1 => 3.0e-7 * i as f32,
                2 => 65504.0 + 16.0 * i as f32,
                _ => -h,
            };
        }
        x[200] = f32::INFINITY;
        x[201] = f32::NEG_INFINITY;
        x[202] = f32::NAN;
        let mut bits = vec![0u16; x.len()];
        narrow_f16(&x, &mut bits);
        for (&v, &b) in x.iter().zip(&bits) {
            let want = half::f16::from_f32(v);
            assert!(
                b == want.to_bits() || (want.is_nan() && half::f16::from_bits(b).is_nan()),
                "{v:e}: {b:#06x} vs {:#06x}",
                want.to_bits()
            );
        }
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

    /// f16 keys and values read in place give the bits of the same values widened first.
    #[test]
    fn attention_row_kernels_read_f16_as_widened() {
        for &n in &[256usize, 37, 3] {
            let q: Vec<Vec<f32>> = (0..4).map(|i| data(n, 50 + i)).collect();
            let qs: Vec<&[f32]> = q.iter().map(|x| &x[..]).collect();
            let h: Vec<Vec<u16>> = (0..7)
                .map(|i| {
                    data(n, 60 + i)
                        .iter()
                        .map(|&v| half::f16::from_f32(v).to_bits())
                        .collect()
                })
                .collect();
            let w: Vec<Vec<f32>> = h
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|&b| half::f16::from_bits(b).to_f32())
                        .collect()
                })
                .collect();
            let (hs, ws): (Vec<&[u16]>, Vec<&[f32]>) = (
                h.iter().map(|x| &x[..]).collect(),
                w.iter().map(|x| &x[..]).collect(),
            );
            let stride = 9;
            for rows in 1..=4 {
                for nk in [1usize, 3, 7] {
                    let (mut a, mut b) = (vec![0.0; 4 * stride], vec![0.0; 4 * stride]);
                    dot_f32_rows(&qs[..rows], &hs[..nk], None, &mut a, stride);
                    dot_f32_rows(&qs[..rows], &ws[..nk], Some(&ws[..nk]), &mut b, stride);
                    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
                    let p = data(4 * stride, 70 + nk as u64);
                    let scale = [0.5f32, 1.0, 0.25, 2.0];
                    let (mut a, mut b) = (data(rows * n, 80), data(rows * n, 80));
                    axpy_f32_rows(&p, stride, &hs[..nk], &scale[..rows], &mut a);
                    axpy_f32_rows(&p, stride, &ws[..nk], &scale[..rows], &mut b);
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "n {n} rows {rows} nk {nk}"
                    );
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
                    dot_f32_rows(&qs[..rows], &ks[..nk], Some(&ks[..nk]), &mut got, stride);
                    dot_f32_rows_scalar(&qs[..rows], &ks[..nk], &mut want, stride);
                    for r in 0..rows {
                        for j in 0..nk {
                            let (g, w) = (got[r * stride + j], want[r * stride + j]);
                            assert!(rel(g, w) < 1e-5, "n {n} rows {rows} nk {nk}: {g} vs {w}");
                            // One row and one key alone give the same bits.
                            let mut one = [0.0f32];
                            dot_f32_rows(&qs[r..r + 1], &ks[j..j + 1], None, &mut one, 1);
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
                            avx2::axpy_f32_rows::<4, 2, f32>(&p, stride, &ks[..nk], scale, &mut a);
                            avx2::dot_f32_rows::<4, 2, f32>(
                                [qs[0], qs[1], qs[2], qs[3]],
                                &ks[..nk],
                                Some(&ks[..nk]),
                                &mut d,
                                stride,
                            );
                        }
                        assert!(a.iter().zip(&want).all(|(g, w)| rel(*g, *w) < 1e-5));
                        // The AVX-512 value kernel computes each element as this one does.
                        if isa() != Isa::Scalar {
                            assert!(a.iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits()));
                        }
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
