//! Raft: openraft 0.9 (storage-v2) wired to keel's storage and network.
//!
//! - `log_store`: the Raft log and vote in the engine, with group-commit
//!   fsync;
//! - `journal`: preallocated segments where appends become durable;
//! - `batcher`: groups concurrent KV writes into one entry (group commit);
//! - `ack_mark`: detects a log or vote that lost acknowledged data;
//! - `state_machine`: applies committed entries (through `apply/`) and
//!   builds/installs snapshots;
//! - `snapshot_file`: the on-disk snapshot format;
//! - `read_index`: one leadership confirmation for many concurrent
//!   linearizable reads;
//! - `network` / `peer_service`: the gRPC peer transport (client / server).

pub mod ack_mark;
pub mod batcher;
pub mod journal;
pub mod log_store;
pub mod network;
pub mod peer_service;
pub mod read_index;
pub mod snapshot_file;
pub mod state_machine;

#[cfg(test)]
mod storage_suite;

use std::fmt;

use keel_proto::keelpb::{InternalRequest, InternalResponse};
use prost::Message;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

openraft::declare_raft_types!(
    /// keel's openraft type configuration.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = MemberNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = state_machine::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, MemberNode>;
pub type Membership = openraft::Membership<NodeId, MemberNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, MemberNode>;
pub type RaftStorageError = openraft::StorageError<NodeId>;

/// What Raft knows about a member: how to reach it. Name and client URLs
/// are published separately through the state machine, as etcd does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberNode {
    pub peer_urls: Vec<String>,
}

impl fmt::Display for MemberNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.peer_urls.join(","))
    }
}

/// The payload of a normal Raft log entry. Serialized as the protobuf
/// encoding of [`InternalRequest`], so the log format is versioned by the
/// .proto file rather than by Rust struct layout.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Command(pub InternalRequest);

/// The result of applying a [`Command`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandResult(pub InternalResponse);

fn serialize_message<M: Message, S: Serializer>(m: &M, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(&m.encode_to_vec())
}

fn deserialize_message<'de, M: Message + Default, D: Deserializer<'de>>(d: D) -> Result<M, D::Error> {
    let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
    M::decode(bytes.as_slice()).map_err(serde::de::Error::custom)
}

impl Serialize for Command {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_message(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_message(d).map(Command)
    }
}

impl Serialize for CommandResult {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_message(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for CommandResult {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_message(d).map(CommandResult)
    }
}

/// About how many bytes `entry` takes on the wire: its request's encoding
/// (membership and blank entries count as small).
pub fn entry_size(entry: &Entry) -> usize {
    const FRAMING: usize = 64;
    match &entry.payload {
        openraft::EntryPayload::Normal(Command(req)) => req.encoded_len() + FRAMING,
        _ => FRAMING,
    }
}

/// bincode with the settings every peer and every log record uses.
pub mod codec {
    use serde::{de::DeserializeOwned, Serialize};

    pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::Error> {
        bincode::serialize(value)
    }

    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::Error> {
        bincode::deserialize(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::etcdserverpb::PutRequest;
    use keel_proto::keelpb::internal_request::Request;

    #[test]
    fn command_round_trips_through_bincode() -> Result<(), bincode::Error> {
        let cmd = Command(InternalRequest {
            header: None,
            request: Some(Request::Put(PutRequest { key: "k".into(), value: "v".into(), ..Default::default() })),
        });
        let entry = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(3, 1), 7),
            payload: openraft::EntryPayload::Normal(cmd.clone()),
        };
        let back: Entry = codec::decode(&codec::encode(&entry)?)?;
        assert_eq!(back.log_id, entry.log_id);
        match back.payload {
            openraft::EntryPayload::Normal(c) => assert_eq!(c, cmd),
            other => panic!("unexpected payload {other:?}"),
        }
        Ok(())
    }
}
