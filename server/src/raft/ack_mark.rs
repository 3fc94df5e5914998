//! The acknowledgement mark: a small file beside the database recording
//! the highest Raft log index and vote term this member has made durable
//! and therefore may have acknowledged to its peers.
//!
//! Raft's safety rests on a member never forgetting an entry or a vote it
//! acknowledged. If the database's write-ahead log loses its tail (a disk
//! that dropped synced data, a truncated file), the database still opens,
//! at an earlier point, and a member that resumed from there could lead
//! with a shorter log or vote twice in a term, and serve or commit wrong
//! data. The mark detects that: on start, a log or vote behind the mark
//! means acknowledged data is gone, and the member refuses to start (it
//! must be removed and added back empty, which is safe).
//!
//! The mark is written after the fsync it describes (so it never runs
//! ahead of durable data) but is not itself fsynced: losing a mark update
//! only weakens the check, it never causes a false alarm. Truncation
//! lowers the mark before the log shrinks, for the same reason.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What the member had made durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acknowledged {
    pub last_index: u64,
    pub vote_term: u64,
}

pub struct AckMark {
    path: PathBuf,
    state: Mutex<(File, Acknowledged)>,
}

const LEN: usize = 20;

fn encode(a: Acknowledged) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[..8].copy_from_slice(&a.last_index.to_le_bytes());
    out[8..16].copy_from_slice(&a.vote_term.to_le_bytes());
    let crc = crc32fast::hash(&out[..16]);
    out[16..].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode(b: &[u8]) -> Option<Acknowledged> {
    if b.len() != LEN {
        return None;
    }
    let crc = u32::from_le_bytes(b[16..20].try_into().ok()?);
    if crc32fast::hash(&b[..16]) != crc {
        return None;
    }
    Some(Acknowledged {
        last_index: u64::from_le_bytes(b[..8].try_into().ok()?),
        vote_term: u64::from_le_bytes(b[8..16].try_into().ok()?),
    })
}

impl AckMark {
    /// Opens (creating) the mark at `path`; returns it with what it
    /// recorded before (None for a new or unreadable mark).
    pub fn open(path: &Path) -> std::io::Result<(AckMark, Option<Acknowledged>)> {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let previous = decode(&bytes);
        let mark = AckMark { path: path.to_path_buf(), state: Mutex::new((file, previous.unwrap_or_default())) };
        Ok((mark, previous))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn store(&self, update: impl FnOnce(&mut Acknowledged)) -> std::io::Result<()> {
        let mut guard = self.state.lock().map_err(|_| std::io::Error::other("ack mark lock poisoned"))?;
        let (file, current) = &mut *guard;
        let before = *current;
        update(current);
        if *current == before {
            return Ok(());
        }
        // One positioned write per durable batch (it is on the commit path).
        file.write_all_at(&encode(*current), 0)
    }

    /// Entries up to `index` are durable.
    pub fn durable_up_to(&self, index: u64) -> std::io::Result<()> {
        self.store(|a| a.last_index = a.last_index.max(index))
    }

    /// The log is about to lose every entry from `index` on.
    pub fn truncating_from(&self, index: u64) -> std::io::Result<()> {
        self.store(|a| a.last_index = a.last_index.min(index.saturating_sub(1)))
    }

    /// A vote in `term` is durable.
    pub fn voted(&self, term: u64) -> std::io::Result<()> {
        self.store(|a| a.vote_term = a.vote_term.max(term))
    }
}

/// Compares what the database recovered with what was acknowledged.
pub fn check(recovered: Acknowledged, acknowledged: Acknowledged, mark: &Path) -> Result<(), String> {
    if recovered.last_index < acknowledged.last_index || recovered.vote_term < acknowledged.vote_term {
        return Err(format!(
            "the write-ahead log lost acknowledged data: the raft log ends at index {} (vote term {}) but index {} \
             (vote term {}) was made durable before ({}); refusing to start. Remove this member from the cluster \
             and add it back with an empty data directory",
            recovered.last_index,
            recovered.vote_term,
            acknowledged.last_index,
            acknowledged.vote_term,
            mark.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_survives_reopen_and_detects_a_shorter_log() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("raft.ack");
        let (mark, before) = AckMark::open(&path)?;
        assert_eq!(before, None);
        mark.voted(3)?;
        mark.durable_up_to(10)?;
        mark.durable_up_to(7)?;
        drop(mark);
        let (mark, before) = AckMark::open(&path)?;
        let ack = before.expect("mark readable");
        assert_eq!(ack, Acknowledged { last_index: 10, vote_term: 3 });
        assert!(check(Acknowledged { last_index: 10, vote_term: 3 }, ack, &path).is_ok());
        assert!(check(Acknowledged { last_index: 9, vote_term: 3 }, ack, &path).is_err());
        assert!(check(Acknowledged { last_index: 12, vote_term: 2 }, ack, &path).is_err());
        // Truncation lowers the mark first, so a shorter log is then fine.
        mark.truncating_from(6)?;
        drop(mark);
        let (_, before) = AckMark::open(&path)?;
        assert_eq!(before.map(|a| a.last_index), Some(5));
        Ok(())
    }

    #[test]
    fn damaged_mark_is_ignored() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("raft.ack");
        std::fs::write(&path, [1u8; LEN])?;
        let (_, before) = AckMark::open(&path)?;
        assert_eq!(before, None);
        Ok(())
    }
}
