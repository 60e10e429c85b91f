//! gemmad-engine: the Gemma 3n model itself. Loads a Hugging Face checkpoint folder,
//! runs the text decoder with a KV cache, samples, tokenizes and renders chat templates.
//! Synchronous and single-owner: the daemon gives it one thread.

// Some items are used only through `internals` (bench/, examples, tests): without the
// feature they are dead. Dead code is still caught in the workspace build, where bench
// turns the feature on.
#![cfg_attr(not(feature = "internals"), allow(dead_code))]

mod checkpoint;
mod config;
mod derived;
mod engine;
mod error;
mod kv_cache;
pub mod matformer;
mod memory;
mod model;
mod par;
mod ple_cache;
mod prompt_cache;
mod quant;
mod residency;
mod sampling;
pub mod slice_export;
mod tokenizer;
mod towers;
mod weights;

#[cfg(feature = "internals")]
pub mod internals;

pub use config::{LayerType, Layout, ModelConfig, TextConfig};
pub use engine::{
    ChatMessage, ContentPart, Control, Engine, EngineState, FinishReason, GenerateOutput,
    GenerateRequest, Generation, LoadOptions, PleMode, PreparedPrompt, Prompt, Prompter, SliceInfo,
    Step, Timings, TokenEvent, TowerState, Usage, DEFAULT_PLE_HOT_BYTES, FULL_SLICE, MAX_THREADS,
};
pub use error::{EngineError, Result};
pub use memory::{MemoryReport, Part, PartMemory};
pub use model::ple_build::{build as build_ple_cache, BuildReport as PleBuildReport};
pub use ple_cache::RowDType;
pub use prompt_cache::{
    default_ram_bytes as default_prompt_cache_bytes, key_of as prompt_key, CacheOwner,
    PinnedPrompt, PromptCacheOptions, PromptCacheState,
};
pub use quant::kernels::{configure as configure_kernels, IsaChoice};
pub use quant::{kernels_in_use, QuantType};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::TextTokenizer;
pub use towers::{Modality, TowerPolicy};

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use crate::quant::kernels::IsaChoice;

    /// The kernel tier and packing of a manual test run: `GEMMAD_ISA` (an [`IsaChoice`])
    /// and `GEMMAD_PACK=0` (no packing).
    pub fn kernel_settings_from_env() -> (IsaChoice, bool) {
        let isa = match std::env::var("GEMMAD_ISA") {
            Ok(v) if !v.is_empty() => v.parse().unwrap_or_else(|e| panic!("GEMMAD_ISA: {e}")),
            _ => IsaChoice::Auto,
        };
        (isa, std::env::var("GEMMAD_PACK").as_deref() != Ok("0"))
    }

    /// `n` seeded pseudo-random values in [-2, 2) (an LCG): reproducible kernel inputs
    /// with both signs and a spread of magnitudes.
    pub fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }
}
