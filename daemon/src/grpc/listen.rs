//! The listening sockets: the Unix socket (mode, group, stale-socket handling, removal of
//! only the socket this process created) and the optional TCP listener, and the accept
//! loop over both: peers the access policy refuses, or over their connection cap, are
//! closed at accept; the others reach the server carrying their peer's identity.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{chown, Gid};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use super::authority::Rewrite;
use crate::core::access::peer_of;
use crate::core::connections::{ConnectionGuard, Connections};
use crate::core::types::Peer;
use crate::core::Core;

/// What every accepted connection carries: its peer, as the transport identified it
/// (the access policy is asked again on every call).
#[derive(Clone, Debug)]
pub struct Connection {
    pub peer: Peer,
}

/// Refuses to start when a live gemmad answers on `path`; removes a stale socket; refuses
/// to touch anything at `path` that is not a socket.
pub fn preflight(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; refusing to replace it (remove it or choose another \
             --socket)",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "another gemmad is already serving on {} (stop it first: systemctl stop gemmad)",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
            tracing::warn!(socket = %path.display(), "removed a stale socket left by an earlier run");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot check the socket {}", path.display())),
    }
}

/// The socket this process created. Dropping it unlinks the file, only if the file at
/// the path is still that socket (same device and inode): every exit path, an error
/// during start-up included, leaves no socket behind.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove the socket");
                } else {
                    tracing::info!(socket = %self.path.display(), "socket removed");
                }
            }
            Ok(_) => tracing::warn!(
                socket = %self.path.display(),
                "the socket was replaced by someone else; leaving it"
            ),
            Err(_) => {}
        }
    }
}

/// The listeners systemd passed (socket activation): the first listening Unix stream
/// socket serves as the gRPC socket, the first TCP one as the TCP listener. Anything
/// else passed is an error naming it (a unit misconfiguration).
pub fn activated(
    fds: Vec<crate::systemd::Activated>,
) -> Result<(
    Option<tokio::net::UnixListener>,
    Option<tokio::net::TcpListener>,
)> {
    use nix::sys::socket::{
        getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
    };
    let (mut unix, mut tcp) = (None, None);
    for a in fds {
        let what = || format!("the socket systemd passed as {:?}", a.name);
        let ty = getsockopt(&a.fd, sockopt::SockType).with_context(what)?;
        let listening = getsockopt(&a.fd, sockopt::AcceptConn).with_context(what)?;
        if ty != SockType::Stream || !listening {
            bail!(
                "{} is not a listening stream socket (ListenStream= in the socket unit)",
                what()
            );
        }
        let family = getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&a.fd))
            .with_context(what)?
            .family();
        match family {
            Some(AddressFamily::Unix) if unix.is_none() => {
                let l = std::os::unix::net::UnixListener::from(a.fd);
                l.set_nonblocking(true).with_context(what)?;
                unix = Some(tokio::net::UnixListener::from_std(l).with_context(what)?);
            }
            Some(AddressFamily::Inet | AddressFamily::Inet6) if tcp.is_none() => {
                let l = std::net::TcpListener::from(a.fd);
                l.set_nonblocking(true).with_context(what)?;
                tracing::warn!(name = %a.name, "TCP listener passed by systemd: every TCP peer is allowed");
                tcp = Some(tokio::net::TcpListener::from_std(l).with_context(what)?);
            }
            other => bail!(
                "{} has an unexpected or second address family ({other:?})",
                what()
            ),
        }
    }
    Ok((unix, tcp))
}

/// Binds the Unix socket with `mode` and group `gid` (no window with looser permissions:
/// the umask is tightened around bind).
pub fn bind_unix(
    path: &Path,
    mode: u32,
    gid: u32,
) -> Result<(tokio::net::UnixListener, SocketFile)> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
        }
    }
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    umask(old);
    let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let setup = || -> Result<()> {
        if meta.gid() != gid {
            chown(path, None, Some(Gid::from_raw(gid)))
                .with_context(|| format!("cannot give {} to group {gid}", path.display()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set mode {mode:o} on {}", path.display()))?;
        listener.set_nonblocking(true)?;
        Ok(())
    };
    // On an error the file is dropped, which removes the socket.
    setup()?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    Ok((listener, file))
}

/// One accepted connection with its peer, holding its slot under the connection caps
/// until it is dropped (however the connection ends).
pub struct PeerConn {
    io: Io,
    conn: Connection,
    _slot: ConnectionGuard,
}

enum Io {
    /// Unix-socket connections pass their requests through [`Rewrite`]: stock gRPC
    /// clients name the socket path as the `:authority`, which h2 refuses.
    Unix(Box<Rewrite<UnixStream>>),
    Tcp(TcpStream),
}

impl Connected for PeerConn {
    type ConnectInfo = Connection;

    fn connect_info(&self) -> Connection {
        self.conn.clone()
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s.get_mut()).poll_write(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s.get_mut()).poll_flush(cx),
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s.get_mut()).poll_shutdown(cx),
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s.get_mut()).poll_write_vectored(cx, bufs),
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

pub type Incoming = Pin<Box<dyn Stream<Item = io::Result<PeerConn>> + Send>>;

/// How long the accept loop pauses after an accept failed for want of a resource
/// (EMFILE, ENFILE, ENOBUFS, ENOMEM): the waiting connection stays in the backlog and
/// the listener stays readable, so retrying at once would spin a core until a
/// connection closes.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections handled (refused or failed) in one poll before the accept loop yields,
/// so a flood of refused connections cannot hold a runtime thread.
const ACCEPT_BATCH: usize = 64;

/// Decides at accept whether a peer's connection is served: the slot it holds while open,
/// or `None` to close it at once.
pub type Admit = Box<dyn Fn(&Peer) -> Option<ConnectionGuard> + Send>;

/// All connections the access policy and the connection caps let through, each with its
/// peer identity. Refused and over-cap connections are closed at accept, before any
/// HTTP/2, and never reach the server.
pub fn incoming(
    unix: tokio::net::UnixListener,
    tcp: Option<tokio::net::TcpListener>,
    core: Arc<Core>,
) -> Incoming {
    let conns = core.connections().clone();
    let admit: Admit = Box::new(move |peer: &Peer| core.admit(peer));
    Box::pin(Acceptor::new(unix, tcp, conns, admit))
}

/// The accept loop, as the stream the server polls: accepts on the Unix socket and the
/// optional TCP listener in turn, closes what [`Admit`] refuses, and backs off on
/// accept failures instead of spinning (the server would retry an `Err` at once).
pub struct Acceptor {
    unix: tokio::net::UnixListener,
    tcp: Option<tokio::net::TcpListener>,
    conns: Arc<Connections>,
    admit: Admit,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    tcp_first: bool,
}

enum Accepted {
    Unix(UnixStream),
    Tcp(TcpStream, std::net::SocketAddr),
}

impl Acceptor {
    pub fn new(
        unix: tokio::net::UnixListener,
        tcp: Option<tokio::net::TcpListener>,
        conns: Arc<Connections>,
        admit: Admit,
    ) -> Acceptor {
        Acceptor {
            unix,
            tcp,
            conns,
            admit,
            pause: None,
            tcp_first: false,
        }
    }

    /// The next accepted socket of either listener, alternating which goes first.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<(io::Result<Accepted>, &'static str)> {
        self.tcp_first = !self.tcp_first;
        let poll_unix = |u: &tokio::net::UnixListener, cx: &mut Context<'_>| {
            u.poll_accept(cx)
                .map(|r| (r.map(|(s, _)| Accepted::Unix(s)), "unix"))
        };
        let poll_tcp = |t: &tokio::net::TcpListener, cx: &mut Context<'_>| {
            t.poll_accept(cx)
                .map(|r| (r.map(|(s, a)| Accepted::Tcp(s, a)), "tcp"))
        };
        match &self.tcp {
            None => poll_unix(&self.unix, cx),
            Some(t) if self.tcp_first => match poll_tcp(t, cx) {
                Poll::Pending => poll_unix(&self.unix, cx),
                ready => ready,
            },
            Some(t) => match poll_unix(&self.unix, cx) {
                Poll::Pending => poll_tcp(t, cx),
                ready => ready,
            },
        }
    }
}

/// Accept failures that concern only the connection being accepted (it was reset or
/// aborted before accept took it): the next accept may succeed at once.
pub(crate) fn only_that_connection(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ECONNABORTED | Errno::ECONNRESET | Errno::EPROTO | Errno::EPERM | Errno::EINTR)
    )
}

impl Stream for Acceptor {
    type Item = io::Result<PeerConn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(p) = &mut this.pause {
            std::task::ready!(p.as_mut().poll(cx));
            this.pause = None;
        }
        for _ in 0..ACCEPT_BATCH {
            let (got, via) = std::task::ready!(this.poll_accept(cx));
            let accepted = match got {
                Ok(a) => a,
                Err(e) => {
                    this.conns.accept_failed(&e, via);
                    if only_that_connection(&e) {
                        continue;
                    }
                    let mut p = Box::pin(tokio::time::sleep(ACCEPT_BACKOFF));
                    // Registers the wake-up; a zero-length pause is over at once.
                    if p.as_mut().poll(cx).is_pending() {
                        this.pause = Some(p);
                        return Poll::Pending;
                    }
                    continue;
                }
            };
            let (io, peer) = match accepted {
                Accepted::Unix(s) => {
                    let peer = peer_of(&s, "grpc");
                    (Io::Unix(Box::new(Rewrite::new(s))), peer)
                }
                Accepted::Tcp(s, addr) => {
                    let _ = s.set_nodelay(true);
                    let peer = Peer {
                        tcp: Some(addr),
                        ..Peer::unknown("grpc")
                    };
                    (Io::Tcp(s), peer)
                }
            };
            // A refused connection is dropped here, which closes it: the peer reads EOF.
            let Some(guard) = (this.admit)(&peer) else {
                continue;
            };
            tracing::debug!(peer = %peer, "connection accepted");
            return Poll::Ready(Some(Ok(PeerConn {
                io,
                conn: Connection { peer },
                _slot: guard,
            })));
        }
        // A batch of refusals: let other tasks run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::connections::ConnectionLimits;
    use std::time::Instant;
    use tokio_stream::StreamExt;

    const CHILD_ENV: &str = "GEMMAD_TEST_EMFILE_CHILD";

    /// Out of file descriptors, the accept loop backs off instead of spinning, and
    /// serves the waiting connection once descriptors are free again. The open-file
    /// limit is the whole process's, so this runs in a child process of its own.
    #[test]
    fn out_of_descriptors_the_accept_loop_backs_off_and_recovers() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "grpc::listen::tests::emfile_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("EMFILE-CHILD: ok"),
            "{text}"
        );
    }

    #[tokio::test]
    #[ignore = "helper: runs only as a child of out_of_descriptors_the_accept_loop_..."]
    async fn emfile_child() {
        assert_eq!(
            std::env::var(CHILD_ENV).as_deref(),
            Ok("1"),
            "run by its parent only"
        );
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let conns = Connections::new(ConnectionLimits {
            per_uid: 8,
            total: 8,
        });
        let c = conns.clone();
        let admit: Admit = Box::new(move |p: &Peer| c.open(p));
        let mut acceptor = Acceptor::new(listener, None, conns.clone(), admit);
        // Fill the descriptor table, then spend the last free one on a client: the
        // daemon side of its connection has no descriptor to be accepted into.
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, 128.min(hard), hard).unwrap();
        let mut filler = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            filler.push(f);
        }
        filler.pop();
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let task = tokio::spawn(async move {
            let got = acceptor.next().await;
            (got, acceptor)
        });
        let t0 = Instant::now();
        while conns.snapshot().accept_errors == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "accept never failed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Over half a second, a loop that backs off retries a handful of times; one that
        // spins retries tens of thousands of times.
        let before = conns.snapshot().accept_errors;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let retries = conns.snapshot().accept_errors - before;
        assert!(
            retries <= 50,
            "{retries} accept retries in 0.5 s: the loop spins"
        );
        assert!(!task.is_finished(), "nothing can be accepted yet");
        filler.truncate(filler.len().saturating_sub(16));
        let (got, _acceptor) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the waiting connection is accepted once descriptors are free")
            .unwrap();
        let conn = got
            .expect("the stream goes on")
            .expect("an accepted connection");
        let uid = nix::unistd::Uid::effective().as_raw();
        assert_eq!(conn.conn.peer.uid, Some(uid));
        assert_eq!(conns.snapshot().open, 1);
        drop(conn);
        assert_eq!(
            conns.snapshot().open,
            0,
            "the slot is freed with the connection"
        );
        println!("EMFILE-CHILD: ok retries={retries}");
    }
}
