//! Write-quorum bookkeeping of a volume: from the SCLs that segments report
//! in their acks, which LSNs are complete (PGCL per protection group, VCL for
//! the volume) and durable for commit (VDL: the highest CPL at or below VCL).
//!
//! Call order: `allocate` every record as its LSN is assigned (in LSN order),
//! `handle_ack` for every ack, then read `vcl()` / `vdl()`. A transaction is
//! acknowledged once `vdl() >= its commit LSN`.

use std::collections::{BTreeSet, VecDeque};

use crate::ids::{Lsn, PgId};

/// Segments (copies) of each protection group: two in each of three AZs.
pub const SEGMENTS_PER_PG: usize = 6;
/// Segments that must hold a record for it to be complete.
pub const WRITE_QUORUM: usize = 4;
/// Segments read during recovery.
pub const READ_QUORUM: usize = 3;

// Every read quorum overlaps every write quorum, and two write quorums overlap.
const _: () = assert!(WRITE_QUORUM + READ_QUORUM > SEGMENTS_PER_PG);
const _: () = assert!(2 * WRITE_QUORUM > SEGMENTS_PER_PG);

struct PgState {
    /// Highest SCL each segment has reported.
    scl: [Lsn; SEGMENTS_PER_PG],
    pgcl: Lsn,
    /// LSNs of this PG's records not yet complete, in order.
    incomplete: VecDeque<Lsn>,
}

impl PgState {
    /// The highest LSN that at least `WRITE_QUORUM` segments have completed.
    fn quorum_scl(&self) -> Lsn {
        let mut s = self.scl;
        s.sort_unstable_by(|a, b| b.cmp(a));
        s[WRITE_QUORUM - 1]
    }
}

pub struct VolumeDurability {
    pgs: Vec<PgState>,
    /// CPLs allocated and not yet durable.
    cpls: BTreeSet<Lsn>,
    last_allocated: Lsn,
    vcl: Lsn,
    vdl: Lsn,
}

impl VolumeDurability {
    /// A volume whose log is complete and durable up to `vdl` (after recovery;
    /// `Lsn::ZERO` for a new volume), where `pg_last[pg]` is each protection
    /// group's last record at or below it: its segments' SCL, and its PGCL
    /// (not `vdl`: a replica waits for a PG's segments to reach its PGCL).
    pub fn new(vdl: Lsn, pg_last: &[Lsn]) -> Self {
        let pgs = pg_last.iter().map(|&last| PgState { scl: [last; SEGMENTS_PER_PG], pgcl: last, incomplete: VecDeque::new() }).collect();
        VolumeDurability { pgs, cpls: BTreeSet::new(), last_allocated: vdl, vcl: vdl, vdl }
    }

    pub fn vcl(&self) -> Lsn {
        self.vcl
    }
    pub fn vdl(&self) -> Lsn {
        self.vdl
    }
    pub fn pgcl(&self, pg: PgId) -> Lsn {
        self.pgs[pg.0 as usize].pgcl
    }
    /// Sets a segment's SCL to what it reports now, possibly lower than before (it
    /// restarted and lost unflushed records). PGCL, VCL and VDL never move back:
    /// what was durable stays so through the other segments of the quorum.
    pub fn reset_segment(&mut self, pg: PgId, segment: usize, scl: Lsn) {
        self.pgs[pg.0 as usize].scl[segment] = scl;
    }

    /// The highest SCL segment `segment` of `pg` has reported.
    pub fn segment_scl(&self, pg: PgId, segment: usize) -> Lsn {
        self.pgs[pg.0 as usize].scl[segment]
    }
    /// Segments of `pg` whose SCL has reached `lsn`.
    pub fn segments_at(&self, pg: PgId, lsn: Lsn) -> usize {
        self.pgs[pg.0 as usize].scl.iter().filter(|&&s| s >= lsn).count()
    }

    /// Records that the record `lsn` goes to `pg`; `cpl` if it closes a mini-transaction.
    pub fn allocate(&mut self, pg: PgId, lsn: Lsn, cpl: bool) {
        assert!(lsn > self.last_allocated, "LSNs are allocated in increasing order");
        self.last_allocated = lsn;
        self.pgs[pg.0 as usize].incomplete.push_back(lsn);
        if cpl {
            self.cpls.insert(lsn);
        }
        self.advance();
    }

    /// Segment `segment` (0..6) of `pg` reports its SCL. Returns whether VDL advanced.
    pub fn handle_ack(&mut self, pg: PgId, segment: usize, scl: Lsn) -> bool {
        assert!(segment < SEGMENTS_PER_PG, "segment index {segment} out of range");
        let p = self.pgs.get_mut(pg.0 as usize).expect("acks come from the volume's own protection groups");
        p.scl[segment] = p.scl[segment].max(scl);
        let pgcl = p.quorum_scl();
        if pgcl > p.pgcl {
            p.pgcl = pgcl;
            while p.incomplete.front().is_some_and(|&l| l <= pgcl) {
                p.incomplete.pop_front();
            }
        }
        let before = self.vdl;
        self.advance();
        self.vdl > before
    }

    fn advance(&mut self) {
        // VCL: everything below the oldest incomplete record of any PG is complete.
        let oldest_incomplete = self.pgs.iter().filter_map(|p| p.incomplete.front()).min();
        self.vcl = match oldest_incomplete {
            Some(l) => Lsn(l.0 - 1),
            None => self.last_allocated,
        };
        if let Some(&cpl) = self.cpls.range(..=self.vcl).next_back() {
            self.vdl = cpl;
            self.cpls = self.cpls.split_off(&Lsn(cpl.0 + 1));
        }
        self.check_invariants();
    }

    fn check_invariants(&self) {
        assert!(self.vdl <= self.vcl, "vdl {} > vcl {}", self.vdl, self.vcl);
        assert!(self.vcl <= self.last_allocated);
        assert!(self.cpls.first().is_none_or(|&c| c > self.vdl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack_all(v: &mut VolumeDurability, pg: u32, segments: &[usize], scl: u64) -> bool {
        segments.iter().fold(false, |adv, &s| v.handle_ack(PgId(pg), s, Lsn(scl)) | adv)
    }

    #[test]
    fn commit_needs_four_of_six() {
        let mut v = VolumeDurability::new(Lsn::ZERO, &[Lsn::ZERO; 1]);
        v.allocate(PgId(0), Lsn(1), false);
        v.allocate(PgId(0), Lsn(2), true);
        assert!(!ack_all(&mut v, 0, &[0, 1, 2], 2));
        assert_eq!((v.vcl(), v.vdl()), (Lsn(0), Lsn(0)));
        assert!(ack_all(&mut v, 0, &[5], 2), "the 4th ack makes it durable");
        assert_eq!((v.vcl(), v.vdl(), v.pgcl(PgId(0))), (Lsn(2), Lsn(2), Lsn(2)));
    }

    #[test]
    fn vdl_stops_at_the_last_cpl_below_vcl() {
        let mut v = VolumeDurability::new(Lsn::ZERO, &[Lsn::ZERO; 1]);
        for l in 1..=5 {
            v.allocate(PgId(0), Lsn(l), l == 3);
        }
        ack_all(&mut v, 0, &[0, 1, 2, 3], 4);
        assert_eq!((v.vcl(), v.vdl()), (Lsn(4), Lsn(3)), "4 is complete but not a consistency point");
    }

    #[test]
    fn out_of_order_and_missing_acks() {
        let mut v = VolumeDurability::new(Lsn::ZERO, &[Lsn::ZERO; 1]);
        for l in 1..=3 {
            v.allocate(PgId(0), Lsn(l), true);
        }
        // Segments report different SCLs, late and out of order; two never answer.
        v.handle_ack(PgId(0), 3, Lsn(3));
        v.handle_ack(PgId(0), 0, Lsn(1));
        v.handle_ack(PgId(0), 2, Lsn(3));
        v.handle_ack(PgId(0), 1, Lsn(2));
        assert_eq!(v.vdl(), Lsn(1), "4 segments hold 1, only 3 hold 2");
        v.handle_ack(PgId(0), 0, Lsn(3));
        assert_eq!(v.vdl(), Lsn(2));
        v.handle_ack(PgId(0), 1, Lsn(1)); // a stale, reordered ack changes nothing
        assert_eq!(v.vdl(), Lsn(2));
        v.handle_ack(PgId(0), 1, Lsn(3));
        assert_eq!(v.vdl(), Lsn(3));
    }

    #[test]
    fn three_down_stalls_until_one_returns() {
        let mut v = VolumeDurability::new(Lsn::ZERO, &[Lsn::ZERO; 1]);
        v.allocate(PgId(0), Lsn(1), true);
        ack_all(&mut v, 0, &[0, 1, 2], 1);
        assert_eq!(v.vdl(), Lsn(0));
        assert_eq!(v.segments_at(PgId(0), Lsn(1)), 3);
        ack_all(&mut v, 0, &[4], 1);
        assert_eq!(v.vdl(), Lsn(1));
    }

    #[test]
    fn a_segment_that_restarted_lower_counts_only_for_what_it_holds() {
        let mut v = VolumeDurability::new(Lsn::ZERO, &[Lsn::ZERO; 1]);
        v.allocate(PgId(0), Lsn(1), true);
        ack_all(&mut v, 0, &[0, 1, 2, 3], 1);
        assert_eq!(v.vdl(), Lsn(1));
        v.allocate(PgId(0), Lsn(2), true);
        ack_all(&mut v, 0, &[0, 1, 2], 2);
        v.reset_segment(PgId(0), 0, Lsn(1)); // segment 0 restarted and lost record 2
        ack_all(&mut v, 0, &[3], 2);
        assert_eq!(v.vdl(), Lsn(1), "only 3 segments hold record 2 now");
        assert_eq!(v.pgcl(PgId(0)), Lsn(1), "what was complete stays complete");
        ack_all(&mut v, 0, &[4], 2);
        assert_eq!(v.vdl(), Lsn(2));
    }

    #[test]
    fn a_transaction_spanning_pgs_waits_for_every_pg() {
        let mut v = VolumeDurability::new(Lsn::ZERO, &[Lsn::ZERO; 2]);
        // One mini-transaction: 1 on PG 0, 2 (its CPL) on PG 1.
        v.allocate(PgId(0), Lsn(1), false);
        v.allocate(PgId(1), Lsn(2), true);
        ack_all(&mut v, 1, &[0, 1, 2, 3, 4, 5], 2);
        assert_eq!(v.pgcl(PgId(1)), Lsn(2));
        assert_eq!((v.vcl(), v.vdl()), (Lsn(0), Lsn(0)), "PG 0 still lacks record 1");
        ack_all(&mut v, 0, &[1, 2, 3, 4], 1);
        assert_eq!((v.vcl(), v.vdl()), (Lsn(2), Lsn(2)));
    }

    #[test]
    fn an_idle_pg_does_not_hold_back_vcl() {
        let mut v = VolumeDurability::new(Lsn(10), &[Lsn(10); 3]);
        v.allocate(PgId(2), Lsn(11), true);
        ack_all(&mut v, 2, &[0, 1, 2, 3], 11);
        assert_eq!((v.vcl(), v.vdl()), (Lsn(11), Lsn(11)));
    }

    #[test]
    fn after_recovery_each_pg_is_complete_at_its_own_last_record() {
        // pg1's last record is 7: its segments' SCL stays 7 while pg0 goes on, so its PGCL
        // (what a replica waits for its segments to reach) must be 7, not the VDL.
        let mut v = VolumeDurability::new(Lsn(10), &[Lsn(10), Lsn(7)]);
        assert_eq!((v.vdl(), v.pgcl(PgId(0)), v.pgcl(PgId(1))), (Lsn(10), Lsn(10), Lsn(7)));
        v.allocate(PgId(0), Lsn(11), true);
        assert!(ack_all(&mut v, 0, &[0, 1, 2, 3], 11));
        assert_eq!((v.vdl(), v.pgcl(PgId(1))), (Lsn(11), Lsn(7)));
    }
}
