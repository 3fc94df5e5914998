//! Reading and writing bbolt database files (etcd's backend format), for
//! backups etcd's tools accept and for reading etcd's backups.
//!
//! Only what etcd's files use: top-level buckets holding plain key-value
//! pairs. The writer lays out a fresh, compact file: two meta pages, an
//! empty freelist, then each bucket's B+tree (leaf pages, with overflow
//! pages for large entries, under branch pages as needed), and the root
//! bucket's tree last. Every page below the high-water mark is reachable
//! exactly once, which is what bbolt's consistency check (run by
//! `etcdctl snapshot status`) demands.
//!
//! Page layout (little-endian, bbolt's `page`, `meta`, `leafPageElement`
//! and `branchPageElement`): a 16-byte header (id u64, flags u16, count
//! u16, overflow u32), then elements of 16 bytes each, then keys and
//! values; an element's `pos` is relative to the element itself.

use std::io::{self, Seek, SeekFrom, Write};

pub const PAGE_SIZE: usize = 4096;
const HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH_PAGE: u16 = 0x01;
const LEAF_PAGE: u16 = 0x02;
const META_PAGE: u16 = 0x04;
const FREELIST_PAGE: u16 = 0x10;
const BUCKET_LEAF: u32 = 0x01;
const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
/// Size of a bucket's header value (root page id, sequence).
const BUCKET_HEADER: usize = 16;

fn fnv64a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A bucket: its name and its pairs in ascending key order.
pub type Bucket = (Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>);

/// Gets each leaf element: flags, key, value.
type ElementVisitor<'a> = dyn FnMut(u32, &[u8], &[u8]) -> io::Result<()> + 'a;
/// Gets each pair of a bucket.
type PairVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> io::Result<()> + 'a;
/// Gets a bucket's name with `None`, then with each of its pairs.
pub type BucketVisitor<'a> = dyn FnMut(&[u8], Option<(&[u8], &[u8])>) -> io::Result<()> + 'a;

/// Writes a bbolt file page by page. Each bucket's pairs are streamed
/// into leaf pages as they come (ascending keys, one bucket at a time), so
/// memory holds one page of pairs and the index of leaf pages (a key and a
/// page id per page), not the data. The meta pages and freelist, which
/// name the root tree and the file's size, are written last, at the start
/// of the file.
pub struct FileWriter<W: Write + Seek> {
    out: W,
    next_id: u64,
    /// Finished buckets: name and root page id.
    buckets: Vec<(Vec<u8>, u64)>,
    open: Option<OpenBucket>,
}

/// The bucket being written.
struct OpenBucket {
    name: Vec<u8>,
    /// Pairs for the next leaf page: flags, key, value.
    leaf: Vec<(u32, Vec<u8>, Vec<u8>)>,
    used: usize,
    /// The last key of the leaves already written.
    last_written: Option<Vec<u8>>,
    /// Each written leaf page: its first key and id.
    leaves: Vec<(Vec<u8>, u64)>,
}

impl OpenBucket {
    fn new(name: &[u8]) -> Self {
        OpenBucket { name: name.to_vec(), leaf: Vec::new(), used: HEADER, last_written: None, leaves: Vec::new() }
    }
}

impl<W: Write + Seek> FileWriter<W> {
    /// Starts a file at `out`'s current position (normally its start).
    pub fn new(mut out: W) -> io::Result<Self> {
        // Pages 0 and 1 are the metas, 2 the (empty) freelist.
        out.write_all(&[0u8; 3 * PAGE_SIZE])?;
        Ok(FileWriter { out, next_id: 3, buckets: Vec::new(), open: None })
    }

    /// Writes one logical page (with overflow pages if `body` needs them)
    /// and returns its id.
    fn page(&mut self, flags: u16, count: usize, body: &[u8]) -> io::Result<u64> {
        let id = self.next_id;
        let span = (HEADER + body.len()).div_ceil(PAGE_SIZE).max(1);
        let count = u16::try_from(count).map_err(|_| io::Error::other("too many elements on a bbolt page"))?;
        let overflow = u32::try_from(span - 1).map_err(|_| io::Error::other("bbolt page too large"))?;
        let mut header = [0u8; HEADER];
        header[0..8].copy_from_slice(&id.to_le_bytes());
        header[8..10].copy_from_slice(&flags.to_le_bytes());
        header[10..12].copy_from_slice(&count.to_le_bytes());
        header[12..16].copy_from_slice(&overflow.to_le_bytes());
        self.out.write_all(&header)?;
        self.out.write_all(body)?;
        let padding = span * PAGE_SIZE - HEADER - body.len();
        self.out.write_all(&vec![0u8; padding])?;
        self.next_id += span as u64;
        Ok(id)
    }

    /// Starts bucket `name`; its pairs follow with [`FileWriter::put`].
    pub fn begin_bucket(&mut self, name: &[u8]) -> io::Result<()> {
        if let Some(open) = &self.open {
            return Err(io::Error::other(format!("bucket {:?} is still open", String::from_utf8_lossy(&open.name))));
        }
        if self.buckets.iter().any(|(n, _)| n == name) {
            return Err(io::Error::other(format!("bucket {:?} written twice", String::from_utf8_lossy(name))));
        }
        self.open = Some(OpenBucket::new(name));
        Ok(())
    }

    /// Adds a pair to the open bucket; keys must ascend.
    pub fn put(&mut self, k: &[u8], v: &[u8]) -> io::Result<()> {
        self.put_element(0, k, v)
    }

    fn put_element(&mut self, flags: u32, k: &[u8], v: &[u8]) -> io::Result<()> {
        let open = self.open.as_mut().ok_or_else(|| io::Error::other("no bucket is open"))?;
        let previous = open.leaf.last().map(|(_, k, _)| k.as_slice()).or(open.last_written.as_deref());
        if previous.is_some_and(|p| p >= k) {
            return Err(io::Error::other(format!(
                "bucket {:?}: keys not in ascending order",
                String::from_utf8_lossy(&open.name)
            )));
        }
        let need = ELEMENT + k.len() + v.len();
        if !open.leaf.is_empty() && open.used + need > PAGE_SIZE {
            self.flush_leaf()?;
        }
        let open = self.open.as_mut().ok_or_else(|| io::Error::other("no bucket is open"))?;
        open.leaf.push((flags, k.to_vec(), v.to_vec()));
        open.used += need;
        Ok(())
    }

    /// Writes the open bucket's pending pairs as a leaf page.
    fn flush_leaf(&mut self) -> io::Result<()> {
        let Some(open) = self.open.as_mut() else { return Ok(()) };
        let items = std::mem::take(&mut open.leaf);
        open.used = HEADER;
        let refs: Vec<(u32, &[u8], &[u8])> = items.iter().map(|(f, k, v)| (*f, k.as_slice(), v.as_slice())).collect();
        let id = self.page(LEAF_PAGE, refs.len(), &leaf_body(&refs))?;
        let open = self.open.as_mut().ok_or_else(|| io::Error::other("no bucket is open"))?;
        let first = items.first().map(|(_, k, _)| k.clone()).unwrap_or_default();
        open.last_written = items.into_iter().next_back().map(|(_, k, _)| k).or(open.last_written.take());
        open.leaves.push((first, id));
        Ok(())
    }

    /// Finishes the open bucket: its last leaf (an empty one for a bucket
    /// without pairs) and the branch pages above its leaves. Returns the
    /// bucket's name and root page id.
    fn close_bucket(&mut self) -> io::Result<(Vec<u8>, u64)> {
        let pending = self.open.as_ref().is_some_and(|o| !o.leaf.is_empty() || o.leaves.is_empty());
        if pending {
            self.flush_leaf()?;
        }
        let open = self.open.take().ok_or_else(|| io::Error::other("no bucket is open"))?;
        let mut level = open.leaves;
        while level.len() > 1 {
            let refs: Vec<(&[u8], u64)> = level.iter().map(|(k, id)| (k.as_slice(), *id)).collect();
            let mut next = Vec::new();
            for run in runs(&refs, |(k, _)| k.len()) {
                let id = self.page(BRANCH_PAGE, run.len(), &branch_body(run))?;
                next.push((run[0].0.to_vec(), id));
            }
            level = next;
        }
        Ok((open.name, level.first().map(|(_, id)| *id).unwrap_or_default()))
    }

    /// Ends the open bucket.
    pub fn end_bucket(&mut self) -> io::Result<()> {
        let done = self.close_bucket()?;
        self.buckets.push(done);
        Ok(())
    }

    /// Writes the root bucket's tree, then the meta pages and freelist at
    /// the start. Returns the output, positioned at the end of the file,
    /// and the file's size.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        if self.open.is_some() {
            self.end_bucket()?;
        }
        let mut buckets = std::mem::take(&mut self.buckets);
        buckets.sort();
        self.open = Some(OpenBucket::new(b""));
        for (name, root) in &buckets {
            let mut header = root.to_le_bytes().to_vec();
            header.extend_from_slice(&0u64.to_le_bytes());
            self.put_element(BUCKET_LEAF, name, &header)?;
        }
        let (_, root) = self.close_bucket()?;
        let high_water = self.next_id;
        let mut freelist = Vec::with_capacity(PAGE_SIZE);
        freelist.extend_from_slice(&2u64.to_le_bytes());
        freelist.extend_from_slice(&FREELIST_PAGE.to_le_bytes());
        freelist.resize(PAGE_SIZE, 0);
        let end = self.out.stream_position()?;
        let start = end - high_water * PAGE_SIZE as u64;
        self.out.seek(SeekFrom::Start(start))?;
        self.out.write_all(&meta_page(0, root, 2, high_water, 0))?;
        self.out.write_all(&meta_page(1, root, 2, high_water, 1))?;
        self.out.write_all(&freelist)?;
        self.out.seek(SeekFrom::Start(end))?;
        Ok((self.out, high_water * PAGE_SIZE as u64))
    }
}

/// Lays out leaf elements: returns the body after the page header.
fn leaf_body(items: &[(u32, &[u8], &[u8])]) -> Vec<u8> {
    let mut body = vec![0u8; items.len() * ELEMENT];
    for (i, (flags, k, v)) in items.iter().enumerate() {
        let pos = (body.len() - i * ELEMENT) as u32;
        let e = &mut body[i * ELEMENT..(i + 1) * ELEMENT];
        e[0..4].copy_from_slice(&flags.to_le_bytes());
        e[4..8].copy_from_slice(&pos.to_le_bytes());
        e[8..12].copy_from_slice(&(k.len() as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(v.len() as u32).to_le_bytes());
        body.extend_from_slice(k);
        body.extend_from_slice(v);
    }
    body
}

fn branch_body(items: &[(&[u8], u64)]) -> Vec<u8> {
    let mut body = vec![0u8; items.len() * ELEMENT];
    for (i, (k, pgid)) in items.iter().enumerate() {
        let pos = (body.len() - i * ELEMENT) as u32;
        let e = &mut body[i * ELEMENT..(i + 1) * ELEMENT];
        e[0..4].copy_from_slice(&pos.to_le_bytes());
        e[4..8].copy_from_slice(&(k.len() as u32).to_le_bytes());
        e[8..16].copy_from_slice(&pgid.to_le_bytes());
        body.extend_from_slice(k);
    }
    body
}

/// Splits items into runs that fit a page each (a lone large item gets
/// a page of its own, with overflow).
fn runs<T>(items: &[T], size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut used = HEADER;
    for (i, item) in items.iter().enumerate() {
        let need = ELEMENT + size(item);
        if i > start && used + need > PAGE_SIZE {
            out.push(&items[start..i]);
            start = i;
            used = HEADER;
        }
        used += need;
    }
    if start < items.len() || items.is_empty() {
        out.push(&items[start..]);
    }
    out
}

fn meta_page(id: u64, root: u64, freelist: u64, high_water: u64, txid: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&MAGIC.to_le_bytes());
    m.extend_from_slice(&VERSION.to_le_bytes());
    m.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&root.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&freelist.to_le_bytes());
    m.extend_from_slice(&high_water.to_le_bytes());
    m.extend_from_slice(&txid.to_le_bytes());
    let sum = fnv64a(&m);
    m.extend_from_slice(&sum.to_le_bytes());
    let mut page = Vec::with_capacity(PAGE_SIZE);
    page.extend_from_slice(&id.to_le_bytes());
    page.extend_from_slice(&META_PAGE.to_le_bytes());
    page.extend_from_slice(&0u16.to_le_bytes());
    page.extend_from_slice(&0u32.to_le_bytes());
    page.extend_from_slice(&m);
    page.resize(PAGE_SIZE, 0);
    page
}

/// Writes a bbolt file holding `buckets` (any order; each bucket's pairs
/// must be in ascending key order), built in memory. Returns the bytes
/// written.
pub fn write(buckets: &[Bucket], out: &mut dyn Write) -> io::Result<u64> {
    let mut w = FileWriter::new(io::Cursor::new(Vec::new()))?;
    for (name, pairs) in buckets {
        w.begin_bucket(name)?;
        for (k, v) in pairs {
            w.put(k, v)?;
        }
        w.end_bucket()?;
    }
    let (file, size) = w.finish()?;
    out.write_all(file.get_ref())?;
    Ok(size)
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("not a valid bbolt file: {}", msg.into()))
}

fn u16_at(b: &[u8], at: usize) -> io::Result<u16> {
    b.get(at..at + 2).and_then(|s| s.try_into().ok()).map(u16::from_le_bytes).ok_or_else(|| corrupt("short read"))
}

fn u32_at(b: &[u8], at: usize) -> io::Result<u32> {
    b.get(at..at + 4).and_then(|s| s.try_into().ok()).map(u32::from_le_bytes).ok_or_else(|| corrupt("short read"))
}

fn u64_at(b: &[u8], at: usize) -> io::Result<u64> {
    b.get(at..at + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes).ok_or_else(|| corrupt("short read"))
}

/// Whether `bytes` start like a bbolt file (a meta page's magic).
pub fn looks_like_bbolt(bytes: &[u8]) -> bool {
    u32_at(bytes, HEADER).is_ok_and(|m| m == MAGIC)
}

struct Reader<'a> {
    file: &'a [u8],
    page_size: usize,
    high_water: u64,
    /// Pages visited so far: a sound file visits each at most once, so
    /// more than the file holds means a cycle or shared pages.
    visits: std::cell::Cell<u64>,
}

impl Reader<'_> {
    fn page(&self, id: u64) -> io::Result<&[u8]> {
        if id >= self.high_water {
            return Err(corrupt(format!("page {id} is past the end")));
        }
        self.visits.set(self.visits.get() + 1);
        if self.visits.get() > self.high_water {
            return Err(corrupt("pages referenced more than once"));
        }
        let start = usize::try_from(id).map_err(|_| corrupt("page id"))? * self.page_size;
        let head = self.file.get(start..start + HEADER).ok_or_else(|| corrupt(format!("page {id} is truncated")))?;
        let overflow = u32_at(head, 12)? as usize;
        let end = start + (overflow + 1) * self.page_size;
        self.file.get(start..end).ok_or_else(|| corrupt(format!("page {id} is truncated")))
    }

    /// Visits the leaf elements of the tree rooted at `page` in order.
    fn walk(&self, page: &[u8], depth: usize, visit: &mut ElementVisitor<'_>) -> io::Result<()> {
        if depth > 64 {
            return Err(corrupt("tree too deep"));
        }

        let flags = u16_at(page, 8)?;
        let count = u16_at(page, 10)? as usize;
        for i in 0..count {
            let at = HEADER + i * ELEMENT;
            match flags {
                LEAF_PAGE => {
                    let (f, pos, ks, vs) = (
                        u32_at(page, at)?,
                        u32_at(page, at + 4)? as usize,
                        u32_at(page, at + 8)? as usize,
                        u32_at(page, at + 12)? as usize,
                    );
                    let k = page.get(at + pos..at + pos + ks).ok_or_else(|| corrupt("key out of page"))?;
                    let v = page.get(at + pos + ks..at + pos + ks + vs).ok_or_else(|| corrupt("value out of page"))?;
                    visit(f, k, v)?;
                }
                BRANCH_PAGE => {
                    let child = u64_at(page, at + 8)?;
                    self.walk(self.page(child)?, depth + 1, visit)?;
                }
                other => return Err(corrupt(format!("unexpected page type {other:#x}"))),
            }
        }
        Ok(())
    }

    /// The pairs of a bucket given its header value (and inline page).
    fn bucket(&self, value: &[u8], visit: &mut PairVisitor<'_>) -> io::Result<()> {
        let root = u64_at(value, 0)?;
        let mut leaf = |flags: u32, k: &[u8], v: &[u8]| if flags & BUCKET_LEAF == 0 { visit(k, v) } else { Ok(()) };
        if root == 0 {
            let inline = value.get(BUCKET_HEADER..).ok_or_else(|| corrupt("inline bucket"))?;
            return self.walk(inline, 0, &mut leaf);
        }
        self.walk(self.page(root)?, 0, &mut leaf)
    }
}

/// Reads every top-level bucket of a bbolt file in name order (nested
/// buckets are skipped): `visit` gets each bucket's name with `None`,
/// then with each of its pairs in key order.
pub fn read(file: &[u8], visit: &mut BucketVisitor<'_>) -> io::Result<()> {
    let mut best: Option<(u64, u64, u64, usize)> = None;
    for page_size in [PAGE_SIZE, 1 << 14, 1 << 16] {
        for meta_page in 0..2usize {
            let at = meta_page * page_size + HEADER;
            let Some(m) = file.get(at..at + 64) else { continue };
            if u32_at(m, 0)? != MAGIC || u32_at(m, 4)? != VERSION || u32_at(m, 8)? as usize != page_size {
                continue;
            }
            if fnv64a(&m[..56]) != u64_at(m, 56)? {
                continue;
            }
            let (root, high_water, txid) = (u64_at(m, 16)?, u64_at(m, 40)?, u64_at(m, 48)?);
            if best.is_none_or(|(_, _, t, _)| txid > t) {
                best = Some((root, high_water, txid, page_size));
            }
        }
        if best.is_some() {
            break;
        }
    }
    let (root, high_water, _, page_size) = best.ok_or_else(|| corrupt("no valid meta page"))?;
    let reader = Reader { file, page_size, high_water, visits: std::cell::Cell::new(0) };
    let mut buckets = Vec::new();
    reader.walk(reader.page(root)?, 0, &mut |flags, name, header| {
        if flags & BUCKET_LEAF != 0 {
            buckets.push((name.to_vec(), header.to_vec()));
        }
        Ok(())
    })?;
    for (name, header) in buckets {
        visit(&name, None)?;
        reader.bucket(&header, &mut |k, v| visit(&name, Some((k, v))))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn read_all(file: &[u8]) -> io::Result<Vec<Bucket>> {
        let mut out: Vec<Bucket> = Vec::new();
        read(file, &mut |b, pair| {
            match pair {
                None => out.push((b.to_vec(), Vec::new())),
                Some((k, v)) => {
                    if let Some((_, pairs)) = out.last_mut() {
                        pairs.push((k.to_vec(), v.to_vec()));
                    }
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        /// Whatever is written reads back the same: many small pairs
        /// (branch pages), large values (overflow pages), empty buckets.
        #[test]
        fn round_trip(buckets in prop::collection::btree_map(
            prop::collection::vec(any::<u8>(), 1..8),
            prop::collection::btree_map(prop::collection::vec(any::<u8>(), 1..24), prop::collection::vec(any::<u8>(), 0..9000), 0..400),
            0..5,
        )) {
            let buckets: Vec<Bucket> = buckets.into_iter().map(|(n, kv)| (n, kv.into_iter().collect())).collect();
            let mut file = Vec::new();
            let size = write(&buckets, &mut file).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(size as usize, file.len());
            prop_assert!(looks_like_bbolt(&file));
            let back = read_all(&file).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, buckets);
        }

        /// Damaged files are refused or read, never a panic.
        #[test]
        fn damaged_files_never_panic(at in 0usize..40_000, byte in any::<u8>()) {
            let buckets: Vec<Bucket> = vec![(b"key".to_vec(), (0..600u32).map(|i| (i.to_be_bytes().to_vec(), vec![7u8; 40])).collect())];
            let mut file = Vec::new();
            write(&buckets, &mut file).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Some(b) = file.get_mut(at) {
                *b ^= byte | 1;
            }
            let _ = read_all(&file);
        }
    }
}
