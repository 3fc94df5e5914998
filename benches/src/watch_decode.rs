//! The fan-out benchmark's reading of watch responses.
//!
//! The load generator shares the machine's two cores with the members it
//! measures. Decoding every event of millions per second into prost
//! messages (headers, keys, revisions, a buffer per field) took it more
//! CPU than the member serving them, so it capped the figure it was
//! measuring. This codec reads only what the benchmark uses, straight from
//! the received bytes: whether a response is a `created` one, and each
//! event's value, which the writers fill with their send time in decimal
//! nanoseconds.

use anyhow::{Context, Result};
use bytes::Buf;
use keel_proto::etcdserverpb::WatchRequest;
use tokio::sync::mpsc;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::transport::Channel;
use tonic::Status;
use tonic_prost::ProstEncoder;

/// What the benchmark reads of a WatchResponse.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WatchSummary {
    /// WatchResponse.created (field 3).
    pub created: bool,
    /// Event.kv.value (fields 11, 2, 5) of each event, parsed as a decimal
    /// number (0 when it is not one).
    pub sent_times: Vec<u64>,
}

/// Opens a Watch stream on `channel` whose responses are [`WatchSummary`]s.
pub async fn open(
    channel: Channel,
    requests: mpsc::UnboundedReceiver<WatchRequest>,
) -> Result<tonic::Streaming<WatchSummary>> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.context("watch channel")?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
    let requests = tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(requests));
    Ok(grpc.streaming(requests, path, SummaryCodec).await?.into_inner())
}

/// Parses one encoded WatchResponse.
pub fn summarize(mut msg: &[u8]) -> Option<WatchSummary> {
    let mut out = WatchSummary::default();
    while !msg.is_empty() {
        let (field, value) = next_field(&mut msg)?;
        match (field, value) {
            (3, Value::Varint(v)) => out.created = v != 0,
            (11, Value::Bytes(event)) => {
                if let Some(value) = event_value(event)? {
                    out.sent_times.push(parse_decimal(value));
                }
            }
            _ => {}
        }
    }
    Some(out)
}

/// Event.kv.value, if the event has a kv.
fn event_value(mut event: &[u8]) -> Option<Option<&[u8]>> {
    let mut found = None;
    while !event.is_empty() {
        if let (2, Value::Bytes(mut kv)) = next_field(&mut event)? {
            let mut value: &[u8] = &[];
            while !kv.is_empty() {
                if let (5, Value::Bytes(v)) = next_field(&mut kv)? {
                    value = v;
                }
            }
            found = Some(value);
        }
    }
    Some(found)
}

fn parse_decimal(digits: &[u8]) -> u64 {
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return 0;
        }
        n = n.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
    }
    n
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The next field of a protobuf message: its number and value.
fn next_field<'a>(buf: &mut &'a [u8]) -> Option<(u64, Value<'a>)> {
    let key = varint(buf)?;
    let value = match key & 7 {
        0 => Value::Varint(varint(buf)?),
        1 => {
            *buf = buf.get(8..)?;
            Value::Fixed
        }
        2 => {
            let len = usize::try_from(varint(buf)?).ok()?;
            let (bytes, rest) = (buf.get(..len)?, buf.get(len..)?);
            *buf = rest;
            Value::Bytes(bytes)
        }
        5 => {
            *buf = buf.get(4..)?;
            Value::Fixed
        }
        _ => return None,
    };
    Some((key >> 3, value))
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some(v);
        }
    }
    None
}

#[derive(Debug, Clone, Copy, Default)]
struct SummaryCodec;

impl Codec for SummaryCodec {
    type Encode = WatchRequest;
    type Decode = WatchSummary;
    type Encoder = ProstEncoder<WatchRequest>;
    type Decoder = SummaryDecoder;

    fn encoder(&mut self) -> ProstEncoder<WatchRequest> {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> SummaryDecoder {
        SummaryDecoder
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct SummaryDecoder;

impl Decoder for SummaryDecoder {
    type Item = WatchSummary;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<WatchSummary>, Status> {
        // One message, usually in one contiguous chunk.
        let whole;
        let bytes = if buf.chunk().len() == buf.remaining() {
            buf.chunk()
        } else {
            whole = buf.copy_to_bytes(buf.remaining());
            &whole[..]
        };
        let summary = summarize(bytes).ok_or_else(|| Status::internal("malformed WatchResponse"))?;
        let n = buf.remaining();
        buf.advance(n);
        Ok(Some(summary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use keel_proto::etcdserverpb::{ResponseHeader, WatchResponse};
    use keel_proto::mvccpb::{Event, KeyValue};
    use prost::Message;

    fn event(value: &str, prev: bool) -> Event {
        let kv = |v: &str| KeyValue {
            key: Bytes::from_static(b"bench-watch-key"),
            create_revision: 2,
            mod_revision: 1 << 33,
            version: 300,
            value: Bytes::from(v.to_string()),
            lease: -1,
        };
        Event { r#type: 0, kv: Some(kv(value)), prev_kv: prev.then(|| kv("999")) }
    }

    #[test]
    fn reads_what_prost_would() {
        let header = Some(ResponseHeader { cluster_id: u64::MAX, member_id: 1, revision: 1 << 40, raft_term: 9 });
        let created = WatchResponse { header, watch_id: 5, created: true, ..Default::default() };
        assert_eq!(summarize(&created.encode_to_vec()), Some(WatchSummary { created: true, sent_times: vec![] }));
        let events = WatchResponse {
            header,
            watch_id: 300,
            compact_revision: 7,
            cancel_reason: "x".into(),
            events: vec![event("123456789012", true), event("not a number", false), event("42", false)],
            ..Default::default()
        };
        assert_eq!(
            summarize(&events.encode_to_vec()),
            Some(WatchSummary { created: false, sent_times: vec![123456789012, 0, 42] })
        );
        let without_kv = WatchResponse { events: vec![Event::default()], ..Default::default() };
        assert_eq!(summarize(&without_kv.encode_to_vec()), Some(WatchSummary::default()));
    }

    #[test]
    fn refuses_a_response_cut_inside_a_field() {
        let r = WatchResponse { watch_id: 300, events: vec![event("1", false)], ..Default::default() }.encode_to_vec();
        let events_start = WatchResponse { watch_id: 300, ..Default::default() }.encoded_len();
        for cut in events_start + 1..r.len() {
            assert_eq!(summarize(&r[..cut]), None, "cut at {cut}");
        }
        assert_eq!(summarize(&r[..1]), None);
    }
}
