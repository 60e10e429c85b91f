//! The daemon's TOML configuration (`/etc/gemmad/gemmad.toml` by default). Every key has
//! a default, so an empty or missing file is a valid configuration; unknown keys are
//! errors (a typo must not silently fall back to a default). `systemd/gemmad.toml` is the
//! documented example.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/gemmad/gemmad.toml";
pub const DEFAULT_SOCKET: &str = "/run/gemmad/gemmad.sock";
/// The longest shutdown grace period (a day): longer is a typo, and systemd gives up
/// long before.
pub const MAX_GRACE_S: f64 = 86_400.0;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub server: ServerSection,
    pub access: AccessSection,
    pub queue: QueueSection,
    pub limits: LimitsSection,
    pub shutdown: ShutdownSection,
    pub log: LogSection,
    pub governor: gemmad_governor::GovernorConfig,
    pub cache: CacheSection,
    pub http: HttpSection,
}

/// `[http]`: the OpenAI-compatible HTTP front end (docs/http.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Serve it at all.
    pub enabled: bool,
    /// Its Unix socket; "" = next to the gRPC socket, named after it
    /// (`gemmad.sock` -> `gemmad-http.sock`). `--http-socket` overrides. Mode and group
    /// are the gRPC socket's (`server.socket_mode`, `server.socket_group`).
    pub socket: PathBuf,
    /// Optional loopback TCP listener, e.g. "127.0.0.1:8080"; "" = off. Needs `api_key`
    /// or `api_key_file`: TCP peers carry no credentials.
    pub tcp_listen: String,
    /// The bearer token TCP clients must send (`Authorization: Bearer <key>`).
    pub api_key: String,
    /// A file holding the key (its first line), instead of `api_key`.
    pub api_key_file: PathBuf,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            enabled: true,
            socket: PathBuf::new(),
            tcp_listen: String::new(),
            api_key: String::new(),
            api_key_file: PathBuf::new(),
        }
    }
}

impl HttpSection {
    /// The HTTP socket: `socket`, or derived from the gRPC socket `grpc`.
    pub fn socket_path(&self, grpc: &Path) -> PathBuf {
        if !self.socket.as_os_str().is_empty() {
            return self.socket.clone();
        }
        let stem = grpc
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .unwrap_or("gemmad");
        grpc.with_file_name(format!("{stem}-http.sock"))
    }

    /// Checks the TCP listener's rules: loopback only, and a key.
    pub fn validate(&self) -> Result<()> {
        if !self.api_key.is_empty() && !self.api_key_file.as_os_str().is_empty() {
            bail!("http: set api_key or api_key_file, not both");
        }
        if self.tcp_listen.is_empty() {
            return Ok(());
        }
        let addr: std::net::SocketAddr = self
            .tcp_listen
            .parse()
            .with_context(|| format!("http.tcp_listen {:?}", self.tcp_listen))?;
        if !addr.ip().is_loopback() {
            bail!(
                "http.tcp_listen {:?} is not a loopback address: the HTTP API listens on TCP \
                 only on 127.0.0.1 or ::1 (use the Unix socket, or a reverse proxy, otherwise)",
                self.tcp_listen
            );
        }
        if self.api_key.is_empty() && self.api_key_file.as_os_str().is_empty() {
            bail!(
                "http.tcp_listen is set but neither http.api_key nor http.api_key_file is: \
                 TCP peers carry no credentials, so the HTTP API on TCP requires a key \
                 (clients send it as `Authorization: Bearer <key>`)"
            );
        }
        Ok(())
    }
}

/// `[cache]`: the prompt cache (K/V states kept for requests that share a prefix).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    /// Reuse prompt prefixes at all.
    pub enabled: bool,
    /// Bytes of kept states in RAM; unset: 1/16 of the machine's RAM, between 64 MiB and
    /// 1 GiB. 0 keeps only the running conversation.
    pub ram_bytes: Option<u64>,
    /// Bytes of state files in `<cache_dir>/prompt-cache`; 0 = no disk tier.
    pub disk_bytes: u64,
    /// Conversations shorter than this are not kept once another one replaces them.
    pub min_tokens: usize,
    /// States at least this long are also written to the disk tier.
    pub disk_min_tokens: usize,
}

impl Default for CacheSection {
    fn default() -> Self {
        let e = gemmad_engine::PromptCacheOptions::default();
        CacheSection {
            enabled: e.enabled,
            ram_bytes: None,
            disk_bytes: e.disk_bytes,
            min_tokens: e.min_tokens,
            disk_min_tokens: e.disk_min_tokens,
        }
    }
}

impl CacheSection {
    pub fn options(&self) -> gemmad_engine::PromptCacheOptions {
        gemmad_engine::PromptCacheOptions {
            enabled: self.enabled,
            ram_bytes: self
                .ram_bytes
                .map_or_else(gemmad_engine::default_prompt_cache_bytes, |b| {
                    usize::try_from(b).unwrap_or(usize::MAX)
                }),
            disk_bytes: self.disk_bytes,
            min_tokens: self.min_tokens,
            disk_min_tokens: self.disk_min_tokens,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Checkpoint folder; `--model` overrides.
    pub dir: Option<PathBuf>,
    /// Context window in tokens; 0 = the model's maximum.
    pub max_context: usize,
    /// Compute threads; 0 = all CPUs.
    pub threads: usize,
    /// Weight storage: "bf16" (the checkpoint's own), "q8_0", "q4_0", "q4_k", "f32".
    pub quant: String,
    /// Derived files (quantized weights, PLE cache); "" = systemd's `CacheDirectory=`
    /// when it set one, else in memory only.
    pub cache_dir: PathBuf,
    /// Per-layer inputs: "auto" (PLE cache file when cache_dir is set), "cache", "table".
    pub ple: String,
    /// Instruction set the kernels may use: "auto" (the best the CPU has), "avx512",
    /// "avxvnni", "avx2", "neondot", "neon", "scalar". `--isa`/GEMMAD_ISA override.
    pub isa: String,
    /// Repack quantized matrices for the fast kernels (false: ggml's row layout, for
    /// comparisons). `--pack`/GEMMAD_PACK override.
    pub pack: bool,
    /// MatFormer slicing file (Google's configs.csv format) whose slices are offered
    /// besides `full` and, for E4B-shaped checkpoints, the official table.
    /// `--matformer-config` overrides.
    pub matformer_config: Option<PathBuf>,
    /// The slice to serve from the start ("" = `full`, the whole checkpoint). `--slice`
    /// overrides.
    pub slice: String,
    /// The model store: where `Pull` installs checkpoints and where a repo id given as
    /// `dir`/`--model` (`org/name`) is looked up first. "" = `$GEMMAD_MODEL_STORE`, else
    /// /var/lib/gemmad/models (see docs/models.md).
    pub store: PathBuf,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            dir: None,
            max_context: 0,
            threads: 0,
            quant: String::new(),
            cache_dir: PathBuf::new(),
            ple: String::new(),
            isa: String::new(),
            pack: true,
            matformer_config: None,
            slice: String::new(),
            store: PathBuf::new(),
        }
    }
}

impl ModelSection {
    /// `model.quant` parsed ("" = bf16).
    pub fn quant(&self) -> Result<gemmad_engine::QuantType> {
        if self.quant.is_empty() {
            return Ok(gemmad_engine::QuantType::Bf16);
        }
        self.quant
            .parse()
            .map_err(|e: String| anyhow::anyhow!("model.quant: {e}"))
    }

    /// `model.ple` parsed ("" = auto).
    pub fn ple_mode(&self) -> Result<gemmad_engine::PleMode> {
        if self.ple.is_empty() {
            return Ok(gemmad_engine::PleMode::Auto);
        }
        self.ple
            .parse()
            .map_err(|e: String| anyhow::anyhow!("model.ple: {e}"))
    }

    /// `model.isa` parsed ("" = auto).
    pub fn isa(&self) -> Result<gemmad_engine::IsaChoice> {
        if self.isa.is_empty() {
            return Ok(gemmad_engine::IsaChoice::Auto);
        }
        self.isa
            .parse()
            .map_err(|e: String| anyhow::anyhow!("model.isa: {e}"))
    }

    /// The store `Pull` installs into: `model.store`, else where `gemmad pull` installs
    /// ([`gemmad_hub::default_store`]: `$GEMMAD_MODEL_STORE`, the service's store for
    /// root and the gemmad user, else the user's own).
    pub fn store(&self) -> PathBuf {
        if self.store.as_os_str().is_empty() {
            gemmad_hub::default_store()
        } else {
            self.store.clone()
        }
    }

    /// The checkpoint folder `dir` names: a folder, or a repo id found in `model.store`
    /// or the default stores.
    pub fn resolve_dir(&self, dir: &std::path::Path) -> Result<PathBuf> {
        let extra = (!self.store.as_os_str().is_empty()).then_some(self.store.as_path());
        Ok(gemmad_hub::resolve_model(
            dir,
            &gemmad_hub::search_stores(extra),
        )?)
    }

    /// `model.cache_dir`, if set; else the cache directory systemd made for the service
    /// (`CacheDirectory=`, passed as `$CACHE_DIRECTORY`), if any.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if !self.cache_dir.as_os_str().is_empty() {
            return Some(self.cache_dir.clone());
        }
        std::env::var_os("CACHE_DIRECTORY")
            .and_then(|v| {
                v.to_str()
                    .and_then(|s| s.split(':').next())
                    .map(PathBuf::from)
            })
            .filter(|p| p.is_absolute())
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Unix socket path; `--socket` overrides.
    pub socket: PathBuf,
    /// Socket file mode, octal, e.g. "0660".
    pub socket_mode: String,
    /// Group owning the socket (name or numeric gid); empty = the daemon's own group.
    pub socket_group: String,
    /// Optional TCP listen address for boards without local clients, e.g.
    /// "0.0.0.0:50051". Empty = off. TCP peers have no credentials: every TCP peer is
    /// allowed, so only enable this on a trusted network.
    pub tcp_listen: String,
    /// Largest request message in bytes (images and audio included).
    pub max_request_bytes: usize,
    /// Connections one uid may have open; more are closed at accept. TCP peers have no
    /// uid and count only in `max_connections`.
    pub max_connections_per_uid: usize,
    /// Connections open in all; more are closed at accept. Lowered at start to what the
    /// open-file limit leaves room for.
    pub max_connections: usize,
    /// The D-Bus front end: `system`, `session`, `off`, or `auto` (the system bus when
    /// systemd started the daemon, else off); `--dbus` overrides.
    pub dbus: DbusBus,
}

/// Which bus the D-Bus front end serves on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DbusBus {
    #[default]
    Auto,
    System,
    Session,
    Off,
}

impl DbusBus {
    /// The bus to serve on, `auto` resolved (systemd sets `$INVOCATION_ID` for every
    /// unit it starts), and whether it was asked for explicitly.
    pub fn resolve(self) -> Option<(DbusBus, bool)> {
        match self {
            DbusBus::Off => None,
            DbusBus::Auto => std::env::var_os("INVOCATION_ID")
                .filter(|v| !v.is_empty())
                .map(|_| (DbusBus::System, false)),
            b => Some((b, true)),
        }
    }
}

impl std::fmt::Display for DbusBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DbusBus::Auto => "auto",
            DbusBus::System => "system",
            DbusBus::Session => "session",
            DbusBus::Off => "off",
        })
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: "0660".into(),
            socket_group: String::new(),
            tcp_listen: String::new(),
            // Two media parts of the largest size (an image and an audio clip) and the
            // largest prompt text, with room to spare.
            max_request_bytes: 48 << 20,
            max_connections_per_uid: 64,
            max_connections: 1024,
            dbus: DbusBus::Auto,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessSection {
    /// Uids allowed to call; unset = [0] (root).
    pub allowed_uids: Option<Vec<u32>>,
    /// Groups (names or numeric gids) whose members may call; unset = the socket's group.
    pub allowed_groups: Option<Vec<String>>,
    /// Groups whose members may administer (pin the governor's tier); uid 0 and gemmad's
    /// own user always may.
    pub admin_groups: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSection {
    /// Requests that may wait (the running one not counted).
    pub depth: usize,
    /// Requests one peer (uid) may have waiting or running.
    pub per_peer: usize,
    /// Requests (Generate, Tokenize, Detokenize) one peer may have being checked and
    /// tokenized at once, before they reach the queue.
    pub per_peer_preparing: usize,
}

impl Default for QueueSection {
    fn default() -> Self {
        QueueSection {
            depth: 64,
            per_peer: 16,
            per_peer_preparing: 4,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// max_tokens when a request leaves it 0.
    pub default_max_tokens: usize,
    /// Largest max_tokens a request may ask for.
    pub max_tokens: usize,
    /// Largest total text of one request's messages, in bytes.
    pub max_prompt_bytes: usize,
    /// Most messages in one request.
    pub max_messages: usize,
    /// Most parts in one message, and in all of a request's messages.
    pub max_parts_per_message: usize,
    pub max_parts: usize,
    /// Most image and audio parts in one request.
    pub max_media_parts: usize,
    /// Most stop strings, and the longest one in bytes.
    pub max_stop_strings: usize,
    pub max_stop_bytes: usize,
    /// Largest image and audio part in bytes.
    pub max_image_bytes: usize,
    pub max_audio_bytes: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            default_max_tokens: 512,
            max_tokens: 8192,
            max_prompt_bytes: 1 << 20,
            max_messages: 256,
            max_parts_per_message: 64,
            max_parts: 1024,
            max_media_parts: 16,
            max_stop_strings: 16,
            max_stop_bytes: 256,
            max_image_bytes: 20 << 20,
            max_audio_bytes: 20 << 20,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InFlight {
    /// Let queued and running requests finish within the grace period.
    #[default]
    Finish,
    /// End them at once with UNAVAILABLE.
    Cancel,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSection {
    pub in_flight: InFlight,
    /// Seconds to wait for in-flight requests before cancelling them.
    pub grace_period_s: f64,
}

impl Default for ShutdownSection {
    fn default() -> Self {
        ShutdownSection {
            in_flight: InFlight::Finish,
            grace_period_s: 10.0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// tracing EnvFilter syntax; `--log` / GEMMAD_LOG override.
    pub level: String,
    /// "text" or "json".
    pub format: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

impl Config {
    /// Reads `path`. A missing file is the all-defaults config only when `path` is the
    /// default location (a file named on the command line must exist).
    pub fn load(path: &Path, explicit: bool) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read config {}", path.display()))
            }
        };
        Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses and validates the text of a config file.
    pub fn parse(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.socket_mode()?;
        self.governor
            .policy
            .validate()
            .map_err(|e| anyhow::anyhow!("governor.policy: {e}"))?;
        self.model.quant()?;
        self.model.ple_mode()?;
        self.model.isa()?;
        if self.model.threads > gemmad_engine::MAX_THREADS {
            bail!(
                "model.threads {} is more than {} (0 = all CPUs)",
                self.model.threads,
                gemmad_engine::MAX_THREADS
            );
        }
        if self.queue.depth == 0 || self.queue.per_peer == 0 || self.queue.per_peer_preparing == 0 {
            bail!("queue.depth, queue.per_peer and queue.per_peer_preparing must be at least 1");
        }
        let l = &self.limits;
        if l.max_tokens == 0 || l.default_max_tokens == 0 || l.default_max_tokens > l.max_tokens {
            bail!("limits: need 1 <= default_max_tokens <= max_tokens");
        }
        let grace = self.shutdown.grace_period_s;
        if !grace.is_finite() || !(0.0..=MAX_GRACE_S).contains(&grace) {
            bail!("shutdown.grace_period_s must be in 0..={MAX_GRACE_S} seconds, got {grace}");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!(
                "log.format must be \"text\" or \"json\", got {:?}",
                self.log.format
            );
        }
        if !self.server.tcp_listen.is_empty() {
            self.server
                .tcp_listen
                .parse::<std::net::SocketAddr>()
                .with_context(|| format!("server.tcp_listen {:?}", self.server.tcp_listen))?;
        }
        if self.server.max_request_bytes < 1024 {
            bail!("server.max_request_bytes must be at least 1024");
        }
        if self.server.max_connections_per_uid == 0 || self.server.max_connections == 0 {
            bail!("server.max_connections_per_uid and server.max_connections must be at least 1");
        }
        if self.http.enabled {
            self.http.validate()?;
        }
        Ok(())
    }

    pub fn socket_mode(&self) -> Result<u32> {
        let s = self.server.socket_mode.trim_start_matches("0o");
        match u32::from_str_radix(s, 8) {
            Ok(m) if m <= 0o777 => Ok(m),
            _ => bail!(
                "server.socket_mode must be an octal mode such as \"0660\", got {:?}",
                self.server.socket_mode
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_all_defaults() {
        let c: Config = toml::from_str("").unwrap();
        c.validate().unwrap();
        assert_eq!(c.server.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.socket_mode().unwrap(), 0o660);
        assert_eq!(c.queue.depth, 64);
        assert_eq!(c.shutdown.in_flight, InFlight::Finish);
    }

    #[test]
    fn example_file_parses_and_matches_defaults() {
        let text = include_str!("../../systemd/gemmad.toml");
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
        let d = Config::default();
        assert_eq!(c.governor, d.governor);
        assert_eq!(c.server.socket, d.server.socket);
        assert_eq!(
            (c.server.max_connections_per_uid, c.server.max_connections),
            (d.server.max_connections_per_uid, d.server.max_connections)
        );
        assert_eq!(c.server.max_request_bytes, d.server.max_request_bytes);
        assert_eq!(c.server.dbus, d.server.dbus);
        assert_eq!(c.queue.depth, d.queue.depth);
        assert_eq!(c.queue.per_peer, d.queue.per_peer);
        assert_eq!(c.queue.per_peer_preparing, d.queue.per_peer_preparing);
        // Every [limits] key states the code's default.
        let (l, dl) = (&c.limits, &d.limits);
        assert_eq!(
            (l.max_tokens, l.default_max_tokens, l.max_prompt_bytes),
            (dl.max_tokens, dl.default_max_tokens, dl.max_prompt_bytes)
        );
        assert_eq!(
            (l.max_messages, l.max_parts_per_message, l.max_parts),
            (dl.max_messages, dl.max_parts_per_message, dl.max_parts)
        );
        assert_eq!(
            (l.max_media_parts, l.max_stop_strings, l.max_stop_bytes),
            (dl.max_media_parts, dl.max_stop_strings, dl.max_stop_bytes)
        );
        assert_eq!(
            (l.max_image_bytes, l.max_audio_bytes),
            (dl.max_image_bytes, dl.max_audio_bytes)
        );
        assert_eq!(c.shutdown.grace_period_s, d.shutdown.grace_period_s);
        // Every [model] key states the code's default.
        let (m, dm) = (&c.model, &d.model);
        assert_eq!(m.cache_dir(), dm.cache_dir());
        assert_eq!(
            (m.max_context, m.threads, m.pack),
            (dm.max_context, dm.threads, dm.pack)
        );
        assert_eq!(m.quant().unwrap(), dm.quant().unwrap());
        assert_eq!(m.ple_mode().unwrap(), dm.ple_mode().unwrap());
        assert_eq!(m.isa().unwrap(), dm.isa().unwrap());
        assert_eq!(m.store, dm.store);
        // Every [http] key states the code's default.
        let (h, dh) = (&c.http, &d.http);
        assert_eq!(
            (
                h.enabled,
                &h.socket,
                &h.tcp_listen,
                &h.api_key,
                &h.api_key_file
            ),
            (
                dh.enabled,
                &dh.socket,
                &dh.tcp_listen,
                &dh.api_key,
                &dh.api_key_file
            )
        );
    }

    #[test]
    fn http_socket_and_tcp_rules() {
        let d = HttpSection::default();
        assert_eq!(
            d.socket_path(Path::new("/run/gemmad/gemmad.sock")),
            PathBuf::from("/run/gemmad/gemmad-http.sock")
        );
        assert_eq!(
            d.socket_path(Path::new("/tmp/x/a.sock")),
            PathBuf::from("/tmp/x/a-http.sock")
        );
        for (bad, what) in [
            ("[http]\ntcp_listen = \"127.0.0.1:8080\"", "requires a key"),
            (
                "[http]\ntcp_listen = \"0.0.0.0:8080\"\napi_key = \"k\"",
                "not a loopback",
            ),
            (
                "[http]\ntcp_listen = \"nonsense\"\napi_key = \"k\"",
                "tcp_listen",
            ),
            ("[http]\napi_key = \"k\"\napi_key_file = \"/k\"", "not both"),
        ] {
            let c: Config = toml::from_str(bad).unwrap();
            let e = format!("{:#}", c.validate().unwrap_err());
            assert!(e.contains(what), "{bad}: {e}");
        }
        for ok in [
            "[http]\ntcp_listen = \"127.0.0.1:8080\"\napi_key = \"k\"",
            "[http]\ntcp_listen = \"[::1]:8080\"\napi_key_file = \"/etc/gemmad/key\"",
            "[http]\nenabled = false\ntcp_listen = \"0.0.0.0:1\"",
        ] {
            let c: Config = toml::from_str(ok).unwrap();
            c.validate().unwrap();
        }
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(toml::from_str::<Config>("[queue]\ndepht = 3").is_err());
        let c: Config = toml::from_str("[server]\nsocket_mode = \"999\"").unwrap();
        assert!(c.validate().is_err());
        let c: Config = toml::from_str("[queue]\ndepth = 0").unwrap();
        assert!(c.validate().is_err());
        let c: Config = toml::from_str("[shutdown]\nin_flight = \"cancel\"").unwrap();
        assert_eq!(c.shutdown.in_flight, InFlight::Cancel);
        // Values that once panicked or aborted far from where they were read.
        for (bad, what) in [
            ("[shutdown]\ngrace_period_s = 1e300", "grace_period_s"),
            ("[shutdown]\ngrace_period_s = -1.0", "grace_period_s"),
            ("[model]\nthreads = 100000", "model.threads"),
            ("[model]\nisa = \"sse9\"", "model.isa"),
            (
                "[server]\nmax_connections_per_uid = 0",
                "max_connections_per_uid",
            ),
            ("[server]\nmax_connections = 0", "max_connections"),
        ] {
            let c: Config = toml::from_str(bad).unwrap();
            let e = c.validate().unwrap_err();
            assert!(format!("{e:#}").contains(what), "{bad}: {e:#}");
        }
        let c: Config = toml::from_str("[shutdown]\ngrace_period_s = 86400.0").unwrap();
        c.validate().unwrap();
    }
}
