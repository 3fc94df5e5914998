//! Key-range permissions: what a user's roles grant, merged per user, and
//! etcd's coverage rules for checking a request against them.
//!
//! A permission is a half-open interval of keys: a single key is
//! `[key, key\0)`, an empty end means "to the end of the keyspace" (etcd's
//! BytesAffineComparable, where the empty slice sorts after every key, and
//! a permission or request with range end `\0` means "from key"). A range
//! request is allowed only when the union of the user's intervals covers
//! it without a gap; a single-key request when one interval contains the
//! key.

use keel_proto::authpb::{permission::Type as PermType, Role};

/// One end of an interval; `None` is past every key.
type End = Option<Vec<u8>>;

fn end_lt(a: &End, b: &End) -> bool {
    match (a, b) {
        (_, None) => a.is_some(),
        (None, Some(_)) => false,
        (Some(x), Some(y)) => x < y,
    }
}

/// `key < end`.
fn key_before_end(key: &[u8], end: &End) -> bool {
    match end {
        None => true,
        Some(e) => key < e.as_slice(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Interval {
    begin: Vec<u8>,
    end: End,
}

impl Interval {
    /// etcd's reading of a (key, range_end) pair: no end is one key, `\0`
    /// (or, for requests, an empty end after normalisation) is from-key.
    fn of(key: &[u8], range_end: &[u8]) -> Interval {
        if range_end.is_empty() {
            let mut end = key.to_vec();
            end.push(0);
            Interval { begin: key.to_vec(), end: Some(end) }
        } else if range_end == [0] {
            Interval { begin: key.to_vec(), end: None }
        } else {
            Interval { begin: key.to_vec(), end: Some(range_end.to_vec()) }
        }
    }

    fn overlaps(&self, other: &Interval) -> bool {
        key_before_end(&self.begin, &other.end) && key_before_end(&other.begin, &self.end)
    }
}

/// The intervals one user may read and write, over all of its roles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserPerms {
    read: Vec<Interval>,
    write: Vec<Interval>,
}

impl UserPerms {
    /// Merges the permissions of `roles` (unknown role names are skipped,
    /// as etcd does).
    pub fn merge<'a>(roles: impl Iterator<Item = &'a Role>) -> UserPerms {
        let mut perms = UserPerms::default();
        for role in roles {
            for p in &role.key_permission {
                // etcd reads an empty begin key as "past every key": such
                // a grant covers nothing.
                if p.key.is_empty() {
                    continue;
                }
                let ivl = Interval::of(&p.key, &p.range_end);
                match PermType::try_from(p.perm_type) {
                    Ok(PermType::Read) => perms.read.push(ivl),
                    Ok(PermType::Write) => perms.write.push(ivl),
                    Ok(PermType::Readwrite) => {
                        perms.read.push(ivl.clone());
                        perms.write.push(ivl);
                    }
                    Err(_) => {}
                }
            }
        }
        perms.read.sort_by(|a, b| a.begin.cmp(&b.begin));
        perms.write.sort_by(|a, b| a.begin.cmp(&b.begin));
        perms
    }

    /// Whether the user may read `key` (no `range_end`) or all of
    /// `[key, range_end)`.
    pub fn can_read(&self, key: &[u8], range_end: &[u8]) -> bool {
        permitted(&self.read, key, range_end)
    }

    pub fn can_write(&self, key: &[u8], range_end: &[u8]) -> bool {
        permitted(&self.write, key, range_end)
    }
}

fn permitted(granted: &[Interval], key: &[u8], range_end: &[u8]) -> bool {
    if range_end.is_empty() {
        return granted.iter().any(|g| g.begin.as_slice() <= key && key_before_end(key, &g.end));
    }
    let wanted = Interval::of(key, range_end);
    if let Some(end) = &wanted.end {
        if end <= &wanted.begin {
            // An inverted range selects nothing; allow it exactly when the
            // first key would be allowed.
            return permitted(granted, key, &[]);
        }
    }
    // etcd's IntervalTree.Contains: the intervals overlapping the request,
    // in begin order, must join without a gap and span all of it.
    let mut covering = granted.iter().filter(|g| g.overlaps(&wanted));
    let Some(first) = covering.next() else {
        return false;
    };
    if first.begin > wanted.begin {
        return false;
    }
    let mut reach = first.end.clone();
    for g in covering {
        if key_before_end(&g.begin, &reach) || reach.as_deref() == Some(g.begin.as_slice()) {
            if end_lt(&reach, &g.end) {
                reach = g.end.clone();
            }
        } else {
            return false;
        }
    }
    !end_lt(&reach, &wanted.end)
}

#[cfg(test)]
mod tests {
    use keel_proto::authpb::Permission;

    use super::*;

    fn role(perms: &[(&str, &str, PermType)]) -> Role {
        Role {
            name: "r".into(),
            key_permission: perms
                .iter()
                .map(|(k, e, t)| Permission {
                    perm_type: *t as i32,
                    key: k.as_bytes().to_vec().into(),
                    range_end: e.as_bytes().to_vec().into(),
                })
                .collect(),
        }
    }

    #[test]
    fn single_key_prefix_and_from_key_permissions() {
        let r = role(&[("k", "", PermType::Read), ("p/", "p0", PermType::Readwrite), ("z", "\0", PermType::Write)]);
        let p = UserPerms::merge(std::iter::once(&r));
        assert!(p.can_read(b"k", b""));
        assert!(!p.can_read(b"k2", b""));
        assert!(!p.can_write(b"k", b""));
        assert!(p.can_read(b"p/a", b""));
        assert!(p.can_write(b"p/", b"p0"));
        assert!(p.can_read(b"p/a", b"p/b"));
        assert!(!p.can_read(b"p", b"p0"), "the range starts before the prefix");
        assert!(!p.can_read(b"p/", b"p1"), "the range ends past the prefix");
        assert!(p.can_write(b"zz", b""));
        assert!(p.can_write(b"z", b"\0"));
        assert!(!p.can_write(b"y", b"\0"));
        assert!(!p.can_read(b"a", b"\0"));
    }

    #[test]
    fn adjacent_intervals_cover_a_range_together_but_not_across_a_gap() {
        let r = role(&[("a", "c", PermType::Read), ("c", "e", PermType::Read), ("f", "g", PermType::Read)]);
        let p = UserPerms::merge(std::iter::once(&r));
        assert!(p.can_read(b"a", b"e"));
        assert!(p.can_read(b"b", b"d"));
        assert!(!p.can_read(b"a", b"g"), "gap between e and f");
        assert!(!p.can_read(b"e", b""));
    }
}
