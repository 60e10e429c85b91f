//! The OpenAI-compatible HTTP front end (axum over hyper, HTTP/1.1): `POST
//! /v1/chat/completions` (JSON or server-sent events), `GET /v1/models` and `GET
//! /v1/models/{id}`, on its own Unix socket and optionally on a loopback TCP port with an
//! API key. It converts at the edge ([`convert`]) and decides nothing the core decides:
//! the same access policy (peer credentials, checked at accept and on every request),
//! validation, queue and limits as gRPC. See docs/http.md.

pub mod convert;
pub mod listen;

use std::convert::Infallible;
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use axum::body::Body;
use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio_stream::Stream;

use crate::core::types::{Event, Finished};
use crate::core::{Core, Submission};
use crate::grpc::listen::SocketFile;
use convert::{ApiError, Meta, Models};
use listen::{HttpListener, HttpPeer, Socket};

/// What every handler shares.
struct App {
    core: Arc<Core>,
    /// The bearer token TCP peers must send; Unix peers are identified by their
    /// credentials instead.
    api_key: Option<Vec<u8>>,
    /// The model's own name (its folder's name): a model id besides the slices.
    model_name: String,
    /// `created` of the model objects: when the daemon started.
    created: u64,
    /// Largest request body.
    body_limit: usize,
}

type Shared = State<Arc<App>>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The model's name: the checkpoint folder's name (`gemma-3n-E2B-it`).
fn model_name(dir: &Path) -> String {
    dir.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("gemma-3n")
        .to_string()
}

impl App {
    /// The per-request checks: the API key for TCP peers, then the access policy (a
    /// reload that removed a user refuses their open connections' next request).
    fn check(&self, peer: &HttpPeer, headers: &HeaderMap) -> Result<(), ApiError> {
        if peer.0.tcp.is_some() {
            let Some(key) = &self.api_key else {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_error",
                    "TCP clients need an API key, and none is configured",
                ));
            };
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    let (scheme, token) = v.trim().split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .unwrap_or("");
            if !listen::same_key(given.as_bytes(), key) {
                tracing::info!(peer = %peer.0, "http request refused: missing or wrong API key");
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "Incorrect API key provided: send it as `Authorization: Bearer <key>` \
                     (http.api_key of gemmad's config)",
                )
                .code("invalid_api_key"));
            }
        }
        self.core.authorize(&peer.0).map_err(ApiError::from)
    }

    fn models(&self, peer: &HttpPeer) -> Vec<crate::core::types::SliceInfo> {
        self.core.list_slices(&peer.0)
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint: gemmad serves POST /v1/chat/completions, GET /v1/models and GET \
         /v1/models/{id}",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method not allowed on this endpoint",
    )
}

async fn list_models(
    State(app): Shared,
    ConnectInfo(peer): ConnectInfo<HttpPeer>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    app.check(&peer, &headers)?;
    let slices = app.models(&peer);
    let m = Models {
        name: &app.model_name,
        slices: &slices,
    };
    let data: Vec<Value> = m
        .ids()
        .iter()
        .map(|id| convert::model(id, app.created))
        .collect();
    Ok(convert::json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data}),
    ))
}

async fn get_model(
    State(app): Shared,
    ConnectInfo(peer): ConnectInfo<HttpPeer>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    app.check(&peer, &headers)?;
    let slices = app.models(&peer);
    let m = Models {
        name: &app.model_name,
        slices: &slices,
    };
    if m.size_of(&id).is_none() {
        return Err(ApiError::model_not_found(&id, &m.ids()));
    }
    Ok(convert::json_response(
        StatusCode::OK,
        &convert::model(&id, app.created),
    ))
}

async fn chat(
    State(app): Shared,
    ConnectInfo(peer): ConnectInfo<HttpPeer>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    app.check(&peer, &headers)?;
    let body = axum::body::to_bytes(body, app.body_limit)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "the request body could not be read or is over {} bytes: {e}",
                    app.body_limit
                ),
            )
        })?;
    let slices = app.models(&peer);
    let call = convert::chat_request(
        &body,
        &Models {
            name: &app.model_name,
            slices: &slices,
        },
    )
    .inspect_err(|e| tracing::info!(peer = %peer.0, error = %e.message, "http request refused"))?;
    drop(body);
    let core = app.core.clone();
    let p = peer.0.clone();
    let params = call.params;
    let sub = tokio::task::spawn_blocking(move || core.generate(&p, params, received))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("request handler failed: {e}"),
            )
        })?
        .map_err(ApiError::from)?;
    let created = now_secs();
    let meta = Meta {
        id: format!("chatcmpl-{created:x}-{}", sub.id()),
        created,
        model: call.model,
    };
    if call.stream {
        let stream = ChunkStream {
            sub,
            meta,
            include_usage: call.include_usage,
            phase: Phase::Role,
            pending: None,
        };
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response());
    }
    complete(sub, meta).await
}

/// A non-streaming completion: the whole text, then the response. If the client goes
/// away first, the handler is dropped with its submission, which cancels the request.
async fn complete(mut sub: Submission, meta: Meta) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match std::future::poll_fn(|cx| sub.poll_event(cx)).await {
            Some(Event::Delta { text: t, .. }) => text.push_str(&t),
            Some(Event::Finished(f)) => {
                return Ok(convert::json_response(
                    StatusCode::OK,
                    &convert::completion(&meta, text, &f),
                ))
            }
            Some(Event::Failed(e)) => return Err(e.into()),
            Some(Event::Queued { .. } | Event::Started { .. }) => {}
            None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "the request ended without a result",
                ))
            }
        }
    }
}

/// Where a stream is.
enum Phase {
    /// The first chunk, `{"role": "assistant", "content": ""}`, is next.
    Role,
    /// Content chunks, until the finish chunk.
    Body,
    /// The usage chunk (`stream_options.include_usage`) is next.
    Usage(Box<Finished>),
    /// `[DONE]` is next.
    Done,
    End,
}

/// The server-sent events of one streamed completion. Dropping it (the client went
/// away) drops the submission, which cancels the request in the core.
struct ChunkStream {
    sub: Submission,
    meta: Meta,
    include_usage: bool,
    phase: Phase,
    pending: Option<Event>,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(v).unwrap_or_else(|_| "{}".into()))
}

impl Stream for ChunkStream {
    type Item = Result<SseEvent, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match std::mem::replace(&mut this.phase, Phase::End) {
                Phase::Role => {
                    this.phase = Phase::Body;
                    let delta = json!({"role": "assistant", "content": ""});
                    return Poll::Ready(Some(Ok(data(&convert::chunk(&this.meta, delta, None)))));
                }
                Phase::Usage(f) => {
                    this.phase = Phase::Done;
                    return Poll::Ready(Some(Ok(data(&convert::usage_chunk(&this.meta, &f)))));
                }
                Phase::Done => return Poll::Ready(Some(Ok(SseEvent::default().data("[DONE]")))),
                Phase::End => return Poll::Ready(None),
                Phase::Body => {}
            }
            this.phase = Phase::Body;
            let ev = match this.pending.take() {
                Some(e) => Some(e),
                None => match this.sub.poll_event(cx) {
                    Poll::Ready(e) => e,
                    Poll::Pending => return Poll::Pending,
                },
            };
            match ev {
                Some(Event::Queued { .. } | Event::Started { .. }) => continue,
                Some(Event::Delta { mut text, .. }) => {
                    // Deltas already waiting go out as one chunk.
                    while let Some(next) = this.sub.try_event() {
                        match next {
                            Event::Delta { text: t, .. } => text.push_str(&t),
                            other => {
                                this.pending = Some(other);
                                break;
                            }
                        }
                    }
                    if text.is_empty() {
                        continue;
                    }
                    let delta = json!({ "content": text });
                    return Poll::Ready(Some(Ok(data(&convert::chunk(&this.meta, delta, None)))));
                }
                Some(Event::Finished(f)) => {
                    let reason = convert::finish_reason(f.reason);
                    this.phase = if this.include_usage {
                        Phase::Usage(Box::new(f))
                    } else {
                        Phase::Done
                    };
                    let last = convert::chunk(&this.meta, json!({}), Some(reason));
                    return Poll::Ready(Some(Ok(data(&last))));
                }
                Some(Event::Failed(e)) => {
                    // The status line is sent; the error goes as the stream's last event.
                    this.phase = Phase::End;
                    let e = ApiError::from(e);
                    return Poll::Ready(Some(Ok(data(&e.body()))));
                }
                None => {
                    this.phase = Phase::End;
                    let e = ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "the request ended without a result",
                    );
                    return Poll::Ready(Some(Ok(data(&e.body()))));
                }
            }
        }
    }
}

/// The HTTP front end while it serves.
pub struct HttpServer {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    socket_file: SocketFile,
    pub socket: PathBuf,
}

/// Where the HTTP front end listens and how, from the config.
pub struct HttpSetup {
    pub socket: PathBuf,
    pub mode: u32,
    pub gid: u32,
    pub tcp_listen: String,
    pub api_key: Option<Vec<u8>>,
    pub body_limit: usize,
}

/// Binds the HTTP socket (and the TCP listener) and serves them until [`HttpServer::stop`].
pub async fn start(core: Arc<Core>, s: HttpSetup) -> Result<HttpServer> {
    let (unix, socket_file) = crate::grpc::listen::bind_unix(&s.socket, s.mode, s.gid)
        .context("the HTTP socket (http.socket)")?;
    let tcp = if s.tcp_listen.is_empty() {
        None
    } else {
        let t = tokio::net::TcpListener::bind(&s.tcp_listen)
            .await
            .with_context(|| format!("cannot listen on tcp {} (http.tcp_listen)", s.tcp_listen));
        // On an error `socket_file` is dropped, which removes the socket.
        Some(t?)
    };
    let app = Arc::new(App {
        model_name: model_name(&core.model().dir),
        core: core.clone(),
        api_key: s.api_key,
        created: now_secs(),
        body_limit: s.body_limit,
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serve = |socket: Socket| {
        let mut stopped = stopped.clone();
        let make = router(app.clone()).into_make_service_with_connect_info::<HttpPeer>();
        tokio::spawn(
            axum::serve(HttpListener::new(socket, core.clone()), make)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .into_future(),
        )
    };
    let mut tasks = vec![serve(Socket::Unix(unix))];
    if let Some(t) = tcp {
        let addr = t.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(tcp = %addr, "HTTP API on loopback TCP (API key required)");
        tasks.push(serve(Socket::Tcp(t)));
    }
    tracing::info!(socket = %s.socket.display(), "HTTP API (OpenAI-compatible) serving");
    Ok(HttpServer {
        stop,
        tasks,
        socket_file,
        socket: s.socket,
    })
}

impl HttpServer {
    /// Stops accepting, lets open requests finish (up to `wait`), and removes the socket.
    pub async fn stop(self, wait: Duration) {
        let _ = self.stop.send(true);
        let all = futures_join(self.tasks);
        if tokio::time::timeout(wait, all).await.is_err() {
            tracing::warn!(
                "HTTP connections did not close within {} s of shutdown; leaving them",
                wait.as_secs_f64()
            );
        }
        // Connections are over: the socket goes now.
        drop(self.socket_file);
    }
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>) {
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server"),
            Err(e) => tracing::warn!(error = %e, "HTTP server task"),
        }
    }
}
