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
//! - `network`: the client side of the gRPC peer transport (the server
//!   side is `api::peer`).

pub mod ack_mark;
pub mod batcher;
pub mod journal;
pub mod log_store;
pub mod network;
pub mod read_index;
pub mod snapshot_file;
pub mod state_machine;

#[cfg(test)]
mod storage_suite;

use prost::Message;

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

pub use crate::raft_types::{codec, Command, CommandResult, LogId, MemberNode, Membership, NodeId, StoredMembership};
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, MemberNode>;
pub type RaftStorageError = openraft::StorageError<NodeId>;

/// About how many bytes `entry` takes on the wire: its request's encoding
/// (membership and blank entries count as small).
pub fn entry_size(entry: &Entry) -> usize {
    const FRAMING: usize = 64;
    match &entry.payload {
        openraft::EntryPayload::Normal(Command(req)) => req.encoded_len() + FRAMING,
        _ => FRAMING,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::etcdserverpb::PutRequest;
    use keel_proto::keelpb::internal_request::Request;
    use keel_proto::keelpb::InternalRequest;

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
