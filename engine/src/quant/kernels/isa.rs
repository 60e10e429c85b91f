//! Which instructions the kernels use: what this CPU has, detected once, capped by the
//! process-wide settings that the embedding program configures once ([`configure`]).

use std::fmt;
use std::str::FromStr;
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

/// The kernel tier a process asks for. `Auto` takes the best this CPU has; the others
/// cap it, to compare tiers on one machine (a tier the CPU lacks falls to the best one
/// below it that it has; a tier of the other architecture means `Auto`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IsaChoice {
    #[default]
    Auto,
    /// The portable kernels (and no packed products).
    Scalar,
    /// x86-64 AVX2+FMA, packed products with `vpmaddubsw`: AVX2 CPUs without AVX-VNNI
    /// (Intel before the 12th generation, AMD before Zen 5).
    Avx2,
    /// The AVX2 tier with AVX-VNNI packed products where the CPU has them (Intel laptops
    /// from the 12th generation on).
    AvxVnni,
    /// AVX-512 VNNI: the best x86-64 tier (as `Auto` there).
    Avx512,
    /// NEON without the dot-product extension (Cortex-A53/A72: Raspberry Pi 3/4).
    Neon,
    /// NEON with the dot-product extension: the best ARM64 tier (as `Auto` there).
    NeonDot,
}

impl IsaChoice {
    pub const ALL: [IsaChoice; 7] = [
        IsaChoice::Auto,
        IsaChoice::Scalar,
        IsaChoice::Avx2,
        IsaChoice::AvxVnni,
        IsaChoice::Avx512,
        IsaChoice::Neon,
        IsaChoice::NeonDot,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IsaChoice::Auto => "auto",
            IsaChoice::Scalar => "scalar",
            IsaChoice::Avx2 => "avx2",
            IsaChoice::AvxVnni => "avxvnni",
            IsaChoice::Avx512 => "avx512",
            IsaChoice::Neon => "neon",
            IsaChoice::NeonDot => "neondot",
        }
    }

    /// Whether the choice names a tier of this build's architecture (or none).
    fn native(self) -> bool {
        match self {
            IsaChoice::Auto | IsaChoice::Scalar => true,
            IsaChoice::Avx2 | IsaChoice::AvxVnni | IsaChoice::Avx512 => {
                cfg!(target_arch = "x86_64")
            }
            IsaChoice::Neon | IsaChoice::NeonDot => cfg!(target_arch = "aarch64"),
        }
    }
}

impl fmt::Display for IsaChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IsaChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => IsaChoice::Auto,
            "scalar" => IsaChoice::Scalar,
            "avx2" => IsaChoice::Avx2,
            "avxvnni" | "avx-vnni" => IsaChoice::AvxVnni,
            "avx512" | "avx512vnni" | "avx512-vnni" => IsaChoice::Avx512,
            "neon" => IsaChoice::Neon,
            "neondot" | "neon-dotprod" | "neondotprod" => IsaChoice::NeonDot,
            other => {
                return Err(format!(
                    "unknown kernel tier `{other}` (auto, scalar, avx2, avxvnni, avx512, \
                     neon, neondot)"
                ))
            }
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Settings {
    isa: IsaChoice,
    pack: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            isa: IsaChoice::Auto,
            pack: true,
        }
    }
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

fn settings() -> Settings {
    *SETTINGS.get_or_init(unconfigured)
}

/// The settings when nothing configured them.
#[cfg(not(test))]
fn unconfigured() -> Settings {
    Settings::default()
}

/// The unit tests take them from the environment, as the manual runs
/// (`GEMMAD_ISA=avx2 cargo test`) expect; the library itself reads none.
#[cfg(test)]
fn unconfigured() -> Settings {
    let (isa, pack) = crate::test_util::kernel_settings_from_env();
    Settings { isa, pack }
}

/// Sets the kernels of this process: `isa` caps the instruction set (see
/// [`IsaChoice`]), and `pack: false` keeps ggml's row layout instead of repacking
/// quantized matrices 16 rows at a time (for comparisons; its quantized-weights cache is
/// a separate file). Kernels are chosen once per process, so the first call wins, and
/// the first product or load without a call fixes the defaults (`Auto`, packed). A later
/// call with other settings changes nothing and logs a warning. Returns whether `isa`
/// and `pack` are the settings in effect.
pub fn configure(isa: IsaChoice, pack: bool) -> bool {
    let want = Settings { isa, pack };
    let got = *SETTINGS.get_or_init(|| want);
    if got != want {
        tracing::warn!(
            isa = %isa,
            pack,
            isa_in_effect = %got.isa,
            pack_in_effect = got.pack,
            "kernel settings are fixed for this process already; ignoring these"
        );
        return false;
    }
    if !isa.native() {
        tracing::warn!(isa = %isa, "a kernel tier of another architecture: choosing automatically");
    }
    true
}

/// The configured tier.
pub(crate) fn choice() -> IsaChoice {
    settings().isa
}

/// Whether quantized matrices are packed where the CPU supports it (configured).
pub(crate) fn pack() -> bool {
    settings().pack
}

/// The instruction set of the kernels: detected once, capped by the configured
/// [`IsaChoice`] (`avx2` and `avxvnni` use the AVX2 tier; their packed products differ).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let choice = choice();
        if choice == IsaChoice::Scalar {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let lower = matches!(choice, IsaChoice::Avx2 | IsaChoice::AvxVnni);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_their_names() {
        for c in IsaChoice::ALL {
            assert_eq!(c.as_str().parse::<IsaChoice>(), Ok(c));
        }
        assert_eq!("AVX-VNNI".parse::<IsaChoice>(), Ok(IsaChoice::AvxVnni));
        assert!("sse2".parse::<IsaChoice>().is_err());
    }
}
