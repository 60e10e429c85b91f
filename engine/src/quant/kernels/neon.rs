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
