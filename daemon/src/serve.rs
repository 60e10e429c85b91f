//! `gemmad serve`: load the model on the inference thread, listen on the Unix socket
//! (and optionally TCP), serve gRPC until SIGTERM/SIGINT, reload settings on SIGHUP.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use gemmad_engine::{Control, LoadOptions};
use gemmad_proto::v1::gemmad_server::GemmadServer;
use tokio::signal::unix::{signal, SignalKind};
use tonic::service::InterceptorLayer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{Config, InFlight, DEFAULT_CONFIG};
use crate::core::access::{own_gid, resolve_group, Policy};
use crate::core::connections::{self, ConnectionLimits, Connections};
use crate::core::queue::Queue;
use crate::core::{engine_thread, Core, ServiceError};
use crate::grpc::{check_access, listen, GemmadService};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Checkpoint folder, or a repo id pulled into the model store (`gemmad pull`;
    /// looked up in [model].store, then the default stores). Overrides [model].dir; no
    /// default: one of the two is needed.
    #[arg(long, value_name = "DIR|REPO")]
    pub model: Option<PathBuf>,
    /// Config file (TOML). Default: /etc/gemmad/gemmad.toml, if it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Unix socket path (overrides [server].socket) [default: /run/gemmad/gemmad.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Unix socket of the OpenAI-compatible HTTP API (overrides [http].socket).
    #[arg(long, value_name = "PATH")]
    pub http_socket: Option<PathBuf>,
    /// Instruction set the kernels may use (overrides [model].isa): auto, avx512,
    /// avxvnni, avx2, neondot, neon, scalar [default: auto, the best this CPU has].
    #[arg(long, env = "GEMMAD_ISA", value_name = "ISA")]
    pub isa: Option<gemmad_engine::IsaChoice>,
    /// Repack quantized matrices for the fast kernels (overrides [model].pack); 0 keeps
    /// the row layout [default: 1].
    #[arg(long, env = "GEMMAD_PACK", value_name = "0|1")]
    pub pack: Option<u8>,
    /// MatFormer slicing file, configs.csv format (overrides [model].matformer_config)
    /// [default: none; E4B-shaped checkpoints offer Google's official table anyway].
    #[arg(long, value_name = "FILE")]
    pub matformer_config: Option<PathBuf>,
    /// MatFormer slice to serve from the start (overrides [model].slice) [default: full,
    /// the whole checkpoint].
    #[arg(long, value_name = "NAME")]
    pub slice: Option<String>,
    /// Serve the D-Bus API on this bus (overrides [server].dbus): system, session, off,
    /// or auto (the system bus when systemd started gemmad) [default: auto].
    #[arg(long, value_name = "BUS")]
    pub dbus: Option<crate::config::DbusBus>,
}

type LogHandle = reload::Handle<EnvFilter, Registry>;

fn init_logging(level: &str, json: bool) -> Result<LogHandle> {
    let filter =
        EnvFilter::try_new(level).with_context(|| format!("invalid log filter {level:?}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    // Under systemd with stderr on the journal, entries go to the journal natively: the
    // structured fields stay fields and the level becomes the priority.
    let journal = if crate::systemd::stderr_is_journal() {
        match tracing_journald::layer() {
            // journald's own meaning of the levels: info is 6, debug 7.
            Ok(l) => Some(
                l.with_syslog_identifier("gemmad".into())
                    .with_priority_mappings(tracing_journald::PriorityMappings {
                        info: tracing_journald::Priority::Informational,
                        debug: tracing_journald::Priority::Debug,
                        ..tracing_journald::PriorityMappings::new()
                    }),
            ),
            Err(e) => {
                eprintln!("gemmad: cannot reach the journal ({e}); logging to stderr");
                None
            }
        }
    } else {
        None
    };
    let fmt = if let Some(j) = journal {
        j.boxed()
    } else if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()?;
    Ok(handle)
}

/// What the command line sets over the config file, at start and at every reload.
#[derive(Clone, Debug)]
struct Overrides {
    model: Option<PathBuf>,
    socket: Option<PathBuf>,
    http_socket: Option<PathBuf>,
    isa: Option<gemmad_engine::IsaChoice>,
    pack: Option<u8>,
    matformer_config: Option<PathBuf>,
    slice: Option<String>,
    dbus: Option<crate::config::DbusBus>,
}

impl Overrides {
    fn apply(&self, cfg: &mut Config) {
        if let Some(m) = &self.model {
            cfg.model.dir = Some(m.clone());
        }
        if let Some(s) = &self.socket {
            cfg.server.socket = s.clone();
        }
        if let Some(s) = &self.http_socket {
            cfg.http.socket = s.clone();
        }
        if let Some(isa) = self.isa {
            cfg.model.isa = isa.to_string();
        }
        if let Some(p) = self.pack {
            cfg.model.pack = p != 0;
        }
        if let Some(f) = &self.matformer_config {
            cfg.model.matformer_config = Some(f.clone());
        }
        if let Some(s) = &self.slice {
            cfg.model.slice = s.clone();
        }
        if let Some(b) = self.dbus {
            cfg.server.dbus = b;
        }
    }
}

/// Runs the service until a termination signal. `log_override` is `--log`/GEMMAD_LOG.
pub fn run(args: ServeArgs, log_override: Option<String>) -> Result<()> {
    let (cfg_path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let mut cfg = Config::load(&cfg_path, explicit)?;
    let overrides = Overrides {
        model: args.model.clone(),
        socket: args.socket.clone(),
        http_socket: args.http_socket.clone(),
        isa: args.isa,
        pack: args.pack,
        matformer_config: args.matformer_config.clone(),
        slice: args.slice.clone(),
        dbus: args.dbus,
    };
    overrides.apply(&mut cfg);
    let level = log_override
        .clone()
        .unwrap_or_else(|| cfg.log.level.clone());
    let log = init_logging(&level, cfg.log.format == "json")?;
    // Before any thread starts: this edits the environment.
    let activated = crate::systemd::take_listeners().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot take the socket-activated listeners (LISTEN_FDS); binding instead");
        Vec::new()
    });
    let nofile = raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gemmad-rpc")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let r = rt.block_on(serve(
        cfg,
        cfg_path,
        explicit,
        log,
        log_override,
        overrides,
        Inherited { nofile, activated },
    ));
    rt.shutdown_timeout(Duration::from_secs(1));
    r
}

/// What the process set up before the runtime started.
struct Inherited {
    /// The open-file limit in force.
    nofile: Option<u64>,
    /// Listeners systemd passed (socket activation).
    activated: Vec<crate::systemd::Activated>,
}

/// File descriptors kept out of `server.max_connections`: the model's files, the
/// runtime's own descriptors, logs, /proc reads, cache files.
const FD_RESERVE: u64 = 128;

/// Raises the soft open-file limit to the hard one (each connection is a descriptor;
/// systemd starts services with a soft limit of 1024) and returns the soft limit in
/// force afterwards, if it could be read.
fn raise_nofile_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE)");
            return None;
        }
    };
    if soft >= hard {
        tracing::info!(soft, hard, "open-file limit (RLIMIT_NOFILE)");
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::info!(
                soft = hard,
                hard,
                was = soft,
                "open-file limit (RLIMIT_NOFILE) raised to the hard limit"
            );
            Some(hard)
        }
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE) to the hard limit; keeping the soft one");
            Some(soft)
        }
    }
}

/// The connection caps of `[server]`, the total lowered to what the open-file limit
/// `nofile` leaves room for (an accept past it would fail with EMFILE for everyone).
fn connection_limits(
    server: &crate::config::ServerSection,
    nofile: Option<u64>,
) -> ConnectionLimits {
    let mut total = server.max_connections;
    if let Some(n) = nofile {
        let room = usize::try_from(n.saturating_sub(FD_RESERVE))
            .unwrap_or(usize::MAX)
            .max(1);
        if room < total {
            tracing::warn!(
                max_connections = total,
                open_file_limit = n,
                lowered_to = room,
                "server.max_connections is more than the open-file limit leaves room for; lowered"
            );
            total = room;
        }
    }
    ConnectionLimits {
        per_uid: server.max_connections_per_uid,
        total,
    }
}

async fn serve(
    cfg: Config,
    cfg_path: PathBuf,
    cfg_explicit: bool,
    log: LogHandle,
    log_override: Option<String>,
    overrides: Overrides,
    inherited: Inherited,
) -> Result<()> {
    let Inherited { nofile, activated } = inherited;
    let sig = Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
        hup: signal(SignalKind::hangup())?,
    };
    let dir = cfg
        .model
        .dir
        .clone()
        .context("no model: pass --model DIR or set [model].dir in the config")?;
    // A repo id (`org/name`) names a checkpoint pulled into the model store.
    let dir = cfg.model.resolve_dir(&dir)?;
    let socket = cfg.server.socket.clone();
    let mode = cfg.socket_mode()?;
    let socket_gid = if cfg.server.socket_group.is_empty() {
        own_gid()
    } else {
        resolve_group(&cfg.server.socket_group).context("server.socket_group")?
    };
    let policy = Policy::from_config(&cfg.access, socket_gid)?;
    let (activated_unix, activated_tcp) = listen::activated(activated)?;
    // Fail fast on a live instance before spending time on the model.
    if activated_unix.is_none() {
        listen::preflight(&socket)?;
    }
    // The HTTP front end binds its own socket (socket activation covers gRPC only).
    let http_setup = if cfg.http.enabled {
        let path = cfg.http.socket_path(&socket);
        listen::preflight(&path).context("the HTTP socket (http.socket)")?;
        Some(crate::http::HttpSetup {
            socket: path,
            mode,
            gid: socket_gid,
            tcp_listen: cfg.http.tcp_listen.clone(),
            api_key: crate::http::listen::api_key(&cfg.http)?,
            // Media travel base64-encoded in JSON: a third more than their bytes.
            body_limit: cfg.server.max_request_bytes.saturating_mul(4) / 3 + (1 << 20),
        })
    } else {
        tracing::info!("HTTP API disabled (http.enabled = false)");
        None
    };

    let queue = Arc::new(Queue::new(cfg.queue.depth, cfg.queue.per_peer));
    let watchdog_timeout = crate::systemd::watchdog_timeout();
    // The watchdog pings every half timeout if the engine thread moved since the last:
    // an idle engine thread shows it is alive twice per ping.
    queue.set_idle_beat(watchdog_timeout.map(|t| t / 4));
    let shutting_down = Arc::new(AtomicBool::new(false));
    let opts = LoadOptions {
        max_context: (cfg.model.max_context > 0).then_some(cfg.model.max_context),
        threads: (cfg.model.threads > 0).then_some(cfg.model.threads),
        quant: cfg.model.quant()?,
        cache_dir: cfg.model.cache_dir(),
        ple: cfg.model.ple_mode()?,
        isa: cfg.model.isa()?,
        pack: cfg.model.pack,
        matformer_config: cfg.model.matformer_config.clone(),
        slice: (!cfg.model.slice.is_empty()).then(|| cfg.model.slice.clone()),
        prompt_cache: cfg.cache.options(),
        ..Default::default()
    };
    let (q, sd, d) = (queue.clone(), shutting_down.clone(), dir.clone());
    let loading = tokio::spawn(extend_while_loading(dir.clone()));
    let loaded = tokio::task::spawn_blocking(move || engine_thread::spawn(d, opts, q, sd)).await;
    loading.abort();
    let loaded = loaded.context("model loader")??;
    let progress = loaded.progress.clone();
    let worker = loaded.thread;
    let core = Arc::new(Core::new(
        loaded.handle,
        loaded.prompter,
        loaded.model,
        cfg.limits.clone(),
        policy,
        cfg.queue.per_peer_preparing,
        Connections::new(connection_limits(&cfg.server, nofile)),
    ));
    core.set_model_store(cfg.model.store());
    tokio::spawn(connections::flush_log_every_window(
        core.connections().clone(),
    ));
    // Generate and Tokenize requests are counted on the wire and checked against the
    // (reloadable) limits before prost decodes them.
    gemmad_proto::codec::set_request_check(crate::grpc::count_check(&core));
    let governor_stop = Arc::new(AtomicBool::new(false));
    let governor = if cfg.governor.enabled {
        match crate::governor::spawn(
            cfg.governor.clone(),
            core.clone(),
            tokio::runtime::Handle::current(),
            governor_stop.clone(),
        ) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the governor thread; serving without it");
                None
            }
        }
    } else {
        tracing::info!("governor disabled (governor.enabled = false)");
        None
    };

    // HTTP first: once the gRPC socket answers (what clients and tests wait for), the
    // HTTP socket does too.
    let http = match http_setup {
        Some(s) => Some(crate::http::start(core.clone(), s).await?),
        None => None,
    };
    let bound = bind_grpc(
        &cfg,
        &socket,
        mode,
        socket_gid,
        activated_unix,
        activated_tcp,
    )
    .await;
    let (unix, socket_file, tcp) = match bound {
        Ok(b) => b,
        Err(e) => {
            if let Some(h) = http {
                h.stop(Duration::ZERO).await;
            }
            return Err(e);
        }
    };
    let dbus = match cfg.server.dbus.resolve() {
        None => None,
        Some((bus, explicit)) => match crate::dbus::start(core.clone(), bus).await {
            Ok(f) => Some(f),
            Err(e) if explicit => {
                if let Some(h) = http {
                    h.stop(Duration::ZERO).await;
                }
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot serve {} on the {bus} bus",
                    crate::dbus::NAME
                )));
            }
            Err(e) => {
                tracing::warn!(bus = %bus, error = %e, "cannot serve D-Bus (server.dbus = auto); serving gRPC only");
                None
            }
        },
    };
    let watchdog = watchdog_timeout.map(|t| tokio::spawn(crate::systemd::watchdog(t, progress)));
    let result = serve_on(
        sig,
        cfg,
        cfg_path,
        cfg_explicit,
        log,
        log_override,
        Served {
            unix,
            tcp,
            http,
            socket_gid,
            queue: queue.clone(),
            core,
            shutting_down,
            overrides,
        },
    )
    .await;
    if let Some(w) = watchdog {
        w.abort();
    }
    // The server has stopped: the socket goes now, before D-Bus and the engine.
    drop(socket_file);
    if let Some(d) = dbus {
        d.stop().await;
    }
    governor_stop.store(true, Ordering::Relaxed);
    queue.stop();
    if let Some(g) = governor {
        let joined = tokio::task::spawn_blocking(move || g.join());
        if tokio::time::timeout(Duration::from_secs(5), joined)
            .await
            .is_err()
        {
            tracing::warn!("the governor thread did not stop in time");
        }
    }
    let joined = tokio::task::spawn_blocking(move || worker.join());
    if tokio::time::timeout(Duration::from_secs(10), joined)
        .await
        .is_err()
    {
        tracing::warn!("the inference thread did not stop in time");
    }
    tracing::info!("gemmad stopped");
    result
}

/// The gRPC listeners: the socket systemd passed or our own bound socket (with its file,
/// removed at exit), and the TCP listener systemd passed or `server.tcp_listen`.
async fn bind_grpc(
    cfg: &Config,
    socket: &std::path::Path,
    mode: u32,
    socket_gid: u32,
    activated_unix: Option<tokio::net::UnixListener>,
    activated_tcp: Option<tokio::net::TcpListener>,
) -> Result<(
    tokio::net::UnixListener,
    Option<listen::SocketFile>,
    Option<tokio::net::TcpListener>,
)> {
    let (unix, socket_file) = match activated_unix {
        // The socket unit owns the socket file: it stays after this process exits.
        Some(l) => {
            tracing::info!(socket = %socket.display(), "serving the socket systemd passed (socket activation)");
            (l, None)
        }
        None => {
            let (l, f) = listen::bind_unix(socket, mode, socket_gid)?;
            (l, Some(f))
        }
    };
    let tcp = if let Some(t) = activated_tcp {
        Some(t)
    } else if cfg.server.tcp_listen.is_empty() {
        None
    } else {
        let t = tokio::net::TcpListener::bind(&cfg.server.tcp_listen)
            .await
            .with_context(|| format!("cannot listen on tcp {}", cfg.server.tcp_listen))?;
        let addr = t.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::warn!(tcp = %addr, "TCP listener on: every TCP peer is allowed");
        Some(t)
    };
    Ok((unix, socket_file, tcp))
}

struct Served {
    unix: tokio::net::UnixListener,
    tcp: Option<tokio::net::TcpListener>,
    http: Option<crate::http::HttpServer>,
    socket_gid: u32,
    queue: Arc<Queue>,
    core: Arc<Core>,
    shutting_down: Arc<AtomicBool>,
    overrides: Overrides,
}

struct Reloadable {
    socket_gid: u32,
    queue: Arc<Queue>,
    core: Arc<Core>,
    overrides: Overrides,
}

/// The signals the service handles, installed before anything else so that a signal
/// during start-up is handled (as soon as serving starts) instead of killing the process.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

async fn serve_on(
    sig: Signals,
    mut cfg: Config,
    cfg_path: PathBuf,
    cfg_explicit: bool,
    log: LogHandle,
    log_override: Option<String>,
    s: Served,
) -> Result<()> {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<GemmadServer<GemmadService>>().await;
    // Both reflection versions: grpcio's reflection client and older grpcurl ask for
    // v1alpha only.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(gemmad_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .context("reflection service")?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .context("reflection service (v1alpha)")?;
    let max_msg = cfg.server.max_request_bytes;
    let svc = GemmadServer::new(GemmadService {
        core: s.core.clone(),
    })
    .max_decoding_message_size(max_msg);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let Served {
        unix,
        tcp,
        http,
        socket_gid,
        queue,
        core,
        shutting_down,
        overrides,
    } = s;
    let incoming = listen::incoming(unix, tcp, core.clone());
    let s = Reloadable {
        socket_gid,
        queue,
        core,
        overrides,
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(InterceptorLayer::new(check_access(s.core.clone())))
            .add_service(health_svc)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );
    let caps = s.core.connections().limits();
    tracing::info!(
        socket = %cfg.server.socket.display(),
        model = %s.core.model().dir.display(),
        context = s.core.context_tokens(),
        max_connections = caps.total,
        max_connections_per_uid = caps.per_uid,
        "gemmad serving"
    );
    crate::systemd::ready(&serving_status(&s.core));
    let status_task = tokio::spawn(publish_status(s.core.clone()));

    let Signals {
        mut term,
        mut int,
        mut hup,
    } = sig;
    let why = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = s.core.shutdown_requested() => break "Shutdown call",
            _ = hup.recv() => {
                crate::systemd::reloading();
                reload(&mut cfg, &cfg_path, cfg_explicit, &log, log_override.as_deref(), &s);
                crate::systemd::ready(&serving_status(&s.core));
            }
        }
    };

    // Shut down: stop admitting, finish or cancel in-flight work, stop the server.
    status_task.abort();
    crate::systemd::stopping(why);
    let sd = &cfg.shutdown;
    tracing::info!(signal = why, in_flight = ?sd.in_flight, grace_s = sd.grace_period_s, "shutting down");
    shutting_down.store(true, Ordering::Relaxed);
    s.queue.stop_accepting();
    health
        .set_not_serving::<GemmadServer<GemmadService>>()
        .await;
    let bye = ServiceError::shutting_down();
    let grace = Duration::from_secs_f64(sd.grace_period_s);
    if sd.in_flight == InFlight::Finish {
        let deadline = Instant::now() + grace;
        while !s.queue.is_idle() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let n = s.queue.cancel_all(&bye);
    if n > 0 {
        tracing::info!(cancelled = n, "cancelled waiting requests");
    }
    let _ = stop_tx.send(());
    // Requests are over by now; give connections a moment to close cleanly (a peer that
    // does not answer the HTTP/2 goaway handshake does not hold the shutdown). The HTTP
    // listener stops the same way, and its socket is removed.
    let http_stopped = async {
        if let Some(h) = http {
            h.stop(Duration::from_secs(2)).await;
        }
    };
    let (grpc_stopped, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(2), server),
        http_stopped
    );
    match grpc_stopped {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(anyhow::Error::new(e).context("gRPC server")),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("gRPC server task")),
        Err(_) => {
            tracing::warn!("connections did not close within 2 s of shutdown; leaving them");
            Ok(())
        }
    }
}

/// How long each start-up timeout extension asks for, and how often one is sent.
const EXTEND_BY: Duration = Duration::from_secs(30);
const EXTEND_EVERY: Duration = Duration::from_secs(10);

/// Keeps the service manager's start-up timeout from firing while the model loads (a
/// first start quantizes weights and builds the PLE cache, which can take minutes).
async fn extend_while_loading(dir: PathBuf) {
    let t0 = Instant::now();
    loop {
        crate::systemd::extend_timeout(
            EXTEND_BY,
            &format!(
                "loading the model from {} ({} s)",
                dir.display(),
                t0.elapsed().as_secs()
            ),
        );
        tokio::time::sleep(EXTEND_EVERY).await;
    }
}

/// The one-line status `systemctl status` shows while serving.
fn serving_status(core: &Core) -> String {
    let s = core.snapshot();
    let q = s.queue;
    let mut line = format!(
        "serving: slice {}, {} waiting, {}",
        s.engine.slice,
        q.waiting_interactive + q.waiting_background,
        if q.running { "1 running" } else { "idle" }
    );
    if let Some(g) = &s.governor {
        line.push_str(&format!(", tier {}", g.tier));
    }
    line.push_str(&format!(", {} requests done", s.requests.completed));
    line
}

/// Sends the serving status when it changes (checked every few seconds).
async fn publish_status(core: Arc<Core>) {
    if !crate::systemd::managed() {
        return;
    }
    let mut last = String::new();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let line = serving_status(&core);
        if line != last {
            crate::systemd::status(&line);
            last = line;
        }
    }
}

/// SIGHUP: re-read the config and apply what can change while serving.
fn reload(
    cfg: &mut Config,
    path: &std::path::Path,
    explicit: bool,
    log: &LogHandle,
    log_override: Option<&str>,
    s: &Reloadable,
) {
    let new = match Config::load(path, explicit) {
        Ok(mut c) => {
            // The command line still wins: compare like with like.
            s.overrides.apply(&mut c);
            c
        }
        Err(e) => {
            tracing::error!(config = %path.display(), error = format!("{e:#}"), "reload failed; keeping the current settings");
            return;
        }
    };
    let policy = match Policy::from_config(&new.access, s.socket_gid) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "reload failed ([access]); keeping the current settings"
            );
            return;
        }
    };
    s.core
        .reload(new.limits.clone(), policy, new.queue.per_peer_preparing);
    s.core.set_model_store(new.model.store());
    s.queue.set_limits(new.queue.depth, new.queue.per_peer);
    if log_override.is_none() {
        match EnvFilter::try_new(&new.log.level) {
            Ok(f) => {
                if let Err(e) = log.reload(f) {
                    tracing::warn!(error = %e, "cannot change the log level");
                }
            }
            Err(e) => tracing::warn!(error = %e, level = %new.log.level, "invalid log.level; kept"),
        }
    }
    if new.server.socket != cfg.server.socket
        || new.server.socket_mode != cfg.server.socket_mode
        || new.server.socket_group != cfg.server.socket_group
        || new.server.tcp_listen != cfg.server.tcp_listen
        || new.server.max_request_bytes != cfg.server.max_request_bytes
        || new.server.max_connections_per_uid != cfg.server.max_connections_per_uid
        || new.server.max_connections != cfg.server.max_connections
        || new.model.dir != cfg.model.dir
        || new.model.max_context != cfg.model.max_context
        || new.model.threads != cfg.model.threads
        || new.model.quant != cfg.model.quant
        || new.model.cache_dir != cfg.model.cache_dir
        || new.model.ple != cfg.model.ple
        || new.model.isa != cfg.model.isa
        || new.model.pack != cfg.model.pack
        || new.model.matformer_config != cfg.model.matformer_config
        || new.log.format != cfg.log.format
        || new.http.enabled != cfg.http.enabled
        || new.http.socket != cfg.http.socket
        || new.http.tcp_listen != cfg.http.tcp_listen
        || new.http.api_key != cfg.http.api_key
        || new.http.api_key_file != cfg.http.api_key_file
    {
        tracing::warn!("[server], [http], [model] (but model.slice) and log.format changes take effect at the next start");
    }
    let mut keep_model = cfg.model.clone();
    if new.model.slice != cfg.model.slice {
        // Switched through the engine thread between requests, as `SetSlice` does.
        let (core, name) = (s.core.clone(), new.model.slice.clone());
        tokio::spawn(async move {
            let target = if name.is_empty() {
                "full"
            } else {
                name.as_str()
            };
            let switch = Control::SetSlice {
                name: target.to_string(),
                force: false,
            };
            match core.service_control(switch).await {
                Ok(_) => tracing::info!(slice = target, "model.slice reloaded"),
                Err(e) => {
                    tracing::error!(slice = target, error = %e, "model.slice: cannot switch; keeping the current slice")
                }
            }
        });
        keep_model.slice = new.model.slice.clone();
    }
    let keep_server = cfg.server.clone();
    let keep_http = cfg.http.clone();
    let keep_format = cfg.log.format.clone();
    *cfg = new;
    cfg.server = keep_server;
    cfg.http = keep_http;
    cfg.model = keep_model;
    cfg.log.format = keep_format;
    tracing::info!(
        config = %path.display(),
        queue_depth = cfg.queue.depth,
        per_peer = cfg.queue.per_peer,
        "settings reloaded"
    );
}
