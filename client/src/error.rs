//! Errors, classified by whether the request may have taken effect.

use tonic::Code;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The server answered with an error: the request did not take
    /// effect (e.g. a failed validation, a compacted revision).
    #[error("{code:?}: {message}")]
    Rejected { code: Code, message: String },
    /// The outcome is unknown: the request may or may not have been
    /// applied (timeout, connection lost after sending, leader lost
    /// mid-proposal).
    #[error("indeterminate: {0}")]
    Indeterminate(String),
    /// No endpoint could be reached at all: nothing was sent.
    #[error("no endpoint reachable: {0}")]
    Unreachable(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// True when the request certainly did not take effect.
    pub fn is_definite(&self) -> bool {
        !matches!(self, Error::Indeterminate(_))
    }

    /// The gRPC code the server sent, if it answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Classifies a failed call. `sent` says whether the request may have
    /// reached a server.
    pub(crate) fn from_status(status: tonic::Status, sent: bool) -> Error {
        let message = status.message().to_string();
        match status.code() {
            // etcd answers these only when it did not apply the request.
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::ResourceExhausted
            | Code::Unimplemented => Error::Rejected { code: status.code(), message },
            // "no leader" is decided before proposing.
            Code::Unavailable if message == "etcdserver: no leader" => Error::Rejected { code: status.code(), message },
            Code::Unavailable if !sent || is_connect_error(&status) => Error::Unreachable(message),
            _ => Error::Indeterminate(format!("{:?}: {message}", status.code())),
        }
    }

    /// Whether retrying on another endpoint could help.
    pub(crate) fn is_retriable(&self) -> bool {
        matches!(
            self,
            Error::Unreachable(_) | Error::Rejected { code: Code::Unavailable, .. } | Error::Indeterminate(_)
        )
    }
}

/// Transport failures before any request byte reached a server.
fn is_connect_error(status: &tonic::Status) -> bool {
    let m = status.message();
    m.contains("Connection refused") || m.contains("tcp connect error") || m.contains("error trying to connect")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let rejected = Error::from_status(
            tonic::Status::out_of_range("etcdserver: mvcc: required revision has been compacted"),
            true,
        );
        assert!(rejected.is_definite());
        let timeout = Error::from_status(tonic::Status::unavailable("etcdserver: request timed out"), true);
        assert!(!timeout.is_definite());
        let refused = Error::from_status(tonic::Status::unavailable("tcp connect error: Connection refused"), true);
        assert!(refused.is_definite());
        let deadline = Error::from_status(tonic::Status::deadline_exceeded("timeout"), true);
        assert!(!deadline.is_definite());
    }
}
