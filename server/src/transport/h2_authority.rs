//! Repairs the HTTP/2 `:authority` of incoming requests before hyper sees
//! them.
//!
//! grpc-go clients dialed with a full URL (etcdctl `endpoint status`,
//! `--cluster` commands, clientv3 with `passthrough:///http://host:port`)
//! send `:authority: http://host:port`. grpc-go servers, and so etcd,
//! accept it; hyper's HTTP/2 layer rejects the stream as malformed. This
//! shim sits between the socket and hyper on the inbound side: it decodes
//! every header block (HPACK), replaces an unparseable authority with its
//! `host:port` part, and re-encodes the block with its own encoder, whose
//! dynamic table the server's decoder then mirrors. Everything else passes
//! through byte for byte; HTTP/1 connections are not touched at all.
//!
//! Only the first header block of a connection is decoded when its
//! authority is fine: it is then forwarded as the client encoded it, so
//! the server's decoder mirrors the client's encoder, and from then on
//! the socket is read straight into hyper's buffer, without a copy (the
//! shim only follows frame headers in place, for the ping policy below).
//! Clients fix the authority per connection (grpc-go per ClientConn,
//! tonic per channel), and decoding every block cost a large share of a
//! member's CPU under load (the HPACK crate builds a Huffman table for
//! every string it decodes). A connection whose first
//! block needs the repair keeps decoding and re-encoding every block.
//!
//! Seeing every inbound frame, the shim also enforces
//! `--grpc-keepalive-min-time` as grpc-go's server (and so etcd) does: a
//! client PING sooner than the minimum time after the previous one is a
//! strike; after two strikes the next early ping closes the connection
//! (grpc-go answers GOAWAY "too_many_pings"; hyper offers no way to send
//! one, so the connection is closed). Like grpc-go, the server sending
//! HEADERS or DATA clears the strikes (a client pinging to size its flow
//! control window after data arrives is not abusive), so the shim also
//! follows the frame boundaries of what the server writes. Unlike
//! grpc-go, pings on a connection without streams are judged by the same
//! minimum time rather than refused for two hours.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_DATA: u8 = 0x0;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_PING: u8 = 0x6;
const FLAG_ACK: u8 = 0x1;
/// Early pings tolerated before the connection is closed (grpc-go's
/// maxPingStrikes).
const MAX_PING_STRIKES: u8 = 2;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// hyper's default SETTINGS_MAX_FRAME_SIZE; re-encoded blocks are split to
/// fit it.
const MAX_FRAME: usize = 16_384;
/// Largest frame accepted from a client (the HTTP/2 maximum).
const MAX_INBOUND_FRAME: usize = (1 << 24) - 1;
/// Largest header block accepted (across continuation frames).
const MAX_HEADER_BLOCK: usize = 1 << 20;

/// What happens to the client's header blocks (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderBlocks {
    /// No block seen yet: the first one decides.
    FirstUndecided,
    /// Every block is decoded, repaired and re-encoded. (A first block
    /// that needs no repair ends the parsing instead: `Mode::Scanning`.)
    Repair,
}

enum Mode {
    /// Still reading the first bytes to tell HTTP/2 from HTTP/1.
    Sniffing,
    /// HTTP/2 frames are parsed, header blocks decoded.
    H2,
    /// HTTP/2 whose header blocks pass untouched: bytes go straight to
    /// hyper, and frame headers are followed in place for the ping policy.
    Scanning,
    /// Bytes go straight to hyper (HTTP/1, or nothing left to police).
    Passthrough,
}

/// Follows the frame boundaries of an HTTP/2 byte stream seen in pieces.
#[derive(Default)]
struct FrameTracker {
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
}

impl FrameTracker {
    /// Calls `on_frame(type, flags)` for each frame header completed in
    /// `bytes`.
    fn scan(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(u8, u8) -> io::Result<()>) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let k = self.skip.min(bytes.len());
                self.skip -= k;
                bytes = &bytes[k..];
                continue;
            }
            let k = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + k].copy_from_slice(&bytes[..k]);
            self.header_len += k;
            bytes = &bytes[k..];
            if self.header_len == FRAME_HEADER_LEN {
                let h = self.header;
                self.skip = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                self.header_len = 0;
                on_frame(h[3], h[4])?;
            }
        }
        Ok(())
    }
}

/// grpc-go's server ping policy (see the module doc).
struct PingPolicy {
    /// `--grpc-keepalive-min-time`; zero disables the check.
    min_interval: std::time::Duration,
    last: Option<std::time::Instant>,
    strikes: u8,
}

impl PingPolicy {
    fn on_frame(&mut self, ty: u8, flags: u8) -> io::Result<()> {
        if ty != TYPE_PING || flags & FLAG_ACK != 0 || self.min_interval.is_zero() {
            return Ok(());
        }
        let now = std::time::Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < self.min_interval) {
            self.strikes += 1;
            if self.strikes > MAX_PING_STRIKES {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "too_many_pings"));
            }
        }
        self.last = Some(now);
        Ok(())
    }
}

/// A partially received header block.
struct PendingHeaders {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from the socket, not yet processed.
    input: BytesMut,
    /// Processed bytes waiting to be read by hyper.
    output: BytesMut,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    header_blocks: HeaderBlocks,
    pending: Option<PendingHeaders>,
    eof: bool,
    pings: PingPolicy,
    /// Frames the client sends, once they are no longer parsed.
    inbound: FrameTracker,
    /// Frames the server writes (its HEADERS and DATA clear ping strikes).
    outbound: FrameTracker,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S, min_ping_interval: std::time::Duration) -> Self {
        Self {
            inner,
            mode: Mode::Sniffing,
            input: BytesMut::new(),
            output: BytesMut::new(),
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            header_blocks: HeaderBlocks::FirstUndecided,
            pending: None,
            eof: false,
            pings: PingPolicy { min_interval: min_ping_interval, last: None, strikes: 0 },
            inbound: FrameTracker::default(),
            outbound: FrameTracker::default(),
        }
    }

    /// Follows the frames in bytes the server wrote; its HEADERS and DATA
    /// clear the ping strikes.
    fn scan_outbound(&mut self, bytes: &[u8]) {
        if !matches!(self.mode, Mode::H2 | Mode::Scanning) || self.pings.min_interval.is_zero() {
            return;
        }
        let pings = &mut self.pings;
        let _ = self.outbound.scan(bytes, |ty, _| {
            if ty == TYPE_HEADERS || ty == TYPE_DATA {
                pings.strikes = 0;
            }
            Ok(())
        });
    }

    /// Follows the frames in bytes the client sent that are no longer
    /// parsed, for the ping policy.
    fn scan_inbound(&mut self, bytes: &[u8]) -> io::Result<()> {
        let pings = &mut self.pings;
        self.inbound.scan(bytes, |ty, flags| pings.on_frame(ty, flags))
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// `host:port` for an authority hyper would reject, or None if it is fine.
pub fn repaired_authority(value: &[u8]) -> Option<Vec<u8>> {
    let s = std::str::from_utf8(value).ok()?;
    if s.parse::<http::uri::Authority>().is_ok() {
        return None;
    }
    let rest = s.split_once("://").map_or(s, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or("");
    if !host.is_empty() && host.parse::<http::uri::Authority>().is_ok() {
        Some(host.as_bytes().to_vec())
    } else {
        Some(b"localhost".to_vec())
    }
}

impl<S> AuthorityFix<S> {
    /// Moves whatever can be processed from `input` to `output`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.mode {
                Mode::Sniffing => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        if self.eof {
                            self.mode = Mode::Passthrough;
                            continue;
                        }
                        return Ok(());
                    }
                    self.output.extend_from_slice(&self.input.split_to(PREFACE.len()));
                    self.mode = Mode::H2;
                }
                Mode::Passthrough | Mode::Scanning => {
                    // What was read before the switch (once), or HTTP/1.
                    let all = self.input.split();
                    if matches!(self.mode, Mode::Scanning) {
                        self.scan_inbound(&all)?;
                    }
                    self.output.extend_from_slice(&all);
                    return Ok(());
                }
                Mode::H2 => {
                    if self.input.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let len = (usize::from(self.input[0]) << 16)
                        | (usize::from(self.input[1]) << 8)
                        | usize::from(self.input[2]);
                    if len > MAX_INBOUND_FRAME {
                        return Err(invalid("HTTP/2 frame too large"));
                    }
                    if self.input.len() < FRAME_HEADER_LEN + len {
                        return Ok(());
                    }
                    let header = self.input.split_to(FRAME_HEADER_LEN);
                    let payload = self.input.split_to(len);
                    let (ty, flags) = (header[3], header[4]);
                    let stream_id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
                    self.pings.on_frame(ty, flags)?;
                    match ty {
                        TYPE_HEADERS => self.on_headers(flags, stream_id, &payload)?,
                        TYPE_CONTINUATION => self.on_continuation(flags, stream_id, &payload)?,
                        _ => {
                            if self.pending.is_some() {
                                return Err(invalid("HTTP/2 frame interleaved with a header block"));
                            }
                            self.output.extend_from_slice(&header);
                            self.output.extend_from_slice(&payload);
                        }
                    }
                }
            }
        }
    }

    fn on_headers(&mut self, flags: u8, stream_id: u32, payload: &[u8]) -> io::Result<()> {
        if self.pending.is_some() {
            return Err(invalid("HEADERS inside a header block"));
        }
        let mut p = payload;
        let mut pad = 0usize;
        if flags & FLAG_PADDED != 0 {
            if p.is_empty() {
                return Err(invalid("bad HEADERS padding"));
            }
            pad = usize::from(p[0]);
            p = &p[1..];
        }
        let mut priority = None;
        if flags & FLAG_PRIORITY != 0 {
            if p.len() < 5 {
                return Err(invalid("bad HEADERS priority"));
            }
            let mut prio = [0u8; 5];
            prio.copy_from_slice(&p[..5]);
            priority = Some(prio);
            p = &p[5..];
        }
        if pad > p.len() {
            return Err(invalid("bad HEADERS padding"));
        }
        let block = p[..p.len() - pad].to_vec();
        self.pending = Some(PendingHeaders { stream_id, end_stream: flags & FLAG_END_STREAM != 0, priority, block });
        if flags & FLAG_END_HEADERS != 0 {
            self.flush_headers()?;
        }
        Ok(())
    }

    fn on_continuation(&mut self, flags: u8, stream_id: u32, payload: &[u8]) -> io::Result<()> {
        let pending = self.pending.as_mut().ok_or_else(|| invalid("CONTINUATION without HEADERS"))?;
        if pending.stream_id != stream_id {
            return Err(invalid("CONTINUATION on another stream"));
        }
        if pending.block.len() + payload.len() > MAX_HEADER_BLOCK {
            return Err(invalid("header block too large"));
        }
        pending.block.extend_from_slice(payload);
        if flags & FLAG_END_HEADERS != 0 {
            self.flush_headers()?;
        }
        Ok(())
    }

    /// Decodes the completed block and emits HEADERS (+ CONTINUATION)
    /// frames: the client's own block if this is the connection's first
    /// and needs no repair (the connection passes through from then on),
    /// otherwise the block repaired and re-encoded.
    fn flush_headers(&mut self) -> io::Result<()> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let mut headers = self.decoder.decode(&pending.block).map_err(|e| invalid(format!("HPACK: {e:?}")))?;
        let mut repaired = false;
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority" {
                if let Some(fixed) = repaired_authority(value) {
                    *value = fixed;
                    repaired = true;
                }
            }
        }
        let block = if self.header_blocks == HeaderBlocks::FirstUndecided && !repaired {
            // Judged: from here on, bytes pass without a copy (the input
            // left starts at a frame boundary).
            self.mode = if self.pings.min_interval.is_zero() { Mode::Passthrough } else { Mode::Scanning };
            pending.block
        } else {
            self.header_blocks = HeaderBlocks::Repair;
            self.encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
        };

        let prio_len = if pending.priority.is_some() { 5 } else { 0 };
        let first_room = MAX_FRAME - prio_len;
        let (first, rest) = block.split_at(block.len().min(first_room));
        let mut flags = if pending.end_stream { FLAG_END_STREAM } else { 0 };
        if rest.is_empty() {
            flags |= FLAG_END_HEADERS;
        }
        if pending.priority.is_some() {
            flags |= FLAG_PRIORITY;
        }
        self.put_frame_header(first.len() + prio_len, TYPE_HEADERS, flags, pending.stream_id);
        if let Some(prio) = pending.priority {
            self.output.extend_from_slice(&prio);
        }
        self.output.extend_from_slice(first);
        let chunks: Vec<&[u8]> = rest.chunks(MAX_FRAME).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let flags = if i + 1 == chunks.len() { FLAG_END_HEADERS } else { 0 };
            self.put_frame_header(chunk.len(), TYPE_CONTINUATION, flags, pending.stream_id);
            self.output.extend_from_slice(chunk);
        }
        Ok(())
    }

    fn put_frame_header(&mut self, len: usize, ty: u8, flags: u8, stream_id: u32) {
        self.output.put_u8((len >> 16) as u8);
        self.output.put_u8((len >> 8) as u8);
        self.output.put_u8(len as u8);
        self.output.put_u8(ty);
        self.output.put_u8(flags);
        self.output.put_u32(stream_id & 0x7fff_ffff);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.input.is_empty() {
                match this.mode {
                    Mode::Passthrough => return Pin::new(&mut this.inner).poll_read(cx, buf),
                    Mode::Scanning => {
                        let before = buf.filled().len();
                        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
                        if let Poll::Ready(Ok(())) = read {
                            this.scan_inbound(&buf.filled()[before..])?;
                        }
                        return read;
                    }
                    Mode::Sniffing | Mode::H2 => {}
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                    } else {
                        this.input.extend_from_slice(rb.filled());
                    }
                    if let Err(e) = this.process() {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            self.scan_outbound(&buf[..n]);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn repairs_only_what_hyper_rejects() {
        assert_eq!(repaired_authority(b"localhost:2379"), None);
        assert_eq!(repaired_authority(b"http://127.0.0.1:2379"), Some(b"127.0.0.1:2379".to_vec()));
        assert_eq!(repaired_authority(b"https://h:1/path"), Some(b"h:1".to_vec()));
        assert_eq!(repaired_authority(b"unix:///tmp/sock"), Some(b"localhost".to_vec()));
    }

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(payload.len() >> 16) as u8, (payload.len() >> 8) as u8, payload.len() as u8, ty, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn rewrites_authority_and_keeps_other_frames() -> io::Result<()> {
        let mut client_enc = loona_hpack::Encoder::new();
        let block = client_enc.encode([
            (b":method".as_slice(), b"POST".as_slice()),
            (b":authority", b"http://127.0.0.1:2379"),
            (b":path", b"/etcdserverpb.Maintenance/Status"),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let (a, b) = block.split_at(block.len() / 2);
        input.extend(frame(TYPE_HEADERS, 0, 1, a));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"data"));

        let mut fix = AuthorityFix::new(input.as_slice(), std::time::Duration::ZERO);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await?;

        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let rest = &out[PREFACE.len()..];
        assert_eq!(&rest[..9], &frame(0x4, 0, 0, &[])[..]);
        let h = &rest[9..];
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        assert_eq!(h[3], TYPE_HEADERS);
        assert_eq!(h[4] & FLAG_END_HEADERS, FLAG_END_HEADERS);
        let mut dec = loona_hpack::Decoder::new();
        let headers = dec.decode(&h[9..9 + len]).map_err(|e| invalid(format!("{e:?}")))?;
        assert!(headers.contains(&(b":authority".to_vec(), b"127.0.0.1:2379".to_vec())));
        assert_eq!(&h[9 + len..], &frame(0x0, FLAG_END_STREAM, 1, b"data")[..]);
        Ok(())
    }

    /// Runs `blocks` (one HEADERS frame each, streams 1, 3, ...) through
    /// the shim and returns the header blocks it emitted.
    async fn shim_blocks(blocks: &[Vec<u8>]) -> io::Result<Vec<Vec<u8>>> {
        let mut input = PREFACE.to_vec();
        for (i, block) in blocks.iter().enumerate() {
            input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 2 * i as u32 + 1, block));
        }
        let mut fix = AuthorityFix::new(input.as_slice(), std::time::Duration::ZERO);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await?;
        let mut rest = &out[PREFACE.len()..];
        let mut emitted = Vec::new();
        while !rest.is_empty() {
            let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            assert_eq!(rest[3], TYPE_HEADERS);
            emitted.push(rest[9..9 + len].to_vec());
            rest = &rest[9 + len..];
        }
        Ok(emitted)
    }

    fn request(client: &mut loona_hpack::Encoder<'_>, authority: &[u8], path: &[u8]) -> Vec<u8> {
        client.encode([(b":method".as_slice(), b"POST".as_slice()), (b":authority", authority), (b":path", path)])
    }

    #[tokio::test]
    async fn a_connection_with_a_good_first_authority_passes_through() -> io::Result<()> {
        let mut client = loona_hpack::Encoder::new();
        let blocks = vec![
            request(&mut client, b"127.0.0.1:2379", b"/etcdserverpb.KV/Range"),
            request(&mut client, b"127.0.0.1:2379", b"/etcdserverpb.KV/Put"),
        ];
        assert_eq!(shim_blocks(&blocks).await?, blocks);
        Ok(())
    }

    #[tokio::test]
    async fn a_connection_with_a_bad_first_authority_is_repaired_throughout() -> io::Result<()> {
        let mut client = loona_hpack::Encoder::new();
        let blocks = vec![
            request(&mut client, b"http://127.0.0.1:2379", b"/etcdserverpb.KV/Range"),
            request(&mut client, b"http://127.0.0.1:2379", b"/etcdserverpb.KV/Put"),
        ];
        let emitted = shim_blocks(&blocks).await?;
        assert_eq!(emitted.len(), 2);
        // The server's decoder sees the shim's encoding, blocks in order.
        let mut server = loona_hpack::Decoder::new();
        for (block, path) in emitted.iter().zip([b"/etcdserverpb.KV/Range".as_slice(), b"/etcdserverpb.KV/Put"]) {
            let headers = server.decode(block).map_err(|e| invalid(format!("{e:?}")))?;
            assert!(headers.contains(&(b":authority".to_vec(), b"127.0.0.1:2379".to_vec())));
            assert!(headers.contains(&(b":path".to_vec(), path.to_vec())));
        }
        Ok(())
    }

    #[tokio::test]
    async fn once_judged_a_connection_is_read_without_a_copy_and_still_policed() -> io::Result<()> {
        let mut client = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &request(&mut client, b"h:1", b"/a")));
        input.extend(frame(TYPE_DATA, 0, 1, b"x"));
        let ping = frame(TYPE_PING, 0, 0, &[0; 8]);
        // The first read holds the preface and the first block; the rest
        // arrives later, as a client sends it.
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut fix = AuthorityFix::new(rx, std::time::Duration::from_secs(3600));
        use tokio::io::AsyncWriteExt;
        tx.write_all(&input).await?;
        let mut out = vec![0u8; input.len()];
        fix.read_exact(&mut out).await?;
        assert_eq!(out, input);
        assert!(matches!(fix.mode, Mode::Scanning), "still parsing frames after the first block");

        // Pings far too often: two strikes are tolerated, the third early
        // ping closes the connection, frames split across reads or not.
        for _ in 0..3 {
            tx.write_all(&ping).await?;
        }
        let (head, tail) = ping.split_at(4);
        tx.write_all(head).await?;
        tx.flush().await?;
        let mut sink = vec![0u8; 3 * ping.len()];
        fix.read_exact(&mut sink).await?;
        tx.write_all(tail).await?;
        let mut rest = [0u8; 64];
        let mut closed = false;
        for _ in 0..4 {
            match fix.read(&mut rest).await {
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {
                    closed = true;
                    break;
                }
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        assert!(closed, "a fourth ping within the minimum time was let through");
        Ok(())
    }

    #[tokio::test]
    async fn without_a_ping_policy_a_judged_connection_passes_straight_through() -> io::Result<()> {
        let mut client = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &request(&mut client, b"h:1", b"/a")));
        let mut fix = AuthorityFix::new(input.as_slice(), std::time::Duration::ZERO);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await?;
        assert_eq!(out, input);
        assert!(matches!(fix.mode, Mode::Passthrough));
        Ok(())
    }

    #[tokio::test]
    async fn http1_passes_through_untouched() -> io::Result<()> {
        let req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let mut fix = AuthorityFix::new(req.as_slice(), std::time::Duration::ZERO);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await?;
        assert_eq!(out, req);
        Ok(())
    }
}
