//! The engine API the daemon and CLI use: load a checkpoint folder, turn prompts into
//! ids, and generate with streaming callbacks, usage and timings. One owner, synchronous.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::{ForwardState, LogitsFor, TextModel};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::TextTokenizer;

/// How to load a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Storage type of the large matrices (decoder and LM head).
    pub quant: crate::quant::QuantType,
    /// Where derived files (quantized weights, the PLE cache) are kept; `None` keeps
    /// quantized weights in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Context length in tokens; defaults to (and is capped by) the model's
    /// `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Compute threads; defaults to the number of CPUs.
    pub threads: Option<usize>,
    /// Where per-layer inputs come from (default: the PLE cache file when `cache_dir` is
    /// set, else the checkpoint's table).
    pub ple: PleMode,
    /// Row type of the PLE cache file (bf16 by default; f32 is exact; q8_0 is smallest).
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
}

mod residency_api;
pub use residency_api::{PleMode, DEFAULT_PLE_HOT_BYTES};

/// One part of a chat message.
#[derive(Clone, Debug, PartialEq)]
pub enum ContentPart {
    Text(String),
    /// Encoded image bytes (PNG/JPEG).
    Image(Vec<u8>),
    /// Encoded audio bytes (WAV) or raw PCM.
    Audio(Vec<u8>),
}

/// A chat message; `role` is `system`, `user`, `assistant` or `model`.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    pub fn text(role: &str, text: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: vec![ContentPart::Text(text.to_string())],
        }
    }
}

/// What to generate from.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Raw text, tokenized with the tokenizer's special tokens (a leading `<bos>`).
    Text(String),
    /// A conversation rendered with the chat template, ending in a generation prompt.
    Chat(Vec<ChatMessage>),
    /// Token ids as given.
    Ids(Vec<u32>),
}

/// A generation request.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Generation ends when the output contains one of these; it is not emitted.
    pub stop: Vec<String>,
    /// Keep going past EOS ids (benchmarks, parity checks).
    pub ignore_eos: bool,
    /// Set from another thread to stop at the next step.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl GenerateRequest {
    pub fn new(prompt: Prompt) -> Self {
        GenerateRequest {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            cancel: None,
        }
    }
}

/// One streamed token: its id and the text it completes (may be empty while a multi-byte
/// character or a possible stop string is still pending).
#[derive(Clone, Debug)]
pub struct TokenEvent<'a> {
    pub id: u32,
    pub text: &'a str,
    /// True only for the last event of a generation that releases text held back for a
    /// possible stop string; `id` then repeats the last token and is not a new one.
    pub flush: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id was sampled.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context is full.
    ContextFull,
    /// The caller cancelled.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub prefill: Duration,
    /// From the call to the first token's callback.
    pub time_to_first_token: Duration,
    pub decode: Duration,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}

/// Prompts at least this long free their prefill buffers before decoding.
const RELEASE_AFTER_PREFILL: usize = 64;

/// One loaded Gemma 3n model and its sequence state.
pub struct Engine {
    dir: PathBuf,
    cfg: ModelConfig,
    model: TextModel,
    tokenizer: Option<Arc<TextTokenizer>>,
    cache: ForwardState,
    /// Compute threads of the forward pass.
    pool: crate::par::SpinPool,
    /// Mapped weight groups, towers and the checkpoint (memory control).
    mem: residency_api::MemState,
    /// Logits buffer reused across steps and requests.
    logits: Vec<f32>,
    prefill_chunk: usize,
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
    /// Loads the checkpoint folder `dir`. The tokenizer is optional (id-only use); a
    /// present but broken tokenizer is an error.
    pub fn load(dir: &Path, opts: LoadOptions) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let (model, mem) = residency_api::load_parts(&cfg, ckpt, &opts)?;
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(Arc::new(TextTokenizer::from_dir(dir)?))
        } else {
            None
        };
        crate::residency::trim_heap();
        let max_pos = cfg.text.max_position_embeddings;
        let max_context = opts.max_context.unwrap_or(max_pos);
        if max_context == 0 || max_context > max_pos {
            return Err(EngineError::Config {
                path: cfg.path.clone(),
                reason: format!("max_context {max_context} must be in 1..={max_pos}"),
            });
        }
        let threads = opts
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = crate::par::SpinPool::new(threads.max(1)).map_err(|e| {
            EngineError::InvalidRequest(format!("cannot start compute threads: {e}"))
        })?;
        let cache = model.new_cache(max_context);
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
            pool,
            logits: Vec::new(),
            prefill_chunk: if opts.prefill_chunk == 0 {
                512
            } else {
                opts.prefill_chunk
            },
            mem,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn model(&self) -> &TextModel {
        &self.model
    }

    pub fn max_context(&self) -> usize {
        self.cache.max_len()
    }

    /// The tokenizer, shareable with other threads (a front-end that counts prompt tokens
    /// before queuing should use this one rather than load a second copy).
    pub fn shared_tokenizer(&self) -> Option<Arc<TextTokenizer>> {
        self.tokenizer.clone()
    }

    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer
            .as_deref()
            .ok_or(EngineError::Unavailable("the tokenizer (tokenizer.json)"))
    }

    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.tokenizer()?.encode(text, add_special)
    }

    pub fn detokenize(&self, ids: &[u32]) -> Result<String> {
        let v = self.cfg.text.vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {v})"
            )));
        }
        self.tokenizer()?.decode(ids, false)
    }

    /// The chat template's rendering of `messages`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            let mut parts = Vec::new();
            for p in &m.content {
                match p {
                    ContentPart::Text(t) => parts.push(json!({"type": "text", "text": t})),
                    ContentPart::Image(_) => {
                        return Err(EngineError::Unavailable("the vision tower"))
                    }
                    ContentPart::Audio(_) => {
                        return Err(EngineError::Unavailable("the audio tower"))
                    }
                }
            }
            // A single text part renders as plain string content, as apps send it.
            let content = match parts.as_slice() {
                [p] => p["text"].clone(),
                _ => Value::Array(parts),
            };
            out.push(json!({"role": m.role, "content": content}));
        }
        self.tokenizer()?
            .render_chat(&Value::Array(out), add_generation_prompt)
    }

    /// The token ids a prompt turns into.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Text(t) => self.tokenize(t, true)?,
            Prompt::Chat(msgs) => {
                let text = self.render_chat(msgs, true)?;
                // The template already emits <bos>.
                self.tokenize(&text, false)?
            }
        };
        let v = self.cfg.text.vocab_size;
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {v})"
            )));
        }
        Ok(ids)
    }

    /// Logits of every position of `ids` (`[len, vocab]`), one prefill from an empty cache.
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.cache.clear();
        let chunk = self.prefill_chunk;
        let (model, cache) = (&self.model, &mut self.cache);
        let r = crate::par::install(&self.pool, || {
            let mut all = Vec::with_capacity(ids.len() * model.cfg.vocab_size);
            let mut part = Vec::new();
            for c in ids.chunks(chunk) {
                model.forward_into(c, cache, LogitsFor::All, &mut part)?;
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
        let t0 = Instant::now();
        req.sampling.validate()?;
        if req.max_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(EngineError::InvalidRequest(
                "stop strings must not be empty".into(),
            ));
        }
        self.check_media(&req.prompt)?;
        let prompt = self.prompt_ids(&req.prompt)?;
        self.prefetch_prompt(&prompt);
        let max = self.cache.max_len();
        if prompt.len() >= max {
            return Err(EngineError::ContextFull {
                needed: prompt.len() + 1,
                max,
            });
        }
        let cancelled = || {
            req.cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
        };
        let mut usage = Usage {
            prompt_tokens: prompt.len(),
            completion_tokens: 0,
        };
        let mut timings = Timings::default();
        let mut out_ids = Vec::new();
        let mut history = prompt.clone();
        let mut text = String::new();
        if cancelled() {
            return Ok(GenerateOutput {
                text,
                token_ids: out_ids,
                finish_reason: FinishReason::Cancelled,
                usage,
                timings,
            });
        }

        self.cache.clear();
        let (model, cache, pool) = (&self.model, &mut self.cache, &self.pool);
        let tp = Instant::now();
        let mut logits = std::mem::take(&mut self.logits);
        let chunk = self.prefill_chunk;
        crate::par::install(pool, || -> Result<()> {
            let n = prompt.len().div_ceil(chunk);
            for (i, c) in prompt.chunks(chunk).enumerate() {
                let want = if i + 1 == n {
                    LogitsFor::Last
                } else {
                    LogitsFor::None
                };
                model.forward_into(c, cache, want, &mut logits)?;
            }
            Ok(())
        })?;
        timings.prefill = tp.elapsed();
        timings.prefill_tokens_per_s =
            prompt.len() as f64 / timings.prefill.as_secs_f64().max(1e-9);
        if prompt.len() >= RELEASE_AFTER_PREFILL {
            // A long prefill leaves chunk-sized activation and pending-K/V buffers (~180
            // MiB for a 512-token chunk of E2B) that decode never uses; give them back
            // rather than hold them for the life of the service. Decode re-warms small
            // ones.
            cache.release_scratch();
            crate::weights::release_thread_scratch();
            crate::residency::trim_heap();
        }

        let mut sampler = Sampler::new(req.sampling.clone());
        let mut stream = TextStream::new(self.tokenizer.as_deref(), &req.stop);
        let eos = &self.cfg.text.eos_token_ids;
        let td = Instant::now();
        let finish = loop {
            let id = sampler.sample(&mut logits, &history);
            if !req.ignore_eos && eos.contains(&id) {
                break FinishReason::Eos;
            }
            usage.completion_tokens += 1;
            out_ids.push(id);
            history.push(id);
            let (delta, hit_stop) = stream.push(id)?;
            text.push_str(&delta);
            if usage.completion_tokens == 1 {
                timings.time_to_first_token = t0.elapsed();
            }
            if on_token(TokenEvent {
                id,
                text: &delta,
                flush: false,
            })
            .is_break()
            {
                break FinishReason::Cancelled;
            }
            if hit_stop {
                break FinishReason::Stop;
            }
            if usage.completion_tokens >= req.max_tokens {
                break FinishReason::Length;
            }
            if cancelled() {
                break FinishReason::Cancelled;
            }
            if cache.len() + 1 > cache.max_len() {
                break FinishReason::ContextFull;
            }
            crate::par::install(pool, || {
                model.forward_into(&[id], cache, LogitsFor::Last, &mut logits)
            })?;
        };
        self.logits = logits;
        if finish != FinishReason::Stop && finish != FinishReason::Cancelled {
            let rest = stream.flush()?;
            if !rest.is_empty() {
                text.push_str(&rest);
                let _ = on_token(TokenEvent {
                    id: *out_ids.last().unwrap_or(&0),
                    text: &rest,
                    flush: true,
                });
            }
        }
        timings.decode = td.elapsed();
        if usage.completion_tokens > 1 {
            timings.decode_tokens_per_s =
                (usage.completion_tokens - 1) as f64 / timings.decode.as_secs_f64().max(1e-9);
        }
        Ok(GenerateOutput {
            text,
            token_ids: out_ids,
            finish_reason: finish,
            usage,
            timings,
        })
    }
}

/// Turns generated ids into text deltas: decodes a short window of recent ids (so that
/// SentencePiece spaces and multi-token characters come out right), holds back incomplete
/// UTF-8 and any tail that could still grow into a stop string.
struct TextStream<'a> {
    tok: Option<&'a TextTokenizer>,
    stop: &'a [String],
    ids: Vec<u32>,
    prefix_start: usize,
    read_start: usize,
    /// All text decoded so far (append-only), and how much of it has been released.
    text: String,
    released: usize,
}

impl<'a> TextStream<'a> {
    fn new(tok: Option<&'a TextTokenizer>, stop: &'a [String]) -> Self {
        TextStream {
            tok,
            stop,
            ids: Vec::new(),
            prefix_start: 0,
            read_start: 0,
            text: String::new(),
            released: 0,
        }
    }

    /// Adds a token; returns the releasable text and whether a stop string was found.
    fn push(&mut self, id: u32) -> Result<(String, bool)> {
        let Some(tok) = self.tok else {
            return Ok((String::new(), false));
        };
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_start..self.read_start], true)?;
        let full = tok.decode(&self.ids[self.prefix_start..], true)?;
        if full.ends_with('\u{FFFD}') || full.len() <= prefix.len() {
            return Ok((String::new(), false)); // incomplete character, or nothing visible yet
        }
        // Byte-fallback garbage can change how the window's start decodes; never re-emit.
        let cut = if full.starts_with(&prefix) {
            prefix.len()
        } else {
            floor_char_boundary(&full, prefix.len())
        };
        self.text.push_str(&full[cut..]);
        self.prefix_start = self.read_start;
        self.read_start = self.ids.len();

        let search_from = floor_char_boundary(
            &self.text,
            self.released.saturating_sub(self.max_stop_len()),
        );
        let hay = &self.text[search_from..];
        if let Some(at) = self.stop.iter().filter_map(|s| hay.find(s.as_str())).min() {
            let end = (search_from + at).max(self.released);
            let delta = self.text[self.released..end].to_string();
            self.released = end;
            return Ok((delta, true));
        }
        // Hold back the longest suffix that is a prefix of a stop string.
        let mut hold = 0;
        for s in self.stop {
            for k in (1..s.len()).rev() {
                if k <= self.text.len()
                    && s.is_char_boundary(k)
                    && self.text.is_char_boundary(self.text.len() - k)
                    && self.text.ends_with(&s[..k])
                {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        let end = (self.text.len() - hold).max(self.released);
        let delta = self.text[self.released..end].to_string();
        self.released = end;
        Ok((delta, false))
    }

    fn max_stop_len(&self) -> usize {
        self.stop.iter().map(String::len).max().unwrap_or(0)
    }

    /// What is still held back, at the end of generation.
    fn flush(&mut self) -> Result<String> {
        if self.released >= self.text.len() {
            return Ok(String::new());
        }
        let rest = self.text[self.released..].to_string();
        self.released = self.text.len();
        Ok(rest)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

// accessors for the daemon
impl Engine {
    /// Bytes of K/V holding positions of the current (or last) sequence.
    pub fn kv_cache_bytes(&self) -> usize {
        self.cache.bytes_used()
    }
}
