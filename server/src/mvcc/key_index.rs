//! The in-memory index from user key to the revisions that changed it, as
//! etcd keeps it (mvcc/key_index.go): a key's history is a list of
//! generations; a generation starts with the put that (re)creates the key
//! and ends with the tombstone that deletes it. The last generation is the
//! live one (empty when the key is currently deleted).
//!
//! Invariants:
//! - revisions only grow: a put or tombstone is always newer than `modified`;
//! - every generation but the last is non-empty and ends with a tombstone;
//! - a key whose only generation is empty is not in the index at all.

use std::collections::{BTreeMap, HashSet};

use smallvec::SmallVec;
use std::ops::Bound;

use super::revision::Revision;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Generation {
    /// Version of the key after the last revision of this generation.
    version: i64,
    /// Revision of the put that created this generation.
    created: Revision,
    /// Inline: most generations hold one revision until the key changes.
    revs: SmallVec<[Revision; 1]>,
}

impl Generation {
    fn is_empty(&self) -> bool {
        self.revs.is_empty()
    }

    /// Index of the newest revision with `main <= at`.
    fn newest_at(&self, at: i64) -> Option<usize> {
        self.revs.iter().rposition(|r| r.main <= at)
    }
}

/// One key's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIndex {
    modified: Revision,
    /// Inline: most keys have one generation (the live one); the index's
    /// memory per key is what bounds keel's RSS with millions of keys.
    generations: SmallVec<[Generation; 1]>,
    /// Lease of the live generation's latest value (0: none). Kept here so
    /// a put can detach the old lease without reading the old value.
    lease: i64,
}

/// What the index knows about a key at some revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAt {
    /// Revision holding the key's value at that point.
    pub modified: Revision,
    pub created: Revision,
    pub version: i64,
}

impl Default for KeyIndex {
    fn default() -> Self {
        Self { modified: Revision::default(), generations: smallvec::smallvec![Generation::default()], lease: 0 }
    }
}

impl KeyIndex {
    /// Records a put at `rev`.
    pub fn put(&mut self, rev: Revision) {
        debug_assert!(rev > self.modified, "revision {rev} not newer than {}", self.modified);
        if self.generations.is_empty() {
            self.generations.push(Generation::default());
        }
        let g = self.generations.last_mut().expect("at least one generation");
        if g.revs.is_empty() {
            g.created = rev;
        }
        g.revs.push(rev);
        g.version += 1;
        self.modified = rev;
    }

    /// Rebuilds state for the first surviving revision of a key after
    /// compaction, when earlier revisions of the generation are gone.
    pub fn restore(&mut self, created: Revision, modified: Revision, version: i64) {
        self.generations = smallvec::smallvec![Generation { version, created, revs: smallvec::smallvec![modified] }];
        self.modified = modified;
    }

    /// Records a delete at `rev`; returns false (and changes nothing) when
    /// the key is not live.
    pub fn tombstone(&mut self, rev: Revision) -> bool {
        match self.generations.last() {
            Some(g) if !g.is_empty() => {
                self.put(rev);
                self.generations.push(Generation::default());
                true
            }
            _ => false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.generations.len() == 1 && self.generations[0].is_empty()
    }

    /// Lease attached to the key's current value (0 when none or deleted).
    pub fn lease(&self) -> i64 {
        if self.is_live() {
            self.lease
        } else {
            0
        }
    }

    pub fn set_lease(&mut self, lease: i64) {
        self.lease = lease;
    }

    /// Whether the key exists (is not deleted) at the latest revision.
    pub fn is_live(&self) -> bool {
        self.generations.last().is_some_and(|g| !g.is_empty())
    }

    /// The generation the key was in at revision `at`, if it existed then.
    fn generation_at(&self, at: i64) -> Option<&Generation> {
        let last = self.generations.len().checked_sub(1)?;
        for (i, g) in self.generations.iter().enumerate().rev() {
            if g.is_empty() {
                continue;
            }
            if i != last {
                let tomb = g.revs[g.revs.len() - 1];
                if tomb.main <= at {
                    return None;
                }
            }
            if g.revs[0].main <= at {
                return Some(g);
            }
        }
        None
    }

    /// The key as of revision `at`, or `None` if it did not exist then.
    pub fn get(&self, at: i64) -> Option<KeyAt> {
        let g = self.generation_at(at)?;
        let n = g.newest_at(at)?;
        Some(KeyAt { modified: g.revs[n], created: g.created, version: g.version - (g.revs.len() - n - 1) as i64 })
    }

    /// Locates the generation and revision a compaction at `at` keeps:
    /// the first generation not entirely older than `at`, and in it the
    /// newest revision `<= at` (None if the generation starts after `at`).
    fn compaction_point(&self, at: i64) -> (usize, Option<usize>) {
        let mut gi = 0;
        while gi + 1 < self.generations.len() {
            let g = &self.generations[gi];
            if g.revs[g.revs.len() - 1].main > at {
                break;
            }
            gi += 1;
        }
        (gi, self.generations[gi].newest_at(at))
    }

    /// Drops history older than `at`, keeping the newest revision `<= at`
    /// of a live key so reads at `at` still work. Appends every dropped
    /// revision to `removed`. Afterwards the key may be empty.
    pub fn compact(&mut self, at: i64, removed: &mut Vec<Revision>) {
        if self.is_empty() {
            return;
        }
        let (mut gi, ri) = self.compaction_point(at);
        for g in &self.generations[..gi] {
            removed.extend_from_slice(&g.revs);
        }
        let last = self.generations.len() - 1;
        let g = &mut self.generations[gi];
        if !g.is_empty() {
            if let Some(ri) = ri {
                removed.extend(g.revs.drain(..ri));
            }
            // A lone tombstone at or below `at` keeps nothing alive.
            if g.revs.len() == 1 && gi != last && g.revs[0].main <= at {
                removed.push(g.revs[0]);
                gi += 1;
            }
        }
        self.generations.drain(..gi);
    }

    /// Adds to `keep` the revision a compaction at `at` would keep (without
    /// changing the index).
    pub fn keep(&self, at: i64, keep: &mut HashSet<Revision>) {
        if self.is_empty() {
            return;
        }
        let (gi, ri) = self.compaction_point(at);
        let g = &self.generations[gi];
        if let Some(ri) = ri {
            let is_tombstone = ri == g.revs.len() - 1 && gi != self.generations.len() - 1;
            if !is_tombstone {
                keep.insert(g.revs[ri]);
            }
        }
    }

    /// Every revision with `main >= since`, oldest first.
    pub fn revisions_since(&self, since: i64) -> impl Iterator<Item = Revision> + '_ {
        self.generations.iter().flat_map(|g| g.revs.iter().copied()).filter(move |r| r.main >= since)
    }
}

/// The whole key index: user key -> [`KeyIndex`], ordered by key.
///
/// Values are boxed: std's B-tree leaves nodes about half full when keys
/// arrive in order, so every empty slot of an inline 80-byte `KeyIndex`
/// is wasted memory; an empty pointer slot wastes a tenth of that (the
/// RSS per key is in docs/BENCHMARKS.md, "Figures behind design
/// choices").
#[derive(Debug, Default)]
pub struct TreeIndex {
    keys: BTreeMap<Box<[u8]>, Box<KeyIndex>>,
}

/// Bounds of a key range as etcd means them: no end is a single key, an
/// empty end is "every key >= start".
pub fn range_bounds<'a>(start: &'a [u8], end: Option<&'a [u8]>) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    match end {
        None => (Bound::Included(start), Bound::Included(start)),
        Some([]) => (Bound::Included(start), Bound::Unbounded),
        Some(end) => (Bound::Included(start), Bound::Excluded(end)),
    }
}

impl TreeIndex {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key(&self, key: &[u8]) -> Option<&KeyIndex> {
        self.keys.get(key).map(|ki| &**ki)
    }

    pub fn key_mut(&mut self, key: &[u8]) -> Option<&mut KeyIndex> {
        self.keys.get_mut(key).map(|ki| &mut **ki)
    }

    /// Live keys in range at the latest revision, with their leases.
    pub fn visit_live(&self, start: &[u8], end: Option<&[u8]>, mut f: impl FnMut(&[u8], &KeyIndex)) {
        if let Some(e) = end {
            if !e.is_empty() && e <= start {
                return;
            }
        }
        for (k, ki) in self.keys.range::<[u8], _>(range_bounds(start, end)) {
            if ki.is_live() {
                f(k, ki);
            }
        }
    }

    pub fn put(&mut self, key: &[u8], rev: Revision) {
        match self.keys.get_mut(key) {
            Some(ki) => ki.put(rev),
            None => {
                let mut ki = Box::<KeyIndex>::default();
                ki.put(rev);
                self.keys.insert(key.into(), ki);
            }
        }
    }

    /// Rebuild-time insert of a key's first surviving revision.
    pub fn restore(&mut self, key: &[u8], created: Revision, modified: Revision, version: i64) {
        match self.keys.get_mut(key) {
            Some(ki) if !ki.is_live() && ki.generations.last().is_some() => {
                // Re-created after a tombstone we saw: an ordinary put.
                let g = ki.generations.last_mut().expect("checked");
                g.created = created;
                g.revs.push(modified);
                g.version = version;
                ki.modified = modified;
            }
            Some(ki) => ki.put(modified),
            None => {
                let mut ki = Box::<KeyIndex>::default();
                ki.restore(created, modified, version);
                self.keys.insert(key.into(), ki);
            }
        }
    }

    /// Returns false when the key is not live (nothing to delete).
    pub fn tombstone(&mut self, key: &[u8], rev: Revision) -> bool {
        self.keys.get_mut(key).is_some_and(|ki| ki.tombstone(rev))
    }

    pub fn get(&self, key: &[u8], at: i64) -> Option<KeyAt> {
        self.keys.get(key)?.get(at)
    }

    /// Visits keys in `[start, end)` (see [`range_bounds`]) in key order
    /// that existed at revision `at`; stop by returning false.
    pub fn visit_at(&self, start: &[u8], end: Option<&[u8]>, at: i64, mut f: impl FnMut(&[u8], KeyAt) -> bool) {
        if let Some(e) = end {
            if !e.is_empty() && e <= start {
                return;
            }
        }
        for (k, ki) in self.keys.range::<[u8], _>(range_bounds(start, end)) {
            if let Some(at) = ki.get(at) {
                if !f(k, at) {
                    return;
                }
            }
        }
    }

    /// Keys in range that exist at `at`, with their state.
    pub fn range_at(&self, start: &[u8], end: Option<&[u8]>, at: i64) -> Vec<(Box<[u8]>, KeyAt)> {
        let mut out = Vec::new();
        self.visit_at(start, end, at, |k, a| {
            out.push((k.into(), a));
            true
        });
        out
    }

    /// Compacts every key at `at`; returns the revisions no longer
    /// referenced (to delete from storage).
    pub fn compact(&mut self, at: i64) -> Vec<Revision> {
        let mut removed = Vec::new();
        self.keys.retain(|_, ki| {
            ki.compact(at, &mut removed);
            !ki.is_empty()
        });
        removed
    }

    /// The revisions a compaction at `at` keeps, across all keys.
    pub fn keep(&self, at: i64) -> HashSet<Revision> {
        let mut keep = HashSet::new();
        for ki in self.keys.values() {
            ki.keep(at, &mut keep);
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    /// put@2 put@4 del@6 put@8 put@10 del@12 put@14 (etcd's key_index test shape)
    fn sample() -> KeyIndex {
        let mut ki = KeyIndex::default();
        ki.put(r(2));
        ki.put(r(4));
        assert!(ki.tombstone(r(6)));
        ki.put(r(8));
        ki.put(r(10));
        assert!(ki.tombstone(r(12)));
        ki.put(r(14));
        ki
    }

    #[test]
    fn get_follows_generations() {
        let ki = sample();
        assert_eq!(ki.get(1), None);
        assert_eq!(ki.get(2), Some(KeyAt { modified: r(2), created: r(2), version: 1 }));
        assert_eq!(ki.get(5), Some(KeyAt { modified: r(4), created: r(2), version: 2 }));
        assert_eq!(ki.get(6), None, "deleted at 6");
        assert_eq!(ki.get(7), None);
        assert_eq!(ki.get(9), Some(KeyAt { modified: r(8), created: r(8), version: 1 }));
        assert_eq!(ki.get(11), Some(KeyAt { modified: r(10), created: r(8), version: 2 }));
        assert_eq!(ki.get(12), None);
        assert_eq!(ki.get(100), Some(KeyAt { modified: r(14), created: r(14), version: 1 }));
    }

    #[test]
    fn tombstone_of_deleted_key_is_refused() {
        let mut ki = KeyIndex::default();
        assert!(!ki.tombstone(r(1)));
        ki.put(r(2));
        assert!(ki.tombstone(r(3)));
        assert!(!ki.tombstone(r(4)));
        assert!(!ki.is_live());
    }

    #[test]
    fn compact_keeps_newest_revision_at_or_below() {
        let mut ki = sample();
        let mut removed = Vec::new();
        ki.compact(5, &mut removed);
        assert_eq!(removed, vec![r(2)]);
        assert_eq!(ki.get(5).map(|k| k.modified), Some(r(4)));
        assert_eq!(ki.get(5).map(|k| k.version), Some(2), "version survives compaction");

        // Compacting at the tombstone drops the whole first generation.
        removed.clear();
        ki.compact(6, &mut removed);
        assert_eq!(removed, vec![r(4), r(6)]);
        assert_eq!(ki.get(9).map(|k| k.modified), Some(r(8)));

        removed.clear();
        ki.compact(13, &mut removed);
        assert_eq!(removed, vec![r(8), r(10), r(12)]);
        assert_eq!(ki.get(14).map(|k| k.modified), Some(r(14)));
        assert!(!ki.is_empty());
    }

    #[test]
    fn compacting_a_deleted_key_past_its_tombstone_empties_it() {
        let mut tree = TreeIndex::default();
        tree.put(b"a", r(1));
        assert!(tree.tombstone(b"a", r(2)));
        tree.put(b"b", r(3));
        let removed = tree.compact(2);
        assert_eq!(removed, vec![r(1), r(2)]);
        assert!(tree.key(b"a").is_none());
        assert!(tree.key(b"b").is_some());
    }

    #[test]
    fn keep_matches_what_compact_retains() {
        let ki = sample();
        for at in 0..16 {
            let mut keep = HashSet::new();
            ki.keep(at, &mut keep);
            let mut compacted = ki.clone();
            let mut removed = Vec::new();
            compacted.compact(at, &mut removed);
            let all: Vec<Revision> = ki.revisions_since(0).collect();
            for rev in all.iter().filter(|rev| rev.main <= at) {
                assert_eq!(keep.contains(rev), !removed.contains(rev), "at {at}, rev {rev}");
            }
        }
    }

    #[test]
    fn range_bounds_follow_etcd_conventions() {
        let mut tree = TreeIndex::default();
        for (i, k) in [b"a", b"b", b"c"].iter().enumerate() {
            tree.put(*k, r(i as i64 + 1));
        }
        let keys = |end: Option<&[u8]>| -> Vec<Vec<u8>> {
            tree.range_at(b"b", end, 10).into_iter().map(|(k, _)| k.to_vec()).collect()
        };
        assert_eq!(keys(None), vec![b"b".to_vec()]);
        assert_eq!(keys(Some(b"")), vec![b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(keys(Some(b"c")), vec![b"b".to_vec()]);
        assert!(keys(Some(b"a")).is_empty());
        assert_eq!(tree.range_at(b"a", Some(b""), 2).len(), 2, "c did not exist at 2");
    }
}
