//! Which instructions the kernels use: what this CPU has, detected once.

use std::sync::OnceLock;

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

/// Whether this CPU runs the 512-bit kernels outside `kernels` (`packed`, `kernels_bf16`,
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
