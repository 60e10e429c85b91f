//! Not API: for bench/, examples and the engine's own tests; no stability promise.
//!
//! The engine's internals (the decoder, its weights and kernels, the KV cache, the PLE
//! cache, residency helpers) as those programs measure and test them. Compiled with the
//! `internals` feature only; the daemon and other users take the crate root.

use crate::engine::Engine;

pub use crate::checkpoint::{Checkpoint, DType, TensorView};
pub use crate::derived::{CacheDir, Existing};
pub use crate::kv_cache::{KvCache, KvDType};
pub use crate::model::{ForwardState, LogitsFor, TextModel};
pub use crate::ple_cache::PleCache;
pub use crate::residency::WeightGroup;
pub use crate::weights::Matrix;

/// Applies the kernel tier and packing of a manual run, `GEMMAD_ISA` (an
/// [`crate::IsaChoice`]) and `GEMMAD_PACK=0`, before any kernel runs: the examples and
/// the engine's tests call it; the library never reads these variables itself.
pub fn configure_kernels_from_env() {
    let isa = match std::env::var("GEMMAD_ISA") {
        Ok(v) if !v.is_empty() => v
            .parse::<crate::IsaChoice>()
            .unwrap_or_else(|e| panic!("GEMMAD_ISA: {e}")),
        _ => crate::IsaChoice::Auto,
    };
    crate::configure_kernels(isa, std::env::var("GEMMAD_PACK").as_deref() != Ok("0"));
}

/// Quantized formats and their kernels.
pub mod quant {
    pub use crate::quant::{blocks, kernels, packed, QuantType};
}

/// The PLE cache file: its format, reader and builder.
pub mod ple_cache {
    pub use crate::model::ple_build::{build, build_file, BuildReport};
    pub use crate::ple_cache::format::Header;
    pub use crate::ple_cache::reader::PleStats;
    pub use crate::ple_cache::{cache_key, cache_name, Invalid, PleCache, RowDType};
}

/// Page residency of mapped files and memory.
pub mod residency {
    pub use crate::residency::*;
}

/// The parts of a loaded [`Engine`], for measurements and tests.
pub trait EngineInternals {
    /// The text decoder.
    fn text_model(&self) -> &TextModel;
    /// The PLE cache the engine serves per-layer inputs from, if any.
    fn ple_cache(&self) -> Option<&PleCache>;
    /// A mapped weight group by name: `decoder`, `embeddings`, `ple_table`, `vision`,
    /// `audio`, or `ple_cache` (the cache file's rows).
    fn weight_group_named(&self, name: &str) -> Option<WeightGroup>;
}

impl EngineInternals for Engine {
    fn text_model(&self) -> &TextModel {
        self.model()
    }

    fn ple_cache(&self) -> Option<&PleCache> {
        self.ple()
    }

    fn weight_group_named(&self, name: &str) -> Option<WeightGroup> {
        self.weight_group(name)
    }
}
