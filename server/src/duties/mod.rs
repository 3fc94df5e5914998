//! Work a member does on its own rather than for a client request, most of
//! it only while it leads. Every duty reaches Raft through
//! `server::RaftSeam` (and `MembershipSeam`), so its unit tests run it
//! against `fake_raft`: lease expiry, checkpoints and keepalives
//! (`lease`), scheduled compaction (`compaction`), the corruption check
//! (`corruption`), learner promotion (`promotion`) and the end of a
//! downgrade (`downgrade`). Above the member
//! core (`server`), below the API.

pub mod compaction;
pub mod corruption;
pub mod downgrade;
pub mod lease;
pub mod promotion;

#[cfg(test)]
mod fake_raft;
