//! keel's snapshot file: every entry of the state-machine tables as of one
//! point in time, framed and checksummed. Used for Raft snapshots (sent to
//! lagging or new members) and as the default format of backups.
//!
//! Layout (integers little-endian):
//! ```text
//! "KEELSNAP" | version u32 | record* | 0u8 | record count u64 | crc32 u32
//! record = table tag u8 (non-zero) | key len u32 | value len u32 | key | value
//! ```
//! The crc covers every byte before it, so truncation or a flipped bit is
//! detected before anything is installed.

use std::io::{self, Read, Write};

use crate::storage::Table;

pub const MAGIC: &[u8; 8] = b"KEELSNAP";
pub const VERSION: u32 = 1;
/// Largest key or value a record may carry; a corrupt length fails fast
/// instead of allocating gigabytes.
const MAX_FIELD: u32 = 256 << 20;

/// Streams records into a snapshot.
pub struct SnapshotWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    records: u64,
    bytes: u64,
}

impl<W: Write> SnapshotWriter<W> {
    pub fn new(out: W) -> io::Result<Self> {
        let mut w = Self { out, crc: crc32fast::Hasher::new(), records: 0, bytes: 0 };
        w.put(MAGIC)?;
        w.put(&VERSION.to_le_bytes())?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.bytes += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    pub fn record(&mut self, table: Table, key: &[u8], value: &[u8]) -> io::Result<()> {
        let (kl, vl) = (u32::try_from(key.len()), u32::try_from(value.len()));
        let (Ok(kl), Ok(vl)) = (kl, vl) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "snapshot record too large"));
        };
        self.put(&[table.tag()])?;
        self.put(&kl.to_le_bytes())?;
        self.put(&vl.to_le_bytes())?;
        self.put(key)?;
        self.put(value)?;
        self.records += 1;
        Ok(())
    }

    /// Writes the trailer; returns the output, the record count and the
    /// total size in bytes.
    pub fn finish(mut self) -> io::Result<(W, u64, u64)> {
        self.put(&[0])?;
        let records = self.records;
        self.put(&records.to_le_bytes())?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.flush()?;
        Ok((self.out, records, self.bytes + 4))
    }
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One snapshot entry: table, key, value.
pub type Record = (Table, Vec<u8>, Vec<u8>);

/// Reads a snapshot record by record. The checksum is verified when the
/// trailer is reached; callers that must not act on unverified data call
/// [`verify`] first.
pub struct SnapshotReader<R: Read> {
    input: R,
    crc: crc32fast::Hasher,
    records: u64,
    done: bool,
}

impl<R: Read> SnapshotReader<R> {
    pub fn new(input: R) -> io::Result<Self> {
        let mut r = Self { input, crc: crc32fast::Hasher::new(), records: 0, done: false };
        let mut magic = [0u8; 8];
        r.take(&mut magic)?;
        if &magic != MAGIC {
            return Err(corrupt("not a keel snapshot (bad magic)"));
        }
        let mut version = [0u8; 4];
        r.take(&mut version)?;
        if u32::from_le_bytes(version) != VERSION {
            return Err(corrupt(format!("unsupported snapshot version {}", u32::from_le_bytes(version))));
        }
        Ok(r)
    }

    fn take(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.input.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt("snapshot is truncated")
            } else {
                e
            }
        })?;
        self.crc.update(buf);
        Ok(())
    }

    fn take_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// The next record, or `None` after the verified trailer.
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        if self.done {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        self.take(&mut tag)?;
        if tag[0] == 0 {
            let mut count = [0u8; 8];
            self.take(&mut count)?;
            let expected = self.crc.clone().finalize();
            let mut crc = [0u8; 4];
            self.input.read_exact(&mut crc).map_err(|_| corrupt("snapshot is truncated"))?;
            if u32::from_le_bytes(crc) != expected {
                return Err(corrupt("snapshot checksum mismatch"));
            }
            if u64::from_le_bytes(count) != self.records {
                return Err(corrupt("snapshot record count mismatch"));
            }
            self.done = true;
            return Ok(None);
        }
        let table = Table::from_tag(tag[0]).ok_or_else(|| corrupt(format!("unknown table tag {}", tag[0])))?;
        let kl = self.take_u32()?;
        let vl = self.take_u32()?;
        if kl > MAX_FIELD || vl > MAX_FIELD {
            return Err(corrupt("snapshot record length out of range"));
        }
        let mut key = vec![0u8; kl as usize];
        self.take(&mut key)?;
        let mut value = vec![0u8; vl as usize];
        self.take(&mut value)?;
        self.records += 1;
        Ok(Some((table, key, value)))
    }

    pub fn records(&self) -> u64 {
        self.records
    }
}

/// Reads a whole snapshot, checking its framing and checksum; returns the
/// number of records.
pub fn verify<R: Read>(input: R) -> io::Result<u64> {
    let mut r = SnapshotReader::new(input)?;
    while r.next_record()?.is_some() {}
    Ok(r.records())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> io::Result<Vec<u8>> {
        let mut w = SnapshotWriter::new(Vec::new())?;
        w.record(Table::Kv, b"k1", b"v1")?;
        w.record(Table::Meta, b"applied", &[1, 2, 3])?;
        Ok(w.finish()?.0)
    }

    #[test]
    fn round_trip() -> io::Result<()> {
        let bytes = sample()?;
        let mut r = SnapshotReader::new(bytes.as_slice())?;
        assert_eq!(r.next_record()?, Some((Table::Kv, b"k1".to_vec(), b"v1".to_vec())));
        assert_eq!(r.next_record()?, Some((Table::Meta, b"applied".to_vec(), vec![1, 2, 3])));
        assert_eq!(r.next_record()?, None);
        assert_eq!(verify(bytes.as_slice())?, 2);
        Ok(())
    }

    #[test]
    fn every_truncation_and_bit_flip_is_detected() -> io::Result<()> {
        let bytes = sample()?;
        for len in 0..bytes.len() {
            assert!(verify(&bytes[..len]).is_err(), "truncated to {len} bytes");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(verify(b.as_slice()).is_err(), "flipped byte {i}");
        }
        Ok(())
    }
}
