//! The transport-neutral service core. Every front end (gRPC now, D-Bus and HTTP next)
//! converts its wire types to [`types`] at its edge and calls the same [`Core`]: one
//! access policy, one validation, one queue, one engine thread, one set of errors.

pub mod access;
pub mod connections;
pub mod engine_thread;
mod error;
pub mod estimate;
pub mod preparing;
pub mod pull;
pub mod queue;
pub mod types;
pub mod validate;

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use gemmad_engine::{Control, GenerateRequest, Modality, Prompt, Prompter, TowerState};
use tokio::sync::mpsc::UnboundedReceiver;

pub use error::ServiceError;

use crate::config::LimitsSection;
use access::Policy;
use connections::{ConnectionGuard, Connections};
use engine_thread::EngineHandle;
use preparing::Preparing;
use queue::Job;
use types::{
    Event, GenerateParams, GovernorSnapshot, ModelInfo, Peer, SliceInfo, StatusSnapshot,
    TokenizeInput,
};

/// The service behind every front end.
pub struct Core {
    engine: EngineHandle,
    prompter: Prompter,
    model: ModelInfo,
    limits: RwLock<LimitsSection>,
    policy: RwLock<Policy>,
    preparing: Preparing,
    connections: Arc<Connections>,
    started: Instant,
    /// The governor's published state and its pin request, once it runs.
    governor: std::sync::OnceLock<Arc<GovernorShared>>,
    /// An admin's Shutdown call, for the serve loop to take like SIGTERM.
    shutdown: tokio::sync::Notify,
    /// Where Pull installs checkpoints (`[model] store`).
    model_store: RwLock<std::path::PathBuf>,
}

/// What the governor loop and the front ends share.
#[derive(Debug, Default)]
pub struct GovernorShared {
    pub snapshot: std::sync::Mutex<GovernorSnapshot>,
    /// A pin (`Some(Some(tier))`), an unpin (`Some(None)`) for the loop to take.
    pub pin: std::sync::Mutex<Option<Option<gemmad_governor::Tier>>>,
}

/// A request that carried at least this many bytes of text and media returns the heap
/// memory its preparation freed to the OS (glibc keeps it otherwise: a 1 MiB prompt
/// left ~100 MiB resident after it was refused).
const TRIM_AFTER_BYTES: usize = 256 << 10;

/// Bytes of text and media in `messages`.
fn payload_bytes(messages: &[types::Message]) -> usize {
    messages
        .iter()
        .flat_map(|m| &m.parts)
        .map(|p| match p {
            types::Part::Text(t) => t.len(),
            types::Part::Image { data, .. } | types::Part::Audio { data, .. } => data.len(),
        })
        .sum()
}

/// Returns freed heap memory to the OS after a request of `bytes` that was big enough
/// for that to matter.
fn trim_after(bytes: usize) {
    if bytes >= TRIM_AFTER_BYTES {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim has no preconditions and only releases free heap memory.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

impl Core {
    pub fn new(
        engine: EngineHandle,
        prompter: Prompter,
        model: ModelInfo,
        limits: LimitsSection,
        policy: Policy,
        per_peer_preparing: usize,
        connections: Arc<Connections>,
    ) -> Self {
        Core {
            engine,
            prompter,
            model,
            limits: RwLock::new(limits),
            policy: RwLock::new(policy),
            preparing: Preparing::new(per_peer_preparing),
            connections,
            started: Instant::now(),
            governor: std::sync::OnceLock::new(),
            shutdown: tokio::sync::Notify::new(),
            model_store: RwLock::new(std::path::PathBuf::from(gemmad_hub::env::SYSTEM_STORE)),
        }
    }

    pub fn model(&self) -> &ModelInfo {
        &self.model
    }

    fn limits(&self) -> LimitsSection {
        self.limits.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// Applies reloaded settings (SIGHUP).
    pub fn reload(&self, limits: LimitsSection, policy: Policy, per_peer_preparing: usize) {
        if let Ok(mut l) = self.limits.write() {
            *l = limits;
        }
        if let Ok(mut p) = self.policy.write() {
            *p = policy;
        }
        self.preparing.set_limit(per_peer_preparing);
    }

    /// A request's counts against the limits, before the front end decodes it further.
    pub fn check_counts(&self, c: &validate::Counts) -> Result<(), ServiceError> {
        validate::counts(c, &self.limits())
    }

    /// Whether `peer` may use the service (and the error to give it if not).
    pub fn authorize(&self, peer: &Peer) -> Result<(), ServiceError> {
        let allowed = self.policy.read().map(|p| p.allows(peer)).unwrap_or(false);
        if allowed {
            return Ok(());
        }
        Err(match peer.uid {
            Some(_) => ServiceError::PermissionDenied(format!(
                "{peer} may not use gemmad: ask the administrator to add this user or one of \
                 its groups to [access] in /etc/gemmad/gemmad.toml (or to the socket's group)"
            )),
            None => ServiceError::PermissionDenied("unidentified connection".into()),
        })
    }

    /// At accept, before any protocol byte: a slot for a connection of `peer`, or `None`
    /// when the access policy refuses the peer or its uid (or the service) is at its
    /// connection cap; the front end then closes the connection at once. Refusals are
    /// counted and logged, rate-limited. Calls on a connection are still checked one by
    /// one ([`Core::authorize`]), so a reload that removes a user refuses their open
    /// connections at the next call.
    pub fn admit(&self, peer: &Peer) -> Option<ConnectionGuard> {
        if self.authorize(peer).is_err() {
            self.connections.refused(peer);
            return None;
        }
        self.connections.open(peer)
    }

    pub fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    /// Checks `params`, prepares its prompt and queues it. Blocking (tokenization):
    /// async front ends call it from a blocking task. `received` is when the front end
    /// got the request (time to first token counts from there).
    pub fn generate(
        &self,
        peer: &Peer,
        params: GenerateParams,
        received: Instant,
    ) -> Result<Submission, ServiceError> {
        tracing::debug!(op = "generate", via = peer.via, peer = %peer, "core call");
        let refused = |e: &ServiceError| {
            tracing::info!(peer = %peer, kind = e.kind(), error = %e, "request refused");
        };
        let permit = self
            .preparing
            .enter(&peer.queue_key())
            .inspect_err(refused)?;
        let bytes = payload_bytes(&params.messages);
        let engine = self.engine.stats().state();
        let slices: Vec<String> = engine.slices.iter().map(|s| s.name.clone()).collect();
        let prepared = validate::prepare(params, &self.prompter, &self.limits(), &slices);
        drop(permit);
        trim_after(bytes);
        let prepared = prepared.inspect_err(refused)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut request = prepared.request;
        self.within_tier(&mut request, &engine);
        // Kept states are per uid; a peer without one (TCP) neither finds nor leaves any.
        request.user = peer.uid;
        request.cache_prompt &= peer.uid.is_some();
        request.cancel = Some(cancel.clone());
        let peer_key = peer.queue_key();
        let job = Job {
            id: 0,
            peer_key: peer_key.clone(),
            class: prepared.class,
            request,
            cancel: cancel.clone(),
            tx,
            received,
            admitted: received,
            generated: Arc::new(AtomicUsize::new(0)),
        };
        let id = self.engine.submit(job).inspect_err(|e| {
            tracing::info!(peer = %peer_key, error = %e, "request not admitted");
        })?;
        tracing::debug!(request_id = id, peer = %peer_key, "request queued");
        Ok(Submission {
            rx,
            engine: self.engine.clone(),
            cancel,
            id,
            done: false,
        })
    }

    /// Token ids of text, or of a conversation as Generate would run it. Blocking.
    pub fn tokenize(&self, peer: &Peer, input: TokenizeInput) -> Result<Vec<u32>, ServiceError> {
        tracing::debug!(op = "tokenize", via = peer.via, peer = %peer, "core call");
        validate::need_tokenizer(&self.prompter)?;
        let _permit = self.preparing.enter(&peer.queue_key())?;
        let limits = self.limits();
        // A text or conversation longer than the context still tokenizes (the caller
        // asked how long it is), up to the most ids Detokenize takes.
        let max_ids = self.max_ids();
        let (bytes, r) = match input {
            TokenizeInput::Text { text, add_special } => {
                if text.len() > limits.max_prompt_bytes {
                    return Err(ServiceError::invalid(format!(
                        "the text is {} bytes; the limit is {} (limits.max_prompt_bytes)",
                        text.len(),
                        limits.max_prompt_bytes
                    )));
                }
                let r = self.prompter.tokenize_within(&text, add_special, max_ids);
                (text.len(), r)
            }
            TokenizeInput::Conversation(msgs) => {
                let bytes = payload_bytes(&msgs);
                let chat = validate::messages(msgs, &limits)?;
                // The template emits <bos>.
                let r = self
                    .prompter
                    .render_chat(&chat, true)
                    .and_then(|text| self.prompter.tokenize_within(&text, false, max_ids));
                (bytes, r)
            }
        };
        trim_after(bytes);
        Ok(r?)
    }

    /// The most ids Tokenize returns and Detokenize takes.
    fn max_ids(&self) -> usize {
        self.context_tokens().max(self.limits().max_tokens) * 4
    }

    /// Text of `ids`. Blocking.
    pub fn detokenize(
        &self,
        peer: &Peer,
        ids: &[u32],
        keep_special: bool,
    ) -> Result<String, ServiceError> {
        tracing::debug!(op = "detokenize", via = peer.via, peer = %peer, "core call");
        validate::need_tokenizer(&self.prompter)?;
        let _permit = self.preparing.enter(&peer.queue_key())?;
        let max = self.max_ids();
        if ids.len() > max {
            return Err(ServiceError::invalid(format!(
                "{} ids is too many (at most {max})",
                ids.len()
            )));
        }
        Ok(self.prompter.detokenize(ids, !keep_special)?)
    }

    pub fn context_tokens(&self) -> usize {
        self.prompter.max_context()
    }

    pub fn status(&self, peer: &Peer) -> StatusSnapshot {
        tracing::debug!(op = "status", via = peer.via, peer = %peer, "core call");
        let mut s = self.snapshot();
        // Pinned prompts' keys are hashes of their text: a user sees only its own and the
        // shared ones (a key is enough to confirm a guess of someone else's prompt).
        if !self.is_admin(peer) {
            s.engine
                .prompt_cache
                .pinned
                .retain(|p| p.owner.shared || (p.owner.user.is_some() && p.owner.user == peer.uid));
        }
        s
    }

    fn is_admin(&self, peer: &Peer) -> bool {
        self.policy
            .read()
            .map(|p| p.is_admin(peer))
            .unwrap_or(false)
    }

    /// The token ids a CachePrompt request pins: `ids` as given, or the conversation
    /// prefix `messages` renders to (see [`Prompter::prefix_ids`]). Blocking
    /// (tokenization).
    pub fn cache_prompt_ids(
        &self,
        peer: &Peer,
        messages: Vec<types::Message>,
        ids: Vec<u32>,
    ) -> Result<Vec<u32>, ServiceError> {
        tracing::debug!(op = "cache_prompt", via = peer.via, peer = %peer, "core call");
        let limits = self.limits();
        let ids = match (messages.is_empty(), ids.is_empty()) {
            (false, true) => {
                validate::need_tokenizer(&self.prompter)?;
                let _permit = self.preparing.enter(&peer.queue_key())?;
                let bytes = payload_bytes(&messages);
                let chat = validate::messages(messages, &limits)?;
                let r = self.prompter.prefix_ids(&chat);
                trim_after(bytes);
                r?
            }
            (true, false) => ids,
            _ => {
                return Err(ServiceError::invalid(
                    "set either messages or ids (not both) for the prompt to cache",
                ))
            }
        };
        // Checked as Generate checks its prompt: inside the vocabulary and the context.
        Ok(self.prompter.prepare(&Prompt::Ids(ids))?.into_ids())
    }

    /// Pins `ids` in the prompt cache for `peer` (or for everyone when `shared`: admins
    /// only), through the engine thread; returns the pinned prompt.
    pub async fn cache_prompt(
        &self,
        peer: &Peer,
        ids: Vec<u32>,
        shared: bool,
        persist: bool,
    ) -> Result<gemmad_engine::PinnedPrompt, ServiceError> {
        if shared && !self.is_admin(peer) {
            return Err(ServiceError::PermissionDenied(format!(
                "{peer} may not share a cached prompt with every user: it takes uid 0,                  gemmad's own user or a member of access.admin_groups"
            )));
        }
        if peer.uid.is_none() && !shared {
            return Err(ServiceError::invalid(
                "a connection without a uid (TCP) has no prompt cache of its own",
            ));
        }
        let n = ids.len();
        let st = self
            .engine
            .control(Control::CachePrompt {
                ids: ids.clone(),
                user: if shared { None } else { peer.uid },
                shared,
                persist,
            })
            .await?;
        let key = gemmad_engine::prompt_key(&st.slice, &ids);
        tracing::info!(peer = %peer, key, tokens = n, shared, persist, "prompt pinned");
        let owner = gemmad_engine::CacheOwner {
            user: if shared { None } else { peer.uid },
            shared,
        };
        st.prompt_cache
            .pinned
            .into_iter()
            .find(|p| p.key == key && p.owner == owner)
            .ok_or_else(|| {
                ServiceError::Internal("the engine reports no such pinned prompt".into())
            })
    }

    /// Unpins and drops `key` (all with an empty key) of `peer`'s pinned prompts, or of
    /// anyone's for an admin.
    pub async fn drop_cached_prompt(&self, peer: &Peer, key: &str) -> Result<(), ServiceError> {
        tracing::debug!(op = "drop_cached_prompt", via = peer.via, peer = %peer, key, "core call");
        if !key.is_empty() && (key.len() != 16 || !key.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(ServiceError::invalid(format!(
                "{:?} is not a cached prompt's key (16 hex digits)",
                key.chars().take(40).collect::<String>()
            )));
        }
        self.engine
            .control(Control::DropCachedPrompt {
                key: key.to_ascii_lowercase(),
                user: peer.uid,
                admin: self.is_admin(peer),
            })
            .await?;
        Ok(())
    }

    /// What Status reports, for the service itself (a front end refreshing its
    /// properties): no peer, no log line.
    pub fn snapshot(&self) -> StatusSnapshot {
        let stats = self.engine.stats();
        let engine = stats.state();
        let mut memory = vec![
            ("process_rss".to_string(), process_rss()),
            ("kv_cache".to_string(), stats.kv_cache_bytes()),
        ];
        // The engine's report by part (decoder, embeddings, PLE, towers, ...), as of its
        // last command or request.
        memory.extend(
            stats
                .memory_parts()
                .into_iter()
                .filter(|(p, _)| p != "kv_cache"),
        );
        let queue = self.engine.queue();
        StatusSnapshot {
            version: env!("CARGO_PKG_VERSION"),
            uptime: self.started.elapsed(),
            model: self.model.clone(),
            engine,
            memory,
            queue: queue.snapshot(),
            requests: queue.counters.snapshot(),
            connections: self.connections.snapshot(),
            governor: self.governor.get().map(|g| {
                g.snapshot
                    .lock()
                    .map(|s| s.clone())
                    .unwrap_or_else(|p| p.into_inner().clone())
            }),
        }
    }

    /// A request's own size is honoured within the governor's tier: while the tier is not
    /// `full`, a slice larger than the one the governor chose runs as the active one.
    fn within_tier(&self, request: &mut GenerateRequest, engine: &gemmad_engine::EngineState) {
        let Some(g) = self.governor.get() else {
            return;
        };
        let tier = g
            .snapshot
            .lock()
            .map(|s| s.tier.clone())
            .unwrap_or_default();
        if tier.is_empty() || tier == "full" {
            return;
        }
        let params = |name: &str| {
            engine
                .slices
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.params)
        };
        if let (Some(want), Some(active)) = (request.slice.as_deref(), params(&engine.slice)) {
            if params(want).is_some_and(|p| p > active) {
                tracing::info!(requested = want, runs = %engine.slice, tier = %tier, "request size capped by the governor's tier");
                request.slice = None;
            }
        }
    }

    /// Hands the front ends the governor's state (once, when the loop starts).
    pub fn attach_governor(&self, g: Arc<GovernorShared>) {
        let _ = self.governor.set(g);
    }

    /// The queue, for the governor's admission switch.
    pub fn queue(&self) -> &Arc<queue::Queue> {
        self.engine.queue()
    }

    /// Applies an engine control command for the service itself (the governor, a config
    /// reload): no peer, no access check.
    pub async fn service_control(
        &self,
        c: Control,
    ) -> Result<gemmad_engine::EngineState, ServiceError> {
        self.engine.control(c).await
    }

    /// The engine's state as last published.
    pub fn engine_state(&self) -> gemmad_engine::EngineState {
        self.engine.stats().state()
    }

    /// Pins the governor to a tier (`None`: unpins). Admins only: uid 0, the daemon's
    /// own uid, or a member of `access.admin_groups`.
    pub fn governor_pin(&self, peer: &Peer, tier: Option<&str>) -> Result<(), ServiceError> {
        tracing::debug!(op = "governor_pin", via = peer.via, peer = %peer, tier = ?tier, "core call");
        if !self.is_admin(peer) {
            return Err(ServiceError::PermissionDenied(format!(
                "{peer} may not pin the governor: it takes uid 0, gemmad's own user or a \
                 member of access.admin_groups"
            )));
        }
        let Some(g) = self.governor.get() else {
            return Err(ServiceError::FailedPrecondition(
                "the governor is not running (governor.enabled = false)".into(),
            ));
        };
        let tier = tier
            .map(str::parse::<gemmad_governor::Tier>)
            .transpose()
            .map_err(|e| ServiceError::invalid(e.to_string()))?;
        if let Ok(mut p) = g.pin.lock() {
            *p = Some(tier);
        }
        Ok(())
    }

    /// Asks the daemon to stop as SIGTERM does. Admins only, like [`Self::governor_pin`].
    pub fn request_shutdown(&self, peer: &Peer) -> Result<(), ServiceError> {
        tracing::debug!(op = "shutdown", via = peer.via, peer = %peer, "core call");
        if !self.is_admin(peer) {
            return Err(ServiceError::PermissionDenied(format!(
                "{peer} may not stop gemmad: it takes uid 0, gemmad's own user or a \
                 member of access.admin_groups (or send the process SIGTERM)"
            )));
        }
        tracing::info!(peer = %peer, "shutdown requested");
        // notify_one keeps the wake-up when the serve loop is not waiting at this moment.
        self.shutdown.notify_one();
        Ok(())
    }

    /// Resolves once an admin has asked for a shutdown.
    pub async fn shutdown_requested(&self) {
        self.shutdown.notified().await;
    }

    pub fn list_slices(&self, peer: &Peer) -> Vec<SliceInfo> {
        tracing::debug!(op = "list_slices", via = peer.via, peer = %peer, "core call");
        self.engine.stats().state().slices
    }

    /// Switches the MatFormer slice through the engine thread: between requests, or
    /// with `force` at the running generation's next step (it re-prefills on the new
    /// slice). Returns the slice active afterwards.
    pub async fn set_slice(
        &self,
        peer: &Peer,
        name: &str,
        force: bool,
    ) -> Result<SliceInfo, ServiceError> {
        tracing::debug!(op = "set_slice", via = peer.via, peer = %peer, slice = name, force, "core call");
        let st = self
            .engine
            .control(Control::SetSlice {
                name: name.to_string(),
                force,
            })
            .await?;
        st.slices
            .into_iter()
            .find(|s| s.active)
            .ok_or_else(|| ServiceError::Internal("the engine reports no active slice".into()))
    }

    /// Loads (`load`) or unloads a tower through the engine thread; returns its state
    /// afterwards.
    pub async fn set_modality(
        &self,
        peer: &Peer,
        m: Modality,
        load: bool,
    ) -> Result<TowerState, ServiceError> {
        let (op, c) = if load {
            ("load_modality", Control::LoadTower(m))
        } else {
            ("unload_modality", Control::UnloadTower(m))
        };
        tracing::debug!(op, via = peer.via, peer = %peer, modality = %m, "core call");
        let st = self.engine.control(c).await?;
        st.towers
            .into_iter()
            .find(|t| t.modality == m)
            .ok_or_else(|| ServiceError::Internal(format!("the engine reports no {m} tower")))
    }
}

/// The events of one queued request. Dropping it before the last event (the client went
/// away) cancels the request.
pub struct Submission {
    rx: UnboundedReceiver<Event>,
    engine: EngineHandle,
    cancel: Arc<AtomicBool>,
    id: u64,
    done: bool,
}

impl Submission {
    /// The request's id in the queue.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event, or `None` after the last.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let e = std::task::ready!(self.rx.poll_recv(cx));
        Poll::Ready(self.seen(e))
    }

    /// An event that is already waiting, without blocking.
    pub fn try_event(&mut self) -> Option<Event> {
        let e = self.rx.try_recv().ok()?;
        self.seen(Some(e))
    }

    /// Notes the end of the stream: the last event, or the channel closing.
    fn seen(&mut self, e: Option<Event>) -> Option<Event> {
        if matches!(e, None | Some(Event::Finished(_) | Event::Failed(_))) {
            self.done = true;
        }
        e
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        if !self.done {
            self.engine.cancel(self.id, &self.cancel);
            tracing::debug!(request_id = self.id, "client went away; request cancelled");
        }
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
