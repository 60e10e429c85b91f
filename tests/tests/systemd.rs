//! The daemon as a systemd service, against the real protocol peers: a `NOTIFY_SOCKET`
//! datagram listener (READY, STATUS, RELOADING/READY on SIGHUP, WATCHDOG pings and
//! their stop while the engine thread is held, STOPPING), `systemd-socket-activate`
//! passing the listening socket, and the journal's native protocol on a socket bound
//! where journald's would be.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gemmad_e2e::{skip, Daemon, FIXTURE, HANG};
use nix::sys::signal::Signal;

/// A `NOTIFY_SOCKET` as the service manager binds it.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Notify {
    fn new() -> Result<Notify> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path)?;
        Ok(Notify {
            sock,
            path,
            _dir: dir,
        })
    }

    /// The next message, or `None` after `within`.
    fn recv(&self, within: Duration) -> Result<Option<String>> {
        self.sock.set_read_timeout(Some(within))?;
        let mut buf = vec![0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Messages until one has `key` (returned), within [`HANG`].
    fn until(&self, key: &str) -> Result<(String, Vec<String>)> {
        let end = Instant::now() + HANG;
        let mut seen = Vec::new();
        while Instant::now() < end {
            if let Some(m) = self.recv(Duration::from_secs(1))? {
                if m.lines()
                    .any(|l| l == key || l.starts_with(&format!("{key}=")))
                {
                    return Ok((m, seen));
                }
                seen.push(m);
            }
        }
        bail!("no {key} within {HANG:?}; got {seen:?}")
    }

    /// Every message within `window`.
    fn collect(&self, window: Duration) -> Result<Vec<String>> {
        let end = Instant::now() + window;
        let mut got = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(got);
            }
            if let Some(m) = self.recv(left)? {
                got.push(m);
            }
        }
    }
}

fn pings(msgs: &[String]) -> usize {
    msgs.iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

fn value<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The watchdog timeout the tests run with: pings every 200 ms.
const WATCHDOG_USEC: &str = "400000";

#[test]
fn notify_ready_status_reload_watchdog_and_stopping() -> Result<()> {
    let n = Notify::new()?;
    let mut d = Daemon::builder()
        .env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .start()?;
    let (ready, before) = n.until("READY")?;
    // The load was announced first, with a timeout extension.
    assert!(
        before
            .iter()
            .any(|m| value(m, "EXTEND_TIMEOUT_USEC").is_some()
                && value(m, "STATUS").is_some_and(|s| s.starts_with("loading the model"))),
        "no EXTEND_TIMEOUT_USEC/loading status before READY: {before:?}"
    );
    let status = value(&ready, "STATUS").context("READY without STATUS")?;
    assert!(status.starts_with("serving: slice full"), "{status}");
    // READY only once the socket serves.
    assert!(d.socket().exists());

    // Pings keep coming every half timeout (200 ms) while the engine is idle.
    let got = n.collect(Duration::from_secs(2))?;
    let p = pings(&got);
    assert!((5..=15).contains(&p), "{p} pings in 2 s: {got:?}");

    d.signal(Signal::SIGHUP)?;
    let (reloading, _) = n.until("RELOADING")?;
    let usec: u64 = value(&reloading, "MONOTONIC_USEC")
        .context("RELOADING=1 without MONOTONIC_USEC")?
        .parse()?;
    assert!(usec > 0);
    let (ready, _) = n.until("READY")?;
    assert!(value(&ready, "STATUS").is_some_and(|s| s.starts_with("serving:")));

    d.signal(Signal::SIGTERM)?;
    let (stopping, _) = n.until("STOPPING")?;
    assert_eq!(value(&stopping, "STATUS"), Some("stopping (SIGTERM)"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let st = rt.block_on(d.wait_exit())?;
    assert!(st.success(), "{st}\n{}", d.log());
    Ok(())
}

/// The thread id of the daemon's engine thread.
fn engine_tid(pid: nix::unistd::Pid) -> Result<nix::unistd::Pid> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let t = t?;
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "gemmad-inferenc" || comm.trim() == "gemmad-inference" {
            let tid: i32 = t.file_name().to_string_lossy().parse()?;
            return Ok(nix::unistd::Pid::from_raw(tid));
        }
    }
    bail!("no gemmad-inference thread in /proc/{pid}/task")
}

#[test]
fn watchdog_pings_stop_while_the_engine_thread_is_held() -> Result<()> {
    use nix::sys::ptrace;
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let n = Notify::new()?;
    let d = Daemon::builder()
        .env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .start()?;
    n.until("READY")?;
    assert!(pings(&n.collect(Duration::from_secs(1))?) >= 2);

    // Stop only the engine thread (ptrace stops one thread; a signal would stop all):
    // the rest of the daemon runs on, but the engine shows no progress.
    let tid = engine_tid(d.pid())?;
    if let Err(e) = ptrace::seize(tid, ptrace::Options::empty()) {
        skip(&format!(
            "cannot ptrace the engine thread ({e}): no CAP_SYS_PTRACE here"
        ));
        return Ok(());
    }
    ptrace::interrupt(tid)?;
    waitpid(tid, Some(WaitPidFlag::__WALL))?;
    // A ping already decided may still arrive; then none.
    let _ = n.collect(Duration::from_millis(500))?;
    let held = n.collect(Duration::from_millis(1500))?;
    let p_held = pings(&held);
    ptrace::detach(tid, None)?;
    assert_eq!(
        p_held, 0,
        "pings while the engine thread was held: {held:?}"
    );
    assert!(
        d.log().contains("watchdog pings withheld"),
        "no log line for the withheld pings\n{}",
        d.log()
    );
    // Released, it beats again and the pings resume.
    let after = n.collect(Duration::from_secs(1))?;
    assert!(pings(&after) >= 2, "pings did not resume: {after:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_activation_serves_the_passed_socket() -> Result<()> {
    if !gemmad_e2e::on_path("systemd-socket-activate") {
        skip("systemd-socket-activate is not installed (package systemd)");
        return Ok(());
    }
    let gemmad = gemmad_e2e::gemmad()?;
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("gemmad.sock");
    let cfg = dir.path().join("gemmad.toml");
    std::fs::write(&cfg, "[governor]\nenabled = false\n")?;
    let n = Notify::new()?;
    let log = std::fs::File::create(dir.path().join("log"))?;
    // systemd-socket-activate binds, waits for the first connection, then execs gemmad
    // with the socket as fd 3 (LISTEN_FDS=1, LISTEN_FDNAMES=grpc).
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg("--fdname=grpc")
        .arg("-E")
        .arg("NOTIFY_SOCKET")
        .arg("-E")
        .arg("GEMMAD_LOG")
        .arg(&gemmad)
        .args(["serve", "--dbus", "off", "--model", FIXTURE, "--config"])
        .arg(&cfg)
        .arg("--socket")
        .arg(&sock)
        .env("NOTIFY_SOCKET", &n.path)
        .env("GEMMAD_LOG", "info,gemmad=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let end = Instant::now() + HANG;
    while !sock.exists() {
        if Instant::now() > end {
            let _ = child.kill();
            bail!("systemd-socket-activate did not bind {}", sock.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first client starts the service; its call waits in the socket's backlog.
    let t0 = Instant::now();
    let mut c = gemmad_client::Client::connect(&sock).await?;
    let out = c.generate_text(gemmad_client::user_prompt("Hello")).await?;
    let first_reply = t0.elapsed();
    assert!(!out.token_ids.is_empty(), "{out:?}");
    let log_text = || std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    assert!(
        log_text().contains("socket activation"),
        "the daemon bound its own socket instead of using the passed one\n{}",
        log_text()
    );
    let ready = n.until("READY")?.0;
    assert!(value(&ready, "STATUS").is_some());
    eprintln!("socket activation: connect to first reply {first_reply:?}");
    drop(c);
    // The exec'd gemmad has the activator's pid.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )?;
    let st = tokio::task::spawn_blocking(move || child.wait()).await??;
    assert!(st.success(), "{st}\n{}", log_text());
    // The socket belongs to the socket unit: it stays for the next start.
    assert!(
        sock.exists(),
        "the daemon removed the socket it did not create"
    );
    Ok(())
}

/// The datagrams a native-journal client sent to `sock`.
fn journal_entries(sock: &UnixDatagram, within: Duration) -> Result<Vec<Vec<u8>>> {
    let end = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(got);
        }
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match sock.recv(&mut buf) {
            Ok(n) => got.push(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(got)
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// One datagram of the journal's native protocol: `KEY=value\n`, or `KEY\n`, a 64-bit
/// little-endian length, the value and `\n` for values that may hold newlines.
fn parse_entry(mut b: &[u8]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let end = b
            .iter()
            .position(|&c| c == b'\n' || c == b'=')
            .context("a field without an end")?;
        let key = String::from_utf8(b[..end].to_vec())?;
        anyhow::ensure!(
            !key.is_empty()
                && key
                    .bytes()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_'),
            "bad journal field name {key:?}"
        );
        let rest = &b[end + 1..];
        if b[end] == b'=' {
            let nl = rest
                .iter()
                .position(|&c| c == b'\n')
                .context("no newline")?;
            out.push((key, String::from_utf8_lossy(&rest[..nl]).into_owned()));
            b = &rest[nl + 1..];
        } else {
            anyhow::ensure!(rest.len() >= 8, "short length of {key}");
            let len = usize::try_from(u64::from_le_bytes(rest[..8].try_into()?))?;
            let rest = &rest[8..];
            anyhow::ensure!(rest.len() > len && rest[len] == b'\n', "bad value of {key}");
            out.push((key, String::from_utf8_lossy(&rest[..len]).into_owned()));
            b = &rest[len + 1..];
        }
    }
    Ok(out)
}

#[test]
fn journal_stream_gets_native_entries_with_fields() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !gemmad_e2e::on_path("unshare") {
        skip("unshare is not installed (package util-linux)");
        return Ok(());
    }
    let gemmad = gemmad_e2e::gemmad()?;
    let dir = tempfile::tempdir()?;
    let jdir = dir.path().join("journal");
    std::fs::create_dir(&jdir)?;
    let jsock = UnixDatagram::bind(jdir.join("socket"))?;
    let cfg = dir.path().join("gemmad.toml");
    std::fs::write(&cfg, "[governor]\nenabled = false\n")?;
    let sock = dir.path().join("gemmad.sock");
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path)?;
    let meta = std::fs::metadata(&stderr_path)?;
    // JOURNAL_STREAM names stderr's device and inode, as systemd sets it when stderr is
    // the journal; journald's socket path is this test's socket, bound in a private
    // mount namespace so that nothing outside the daemon sees it.
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
         mount --bind {} /run/systemd/journal && exec \"$@\"",
        jdir.display()
    );
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(&gemmad)
        .args(["serve", "--dbus", "off", "--model", FIXTURE, "--config"])
        .arg(&cfg)
        .arg("--socket")
        .arg(&sock)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("GEMMAD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()?;
    let entries = journal_entries(&jsock, Duration::from_secs(10))?;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    );
    let _ = child.wait();
    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    if entries.is_empty() && err.contains("unshare") {
        skip(&format!(
            "cannot make a private mount namespace here: {err}"
        ));
        return Ok(());
    }
    let parsed: Vec<Vec<(String, String)>> = entries
        .iter()
        .filter(|e| !e.is_empty())
        .map(|e| parse_entry(e))
        .collect::<Result<_>>()?;
    let field = |e: &[(String, String)], k: &str| {
        e.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    };
    let serving = parsed
        .iter()
        .find(|e| field(e, "MESSAGE").as_deref() == Some("gemmad serving"))
        .with_context(|| {
            format!("no 'gemmad serving' entry in the journal: {parsed:?}\nstderr: {err}")
        })?;
    // Native fields: the level as its syslog priority (info = 6), the identifier, the
    // source, and the event's own structured fields as journal fields.
    assert_eq!(
        field(serving, "PRIORITY").as_deref(),
        Some("6"),
        "{serving:?}"
    );
    assert_eq!(
        field(serving, "SYSLOG_IDENTIFIER").as_deref(),
        Some("gemmad")
    );
    assert_eq!(
        field(serving, "CODE_FILE").as_deref(),
        Some("daemon/src/serve.rs")
    );
    assert_eq!(
        field(serving, "F_SOCKET"),
        Some(sock.display().to_string()),
        "no structured socket field: {serving:?}"
    );
    // Nothing went to stderr as text: the journal got it.
    assert!(
        !err.contains("gemmad serving"),
        "the log went to stderr as text too: {err}"
    );
    Ok(())
}
