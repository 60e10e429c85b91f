//! The gRPC front end: `gemmad.v1.Gemmad` over the service core, plus the access check
//! that sits in front of every service (health and reflection included). It converts at
//! the edge ([`convert`]) and decides nothing the core decides.

pub mod authority;
pub mod convert;
pub mod listen;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use gemmad_proto::v1 as pb;
use pb::gemmad_server::Gemmad;
use pb::generate_response::Event as Ev;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::core::types::{Event, Peer, TokenizeInput};
use crate::core::{Core, Submission};
use listen::Connection;

/// The interceptor in front of every service (health and reflection included): asks the
/// core's access policy on every call, so a reload that removes a user refuses that
/// user's open connections at their next call, not only new ones.
#[allow(clippy::result_large_err)]
pub fn check_access(
    core: Arc<Core>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| match req.extensions().get::<Connection>() {
        Some(c) => match core.authorize(&c.peer) {
            Ok(()) => Ok(req),
            Err(e) => Err(convert::status(e)),
        },
        None => Err(Status::permission_denied("unidentified connection")),
    }
}

/// The codec's check of a request's wire counts (see `gemmad_proto::codec`): the core's
/// own count limits, as they are at that moment (a reload applies).
pub fn count_check(core: &Arc<Core>) -> Arc<gemmad_proto::codec::RequestCheck> {
    let core = Arc::downgrade(core);
    Arc::new(move |c| match core.upgrade() {
        Some(core) => core
            .check_counts(&convert::counts(c))
            .map_err(|e| e.to_string()),
        None => Ok(()),
    })
}

pub struct GemmadService {
    pub core: Arc<Core>,
}

fn peer(req: &Request<impl Sized>) -> Peer {
    req.extensions()
        .get::<Connection>()
        .map(|c| c.peer.clone())
        .unwrap_or_else(|| Peer::unknown("grpc"))
}

/// The response stream of one Generate call. Consecutive deltas that are already waiting
/// are sent as one message (a slow reader gets fewer, larger messages). Dropping it (the
/// client cancelled or disconnected) cancels the request.
pub struct EventStream {
    sub: Submission,
    pending: Option<Event>,
}

impl Stream for EventStream {
    type Item = Result<pb::GenerateResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let first = match this.pending.take() {
            Some(e) => e,
            None => match this.sub.poll_event(cx) {
                Poll::Ready(Some(e)) => e,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            },
        };
        let Event::Delta { mut text, mut ids } = first else {
            return Poll::Ready(Some(convert::event(first)));
        };
        while let Some(next) = this.sub.try_event() {
            match next {
                Event::Delta { text: t, ids: i } => {
                    text.push_str(&t);
                    ids.extend(i);
                }
                other => {
                    this.pending = Some(other);
                    break;
                }
            }
        }
        Poll::Ready(Some(Ok(pb::GenerateResponse {
            event: Some(Ev::Delta(pb::Delta {
                text,
                token_ids: ids,
            })),
        })))
    }
}

/// The progress stream of one Pull; dropping it (the client went away) cancels the
/// download at its next step.
pub struct PullStream {
    rx: crate::core::pull::PullUpdates,
}

impl Stream for PullStream {
    type Item = Result<pb::PullProgress, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .rx
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(convert::pull_progress).map_err(convert::pull_status)))
    }
}

fn sat_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn blocking_err(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("request handler failed: {e}"))
}

#[tonic::async_trait]
impl Gemmad for GemmadService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let received = Instant::now();
        let peer = peer(&req);
        let params = convert::generate(req.into_inner())?;
        let core = self.core.clone();
        let sub = tokio::task::spawn_blocking(move || core.generate(&peer, params, received))
            .await
            .map_err(blocking_err)?
            .map_err(convert::status)?;
        Ok(Response::new(EventStream { sub, pending: None }))
    }

    async fn tokenize(
        &self,
        req: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let peer = peer(&req);
        let r = req.into_inner();
        let input = match r.input {
            None => return Err(Status::invalid_argument("set text or conversation")),
            Some(pb::tokenize_request::Input::Text(text)) => TokenizeInput::Text {
                text,
                add_special: r.add_special_tokens,
            },
            Some(pb::tokenize_request::Input::Conversation(c)) => {
                TokenizeInput::Conversation(convert::messages(c.messages)?)
            }
        };
        let core = self.core.clone();
        let ids = tokio::task::spawn_blocking(move || core.tokenize(&peer, input))
            .await
            .map_err(blocking_err)?
            .map_err(convert::status)?;
        Ok(Response::new(pb::TokenizeResponse {
            ids,
            context_tokens: self.core.context_tokens() as u32,
        }))
    }

    async fn detokenize(
        &self,
        req: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let peer = peer(&req);
        let r = req.into_inner();
        let core = self.core.clone();
        let text = tokio::task::spawn_blocking(move || {
            core.detokenize(&peer, &r.ids, r.keep_special_tokens)
        })
        .await
        .map_err(blocking_err)?
        .map_err(convert::status)?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.core.status(&peer(&req));
        let (q, c, m, n) = (&s.queue, &s.requests, &s.model, &s.connections);
        Ok(Response::new(pb::StatusResponse {
            version: s.version.into(),
            uptime_s: s.uptime.as_secs_f64(),
            model: Some(pb::ModelInfo {
                dir: m.dir.display().to_string(),
                model_type: m.model_type.clone(),
                layers: m.layers as u32,
                hidden_size: m.hidden_size as u32,
                vocab_size: m.vocab_size as u32,
                context_tokens: s.engine.max_context as u32,
                quant: s.engine.quant.to_string(),
                kernels: s.engine.kernels.to_string(),
                threads: s.engine.threads as u32,
                isa: s.engine.isa.to_string(),
                pack: s.engine.pack,
            }),
            active_slice: s.engine.slice.clone(),
            towers: s.engine.towers.iter().map(convert::tower).collect(),
            memory: s
                .memory
                .iter()
                .map(|(part, bytes)| pb::MemoryPart {
                    part: part.clone(),
                    bytes: *bytes,
                })
                .collect(),
            queue: Some(pb::QueueInfo {
                waiting: (q.waiting_interactive + q.waiting_background) as u32,
                waiting_interactive: q.waiting_interactive as u32,
                waiting_background: q.waiting_background as u32,
                running: q.running,
                depth: q.depth as u32,
                per_peer: q.per_peer as u32,
            }),
            requests: Some(pb::RequestCounters {
                admitted: c.admitted,
                completed: c.completed,
                cancelled: c.cancelled,
                failed: c.failed,
                rejected: c.rejected,
            }),
            governor: s.governor.as_ref().map(|g| pb::GovernorInfo {
                tier: g.tier.clone(),
                readings: g
                    .readings
                    .iter()
                    .map(|(name, value, unit)| pb::Reading {
                        name: name.clone(),
                        value: *value,
                        unit: unit.clone(),
                    })
                    .collect(),
                pinned: g.pinned.clone().unwrap_or_default(),
                last_actions: g.last_actions.clone(),
                transitions: g.transitions,
                actions_applied: g.actions_applied,
            }),
            warnings: s.engine.warnings.clone(),
            prompt_cache: Some(convert::prompt_cache(&s.engine.prompt_cache)),
            connections: Some(pb::ConnectionCounters {
                open: sat_u32(n.open),
                accepted: n.accepted,
                refused: n.refused,
                over_limit: n.over_limit,
                accept_errors: n.accept_errors,
                max_per_uid: sat_u32(n.max_per_uid),
                max_total: sat_u32(n.max_total),
            }),
        }))
    }

    async fn list_slices(
        &self,
        req: Request<pb::ListSlicesRequest>,
    ) -> Result<Response<pb::ListSlicesResponse>, Status> {
        let slices = self.core.list_slices(&peer(&req));
        Ok(Response::new(pb::ListSlicesResponse {
            slices: slices.into_iter().map(convert::slice).collect(),
        }))
    }

    async fn set_slice(
        &self,
        req: Request<pb::SetSliceRequest>,
    ) -> Result<Response<pb::SetSliceResponse>, Status> {
        let r = req.get_ref();
        let s = self
            .core
            .set_slice(&peer(&req), &r.name, r.force)
            .await
            .map_err(convert::status)?;
        Ok(Response::new(pb::SetSliceResponse {
            slice: Some(convert::slice(s)),
        }))
    }

    async fn cache_prompt(
        &self,
        req: Request<pb::CachePromptRequest>,
    ) -> Result<Response<pb::CachePromptResponse>, Status> {
        let peer = peer(&req);
        let r = req.into_inner();
        let messages = convert::messages(r.messages)?;
        let (core, p2) = (self.core.clone(), peer.clone());
        let ids = tokio::task::spawn_blocking(move || core.cache_prompt_ids(&p2, messages, r.ids))
            .await
            .map_err(blocking_err)?
            .map_err(convert::status)?;
        let p = self
            .core
            .cache_prompt(&peer, ids, r.shared, r.persist)
            .await
            .map_err(convert::status)?;
        Ok(Response::new(pb::CachePromptResponse {
            prompt: Some(convert::cached_prompt(&p)),
        }))
    }

    async fn drop_cached_prompt(
        &self,
        req: Request<pb::DropCachedPromptRequest>,
    ) -> Result<Response<pb::DropCachedPromptResponse>, Status> {
        self.core
            .drop_cached_prompt(&peer(&req), &req.get_ref().key)
            .await
            .map_err(convert::status)?;
        Ok(Response::new(pb::DropCachedPromptResponse {}))
    }

    async fn governor_pin(
        &self,
        req: Request<pb::GovernorPinRequest>,
    ) -> Result<Response<pb::GovernorPinResponse>, Status> {
        let tier = req.get_ref().tier.clone();
        let tier = (!tier.is_empty()).then_some(tier.as_str());
        self.core
            .governor_pin(&peer(&req), tier)
            .map_err(convert::status)?;
        Ok(Response::new(pb::GovernorPinResponse {}))
    }

    async fn shutdown(
        &self,
        req: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        self.core
            .request_shutdown(&peer(&req))
            .map_err(convert::status)?;
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    type PullStream = PullStream;

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<PullStream>, Status> {
        let peer = peer(&req);
        let r = req.into_inner();
        let rx = self
            .core
            .pull(&peer, &r.repo, &r.revision)
            .map_err(convert::status)?;
        Ok(Response::new(PullStream { rx }))
    }

    async fn load_modality(
        &self,
        req: Request<pb::ModalityRequest>,
    ) -> Result<Response<pb::ModalityResponse>, Status> {
        self.set_modality(req, true).await
    }

    async fn unload_modality(
        &self,
        req: Request<pb::ModalityRequest>,
    ) -> Result<Response<pb::ModalityResponse>, Status> {
        self.set_modality(req, false).await
    }
}

impl GemmadService {
    async fn set_modality(
        &self,
        req: Request<pb::ModalityRequest>,
        load: bool,
    ) -> Result<Response<pb::ModalityResponse>, Status> {
        let m = convert::modality(req.get_ref().modality)?;
        let t = self
            .core
            .set_modality(&peer(&req), m, load)
            .await
            .map_err(convert::status)?;
        Ok(Response::new(pb::ModalityResponse {
            tower: Some(convert::tower(&t)),
        }))
    }
}
