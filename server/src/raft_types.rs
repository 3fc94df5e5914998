//! The Raft types every layer shares, kept below the layers that use them
//! (`apply` records the applied log id and membership, `cluster` reads the
//! membership): member ids and addresses, log ids, memberships, the payload
//! of a log entry and the codec of persisted Raft state. openraft's type
//! configuration itself is `raft::TypeConfig`.

use std::fmt;

use keel_proto::keelpb::{InternalRequest, InternalResponse};
use prost::Message;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, MemberNode>;
pub type Membership = openraft::Membership<NodeId, MemberNode>;

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
