//! The engine thread, the only owner of the engine, and the handle every front end, the
//! admin requests and the governor use to reach it: submit a generation, cancel it, or
//! send a typed control command and await its answer. Commands go ahead of waiting
//! requests; those safe mid-request are also applied between two decode steps.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gemmad_engine::{Control, Engine, EngineState, FinishReason, LoadOptions, Prompter, Step};

use super::estimate::JobStats;
use super::queue::{Command, Counters, Job, Queue, Work};
use super::types::{Event, Finished, ModelInfo, RequestTimings};
use super::ServiceError;

/// The engine's state and memory as of its last command or request, for Status.
#[derive(Debug)]
pub struct EngineStats {
    state: Mutex<EngineState>,
    kv_cache_bytes: AtomicU64,
    /// The engine's memory report by part (bytes in RAM).
    memory: Mutex<Vec<(String, u64)>>,
    /// When the memory report was last taken (it walks every mapping with mincore,
    /// so it is not redone between back-to-back requests).
    memory_at: Mutex<Option<Instant>>,
}

impl EngineStats {
    fn new(engine: &Engine) -> Self {
        let s = EngineStats {
            state: Mutex::new(engine.state()),
            kv_cache_bytes: AtomicU64::new(0),
            memory: Mutex::new(Vec::new()),
            memory_at: Mutex::new(None),
        };
        s.publish(engine, true);
        s
    }

    /// Takes the engine's state (not the memory report).
    fn publish_state(&self, engine: &Engine) {
        if let Ok(mut st) = self.state.lock() {
            *st = engine.state();
        }
        self.kv_cache_bytes
            .store(engine.kv_cache_bytes() as u64, Ordering::Relaxed);
    }

    /// Takes the engine's state; the memory report too when `force` or a second has
    /// passed since the last one.
    fn publish(&self, engine: &Engine, force: bool) {
        self.publish_state(engine);
        self.publish_memory(engine, force);
    }

    /// Takes the memory report when `force` or a second has passed since the last one.
    fn publish_memory(&self, engine: &Engine, force: bool) {
        if let Ok(mut at) = self.memory_at.lock() {
            if !force && at.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *at = Some(Instant::now());
        }
        let r = engine.memory_report();
        let mut parts: Vec<(String, u64)> = r
            .parts
            .iter()
            .map(|p| (p.part.as_str().to_string(), p.ram_bytes()))
            .collect();
        parts.push(("rss_anon".into(), r.rss_anon_bytes));
        parts.push(("rss_file".into(), r.rss_file_bytes));
        parts.push(("resident_params".into(), r.resident_params));
        parts.push(("checkpoint_params".into(), r.checkpoint_params));
        if let Ok(mut m) = self.memory.lock() {
            *m = parts;
        }
    }

    pub fn state(&self) -> EngineState {
        match self.state.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn kv_cache_bytes(&self) -> u64 {
        self.kv_cache_bytes.load(Ordering::Relaxed)
    }

    /// A copy of the last published memory report.
    pub fn memory_parts(&self) -> Vec<(String, u64)> {
        self.memory.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// The way into the engine thread. Cheap to clone; every front end shares one.
#[derive(Clone)]
pub struct EngineHandle {
    queue: Arc<Queue>,
    stats: Arc<EngineStats>,
}

impl EngineHandle {
    pub fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Queues a generation; returns its request id.
    pub fn submit(&self, job: Job) -> Result<u64, ServiceError> {
        self.queue.admit(job)
    }

    /// Cancels request `id`: removed if still waiting, stopped at the next decode step
    /// if running (its `cancel` flag, which the caller owns, is set too).
    pub fn cancel(&self, id: u64, cancel: &AtomicBool) {
        cancel.store(true, Ordering::Relaxed);
        self.queue.withdraw(id);
    }

    /// Sends `c` to the engine thread and waits for it to be applied; returns the
    /// engine's state afterwards.
    pub async fn control(&self, c: Control) -> Result<EngineState, ServiceError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.queue.command(Command { control: c, reply })?;
        rx.await.map_err(|_| ServiceError::shutting_down())?
    }
}

/// What the front ends need to know about the loaded model.
pub struct Loaded {
    pub handle: EngineHandle,
    /// Moves while the engine thread works or waits idle; stops if it wedges.
    pub progress: Arc<AtomicU64>,
    pub prompter: Prompter,
    pub model: ModelInfo,
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts the engine thread and waits for the model to load.
pub fn spawn(
    dir: PathBuf,
    opts: LoadOptions,
    queue: Arc<Queue>,
    shutting_down: Arc<AtomicBool>,
) -> anyhow::Result<Loaded> {
    let (tx, rx) = std::sync::mpsc::channel();
    let q = queue.clone();
    let thread = std::thread::Builder::new()
        .name("gemmad-inference".into())
        .spawn(move || {
            let t0 = Instant::now();
            let mut engine = match Engine::load(&dir, opts) {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let c = &engine.config().text;
            let model = ModelInfo {
                dir: dir.clone(),
                model_type: match engine.config().layout {
                    gemmad_engine::Layout::Multimodal => "gemma3n".into(),
                    gemmad_engine::Layout::TextOnly => "gemma3n_text".into(),
                },
                layers: c.num_hidden_layers,
                hidden_size: c.hidden_size,
                vocab_size: c.vocab_size,
                ffn_widths: c.intermediate_size.clone(),
            };
            let stats = Arc::new(EngineStats::new(&engine));
            tracing::info!(dir = %dir.display(), load_ms = t0.elapsed().as_millis() as u64, "engine ready");
            if tx
                .send(Ok((model, engine.prompter(), stats.clone(), engine.progress())))
                .is_err()
            {
                return;
            }
            let mut thread = EngineThread {
                engine: &mut engine,
                queue: &q,
                stats: &stats,
                shutting_down: &shutting_down,
            };
            thread.serve();
            tracing::debug!("inference thread exits");
        })?;
    match rx.recv() {
        Ok(Ok((model, prompter, stats, progress))) => Ok(Loaded {
            handle: EngineHandle { queue, stats },
            progress,
            prompter,
            model,
            thread,
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(anyhow::Error::new(e).context("cannot load the model"))
        }
        Err(_) => {
            let _ = thread.join();
            anyhow::bail!("the inference thread died while loading the model")
        }
    }
}

struct EngineThread<'a> {
    engine: &'a mut Engine,
    queue: &'a Queue,
    stats: &'a EngineStats,
    shutting_down: &'a AtomicBool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl EngineThread<'_> {
    fn serve(&mut self) {
        let progress = self.engine.progress();
        let beat = || {
            progress.fetch_add(1, Ordering::Relaxed);
        };
        while let Some(work) = self.queue.next_beating(&beat) {
            match work {
                Work::Command(c) => self.apply(c),
                Work::Job(job, seq) => {
                    let held = Instant::now();
                    let (id, peer, tx) = (job.id, job.peer_key.clone(), job.tx.clone());
                    // An engine bug must not take the service down: fail this request,
                    // keep serving (the next generation starts from a cleared cache).
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.run(*job, seq)
                    }));
                    let stats = r.as_ref().ok().copied().flatten().map(|s| JobStats {
                        held: held.elapsed(),
                        ..s
                    });
                    if r.is_err() {
                        self.engine.reset();
                        Counters::bump(&self.queue.counters.failed);
                        tracing::error!(request_id = id, "the engine panicked; request failed");
                        let _ = tx.send(Event::Failed(ServiceError::Internal(
                            "the engine failed on this request (a bug: please report it with the daemon log)".into(),
                        )));
                    }
                    // A request that ran to its end published the state before its last
                    // message; the others publish it now.
                    if stats.is_none() {
                        self.stats.publish_state(self.engine);
                    }
                    self.stats.publish_memory(self.engine, false);
                    self.queue.finished(id, &peer, stats);
                }
            }
        }
    }

    /// Applies a control command and answers it with the engine's new state.
    fn apply(&mut self, c: Command) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.engine.control(&c.control)
        }));
        let r = match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(command = %c.control, error = %e, "control command failed");
                Err(ServiceError::from(e))
            }
            Err(_) => {
                tracing::error!(command = %c.control, "the engine panicked on a control command");
                Err(ServiceError::Internal(format!(
                    "the engine failed to {} (a bug: please report it with the daemon log)",
                    c.control
                )))
            }
        };
        self.stats.publish(self.engine, true);
        let _ = c.reply.send(r.map(|()| self.stats.state()));
    }

    /// Runs `job`; returns what it measured when it ran to its end.
    fn run(&mut self, job: Job, seq: u64) -> Option<JobStats> {
        let counters = &self.queue.counters;
        let start = Instant::now();
        let queue_wait = start - job.admitted;
        if job.cancel.load(Ordering::Relaxed) || job.tx.is_closed() {
            Counters::bump(&counters.cancelled);
            tracing::debug!(
                request_id = job.id,
                "skipping a request cancelled while queued"
            );
            return None;
        }
        let slice = match job.request.slice.as_deref() {
            None | Some("") | Some("auto") => self.engine.active_slice().to_string(),
            Some(name) => name.to_string(),
        };
        let _ = job.tx.send(Event::Started {
            request_id: job.id,
            run_seq: seq,
            queue_wait,
            active_slice: slice.clone(),
        });
        let mut first_token: Option<Instant> = None;
        let out = match self.generate(&job, &mut first_token) {
            Ok(out) => out,
            Err(e) => {
                Counters::bump(&counters.failed);
                tracing::warn!(request_id = job.id, error = %e, "generation failed");
                let _ = job.tx.send(Event::Failed(ServiceError::from(e)));
                return None;
            }
        };
        if out.finish_reason == FinishReason::Cancelled {
            Counters::bump(&counters.cancelled);
            let why = if self.shutting_down.load(Ordering::Relaxed) {
                let _ = job.tx.send(Event::Failed(ServiceError::shutting_down()));
                "shutdown"
            } else {
                "client"
            };
            tracing::info!(
                request_id = job.id,
                by = why,
                completion_tokens = out.usage.completion_tokens,
                "generation cancelled"
            );
            return None;
        }
        let t = out.timings;
        let ttft = first_token.map(|f| f - job.received).unwrap_or_default();
        // Count (and publish the engine's state: the prompt cache's hits and bytes) before
        // telling the client, so a Status call after the last message agrees.
        Counters::bump(&counters.completed);
        self.stats.publish_state(self.engine);
        let _ = job.tx.send(Event::Finished(Finished {
            reason: out.finish_reason,
            prompt_tokens: out.usage.prompt_tokens,
            completion_tokens: out.usage.completion_tokens,
            cached_tokens: out.usage.cached_tokens,
            timings: RequestTimings {
                queue_wait,
                time_to_first_token: ttft,
                prefill: t.prefill,
                prefill_tokens_per_s: t.prefill_tokens_per_s,
                decode: t.decode,
                decode_tokens_per_s: t.decode_tokens_per_s,
            },
            active_slice: out.slice.clone(),
        }));
        tracing::info!(
            request_id = job.id,
            peer = %job.peer_key,
            finish = out.finish_reason.as_str(),
            prompt_tokens = out.usage.prompt_tokens,
            completion_tokens = out.usage.completion_tokens,
            queue_wait_ms = ms(queue_wait),
            ttft_ms = ms(ttft),
            decode_tok_s = t.decode_tokens_per_s,
            "generation finished"
        );
        Some(JobStats {
            prompt_tokens: out.usage.prompt_tokens,
            prefill: t.prefill,
            completion_tokens: out.usage.completion_tokens,
            decode: t.decode,
            max_tokens: job.request.max_tokens,
            ignore_eos: job.request.ignore_eos,
            held: Duration::ZERO,
        })
    }

    /// Runs the generation step by step, streaming deltas, and applies the commands that
    /// are safe mid-request between steps.
    fn generate(
        &mut self,
        job: &Job,
        first_token: &mut Option<Instant>,
    ) -> gemmad_engine::Result<gemmad_engine::GenerateOutput> {
        let mut g = self.engine.start(&job.request)?;
        loop {
            for c in self.queue.take_mid_request_commands() {
                self.apply(c);
            }
            match self.engine.step(&mut g)? {
                Step::Token { id, text } => {
                    first_token.get_or_insert_with(Instant::now);
                    job.generated.fetch_add(1, Ordering::Relaxed);
                    let delta = Event::Delta {
                        text,
                        ids: vec![id],
                    };
                    if job.tx.send(delta).is_err() {
                        g.cancel();
                    }
                }
                Step::Done { output, tail } => {
                    // The final flush releases held-back text; it is not a new token.
                    if !tail.is_empty() {
                        let _ = job.tx.send(Event::Delta {
                            text: tail,
                            ids: Vec::new(),
                        });
                    }
                    return Ok(output);
                }
            }
        }
    }
}
