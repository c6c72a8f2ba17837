//! A segment's checkpoint, `pg-N.ckpt`: what a restart needs so that it reads
//! only the tail of the segment's files, whatever their history. Written by
//! storage's GC each time it reclaims log or rewrites the page file, before
//! either takes effect on disk.
//!
//! ```text
//! magic "BRLSCKP\0" | version u32 | pg u32 | page_gen u64 | page_end u64
//! | log_offset u64 | log_prev u64 | horizon u64 | count u32
//! | count x (page u64 | lsn u64 | offset u64 | len u32) | crc32c u32 of all before
//! ```
//!
//! - `page_gen`: the page file in use (`pg-N.pages.<gen>`; compaction writes the next one).
//! - `page_end`: where that file ended; images appended after it are read from the file.
//! - `log_offset`, `log_prev`: the start of the log (`LogStart`): the segment file is read from there.
//! - `horizon`: the GC horizon; reads below it stay refused after a restart.
//! - the images the page index keeps (`PageIndex::images`), each page's in LSN order.

use crate::codec::{put_u32, put_u64, DecodeError, Reader};
use crate::ids::{Lsn, PageId, PgId};
use crate::page_index::Located;
use crate::segment_log::LogStart;

pub const CHECKPOINT_MAGIC: [u8; 8] = *b"BRLSCKP\0";
pub const CHECKPOINT_FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 * 5 + 4;
const IMAGE_BYTES: usize = 8 + 8 + 8 + 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub pg: PgId,
    pub page_gen: u64,
    pub page_end: u64,
    pub log_start: LogStart,
    pub horizon: Lsn,
    pub images: Vec<(PageId, Located)>,
}

impl Checkpoint {
    /// Encodes the checkpoint, its images sorted so that each page's are in LSN order.
    pub fn encode(&self) -> Vec<u8> {
        let mut images = self.images.clone();
        images.sort_by_key(|(page, at)| (*page, at.lsn));
        let mut out = Vec::with_capacity(HEADER_BYTES + images.len() * IMAGE_BYTES + 4);
        out.extend_from_slice(&CHECKPOINT_MAGIC);
        put_u32(&mut out, CHECKPOINT_FORMAT_VERSION);
        put_u32(&mut out, self.pg.0);
        for v in [self.page_gen, self.page_end, self.log_start.offset, self.log_start.prev.0, self.horizon.0] {
            put_u64(&mut out, v);
        }
        put_u32(&mut out, images.len() as u32);
        for (page, at) in images {
            put_u64(&mut out, page.0);
            put_u64(&mut out, at.lsn.0);
            put_u64(&mut out, at.offset);
            put_u32(&mut out, at.len);
        }
        let crc = crc32c::crc32c(&out);
        put_u32(&mut out, crc);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Checkpoint, DecodeError> {
        let body = buf.len().checked_sub(4).ok_or(DecodeError::Truncated { offset: 0, needed: HEADER_BYTES + 4, available: buf.len() })?;
        let mut r = Reader::new(buf);
        let magic = r.bytes(8)?;
        if magic != CHECKPOINT_MAGIC {
            return Err(DecodeError::Invalid { what: "checkpoint magic", offset: 0, value: u64::from_le_bytes(magic.try_into().expect("8")) });
        }
        let version = r.u32()?;
        if version != CHECKPOINT_FORMAT_VERSION {
            return Err(DecodeError::Invalid { what: "checkpoint format version", offset: 8, value: version as u64 });
        }
        let stored = u32::from_le_bytes(buf[body..].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(&buf[..body]);
        if stored != computed {
            return Err(DecodeError::BadCrc { offset: body, stored, computed });
        }
        let pg = PgId(r.u32()?);
        let (page_gen, page_end, offset, prev, horizon) = (r.u64()?, r.u64()?, r.u64()?, Lsn(r.u64()?), Lsn(r.u64()?));
        let count = r.u32()? as usize;
        if count.checked_mul(IMAGE_BYTES) != Some(body.saturating_sub(r.pos())) {
            return Err(DecodeError::Invalid { what: "checkpoint image count", offset: r.pos() - 4, value: count as u64 });
        }
        let mut images = Vec::with_capacity(count);
        for _ in 0..count {
            let page = PageId(r.u64()?);
            images.push((page, Located { lsn: Lsn(r.u64()?), offset: r.u64()?, len: r.u32()? }));
        }
        Ok(Checkpoint { pg, page_gen, page_end, log_start: LogStart { offset, prev }, horizon, images })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let at = |lsn, offset| Located { lsn: Lsn(lsn), offset, len: 100 };
        Checkpoint {
            pg: PgId(3),
            page_gen: 7,
            page_end: 4000,
            log_start: LogStart { offset: 1 << 20, prev: Lsn(99) },
            horizon: Lsn(120),
            images: vec![(PageId(2), at(110, 300)), (PageId(1), at(90, 0)), (PageId(2), at(50, 200))],
        }
    }

    #[test]
    fn round_trips_with_each_pages_images_in_lsn_order() {
        let c = sample();
        let decoded = Checkpoint::decode(&c.encode()).unwrap();
        let lsns: Vec<(u64, u64)> = decoded.images.iter().map(|(p, at)| (p.0, at.lsn.0)).collect();
        assert_eq!(lsns, vec![(1, 90), (2, 50), (2, 110)]);
        assert_eq!(Checkpoint { images: c.images.clone(), ..decoded }, c);
    }

    #[test]
    fn damage_and_other_versions_are_refused() {
        let buf = sample().encode();
        for i in [0, 8, 20, buf.len() - 5, buf.len() - 1] {
            let mut bad = buf.clone();
            bad[i] ^= 1;
            assert!(Checkpoint::decode(&bad).is_err(), "flip at {i}");
        }
        let mut v2 = buf.clone();
        v2[8] = 2;
        assert_eq!(Checkpoint::decode(&v2), Err(DecodeError::Invalid { what: "checkpoint format version", offset: 8, value: 2 }));
        for n in 0..buf.len() {
            assert!(Checkpoint::decode(&buf[..n]).is_err(), "cut to {n}");
        }
    }
}
