//! The one harness for gemmad's end-to-end tests (`tests/tests/*.rs`) and the serving
//! benchmarks (`bench/serving`): start the real `gemmad serve` on a temporary socket with
//! a given config, wait until it accepts connections, talk to it, signal it, stop it.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let d = gemmad_e2e::Daemon::start("[model]\nthreads = 1\n")?;
//! let mut c = d.client().await?;
//! c.status().await?;
//! # Ok(()) }
//! ```
//!
//! For the D-Bus front end: [`PrivateBus`] runs a test's own `dbus-daemon`, and
//! [`DaemonBuilder::dbus`] serves on it (`--dbus session`) and waits for the name:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let bus = gemmad_e2e::PrivateBus::session()?;
//! let d = gemmad_e2e::Daemon::builder().dbus(&bus).start()?;
//! let conn = bus.connect().await?;
//! # Ok(()) }
//! ```
//!
//! # Where the binaries come from
//!
//! `gemmad` and `gemmactl` belong to other packages, so cargo does not build them for this
//! crate's tests (`CARGO_BIN_EXE_*` only names a package's own binaries). On first use
//! ([`binaries`], once per process) the harness:
//!
//! 1. takes them from `$GEMMAD_BIN_DIR` when that is set, and builds nothing;
//! 2. otherwise, when run by cargo (`cargo test`, `cargo run`, `cargo bench`: cargo sets
//!    `$CARGO`), runs `$CARGO build --workspace --bins` in the same
//!    profile as the running executable (`target/release/...` -> `--profile release`)
//!    and takes the paths cargo reports. Cargo releases its build-directory lock before
//!    it runs tests, so this nested build does not block; when the outer cargo already
//!    built them it only checks that they are fresh (well under a second). The binaries
//!    are therefore always current: a test never runs a stale `gemmad`;
//! 3. otherwise (an executable run by hand, like `target/release/soak`) takes them from
//!    the executable's own target folder, and fails with "build it: cargo build -p
//!    gemmad -p gemmad-client" when one is missing.
//!
//! It never skips: a missing or unbuildable binary is an error.
//!
//! The nested build inherits the environment (`CARGO_TARGET_DIR`, `RUSTFLAGS`, ...)
//! and the workspace's cargo config, so it uses the same target folder; a
//! `--target-dir` or `--target` given on the outer cargo's command line is not seen:
//! set `GEMMAD_BIN_DIR` for such runs.
//!
//! Errors are `anyhow::Result`s (bench/serving reports them); tests call `.expect`.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
pub use gemmad_client::Client;
pub use nix::sys::signal::Signal;
pub use nix::unistd::Pid;

/// The bundled tiny checkpoint (random weights, real machinery).
pub const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../engine/tests/fixtures/text");

/// The tiny E4B-like checkpoint with MatFormer slices (`slices.csv` in it).
pub const MATFORMER_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../engine/tests/fixtures/matformer"
);

/// How long a start, an exit or a stream may take before a wait calls it a hang.
pub const HANG: Duration = Duration::from_secs(60);

/// A folder holding prebuilt `gemmad` and `gemmactl`: use those, build nothing.
pub const BIN_DIR_ENV: &str = "GEMMAD_BIN_DIR";

/// The default log filter of a started daemon (`GEMMAD_LOG`): what the tests read in logs.
pub const DEFAULT_LOG: &str = "info,gemmad=debug";

/// How long the nested `cargo build` may take (a cold build of the daemon on a small
/// machine takes minutes; past this it is taken for stuck, e.g. on a lock).
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Set to `1` (as `.ci/run` does), tests whose prerequisites are missing fail instead of
/// skipping: see [`skip`].
pub const REQUIRE_ENV: &str = "GEMMAD_REQUIRE_TEST_DATA";

/// Whether [`REQUIRE_ENV`] is `1`.
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).as_deref() == Ok("1")
}

/// For a test that cannot run on this machine (`why`: what it lacks): panics when
/// [`REQUIRE_ENV`] is `1` (CI), else prints that it skips; the test then returns.
#[track_caller]
pub fn skip(why: &str) {
    assert!(
        !required(),
        "{why}; {REQUIRE_ENV}=1, so this fails instead of skipping"
    );
    eprintln!("skipped: {why}");
}

const BUILD_HINT: &str = "build it: cargo build -p gemmad -p gemmad-client";

/// The workspace's binaries, located (and built when run by cargo) once per process.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub gemmad: PathBuf,
    pub gemmactl: PathBuf,
}

/// The binaries, found or built on first use; see the module documentation.
pub fn binaries() -> Result<&'static Binaries> {
    static BINS: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BINS.get_or_init(|| find_or_build().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// The `gemmad` binary.
pub fn gemmad() -> Result<PathBuf> {
    Ok(binaries()?.gemmad.clone())
}

/// The `gemmactl` binary.
pub fn gemmactl() -> Result<PathBuf> {
    Ok(binaries()?.gemmactl.clone())
}

fn find_or_build() -> Result<Binaries> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return in_dir(Path::new(&dir), &format!("${BIN_DIR_ENV}"));
    }
    let profile_dir = profile_dir()?;
    match std::env::var_os("CARGO") {
        Some(cargo) if !cargo.is_empty() => cargo_build(Path::new(&cargo), &profile_dir),
        _ => in_dir(&profile_dir, "this executable's target folder"),
    }
}

/// `target/<profile>` of the running executable (tests and benches live in its `deps/`).
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .with_context(|| format!("{} has no folder", exe.display()))?;
    if matches!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("deps" | "examples")
    ) {
        dir = dir.parent().unwrap_or(dir);
    }
    Ok(dir.to_path_buf())
}

fn in_dir(dir: &Path, what: &str) -> Result<Binaries> {
    let b = Binaries {
        gemmad: dir.join("gemmad"),
        gemmactl: dir.join("gemmactl"),
    };
    for p in [&b.gemmad, &b.gemmactl] {
        if !p.is_file() {
            bail!("{} not found (in {what}): {BUILD_HINT}", p.display());
        }
    }
    Ok(b)
}

/// Builds (or checks fresh) gemmad and gemmactl with `cargo` in the profile of
/// `profile_dir`, and returns the paths cargo reports.
fn cargo_build(cargo: &Path, profile_dir: &Path) -> Result<Binaries> {
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(p) => p.to_string(),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")?;
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        // The whole workspace's binaries, not just the two: `cargo test --workspace` builds
        // the engine with the features every member asks for (bench's `internals`), and a
        // build of two packages alone would rebuild the engine without them (minutes),
        // and the next `cargo test` would rebuild it again.
        .args(["build", "--workspace", "--bins"])
        .args(["--profile", &profile])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!(
        "{} build --workspace --bins --profile {profile}",
        cargo.display()
    );
    let mut child = cmd.spawn().with_context(|| format!("running {shown}"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > BUILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{shown} did not finish in {} s (stuck on a lock?); stderr:\n{}\n{BUILD_HINT} and set {BIN_DIR_ENV}",
                BUILD_TIMEOUT.as_secs(),
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        bail!("{shown} failed ({status}):\n{err}\n{BUILD_HINT}");
    }
    let mut gemmad = None;
    let mut gemmactl = None;
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = v["executable"].as_str() else {
            continue;
        };
        match v["target"]["name"].as_str() {
            Some("gemmad") => gemmad = Some(PathBuf::from(exe)),
            Some("gemmactl") => gemmactl = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    match (gemmad, gemmactl) {
        (Some(gemmad), Some(gemmactl)) => Ok(Binaries { gemmad, gemmactl }),
        _ => bail!("{shown} did not report the gemmad and gemmactl executables:\n{err}"),
    }
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            s = String::from_utf8_lossy(&b).into_owned();
        }
        s
    })
}

/// What to start: [`Daemon::builder`].
#[derive(Debug, Clone)]
pub struct DaemonBuilder {
    gemmad: Option<PathBuf>,
    model: PathBuf,
    config: String,
    env: Vec<(OsString, OsString)>,
    log: String,
    nofile_soft: Option<u64>,
    args: Vec<OsString>,
    /// The bus address the D-Bus front end serves on, when set: [`DaemonBuilder::start`]
    /// then also waits for [`DBUS_NAME`] to have an owner there.
    dbus: Option<String>,
}

impl DaemonBuilder {
    /// The binary to run (default: [`gemmad()`]).
    pub fn gemmad(mut self, path: impl Into<PathBuf>) -> Self {
        self.gemmad = Some(path.into());
        self
    }

    /// The model folder (default: [`FIXTURE`]).
    pub fn model(mut self, dir: impl Into<PathBuf>) -> Self {
        self.model = dir.into();
        self
    }

    /// The config file's text, written as is to `<dir>/gemmad.toml` (default: empty).
    pub fn config(mut self, toml: impl Into<String>) -> Self {
        self.config = toml.into();
        self
    }

    /// An environment variable for the daemon (on top of this process's environment).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The daemon's log filter, `GEMMAD_LOG` (default: [`DEFAULT_LOG`]).
    pub fn log_level(mut self, filter: impl Into<String>) -> Self {
        self.log = filter.into();
        self
    }

    /// Starts the daemon with this soft open-file limit (RLIMIT_NOFILE; the hard limit
    /// stays this process's), as a service manager would.
    pub fn nofile_soft(mut self, soft: u64) -> Self {
        self.nofile_soft = Some(soft);
        self
    }

    /// An extra argument to `gemmad serve` (after the harness's own).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Serves the D-Bus API on `bus` as the session bus: `--dbus session` with
    /// `DBUS_SESSION_BUS_ADDRESS` set to the bus. [`DaemonBuilder::start`] then returns
    /// once `org.gemmad.Gemmad1` has an owner on it.
    pub fn dbus(self, bus: &PrivateBus) -> Self {
        self.dbus_as(bus, "session", "DBUS_SESSION_BUS_ADDRESS")
    }

    /// As [`DaemonBuilder::dbus`], but as the system bus: `--dbus system` with
    /// `DBUS_SYSTEM_BUS_ADDRESS` set (for a bus with a system-like policy).
    pub fn dbus_system(self, bus: &PrivateBus) -> Self {
        self.dbus_as(bus, "system", "DBUS_SYSTEM_BUS_ADDRESS")
    }

    fn dbus_as(mut self, bus: &PrivateBus, which: &str, var: &str) -> Self {
        self.dbus = Some(bus.address().to_string());
        self.env(var, bus.address()).arg("--dbus").arg(which)
    }

    /// Starts the process and returns at once (see [`Daemon::wait_ready`]).
    pub fn spawn(self) -> Result<Daemon> {
        let gemmad = match self.gemmad {
            Some(p) => p,
            None => gemmad()?,
        };
        let dir = tempfile::Builder::new()
            .prefix("gemmad-e2e.")
            .tempdir()
            .context("creating a temporary folder")?;
        let socket = dir.path().join("gemmad.sock");
        let config = dir.path().join("gemmad.toml");
        let log = dir.path().join("log");
        // The governor watches the real machine: a test that does not configure it turns
        // it off, so the CI machine's load cannot change its daemon's tier mid-test.
        let mut text = self.config.clone();
        if !text.contains("[governor") {
            text.push_str("\n[governor]\nenabled = false\n");
        }
        std::fs::write(&config, &text).with_context(|| format!("writing {}", config.display()))?;
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(&gemmad);
        if let Some(soft) = self.nofile_soft {
            use nix::sys::resource::{getrlimit, setrlimit, Resource};
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
            let soft = soft.min(hard);
            // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing
            // else of the parent's state.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd
            .arg("serve")
            .arg("--model")
            .arg(&self.model)
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            // Only the tests that ask for D-Bus get it: under a service manager
            // (`INVOCATION_ID` set) `auto` would reach for the machine's system bus.
            .args(
                (!self.args.iter().any(|a| a == "--dbus"))
                    .then_some(["--dbus", "off"])
                    .into_iter()
                    .flatten(),
            )
            .args(&self.args)
            .env("GEMMAD_LOG", &self.log)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", gemmad.display()))?;
        Ok(Daemon {
            pid: Pid::from_raw(child.id() as i32),
            child: Some(child),
            socket,
            config,
            log,
            dir,
        })
    }

    /// Starts the process and waits until its socket accepts connections (and, with
    /// [`DaemonBuilder::dbus`], until it owns its bus name).
    pub fn start(self) -> Result<Daemon> {
        let dbus = self.dbus.clone();
        let mut d = self.spawn()?;
        d.wait_ready()?;
        if let Some(address) = dbus {
            d.wait_dbus_name(&address)?;
        }
        Ok(d)
    }
}

/// A running `gemmad serve` on a socket in its own temporary folder (which also holds
/// its config file and its log). Killed (SIGKILL) when dropped if still running; use
/// [`Daemon::stop`] for a graceful stop.
pub struct Daemon {
    child: Option<Child>,
    pid: Pid,
    socket: PathBuf,
    config: PathBuf,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// The fixture model, no extra environment, [`DEFAULT_LOG`], [`gemmad()`].
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            gemmad: None,
            model: PathBuf::from(FIXTURE),
            config: String::new(),
            env: Vec::new(),
            log: DEFAULT_LOG.to_string(),
            nofile_soft: None,
            args: Vec::new(),
            dbus: None,
        }
    }

    /// `gemmad serve` on the fixture with this config text, ready.
    pub fn start(config: &str) -> Result<Daemon> {
        Daemon::builder().config(config).start()
    }

    /// Waits until the socket accepts a connection; fails with the log if the process
    /// exits first or [`HANG`] passes.
    pub fn wait_ready(&mut self) -> Result<()> {
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            let child = self
                .child
                .as_mut()
                .context("the daemon was already waited for")?;
            if let Some(st) = child.try_wait()? {
                self.child = None;
                bail!("gemmad exited ({st}) at start; log:\n{}", self.log());
            }
            if t0.elapsed() > HANG {
                bail!(
                    "gemmad did not accept connections within {} s; log:\n{}",
                    HANG.as_secs(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until [`DBUS_NAME`] has an owner on the bus at `address`; fails with the log
    /// if the process exits first or [`HANG`] passes.
    pub fn wait_dbus_name(&mut self, address: &str) -> Result<()> {
        let waiter = {
            let address = address.to_string();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(wait_name_owner(&address, DBUS_NAME, HANG))
            })
        };
        loop {
            if waiter.is_finished() {
                let r = waiter
                    .join()
                    .map_err(|_| anyhow!("the D-Bus name waiter panicked"))?;
                return r.with_context(|| format!("gemmad's log:\n{}", self.log()));
            }
            if let Some(st) = self.poll_exit()? {
                bail!(
                    "gemmad exited ({st}) before owning {DBUS_NAME}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The socket of the OpenAI-compatible HTTP API (`[http]`, on unless the config turns
    /// it off): the daemon's default, next to the gRPC socket and named after it.
    pub fn http_socket(&self) -> PathBuf {
        self.socket.with_file_name("gemmad-http.sock")
    }

    /// The temporary folder holding the socket, the config and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file the daemon was started with (rewrite it, then SIGHUP, to reload).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The daemon's stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// A client connected to the daemon's socket.
    pub async fn client(&self) -> Result<Client> {
        Client::connect(&self.socket)
            .await
            .with_context(|| format!("connecting to {}", self.socket.display()))
    }

    /// `gemmactl --socket <this daemon's socket>`, to add arguments to and run.
    pub fn gemmactl(&self) -> Result<Command> {
        let mut c = Command::new(gemmactl()?);
        c.arg("--socket").arg(&self.socket);
        Ok(c)
    }

    /// Sends `sig` (SIGTERM, SIGHUP, ...) to the daemon.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        nix::sys::signal::kill(self.pid, sig)
            .with_context(|| format!("sending {sig} to gemmad ({})", self.pid))
    }

    /// VmRSS of the daemon process, in bytes.
    pub fn rss(&self) -> Result<u64> {
        self.proc_status_kb("VmRSS").map(|kb| kb * 1024)
    }

    /// VmHWM of the daemon process (its peak resident set so far), in bytes.
    pub fn hwm(&self) -> Result<u64> {
        self.proc_status_kb("VmHWM").map(|kb| kb * 1024)
    }

    /// Resets the daemon's VmHWM to its current VmRSS (Linux 4.0+), so that a later
    /// [`Daemon::hwm`] is the peak of what happened in between.
    pub fn reset_hwm(&self) -> Result<()> {
        let path = format!("/proc/{}/clear_refs", self.pid);
        std::fs::write(&path, "5").with_context(|| format!("writing 5 to {path}"))
    }

    /// CPU time (user + system) the daemon process has used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        // The fields after the command name, which is in parentheses and may hold spaces.
        let rest = s
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("malformed stat")?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<u64> {
            f.get(i)
                .and_then(|v| v.parse().ok())
                .context("malformed stat")
        };
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        let total = ticks(11)? + ticks(12)?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100)
            .max(1) as u64;
        Ok(Duration::from_millis(total * 1000 / hz))
    }

    fn proc_status_kb(&self, key: &str) -> Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        s.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in /proc/{}/status", self.pid))
    }

    /// The exit status, once the process has exited (then it is forgotten).
    fn poll_exit(&mut self) -> Result<Option<ExitStatus>> {
        let child = self
            .child
            .as_mut()
            .context("the daemon was already waited for")?;
        let st = child.try_wait()?;
        if st.is_some() {
            self.child = None;
        }
        Ok(st)
    }

    /// Waits (up to [`HANG`]) for the process to exit and returns its status, without
    /// blocking the async runtime, so this process's connections keep answering the
    /// daemon's shutdown.
    pub async fn wait_exit(&mut self) -> Result<ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.poll_exit()? {
                return Ok(st);
            }
            if t0.elapsed() > HANG {
                bail!(
                    "gemmad did not exit within {} s; log:\n{}",
                    HANG.as_secs(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A graceful stop: SIGTERM, then waits (blocking this thread, up to [`HANG`]) for
    /// the exit; kills it and fails if it does not exit. Close this process's clients
    /// first when they share this thread's runtime: the daemon waits for them.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.poll_exit()? {
            return Ok(st);
        }
        self.signal(Signal::SIGTERM)?;
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.poll_exit()? {
                return Ok(st);
            }
            if t0.elapsed() > HANG {
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                bail!(
                    "gemmad did not exit within {} s of SIGTERM (killed); log:\n{}",
                    HANG.as_secs(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The well-known name of gemmad's D-Bus front end (docs/dbus.md).
pub const DBUS_NAME: &str = "org.gemmad.Gemmad1";

/// The tools the D-Bus tests drive the daemon with besides zbus: the bus itself and two
/// independent command-line clients.
pub const DBUS_TOOLS: [&str; 3] = ["dbus-daemon", "busctl", "gdbus"];

/// Whether `program` is an executable file in a folder of `$PATH`.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p).any(|d| {
                std::fs::metadata(d.join(program))
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

/// For a D-Bus test: `true` when [`DBUS_TOOLS`] are all installed; otherwise [`skip`]s
/// (fails under [`REQUIRE_ENV`]) naming what is missing and returns `false`.
#[track_caller]
pub fn dbus_tools_or_skip(test: &str) -> bool {
    let missing: Vec<&str> = DBUS_TOOLS.into_iter().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return true;
    }
    skip(&format!(
        "{test} needs {} on PATH (apt-get install dbus libglib2.0-bin systemd)",
        missing.join(", ")
    ));
    false
}

/// A session bus's policy: everything may be sent, received and owned. Only this
/// process's uid may connect (dbus-daemon's default).
pub const SESSION_POLICY: &str = r#"<type>session</type>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>"#;

/// [`SESSION_POLICY`], and every uid may connect (for clients run under another uid).
pub const SESSION_POLICY_ANY_USER: &str = r#"<type>session</type>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>"#;

/// A private `dbus-daemon` of one test, listening on a socket in its own temporary
/// folder (no other test, and no bus of the machine, sees it). Stopped (SIGTERM, then
/// SIGKILL) and waited for when dropped, so no process is left behind; the folder and
/// the socket go with it.
///
/// Declare it before the [`Daemon`] that serves on it, so that the daemon is dropped
/// (killed) first.
pub struct PrivateBus {
    child: Option<Child>,
    address: String,
    config: PathBuf,
    stderr: PathBuf,
    dir: tempfile::TempDir,
}

impl PrivateBus {
    /// A bus with [`SESSION_POLICY`].
    pub fn session() -> Result<PrivateBus> {
        PrivateBus::with_config(SESSION_POLICY)
    }

    /// A bus with [`SESSION_POLICY_ANY_USER`]; its folder is readable by all, so that
    /// other uids reach the socket.
    pub fn session_any_user() -> Result<PrivateBus> {
        PrivateBus::with_config(SESSION_POLICY_ANY_USER)
    }

    /// A bus whose configuration is `body` (what goes inside `<busconfig>`: `<type>`,
    /// `<auth>`, policies, includes) plus a `<listen>` on the bus's own socket. A
    /// configuration dbus-daemon refuses fails here with its message.
    pub fn with_config(body: &str) -> Result<PrivateBus> {
        use std::io::BufRead;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("gemmad-bus.")
            .tempdir()
            .context("creating a temporary folder")?;
        // Other uids (clients run with setpriv) must reach the socket; the bus policy
        // decides who may connect.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let socket = dir.path().join("bus");
        let config = dir.path().join("bus.conf");
        let text = format!(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig>\n  \
             <listen>unix:path={}</listen>\n  {body}\n</busconfig>\n",
            socket.display()
        );
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let stderr = dir.path().join("stderr");
        let err_file = std::fs::File::create(&stderr)?;
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .context("starting dbus-daemon (apt-get install dbus)")?;
        // The address comes on stdout once the bus listens; EOF means it exited.
        let stdout = child.stdout.take().context("dbus-daemon's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let r = std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line);
            let _ = tx.send(r);
        });
        let mut bus = PrivateBus {
            child: Some(child),
            address: String::new(),
            config,
            stderr,
            dir,
        };
        match rx.recv_timeout(HANG) {
            Ok(Ok(line)) if !line.trim().is_empty() => {
                bus.address = line.trim().to_string();
                Ok(bus)
            }
            Ok(Ok(_)) => bail!(
                "dbus-daemon exited at start (config {}):\n{}",
                bus.config.display(),
                bus.stderr()
            ),
            Ok(Err(e)) => bail!("reading dbus-daemon's address: {e}\n{}", bus.stderr()),
            Err(_) => bail!(
                "dbus-daemon printed no address within {} s:\n{}",
                HANG.as_secs(),
                bus.stderr()
            ),
        }
    }

    /// The bus's address (`unix:path=...,guid=...`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The configuration file the bus runs with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The bus's temporary folder (readable by every uid).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What dbus-daemon wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// `program` with this bus as both the session and the system bus
    /// (`DBUS_SESSION_BUS_ADDRESS`, `DBUS_SYSTEM_BUS_ADDRESS`): `busctl --user ...`,
    /// `gdbus call --session ...`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .stdin(Stdio::null());
        c
    }

    /// A new connection to the bus.
    pub async fn connect(&self) -> Result<zbus::Connection> {
        zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .with_context(|| format!("connecting to the bus at {}", self.address))
    }

    /// Waits (up to [`HANG`]) until `name` has an owner on the bus.
    pub async fn wait_name_owner(&self, name: &str) -> Result<()> {
        wait_name_owner(&self.address, name, HANG).await
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(c.id() as i32);
        if nix::sys::signal::kill(pid, Signal::SIGTERM).is_ok() {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Polls `NameHasOwner(name)` on the bus at `address` until it is true or `limit` passes.
async fn wait_name_owner(address: &str, name: &str, limit: Duration) -> Result<()> {
    let conn = zbus::connection::Builder::address(address)
        .build()
        .await
        .with_context(|| format!("connecting to the bus at {address}"))?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
    let wanted = zbus::names::BusName::try_from(name)?;
    let t0 = Instant::now();
    loop {
        if dbus.name_has_owner(wanted.clone()).await? {
            return Ok(());
        }
        if t0.elapsed() > limit {
            bail!(
                "{name} has no owner on {address} after {} s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
