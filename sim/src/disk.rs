//! The segments' disks, as storaged drives them: flushes written at their
//! offset, claims (the core's `SegmentClaim`) with the epoch file, restarts
//! that scan the file for the last whole record. And their faults: a flush
//! that fails (EIO: nothing written; ENOSPC: part of it), an epoch file that
//! cannot be written (ENOSPC), a crash that tears the file's tail, a node
//! whose disk is wiped (it joins at its peers' epoch state, `redo_core::join`,
//! before it grants anything, while a deposed writer resends its last frames).
//! A segment whose disk failed takes no more appends until an operator
//! restarts it. Each fault pairs with an injected bug that some seed must
//! catch: `RestartKeepsScl` (unflushed records lost), `FailedFlushCounted`,
//! `EpochWriteFailureIgnored`, `TrustFileLength`, `WipeKeepsPosition`,
//! `JoinSkipped`.

use redo_core::join::PeerState;
use redo_core::quorum::WRITE_QUORUM;
use redo_core::record::ValidRecords;
use redo_core::repair::Repair;
use redo_core::segment_claim::{ClaimError, Claimed, EpochState, SegmentClaim, Step};
use redo_core::segment_file::{scan_records, SEGMENT_HEADER_BYTES};
use redo_core::segment_log::{AppendError, AppendOutcome, DiskCut, DiskIndex, DiskRead, SegmentLog};
use redo_core::wire::Truncation;
use redo_core::{Epoch, Lsn};

use crate::{recovery, Bug, Join, Sim, CRASH_DOWN_TICKS_MAX, SEGMENT_CONFIG};

/// Chance in a thousand that a flush fails: half of them EIO (nothing
/// written), half ENOSPC (a prefix written).
const FLUSH_FAULT_PER_MILLE: u64 = 2;
/// Chance that writing a segment's epoch file fails (ENOSPC).
const EPOCH_WRITE_FAULT_PERCENT: u64 = 3;
/// Chance that a crash tears the file's tail (a flush cut short), and how
/// many bytes the torn write left at most.
const TORN_TAIL_PERCENT: u64 = 30;
const TORN_BYTES_MAX: u64 = 64;
/// Chance that a crash is a wipe: the node comes back with an empty disk.
const WIPE_PERCENT: u64 = 5;
/// An operator restarts a segment whose disk failed after this many ticks.
const DISK_RESTART_TICKS: u64 = 20;
/// Chance per tick that a deposed writer resends one of its last frames to one segment.
const DEPOSED_RESEND_PERCENT: u64 = 30;

/// What a segment refused an append with.
pub(crate) enum Refused {
    /// Its epoch is newer than the append's.
    Stale,
    /// Its disk failed, or it is joining: storaged closes the stream (or
    /// refuses), the sender reconnects later.
    Disk,
    /// The records contradict its log: a deposed writer's frame reached a
    /// segment that missed the takeover, and still holds an older writer's tail.
    Conflict(String),
}

impl Sim {
    /// One of storaged's flushes of the segment, if it has a job: written at its offset, then reported.
    pub(crate) fn flush(&mut self, pg: usize, seg: usize) {
        let (fault, enospc, kept_per_mille) = (self.rng.below(1000) < FLUSH_FAULT_PER_MILLE, self.rng.chance(50), self.rng.below(1000) as usize);
        let s = &mut self.segments[pg][seg];
        let mut parts = Vec::new();
        let Some(job) = s.log.poll_flush(&mut parts) else { return };
        let bytes = parts.concat();
        if !fault {
            write_at(&mut s.file, job.offset, &bytes);
            s.log.handle_flushed(job);
            return;
        }
        let written = if enospc { bytes.len() * kept_per_mille / 1000 } else { 0 };
        write_at(&mut s.file, job.offset, &bytes[..written]);
        self.stats.flush_faults += 1;
        if self.bug == Some(Bug::FailedFlushCounted) {
            s.log.handle_flushed(job);
        } else {
            s.log.handle_flush_failed(job, if enospc { "ENOSPC: no space left on device" } else { "EIO" }.into());
            s.restart_at.get_or_insert(self.now + DISK_RESTART_TICKS);
        }
    }

    /// A random crash (or wipe) of a segment, unless it would leave an
    /// acknowledged record on too few segments on a seed where the writer may
    /// crash (see `recovery::ACKED_HOLDERS_MIN`); and the operator's restarts
    /// of segments whose disk failed.
    pub(crate) fn disk_faults(&mut self, crash_percent: u64) {
        if self.rng.chance(crash_percent) {
            let pg = self.rng.below(self.segments.len() as u64) as usize;
            let seg = self.rng.below(self.segments[pg].len() as u64) as usize;
            let wipe = self.rng.chance(WIPE_PERCENT);
            self.restart(pg, seg, wipe);
        }
        for pg in 0..self.segments.len() {
            for seg in 0..self.segments[pg].len() {
                if self.segments[pg][seg].restart_at.is_some_and(|at| at <= self.now) {
                    self.restart(pg, seg, false);
                }
            }
        }
    }

    fn restart(&mut self, pg: usize, seg: usize, wipe: bool) {
        let s = &self.segments[pg][seg];
        let keeps = if wipe { Lsn::ZERO } else { s.log.flushed_lsn() };
        if self.writer_crash_at.is_empty() || self.acked_held(recovery::ACKED_HOLDERS_MIN, Some((pg, seg, keeps))) {
            self.crash(pg, seg, wipe);
        }
    }

    /// The segment restarts from its disk: unflushed records are gone (all of
    /// them if `wipe`). Its sender's session breaks.
    fn crash(&mut self, pg: usize, seg: usize, wipe: bool) {
        let torn = self.rng.chance(TORN_TAIL_PERCENT);
        let garbage = 1 + self.rng.below(TORN_BYTES_MAX) as usize;
        let bug = self.bug;
        // What it held above a truncation it has not recorded was an older writer's, not lost to the current one.
        let s = &self.segments[pg][seg];
        let stale_above = self.truncation.filter(|_| !self.at_current_truncation(s));
        let stale_above = stale_above.map(|t| s.log.missed_truncations(&self.truncation_history, t.epoch).iter().map(|m| m.above).fold(t.above, Lsn::min));
        let s = &mut self.segments[pg][seg];
        s.lost_upto = s.lost_upto.max(stale_above.map_or(s.log.scl(), |above| s.log.scl().min(above)));
        if wipe {
            s.file = vec![0; SEGMENT_HEADER_BYTES];
            s.wiped = true;
            if bug != Some(Bug::WipeKeepsPosition) {
                s.epoch_file = EpochState::default();
            }
            self.stats.wipes += 1;
        } else if torn {
            // A flush cut short: part of the next unflushed records (or other bytes) reached the file.
            let mut parts = Vec::new();
            let _ = s.log.read(s.log.flushed_lsn(), s.log.scl(), TORN_BYTES_MAX as usize, &mut parts);
            let unflushed: Vec<u8> = parts.concat();
            let tail = if unflushed.len() > 1 { unflushed[..garbage.min(unflushed.len() - 1)].to_vec() } else { vec![0xA5; garbage] };
            s.file.extend_from_slice(&tail);
            self.stats.torn_tails += 1;
        }
        // storaged's start: the log ends at the last whole record that continues the chain.
        let (mut last, mut end) = (Lsn::ZERO, s.file.len());
        if bug == Some(Bug::TrustFileLength) || (wipe && bug == Some(Bug::WipeKeepsPosition)) {
            last = s.log.flushed_lsn();
        } else if bug == Some(Bug::RestartKeepsScl) && !wipe {
            last = s.log.scl();
        } else {
            let (used, _) = scan_records(&s.file[SEGMENT_HEADER_BYTES..], SEGMENT_HEADER_BYTES as u64, &mut last, |_, _| {});
            end = SEGMENT_HEADER_BYTES + used;
            if !wipe {
                // ENOSPC may have left whole records past the flushed LSN: they are the segment's too.
                assert!(last >= s.log.flushed_lsn(), "pg{pg} segment {seg}: its file ends at {last}, below the flushed LSN {}", s.log.flushed_lsn());
            }
            s.file.truncate(end);
        }
        let log = SegmentLog::recovered(s.log.id(), SEGMENT_CONFIG, s.epoch_file.epoch, last, end as u64, DiskIndex::default())
            .with_truncations(&s.epoch_file.truncations);
        // storaged's start: a segment with no epoch state and no records (wiped, or
        // wiped and restarted before it joined) joins first.
        let joins = last == Lsn::ZERO && s.epoch_file == EpochState::default() && bug != Some(Bug::JoinSkipped);
        s.log = if joins { log.awaiting_join() } else { log };
        s.lost_state |= wipe;
        s.join = Join::default();
        s.repair = Repair::default();
        s.restart_at = None;
        s.down_until = self.now + 1 + self.rng.below(CRASH_DOWN_TICKS_MAX);
        self.senders[pg][seg].at = None;
        self.stats.crashes += 1;
    }

    /// storaged's `claim`: the core's `SegmentClaim` at `epoch`, its steps
    /// executed at once (the simulator's flushes complete at once).
    pub(crate) fn claim(&mut self, pg: usize, seg: usize, epoch: Epoch, truncate: Option<(Lsn, Vec<Truncation>)>) -> Result<Claimed, ClaimError> {
        let (bug, now) = (self.bug, self.now);
        let s = &mut self.segments[pg][seg];
        let mut claim = SegmentClaim::new(epoch, truncate);
        let mut step = claim.poll(&mut s.log);
        let outcome = loop {
            step = match step {
                Step::Done(outcome) => {
                    if s.log.disk_failed().is_some() {
                        s.restart_at.get_or_insert(now + DISK_RESTART_TICKS);
                    }
                    break outcome;
                }
                Step::PersistEpoch(state) if self.rng.chance(EPOCH_WRITE_FAULT_PERCENT) => {
                    self.stats.epoch_write_faults += 1;
                    match bug {
                        Some(Bug::EpochWriteFailureIgnored) => claim.on_persisted(&mut s.log),
                        _ => claim.on_failed(&mut s.log, format!("write the epoch file for {}: ENOSPC", state.epoch)),
                    }
                }
                Step::PersistEpoch(state) => {
                    s.epoch_file = state;
                    claim.on_persisted(&mut s.log)
                }
                Step::HoldFiles => claim.on_files_held(&mut s.log),
                Step::WaitFlush => unreachable!("the simulator's flushes complete at once"),
                Step::FindCut(scan) => {
                    let cut = find_cut(&s.file, scan);
                    claim.on_scanned(&mut s.log, cut)
                }
                Step::CutFiles { offset, reindex, .. } => {
                    assert!(!reindex, "the simulator's segments keep no page index");
                    if let Some(offset) = offset {
                        s.file.truncate(offset as usize);
                    }
                    claim.on_files_cut(&mut s.log, None)
                }
            };
        };
        if outcome.as_ref().is_ok_and(|c| c.raised) {
            self.granted(pg, seg, epoch);
        }
        outcome
    }

    /// Segment `seg` of `pg` moved to `epoch`. One that lost its state must
    /// not move below the volume's epoch (the newest a write quorum granted):
    /// with it, a deposed writer could gather a write quorum again.
    fn granted(&mut self, pg: usize, seg: usize, epoch: Epoch) {
        if std::mem::take(&mut self.segments[pg][seg].lost_state) {
            let volume = self.quorum_epoch[pg];
            assert!(epoch >= volume, "pg{pg} segment {seg} lost its state, then granted {epoch}, below the volume's {volume}");
        }
        let mut epochs: Vec<Epoch> = self.segments[pg].iter().map(|s| s.log.epoch()).collect();
        epochs.sort_unstable_by(|a, b| b.cmp(a));
        self.quorum_epoch[pg] = self.quorum_epoch[pg].max(epochs[WRITE_QUORUM - 1]);
    }

    /// storaged's gossip for each segment that is joining: one round of the
    /// core's `Join` over its reachable peers, then the epoch state decided
    /// on, persisted (the epoch file may fail: retried next round) and taken.
    pub(crate) fn join_rounds(&mut self) {
        for pg in 0..self.segments.len() {
            for seg in 0..self.segments[pg].len() {
                if !self.segments[pg][seg].log.is_joining() || self.segments[pg][seg].down_until > self.now {
                    continue;
                }
                for p in 0..self.segments[pg].len() {
                    let peer = &self.segments[pg][p];
                    if p == seg || peer.down_until > self.now {
                        continue;
                    }
                    let answer = match peer.log.is_joining() {
                        true => PeerState::Joining,
                        false => PeerState::Member(EpochState { epoch: peer.log.epoch(), truncations: peer.log.truncations() }),
                    };
                    self.segments[pg][seg].join.on_answer(p as u32, answer);
                }
                let Some(state) = self.segments[pg][seg].join.decided() else { continue };
                if self.rng.chance(EPOCH_WRITE_FAULT_PERCENT) {
                    self.stats.epoch_write_faults += 1;
                    continue;
                }
                let volume = self.quorum_epoch[pg];
                assert!(state.epoch >= volume, "pg{pg} segment {seg} joined at {}, below the volume's {volume}", state.epoch);
                let s = &mut self.segments[pg][seg];
                s.lost_state = false;
                s.log.join(&state);
                s.epoch_file = state;
                self.stats.joins += 1;
            }
        }
    }

    /// A writer that crashed (or was cut off) and does not know it was
    /// deposed resends its last frames now and then.
    pub(crate) fn resend_deposed(&mut self) {
        if self.deposed.is_empty() || !self.deposed_rng.chance(DEPOSED_RESEND_PERCENT) {
            return;
        }
        let (pg, frame) = self.deposed[self.deposed_rng.below(self.deposed.len() as u64) as usize].clone();
        let seg = self.deposed_rng.below(self.segments[pg].len() as u64) as usize;
        let delay = 1 + self.deposed_rng.below(self.faults.delay_ticks_max + 1);
        self.stats.deposed_frames += 1;
        self.sent += 1;
        self.net.insert((self.now + delay, self.sent), crate::Msg::Append { pg, seg, session: crate::DEPOSED_SESSION, frame });
    }

    /// storaged's `append`: an append at an epoch the segment is not at claims it first.
    pub(crate) fn append(&mut self, pg: usize, seg: usize, epoch: Epoch, records: &ValidRecords) -> Result<AppendOutcome, Refused> {
        match self.claim(pg, seg, epoch, None) {
            Ok(_) => {}
            Err(ClaimError::Stale(_)) => return Err(Refused::Stale),
            Err(_) => return Err(Refused::Disk),
        }
        match self.segments[pg][seg].log.handle_append(epoch, records) {
            Ok(out) => Ok(out),
            Err(AppendError::StaleEpoch(_)) => Err(Refused::Stale),
            Err(AppendError::DiskFailed(_)) => Err(Refused::Disk),
            Err(e @ AppendError::Conflict { .. }) => Err(Refused::Conflict(e.to_string())),
            Err(e) => panic!("pg{pg} segment {seg} refuses records at {epoch}: {e}"),
        }
    }

    /// What a segment answers with is what a restart finds: its epoch and
    /// newest truncation are in its epoch file (they are written before the
    /// segment acts on them).
    pub(crate) fn check_disks(&self) {
        for (pg, segs) in self.segments.iter().enumerate() {
            for (seg, s) in segs.iter().enumerate() {
                let durable = (s.epoch_file.epoch, s.epoch_file.truncations.last().copied());
                assert_eq!((s.log.epoch(), s.log.last_truncation()), durable, "pg{pg} segment {seg} acts on an epoch state its epoch file lacks");
            }
        }
    }
}

/// `pwrite`: bytes at `offset`, the file extended (with zeros up to `offset`) as needed.
fn write_at(file: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let (from, to) = (offset as usize, offset as usize + bytes.len());
    if file.len() < to {
        file.resize(to, 0);
    }
    file[from..to].copy_from_slice(bytes);
}

/// storaged's `find_cut` over the simulated file.
fn find_cut(file: &[u8], scan: DiskRead) -> DiskCut {
    let (mut last_lsn, mut offset, mut records) = (scan.prev, scan.offset, 0);
    let (from, to) = (scan.offset as usize, scan.end_offset as usize);
    for rec in redo_core::record::Records::new(&file[from..to], from) {
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
