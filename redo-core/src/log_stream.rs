//! The storage side of a log stream (`wire::Message::StreamLog`): where the
//! reader's records go on and how many bytes it may still be sent. The node
//! asks `poll` whenever the segment's position or the reader's credit moves,
//! reads what it says, sends it, and reports it with `sent`.

use crate::ids::Lsn;
use crate::segment_log::SegmentLog;
use crate::wire::Truncation;

pub struct LogStream {
    /// The reader holds the segment's records up to here (sent, or had before).
    after: Lsn,
    /// Record bytes granted and sent so far.
    granted: u64,
    sent: u64,
    /// The segment's newest truncation when the stream opened.
    truncation: Option<Truncation>,
}

/// What a stream does now.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamPoll {
    /// Read and send the records in `(after, upto]`, about `bytes_max` (at least one).
    Send { after: Lsn, upto: Lsn, bytes_max: usize },
    /// Nothing new, or no credit: wait for either.
    Wait,
    /// The segment truncated its log since the stream opened: records it sent may be
    /// gone. End the stream (`Behind`); the reader opens a new one.
    Truncated,
}

impl LogStream {
    /// A stream of the records after `after` on a segment whose log is `log` now.
    pub fn new(log: &SegmentLog, after: Lsn, credit: u32) -> Self {
        LogStream { after, granted: credit as u64, sent: 0, truncation: log.last_truncation() }
    }

    /// The reader has granted `total` bytes in all (its first credit included).
    pub fn granted(&mut self, total: u64) {
        self.granted = self.granted.max(total);
    }

    /// What to do, given the segment's log now; `chunk_bytes_max` caps one chunk.
    pub fn poll(&self, log: &SegmentLog, chunk_bytes_max: usize) -> StreamPoll {
        if log.last_truncation() != self.truncation {
            return StreamPoll::Truncated;
        }
        let credit = self.granted.saturating_sub(self.sent) as usize;
        if log.scl() <= self.after || credit == 0 {
            return StreamPoll::Wait;
        }
        StreamPoll::Send { after: self.after, upto: log.scl(), bytes_max: credit.min(chunk_bytes_max) }
    }

    /// Records up to `last_lsn`, `bytes` of them, went out.
    pub fn sent(&mut self, last_lsn: Lsn, bytes: usize) {
        assert!(last_lsn >= self.after, "a stream goes forward");
        self.after = last_lsn;
        self.sent += bytes as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Epoch, NodeId, PageId, PgId, SegmentId};
    use crate::record::{RecordHeader, ValidRecords};
    use crate::segment_log::SegmentLogConfig;
    use bytes::Bytes;

    fn log() -> SegmentLog {
        let config = SegmentLogConfig { hot_bytes_max: 1 << 20, cache_bytes_max: 1 << 20, flush_bytes_max: 1 << 20 };
        SegmentLog::new(SegmentId { pg: PgId(0), node: NodeId(1) }, config)
    }

    fn append(log: &mut SegmentLog, lsns: std::ops::RangeInclusive<u64>) {
        let mut out = Vec::new();
        for l in lsns {
            RecordHeader { lsn: Lsn(l), prev_lsn_in_segment: Lsn(l - 1), prev_lsn_for_page: Lsn::ZERO, page: PageId(l), cpl: true }.encode(&[0; 100], &mut out);
        }
        let records = ValidRecords::validate(Bytes::from(out), 0).unwrap().unwrap();
        log.handle_append(Epoch(0), &records).unwrap();
    }

    #[test]
    fn sends_what_arrives_within_the_credit() {
        let mut log = log();
        let mut s = LogStream::new(&log, Lsn::ZERO, 300);
        assert_eq!(s.poll(&log, 1 << 20), StreamPoll::Wait, "nothing yet");
        append(&mut log, 1..=2);
        assert_eq!(s.poll(&log, 1 << 20), StreamPoll::Send { after: Lsn::ZERO, upto: Lsn(2), bytes_max: 300 });
        s.sent(Lsn(2), 280);
        append(&mut log, 3..=5);
        assert_eq!(s.poll(&log, 1 << 20), StreamPoll::Send { after: Lsn(2), upto: Lsn(5), bytes_max: 20 }, "what is left of the credit");
        s.sent(Lsn(3), 140);
        assert_eq!(s.poll(&log, 1 << 20), StreamPoll::Wait, "credit used up (one record over)");
        s.granted(300 + 1000);
        assert_eq!(s.poll(&log, 100), StreamPoll::Send { after: Lsn(3), upto: Lsn(5), bytes_max: 100 }, "a chunk is capped");
    }

    #[test]
    fn a_truncation_ends_the_stream() {
        let mut log = log();
        append(&mut log, 1..=3);
        let s = LogStream::new(&log, Lsn(1), 1 << 20);
        // A recovery's truncation, recorded once the segment cut its log (as storaged does).
        log.note_truncation(Truncation { epoch: Epoch(1 << 32), above: Lsn(2) });
        assert_eq!(s.poll(&log, 1 << 20), StreamPoll::Truncated);
    }
}
