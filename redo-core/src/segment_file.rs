//! On-disk segment file: a 4 KiB header block, then records back to back
//! (the record format of `record.rs`), then zeros. A zero length word marks
//! the end of the log; the file is preallocated so the tail reads as zeros.
//!
//! ```text
//! header block (SEGMENT_HEADER_BYTES, so records start O_DIRECT-aligned):
//!   magic "BRLSSEG\0" | version u32 | pg u32 | node u32 | crc32c of the preceding 20 bytes | zeros
//! ```

use crate::codec::{put_u32, DecodeError, Reader};
use crate::ids::{Lsn, NodeId, PgId, SegmentId};
use crate::record::RecordRef;

pub const SEGMENT_MAGIC: [u8; 8] = *b"BRLSSEG\0";
pub const SEGMENT_FORMAT_VERSION: u32 = 1;
/// The header occupies one whole block so records start block-aligned.
pub const SEGMENT_HEADER_BYTES: usize = 4096;

pub fn encode_header(id: SegmentId) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEGMENT_HEADER_BYTES);
    out.extend_from_slice(&SEGMENT_MAGIC);
    put_u32(&mut out, SEGMENT_FORMAT_VERSION);
    put_u32(&mut out, id.pg.0);
    put_u32(&mut out, id.node.0);
    let crc = crc32c::crc32c(&out);
    put_u32(&mut out, crc);
    out.resize(SEGMENT_HEADER_BYTES, 0);
    out
}

pub fn decode_header(buf: &[u8]) -> Result<SegmentId, DecodeError> {
    let mut r = Reader::new(buf);
    let magic = r.bytes(8)?;
    if magic != SEGMENT_MAGIC {
        return Err(DecodeError::Invalid { what: "segment magic", offset: 0, value: u64::from_le_bytes(magic.try_into().expect("8")) });
    }
    let version = r.u32()?;
    if version != SEGMENT_FORMAT_VERSION {
        return Err(DecodeError::Invalid { what: "segment format version", offset: 8, value: version as u64 });
    }
    let id = SegmentId { pg: PgId(r.u32()?), node: NodeId(r.u32()?) };
    let stored = r.u32()?;
    let computed = crc32c::crc32c(&buf[..20]);
    if stored != computed {
        return Err(DecodeError::BadCrc { offset: 20, stored, computed });
    }
    Ok(id)
}

/// Why a scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// A zero length word: the clean end of the log.
    End,
    /// The buffer ends inside a record; feed more bytes (or, at end of file, it is torn).
    NeedMore,
    /// The bytes at `offset` are not the next record of this segment.
    Corrupt { offset: u64, reason: String },
}

/// Scans records from `buf`, which sits at file offset `base`, continuing the
/// backlink chain after `last_lsn`. Calls `on_record(record, file_offset)` for
/// each valid record and returns the bytes consumed and why it stopped.
pub fn scan_records<'a>(buf: &'a [u8], base: u64, last_lsn: &mut Lsn, mut on_record: impl FnMut(RecordRef<'a>, u64)) -> (usize, ScanStop) {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let offset = base + pos as u64;
        if rest.len() < 4 {
            return (pos, ScanStop::NeedMore);
        }
        if rest[..4] == [0; 4] {
            return (pos, ScanStop::End);
        }
        let rec = match RecordRef::decode(rest, offset as usize) {
            Ok(rec) => rec,
            Err(DecodeError::Truncated { .. }) => return (pos, ScanStop::NeedMore),
            Err(e) => return (pos, ScanStop::Corrupt { offset, reason: e.to_string() }),
        };
        if rec.prev_lsn_in_segment() != *last_lsn {
            let reason = format!("broken backlink: record {} links to {}, previous record is {}", rec.lsn(), rec.prev_lsn_in_segment(), last_lsn);
            return (pos, ScanStop::Corrupt { offset, reason });
        }
        *last_lsn = rec.lsn();
        on_record(rec, offset);
        pos += rec.as_bytes().len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PageId;
    use crate::record::RecordHeader;

    fn log(lsns: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut prev = 0;
        for &l in lsns {
            let h = RecordHeader { lsn: Lsn(l), prev_lsn_in_segment: Lsn(prev), prev_lsn_for_page: Lsn::ZERO, page: PageId(1), cpl: true };
            h.encode(&[l as u8; 10], &mut out);
            prev = l;
        }
        out
    }

    #[test]
    fn header_round_trip_and_corruption() {
        let id = SegmentId { pg: PgId(3), node: NodeId(5) };
        let h = encode_header(id);
        assert_eq!(h.len(), SEGMENT_HEADER_BYTES);
        assert_eq!(decode_header(&h).unwrap(), id);
        let mut bad = h.clone();
        bad[13] ^= 1;
        assert!(matches!(decode_header(&bad), Err(DecodeError::BadCrc { .. })));
        assert!(decode_header(&h[..10]).is_err());
    }

    #[test]
    fn scan_stops_at_zeros_torn_and_broken_chain() {
        let mut buf = log(&[2, 5, 9]);
        let full = buf.len();
        buf.extend([0u8; 64]);
        let mut last = Lsn::ZERO;
        let mut seen = vec![];
        let (n, stop) = scan_records(&buf, 4096, &mut last, |r, off| seen.push((r.lsn(), off)));
        assert_eq!((n, stop, last), (full, ScanStop::End, Lsn(9)));
        assert_eq!(seen[1].1, 4096 + 51);

        // Torn: the last record is cut short.
        let torn = &buf[..full - 3];
        let mut last = Lsn::ZERO;
        let (n, stop) = scan_records(torn, 0, &mut last, |_, _| {});
        assert_eq!((stop, last), (ScanStop::NeedMore, Lsn(5)));
        assert_eq!(n, 102);

        // A valid record whose backlink does not continue the chain.
        let mut broken = log(&[2, 5]);
        broken.extend(log(&[7]));
        let mut last = Lsn::ZERO;
        let (_, stop) = scan_records(&broken, 0, &mut last, |_, _| {});
        assert!(matches!(stop, ScanStop::Corrupt { offset: 102, .. }), "{stop:?}");
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// Arbitrary bytes never panic the header decoder or the scanner, and the
            /// scanner never reports more bytes than it was given.
            #[test]
            fn random_bytes(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = decode_header(&buf);
                let mut last = Lsn::ZERO;
                let (used, _) = scan_records(&buf, 0, &mut last, |_, _| {});
                prop_assert!(used <= buf.len());
            }

            /// A valid log with bytes flipped or cut scans to a prefix of its records,
            /// never past a damaged one.
            #[test]
            fn mutated_logs(flips in proptest::collection::vec((any::<usize>(), 1u8..), 0..4), cut in any::<usize>()) {
                let good = log(&[2, 5, 9, 14, 20]);
                let mut buf = good.clone();
                for (at, x) in &flips {
                    let i = at % buf.len();
                    buf[i] ^= x;
                }
                buf.truncate(cut % (buf.len() + 1));
                let mut last = Lsn::ZERO;
                let mut seen = vec![];
                let (used, _) = scan_records(&buf, 0, &mut last, |r, off| seen.push((r.lsn(), off)));
                prop_assert!(used <= buf.len());
                prop_assert_eq!(&buf[..used], &good[..used], "every accepted byte is original");
                let all = [2, 5, 9, 14, 20];
                prop_assert_eq!(seen.iter().map(|(l, _)| l.0).collect::<Vec<_>>(), all[..seen.len()].to_vec());
            }
        }
    }
}
