//! Watch responses on their way out of a member, and the gRPC codec that
//! writes them.
//!
//! Most of a busy watch stream's traffic is one revision's events going to
//! many watchers of the same key: the same header and the same events,
//! each response differing only in its watch id. Building a
//! `WatchResponse` per watcher cloned the events and encoded them again
//! for every watcher, which was most of a member's CPU under watch
//! fan-out. A [`SharedResponse`] encodes the header and the events once
//! per stream and revision; each watcher's response is those bytes with
//! its watch id between them, byte for byte what encoding the whole
//! `WatchResponse` gives (protobuf writes fields in tag order: header 1,
//! watch_id 2, events 11).

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use keel_proto::etcdserverpb::{ResponseHeader, WatchRequest, WatchResponse};
use keel_proto::mvccpb::Event;
use prost::Message;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::ProstDecoder;

/// One response of a watch stream.
#[derive(Debug, Clone)]
pub enum WatchOut {
    /// A response of its own (created, canceled, progress, catch-up,
    /// fragments).
    Message(WatchResponse),
    /// A revision's events as they go to several watchers of the stream.
    Shared { response: Arc<SharedResponse>, watch_id: i64 },
}

impl WatchOut {
    /// The response as a message (tests and anything that is not gRPC).
    pub fn into_response(self) -> WatchResponse {
        match self {
            WatchOut::Message(r) => r,
            WatchOut::Shared { response, watch_id } => WatchResponse {
                header: Some(response.header),
                watch_id,
                events: response.events.clone(),
                ..Default::default()
            },
        }
    }

    /// Writes the response's protobuf encoding to `buf`.
    pub fn encode(self, buf: &mut impl BufMut) -> Result<(), prost::EncodeError> {
        match self {
            WatchOut::Message(r) => r.encode(buf),
            WatchOut::Shared { response, watch_id } => response.encode(watch_id, buf),
        }
    }
}

/// A header and events encoded once for every watcher that gets them.
#[derive(Debug)]
pub struct SharedResponse {
    header: ResponseHeader,
    /// Kept for the watchers that need their response in fragments.
    events: Vec<Event>,
    /// Field 1 (header) then field 11 (events), encoded.
    encoded: Bytes,
    /// Where field 1 ends in `encoded`.
    header_len: usize,
}

impl SharedResponse {
    pub fn new(header: ResponseHeader, events: Vec<Event>) -> Self {
        let header_only = WatchResponse { header: Some(header), ..Default::default() };
        let events_only = WatchResponse { events, ..Default::default() };
        let header_len = header_only.encoded_len();
        let mut encoded = Vec::with_capacity(header_len + events_only.encoded_len());
        // Encoding into a Vec cannot run out of room.
        let _ = header_only.encode(&mut encoded);
        let _ = events_only.encode(&mut encoded);
        Self { header, events: events_only.events, encoded: Bytes::from(encoded), header_len }
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The encoded length of the response for `watch_id`.
    pub fn encoded_len(&self, watch_id: i64) -> usize {
        self.encoded.len() + WatchResponse { watch_id, ..Default::default() }.encoded_len()
    }

    fn encode(&self, watch_id: i64, buf: &mut impl BufMut) -> Result<(), prost::EncodeError> {
        buf.put_slice(&self.encoded[..self.header_len]);
        WatchResponse { watch_id, ..Default::default() }.encode(buf)?;
        buf.put_slice(&self.encoded[self.header_len..]);
        Ok(())
    }
}

/// etcd's Watch codec: requests decode with prost; responses are
/// [`WatchOut`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = WatchOut;
    type Decode = WatchRequest;
    type Encoder = WatchOutEncoder;
    type Decoder = ProstDecoder<WatchRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        WatchOutEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct WatchOutEncoder;

impl Encoder for WatchOutEncoder {
    type Item = WatchOut;
    type Error = Status;

    fn encode(&mut self, item: WatchOut, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // EncodeBuf grows as needed, so encoding cannot run out of room.
        item.encode(buf).map_err(|e| Status::internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::mvccpb::{event::EventType, KeyValue};

    fn event(key: &str, rev: i64, prev: bool) -> Event {
        let kv = |r: i64| KeyValue {
            key: Bytes::from(key.to_string()),
            create_revision: 2,
            mod_revision: r,
            version: r - 1,
            value: Bytes::from(format!("value at {r}")),
            lease: 7,
        };
        Event { r#type: EventType::Put as i32, kv: Some(kv(rev)), prev_kv: prev.then(|| kv(rev - 1)) }
    }

    #[test]
    fn a_shared_response_encodes_as_the_whole_message_does() {
        let header = ResponseHeader { cluster_id: 11, member_id: 12, revision: 300, raft_term: 4 };
        for events in [vec![], vec![event("a", 300, false)], vec![event("a", 300, true), event("b", 300, false)]] {
            let shared = Arc::new(SharedResponse::new(header, events.clone()));
            for watch_id in [0, 1, 127, 128, 1 << 40, -1, i64::MIN, i64::MAX] {
                let whole =
                    WatchResponse { header: Some(header), watch_id, events: events.clone(), ..Default::default() };
                let mut buf = Vec::new();
                let out = WatchOut::Shared { response: shared.clone(), watch_id };
                out.clone().encode(&mut buf).expect("encode into a Vec");
                assert_eq!(buf, whole.encode_to_vec(), "watch_id {watch_id}, {} events", events.len());
                assert_eq!(shared.encoded_len(watch_id), whole.encoded_len());
                assert_eq!(out.into_response(), whole);
            }
        }
    }

    #[test]
    fn a_message_encodes_as_prost_does() {
        let r = WatchResponse { watch_id: 3, created: true, ..Default::default() };
        let mut buf = Vec::new();
        WatchOut::Message(r.clone()).encode(&mut buf).expect("encode into a Vec");
        assert_eq!(buf, r.encode_to_vec());
    }
}
