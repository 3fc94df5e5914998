//! Every table (RocksDB column family) and every fixed key, in one place.
//!
//! | table       | key                          | value                                  |
//! |-------------|------------------------------|----------------------------------------|
//! | raft_log    | log index, u64 big-endian    | crc32 + bincode(openraft Entry)        |
//! | raft_state  | [`RAFT_VOTE`], ...           | bincode(Vote / LogId)                  |
//! | kv          | revision: main, sub (u64 BE) | mvccpb.KeyValue (version 0: tombstone) |
//! | lease       | lease id, u64 big-endian     | keel lease record                      |
//! | auth        | `u/`+name, `r/`+name, ...    | authpb.User / authpb.Role              |
//! | meta        | [`META_APPLIED`], ...        | see each constant                      |
//!
//! The state machine is exactly `kv`, `lease`, `auth` and `meta`: that is
//! what a snapshot carries and what applying a log entry writes.

/// A named, ordered keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    RaftLog,
    RaftState,
    Kv,
    Lease,
    Auth,
    Meta,
}

impl Table {
    pub const ALL: [Table; 6] = [Table::RaftLog, Table::RaftState, Table::Kv, Table::Lease, Table::Auth, Table::Meta];

    /// The tables that make up the replicated state machine.
    pub const STATE_MACHINE: [Table; 4] = [Table::Kv, Table::Lease, Table::Auth, Table::Meta];

    pub fn name(self) -> &'static str {
        match self {
            Table::RaftLog => "raft_log",
            Table::RaftState => "raft_state",
            Table::Kv => "kv",
            Table::Lease => "lease",
            Table::Auth => "auth",
            Table::Meta => "meta",
        }
    }

    /// Stable one-byte tag used in snapshot files.
    pub fn tag(self) -> u8 {
        match self {
            Table::RaftLog => 1,
            Table::RaftState => 2,
            Table::Kv => 3,
            Table::Lease => 4,
            Table::Auth => 5,
            Table::Meta => 6,
        }
    }

    pub fn from_tag(tag: u8) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.tag() == tag)
    }
}

/// raft_state: the last vote (bincode `Vote`).
pub const RAFT_VOTE: &[u8] = b"vote";
/// raft_state: the last committed log id (bincode `Option<LogId>`).
pub const RAFT_COMMITTED: &[u8] = b"committed";
/// raft_state: the last purged log id (bincode `LogId`).
pub const RAFT_LAST_PURGED: &[u8] = b"last_purged";
/// raft_state: this member's id and its cluster's id (bincode `(u64,
/// u64)`; local facts, never replicated or overwritten by a snapshot).
pub const LOCAL_IDENTITY: &[u8] = b"identity";
/// raft_state: the membership to bootstrap with on first start, written by
/// `keel snapshot restore` (bincode `Vec<(member id, peer URLs)>`).
pub const BOOTSTRAP_MEMBERS: &[u8] = b"bootstrap_members";

/// meta: the last applied log id (bincode `LogId`). Written in the same
/// batch as the effects of that entry.
pub const META_APPLIED: &[u8] = b"applied";
/// meta: the last applied membership (bincode `StoredMembership`).
pub const META_MEMBERSHIP: &[u8] = b"membership";
/// meta: revision of the last compaction requested through Raft (i64 BE).
pub const META_COMPACT_SCHEDULED: &[u8] = b"compact_scheduled";
/// meta: revision up to which history was physically removed (i64 BE).
pub const META_COMPACT_FINISHED: &[u8] = b"compact_finished";
/// meta: the store revision, kept so it survives compaction of every key
/// (i64 BE).
pub const META_REVISION: &[u8] = b"revision";
/// meta: cluster id (u64 BE), fixed at bootstrap.
pub const META_CLUSTER_ID: &[u8] = b"cluster_id";
/// meta: prefix of published member attributes, followed by member id.
pub const META_MEMBER_PREFIX: &[u8] = b"member/";
/// meta: prefix of removed member ids (member id u64 BE, empty value).
pub const META_REMOVED_PREFIX: &[u8] = b"removed/";
/// meta: the target version ("3.5.0") while a downgrade is enabled.
pub const META_DOWNGRADE: &[u8] = b"downgrade";
/// meta: prefix of raised alarms: `alarm/` + member id + alarm type.
pub const META_ALARM_PREFIX: &[u8] = b"alarm/";
/// meta: auth enabled flag and auth revision.
pub const META_AUTH_ENABLED: &[u8] = b"auth_enabled";
pub const META_AUTH_REVISION: &[u8] = b"auth_revision";
/// meta: the lease checkpointing schema marker etc. live under this prefix.
pub const META_LEASE_PREFIX: &[u8] = b"lease/";
/// auth: a user record (`authpb.User`) is `u/` + user name; etcd's
/// `authUsers` bucket holds the same records under the bare name.
pub const AUTH_USER_PREFIX: &[u8] = b"u/";
/// auth: a role record (`authpb.Role`) is `r/` + role name (etcd's
/// `authRoles` bucket).
pub const AUTH_ROLE_PREFIX: &[u8] = b"r/";

/// raft_log key for a log index.
pub fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

pub fn decode_i64(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(bytes.try_into().ok()?))
}

/// meta key for a member's published attributes.
pub fn member_key(id: u64) -> Vec<u8> {
    let mut k = META_MEMBER_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The smallest key greater than every key starting with `prefix`, or
/// `None` when no such key exists (prefix is all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"abc"), Some(b"abd".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }

    #[test]
    fn table_tags_round_trip() {
        for t in Table::ALL {
            assert_eq!(Table::from_tag(t.tag()), Some(t));
        }
        assert_eq!(Table::from_tag(0), None);
    }
}
