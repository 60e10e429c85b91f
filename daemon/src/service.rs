//! The gRPC front-end: `gemmad.v1.Gemmad` on top of the queue and the inference thread,
//! plus the access check that sits in front of every service.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use gemmad_engine::TextTokenizer;
use gemmad_proto::v1 as pb;
use pb::gemmad_server::Gemmad;
use pb::generate_response::Event as Ev;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::access::Peer;
use crate::config::LimitsSection;
use crate::queue::{Event, Job, Queue};
use crate::request;
use crate::worker::{engine_status, ModelInfo, WorkerStats, FULL_SLICE};

/// Everything the handlers share.
pub struct Shared {
    pub queue: Arc<Queue>,
    pub tokenizer: Option<Arc<TextTokenizer>>,
    pub model: ModelInfo,
    pub limits: RwLock<LimitsSection>,
    pub stats: Arc<WorkerStats>,
    pub started: Instant,
}

impl Shared {
    fn limits(&self) -> LimitsSection {
        self.limits.read().map(|l| l.clone()).unwrap_or_default()
    }
}

/// The interceptor in front of every service: refuses connections the access policy
/// did not allow (decided and logged once per connection at accept).
#[allow(clippy::result_large_err)]
pub fn check_access(req: Request<()>) -> Result<Request<()>, Status> {
    match req.extensions().get::<Peer>() {
        Some(p) if p.allowed => Ok(req),
        Some(p) => Err(Status::permission_denied(format!(
            "{} may not use gemmad: ask the administrator to add this user or one of its groups \
             to [access] in /etc/gemmad/gemmad.toml (or to the socket's group)",
            p.id
        ))),
        None => Err(Status::permission_denied("unidentified connection")),
    }
}

pub struct GemmadService {
    pub shared: Arc<Shared>,
}

fn peer_key(req: &Request<impl Sized>) -> String {
    req.extensions()
        .get::<Peer>()
        .map(|p| p.id.queue_key())
        .unwrap_or_else(|| "unknown".into())
}

/// The response stream of one Generate call. Consecutive deltas that are already waiting
/// are sent as one message (a slow reader gets fewer, larger messages). Dropping it (the
/// client cancelled or disconnected) cancels the request.
pub struct EventStream {
    rx: UnboundedReceiver<Event>,
    pending: Option<Event>,
    queue: Arc<Queue>,
    cancel: Arc<AtomicBool>,
    id: u64,
    done: bool,
}

impl Stream for EventStream {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let this = self.get_mut();
        let first = match this.pending.take() {
            Some(e) => e,
            None => match this.rx.poll_recv(cx) {
                Poll::Ready(Some(e)) => e,
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        let Ok(pb::GenerateResponse {
            event: Some(Ev::Delta(mut d)),
        }) = first
        else {
            if matches!(
                first,
                Err(_)
                    | Ok(pb::GenerateResponse {
                        event: Some(Ev::Finished(_))
                    })
            ) {
                this.done = true;
            }
            return Poll::Ready(Some(first));
        };
        while let Ok(next) = this.rx.try_recv() {
            match next {
                Ok(pb::GenerateResponse {
                    event: Some(Ev::Delta(more)),
                }) => {
                    d.text.push_str(&more.text);
                    d.token_ids.extend(more.token_ids);
                }
                other => {
                    this.pending = Some(other);
                    break;
                }
            }
        }
        Poll::Ready(Some(Ok(pb::GenerateResponse {
            event: Some(Ev::Delta(d)),
        })))
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.done {
            self.cancel.store(true, Ordering::Relaxed);
            self.queue.withdraw(self.id);
            tracing::debug!(request_id = self.id, "client went away; request cancelled");
        }
    }
}

fn blocking_err(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("request handler failed: {e}"))
}

fn tokenizer(shared: &Shared) -> Result<Arc<TextTokenizer>, Status> {
    shared.tokenizer.clone().ok_or_else(|| {
        Status::failed_precondition("the model has no tokenizer.json: text is not available")
    })
}

fn tower(modality: pb::Modality, model: &ModelInfo) -> pb::Tower {
    let _ = model;
    pb::Tower {
        modality: modality as i32,
        available: false,
        loaded: false,
        bytes: 0,
    }
}

fn modality_of(m: i32) -> Result<pb::Modality, Status> {
    match pb::Modality::try_from(m) {
        Ok(pb::Modality::Vision) => Ok(pb::Modality::Vision),
        Ok(pb::Modality::Audio) => Ok(pb::Modality::Audio),
        _ => Err(Status::invalid_argument(
            "modality must be MODALITY_VISION or MODALITY_AUDIO",
        )),
    }
}

/// Resident set size of this process, from /proc/self/statm.
fn process_rss() -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page)
}

#[tonic::async_trait]
impl Gemmad for GemmadService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let received = Instant::now();
        let peer_key = peer_key(&req);
        let shared = self.shared.clone();
        let r = req.into_inner();
        let prepared = tokio::task::spawn_blocking(move || {
            let limits = shared.limits();
            request::prepare(r, shared.tokenizer.as_deref(), &shared.model, &limits)
        })
        .await
        .map_err(blocking_err)?;
        let prepared = match prepared {
            Ok(p) => p,
            Err(st) => {
                tracing::info!(peer = %peer_key, code = ?st.code(), error = %st.message(), "request refused");
                return Err(st);
            }
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut request = prepared.request;
        request.cancel = Some(cancel.clone());
        let job = Job {
            id: 0,
            peer_key: peer_key.clone(),
            class: prepared.class,
            request,
            cancel: cancel.clone(),
            tx,
            received,
            admitted: received,
        };
        let queue = self.shared.queue.clone();
        let id = queue.admit(job).map_err(|e| {
            let st = e.into_status();
            tracing::info!(peer = %peer_key, error = %st.message(), "request not admitted");
            st
        })?;
        tracing::debug!(request_id = id, peer = %peer_key, "request queued");
        Ok(Response::new(EventStream {
            rx,
            pending: None,
            queue,
            cancel,
            id,
            done: false,
        }))
    }

    async fn tokenize(
        &self,
        req: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let tok = tokenizer(&self.shared)?;
        let shared = self.shared.clone();
        let r = req.into_inner();
        let ids = tokio::task::spawn_blocking(move || match r.input {
            None => Err(Status::invalid_argument("set text or conversation")),
            Some(pb::tokenize_request::Input::Text(t)) => {
                let limits = shared.limits();
                if t.len() > limits.max_prompt_bytes {
                    return Err(Status::invalid_argument(format!(
                        "the text is {} bytes; the limit is {} (limits.max_prompt_bytes)",
                        t.len(),
                        limits.max_prompt_bytes
                    )));
                }
                tok.encode(&t, r.add_special_tokens)
                    .map_err(|e| engine_status(&e))
            }
            Some(pb::tokenize_request::Input::Conversation(c)) => {
                let chat = request::chat_json(&c.messages, &shared.limits())?;
                request::prompt_ids(&tok, &chat)
            }
        })
        .await
        .map_err(blocking_err)??;
        Ok(Response::new(pb::TokenizeResponse {
            ids,
            context_tokens: self.shared.model.context_tokens as u32,
        }))
    }

    async fn detokenize(
        &self,
        req: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let tok = tokenizer(&self.shared)?;
        let r = req.into_inner();
        let vocab = self.shared.model.vocab_size;
        if let Some(bad) = r.ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Status::invalid_argument(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let max = self
            .shared
            .model
            .context_tokens
            .max(self.shared.limits().max_tokens)
            * 4;
        if r.ids.len() > max {
            return Err(Status::invalid_argument(format!(
                "{} ids is too many (at most {max})",
                r.ids.len()
            )));
        }
        let text = tokio::task::spawn_blocking(move || tok.decode(&r.ids, !r.keep_special_tokens))
            .await
            .map_err(blocking_err)?
            .map_err(|e| engine_status(&e))?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = &self.shared;
        let q = s.queue.snapshot();
        let c = &s.queue.counters;
        let m = &s.model;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: s.started.elapsed().as_secs_f64(),
            model: Some(pb::ModelInfo {
                dir: m.dir.display().to_string(),
                model_type: m.model_type.clone(),
                layers: m.layers as u32,
                hidden_size: m.hidden_size as u32,
                vocab_size: m.vocab_size as u32,
                context_tokens: m.context_tokens as u32,
            }),
            active_slice: FULL_SLICE.into(),
            towers: vec![
                tower(pb::Modality::Vision, m),
                tower(pb::Modality::Audio, m),
            ],
            memory: {
                let mut parts = vec![
                    pb::MemoryPart {
                        part: "process_rss".into(),
                        bytes: process_rss(),
                    },
                    pb::MemoryPart {
                        part: "kv_cache".into(),
                        bytes: load(&s.stats.kv_cache_bytes),
                    },
                ];
                // The engine's report by part (decoder, embeddings, PLE, towers, ...), as
                // of the end of the last request.
                parts.extend(
                    s.stats
                        .memory_parts()
                        .into_iter()
                        .filter(|(p, _)| p != "kv_cache")
                        .map(|(part, bytes)| pb::MemoryPart { part, bytes }),
                );
                parts
            },
            queue: Some(pb::QueueInfo {
                waiting: (q.waiting_interactive + q.waiting_background) as u32,
                waiting_interactive: q.waiting_interactive as u32,
                waiting_background: q.waiting_background as u32,
                running: q.running,
                depth: q.depth as u32,
                per_peer: q.per_peer as u32,
            }),
            requests: Some(pb::RequestCounters {
                admitted: load(&c.admitted),
                completed: load(&c.completed),
                cancelled: load(&c.cancelled),
                failed: load(&c.failed),
                rejected: load(&c.rejected),
            }),
            governor: None,
        }))
    }

    async fn list_slices(
        &self,
        _req: Request<pb::ListSlicesRequest>,
    ) -> Result<Response<pb::ListSlicesResponse>, Status> {
        let m = &self.shared.model;
        Ok(Response::new(pb::ListSlicesResponse {
            slices: vec![pb::Slice {
                name: FULL_SLICE.into(),
                active: true,
                layers: m.layers as u32,
                ffn_widths: m.ffn_widths.iter().map(|&w| w as u32).collect(),
                params: 0,
            }],
        }))
    }

    async fn load_modality(
        &self,
        req: Request<pb::ModalityRequest>,
    ) -> Result<Response<pb::ModalityResponse>, Status> {
        let m = modality_of(req.get_ref().modality)?;
        let (name, in_ckpt) = match m {
            pb::Modality::Vision => ("vision", self.shared.model.checkpoint_vision),
            _ => ("audio", self.shared.model.checkpoint_audio),
        };
        let why = if in_ckpt {
            "the checkpoint has it, but this gemmad cannot run it yet (text only)"
        } else {
            "the checkpoint has no such tower, and this gemmad runs text only for now"
        };
        Err(Status::failed_precondition(format!(
            "the {name} modality is not available: {why}"
        )))
    }

    async fn unload_modality(
        &self,
        req: Request<pb::ModalityRequest>,
    ) -> Result<Response<pb::ModalityResponse>, Status> {
        let m = modality_of(req.get_ref().modality)?;
        // Nothing is ever loaded yet: unloading is a no-op that reports the state.
        Ok(Response::new(pb::ModalityResponse {
            tower: Some(tower(m, &self.shared.model)),
        }))
    }
}
