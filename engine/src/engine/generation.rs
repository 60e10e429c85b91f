//! Generation one step at a time: [`Engine::start`] prefills, each [`Engine::step`]
//! decodes one token. Between two steps the engine belongs to its owner again, which is
//! where control commands that are safe mid-request are applied (page release, tower
//! unload, the PLE hot-row budget) and where cancellation is seen.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::text_stream::TextStream;
use super::{Engine, FinishReason, GenerateOutput, GenerateRequest, Timings, Usage};
use crate::error::{EngineError, Result};
use crate::model::LogitsFor;
use crate::sampling::Sampler;

/// Prompts at least this long free their prefill buffers before decoding.
const RELEASE_AFTER_PREFILL: usize = 64;

/// The state of one generation between steps. It does not borrow the engine.
pub struct Generation {
    number: u64,
    max_tokens: usize,
    ignore_eos: bool,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    sampler: Sampler,
    stream: TextStream,
    history: Vec<u32>,
    out_ids: Vec<u32>,
    text: String,
    usage: Usage,
    timings: Timings,
    t0: Instant,
    decode_start: Option<Instant>,
    /// The last token, still to be run through the model before the next sample.
    pending: Option<u32>,
    /// Set once the generation has decided to end.
    finish: Option<FinishReason>,
    done: bool,
    /// The MatFormer slice it runs on.
    slice: std::sync::Arc<crate::matformer::SlicePlan>,
    /// Whose request it is (the prompt cache keeps its state for that user).
    user: Option<u32>,
}

impl Generation {
    /// Ends the generation at the next step (which returns [`Step::Done`]).
    pub fn cancel(&mut self) {
        if self.finish.is_none() {
            self.finish = Some(FinishReason::Cancelled);
        }
    }

    /// Tokens generated so far.
    pub fn completion_tokens(&self) -> usize {
        self.usage.completion_tokens
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// What one step produced.
#[derive(Debug)]
pub enum Step {
    /// A new token and the text it releases (may be empty while a multi-byte character
    /// or a possible stop string is pending).
    Token { id: u32, text: String },
    /// The generation is over; `tail` is text held back until the end (for a possible
    /// stop string) that the caller still has to deliver.
    Done {
        output: GenerateOutput,
        tail: String,
    },
}

impl Engine {
    /// Checks `req`, prefills its prompt and returns the generation, ready for
    /// [`Engine::step`]. Starting a generation ends any other one.
    pub fn start(&mut self, req: &GenerateRequest) -> Result<Generation> {
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
        let slice = self.find_slice(req.slice.as_deref().unwrap_or(""))?;
        let prepared = self.prompter().prepare(&req.prompt)?;
        let system_end = prepared.system_end();
        let prompt = prepared.into_ids();
        self.prefetch_prompt(&prompt);
        self.active = None;
        self.next_generation += 1;
        let mut g = Generation {
            number: self.next_generation,
            max_tokens: req.max_tokens,
            ignore_eos: req.ignore_eos,
            cancel: req.cancel.clone(),
            sampler: Sampler::new(req.sampling.clone()),
            stream: TextStream::new(self.tokenizer.clone(), req.stop.clone()),
            history: prompt.clone(),
            out_ids: Vec::new(),
            text: String::new(),
            usage: Usage {
                prompt_tokens: prompt.len(),
                completion_tokens: 0,
                cached_tokens: 0,
            },
            timings: Timings::default(),
            t0,
            decode_start: None,
            pending: None,
            finish: None,
            done: false,
            slice,
            user: req.user,
        };
        if g.cancelled() {
            g.finish = Some(FinishReason::Cancelled);
            self.active = Some(g.number);
            return Ok(g);
        }

        self.reprefill = false;
        let tp = Instant::now();
        let cached = self.resume_prefix(&prompt, req.user, req.cache_prompt, &g.slice);
        g.usage.cached_tokens = cached;
        // A snapshot at the prompt's end lets a later request resume it even after the
        // answer has run past the sliding window (the next turn, whose copy of this
        // answer may tokenize differently; a regenerated answer); one where the system
        // prompt ends lets other conversations that start with it resume it.
        let marks = if req.cache_prompt {
            system_end.into_iter().chain([prompt.len()]).collect()
        } else {
            Vec::new()
        };
        self.prefill_from(&prompt, cached, &g.slice, &marks)?;
        let cache = &mut self.cache;
        g.timings.prefill = tp.elapsed();
        g.timings.prefill_tokens_per_s =
            (prompt.len() - cached) as f64 / g.timings.prefill.as_secs_f64().max(1e-9);
        if prompt.len() >= RELEASE_AFTER_PREFILL {
            // A long prefill leaves chunk-sized activation and pending-K/V buffers (~180
            // MiB for a 512-token chunk of E2B) that decode never uses; give them back
            // rather than hold them for the life of the service. Decode re-warms small
            // ones.
            cache.release_scratch();
            crate::weights::release_thread_scratch();
            crate::residency::trim_heap();
        }
        self.active = Some(g.number);
        Ok(g)
    }

    /// Runs `ids[from..]` on `slice` after the cache's first `from` positions (which hold
    /// `ids[..from]`), leaving the last position's logits; takes a ring snapshot for the
    /// prompt cache when the cache reaches a position in `marks`. A failed pass leaves
    /// the cache empty.
    pub(super) fn prefill_from(
        &mut self,
        ids: &[u32],
        from: usize,
        slice: &crate::matformer::SlicePlan,
        marks: &[usize],
    ) -> Result<()> {
        let n = ids.len();
        let mut pos = from;
        while pos < n {
            let mut end = (pos + self.prefill_chunk).min(n);
            if let Some(&m) = marks.iter().filter(|&&m| m > pos && m < end).min() {
                end = m;
            }
            let want = if end == n {
                LogitsFor::Last
            } else {
                LogitsFor::None
            };
            let (model, cache, logits) = (&self.model, &mut self.cache, &mut self.logits);
            let c = &ids[pos..end];
            let r = crate::par::install(&self.pool, || {
                model.forward_slice_into(c, cache, want, logits, slice)
            });
            if let Err(e) = r {
                self.cache.clear();
                self.forget_live();
                return Err(e);
            }
            self.progress.fetch_add(1, Ordering::Relaxed);
            self.live_push(c);
            if marks.contains(&end) {
                self.live_snapshot();
            }
            pos = end;
        }
        Ok(())
    }

    /// Decodes one token of `g` (or ends it).
    pub fn step(&mut self, g: &mut Generation) -> Result<Step> {
        self.progress
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if g.done {
            return Err(EngineError::InvalidRequest(
                "this generation has already finished".into(),
            ));
        }
        if self.active != Some(g.number) {
            g.done = true;
            return Err(EngineError::InvalidRequest(
                "this generation was ended by another one (the engine runs one at a time)".into(),
            ));
        }
        if g.finish.is_none() && g.cancelled() {
            g.finish = Some(FinishReason::Cancelled);
        }
        if let Some(reason) = g.finish {
            return self.finish(g, reason);
        }
        if self.reprefill {
            // A forced slice switch: the tokens so far (the prompt, and the sampled ones,
            // the last of which is still pending) again, on the new slice.
            self.reprefill = false;
            g.slice = self.slice.clone();
            g.pending = None;
            let t0 = Instant::now();
            self.cache.clear();
            self.start_live(g.user, &g.slice);
            self.prefill_from(&g.history, 0, &g.slice, &[])?;
            g.timings.reprefills += 1;
            g.timings.reprefill += t0.elapsed();
            tracing::info!(slice = %g.slice.name, tokens = g.history.len(), secs = t0.elapsed().as_secs_f64(), "generation re-prefilled on the new slice");
        }
        if let Some(id) = g.pending.take() {
            let (model, cache, logits) = (&self.model, &mut self.cache, &mut self.logits);
            let slice = &*g.slice;
            let r = crate::par::install(&self.pool, || {
                model.forward_slice_into(&[id], cache, LogitsFor::Last, logits, slice)
            });
            if let Err(e) = r {
                self.forget_live();
                return Err(e);
            }
            self.live_push(&[id]);
        }
        g.decode_start.get_or_insert_with(Instant::now);
        let id = g.sampler.sample(&mut self.logits, &g.history);
        if !g.ignore_eos && self.cfg.text.eos_token_ids.contains(&id) {
            return self.finish(g, FinishReason::Eos);
        }
        g.usage.completion_tokens += 1;
        g.out_ids.push(id);
        g.history.push(id);
        let (delta, hit_stop) = g.stream.push(id)?;
        g.text.push_str(&delta);
        if g.usage.completion_tokens == 1 {
            g.timings.time_to_first_token = g.t0.elapsed();
        }
        g.finish = if hit_stop {
            Some(FinishReason::Stop)
        } else if g.usage.completion_tokens >= g.max_tokens {
            Some(FinishReason::Length)
        } else if g.cancelled() {
            Some(FinishReason::Cancelled)
        } else if self.cache.len() + 1 > self.cache.max_len() {
            Some(FinishReason::ContextFull)
        } else {
            g.pending = Some(id);
            None
        };
        Ok(Step::Token { id, text: delta })
    }

    fn finish(&mut self, g: &mut Generation, reason: FinishReason) -> Result<Step> {
        g.done = true;
        self.active = None;
        if g.slice.name != self.slice.name {
            // The request ran a slice of its own: back to the active one's footprint.
            self.release_unused_async();
        }
        let mut tail = String::new();
        if reason != FinishReason::Stop && reason != FinishReason::Cancelled {
            tail = g.stream.flush()?;
            g.text.push_str(&tail);
        }
        if let Some(td) = g.decode_start {
            g.timings.decode = td.elapsed();
        }
        if g.usage.completion_tokens > 1 {
            g.timings.decode_tokens_per_s =
                (g.usage.completion_tokens - 1) as f64 / g.timings.decode.as_secs_f64().max(1e-9);
        }
        Ok(Step::Done {
            output: GenerateOutput {
                text: std::mem::take(&mut g.text),
                token_ids: std::mem::take(&mut g.out_ids),
                finish_reason: reason,
                usage: g.usage,
                timings: g.timings,
                slice: g.slice.name.clone(),
            },
            tail,
        })
    }
}
