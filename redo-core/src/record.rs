//! Redo record format, shared by the wire (batches) and the segment files, so
//! a storage node stores exactly the bytes it received.
//!
//! ```text
//! offset  size  field
//!      0     4  len: total record bytes, header + payload + crc
//!      4     8  lsn
//!     12     8  prev_lsn_in_segment   backlink: hole detection
//!     20     8  prev_lsn_for_page     page chain: materialisation
//!     28     8  page
//!     36     1  flags                 bit 0: CPL (last record of a mini-transaction)
//!     37     n  payload               the page operation
//!  len-4     4  crc32c of bytes [0, len-4)
//! ```

use bytes::Bytes;

use crate::codec::{put_u32, put_u64, DecodeError, Reader};
use crate::ids::{Lsn, PageId};

pub const RECORD_HEADER_BYTES: usize = 37;
pub const RECORD_OVERHEAD_BYTES: usize = RECORD_HEADER_BYTES + 4;
/// Largest record accepted anywhere: a page operation is far smaller.
pub const RECORD_BYTES_MAX: usize = 1 << 20;

const FLAG_CPL: u8 = 1;

/// Fields of a record, for building one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub lsn: Lsn,
    pub prev_lsn_in_segment: Lsn,
    pub prev_lsn_for_page: Lsn,
    pub page: PageId,
    /// Consistency point: the record closes a mini-transaction.
    pub cpl: bool,
}

impl RecordHeader {
    /// Appends the encoded record to `out`.
    pub fn encode(&self, payload: &[u8], out: &mut Vec<u8>) {
        let len = RECORD_OVERHEAD_BYTES + payload.len();
        assert!(len <= RECORD_BYTES_MAX, "record of {len} bytes exceeds RECORD_BYTES_MAX");
        assert!(self.lsn > self.prev_lsn_in_segment && self.lsn > self.prev_lsn_for_page);
        let start = out.len();
        put_u32(out, len as u32);
        put_u64(out, self.lsn.0);
        put_u64(out, self.prev_lsn_in_segment.0);
        put_u64(out, self.prev_lsn_for_page.0);
        put_u64(out, self.page.0);
        out.push(if self.cpl { FLAG_CPL } else { 0 });
        out.extend_from_slice(payload);
        let crc = crc32c::crc32c(&out[start..]);
        put_u32(out, crc);
    }
}

/// A decoded, CRC-verified record borrowing its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    bytes: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// Decodes the record at the start of `buf`; returns it and its length.
    /// `offset` only labels errors (the position of `buf` in its file or frame).
    pub fn decode(buf: &'a [u8], offset: usize) -> Result<RecordRef<'a>, DecodeError> {
        let mut r = Reader::new(buf);
        let len = r.u32()? as usize;
        if !(RECORD_OVERHEAD_BYTES..=RECORD_BYTES_MAX).contains(&len) {
            return Err(DecodeError::Invalid { what: "record length", offset, value: len as u64 });
        }
        if buf.len() < len {
            return Err(DecodeError::Truncated { offset, needed: len, available: buf.len() });
        }
        let bytes = &buf[..len];
        let stored = u32::from_le_bytes(bytes[len - 4..].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(&bytes[..len - 4]);
        if stored != computed {
            return Err(DecodeError::BadCrc { offset, stored, computed });
        }
        let rec = RecordRef { bytes };
        let h = rec.header();
        let bad = |what, value| Err(DecodeError::Invalid { what, offset, value });
        if h.lsn == Lsn::ZERO {
            return bad("record lsn", 0);
        }
        if h.prev_lsn_in_segment >= h.lsn {
            return bad("prev_lsn_in_segment", h.prev_lsn_in_segment.0);
        }
        if h.prev_lsn_for_page >= h.lsn {
            return bad("prev_lsn_for_page", h.prev_lsn_for_page.0);
        }
        if bytes[36] & !FLAG_CPL != 0 {
            return bad("record flags", bytes[36] as u64);
        }
        Ok(rec)
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().expect("8 bytes"))
    }

    pub fn lsn(&self) -> Lsn {
        Lsn(self.u64_at(4))
    }

    pub fn prev_lsn_in_segment(&self) -> Lsn {
        Lsn(self.u64_at(12))
    }

    pub fn header(&self) -> RecordHeader {
        RecordHeader {
            lsn: self.lsn(),
            prev_lsn_in_segment: self.prev_lsn_in_segment(),
            prev_lsn_for_page: Lsn(self.u64_at(20)),
            page: PageId(self.u64_at(28)),
            cpl: self.bytes[36] & FLAG_CPL != 0,
        }
    }

    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[RECORD_HEADER_BYTES..self.bytes.len() - 4]
    }

    /// The whole encoded record, CRC included.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// Iterates the records concatenated in `buf`, stopping at the first error.
pub struct Records<'a> {
    buf: &'a [u8],
    pos: usize,
    base_offset: usize,
}

impl<'a> Records<'a> {
    pub fn new(buf: &'a [u8], base_offset: usize) -> Self {
        Records { buf, pos: 0, base_offset }
    }

    /// Bytes consumed by the records yielded so far.
    pub fn consumed(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<RecordRef<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let r = RecordRef::decode(&self.buf[self.pos..], self.base_offset + self.pos);
        match r {
            Ok(rec) => self.pos += rec.as_bytes().len(),
            Err(_) => self.pos = self.buf.len(),
        }
        Some(r)
    }
}

/// Summary of a validated run of records: what a batch or pull reply carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRun {
    pub count: u32,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
}

/// A non-empty run of records that passed `validate_run`: whole, CRC-valid,
/// in strictly increasing LSN order. Holding one is the proof, so consumers
/// walk it without checking the CRCs again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidRecords {
    bytes: Bytes,
    run: RecordRun,
}

impl ValidRecords {
    /// Validates `bytes`; `Ok(None)` when there are no records.
    pub fn validate(bytes: Bytes, base_offset: usize) -> Result<Option<Self>, DecodeError> {
        Ok(validate_run(&bytes, base_offset)?.map(|run| ValidRecords { bytes, run }))
    }

    pub fn run(&self) -> RecordRun {
        self.run
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Each record with its byte range in `bytes()`.
    pub fn iter(&self) -> TrustedRecords<'_> {
        TrustedRecords::new(&self.bytes)
    }
}

/// Walks records already known to be valid (a `ValidRecords` run, or bytes a
/// segment log holds), reading only the length words: no CRC work.
pub struct TrustedRecords<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> TrustedRecords<'a> {
    /// `buf` must consist of whole records that passed `validate_run`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        TrustedRecords { buf, pos: 0 }
    }
}

impl<'a> Iterator for TrustedRecords<'a> {
    type Item = (RecordRef<'a>, std::ops::Range<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.buf.get(self.pos..).filter(|r| !r.is_empty())?;
        let len = u32::from_le_bytes(rest[..4].try_into().expect("validated length word")) as usize;
        let range = self.pos..self.pos + len;
        self.pos += len;
        Some((RecordRef { bytes: &rest[..len] }, range))
    }
}

/// Checks that `buf` holds only whole, CRC-valid records in strictly
/// increasing LSN order.
pub fn validate_run(buf: &[u8], base_offset: usize) -> Result<Option<RecordRun>, DecodeError> {
    let mut run: Option<RecordRun> = None;
    let mut records = Records::new(buf, base_offset);
    while let Some(rec) = records.next() {
        let rec = rec?;
        let lsn = rec.lsn();
        run = Some(match run {
            None => RecordRun { count: 1, first_lsn: lsn, last_lsn: lsn },
            Some(r) if lsn > r.last_lsn => RecordRun { count: r.count + 1, last_lsn: lsn, ..r },
            Some(_) => {
                let offset = base_offset + records.consumed() - rec.as_bytes().len();
                return Err(DecodeError::Invalid { what: "non-increasing lsn", offset, value: lsn.0 });
            }
        });
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(lsn: u64, prev: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        RecordHeader { lsn: Lsn(lsn), prev_lsn_in_segment: Lsn(prev), prev_lsn_for_page: Lsn(prev), page: PageId(lsn % 7), cpl: lsn.is_multiple_of(2) }
            .encode(payload, &mut out);
        out
    }

    #[test]
    fn round_trip() {
        let bytes = sample(42, 17, b"put k=v");
        let rec = RecordRef::decode(&bytes, 0).unwrap();
        assert_eq!(rec.as_bytes().len(), bytes.len());
        let h = rec.header();
        assert_eq!((h.lsn, h.prev_lsn_in_segment, h.page, h.cpl), (Lsn(42), Lsn(17), PageId(0), true));
        assert_eq!(rec.payload(), b"put k=v");
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = sample(9, 3, b"payload");
        for bit in 0..bytes.len() * 8 {
            let mut m = bytes.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            if let Ok(rec) = RecordRef::decode(&m, 0) {
                panic!("bit {bit} flipped yet decoded {:?}", rec.header());
            }
        }
    }

    #[test]
    fn run_rejects_disorder() {
        let mut buf = sample(5, 1, b"a");
        buf.extend(sample(4, 1, b"b"));
        assert!(matches!(validate_run(&buf, 0), Err(DecodeError::Invalid { what: "non-increasing lsn", .. })));
        let mut ok = sample(5, 1, b"a");
        ok.extend(sample(8, 5, b"b"));
        assert_eq!(validate_run(&ok, 0).unwrap(), Some(RecordRun { count: 2, first_lsn: Lsn(5), last_lsn: Lsn(8) }));
    }
}
