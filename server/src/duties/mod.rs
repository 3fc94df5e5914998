//! Work a member does on its own rather than for a client request, most of
//! it only while it leads: lease expiry, checkpoints and keepalives
//! (`lease`), scheduled compaction and the corruption check
//! (`maintenance`). Above the member core (`server`), below the API.

pub mod lease;
pub mod maintenance;
