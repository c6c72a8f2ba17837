//! Per-page index of one segment, for GetPage@LSN and the coalescer: where
//! each page's stored images and records lie, so that materialising a page
//! touches only that page's records. Also the page-image file entry format.
//!
//! Records are noted as they join the segment's gap-free chain (so in LSN
//! order), with the segment-file offset they have or will have once flushed;
//! images as the coalescer stores them.
//!
//! Per page the index keeps the newest image at or below the GC horizon
//! (`retire`): the base of every read a reader may still make, since reads
//! below the horizon are refused. Above it, the newest images, up to
//! `IMAGES_KEPT_MAX` in all. It keeps the page's records above that base only.
//! What the index no longer holds (older images, records below the bases) is
//! what storage may reclaim: `first_needed` bounds the log, `images` lists the
//! live part of the page file.
//!
//! A page is due for a new image (`take_due`) once its records since its
//! newest image outweigh that image twice, or outnumber `coalesce_records`:
//! image bytes then stay below half the record bytes (write amplification)
//! and a read applies a bounded number of records. A page written too rarely for that is imaged
//! when its oldest record pins the log (`pinning_pages`).
//!
//! Page-image file entry: `len u32 | crc32c u32 | encoded PageImage`, where
//! `len` counts the image bytes and the CRC covers them.

use std::collections::{HashMap, VecDeque};

use thiserror::Error;

use crate::codec::{put_u32, DecodeError};
use crate::ids::{Lsn, PageId};
use crate::page::PageImage;
use crate::wire::FRAME_BYTES_MAX;

/// Images kept per page at most (see the module documentation).
pub const IMAGES_KEPT_MAX: usize = 2;
/// A page with no image yet is due once its records reach this many bytes.
const DUE_BYTES_MIN: u64 = 4096;
pub const IMAGE_ENTRY_HEADER_BYTES: usize = 8;
/// An image must fit in a `PageReply` frame.
pub const IMAGE_BYTES_MAX: usize = FRAME_BYTES_MAX - 64;
/// `page u64 | lsn u64 | count u32`: the smallest encoded image.
const IMAGE_BYTES_MIN: usize = 20;

/// Where a record (in the segment file) or an image entry (in the page file) lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    pub lsn: Lsn,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, Default)]
struct PageEntry {
    /// Oldest first; at most `IMAGES_KEPT_MAX`.
    images: VecDeque<Located>,
    /// The page's records above `complete_after`, in LSN (= chain) order.
    records: VecDeque<Located>,
    /// Records and their bytes above the newest image.
    since_image: (usize, u64),
    complete_after: Lsn,
    broken: Option<PageBroken>,
}

impl PageEntry {
    fn newest_image(&self) -> Lsn {
        self.images.back().map_or(Lsn::ZERO, |i| i.lsn)
    }

    /// Whether the records since the newest image make the page due.
    fn is_due(&self, coalesce_records: usize) -> bool {
        let (records, bytes) = self.since_image;
        let image = self.images.back().map_or(DUE_BYTES_MIN, |i| i.len as u64);
        records > coalesce_records || (records > 0 && bytes >= 2 * image)
    }

    /// The first record above the newest image.
    fn first_since_image(&self) -> Option<&Located> {
        self.records.get(self.records.len() - self.since_image.0)
    }

    fn recount(&mut self) {
        let newest = self.newest_image();
        let from = self.records.partition_point(|r| r.lsn <= newest);
        self.since_image = (self.records.len() - from, self.records.range(from..).map(|r| r.len as u64).sum());
    }

    /// Records in `(after, upto]`.
    fn records_in(&self, after: Lsn, upto: Lsn) -> impl Iterator<Item = &Located> {
        let from = self.records.partition_point(|r| r.lsn <= after);
        let to = self.records.partition_point(|r| r.lsn <= upto);
        self.records.range(from..to.max(from))
    }
}

/// A record of the page does not apply (broken `prev_lsn_for_page` chain or
/// bad operation): the page cannot be materialised at or past it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{page} cannot be materialised at or past record {at}: {reason}")]
pub struct PageBroken {
    pub page: PageId,
    pub at: Lsn,
    pub reason: String,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("image of {page} at {lsn} is {bytes} bytes, more than the {IMAGE_BYTES_MAX} a page reply can carry")]
pub struct ImageTooLarge {
    pub page: PageId,
    pub lsn: Lsn,
    pub bytes: usize,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("image of {page} at {lsn} is not newer than its stored image at {newest}")]
pub struct StaleImage {
    pub page: PageId,
    pub lsn: Lsn,
    pub newest: Lsn,
}

/// How to materialise a page at an LSN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PagePlan {
    /// Start from the image `base` (or the empty page) and apply `records` in order.
    Indexed { base: Option<Located>, records: Vec<Located> },
    /// The LSN is older than what the index keeps for the page: scan the log.
    Unindexed,
}

#[derive(Debug)]
pub struct PageIndex {
    pages: HashMap<PageId, PageEntry>,
    /// A page with more records than this since its newest image is due for coalescing.
    coalesce_records: usize,
    /// Due pages, by the LSN of the record that made them due (ascending).
    due: VecDeque<(Lsn, PageId)>,
    records: usize,
}

impl PageIndex {
    pub fn new(coalesce_records: usize) -> Self {
        PageIndex { pages: HashMap::new(), coalesce_records, due: VecDeque::new(), records: 0 }
    }

    /// Records indexed, over all pages.
    pub fn records(&self) -> usize {
        self.records
    }

    /// The record `rec` of `page` joined the segment's chain. Records arrive in
    /// LSN order; one at or below what the page's images already cover (when
    /// recovery loads the images first) is not needed and ignored.
    pub fn note_record(&mut self, page: PageId, rec: Located) {
        let e = self.pages.entry(page).or_default();
        if e.broken.is_some() || rec.lsn <= e.complete_after {
            return;
        }
        debug_assert!(e.records.back().is_none_or(|r| r.lsn < rec.lsn), "records out of order");
        e.records.push_back(rec);
        self.records += 1;
        if rec.lsn > e.newest_image() {
            let was_due = e.is_due(self.coalesce_records);
            e.since_image = (e.since_image.0 + 1, e.since_image.1 + rec.len as u64);
            if !was_due && e.is_due(self.coalesce_records) {
                self.due.push_back((rec.lsn, page));
            }
        }
    }

    /// The image `image` of `page` is durably stored. Past `IMAGES_KEPT_MAX`
    /// it drops the newest but one: the oldest may be the base that reads at
    /// the GC horizon need.
    pub fn note_image(&mut self, page: PageId, image: Located) -> Result<(), StaleImage> {
        let e = self.pages.entry(page).or_default();
        let newest = e.newest_image();
        if e.images.back().is_some() && image.lsn <= newest {
            return Err(StaleImage { page, lsn: image.lsn, newest });
        }
        e.images.push_back(image);
        if e.images.len() > IMAGES_KEPT_MAX {
            e.images.remove(e.images.len() - 2);
        }
        e.recount();
        Ok(())
    }

    /// The GC horizon is `horizon`: no read below it will be served. Per page,
    /// drops the images older than the newest one at or below it, and the
    /// records that one covers. O(pages): call it once per coalescing round.
    pub fn retire(&mut self, horizon: Lsn) {
        for e in self.pages.values_mut() {
            while e.images.get(1).is_some_and(|i| i.lsn <= horizon) {
                e.images.pop_front();
            }
            let Some(base) = e.images.front().filter(|i| i.lsn <= horizon && i.lsn > e.complete_after) else { continue };
            e.complete_after = base.lsn;
            while e.records.front().is_some_and(|r| r.lsn <= base.lsn) {
                e.records.pop_front();
                self.records -= 1;
            }
        }
    }

    /// The lowest record any read may still need (`Lsn(u64::MAX)` if none):
    /// every record below it that is also below the GC horizon can be reclaimed.
    pub fn first_needed(&self) -> Lsn {
        self.pages.values().filter_map(|e| e.records.front()).map(|r| r.lsn).min().unwrap_or(Lsn(u64::MAX))
    }

    /// Every image the index keeps: the live part of the page file.
    pub fn images(&self) -> impl Iterator<Item = (PageId, Located)> + '_ {
        self.pages.iter().flat_map(|(&page, e)| e.images.iter().map(move |&i| (page, i)))
    }

    /// Moves every kept image to where `moved` says (the page file was rewritten).
    pub fn relocate(&mut self, mut moved: impl FnMut(Located) -> u64) {
        for e in self.pages.values_mut() {
            e.images.iter_mut().for_each(|i| i.offset = moved(*i));
        }
    }

    /// The page's record `broken.at` does not apply: stop indexing the page's
    /// records from there on, as no read at or past it can succeed.
    pub fn note_broken(&mut self, broken: PageBroken) {
        let e = self.pages.entry(broken.page).or_default();
        while e.records.back().is_some_and(|r| r.lsn >= broken.at) {
            e.records.pop_back();
            self.records -= 1;
        }
        e.recount();
        e.broken = Some(broken);
    }

    /// How to materialise `page` as of `lsn` (at most the segment's SCL).
    pub fn plan(&self, page: PageId, lsn: Lsn) -> Result<PagePlan, PageBroken> {
        let Some(e) = self.pages.get(&page) else {
            return Ok(PagePlan::Indexed { base: None, records: vec![] });
        };
        if let Some(b) = e.broken.as_ref().filter(|b| b.at <= lsn) {
            return Err(b.clone());
        }
        let base = e.images.iter().rev().find(|i| i.lsn <= lsn).copied();
        let from = base.map_or(Lsn::ZERO, |i| i.lsn);
        if from < e.complete_after {
            return Ok(PagePlan::Unindexed);
        }
        Ok(PagePlan::Indexed { base, records: e.records_in(from, lsn).copied().collect() })
    }

    /// Pages (not broken) whose first record above their newest image is at
    /// or below `pin` (and `upto`): they hold the log there until imaged.
    pub fn pinning_pages(&self, pin: Lsn, upto: Lsn) -> Vec<PageId> {
        let limit = pin.min(upto);
        let pinning = |e: &PageEntry| e.broken.is_none() && e.first_since_image().is_some_and(|r| r.lsn <= limit);
        self.pages.iter().filter(|(_, e)| pinning(e)).map(|(&p, _)| p).collect()
    }

    /// Pages that became due (see the module documentation) with a record at
    /// or below `upto`, and have not been imaged since.
    pub fn take_due(&mut self, upto: Lsn) -> Vec<PageId> {
        let mut out = Vec::new();
        while let Some(&(lsn, page)) = self.due.front().filter(|(lsn, _)| *lsn <= upto) {
            self.due.pop_front();
            let e = &self.pages[&page];
            if e.broken.is_none() && e.newest_image() < lsn && !out.contains(&page) {
                out.push(page);
            }
        }
        out
    }

    /// The newest image of any page, for recovery's consistency check.
    pub fn newest_image(&self) -> Lsn {
        self.pages.values().map(PageEntry::newest_image).max().unwrap_or(Lsn::ZERO)
    }
}

/// Appends the page-file entry of `image` to `out` (unchanged on error).
pub fn encode_image_entry(image: &PageImage, out: &mut Vec<u8>) -> Result<(), ImageTooLarge> {
    let start = out.len();
    out.extend_from_slice(&[0; IMAGE_ENTRY_HEADER_BYTES]);
    image.encode(out);
    let len = out.len() - start - IMAGE_ENTRY_HEADER_BYTES;
    if len > IMAGE_BYTES_MAX {
        out.truncate(start);
        return Err(ImageTooLarge { page: image.page, lsn: image.lsn, bytes: len });
    }
    let crc = crc32c::crc32c(&out[start + IMAGE_ENTRY_HEADER_BYTES..]);
    let mut header = Vec::with_capacity(IMAGE_ENTRY_HEADER_BYTES);
    put_u32(&mut header, len as u32);
    put_u32(&mut header, crc);
    out[start..start + IMAGE_ENTRY_HEADER_BYTES].copy_from_slice(&header);
    Ok(())
}

/// The image bytes that follow an entry header. `offset` labels errors.
pub fn image_entry_len(header: &[u8; IMAGE_ENTRY_HEADER_BYTES], offset: usize) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if !(IMAGE_BYTES_MIN..=IMAGE_BYTES_MAX).contains(&len) {
        return Err(DecodeError::Invalid { what: "page image length", offset, value: len as u64 });
    }
    Ok(len)
}

/// Decodes a whole page-file entry (header and image), checking its CRC.
pub fn decode_image_entry(entry: &[u8], offset: usize) -> Result<PageImage, DecodeError> {
    PageImage::decode(verify_image_entry(entry, offset)?)
}

/// Checks a whole page-file entry's length and CRC; returns the image bytes.
pub fn verify_image_entry(entry: &[u8], offset: usize) -> Result<&[u8], DecodeError> {
    let header: &[u8; IMAGE_ENTRY_HEADER_BYTES] = entry.get(..IMAGE_ENTRY_HEADER_BYTES).and_then(|h| h.try_into().ok()).ok_or(DecodeError::Truncated {
        offset,
        needed: IMAGE_ENTRY_HEADER_BYTES,
        available: entry.len(),
    })?;
    let len = image_entry_len(header, offset)?;
    let body = &entry[IMAGE_ENTRY_HEADER_BYTES..];
    if body.len() != len {
        return Err(DecodeError::Truncated { offset, needed: IMAGE_ENTRY_HEADER_BYTES + len, available: entry.len() });
    }
    let stored = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(DecodeError::BadCrc { offset, stored, computed });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PageId = PageId(7);

    fn rec(lsn: u64) -> Located {
        Located { lsn: Lsn(lsn), offset: lsn * 100, len: 50 }
    }

    fn img(lsn: u64) -> Located {
        Located { lsn: Lsn(lsn), offset: lsn * 1000, len: 30 }
    }

    fn lsns(plan: PagePlan) -> (Option<Lsn>, Vec<u64>) {
        match plan {
            PagePlan::Indexed { base, records } => (base.map(|b| b.lsn), records.iter().map(|r| r.lsn.0).collect()),
            PagePlan::Unindexed => panic!("unindexed"),
        }
    }

    #[test]
    fn plans_start_from_the_newest_image_at_or_below_the_lsn() {
        let mut ix = PageIndex::new(64);
        for l in [2, 5, 9, 12, 20] {
            ix.note_record(P, rec(l));
        }
        ix.note_record(PageId(8), rec(6));
        assert_eq!(lsns(ix.plan(P, Lsn(10)).unwrap()), (None, vec![2, 5, 9]));
        assert_eq!(lsns(ix.plan(PageId(99), Lsn(10)).unwrap()), (None, vec![]), "an unknown page is empty");
        ix.note_image(P, img(9)).unwrap();
        assert_eq!(lsns(ix.plan(P, Lsn(15)).unwrap()), (Some(Lsn(9)), vec![12]));
        // One image: records below it are still kept, for reads below it.
        assert_eq!(lsns(ix.plan(P, Lsn(8)).unwrap()), (None, vec![2, 5]));
        assert_eq!(ix.records(), 6);
    }

    #[test]
    fn retire_keeps_the_base_of_reads_at_the_horizon_and_drops_what_it_covers() {
        let mut ix = PageIndex::new(64);
        for l in [2, 5, 9, 12, 20, 25] {
            ix.note_record(P, rec(l));
        }
        ix.note_image(P, img(5)).unwrap();
        ix.note_image(P, img(12)).unwrap();
        assert_eq!((ix.records(), ix.first_needed()), (6, Lsn(2)), "nothing is dropped before the horizon passes an image");
        ix.retire(Lsn(11));
        assert_eq!((ix.records(), ix.first_needed()), (4, Lsn(9)), "2 and 5 are covered by the image at 5, the base at 11");
        assert_eq!(lsns(ix.plan(P, Lsn(11)).unwrap()), (Some(Lsn(5)), vec![9]));
        assert_eq!(ix.plan(P, Lsn(4)).unwrap(), PagePlan::Unindexed, "below the horizon");
        ix.retire(Lsn(19));
        assert_eq!((ix.records(), ix.first_needed()), (2, Lsn(20)));
        assert_eq!(ix.images().map(|(_, i)| i.lsn.0).collect::<Vec<_>>(), vec![12]);
        assert_eq!(lsns(ix.plan(P, Lsn(30)).unwrap()), (Some(Lsn(12)), vec![20, 25]));
        ix.note_image(P, img(20)).unwrap();
        assert_eq!(lsns(ix.plan(P, Lsn(19)).unwrap()), (Some(Lsn(12)), vec![]));
        assert_eq!(ix.note_image(P, img(20)), Err(StaleImage { page: P, lsn: Lsn(20), newest: Lsn(20) }));
        ix.retire(Lsn(100));
        assert_eq!((ix.records(), ix.first_needed()), (1, Lsn(25)));
    }

    #[test]
    fn past_the_image_limit_the_oldest_image_stays_as_the_base() {
        let mut ix = PageIndex::new(64);
        for l in [5, 12, 20, 30] {
            ix.note_record(P, rec(l));
            ix.note_image(P, img(l)).unwrap();
        }
        assert_eq!(ix.images().map(|(_, i)| i.lsn.0).collect::<Vec<_>>(), vec![5, 30]);
        assert_eq!(lsns(ix.plan(P, Lsn(25)).unwrap()), (Some(Lsn(5)), vec![12, 20]), "the records between stay");
        ix.relocate(|i| i.lsn.0 + 1);
        assert_eq!(ix.images().map(|(_, i)| i.offset).collect::<Vec<_>>(), vec![6, 31]);
    }

    #[test]
    fn recovery_loads_images_first_and_skips_covered_records() {
        let mut ix = PageIndex::new(64);
        ix.note_image(P, img(5)).unwrap();
        ix.note_image(P, img(9)).unwrap();
        ix.retire(Lsn(5));
        for l in [2, 5, 9, 12] {
            ix.note_record(P, rec(l));
        }
        assert_eq!(ix.records(), 2);
        assert_eq!(lsns(ix.plan(P, Lsn(12)).unwrap()), (Some(Lsn(9)), vec![12]));
        assert_eq!(lsns(ix.plan(P, Lsn(8)).unwrap()), (Some(Lsn(5)), vec![]));
        assert_eq!(ix.newest_image(), Lsn(9));
    }

    #[test]
    fn pages_are_due_by_bytes_or_records_and_pinning_by_age() {
        let mut ix = PageIndex::new(2);
        // No image yet: due at DUE_BYTES_MIN (records of 50 bytes) or past 2 records.
        for l in 1..=3 {
            ix.note_record(P, rec(l));
        }
        // P passed 2 records at 3; only once that record is flushed is it due.
        assert_eq!(ix.take_due(Lsn(2)), vec![]);
        assert_eq!(ix.take_due(Lsn(3)), vec![P]);
        assert_eq!(ix.take_due(Lsn(3)), vec![], "taken once");
        // An image of 120 bytes: due once the records since outweigh it twice.
        let q = PageId(8);
        ix.note_record(q, Located { lsn: Lsn(4), offset: 0, len: 10 });
        ix.note_image(q, Located { lsn: Lsn(4), offset: 0, len: 120 }).unwrap();
        ix.note_record(q, Located { lsn: Lsn(5), offset: 0, len: 200 });
        assert_eq!(ix.take_due(Lsn(10)), vec![]);
        ix.note_record(q, Located { lsn: Lsn(6), offset: 0, len: 40 });
        assert_eq!(ix.take_due(Lsn(10)), vec![q]);
        // Not due if imaged meanwhile.
        ix.note_image(P, img(3)).unwrap();
        for l in 7..=9 {
            ix.note_record(P, rec(l));
        }
        ix.note_image(P, img(9)).unwrap();
        assert_eq!(ix.take_due(Lsn(10)), vec![]);
        // Pinning: q's first record above its image is 5.
        assert_eq!(ix.pinning_pages(Lsn(4), Lsn(10)), vec![]);
        assert_eq!(ix.pinning_pages(Lsn(5), Lsn(10)), vec![q]);
        assert_eq!(ix.pinning_pages(Lsn(5), Lsn(4)), vec![], "not flushed yet");
    }

    #[test]
    fn broken_pages_stop_indexing_and_refuse_reads_past_the_break() {
        let mut ix = PageIndex::new(64);
        for l in [2, 5, 9] {
            ix.note_record(P, rec(l));
        }
        let broken = PageBroken { page: P, at: Lsn(5), reason: "bad".into() };
        ix.note_broken(broken.clone());
        ix.note_record(P, rec(12));
        assert_eq!(ix.records(), 1);
        assert_eq!(lsns(ix.plan(P, Lsn(4)).unwrap()), (None, vec![2]));
        assert_eq!(ix.plan(P, Lsn(5)), Err(broken));
        assert_eq!(ix.pinning_pages(Lsn(100), Lsn(100)), vec![]);
    }

    #[test]
    fn image_entries_round_trip_and_detect_damage() {
        let mut image = PageImage::empty(P);
        image.apply_op(Lsn(42), crate::page::PageOp::Put { key: b"k".to_vec(), value: b"v".to_vec() });
        let mut buf = Vec::new();
        encode_image_entry(&image, &mut buf).unwrap();
        assert_eq!(decode_image_entry(&buf, 0).unwrap(), image);
        let header: [u8; 8] = buf[..8].try_into().unwrap();
        assert_eq!(image_entry_len(&header, 0).unwrap(), buf.len() - 8);
        assert!(matches!(decode_image_entry(&buf[..buf.len() - 1], 0), Err(DecodeError::Truncated { .. })));
        let mut bad = buf.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(decode_image_entry(&bad, 0), Err(DecodeError::BadCrc { .. })));
        assert!(matches!(image_entry_len(&[0; 8], 0), Err(DecodeError::Invalid { .. })), "zeros are not an entry");
    }
}
