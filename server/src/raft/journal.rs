//! The Raft log's journal: the file where appended entries become durable.
//!
//! Why it exists: making an append durable by fsyncing RocksDB's
//! write-ahead log costs two device waits on ext4, one for the data and one
//! for the inode, because every append grows the file (RocksDB preallocates
//! with FALLOC_FL_KEEP_SIZE, which leaves the size to change). A journal
//! segment is allocated at its full size up front, so an append writes
//! inside the file and `fdatasync` waits once, as etcd's preallocated WAL
//! segments do (the difference per append is in docs/BENCHMARKS.md,
//! "Figures behind design choices").
//!
//! The entries still go to the engine's `raft_log` table, unsynced and in
//! the same order; that table is what Raft reads. The journal only has to
//! hold what the engine may not have made durable yet, so when a segment
//! fills, the engine is synced and the older segments are deleted
//! (`Journal::write`). On start, every remaining segment is replayed onto
//! the table in order (`replay`): replaying records the table already has
//! rewrites the same entries, and a truncation is a record of its own, so
//! the result is the log as it was when the last durable record was
//! written.
//!
//! Format of a segment (`<number, 16 hex digits>.journal`): records, each
//! `len u32 LE | crc32 u32 LE of the body | body`, then zeros to the end of
//! the allocation. A body is an append (`1`, then per entry: index u64 LE,
//! length u32 LE, the entry as stored in `raft_log`) or a truncation (`2`,
//! then the first removed index u64 LE). A zero length ends a segment's
//! records. A record that fails its checksum ends the journal if it is
//! torn (`is_torn`: a crash cut its write short, so it was never
//! acknowledged) and stops replay with an error otherwise (damage); a
//! journal that merely ends early is caught by the acknowledgement mark
//! (`ack_mark`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Bytes allocated for a segment (more for a record that does not fit).
/// Replay reads at most about this much after a crash.
pub const SEGMENT_BYTES: u64 = 16 << 20;

const HEADER: usize = 8;
const APPEND: u8 = 1;
const TRUNCATE: u8 = 2;

/// One journal record, as replayed.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    /// Entries (index, stored bytes) written in this order.
    Append(Vec<(u64, Vec<u8>)>),
    /// Entries from this index on were removed.
    Truncate(u64),
}

/// The body of an append record for `entries` (index, stored bytes).
pub fn append_body<'a>(entries: impl IntoIterator<Item = (u64, &'a [u8])>) -> Vec<u8> {
    let mut body = vec![APPEND];
    for (index, bytes) in entries {
        body.extend_from_slice(&index.to_le_bytes());
        body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        body.extend_from_slice(bytes);
    }
    body
}

/// The body of a truncation record.
pub fn truncate_body(from: u64) -> Vec<u8> {
    let mut body = vec![TRUNCATE];
    body.extend_from_slice(&from.to_le_bytes());
    body
}

fn decode_body(body: &[u8]) -> Option<Record> {
    let (&kind, mut rest) = body.split_first()?;
    match kind {
        APPEND => {
            let mut entries = Vec::new();
            while !rest.is_empty() {
                let index = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
                let len = u32::from_le_bytes(rest.get(8..12)?.try_into().ok()?) as usize;
                let bytes = rest.get(12..12 + len)?;
                entries.push((index, bytes.to_vec()));
                rest = &rest[12 + len..];
            }
            Some(Record::Append(entries))
        }
        TRUNCATE if rest.len() == 8 => Some(Record::Truncate(u64::from_le_bytes(rest.try_into().ok()?))),
        _ => None,
    }
}

fn segment_name(number: u64) -> String {
    format!("{number:016x}.journal")
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let number = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".journal"))
            .and_then(|n| u64::from_str_radix(n, 16).ok());
        if let Some(number) = number {
            found.push((number, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Sector size for telling a torn write from damage.
const SECTOR: usize = 512;

/// Whether the bad record at `at` (declaring `len` body bytes) is a write
/// a crash cut short: some part of it never reached the disk, so one of
/// the sectors it covers still reads as zeros (etcd's rule for its WAL).
/// Anything else is damage.
fn is_torn(bytes: &[u8], at: usize, len: usize) -> bool {
    let end = at.saturating_add(HEADER).saturating_add(len).min(bytes.len());
    let mut start = at;
    while start < end {
        let chunk_end = ((start / SECTOR + 1) * SECTOR).min(end);
        if bytes[start..chunk_end].iter().all(|&b| b == 0) {
            return true;
        }
        start = chunk_end;
    }
    false
}

fn has_records(bytes: &[u8]) -> bool {
    bytes.get(..4).is_some_and(|len| len.iter().any(|&b| b != 0))
}

fn damaged(path: &Path, at: usize, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("raft log journal {} is damaged at offset {at}: {what}", path.display()),
    )
}

/// Visits every record of the journal in `dir`, oldest first, and returns
/// how many there were. A torn record (see `is_torn`) ends the journal:
/// it and whatever follows it in its segment were never acknowledged (a
/// segment is synced before the next one starts, so a later segment with
/// records means it was not a crash, and is an error). A record that fails
/// its checksum without being torn is damage: an error, so the member
/// refuses to start rather than replay around a hole.
pub fn replay<E: From<io::Error>>(dir: &Path, visit: &mut dyn FnMut(Record) -> Result<(), E>) -> Result<usize, E> {
    let mut visited = 0;
    let mut torn: Option<(PathBuf, usize)> = None;
    for (_, path) in segments(dir)? {
        let bytes = std::fs::read(&path)?;
        if let Some((torn_path, at)) = &torn {
            if has_records(&bytes) {
                return Err(damaged(torn_path, *at, "a torn record is followed by a newer segment").into());
            }
            continue;
        }
        let mut at = 0;
        while let Some(header) = bytes.get(at..at + HEADER) {
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            if len == 0 {
                break;
            }
            let record = bytes
                .get(at + HEADER..at + HEADER + len)
                .filter(|body| crc32fast::hash(body) == crc)
                .and_then(decode_body);
            let Some(record) = record else {
                if !is_torn(&bytes, at, len) {
                    return Err(damaged(&path, at, "a record fails its checksum").into());
                }
                tracing::warn!(segment = %path.display(), offset = at, "raft log journal ends in a torn record");
                torn = Some((path.clone(), at));
                break;
            };
            visit(record)?;
            visited += 1;
            at += HEADER + len;
        }
    }
    Ok(visited)
}

/// Allocates `len` bytes of `file` (its size becomes `len`) so later
/// writes inside it do not change its size.
fn allocate(file: &File, len: u64) -> io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        // A file system without fallocate: a sparse file still keeps the
        // size fixed.
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => file.set_len(len),
        Err(e) => Err(e.into()),
    }
}

fn retire_before(dir: &Path, current: u64) -> io::Result<()> {
    for (number, path) in segments(dir)? {
        if number < current {
            std::fs::remove_file(&path)?;
        }
    }
    // A retired segment that came back after a power failure would be
    // replayed before the newer ones.
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct Segment {
    file: Arc<File>,
    number: u64,
    /// Where the next record goes.
    offset: u64,
    capacity: u64,
}

impl Segment {
    fn create(dir: &Path, number: u64, capacity: u64) -> io::Result<Self> {
        let path = dir.join(segment_name(number));
        // Truncated: a file left by an attempt that failed half way is
        // empty, never holds records.
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        allocate(&file, capacity)?;
        file.sync_all()?;
        // The new name must survive a crash before anything in it counts.
        sync_dir(dir)?;
        Ok(Self { file: Arc::new(file), number, offset: 0, capacity })
    }
}

pub struct Journal {
    dir: PathBuf,
    current: Mutex<Current>,
}

struct Current {
    /// Created at the first write, so a member that stops before writing
    /// (e.g. one refusing to start) leaves no empty segments behind.
    segment: Option<Segment>,
    /// The number of the segment to create next.
    next: u64,
}

impl Journal {
    /// Opens the journal in `dir` (created if missing); records go to a
    /// new segment. Existing segments stay until [`Journal::retire_older`]:
    /// replay them, make what they hold durable elsewhere, then retire.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let next = segments(dir)?.last().map_or(1, |(n, _)| n + 1);
        Ok(Self { dir: dir.to_path_buf(), current: Mutex::new(Current { segment: None, next }) })
    }

    fn lock(&self) -> MutexGuard<'_, Current> {
        // Fields change only after the I/O they describe succeeded, so a
        // poisoned lock still holds a valid state.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Deletes the segments from before this journal was opened. Call only
    /// once everything they hold is durable in the engine.
    pub fn retire_older(&self) -> io::Result<()> {
        let current = self.lock();
        let first_own = current.segment.as_ref().map_or(current.next, |s| s.number);
        retire_before(&self.dir, first_own)
    }

    /// Writes one record (not yet durable: see [`Journal::sync`]). When the
    /// current segment is full, it is synced, a new one is started,
    /// `sync_engine` makes everything written to the engine so far durable
    /// (the engine gets each record's entries before the journal does), and
    /// the older segments are deleted.
    pub fn write(&self, body: &[u8], sync_engine: &dyn Fn() -> io::Result<()>) -> io::Result<()> {
        let len = u32::try_from(body.len()).map_err(|_| io::Error::other("raft log journal record too large"))?;
        let mut record = Vec::with_capacity(HEADER + body.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        record.extend_from_slice(body);
        let needed = record.len() as u64;
        let capacity = SEGMENT_BYTES.max(needed.next_multiple_of(4096));
        let mut current = self.lock();
        let full = current.segment.as_ref().map(|s| s.offset + needed > s.capacity);
        if full != Some(false) {
            if let Some(old) = &current.segment {
                old.file.sync_data()?;
            }
            let segment = Segment::create(&self.dir, current.next, capacity)?;
            let number = segment.number;
            current.next += 1;
            if current.segment.replace(segment).is_some() {
                sync_engine()?;
                retire_before(&self.dir, number)?;
            }
        }
        let segment = current.segment.as_mut().ok_or_else(|| io::Error::other("raft log journal has no segment"))?;
        segment.file.write_all_at(&record, segment.offset)?;
        segment.offset += needed;
        Ok(())
    }

    /// Makes every record written so far durable.
    pub fn sync(&self) -> io::Result<()> {
        // A segment replaced meanwhile was synced when it was replaced.
        let file = self.lock().segment.as_ref().map(|s| s.file.clone());
        match file {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(dir: &Path) -> Vec<Record> {
        let mut out = Vec::new();
        replay::<io::Error>(dir, &mut |r| {
            out.push(r);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("replay: {e}"));
        out
    }

    fn no_engine() -> io::Result<()> {
        Ok(())
    }

    /// Why replay of `dir` fails ("" if it does not).
    fn replay_error(dir: &Path) -> String {
        replay::<io::Error>(dir, &mut |_| Ok(())).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn records_come_back_in_order_and_a_reopened_journal_starts_a_new_segment() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let j = Journal::open(dir.path())?;
        j.write(&append_body([(1, &b"one"[..]), (2, &b"two"[..])]), &no_engine)?;
        j.write(&truncate_body(2), &no_engine)?;
        j.write(&append_body([(2, &b"TWO"[..])]), &no_engine)?;
        j.sync()?;
        let want = vec![
            Record::Append(vec![(1, b"one".to_vec()), (2, b"two".to_vec())]),
            Record::Truncate(2),
            Record::Append(vec![(2, b"TWO".to_vec())]),
        ];
        assert_eq!(all(dir.path()), want);
        drop(j);
        let j = Journal::open(dir.path())?;
        assert_eq!(segments(dir.path())?.len(), 1, "a segment is made at the first write");
        assert_eq!(all(dir.path()), want);
        j.retire_older()?;
        assert!(segments(dir.path())?.is_empty());
        j.write(&truncate_body(9), &no_engine)?;
        assert_eq!(segments(dir.path())?.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![2]);
        assert_eq!(all(dir.path()), vec![Record::Truncate(9)]);
        Ok(())
    }

    fn flip_byte(path: &Path, at: u64, mask: u8) -> io::Result<()> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at)?;
        f.write_all_at(&[byte[0] ^ mask], at)
    }

    #[test]
    fn a_flipped_bit_is_damage_and_fails_replay() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let j = Journal::open(dir.path())?;
        for i in 1..=3u64 {
            j.write(&append_body([(i, &b"entry"[..])]), &no_engine)?;
        }
        j.sync()?;
        let (_, path) = segments(dir.path())?.pop().unwrap_or_default();
        assert_eq!(std::fs::metadata(&path)?.len(), SEGMENT_BYTES, "allocated in full");
        let second = (HEADER + append_body([(1, &b"entry"[..])]).len()) as u64;
        flip_byte(&path, second + HEADER as u64 + 3, 4)?;
        assert!(replay_error(dir.path()).contains("fails its checksum"));
        Ok(())
    }

    #[test]
    fn a_torn_record_ends_the_journal_unless_a_newer_segment_has_records() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let j = Journal::open(dir.path())?;
        j.write(&append_body([(1, &b"kept"[..])]), &no_engine)?;
        let first = (HEADER + append_body([(1, &b"kept"[..])]).len()) as u64;
        let long = vec![5u8; 3000];
        j.write(&append_body([(2, &long[..])]), &no_engine)?;
        j.write(&append_body([(3, &b"after"[..])]), &no_engine)?;
        j.sync()?;
        let (_, path) = segments(dir.path())?.pop().unwrap_or_default();
        // The second record's third sector never reached the disk.
        let f = OpenOptions::new().write(true).open(&path)?;
        f.write_all_at(&[0u8; SECTOR], (first / SECTOR as u64 + 3) * SECTOR as u64)?;
        assert_eq!(all(dir.path()), vec![Record::Append(vec![(1, b"kept".to_vec())])]);
        // A newer segment with records: not a crash's tail.
        drop(j);
        let j = Journal::open(dir.path())?;
        j.write(&truncate_body(2), &no_engine)?;
        assert!(replay_error(dir.path()).contains("followed by a newer segment"));
        Ok(())
    }

    #[test]
    fn a_full_segment_syncs_the_engine_then_gives_way_to_a_new_one() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let j = Journal::open(dir.path())?;
        let synced = std::cell::Cell::new(0);
        let count = || {
            synced.set(synced.get() + 1);
            Ok(())
        };
        let big = vec![7u8; (SEGMENT_BYTES / 2) as usize];
        j.write(&append_body([(1, &big[..])]), &count)?;
        assert_eq!(synced.get(), 0);
        j.write(&append_body([(2, &big[..])]), &count)?;
        assert_eq!(synced.get(), 1, "the engine is synced before the full segment goes");
        // Larger than a segment: gets a segment of its own.
        let huge = vec![9u8; SEGMENT_BYTES as usize + 1];
        j.write(&append_body([(3, &huge[..])]), &count)?;
        assert_eq!(synced.get(), 2);
        let left = segments(dir.path())?;
        assert_eq!(left.len(), 1);
        assert!(std::fs::metadata(&left[0].1)?.len() > SEGMENT_BYTES);
        assert_eq!(all(dir.path()), vec![Record::Append(vec![(3, huge)])]);
        Ok(())
    }
}
