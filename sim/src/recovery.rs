//! Writer crash and takeover: the writer dies (in-flight Append frames may
//! still land on any subset of segments, or be lost; acks are lost with its
//! sessions), then a new writer, or a promoted replica offering back its
//! `held_records()`, runs the core's `Takeover` (the machine writerd and
//! replicad execute), its commands executed here as storaged executes them:
//! claims and truncations by the core's `SegmentClaim`, replies delayed, lost, or never sent by a segment cut off
//! from the whole takeover. A segment that missed the takeover gets the
//! truncation when its sender reconnects, before any new append (writerd's
//! session); a segment that missed one of the truncation history is cut at
//! its point too.
//!
//! Checked at every recovery: VDL is at or above every acknowledged commit and
//! every replica's read point, and is a commit LSN; per PG the decided last
//! record is exactly the oracle's last record at or below VDL (an
//! unacknowledged transaction is kept whole or dropped whole); every truncated
//! segment ends on a record of the committed history. The oracle then forgets
//! the transactions above VDL, so that every later read, by a replica or at
//! convergence, is checked against the history that survived.

use std::time::Duration;

use bytes::Bytes;
use redo_core::quorum::{READ_QUORUM, SEGMENTS_PER_PG, WRITE_QUORUM};
use redo_core::record::{Records, ValidRecords};
use redo_core::repair::{Own, PeerView};
use redo_core::segment_claim::ClaimError;
use redo_core::takeover::{Command, Offer, Reply, SegmentStatus, TakenOver, Takeover, TakeoverError};
use redo_core::wire::Truncation;
use redo_core::writer::WriterCore;
use redo_core::{Epoch, Lsn, PgId};

use crate::{replica, Segment, Sim};

/// Chance that a reachable segment answers one request of a takeover (the
/// machine asks again after `ROUND_PAUSE`).
const CLAIM_ANSWER_PERCENT: u64 = 85;
/// Chance that a segment is cut off from a whole takeover: it gets the
/// truncation later, from the new writer's session.
const CUT_OFF_PERCENT: u64 = 10;
/// Chance that a takeover finds an AZ and one more node unreachable (Aurora's
/// design point for reads), if every acknowledged record is on enough segments
/// (`READ_HOLDERS_MIN`) for any read quorum to see it.
const AZ_PLUS_ONE_PERCENT: u64 = 25;
/// Holders of every acknowledged record that let any read quorum of claim
/// answers see it. With fewer (some restarted before flushing, `ack = memory`),
/// a takeover is sure to see it only with a write quorum of answers
/// (`READ_QUORUM_WAIT`): the sim then leaves a write quorum reachable.
/// Replies take up to this long, or (`LATE_PERCENT`) longer than the
/// machine waits for stragglers.
const REPLY_DELAY_US_MAX: u64 = 40_000;
const LATE_PERCENT: u64 = 5;
const REPLY_LATE_US: u64 = 150_000;
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(2);
/// Chance that two candidates take over at once, the second up to
/// `SECOND_START_US_MAX` after the first.
const CONCURRENT_PERCENT: u64 = 20;
const SECOND_START_US_MAX: u64 = 60_000;
/// Chance that an Append frame in flight when the writer dies still arrives.
const INFLIGHT_SURVIVES_PERCENT: u64 = 50;
/// Ticks between the writer's death and the first recovery attempt, at most.
const RECOVERY_DELAY_TICKS_MAX: u64 = 30;
/// Chance that the writer restarts late after a crash (`WRITER_LATE_TICKS`),
/// leaving the replicas time to elect one of them.
const WRITER_LATE_PERCENT: u64 = 50;
const WRITER_LATE_TICKS: u64 = 150;
const OFFER_RUN_BYTES_MAX: usize = 1024;
/// An acknowledged record must stay on this many segments while only storage
/// holds it (no writer retains its frame): then any write quorum of claim
/// answers includes one of them. With `ack = memory`, fewer is a loss the
/// design accepts (segments that crash before flushing), not a recovery bug,
/// so the sim does not crash the writer, nor a segment, into it.
pub(crate) const ACKED_HOLDERS_MIN: usize = SEGMENTS_PER_PG - WRITE_QUORUM + 1;
const READ_HOLDERS_MIN: usize = SEGMENTS_PER_PG - READ_QUORUM + 1;

/// A takeover under way in virtual time.
struct Execution {
    now: Duration,
    /// Replies not yet delivered: when, to which claimant.
    replies: Vec<(Duration, usize, Delivery)>,
    claimants: Vec<Claimant>,
}

struct Claimant {
    machine: Takeover,
    start: Duration,
    promotion: bool,
    /// Segments unreachable from this candidate for the whole takeover.
    cut_off: Vec<Vec<bool>>,
    /// Segments that executed its truncation.
    truncated: Vec<(usize, usize)>,
    /// The highest CPL it pulled (`Bug::RecoveryMaxScl`).
    max_cpl: Lsn,
}

enum Delivery {
    Status { ask: u64, pg: PgId, segment: usize, reply: Reply },
    Offered,
    Pulled { ask: u64, pg: PgId, runs: Result<Vec<Bytes>, String> },
}

impl Sim {
    /// Whether every acknowledged record of every PG is held by at least `min`
    /// segments at the current truncation (with segment `except` counted as
    /// holding only up to the LSN given: what it flushed, as after a crash).
    pub(crate) fn acked_held(&self, min: usize, except: Option<(usize, usize, Lsn)>) -> bool {
        (0..self.segments.len()).all(|pg| {
            let log = &self.allocated[pg];
            let Some(&last) = log[..log.partition_point(|&l| l <= self.vdl_seen)].last() else { return true };
            let holders = (0..SEGMENTS_PER_PG)
                .filter(|&seg| {
                    let s = &self.segments[pg][seg];
                    let scl = match except {
                        Some((p, s2, keeps)) if (p, s2) == (pg, seg) => keeps,
                        _ => s.log.scl(),
                    };
                    scl >= last && self.at_current_truncation(s)
                })
                .count();
            holders >= min
        })
    }

    /// Whether the segment recorded the current writer's truncation (the
    /// first writer recovered nothing), or is empty (wiped, not claimed yet):
    /// only then are its records above the last recovery's VDL the current
    /// writer's, and what it lost comes back from the writer or its peers.
    pub(crate) fn at_current_truncation(&self, s: &Segment) -> bool {
        let empty = s.log.scl() == Lsn::ZERO && s.log.last_truncation().is_none();
        empty || self.truncation.is_none_or(|t| s.log.last_truncation() == Some(t))
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
        self.deposed = self.recent_frames.drain(..).collect();
        self.senders.iter_mut().flatten().for_each(|s| s.at = None);
        self.segments.iter_mut().flatten().for_each(|s| s.lost_upto = Lsn::ZERO);
        self.acked_floor = self.vdl_seen;
        let late = if self.rng.chance(WRITER_LATE_PERCENT) { WRITER_LATE_TICKS } else { 0 };
        self.recover_at = self.now + 1 + late + self.rng.below(RECOVERY_DELAY_TICKS_MAX);
        self.stats.writer_crashes += 1;
    }

    /// One takeover (writerd's `take_over`): the core's `Takeover` driven
    /// against the segments in virtual time, each command executed as storaged
    /// would and its reply delivered after a random delay, lost, or never
    /// answered by a segment cut off from that candidate. The candidates are
    /// the replicas their failure detectors elected (promotions), the writer
    /// if it restarts now, and sometimes one more writer, each starting a
    /// little later: at most one may win each generation, and the last winner
    /// writes unless a loser left a newer epoch on some segment (it is fenced
    /// then, before it wrote anything). `false` when no winner writes (retried
    /// on a later tick).
    pub(crate) fn try_recover(&mut self, elected: &[usize], restarted: bool) -> bool {
        let pgs = self.segments.len();
        // The elected replicas, the restarted writer, and sometimes one more writer at once.
        let mut candidates: Vec<Option<usize>> = elected.iter().map(|&r| Some(r)).collect();
        if restarted {
            candidates.push(None);
        }
        if candidates.len() == 1 && self.rng.chance(CONCURRENT_PERCENT) {
            candidates.push(None);
        }
        let count = candidates.len();
        let nodes_down = self.az_plus_one_down();
        let mut x = Execution { now: Duration::ZERO, replies: Vec::new(), claimants: Vec::new() };
        for (i, candidate) in candidates.into_iter().enumerate() {
            // A promotion: the replica offers back what it holds, and knows VDL up to what it heard.
            let (mut known_cpl, mut offer) = (Lsn::ZERO, Offer::default());
            let promotion = candidate.is_some();
            if let Some(r) = candidate {
                known_cpl = self.replicas[r].core.vdl();
                offer = Offer { epoch: self.replicas[r].epoch(), runs: self.replicas[r].core.held_records(OFFER_RUN_BYTES_MAX) };
            }
            let cut_off = nodes_down.clone().unwrap_or_else(|| self.cut_off());
            let start = if i == 0 { Duration::ZERO } else { Duration::from_micros(self.rng.below(SECOND_START_US_MAX)) };
            // As replicad's watch promotes, with a write quorum; a writer starting, with a read quorum.
            let quorum = match self.bug {
                Some(replica::Bug::RecoveryFromTwo) => READ_QUORUM - 1,
                _ if promotion => WRITE_QUORUM,
                _ => READ_QUORUM,
            };
            let machine = Takeover::new(pgs, known_cpl, offer, start, TAKEOVER_TIMEOUT, self.rng.next_u64()).with_quorum(quorum);
            x.claimants.push(Claimant { machine, start, promotion, cut_off, truncated: Vec::new(), max_cpl: Lsn::ZERO });
        }
        loop {
            for i in 0..count {
                if x.claimants[i].start <= x.now {
                    while let Some(command) = x.claimants[i].machine.poll_command() {
                        self.execute(&mut x, i, command);
                    }
                }
            }
            let running = |c: &Claimant| c.machine.outcome().is_none();
            if !x.claimants.iter().any(running) {
                break;
            }
            let next_reply = x.replies.iter().enumerate().min_by_key(|&(i, r)| (r.0, i)).map(|(i, r)| (r.0, Some(i)));
            let next_time = x
                .claimants
                .iter()
                .filter(|c| running(c))
                .filter_map(|c| if c.start > x.now { Some(c.start) } else { c.machine.poll_timeout() })
                .min()
                .map(|at| (at, None));
            let Some((at, reply)) = [next_reply, next_time].into_iter().flatten().min_by_key(|&(at, reply)| (at, reply.is_none())) else {
                panic!("the takeover waits for nothing: stuck");
            };
            x.now = at;
            match reply {
                Some(i) => {
                    let (_, i, delivery) = x.replies.swap_remove(i);
                    let t = &mut x.claimants[i].machine;
                    match delivery {
                        Delivery::Status { ask, pg, segment, reply } => t.on_status(ask, pg, segment, reply, at),
                        Delivery::Offered => t.on_offered(),
                        Delivery::Pulled { ask, pg, runs } => t.on_pulled(ask, pg, runs, at),
                    }
                }
                None => x.claimants.iter_mut().filter(|c| c.start < at && c.machine.poll_timeout() == Some(at)).for_each(|c| c.machine.handle_timeout(at)),
            }
        }
        let mut winners: Vec<(TakenOver, Claimant)> = Vec::new();
        for c in x.claimants {
            match c.machine.outcome().cloned().expect("ended") {
                Ok(taken) => winners.push((taken, c)),
                Err(TakeoverError::NoQuorum { .. }) => {}
                Err(TakeoverError::Lost(_)) if count > 1 => self.stats.claims_lost += 1,
                Err(e) => panic!("a claimant failed to take over: {e}"),
            }
        }
        winners.sort_by_key(|(taken, _)| taken.epoch);
        assert!(winners.windows(2).all(|w| w[0].0.epoch.generation() < w[1].0.epoch.generation()), "two candidates won one generation");
        let Some(last) = winners.last().map(|(t, _)| t.epoch) else {
            self.stats.recovery_retries += 1;
            return false;
        };
        // A loser's epoch on a segment that would refuse the winner's session (writerd's claim
        // with the truncation) deposes the winner before it writes.
        let fenced = self.segments.iter().flatten().any(|s| s.log.grant_claim(last, true).is_err());
        for (taken, c) in winners {
            let writes = !fenced && taken.epoch == last;
            self.took_over(taken, &c, writes);
        }
        if fenced {
            self.stats.recovery_retries += 1;
        }
        !fenced
    }

    /// Sometimes (`AZ_PLUS_ONE_PERCENT`), while every acknowledged record has
    /// `READ_HOLDERS_MIN` holders, an AZ and one more node (two more with
    /// `Bug::RecoveryFromTwo`) are out of every candidate's reach for a whole
    /// takeover, in every PG.
    fn az_plus_one_down(&mut self) -> Option<Vec<Vec<bool>>> {
        if !self.acked_held(READ_HOLDERS_MIN, None) || !self.rng.chance(AZ_PLUS_ONE_PERCENT) {
            return None;
        }
        let more = if self.bug == Some(replica::Bug::RecoveryFromTwo) { 2 } else { 1 };
        let az = self.rng.below(3) as usize;
        let mut others: Vec<usize> = (0..SEGMENTS_PER_PG).filter(|&n| n / 2 != az).collect();
        let mut down = vec![false; SEGMENTS_PER_PG];
        down[2 * az] = true;
        down[2 * az + 1] = true;
        for _ in 0..more {
            down[others.swap_remove(self.rng.below(others.len() as u64) as usize)] = true;
        }
        self.stats.az_plus_one_takeovers += 1;
        Some(vec![down; self.segments.len()])
    }

    /// The segments one candidate cannot reach during its whole takeover, each by
    /// chance, per PG; never fewer than a write quorum of live segments left while
    /// an acknowledged record has fewer than `READ_HOLDERS_MIN` holders.
    fn cut_off(&mut self) -> Vec<Vec<bool>> {
        let pgs = self.segments.len();
        let mut cut: Vec<Vec<bool>> = (0..pgs).map(|_| (0..SEGMENTS_PER_PG).map(|_| self.rng.chance(CUT_OFF_PERCENT)).collect()).collect();
        if !self.acked_held(READ_HOLDERS_MIN, None) {
            for (pg, cut) in cut.iter_mut().enumerate() {
                let reachable = (0..SEGMENTS_PER_PG).filter(|&s| !cut[s] && self.segments[pg][s].down_until <= self.now).count();
                if reachable < WRITE_QUORUM {
                    cut.fill(false);
                }
            }
        }
        cut
    }

    /// A candidate won: the checks, the oracle forgets what it dropped, and the
    /// last winner becomes the writer (`writes`).
    fn took_over(&mut self, mut taken: TakenOver, c: &Claimant, writes: bool) {
        if c.promotion {
            self.stats.promotions += 1;
        }
        // The injected bugs change what the segments were told; the checks see it here.
        match self.bug {
            Some(replica::Bug::RecoveryMaxScl) => taken.recovered.vdl = taken.recovered.vdl.max(c.max_cpl),
            Some(replica::Bug::NoTruncationHistory) => taken.history.clear(),
            _ => {}
        }
        let (epoch, vdl) = (taken.epoch, taken.recovered.vdl);
        self.check_decision(vdl, &taken.recovered.pg_last);
        self.check_history(&taken.history);
        self.forget_above(vdl);
        let t = Truncation { epoch, above: vdl };
        self.truncations_all.push(t);
        self.truncation = Some(t);
        self.truncation_history = taken.history;
        self.recovered_vdl = vdl;
        self.stats.recoveries += 1;
        if !writes {
            return;
        }
        let config = redo_core::writer::WriterConfig { epoch, ..self.writer_config.clone() };
        self.writer = WriterCore::new(self.writer.volume().clone(), config, taken.recovered);
        for s in self.senders.iter_mut().flatten() {
            s.at = None;
            s.session += 1;
        }
        self.writer_up = true;
        for &(pg, seg) in &c.truncated {
            let s = &self.segments[pg][seg];
            assert!(s.log.scl() <= vdl, "pg{pg} segment {seg} holds {} above the truncation at {vdl}", s.log.scl());
            assert!(
                s.log.scl() == Lsn::ZERO || self.allocated[pg].binary_search(&s.log.scl()).is_ok(),
                "pg{pg} segment {seg} ends at {}, not a record of the history",
                s.log.scl()
            );
        }
    }

    /// Executes one of claimant `i`'s commands as storaged would, and schedules its reply.
    fn execute(&mut self, x: &mut Execution, i: usize, command: Command) {
        let delay = Duration::from_micros(if self.rng.chance(LATE_PERCENT) { REPLY_LATE_US } else { self.rng.below(REPLY_DELAY_US_MAX) });
        let (pg, segment) = match &command {
            Command::Status { pg, segment, .. } | Command::Offer { pg, segment, .. } | Command::Pull { pg, segment, .. } => (pg.0 as usize, *segment),
        };
        let c = &mut x.claimants[i];
        let reachable = self.segments[pg][segment].down_until <= self.now && !c.cut_off[pg][segment];
        let reply = match command {
            Command::Status { ask, pg: id, epoch, truncate, .. } => {
                let reply = if reachable && self.rng.chance(CLAIM_ANSWER_PERCENT) {
                    self.status(c, pg, segment, epoch, truncate)
                } else {
                    Reply::Failed("no answer".into())
                };
                Delivery::Status { ask, pg: id, segment, reply }
            }
            Command::Offer { epoch, runs, .. } => {
                if reachable {
                    for run in runs {
                        let valid = ValidRecords::validate(run, 0).expect("held records are valid").expect("a run holds records");
                        // Best effort, as writerd's offer: segments may refuse what conflicts.
                        let _ = self.append(pg, segment, epoch, &valid);
                    }
                }
                Delivery::Offered
            }
            Command::Pull { ask, pg: id, after, upto, .. } => {
                let runs = if reachable { pull_range(&self.segments[pg][segment], after, upto) } else { Err("unreachable".into()) };
                for run in runs.iter().flatten() {
                    let cpls = Records::new(run, 0).map(|r| r.expect("pulled records decode")).filter(|r| r.header().cpl).map(|r| r.lsn());
                    c.max_cpl = cpls.fold(c.max_cpl, Lsn::max);
                }
                Delivery::Pulled { ask, pg: id, runs }
            }
        };
        x.replies.push((x.now + delay, i, reply));
    }

    /// storaged's `Status`: a claim on the segment (the core's `SegmentClaim`,
    /// as storaged runs it) moves it to a granted epoch (a refused one is
    /// `StaleEpoch`) and cuts it for a truncation; the answer is its epoch,
    /// position and truncations.
    fn status(&mut self, c: &mut Claimant, pg: usize, seg: usize, epoch: Epoch, truncate: Option<(Lsn, Vec<Truncation>)>) -> Reply {
        let bug = self.bug;
        let truncate = truncate.map(|(above, mut history)| {
            if bug == Some(replica::Bug::NoTruncationHistory) {
                history.clear();
            }
            (if bug == Some(replica::Bug::RecoveryMaxScl) { above.max(c.max_cpl) } else { above }, history)
        });
        let truncating = truncate.is_some();
        if epoch != Epoch(0) {
            match self.claim(pg, seg, epoch, truncate) {
                Ok(_) if truncating => c.truncated.push((pg, seg)),
                Ok(_) => {}
                Err(ClaimError::Stale(_)) if bug == Some(replica::Bug::RefusalsAsGrants) => {}
                Err(refused @ ClaimError::Stale(_)) => return Reply::Refused(refused.to_string()),
                Err(failed) => return Reply::Failed(failed.to_string()),
            }
        }
        let s = &self.segments[pg][seg];
        if s.log.is_joining() {
            return Reply::Failed(ClaimError::Joining.to_string());
        }
        let mut truncations = s.log.truncations();
        if bug == Some(replica::Bug::ClaimedEpochInAnswers) && epoch != Epoch(0) {
            // The claim answer's log epoch reads as the one just claimed: a truncation at
            // that epoch (never part of the history) that cuts nothing.
            truncations.push(Truncation { epoch: s.log.epoch(), above: Lsn(u64::MAX) });
        }
        Reply::Status(SegmentStatus { epoch: s.log.epoch(), position: s.log.position(), reclaimed: s.log.log_start().prev, truncations })
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

    /// writerd's session start: the Status claim at the writer's epoch, with
    /// the recovery's truncation (a segment that missed the recovery is cut
    /// before any append), and from the first writer, which recovered nothing,
    /// without (a wiped segment learns the epoch it must repair at). Whether
    /// the session may start: not on a segment whose disk failed.
    pub(crate) fn late_truncation(&mut self, pg: usize, seg: usize) -> bool {
        let truncate = self.truncation.map(|t| (t.above, self.truncation_history.clone()));
        match self.claim(pg, seg, self.writer.epoch(), truncate) {
            Ok(claimed) => {
                self.stats.late_truncations += claimed.cut.is_some() as u64;
                self.writer.on_claimed(PgId(pg as u32), seg);
                true
            }
            Err(ClaimError::Stale(refused)) => panic!("the only writer's claim on pg{pg} segment {seg} was refused: {refused}"),
            Err(_) => false,
        }
    }

    /// A segment the writer can no longer catch up by resending (it lagged
    /// below what recovery read back) is filled by gossip, as storaged does:
    /// one round of the core's `Repair` over the reachable peers, then a pull
    /// from the best one it names (a lag is filled once it lasted a round).
    pub(crate) fn gossip_fill(&mut self, pg: usize, seg: usize) {
        let s = &self.segments[pg][seg];
        if s.log.disk_failed().is_some() || s.log.is_joining() {
            return;
        }
        let own = Own { epoch: s.log.epoch(), truncation: s.log.last_truncation(), scl: s.log.scl(), pending: s.log.pending_records() > 0 };
        let peers: Vec<PeerView> = (0..SEGMENTS_PER_PG)
            .filter(|&p| p != seg && self.segments[pg][p].down_until <= self.now)
            .map(|p| {
                let log = &self.segments[pg][p].log;
                PeerView { node: p as u32, epoch: log.epoch(), truncation: log.last_truncation(), scl: log.scl() }
            })
            .collect();
        let plan = self.segments[pg][seg].repair.handle_round(own, &peers);
        let Some(&(peer, upto)) = plan.first() else { return };
        for run in pull_range(&self.segments[pg][peer as usize], own.scl, upto).expect("the peer holds what it reported this round") {
            let valid = ValidRecords::validate(run, 0).expect("a peer's records are valid").expect("a run holds records");
            self.segments[pg][seg].log.handle_append(own.epoch, &valid).expect("a peer's records extend the segment's chain");
        }
        self.stats.gossip_fills += 1;
    }
}

/// Records of the segment in `(after, upto]`, in pull-sized runs (writerd's
/// `pull_range`); an error if it no longer holds them (it restarted since it
/// reported its SCL, losing what it had not flushed).
fn pull_range(s: &Segment, after: Lsn, upto: Lsn) -> Result<Vec<Bytes>, String> {
    // Small, so that a tail comes in several runs.
    const RUN_BYTES_MAX: usize = 4096;
    let (mut at, mut runs) = (after, Vec::new());
    while at < upto {
        let (records, last) = replica::pull(s, at, upto, RUN_BYTES_MAX);
        if last <= at {
            return Err(format!("{} returned nothing after {at} (its SCL is {})", s.log.id(), s.log.scl()));
        }
        at = last;
        runs.push(records);
    }
    Ok(runs)
}

/// The page a writer after recovery asks for (`Admit::NeedPages`), from a
/// reachable segment at the current truncation that holds `lsn`.
pub(crate) fn fetch_for_writer(sim: &Sim, pg: PgId, page: redo_core::PageId, lsn: Lsn) -> Option<redo_core::page::PageImage> {
    let segs = &sim.segments[pg.0 as usize];
    let s = segs.iter().find(|s| s.down_until <= sim.now && sim.at_current_truncation(s) && s.log.scl() >= lsn)?;
    s.log.check_readable(lsn).expect("the writer reads pages at or above every GC horizon");
    Some(replica::page_at(s, page, lsn))
}
