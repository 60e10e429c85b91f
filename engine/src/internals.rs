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

/// A read-only anonymous mapping holding `bytes`: the in-memory stand-in for a mapped
/// file, so the fuzz targets run the very checks `open` runs on a file's mapping.
fn map_bytes(bytes: &[u8]) -> std::io::Result<memmap2::Mmap> {
    let mut m = memmap2::MmapMut::map_anon(bytes.len())?;
    m.copy_from_slice(bytes);
    m.make_read_only()
}

/// The parsers of outside input, from bytes (the fuzz targets' entry points). Each is
/// the function the file-reading code calls, not a copy of it.
pub mod parse {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    use crate::checkpoint::DType;
    use crate::config::TextConfig;
    use crate::derived::CacheDir;
    use crate::error::{EngineError, Result};
    use crate::ple_cache::{Invalid, PleCache, RowDType};
    use crate::quant::QuantType;
    use crate::tokenizer::TextTokenizer;
    use crate::weights::store::QuantStore;
    use crate::{ModelConfig, Prompter};

    pub use crate::derived::xxh64;
    pub use crate::ple_cache::format::HEADER_BYTES as PLE_HEADER_BYTES;

    /// One tensor of a safetensors header.
    #[derive(Clone, Debug)]
    pub struct HeaderTensor {
        pub name: String,
        pub dtype: std::result::Result<DType, String>,
        pub shape: Vec<usize>,
        pub start: usize,
        pub end: usize,
    }

    /// The tensors of a safetensors file (`file` is the whole file), checked against its
    /// length, as [`crate::internals::Checkpoint::open`] checks each shard.
    pub fn safetensors_header(file: &[u8]) -> Result<Vec<HeaderTensor>> {
        let path = Path::new("model.safetensors");
        Ok(crate::checkpoint::parse_header(path, file, 0)?
            .into_iter()
            .map(|(name, e)| HeaderTensor {
                name,
                dtype: e.dtype,
                shape: e.shape,
                start: e.start,
                end: e.end,
            })
            .collect())
    }

    /// Shard names and the tensor → shard map of `model.safetensors.index.json`.
    pub fn safetensors_index(text: &[u8]) -> Result<(Vec<String>, HashMap<String, String>)> {
        crate::checkpoint::parse_index(Path::new("model.safetensors.index.json"), text)
    }

    /// `config.json` (and `generation_config.json`) as [`ModelConfig::from_dir`] reads them.
    pub fn model_config(config: &[u8], generation: Option<&[u8]>) -> Result<ModelConfig> {
        ModelConfig::from_bytes(
            Path::new("config.json"),
            config,
            generation.map(|g| (Path::new("generation_config.json"), g)),
        )
    }

    /// A tokenizer as [`TextTokenizer::from_dir`] builds it from its files' contents.
    pub fn tokenizer(
        tok: tokenizers::Tokenizer,
        tokenizer_config: Option<&[u8]>,
        chat_template_jinja: Option<String>,
    ) -> Result<TextTokenizer> {
        TextTokenizer::from_parts(
            PathBuf::from("tokenizer.json"),
            tok,
            tokenizer_config.map(|t| (Path::new("tokenizer_config.json"), t)),
            chat_template_jinja,
        )
    }

    /// The prompt pipeline an engine with this tokenizer and context would use.
    pub fn prompter(tokenizer: TextTokenizer, vocab_size: usize, max_context: usize) -> Prompter {
        Prompter::new(
            Some(std::sync::Arc::new(tokenizer)),
            vocab_size,
            std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(max_context)),
        )
    }

    /// A prompt-cache state file (`<cache_dir>/prompt-cache/*.kv`) as the disk tier reads
    /// it, for a model whose K/V rows are `kv_dim` wide in heads of `head_dim`, f16
    /// elements, checkpoint key all zeros; its token count.
    pub fn prompt_cache_file(
        file: &[u8],
        kv_dim: usize,
        head_dim: usize,
    ) -> std::result::Result<usize, String> {
        let g = crate::prompt_cache::disk::Geometry {
            checkpoint: "0".repeat(32),
            dtype: crate::kv_cache::KvDType::F16,
            kv_dim,
            head_dim,
        };
        crate::prompt_cache::disk::parse(file, &g).map(|e| e.tokens.len())
    }

    /// [`PleCache::open`] of a file whose contents are `file`, as `name` in `dir` (an
    /// empty directory of the caller's: a corrupt row makes the cache move its file
    /// aside, which fails harmlessly there).
    pub fn ple_cache(
        dir: &CacheDir,
        file: &[u8],
        c: &TextConfig,
        dtype: RowDType,
        table_dtype: DType,
        key: [u8; 16],
    ) -> Result<std::result::Result<PleCache, Invalid>> {
        let name = "fuzzed.gemmaple";
        let map = super::map_bytes(file).map_err(|e| EngineError::io(dir.path_of(name), e))?;
        PleCache::from_map(dir, name, map, c, dtype, table_dtype, key, 0)
    }

    /// The quantized-weights store of a file whose contents are `file`, as its loader
    /// opens it; then every stored matrix is taken with its own shape, as a model of
    /// that shape would take it. Returns how many matrices were usable.
    pub fn weights_cache(
        file: &[u8],
        key: &[u8; 16],
        quant: QuantType,
    ) -> std::result::Result<usize, String> {
        let path = Path::new("weights.gemmaqw");
        let map = super::map_bytes(file).map_err(|e| format!("cannot map: {e}"))?;
        let store = QuantStore::from_map(path, map, key, quant)?;
        Ok(store
            .shapes()
            .filter(|&(n, r, c)| store.get(n, r, c).is_some())
            .count())
    }
}
