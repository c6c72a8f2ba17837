//! A claim on one segment, as storage executes it: a `Status` at a nonzero
//! epoch (a writer's or a replica's takeover, or a writer's session start),
//! with or without a truncation, and an append at an epoch the segment is
//! not at yet. A sans-IO machine over the segment's `SegmentLog`: the shell
//! runs one claim per segment at a time, calls `poll` with the log (under its
//! lock), executes the `Step` it returns and reports back with the matching
//! `on_*` call, until `Step::Done`.
//!
//! The order makes every crash safe:
//! 1. Grant the epoch (`grant_epoch`, or `grant_decided_epoch` for a claimant
//!    that truncates); a refusal ends the claim.
//! 2. Persist the new epoch state, then raise the log's epoch: after a
//!    restart older epochs (and the generation's other claimants) are still
//!    refused, and no request at an older epoch is applied after this one.
//! 3. With a truncation not recorded yet: take the files from their readers,
//!    hold appends and new flushes off (`begin_truncate`), wait for the flush
//!    in flight, cut the log at the lowest of the claim's point and the
//!    truncations of its history the segment missed (their records above it
//!    are an older writer's discarded tail), scanning the file when memory
//!    no longer holds the point, then cut the segment and page files and
//!    rebuild the page index.
//! 4. Persist the state with the new truncations, note them in the log and
//!    only then let appends in again: a restart never finds records of the new
//!    epoch above a truncation it did not record. A crash before this step
//!    leaves the truncation unrecorded: the claimant's retry cuts again
//!    (nothing is above the point by then) and records it.
//!
//! A failure to cut the files once the log is cut leaves memory and disk
//! apart: the segment takes no more appends (`handle_disk_lost`).

use thiserror::Error;

use crate::ids::{Epoch, EpochRefused, Lsn};
use crate::page_index::PageIndex;
use crate::segment_log::{DiskCut, DiskRead, SegmentLog, Truncated};
use crate::wire::{Truncation, TRUNCATIONS_MAX};

/// What a segment keeps durably about epochs (storage's epoch file): the
/// epoch it granted and its truncations, oldest first (the newest `TRUNCATIONS_MAX`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochState {
    pub epoch: Epoch,
    pub truncations: Vec<Truncation>,
}

/// What the shell does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Write this state durably, then `on_persisted` (or `on_failed`).
    PersistEpoch(EpochState),
    /// Keep readers of the segment and page files out until the claim ends, then `on_files_held`.
    HoldFiles,
    /// A flush is in flight: `poll` again once it completed or failed.
    WaitFlush,
    /// Scan the segment file for the last record at or below the point, then `on_scanned` (or `on_failed`).
    FindCut(DiskRead),
    /// Cut the segment file at `offset` (zeros from there on, synced) if any; with
    /// `reindex`, cut the page file above `above` and rebuild the page index from
    /// it and the segment file up to the log's flushed end. Then `on_files_cut`
    /// (or `on_failed`).
    CutFiles { offset: Option<u64>, reindex: bool, above: Lsn },
    /// The claim is over: answer the claimant.
    Done(Result<Claimed, ClaimError>),
}

/// A claim that succeeded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Claimed {
    /// The epoch was granted anew (and persisted).
    pub raised: bool,
    /// The truncation this claim made, if it made one.
    pub cut: Option<Cut>,
}

/// A truncation made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The claim's point, and where the log was cut (lower for a missed truncation).
    pub above: Lsn,
    pub at: Lsn,
    /// Truncations of the history the segment missed, recorded with it.
    pub missed: usize,
    /// Records discarded.
    pub records: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ClaimError {
    #[error(transparent)]
    Stale(#[from] EpochRefused),
    #[error("a truncation needs the claimant's epoch, not epoch 0")]
    NoEpoch,
    /// The segment has no epoch state yet (`crate::join`): ask again later.
    #[error("segment is joining: it has no epoch state yet and is learning it from its peers")]
    Joining,
    #[error("truncate above {above}: {why}")]
    DiskFailed { above: Lsn, why: String },
    #[error("persist {epoch}: {why}")]
    PersistFailed { epoch: Epoch, why: String },
}

#[derive(Debug)]
enum Phase {
    Grant,
    /// The new epoch is being written.
    Persisting,
    Truncate,
    HoldingFiles,
    /// Appends are held off from here until the claim ends.
    Draining,
    Scanning,
    Cutting(Truncated),
    /// The truncations are being written; the records cut.
    Recording(u64),
    Done,
}

pub struct SegmentClaim {
    epoch: Epoch,
    /// The claimant's truncation and the older ones it knows of.
    truncate: Option<(Truncation, Vec<Truncation>)>,
    phase: Phase,
    raised: bool,
    /// Where the log is cut, and the truncations it records.
    cut: Lsn,
    missed: Vec<Truncation>,
}

impl SegmentClaim {
    /// A claim at `epoch` (nonzero); with `truncate`, the claimant (which decided its
    /// generation's recovery) also has the segment discard its records above that
    /// point, given the truncations it knows of before its own.
    pub fn new(epoch: Epoch, truncate: Option<(Lsn, Vec<Truncation>)>) -> Self {
        let truncate = truncate.map(|(above, history)| (Truncation { epoch, above }, history));
        SegmentClaim { epoch, truncate, phase: Phase::Grant, raised: false, cut: Lsn::ZERO, missed: Vec::new() }
    }

    /// The next step; `log` is the segment's, the same on every call.
    pub fn poll(&mut self, log: &mut SegmentLog) -> Step {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::Grant => {
                    if self.epoch == Epoch(0) {
                        return self.done(log, Err(ClaimError::NoEpoch));
                    }
                    if log.is_joining() {
                        return self.done(log, Err(ClaimError::Joining));
                    }
                    match log.grant_claim(self.epoch, self.truncate.is_some()) {
                        Err(refused) => return self.done(log, Err(refused.into())),
                        Ok(false) => self.phase = Phase::Truncate,
                        Ok(true) => {
                            self.phase = Phase::Persisting;
                            return Step::PersistEpoch(EpochState { epoch: self.epoch, truncations: log.truncations() });
                        }
                    }
                }
                phase @ Phase::Persisting => {
                    self.phase = phase;
                    panic!("poll while the epoch is being persisted: report on_persisted");
                }
                Phase::Truncate => {
                    let Some((t, history)) = &self.truncate else { return self.done(log, Ok(())) };
                    match log.truncation_needed(t.epoch, t.above) {
                        Err(refused) => return self.done(log, Err(refused.into())),
                        Ok(false) => return self.done(log, Ok(())),
                        Ok(true) => {}
                    }
                    self.missed = log.missed_truncations(history, t.epoch);
                    self.cut = self.missed.iter().map(|m| m.above).fold(t.above, Lsn::min);
                    self.phase = Phase::HoldingFiles;
                    return Step::HoldFiles;
                }
                phase @ Phase::HoldingFiles => {
                    self.phase = phase;
                    panic!("poll before the files are held: report on_files_held");
                }
                Phase::Draining => {
                    if let Some(why) = log.disk_failed() {
                        let why = why.to_string();
                        return self.done(log, Err(self.disk_failed(why)));
                    }
                    if log.flush_inflight() {
                        self.phase = Phase::Draining;
                        return Step::WaitFlush;
                    }
                    match log.truncate_above(self.cut, None) {
                        Ok(truncated) => return self.cut_files(truncated),
                        Err(scan) => {
                            self.phase = Phase::Scanning;
                            return Step::FindCut(scan);
                        }
                    }
                }
                phase @ (Phase::Scanning | Phase::Cutting(_) | Phase::Recording(_)) => {
                    self.phase = phase;
                    panic!("poll while the shell works on the disk: report its outcome");
                }
                Phase::Done => panic!("poll after Done"),
            }
        }
    }

    /// The epoch state of `PersistEpoch` is durable.
    pub fn on_persisted(&mut self, log: &mut SegmentLog) -> Step {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Persisting => {
                log.raise_epoch(self.epoch);
                self.raised = true;
                self.phase = Phase::Truncate;
                self.poll(log)
            }
            Phase::Recording(records) => {
                let (t, _) = self.truncate.as_ref().expect("recording a truncation");
                self.missed.iter().chain([t]).for_each(|&r| log.note_truncation(r));
                log.end_truncate();
                let cut = Cut { above: t.above, at: self.cut, missed: self.missed.len(), records };
                Step::Done(Ok(Claimed { raised: self.raised, cut: Some(cut) }))
            }
            phase => panic!("on_persisted in {phase:?}"),
        }
    }

    /// The files are held (`HoldFiles`): appends and new flushes are held off from now on.
    pub fn on_files_held(&mut self, log: &mut SegmentLog) -> Step {
        assert!(matches!(self.phase, Phase::HoldingFiles), "on_files_held in {:?}", self.phase);
        log.begin_truncate();
        self.phase = Phase::Draining;
        self.poll(log)
    }

    /// The scan of `FindCut` found the cut.
    pub fn on_scanned(&mut self, log: &mut SegmentLog, cut: DiskCut) -> Step {
        assert!(matches!(self.phase, Phase::Scanning), "on_scanned in {:?}", self.phase);
        let truncated = log.truncate_above(self.cut, Some(cut)).expect("truncate_above with the disk cut it asked for");
        self.cut_files(truncated)
    }

    /// `CutFiles` is done; `index` is the rebuilt page index if it asked for one.
    pub fn on_files_cut(&mut self, log: &mut SegmentLog, index: Option<PageIndex>) -> Step {
        let Phase::Cutting(truncated) = std::mem::replace(&mut self.phase, Phase::Done) else { panic!("on_files_cut outside CutFiles") };
        if let Some(index) = index {
            log.install_page_index(index);
        }
        let (t, _) = self.truncate.as_ref().expect("cutting for a truncation");
        // Neither is recorded yet: the missed ones are newer than the newest recorded, `t` was needed.
        let mut truncations = log.truncations();
        truncations.extend(self.missed.iter().chain([t]));
        truncations.drain(..truncations.len().saturating_sub(TRUNCATIONS_MAX));
        self.phase = Phase::Recording(truncated.records);
        Step::PersistEpoch(EpochState { epoch: log.epoch(), truncations })
    }

    /// The disk step asked for failed (`PersistEpoch`, `FindCut` or `CutFiles`).
    pub fn on_failed(&mut self, log: &mut SegmentLog, why: String) -> Step {
        let error = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Persisting => ClaimError::PersistFailed { epoch: self.epoch, why },
            // Nothing changed yet; or the cut is on disk but not recorded: a crash now is
            // safe (see step 4), so is the claimant's retry, and nothing appends meanwhile
            // (the writer starts a session only after its claim; peers repair only a segment
            // at their newest truncation).
            Phase::Scanning | Phase::Recording(_) => self.disk_failed(why),
            Phase::Cutting(_) => {
                let error = self.disk_failed(why);
                log.handle_disk_lost(format!("{error} (memory and disk disagree now)"));
                error
            }
            phase => panic!("on_failed in {phase:?}"),
        };
        self.done(log, Err(error))
    }

    fn cut_files(&mut self, truncated: Truncated) -> Step {
        self.phase = Phase::Cutting(truncated);
        Step::CutFiles { offset: truncated.cut_offset, reindex: truncated.reindex, above: self.cut }
    }

    fn disk_failed(&self, why: String) -> ClaimError {
        ClaimError::DiskFailed { above: self.cut, why }
    }

    /// Ends the claim without a truncation made: appends come in again if they were held off.
    fn done(&mut self, log: &mut SegmentLog, result: Result<(), ClaimError>) -> Step {
        log.end_truncate();
        self.phase = Phase::Done;
        Step::Done(result.map(|()| Claimed { raised: self.raised, cut: None }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment_file::SEGMENT_HEADER_BYTES;
    use crate::segment_log::tests::{batch, config, ID};
    use crate::segment_log::{AppendError, DiskIndex};

    fn epoch(generation: u64, nonce: u32) -> Epoch {
        Epoch((generation << 32) | nonce as u64)
    }

    /// A segment at `e` holding records 1..=4 (each linking to the one before).
    fn log_at(e: Epoch) -> SegmentLog {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        log.raise_epoch(e);
        log.handle_append(e, &batch(&[(1, 0), (2, 1), (3, 2), (4, 3)])).unwrap();
        log
    }

    #[test]
    fn a_new_epoch_is_persisted_before_the_log_takes_it() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        let e1 = epoch(1, 1);
        let mut c = SegmentClaim::new(e1, None);
        assert_eq!(c.poll(&mut log), Step::PersistEpoch(EpochState { epoch: e1, truncations: vec![] }));
        assert_eq!(log.epoch(), Epoch(0), "raised only once durable");
        assert_eq!(c.on_persisted(&mut log), Step::Done(Ok(Claimed { raised: true, cut: None })));
        assert_eq!(log.epoch(), e1);
        // The generation's other claimant is refused, unless it decided the recovery
        // (it truncates) and e1 never truncated here.
        let rival = epoch(1, 2);
        assert!(matches!(SegmentClaim::new(rival, None).poll(&mut log), Step::Done(Err(ClaimError::Stale(_)))));
        assert!(matches!(SegmentClaim::new(rival, Some((Lsn::ZERO, vec![]))).poll(&mut log), Step::PersistEpoch(s) if s.epoch == rival));
        assert_eq!(SegmentClaim::new(Epoch(0), Some((Lsn::ZERO, vec![]))).poll(&mut log), Step::Done(Err(ClaimError::NoEpoch)));
    }

    #[test]
    fn a_joining_segment_grants_nothing_until_it_joins_at_its_peers_state() {
        let (e1, e2) = (epoch(1, 1), epoch(2, 1));
        let mut log = SegmentLog::new(ID, config(1 << 20)).awaiting_join();
        // A deposed writer at e1 (the volume is at e2) finds the empty segment first.
        assert_eq!(SegmentClaim::new(e1, None).poll(&mut log), Step::Done(Err(ClaimError::Joining)));
        assert_eq!(log.handle_append(Epoch(0), &batch(&[(1, 0)])).unwrap_err(), AppendError::Joining);
        let t = Truncation { epoch: e2, above: Lsn(7) };
        log.join(&EpochState { epoch: e2, truncations: vec![t] });
        assert!(matches!(SegmentClaim::new(e1, None).poll(&mut log), Step::Done(Err(ClaimError::Stale(_)))));
        assert_eq!(SegmentClaim::new(e2, None).poll(&mut log), Step::Done(Ok(Claimed::default())));
        assert_eq!(log.check_truncated_for(e2), Ok(()), "its peers' truncation is its own: readers of e2 may use it");
    }

    #[test]
    fn a_truncation_waits_for_the_flush_in_flight_and_is_recorded_before_appends_resume() {
        let (e1, e2) = (epoch(1, 1), epoch(2, 1));
        let mut log = log_at(e1);
        let job = log.poll_flush(&mut Vec::new()).expect("a flush");
        let mut c = SegmentClaim::new(e2, Some((Lsn(2), vec![])));
        assert!(matches!(c.poll(&mut log), Step::PersistEpoch(_)));
        assert_eq!(c.on_persisted(&mut log), Step::HoldFiles);
        assert_eq!(c.on_files_held(&mut log), Step::WaitFlush);
        assert_eq!(c.poll(&mut log), Step::WaitFlush);
        assert_eq!(log.handle_append(e2, &batch(&[(5, 4)])).unwrap_err(), AppendError::Truncating);
        log.handle_flushed(job);
        let Step::CutFiles { offset: Some(offset), reindex: false, above: Lsn(2) } = c.poll(&mut log) else { panic!("the flushed records above 2 are cut") };
        assert_eq!(offset, log.flushed_end());
        let t = Truncation { epoch: e2, above: Lsn(2) };
        assert_eq!(c.on_files_cut(&mut log, None), Step::PersistEpoch(EpochState { epoch: e2, truncations: vec![t] }));
        assert!(log.truncations().is_empty(), "noted once durable");
        assert_eq!(log.handle_append(e2, &batch(&[(5, 2)])).unwrap_err(), AppendError::Truncating, "appends wait until it is recorded");
        let cut = Cut { above: Lsn(2), at: Lsn(2), missed: 0, records: 2 };
        assert_eq!(c.on_persisted(&mut log), Step::Done(Ok(Claimed { raised: true, cut: Some(cut) })));
        assert_eq!((log.truncations(), log.scl()), (vec![t], Lsn(2)));
        log.handle_append(e2, &batch(&[(5, 2)])).expect("appends resume");
        log.check_invariants();
        // A repeat (a writer's session start after its recovery) changes nothing.
        assert_eq!(SegmentClaim::new(e2, Some((Lsn(2), vec![]))).poll(&mut log), Step::Done(Ok(Claimed::default())));
        assert_eq!(log.scl(), Lsn(5));
    }

    #[test]
    fn a_missed_truncation_cuts_lower_and_is_recorded_too() {
        let (e1, e2) = (epoch(1, 1), epoch(2, 1));
        let mut log = log_at(e1);
        // e1's recovery truncated above 1, which this segment never heard: its 2..=4 are stale.
        let missed = Truncation { epoch: e1, above: Lsn(1) };
        let mut c = SegmentClaim::new(e2, Some((Lsn(3), vec![missed])));
        c.poll(&mut log);
        c.on_persisted(&mut log);
        assert_eq!(c.on_files_held(&mut log), Step::CutFiles { offset: None, reindex: false, above: Lsn(1) });
        let Step::PersistEpoch(state) = c.on_files_cut(&mut log, None) else { panic!("persist") };
        assert_eq!(state.truncations, vec![missed, Truncation { epoch: e2, above: Lsn(3) }]);
        let Step::Done(Ok(Claimed { cut: Some(cut), .. })) = c.on_persisted(&mut log) else { panic!("done") };
        assert_eq!((cut.at, cut.missed, cut.records, log.scl()), (Lsn(1), 1, 3, Lsn(1)));
        assert_eq!(log.truncations(), state.truncations);
    }

    #[test]
    fn a_cut_below_memory_scans_the_file() {
        let e1 = epoch(1, 1);
        let (start, end) = (SEGMENT_HEADER_BYTES as u64, SEGMENT_HEADER_BYTES as u64 + 1000);
        let mut log = SegmentLog::recovered(ID, config(1 << 20), e1, Lsn(10), end, DiskIndex::default());
        let mut c = SegmentClaim::new(e1, Some((Lsn(5), vec![])));
        assert_eq!(c.poll(&mut log), Step::HoldFiles, "at its epoch already: nothing to persist first");
        let Step::FindCut(scan) = c.on_files_held(&mut log) else { panic!("a scan") };
        assert_eq!((scan.offset, scan.end_offset, scan.after), (start, end, Lsn(5)));
        let step = c.on_scanned(&mut log, DiskCut { last_lsn: Lsn(5), offset: start + 600, records: 5 });
        assert_eq!(step, Step::CutFiles { offset: Some(start + 600), reindex: false, above: Lsn(5) });
        assert_eq!((log.scl(), log.flushed_end()), (Lsn(5), start + 600));
    }

    #[test]
    fn disk_failures_refuse_the_claim_and_after_a_cut_stop_the_segment() {
        let (e1, e2) = (epoch(1, 1), epoch(2, 1));
        // The new epoch cannot be written: nothing changed.
        let mut log = log_at(e1);
        let mut c = SegmentClaim::new(e2, Some((Lsn(2), vec![])));
        c.poll(&mut log);
        let failed = c.on_failed(&mut log, "EIO".into());
        assert_eq!(failed, Step::Done(Err(ClaimError::PersistFailed { epoch: e2, why: "EIO".into() })));
        assert_eq!((log.epoch(), log.scl(), log.disk_failed()), (e1, Lsn(4), None));
        log.handle_append(e1, &batch(&[(5, 4)])).expect("the segment still serves its writer");
        // The truncation cannot be recorded: the claim fails, the segment goes on (a retry records it).
        let mut c = SegmentClaim::new(e2, Some((Lsn(2), vec![])));
        c.poll(&mut log);
        c.on_persisted(&mut log);
        let _cut = c.on_files_held(&mut log);
        assert!(matches!(c.on_files_cut(&mut log, None), Step::PersistEpoch(_)));
        assert!(matches!(c.on_failed(&mut log, "ENOSPC".into()), Step::Done(Err(ClaimError::DiskFailed { .. }))));
        assert_eq!((log.truncations(), log.disk_failed(), log.scl()), (vec![], None, Lsn(2)));
        let mut retry = SegmentClaim::new(e2, Some((Lsn(2), vec![])));
        assert_eq!(retry.poll(&mut log), Step::HoldFiles, "not recorded: the retry truncates (nothing is above the point)");
        assert_eq!(retry.on_files_held(&mut log), Step::CutFiles { offset: None, reindex: false, above: Lsn(2) });
        retry.on_files_cut(&mut log, None);
        assert!(matches!(retry.on_persisted(&mut log), Step::Done(Ok(Claimed { cut: Some(Cut { records: 0, .. }), .. }))));
        // The files cannot be cut once the log was: memory and disk disagree, no more appends.
        let mut log = log_at(e1);
        let mut c = SegmentClaim::new(e2, Some((Lsn(2), vec![])));
        c.poll(&mut log);
        c.on_persisted(&mut log);
        assert!(matches!(c.on_files_held(&mut log), Step::CutFiles { .. }));
        assert!(matches!(c.on_failed(&mut log, "ENOSPC".into()), Step::Done(Err(ClaimError::DiskFailed { .. }))));
        assert!(log.disk_failed().is_some());
        assert!(matches!(log.handle_append(e2, &batch(&[(3, 2)])), Err(AppendError::DiskFailed(_))));
        assert!(log.truncations().is_empty());
    }
}
