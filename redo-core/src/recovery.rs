//! Recovery after a writer is gone: from the claim answers of the segments
//! (each PG's SCLs, epochs and recorded truncations) and the records above a
//! point known complete, decide the new volume's VDL, the last record of each
//! PG at or below it (the next record's backlink), and the records a lagging
//! segment must be sent again.
//!
//! Call order: `plan(answers, known_complete)`; pull each PG's records in
//! `(plan.from[pg], plan.complete[pg]]` from `plan.source[pg]`; `decide(plan,
//! pulled)`; have storage truncate above the returned VDL at the new epoch.
//!
//! Why it holds: an acknowledged commit's records are on a write quorum (4 of
//! 6) of every PG they touch, and the claim is answered by at least a read
//! quorum (3 of 6), which overlaps every write quorum, so the highest SCL
//! among the answers covers every acknowledged record. LSNs are allocated densely, one per record, so "every record up to
//! L exists" is "every LSN up to L is held by the PG it belongs to": the
//! volume is complete (VCL) up to the first LSN above the known-complete point
//! that no PG's chain holds. VDL is the highest CPL at or below VCL, so an
//! unacknowledged transaction is kept whole or dropped whole.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::ids::{Epoch, Lsn};
use crate::record::TrustedRecords;
use crate::wire::Truncation;

/// The most LSNs a lagging segment may miss for recovery to read its records
/// and have the new writer resend them; a segment further behind is repaired
/// by gossip.
pub const RESEND_LSNS_MAX: u64 = 1 << 16;

/// One segment's answer to the claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The segment's index in its PG.
    pub segment: usize,
    /// The epoch its log is as of: that of its newest truncation (not the epoch
    /// just claimed on it), `Epoch(0)` if it recorded none.
    pub epoch: Epoch,
    pub scl: Lsn,
    /// Its log up to here is reclaimed (GC): the records there are committed
    /// (at or below the GC horizon, itself at or below a writer's VDL) and gone.
    pub reclaimed: Lsn,
    pub truncations: Vec<Truncation>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Per PG: the highest SCL any answer vouches for (every record of the PG up to it exists).
    pub complete: Vec<Lsn>,
    /// Per PG: the segment to pull from (the one reporting `complete`).
    pub source: Vec<usize>,
    /// Per PG: pull the source's records in `(from, upto]` (none when equal): from
    /// below `start` far enough to find a CPL, and to resend what lagging segments lack.
    pub from: Vec<Lsn>,
    /// Per PG: the source's own SCL. Above `complete` when a truncation it did not
    /// hear of clamps it: its records up to there are pulled all the same, for the
    /// backlink of the first one above `from`, but do not count.
    pub upto: Vec<Lsn>,
    /// A CPL every PG is known complete up to: the VDL is at least this.
    pub known_cpl: Lsn,
    /// Every LSN up to here is held by its PG (the lowest `complete`, or `known_cpl`).
    pub start: Lsn,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecoveryError {
    #[error("pg{pg}: {answered} segments answered the claim, a read quorum is {quorum}")]
    NoQuorum { pg: usize, answered: usize, quorum: usize },
}

/// The SCL a segment vouches for: records written before a truncation it did
/// not hear of are not part of the volume, so its chain counts only up to the
/// lowest truncation recorded (by any segment) at an epoch newer than its own.
pub fn effective_scl(answer: &Answer, truncations: &[Truncation]) -> Lsn {
    truncations.iter().filter(|t| t.epoch > answer.epoch).map(|t| t.above).fold(answer.scl, Lsn::min)
}

/// Decides what to pull. `answers[pg]` are the segments that granted the claim
/// (at least a read quorum of each PG); `known_cpl` is a CPL every PG is known
/// complete up to (the VDL a replica last heard from the writer, or `Lsn::ZERO`).
/// Reclaimed logs raise it: every record up to a segment's reclaimed LSN is
/// committed, and recovery pulls nothing from below it.
/// `quorum` is the answers each PG needs: `READ_QUORUM` (less only in the simulator's injected bug).
pub fn plan(answers: &[Vec<Answer>], known_cpl: Lsn, quorum: usize) -> Result<Plan, RecoveryError> {
    let known_cpl = answers.iter().flatten().map(|a| a.reclaimed).fold(known_cpl, Lsn::max);
    let truncations: Vec<Truncation> = answers.iter().flatten().flat_map(|a| a.truncations.iter().copied()).collect();
    let (mut complete, mut source, mut upto, mut lowest) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (pg, answers) in answers.iter().enumerate() {
        if answers.len() < quorum {
            return Err(RecoveryError::NoQuorum { pg, answered: answers.len(), quorum });
        }
        let best = answers.iter().max_by_key(|a| (effective_scl(a, &truncations), std::cmp::Reverse(a.segment))).expect("a quorum answered");
        complete.push(effective_scl(best, &truncations));
        source.push(best.segment);
        upto.push(best.scl);
        lowest.push(answers.iter().map(|a| effective_scl(a, &truncations)).min().expect("a quorum answered"));
    }
    // An LSN at or below the lowest `complete` is held by its PG, whichever it is.
    let floor = complete.iter().copied().min().unwrap_or_default();
    let start = floor.max(known_cpl);
    // When the floor is the start it may be mid-transaction: pull one transaction's
    // worth below it (a transaction spans at most TXN_OPS_MAX consecutive LSNs), so
    // that the records show a CPL at or below it.
    let window = if floor > known_cpl { Lsn(floor.0.saturating_sub(crate::api::TXN_OPS_MAX as u64)).max(known_cpl) } else { known_cpl };
    // Also what the answering segments that lag lack, unless that is far more than
    // recovery should wait for (those are filled by gossip from their peers).
    // Never from below what the source reclaimed (a lagging segment that needs more is rebuilt).
    let from = (0..answers.len())
        .map(|pg| {
            let (c, low) = (complete[pg], lowest[pg]);
            let reclaimed = answers[pg].iter().find(|a| a.segment == source[pg]).map_or(Lsn::ZERO, |a| a.reclaimed);
            if c.0 - low.0 <= RESEND_LSNS_MAX { window.min(low) } else { window }.min(c).max(reclaimed.min(c))
        })
        .collect();
    Ok(Plan { complete, source, from, upto, known_cpl, start })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub vcl: Lsn,
    /// The new volume's VDL: truncate everything above it.
    pub vdl: Lsn,
    /// Per PG: its last record at or below VDL (the backlink of its next record).
    pub pg_last: Vec<Lsn>,
    /// Per PG: `plan.from[pg]` and the encoded records in `(plan.from[pg], vdl]`,
    /// to send to segments that lack them.
    pub tails: Vec<(Lsn, Vec<Bytes>)>,
}

/// Decides VDL from the records pulled: `pulled[pg]` are runs of encoded,
/// CRC-checked records of PG `pg`, the source segment's whole chain in
/// `(plan.from[pg], plan.upto[pg]]` in LSN order (the shell checks the pull
/// reached `upto`).
pub fn decide(plan: &Plan, pulled: &[Vec<Bytes>]) -> Decision {
    // Every counted record's LSN, and whether it is a CPL.
    let mut held: BTreeMap<Lsn, bool> = BTreeMap::new();
    // Per PG: (lsn, prev_lsn_in_segment) of its pulled records.
    let mut per_pg: Vec<Vec<(Lsn, Lsn)>> = Vec::new();
    for (pg, runs) in pulled.iter().enumerate() {
        let mut recs = Vec::new();
        for (rec, _) in runs.iter().flat_map(|r| TrustedRecords::new(r)) {
            if rec.lsn() <= plan.complete[pg] {
                held.insert(rec.lsn(), rec.header().cpl);
            }
            recs.push((rec.lsn(), rec.prev_lsn_in_segment()));
        }
        per_pg.push(recs);
    }
    // VCL: the LSN before the first one above `start` that no PG holds.
    let mut vcl = plan.start;
    for &lsn in held.range(Lsn(plan.start.0 + 1)..).map(|(l, _)| l) {
        if lsn.0 != vcl.0 + 1 {
            break;
        }
        vcl = lsn;
    }
    let vdl = held.range(..=vcl).rev().find(|(_, &cpl)| cpl).map_or(plan.known_cpl, |(&l, _)| l).max(plan.known_cpl);
    let pg_last = per_pg
        .iter()
        .enumerate()
        .map(|(pg, recs)| match recs.iter().rev().find(|r| r.0 <= vdl) {
            Some(r) => r.0,
            // None pulled at or below VDL: the first pulled links back to the last below,
            // and with none pulled the PG ends at its source's SCL (at or below the window).
            None => recs.first().map_or(plan.upto[pg], |r| r.1),
        })
        .collect();
    let tails = pulled.iter().enumerate().map(|(pg, runs)| (plan.from[pg], keep_upto(runs, vdl))).collect();
    Decision { vcl, vdl, pg_last, tails }
}

/// The records of `runs` at or below `upto`, as runs.
pub(crate) fn keep_upto(runs: &[Bytes], upto: Lsn) -> Vec<Bytes> {
    let mut out = Vec::new();
    for run in runs {
        let mut end = 0;
        for (rec, range) in TrustedRecords::new(run) {
            if rec.lsn() > upto {
                break;
            }
            end = range.end;
        }
        if end > 0 {
            out.push(run.slice(..end));
        }
        if end < run.len() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PageId;
    use crate::quorum::READ_QUORUM;
    use crate::record::RecordHeader;

    /// A log of two PGs: `txns` are (pg of each record); every transaction's last record is its CPL.
    struct Log {
        /// (lsn, pg, cpl)
        recs: Vec<(u64, usize, bool)>,
    }

    impl Log {
        fn new(txns: &[&[usize]]) -> Log {
            let mut recs = Vec::new();
            for t in txns {
                for (i, &pg) in t.iter().enumerate() {
                    recs.push((recs.len() as u64 + 1, pg, i + 1 == t.len()));
                }
            }
            Log { recs }
        }

        /// PG `pg`'s records in `(after, upto]`, encoded with their backlinks.
        fn pull(&self, pg: usize, after: Lsn, upto: Lsn) -> Vec<Bytes> {
            let (mut out, mut prev) = (Vec::new(), 0);
            for &(lsn, p, cpl) in &self.recs {
                if p != pg {
                    continue;
                }
                if lsn > after.0 && lsn <= upto.0 {
                    let h = RecordHeader { lsn: Lsn(lsn), prev_lsn_in_segment: Lsn(prev), prev_lsn_for_page: Lsn::ZERO, page: PageId(pg as u64), cpl };
                    h.encode(b"v", &mut out);
                }
                prev = lsn;
            }
            vec![Bytes::from(out)]
        }

        /// The last record of `pg` at or below `lsn` (what a segment's SCL reads as).
        fn last(&self, pg: usize, lsn: u64) -> Lsn {
            Lsn(self.recs.iter().filter(|r| r.1 == pg && r.0 <= lsn).map(|r| r.0).max().unwrap_or(0))
        }
    }

    fn answers(scls: &[&[u64]]) -> Vec<Vec<Answer>> {
        scls.iter()
            .map(|pg| {
                pg.iter()
                    .enumerate()
                    .map(|(segment, &scl)| Answer { segment, epoch: Epoch(1 << 32), scl: Lsn(scl), reclaimed: Lsn::ZERO, truncations: vec![] })
                    .collect()
            })
            .collect()
    }

    fn recover(log: &Log, answers: &[Vec<Answer>], known: u64) -> Decision {
        let plan = plan(answers, Lsn(known), READ_QUORUM).unwrap();
        let pulled: Vec<Vec<Bytes>> = (0..answers.len()).map(|pg| log.pull(pg, plan.from[pg], plan.upto[pg])).collect();
        decide(&plan, &pulled)
    }

    #[test]
    fn vdl_is_the_last_whole_transaction_before_the_first_missing_lsn() {
        // txn a: 1(pg0) 2(pg1)*; txn b: 3(pg0) 4(pg1) 5(pg0)*; txn c: 6(pg1) 7(pg0)*
        let log = Log::new(&[&[0, 1], &[0, 1, 0], &[1, 0]]);
        // pg0 holds up to 7 on one segment; pg1's record 6 reached no answering segment.
        let a = answers(&[&[7, 5, 5, 3], &[4, 4, 4, 2]]);
        let d = recover(&log, &a, 0);
        assert_eq!((d.vcl, d.vdl), (Lsn(5), Lsn(5)), "LSN 6 is missing: txn c is dropped whole");
        assert_eq!(d.pg_last, vec![Lsn(5), Lsn(4)]);
        // Tails hold each PG's records up to VDL only.
        let tail_lsns: Vec<u64> = TrustedRecords::new(&d.tails[0].1[0]).map(|(r, _)| r.lsn().0).collect();
        assert_eq!(*tail_lsns.last().unwrap(), 5);
        // With 6 held, txn c is whole and kept.
        let a = answers(&[&[7, 5, 5, 3], &[6, 4, 4, 2]]);
        assert_eq!(recover(&log, &a, 0).vdl, Lsn(7));
    }

    #[test]
    fn half_a_transaction_is_dropped() {
        // txn a: 1 2*; txn b: 3(pg0) 4(pg1) 5(pg0)*: pg0's last record 5 reached no answering segment.
        let log = Log::new(&[&[0, 1], &[0, 1, 0]]);
        let a = answers(&[&[3, 3, 3, 1], &[4, 4, 2, 2]]);
        let d = recover(&log, &a, 0);
        assert_eq!((d.vcl, d.vdl), (Lsn(4), Lsn(2)));
        assert_eq!(d.pg_last, vec![Lsn(1), Lsn(2)], "pg0's next record links back to 1, pg1's to 2");
    }

    #[test]
    fn an_idle_pg_does_not_hold_the_volume_back() {
        // pg1 wrote once (LSN 1); pg0 wrote 2..=2001 in single-record transactions.
        let mut txns: Vec<&[usize]> = vec![&[1]];
        txns.extend(std::iter::repeat_n(&[0usize][..], 2000));
        let log = Log::new(&txns);
        let a = answers(&[&[2001, 2001, 2001, 2000], &[1, 1, 1, 1]]);
        // Knowing only that the volume was complete at 1, the whole of pg0 above it is read.
        let p = plan(&a, Lsn(1), READ_QUORUM).unwrap();
        assert_eq!((p.start, p.from.clone()), (Lsn(1), vec![Lsn(1), Lsn(1)]));
        let d = recover(&log, &a, 1);
        assert_eq!((d.vcl, d.vdl, d.pg_last.clone()), (Lsn(2001), Lsn(2001), vec![Lsn(2001), Lsn(1)]));
        // A replica that heard VDL 1990 reads from there only.
        let p = plan(&a, Lsn(1990), READ_QUORUM).unwrap();
        assert_eq!(p.from, vec![Lsn(1990), Lsn(1)]);
        assert_eq!(recover(&log, &a, 1990).vdl, Lsn(2001));
        // Without a replica, a segment's reclaimed log (GC) says as much: nothing below it is read.
        let mut a = a;
        a[0][2].reclaimed = Lsn(1500);
        let p = plan(&a, Lsn::ZERO, READ_QUORUM).unwrap();
        assert_eq!((p.known_cpl, p.from.clone()), (Lsn(1500), vec![Lsn(1500), Lsn(1)]));
        assert_eq!(recover(&log, &a, 0).vdl, Lsn(2001));
        // A lagging answer would have the source resend from its SCL: never below what the source reclaimed.
        a[0][3].scl = Lsn(1000);
        assert_eq!(plan(&a, Lsn::ZERO, READ_QUORUM).unwrap().from[0], Lsn(1000), "the source, segment 0, reclaimed nothing");
        a[0][0].reclaimed = Lsn(1200);
        assert_eq!(plan(&a, Lsn::ZERO, READ_QUORUM).unwrap().from[0], Lsn(1200));
    }

    #[test]
    fn a_floor_mid_transaction_reads_back_to_its_cpl() {
        // One transaction per PG pair: 1(pg0) 2(pg1)*, 3(pg0) 4(pg1)*, ...
        let txns: Vec<&[usize]> = std::iter::repeat_n(&[0usize, 1][..], 50).collect();
        let log = Log::new(&txns);
        // Every segment lost the tail: pg0 complete to 61, pg1 to 60; 62 (pg1) is gone.
        let a = answers(&[&[61, 61, 61, 59], &[60, 60, 58, 58]]);
        let p = plan(&a, Lsn::ZERO, READ_QUORUM).unwrap();
        assert_eq!(p.start, Lsn(60));
        let d = recover(&log, &a, 0);
        assert_eq!((d.vcl, d.vdl), (Lsn(61), Lsn(60)), "61 opens a transaction that 62 would close");
        assert_eq!(d.pg_last, vec![Lsn(59), Lsn(60)]);
    }

    #[test]
    fn stale_records_past_a_truncation_are_not_counted() {
        let log = Log::new(&[&[0, 1], &[0, 1]]);
        let e1 = Epoch(1 << 32);
        let e2 = Epoch(2 << 32);
        // Recovery at e2 truncated above 2; segment 3 of pg0 missed it and still holds 3 (of the old epoch).
        let t = vec![Truncation { epoch: e2, above: Lsn(2) }];
        let mut a = answers(&[&[1, 1, 1, 3], &[2, 2, 2, 2]]);
        for (pg, seg) in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] {
            a[pg][seg].epoch = e2;
            a[pg][seg].truncations = t.clone();
        }
        a[0][3].epoch = e1;
        assert_eq!(effective_scl(&a[0][3], &t), Lsn(2));
        assert_eq!(effective_scl(&a[0][0], &t), Lsn(1), "a segment that heard the truncation keeps its SCL");
        let p = plan(&a, Lsn::ZERO, READ_QUORUM).unwrap();
        assert_eq!(p.complete, vec![Lsn(2), Lsn(2)]);
        let d = recover(&log, &a, 0);
        assert_eq!(d.vdl, Lsn(2));
        // Even from the clamped segment, pg0's next record links back to its last real one.
        assert_eq!(d.pg_last, vec![log.last(0, 2), log.last(1, 2)]);
        assert_eq!(d.pg_last[0], Lsn(1));
    }

    #[test]
    fn what_lagging_segments_lack_is_read_unless_they_are_far_behind() {
        let a = answers(&[&[100, 100, 100, 90], &[99, 99, 99, 99]]);
        assert_eq!(plan(&a, Lsn(98), READ_QUORUM).unwrap().from, vec![Lsn(90), Lsn(98)]);
        let far = RESEND_LSNS_MAX + 5000;
        let a = answers(&[&[far, far, far, 0], &[far - 1, far - 1, far - 1, far - 1]]);
        let p = plan(&a, Lsn(far - 10), READ_QUORUM).unwrap();
        assert_eq!(p.from, vec![Lsn(far - 10), Lsn(far - 10)]);
    }

    #[test]
    fn too_few_answers_is_an_error() {
        let a = answers(&[&[1, 1, 1], &[2, 2]]);
        assert_eq!(plan(&a, Lsn::ZERO, READ_QUORUM), Err(RecoveryError::NoQuorum { pg: 1, answered: 2, quorum: READ_QUORUM }));
    }
}
