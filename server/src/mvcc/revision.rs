//! A revision is the position of one change in the store's history: `main`
//! is the store revision of the write transaction, `sub` the index of the
//! change inside it (a txn with three puts writes (r,0), (r,1), (r,2)).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

/// Encoded length of a revision key in the `kv` table.
pub const REVISION_KEY_LEN: usize = 16;

impl Revision {
    pub const fn new(main: i64, sub: i64) -> Self {
        Self { main, sub }
    }

    /// Big-endian encoding: byte order equals revision order (revisions are
    /// never negative).
    pub fn to_key(self) -> [u8; REVISION_KEY_LEN] {
        let mut k = [0u8; REVISION_KEY_LEN];
        k[..8].copy_from_slice(&self.main.to_be_bytes());
        k[8..].copy_from_slice(&self.sub.to_be_bytes());
        k
    }

    pub fn from_key(key: &[u8]) -> Option<Self> {
        if key.len() != REVISION_KEY_LEN {
            return None;
        }
        let main = i64::from_be_bytes(key[..8].try_into().ok()?);
        let sub = i64::from_be_bytes(key[8..].try_into().ok()?);
        Some(Self { main, sub })
    }

    /// The first key of main revision `main` (inclusive bound for scans).
    pub fn start_key(main: i64) -> [u8; REVISION_KEY_LEN] {
        Revision::new(main, 0).to_key()
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.main, self.sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_matches_revision_order() {
        let revs = [Revision::new(1, 0), Revision::new(1, 1), Revision::new(2, 0), Revision::new(256, 3)];
        for w in revs.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].to_key() < w[1].to_key());
        }
        for r in revs {
            assert_eq!(Revision::from_key(&r.to_key()), Some(r));
        }
        assert_eq!(Revision::from_key(b"short"), None);
    }
}
