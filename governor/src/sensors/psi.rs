//! PSI triggers: the kernel wakes us when memory stalls exceed a threshold, so the
//! governor reacts within a window instead of at its next poll. Also systemd's memory
//! pressure protocol (`MemoryPressureWatch=`, systemd ≥ 254), which hands the service a
//! watch path and the trigger bytes to write in `$MEMORY_PRESSURE_WATCH` and
//! `$MEMORY_PRESSURE_WRITE`.
//!
//! Kernel rules worth knowing (psi.rst, `psi_trigger_create()`): without
//! `CAP_SYS_RESOURCE` the window must be a multiple of 2 s (`EINVAL` otherwise); the
//! window is at most 10 s and the stall at most the window; notifications are limited to
//! one per window; the first event after arming may come on an idle system.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// What readiness means an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// A PSI file (procfs or cgroupfs): `POLLPRI`; never `read()` it.
    Priority,
    /// A FIFO, character device or `AF_UNIX` stream socket given by systemd: `POLLIN`,
    /// then read and discard what arrived.
    Readable,
}

/// An armed memory pressure watch. Dropping it closes the fd, which de-registers the
/// kernel trigger.
#[derive(Debug)]
pub struct PsiTrigger {
    file: File,
    path: PathBuf,
    wake: Wake,
}

impl PsiTrigger {
    /// Arms a trigger on a PSI file (`/proc/pressure/memory`, a cgroup's
    /// `memory.pressure`): fires when tasks stalled for `stall_us` within any `window_us`.
    /// `some_or_full` is `"some"` (at least one task stalled) or `"full"` (all non-idle
    /// tasks stalled). Errors are the kernel's: `EINVAL` for a window it refuses (not a
    /// multiple of 2 s without `CAP_SYS_RESOURCE`), `EOPNOTSUPP` when PSI is disabled,
    /// `ENOENT` without PSI, `EACCES`/`EROFS` for a cgroup file we may not write.
    pub fn register(
        path: impl AsRef<Path>,
        some_or_full: &str,
        stall_us: u32,
        window_us: u32,
    ) -> io::Result<PsiTrigger> {
        if some_or_full != "some" && some_or_full != "full" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("PSI trigger kind must be \"some\" or \"full\", not {some_or_full:?}"),
            ));
        }
        // The trailing NUL is required: the kernel copies the write and overwrites its last
        // byte with a terminator (`psi_write()`), so "some 150000 2000000" would arm a
        // 200 ms window (EINVAL unprivileged, silently wrong privileged).
        let spec = format!("{some_or_full} {stall_us} {window_us}\0");
        let path = path.as_ref();
        let file = open_and_write(path, spec.as_bytes())?;
        Ok(PsiTrigger {
            file,
            path: path.to_path_buf(),
            wake: Wake::Priority,
        })
    }

    /// The watch systemd configured for this service:
    /// - `None`: `$MEMORY_PRESSURE_WATCH` is unset (no systemd ≥ 254, or
    ///   `MemoryPressureWatch=skip`): arm a trigger of our own;
    /// - `Some(Err(_))` of kind [`io::ErrorKind::Unsupported`]: the service manager disabled
    ///   pressure watching (`/dev/null` or empty, `MemoryPressureWatch=no`): arm nothing;
    /// - `Some(Err(_))` otherwise: the watch is set but unusable (relative path, bad
    ///   Base64 in `$MEMORY_PRESSURE_WRITE`, open/connect/write failed);
    /// - `Some(Ok(_))`: armed.
    pub fn from_systemd_env() -> Option<io::Result<PsiTrigger>> {
        from_env_values(
            std::env::var_os("MEMORY_PRESSURE_WATCH"),
            std::env::var_os("MEMORY_PRESSURE_WRITE"),
        )
    }

    /// Waits up to `timeout` for an event. `Ok(true)`: pressure was reported;
    /// `Ok(false)`: the timeout passed. An error means the watch is gone for good (its
    /// cgroup was removed, systemd's socket closed): stop waiting on it.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        // `None`: a timeout too long to represent is "forever".
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            let mut fds = [PollFd::new(self.file.as_fd(), self.poll_flags())];
            match poll(&mut fds, poll_timeout(left)) {
                // A signal: wait out the rest of the timeout.
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(0) => return Ok(false),
                Ok(_) => {}
            }
            return self.handle(fds[0].revents().unwrap_or(PollFlags::empty()));
        }
    }

    /// The events to `poll(2)` this watch's fd for, to wait on it together with other
    /// fds; pass what came back to [`PsiTrigger::handle`].
    pub fn poll_flags(&self) -> PollFlags {
        match self.wake {
            Wake::Priority => PollFlags::POLLPRI,
            Wake::Readable => PollFlags::POLLIN,
        }
    }

    /// Consumes what `poll(2)` reported for this watch's fd (`revents`): `Ok(true)` for a
    /// pressure event (a readable watch is drained), `Ok(false)` for none. An error means
    /// the watch is gone for good, as for [`PsiTrigger::wait`]. Polling the PSI file
    /// itself consumed a `POLLPRI` event.
    pub fn handle(&self, revents: PollFlags) -> io::Result<bool> {
        // The kernel reports POLLERR (with POLLPRI) once the trigger's source is gone;
        // for a stream, POLLHUP/POLLERR mean the peer left.
        if revents.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
            return Err(io::Error::other(format!(
                "memory pressure watch {} is gone ({revents:?})",
                self.path.display()
            )));
        }
        match self.wake {
            Wake::Priority => Ok(revents.contains(PollFlags::POLLPRI)),
            Wake::Readable if revents.contains(PollFlags::POLLIN) => self.drain(),
            Wake::Readable if revents.contains(PollFlags::POLLHUP) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("memory pressure watch {} hung up", self.path.display()),
            )),
            Wake::Readable => Ok(false),
        }
    }

    /// The watched path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the fd signals events as readable (`POLLIN`, FIFO/socket) rather than
    /// `POLLPRI` (PSI file), for registering it with an event loop instead of calling
    /// `wait` (tokio: `Interest::READABLE` vs `Interest::PRIORITY`). After such a wakeup,
    /// `wait(Duration::ZERO)` consumes the event (drains a readable watch).
    pub fn wakes_readable(&self) -> bool {
        self.wake == Wake::Readable
    }

    /// Reads and discards what a FIFO/socket watch delivered (the protocol carries no
    /// payload we use). `Ok(true)`: something arrived.
    fn drain(&self) -> io::Result<bool> {
        let mut buf = [0u8; 256];
        let mut got = false;
        loop {
            match (&self.file).read(&mut buf) {
                Ok(0) if !got => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("memory pressure watch {} closed", self.path.display()),
                    ))
                }
                Ok(0) => return Ok(true),
                Ok(_) => got = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for PsiTrigger {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for PsiTrigger {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// `poll` takes whole milliseconds; round up so a short timeout does not become a busy
/// zero-timeout poll.
fn poll_timeout(d: Duration) -> PollTimeout {
    let ms = d.as_micros().div_ceil(1000);
    u32::try_from(ms)
        .ok()
        .and_then(|ms| PollTimeout::try_from(ms).ok())
        .unwrap_or(PollTimeout::MAX)
}

/// Opens `path` non-blocking, read-write when there is something to write (PSI needs the
/// trigger written on the fd it polls), and writes `bytes` in one `write`.
fn open_and_write(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(!bytes.is_empty())
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    if !bytes.is_empty() {
        file.write_all(bytes)?;
    }
    Ok(file)
}

/// systemd's watch protocol (docs/PRESSURE.md, sd-event's memory pressure source), with
/// the environment passed in so tests need not touch the process environment.
fn from_env_values(
    watch: Option<OsString>,
    write: Option<OsString>,
) -> Option<io::Result<PsiTrigger>> {
    let watch = watch?;
    Some(arm_systemd_watch(watch, write))
}

fn arm_systemd_watch(watch: OsString, write: Option<OsString>) -> io::Result<PsiTrigger> {
    if watch.is_empty() || watch == "/dev/null" {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "memory pressure watching is disabled by the service manager ($MEMORY_PRESSURE_WATCH)",
        ));
    }
    let path = PathBuf::from(watch);
    if !path.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "$MEMORY_PRESSURE_WATCH is not an absolute path: {}",
                path.display()
            ),
        ));
    }
    let bytes = match write {
        None => Vec::new(),
        Some(w) => w.to_str().and_then(decode_base64).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "$MEMORY_PRESSURE_WRITE is not valid Base64",
            )
        })?,
    };
    let kind = std::fs::metadata(&path)?.file_type();
    let (file, wake) = if kind.is_socket() {
        // Connect and write blocking (a few bytes to a local peer), then go non-blocking
        // for the drain reads.
        let mut s = UnixStream::connect(&path)?;
        s.write_all(&bytes)?;
        s.set_nonblocking(true)?;
        (File::from(OwnedFd::from(s)), Wake::Readable)
    } else if kind.is_file() {
        (open_and_write(&path, &bytes)?, Wake::Priority)
    } else if kind.is_fifo() || kind.is_char_device() {
        (open_and_write(&path, &bytes)?, Wake::Readable)
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "$MEMORY_PRESSURE_WATCH is not a file, FIFO or socket: {}",
                path.display()
            ),
        ));
    };
    Ok(PsiTrigger { file, path, wake })
}

/// Standard Base64 (RFC 4648, `+/`, `=` padding optional), ignoring whitespace as
/// systemd's `unbase64mem` does. `None` on anything else.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits, mut chars, mut pad) = (0u32, 0u32, 0usize, 0usize);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            pad += 1;
            continue;
        }
        if pad > 0 {
            return None; // data after padding
        }
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        chars += 1;
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // One character of a group carries 6 bits, not a byte; padding must complete a group.
    let bad_tail = chars % 4 == 1;
    let bad_pad = pad > 2 || (pad > 0 && (chars + pad) % 4 != 0);
    (!bad_tail && !bad_pad).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    #[test]
    fn base64_decodes_systemd_default() {
        assert_eq!(
            decode_base64("c29tZSAyMDAwMDAgMjAwMDAwMAA=").as_deref(),
            Some(&b"some 200000 2000000\0"[..])
        );
        assert_eq!(decode_base64("").as_deref(), Some(&b""[..]));
        assert_eq!(decode_base64("Zg==").as_deref(), Some(&b"f"[..]));
        assert_eq!(decode_base64("Zm8").as_deref(), Some(&b"fo"[..]));
        assert_eq!(decode_base64(" Zm9v\n").as_deref(), Some(&b"foo"[..]));
        assert_eq!(decode_base64("+/8="), Some(vec![0xfb, 0xff]));
        for bad in ["Z", "Zg=", "Zg===", "Zg==Zg==", "Zm9v*", "ä"] {
            assert_eq!(decode_base64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn register_validates_kind_and_path() {
        let e = PsiTrigger::register("/proc/pressure/memory", "most", 1, 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let d = tempfile::tempdir().unwrap();
        let e =
            PsiTrigger::register(d.path().join("none"), "some", 150_000, 2_000_000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn systemd_env_unset_disabled_and_invalid() {
        assert!(from_env_values(None, None).is_none());
        for disabled in ["/dev/null", ""] {
            let e = from_env_values(Some(disabled.into()), None)
                .unwrap()
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{disabled:?}");
        }
        let e = from_env_values(Some("proc/pressure/memory".into()), None)
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = from_env_values(
            Some("/proc/pressure/memory".into()),
            Some("not base64!".into()),
        )
        .unwrap()
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let d = tempfile::tempdir().unwrap();
        let e = from_env_values(Some(d.path().join("none").into()), None)
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = from_env_values(Some(d.path().into()), None)
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    /// systemd may hand a socket: we connect, write the decoded bytes, and every message
    /// from the peer is one event; the peer closing ends the watch.
    #[test]
    fn systemd_socket_watch() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("pressure.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let t = from_env_values(
            Some(sock.clone().into()),
            Some("c29tZSAyMDAwMDAgMjAwMDAwMAA=".into()),
        )
        .unwrap()
        .unwrap();
        assert!(t.wakes_readable());
        assert_eq!(t.path(), sock);
        let (mut peer, _) = listener.accept().unwrap();
        let mut got = [0u8; 20];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"some 200000 2000000\0");

        assert!(!t.wait(Duration::from_millis(20)).unwrap());
        peer.write_all(b"pressure!").unwrap();
        assert!(t.wait(Duration::from_secs(5)).unwrap());
        // Drained: no second event from the same message.
        assert!(!t.wait(Duration::from_millis(20)).unwrap());
        drop(peer);
        assert!(t.wait(Duration::from_secs(5)).is_err());
    }

    /// A FIFO: events are readable data, drained on each wait.
    #[test]
    fn systemd_fifo_watch() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("pressure.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let t = from_env_values(Some(fifo.clone().into()), None)
            .unwrap()
            .unwrap();
        assert!(t.wakes_readable());
        assert!(!t.wait(Duration::from_millis(20)).unwrap());
        let mut writer = OpenOptions::new().write(true).open(&fifo).unwrap();
        writer.write_all(b"x").unwrap();
        assert!(t.wait(Duration::from_secs(5)).unwrap());
        assert!(!t.wait(Duration::from_millis(20)).unwrap());
    }

    /// A regular file that is not a PSI file never signals POLLPRI: `wait` times out.
    #[test]
    fn plain_file_never_fires() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("memory.pressure");
        std::fs::write(&f, "").unwrap();
        let t = PsiTrigger::register(&f, "some", 150_000, 2_000_000).unwrap();
        assert!(!t.wakes_readable());
        let start = Instant::now();
        assert!(!t.wait(Duration::from_millis(50)).unwrap());
        assert!(start.elapsed() >= Duration::from_millis(50));
        // What a PSI file would have received.
        assert_eq!(std::fs::read(&f).unwrap(), b"some 150000 2000000\0");
    }

    /// systemd's default watch on the real system-wide PSI file (what a service gets with
    /// `MemoryPressureWatch=yes` on a host without cgroup2 memory delegation).
    #[test]
    fn systemd_default_on_real_psi() {
        let psi = Path::new("/proc/pressure/memory");
        let got = from_env_values(
            Some(psi.into()),
            Some("c29tZSAyMDAwMDAgMjAwMDAwMAA=".into()),
        )
        .unwrap();
        if !psi.exists() {
            assert_eq!(got.unwrap_err().kind(), io::ErrorKind::NotFound);
            return;
        }
        let t = got.expect("a 2 s window is allowed unprivileged");
        assert!(!t.wakes_readable());
        assert!(t.wait(Duration::from_millis(20)).is_ok());
    }

    #[test]
    fn poll_timeout_rounds_up_and_saturates() {
        assert_eq!(poll_timeout(Duration::ZERO), PollTimeout::ZERO);
        assert_eq!(i32::from(poll_timeout(Duration::from_micros(1))), 1);
        assert_eq!(i32::from(poll_timeout(Duration::from_millis(1500))), 1500);
        assert_eq!(
            poll_timeout(Duration::from_secs(u64::MAX)),
            PollTimeout::MAX
        );
    }
}
