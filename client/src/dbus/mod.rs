//! gemmad's D-Bus API (docs/dbus.md) behind the same methods and `pb` types as the gRPC
//! [`Client`](crate::Client), so a program can use either transport.
//!
//! ```no_run
//! # async fn demo() -> Result<(), gemmad_client::ClientError> {
//! use gemmad_client::dbus::{Bus, DbusClient};
//! let c = DbusClient::connect(Bus::System).await?;
//! let out = c.generate_text(gemmad_client::user_prompt("Hello!")).await?;
//! println!("{}", out.text);
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use zbus::names::{BusName, OwnedUniqueName};
use zbus::{Connection, DBusError, Message, MessageStream, OwnedObjectPath, OwnedVariant};

use crate::{pb, ClientError, Generation, ServingStatus};

mod generation;
mod reply;
mod request;

pub use generation::DbusGeneration;

use generation::{drain_while, owner_rule, request_rule};
use reply::{
    bad_reply, cached_prompt_from_fields, deserialize, slice_from_args, status_from_dict,
    tower_from_fields, Fields, SliceArgs,
};
use request::{cache_prompt_dict, message_dicts, modality_name, request_dict, Arg, ArgDict};

/// gemmad's well-known name on the bus.
pub const BUS_NAME: &str = "org.gemmad.Gemmad1";
/// The service object.
pub const OBJECT_PATH: &str = "/org/gemmad/Gemmad1";
/// The service object's interface.
pub const INTERFACE: &str = "org.gemmad.Gemmad1";
/// The interface of the per-generation request objects.
pub const REQUEST_INTERFACE: &str = "org.gemmad.Gemmad1.Request";
/// The request objects live under this path.
pub const REQUEST_PATH_NAMESPACE: &str = "/org/gemmad/Gemmad1/request";
/// The prefix of gemmad's D-Bus error names.
pub const ERROR_PREFIX: &str = "org.gemmad.Gemmad1.Error.";

const DBUS_NAME: &str = "org.freedesktop.DBus";
const DBUS_PATH: &str = "/org/freedesktop/DBus";
const FDO_ERROR: &str = "org.freedesktop.DBus.Error.";

/// Signals a generation may have queued before its reader catches up. A full queue stalls
/// the whole connection (zbus waits for room), so it is generous.
const SIGNAL_QUEUE: std::num::NonZeroUsize = std::num::NonZeroUsize::new(4096).unwrap();

/// Which bus to reach gemmad on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bus {
    /// The system bus, where a gemmad started by systemd is.
    System,
    /// The session bus of the calling user.
    Session,
    /// A bus at a D-Bus address, such as `unix:path=/run/dbus/system_bus_socket`.
    Address(String),
}

impl fmt::Display for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bus::System => f.write_str("system bus"),
            Bus::Session => f.write_str("session bus"),
            Bus::Address(a) => write!(f, "bus at {a}"),
        }
    }
}

impl FromStr for Bus {
    type Err = String;

    /// `system`, `session`, or a D-Bus address (anything with a `:`).
    fn from_str(s: &str) -> Result<Bus, String> {
        match s {
            "system" => Ok(Bus::System),
            "session" => Ok(Bus::Session),
            a if a.contains(':') => Ok(Bus::Address(a.to_string())),
            other => Err(format!(
                "unknown bus `{other}`: system, session, or a D-Bus address such as \
                 unix:path=/run/dbus/system_bus_socket"
            )),
        }
    }
}

impl Bus {
    /// What to check when gemmad is not on this bus.
    fn serve_hint(&self) -> &str {
        match self {
            Bus::System => "is gemmad running with `--dbus system`? (`systemctl status gemmad`)",
            Bus::Session => "is gemmad running with `--dbus session`?",
            Bus::Address(_) => "is a gemmad with D-Bus on connected to this bus?",
        }
    }
}

/// A connection to gemmad over D-Bus.
#[derive(Clone, Debug)]
pub struct DbusClient {
    conn: Connection,
    bus: Bus,
}

impl DbusClient {
    /// Connects to `bus` and checks that gemmad is there (or that the bus can start it).
    pub async fn connect(bus: Bus) -> Result<DbusClient, ClientError> {
        let conn = match &bus {
            Bus::System => Connection::system().await,
            Bus::Session => Connection::session().await,
            Bus::Address(a) => zbus::connection::Builder::address(a.as_str()).build().await,
        }
        .map_err(|e| {
            let hint = match &bus {
                Bus::System => " (is dbus running? `systemctl status dbus`)",
                Bus::Session => {
                    " (a session bus exists in a desktop login; is DBUS_SESSION_BUS_ADDRESS set?)"
                }
                Bus::Address(_) => "",
            };
            ClientError::Bus {
                bus: bus.to_string(),
                reason: format!("cannot connect: {e}{hint}"),
            }
        })?;
        let c = DbusClient::from_connection(conn, bus);
        // Activation starts gemmad on the first call, so an activatable name counts as there.
        if !c.name_has_owner().await? && !c.name_activatable().await? {
            return Err(c.no_owner());
        }
        Ok(c)
    }

    /// Wraps an existing connection (no check that gemmad is on it). `bus` names it in
    /// errors.
    pub fn from_connection(conn: Connection, bus: Bus) -> DbusClient {
        DbusClient { conn, bus }
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Starts a generation; the stream yields Delta... Finished (D-Bus has no Queued or
    /// Started). Dropping the stream before it ends cancels the request.
    pub async fn generate(&self, req: pb::GenerateRequest) -> Result<DbusGeneration, ClientError> {
        let args = (request_dict(req)?,);
        // Subscribed before the call: the first Token may be on the wire before the reply.
        let mut signals =
            MessageStream::for_match_rule(request_rule(), &self.conn, Some(SIGNAL_QUEUE))
                .await
                .map_err(|e| self.bus_error("subscribing to the request signals", e))?;
        let owner = MessageStream::for_match_rule(owner_rule(), &self.conn, None)
            .await
            .map_err(|e| self.bus_error("subscribing to NameOwnerChanged", e))?;
        let call = self.conn.call_method(
            Some(BUS_NAME),
            OBJECT_PATH,
            Some(INTERFACE),
            "Generate",
            &args,
        );
        let mut early = VecDeque::new();
        let reply = drain_while(call, &mut signals, &mut early)
            .await
            .map_err(|e| self.call_error("Generate", e))?;
        let path: OwnedObjectPath = reply
            .body()
            .deserialize()
            .map_err(|e| bad_reply("Generate", format!("the body is not an object path: {e}")))?;
        let daemon = reply
            .header()
            .sender()
            .map(|s| OwnedUniqueName::from(s.to_owned()));
        Ok(DbusGeneration {
            conn: self.conn.clone(),
            bus: self.bus.clone(),
            path,
            daemon,
            early,
            signals,
            owner,
            request_id: None,
            done: false,
        })
    }

    /// Runs a generation to the end, calling `on_text` for each delta's text.
    pub async fn generate_with(
        &self,
        req: pb::GenerateRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, ClientError> {
        let mut s = self.generate(req).await?;
        let mut out = Generation::default();
        while let Some(msg) = s.message().await? {
            if crate::collect_event(&mut out, msg, &mut on_text) {
                out.request_id = s.request_id().unwrap_or_default();
                return Ok(out);
            }
        }
        Err(ClientError::Truncated)
    }

    /// Runs a generation to the end.
    pub async fn generate_text(&self, req: pb::GenerateRequest) -> Result<Generation, ClientError> {
        self.generate_with(req, |_| {}).await
    }

    pub async fn tokenize(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<pb::TokenizeResponse, ClientError> {
        let input = ArgDict(vec![
            ("text", Arg::Str(text.to_string())),
            ("add_special", Arg::Bool(add_special_tokens)),
        ]);
        self.tokenize_with(input).await
    }

    pub async fn tokenize_chat(
        &self,
        messages: Vec<pb::Message>,
    ) -> Result<pb::TokenizeResponse, ClientError> {
        let input = ArgDict(vec![("messages", Arg::Dicts(message_dicts(messages)?))]);
        self.tokenize_with(input).await
    }

    async fn tokenize_with(&self, input: ArgDict) -> Result<pb::TokenizeResponse, ClientError> {
        let reply = self.call("TokenizeWith", &(input,)).await?;
        let (ids, context_tokens): (Vec<u32>, u32) = deserialize(&reply, "TokenizeWith")?;
        Ok(pb::TokenizeResponse {
            ids,
            context_tokens,
        })
    }

    pub async fn detokenize(&self, ids: Vec<u32>) -> Result<String, ClientError> {
        let reply = self.call("Detokenize", &(ids,)).await?;
        deserialize(&reply, "Detokenize")
    }

    pub async fn status(&self) -> Result<pb::StatusResponse, ClientError> {
        let reply = self.call("GetStatus", &()).await?;
        let map: HashMap<String, OwnedVariant> = deserialize(&reply, "GetStatus")?;
        status_from_dict(&map)
    }

    pub async fn list_slices(&self) -> Result<Vec<pb::Slice>, ClientError> {
        let reply = self.call("ListSlices", &()).await?;
        let slices: Vec<SliceArgs> = deserialize(&reply, "ListSlices")?;
        slices
            .iter()
            .enumerate()
            .map(|(i, s)| slice_from_args(s, &format!("ListSlices[{i}]")))
            .collect()
    }

    /// Makes `name` the active slice (`force`: also the running generation's, which
    /// re-prefills); returns the slice active afterwards.
    pub async fn set_slice(&self, name: &str, force: bool) -> Result<pb::Slice, ClientError> {
        let reply = self.call("SetSlice", &(name, force)).await?;
        // zbus reads `sua{sv}` and one `(sua{sv})` struct alike, so either reply form works.
        let s: SliceArgs = deserialize(&reply, "SetSlice")?;
        slice_from_args(&s, "SetSlice")
    }

    /// Pins the governor to `tier`, or unpins it (`None`).
    pub async fn governor_pin(&self, tier: Option<&str>) -> Result<(), ClientError> {
        self.call("GovernorPin", &(tier.unwrap_or(""),)).await?;
        Ok(())
    }

    /// Asks the daemon to stop (`Shutdown`, admins only).
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.call("Shutdown", &()).await?;
        Ok(())
    }

    /// Pins a prompt prefix in the daemon's prompt cache (`CachePrompt`); returns it as
    /// pinned.
    pub async fn cache_prompt(
        &mut self,
        req: pb::CachePromptRequest,
    ) -> Result<pb::CachedPrompt, ClientError> {
        let args = (cache_prompt_dict(req)?,);
        let reply = self.call("CachePrompt", &args).await?;
        let map: HashMap<String, OwnedVariant> = deserialize(&reply, "CachePrompt")?;
        cached_prompt_from_fields(&Fields::from_map("CachePrompt", &map))
    }

    /// Unpins and drops the cached prompt `key` (all of the caller's when empty).
    pub async fn drop_cached_prompt(&mut self, key: &str) -> Result<(), ClientError> {
        self.call("DropCachedPrompt", &(key,)).await?;
        Ok(())
    }

    pub async fn load_modality(&self, m: pb::Modality) -> Result<pb::Tower, ClientError> {
        self.modality_call("LoadModality", m).await
    }

    pub async fn unload_modality(&self, m: pb::Modality) -> Result<pb::Tower, ClientError> {
        self.modality_call("UnloadModality", m).await
    }

    async fn modality_call(&self, method: &str, m: pb::Modality) -> Result<pb::Tower, ClientError> {
        let name = modality_name(m).ok_or_else(|| {
            ClientError::Rpc(Status::invalid_argument(
                "modality is unspecified: vision or audio",
            ))
        })?;
        let reply = self.call(method, &(name,)).await?;
        let map: HashMap<String, OwnedVariant> = deserialize(&reply, method)?;
        tower_from_fields(&Fields::from_map(method, &map))
    }

    /// The D-Bus analogue of the gRPC health check: SERVING when gemmad owns its name and
    /// answers `org.freedesktop.DBus.Peer.Ping` on its object. `service` is "" (the whole
    /// server) or `gemmad.v1.Gemmad`, as over gRPC.
    pub async fn health(&self, service: &str) -> Result<ServingStatus, ClientError> {
        if !service.is_empty() && service != "gemmad.v1.Gemmad" {
            return Err(ClientError::Rpc(Status::not_found(format!(
                "unknown service `{service}`: \"\" or gemmad.v1.Gemmad"
            ))));
        }
        // Without an owner a ping would start gemmad by activation; the check reports the
        // present state instead.
        if !self.name_has_owner().await? {
            return Ok(ServingStatus::NotServing);
        }
        let ping = self
            .conn
            .call_method(
                Some(BUS_NAME),
                OBJECT_PATH,
                Some("org.freedesktop.DBus.Peer"),
                "Ping",
                &(),
            )
            .await;
        match ping {
            Ok(_) => Ok(ServingStatus::Serving),
            Err(e) => match self.call_error("Ping", e) {
                // It left between the two calls.
                ClientError::Bus { .. } if !self.name_has_owner().await? => {
                    Ok(ServingStatus::NotServing)
                }
                other => Err(other),
            },
        }
    }

    async fn call<B>(&self, method: &str, body: &B) -> Result<Message, ClientError>
    where
        B: serde::Serialize + zbus::DynamicType,
    {
        self.conn
            .call_method(Some(BUS_NAME), OBJECT_PATH, Some(INTERFACE), method, body)
            .await
            .map_err(|e| self.call_error(method, e))
    }

    /// The bus daemon's own interface (zbus's proxy for org.freedesktop.DBus).
    async fn bus_daemon(&self) -> Result<zbus::fdo::DBusProxy<'_>, ClientError> {
        zbus::fdo::DBusProxy::new(&self.conn)
            .await
            .map_err(|e| self.bus_error("reaching the bus daemon", e))
    }

    async fn name_has_owner(&self) -> Result<bool, ClientError> {
        let name = BusName::try_from(BUS_NAME)
            .map_err(|e| self.bus_error("naming org.gemmad.Gemmad1", e))?;
        self.bus_daemon()
            .await?
            .name_has_owner(name)
            .await
            .map_err(|e| {
                self.bus_error(
                    "asking the bus whether org.gemmad.Gemmad1 has an owner",
                    e.into(),
                )
            })
    }

    async fn name_activatable(&self) -> Result<bool, ClientError> {
        let names = self
            .bus_daemon()
            .await?
            .list_activatable_names()
            .await
            .map_err(|e| self.bus_error("asking the bus for its activatable names", e.into()))?;
        Ok(names.iter().any(|n| n.as_str() == BUS_NAME))
    }

    fn no_owner(&self) -> ClientError {
        no_owner(&self.bus)
    }

    fn bus_error(&self, doing: &str, e: zbus::Error) -> ClientError {
        ClientError::Bus {
            bus: self.bus.to_string(),
            reason: format!("{doing}: {e}"),
        }
    }

    /// A failed method call as the error gemmactl and callers know: the daemon's own errors
    /// as gRPC statuses, a missing daemon or a broken bus as [`ClientError::Bus`].
    fn call_error(&self, method: &str, e: zbus::Error) -> ClientError {
        call_error(&self.bus, method, e)
    }
}

fn no_owner(bus: &Bus) -> ClientError {
    ClientError::Bus {
        bus: bus.to_string(),
        reason: format!(
            "nothing owns the name {BUS_NAME} and the bus cannot start it: {}",
            bus.serve_hint()
        ),
    }
}

fn call_error(bus: &Bus, method: &str, e: zbus::Error) -> ClientError {
    match e {
        zbus::Error::MethodError(name, detail, _) => {
            remote_error(bus, name.as_str(), detail.as_deref().unwrap_or(""))
        }
        zbus::Error::FDO(f) => match *f {
            zbus::fdo::Error::ZBus(inner) => call_error(bus, method, inner),
            other => remote_error(
                bus,
                other.name().as_str(),
                other.description().unwrap_or(""),
            ),
        },
        other => ClientError::Bus {
            bus: bus.to_string(),
            reason: format!("calling {method}: {other}"),
        },
    }
}

fn remote_error(bus: &Bus, name: &str, message: &str) -> ClientError {
    match name.strip_prefix(FDO_ERROR) {
        Some("ServiceUnknown") | Some("NameHasNoOwner") => no_owner(bus),
        _ => ClientError::Rpc(status_from_error_name(name, message)),
    }
}

/// The gRPC status that a D-Bus error name stands for: gemmad's own errors map to the codes
/// its gRPC API gives for the same failure; the bus's errors to the nearest code.
pub fn status_from_error_name(name: &str, message: &str) -> Status {
    let code = match name.strip_prefix(ERROR_PREFIX) {
        Some("InvalidArgument") => Code::InvalidArgument,
        Some("Busy") => Code::ResourceExhausted,
        Some("PermissionDenied") => Code::PermissionDenied,
        Some("ModalityUnavailable") | Some("Unavailable") => Code::FailedPrecondition,
        Some("ShuttingDown") => Code::Unavailable,
        Some("Internal") => Code::Internal,
        Some(_) => return Status::unknown(format!("{name}: {message}")),
        None => return bus_status(name, message),
    };
    match retry_after_ms(message) {
        Some(ms) if code == Code::ResourceExhausted => {
            let mut md = MetadataMap::new();
            md.insert("retry-after-ms", ms.into());
            Status::with_metadata(code, message, md)
        }
        _ => Status::new(code, message),
    }
}

/// Errors from the bus or zbus rather than from gemmad's code.
fn bus_status(name: &str, message: &str) -> Status {
    let Some(short) = name.strip_prefix(FDO_ERROR) else {
        return Status::unknown(format!("{name}: {message}"));
    };
    match short {
        "AccessDenied" => Status::permission_denied(format!(
            "the bus refused the call: is this user in the group that the bus policy \
             (org.gemmad.Gemmad1.conf) lets call gemmad? ({message})"
        )),
        "InvalidArgs" => Status::invalid_argument(message),
        "UnknownMethod" | "UnknownInterface" | "UnknownObject" | "UnknownProperty" => {
            Status::unimplemented(format!("{message} ({name})"))
        }
        "NoReply" | "Timeout" | "TimedOut" | "Disconnected" => {
            Status::unavailable(format!("gemmad did not answer: {message} ({name})"))
        }
        "LimitsExceeded" | "NoMemory" => Status::resource_exhausted(format!("{message} ({name})")),
        _ => Status::unknown(format!("{name}: {message}")),
    }
}

/// N of a message that ends with "retry after N ms", as Busy's do.
fn retry_after_ms(message: &str) -> Option<u64> {
    let rest = message.trim_end().strip_suffix("ms")?.trim_end();
    let digits_from = rest.rfind(|c: char| !c.is_ascii_digit())? + 1;
    let (head, n) = rest.split_at(digits_from);
    head.trim_end()
        .ends_with("retry after")
        .then(|| n.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value as it arrives: through a real message body, so signatures are the wire's.
    pub(super) fn through_wire<B>(body: &B) -> Message
    where
        B: serde::Serialize + zbus::DynamicType,
    {
        Message::method_call(OBJECT_PATH, "Test")
            .build(body)
            .expect("a test body serializes")
    }

    pub(super) fn dict_of(msg: &Message) -> HashMap<String, OwnedVariant> {
        deserialize(msg, "test").expect("an a{sv} body")
    }

    #[test]
    fn error_names_map_to_grpc_codes() {
        for (name, code) in [
            ("InvalidArgument", Code::InvalidArgument),
            ("Busy", Code::ResourceExhausted),
            ("PermissionDenied", Code::PermissionDenied),
            ("ModalityUnavailable", Code::FailedPrecondition),
            ("Unavailable", Code::FailedPrecondition),
            ("ShuttingDown", Code::Unavailable),
            ("Internal", Code::Internal),
        ] {
            let s = status_from_error_name(&format!("{ERROR_PREFIX}{name}"), "why");
            assert_eq!(s.code(), code, "{name}");
            assert_eq!(s.message(), "why", "{name}");
        }
        let s = status_from_error_name(
            "org.gemmad.Gemmad1.Error.Busy",
            "the queue is full (16 waiting); retry after 250 ms",
        );
        assert_eq!(s.metadata().get("retry-after-ms").unwrap(), "250");
        // describe() then leaves the message's own retry hint alone.
        assert_eq!(
            crate::describe(&s),
            "gemmad is busy: the queue is full (16 waiting); retry after 250 ms"
        );
        let s = status_from_error_name("org.gemmad.Gemmad1.Error.Busy", "full");
        assert!(s.metadata().get("retry-after-ms").is_none());

        let s = status_from_error_name("org.gemmad.Gemmad1.Error.Novel", "x");
        assert_eq!(s.code(), Code::Unknown);
        assert!(s.message().contains("org.gemmad.Gemmad1.Error.Novel"));
        for (name, code) in [
            (
                "org.freedesktop.DBus.Error.AccessDenied",
                Code::PermissionDenied,
            ),
            (
                "org.freedesktop.DBus.Error.InvalidArgs",
                Code::InvalidArgument,
            ),
            (
                "org.freedesktop.DBus.Error.UnknownMethod",
                Code::Unimplemented,
            ),
            (
                "org.freedesktop.DBus.Error.UnknownObject",
                Code::Unimplemented,
            ),
            ("org.freedesktop.DBus.Error.NoReply", Code::Unavailable),
            ("com.example.Other", Code::Unknown),
        ] {
            assert_eq!(status_from_error_name(name, "m").code(), code, "{name}");
        }
        // A name nobody owns is a bus problem with a hint, not a status.
        match remote_error(
            &Bus::Session,
            "org.freedesktop.DBus.Error.ServiceUnknown",
            "x",
        ) {
            ClientError::Bus { bus, reason } => {
                assert_eq!(bus, "session bus");
                assert!(reason.contains("--dbus session"), "{reason}");
            }
            other => panic!("got {other:?}"),
        }
    }

    #[test]
    fn retry_after_is_read_only_at_the_end() {
        assert_eq!(retry_after_ms("busy; retry after 120 ms"), Some(120));
        assert_eq!(retry_after_ms("retry after 5ms"), Some(5));
        assert_eq!(retry_after_ms("took 120 ms"), None);
        assert_eq!(retry_after_ms("retry after ms"), None);
        assert_eq!(retry_after_ms(""), None);
    }

    #[test]
    fn bus_names_parse() {
        assert_eq!("system".parse::<Bus>(), Ok(Bus::System));
        assert_eq!("session".parse::<Bus>(), Ok(Bus::Session));
        assert_eq!(
            "unix:path=/tmp/bus".parse::<Bus>(),
            Ok(Bus::Address("unix:path=/tmp/bus".into()))
        );
        assert!("sesion"
            .parse::<Bus>()
            .unwrap_err()
            .contains("unknown bus `sesion`"));
    }
}
