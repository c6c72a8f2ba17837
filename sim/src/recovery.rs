//! Writer crash and recovery, driven the way writerd's `take_over` drives the
//! core's `redo_core::recovery`: the writer dies (in-flight Append frames may
//! still land on any subset of segments, or be lost; acks are lost with its
//! sessions), then, once a write quorum of every PG's segments is reachable,
//! a new writer claims the next epoch on every reachable segment, optionally
//! offers back a promoted replica's `held_records()`, plans, pulls each PG's
//! records from the source segment (`SegmentLog::read`, the file when memory
//! no longer holds them), decides, truncates above VDL on every claimed
//! segment, and continues with a new `WriterCore`. A segment that missed the
//! recovery gets the truncation when its sender reconnects, before any new
//! append (writerd's session). Every claim that truncates carries the
//! truncation history (the older truncations the claim answers reported): a
//! segment that missed one of them is cut at its point too and records it, as
//! storaged does (`SegmentLog::missed_truncations`). Claim answers report the
//! epoch of the segment's newest truncation, as writerd's `take_over` does.
//!
//! Checked at every recovery: VDL is at or above every acknowledged commit and
//! every replica's read point, and is a commit LSN; per PG the decided last
//! record is exactly the oracle's last record at or below VDL (an
//! unacknowledged transaction is kept whole or dropped whole); every truncated
//! segment ends on a record of the committed history. The oracle then forgets
//! the transactions above VDL, so that every later read, by a replica or at
//! convergence, is checked against the history that survived.

use bytes::Bytes;
use redo_core::quorum::{SEGMENTS_PER_PG, WRITE_QUORUM};
use redo_core::record::{Records, ValidRecords};
use redo_core::recovery::{self, Answer};
use redo_core::segment_log::{grant_epoch, DiskCut, DiskRead};
use redo_core::wire::Truncation;
use redo_core::writer::{Recovered, WriterCore};
use redo_core::{Epoch, Lsn, PgId};

use crate::{replica, Segment, Sim};

/// Chance that a reachable segment answers the recovery's claim (the others
/// get the truncation later, from the new writer's session).
const CLAIM_ANSWER_PERCENT: u64 = 85;
/// Chance that an Append frame in flight when the writer dies still arrives.
const INFLIGHT_SURVIVES_PERCENT: u64 = 50;
/// Ticks between the writer's death and the first recovery attempt, at most.
const RECOVERY_DELAY_TICKS_MAX: u64 = 30;
/// Chance that a recovery is a replica promotion (offers back `held_records` first).
const PROMOTION_PERCENT: u64 = 50;
const OFFER_RUN_BYTES_MAX: usize = 1024;
/// An acknowledged record must stay on this many segments while only storage
/// holds it (no writer retains its frame): then any write quorum of claim
/// answers includes one of them. With `ack = memory`, fewer is a loss the
/// design accepts (segments that crash before flushing), not a recovery bug,
/// so the sim does not crash the writer, nor a segment, into it.
pub(crate) const ACKED_HOLDERS_MIN: usize = SEGMENTS_PER_PG - WRITE_QUORUM + 1;

impl Sim {
    /// Whether every acknowledged record of every PG is held by at least `min`
    /// segments at the current truncation (with segment `except` counted as
    /// holding only what it flushed, as after a crash).
    pub(crate) fn acked_held(&self, min: usize, except: Option<(usize, usize)>) -> bool {
        (0..self.segments.len()).all(|pg| {
            let log = &self.allocated[pg];
            let Some(&last) = log[..log.partition_point(|&l| l <= self.vdl_seen)].last() else { return true };
            let holders = (0..SEGMENTS_PER_PG)
                .filter(|&seg| {
                    let s = &self.segments[pg][seg];
                    let scl = if except == Some((pg, seg)) { s.log.flushed_lsn() } else { s.log.scl() };
                    scl >= last && self.at_current_truncation(s)
                })
                .count();
            holders >= min
        })
    }

    /// Whether the segment recorded the current writer's truncation (the
    /// first writer recovered nothing): only then are its records above the
    /// last recovery's VDL the current writer's.
    pub(crate) fn at_current_truncation(&self, s: &Segment) -> bool {
        self.truncation.is_none_or(|t| s.log.last_truncation() == Some(t))
    }

    /// The writer dies: its sessions and their acks are gone, each Append frame
    /// in flight arrives or not, and nothing it retained can be resent.
    pub(crate) fn crash_writer(&mut self) {
        let appends: Vec<(u64, u64)> = self.net.iter().filter(|(_, m)| matches!(m, crate::Msg::Append { .. })).map(|(&k, _)| k).collect();
        for k in appends {
            if !self.rng.chance(INFLIGHT_SURVIVES_PERCENT) {
                self.net.remove(&k);
            }
        }
        self.net.retain(|_, m| !matches!(m, crate::Msg::Ack { .. }));
        self.writer_up = false;
        self.senders.iter_mut().flatten().for_each(|s| s.at = None);
        self.segments.iter_mut().flatten().for_each(|s| s.lost_upto = Lsn::ZERO);
        self.acked_floor = self.vdl_seen;
        self.recover_at = self.now + 1 + self.rng.below(RECOVERY_DELAY_TICKS_MAX);
        self.stats.writer_crashes += 1;
    }

    /// One recovery attempt (writerd's `take_over`); `false` when fewer than a
    /// write quorum of some PG's segments answered (retried on a later tick).
    pub(crate) fn try_recover(&mut self) -> bool {
        let pgs = self.segments.len();
        let now = self.now;
        let answering: Vec<Vec<usize>> = (0..pgs)
            .map(|pg| (0..SEGMENTS_PER_PG).filter(|&seg| self.segments[pg][seg].down_until <= now && self.rng.chance(CLAIM_ANSWER_PERCENT)).collect())
            .collect();
        if answering.iter().any(|a| a.len() < WRITE_QUORUM) {
            self.stats.recovery_retries += 1;
            return false;
        }
        // Claim the next generation on every segment that answered.
        let newest = answering.iter().enumerate().flat_map(|(pg, a)| a.iter().map(move |&seg| (pg, seg))).map(|(pg, seg)| self.segments[pg][seg].log.epoch()).max().unwrap_or_default();
        let epoch = Epoch::claim_after(newest, self.rng.next_u64() as u32);
        for (pg, a) in answering.iter().enumerate() {
            for &seg in a {
                let log = &mut self.segments[pg][seg].log;
                assert_eq!(grant_epoch(log.epoch(), epoch), Ok(true), "the only claimant is granted the next generation");
                log.raise_epoch(epoch);
            }
        }
        // A promotion: the replica offers back what it holds, and knows VDL up to what it heard.
        let mut known_cpl = Lsn::ZERO;
        if !self.replicas.is_empty() && self.rng.chance(PROMOTION_PERCENT) {
            let r = self.rng.below(self.replicas.len() as u64) as usize;
            known_cpl = self.replicas[r].core.vdl();
            let offer = self.replicas[r].core.held_records(OFFER_RUN_BYTES_MAX);
            for (pg, runs) in offer.iter().enumerate() {
                for &seg in &answering[pg] {
                    for run in runs {
                        let valid = ValidRecords::validate(run.clone(), 0).expect("held records are valid").expect("a run holds records");
                        // Best effort, as writerd's offer_back: segments may refuse what conflicts.
                        let _ = self.segments[pg][seg].log.handle_append(epoch, &valid);
                    }
                }
            }
            self.stats.promotions += 1;
        }
        let answers: Vec<Vec<Answer>> = answering
            .iter()
            .enumerate()
            .map(|(pg, a)| {
                a.iter()
                    .map(|&seg| {
                        let log = &self.segments[pg][seg].log;
                        // writerd: the epoch its log is as of, that of its newest truncation
                        // (the claim just raised its epoch; what it holds was written before).
                        let epoch = match self.bug {
                            Some(replica::Bug::ClaimedEpochInAnswers) => log.epoch(),
                            _ => log.last_truncation().map_or(Epoch(0), |t| t.epoch),
                        };
                        Answer { segment: seg, epoch, scl: log.scl(), truncations: log.truncations() }
                    })
                    .collect()
            })
            .collect();
        let plan = recovery::plan(&answers, known_cpl).expect("a write quorum of every PG answered");
        let pulled: Vec<Vec<Bytes>> = (0..pgs).map(|pg| pull_range(&self.segments[pg][plan.source[pg]], plan.from[pg], plan.upto[pg])).collect();
        let mut d = recovery::decide(&plan, &pulled);
        if self.bug == Some(replica::Bug::RecoveryMaxScl) {
            // Deliberately wrong: the highest CPL pulled, ignoring the holes below it.
            let cpls = pulled.iter().flatten().flat_map(|run| Records::new(run, 0).map(|r| r.expect("pulled records decode")).filter(|r| r.header().cpl).map(|r| r.lsn()).collect::<Vec<_>>());
            d.vdl = cpls.max().unwrap_or(d.vdl).max(d.vdl);
        }
        let vdl = d.vdl;
        self.check_decision(vdl, &d.pg_last);

        // writerd's history: every truncation the answers reported, oldest first, once.
        let mut history: Vec<Truncation> = answers.iter().flatten().flat_map(|a| a.truncations.iter().copied()).filter(|t| t.epoch != epoch).collect();
        history.sort_by_key(|t| t.epoch);
        history.dedup();
        if self.bug == Some(replica::Bug::NoTruncationHistory) {
            history.clear();
        }
        self.check_history(&history);
        // Truncate above VDL on every claimed segment (and lower where it missed a truncation).
        let t = Truncation { epoch, above: vdl };
        for (pg, a) in answering.iter().enumerate() {
            for &seg in a {
                truncate(&mut self.segments[pg][seg], t, &history);
            }
        }
        self.forget_above(vdl);
        self.truncations_all.push(t);
        self.truncation = Some(t);
        self.truncation_history = history;
        self.recovered_vdl = vdl;
        let config = redo_core::writer::WriterConfig { epoch, ..self.writer_config.clone() };
        self.writer = WriterCore::new(self.writer.volume().clone(), config, Recovered { vdl, pg_last: d.pg_last, tails: d.tails });
        for s in self.senders.iter_mut().flatten() {
            s.at = None;
            s.session += 1;
        }
        self.writer_up = true;
        self.stats.recoveries += 1;
        for (pg, a) in answering.iter().enumerate() {
            for &seg in a {
                let s = &self.segments[pg][seg];
                assert!(s.log.scl() <= vdl, "pg{pg} segment {seg} holds {} above the truncation at {vdl}", s.log.scl());
                assert!(s.log.scl() == Lsn::ZERO || self.allocated[pg].binary_search(&s.log.scl()).is_ok(), "pg{pg} segment {seg} ends at {}, not a record of the history", s.log.scl());
            }
        }
        true
    }

    /// The recovery kept every acknowledged commit and everything a replica
    /// showed, and ends each PG on the oracle's last record at or below VDL.
    fn check_decision(&self, vdl: Lsn, pg_last: &[Lsn]) {
        assert!(vdl >= self.vdl_seen, "recovery decided VDL {vdl}, below the acknowledged {}", self.vdl_seen);
        assert!(vdl == Lsn::ZERO || self.commits.contains(&vdl), "recovery decided VDL {vdl}, not a commit LSN");
        let shown = self.replicas.iter().filter_map(|r| r.core.read_point()).max().unwrap_or(Lsn::ZERO);
        assert!(vdl >= shown, "recovery decided VDL {vdl}, below a replica's read point {shown}");
        for (pg, log) in self.allocated.iter().enumerate() {
            let last = log[..log.partition_point(|&l| l <= vdl)].last().copied().unwrap_or(Lsn::ZERO);
            assert_eq!(pg_last[pg], last, "pg{pg}'s log after recovery at VDL {vdl} must end at its last record at or below it");
        }
    }

    /// The history a recovery sends holds every earlier recovery's truncation
    /// (any two write quorums of a PG meet, each recovery truncated a write
    /// quorum, and a run's few recoveries stay far within a segment's
    /// `TRUNCATIONS_MAX`). Without it, a segment that missed that truncation
    /// would keep a stale tail.
    fn check_history(&self, history: &[Truncation]) {
        if self.bug == Some(replica::Bug::NoTruncationHistory) {
            return;
        }
        for t in &self.truncations_all {
            assert!(history.contains(t), "the claim answers' truncation history {history:?} lacks the earlier recovery's {t:?}");
        }
        assert!(history.windows(2).all(|w| w[0].epoch < w[1].epoch), "one truncation per epoch, oldest first: {history:?}");
    }

    /// The transactions above VDL were never acknowledged and are gone whole.
    fn forget_above(&mut self, vdl: Lsn) {
        let dropped = self.commits.split_off(&Lsn(vdl.0 + 1));
        self.stats.txns_dropped += dropped.len() as u64;
        self.stats.txns_kept_unacked += self.commits.range(Lsn(self.acked_floor.0 + 1)..).count() as u64;
        for log in &mut self.allocated {
            log.truncate(log.partition_point(|&l| l <= vdl));
        }
        for versions in self.history.values_mut() {
            versions.split_off(&Lsn(vdl.0 + 1));
        }
        self.history.retain(|_, v| !v.is_empty());
    }

    /// writerd's session start on a segment that may have missed the recovery:
    /// the Status claim with `truncate_above`, before any append.
    pub(crate) fn late_truncation(&mut self, pg: usize, seg: usize) {
        let Some(t) = self.truncation else { return };
        let s = &mut self.segments[pg][seg];
        if s.log.epoch() != t.epoch {
            // The only writer: `raise_epoch` asserts that the segment grants its epoch.
            s.log.raise_epoch(t.epoch);
        }
        let s = &mut self.segments[pg][seg];
        if truncate(s, t, &self.truncation_history) {
            self.stats.late_truncations += 1;
        }
    }

    /// A segment the writer can no longer catch up by resending (it lagged
    /// below what recovery read back) is filled by gossip, as storaged does: from
    /// a peer at the same truncation that holds more.
    pub(crate) fn gossip_fill(&mut self, pg: usize, seg: usize) {
        let scl = self.segments[pg][seg].log.scl();
        let peer = (0..SEGMENTS_PER_PG).filter(|&p| p != seg).map(|p| &self.segments[pg][p]).filter(|p| p.down_until <= self.now && self.at_current_truncation(p)).max_by_key(|p| p.log.scl());
        let Some(peer) = peer.filter(|p| p.log.scl() > scl) else { return };
        let runs = pull_range(peer, scl, peer.log.scl());
        let epoch = self.writer.epoch();
        for run in runs {
            let valid = ValidRecords::validate(run, 0).expect("a peer's records are valid").expect("a run holds records");
            self.segments[pg][seg].log.handle_append(epoch, &valid).expect("a peer's records extend the segment's chain");
        }
        self.stats.gossip_fills += 1;
    }
}

/// Records of the segment in `(after, upto]`, in pull-sized runs (writerd's `pull_range`).
fn pull_range(s: &Segment, after: Lsn, upto: Lsn) -> Vec<Bytes> {
    const PULL_BYTES_MAX: usize = 4096;
    let (mut at, mut runs) = (after, Vec::new());
    while at < upto {
        let (records, last) = replica::pull(s, at, upto, PULL_BYTES_MAX);
        assert!(last > at, "{} returned nothing after {at} although its SCL is {}", s.log.id(), s.log.scl());
        at = last;
        runs.push(records);
    }
    runs
}

/// storaged's `truncate`: unless recorded already, discard the records above
/// `t.above`, or above the lowest truncation of `history` the segment missed
/// (its records above that are an older writer's discarded tail), scanning the
/// file when memory no longer holds the point; cut the file; record the missed
/// truncations and `t`. Returns whether it truncated.
fn truncate(s: &mut Segment, t: Truncation, history: &[Truncation]) -> bool {
    if !s.log.truncation_needed(t.epoch, t.above).expect("the segment is at the claimant's epoch") {
        return false;
    }
    let missed = s.log.missed_truncations(history, t.epoch);
    s.log.begin_truncate();
    assert!(!s.log.flush_inflight(), "the sim's flushes complete at once");
    let above = missed.iter().map(|m| m.above).fold(t.above, Lsn::min);
    let done = match s.log.truncate_above(above, None) {
        Ok(done) => done,
        Err(scan) => {
            let cut = find_cut(&s.file, scan);
            s.log.truncate_above(above, Some(cut)).expect("truncate_above with the disk cut it asked for")
        }
    };
    if let Some(offset) = done.cut_offset {
        s.file.truncate(offset as usize);
    }
    assert_eq!(s.file.len() as u64, s.log.flushed_end(), "the file ends where the log's flushed records do");
    missed.iter().chain([&t]).for_each(|&m| s.log.note_truncation(m));
    s.log.end_truncate();
    s.lost_upto = s.lost_upto.min(above);
    true
}

/// storaged's `find_cut` over the simulated file.
fn find_cut(file: &[u8], scan: DiskRead) -> DiskCut {
    let (mut last_lsn, mut offset, mut records) = (scan.prev, scan.offset, 0);
    let (from, to) = (scan.offset as usize, scan.end_offset as usize);
    for rec in Records::new(&file[from..to], from) {
        let rec = rec.expect("the file holds whole records");
        if rec.lsn() <= scan.after {
            last_lsn = rec.lsn();
            offset += rec.as_bytes().len() as u64;
        } else {
            records += 1;
        }
    }
    DiskCut { last_lsn, offset, records }
}

/// The page a writer after recovery asks for (`Admit::NeedPages`), from a
/// reachable segment at the current truncation that holds `lsn`.
pub(crate) fn fetch_for_writer(sim: &Sim, pg: PgId, page: redo_core::PageId, lsn: Lsn) -> Option<redo_core::page::PageImage> {
    let segs = &sim.segments[pg.0 as usize];
    let s = segs.iter().find(|s| s.down_until <= sim.now && sim.at_current_truncation(s) && s.log.scl() >= lsn)?;
    Some(replica::page_at(s, page, lsn))
}
