//! The inference thread: the only owner of the engine. It loads the model, then runs
//! queued jobs one at a time, streaming events back through each job's channel.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use gemmad_engine::{Engine, EngineError, FinishReason, LoadOptions};
use gemmad_proto::v1 as pb;
use pb::generate_response::Event as Ev;
use tonic::Status;

use crate::queue::{Counters, Job, Queue};

/// The slice name while the engine has no MatFormer slicing: the model as loaded.
pub const FULL_SLICE: &str = "full";

/// What the front-end needs to know about the loaded model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub dir: PathBuf,
    /// The engine's tokenizer, shared (one copy in memory).
    pub tokenizer: Option<Arc<gemmad_engine::TextTokenizer>>,
    pub model_type: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub context_tokens: usize,
    pub ffn_widths: Vec<usize>,
    /// The checkpoint carries vision / audio tower weights.
    pub checkpoint_vision: bool,
    pub checkpoint_audio: bool,
}

/// State the worker publishes for Status.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub kv_cache_bytes: AtomicU64,
    /// The engine's memory report by part (bytes in RAM), refreshed after load and after
    /// every request by the inference thread.
    pub memory: std::sync::Mutex<Vec<(String, u64)>>,
    /// When the memory report was last taken (it walks every mapping with mincore,
    /// so it is not redone between back-to-back requests).
    memory_at: std::sync::Mutex<Option<Instant>>,
}

impl WorkerStats {
    fn publish(&self, engine: &Engine) {
        self.kv_cache_bytes
            .store(engine.kv_cache_bytes() as u64, Ordering::Relaxed);
        if let Ok(mut at) = self.memory_at.lock() {
            if at.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
                return;
            }
            *at = Some(Instant::now());
        }
        let r = engine.memory_report();
        let mut parts: Vec<(String, u64)> = r
            .parts
            .iter()
            .map(|p| (p.name.clone(), p.ram_bytes()))
            .collect();
        parts.push(("rss_anon".into(), r.rss_anon_bytes));
        parts.push(("rss_file".into(), r.rss_file_bytes));
        parts.push(("resident_params".into(), r.resident_params));
        parts.push(("checkpoint_params".into(), r.checkpoint_params));
        if let Ok(mut m) = self.memory.lock() {
            *m = parts;
        }
    }

    /// A copy of the last published report.
    pub fn memory_parts(&self) -> Vec<(String, u64)> {
        self.memory.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Maps an engine error to the status a client can act on.
pub fn engine_status(e: &EngineError) -> Status {
    match e {
        EngineError::InvalidRequest(_)
        | EngineError::ContextFull { .. }
        | EngineError::Template(_) => Status::invalid_argument(e.to_string()),
        EngineError::Unavailable(_) | EngineError::ModalityUnavailable(_) => {
            Status::failed_precondition(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

/// Starts the inference thread and waits for the model to load.
pub fn spawn(
    dir: PathBuf,
    opts: LoadOptions,
    queue: Arc<Queue>,
    stats: Arc<WorkerStats>,
    shutting_down: Arc<AtomicBool>,
) -> anyhow::Result<(std::thread::JoinHandle<()>, ModelInfo)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
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
            let info = ModelInfo {
                dir: dir.clone(),
                tokenizer: engine.shared_tokenizer(),
                model_type: match engine.config().layout {
                    gemmad_engine::Layout::Multimodal => "gemma3n".into(),
                    gemmad_engine::Layout::TextOnly => "gemma3n_text".into(),
                },
                layers: c.num_hidden_layers,
                hidden_size: c.hidden_size,
                vocab_size: c.vocab_size,
                context_tokens: engine.max_context(),
                ffn_widths: c.intermediate_size.clone(),
                checkpoint_vision: engine.config().has_vision,
                checkpoint_audio: engine.config().has_audio,
            };
            tracing::info!(dir = %dir.display(), load_ms = t0.elapsed().as_millis() as u64, "engine ready");
            stats.publish(&engine);
            if tx.send(Ok(info)).is_err() {
                return;
            }
            while let Some((job, seq)) = queue.next() {
                let held = Instant::now();
                let (id, peer, tx) = (job.id, job.peer_key.clone(), job.tx.clone());
                // An engine bug must not take the service down: fail this request, keep
                // serving (the next generate starts from a cleared cache).
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&mut engine, job, seq, &queue.counters, &shutting_down)
                }));
                if r.is_err() {
                    Counters::bump(&queue.counters.failed);
                    tracing::error!(request_id = id, "the engine panicked; request failed");
                    let _ = tx.send(Err(Status::internal(
                        "the engine failed on this request (a bug: please report it with the daemon log)",
                    )));
                }
                stats.publish(&engine);
                queue.finished(id, &peer, held.elapsed());
            }
            tracing::debug!("inference thread exits");
        })?;
    match rx.recv() {
        Ok(Ok(info)) => Ok((handle, info)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(anyhow::Error::new(e).context("cannot load the model"))
        }
        Err(_) => {
            let _ = handle.join();
            anyhow::bail!("the inference thread died while loading the model")
        }
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn send(job: &Job, ev: Ev) -> bool {
    job.tx
        .send(Ok(pb::GenerateResponse { event: Some(ev) }))
        .is_ok()
}

fn run(engine: &mut Engine, job: Job, seq: u64, counters: &Counters, shutting_down: &AtomicBool) {
    let start = Instant::now();
    let queue_wait = start - job.admitted;
    if job.cancel.load(Ordering::Relaxed) || job.tx.is_closed() {
        Counters::bump(&counters.cancelled);
        tracing::debug!(
            request_id = job.id,
            "skipping a request cancelled while queued"
        );
        return;
    }
    send(
        &job,
        Ev::Started(pb::Started {
            request_id: job.id,
            run_seq: seq,
            queue_wait_ms: ms(queue_wait),
            active_slice: FULL_SLICE.into(),
        }),
    );
    let mut first_token: Option<Instant> = None;
    let tx = job.tx.clone();
    let res = engine.generate(&job.request, &mut |ev| {
        first_token.get_or_insert_with(Instant::now);
        // The final flush event releases held-back text; its id is not a new token.
        let ids = if ev.flush { Vec::new() } else { vec![ev.id] };
        if ev.text.is_empty() && ids.is_empty() {
            return ControlFlow::Continue(());
        }
        let delta = Ev::Delta(pb::Delta {
            text: ev.text.to_string(),
            token_ids: ids,
        });
        match tx.send(Ok(pb::GenerateResponse { event: Some(delta) })) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    });
    let out = match res {
        Ok(out) => out,
        Err(e) => {
            Counters::bump(&counters.failed);
            tracing::warn!(request_id = job.id, error = %e, "generation failed");
            let _ = job.tx.send(Err(engine_status(&e)));
            return;
        }
    };
    let reason = match out.finish_reason {
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::ContextFull => pb::FinishReason::ContextFull,
        FinishReason::Cancelled => {
            Counters::bump(&counters.cancelled);
            let why = if shutting_down.load(Ordering::Relaxed) {
                let _ = job.tx.send(Err(Status::unavailable(
                    "gemmad is shutting down; the request was cancelled (retry when it is back)",
                )));
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
            return;
        }
    };
    let t = out.timings;
    let ttft = first_token.map(|f| ms(f - job.received)).unwrap_or(0.0);
    // Count before telling the client, so a Status call after the last message agrees.
    Counters::bump(&counters.completed);
    send(
        &job,
        Ev::Finished(pb::Finished {
            finish_reason: reason as i32,
            usage: Some(pb::Usage {
                prompt_tokens: out.usage.prompt_tokens as u32,
                completion_tokens: out.usage.completion_tokens as u32,
            }),
            timings: Some(pb::Timings {
                queue_wait_ms: ms(queue_wait),
                time_to_first_token_ms: ttft,
                prefill_ms: ms(t.prefill),
                prefill_tokens_per_s: t.prefill_tokens_per_s,
                decode_ms: ms(t.decode),
                decode_tokens_per_s: t.decode_tokens_per_s,
                active_slice: FULL_SLICE.into(),
            }),
        }),
    );
    tracing::info!(
        request_id = job.id,
        peer = %job.peer_key,
        finish = out.finish_reason.as_str(),
        prompt_tokens = out.usage.prompt_tokens,
        completion_tokens = out.usage.completion_tokens,
        queue_wait_ms = ms(queue_wait),
        ttft_ms = ttft,
        decode_tok_s = t.decode_tokens_per_s,
        "generation finished"
    );
}
