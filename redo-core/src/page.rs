//! Pages of the key-value engine and the redo operations on them.
//!
//! A key lives on page `key_page(key)`; a page holds its entries sorted by
//! key. A redo record's payload is one operation on its page:
//!
//! ```text
//! put:    1 u8 | key_len u16 | key | value_len u32 | value
//! delete: 2 u8 | key_len u16 | key
//! ```
//!
//! A page image (what GetPage@LSN returns and the coalescer stores) is
//! `page u64 | lsn u64 | count u32 | (key_len u16 | key | value_len u32 | value)*`.
//! Materialising a page at an LSN is: its image, then its records in
//! `prev_lsn_for_page` order up to that LSN.
//!
//! A page's size is that of its image, bounded by the volume's `page_bytes_max`
//! (`Volume`): the writer refuses an operation that would grow a page past it.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::codec::{put_u32, put_u64, DecodeError, Reader};
use crate::ids::{Lsn, PageId};
use crate::record::RecordRef;

pub const KEY_BYTES_MAX: usize = 1024;
pub const VALUE_BYTES_MAX: usize = 64 << 10;
/// Entries one page image may hold: bounds what a decoder allocates.
const PAGE_ENTRIES_MAX: usize = 1 << 20;
/// An image's fixed part: page, LSN, entry count.
pub const PAGE_HEADER_BYTES: usize = 8 + 8 + 4;
/// Memory an entry takes beyond its key and value bytes: the map's slot (two
/// `Vec` headers, its share of a B-tree node) and two allocations' headers.
const ENTRY_HEAP_OVERHEAD_BYTES: usize = 80;

/// Bytes an entry takes in a page image.
pub const fn entry_bytes(key_len: usize, value_len: usize) -> usize {
    2 + key_len + 4 + value_len
}

const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;

/// The page a key lives on, among `page_count` pages.
pub fn key_page(key: &[u8], page_count: u64) -> PageId {
    assert!(page_count > 0);
    PageId(crc32c::crc32c(key) as u64 % page_count)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageOp {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OpError {
    #[error("key of {0} bytes: keys are 1 to {KEY_BYTES_MAX} bytes")]
    KeySize(usize),
    #[error("value of {0} bytes exceeds {VALUE_BYTES_MAX}")]
    ValueSize(usize),
}

fn put_bytes16(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

fn key(r: &mut Reader) -> Result<Vec<u8>, DecodeError> {
    let at = r.pos();
    let n = u16::from_le_bytes(r.bytes(2)?.try_into().expect("2 bytes")) as usize;
    if n == 0 || n > KEY_BYTES_MAX {
        return Err(DecodeError::Invalid { what: "key length", offset: at, value: n as u64 });
    }
    Ok(r.bytes(n)?.to_vec())
}

fn value(r: &mut Reader) -> Result<Vec<u8>, DecodeError> {
    let n = r.len("value length", VALUE_BYTES_MAX)?;
    Ok(r.bytes(n)?.to_vec())
}

impl PageOp {
    /// Checks the limits a client request must respect.
    pub fn check(&self) -> Result<(), OpError> {
        let (k, v) = match self {
            PageOp::Put { key, value } => (key.len(), value.len()),
            PageOp::Delete { key } => (key.len(), 0),
        };
        if k == 0 || k > KEY_BYTES_MAX {
            return Err(OpError::KeySize(k));
        }
        if v > VALUE_BYTES_MAX {
            return Err(OpError::ValueSize(v));
        }
        Ok(())
    }

    pub fn key(&self) -> &[u8] {
        match self {
            PageOp::Put { key, .. } | PageOp::Delete { key } => key,
        }
    }

    /// The length of the value the key has once applied (`None`: deleted).
    pub fn value_len(&self) -> Option<usize> {
        match self {
            PageOp::Put { value, .. } => Some(value.len()),
            PageOp::Delete { .. } => None,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        self.check().expect("operations are checked before encoding");
        match self {
            PageOp::Put { key, value } => {
                out.push(OP_PUT);
                put_bytes16(out, key);
                put_bytes32(out, value);
            }
            PageOp::Delete { key } => {
                out.push(OP_DELETE);
                put_bytes16(out, key);
            }
        }
    }

    pub fn decode(payload: &[u8]) -> Result<PageOp, DecodeError> {
        let mut r = Reader::new(payload);
        let op = match r.u8()? {
            OP_PUT => PageOp::Put { key: key(&mut r)?, value: value(&mut r)? },
            OP_DELETE => PageOp::Delete { key: key(&mut r)? },
            other => return Err(DecodeError::Invalid { what: "page operation", offset: 0, value: other as u64 }),
        };
        r.finish()?;
        Ok(op)
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ApplyError {
    #[error("record {lsn} is for {found}, not {page}")]
    WrongPage { lsn: Lsn, page: PageId, found: PageId },
    #[error("record {lsn} follows {prev} on {page}, but the page is at {at}")]
    OutOfChain { lsn: Lsn, page: PageId, prev: Lsn, at: Lsn },
    #[error("record {lsn}: {source}")]
    BadOperation { lsn: Lsn, source: DecodeError },
}

/// A page as of `lsn`: every record of the page up to `lsn` applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageImage {
    pub page: PageId,
    pub lsn: Lsn,
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The encoded size, kept as entries change (a page's size is checked on every write).
    bytes: usize,
}

impl PageImage {
    /// The page before any record: empty.
    pub fn empty(page: PageId) -> Self {
        PageImage { page, lsn: Lsn::ZERO, entries: BTreeMap::new(), bytes: PAGE_HEADER_BYTES }
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    /// Entries in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// The size of its encoding (`encode`): the page's size.
    pub fn encoded_bytes(&self) -> usize {
        self.bytes
    }

    /// About the memory it takes (what a page cache counts).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.bytes + self.entries.len() * ENTRY_HEAP_OVERHEAD_BYTES
    }

    /// Applies the page's next record; it must link back to the page's LSN.
    pub fn apply(&mut self, rec: RecordRef) -> Result<(), ApplyError> {
        let h = rec.header();
        if h.page != self.page {
            return Err(ApplyError::WrongPage { lsn: h.lsn, page: self.page, found: h.page });
        }
        if h.prev_lsn_for_page != self.lsn {
            return Err(ApplyError::OutOfChain { lsn: h.lsn, page: self.page, prev: h.prev_lsn_for_page, at: self.lsn });
        }
        let op = PageOp::decode(rec.payload()).map_err(|source| ApplyError::BadOperation { lsn: h.lsn, source })?;
        self.apply_op(h.lsn, op);
        Ok(())
    }

    /// Applies an operation that the caller has placed at `lsn` on this page.
    pub fn apply_op(&mut self, lsn: Lsn, op: PageOp) {
        debug_assert!(lsn > self.lsn);
        let (added, key_len) = (op.value_len().map(|v| entry_bytes(op.key().len(), v)), op.key().len());
        let old = match op {
            PageOp::Put { key, value } => self.entries.insert(key, value),
            PageOp::Delete { key } => self.entries.remove(&key),
        };
        self.bytes = self.bytes + added.unwrap_or(0) - old.map_or(0, |v| entry_bytes(key_len, v.len()));
        self.lsn = lsn;
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.page.0);
        put_u64(out, self.lsn.0);
        put_u32(out, self.entries.len() as u32);
        for (k, v) in &self.entries {
            put_bytes16(out, k);
            put_bytes32(out, v);
        }
    }

    pub fn decode(buf: &[u8]) -> Result<PageImage, DecodeError> {
        let mut r = Reader::new(buf);
        let page = PageId(r.u64()?);
        let lsn = Lsn(r.u64()?);
        let at = r.pos();
        let n = r.u32()? as usize;
        // Each entry takes at least 7 bytes: a count beyond that is a lie.
        if n > PAGE_ENTRIES_MAX || n * 7 > r.remaining() {
            return Err(DecodeError::Invalid { what: "page entry count", offset: at, value: n as u64 });
        }
        let mut entries = BTreeMap::new();
        let mut prev: Option<Vec<u8>> = None;
        for _ in 0..n {
            let at = r.pos();
            let k = key(&mut r)?;
            if prev.as_ref().is_some_and(|p| *p >= k) {
                return Err(DecodeError::Invalid { what: "unsorted page entry", offset: at, value: 0 });
            }
            let v = value(&mut r)?;
            prev = Some(k.clone());
            entries.insert(k, v);
        }
        r.finish()?;
        Ok(PageImage { page, lsn, entries, bytes: buf.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordHeader;
    use proptest::prelude::*;

    fn record(lsn: u64, prev_for_page: u64, page: u64, op: &PageOp) -> Vec<u8> {
        let mut payload = Vec::new();
        op.encode(&mut payload);
        let mut out = Vec::new();
        RecordHeader { lsn: Lsn(lsn), prev_lsn_in_segment: Lsn(lsn - 1), prev_lsn_for_page: Lsn(prev_for_page), page: PageId(page), cpl: true }
            .encode(&payload, &mut out);
        out
    }

    fn put(k: &str, v: &str) -> PageOp {
        PageOp::Put { key: k.into(), value: v.into() }
    }

    #[test]
    fn ops_round_trip_and_limits() {
        for op in [put("k", "v"), put("k", ""), PageOp::Delete { key: b"k".to_vec() }] {
            let mut b = Vec::new();
            op.encode(&mut b);
            assert_eq!(PageOp::decode(&b).unwrap(), op);
        }
        assert_eq!(PageOp::Put { key: vec![], value: vec![] }.check(), Err(OpError::KeySize(0)));
        assert_eq!(PageOp::Put { key: vec![1; KEY_BYTES_MAX + 1], value: vec![] }.check(), Err(OpError::KeySize(KEY_BYTES_MAX + 1)));
        assert_eq!(PageOp::Put { key: vec![1], value: vec![0; VALUE_BYTES_MAX + 1] }.check(), Err(OpError::ValueSize(VALUE_BYTES_MAX + 1)));
    }

    #[test]
    fn materialise_a_page_chain() {
        let mut p = PageImage::empty(PageId(3));
        let r1 = record(5, 0, 3, &put("a", "1"));
        let r2 = record(9, 5, 3, &put("b", "2"));
        let r3 = record(12, 9, 3, &PageOp::Delete { key: b"a".to_vec() });
        for r in [&r1, &r2, &r3] {
            p.apply(RecordRef::decode(r, 0).unwrap()).unwrap();
        }
        assert_eq!(p.lsn, Lsn(12));
        assert_eq!(p.entries().collect::<Vec<_>>(), vec![(&b"b"[..], &b"2"[..])]);
    }

    #[test]
    fn apply_refuses_gaps_and_other_pages() {
        let mut p = PageImage::empty(PageId(3));
        let skip = record(9, 5, 3, &put("b", "2"));
        assert!(matches!(p.apply(RecordRef::decode(&skip, 0).unwrap()), Err(ApplyError::OutOfChain { .. })));
        let other = record(5, 0, 4, &put("b", "2"));
        assert!(matches!(p.apply(RecordRef::decode(&other, 0).unwrap()), Err(ApplyError::WrongPage { .. })));
        assert_eq!(p, PageImage::empty(PageId(3)), "a refused record changes nothing");
    }

    #[test]
    fn image_round_trip() {
        let mut p = PageImage::empty(PageId(7));
        p.apply_op(Lsn(40), put("x", "1"));
        p.apply_op(Lsn(44), put("y", ""));
        let mut b = Vec::new();
        p.encode(&mut b);
        assert_eq!(PageImage::decode(&b).unwrap(), p);
        assert_eq!(p.encoded_bytes(), b.len());
    }

    #[test]
    fn keys_spread_over_pages() {
        let pages: std::collections::HashSet<_> = (0..1000).map(|i| key_page(format!("key{i}").as_bytes(), 64)).collect();
        assert_eq!(pages.len(), 64);
        assert_eq!(key_page(b"same", 64), key_page(b"same", 64));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn decoders_are_total(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = PageOp::decode(&buf);
            let _ = PageImage::decode(&buf);
        }

        #[test]
        fn the_size_kept_is_that_of_the_encoding(ops in proptest::collection::vec((0..6u8, proptest::option::of(0..300usize)), 1..40)) {
            let mut p = PageImage::empty(PageId(1));
            for (i, (k, v)) in ops.into_iter().enumerate() {
                let key = vec![b'k'; k as usize + 1];
                p.apply_op(Lsn(i as u64 + 1), match v {
                    Some(n) => PageOp::Put { key, value: vec![7; n] },
                    None => PageOp::Delete { key },
                });
                let mut b = Vec::new();
                p.encode(&mut b);
                prop_assert_eq!(p.encoded_bytes(), b.len());
            }
        }

        #[test]
        fn mutated_images_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..5)) {
            let mut p = PageImage::empty(PageId(1));
            for i in 0..5u8 {
                p.apply_op(Lsn(i as u64 + 1), PageOp::Put { key: vec![b'k', i], value: vec![i; i as usize] });
            }
            let mut b = Vec::new();
            p.encode(&mut b);
            for (at, x) in flips {
                let i = at % b.len();
                b[i] ^= x;
            }
            if let Ok(img) = PageImage::decode(&b) {
                let mut again = Vec::new();
                img.encode(&mut again);
                prop_assert_eq!(again, b);
            }
        }
    }
}
