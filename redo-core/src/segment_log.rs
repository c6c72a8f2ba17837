//! The in-memory log of one segment: a sans-IO state machine.
//!
//! Call order: `handle_append` for every batch (answer the client with the
//! returned position), `poll_flush` whenever the flusher is idle for this
//! segment, write the handed-out records at the job's offset, then report
//! `handle_flushed` (once the write is durable) or `handle_flush_failed`. Pulls call
//! `read`, which serves from memory or says where on disk to look.
//! GetPage@LSN and the coalescer call `page_read`, which does the same for
//! one page's image and records, from the per-page index (`page_index`)
//! that the log keeps as records join the chain.
//!
//! Records form a chain through `prev_lsn_in_segment`. The chain from the
//! segment's first record up to SCL is complete; records above a hole wait
//! in `pending` until the hole is filled. Only the complete chain is flushed,
//! so the segment file is always a gap-free prefix and `flushed_lsn <= scl`.
//!
//! Epochs: `handle_append` and claims follow `Epoch::grant` (a generation is
//! granted to one claimant only). Claims, and the truncation a new writer's
//! recovery asks for, are sequenced by `segment_claim::SegmentClaim` over the
//! calls here (`raise_epoch`, `begin_truncate`, `truncate_above`,
//! `install_page_index`, `note_truncation`, `end_truncate`).

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use thiserror::Error;

use crate::ids::{Epoch, EpochRefused, Lsn, PageId, SegmentId};
use crate::page_index::{Located, PageBroken, PageIndex, PagePlan};
use crate::record::{TrustedRecords, ValidRecords};
use crate::segment_claim::EpochState;
use crate::segment_file::SEGMENT_HEADER_BYTES;
use crate::wire::{SegmentPosition, Truncation, TRUNCATIONS_MAX};

/// `Epoch::grant` for a segment at `current`, where `Epoch(0)` means no
/// claim was ever granted: the first claimant of any epoch gets it (so
/// generation 0 too is granted to one claimant only).
pub fn grant_epoch(current: Epoch, requested: Epoch) -> Result<bool, EpochRefused> {
    if current == Epoch(0) && requested != current {
        return Ok(true);
    }
    current.grant(requested)
}

/// `grant_epoch` for a claimant that decided its generation's recovery (it asks
/// to truncate): it also takes a segment another claimant of the same
/// generation got first, unless that one truncated here (it was the decider).
/// A claimant that did not truncate cannot have won a write quorum of every PG
/// (the decider holds one in each), so it never wrote; without this, the
/// segments it got would refuse the winner until the next generation.
pub fn grant_decided_epoch(current: Epoch, current_truncated: bool, requested: Epoch) -> Result<bool, EpochRefused> {
    match grant_epoch(current, requested) {
        Err(_) if requested.generation() == current.generation() && current != Epoch(0) && !current_truncated => Ok(true),
        other => other,
    }
}

/// A segment that cannot serve a reader of the writer at `reader`: see `SegmentLog::check_truncated_for`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MissedTruncation {
    pub segment: SegmentId,
    pub reader: Epoch,
    pub at: Epoch,
    pub last: Option<Truncation>,
}

impl std::fmt::Display for MissedTruncation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (segment, reader, at, last) = (self.segment, self.reader, self.at, self.last);
        match last {
            // After a takeover, until the reader follows the new writer.
            Some(t) if t.epoch > reader => {
                write!(
                    f,
                    "{segment} was truncated by a newer writer ({}, above {}) than the reader's ({reader}): read again once following it",
                    t.epoch, t.above
                )
            }
            _ => write!(f, "{segment} has not recorded the truncation of {reader} (at {at}, last truncation {last:?})"),
        }
    }
}

impl std::error::Error for MissedTruncation {}

/// A page read below the GC horizon (`crate::gc`): no reader reads there, and
/// storage may have reclaimed the versions it asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("{segment}: a read at {lsn} is below the GC horizon {horizon} (page versions there may be reclaimed); read at the horizon or later")]
pub struct BelowHorizon {
    pub segment: SegmentId,
    pub lsn: Lsn,
    pub horizon: Lsn,
}

/// A read of records that storage reclaimed: a peer that needs them must be
/// rebuilt from page images (hydration) instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("{segment}: records up to {reclaimed} were reclaimed (below the GC horizon), a read after {after} needs them")]
pub struct Reclaimed {
    pub segment: SegmentId,
    pub after: Lsn,
    pub reclaimed: Lsn,
}

/// Where a read's records are when memory does not serve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unserved {
    Disk(DiskRead),
    Reclaimed(Reclaimed),
}

/// One sparse disk-index entry per this many bytes of segment file.
pub const INDEX_STRIDE_BYTES: u64 = 64 << 10;

#[derive(Clone, Debug)]
pub struct SegmentLogConfig {
    /// Unflushed bytes (complete and pending) past which appends get `Busy`.
    /// A batch that extends the complete chain is measured against the
    /// complete bytes only, so that records waiting above a hole never lock
    /// out the records that fill it; at most about twice this is held.
    pub hot_bytes_max: usize,
    /// Flushed records kept in memory to serve pulls without disk reads.
    pub cache_bytes_max: usize,
    /// Largest single flush job.
    pub flush_bytes_max: usize,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AppendError {
    #[error("stale epoch: {0}")]
    StaleEpoch(EpochRefused),
    #[error("segment is truncating its log for a new writer")]
    Truncating,
    #[error("segment is joining: it has no epoch state yet and is learning it from its peers")]
    Joining,
    #[error("hot log full: {hot_bytes} bytes unflushed, limit {hot_bytes_max}")]
    Busy { hot_bytes: usize, hot_bytes_max: usize },
    #[error("segment cannot write to disk: {0}")]
    DiskFailed(String),
    #[error("record {lsn} links back to {prev} but {held} lies in between")]
    Conflict { lsn: Lsn, prev: Lsn, held: Lsn },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    pub position: SegmentPosition,
    /// The batch raised the segment's epoch: persist it before answering.
    pub epoch_raised: bool,
    /// Records that were new (the rest were duplicates of held records).
    pub inserted: u32,
    pub inserted_bytes: usize,
}

/// A flush to perform: write the records handed out with it at `offset`,
/// durably, then report `handle_flushed(job)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushJob {
    pub offset: u64,
    pub end_offset: u64,
    pub upto: Lsn,
}

/// Where the records of a read come from when memory no longer holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskRead {
    /// Scan the segment file from this offset, whose record links back to `prev`.
    pub offset: u64,
    pub prev: Lsn,
    /// Flushed end of the file: do not read past it.
    pub end_offset: u64,
    /// Serve records in `(after, upto]`.
    pub after: Lsn,
    pub upto: Lsn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IndexEntry {
    lsn: Lsn,
    prev: Lsn,
    offset: u64,
}

/// Where the log in the segment file starts: its first record lies at
/// `offset` and links back to `prev`. The records up to `prev` were reclaimed
/// (`SegmentLog::reclaim`), and the file's blocks before `offset` freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogStart {
    pub offset: u64,
    pub prev: Lsn,
}

impl LogStart {
    /// A log nothing was reclaimed from: it starts after the file header.
    pub const FILE: LogStart = LogStart { offset: SEGMENT_HEADER_BYTES as u64, prev: Lsn::ZERO };
}

/// Sparse map from LSN to segment-file offset, for pulls served from disk.
#[derive(Clone, Debug)]
pub struct DiskIndex {
    start: LogStart,
    entries: Vec<IndexEntry>,
    next_offset: u64,
}

impl Default for DiskIndex {
    fn default() -> Self {
        DiskIndex::starting_at(LogStart::FILE)
    }
}

impl DiskIndex {
    /// The index of a log that starts at `start`.
    pub fn starting_at(start: LogStart) -> Self {
        DiskIndex { start, entries: Vec::new(), next_offset: start.offset }
    }

    pub fn start(&self) -> LogStart {
        self.start
    }

    /// Notes that the record `lsn` (linking back to `prev`) sits at `offset`.
    pub fn note(&mut self, lsn: Lsn, prev: Lsn, offset: u64) {
        if offset >= self.next_offset {
            self.entries.push(IndexEntry { lsn, prev, offset });
            self.next_offset = offset + INDEX_STRIDE_BYTES;
        }
    }

    /// Forgets the entries at or past `end` (a truncated file's new end).
    fn truncate(&mut self, end: u64) {
        self.entries.retain(|e| e.offset < end);
        self.next_offset = self.entries.last().map_or(self.start.offset, |e| e.offset + INDEX_STRIDE_BYTES);
    }

    /// The last indexed record at or before the first record above `after`.
    fn seek(&self, after: Lsn) -> (u64, Lsn) {
        let i = self.entries.partition_point(|e| e.lsn <= after);
        match i.checked_sub(1) {
            Some(i) => (self.entries[i].offset, self.entries[i].prev),
            None => (self.start.offset, self.start.prev),
        }
    }

    /// The last entry that `fits` (entries are in LSN and offset order).
    fn last_where(&self, fits: impl Fn(&IndexEntry) -> bool) -> Option<&IndexEntry> {
        self.entries.iter().rev().find(|e| fits(e))
    }
}

/// Where the image and records of one page as of an LSN are: apply the
/// records of `parts`, in order, to the image `base` (or the empty page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRead {
    /// An image in the shell's page file.
    pub base: Option<Located>,
    pub parts: Vec<PagePart>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PagePart {
    /// One record of the page, from memory.
    Memory(Bytes),
    /// One record of the page, in the segment file.
    Disk(Located),
    /// Every record of the page in this range of the segment file: for a read
    /// older than the page index keeps.
    Scan(DiskRead),
}

/// A run of records each linking back to the one before: the unit the chain
/// holds, so that per-record work on the hot path is reading headers only.
struct Fragment {
    /// Segment-file offset of the first record, assigned when the fragment joins the chain.
    offset: u64,
    first_lsn: Lsn,
    /// `prev_lsn_in_segment` of the first record.
    prev: Lsn,
    last_lsn: Lsn,
    records: u32,
    bytes: Bytes,
}

/// `part` itself if it is most of its batch, else a copy that frees the batch.
fn own(part: Bytes, batch_bytes: usize) -> Bytes {
    if part.len() * 4 < batch_bytes {
        Bytes::copy_from_slice(&part)
    } else {
        part
    }
}

/// Where a truncation falls in the part of the log that memory no longer
/// holds, found by scanning the segment file as `truncate_above` asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskCut {
    /// The last record at or below the truncation point (`Lsn::ZERO` if none).
    pub last_lsn: Lsn,
    /// File offset after it: where the first record above the point starts.
    pub offset: u64,
    /// Records above the point in the scanned range (for metrics).
    pub records: u64,
}

/// What a truncation changed, and what the shell must do on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncated {
    /// Zero the segment file from this offset on and fdatasync, before the
    /// truncation is reported: flushed records above the point lie there.
    pub cut_offset: Option<u64>,
    /// Records discarded (chain, pending and, from the scan, on disk).
    pub records: u64,
    /// The page index was taken out (it may hold records above the point): rebuild
    /// it from the page file and the segment file up to `flushed_end`, then
    /// `install_page_index`. Page images above the point must go too.
    pub reindex: bool,
}

/// A record waiting above a hole.
struct Pending {
    prev: Lsn,
    bytes: Bytes,
}

pub struct SegmentLog {
    id: SegmentId,
    config: SegmentLogConfig,
    epoch: Epoch,
    scl: Lsn,
    flushed_lsn: Lsn,
    /// The complete chain `(chain_base, scl]` in LSN order: `clean` fragments
    /// (flushed, kept as a read cache), then `inflight` ones being flushed,
    /// then dirty ones.
    chain: VecDeque<Fragment>,
    chain_base: Lsn,
    clean: usize,
    inflight: usize,
    /// Records above a hole, by LSN.
    pending: BTreeMap<Lsn, Pending>,
    /// Unflushed bytes: dirty and in-flight chain fragments plus `pending_bytes`.
    hot_bytes: usize,
    pending_bytes: usize,
    clean_bytes: usize,
    /// File offset after the last record handed to a flush.
    file_end: u64,
    /// File offset after the last record of the chain, once flushed.
    chain_end: u64,
    flushed_end: u64,
    index: DiskIndex,
    /// Per-page index for `page_read`; without one, page reads scan the log.
    pages: Option<PageIndex>,
    disk_failed: Option<String>,
    /// Set between `begin_truncate` and `end_truncate`: no appends, no new flushes.
    truncating: bool,
    /// Set from `awaiting_join` until `join`: no claims, no appends (see `join`).
    joining: bool,
    /// The highest GC horizon a writer sent: reads below it are refused.
    horizon: Lsn,
    /// Truncations recorded (durably, by the shell), oldest first, at most `TRUNCATIONS_MAX`.
    truncations: VecDeque<Truncation>,
}

impl SegmentLog {
    /// A segment whose file holds the gap-free chain up to `last_lsn`, ending at `file_end`.
    pub fn recovered(id: SegmentId, config: SegmentLogConfig, epoch: Epoch, last_lsn: Lsn, file_end: u64, index: DiskIndex) -> Self {
        assert!(file_end >= SEGMENT_HEADER_BYTES as u64);
        SegmentLog {
            id,
            config,
            epoch,
            scl: last_lsn,
            flushed_lsn: last_lsn,
            chain: VecDeque::new(),
            chain_base: last_lsn,
            clean: 0,
            inflight: 0,
            pending: BTreeMap::new(),
            hot_bytes: 0,
            pending_bytes: 0,
            clean_bytes: 0,
            file_end,
            chain_end: file_end,
            flushed_end: file_end,
            index,
            pages: None,
            disk_failed: None,
            truncating: false,
            joining: false,
            horizon: Lsn::ZERO,
            truncations: VecDeque::new(),
        }
    }

    /// The truncations recovered from the segment's persisted epoch state.
    pub fn with_truncations(mut self, truncations: &[Truncation]) -> Self {
        truncations.iter().for_each(|&t| self.note_truncation(t));
        self
    }

    /// An empty segment with no epoch state, on a node that knows its peers:
    /// it grants no claim and takes no append until it `join`s (`crate::join`).
    pub fn awaiting_join(mut self) -> Self {
        assert!(self.scl == Lsn::ZERO && self.epoch == Epoch(0) && self.truncations.is_empty(), "only an empty segment joins");
        self.joining = true;
        self
    }

    pub fn is_joining(&self) -> bool {
        self.joining
    }

    /// A writer's GC horizon, with its frame: it never moves back.
    pub fn note_horizon(&mut self, horizon: Lsn) {
        self.horizon = self.horizon.max(horizon);
    }

    pub fn horizon(&self) -> Lsn {
        self.horizon
    }

    /// `Err` for a page read at `lsn` below the GC horizon.
    pub fn check_readable(&self, lsn: Lsn) -> Result<(), BelowHorizon> {
        match lsn < self.horizon {
            true => Err(BelowHorizon { segment: self.id, lsn, horizon: self.horizon }),
            false => Ok(()),
        }
    }

    /// Where the log starts in the segment file.
    pub fn log_start(&self) -> LogStart {
        self.index.start
    }

    /// How far the log can be reclaimed, keeping at least `retain_bytes` of it
    /// (for peers that fell behind; see `reclaim`). Only whole index strides
    /// go, and only records that no read may need: at or below the GC horizon
    /// and the flushed LSN, and below every page's first needed record
    /// (`PageIndex::first_needed`, after `PageIndex::retire`). `None` if nothing
    /// more can go, or without a page index (nothing tells what reads need).
    pub fn reclaim_point(&self, retain_bytes: u64) -> Option<LogStart> {
        let pages = self.pages.as_ref()?;
        let below = pages.first_needed();
        let upto = self.horizon.min(self.flushed_lsn);
        let offset_max = self.flushed_end.saturating_sub(retain_bytes);
        let e = self.index.last_where(|e| e.offset <= offset_max && e.prev < below && e.prev <= upto)?;
        (e.offset > self.index.start.offset).then_some(LogStart { offset: e.offset, prev: e.prev })
    }

    /// Forgets the log before `start` (from `reclaim_point`): reads that need
    /// the records up to `start.prev` get `Reclaimed` from now on. The shell
    /// persists the new start before it frees the file's blocks.
    pub fn reclaim(&mut self, start: LogStart) {
        assert!(start.offset >= self.index.start.offset && start.prev >= self.index.start.prev, "the log start never moves back");
        self.index.entries.retain(|e| e.offset >= start.offset);
        self.index.start = start;
    }

    /// Records at or below this LSN pin the log three quarters of
    /// `retain_bytes` from its flushed end: their pages are imaged
    /// (`PageIndex::pinning_pages`) so that the log can be reclaimed before it
    /// outgrows `retain_bytes`, and no sooner (each image costs a page's bytes).
    pub fn pin_lsn(&self, retain_bytes: u64) -> Lsn {
        let offset_max = self.flushed_end.saturating_sub(retain_bytes / 4 * 3);
        self.index.last_where(|e| e.offset <= offset_max).map_or(Lsn::ZERO, |e| e.lsn)
    }

    /// Takes the epoch state `crate::join::Join` decided on, once the shell persisted it.
    pub fn join(&mut self, state: &EpochState) {
        assert!(self.joining, "join on a segment that is not joining");
        self.joining = false;
        self.epoch = state.epoch;
        state.truncations.iter().for_each(|&t| self.note_truncation(t));
    }

    pub fn new(id: SegmentId, config: SegmentLogConfig) -> Self {
        Self::recovered(id, config, Epoch(0), Lsn::ZERO, SEGMENT_HEADER_BYTES as u64, DiskIndex::default())
    }

    /// Keeps `pages` (holding every record of the recovered chain) up to
    /// date as records join the chain, for `page_read`.
    pub fn with_page_index(mut self, pages: PageIndex) -> Self {
        self.pages = Some(pages);
        self
    }

    pub fn page_index(&self) -> Option<&PageIndex> {
        self.pages.as_ref()
    }

    /// The page index, for the coalescer to note the images it stores.
    pub fn page_index_mut(&mut self) -> Option<&mut PageIndex> {
        self.pages.as_mut()
    }

    pub fn id(&self) -> SegmentId {
        self.id
    }
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    pub fn scl(&self) -> Lsn {
        self.scl
    }
    pub fn flushed_lsn(&self) -> Lsn {
        self.flushed_lsn
    }
    /// File offset after the last flushed record.
    pub fn flushed_end(&self) -> u64 {
        self.flushed_end
    }
    pub fn hot_bytes(&self) -> usize {
        self.hot_bytes
    }
    /// Records waiting above a hole.
    pub fn pending_records(&self) -> usize {
        self.pending.len()
    }
    pub fn position(&self) -> SegmentPosition {
        SegmentPosition { pg: self.id.pg, scl: self.scl, flushed_lsn: self.flushed_lsn }
    }
    pub fn disk_failed(&self) -> Option<&str> {
        self.disk_failed.as_deref()
    }

    /// Moves the segment to `epoch`, which `Epoch::grant` must allow: from now
    /// on older epochs and other claimants of its generation get `StaleEpoch`.
    /// The shell persists the epoch before calling this.
    pub fn raise_epoch(&mut self, epoch: Epoch) {
        assert!(self.grant_claim(epoch, true).is_ok(), "raising {} to {epoch}, which it does not grant", self.epoch);
        self.epoch = epoch;
    }

    /// Whether a claim at `epoch` moves the segment there (`Ok(true)`), finds it
    /// there already (`Ok(false)`) or is refused: `grant_decided_epoch` for a
    /// claimant that `truncates`, `grant_epoch` otherwise.
    pub fn grant_claim(&self, epoch: Epoch, truncates: bool) -> Result<bool, EpochRefused> {
        let truncated = self.last_truncation().is_some_and(|t| t.epoch == self.epoch);
        match truncates {
            true => grant_decided_epoch(self.epoch, truncated, epoch),
            false => grant_epoch(self.epoch, epoch),
        }
    }

    /// `Err` when a reader of the writer at `epoch` (nonzero) must not read this
    /// segment: it has not recorded that epoch's truncation, so it may still
    /// hold an older writer's records that the recovery discarded.
    pub fn check_truncated_for(&self, epoch: Epoch) -> Result<(), MissedTruncation> {
        match self.last_truncation() {
            Some(t) if t.epoch == epoch => Ok(()),
            _ if epoch == Epoch(0) => Ok(()),
            last => Err(MissedTruncation { segment: self.id, reader: epoch, at: self.epoch, last }),
        }
    }

    /// Truncations recorded, oldest first.
    pub fn truncations(&self) -> Vec<Truncation> {
        self.truncations.iter().copied().collect()
    }

    /// The newest truncation recorded.
    pub fn last_truncation(&self) -> Option<Truncation> {
        self.truncations.back().copied()
    }

    /// Whether a claimant at `epoch` asking to truncate above `above` needs a
    /// truncation: `Ok(false)` if this one is recorded already (a repeat),
    /// `Err` unless `epoch` is the segment's epoch (claim it first).
    pub fn truncation_needed(&self, epoch: Epoch, above: Lsn) -> Result<bool, EpochRefused> {
        if epoch != self.epoch {
            return Err(EpochRefused { requested: epoch, current: self.epoch });
        }
        Ok(!self.truncations.contains(&Truncation { epoch, above }))
    }

    /// The truncations of `history` this segment missed: newer than its own
    /// newest and older than `epoch` (the claimant's). Its records above the
    /// lowest of them are an older writer's discarded tail: cut there too.
    pub fn missed_truncations(&self, history: &[Truncation], epoch: Epoch) -> Vec<Truncation> {
        let newest = self.last_truncation().map_or(Epoch(0), |t| t.epoch);
        history.iter().copied().filter(|t| t.epoch > newest && t.epoch < epoch).collect()
    }

    /// Records a truncation, once it is durable; keeps the newest `TRUNCATIONS_MAX`.
    pub fn note_truncation(&mut self, t: Truncation) {
        if self.truncations.contains(&t) {
            return;
        }
        self.truncations.push_back(t);
        while self.truncations.len() > TRUNCATIONS_MAX {
            self.truncations.pop_front();
        }
    }

    /// Holds appends (`AppendError::Truncating`) and new flushes off until `end_truncate`.
    pub fn begin_truncate(&mut self) {
        self.truncating = true;
    }

    pub fn end_truncate(&mut self) {
        self.truncating = false;
    }

    /// A flush job is out: wait for its completion before `truncate_above`.
    pub fn flush_inflight(&self) -> bool {
        self.inflight > 0
    }

    /// Discards every record above `above`: the chain ends at its last record
    /// at or below it (SCL and flushed LSN drop to it if higher), records
    /// waiting above holes past it go. Call between `begin_truncate` and
    /// `end_truncate` with no flush in flight. When the point lies below what
    /// memory holds, returns where to scan the file; call again with the
    /// scan's `DiskCut`. A point at or above SCL leaves the chain alone.
    pub fn truncate_above(&mut self, above: Lsn, disk: Option<DiskCut>) -> Result<Truncated, DiskRead> {
        assert!(self.truncating && self.inflight == 0, "truncate_above outside begin_truncate or with a flush in flight");
        debug_assert_eq!(self.file_end, self.flushed_end);
        let mut records = 0u64;
        let flushed_end_before = self.flushed_end;
        // Records above holes: all of them when the chain itself is cut.
        let dropped: Vec<Lsn> = self.pending.range(Lsn(above.0.saturating_add(1))..).map(|(&l, _)| l).collect();
        if above >= self.scl {
            for l in dropped {
                let p = self.pending.remove(&l).expect("listed above");
                self.hot_bytes -= p.bytes.len();
                self.pending_bytes -= p.bytes.len();
                records += 1;
            }
            return Ok(Truncated { cut_offset: None, records, reindex: false });
        }
        if above < self.chain_base {
            let Some(cut) = disk else {
                let (offset, prev) = self.index.seek(above);
                return Err(DiskRead { offset, prev, end_offset: self.flushed_end, after: above, upto: self.chain_base });
            };
            assert!(cut.last_lsn <= above && cut.offset <= self.flushed_end, "disk cut {cut:?} outside the flushed log");
            records += cut.records + self.pending.len() as u64;
            records += self.chain.iter().map(|f| f.records as u64).sum::<u64>();
            self.chain.clear();
            self.pending.clear();
            (self.clean, self.clean_bytes, self.hot_bytes, self.pending_bytes) = (0, 0, 0, 0);
            (self.scl, self.flushed_lsn, self.chain_base) = (cut.last_lsn, cut.last_lsn, cut.last_lsn);
            (self.file_end, self.flushed_end, self.chain_end) = (cut.offset, cut.offset, cut.offset);
        } else {
            records += self.pending.len() as u64;
            self.pending.clear();
            self.hot_bytes -= self.pending_bytes;
            self.pending_bytes = 0;
            // The first fragment holding a record above the point: keep its records at or below.
            let i = self.chain.partition_point(|f| f.last_lsn <= above);
            let f = &mut self.chain[i];
            let (mut keep_bytes, mut keep_records, mut keep_last) = (0, 0, f.prev);
            for (rec, range) in TrustedRecords::new(&f.bytes) {
                if rec.lsn() > above {
                    break;
                }
                (keep_bytes, keep_records, keep_last) = (range.end, keep_records + 1, rec.lsn());
            }
            let cut = f.offset + keep_bytes as u64;
            let mut first_dropped = i;
            if keep_records > 0 {
                // Split mid-fragment: the kept head stays clean or dirty as it was.
                let tail_bytes = f.bytes.len() - keep_bytes;
                records += (f.records - keep_records) as u64;
                f.bytes.truncate(keep_bytes);
                (f.records, f.last_lsn) = (keep_records, keep_last);
                if i < self.clean {
                    self.clean_bytes -= tail_bytes;
                } else {
                    self.hot_bytes -= tail_bytes;
                }
                first_dropped = i + 1;
            }
            for (j, g) in self.chain.drain(first_dropped..).enumerate() {
                records += g.records as u64;
                if first_dropped + j < self.clean {
                    self.clean_bytes -= g.bytes.len();
                } else {
                    self.hot_bytes -= g.bytes.len();
                }
            }
            self.clean = self.clean.min(self.chain.len());
            self.scl = keep_last;
            if self.flushed_lsn > keep_last {
                self.flushed_lsn = keep_last;
                (self.file_end, self.flushed_end) = (cut, cut);
            }
            self.chain_end = cut;
        }
        // Flushed records above the point lie from the new flushed end on.
        let cut_offset = (self.flushed_end < flushed_end_before).then_some(self.flushed_end);
        self.index.truncate(self.flushed_end);
        Ok(Truncated { cut_offset, records, reindex: self.pages.take().is_some() })
    }

    /// The page index rebuilt after a truncation from the page file and the
    /// segment file up to the flushed end: notes the records memory holds past
    /// that end, then serves page reads from it.
    pub fn install_page_index(&mut self, mut pages: PageIndex) {
        for f in self.chain.iter().filter(|f| f.offset >= self.flushed_end) {
            for (rec, range) in TrustedRecords::new(&f.bytes) {
                pages.note_record(rec.header().page, Located { lsn: rec.lsn(), offset: f.offset + range.start as u64, len: range.len() as u32 });
            }
        }
        self.pages = Some(pages);
    }

    /// Inserts a batch of records. Duplicates of held records are ignored, so
    /// a writer may resend freely. All-or-nothing: on error nothing changed.
    pub fn handle_append(&mut self, epoch: Epoch, records: &ValidRecords) -> Result<AppendOutcome, AppendError> {
        if self.joining {
            return Err(AppendError::Joining);
        }
        let epoch_raised = grant_epoch(self.epoch, epoch).map_err(AppendError::StaleEpoch)?;
        if self.truncating {
            return Err(AppendError::Truncating);
        }
        if let Some(why) = &self.disk_failed {
            return Err(AppendError::DiskFailed(why.clone()));
        }
        // First pass, before changing anything. A record claims that nothing
        // of this segment lies between its backlink and itself: neither the
        // chain's end, nor a record waiting above a hole, nor the batch's
        // previous record may sit in between (nor may the new record sit inside
        // a held record's gap). Meanwhile size what extends the chain and what
        // must wait above a hole, for the memory limits.
        let mut scl = self.scl;
        let (mut to_chain, mut to_pending) = (0, 0);
        let mut before: Option<Lsn> = None;
        for (rec, range) in records.iter() {
            let (lsn, prev) = (rec.lsn(), rec.prev_lsn_in_segment());
            if lsn <= scl {
                before = Some(lsn);
                continue; // held already
            }
            let conflict = |held: Lsn| AppendError::Conflict { lsn, prev, held };
            let inside = |held: Lsn| prev < held && held < lsn;
            if inside(scl) {
                return Err(conflict(scl));
            }
            if let Some(b) = before.filter(|&b| inside(b)) {
                return Err(conflict(b));
            }
            if let Some((&held, _)) = self.pending.range(Lsn(prev.0 + 1)..lsn).next() {
                return Err(conflict(held));
            }
            if self.pending.get(&lsn).is_some_and(|p| p.prev != prev) {
                return Err(conflict(lsn));
            }
            if let Some((&next, p)) = self.pending.range(Lsn(lsn.0 + 1)..).next() {
                if p.prev < lsn {
                    return Err(AppendError::Conflict { lsn: next, prev: p.prev, held: lsn });
                }
            }
            if prev == scl {
                scl = lsn;
                to_chain += range.len();
            } else if !self.pending.contains_key(&lsn) {
                to_pending += range.len();
            }
            before = Some(lsn);
        }
        // The chain and the records above holes are limited separately: a
        // batch that fills a hole must not be refused because the records
        // waiting for it filled memory.
        let limit = self.config.hot_bytes_max;
        let over = |held: usize, adding: usize| adding > 0 && held > 0 && held + adding > limit;
        if over(self.hot_bytes - self.pending_bytes, to_chain) || over(self.pending_bytes, to_pending) {
            return Err(AppendError::Busy { hot_bytes: self.hot_bytes, hot_bytes_max: limit });
        }
        self.epoch = epoch;
        let hot_before = self.hot_bytes;
        let mut inserted = 0;
        // Second pass: cut the batch into linked fragments and place each.
        let bytes = records.bytes();
        let mut frag: Option<Fragment> = None;
        for (rec, range) in records.iter() {
            let (lsn, prev) = (rec.lsn(), rec.prev_lsn_in_segment());
            match &mut frag {
                Some(f) if prev == f.last_lsn => {
                    f.last_lsn = lsn;
                    f.records += 1;
                    f.bytes = bytes.slice(range.start - f.bytes.len()..range.end);
                }
                _ => {
                    if let Some(f) = frag.take() {
                        inserted += self.place(f, bytes.len());
                    }
                    frag = Some(Fragment { offset: 0, first_lsn: lsn, prev, last_lsn: lsn, records: 1, bytes: bytes.slice(range) });
                }
            }
        }
        if let Some(f) = frag {
            inserted += self.place(f, bytes.len());
        }
        inserted = inserted.saturating_sub(self.drain_pending());
        let inserted_bytes = self.hot_bytes.saturating_sub(hot_before);
        Ok(AppendOutcome { position: self.position(), epoch_raised, inserted, inserted_bytes })
    }

    /// Puts a fragment on the chain if it continues it, else its new records
    /// in `pending`. Returns how many records it added. `batch_bytes` is the
    /// size of the buffer the fragment slices: a small part of a large batch
    /// (a resend that is mostly duplicates) is copied out rather than pinning
    /// the whole batch, which the memory limits would not see.
    fn place(&mut self, mut f: Fragment, batch_bytes: usize) -> u32 {
        if f.last_lsn <= self.scl {
            return 0; // all held already
        }
        if f.prev == self.scl {
            let n = f.records;
            f.bytes = own(f.bytes, batch_bytes);
            self.push_complete(f);
            return n;
        }
        if f.first_lsn <= self.scl {
            // Overlaps the chain's end: keep the part after SCL, which links to it.
            let cut = TrustedRecords::new(&f.bytes).find(|(r, _)| r.lsn() > self.scl).map(|(_, r)| r.start).expect("last_lsn > scl");
            let skipped = TrustedRecords::new(&f.bytes[..cut]).count() as u32;
            let rest =
                Fragment { offset: 0, first_lsn: Lsn::ZERO, prev: self.scl, last_lsn: f.last_lsn, records: f.records - skipped, bytes: f.bytes.slice(cut..) };
            let first_lsn = TrustedRecords::new(&rest.bytes).next().expect("non-empty").0.lsn();
            let n = rest.records;
            self.push_complete(Fragment { first_lsn, bytes: own(rest.bytes, batch_bytes), ..rest });
            return n;
        }
        let mut n = 0;
        let bytes = own(f.bytes, batch_bytes);
        for (rec, range) in TrustedRecords::new(&bytes) {
            if let std::collections::btree_map::Entry::Vacant(v) = self.pending.entry(rec.lsn()) {
                self.hot_bytes += range.len();
                self.pending_bytes += range.len();
                v.insert(Pending { prev: rec.prev_lsn_in_segment(), bytes: bytes.slice(range) });
                n += 1;
            }
        }
        n
    }

    fn push_complete(&mut self, mut f: Fragment) {
        debug_assert_eq!(f.prev, self.scl);
        f.offset = self.chain_end;
        self.chain_end += f.bytes.len() as u64;
        if let Some(pages) = &mut self.pages {
            for (rec, range) in TrustedRecords::new(&f.bytes) {
                let at = Located { lsn: rec.lsn(), offset: f.offset + range.start as u64, len: range.len() as u32 };
                pages.note_record(rec.header().page, at);
            }
        }
        self.hot_bytes += f.bytes.len();
        self.scl = f.last_lsn;
        self.chain.push_back(f);
    }

    /// Moves pending records that now continue the chain onto it, dropping
    /// pending duplicates of what the chain holds; returns how many it dropped.
    fn drain_pending(&mut self) -> u32 {
        let mut dropped = 0;
        while let Some(first) = self.pending.first_entry() {
            let lsn = *first.key();
            if lsn <= self.scl {
                let len = first.remove().bytes.len();
                self.hot_bytes -= len;
                self.pending_bytes -= len;
                dropped += 1;
            } else if first.get().prev == self.scl {
                let p = first.remove();
                self.hot_bytes -= p.bytes.len();
                self.pending_bytes -= p.bytes.len();
                self.push_complete(Fragment { offset: 0, first_lsn: lsn, prev: p.prev, last_lsn: lsn, records: 1, bytes: p.bytes });
            } else {
                break;
            }
        }
        dropped
    }

    /// Hands out the next flush: dirty complete records, in order, up to
    /// `flush_bytes_max` (at least one fragment). `None` while a flush is in
    /// flight or nothing is dirty. The records' bytes are pushed to `out`.
    pub fn poll_flush(&mut self, out: &mut Vec<Bytes>) -> Option<FlushJob> {
        if self.inflight > 0 || self.truncating || self.disk_failed.is_some() || self.clean == self.chain.len() {
            return None;
        }
        let offset = self.file_end;
        let mut bytes = 0;
        let mut upto = self.flushed_lsn;
        for f in self.chain.iter().skip(self.clean) {
            let len = f.bytes.len();
            if bytes > 0 && bytes + len > self.config.flush_bytes_max {
                break;
            }
            self.index.note(f.first_lsn, f.prev, offset + bytes as u64);
            out.push(f.bytes.clone());
            bytes += len;
            upto = f.last_lsn;
            self.inflight += 1;
        }
        self.file_end = offset + bytes as u64;
        Some(FlushJob { offset, end_offset: self.file_end, upto })
    }

    /// The flush `job` is durable (its write completed).
    pub fn handle_flushed(&mut self, job: FlushJob) {
        assert!(self.inflight > 0 && job.end_offset == self.file_end, "flush completion does not match the job in flight");
        let bytes: usize = self.chain.range(self.clean..self.clean + self.inflight).map(|f| f.bytes.len()).sum();
        assert_eq!(self.chain[self.clean + self.inflight - 1].last_lsn, job.upto);
        self.clean += self.inflight;
        self.inflight = 0;
        self.hot_bytes -= bytes;
        self.clean_bytes += bytes;
        self.flushed_lsn = job.upto;
        self.flushed_end = job.end_offset;
        while self.clean_bytes > self.config.cache_bytes_max {
            let f = self.chain.pop_front().expect("clean bytes imply clean fragments");
            self.clean -= 1;
            self.clean_bytes -= f.bytes.len();
            self.chain_base = f.last_lsn;
        }
    }

    /// The flush `job` failed (disk full, I/O error): the records stay in
    /// memory and the segment refuses further appends.
    pub fn handle_flush_failed(&mut self, job: FlushJob, why: String) {
        assert!(self.inflight > 0 && job.end_offset == self.file_end);
        self.inflight = 0;
        self.file_end = job.offset;
        self.disk_failed = Some(why);
    }

    /// The flusher stopped for good: forget any flush in flight (its records
    /// stay in memory) and refuse appends.
    pub fn handle_disk_lost(&mut self, why: String) {
        if self.inflight > 0 {
            self.inflight = 0;
            self.file_end = self.flushed_end;
        }
        self.disk_failed = Some(why);
    }

    /// Serves records in `(after, upto]` (clamped to SCL) from memory into
    /// `out`, about `bytes_max` at most but at least one record, returning the
    /// LSN through which the segment's records are now all served: the clamped
    /// `upto` when everything fit, else the last record served. When memory no
    /// longer holds the record after `after`, returns where to read on disk instead.
    pub fn read(&self, after: Lsn, upto: Lsn, bytes_max: usize, out: &mut Vec<Bytes>) -> Result<Lsn, Unserved> {
        let upto = upto.min(self.scl);
        if after >= upto {
            return Ok(after);
        }
        let reclaimed = self.index.start.prev;
        if after < reclaimed {
            return Err(Unserved::Reclaimed(Reclaimed { segment: self.id, after, reclaimed }));
        }
        if after < self.chain_base {
            let (offset, prev) = self.index.seek(after);
            return Err(Unserved::Disk(DiskRead { offset, prev, end_offset: self.flushed_end, after, upto: upto.min(self.chain_base) }));
        }
        let start = self.chain.partition_point(|f| f.last_lsn <= after);
        let (mut last, mut bytes, mut cut) = (after, 0, false);
        for f in self.chain.range(start..) {
            let (mut from, mut to) = (None, 0);
            for (rec, range) in TrustedRecords::new(&f.bytes) {
                let lsn = rec.lsn();
                if lsn <= after {
                    continue;
                }
                if lsn > upto {
                    break;
                }
                if bytes > 0 && bytes + range.len() > bytes_max {
                    cut = true;
                    break;
                }
                from.get_or_insert(range.start);
                to = range.end;
                bytes += range.len();
                last = lsn;
            }
            match from {
                Some(from) => out.push(f.bytes.slice(from..to)),
                None => break,
            }
            if cut || to < f.bytes.len() {
                break;
            }
        }
        // The chain is gap-free up to SCL: unless cut short, nothing else lies in `(after, upto]`.
        Ok(if cut { last } else { upto })
    }

    /// Where to find `page` as of `lsn` (clamped to SCL): its newest stored
    /// image at or below `lsn`, then its records above the image, from
    /// memory or the segment file.
    pub fn page_read(&self, page: PageId, lsn: Lsn) -> Result<PageRead, PageBroken> {
        let lsn = lsn.min(self.scl);
        let plan = match &self.pages {
            Some(pages) => pages.plan(page, lsn)?,
            None => PagePlan::Unindexed,
        };
        let (base, records) = match plan {
            PagePlan::Indexed { base, records } => (base, records),
            PagePlan::Unindexed => return Ok(self.page_scan(page, lsn)),
        };
        let memory_from = self.chain.front().map_or(u64::MAX, |f| f.offset);
        let parts = records
            .into_iter()
            .map(|r| {
                if r.offset < memory_from {
                    return PagePart::Disk(r);
                }
                let f = &self.chain[self.chain.partition_point(|f| f.offset + f.bytes.len() as u64 <= r.offset)];
                let at = (r.offset - f.offset) as usize;
                PagePart::Memory(f.bytes.slice(at..at + r.len as usize))
            })
            .collect();
        Ok(PageRead { base, parts })
    }

    /// Without the index: the page's flushed records from the file, the rest from memory.
    fn page_scan(&self, page: PageId, lsn: Lsn) -> PageRead {
        let on_disk = lsn.min(self.flushed_lsn);
        let LogStart { offset, prev } = self.index.start;
        let scan = DiskRead { offset, prev, end_offset: self.flushed_end, after: Lsn::ZERO, upto: on_disk };
        let mut parts = vec![PagePart::Scan(scan)];
        for f in self.chain.iter().skip(self.clean).take_while(|f| f.first_lsn <= lsn) {
            for (rec, range) in TrustedRecords::new(&f.bytes) {
                if rec.lsn() <= lsn && rec.header().page == page {
                    parts.push(PagePart::Memory(f.bytes.slice(range)));
                }
            }
        }
        PageRead { base: None, parts }
    }

    /// Checks every invariant; O(records), for tests and debug checks.
    pub fn check_invariants(&self) {
        assert!(self.flushed_lsn <= self.scl, "flushed_lsn {} > scl {}", self.flushed_lsn, self.scl);
        assert!(self.clean + self.inflight <= self.chain.len());
        let mut prev = self.chain_base;
        for f in &self.chain {
            assert_eq!(f.prev, prev, "chain broken at {}", f.first_lsn);
            let mut records = 0;
            for (rec, _) in TrustedRecords::new(&f.bytes) {
                assert_eq!(rec.prev_lsn_in_segment(), prev, "fragment broken at {}", rec.lsn());
                prev = rec.lsn();
                records += 1;
            }
            assert_eq!((f.last_lsn, f.records), (prev, records));
        }
        assert_eq!(prev, self.scl, "chain does not end at scl");
        if self.clean > 0 {
            assert_eq!(self.chain[self.clean - 1].last_lsn, self.flushed_lsn);
        } else {
            assert_eq!(self.chain_base, self.flushed_lsn);
        }
        assert!(self.pending.keys().all(|&l| l > self.scl), "pending record at or below scl");
        let clean: usize = self.chain.iter().take(self.clean).map(|f| f.bytes.len()).sum();
        let dirty: usize = self.chain.iter().skip(self.clean).map(|f| f.bytes.len()).sum();
        let pending: usize = self.pending.values().map(|p| p.bytes.len()).sum();
        assert_eq!(self.clean_bytes, clean);
        assert_eq!(self.hot_bytes, dirty + pending);
        assert_eq!(self.pending_bytes, pending);
        assert!(self.flushed_end <= self.file_end);
        let mut offset = self.chain.front().map_or(self.chain_end, |f| f.offset);
        for f in &self.chain {
            assert_eq!(f.offset, offset, "fragment {} not where the chain puts it", f.first_lsn);
            offset += f.bytes.len() as u64;
        }
        let unflushed: u64 = self.chain.iter().skip(self.clean + self.inflight).map(|f| f.bytes.len() as u64).sum();
        assert_eq!((offset, self.chain_end), (self.chain_end, self.file_end + unflushed));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ids::{NodeId, PageId, PgId};
    use crate::record::RecordHeader;

    pub(crate) const ID: SegmentId = SegmentId { pg: PgId(1), node: NodeId(1) };

    pub(crate) fn config(hot: usize) -> SegmentLogConfig {
        SegmentLogConfig { hot_bytes_max: hot, cache_bytes_max: 200, flush_bytes_max: 150 }
    }

    /// Encodes records given as (lsn, prev_lsn_in_segment).
    pub(crate) fn batch(recs: &[(u64, u64)]) -> ValidRecords {
        let mut out = Vec::new();
        for &(lsn, prev) in recs {
            RecordHeader { lsn: Lsn(lsn), prev_lsn_in_segment: Lsn(prev), prev_lsn_for_page: Lsn::ZERO, page: PageId(0), cpl: true }.encode(&[7; 9], &mut out);
        }
        ValidRecords::validate(Bytes::from(out), 0).unwrap().expect("non-empty batch")
    }

    fn append(log: &mut SegmentLog, recs: &[(u64, u64)]) -> Result<AppendOutcome, AppendError> {
        let r = log.handle_append(Epoch(1), &batch(recs));
        log.check_invariants();
        r
    }

    fn lsns_of(parts: &[Bytes]) -> Vec<Lsn> {
        parts.iter().flat_map(|p| TrustedRecords::new(p).map(|(r, _)| r.lsn()).collect::<Vec<_>>()).collect()
    }

    fn flush_all(log: &mut SegmentLog) -> Vec<Lsn> {
        let mut lsns = vec![];
        let mut out = vec![];
        while let Some(job) = log.poll_flush(&mut out) {
            assert_eq!(out.iter().map(|b| b.len() as u64).sum::<u64>(), job.end_offset - job.offset);
            lsns.extend(lsns_of(&out));
            out.clear();
            log.check_invariants();
            log.handle_flushed(job);
            log.check_invariants();
        }
        lsns
    }

    #[test]
    fn in_order_appends_advance_scl() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        let out = append(&mut log, &[(1, 0), (3, 1), (4, 3)]).unwrap();
        assert_eq!((out.position.scl, out.position.flushed_lsn, out.inserted), (Lsn(4), Lsn(0), 3));
        assert!(out.epoch_raised);
    }

    #[test]
    fn hole_holds_scl_until_filled() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        append(&mut log, &[(1, 0)]).unwrap();
        // 3 links to 2, which is missing: a hole.
        let out = append(&mut log, &[(3, 2), (5, 3)]).unwrap();
        assert_eq!(out.position.scl, Lsn(1));
        assert_eq!(log.pending_records(), 2);
        // Only the complete prefix may be flushed.
        assert_eq!(flush_all(&mut log), vec![Lsn(1)]);
        // Filling the hole completes the chain, in order, whatever the batch order.
        let out = append(&mut log, &[(2, 1)]).unwrap();
        assert_eq!(out.position.scl, Lsn(5));
        assert_eq!(log.pending_records(), 0);
        assert_eq!(flush_all(&mut log), vec![Lsn(2), Lsn(3), Lsn(5)]);
        assert_eq!(log.flushed_lsn(), Lsn(5));
    }

    #[test]
    fn duplicates_are_ignored_and_conflicts_refused() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        append(&mut log, &[(1, 0), (2, 1)]).unwrap();
        let out = append(&mut log, &[(1, 0), (2, 1), (6, 2)]).unwrap();
        assert_eq!((out.inserted, out.position.scl), (1, Lsn(6)));
        // 9 claims its predecessor is 1, but the segment holds 2 and 6 after 1.
        assert_eq!(append(&mut log, &[(9, 1)]), Err(AppendError::Conflict { lsn: Lsn(9), prev: Lsn(1), held: Lsn(6) }));
        assert_eq!(log.scl(), Lsn(6));
    }

    #[test]
    fn stale_epoch_is_refused() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        assert!(log.handle_append(Epoch(5), &batch(&[(1, 0)])).unwrap().epoch_raised);
        let err = log.handle_append(Epoch(4), &batch(&[(2, 1)])).unwrap_err();
        assert_eq!(err, AppendError::StaleEpoch(EpochRefused { requested: Epoch(4), current: Epoch(5) }));
        // Epochs 4, 5 and 6 are all generation 0: 5 holds it, 6 is another claimant of it.
        assert!(matches!(log.handle_append(Epoch(6), &batch(&[(2, 1)])), Err(AppendError::StaleEpoch(_))));
        assert!(!log.handle_append(Epoch(5), &batch(&[(2, 1)])).unwrap().epoch_raised);
        // The next generation is granted whatever its low bits; then the old one is refused.
        let next = Epoch::claim_after(Epoch(5), 1);
        assert!(log.handle_append(next, &batch(&[(3, 2)])).unwrap().epoch_raised);
        assert!(matches!(log.handle_append(Epoch(5), &batch(&[(4, 3)])), Err(AppendError::StaleEpoch(_))));
        assert_eq!(log.scl(), Lsn(3));
    }

    #[test]
    fn busy_until_flush_frees_memory() {
        let mut log = SegmentLog::new(ID, config(120));
        append(&mut log, &[(1, 0), (2, 1)]).unwrap(); // 100 bytes
        assert!(matches!(append(&mut log, &[(3, 2)]), Err(AppendError::Busy { .. })));
        assert_eq!(log.scl(), Lsn(2));
        flush_all(&mut log);
        assert_eq!(log.hot_bytes(), 0);
        assert_eq!(append(&mut log, &[(3, 2)]).unwrap().position.scl, Lsn(3));
    }

    #[test]
    fn records_above_a_hole_do_not_lock_out_the_fill() {
        let mut log = SegmentLog::new(ID, config(120));
        append(&mut log, &[(1, 0)]).unwrap();
        flush_all(&mut log);
        // Two records above the hole at 2 fill the hot log (50 bytes each)...
        append(&mut log, &[(3, 2)]).unwrap();
        append(&mut log, &[(4, 3)]).unwrap();
        assert_eq!((log.hot_bytes(), log.pending_records()), (100, 2));
        // ...so a third one is refused...
        assert!(matches!(append(&mut log, &[(6, 5)]), Err(AppendError::Busy { .. })));
        // ...but the fill is not: nothing flushable is held.
        let out = append(&mut log, &[(2, 1)]).unwrap();
        assert_eq!((out.position.scl, log.pending_records()), (Lsn(4), 0));
        // Extending the chain is limited by the unflushed chain again.
        assert!(matches!(append(&mut log, &[(5, 4)]), Err(AppendError::Busy { .. })));
        assert_eq!(flush_all(&mut log), vec![Lsn(2), Lsn(3), Lsn(4)]);
        assert_eq!(append(&mut log, &[(5, 4)]).unwrap().position.scl, Lsn(5));
    }

    #[test]
    fn records_skipping_held_records_are_conflicts() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        append(&mut log, &[(1, 0)]).unwrap();
        append(&mut log, &[(3, 2), (4, 3), (5, 4)]).unwrap();
        let before = (log.scl(), log.pending_records(), log.hot_bytes());
        // 6 claims nothing lies between 2 and 6, but 3, 4 and 5 wait there.
        assert_eq!(append(&mut log, &[(2, 1), (6, 2)]), Err(AppendError::Conflict { lsn: Lsn(6), prev: Lsn(2), held: Lsn(3) }));
        // The same LSN as a held record but another backlink.
        assert_eq!(append(&mut log, &[(4, 2)]), Err(AppendError::Conflict { lsn: Lsn(4), prev: Lsn(2), held: Lsn(3) }));
        // Inside one batch: 5 links to 3, but the batch itself brings 4 in between.
        let mut fresh = SegmentLog::new(ID, config(1 << 20));
        assert_eq!(append(&mut fresh, &[(4, 2), (5, 3)]), Err(AppendError::Conflict { lsn: Lsn(5), prev: Lsn(3), held: Lsn(4) }));
        assert_eq!((log.scl(), log.pending_records(), log.hot_bytes()), before, "refused batches change nothing");
        // A new record inside a held record's gap: held 9 links to 6, so 7 cannot exist.
        append(&mut log, &[(9, 6)]).unwrap();
        assert_eq!(append(&mut log, &[(7, 6)]), Err(AppendError::Conflict { lsn: Lsn(9), prev: Lsn(6), held: Lsn(7) }));
        // The fill completes the chain, through the held 9.
        assert_eq!(append(&mut log, &[(2, 1), (6, 5)]).unwrap().position.scl, Lsn(9));
        assert_eq!(log.pending_records(), 0);
    }

    #[test]
    fn a_small_part_of_a_large_batch_does_not_pin_it() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        append(&mut log, &[(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]).unwrap();
        let resend = batch(&[(1, 0), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5)]);
        log.handle_append(Epoch(1), &resend).unwrap();
        let within = |b: &Bytes| {
            let r = resend.bytes().as_ptr_range();
            r.contains(&b.as_ptr())
        };
        let mut out = vec![];
        assert_eq!(log.read(Lsn(5), Lsn(6), 1 << 20, &mut out), Ok(Lsn(6)));
        assert!(!within(&out[0]), "record 6 was copied out of the mostly-duplicate batch");
        let whole = batch(&[(7, 6), (8, 7)]);
        log.handle_append(Epoch(1), &whole).unwrap();
        out.clear();
        log.read(Lsn(6), Lsn(8), 1 << 20, &mut out).unwrap();
        assert!(whole.bytes().as_ptr_range().contains(&out[0].as_ptr()), "a batch kept whole is not copied");
    }

    #[test]
    fn records_above_holes_are_bounded() {
        let mut log = SegmentLog::new(ID, config(120));
        append(&mut log, &[(1, 0)]).unwrap();
        append(&mut log, &[(3, 2), (4, 3)]).unwrap(); // 100 bytes above the hole at 2
        assert!(matches!(append(&mut log, &[(2, 1), (6, 5)]), Err(AppendError::Busy { .. })), "6 would wait above a new hole");
        assert_eq!(append(&mut log, &[(2, 1)]).unwrap().position.scl, Lsn(4));
    }

    #[test]
    fn flush_failure_keeps_records_and_refuses_appends() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        append(&mut log, &[(1, 0)]).unwrap();
        let mut out = vec![];
        let job = log.poll_flush(&mut out).unwrap();
        log.handle_flush_failed(job, "no space left on device".into());
        log.check_invariants();
        assert_eq!((log.scl(), log.flushed_lsn(), log.hot_bytes()), (Lsn(1), Lsn(0), 50));
        assert!(matches!(append(&mut log, &[(2, 1)]), Err(AppendError::DiskFailed(_))));
        let mut out = vec![];
        assert_eq!(log.read(Lsn(0), Lsn(9), 1 << 20, &mut out), Ok(Lsn(1)));
    }

    #[test]
    fn reads_come_from_memory_then_disk() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        append(&mut log, &[(1, 0), (2, 1), (3, 2), (4, 3)]).unwrap();
        for l in 5..=10 {
            append(&mut log, &[(l, l - 1)]).unwrap();
        }
        let mut out = vec![];
        assert_eq!(log.read(Lsn(2), Lsn(5), 1 << 20, &mut out), Ok(Lsn(5)));
        assert_eq!(lsns_of(&out), [Lsn(3), Lsn(4), Lsn(5)]);
        flush_all(&mut log);
        // cache_bytes_max = 200 keeps the last 4 one-record fragments (50 bytes each) in memory.
        out.clear();
        assert_eq!(log.read(Lsn(6), Lsn(100), 60, &mut out), Ok(Lsn(7)));
        assert_eq!(lsns_of(&out), [Lsn(7)], "bytes_max bounds the reply");
        let disk = log.read(Lsn(2), Lsn(100), 1 << 20, &mut out).unwrap_err();
        assert_eq!(
            disk,
            Unserved::Disk(DiskRead { offset: SEGMENT_HEADER_BYTES as u64, prev: Lsn::ZERO, end_offset: 4096 + 500, after: Lsn(2), upto: Lsn(6) })
        );
    }

    #[test]
    fn overlapping_and_split_batches() {
        let mut log = SegmentLog::new(ID, SegmentLogConfig { cache_bytes_max: 1 << 20, ..config(1 << 20) });
        append(&mut log, &[(1, 0), (2, 1), (3, 2)]).unwrap();
        // Resend overlapping the end of the chain: only 4 and 5 are new.
        let out = append(&mut log, &[(2, 1), (3, 2), (4, 3), (5, 4)]).unwrap();
        assert_eq!((out.inserted, out.inserted_bytes, out.position.scl), (2, 100, Lsn(5)));
        // One batch with a gap inside: 6 continues the chain, 9 waits for 8.
        let out = append(&mut log, &[(6, 5), (9, 8)]).unwrap();
        assert_eq!((out.inserted, out.position.scl, log.pending_records()), (2, Lsn(6), 1));
        // The fill arrives together with a duplicate of the pending record.
        let out = append(&mut log, &[(7, 6), (8, 7), (9, 8)]).unwrap();
        assert_eq!((out.inserted, out.position.scl, log.pending_records()), (2, Lsn(9), 0));
        assert_eq!(flush_all(&mut log), (1..=9).map(Lsn).collect::<Vec<_>>());
        let mut out = vec![];
        assert_eq!(log.read(Lsn(4), Lsn(7), 1 << 20, &mut out), Ok(Lsn(7)));
        assert_eq!(lsns_of(&out), [Lsn(5), Lsn(6), Lsn(7)]);
    }

    #[test]
    fn page_reads_find_records_in_memory_then_on_disk() {
        // Records 1..=12 on pages lsn % 3, each linking to its page's previous record.
        // One batch (one fragment) each, so that the cache keeps the last few.
        let mut log = SegmentLog::new(ID, config(1 << 20)).with_page_index(PageIndex::new(64));
        for l in 1..=12u64 {
            let mut out = Vec::new();
            let prev_for_page = l.saturating_sub(3);
            RecordHeader { lsn: Lsn(l), prev_lsn_in_segment: Lsn(l - 1), prev_lsn_for_page: Lsn(prev_for_page), page: PageId(l % 3), cpl: true }
                .encode(&[l as u8; 9], &mut out);
            log.handle_append(Epoch(1), &ValidRecords::validate(Bytes::from(out), 0).unwrap().unwrap()).unwrap();
        }
        log.check_invariants();
        let lsns = |read: &PageRead| -> Vec<Lsn> {
            read.parts
                .iter()
                .map(|p| match p {
                    PagePart::Memory(b) => lsns_of(std::slice::from_ref(b))[0],
                    PagePart::Disk(at) => at.lsn,
                    PagePart::Scan(_) => panic!("indexed pages are not scanned"),
                })
                .collect()
        };
        let read = log.page_read(PageId(1), Lsn(8)).unwrap();
        assert_eq!((read.base, lsns(&read)), (None, vec![Lsn(1), Lsn(4), Lsn(7)]));
        assert!(read.parts.iter().all(|p| matches!(p, PagePart::Memory(_))));
        // Flushed and mostly evicted (the cache keeps 200 bytes): the records
        // are found where the flush wrote them.
        let mut file = vec![0u8; SEGMENT_HEADER_BYTES];
        let mut parts = vec![];
        while let Some(job) = log.poll_flush(&mut parts) {
            assert_eq!(job.offset, file.len() as u64);
            parts.drain(..).for_each(|b| file.extend_from_slice(&b));
            log.handle_flushed(job);
        }
        log.check_invariants();
        let read = log.page_read(PageId(1), Lsn(100)).unwrap();
        assert_eq!(lsns(&read), vec![Lsn(1), Lsn(4), Lsn(7), Lsn(10)]);
        assert!(matches!(read.parts[0], PagePart::Disk(_)) && matches!(read.parts[3], PagePart::Memory(_)));
        for part in &read.parts {
            let bytes = match part {
                PagePart::Memory(b) => b.to_vec(),
                PagePart::Disk(at) => file[at.offset as usize..at.offset as usize + at.len as usize].to_vec(),
                PagePart::Scan(_) => unreachable!(),
            };
            let rec = crate::record::RecordRef::decode(&bytes, 0).unwrap();
            assert_eq!(rec.header().page, PageId(1));
        }
        // Without an index a page read scans the flushed log, then memory.
        let plain = SegmentLog::new(ID, config(1 << 20));
        let read = plain.page_read(PageId(1), Lsn(5)).unwrap();
        assert!(matches!(read.parts[..], [PagePart::Scan(DiskRead { upto: Lsn::ZERO, .. })]));
    }

    #[test]
    fn the_log_is_reclaimed_below_the_horizon_the_images_and_the_retained_bytes() {
        // Records of 10 KiB on pages lsn % 3: an index entry every 7th record or so.
        let mut log = SegmentLog::new(ID, config(1 << 22)).with_page_index(PageIndex::new(64));
        for l in 1..=60u64 {
            let mut out = Vec::new();
            RecordHeader { lsn: Lsn(l), prev_lsn_in_segment: Lsn(l - 1), prev_lsn_for_page: Lsn(l.saturating_sub(3)), page: PageId(l % 3), cpl: true }
                .encode(&[l as u8; 10 << 10], &mut out);
            log.handle_append(Epoch(1), &ValidRecords::validate(Bytes::from(out), 0).unwrap().unwrap()).unwrap();
            flush_all(&mut log);
        }
        assert_eq!(log.reclaim_point(0), None, "no horizon yet");
        log.note_horizon(Lsn(40));
        assert_eq!(log.reclaim_point(0), None, "no images: every record is needed");
        let image = |l: u64| Located { lsn: Lsn(l), offset: l, len: 100 };
        let pages = log.page_index_mut().unwrap();
        for (page, l) in [(0, 30), (1, 31), (2, 32)] {
            pages.note_image(PageId(page), image(l)).unwrap();
        }
        pages.retire(Lsn(40));
        assert_eq!(pages.first_needed(), Lsn(33));
        let start = log.reclaim_point(0).expect("records up to 32 can go");
        assert!(start.prev < Lsn(33) && start.prev > Lsn(20), "{start:?}");
        let retained = log.reclaim_point(log.flushed_end() - start.offset + 1).expect("a shorter reach");
        assert!(retained.offset < start.offset, "{retained:?} keeps more than {start:?}");
        assert_eq!(log.reclaim_point(log.flushed_end()), None, "the retained bytes cover the whole log");
        assert_eq!(log.pin_lsn(u64::MAX), Lsn::ZERO, "the whole log is within the retained bytes");
        let pin = log.pin_lsn((log.flushed_end() - start.offset) * 4 / 3);
        assert!(pin >= start.prev && pin < Lsn(60), "{pin} pins about where the start is");

        log.reclaim(start);
        assert_eq!((log.log_start(), log.reclaim_point(0)), (start, None));
        let mut out = vec![];
        let below = log.read(Lsn(1), Lsn(60), 1 << 20, &mut out).unwrap_err();
        assert_eq!(below, Unserved::Reclaimed(Reclaimed { segment: ID, after: Lsn(1), reclaimed: start.prev }));
        match log.read(start.prev, Lsn(60), 1 << 20, &mut out) {
            Err(Unserved::Disk(disk)) => assert_eq!((disk.offset, disk.prev), (start.offset, start.prev)),
            other => panic!("a read from the new start is served from disk: {other:?}"),
        }
    }

    /// Flushes everything into `file` (the segment file's bytes).
    fn flush_into(log: &mut SegmentLog, file: &mut Vec<u8>) {
        let mut parts = vec![];
        while let Some(job) = log.poll_flush(&mut parts) {
            file.truncate(job.offset as usize);
            assert_eq!(job.offset, file.len() as u64);
            parts.drain(..).for_each(|b| file.extend_from_slice(&b));
            log.handle_flushed(job);
            log.check_invariants();
        }
    }

    fn truncate(log: &mut SegmentLog, above: u64, disk: Option<DiskCut>) -> Result<Truncated, DiskRead> {
        log.begin_truncate();
        let out = log.truncate_above(Lsn(above), disk);
        log.check_invariants();
        if out.is_ok() {
            log.end_truncate();
        }
        out
    }

    #[test]
    fn truncation_splits_the_chain_mid_fragment_and_appends_chain_on() {
        let mut log = SegmentLog::new(ID, SegmentLogConfig { cache_bytes_max: 1 << 20, ..config(1 << 20) });
        append(&mut log, &[(1, 0), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5)]).unwrap();
        let mut file = vec![0u8; SEGMENT_HEADER_BYTES];
        flush_into(&mut log, &mut file);
        append(&mut log, &[(7, 6), (8, 7), (9, 8), (10, 9)]).unwrap(); // dirty
        append(&mut log, &[(12, 11)]).unwrap(); // above a hole
        assert_eq!((log.scl(), log.flushed_lsn(), log.pending_records()), (Lsn(10), Lsn(6), 1));
        // 5 and 6 are on disk (inside the flushed fragment): cut the file after 4.
        let out = truncate(&mut log, 4, None).unwrap();
        assert_eq!(out, Truncated { cut_offset: Some(4096 + 4 * 50), records: 7, reindex: false });
        assert_eq!((log.scl(), log.flushed_lsn(), log.pending_records(), log.hot_bytes()), (Lsn(4), Lsn(4), 0, 0));
        // The new writer's records link to the last record at or below the point.
        assert!(matches!(append(&mut log, &[(5, 2)]), Err(AppendError::Conflict { .. })));
        assert_eq!(append(&mut log, &[(5, 4), (6, 5)]).unwrap().position.scl, Lsn(6));
        file.truncate(out.cut_offset.unwrap() as usize);
        flush_into(&mut log, &mut file);
        let mut parts = vec![];
        assert_eq!(log.read(Lsn(0), Lsn(100), 1 << 20, &mut parts), Ok(Lsn(6)));
        assert_eq!(lsns_of(&parts), (1..=6).map(Lsn).collect::<Vec<_>>());
        assert_eq!(lsns_of(&[Bytes::from(file[SEGMENT_HEADER_BYTES..].to_vec())]), (1..=6).map(Lsn).collect::<Vec<_>>());
    }

    #[test]
    fn truncation_of_unflushed_records_leaves_the_file_alone() {
        let mut log = SegmentLog::new(ID, SegmentLogConfig { cache_bytes_max: 1 << 20, ..config(1 << 20) });
        append(&mut log, &[(1, 0), (2, 1)]).unwrap();
        flush_all(&mut log);
        append(&mut log, &[(3, 2)]).unwrap();
        append(&mut log, &[(4, 3), (5, 4)]).unwrap();
        // Cut at a fragment boundary, then inside a dirty fragment.
        assert_eq!(truncate(&mut log, 4, None).unwrap(), Truncated { cut_offset: None, records: 1, reindex: false });
        assert_eq!(truncate(&mut log, 2, None).unwrap(), Truncated { cut_offset: None, records: 2, reindex: false });
        assert_eq!((log.scl(), log.flushed_lsn(), log.hot_bytes()), (Lsn(2), Lsn(2), 0));
        assert_eq!(flush_all(&mut log), Vec::<Lsn>::new());
        // Everything, down to nothing.
        assert_eq!(truncate(&mut log, 0, None).unwrap(), Truncated { cut_offset: Some(4096), records: 2, reindex: false });
        assert_eq!((log.scl(), log.flushed_lsn()), (Lsn(0), Lsn(0)));
        append(&mut log, &[(3, 0)]).unwrap();
        assert_eq!(flush_all(&mut log), vec![Lsn(3)]);
    }

    #[test]
    fn truncation_at_or_above_scl_drops_only_records_above_holes() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        append(&mut log, &[(1, 0), (2, 1)]).unwrap();
        append(&mut log, &[(5, 4), (8, 7)]).unwrap();
        assert_eq!(truncate(&mut log, 6, None).unwrap(), Truncated { cut_offset: None, records: 1, reindex: false });
        assert_eq!((log.scl(), log.pending_records()), (Lsn(2), 1));
        assert_eq!(truncate(&mut log, 2, None).unwrap(), Truncated { cut_offset: None, records: 1, reindex: false });
        assert_eq!((log.scl(), log.pending_records(), log.hot_bytes()), (Lsn(2), 0, 100));
        assert_eq!(truncate(&mut log, 2, None).unwrap().records, 0, "a repeat is a no-op");
        assert_eq!(flush_all(&mut log), vec![Lsn(1), Lsn(2)]);
    }

    #[test]
    fn truncation_below_memory_asks_for_a_disk_scan() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        for l in 1..=10 {
            append(&mut log, &[(l, l - 1)]).unwrap();
        }
        flush_all(&mut log); // the cache keeps 7..=10
        append(&mut log, &[(11, 10)]).unwrap();
        log.begin_truncate();
        let scan = log.truncate_above(Lsn(3), None).unwrap_err();
        assert_eq!((scan.after, scan.upto, scan.end_offset), (Lsn(3), Lsn(6), 4096 + 500));
        assert!(scan.offset <= 4096 + 150);
        let cut = DiskCut { last_lsn: Lsn(3), offset: 4096 + 150, records: 3 };
        assert_eq!(log.truncate_above(Lsn(3), Some(cut)), Ok(Truncated { cut_offset: Some(4096 + 150), records: 3 + 5, reindex: false }));
        log.check_invariants();
        log.end_truncate();
        assert_eq!((log.scl(), log.flushed_lsn(), log.hot_bytes()), (Lsn(3), Lsn(3), 0));
        append(&mut log, &[(4, 3)]).unwrap();
        let mut out = vec![];
        assert_eq!(log.poll_flush(&mut out).unwrap().offset, 4096 + 150);
        // Reads below memory go to the disk up to the new end only.
        let Err(Unserved::Disk(disk)) = log.read(Lsn(0), Lsn(9), 1 << 20, &mut out) else { panic!("read from disk") };
        assert_eq!((disk.end_offset, disk.upto), (4096 + 150, Lsn(3)));
    }

    #[test]
    fn truncating_holds_appends_and_flushes_off() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        append(&mut log, &[(1, 0)]).unwrap();
        let mut out = vec![];
        let job = log.poll_flush(&mut out).unwrap();
        append(&mut log, &[(2, 1)]).unwrap();
        log.begin_truncate();
        assert!(log.flush_inflight());
        assert_eq!(append(&mut log, &[(3, 2)]), Err(AppendError::Truncating));
        log.handle_flushed(job);
        assert!(!log.flush_inflight());
        assert_eq!(log.poll_flush(&mut out), None, "no new flush while truncating");
        log.truncate_above(Lsn(1), None).unwrap();
        log.end_truncate();
        log.check_invariants();
        assert_eq!(append(&mut log, &[(3, 1)]).unwrap().position.scl, Lsn(3));
    }

    #[test]
    fn truncations_a_segment_missed_are_the_ones_between_its_newest_and_the_claim() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        let (e1, e2, e3, e4) = (Epoch(1 << 32), Epoch(2 << 32), Epoch(3 << 32), Epoch(4 << 32));
        let history = [Truncation { epoch: e1, above: Lsn(3) }, Truncation { epoch: e2, above: Lsn(9) }, Truncation { epoch: e3, above: Lsn(7) }];
        // Never truncated: every older one was missed.
        assert_eq!(log.missed_truncations(&history, e4), history.to_vec());
        log.raise_epoch(e1);
        log.note_truncation(history[0]);
        // Heard e1 only: e2 and e3 were missed (its records above 7 are an old writer's).
        assert_eq!(log.missed_truncations(&history, e4), history[1..].to_vec());
        // The claim's own epoch and later ones are not "missed".
        assert_eq!(log.missed_truncations(&history, e3), history[1..2].to_vec());
    }

    #[test]
    fn truncations_are_checked_against_the_epoch_and_kept_bounded() {
        let mut log = SegmentLog::new(ID, config(1 << 20));
        let e = Epoch::claim_after(Epoch(0), 9);
        assert!(log.truncation_needed(e, Lsn(5)).is_err(), "claim first");
        log.raise_epoch(e);
        assert_eq!(log.truncation_needed(e, Lsn(5)), Ok(true));
        log.note_truncation(Truncation { epoch: e, above: Lsn(5) });
        assert_eq!(log.truncation_needed(e, Lsn(5)), Ok(false));
        assert_eq!(log.truncation_needed(e, Lsn(4)), Ok(true));
        assert!(log.truncation_needed(Epoch::claim_after(e, 1), Lsn(5)).is_err());
        for l in 0..100 {
            log.note_truncation(Truncation { epoch: e, above: Lsn(l) });
        }
        let kept = log.truncations();
        assert_eq!((kept.len(), kept[0].above, kept[TRUNCATIONS_MAX - 1].above), (TRUNCATIONS_MAX, Lsn(36), Lsn(99)));
        // Generation 0 goes to its first claimant too.
        let mut fresh = SegmentLog::new(ID, config(1 << 20));
        assert_eq!(grant_epoch(Epoch(0), Epoch(1)), Ok(true));
        fresh.raise_epoch(Epoch(1));
        assert!(grant_epoch(fresh.epoch(), Epoch(2)).is_err());
        // ...unless the other claimant decided the generation's recovery: the loser never wrote.
        let (loser, winner) = (Epoch::claim_after(Epoch(1), 1), Epoch::claim_after(Epoch(1), 2));
        assert!(grant_epoch(loser, winner).is_err());
        assert_eq!(grant_decided_epoch(loser, false, winner), Ok(true));
        assert!(grant_decided_epoch(loser, true, winner).is_err(), "the holder truncated: it was the decider");
        assert!(grant_decided_epoch(Epoch::claim_after(winner, 3), false, winner).is_err(), "an older generation never");
        assert_eq!(grant_decided_epoch(winner, true, winner), Ok(false));
    }

    #[test]
    fn page_index_is_rebuilt_after_truncation() {
        let mut log = SegmentLog::new(ID, SegmentLogConfig { cache_bytes_max: 1 << 20, ..config(1 << 20) }).with_page_index(PageIndex::new(64));
        let rec = |l: u64| {
            let mut out = Vec::new();
            RecordHeader { lsn: Lsn(l), prev_lsn_in_segment: Lsn(l - 1), prev_lsn_for_page: Lsn(l.saturating_sub(3)), page: PageId(l % 3), cpl: true }
                .encode(&[l as u8; 9], &mut out);
            ValidRecords::validate(Bytes::from(out), 0).unwrap().unwrap()
        };
        let mut file = vec![0u8; SEGMENT_HEADER_BYTES];
        for l in 1..=6 {
            log.handle_append(Epoch(1), &rec(l)).unwrap();
        }
        flush_into(&mut log, &mut file);
        for l in 7..=9 {
            log.handle_append(Epoch(1), &rec(l)).unwrap();
        }
        let out = truncate(&mut log, 8, None).unwrap();
        assert!(out.reindex && out.cut_offset.is_none() && log.page_index().is_none());
        // What the shell does: index the file up to the flushed end, then install.
        let mut pages = PageIndex::new(64);
        let mut prev = Lsn::ZERO;
        crate::segment_file::scan_records(&file[SEGMENT_HEADER_BYTES..], SEGMENT_HEADER_BYTES as u64, &mut prev, |r, at| {
            pages.note_record(r.header().page, Located { lsn: r.lsn(), offset: at, len: r.as_bytes().len() as u32 })
        });
        log.install_page_index(pages);
        let lsns: Vec<Lsn> = log
            .page_read(PageId(2), Lsn(100))
            .unwrap()
            .parts
            .iter()
            .map(|p| match p {
                PagePart::Memory(b) => lsns_of(std::slice::from_ref(b))[0],
                PagePart::Disk(at) => at.lsn,
                PagePart::Scan(_) => panic!("indexed"),
            })
            .collect();
        assert_eq!(lsns, vec![Lsn(2), Lsn(5), Lsn(8)]);
        assert_eq!(log.page_read(PageId(0), Lsn(100)).unwrap().parts.len(), 2, "3 and 6, not 9");
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            /// Records chain[from..to] keeping those whose bit in `mask` is set (a subset: holes).
            Append {
                from: usize,
                to: usize,
                mask: u64,
            },
            Flush,
            Read {
                after: usize,
                upto: usize,
                bytes_max: usize,
            },
        }

        fn op(n: usize) -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0..n, 1..=12usize, any::<u64>()).prop_map(move |(from, len, mask)| Op::Append { from, to: (from + len).min(n), mask }),
                2 => Just(Op::Flush),
                2 => (0..=n, 0..=n, 1..400usize).prop_map(|(after, upto, bytes_max)| Op::Read { after, upto, bytes_max }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Against a model (the set of LSNs held), whatever the order, holes,
            /// duplicates, flushes and reads: invariants hold after every step, SCL is
            /// the end of the longest held prefix, reads return exactly the chain.
            #[test]
            fn segment_log_matches_model(steps in proptest::collection::vec(1u64..4, 40), ops in proptest::collection::vec(op(40), 1..60)) {
                let chain: Vec<u64> = steps.iter().scan(0, |l, s| { *l += s; Some(*l) }).collect();
                let prev = |i: usize| if i == 0 { 0 } else { chain[i - 1] };
                let mut log = SegmentLog::new(ID, SegmentLogConfig { hot_bytes_max: 1 << 30, cache_bytes_max: 300, flush_bytes_max: 200 });
                let mut held = vec![false; chain.len()];
                let mut parts = vec![];
                for op in ops.iter().cloned().chain([Op::Append { from: 0, to: chain.len(), mask: u64::MAX }, Op::Flush]) {
                    match op {
                        Op::Append { from, to, mask } => {
                            let recs: Vec<(u64, u64)> = (from..to).filter(|i| mask >> (i % 64) & 1 == 1).map(|i| (chain[i], prev(i))).collect();
                            if recs.is_empty() { continue; }
                            let out = log.handle_append(Epoch(1), &batch(&recs));
                            let model_scl = held.iter().take_while(|&&h| h).count();
                            let mut scl = if model_scl == 0 { 0 } else { chain[model_scl - 1] };
                            // The core refuses records that skip past its SCL; otherwise it takes them all.
                            let conflict = recs.iter().any(|&(l, p)| { let c = l > scl && p < scl; if p == scl { scl = l; } c });
                            prop_assert_eq!(out.is_err(), conflict, "{:?}", out);
                            if !conflict {
                                (from..to).filter(|i| mask >> (i % 64) & 1 == 1).for_each(|i| held[i] = true);
                            }
                        }
                        Op::Flush => { flush_all(&mut log); }
                        Op::Read { after, upto, bytes_max } => {
                            let (after, upto) = (Lsn(if after == 0 { 0 } else { chain[after - 1] }), Lsn(if upto == 0 { 0 } else { chain[upto - 1] }));
                            parts.clear();
                            match log.read(after, upto, bytes_max, &mut parts) {
                                Ok(last) => {
                                    let got = lsns_of(&parts);
                                    let want: Vec<Lsn> = chain.iter().map(|&l| Lsn(l)).filter(|&l| l > after && l <= upto.min(log.scl()) && l <= last).collect();
                                    prop_assert_eq!(&got, &want);
                                    prop_assert!(last == after || got.last() == Some(&last));
                                    if upto.min(log.scl()) > after { prop_assert!(!got.is_empty(), "a read below SCL returns at least one record"); }
                                }
                                Err(Unserved::Disk(disk)) => prop_assert!(disk.after == after && disk.upto <= log.flushed_lsn() && disk.offset >= SEGMENT_HEADER_BYTES as u64),
                                Err(Unserved::Reclaimed(r)) => prop_assert!(false, "nothing was reclaimed: {r}"),
                            }
                        }
                    }
                    log.check_invariants();
                    let model_scl = held.iter().take_while(|&&h| h).count();
                    prop_assert_eq!(log.scl(), Lsn(if model_scl == 0 { 0 } else { chain[model_scl - 1] }));
                }
                prop_assert_eq!((log.scl(), log.flushed_lsn(), log.pending_records()), (Lsn(chain[chain.len() - 1]), Lsn(chain[chain.len() - 1]), 0));
            }
        }
    }
}
