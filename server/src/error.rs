//! keel's error type. Every failure a client can see is one variant here;
//! `api/errors.rs` turns each into etcd's gRPC code and message, in one
//! place. Errors decided while applying a Raft entry travel through the log
//! result as `(code, detail)` (see [`Error::apply_code`]), so a follower that
//! forwarded a write reports exactly what the leader decided.

use crate::storage::StorageError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    // Request validation and KV semantics.
    #[error("key is not provided")]
    EmptyKey,
    #[error("key not found")]
    KeyNotFound,
    #[error("value is provided")]
    ValueProvided,
    #[error("lease is provided")]
    LeaseProvided,
    #[error("too many operations in txn request")]
    TooManyOps,
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    #[error("required revision has been compacted")]
    Compacted,
    #[error("required revision is a future revision")]
    FutureRevision,
    #[error("database space exceeded")]
    NoSpace,
    #[error("request is too large")]
    RequestTooLarge,
    #[error("too many requests")]
    TooManyRequests,

    // Leases.
    #[error("requested lease not found")]
    LeaseNotFound,
    #[error("lease already exists")]
    LeaseExists,
    #[error("too large lease TTL")]
    LeaseTtlTooLarge,

    // Membership.
    #[error("member ID already exist")]
    MemberExists,
    #[error("Peer URLs already exists")]
    PeerUrlExists,
    #[error("re-configuration failed due to not enough started members")]
    MemberNotEnoughStarted,
    #[error("given member URLs are invalid")]
    MemberBadUrls,
    #[error("member not found")]
    MemberNotFound,
    #[error("can only promote a learner member")]
    MemberNotLearner,
    #[error("can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("too many learner members in cluster")]
    TooManyLearners,

    // Downgrade.
    #[error("wrong downgrade target version format")]
    DowngradeWrongVersionFormat,
    #[error("invalid downgrade target version")]
    DowngradeInvalidVersion,
    #[error("cluster has a downgrade job in progress")]
    DowngradeInProgress,
    #[error("cluster version not found during downgrade")]
    ClusterVersionUnavailable,

    // Auth.
    #[error("root user does not exist")]
    RootUserNotExist,
    #[error("root user does not have root role")]
    RootRoleNotExist,
    #[error("user name already exists")]
    UserAlreadyExists,
    #[error("user name is empty")]
    UserEmpty,
    #[error("user name not found")]
    UserNotFound,
    #[error("role name already exists")]
    RoleAlreadyExists,
    #[error("role name not found")]
    RoleNotFound,
    #[error("role name is empty")]
    RoleEmpty,
    #[error("authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("authentication failed, password was given for no password user")]
    NoPasswordUser,
    #[error("permission denied")]
    PermissionDenied,
    #[error("role is not granted to the user")]
    RoleNotGranted,
    #[error("permission is not granted to the role")]
    PermissionNotGranted,
    #[error("authentication is not enabled")]
    AuthNotEnabled,
    #[error("invalid auth token")]
    InvalidAuthToken,
    #[error("invalid auth management")]
    InvalidAuthMgmt,
    #[error("revision of auth store is old")]
    AuthOldRevision,

    // Cluster state.
    #[error("no leader")]
    NoLeader,
    #[error("not leader")]
    NotLeader,
    #[error("leader changed")]
    LeaderChanged,
    #[error("not capable")]
    NotCapable,
    #[error("server stopped")]
    Stopped,
    #[error("request timed out")]
    Timeout,
    #[error("request timed out, possibly due to previous leader failure")]
    TimeoutDueToLeaderFail,
    #[error("unhealthy cluster")]
    Unhealthy,
    #[error("corrupt cluster")]
    Corrupt,
    #[error("rpc not supported for learner")]
    NotSupportedForLearner,
    #[error("bad leader transferee")]
    BadLeaderTransferee,

    /// An RPC keel does not implement (yet); names the RPC.
    #[error("{0} is not implemented by keel")]
    Unimplemented(&'static str),
    /// A request etcd rejects with InvalidArgument and a specific message.
    #[error("{0}")]
    InvalidArgument(String),
    /// A storage failure: the member cannot trust its data.
    #[error("storage: {0}")]
    Storage(String),
    /// A failure that is keel's fault, not the client's.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<StorageError> for Error {
    fn from(e: StorageError) -> Self {
        Error::Storage(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Stable numbering for errors carried in Raft apply results. Never reuse or
/// renumber a code: logs written by one version are applied by the next.
const APPLY_CODES: &[(u32, Error)] = &[
    (1, Error::EmptyKey),
    (2, Error::KeyNotFound),
    (3, Error::ValueProvided),
    (4, Error::LeaseProvided),
    (5, Error::TooManyOps),
    (6, Error::DuplicateKey),
    (7, Error::Compacted),
    (8, Error::FutureRevision),
    (9, Error::NoSpace),
    (10, Error::LeaseNotFound),
    (11, Error::LeaseExists),
    (12, Error::LeaseTtlTooLarge),
    (13, Error::MemberExists),
    (14, Error::PeerUrlExists),
    (15, Error::MemberNotFound),
    (16, Error::MemberNotLearner),
    (17, Error::RootUserNotExist),
    (18, Error::RootRoleNotExist),
    (19, Error::UserAlreadyExists),
    (20, Error::UserEmpty),
    (21, Error::UserNotFound),
    (22, Error::RoleAlreadyExists),
    (23, Error::RoleNotFound),
    (24, Error::RoleEmpty),
    (25, Error::AuthFailed),
    (26, Error::PermissionDenied),
    (27, Error::RoleNotGranted),
    (28, Error::PermissionNotGranted),
    (29, Error::AuthNotEnabled),
    (30, Error::InvalidAuthToken),
    (31, Error::InvalidAuthMgmt),
    (32, Error::AuthOldRevision),
    (33, Error::Corrupt),
    (34, Error::RequestTooLarge),
    (35, Error::MemberBadUrls),
    (36, Error::TooManyLearners),
];

const CODE_INVALID_ARGUMENT: u32 = 1000;
const CODE_STORAGE: u32 = 1001;
const CODE_INTERNAL: u32 = 1002;

impl Error {
    /// The code and detail this error travels under in a Raft apply result.
    pub fn apply_code(&self) -> (u32, String) {
        match self {
            Error::InvalidArgument(m) => (CODE_INVALID_ARGUMENT, m.clone()),
            Error::Storage(m) => (CODE_STORAGE, m.clone()),
            other => match APPLY_CODES.iter().find(|(_, e)| e == other) {
                Some((code, _)) => (*code, String::new()),
                None => (CODE_INTERNAL, other.to_string()),
            },
        }
    }

    /// Inverse of [`Error::apply_code`].
    pub fn from_apply_code(code: u32, detail: String) -> Error {
        match code {
            CODE_INVALID_ARGUMENT => Error::InvalidArgument(detail),
            CODE_STORAGE => Error::Storage(detail),
            _ => {
                APPLY_CODES.iter().find(|(c, _)| *c == code).map(|(_, e)| e.clone()).unwrap_or(Error::Internal(detail))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_codes_round_trip_and_are_unique() {
        for (code, err) in APPLY_CODES {
            assert_eq!(err.apply_code().0, *code);
            assert_eq!(Error::from_apply_code(*code, String::new()), *err);
            assert_eq!(APPLY_CODES.iter().filter(|(c, _)| c == code).count(), 1);
        }
        let e = Error::InvalidArgument("bad".into());
        let (c, d) = e.apply_code();
        assert_eq!(Error::from_apply_code(c, d), e);
    }
}
