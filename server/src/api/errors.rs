//! The one place keel errors become gRPC statuses: etcd's code and its
//! exact message for each (clients such as clientv3 and etcdctl match on
//! the message text).

use tonic::{Code, Status};

use crate::error::Error;

/// etcd's gRPC code and message for an error.
pub fn code_and_message(e: &Error) -> (Code, String) {
    use Code::*;
    let (code, msg): (Code, &str) = match e {
        Error::EmptyKey => (InvalidArgument, "etcdserver: key is not provided"),
        Error::KeyNotFound => (InvalidArgument, "etcdserver: key not found"),
        Error::ValueProvided => (InvalidArgument, "etcdserver: value is provided"),
        Error::LeaseProvided => (InvalidArgument, "etcdserver: lease is provided"),
        Error::TooManyOps => (InvalidArgument, "etcdserver: too many operations in txn request"),
        Error::DuplicateKey => (InvalidArgument, "etcdserver: duplicate key given in txn request"),
        Error::Compacted => (OutOfRange, "etcdserver: mvcc: required revision has been compacted"),
        Error::FutureRevision => (OutOfRange, "etcdserver: mvcc: required revision is a future revision"),
        Error::NoSpace => (ResourceExhausted, "etcdserver: mvcc: database space exceeded"),
        Error::RequestTooLarge => (InvalidArgument, "etcdserver: request is too large"),
        Error::TooManyRequests => (ResourceExhausted, "etcdserver: too many requests"),
        Error::LeaseNotFound => (NotFound, "etcdserver: requested lease not found"),
        Error::LeaseExists => (FailedPrecondition, "etcdserver: lease already exists"),
        Error::LeaseTtlTooLarge => (OutOfRange, "etcdserver: too large lease TTL"),
        Error::MemberExists => (FailedPrecondition, "etcdserver: member ID already exist"),
        Error::PeerUrlExists => (FailedPrecondition, "etcdserver: Peer URLs already exists"),
        Error::MemberNotEnoughStarted => {
            (FailedPrecondition, "etcdserver: re-configuration failed due to not enough started members")
        }
        Error::MemberBadUrls => (InvalidArgument, "etcdserver: given member URLs are invalid"),
        Error::MemberNotFound => (NotFound, "etcdserver: member not found"),
        Error::MemberNotLearner => (FailedPrecondition, "etcdserver: can only promote a learner member"),
        Error::LearnerNotReady => {
            (FailedPrecondition, "etcdserver: can only promote a learner member which is in sync with leader")
        }
        Error::TooManyLearners => (FailedPrecondition, "etcdserver: too many learner members in cluster"),
        Error::DowngradeWrongVersionFormat => (InvalidArgument, "etcdserver: wrong downgrade target version format"),
        Error::DowngradeInvalidVersion => (InvalidArgument, "etcdserver: invalid downgrade target version"),
        Error::DowngradeInProgress => (FailedPrecondition, "etcdserver: cluster has a downgrade job in progress"),
        Error::ClusterVersionUnavailable => {
            (FailedPrecondition, "etcdserver: cluster version not found during downgrade")
        }
        Error::RootUserNotExist => (FailedPrecondition, "etcdserver: root user does not exist"),
        Error::RootRoleNotExist => (FailedPrecondition, "etcdserver: root user does not have root role"),
        Error::UserAlreadyExists => (FailedPrecondition, "etcdserver: user name already exists"),
        Error::UserEmpty => (InvalidArgument, "etcdserver: user name is empty"),
        Error::UserNotFound => (FailedPrecondition, "etcdserver: user name not found"),
        Error::RoleAlreadyExists => (FailedPrecondition, "etcdserver: role name already exists"),
        Error::RoleNotFound => (FailedPrecondition, "etcdserver: role name not found"),
        Error::RoleEmpty => (InvalidArgument, "etcdserver: role name is empty"),
        Error::AuthFailed => (InvalidArgument, "etcdserver: authentication failed, invalid user ID or password"),
        // etcd 3.4 has no gRPC mapping for this one: clients see the
        // auth package's own text with code Unknown.
        Error::NoPasswordUser => {
            return (Unknown, "auth: authentication failed, password was given for no password user".to_string())
        }
        Error::PermissionDenied => (PermissionDenied, "etcdserver: permission denied"),
        Error::RoleNotGranted => (FailedPrecondition, "etcdserver: role is not granted to the user"),
        Error::PermissionNotGranted => (FailedPrecondition, "etcdserver: permission is not granted to the role"),
        Error::AuthNotEnabled => (FailedPrecondition, "etcdserver: authentication is not enabled"),
        Error::InvalidAuthToken => (Unauthenticated, "etcdserver: invalid auth token"),
        Error::InvalidAuthMgmt => (InvalidArgument, "etcdserver: invalid auth management"),
        Error::AuthOldRevision => (InvalidArgument, "etcdserver: revision of auth store is old"),
        Error::NoLeader => (Unavailable, "etcdserver: no leader"),
        Error::NotLeader => (FailedPrecondition, "etcdserver: not leader"),
        Error::LeaderChanged => (Unavailable, "etcdserver: leader changed"),
        Error::NotCapable => (Unavailable, "etcdserver: not capable"),
        Error::Stopped => (Unavailable, "etcdserver: server stopped"),
        Error::Timeout => (Unavailable, "etcdserver: request timed out"),
        Error::TimeoutDueToLeaderFail => {
            (Unavailable, "etcdserver: request timed out, possibly due to previous leader failure")
        }
        Error::Unhealthy => (Unavailable, "etcdserver: unhealthy cluster"),
        Error::Corrupt => (DataLoss, "etcdserver: corrupt cluster"),
        Error::NotSupportedForLearner => (Unavailable, "etcdserver: rpc not supported for learner"),
        Error::BadLeaderTransferee => (FailedPrecondition, "etcdserver: bad leader transferee"),
        Error::Unimplemented(rpc) => return (Unimplemented, format!("{rpc} is not implemented by keel")),
        Error::InvalidArgument(m) => return (InvalidArgument, m.clone()),
        Error::Storage(m) => return (Internal, format!("etcdserver: storage: {m}")),
        Error::Internal(m) => return (Internal, format!("etcdserver: {m}")),
    };
    (code, msg.to_string())
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let (code, msg) = code_and_message(&e);
        Status::new(code, msg)
    }
}

/// UNIMPLEMENTED naming the RPC, for RPCs keel does not serve.
pub fn unimplemented(rpc: &'static str) -> Status {
    Error::Unimplemented(rpc).into()
}

/// grpc-go's status for a request message over the size limit, in place
/// of tonic's: etcd answers RESOURCE_EXHAUSTED "grpc: received message
/// larger than max (N vs. M)" where tonic says OUT_OF_RANGE. Other
/// statuses pass unchanged.
pub fn as_grpc_go(status: Status) -> Status {
    grpc_go_status(&status).unwrap_or(status)
}

/// grpc-go's status for `status` when tonic refused a request for its size.
fn grpc_go_status(status: &Status) -> Option<Status> {
    if status.code() != Code::OutOfRange {
        return None;
    }
    let rest = status.message().strip_prefix("Error, decoded message length too large: found ")?;
    let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    let (found, limit): (u64, u64) = (found.parse().ok()?, limit.parse().ok()?);
    Some(Status::resource_exhausted(format!("grpc: received message larger than max ({found} vs. {limit})")))
}

/// Applies [`as_grpc_go`] to a unary call's response, whose refused
/// requests are answered in the response headers before any handler
/// runs (streams apply it to the errors they read).
pub fn with_grpc_go_status(mut resp: axum::response::Response) -> axum::response::Response {
    let go = Status::from_header_map(resp.headers()).and_then(|status| grpc_go_status(&status));
    if let Some(go) = go {
        if let Err(e) = go.add_header(resp.headers_mut()) {
            tracing::warn!(error = %e, "cannot rewrite a gRPC status");
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_requests_get_grpc_gos_status() {
        let tonic = Status::out_of_range(
            "Error, decoded message length too large: found 8388613 bytes, the limit is: 2097152 bytes",
        );
        let go = as_grpc_go(tonic);
        assert_eq!(go.code(), Code::ResourceExhausted);
        assert_eq!(go.message(), "grpc: received message larger than max (8388613 vs. 2097152)");
        let other = as_grpc_go(Status::out_of_range("etcdserver: mvcc: required revision is a future revision"));
        assert_eq!(other.code(), Code::OutOfRange);
    }
}
