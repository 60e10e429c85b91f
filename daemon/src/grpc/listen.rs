//! The listening sockets: the Unix socket (mode, group, stale-socket handling, removal of
//! only the socket this process created) and the optional TCP listener, merged into one
//! stream of connections that carry their peer's identity and access decision.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{bail, Context as _, Result};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{chown, Gid};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

use super::authority::Rewrite;
use crate::core::access::peer_of;
use crate::core::types::Peer;
use crate::core::Core;

/// What every accepted connection carries: its peer, as the transport identified it
/// (the access policy is asked on every call).
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

/// The socket this process created; `remove` unlinks it only if the file at the path is
/// still that socket (same device and inode).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn remove(&self) {
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
    if let Err(e) = setup() {
        file.remove();
        return Err(e);
    }
    let listener = tokio::net::UnixListener::from_std(listener)?;
    Ok((listener, file))
}

/// One accepted connection with its peer.
pub struct PeerConn {
    io: Io,
    conn: Connection,
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

fn decide(peer: Peer, core: &Core) -> Connection {
    // Logged once per connection; every call is still checked (grpc::check_access).
    if core.authorize(&peer).is_ok() {
        tracing::debug!(peer = %peer, "connection accepted");
    } else {
        tracing::warn!(peer = %peer, "connection refused by the access policy ([access] in the config)");
    }
    Connection { peer }
}

pub type Incoming = Pin<Box<dyn Stream<Item = io::Result<PeerConn>> + Send>>;

/// All accepted connections, each with its peer identity and access decision.
pub fn incoming(
    unix: tokio::net::UnixListener,
    tcp: Option<tokio::net::TcpListener>,
    core: Arc<Core>,
) -> Incoming {
    let c = core.clone();
    let unix = tokio_stream::wrappers::UnixListenerStream::new(unix).map(move |r| {
        r.map(|s| {
            let conn = decide(peer_of(&s, "grpc"), &c);
            PeerConn {
                io: Io::Unix(Box::new(Rewrite::new(s))),
                conn,
            }
        })
    });
    match tcp {
        None => Box::pin(unix),
        Some(t) => {
            let tcp = tokio_stream::wrappers::TcpListenerStream::new(t).map(move |r| {
                r.map(|s| {
                    let _ = s.set_nodelay(true);
                    let peer = Peer {
                        tcp: s.peer_addr().ok(),
                        ..Peer::unknown("grpc")
                    };
                    let conn = decide(peer, &core);
                    PeerConn {
                        io: Io::Tcp(s),
                        conn,
                    }
                })
            });
            Box::pin(unix.merge(tcp))
        }
    }
}
