//! The D-Bus front end: `org.gemmad.Gemmad1` (docs/dbus.md) over the service core, with
//! zbus. Every method asks the core's access policy with the caller's credentials from
//! the bus, converts at the edge ([`convert`]) and decides nothing the core decides.

pub mod callers;
pub mod convert;
pub mod request;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use zbus::message::Header;
use zbus::names::{InterfaceName, UniqueName};
use zbus::object_server::SignalEmitter;
use zbus::{interface, OwnedObjectPath, OwnedVariant, Variant};

use crate::config::DbusBus;
use crate::core::types::{Peer, TokenizeInput};
use crate::core::Core;
use callers::Callers;
use convert::{Dict, Error};

pub const NAME: &str = "org.gemmad.Gemmad1";
pub const PATH: &str = "/org/gemmad/Gemmad1";
pub const INTERFACE: &str = "org.gemmad.Gemmad1";
pub const REQUEST_PREFIX: &str = "/org/gemmad/Gemmad1/request";

/// How often the properties are compared with the service's state.
const REFRESH: Duration = Duration::from_millis(250);
/// `Memory` changes at most this often, and only by at least [`MEMORY_STEP`] in a part.
const MEMORY_EVERY: Duration = Duration::from_secs(1);
const MEMORY_STEP: u64 = 1 << 20;
/// `Readings` changes at most this often (the tier itself at once).
const READINGS_EVERY: Duration = Duration::from_secs(5);

/// The properties as last published.
#[derive(Clone, Debug, Default, PartialEq)]
struct Props {
    active_slice: String,
    loaded: Vec<String>,
    queue_depth: u32,
    memory: HashMap<String, u64>,
    tier: String,
    readings: Vec<(String, f64, String)>,
}

impl Props {
    fn of(core: &Core) -> Props {
        let s = core.snapshot();
        let q = s.queue;
        let (tier, readings) = match &s.governor {
            Some(g) => (g.tier.clone(), g.readings.clone()),
            None => (String::new(), Vec::new()),
        };
        Props {
            active_slice: s.engine.slice.clone(),
            loaded: s
                .engine
                .towers
                .iter()
                .filter(|t| t.loaded)
                .map(|t| convert::modality_name(t.modality).to_string())
                .collect(),
            queue_depth: u32::try_from(
                q.waiting_interactive + q.waiting_background + usize::from(q.running),
            )
            .unwrap_or(u32::MAX),
            memory: convert::memory(&s.memory),
            tier,
            readings,
        }
    }
}

/// The object at `/org/gemmad/Gemmad1`.
pub struct Gemmad1 {
    core: Arc<Core>,
    callers: Arc<Callers>,
    props: Arc<Mutex<Props>>,
}

impl Gemmad1 {
    fn props(&self) -> Props {
        self.props.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The caller of the message, checked against the access policy.
    async fn caller(
        &self,
        conn: &zbus::Connection,
        hdr: &Header<'_>,
    ) -> Result<(UniqueName<'static>, Peer), Error> {
        let Some(sender) = hdr.sender() else {
            return Err(Error::PermissionDenied("the call has no sender".into()));
        };
        let sender = sender.to_owned();
        let peer = self.callers.peer(conn, &sender).await?;
        self.core.authorize(&peer)?;
        Ok((sender, peer))
    }
}

fn joined(e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("request handler failed: {e}"))
}

#[interface(name = "org.gemmad.Gemmad1")]
impl Gemmad1 {
    /// Queues a generation; returns the path of its request object at once.
    #[zbus(out_args("request_path"))]
    async fn generate(
        &self,
        request: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<OwnedObjectPath, Error> {
        let received = Instant::now();
        let (sender, peer) = self.caller(conn, &hdr).await?;
        let params = convert::generate(request)?;
        let core = self.core.clone();
        let sub = tokio::task::spawn_blocking(move || core.generate(&peer, params, received))
            .await
            .map_err(joined)??;
        request::start(conn, &self.callers, sender, sub).await
    }

    /// Token ids of `text`, no special tokens added.
    #[zbus(out_args("ids"))]
    async fn tokenize(
        &self,
        text: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<Vec<u32>, Error> {
        let (ids, _) = self
            .tokenize_input(
                TokenizeInput::Text {
                    text,
                    add_special: false,
                },
                &hdr,
                conn,
            )
            .await?;
        Ok(ids)
    }

    /// Token ids of `text` or of `messages` as Generate would run them, and the context.
    #[zbus(out_args("ids", "context_tokens"))]
    async fn tokenize_with(
        &self,
        mut input: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(Vec<u32>, u32), Error> {
        let add_special = match input.remove("add_special") {
            Some(v) => bool::try_from(v)
                .map_err(|_| Error::InvalidArgument("add_special must be of type b".into()))?,
            None => false,
        };
        let text = input.remove("text");
        let messages = input.remove("messages");
        if let Some(k) = input.keys().min() {
            return Err(Error::InvalidArgument(format!(
                "unknown key {k:?}; the keys are text, messages, add_special"
            )));
        }
        let what = match (text, messages) {
            (Some(t), None) => TokenizeInput::Text {
                text: String::try_from(t)
                    .map_err(|_| Error::InvalidArgument("text must be of type s".into()))?,
                add_special,
            },
            (None, Some(m)) => TokenizeInput::Conversation(convert::parse_messages(m)?),
            _ => {
                return Err(Error::InvalidArgument(
                    "set text (s) or messages (aa{sv}), one of them".into(),
                ))
            }
        };
        self.tokenize_input(what, &hdr, conn).await
    }

    /// Text of `ids`, special tokens skipped.
    #[zbus(out_args("text"))]
    async fn detokenize(
        &self,
        ids: Vec<u32>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, Error> {
        self.detokenize_with(ids, false, hdr, conn).await
    }

    #[zbus(out_args("text"))]
    async fn detokenize_with(
        &self,
        ids: Vec<u32>,
        keep_special: bool,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, Error> {
        let (_, peer) = self.caller(conn, &hdr).await?;
        let core = self.core.clone();
        let text = tokio::task::spawn_blocking(move || core.detokenize(&peer, &ids, keep_special))
            .await
            .map_err(joined)??;
        Ok(convert::dbus_text(text))
    }

    /// The MatFormer slices on offer: name, layers, and params/active/ffn_widths.
    #[zbus(out_args("slices"))]
    async fn list_slices(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<Vec<(String, u32, Dict)>, Error> {
        let (_, peer) = self.caller(conn, &hdr).await?;
        Ok(self
            .core
            .list_slices(&peer)
            .into_iter()
            .map(convert::slice)
            .collect())
    }

    /// Switches the slice; returns the one active afterwards.
    #[zbus(out_args("name", "layers", "info"))]
    async fn set_slice(
        &self,
        name: String,
        force: bool,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(String, u32, Dict), Error> {
        let (_, peer) = self.caller(conn, &hdr).await?;
        let s = self.core.set_slice(&peer, &name, force).await?;
        Ok(convert::slice(s))
    }

    #[zbus(out_args("tower"))]
    async fn load_modality(
        &self,
        modality: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<Dict, Error> {
        self.set_modality(&modality, true, &hdr, conn).await
    }

    #[zbus(out_args("tower"))]
    async fn unload_modality(
        &self,
        modality: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<Dict, Error> {
        self.set_modality(&modality, false, &hdr, conn).await
    }

    /// Bytes in RAM by part.
    #[zbus(out_args("parts"))]
    async fn get_memory(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<HashMap<String, u64>, Error> {
        let (_, peer) = self.caller(conn, &hdr).await?;
        Ok(convert::memory(&self.core.status(&peer).memory))
    }

    /// Everything gRPC's Status reports.
    #[zbus(out_args("status"))]
    async fn get_status(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<Dict, Error> {
        let (_, peer) = self.caller(conn, &hdr).await?;
        Ok(convert::status(&self.core.status(&peer)))
    }

    /// Keeps a prompt prefix warm in the prompt cache: `messages` (aa{sv}) or `ids` (au),
    /// `shared` b (admins only), `persist` b. Returns the pinned prompt.
    #[zbus(out_args("prompt"))]
    async fn cache_prompt(
        &self,
        args: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<Dict, Error> {
        let (_, peer) = self.caller(conn, &hdr).await?;
        let a = convert::cache_prompt(args)?;
        let (core, p2) = (self.core.clone(), peer.clone());
        let ids =
            tokio::task::spawn_blocking(move || core.cache_prompt_ids(&p2, a.messages, a.ids))
                .await
                .map_err(joined)??;
        let p = self
            .core
            .cache_prompt(&peer, ids, a.shared, a.persist)
            .await?;
        Ok(convert::cached_prompt(&p))
    }

    /// Unpins and drops the caller's cached prompt `key` (an admin's: anyone's); `""`
    /// drops all the caller may drop.
    async fn drop_cached_prompt(
        &self,
        key: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        let (_, peer) = self.caller(conn, &hdr).await?;
        Ok(self.core.drop_cached_prompt(&peer, &key).await?)
    }

    /// Pins the governor's tier; `""` unpins. Admins only.
    async fn governor_pin(
        &self,
        tier: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        let (_, peer) = self.caller(conn, &hdr).await?;
        let tier = (!tier.is_empty()).then_some(tier.as_str());
        Ok(self.core.governor_pin(&peer, tier)?)
    }

    /// Stops the daemon as SIGTERM does. Admins only.
    async fn shutdown(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        let (_, peer) = self.caller(conn, &hdr).await?;
        Ok(self.core.request_shutdown(&peer)?)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn model(&self) -> String {
        self.core.model().dir.display().to_string()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn context_tokens(&self) -> u32 {
        u32::try_from(self.core.context_tokens()).unwrap_or(u32::MAX)
    }

    #[zbus(property)]
    fn active_slice(&self) -> String {
        self.props().active_slice
    }

    #[zbus(property)]
    fn loaded_modalities(&self) -> Vec<String> {
        self.props().loaded
    }

    #[zbus(property)]
    fn queue_depth(&self) -> u32 {
        self.props().queue_depth
    }

    #[zbus(property)]
    fn memory(&self) -> HashMap<String, u64> {
        self.props().memory
    }

    #[zbus(property)]
    fn tier(&self) -> String {
        self.props().tier
    }

    #[zbus(property)]
    fn readings(&self) -> Vec<(String, f64, String)> {
        self.props().readings
    }
}

impl Gemmad1 {
    async fn tokenize_input(
        &self,
        input: TokenizeInput,
        hdr: &Header<'_>,
        conn: &zbus::Connection,
    ) -> Result<(Vec<u32>, u32), Error> {
        let (_, peer) = self.caller(conn, hdr).await?;
        let core = self.core.clone();
        let ids = tokio::task::spawn_blocking(move || core.tokenize(&peer, input))
            .await
            .map_err(joined)??;
        let ctx = u32::try_from(self.core.context_tokens()).unwrap_or(u32::MAX);
        Ok((ids, ctx))
    }

    async fn set_modality(
        &self,
        modality: &str,
        load: bool,
        hdr: &Header<'_>,
        conn: &zbus::Connection,
    ) -> Result<Dict, Error> {
        let (_, peer) = self.caller(conn, hdr).await?;
        let m = convert::modality(modality)?;
        let t = self.core.set_modality(&peer, m, load).await?;
        Ok(convert::tower(&t))
    }
}

/// The D-Bus front end while it serves.
pub struct DbusFront {
    conn: zbus::Connection,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Connects to `bus`, owns `org.gemmad.Gemmad1` and serves it.
pub async fn start(core: Arc<Core>, bus: DbusBus) -> Result<DbusFront, zbus::Error> {
    let callers = Arc::new(Callers::default());
    let props = Arc::new(Mutex::new(Props::of(&core)));
    let object = Gemmad1 {
        core: core.clone(),
        callers: callers.clone(),
        props: props.clone(),
    };
    let builder = match bus {
        DbusBus::Session => zbus::connection::Builder::session(),
        _ => zbus::connection::Builder::system(),
    };
    let conn = builder
        .name(NAME)
        .allow_name_replacements(false)
        .serve_at(PATH, object)
        .build()
        .await?;
    let watch = tokio::spawn(watch_callers(conn.clone(), callers));
    let refresh = tokio::spawn(refresh_properties(conn.clone(), core, props));
    tracing::info!(bus = %bus, name = NAME, unique = ?conn.unique_name().map(|n| n.to_string()), "D-Bus serving");
    Ok(DbusFront {
        conn,
        tasks: vec![watch, refresh],
    })
}

impl DbusFront {
    /// Gives up the name and stops the front end's tasks (requests still running end
    /// through the core's shutdown).
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Err(e) = self.conn.release_name(NAME).await {
            tracing::debug!(error = %e, "cannot release the bus name");
        }
    }
}

/// Cancels the requests of callers that leave the bus.
async fn watch_callers(conn: zbus::Connection, callers: Arc<Callers>) {
    let stream = async {
        let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
        dbus.receive_name_owner_changed().await
    };
    let mut changes = match stream.await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch callers leaving the bus; their requests run to the end");
            return;
        }
    };
    while let Some(c) = changes.next().await {
        let Ok(args) = c.args() else { continue };
        if args.new_owner().is_none() && args.name().starts_with(':') {
            let n = callers.gone(args.name());
            if n > 0 {
                tracing::info!(caller = %args.name(), cancelled = n, "D-Bus caller left the bus; its requests cancelled");
            }
        }
    }
}

/// Publishes property changes (PropertiesChanged) as the service's state moves.
async fn refresh_properties(conn: zbus::Connection, core: Arc<Core>, props: Arc<Mutex<Props>>) {
    let emitter = match SignalEmitter::new(&conn, PATH) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot emit property changes");
            return;
        }
    };
    let Ok(iface) = InterfaceName::try_from(INTERFACE) else {
        return;
    };
    let mut memory_at = Instant::now();
    let mut readings_at = Instant::now();
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let c = core.clone();
        let Ok(new) = tokio::task::spawn_blocking(move || Props::of(&c)).await else {
            continue;
        };
        let old = props.lock().map(|p| p.clone()).unwrap_or_default();
        let mut changed: HashMap<&str, Variant<'_>> = HashMap::new();
        if new.active_slice != old.active_slice {
            changed.insert("ActiveSlice", new.active_slice.clone().into());
        }
        if new.loaded != old.loaded {
            changed.insert("LoadedModalities", new.loaded.clone().into());
        }
        if new.queue_depth != old.queue_depth {
            changed.insert("QueueDepth", new.queue_depth.into());
        }
        if new.tier != old.tier {
            changed.insert("Tier", new.tier.clone().into());
        }
        let mut publish = new.clone();
        if new.readings != old.readings && readings_at.elapsed() >= READINGS_EVERY {
            changed.insert("Readings", new.readings.clone().into());
            readings_at = Instant::now();
        } else {
            // Sensor values move on every poll: subscribers hear of them at a slow rate.
            publish.readings = old.readings.clone();
        }
        if memory_moved(&old.memory, &new.memory) && memory_at.elapsed() >= MEMORY_EVERY {
            changed.insert("Memory", new.memory.clone().into());
            memory_at = Instant::now();
        } else {
            // Readers of the property see the figures as last announced.
            publish.memory = old.memory.clone();
        }
        if let Ok(mut p) = props.lock() {
            *p = publish;
        }
        if changed.is_empty() {
            continue;
        }
        if let Err(e) = zbus::fdo::Properties::properties_changed(
            &emitter,
            iface.clone(),
            changed,
            std::borrow::Cow::Borrowed(&[]),
        )
        .await
        {
            if conn_lost(&e) {
                tracing::error!(error = %e, "lost the D-Bus connection; the D-Bus front end stops (gRPC serves on; restart gemmad to serve D-Bus again)");
                return;
            }
            tracing::warn!(error = %e, "cannot emit PropertiesChanged");
        }
    }
}

/// Whether `e` means the bus connection is gone (no later send can work).
fn conn_lost(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::InputOutput(_))
}

/// Whether any part of the memory report moved by at least [`MEMORY_STEP`].
fn memory_moved(old: &HashMap<String, u64>, new: &HashMap<String, u64>) -> bool {
    old.len() != new.len()
        || new
            .iter()
            .any(|(k, v)| old.get(k).is_none_or(|o| o.abs_diff(*v) >= MEMORY_STEP))
}
