//! Wire messages between writers, replicas, tools and storage nodes.
//!
//! Every message travels as one frame on a QUIC stream:
//! `len u32 | kind u8 | body`, where `len` counts `kind` and `body`.
//! Appends are pipelined on one long-lived stream and acked in order; a pull
//! is a request/reply on its own stream; a subscription is a stream that the
//! storage node keeps pushing `Notify` frames on; a log stream is one on which
//! it pushes `PullReply` frames as records arrive, within the reader's credit.

use bytes::Bytes;

use crate::codec::{put_u32, put_u64, DecodeError, Reader};
use crate::ids::{Epoch, Lsn, PageId, PgId};
use crate::record::{validate_run, ValidRecords};

pub const FRAME_HEADER_BYTES: usize = 4;
/// Default ceiling on one frame; a storage node may configure a lower one.
pub const FRAME_BYTES_MAX: usize = 16 << 20;
const SUBSCRIBE_PGS_MAX: usize = 4096;
/// Truncations a segment reports: storage keeps no more than this many (the newest).
pub const TRUNCATIONS_MAX: usize = 64;
/// Largest pull asked for at once (`Pull::bytes_max`): replicas, recovery and gossip alike.
pub const PULL_BYTES_MAX: u32 = 1 << 20;
const ERROR_MESSAGE_BYTES_MAX: usize = 4096;

/// Error codes a storage node answers with; clients branch on them.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    /// The request carries an epoch older than the segment's.
    StaleEpoch = 1,
    /// This node does not host a segment of the protection group.
    NotHosted = 2,
    /// The hot log is full; retry after a flush frees memory.
    Busy = 3,
    /// The frame does not decode; the stream is closed.
    Malformed = 4,
    /// The frame exceeds the node's frame limit; the stream is closed.
    TooLarge = 5,
    /// The segment cannot write to disk (full disk or I/O error); it accepts no more appends.
    DiskFailed = 6,
    /// The records contradict the segment's log (a backlink skips records it holds).
    Conflict = 7,
    /// The node is shutting down.
    ShuttingDown = 8,
    /// The segment's SCL is below the requested LSN; ask a node that is caught up.
    Behind = 9,
    /// The segment has no epoch state yet and is learning it from its peers
    /// (`crate::join`): it grants nothing meanwhile; ask again later.
    Joining = 10,
    /// The read is below the GC horizon (`crate::gc`): those page versions may be reclaimed.
    BelowHorizon = 11,
}

impl ErrorCode {
    fn from_u8(v: u8, offset: usize) -> Result<Self, DecodeError> {
        use ErrorCode::*;
        Ok(match v {
            1 => StaleEpoch,
            2 => NotHosted,
            3 => Busy,
            4 => Malformed,
            5 => TooLarge,
            6 => DiskFailed,
            7 => Conflict,
            8 => ShuttingDown,
            9 => Behind,
            10 => Joining,
            11 => BelowHorizon,
            _ => return Err(DecodeError::Invalid { what: "error code", offset, value: v as u64 }),
        })
    }
}

/// SCL and flushed LSN of one segment, as acks and notifications report them.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentPosition {
    pub pg: PgId,
    pub scl: Lsn,
    pub flushed_lsn: Lsn,
}

impl SegmentPosition {
    /// The position a segment reports to writers. When its acks wait for the
    /// disk it vouches only for what is on disk: its SCL counts as no higher
    /// than its flushed LSN, or a writer would count later batches still in
    /// memory towards its quorum.
    pub fn vouched(self, acks_wait_for_disk: bool) -> SegmentPosition {
        match acks_wait_for_disk {
            true => SegmentPosition { scl: self.flushed_lsn, ..self },
            false => self,
        }
    }
}

/// A recovery's decision, recorded by every segment that heard it: the
/// records above `above` written before `epoch` are discarded.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    pub epoch: Epoch,
    pub above: Lsn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Writer → storage: records for one segment, already CRC-checked and in LSN order,
    /// with the writer's GC horizon (`crate::gc`; `Lsn::ZERO` from tools and tests).
    Append {
        epoch: Epoch,
        pg: PgId,
        horizon: Lsn,
        records: ValidRecords,
    },
    /// Storage → writer: the append at the same position on the stream is in memory
    /// (or on disk with `ack = disk`).
    Ack {
        position: SegmentPosition,
        batch_last_lsn: Lsn,
    },
    /// Reader → storage: records with `after < lsn <= upto`, at most about `bytes_max`.
    /// A nonzero `epoch` asks only a segment that recorded that epoch's truncation
    /// (else `Behind`): a segment that missed a recovery may still hold the old
    /// writer's records above the new VDL.
    Pull {
        pg: PgId,
        after: Lsn,
        upto: Lsn,
        bytes_max: u32,
        epoch: Epoch,
    },
    /// Storage → reader: a prefix of the requested range. The segment holds no records in
    /// `(after, last_lsn]` beyond those included (`last_lsn` is `upto` clamped to SCL when
    /// all fit, else the last record included). Ask again from `last_lsn` for more.
    PullReply {
        position: SegmentPosition,
        last_lsn: Lsn,
        records: Bytes,
    },
    /// Subscriber → storage: push me these segments' positions when their flushed LSN
    /// advances, and with `every_scl` when their SCL does too (a replica wants that from a
    /// couple of segments per PG, to pull ahead of VDL; from the rest the flushes suffice).
    Subscribe {
        pgs: Vec<PgId>,
        every_scl: bool,
    },
    /// Storage → subscriber: a segment's SCL or flushed LSN advanced.
    Notify {
        position: SegmentPosition,
    },
    /// Reader → storage: stream me `pg`'s records after `after` as they arrive (a
    /// long-lived pull): the node sends `PullReply` frames, each going on where the
    /// last ended, while it has sent fewer than `credit` bytes (and at least one
    /// record once it may send at all); `Credit` frames on the same stream grant
    /// more. A nonzero `epoch` asks only a segment that recorded that epoch's
    /// truncation, as `Pull`; the node ends the stream with `Behind` when it
    /// truncates its log.
    StreamLog {
        pg: PgId,
        after: Lsn,
        credit: u32,
        epoch: Epoch,
    },
    /// Reader → storage, on a log stream: `bytes` more may be sent.
    Credit {
        bytes: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Writer → storage: report the segment's epoch and position. A nonzero
    /// `epoch` is a claim: granted (and recorded durably) if it is the segment's
    /// epoch or of a newer generation (`Epoch::grant`), else refused with
    /// `StaleEpoch`. With `truncate_above`, the claimant (at its epoch) also has
    /// the segment discard every record above that LSN, durably, before replying;
    /// `history` are the older truncations the claimant knows of: one the segment
    /// missed cuts it lower (its records above that point are an older writer's
    /// discarded tail) and is recorded too.
    Status {
        epoch: Epoch,
        pg: PgId,
        truncate_above: Option<Lsn>,
        history: Vec<Truncation>,
    },
    /// Storage → writer: the segment's epoch (after any claim), position, the
    /// LSN up to which its log is reclaimed (GC), and the truncations it
    /// recorded, oldest first (at most `TRUNCATIONS_MAX`).
    StatusReply {
        epoch: Epoch,
        position: SegmentPosition,
        reclaimed: Lsn,
        truncations: Vec<Truncation>,
    },
    /// Reader → storage: page `page` as of `lsn` (GetPage@LSN). Needs the segment's SCL >= `lsn`.
    /// A nonzero `epoch` asks only a segment that recorded that epoch's truncation (as `Pull`).
    GetPage {
        pg: PgId,
        page: PageId,
        lsn: Lsn,
        epoch: Epoch,
    },
    /// Storage → reader: an encoded `page::PageImage` holding every record of the page up to `lsn`.
    PageReply {
        position: SegmentPosition,
        image: Bytes,
    },
}

const KIND_APPEND: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_PULL: u8 = 3;
const KIND_PULL_REPLY: u8 = 4;
const KIND_SUBSCRIBE: u8 = 5;
const KIND_NOTIFY: u8 = 6;
const KIND_ERROR: u8 = 7;
const KIND_STATUS: u8 = 8;
const KIND_STATUS_REPLY: u8 = 9;
const KIND_GET_PAGE: u8 = 10;
const KIND_PAGE_REPLY: u8 = 11;
const KIND_STREAM_LOG: u8 = 12;
const KIND_CREDIT: u8 = 13;

fn put_position(out: &mut Vec<u8>, p: &SegmentPosition) {
    put_u32(out, p.pg.0);
    put_u64(out, p.scl.0);
    put_u64(out, p.flushed_lsn.0);
}

/// A trailing epoch: absent means 0; an explicit 0 is refused, so that every frame has one encoding.
fn optional_epoch(r: &mut Reader) -> Result<u64, DecodeError> {
    match r.remaining() {
        0 => Ok(0),
        _ => match (r.pos(), r.u64()?) {
            (at, 0) => Err(DecodeError::Invalid { what: "trailing epoch", offset: at, value: 0 }),
            (_, e) => Ok(e),
        },
    }
}

fn put_truncations(out: &mut Vec<u8>, truncations: &[Truncation]) {
    put_u32(out, truncations.len() as u32);
    for t in truncations {
        put_u64(out, t.epoch.0);
        put_u64(out, t.above.0);
    }
}

fn truncations(r: &mut Reader) -> Result<Vec<Truncation>, DecodeError> {
    let n = r.len("truncation count", TRUNCATIONS_MAX)?;
    (0..n).map(|_| Ok(Truncation { epoch: Epoch(r.u64()?), above: Lsn(r.u64()?) })).collect()
}

fn position(r: &mut Reader) -> Result<SegmentPosition, DecodeError> {
    Ok(SegmentPosition { pg: PgId(r.u32()?), scl: Lsn(r.u64()?), flushed_lsn: Lsn(r.u64()?) })
}

impl Message {
    /// Appends the whole frame (length word included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        put_u32(out, 0);
        match self {
            Message::Append { epoch, pg, horizon, records } => {
                out.truncate(start);
                return encode_append(*epoch, *pg, *horizon, records.bytes(), out);
            }
            Message::Ack { position, batch_last_lsn } => {
                out.push(KIND_ACK);
                put_position(out, position);
                put_u64(out, batch_last_lsn.0);
            }
            Message::Pull { pg, after, upto, bytes_max, epoch } => {
                out.push(KIND_PULL);
                put_u32(out, pg.0);
                put_u64(out, after.0);
                put_u64(out, upto.0);
                put_u32(out, *bytes_max);
                if epoch.0 != 0 {
                    put_u64(out, epoch.0);
                }
            }
            Message::PullReply { position, last_lsn, records } => {
                out.push(KIND_PULL_REPLY);
                put_position(out, position);
                put_u64(out, last_lsn.0);
                out.extend_from_slice(records);
            }
            Message::Subscribe { pgs, every_scl } => {
                out.push(KIND_SUBSCRIBE);
                put_u32(out, pgs.len() as u32);
                for pg in pgs {
                    put_u32(out, pg.0);
                }
                out.push(*every_scl as u8);
            }
            Message::Notify { position } => {
                out.push(KIND_NOTIFY);
                put_position(out, position);
            }
            Message::Error { code, message } => {
                out.push(KIND_ERROR);
                out.push(*code as u8);
                let mut end = message.len().min(ERROR_MESSAGE_BYTES_MAX);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                let m = &message.as_bytes()[..end];
                put_u32(out, m.len() as u32);
                out.extend_from_slice(m);
            }
            Message::Status { epoch, pg, truncate_above, history } => {
                out.push(KIND_STATUS);
                put_u64(out, epoch.0);
                put_u32(out, pg.0);
                if let Some(lsn) = truncate_above {
                    put_u64(out, lsn.0);
                    if !history.is_empty() {
                        put_truncations(out, history);
                    }
                }
            }
            Message::StatusReply { epoch, position, reclaimed, truncations } => {
                out.push(KIND_STATUS_REPLY);
                put_u64(out, epoch.0);
                put_position(out, position);
                put_u64(out, reclaimed.0);
                put_truncations(out, truncations);
            }
            Message::GetPage { pg, page, lsn, epoch } => {
                out.push(KIND_GET_PAGE);
                put_u32(out, pg.0);
                put_u64(out, page.0);
                put_u64(out, lsn.0);
                if epoch.0 != 0 {
                    put_u64(out, epoch.0);
                }
            }
            Message::PageReply { position, image } => {
                out.push(KIND_PAGE_REPLY);
                put_position(out, position);
                out.extend_from_slice(image);
            }
            Message::StreamLog { pg, after, credit, epoch } => {
                out.push(KIND_STREAM_LOG);
                put_u32(out, pg.0);
                put_u64(out, after.0);
                put_u32(out, *credit);
                if epoch.0 != 0 {
                    put_u64(out, epoch.0);
                }
            }
            Message::Credit { bytes } => {
                out.push(KIND_CREDIT);
                put_u32(out, *bytes);
            }
        }
        let len = (out.len() - start - FRAME_HEADER_BYTES) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    pub fn to_frame(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes a frame body (`kind | body`, without the length word). Record
    /// payloads are validated (CRC, order) and kept as slices of `body`.
    pub fn decode(body: Bytes) -> Result<Message, DecodeError> {
        let mut r = Reader::new(&body);
        let kind = r.u8()?;
        let msg = match kind {
            KIND_APPEND => {
                let epoch = Epoch(r.u64()?);
                let pg = PgId(r.u32()?);
                let horizon = Lsn(r.u64()?);
                let at = r.pos();
                let records = ValidRecords::validate(body.slice(at..), at)?.ok_or(DecodeError::Invalid { what: "empty append", offset: at, value: 0 })?;
                r.bytes(r.remaining())?;
                Message::Append { epoch, pg, horizon, records }
            }
            KIND_ACK => Message::Ack { position: position(&mut r)?, batch_last_lsn: Lsn(r.u64()?) },
            KIND_PULL => {
                let (pg, after, upto, bytes_max) = (PgId(r.u32()?), Lsn(r.u64()?), Lsn(r.u64()?), r.u32()?);
                let epoch = optional_epoch(&mut r)?;
                Message::Pull { pg, after, upto, bytes_max, epoch: Epoch(epoch) }
            }
            KIND_PULL_REPLY => {
                let position = position(&mut r)?;
                let last_lsn = Lsn(r.u64()?);
                let at = r.pos();
                validate_run(&body[at..], at)?;
                r.bytes(r.remaining())?;
                Message::PullReply { position, last_lsn, records: body.slice(at..) }
            }
            KIND_SUBSCRIBE => {
                let n = r.u32()? as usize;
                if n > SUBSCRIBE_PGS_MAX || n * 4 > r.remaining() {
                    return Err(DecodeError::Invalid { what: "subscribe count", offset: 1, value: n as u64 });
                }
                let mut pgs = Vec::with_capacity(n);
                for _ in 0..n {
                    pgs.push(PgId(r.u32()?));
                }
                let at = r.pos();
                let every_scl = match r.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(DecodeError::Invalid { what: "subscribe every_scl flag", offset: at, value: v as u64 }),
                };
                Message::Subscribe { pgs, every_scl }
            }
            KIND_NOTIFY => Message::Notify { position: position(&mut r)? },
            KIND_ERROR => {
                let code = ErrorCode::from_u8(r.u8()?, r.pos())?;
                let n = r.len("error message length", ERROR_MESSAGE_BYTES_MAX)?;
                let at = r.pos();
                let message =
                    String::from_utf8(r.bytes(n)?.to_vec()).map_err(|_| DecodeError::Invalid { what: "error message utf-8", offset: at, value: n as u64 })?;
                Message::Error { code, message }
            }
            KIND_STATUS => {
                let (epoch, pg) = (Epoch(r.u64()?), PgId(r.u32()?));
                let truncate_above = if r.remaining() > 0 { Some(Lsn(r.u64()?)) } else { None };
                // Absent means none; an explicit empty list is refused (one encoding per frame).
                let history = match r.remaining() {
                    0 => Vec::new(),
                    _ => match (r.pos(), truncations(&mut r)?) {
                        (at, h) if h.is_empty() => return Err(DecodeError::Invalid { what: "empty truncation history", offset: at, value: 0 }),
                        (_, h) => h,
                    },
                };
                Message::Status { epoch, pg, truncate_above, history }
            }
            KIND_STATUS_REPLY => {
                let (epoch, position, reclaimed) = (Epoch(r.u64()?), position(&mut r)?, Lsn(r.u64()?));
                Message::StatusReply { epoch, position, reclaimed, truncations: truncations(&mut r)? }
            }
            KIND_GET_PAGE => {
                let (pg, page, lsn) = (PgId(r.u32()?), PageId(r.u64()?), Lsn(r.u64()?));
                Message::GetPage { pg, page, lsn, epoch: Epoch(optional_epoch(&mut r)?) }
            }
            KIND_PAGE_REPLY => {
                let position = position(&mut r)?;
                let at = r.pos();
                r.bytes(r.remaining())?;
                // The image is decoded (and checked) by the reader that asked for it.
                Message::PageReply { position, image: body.slice(at..) }
            }
            KIND_STREAM_LOG => {
                let (pg, after, credit) = (PgId(r.u32()?), Lsn(r.u64()?), r.u32()?);
                Message::StreamLog { pg, after, credit, epoch: Epoch(optional_epoch(&mut r)?) }
            }
            KIND_CREDIT => Message::Credit { bytes: r.u32()? },
            other => return Err(DecodeError::Invalid { what: "message kind", offset: 0, value: other as u64 }),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Bytes of an Append frame before its records: length, kind, epoch, pg.
pub const APPEND_HEADER_BYTES: usize = FRAME_HEADER_BYTES + 1 + 8 + 4 + 8;

/// Appends an Append frame for already-encoded `records` (callers that hold
/// raw record bytes need not build a `Message`).
pub fn encode_append(epoch: Epoch, pg: PgId, horizon: Lsn, records: &[u8], out: &mut Vec<u8>) {
    put_u32(out, (APPEND_HEADER_BYTES - FRAME_HEADER_BYTES + records.len()) as u32);
    out.push(KIND_APPEND);
    put_u64(out, epoch.0);
    put_u32(out, pg.0);
    put_u64(out, horizon.0);
    out.extend_from_slice(records);
}

/// Reads the length word of a frame header, checking it against `frame_bytes_max`.
pub fn frame_len(header: [u8; FRAME_HEADER_BYTES], frame_bytes_max: usize) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes(header) as usize;
    if len == 0 || len > frame_bytes_max {
        return Err(DecodeError::Invalid { what: "frame length", offset: 0, value: len as u64 });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordHeader;
    use proptest::prelude::*;

    fn records(lsns: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut prev = 0;
        for &l in lsns {
            RecordHeader { lsn: Lsn(l), prev_lsn_in_segment: Lsn(prev), prev_lsn_for_page: Lsn(prev), page: PageId(l), cpl: l % 3 == 0 }
                .encode(&l.to_le_bytes(), &mut out);
            prev = l;
        }
        out
    }

    fn samples() -> Vec<Message> {
        let pos = SegmentPosition { pg: PgId(2), scl: Lsn(10), flushed_lsn: Lsn(7) };
        let recs = Bytes::from(records(&[3, 4, 9]));
        vec![
            Message::Append { epoch: Epoch(4), pg: PgId(2), horizon: Lsn(3), records: ValidRecords::validate(recs.clone(), 0).unwrap().unwrap() },
            Message::Ack { position: pos, batch_last_lsn: Lsn(9) },
            Message::Pull { pg: PgId(2), after: Lsn(3), upto: Lsn(9), bytes_max: 1 << 20, epoch: Epoch(0) },
            Message::Pull { pg: PgId(2), after: Lsn(3), upto: Lsn(9), bytes_max: 1 << 20, epoch: Epoch(7 << 32) },
            Message::PullReply { position: pos, last_lsn: Lsn(9), records: recs },
            Message::PullReply { position: pos, last_lsn: Lsn(3), records: Bytes::new() },
            Message::Subscribe { pgs: vec![PgId(1), PgId(2)], every_scl: true },
            Message::Subscribe { pgs: vec![PgId(3)], every_scl: false },
            Message::Notify { position: pos },
            Message::Error { code: ErrorCode::StaleEpoch, message: "epoch e3 < e4".into() },
            Message::Error { code: ErrorCode::Joining, message: "joining".into() },
            Message::Error { code: ErrorCode::BelowHorizon, message: "below".into() },
            Message::Status { epoch: Epoch(5), pg: PgId(2), truncate_above: None, history: vec![] },
            Message::Status { epoch: Epoch(5), pg: PgId(2), truncate_above: Some(Lsn(8)), history: vec![] },
            Message::Status { epoch: Epoch(5), pg: PgId(2), truncate_above: Some(Lsn(8)), history: vec![Truncation { epoch: Epoch(3), above: Lsn(6) }] },
            Message::StatusReply { epoch: Epoch(5), position: pos, reclaimed: Lsn::ZERO, truncations: vec![] },
            Message::StatusReply {
                epoch: Epoch(5),
                position: pos,
                reclaimed: Lsn(3),
                truncations: vec![Truncation { epoch: Epoch(3), above: Lsn(4) }, Truncation { epoch: Epoch(5), above: Lsn(9) }],
            },
            Message::GetPage { pg: PgId(2), page: PageId(77), lsn: Lsn(9), epoch: Epoch(0) },
            Message::GetPage { pg: PgId(2), page: PageId(77), lsn: Lsn(9), epoch: Epoch(5 << 32) },
            Message::PageReply { position: pos, image: Bytes::from_static(b"image") },
            Message::StreamLog { pg: PgId(2), after: Lsn(3), credit: 1 << 20, epoch: Epoch(0) },
            Message::StreamLog { pg: PgId(2), after: Lsn(3), credit: 1 << 20, epoch: Epoch(7 << 32) },
            Message::Credit { bytes: 4096 },
        ]
    }

    fn decode_frame(frame: &[u8]) -> Result<Message, DecodeError> {
        let len = frame_len(frame[..4].try_into().unwrap(), FRAME_BYTES_MAX)?;
        if frame.len() != 4 + len {
            return Err(DecodeError::Trailing { trailing: frame.len().abs_diff(4 + len) });
        }
        Message::decode(Bytes::copy_from_slice(&frame[4..]))
    }

    #[test]
    fn round_trips() {
        for m in samples() {
            assert_eq!(decode_frame(&m.to_frame()).unwrap(), m);
        }
    }

    /// Message kinds, one index each: exhaustive, so a new kind does not compile until it has
    /// an index here (and `KINDS` grows, or `every_kind_is_sampled` indexes out of bounds).
    const KINDS: usize = 13;
    fn kind(m: &Message) -> usize {
        match m {
            Message::Append { .. } => 0,
            Message::Ack { .. } => 1,
            Message::Pull { .. } => 2,
            Message::PullReply { .. } => 3,
            Message::Subscribe { .. } => 4,
            Message::Notify { .. } => 5,
            Message::StreamLog { .. } => 6,
            Message::Credit { .. } => 7,
            Message::Error { .. } => 8,
            Message::Status { .. } => 9,
            Message::StatusReply { .. } => 10,
            Message::GetPage { .. } => 11,
            Message::PageReply { .. } => 12,
        }
    }

    /// `samples` (which `mutated_frames` picks from, all of them) has every kind of message.
    #[test]
    fn every_kind_is_sampled() {
        let mut sampled = [false; KINDS];
        for m in samples() {
            sampled[kind(&m)] = true;
        }
        assert_eq!(sampled.iter().position(|s| !s), None, "a message kind without a sample");
    }

    #[test]
    fn empty_append_is_refused() {
        let mut frame = Vec::new();
        encode_append(Epoch(1), PgId(0), Lsn::ZERO, &[], &mut frame);
        assert!(decode_frame(&frame).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn random_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode(Bytes::from(body));
        }

        /// Mutated valid frames never panic, and any that still decode re-encode to the same bytes.
        #[test]
        fn mutated_frames(which in any::<prop::sample::Index>(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
            let samples = samples();
            let mut frame = samples[which.index(samples.len())].to_frame();
            for (at, x) in flips {
                let i = at % frame.len();
                frame[i] ^= x;
            }
            if cut % 4 == 0 {
                frame.truncate(cut % (frame.len() + 1));
            }
            if frame.len() >= 4 {
                if let Ok(m) = Message::decode(Bytes::copy_from_slice(&frame[4..])) {
                    prop_assert_eq!(&m.to_frame()[4..], &frame[4..]);
                }
            }
        }
    }
}
