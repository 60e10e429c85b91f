//! gemmad-client: a typed async client for gemmad, over its gRPC API on the Unix socket
//! ([`Client`]) or its D-Bus API on the system or session bus ([`dbus::DbusClient`],
//! docs/dbus.md). Both have the same methods and return the same `pb` types and
//! [`ClientError`]s; gemmad's D-Bus errors arrive as the gRPC statuses its gRPC API gives for
//! the same failures.
//!
//! ```no_run
//! # async fn demo() -> Result<(), gemmad_client::ClientError> {
//! let mut c = gemmad_client::Client::connect(gemmad_client::default_socket()).await?;
//! let out = c.generate_text(gemmad_client::user_prompt("Hello!")).await?;
//! println!("{}", out.text);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use gemmad_proto::v1 as pb;
use hyper_util::rt::TokioIo;
use pb::gemmad_client::GemmadClient;
use pb::generate_response::Event;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
pub use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub mod dbus;

/// The socket a system gemmad listens on.
pub const DEFAULT_SOCKET: &str = "/run/gemmad/gemmad.sock";

/// `$GEMMAD_SOCKET`, or the system socket.
pub fn default_socket() -> PathBuf {
    std::env::var_os("GEMMAD_SOCKET")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Largest message the client sends or accepts (images and audio included).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no gemmad socket at {0} (is gemmad running? try `systemctl status gemmad`, or pass --socket / set GEMMAD_SOCKET)")]
    NoSocket(PathBuf),
    #[error("gemmad is not accepting connections on {0} (is gemmad running? try `systemctl status gemmad`)")]
    Refused(PathBuf),
    #[error("permission denied on {0} (is this user in the socket's group? see `ls -l {0}`)")]
    SocketPermission(PathBuf),
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "gemmad on {path} closed the connection without serving it: is this user allowed \
             by [access] in the daemon's config, and under its connection limit? The daemon's \
             log says which ({source})"
    )]
    Transport {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{}", describe(.0))]
    Rpc(Status),
    #[error("the stream ended without a Finished message")]
    Truncated,
    /// The bus cannot be reached, gemmad is not on it, or the connection failed.
    #[error("D-Bus ({bus}): {reason}")]
    Bus { bus: String, reason: String },
    /// A D-Bus reply or signal that is not as docs/dbus.md has it.
    #[error("gemmad's D-Bus reply ({what}) is not as expected: {reason} (are gemmad and this client the same version?)")]
    BadReply { what: String, reason: String },
    /// A request that gemmad's D-Bus API cannot express; its gRPC API can.
    #[error("cannot send this request over D-Bus: {0} (gemmad's socket takes it)")]
    NotOnDbus(String),
}

impl From<Status> for ClientError {
    /// A call on a connection the daemon closed fails in tonic as UNKNOWN "transport
    /// error", as CANCELLED (hyper's "operation was canceled" when the close comes while
    /// the request is being dispatched), or as UNAVAILABLE, depending on when the close
    /// is seen; all read as UNAVAILABLE with the likely reasons. (gemmad never sends
    /// CANCELLED itself: one with a transport error behind it is the connection.)
    fn from(s: Status) -> Self {
        let transport = std::error::Error::source(&s).is_some();
        if (s.code() == Code::Unknown && s.message() == "transport error")
            || (s.code() == Code::Cancelled && transport)
        {
            let why = std::error::Error::source(&s).map_or(String::new(), |e| format!(" ({e})"));
            return ClientError::Rpc(Status::unavailable(format!(
                "gemmad closed the connection without serving it: is this user allowed by \
                 [access] in the daemon's config, and under its connection limit? The \
                 daemon's log says which{why}"
            )));
        }
        ClientError::Rpc(s)
    }
}

impl ClientError {
    /// The gRPC status, when the daemon answered with one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Rpc(s) => Some(s),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }
}

/// A status as a person reads it: what went wrong and what to do.
pub fn describe(s: &Status) -> String {
    let what = match s.code() {
        Code::InvalidArgument => "invalid request",
        Code::FailedPrecondition => "not available",
        Code::ResourceExhausted => "gemmad is busy",
        Code::PermissionDenied => "permission denied",
        Code::Unavailable => "gemmad is unavailable",
        Code::Cancelled => "cancelled",
        Code::DeadlineExceeded => "timed out",
        Code::Unimplemented => "not supported by this gemmad",
        Code::NotFound => "not found",
        Code::DataLoss => "download failed verification",
        Code::Aborted => "busy",
        _ => "gemmad error",
    };
    // The daemon's messages often start with the same words; say them once.
    let mut m = if s.message().starts_with(what) {
        s.message().to_string()
    } else {
        format!("{what}: {}", s.message())
    };
    if let Some(ms) = s
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
    {
        if !m.contains("retry") {
            m.push_str(&format!(" (retry in {ms} ms)"));
        }
    }
    m
}

/// A connection to gemmad.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    rpc: GemmadClient<Channel>,
    health: HealthClient<Channel>,
    socket: PathBuf,
}

async fn dial(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ClientError::NoSocket(path.to_path_buf()),
        std::io::ErrorKind::ConnectionRefused => ClientError::Refused(path.to_path_buf()),
        std::io::ErrorKind::PermissionDenied => ClientError::SocketPermission(path.to_path_buf()),
        _ => ClientError::Connect {
            path: path.to_path_buf(),
            source: e,
        },
    })
}

impl Client {
    /// Connects to the daemon's Unix socket. Errors say whether the socket is missing,
    /// refused or not permitted.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = socket.as_ref().to_path_buf();
        // Dial once here for a precise error; the channel uses this first connection and
        // dials again only to reconnect.
        let first = Arc::new(Mutex::new(Some(dial(&path).await?)));
        let p = path.clone();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let (first, p) = (first.clone(), p.clone());
            async move {
                let ready = first.lock().map(|mut g| g.take()).unwrap_or(None);
                let s = match ready {
                    Some(s) => s,
                    None => UnixStream::connect(&p).await?,
                };
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        });
        // The URI is required by the API and unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://gemmad.sock")
            .connect_with_connector(connector)
            .await
            .map_err(|e| ClientError::Transport {
                path: path.clone(),
                source: e,
            })?;
        Ok(Client::from_channel(channel, path))
    }

    /// Wraps an existing channel (e.g. TCP to a board).
    pub fn from_channel(channel: Channel, label: PathBuf) -> Client {
        Client {
            channel: channel.clone(),
            rpc: GemmadClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            health: HealthClient::new(channel),
            socket: label,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The underlying channel (e.g. for the reflection service or a custom codec).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The generated client, for anything this wrapper does not cover.
    pub fn raw(&mut self) -> &mut GemmadClient<Channel> {
        &mut self.rpc
    }

    /// Starts a generation; the stream yields Queued, Started, Delta... Finished. Dropping
    /// the stream cancels the request.
    pub async fn generate(
        &mut self,
        req: pb::GenerateRequest,
    ) -> Result<Streaming<pb::GenerateResponse>, ClientError> {
        Ok(self.rpc.generate(req).await?.into_inner())
    }

    /// Runs a generation to the end, calling `on_text` for each delta's text.
    pub async fn generate_with(
        &mut self,
        req: pb::GenerateRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, ClientError> {
        let mut s = self.generate(req).await?;
        let mut out = Generation::default();
        while let Some(msg) = s.message().await? {
            if collect_event(&mut out, msg, &mut on_text) {
                return Ok(out);
            }
        }
        Err(ClientError::Truncated)
    }

    /// Runs a generation to the end.
    pub async fn generate_text(
        &mut self,
        req: pb::GenerateRequest,
    ) -> Result<Generation, ClientError> {
        self.generate_with(req, |_| {}).await
    }

    pub async fn tokenize(
        &mut self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<pb::TokenizeResponse, ClientError> {
        let req = pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Text(text.into())),
            add_special_tokens,
        };
        Ok(self.rpc.tokenize(req).await?.into_inner())
    }

    pub async fn tokenize_chat(
        &mut self,
        messages: Vec<pb::Message>,
    ) -> Result<pb::TokenizeResponse, ClientError> {
        let req = pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Conversation(
                pb::Conversation { messages },
            )),
            add_special_tokens: false,
        };
        Ok(self.rpc.tokenize(req).await?.into_inner())
    }

    pub async fn detokenize(&mut self, ids: Vec<u32>) -> Result<String, ClientError> {
        let req = pb::DetokenizeRequest {
            ids,
            keep_special_tokens: false,
        };
        Ok(self.rpc.detokenize(req).await?.into_inner().text)
    }

    pub async fn status(&mut self) -> Result<pb::StatusResponse, ClientError> {
        Ok(self.rpc.status(pb::StatusRequest {}).await?.into_inner())
    }

    pub async fn list_slices(&mut self) -> Result<Vec<pb::Slice>, ClientError> {
        Ok(self
            .rpc
            .list_slices(pb::ListSlicesRequest {})
            .await?
            .into_inner()
            .slices)
    }

    /// Makes `name` the active slice (`force`: also the running generation's, which
    /// re-prefills); returns the slice active afterwards.
    pub async fn set_slice(&mut self, name: &str, force: bool) -> Result<pb::Slice, ClientError> {
        let r = self
            .rpc
            .set_slice(pb::SetSliceRequest {
                name: name.to_string(),
                force,
            })
            .await?;
        Ok(r.into_inner().slice.unwrap_or_default())
    }

    /// Pins the governor to `tier`, or unpins it (`None`).
    pub async fn governor_pin(&mut self, tier: Option<&str>) -> Result<(), ClientError> {
        self.rpc
            .governor_pin(pb::GovernorPinRequest {
                tier: tier.unwrap_or("").to_string(),
            })
            .await?;
        Ok(())
    }

    /// Asks the daemon to stop (admins only); it answers before it begins.
    pub async fn shutdown(&mut self) -> Result<(), ClientError> {
        self.rpc.shutdown(pb::ShutdownRequest {}).await?;
        Ok(())
    }

    /// Pins a prompt prefix in the daemon's prompt cache; returns it as pinned.
    pub async fn cache_prompt(
        &mut self,
        req: pb::CachePromptRequest,
    ) -> Result<pb::CachedPrompt, ClientError> {
        let r = self.rpc.cache_prompt(req).await?;
        Ok(r.into_inner().prompt.unwrap_or_default())
    }

    /// Unpins and drops the cached prompt `key` (all of the caller's when empty).
    pub async fn drop_cached_prompt(&mut self, key: &str) -> Result<(), ClientError> {
        self.rpc
            .drop_cached_prompt(pb::DropCachedPromptRequest {
                key: key.to_string(),
            })
            .await?;
        Ok(())
    }

    /// Asks the daemon to pull `repo` (`org/name`) at `revision` ("" = main) from the
    /// Hugging Face Hub into its model store (admins); the stream yields progress and
    /// ends with a message whose `installed_dir` is set. Dropping it cancels the pull.
    pub async fn pull(
        &mut self,
        repo: &str,
        revision: &str,
    ) -> Result<Streaming<pb::PullProgress>, ClientError> {
        let req = pb::PullRequest {
            repo: repo.to_string(),
            revision: revision.to_string(),
        };
        Ok(self.rpc.pull(req).await?.into_inner())
    }

    /// Runs a pull to the end, calling `on_progress` for each message; returns the last
    /// (the installed one).
    pub async fn pull_with(
        &mut self,
        repo: &str,
        revision: &str,
        mut on_progress: impl FnMut(&pb::PullProgress),
    ) -> Result<pb::PullProgress, ClientError> {
        let mut s = self.pull(repo, revision).await?;
        while let Some(msg) = s.message().await? {
            on_progress(&msg);
            if !msg.installed_dir.is_empty() {
                return Ok(msg);
            }
        }
        Err(ClientError::Truncated)
    }

    pub async fn load_modality(&mut self, m: pb::Modality) -> Result<pb::Tower, ClientError> {
        let r = self
            .rpc
            .load_modality(pb::ModalityRequest { modality: m as i32 })
            .await?;
        Ok(r.into_inner().tower.unwrap_or_default())
    }

    pub async fn unload_modality(&mut self, m: pb::Modality) -> Result<pb::Tower, ClientError> {
        let r = self
            .rpc
            .unload_modality(pb::ModalityRequest { modality: m as i32 })
            .await?;
        Ok(r.into_inner().tower.unwrap_or_default())
    }

    /// The standard gRPC health check ("" = the whole server).
    pub async fn health(&mut self, service: &str) -> Result<ServingStatus, ClientError> {
        let r = self
            .health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await?;
        Ok(ServingStatus::try_from(r.into_inner().status).unwrap_or(ServingStatus::Unknown))
    }
}

/// A finished generation, collected.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    pub request_id: u64,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub started: Option<pb::Started>,
    pub finished: Option<pb::Finished>,
}

/// Adds one event to `out`, passing a delta's text to `on_text`; true at Finished.
fn collect_event(
    out: &mut Generation,
    msg: pb::GenerateResponse,
    on_text: &mut impl FnMut(&str),
) -> bool {
    match msg.event {
        Some(Event::Queued(q)) => out.request_id = q.request_id,
        Some(Event::Started(st)) => out.started = Some(st),
        Some(Event::Delta(d)) => {
            on_text(&d.text);
            out.text.push_str(&d.text);
            out.token_ids.extend(d.token_ids);
        }
        Some(Event::Finished(f)) => {
            out.finished = Some(f);
            return true;
        }
        None => {}
    }
    false
}

/// A one-message text part.
pub fn text_part(t: &str) -> pb::Part {
    pb::Part {
        kind: Some(pb::part::Kind::Text(t.into())),
    }
}

pub fn message(role: &str, parts: Vec<pb::Part>) -> pb::Message {
    pb::Message {
        role: role.into(),
        parts,
    }
}

/// A request with one user message of text and the server's defaults otherwise.
pub fn user_prompt(prompt: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        messages: vec![message("user", vec![text_part(prompt)])],
        ..Default::default()
    }
}

/// Image bytes as a part (the daemon detects PNG/JPEG).
pub fn image_part(data: Vec<u8>) -> pb::Part {
    pb::Part {
        kind: Some(pb::part::Kind::Image(pb::Image {
            data,
            mime_type: String::new(),
        })),
    }
}

/// WAV bytes as a part.
pub fn wav_part(data: Vec<u8>) -> pb::Part {
    pb::Part {
        kind: Some(pb::part::Kind::Audio(pb::Audio {
            data,
            format: pb::AudioFormat::Wav as i32,
            ..Default::default()
        })),
    }
}

pub fn finish_reason_str(r: i32) -> &'static str {
    match pb::FinishReason::try_from(r) {
        Ok(pb::FinishReason::Eos) => "eos",
        Ok(pb::FinishReason::Stop) => "stop",
        Ok(pb::FinishReason::Length) => "length",
        Ok(pb::FinishReason::ContextFull) => "context_full",
        _ => "unspecified",
    }
}
