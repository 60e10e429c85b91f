//! The aarch64 NEON tier of `kernels`.

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

/// Four f16 values (bits) widened to f32 by `fcvtl`, exactly (the conversion
/// intrinsics need Rust's unstable f16 type; the instruction is in every ARMv8 CPU).
#[inline(always)]
pub(crate) unsafe fn f16x4(p: *const u16) -> float32x4_t {
    // SAFETY: the caller's pointer holds 4 halves.
    let h = unsafe { vld1_u16(p) };
    let out: float32x4_t;
    // SAFETY: a register-only conversion.
    unsafe {
        std::arch::asm!(
            "fcvtl {o:v}.4s, {h:v}.4h",
            o = lateout(vreg) out,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    out
}

/// Four f32 values narrowed to f16 bits by `fcvtn`, rounded to nearest even (the
/// default rounding mode, as `half`).
#[inline(always)]
unsafe fn f32x4_to_f16(v: float32x4_t) -> uint16x4_t {
    let out: uint16x4_t;
    // SAFETY: a register-only conversion.
    unsafe {
        std::arch::asm!(
            "fcvtn {o:v}.4h, {v:v}.4s",
            o = lateout(vreg) out,
            v = in(vreg) v,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    out
}

/// Four keys or values as f32, widened in the registers when they are f16.
#[inline(always)]
unsafe fn ld4<E: KvElem>(p: *const E) -> float32x4_t {
    if E::F16 {
        // SAFETY: the caller's pointer holds 4 elements.
        unsafe { f16x4(p.cast::<u16>()) }
    } else {
        // SAFETY: as above.
        unsafe { vld1q_f32(p.cast::<f32>()) }
    }
}

#[target_feature(enable = "neon")]
pub unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n bounds the load and the store.
        unsafe { vst1q_f32(dst.as_mut_ptr().add(i), f16x4(src.as_ptr().add(i))) };
        i += 4;
    }
    for (d, &h) in dst[i..n].iter_mut().zip(&src[i..n]) {
        *d = f16_to_f32(h);
    }
}

#[target_feature(enable = "neon")]
pub unsafe fn narrow_f16(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n bounds the load and the store.
        unsafe {
            let h = f32x4_to_f16(vld1q_f32(src.as_ptr().add(i)));
            vst1_u16(dst.as_mut_ptr().add(i), h);
        }
        i += 4;
    }
    for (d, &v) in dst[i..n].iter_mut().zip(&src[i..n]) {
        *d = half::f16::from_f32(v).to_bits();
    }
}

#[target_feature(enable = "neon")]
pub unsafe fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let va = vdupq_n_f32(alpha);
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n bounds the loads and the store.
        unsafe {
            let p = y.as_mut_ptr().add(i);
            vst1q_f32(p, vfmaq_f32(vld1q_f32(p), va, vld1q_f32(x.as_ptr().add(i))));
        }
        i += 4;
    }
    while i < n {
        y[i] += alpha * x[i];
        i += 1;
    }
}

/// See `super::dot_f32_rows`: `K` keys at a time, one accumulator (4 lanes) per pair.
#[target_feature(enable = "neon")]
pub unsafe fn dot_f32_rows<const R: usize, const K: usize, E: KvElem>(
    q: [&[f32]; R],
    k: &[&[E]],
    _then: Option<&[&[E]]>,
    out: &mut [f32],
    stride: usize,
) {
    let n = q[0].len();
    let q = q.map(|x| &x[..n]);
    let mut j = 0;
    while j < k.len() {
        let nk = (k.len() - j).min(K);
        // Past the last key the last one is repeated; those sums are dropped.
        let kk: [&[E]; K] = std::array::from_fn(|c| &k[j + c.min(nk - 1)][..n]);
        let mut acc = [[vdupq_n_f32(0.0); K]; R];
        let mut i = 0;
        while i + 4 <= n {
            // SAFETY: i + 4 <= n and every row above is n long.
            unsafe {
                let a: [float32x4_t; K] = std::array::from_fn(|c| ld4(kk[c].as_ptr().add(i)));
                for (qr, ar) in q.iter().zip(acc.iter_mut()) {
                    let x = vld1q_f32(qr.as_ptr().add(i));
                    for (acc, &ac) in ar.iter_mut().zip(&a) {
                        *acc = vfmaq_f32(*acc, x, ac);
                    }
                }
            }
            i += 4;
        }
        for (r, ar) in acc.iter().enumerate() {
            for (c, a) in ar.iter().enumerate().take(nk) {
                out[r * stride + j + c] = dot_rest(vaddvq_f32(*a), q[r], kk[c], i);
            }
        }
        j += K;
    }
}

/// See `super::axpy_f32_rows`: `4·W` columns of every row stay in registers while all
/// keys are added, so `acc` is read and written once per call.
#[target_feature(enable = "neon")]
pub unsafe fn axpy_f32_rows<const R: usize, const W: usize, E: KvElem>(
    p: &[f32],
    stride: usize,
    v: &[&[E]],
    scale: [f32; R],
    acc: &mut [f32],
) {
    let n = acc.len() / R;
    let nk = v.len();
    assert!(
        p.len() >= (R - 1) * stride + nk && v.iter().all(|x| x.len() >= n),
        "axpy_f32_rows: operands too short"
    ); // ok: internal contract of attention
    let ap = acc.as_mut_ptr();
    let mut i = 0;
    while i + 4 * W <= n {
        // SAFETY: rows are n long, i + 4·W <= n, and p holds ·stride + nk (asserted
        // above).
        unsafe {
            let mut a = [[vdupq_n_f32(0.0); W]; R];
            for (r, ar) in a.iter_mut().enumerate() {
                let s = vdupq_n_f32(scale[r]);
                for (c, acc) in ar.iter_mut().enumerate() {
                    *acc = vmulq_f32(vld1q_f32(ap.add(r * n + i + 4 * c)), s);
                }
            }
            for (j, vj) in v.iter().enumerate() {
                let vc: [float32x4_t; W] = std::array::from_fn(|c| ld4(vj.as_ptr().add(i + 4 * c)));
                for (r, ar) in a.iter_mut().enumerate() {
                    let b = vdupq_n_f32(*p.get_unchecked(r * stride + j));
                    for (acc, &x) in ar.iter_mut().zip(&vc) {
                        *acc = vfmaq_f32(*acc, b, x);
                    }
                }
            }
            for (r, ar) in a.iter().enumerate() {
                for (c, acc) in ar.iter().enumerate() {
                    vst1q_f32(ap.add(r * n + i + 4 * c), *acc);
                }
            }
        }
        i += 4 * W;
    }
    // The columns past the last whole register group: the same operations per element.
    axpy_rows_rest(p, stride, v, &scale, acc, i);
}

/// bf16 bits at `p` (4 of them) as f32: the bits moved to the top half.
#[inline(always)]
unsafe fn bf16x4(p: *const u16) -> float32x4_t {
    // SAFETY: the caller's pointer holds 4 values.
    unsafe { vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p))) }
}

/// Four 4-lane accumulators per 16 weights, added in a fixed order, then the scalar
/// tail: `dot_bf16_x4` takes the same steps per token.
#[target_feature(enable = "neon")]
pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    let [s] = unsafe { dot_bf16_x4_n::<1>(w, [x]) };
    s
}

#[target_feature(enable = "neon")]
pub unsafe fn dot_bf16_x4(w: &[u16], x: [&[f32]; 4]) -> [f32; 4] {
    unsafe { dot_bf16_x4_n::<4>(w, x) }
}

#[inline(always)]
unsafe fn dot_bf16_x4_n<const T: usize>(w: &[u16], x: [&[f32]; T]) -> [f32; T] {
    let n = x.iter().fold(w.len(), |m, v| m.min(v.len()));
    let mut acc = [[vdupq_n_f32(0.0); 4]; T];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n bounds every load.
        unsafe {
            let f: [float32x4_t; 4] = std::array::from_fn(|k| bf16x4(w.as_ptr().add(i + 4 * k)));
            for (a, xt) in acc.iter_mut().zip(&x) {
                for (k, ak) in a.iter_mut().enumerate() {
                    *ak = vfmaq_f32(*ak, f[k], vld1q_f32(xt.as_ptr().add(i + 4 * k)));
                }
            }
        }
        i += 16;
    }
    let mut out = [0.0f32; T];
    for ((o, a), xt) in out.iter_mut().zip(&acc).zip(&x) {
        *o = vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
        for j in i..n {
            *o += f32::from_bits((w[j] as u32) << 16) * xt[j];
        }
    }
    out
}

#[target_feature(enable = "neon")]
pub unsafe fn axpy_bf16(w: &[u16], alpha: f32, y: &mut [f32]) {
    let n = w.len().min(y.len());
    let va = vdupq_n_f32(alpha);
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n bounds the loads and the store.
        unsafe {
            let p = y.as_mut_ptr().add(i);
            vst1q_f32(p, vfmaq_f32(vld1q_f32(p), va, bf16x4(w.as_ptr().add(i))));
        }
        i += 4;
    }
    while i < n {
        y[i] += alpha * f32::from_bits((w[i] as u32) << 16);
        i += 1;
    }
}

/// `o += d · q` for 16 signed quants, fused per element.
#[inline(always)]
unsafe fn axpy16(q: int8x16_t, d: float32x4_t, o: *mut f32) {
    let h = [vmovl_s8(vget_low_s8(q)), vmovl_high_s8(q)];
    for (k, hk) in h.iter().enumerate() {
        let w = [vmovl_s16(vget_low_s16(*hk)), vmovl_high_s16(*hk)];
        for (l, wl) in w.iter().enumerate() {
            // SAFETY: the caller's 16 floats at `o`.
            unsafe {
                let p = o.add(8 * k + 4 * l);
                vst1q_f32(p, vfmaq_f32(vld1q_f32(p), d, vcvtq_f32_s32(*wl)));
            }
        }
    }
}

#[target_feature(enable = "neon")]
pub unsafe fn axpy_q8_0(w: &[BlockQ8_0], alpha: f32, y: &mut [f32]) {
    for (b, o) in w.iter().zip(y.chunks_exact_mut(QK8_0)) {
        let d = vdupq_n_f32(alpha * f16_to_f32(b.d));
        // SAFETY: qs holds 32 bytes and o 32 floats.
        unsafe {
            axpy16(vld1q_s8(b.qs.as_ptr()), d, o.as_mut_ptr());
            axpy16(vld1q_s8(b.qs.as_ptr().add(16)), d, o.as_mut_ptr().add(16));
        }
    }
}

#[target_feature(enable = "neon")]
pub unsafe fn axpy_q4_0(w: &[BlockQ4_0], alpha: f32, y: &mut [f32]) {
    let (m4, off) = (vdupq_n_u8(0x0F), vdupq_n_s8(8));
    for (b, o) in w.iter().zip(y.chunks_exact_mut(QK4_0)) {
        let d = vdupq_n_f32(alpha * f16_to_f32(b.d));
        // SAFETY: qs holds 16 bytes and o 32 floats.
        unsafe {
            let q = vld1q_u8(b.qs.as_ptr());
            let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, m4)), off);
            let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(q)), off);
            axpy16(lo, d, o.as_mut_ptr());
            axpy16(hi, d, o.as_mut_ptr().add(16));
        }
    }
}
