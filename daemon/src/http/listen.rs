//! The HTTP front end's listeners: its Unix socket (bound like the gRPC socket: mode,
//! group, stale sockets, removed on exit) and the optional loopback TCP listener, as
//! axum [`Listener`]s that admit connections through the core (access policy and
//! connection caps, checked at accept) and carry each connection's peer to the
//! handlers.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::core::access::peer_of;
use crate::core::connections::ConnectionGuard;
use crate::core::types::Peer;
use crate::core::Core;
use crate::grpc::listen::{only_that_connection, ACCEPT_BACKOFF};

/// The front end's name in peers and logs.
pub const VIA: &str = "http";

/// Connections refused in a row before the accept loop yields to other tasks.
const ACCEPT_BATCH: usize = 64;

/// The peer of a connection, as the handlers get it (`ConnectInfo<HttpPeer>`).
#[derive(Clone, Debug)]
pub struct HttpPeer(pub Peer);

impl Connected<IncomingStream<'_, HttpListener>> for HttpPeer {
    fn connect_info(stream: IncomingStream<'_, HttpListener>) -> Self {
        stream.remote_addr().clone()
    }
}

pub enum Socket {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// One listening socket; connections the core does not admit are closed at accept,
/// before any HTTP.
pub struct HttpListener {
    socket: Socket,
    core: Arc<Core>,
}

impl HttpListener {
    pub fn new(socket: Socket, core: Arc<Core>) -> Self {
        HttpListener { socket, core }
    }

    fn via(&self) -> &'static str {
        match self.socket {
            Socket::Unix(_) => "http-unix",
            Socket::Tcp(_) => "http-tcp",
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// An accepted connection, holding its slot under the connection caps until it closes.
pub struct HttpIo {
    stream: Stream,
    _slot: ConnectionGuard,
}

impl Listener for HttpListener {
    type Io = HttpIo;
    type Addr = HttpPeer;

    async fn accept(&mut self) -> (HttpIo, HttpPeer) {
        let mut refused = 0usize;
        loop {
            let got = match &self.socket {
                Socket::Unix(l) => l.accept().await.map(|(s, _)| {
                    let peer = peer_of(&s, VIA);
                    (Stream::Unix(s), peer)
                }),
                Socket::Tcp(l) => l.accept().await.map(|(s, addr)| {
                    let _ = s.set_nodelay(true);
                    let peer = Peer {
                        tcp: Some(addr),
                        ..Peer::unknown(VIA)
                    };
                    (Stream::Tcp(s), peer)
                }),
            };
            let (stream, peer) = match got {
                Ok(x) => x,
                Err(e) => {
                    self.core.connections().accept_failed(&e, self.via());
                    if !only_that_connection(&e) {
                        // Out of descriptors or memory: the connection stays in the
                        // backlog; retrying at once would spin.
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            };
            // A refused connection is dropped here, which closes it.
            match self.core.admit(&peer) {
                Some(slot) => {
                    tracing::debug!(peer = %peer, "http connection accepted");
                    return (
                        HttpIo {
                            stream,
                            _slot: slot,
                        },
                        HttpPeer(peer),
                    );
                }
                None => {
                    refused += 1;
                    if refused.is_multiple_of(ACCEPT_BATCH) {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<HttpPeer> {
        Ok(HttpPeer(Peer::unknown(VIA)))
    }
}

impl AsyncRead for HttpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HttpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// Whether `given` is `key`, in time that depends on the key's length only.
pub fn same_key(given: &[u8], key: &[u8]) -> bool {
    let mut diff = given.len() ^ key.len();
    for (i, k) in key.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        diff |= usize::from(std::hint::black_box(g ^ k));
    }
    std::hint::black_box(diff) == 0
}

/// The API key of `[http]`: `api_key`, or the first line of `api_key_file`; `None` when
/// neither is set. An unreadable or empty file is an error.
pub fn api_key(h: &crate::config::HttpSection) -> anyhow::Result<Option<Vec<u8>>> {
    use anyhow::Context as _;
    if !h.api_key.is_empty() {
        return Ok(Some(h.api_key.as_bytes().to_vec()));
    }
    if h.api_key_file.as_os_str().is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&h.api_key_file)
        .with_context(|| format!("http.api_key_file {}", h.api_key_file.display()))?;
    let key = text.lines().next().unwrap_or("").trim();
    if key.is_empty() {
        anyhow::bail!(
            "http.api_key_file {} is empty: put the key on its first line",
            h.api_key_file.display()
        );
    }
    Ok(Some(key.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(same_key(b"secret", b"secret"));
        assert!(!same_key(b"secre", b"secret"));
        assert!(!same_key(b"secretx", b"secret"));
        assert!(!same_key(b"secreT", b"secret"));
        assert!(!same_key(b"", b"secret"));
    }
}
