//! f16 <-> f32 conversion for the f16 KV cache, bit for bit `half`'s on every path.

use super::{isa, Isa};

#[cfg(target_arch = "x86_64")]
use super::avx2;
#[cfg(target_arch = "aarch64")]
use super::neon;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::data;

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
}
