//! The engine's public face: load a checkpoint folder, prepare prompts, generate step by
//! step (or in one call with a token callback), and take typed control commands. One
//! owner, synchronous: the caller gives it one thread, and everything that wants to
//! change it calls [`Engine::control`] on that thread.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::model::{ForwardState, LogitsFor, TextModel};
use crate::tokenizer::TextTokenizer;

mod control;
mod generation;
mod loading;
mod prompt;
mod request;
mod reuse;
mod slices;
mod text_stream;

pub use control::{Control, EngineState, TowerState, FULL_SLICE};

pub use generation::{Generation, Step};
pub use loading::{PleMode, DEFAULT_PLE_HOT_BYTES};
pub use prompt::{PreparedPrompt, Prompter};
pub use request::{
    ChatMessage, ContentPart, FinishReason, GenerateOutput, GenerateRequest, Prompt, Timings,
    TokenEvent, Usage,
};
pub use slices::SliceInfo;

/// How to load a checkpoint.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Storage type of the large matrices (decoder and LM head).
    pub quant: crate::quant::QuantType,
    /// Where derived files (quantized weights, the PLE cache) are kept; `None` keeps
    /// quantized weights in memory only. Created if missing; one that cannot be used or
    /// written costs the files, not the load (see [`EngineState::warnings`]).
    pub cache_dir: Option<PathBuf>,
    /// Context length in tokens; defaults to (and is capped by) the model's
    /// `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Compute threads; defaults to the number of CPUs.
    pub threads: Option<usize>,
    /// Where per-layer inputs come from (default: the PLE cache file when `cache_dir` is
    /// set, else the checkpoint's table).
    pub ple: PleMode,
    /// Row type of the PLE cache file: by default the checkpoint's own rows (`raw`,
    /// bit-identical to the table path); the precomputed types skip the projection
    /// matvec but are approximate (f32 ~1e-6, bf16/f16/q8_0 coarser).
    pub ple_dtype: crate::ple_cache::RowDType,
    /// Bytes of the in-RAM hot-row cache in front of the PLE cache file (default 8 MiB;
    /// 0 disables it).
    pub ple_hot_bytes: Option<usize>,
    /// Towers to load at start; by default none (text decoder only).
    pub modalities: Vec<crate::towers::Modality>,
    /// What a request needing an unloaded tower gets (default: load it on demand).
    pub tower_policy: crate::towers::TowerPolicy,
    /// Prompt tokens per prefill pass (0 = 512). Bounds the activation memory of long
    /// prompts; results do not depend on it.
    pub prefill_chunk: usize,
    /// The instruction set the kernels may use (default: the best this CPU has). Kernels
    /// are chosen once per process: the first load (or [`crate::configure_kernels`]) wins.
    pub isa: crate::quant::kernels::IsaChoice,
    /// Repack quantized matrices 16 rows at a time for the fast kernels (default); `false`
    /// keeps ggml's row layout, for comparisons.
    pub pack: bool,
    /// A MatFormer slicing file (Google's `configs.csv` format) whose rows are offered
    /// besides the whole checkpoint and, for E4B-shaped checkpoints, the official table.
    pub matformer_config: Option<PathBuf>,
    /// The slice to run from the start (default: the whole checkpoint).
    pub slice: Option<String>,
    /// Reuse of K/V states across requests (see [`crate::PromptCacheOptions`]); the disk
    /// tier lives in `cache_dir`.
    pub prompt_cache: crate::PromptCacheOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quant: Default::default(),
            cache_dir: None,
            max_context: None,
            threads: None,
            ple: Default::default(),
            ple_dtype: Default::default(),
            ple_hot_bytes: None,
            modalities: Vec::new(),
            tower_policy: Default::default(),
            prefill_chunk: 0,
            isa: Default::default(),
            pack: true,
            matformer_config: None,
            slice: None,
            prompt_cache: Default::default(),
        }
    }
}

/// One loaded Gemma 3n model and its sequence state.
pub struct Engine {
    dir: PathBuf,
    cfg: ModelConfig,
    model: TextModel,
    tokenizer: Option<Arc<TextTokenizer>>,
    cache: ForwardState,
    /// The context limit, shared with every [`Prompter`] handed out.
    max_context: Arc<AtomicUsize>,
    /// Compute threads of the forward pass.
    pool: crate::par::SpinPool,
    threads: usize,
    /// Mapped weight groups, towers and the checkpoint (memory control).
    mem: loading::MemState,
    /// Logits buffer reused across steps and requests.
    logits: Vec<f32>,
    prefill_chunk: usize,
    /// The generation in flight, by its number; `None` between requests.
    active: Option<u64>,
    next_generation: u64,
    /// The MatFormer slices on offer, and the one requests run by default.
    slices: Vec<slices::Offered>,
    slice: Arc<crate::matformer::SlicePlan>,
    /// A forced slice switch happened mid-generation: its next step re-prefills.
    reprefill: bool,
    releaser: slices::Releaser,
    /// Counts units of work done (prefill chunks, decode steps): a service's watchdog
    /// tells a busy engine from a wedged one by it.
    progress: Arc<std::sync::atomic::AtomicU64>,
    /// K/V states kept for later requests.
    prompts: reuse::PromptCache,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dir", &self.dir)
            .field("layout", &self.cfg.layout)
            .field("max_context", &self.cache.max_len())
            .finish()
    }
}

impl Engine {
    /// A counter of work done (prefill chunks and decode steps), shared: it moves while
    /// the engine makes progress.
    pub fn progress(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.progress.clone()
    }
}

impl Engine {
    /// Loads the checkpoint folder `dir`. The tokenizer is optional (id-only use); a
    /// present but broken tokenizer is an error.
    pub fn load(dir: &Path, opts: LoadOptions) -> Result<Self> {
        crate::quant::kernels::configure(opts.isa, opts.pack);
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = crate::checkpoint::Checkpoint::open(dir)?;
        let (model, mut mem) = loading::load_parts(&cfg, ckpt, &opts)?;
        let disk = reuse::open_disk(
            &opts.prompt_cache,
            opts.cache_dir.as_deref(),
            &mem.ckpt,
            &cfg.text,
            model.kv_dtype(),
        )
        .unwrap_or_else(|w| {
            tracing::warn!(warning = %w, "prompt cache");
            mem.warnings.push(w);
            None
        });
        let prompts = reuse::PromptCache::new(opts.prompt_cache.clone(), disk);
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(Arc::new(TextTokenizer::from_dir(dir)?))
        } else {
            None
        };
        crate::residency::trim_heap();
        let max_context = check_context(&cfg, opts.max_context, model.kv_dtype())?;
        let threads = opts
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        let pool = new_pool(threads)?;
        let cache = model.new_cache(max_context);
        let offered = slices::catalogue(&model, &cfg.path, opts.matformer_config.as_deref())?;
        // The catalogue starts with `full`, the default.
        let slice = slices::named(&offered, opts.slice.as_deref().unwrap_or(""))?
            .unwrap_or_else(|| offered[0].plan.clone());
        tracing::info!(
            dir = %dir.display(),
            layout = ?cfg.layout,
            layers = cfg.text.num_hidden_layers,
            max_context,
            threads,
            kernels = crate::quant::kernels_in_use(),
            tokenizer = tokenizer.is_some(),
            "model loaded"
        );
        Ok(Engine {
            dir: dir.to_path_buf(),
            cfg,
            model,
            tokenizer,
            cache,
            max_context: Arc::new(AtomicUsize::new(max_context)),
            pool,
            threads,
            logits: Vec::new(),
            prefill_chunk: if opts.prefill_chunk == 0 {
                512
            } else {
                opts.prefill_chunk
            },
            mem,
            active: None,
            next_generation: 0,
            slices: offered,
            slice,
            reprefill: false,
            releaser: slices::Releaser::new(),
            progress: Arc::default(),
            prompts,
        })
        .map(|mut e: Engine| {
            if e.slice.name != crate::matformer::FULL {
                tracing::info!(slice = %e.slice.name, layers = e.slice.kept.len(), "running a MatFormer slice");
                e.release_unused_async();
            }
            e
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub(crate) fn model(&self) -> &TextModel {
        &self.model
    }

    pub fn max_context(&self) -> usize {
        self.cache.max_len()
    }

    /// The prompt pipeline of this model, for any thread: a front end prepares prompts
    /// with it (and refuses bad ones early); the engine runs what it prepared.
    pub fn prompter(&self) -> Prompter {
        Prompter::new(
            self.tokenizer.clone(),
            self.cfg.text.vocab_size,
            self.max_context.clone(),
        )
    }

    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer
            .as_deref()
            .ok_or(EngineError::Unavailable("the tokenizer (tokenizer.json)"))
    }

    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.prompter().tokenize(text, add_special)
    }

    pub fn detokenize(&self, ids: &[u32]) -> Result<String> {
        self.prompter().detokenize(ids, false)
    }

    /// The chat template's rendering of `messages`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.prompter().render_chat(messages, add_generation_prompt)
    }

    /// The token ids a prompt turns into, checked as Generate checks them.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        Ok(self.prompter().prepare(prompt)?.into_ids())
    }

    /// Logits of every position of `ids` (`[len, vocab]`), one prefill from an empty cache.
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.active = None;
        self.forget_live();
        self.cache.clear();
        let chunk = self.prefill_chunk;
        let (model, cache, slice) = (&self.model, &mut self.cache, &*self.slice);
        let r = crate::par::install(&self.pool, || {
            let mut all = Vec::with_capacity(ids.len() * model.cfg.vocab_size);
            let mut part = Vec::new();
            for c in ids.chunks(chunk) {
                model.forward_slice_into(c, cache, LogitsFor::All, &mut part, slice)?;
                all.extend_from_slice(&part);
            }
            Ok(all)
        });
        self.cache.clear();
        r
    }

    /// Generates for `req`, calling `on_token` for each sampled token. Returning
    /// `ControlFlow::Break` from the callback cancels.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_token: &mut dyn FnMut(TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<GenerateOutput> {
        let mut g = self.start(req)?;
        loop {
            match self.step(&mut g)? {
                Step::Token { id, text } => {
                    let ev = TokenEvent {
                        id,
                        text: &text,
                        flush: false,
                    };
                    if on_token(ev).is_break() {
                        g.cancel();
                    }
                }
                Step::Done { output, tail } => {
                    if !tail.is_empty() {
                        let _ = on_token(TokenEvent {
                            id: output.token_ids.last().copied().unwrap_or(0),
                            text: &tail,
                            flush: true,
                        });
                    }
                    return Ok(output);
                }
            }
        }
    }

    /// Bytes of K/V holding positions of the current (or last) sequence.
    pub fn kv_cache_bytes(&self) -> usize {
        self.cache.bytes_used()
    }

    /// Forgets any generation in flight and its sequence (after a failure the caller
    /// could not finish it).
    pub fn reset(&mut self) {
        self.active = None;
        self.cache.clear();
        self.forget_live();
    }

    /// Logits of the last position the engine ran (after [`Engine::start`]: the prompt's
    /// last token; after a [`Engine::step`]: the token it ran), softcapped.
    pub fn last_logits(&self) -> &[f32] {
        &self.logits
    }
}

/// The most compute threads an engine starts (far above any CPU it serves on; a larger
/// number is a typo, and each thread reserves a stack).
pub const MAX_THREADS: usize = 1024;

/// The context to allocate: `want`, or by default the model's maximum, bounded by what
/// the machine can hold. The KV cache is sized by this, never by a number in a file alone.
fn check_context(
    cfg: &ModelConfig,
    want: Option<usize>,
    dtype: crate::kv_cache::KvDType,
) -> Result<usize> {
    let ram = crate::residency::mem_total().map(u128::from);
    let bytes = |n: usize| KvCache::reserved_bytes(&cfg.text, n, dtype);
    let n = fit_context(cfg.text.max_position_embeddings, want, ram, bytes).map_err(|reason| {
        EngineError::Config {
            path: cfg.path.clone(),
            reason,
        }
    })?;
    if want.is_none() && n < cfg.text.max_position_embeddings {
        tracing::warn!(
            max_position_embeddings = cfg.text.max_position_embeddings,
            max_context = n,
            "the model's full context would not fit in RAM; serving a shorter one \
             (set max_context to choose)"
        );
    }
    Ok(n)
}

/// [`check_context`]'s rule, given the machine's RAM and the cache's bytes per context:
/// an asked-for context must be in range and fit in RAM; by default the cache may take
/// at most half of it.
fn fit_context(
    max_pos: usize,
    want: Option<usize>,
    ram: Option<u128>,
    bytes: impl Fn(usize) -> u128,
) -> std::result::Result<usize, String> {
    let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
    if let Some(n) = want {
        if n == 0 || n > max_pos {
            return Err(format!("max_context {n} must be in 1..={max_pos}"));
        }
        return match ram.filter(|&r| bytes(n) > r) {
            Some(r) => Err(format!(
                "max_context {n} needs {:.1} GiB of KV cache; this machine has {:.1} GiB of \
                 RAM: set a smaller max_context",
                gib(bytes(n)),
                gib(r)
            )),
            None => Ok(n),
        };
    }
    let Some(budget) = ram.map(|r| r / 2) else {
        return Ok(max_pos);
    };
    if bytes(max_pos) <= budget {
        return Ok(max_pos);
    }
    // The largest context within the budget (bytes grow with the context).
    let (mut lo, mut hi) = (0usize, max_pos);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if bytes(mid) <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    if lo == 0 {
        return Err(format!(
            "one position of KV cache needs more than half of this machine's {:.1} GiB of RAM",
            gib(budget * 2)
        ));
    }
    Ok(lo)
}

fn new_pool(threads: usize) -> Result<crate::par::SpinPool> {
    if threads > MAX_THREADS {
        return Err(EngineError::InvalidRequest(format!(
            "{threads} compute threads is more than {MAX_THREADS}"
        )));
    }
    crate::par::SpinPool::new(threads)
        .map_err(|e| EngineError::InvalidRequest(format!("cannot start compute threads: {e}")))
}

#[cfg(test)]
mod tests {
    use super::fit_context;

    #[test]
    fn contexts_are_bounded_by_the_machine() {
        let kib_per_pos = |n: usize| n as u128 * 1024;
        let gib = 1u128 << 30;
        // Asked for: in range and within the RAM, else a reason.
        assert_eq!(
            fit_context(32768, Some(4096), Some(gib), kib_per_pos),
            Ok(4096)
        );
        assert!(fit_context(32768, Some(0), None, kib_per_pos).is_err());
        assert!(fit_context(32768, Some(32769), None, kib_per_pos).is_err());
        let e = fit_context(1 << 24, Some(1 << 24), Some(gib), kib_per_pos).unwrap_err();
        assert!(
            e.contains("16.0 GiB of KV cache") && e.contains("1.0 GiB of RAM"),
            "{e}"
        );
        // By default: the model's maximum when it fits in half the RAM, else the longest
        // that does; unknown RAM leaves the maximum.
        assert_eq!(fit_context(32768, None, Some(gib), kib_per_pos), Ok(32768));
        assert_eq!(
            fit_context(1 << 24, None, Some(gib), kib_per_pos),
            Ok(512 * 1024)
        );
        assert_eq!(fit_context(1 << 24, None, None, kib_per_pos), Ok(1 << 24));
        assert!(fit_context(1 << 24, None, Some(1024), kib_per_pos).is_err());
    }
}
