//! gemmad-engine: the Gemma 3n model itself. Loads a Hugging Face checkpoint folder,
//! runs the text decoder with a KV cache, samples, tokenizes and renders chat templates.
//! Synchronous and single-owner: the daemon gives it one thread.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod kv_cache;
pub mod memory;
pub mod model;
pub mod ple_cache;
pub mod quant;
pub mod residency;
pub mod sampling;
pub mod tokenizer;
pub mod towers;
pub mod weights;

pub use checkpoint::Checkpoint;
pub use config::{LayerType, Layout, ModelConfig, TextConfig};
pub use engine::{
    ChatMessage, ContentPart, Engine, FinishReason, GenerateOutput, GenerateRequest, LoadOptions,
    PleMode, Prompt, Timings, TokenEvent, Usage,
};
pub use error::{EngineError, Result};
pub use kv_cache::KvCache;
pub use memory::{MemoryReport, PartMemory};
pub use model::{LogitsFor, TextModel};
pub use ple_cache::{PleCache, RowDType};
pub use quant::QuantType;
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::TextTokenizer;
pub use towers::{Modality, TowerPolicy};
