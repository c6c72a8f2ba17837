//! The writer's engine state machine: turns client transactions into redo
//! records, allocates LSNs under the allocation limit (LAL), batches each
//! protection group's records into Append frames, retains frames until every
//! segment holds them, and folds segment acks into VCL/VDL.
//!
//! The daemon around it owns the I/O: one sender per segment asks
//! `poll_send` for the frames after what that segment holds, and every ack
//! goes to `handle_ack`. A transaction is one mini-transaction whose last
//! record is its CPL; it is committed once `vdl() >= commit LSN`.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use crate::gc::Horizon;
use crate::ids::{Epoch, Lsn, PageId, PgId};
use crate::page::{entry_bytes, PageImage, PageOp, PAGE_HEADER_BYTES};
use crate::page_cache::PageCache;
use crate::quorum::{VolumeDurability, SEGMENTS_PER_PG, WRITE_QUORUM};
use crate::record::{RecordHeader, TrustedRecords, RECORD_OVERHEAD_BYTES};
use crate::volume::Volume;
use crate::wire::encode_append;

#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub epoch: Epoch,
    /// LSN allocation limit: no LSN beyond VDL + `lal` is allocated.
    pub lal: u64,
    /// The same limit in bytes: while records not yet on a write quorum take more
    /// than this, new transactions wait for VDL to move (LAL alone would let
    /// large values fill memory while a PG has no quorum).
    pub unquorumed_bytes_max: usize,
    /// A PG's pending records are sealed into a frame once they reach this size...
    pub batch_bytes_max: usize,
    /// ...or as soon as fewer than this many of its frames await a write quorum.
    pub batch_inflight_max: usize,
    /// Frames that a write quorum holds are kept for lagging segments up to this many bytes per PG.
    pub retain_bytes_max: usize,
    /// Memory for page images (`PageImage::memory_bytes`); pages written above VDL stay
    /// past it until VDL covers them.
    pub cache_bytes_max: usize,
    /// How long the GC horizon waits for readers (`gc::READER_GRACE` in writerd).
    pub reader_grace: Duration,
}

/// Where the volume stood when this writer took over.
#[derive(Clone, Debug)]
pub struct Recovered {
    pub vdl: Lsn,
    /// Per PG, the last LSN of its log (its segments' highest SCL).
    pub pg_last: Vec<Lsn>,
    /// Per PG, the point the records were read from and the encoded records
    /// after it (up to `pg_last`), to resend to the segments that lack them.
    pub tails: Vec<(Lsn, Vec<Bytes>)>,
    /// Per PG, the segments that hold this writer's claim and truncation (at
    /// least a read quorum): it allocates LSNs once a write quorum of every PG does.
    pub claimed: Vec<[bool; SEGMENTS_PER_PG]>,
}

impl Recovered {
    /// A volume with no log yet.
    pub fn new_volume(pg_count: usize) -> Self {
        Recovered {
            vdl: Lsn::ZERO,
            pg_last: vec![Lsn::ZERO; pg_count],
            tails: vec![(Lsn::ZERO, Vec::new()); pg_count],
            claimed: vec![[true; SEGMENTS_PER_PG]; pg_count],
        }
    }
}

/// A sealed Append frame of one PG.
#[derive(Clone, Debug)]
pub struct Batch {
    pub last_lsn: Lsn,
    pub frame: Bytes,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Records are allocated and queued; the transaction commits at `commit_lsn`.
    Allocated { commit_lsn: Lsn, pgs: Vec<PgId> },
    /// Fetch these pages (GetPage@LSN once VDL reaches the LSN), `learn_page` them and
    /// submit again with them: the writer does not know their last LSNs, or it needs
    /// their entries to tell whether the transaction keeps them within the size limit.
    NeedPages(Vec<(PgId, PageId, Lsn)>),
    /// Allocation would pass VDL + LAL: retry once VDL reaches `vdl`.
    Stalled { vdl: Lsn },
    /// Refused, nothing allocated: an operation would grow a page past the volume's limit.
    PageFull(PageFull),
    /// Nothing allocated: these PGs (with how many segments hold this writer's
    /// claim) lack a write quorum of claims; retry once `writable()`.
    NoWriteQuorum(Vec<(PgId, usize)>),
}

/// An operation that would grow its page past the volume's `page_bytes_max`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the put of key {:?} would grow {page} to {bytes} bytes, past the volume's page_bytes_max of {max}; \
     nothing was written (delete or shrink entries of that page)",
    String::from_utf8_lossy(.key)
)]
pub struct PageFull {
    pub key: Vec<u8>,
    pub page: PageId,
    pub bytes: usize,
    pub max: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ReadPlan {
    /// The value as of `lsn`; answer once VDL >= `lsn`.
    Cached { lsn: Lsn, value: Option<Vec<u8>> },
    /// Not cached: once VDL >= `lsn`, GetPage@`lsn` from a segment of `pg`.
    Fetch { pg: PgId, page: PageId, lsn: Lsn },
}

/// A segment asks for frames after its position but the writer no longer has them.
#[derive(Debug, PartialEq, Eq)]
pub struct Gap {
    pub segment_at: Lsn,
    pub oldest_retained_after: Lsn,
}

#[derive(Default)]
struct PgLog {
    /// Encoded records not yet sealed into a frame.
    pending: Vec<u8>,
    /// The last LSN allocated on this PG: the next record's `prev_lsn_in_segment`.
    last_lsn: Lsn,
    /// Sealed frames, oldest first, until every segment holds them.
    batches: VecDeque<Batch>,
    retained_bytes: usize,
    /// This PG's GC horizon, which its frames carry: its last record at or below the
    /// volume's (by whole frames), so that a read at the PG's last record at or below a
    /// read point (how readers ask) is never refused.
    horizon: Lsn,
    /// The last LSN of each frame sealed above `horizon`, oldest first.
    sealed: VecDeque<Lsn>,
    /// Frames up to here were released; a segment below it cannot be caught up by resending.
    released_upto: Lsn,
    /// Per segment, the highest flushed LSN it reported: a frame is released once
    /// every segment has it on disk (a node that restarts loses only unflushed records).
    flushed: [Lsn; SEGMENTS_PER_PG],
}

impl PgLog {
    /// Retains `records` (ending at `last_lsn`) as an Append frame to send.
    fn seal(&mut self, epoch: Epoch, pg: PgId, records: &[u8], last_lsn: Lsn) {
        let mut frame = Vec::with_capacity(crate::wire::APPEND_HEADER_BYTES + records.len());
        encode_append(epoch, pg, self.horizon, records, &mut frame);
        self.sealed.push_back(last_lsn);
        self.retained_bytes += frame.len();
        self.batches.push_back(Batch { last_lsn, frame: Bytes::from(frame) });
    }
}

/// What the writer knows of a page without its image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PageState {
    /// Its last record.
    lsn: Lsn,
    /// Its size: exact while its image is cached, else at least the size (a put made
    /// without the image counts as a new entry, a delete as freeing nothing).
    bytes: usize,
}

impl PageState {
    const EMPTY: PageState = PageState { lsn: Lsn::ZERO, bytes: PAGE_HEADER_BYTES };
}

pub struct WriterCore {
    volume: Volume,
    config: WriterConfig,
    durability: VolumeDurability,
    pgs: Vec<PgLog>,
    next_lsn: Lsn,
    /// Every page touched or fetched since the writer started.
    pages: HashMap<PageId, PageState>,
    /// On a new volume every page is known to be empty.
    all_pages_known: bool,
    /// Images of pages; those at or below VDL may be evicted (GetPage@LSN brings them back).
    cache: PageCache,
    recovered: Recovered,
    /// The GC horizon its frames carry, from its readers' read points.
    horizon: Horizon,
}

impl WriterCore {
    pub fn new(volume: Volume, config: WriterConfig, recovered: Recovered) -> Self {
        assert_eq!(recovered.pg_last.len(), volume.pg_count());
        assert!(config.lal >= crate::api::TXN_OPS_MAX as u64, "LAL must admit the largest transaction");
        let pgs = recovered
            .pg_last
            .iter()
            .zip(&recovered.tails)
            .enumerate()
            .map(|(pg, (&last, (_, runs)))| {
                // A segment holding the PG's last record before the tail (the first tail
                // record's backlink; `last` when there is no tail) lacks only the tail.
                let before = runs.iter().find_map(|r| TrustedRecords::new(r).next()).map_or(last, |(rec, _)| rec.prev_lsn_in_segment());
                let mut log = PgLog { last_lsn: last, released_upto: before, flushed: [before; SEGMENTS_PER_PG], ..PgLog::default() };
                // The PG's log before the tail ends there: the horizon may reach it.
                log.sealed.push_back(before);
                // The tail goes out as frames like any other, to every segment below `last`.
                for run in runs {
                    if let Some((rec, _)) = TrustedRecords::new(run).last() {
                        log.seal(config.epoch, PgId(pg as u32), run, rec.lsn());
                    }
                }
                log
            })
            .collect();
        let horizon = Horizon::new(config.reader_grace);
        WriterCore {
            durability: VolumeDurability::new(recovered.vdl, &recovered.pg_last),
            pgs,
            next_lsn: Lsn(recovered.vdl.0 + 1),
            pages: HashMap::new(),
            all_pages_known: recovered.vdl == Lsn::ZERO,
            cache: PageCache::new(config.cache_bytes_max),
            volume,
            config,
            recovered,
            horizon,
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.config.epoch
    }
    /// The VDL this writer recovered: storage discards records above it at its epoch.
    pub fn truncated_above(&self) -> Lsn {
        self.recovered.vdl
    }
    pub fn volume(&self) -> &Volume {
        &self.volume
    }
    /// Panics unless the writer's bookkeeping is consistent: VDL <= VCL <= the
    /// last LSN allocated; per PG, frames retained in LSN order, above what was
    /// released and at or below the PG's last record, their bytes counted; no
    /// page's last record beyond the last allocated; cached images at their
    /// page's last record and size. The simulator calls it after every event.
    pub fn check_invariants(&self) {
        let last = self.last_allocated();
        assert!(self.vdl() <= self.vcl() && self.vcl() <= last, "VDL {} / VCL {} / last allocated {last}", self.vdl(), self.vcl());
        for (pg, log) in self.pgs.iter().enumerate() {
            assert!(log.last_lsn <= last, "pg{pg} ends at {} past the last allocated {last}", log.last_lsn);
            assert!(self.pgcl(PgId(pg as u32)) <= log.last_lsn, "pg{pg}'s PGCL above its last record");
            let mut prev = log.released_upto;
            for b in &log.batches {
                assert!(b.last_lsn > prev && b.last_lsn <= log.last_lsn, "pg{pg}: frame ending at {} out of order (after {prev})", b.last_lsn);
                prev = b.last_lsn;
            }
            assert_eq!(log.retained_bytes, log.batches.iter().map(|b| b.frame.len()).sum::<usize>(), "pg{pg}'s retained bytes");
        }
        assert!(self.pages.values().all(|s| s.lsn <= last), "a page's last record beyond the last allocated");
        self.cache.check_invariants();
        for (&page, state) in &self.pages {
            if let Some(img) = self.cache.peek(page) {
                assert_eq!(PageState { lsn: img.lsn, bytes: img.encoded_bytes() }, *state, "{page}'s cached image");
            }
        }
    }

    /// Memory the cached page images take, and how many there are.
    pub fn cached(&self) -> (usize, usize) {
        (self.cache.bytes(), self.cache.len())
    }

    pub fn vcl(&self) -> Lsn {
        self.durability.vcl()
    }
    pub fn vdl(&self) -> Lsn {
        self.durability.vdl()
    }
    pub fn last_allocated(&self) -> Lsn {
        Lsn(self.next_lsn.0 - 1)
    }
    pub fn pgcl(&self, pg: PgId) -> Lsn {
        self.durability.pgcl(pg)
    }
    /// Segments of `pg` at the newest position any of them acknowledged (those
    /// keeping up). Frames go out only a few ahead of quorum, so with fewer
    /// than a write quorum keeping up, this is what shows which are missing.
    pub fn segments_current(&self, pg: PgId) -> usize {
        let newest = (0..SEGMENTS_PER_PG).map(|s| self.durability.segment_scl(pg, s)).max().expect("six segments");
        self.durability.segments_at(pg, newest)
    }
    /// Bytes of records not yet on a write quorum: pending, plus frames above PGCL.
    pub fn unquorumed_bytes(&self) -> usize {
        self.pgs
            .iter()
            .enumerate()
            .map(|(pg, log)| {
                let pgcl = self.durability.pgcl(PgId(pg as u32));
                log.pending.len() + log.batches.iter().rev().take_while(|b| b.last_lsn > pgcl).map(|b| b.frame.len()).sum::<usize>()
            })
            .sum()
    }

    /// Bytes of records allocated and not yet released: pending plus retained frames.
    pub fn inflight_bytes(&self) -> usize {
        self.pgs.iter().map(|p| p.pending.len() + p.retained_bytes).sum()
    }

    fn known(&self, page: PageId) -> Option<PageState> {
        self.pages.get(&page).copied().or(self.all_pages_known.then_some(PageState::EMPTY))
    }

    /// Records a page's last LSN as fetched at recovery point or later (a fetch
    /// racing with a write must not move it back), and caches an image that is current.
    pub fn learn_page(&mut self, image: PageImage) {
        if self.known(image.page).is_none() {
            self.pages.insert(image.page, PageState { lsn: image.lsn, bytes: image.encoded_bytes() });
        }
        if let Some(state) = self.pages.get_mut(&image.page).filter(|s| s.lsn == image.lsn) {
            state.bytes = image.encoded_bytes();
            self.cache.insert(image);
            self.cache.evict(self.durability.vdl());
        }
    }

    /// The size of each page after each operation: refused if one would grow a page past
    /// the volume's limit (a page already past a lowered limit may still shrink). Every
    /// intermediate size counts: records apply one by one, and storage images pages
    /// mid-transaction. A page whose image is neither cached nor in `fetched` is sized
    /// from its `PageState` bound, and fetched when that bound would not do.
    fn page_sizes(&self, ops: &[PageOp], placed: &[(PageId, PgId)], fetched: &[PageImage]) -> Result<Vec<usize>, Admit> {
        let max = self.volume.page_bytes_max as usize;
        let mut sizes: HashMap<PageId, usize> = HashMap::new();
        // Value lengths set by the transaction's earlier operations (`None`: deleted).
        let mut set: HashMap<&[u8], Option<usize>> = HashMap::new();
        let mut need = Vec::new();
        let mut after = Vec::with_capacity(ops.len());
        for (op, &(page, pg)) in ops.iter().zip(placed) {
            let state = self.known(page).expect("unknown pages are fetched first");
            let image = self.cache.peek(page).or_else(|| fetched.iter().find(|i| i.page == page && i.lsn == state.lsn));
            let before = *sizes.entry(page).or_insert_with(|| image.map_or(state.bytes, PageImage::encoded_bytes));
            let added = op.value_len().map_or(0, |v| entry_bytes(op.key().len(), v));
            let size = match image {
                Some(img) => {
                    let old = set.get(op.key()).copied().unwrap_or_else(|| img.get(op.key()).map(<[u8]>::len));
                    set.insert(op.key(), op.value_len());
                    before + added - old.map_or(0, |v| entry_bytes(op.key().len(), v))
                }
                None => before + added,
            };
            if size > max && size > before {
                match image {
                    Some(_) => return Err(Admit::PageFull(PageFull { key: op.key().to_vec(), page, bytes: size, max })),
                    None => need.push((pg, page, self.fetch_lsn(pg, state.lsn))),
                }
            }
            sizes.insert(page, size);
            after.push(size);
        }
        if need.is_empty() {
            Ok(after)
        } else {
            need.sort();
            need.dedup();
            Err(Admit::NeedPages(need))
        }
    }

    /// Segment `segment` of `pg` holds this writer's claim and truncation now (its
    /// session's claim was granted). Returns whether that made the writer writable.
    pub fn on_claimed(&mut self, pg: PgId, segment: usize) -> bool {
        let was = self.writable();
        self.recovered.claimed[pg.0 as usize][segment] = true;
        !was && self.writable()
    }

    /// Whether a write quorum of every PG holds this writer's claim: until then
    /// it serves reads at VDL and allocates no LSN (`takeover`: a takeover from a
    /// read quorum).
    pub fn writable(&self) -> bool {
        self.short_of_claims().is_empty()
    }

    /// The PGs that lack a write quorum of claims, with how many segments hold one.
    pub fn short_of_claims(&self) -> Vec<(PgId, usize)> {
        let claimed = self.recovered.claimed.iter().map(|pg| pg.iter().filter(|&&c| c).count());
        claimed.enumerate().filter(|&(_, n)| n < WRITE_QUORUM).map(|(pg, n)| (PgId(pg as u32), n)).collect()
    }

    /// Allocates the records of one transaction (checked by the caller). `fetched`: the
    /// images of an earlier `NeedPages` answer (they need not fit the cache).
    pub fn submit(&mut self, ops: &[PageOp], fetched: &[PageImage]) -> Admit {
        let short = self.short_of_claims();
        if !short.is_empty() {
            return Admit::NoWriteQuorum(short);
        }
        let placed: Vec<(PageId, PgId)> = ops
            .iter()
            .map(|op| {
                let page = self.volume.page_of(op.key());
                (page, self.volume.pg_of(page))
            })
            .collect();
        let mut missing: Vec<(PgId, PageId, Lsn)> =
            placed.iter().filter(|(page, _)| self.known(*page).is_none()).map(|&(page, pg)| (pg, page, self.fetch_lsn(pg, Lsn::ZERO))).collect();
        if !missing.is_empty() {
            missing.sort();
            missing.dedup();
            return Admit::NeedPages(missing);
        }
        let sizes = match self.page_sizes(ops, &placed, fetched) {
            Ok(sizes) => sizes,
            Err(admit) => return admit,
        };
        let last = self.next_lsn.0 + ops.len() as u64 - 1;
        if last > self.vdl().0 + self.config.lal {
            return Admit::Stalled { vdl: Lsn(last - self.config.lal) };
        }
        if self.unquorumed_bytes() > self.config.unquorumed_bytes_max {
            return Admit::Stalled { vdl: Lsn(self.vdl().0 + 1) };
        }
        let mut pgs = Vec::new();
        let n = ops.len();
        let mut payload = Vec::new();
        for (i, ((op, (page, pg)), bytes)) in ops.iter().zip(placed).zip(sizes).enumerate() {
            let lsn = self.next_lsn;
            self.next_lsn = Lsn(lsn.0 + 1);
            let cpl = i + 1 == n;
            let prev_for_page = self.known(page).expect("checked above").lsn;
            let log = &mut self.pgs[pg.0 as usize];
            payload.clear();
            op.encode(&mut payload);
            log.pending.reserve(RECORD_OVERHEAD_BYTES + payload.len());
            RecordHeader { lsn, prev_lsn_in_segment: log.last_lsn, prev_lsn_for_page: prev_for_page, page, cpl }.encode(&payload, &mut log.pending);
            log.last_lsn = lsn;
            self.durability.allocate(pg, lsn, cpl);
            let mut exact = self.cache.update(page, |img| {
                img.apply_op(lsn, op.clone());
                img.encoded_bytes()
            });
            if exact.is_none() && prev_for_page == Lsn::ZERO {
                // The page's first record: its image is known without asking storage.
                let mut img = PageImage::empty(page);
                img.apply_op(lsn, op.clone());
                exact = Some(img.encoded_bytes());
                self.cache.insert(img);
            }
            // With the image at hand the size is exact, where the check may have used the bound.
            self.pages.insert(page, PageState { lsn, bytes: exact.unwrap_or(bytes) });
            if !pgs.contains(&pg) {
                pgs.push(pg);
            }
        }
        self.cache.evict(self.durability.vdl());
        Admit::Allocated { commit_lsn: Lsn(last), pgs }
    }

    /// How to read `key`.
    pub fn read(&mut self, key: &[u8]) -> ReadPlan {
        let page = self.volume.page_of(key);
        if let Some(img) = self.cache.get(page) {
            return ReadPlan::Cached { lsn: img.lsn, value: img.get(key).map(<[u8]>::to_vec) };
        }
        match self.known(page).map(|s| s.lsn) {
            Some(Lsn::ZERO) => ReadPlan::Cached { lsn: Lsn::ZERO, value: None },
            known => {
                let pg = self.volume.pg_of(page);
                ReadPlan::Fetch { pg, page, lsn: self.fetch_lsn(pg, known.unwrap_or(Lsn::ZERO)) }
            }
        }
    }

    /// Frames of `pg` with records after `segment_at`, for a segment that holds
    /// everything up to it; seals pending records first when the batching policy allows.
    pub fn poll_send(&mut self, pg: PgId, segment_at: Lsn, out: &mut Vec<Batch>) -> Result<(), Gap> {
        let pgcl = self.durability.pgcl(pg);
        let epoch = self.config.epoch;
        let log = &mut self.pgs[pg.0 as usize];
        if segment_at < log.released_upto {
            return Err(Gap { segment_at, oldest_retained_after: log.released_upto });
        }
        let mut awaiting_quorum = log.batches.iter().rev().take_while(|b| b.last_lsn > pgcl).count();
        let max = self.config.batch_bytes_max;
        while !log.pending.is_empty() && (awaiting_quorum < self.config.batch_inflight_max || log.pending.len() >= max) {
            // Whole records up to `max` bytes (at least one): a backlog becomes several
            // frames, each within the storage nodes' frame limit.
            let (mut cut, mut last_lsn) = (0, Lsn::ZERO);
            for (rec, range) in TrustedRecords::new(&log.pending) {
                if cut > 0 && range.end > max {
                    break;
                }
                (cut, last_lsn) = (range.end, rec.lsn());
            }
            let pending = std::mem::take(&mut log.pending); // borrowed by `seal` without a copy
            log.seal(epoch, pg, &pending[..cut], last_lsn);
            log.pending = pending;
            log.pending.drain(..cut);
            awaiting_quorum += 1;
        }
        let from = log.batches.partition_point(|b| b.last_lsn <= segment_at);
        out.extend(log.batches.range(from..).cloned());
        Ok(())
    }

    /// A segment's position as it reports it now, even if lower than it acked before
    /// (a node that restarted lost its unflushed records): it no longer counts for them.
    pub fn reset_segment(&mut self, pg: PgId, segment: usize, scl: Lsn) {
        self.durability.reset_segment(pg, segment, scl);
    }

    /// Segment `segment` of `pg` reports its SCL and flushed LSN. Returns whether VDL advanced.
    pub fn handle_ack(&mut self, pg: PgId, segment: usize, scl: Lsn, flushed_lsn: Lsn) -> bool {
        let advanced = self.durability.handle_ack(pg, segment, scl);
        let pgcl = self.durability.pgcl(pg);
        let log = &mut self.pgs[pg.0 as usize];
        log.flushed[segment] = log.flushed[segment].max(flushed_lsn);
        let flushed_by_all = *log.flushed.iter().min().expect("six segments");
        while let Some(b) = log.batches.front() {
            // Release frames every segment has flushed, and beyond the retention budget
            // also frames a write quorum holds (a segment that needs them is repaired by its peers).
            let release = b.last_lsn <= flushed_by_all || (log.retained_bytes > self.config.retain_bytes_max && b.last_lsn <= pgcl);
            if !release {
                break;
            }
            log.retained_bytes -= b.frame.len();
            log.released_upto = log.released_upto.max(b.last_lsn);
            log.batches.pop_front();
        }
        if advanced {
            // Pages written below the new VDL may go now.
            self.cache.evict(self.durability.vdl());
        }
        advanced
    }

    /// Where to read a page of `pg` whose newest version is at `lsn` (`Lsn::ZERO`: not
    /// known; then it is at or below the PG's recovered last record, as it has not been
    /// written since): never below the PG's GC horizon, which storage refuses (an older
    /// writer's is at or below that record); a later LSN of the PG shows the same version.
    fn fetch_lsn(&self, pg: PgId, lsn: Lsn) -> Lsn {
        let p = pg.0 as usize;
        lsn.max(self.recovered.pg_last[p]).max(self.pgs[p].horizon)
    }

    /// Reader `reader` (a replica's feed) reads at `read_point`.
    pub fn on_read_point(&mut self, reader: u64, read_point: Lsn) {
        self.horizon.on_read_point(reader, read_point);
    }

    /// Reader `reader`'s feed closed at `now`.
    pub fn on_reader_gone(&mut self, reader: u64, now: Duration) {
        self.horizon.on_reader_gone(reader, now);
    }

    /// Moves the GC horizon its next frames carry (`Horizon::advance`), each PG's to
    /// its last frame at or below the volume's.
    pub fn advance_horizon(&mut self, now: Duration) -> Lsn {
        let flushed = self.volume_flushed();
        let horizon = self.horizon.advance(now, self.vdl(), flushed);
        for log in &mut self.pgs {
            while log.sealed.front().is_some_and(|&l| l <= horizon) {
                log.horizon = log.sealed.pop_front().expect("checked");
            }
        }
        horizon
    }

    /// `pg`'s GC horizon.
    pub fn pg_horizon(&self, pg: PgId) -> Lsn {
        self.pgs[pg.0 as usize].horizon
    }

    pub fn horizon(&self) -> &Horizon {
        &self.horizon
    }

    /// The highest LSN up to which every PG's records are on disk on a write quorum
    /// (a PG on disk up to its last record bounds nothing).
    pub fn volume_flushed(&self) -> Lsn {
        let pg_flushed = |log: &PgLog| {
            let mut f = log.flushed;
            f.sort_unstable_by(|a, b| b.cmp(a));
            let quorum = f[crate::quorum::WRITE_QUORUM - 1];
            if quorum >= log.last_lsn {
                Lsn(u64::MAX)
            } else {
                quorum
            }
        };
        self.pgs.iter().map(pg_flushed).min().unwrap_or(Lsn(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::NodeSpec;
    use crate::wire::Message;

    fn volume(pgs: u32) -> Volume {
        let nodes = (1..=6).map(|i| NodeSpec { id: i, az: ["a", "b", "c"][((i - 1) / 2) as usize].into(), addr: format!("127.0.0.1:{i}") }).collect();
        Volume::local("127.0.0.1:1".into(), nodes, pgs, 64).unwrap()
    }

    fn config() -> WriterConfig {
        WriterConfig {
            epoch: Epoch(1),
            lal: 2000,
            unquorumed_bytes_max: 1 << 20,
            batch_bytes_max: 1 << 20,
            batch_inflight_max: 1,
            retain_bytes_max: 1 << 20,
            cache_bytes_max: 1 << 20,
            reader_grace: crate::gc::READER_GRACE,
        }
    }

    fn fresh(pgs: u32) -> WriterCore {
        WriterCore::new(volume(pgs), config(), Recovered::new_volume(pgs as usize))
    }

    fn put(k: &str, v: &str) -> PageOp {
        PageOp::Put { key: k.into(), value: v.into() }
    }

    #[test]
    fn a_writer_claimed_on_a_read_quorum_allocates_once_a_write_quorum_of_every_pg_holds_its_claim() {
        let mut recovered = Recovered::new_volume(2);
        recovered.claimed = vec![[true, false, true, false, true, false], [true, true, true, true, false, false]];
        let mut w = WriterCore::new(volume(2), config(), recovered);
        assert!(!w.writable());
        assert_eq!(w.submit(&[put("a", "1")], &[]), Admit::NoWriteQuorum(vec![(PgId(0), 3)]));
        assert_eq!(w.last_allocated(), Lsn::ZERO, "nothing allocated");
        assert!(!w.on_claimed(PgId(1), 5), "pg0 still short");
        assert!(!w.on_claimed(PgId(0), 2), "a segment that held the claim already");
        assert!(w.on_claimed(PgId(0), 3), "pg0's fourth claim");
        assert!(!w.on_claimed(PgId(0), 5), "writable already");
        assert!(matches!(w.submit(&[put("a", "1")], &[]), Admit::Allocated { commit_lsn: Lsn(1), .. }));
    }

    /// `n` keys on the page of `first`.
    fn keys_on_page(w: &WriterCore, first: &str, n: usize) -> Vec<String> {
        let page = w.volume().page_of(first.as_bytes());
        (0..).map(|i| format!("k{i}")).filter(|k| w.volume().page_of(k.as_bytes()) == page).take(n).collect()
    }

    /// A writer whose volume has the smallest page limit, and a value a third of it.
    fn small_pages(cache_bytes_max: usize) -> (WriterCore, String) {
        let mut v = volume(1);
        v.page_bytes_max = crate::volume::PAGE_BYTES_MAX_MIN;
        let w = WriterCore::new(v, WriterConfig { cache_bytes_max, ..config() }, Recovered::new_volume(1));
        (w, "v".repeat(crate::volume::PAGE_BYTES_MAX_MIN as usize / 3 - 100))
    }

    fn commit(w: &mut WriterCore, ops: Vec<PageOp>) -> Lsn {
        match w.submit(&ops, &[]) {
            Admit::Allocated { commit_lsn, .. } => commit_lsn,
            other => panic!("not allocated: {other:?}"),
        }
    }

    fn send(w: &mut WriterCore, pg: u32, at: u64) -> Vec<Batch> {
        let mut out = Vec::new();
        w.poll_send(PgId(pg), Lsn(at), &mut out).unwrap();
        out
    }

    fn ack(w: &mut WriterCore, pg: u32, segments: std::ops::Range<usize>, scl: u64) {
        for s in segments {
            w.handle_ack(PgId(pg), s, Lsn(scl), Lsn::ZERO);
        }
    }

    /// Decodes a frame back into (lsn, prev_in_segment, cpl) triples.
    fn records(b: &Batch) -> Vec<(u64, u64, bool)> {
        let Message::Append { records, .. } = Message::decode(b.frame.slice(4..)).unwrap() else { panic!() };
        records.iter().map(|(r, _)| (r.lsn().0, r.prev_lsn_in_segment().0, r.header().cpl)).collect()
    }

    #[test]
    fn a_transaction_commits_when_a_quorum_acks() {
        let mut w = fresh(1);
        let c = commit(&mut w, vec![put("a", "1"), put("b", "2")]);
        assert_eq!(c, Lsn(2));
        let b = send(&mut w, 0, 0);
        assert_eq!(records(&b[0]), [(1, 0, false), (2, 1, true)]);
        ack(&mut w, 0, 0..3, 2);
        assert_eq!(w.vdl(), Lsn(0));
        ack(&mut w, 0, 3..4, 2);
        assert_eq!(w.vdl(), Lsn(2));
    }

    #[test]
    fn batches_fill_while_one_awaits_quorum() {
        let mut w = fresh(1);
        commit(&mut w, vec![put("a", "1")]);
        assert_eq!(send(&mut w, 0, 0).len(), 1, "the first record goes out at once");
        commit(&mut w, vec![put("b", "1")]);
        commit(&mut w, vec![put("c", "1")]);
        assert_eq!(send(&mut w, 0, 1).len(), 0, "one frame awaits quorum: keep filling");
        ack(&mut w, 0, 0..4, 1);
        let b = send(&mut w, 0, 1);
        assert_eq!(records(&b[0]), [(2, 1, true), (3, 2, true)]);
        // A segment that is behind gets every retained frame.
        assert_eq!(send(&mut w, 0, 0).len(), 2);
    }

    #[test]
    fn a_returning_segment_is_resent_what_it_missed_and_frames_are_released_once_all_flushed_them() {
        let mut w = fresh(1);
        for i in 0..3 {
            commit(&mut w, vec![put(&format!("k{i}"), "v")]);
            send(&mut w, 0, i);
            ack(&mut w, 0, 0..5, i + 1); // segment 5 is down
        }
        assert_eq!(w.vdl(), Lsn(3));
        let missed = send(&mut w, 0, 0);
        assert_eq!(missed.iter().map(|b| b.last_lsn.0).collect::<Vec<_>>(), [1, 2, 3]);
        ack(&mut w, 0, 5..6, 3);
        assert!(w.inflight_bytes() > 0, "held in memory is not enough: a restart could lose it");
        for s in 0..6 {
            w.handle_ack(PgId(0), s, Lsn(3), Lsn(if s == 2 { 1 } else { 3 }));
        }
        // Segment 2 restarts having flushed only LSN 1: it is resent the rest.
        assert_eq!(send(&mut w, 0, 1).iter().map(|b| b.last_lsn.0).collect::<Vec<_>>(), [2, 3]);
        w.handle_ack(PgId(0), 2, Lsn(3), Lsn(3));
        assert_eq!(w.inflight_bytes(), 0, "every segment flushed everything");
    }

    #[test]
    fn a_backlog_is_cut_into_frames_within_the_size_limit() {
        let mut w = fresh(1);
        w.config.batch_bytes_max = 300;
        commit(&mut w, vec![put("a", "1")]);
        send(&mut w, 0, 0); // one frame awaits quorum: the rest queues
        for i in 0..20 {
            commit(&mut w, vec![put(&format!("k{i}"), &"v".repeat(50))]);
        }
        let frames = send(&mut w, 0, 1);
        assert!(frames.len() > 1, "the backlog passed the limit: it goes out in pieces");
        let mut next = 2;
        for f in &frames {
            assert!(f.frame.len() <= 300 + crate::wire::APPEND_HEADER_BYTES, "frame of {} bytes", f.frame.len());
            let lsns: Vec<u64> = records(f).iter().map(|r| r.0).collect();
            assert_eq!(lsns[0], next);
            assert_eq!(*lsns.last().unwrap(), f.last_lsn.0);
            next = f.last_lsn.0 + 1;
        }
        assert!(next <= 22);
    }

    #[test]
    fn retention_past_its_budget_leaves_a_gap() {
        let mut w = fresh(1);
        w.config.retain_bytes_max = 0;
        commit(&mut w, vec![put("a", "1")]);
        send(&mut w, 0, 0);
        ack(&mut w, 0, 0..4, 1);
        let mut out = Vec::new();
        assert_eq!(w.poll_send(PgId(0), Lsn(0), &mut out), Err(Gap { segment_at: Lsn(0), oldest_retained_after: Lsn(1) }));
    }

    #[test]
    fn lal_stalls_allocation_until_vdl_moves() {
        let mut w = fresh(1);
        w.config.lal = 2;
        commit(&mut w, vec![put("a", "1"), put("b", "1")]);
        assert_eq!(w.submit(&[put("c", "1")], &[]), Admit::Stalled { vdl: Lsn(1) });
        send(&mut w, 0, 0);
        ack(&mut w, 0, 0..4, 2);
        assert_eq!(commit(&mut w, vec![put("c", "1")]), Lsn(3));
    }

    #[test]
    fn bytes_without_quorum_stall_allocation_until_vdl_moves() {
        let mut w = fresh(1);
        w.config.unquorumed_bytes_max = 1000;
        let big = "v".repeat(1200);
        commit(&mut w, vec![put("a", &big)]);
        assert_eq!(w.submit(&[put("b", "1")], &[]), Admit::Stalled { vdl: Lsn(1) }, "1.2 KB await quorum");
        send(&mut w, 0, 0);
        assert!(matches!(w.submit(&[put("b", "1")], &[]), Admit::Stalled { .. }), "sent is not enough");
        ack(&mut w, 0, 0..4, 1);
        assert_eq!(commit(&mut w, vec![put("b", "1")]), Lsn(2));
    }

    #[test]
    fn frames_carry_the_horizon_of_the_slowest_reader() {
        let mut w = fresh(1);
        let horizon_of = |b: &Batch| match Message::decode(b.frame.slice(4..)).unwrap() {
            Message::Append { horizon, .. } => horizon,
            other => panic!("{other:?}"),
        };
        let c1 = commit(&mut w, vec![put("a", "1")]);
        assert_eq!(horizon_of(&send(&mut w, 0, 0)[0]), Lsn::ZERO);
        for s in 0..4 {
            w.handle_ack(PgId(0), s, c1, c1);
        }
        w.on_read_point(7, Lsn::ZERO);
        let later = crate::gc::READER_GRACE;
        w.advance_horizon(Duration::ZERO);
        assert_eq!(w.advance_horizon(later), Lsn::ZERO, "a replica still reads at 0");
        w.on_read_point(7, c1);
        assert_eq!(w.advance_horizon(later), c1, "VDL, flushed on a write quorum, read by everyone");
        assert_eq!(w.pg_horizon(PgId(0)), c1);
        let c2 = commit(&mut w, vec![put("a", "2")]);
        assert_eq!(w.advance_horizon(later), c1, "c2 is neither durable nor flushed yet");
        assert_eq!(records(&send(&mut w, 0, c1.0)[0])[0].0, c2.0);
        assert_eq!(horizon_of(&send(&mut w, 0, c1.0)[0]), c1);
    }

    #[test]
    fn a_pg_horizon_stays_at_its_last_record_below_the_volume_horizon() {
        let mut w = fresh(2);
        let keys: Vec<String> = (0..100).map(|i| format!("key{i}")).collect();
        let on = |w: &WriterCore, pg| keys.iter().find(|k| w.volume().pg_of(w.volume().page_of(k.as_bytes())) == PgId(pg)).unwrap().clone();
        let (k0, k1) = (on(&w, 0), on(&w, 1));
        let a = commit(&mut w, vec![put(&k0, "x")]);
        send(&mut w, 0, 0);
        let b = commit(&mut w, vec![put(&k1, "y")]);
        send(&mut w, 1, 0);
        for s in 0..6 {
            w.handle_ack(PgId(0), s, a, a);
            w.handle_ack(PgId(1), s, b, b);
        }
        w.advance_horizon(Duration::ZERO);
        assert_eq!(w.advance_horizon(crate::gc::READER_GRACE), b);
        // Readers ask PG 0 at its last record (`a`), below the volume's horizon: never refused.
        assert_eq!((w.pg_horizon(PgId(0)), w.pg_horizon(PgId(1))), (a, b));
    }

    #[test]
    fn a_transaction_over_two_pgs_waits_for_both() {
        let mut w = fresh(2);
        let (k0, k1) = {
            let keys: Vec<String> = (0..100).map(|i| format!("key{i}")).collect();
            let on = |pg| keys.iter().find(|k| w.volume().pg_of(w.volume().page_of(k.as_bytes())) == PgId(pg)).unwrap().clone();
            (on(0), on(1))
        };
        let c = commit(&mut w, vec![put(&k0, "x"), put(&k1, "y")]);
        send(&mut w, 0, 0);
        send(&mut w, 1, 0);
        ack(&mut w, 1, 0..6, c.0);
        assert_eq!(w.vdl(), Lsn(0), "PG 0 has not reached quorum");
        ack(&mut w, 0, 0..4, 1);
        assert_eq!(w.vdl(), c);
    }

    #[test]
    fn a_recovered_tail_is_resent_to_segments_below_it() {
        // The last writer crashed: some segments hold LSNs 6..8 of the PG, others stop at 5.
        let mut tail = Vec::new();
        for l in 6..=8u64 {
            let mut payload = Vec::new();
            put(&format!("k{l}"), "v").encode(&mut payload);
            RecordHeader { lsn: Lsn(l), prev_lsn_in_segment: Lsn(l - 1), prev_lsn_for_page: Lsn::ZERO, page: PageId(1), cpl: true }.encode(&payload, &mut tail);
        }
        let recovered = Recovered { vdl: Lsn(8), pg_last: vec![Lsn(8)], tails: vec![(Lsn(5), vec![Bytes::from(tail)])], ..Recovered::new_volume(1) };
        let mut w = WriterCore::new(volume(1), config(), recovered);
        let resent = send(&mut w, 0, 5);
        assert_eq!(records(&resent[0]).iter().map(|r| r.0).collect::<Vec<_>>(), [6, 7, 8]);
        assert!(send(&mut w, 0, 8).is_empty(), "a segment at the end needs nothing");
        for s in 0..6 {
            w.handle_ack(PgId(0), s, Lsn(8), Lsn(8));
        }
        assert_eq!(w.inflight_bytes(), 0);
        let page = w.volume().page_of(b"new");
        w.learn_page(PageImage::empty(page)); // as GetPage@LSN would answer
        let c = commit(&mut w, vec![put("new", "v")]);
        assert_eq!(records(&send(&mut w, 0, 8)[0]), [(c.0, 8, true)], "new records chain onto the tail");
    }

    #[test]
    fn a_put_past_the_page_limit_is_refused_before_any_lsn_is_allocated() {
        let (mut w, big) = small_pages(1 << 20);
        let keys = keys_on_page(&w, "k0", 4);
        for k in &keys[..3] {
            commit(&mut w, vec![put(k, &big)]);
        }
        let (last, inflight) = (w.last_allocated(), w.inflight_bytes());
        let other = (0..).map(|i| format!("o{i}")).find(|k| w.volume().page_of(k.as_bytes()) != w.volume().page_of(b"k0")).unwrap();
        // The whole transaction is refused, the put to another page too.
        let Admit::PageFull(full) = w.submit(&[put(&other, "x"), put(&keys[3], &big)], &[]) else { panic!("a fourth value fits no page") };
        assert_eq!((full.key, full.page, full.max), (keys[3].clone().into_bytes(), w.volume().page_of(b"k0"), crate::volume::PAGE_BYTES_MAX_MIN as usize));
        assert_eq!(full.bytes, PAGE_HEADER_BYTES + keys.iter().map(|k| entry_bytes(k.len(), big.len())).sum::<usize>());
        assert_eq!((w.last_allocated(), w.inflight_bytes()), (last, inflight), "nothing allocated");
        assert_eq!(w.read(other.as_bytes()), ReadPlan::Cached { lsn: Lsn::ZERO, value: None });
        w.check_invariants();
        // The full page still takes what does not grow it: an overwrite, a delete, then the put.
        commit(&mut w, vec![put(&keys[0], &big[1..])]);
        commit(&mut w, vec![PageOp::Delete { key: keys[1].clone().into_bytes() }, put(&keys[3], &big)]);
        // Every intermediate size counts: growing first and shrinking after is refused.
        assert!(matches!(w.submit(&[put(&keys[1], &big), PageOp::Delete { key: keys[2].clone().into_bytes() }], &[]), Admit::PageFull(_)));
        w.check_invariants();
    }

    #[test]
    fn a_page_not_cached_is_sized_by_a_bound_and_fetched_once_the_bound_would_pass_the_limit() {
        // No cache: pages are sized from what the writer knows without their images.
        let (mut w, big) = small_pages(0);
        let keys = keys_on_page(&w, "k0", 4);
        let page = w.volume().page_of(b"k0");
        let mut storage = PageImage::empty(page); // the page as GetPage@LSN would serve it
        let mut write = |w: &mut WriterCore, k: &str, fetch: bool| {
            let op = put(k, &big);
            let fetched = if fetch { vec![storage.clone()] } else { vec![] };
            let admit = w.submit(std::slice::from_ref(&op), &fetched);
            if let Admit::Allocated { commit_lsn, .. } = admit {
                storage.apply_op(commit_lsn, op);
            }
            admit
        };
        // Two values, then an overwrite that, without the image, may be a third entry.
        for k in [&keys[0], &keys[1], &keys[0]] {
            assert!(matches!(write(&mut w, k, false), Admit::Allocated { .. }));
        }
        // One more would pass the limit: the writer needs the page as of its last record.
        assert_eq!(write(&mut w, &keys[1], false), Admit::NeedPages(vec![(PgId(0), page, w.last_allocated())]));
        assert!(matches!(w.submit(&[put(&keys[1], &big)], &[PageImage::empty(page)]), Admit::NeedPages(_)), "an image at another LSN is no use");
        assert!(matches!(write(&mut w, &keys[1], true), Admit::Allocated { .. }), "the overwrite keeps the size");
        assert_eq!(w.cached(), (0, 0), "the fetched image served without being cached");
        // Sized exactly again: a third entry fits without fetching; an overwrite needs the page, then fits.
        assert!(matches!(write(&mut w, &keys[2], false), Admit::Allocated { .. }));
        assert!(matches!(write(&mut w, &keys[0], false), Admit::NeedPages(_)));
        assert!(matches!(write(&mut w, &keys[0], true), Admit::Allocated { .. }));
        // A fourth entry does not fit, which the page shows.
        assert!(matches!(write(&mut w, &keys[3], false), Admit::NeedPages(_)));
        let Admit::PageFull(full) = write(&mut w, &keys[3], true) else { panic!("a fourth value fits no page") };
        assert_eq!(full.bytes, storage.encoded_bytes() + entry_bytes(keys[3].len(), big.len()));
        w.check_invariants();
    }

    #[test]
    fn the_cache_keeps_to_its_bytes_evicting_only_pages_storage_holds() {
        let value = "v".repeat(1000);
        // Eight keys on pages of their own, each page about `one` bytes in memory.
        let v = volume(1);
        let keys: Vec<String> = (0..)
            .map(|i| format!("key{i}"))
            .scan(std::collections::HashSet::new(), |seen, k| Some((seen.insert(v.page_of(k.as_bytes())), k)))
            .filter_map(|(new, k)| new.then_some(k))
            .take(8)
            .collect();
        let one = {
            let mut img = PageImage::empty(PageId(0));
            img.apply_op(Lsn(1), put(&keys[0], &value));
            img.memory_bytes()
        };
        let mut w = WriterCore::new(v, WriterConfig { cache_bytes_max: 4 * one + one / 2, ..config() }, Recovered::new_volume(1));
        // Written, none durable: all stay cached, past the bound.
        let mut lsns = Vec::new();
        for k in &keys {
            lsns.push(commit(&mut w, vec![put(k, &value)]));
        }
        assert_eq!(w.cached().1, 8);
        assert!(w.cached().0 > 4 * one + one / 2);
        // VDL reaches the fifth: the four oldest go (the fifth is clean too, but the bound holds).
        send(&mut w, 0, 0);
        ack(&mut w, 0, 0..4, lsns[4].0);
        assert_eq!(w.cached().1, 4);
        assert!(w.cached().0 <= 4 * one + one / 2);
        for (k, &l) in keys.iter().zip(&lsns).take(4) {
            let page = w.volume().page_of(k.as_bytes());
            assert_eq!(w.read(k.as_bytes()), ReadPlan::Fetch { pg: PgId(0), page, lsn: l }, "evicted: read from storage at the page's LSN");
        }
        assert_eq!(w.read(keys[7].as_bytes()), ReadPlan::Cached { lsn: lsns[7], value: Some(value.clone().into_bytes()) });
        w.check_invariants();
    }

    #[test]
    fn reads_come_from_cache_or_need_a_fetch() {
        let mut w = WriterCore::new(
            volume(1),
            config(),
            Recovered { vdl: Lsn(10), pg_last: vec![Lsn(10)], tails: vec![(Lsn(10), vec![])], ..Recovered::new_volume(1) },
        );
        let page = w.volume().page_of(b"k");
        assert_eq!(w.read(b"k"), ReadPlan::Fetch { pg: PgId(0), page, lsn: Lsn(10) });
        assert_eq!(w.submit(&[put("k", "v")], &[]), Admit::NeedPages(vec![(PgId(0), page, Lsn(10))]));
        let mut img = PageImage::empty(page);
        img.apply_op(Lsn(7), put("k", "old"));
        w.learn_page(img);
        assert_eq!(w.read(b"k"), ReadPlan::Cached { lsn: Lsn(7), value: Some(b"old".to_vec()) });
        let c = commit(&mut w, vec![put("k", "new")]);
        let b = send(&mut w, 0, 10);
        let Message::Append { records, .. } = Message::decode(b[0].frame.slice(4..)).unwrap() else { panic!() };
        let (r, _) = records.iter().next().unwrap();
        assert_eq!((r.header().prev_lsn_for_page, r.prev_lsn_in_segment()), (Lsn(7), Lsn(10)));
        assert_eq!(w.read(b"k"), ReadPlan::Cached { lsn: c, value: Some(b"new".to_vec()) });
    }
}
