//! Lets stock gRPC clients connect over the Unix socket.
//!
//! grpcio and the other C-core clients, with default options, put the socket path in the
//! HTTP/2 `:authority` of every request on a `unix:` channel (grpcio 1.85 sends
//! `tmp%2Fa.sock` for `unix:/tmp/a.sock`). The server's HTTP/2 layer (hyperium/h2) takes
//! that for a malformed request and resets the stream (`RST_STREAM` 1, nothing logged),
//! and offers no setting to relax it: the upstream fix (hyperium/h2#487) is not released.
//! On a Unix socket the authority means nothing, so this layer sits between the socket
//! and h2 and replaces an `:authority` that is not a valid URI authority with
//! `localhost` before h2 sees it.
//!
//! Only header blocks are touched. Each one is decoded with a per-connection HPACK
//! decoder that follows the client's encoder (dynamic table, size updates), and
//! re-encoded with literals that never index, so h2's own decoder never holds dynamic
//! entries and cannot fall out of step with the rewritten stream. Other frames pass
//! through unchanged; a frame body that is not a header block is read straight into the
//! caller's buffer. A broken frame sequence or header block fails the connection (an
//! `InvalidData` read error), as h2 would.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame every HTTP/2 peer must accept (SETTINGS_MAX_FRAME_SIZE's default and
/// minimum): rewritten blocks are split into frames no larger.
const MAX_OUT_FRAME: usize = 16_384;
/// The dynamic table limit the server advertises (h2's default; gemmad never changes it):
/// the client's encoder may not grow its table beyond it.
const HEADER_TABLE_SIZE: usize = 4_096;
/// The largest header block (all its frames) accepted, encoded.
const MAX_BLOCK: usize = 1 << 20;
/// The value that replaces an authority h2 would reject.
const REPLACEMENT: &[u8] = b"localhost";

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

enum State {
    /// Checking the client connection preface; `usize` bytes of it seen so far.
    Preface(usize),
    /// Reading a frame header (9 bytes).
    FrameHeader,
    /// Passing the rest of a frame's payload through unchanged.
    Body(usize),
    /// Collecting the payload of a HEADERS or CONTINUATION frame.
    HeaderPayload {
        kind: u8,
        flags: u8,
        stream: u32,
        len: usize,
    },
    /// Not HTTP/2 (no preface): everything passes through; h2 answers it.
    Transparent,
}

/// A header block whose HEADERS frame has arrived but not yet its END_HEADERS.
struct OpenBlock {
    stream: u32,
    /// END_STREAM of the HEADERS frame.
    end_stream: bool,
    /// The HEADERS frame's priority fields (5 bytes), when it had the PRIORITY flag.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client-to-server byte stream transformer (no IO: fed bytes, it emits bytes).
pub struct Rewriter {
    state: State,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    payload: Vec<u8>,
    open: Option<OpenBlock>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Rewriter {
            state: State::Preface(0),
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            payload: Vec::new(),
            open: None,
            decoder,
        }
    }

    /// How many of the next bytes pass through unchanged whatever they are (the caller
    /// may read them straight into its buffer and then report them with [`Self::skip`]).
    fn passthrough(&self) -> usize {
        match self.state {
            State::Body(n) => n,
            State::Transparent => usize::MAX,
            _ => 0,
        }
    }

    /// Records `n` bytes (at most [`Self::passthrough`]) passed through by the caller.
    fn skip(&mut self, n: usize) {
        if let State::Body(left) = &mut self.state {
            *left -= n;
            if *left == 0 {
                self.state = State::FrameHeader;
            }
        }
    }

    /// Feeds bytes read from the client; appends what h2 should read to `out`.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        while !input.is_empty() {
            match &mut self.state {
                State::Transparent => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Preface(seen) => {
                    let want = &PREFACE[*seen..];
                    let n = want.len().min(input.len());
                    if input[..n] != want[..n] {
                        // Not a gRPC client (the matching part already went out): let
                        // h2 say so.
                        self.state = State::Transparent;
                        continue;
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *seen += n;
                    if *seen == PREFACE.len() {
                        self.state = State::FrameHeader;
                    }
                }
                State::Body(left) => {
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.skip(n);
                }
                State::FrameHeader => {
                    let n = (FRAME_HEADER_LEN - self.header_len).min(input.len());
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&input[..n]);
                    self.header_len += n;
                    input = &input[n..];
                    if self.header_len == FRAME_HEADER_LEN {
                        self.header_len = 0;
                        self.frame_header(out)?;
                    }
                }
                State::HeaderPayload {
                    kind,
                    flags,
                    stream,
                    len,
                } => {
                    let (kind, flags, stream, len) = (*kind, *flags, *stream, *len);
                    let n = (len - self.payload.len()).min(input.len());
                    self.payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.payload.len() == len {
                        self.header_payload(kind, flags, stream, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn frame_header(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let h = self.header;
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        match kind {
            HEADERS | CONTINUATION => {
                if kind == HEADERS && self.open.is_some() {
                    return Err(invalid("HEADERS frame inside an unfinished header block"));
                }
                if kind == CONTINUATION && self.open.as_ref().map(|b| b.stream) != Some(stream) {
                    return Err(invalid("CONTINUATION frame outside its header block"));
                }
                let open = self.open.as_ref().map_or(0, |b| b.fragment.len());
                if open + len > MAX_BLOCK {
                    return Err(invalid(format!("header block over {MAX_BLOCK} bytes")));
                }
                self.payload.clear();
                self.state = State::HeaderPayload {
                    kind,
                    flags,
                    stream,
                    len,
                };
                if len == 0 {
                    self.header_payload(kind, flags, stream, out)?;
                }
            }
            _ => {
                if self.open.is_some() {
                    return Err(invalid("frame inside an unfinished header block"));
                }
                out.extend_from_slice(&h);
                self.state = if len == 0 {
                    State::FrameHeader
                } else {
                    State::Body(len)
                };
            }
        }
        Ok(())
    }

    /// A whole HEADERS or CONTINUATION payload is in `self.payload`.
    fn header_payload(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        self.state = State::FrameHeader;
        let p = std::mem::take(&mut self.payload);
        if kind == HEADERS {
            let mut start = 0;
            let mut end = p.len();
            if flags & PADDED != 0 {
                let pad = *p
                    .first()
                    .ok_or_else(|| invalid("HEADERS padding missing"))?
                    as usize;
                start = 1;
                end = end
                    .checked_sub(pad)
                    .ok_or_else(|| invalid("HEADERS padding longer than the frame"))?;
            }
            let priority = if flags & PRIORITY != 0 {
                let fields = p
                    .get(start..start + 5)
                    .ok_or_else(|| invalid("HEADERS priority fields missing"))?;
                start += 5;
                Some(
                    <[u8; 5]>::try_from(fields)
                        .map_err(|_| invalid("HEADERS priority fields missing"))?,
                )
            } else {
                None
            };
            if start > end {
                return Err(invalid("HEADERS padding longer than the frame"));
            }
            self.open = Some(OpenBlock {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: p[start..end].to_vec(),
            });
        } else {
            let open = self
                .open
                .as_mut()
                .ok_or_else(|| invalid("CONTINUATION frame outside its header block"))?;
            open.fragment.extend_from_slice(&p);
        }
        self.payload = p;
        self.payload.clear();
        if flags & END_HEADERS != 0 {
            let block = self
                .open
                .take()
                .ok_or_else(|| invalid("END_HEADERS outside a header block"))?;
            self.emit(block, out)?;
        }
        Ok(())
    }

    /// Decodes `block`, fixes its authority and writes it as one or more frames.
    fn emit(&mut self, block: OpenBlock, out: &mut Vec<u8>) -> io::Result<()> {
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                let value: &[u8] = if &*name == b":authority" && !valid_authority(&value) {
                    REPLACEMENT
                } else {
                    &value
                };
                literal(&name, value, &mut encoded);
            })
            .map_err(|e| invalid(format!("bad header block: {e}")))?;

        let mut rest = &encoded[..];
        let mut first = true;
        loop {
            let room = MAX_OUT_FRAME
                - if first && block.priority.is_some() {
                    5
                } else {
                    0
                };
            let n = room.min(rest.len());
            let last = n == rest.len();
            let (kind, mut flags, len) = if first {
                let mut flags = 0;
                if block.end_stream {
                    flags |= END_STREAM;
                }
                if block.priority.is_some() {
                    flags |= PRIORITY;
                }
                (
                    HEADERS,
                    flags,
                    n + if block.priority.is_some() { 5 } else { 0 },
                )
            } else {
                (CONTINUATION, 0, n)
            };
            if last {
                flags |= END_HEADERS;
            }
            let len = (len as u32).to_be_bytes();
            out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
            out.extend_from_slice(&block.stream.to_be_bytes());
            if first {
                if let Some(p) = block.priority {
                    out.extend_from_slice(&p);
                }
            }
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            first = false;
            if last {
                return Ok(());
            }
        }
    }
}

/// Whether h2 accepts `value` as a request's `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// HPACK "literal header field without indexing, new name", neither string Huffman-coded:
/// leaves h2's dynamic table untouched.
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    string(name, out);
    string(value, out);
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out).expect("a Vec write"); // ok: the only error is the writer's; io::Write for Vec<u8> never fails
    out.extend_from_slice(s);
}

/// An [`AsyncRead`] that passes what it reads from `inner` through a [`Rewriter`].
pub struct Rewrite<R> {
    inner: R,
    rewriter: Rewriter,
    /// Rewritten bytes not yet returned, from `pos`.
    out: Vec<u8>,
    pos: usize,
    scratch: Box<[u8]>,
}

impl<R> Rewrite<R> {
    pub fn new(inner: R) -> Self {
        Rewrite {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            pos: 0,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Rewrite<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if me.pos < me.out.len() {
                let n = buf.remaining().min(me.out.len() - me.pos);
                buf.put_slice(&me.out[me.pos..me.pos + n]);
                me.pos += n;
                if me.pos == me.out.len() {
                    me.out.clear();
                    me.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let through = me.rewriter.passthrough();
            if through > 0 {
                // Payload that passes unchanged: read it straight into the caller's buffer.
                let before = buf.filled().len();
                let mut limited = buf.take(through);
                ready!(Pin::new(&mut me.inner).poll_read(cx, &mut limited))?;
                let n = limited.filled().len();
                // SAFETY: `limited` is the unfilled part of `buf`, and `inner` initialised
                // and filled its first `n` bytes.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                debug_assert_eq!(buf.filled().len(), before + n);
                me.rewriter.skip(n);
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut me.scratch);
            ready!(Pin::new(&mut me.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            me.rewriter.push(&me.scratch[..n], &mut me.out)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Runs `input` through a fresh rewriter (preface first), fed in `chunk`-byte pieces.
    fn rewrite_in(input: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        let mut all = PREFACE.to_vec();
        all.extend_from_slice(input);
        for c in all.chunks(chunk) {
            r.push(c, &mut out)?;
        }
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        Ok(out[PREFACE.len()..].to_vec())
    }

    /// Splits a frame stream into (kind, flags, stream, payload).
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            v.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        v
    }

    /// What h2's side sees: the header lists of the header blocks in `out`.
    fn decode_all(out: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut d = loona_hpack::Decoder::new();
        let mut lists = Vec::new();
        let mut block = Vec::new();
        for (kind, flags, _, payload) in frames(out) {
            match kind {
                HEADERS => {
                    let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                    assert_eq!(flags & PADDED, 0);
                    block = payload[skip..].to_vec();
                }
                CONTINUATION => block.extend_from_slice(&payload),
                _ => continue,
            }
            if flags & END_HEADERS != 0 {
                // A block that would index must fail the next decode with a fresh
                // table; simpler: check no representation touches the dynamic table.
                assert_no_dynamic(&block);
                lists.push(d.decode(&block).expect("decodes"));
            }
        }
        lists
    }

    /// Every representation is "literal without indexing, new name" (first byte 0).
    fn assert_no_dynamic(mut b: &[u8]) {
        fn skip_string(b: &[u8]) -> &[u8] {
            assert_eq!(b[0] & 0x80, 0, "not Huffman-coded");
            let (mut len, mut used) = ((b[0] & 0x7f) as usize, 1);
            if len == 0x7f {
                let mut shift = 0;
                loop {
                    let c = b[used];
                    used += 1;
                    len += ((c & 0x7f) as usize) << shift;
                    shift += 7;
                    if c & 0x80 == 0 {
                        break;
                    }
                }
            }
            &b[used + len..]
        }
        while !b.is_empty() {
            assert_eq!(b[0], 0, "only literals without indexing");
            b = skip_string(&b[1..]);
            b = skip_string(b);
        }
    }

    fn grpcio_request(enc: &mut loona_hpack::Encoder, authority: &[u8]) -> Vec<u8> {
        enc.encode([
            (&b":scheme"[..], &b"http"[..]),
            (b":method", b"POST"),
            (b":authority", authority),
            (b":path", b"/grpc.health.v1.Health/Check"),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
            (
                b"user-agent",
                b"grpc-python/1.85.4 grpc-c/53.0.0 (linux; chttp2)",
            ),
        ])
    }

    fn get<'a>(list: &'a [(Vec<u8>, Vec<u8>)], name: &[u8]) -> &'a [u8] {
        &list.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_and_others_are_kept() {
        // The encoder indexes: the second request refers to the dynamic table.
        let mut enc = loona_hpack::Encoder::new();
        let mut input = frame(
            HEADERS,
            END_HEADERS,
            1,
            &grpcio_request(&mut enc, b"tmp%2Fa.sock"),
        );
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            3,
            &grpcio_request(&mut enc, b"tmp%2Fa.sock"),
        ));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            5,
            &grpcio_request(&mut enc, b"[::1]:50051"),
        ));
        for chunk in [1, 7, 4096] {
            let out = rewrite_in(&input, chunk).unwrap();
            let f = frames(&out);
            assert_eq!(f[1], (0x0, END_STREAM, 1, b"\0\0\0\0\0".to_vec()));
            let lists = decode_all(&out);
            assert_eq!(lists.len(), 3);
            assert_eq!(get(&lists[0], b":authority"), b"localhost");
            assert_eq!(get(&lists[1], b":authority"), b"localhost");
            assert_eq!(get(&lists[2], b":authority"), b"[::1]:50051");
            for l in &lists {
                assert_eq!(get(l, b":path"), b"/grpc.health.v1.Health/Check");
                assert_eq!(get(l, b"te"), b"trailers");
                assert_eq!(l.len(), 7);
            }
        }
    }

    #[test]
    fn huffman_coded_dynamically_indexed_headers_survive() {
        // Hand-encoded (RFC 7541 C.4.1 and C.4.2): Huffman strings, a literal with
        // incremental indexing (":authority: www.example.com"), then index 62 of it.
        let first = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let second = [
            0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
        ];
        // A size update to 256 opens the first block; the table keeps its entries.
        let mut b1 = vec![0x3f, 0xe1, 0x01];
        b1.extend_from_slice(&first);
        let mut input = frame(HEADERS, END_HEADERS | END_STREAM, 1, &b1);
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        let out = rewrite_in(&input, 3).unwrap();
        let lists = decode_all(&out);
        assert_eq!(get(&lists[0], b":authority"), b"www.example.com");
        assert_eq!(get(&lists[1], b":authority"), b"www.example.com");
        assert_eq!(get(&lists[1], b"cache-control"), b"no-cache");
        assert_eq!(get(&lists[1], b":path"), b"/");
        assert!(frames(&out).iter().all(|f| f.1 & END_STREAM != 0));
    }

    #[test]
    fn continuation_padding_and_priority_are_handled() {
        let mut enc = loona_hpack::Encoder::new();
        let block = grpcio_request(&mut enc, b"/var/tmp/csi.sock");
        let (a, rest) = block.split_at(10);
        let (b, c) = rest.split_at(5);
        // HEADERS with padding and priority, then two CONTINUATIONs.
        let mut p = vec![3u8];
        p.extend_from_slice(&[0x80, 0, 0, 0, 15]);
        p.extend_from_slice(a);
        p.extend_from_slice(&[0, 0, 0]);
        let mut input = frame(HEADERS, PADDED | PRIORITY | END_STREAM, 7, &p);
        input.extend(frame(CONTINUATION, 0, 7, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 7, c));
        input.extend(frame(0x6, 0, 0, b"12345678")); // PING
        let out = rewrite_in(&input, 5).unwrap();
        let f = frames(&out);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].0, HEADERS);
        assert_eq!(f[0].1, PRIORITY | END_STREAM | END_HEADERS);
        assert_eq!(f[0].2, 7);
        assert_eq!(&f[0].3[..5], &[0x80, 0, 0, 0, 15]);
        assert_eq!(f[1], (0x6, 0, 0, b"12345678".to_vec()));
        let lists = decode_all(&out);
        assert_eq!(get(&lists[0], b":authority"), b"localhost");
    }

    #[test]
    fn a_large_block_is_split_into_continuations() {
        let mut enc = loona_hpack::Encoder::new();
        let big = vec![b'x'; 40_000];
        let block = enc.encode([(&b":authority"[..], &b"a.sock"[..]), (b"x-big", &big[..])]);
        let out = rewrite_in(&frame(HEADERS, END_HEADERS, 1, &block), 4096).unwrap();
        let f = frames(&out);
        assert!(f.len() >= 3);
        assert!(f.iter().all(|x| x.3.len() <= MAX_OUT_FRAME));
        assert_eq!(f[0].0, HEADERS);
        assert!(f[1..].iter().all(|x| x.0 == CONTINUATION));
        assert!(f[..f.len() - 1].iter().all(|x| x.1 & END_HEADERS == 0));
        assert_eq!(f.last().unwrap().1, END_HEADERS);
        let lists = decode_all(&out);
        assert_eq!(get(&lists[0], b"x-big"), &big[..]);
        assert_eq!(get(&lists[0], b":authority"), b"a.sock");
    }

    #[test]
    fn malformed_input_fails_the_connection() {
        let bad: Vec<Vec<u8>> = vec![
            // An index past both tables.
            frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f]),
            // An integer that never ends / overflows.
            frame(
                HEADERS,
                END_HEADERS,
                1,
                &[
                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
                ],
            ),
            // A string longer than the block.
            frame(HEADERS, END_HEADERS, 1, &[0x00, 0x7f, 0x10, b'a']),
            // Bad Huffman (EOS padding wrong).
            frame(HEADERS, END_HEADERS, 1, &[0x00, 0x81, 0x00, 0x81, 0x00]),
            // Padding longer than the frame.
            frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]),
            // Priority fields cut short.
            frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0]),
            // A size update over the advertised table size.
            frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x7f, 0x82]),
            // A header block larger than the limit, refused at its frame header.
            frame(HEADERS, 0, 1, &vec![0x82; MAX_BLOCK + 1])[..9].to_vec(),
            // CONTINUATION with no open block.
            frame(CONTINUATION, END_HEADERS, 1, &[0x82]),
            // Another frame inside a header block.
            [frame(HEADERS, 0, 1, &[0x82]), frame(0x0, 0, 1, b"x")].concat(),
            // CONTINUATION of another stream.
            [
                frame(HEADERS, 0, 1, &[0x82]),
                frame(CONTINUATION, END_HEADERS, 3, &[0x84]),
            ]
            .concat(),
        ];
        for (i, input) in bad.iter().enumerate() {
            let e = rewrite_in(input, 2).expect_err(&format!("case {i} must fail"));
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "case {i}");
        }
    }

    #[test]
    fn a_stream_without_the_preface_passes_through() {
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        let req = b"PRI * HTTP/1.1\r\nHost: x\r\n\r\n\x00\x00\x01\x01\x04";
        for c in req.chunks(3) {
            r.push(c, &mut out).unwrap();
        }
        assert_eq!(out, req);
    }

    #[tokio::test]
    async fn the_reader_rewrites_and_passes_data_through() {
        use tokio::io::AsyncReadExt;
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &grpcio_request(&mut enc, b"x%2Fy"),
        ));
        let data = vec![7u8; 100_000];
        for c in data.chunks(16_384) {
            input.extend(frame(0x0, 0, 1, c));
        }
        let mut r = Rewrite::new(&input[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        let f = frames(&got[PREFACE.len()..]);
        assert_eq!(f[0], (0x4, 0, 0, vec![]));
        let body: Vec<u8> = f[2..].iter().flat_map(|x| x.3.clone()).collect();
        assert_eq!(body, data);
        assert_eq!(
            get(&decode_all(&got[PREFACE.len()..])[0], b":authority"),
            b"localhost"
        );
    }
}
