//! The service's own vocabulary, shared by every front end: who calls, what a Generate
//! asks for, what it streams back, and what Status shows. Plain Rust types; each
//! transport converts to and from them at its edge.

use std::path::PathBuf;
use std::time::Duration;

use gemmad_engine::{EngineState, FinishReason};

/// Who is calling, as the transport identified them: Unix peer credentials
/// (SO_PEERCRED) or the D-Bus caller's uid and pid. A TCP peer has no credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: Option<u32>,
    /// The primary gid first, then the supplementary groups.
    pub gids: Vec<u32>,
    pub pid: Option<i32>,
    /// The remote address of a TCP peer.
    pub tcp: Option<std::net::SocketAddr>,
    /// The front end it came through (`grpc`, `dbus`), for logs.
    pub via: &'static str,
}

impl Peer {
    /// The key of per-peer queue limits.
    pub fn queue_key(&self) -> String {
        match (self.uid, self.tcp) {
            (Some(uid), _) => format!("uid:{uid}"),
            (None, Some(a)) => format!("tcp:{}", a.ip()),
            (None, None) => "unknown".into(),
        }
    }

    /// A peer whose credentials could not be read.
    pub fn unknown(via: &'static str) -> Self {
        Peer {
            uid: None,
            gids: Vec::new(),
            pid: None,
            tcp: None,
            via,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.uid, self.tcp) {
            (Some(uid), _) => {
                write!(f, "uid={uid}")?;
                if let Some(g) = self.gids.first() {
                    write!(f, " gid={g}")?;
                }
                if let Some(p) = self.pid {
                    write!(f, " pid={p}")?;
                }
                Ok(())
            }
            (None, Some(a)) => write!(f, "tcp {a}"),
            (None, None) => f.write_str("unknown peer"),
        }
    }
}

/// Where a request waits: interactive ahead of background, FIFO within each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Priority {
    #[default]
    Interactive,
    Background,
}

/// Encoding of an audio part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AudioFormat {
    /// A WAV file (the header says the rest).
    Wav,
    /// Raw little-endian samples with the given rate and channels.
    PcmS16le,
    PcmF32le,
}

/// One part of a message.
#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    Text(String),
    Image {
        data: Vec<u8>,
        /// Empty when the caller did not say.
        mime_type: String,
    },
    Audio {
        data: Vec<u8>,
        format: AudioFormat,
        sample_rate_hz: u32,
        channels: u32,
    },
}

/// One chat message.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: String,
    pub parts: Vec<Part>,
}

/// Sampling settings; `None` keeps the engine's default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
}

/// A Generate request as every front end hands it to the core.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerateParams {
    pub messages: Vec<Message>,
    pub sampling: Sampling,
    /// 0 = the configured default.
    pub max_tokens: u32,
    pub stop: Vec<String>,
    /// Model size: empty or `auto`, or a slice name.
    pub size: String,
    pub priority: Priority,
    pub ignore_eos: bool,
    /// The one user message's text runs as given: tokenized with its own `<bos>`, no
    /// chat template.
    pub raw: bool,
    /// Neither resume from nor keep states in the prompt cache (default: use it).
    pub no_prompt_cache: bool,
}

/// Timings of one finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RequestTimings {
    pub queue_wait: Duration,
    /// From the request's arrival at the front end to its first token.
    pub time_to_first_token: Duration,
    pub prefill: Duration,
    pub prefill_tokens_per_s: f64,
    pub decode: Duration,
    pub decode_tokens_per_s: f64,
}

/// The last event of a request that ran to its end.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    /// Never `Cancelled`: a cancelled request ends without this event.
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Of `prompt_tokens`, those resumed from the prompt cache.
    pub cached_tokens: usize,
    pub timings: RequestTimings,
    pub active_slice: String,
}

/// What a request streams back, in order: `Queued`, `Started`, `Delta`s, then
/// `Finished` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Queued {
        request_id: u64,
        position: usize,
    },
    Started {
        request_id: u64,
        run_seq: u64,
        queue_wait: Duration,
        active_slice: String,
    },
    Delta {
        text: String,
        ids: Vec<u32>,
    },
    Finished(Finished),
    Failed(super::ServiceError),
}

/// What Tokenize takes.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizeInput {
    Text {
        text: String,
        add_special: bool,
    },
    /// A conversation, rendered as Generate renders it.
    Conversation(Vec<Message>),
}

/// The loaded model, as Status shows it.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub dir: PathBuf,
    pub model_type: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub ffn_widths: Vec<usize>,
}

/// A model size on offer: the engine's own description.
pub use gemmad_engine::SliceInfo;

/// The queue as Status shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub waiting_interactive: usize,
    pub waiting_background: usize,
    pub running: bool,
    pub depth: usize,
    pub per_peer: usize,
}

/// Request totals since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub admitted: u64,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    pub rejected: u64,
}

/// Connections of every front end, as Status shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionSnapshot {
    /// Open now.
    pub open: usize,
    /// Totals since start: taken, closed at accept by the access policy, closed at
    /// accept for being over a cap, and failed accepts (such as EMFILE).
    pub accepted: u64,
    pub refused: u64,
    pub over_limit: u64,
    pub accept_errors: u64,
    /// The caps in force.
    pub max_per_uid: usize,
    pub max_total: usize,
}

/// Everything Status reports, from the core's point of view.
#[derive(Clone, Debug)]
pub struct StatusSnapshot {
    pub version: &'static str,
    pub uptime: Duration,
    pub model: ModelInfo,
    /// The engine as of its last command or request (its `slice` is the active one).
    pub engine: EngineState,
    /// Bytes in RAM by part (the engine's report plus the process's).
    pub memory: Vec<(String, u64)>,
    pub queue: QueueSnapshot,
    pub requests: CounterSnapshot,
    pub connections: ConnectionSnapshot,
    /// The governor's state, when it runs.
    pub governor: Option<GovernorSnapshot>,
}

/// What the governor is doing, as Status shows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GovernorSnapshot {
    pub tier: String,
    /// The tier an admin pinned, if any.
    pub pinned: Option<String>,
    /// The last readings: (name, value, unit).
    pub readings: Vec<(String, f64, String)>,
    /// The most recent actions applied, newest last, with their reasons.
    pub last_actions: Vec<String>,
    pub transitions: u64,
    pub actions_applied: u64,
}
