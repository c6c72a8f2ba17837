//! A read replica's engine: which log to pull, what to apply, what to keep.
//!
//! Inputs are events: the writer's progress (VDL and, per PG, a bound at or
//! above every record of that PG at or below VDL), storage positions (SCL and
//! flushed LSN of each segment), pulled records and fetched pages. Outputs are
//! decisions: which segment to pull from and how much, and the read point.
//!
//! - **Whole transactions, never past VDL.** Pulled records wait in `pending`
//!   until every PG holds all its records up to a CPL at or below VDL; then
//!   every record up to that CPL is applied at once and the read point moves
//!   to it. A reader never sees half a transaction or an uncommitted write.
//! - **Only cached pages are touched.** A page a reader needs is fetched with
//!   GetPage@LSN at the read point; records applied while the fetch is in
//!   flight are kept for that page and applied to the image when it arrives.
//! - **Retain until flushed.** Applied records stay in `retained` until a
//!   write quorum of their PG's segments has flushed them.
//! - **Streamed, pulled where the stream falls short.** Each PG has at most one
//!   log stream (`StreamLog`): a segment pushes its records as they arrive, within
//!   the credit the replica grants. Pulls fill what the stream did not bring (its
//!   segment missed records, is slow, or the stream is being reopened), from any
//!   segment whose SCL covers them; records are kept once, whoever brought them.
//! - **Backpressure.** Pending plus retained bytes are bounded by
//!   `buffer_bytes_max` (a pull in flight and a stream's unused credit reserve
//!   their share; streams get credit only while `STREAM_HEADROOM_BYTES` of room
//!   would be left, so near the limit only pulls bring records, as with no
//!   stream): with the buffer
//!   full nothing is pulled, except, one record at a time, what the PG that
//!   holds the read point back needs when nothing retained is left to free (so
//!   a transaction larger than the buffer still gets through: the limit may be
//!   exceeded by at most one transaction plus one record: storage serves at
//!   least one record however little is asked, so near the limit pulls go one
//!   at a time; a stream overshoots its credit by one record, into the headroom).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::api::TXN_OPS_MAX;
use crate::ids::{Epoch, Lsn, PageId, PgId};
use crate::page::PageImage;
use crate::page_cache::PageCache;
use crate::quorum::{SEGMENTS_PER_PG, WRITE_QUORUM};
use crate::record::{RecordRef, TrustedRecords, ValidRecords};
use crate::volume::Volume;
use crate::wire::{SegmentPosition, PULL_BYTES_MAX};
use crate::DecodeError;

/// Pulls of one PG in flight at once.
const PULLS_INFLIGHT_MAX: usize = 2;
/// Credit a log stream holds at most; more is granted once less than half is left,
/// so that a stream carrying 1 MB/s costs about one `Credit` frame a second.
pub const STREAM_CREDIT_MAX: usize = 1 << 20;
/// Buffer room that streams leave to pulls. A stream's credit can sit unused for long
/// (its segment has nothing new), and a stream overshoots its credit by one record:
/// in this room pulls still make progress one at a time (see `plan_pull`), and the
/// overshoots of the streams fit (unless their records are this large).
const STREAM_HEADROOM_BYTES: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub buffer_bytes_max: usize,
    /// Memory for page images (`PageImage::memory_bytes`).
    pub cache_bytes_max: usize,
}

/// Where a replica starts, from storage alone (no writer needed).
#[derive(Clone, Debug)]
pub struct Start {
    /// Every record at or below it is on a write quorum of its PG (it need not be a CPL).
    pub durable: Lsn,
    /// Per PG, an LSN at or above every record of the PG at or below `durable`.
    pub bounds: Vec<Lsn>,
}

impl Start {
    /// From the SCLs a replica read from the segments (`None`: no answer): per PG, the
    /// `WRITE_QUORUM`-th highest SCL is complete; the volume is durable up to their minimum.
    /// `None` until every PG has a write quorum of answers.
    pub fn from_scls(scls: &[[Option<Lsn>; SEGMENTS_PER_PG]]) -> Option<Start> {
        let bounds = scls
            .iter()
            .map(|pg| {
                let mut s: Vec<Lsn> = pg.iter().flatten().copied().collect();
                s.sort_unstable_by(|a, b| b.cmp(a));
                s.get(WRITE_QUORUM - 1).copied()
            })
            .collect::<Option<Vec<Lsn>>>()?;
        Some(Start { durable: bounds.iter().copied().min().unwrap_or(Lsn::ZERO), bounds })
    }
}

struct Rec {
    lsn: Lsn,
    cpl: bool,
    page: PageId,
    /// The whole record, CRC-checked when it was pulled.
    bytes: Bytes,
}

impl Rec {
    fn as_ref(&self) -> RecordRef<'_> {
        TrustedRecords::new(&self.bytes).next().expect("one valid record").0
    }
}

struct PgState {
    /// SCL and flushed LSN each segment last reported.
    segments: [SegmentPosition; SEGMENTS_PER_PG],
    /// Highest flushed LSN a write quorum of segments reached (never moves back).
    flushed: Lsn,
    /// At or above every record of this PG at or below `ReplicaCore::vdl`.
    bound: Lsn,
    /// Every record of this PG at or below `have` is pending or was applied.
    have: Lsn,
    /// The last record pulled, to check the next one links back to it.
    last_record: Option<Lsn>,
    pending: VecDeque<Rec>,
    retained: VecDeque<Rec>,
    /// Pulls in flight, oldest first.
    pulls: Vec<Inflight>,
    stream: Option<Stream>,
}

/// A PG's log stream: records that one segment pushes as they arrive.
#[derive(Clone, Copy)]
struct Stream {
    id: u64,
    segment: usize,
    /// Where the next chunk goes on: the last one's `last_lsn`.
    next_after: Lsn,
    /// Granted and not yet used: reserved in the buffer.
    credit: usize,
}

/// A pull in flight: records up to `target` (every candidate segment's SCL had
/// reached it), with `reserved` buffer bytes.
#[derive(Clone, Copy)]
struct Inflight {
    id: u64,
    target: Lsn,
    reserved: usize,
}

/// Where to start pulling so as to meet a CPL at or before `lsn`: each transaction is one
/// MTR of at most TXN_OPS_MAX records with consecutive LSNs, so that many LSNs before
/// `lsn` contain a CPL (or the start of the log).
fn cpl_window_start(lsn: Lsn) -> Lsn {
    Lsn(lsn.0.saturating_sub(TXN_OPS_MAX as u64))
}

impl PgState {
    /// How far this PG holds every record, up to `vdl` (never beyond it).
    fn complete_to(&self, vdl: Lsn) -> Lsn {
        if self.have >= self.bound.min(vdl) {
            vdl
        } else {
            self.have
        }
    }

    /// The records of a reply (a pull's or a stream's) that covers `(after, last_lsn]`
    /// and that this PG does not hold yet, checked to link on to what it holds.
    fn take(&self, after: Lsn, last_lsn: Lsn, records: Bytes) -> Result<(Vec<Rec>, Option<Lsn>), PullError> {
        let (have, mut chain) = (self.have, self.last_record);
        let mut recs = Vec::new();
        let reply_len = records.len();
        if let Some(valid) = ValidRecords::validate(records, 0)? {
            for (rec, range) in valid.iter() {
                let (lsn, prev) = (rec.lsn(), rec.prev_lsn_in_segment());
                if lsn <= after || lsn > last_lsn.max(after) {
                    return Err(PullError::OutOfRange { lsn, after, last: last_lsn });
                }
                if lsn <= have {
                    continue;
                }
                if let Some(last) = chain.filter(|&l| l != prev) {
                    return Err(PullError::Broken { lsn, prev, last });
                }
                chain = Some(lsn);
                let h = rec.header();
                recs.push(Rec { lsn, cpl: h.cpl, page: h.page, bytes: valid.bytes().slice(range) });
            }
        }
        // Records share their reply's memory: when most of a reply was already held,
        // copy the rest so the buffer's count stays the memory it pins.
        let kept: usize = recs.iter().map(|r| r.bytes.len()).sum();
        if kept < reply_len / 2 {
            recs.iter_mut().for_each(|r| r.bytes = Bytes::copy_from_slice(&r.bytes));
        }
        Ok((recs, chain))
    }

    /// Keeps records `take` returned: the PG now holds everything up to `last_lsn`.
    /// Returns their bytes.
    fn accept(&mut self, recs: Vec<Rec>, chain: Option<Lsn>, last_lsn: Lsn) -> usize {
        self.last_record = chain;
        self.have = self.have.max(last_lsn).max(chain.unwrap_or(Lsn::ZERO));
        let bytes = recs.iter().map(|r| r.bytes.len()).sum();
        self.pending.extend(recs);
        bytes
    }

    /// Drops retained records a write quorum has flushed; returns their bytes.
    fn release_flushed(&mut self) -> usize {
        let mut freed = 0;
        while self.retained.front().is_some_and(|r| r.lsn <= self.flushed) {
            freed += self.retained.pop_front().expect("front exists").bytes.len();
        }
        freed
    }
}

/// A pull to make: records of `pg` in `(after, upto]`, about `bytes_max`, from one of
/// `segments` (indices into the PG's six, every one holding records through `upto`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullPlan {
    /// Names the pull in `on_pulled` and `pull_failed`.
    pub id: u64,
    pub pg: PgId,
    pub after: Lsn,
    /// Where the next pull starts: pulls in flight together do not overlap.
    pub upto: Lsn,
    pub bytes_max: usize,
    /// Candidates; the first `covering` hold everything the read point needs.
    pub segments: Vec<usize>,
    pub covering: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PullError {
    #[error("records do not decode: {0}")]
    Decode(#[from] DecodeError),
    #[error("record {lsn} is outside the pulled range ({after}, {last}]")]
    OutOfRange { lsn: Lsn, after: Lsn, last: Lsn },
    #[error("record {lsn} links back to {prev}, but the last record of the segment pulled is {last}")]
    Broken { lsn: Lsn, prev: Lsn, last: Lsn },
    #[error("the reply is for {got}, not {asked}")]
    WrongPg { asked: PgId, got: PgId },
    #[error("nothing served after {after}, although the segment's SCL was past it")]
    Empty { after: Lsn },
    #[error("the log stream was closed or replaced")]
    StreamClosed,
}

/// A log stream to open: `pg`'s records after `after` from `segment`, with `credit` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamPlan {
    /// Names the stream in `on_streamed`, `stream_credit` and `stream_closed`.
    pub id: u64,
    pub pg: PgId,
    pub segment: usize,
    pub after: Lsn,
    /// May be 0 with the buffer full: then records wait for `stream_credit`.
    pub credit: u32,
}

pub enum ReadPlan {
    /// The page is cached: the value as of `read_point`.
    Cached { read_point: Lsn, value: Option<Vec<u8>> },
    /// Fetch `page` of `pg` at `lsn` (from a segment whose SCL reached it), then call `fetched`.
    Fetch { pg: PgId, page: PageId, lsn: Lsn, segments: Vec<usize> },
    /// No read point yet: the replica has not reached its first CPL.
    NotReady,
}

struct Fetching {
    /// Fetches of the page in flight.
    count: usize,
    /// Records of the page applied while they were.
    records: Vec<Bytes>,
}

/// What a writer's progress did (`ReplicaCore::on_writer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterHeard {
    /// From a writer older than the one followed: ignored.
    Stale,
    /// Applied; `new_writer` if a newer writer took over (the old one's tail was dropped).
    Progress { new_writer: bool, read_point: Option<Lsn> },
}

pub struct ReplicaCore {
    volume: Volume,
    config: ReplicaConfig,
    /// Highest known durable LSN (the writer's VDL, or the storage-derived start).
    vdl: Lsn,
    /// Every committed record at or below it is applied; `None` before the first CPL.
    read_point: Option<Lsn>,
    /// Where the first read point may be at the lowest (the start of the log it reads).
    first_read_point_min: Lsn,
    /// The epoch of the writer followed; `None` before its first progress (unless `following`).
    writer: Option<Epoch>,
    pgs: Vec<PgState>,
    /// Pages as of the read point. Any may be evicted: the read point is durable, so
    /// GetPage@LSN at it (`read`) brings a page back.
    cache: PageCache,
    fetching: HashMap<PageId, Fetching>,
    pending_bytes: usize,
    retained_bytes: usize,
    /// Cached pages dropped because a record did not link to them (a broken log).
    pages_dropped: u64,
    /// Whether the last pull was refused for a full buffer, and how often that began.
    throttled: bool,
    throttle_episodes: u64,
    next_pull_id: u64,
}

impl ReplicaCore {
    /// A replica that starts from `start`: it pulls from a little before
    /// `start.durable` so as to find the first CPL, which becomes its read point.
    pub fn new(volume: Volume, config: ReplicaConfig, start: Start) -> Self {
        assert_eq!(start.bounds.len(), volume.pg_count(), "a bound per protection group");
        let from = cpl_window_start(start.durable);
        let pgs = start
            .bounds
            .iter()
            .map(|&bound| PgState {
                segments: [SegmentPosition::default(); SEGMENTS_PER_PG],
                flushed: Lsn::ZERO,
                bound,
                have: from,
                last_record: None,
                pending: VecDeque::new(),
                retained: VecDeque::new(),
                pulls: Vec::new(),
                stream: None,
            })
            .collect();
        ReplicaCore {
            cache: PageCache::new(config.cache_bytes_max),
            volume,
            config,
            vdl: start.durable,
            read_point: (start.durable == Lsn::ZERO).then_some(Lsn::ZERO),
            first_read_point_min: from,
            writer: None,
            pgs,
            fetching: HashMap::new(),
            pending_bytes: 0,
            retained_bytes: 0,
            pages_dropped: 0,
            throttled: false,
            throttle_episodes: 0,
            next_pull_id: 0,
        }
    }

    /// Panics unless the replica's bookkeeping is consistent: pending and
    /// retained bytes are what the queues hold, each queue in LSN order with
    /// pending records above retained ones and at or below what the PG has, and
    /// the read point at or below VDL. The simulator calls it after every event.
    pub fn check_invariants(&self) {
        let (mut pending, mut retained) = (0, 0);
        for (pg, p) in self.pgs.iter().enumerate() {
            let lsns: Vec<Lsn> = p.retained.iter().chain(&p.pending).map(|r| r.lsn).collect();
            assert!(lsns.windows(2).all(|w| w[0] < w[1]), "pg{pg}: retained then pending records out of order");
            assert!(lsns.last().is_none_or(|&l| l <= p.have), "pg{pg} holds records above what it has ({})", p.have);
            pending += p.pending.iter().map(|r| r.bytes.len()).sum::<usize>();
            retained += p.retained.iter().map(|r| r.bytes.len()).sum::<usize>();
        }
        assert_eq!((self.pending_bytes, self.retained_bytes), (pending, retained), "pending / retained bytes");
        assert!(self.read_point.is_none_or(|rp| rp <= self.vdl), "read point {:?} above VDL {}", self.read_point, self.vdl);
        self.cache.check_invariants();
        assert!(self.cache.bytes() <= self.config.cache_bytes_max, "{} bytes cached, over {}", self.cache.bytes(), self.config.cache_bytes_max);
    }

    pub fn volume(&self) -> &Volume {
        &self.volume
    }
    pub fn read_point(&self) -> Option<Lsn> {
        self.read_point
    }
    /// The lowest LSN its reads may use from now on (what the writer's GC horizon must
    /// not pass): the read point, or before the first, the start of the log it reads.
    pub fn lowest_read_point(&self) -> Lsn {
        self.read_point.unwrap_or(self.first_read_point_min)
    }
    pub fn vdl(&self) -> Lsn {
        self.vdl
    }
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }
    pub fn retained_bytes(&self) -> usize {
        self.retained_bytes
    }
    pub fn buffer_bytes_max(&self) -> usize {
        self.config.buffer_bytes_max
    }
    pub fn pages_dropped(&self) -> u64 {
        self.pages_dropped
    }
    /// Memory the cached page images take, and how many there are.
    pub fn cached(&self) -> (usize, usize) {
        (self.cache.bytes(), self.cache.len())
    }
    /// Whether pulls are stopped for a full buffer now, and how many times they were.
    pub fn throttled(&self) -> (bool, u64) {
        (self.throttled, self.throttle_episodes)
    }
    pub fn buffer_full(&self) -> bool {
        self.pending_bytes + self.retained_bytes >= self.config.buffer_bytes_max
    }

    /// The volume flushed LSN: every record at or below it is flushed on a write quorum.
    pub fn flushed_lsn(&self) -> Lsn {
        // Below the oldest record still retained or pending, everything applied was flushed.
        let applied = self.read_point.unwrap_or(Lsn::ZERO);
        let per_pg = self.pgs.iter().map(|p| {
            // The PG's records up to the read point are at or below its bound; all of them
            // are flushed once its write quorum's flushed LSN covers that, else up to it.
            let quorum = if p.flushed >= applied.min(p.bound) { applied } else { p.flushed };
            match p.retained.front().or(p.pending.front()) {
                Some(r) => quorum.min(Lsn(r.lsn.0 - 1)),
                None => quorum,
            }
        });
        per_pg.fold(applied, Lsn::min)
    }

    /// Progress from the writer at `epoch`: records up to `vdl` are durable, and each PG's
    /// records at or below it are at or below `bounds[pg]`. A writer newer than the one
    /// followed took over (`new_epoch`); an older writer's progress is ignored. The first
    /// writer heard is followed from there, unless `following` named the one before.
    pub fn on_writer(&mut self, epoch: Epoch, vdl: Lsn, bounds: &[Lsn]) -> WriterHeard {
        let new = match self.writer {
            Some(followed) if epoch < followed => return WriterHeard::Stale,
            Some(followed) => epoch > followed,
            None => false,
        };
        if new {
            self.new_epoch(bounds);
        }
        self.writer = Some(epoch);
        let read_point = self.on_progress(vdl, bounds);
        WriterHeard::Progress { new_writer: new, read_point }
    }

    /// A replica that knows the writer of the log it starts from: the first progress
    /// of a newer one drops what was pulled above the durable point it started from.
    pub fn following(mut self, epoch: Epoch) -> Self {
        self.writer = Some(epoch);
        self
    }

    /// The epoch of the writer followed, once known.
    pub fn writer_epoch(&self) -> Option<Epoch> {
        self.writer
    }

    /// The writer's progress: records up to `vdl` are durable, and each PG's records at or
    /// below it are at or below `bounds[pg]`. Returns the new read point if it moved.
    fn on_progress(&mut self, vdl: Lsn, bounds: &[Lsn]) -> Option<Lsn> {
        if vdl <= self.vdl {
            return None;
        }
        self.vdl = vdl;
        if self.read_point.is_none() {
            self.rebase(cpl_window_start(vdl));
        }
        if bounds.len() == self.pgs.len() {
            for (p, &b) in self.pgs.iter_mut().zip(bounds) {
                p.bound = p.bound.max(b);
            }
        } else {
            // No per-PG bounds: a PG is complete only once pulled up to VDL itself.
            self.pgs.iter_mut().for_each(|p| p.bound = p.bound.max(vdl));
        }
        self.apply()
    }

    /// A writer newer than the one followed took over. Records pulled above the
    /// VDL this replica knew (the last writer's, or the durable point it started
    /// from) may be an older writer's unacknowledged tail, cut by that writer's
    /// recovery or by one this replica never heard of: drop them, and the pulls
    /// that may bring more, and go on from there with the new writer's `bounds`.
    /// What lies at or below that VDL is durable: no recovery cuts it.
    fn new_epoch(&mut self, bounds: &[Lsn]) {
        let vdl = self.vdl;
        for (pg, p) in self.pgs.iter_mut().enumerate() {
            let keep = p.pending.iter().take_while(|r| r.lsn <= vdl).count();
            let dropped: usize = p.pending.iter().skip(keep).map(|r| r.bytes.len()).sum();
            p.pending.truncate(keep);
            self.pending_bytes -= dropped;
            p.pulls.clear();
            // A stream may carry the old writer's records: the shell opens a new one.
            p.stream = None;
            if p.have > vdl {
                p.have = vdl;
                p.last_record = p.pending.back().or(p.retained.back()).map(|r| r.lsn);
            }
            p.bound = bounds.get(pg).copied().unwrap_or(vdl);
        }
    }

    /// The records this replica holds, per PG in LSN order (retained, then
    /// pending), as runs of at most `run_bytes_max`: what a promoted replica
    /// offers back to storage.
    pub fn held_records(&self, run_bytes_max: usize) -> Vec<Vec<Bytes>> {
        self.pgs
            .iter()
            .map(|p| {
                let mut runs: Vec<Vec<u8>> = Vec::new();
                for r in p.retained.iter().chain(&p.pending) {
                    match runs.last_mut() {
                        Some(run) if run.len() + r.bytes.len() <= run_bytes_max => run.extend_from_slice(&r.bytes),
                        _ => runs.push(r.bytes.to_vec()),
                    }
                }
                runs.into_iter().map(Bytes::from).collect()
            })
            .collect()
    }

    /// Before its first read point, a replica that started from storage alone may start
    /// pulling much further back than the writer's VDL needs (one idle PG holds `durable`
    /// back): move every PG's start up to `from`, dropping what was pulled below it. Nothing
    /// is cached or being fetched yet, so no page depends on the records dropped.
    fn rebase(&mut self, from: Lsn) {
        for p in &mut self.pgs {
            if p.have >= from {
                continue;
            }
            let dropped: usize = p.pending.iter().map(|r| r.bytes.len()).sum();
            self.pending_bytes -= dropped;
            p.pending.clear();
            p.pulls.clear();
            (p.have, p.last_record) = (from, None);
        }
    }

    /// A segment's position, from a notification or a reply. Returns whether retained
    /// records were released (the buffer has room again).
    pub fn on_position(&mut self, segment: usize, position: SegmentPosition) -> bool {
        let Some(p) = self.pgs.get_mut(position.pg.0 as usize) else { return false };
        p.segments[segment] = position;
        let mut flushed: Vec<Lsn> = p.segments.iter().map(|s| s.flushed_lsn).collect();
        flushed.sort_unstable_by(|a, b| b.cmp(a));
        p.flushed = p.flushed.max(flushed[WRITE_QUORUM - 1]);
        let freed = p.release_flushed();
        self.retained_bytes -= freed;
        freed > 0
    }

    /// The next pull for `pg`, if any segment has records the replica lacks and the
    /// buffer allows. A second pull may start while one is in flight, from where that
    /// one is expected to end: new records then need not wait for the older reply.
    /// The pull stays in flight until `on_pulled` accepts a reply or `pull_failed`.
    pub fn plan_pull(&mut self, pg: PgId) -> Option<PullPlan> {
        let (vdl, frontier) = (self.vdl, self.frontier());
        // Streams' credit takes room, but only pulls in flight hold a pull back: a
        // stream's credit may go unused for long.
        let (reserved, credit) = self.reserved();
        let used = self.pending_bytes + self.retained_bytes + reserved + credit;
        let p = &self.pgs[pg.0 as usize];
        if p.pulls.len() >= PULLS_INFLIGHT_MAX {
            return None;
        }
        let after = p.pulls.iter().map(|f| f.target).fold(p.have, Lsn::max);
        let need = p.bound.min(vdl);
        let mut segments: Vec<usize> = (0..SEGMENTS_PER_PG).filter(|&s| p.segments[s].scl > after).collect();
        if segments.is_empty() {
            return None;
        }
        // With the buffer full of records that wait for this PG, and nothing retained
        // left for a flush to free, only pulling more of this PG can make progress:
        // one record at a time, so the overshoot stays within one transaction.
        let holds_back = p.complete_to(vdl) == frontier && frontier < vdl;
        let must = holds_back && self.retained_bytes == 0 && reserved == 0;
        let bytes_max = match self.config.buffer_bytes_max.saturating_sub(used) {
            0 if must => 1,
            0 => {
                self.throttle_episodes += !self.throttled as u64;
                self.throttled = true;
                return None;
            }
            // Storage serves at least one record, whatever the size asked: near the
            // limit, one pull at a time, so the buffer overshoots by one record at most.
            room if room < PULL_BYTES_MAX as usize && reserved > 0 => return None,
            room => room.min(PULL_BYTES_MAX as usize),
        };
        self.throttled = false;
        segments.sort_by_key(|&s| p.segments[s].scl < need);
        let covering = segments.iter().filter(|&&s| p.segments[s].scl >= need).count();
        let target = segments.iter().map(|&s| p.segments[s].scl).min().expect("a candidate");
        self.next_pull_id += 1;
        let id = self.next_pull_id;
        self.pgs[pg.0 as usize].pulls.push(Inflight { id, target, reserved: bytes_max });
        Some(PullPlan { id, pg, after, upto: target, bytes_max, segments, covering })
    }

    /// Buffer bytes that pulls in flight, and streams' unused credit, may still bring.
    fn reserved(&self) -> (usize, usize) {
        let pulls = self.pgs.iter().flat_map(|p| &p.pulls).map(|f| f.reserved).sum();
        (pulls, self.pgs.iter().filter_map(|p| p.stream).map(|s| s.credit).sum())
    }

    /// Credit a stream may be granted now, on top of `outstanding`: up to
    /// `STREAM_CREDIT_MAX`, within the buffer's room less `STREAM_HEADROOM_BYTES`.
    fn stream_room(&self, outstanding: usize) -> usize {
        let (pulls, credit) = self.reserved();
        let used = self.pending_bytes + self.retained_bytes + pulls + credit + STREAM_HEADROOM_BYTES;
        self.config.buffer_bytes_max.saturating_sub(used).min(STREAM_CREDIT_MAX - outstanding)
    }

    /// Opens `pg`'s log stream on `segment`, replacing any other: from what the replica
    /// holds, with the credit the buffer allows now.
    pub fn open_stream(&mut self, pg: PgId, segment: usize) -> StreamPlan {
        let p = &mut self.pgs[pg.0 as usize];
        p.stream = None;
        let after = p.have;
        let credit = self.stream_room(0);
        self.next_pull_id += 1;
        let id = self.next_pull_id;
        self.pgs[pg.0 as usize].stream = Some(Stream { id, segment, next_after: after, credit });
        StreamPlan { id, pg, segment, after, credit: credit as u32 }
    }

    /// Whether a segment of `pg` is known to hold records the replica lacks (then a
    /// pull may be due; records a log stream brings leave it false).
    pub fn behind(&self, pg: PgId) -> bool {
        self.pgs.get(pg.0 as usize).is_some_and(|p| p.segments.iter().any(|s| s.scl > p.have))
    }

    /// Whether stream `id` is still `pg`'s stream (a new epoch or a new stream ends it).
    pub fn stream_open(&self, pg: PgId, id: u64) -> bool {
        self.pgs[pg.0 as usize].stream.is_some_and(|s| s.id == id)
    }

    /// Credit to grant stream `id` now, once less than half of `STREAM_CREDIT_MAX` is left.
    pub fn stream_credit(&mut self, pg: PgId, id: u64) -> Option<u32> {
        let outstanding = self.pgs[pg.0 as usize].stream.filter(|s| s.id == id)?.credit;
        if outstanding >= STREAM_CREDIT_MAX / 2 {
            return None;
        }
        let grant = self.stream_room(outstanding);
        let s = self.pgs[pg.0 as usize].stream.as_mut().expect("checked above");
        s.credit += grant;
        (grant > 0).then_some(grant as u32)
    }

    /// Stream `id` of `pg` ended (an error, or the shell gave up on its segment).
    pub fn stream_closed(&mut self, pg: PgId, id: u64) {
        let p = &mut self.pgs[pg.0 as usize];
        if p.stream.is_some_and(|s| s.id == id) {
            p.stream = None;
        }
    }

    /// A chunk of stream `id`: the records its segment holds after the previous chunk
    /// (or the stream's start) up to `last_lsn`. A chunk that starts beyond what the PG
    /// holds is dropped, never kept with a gap below it (a guard: streams open at what the
    /// PG holds, and a refused chunk ends its stream); pulls would fill the gap and the
    /// stream's next chunks link on again. Returns the new read point
    /// if it moved; an error means the stream must be closed (`StreamClosed`: it was).
    pub fn on_streamed(&mut self, pg: PgId, id: u64, position: SegmentPosition, last_lsn: Lsn, records: Bytes) -> Result<Option<Lsn>, PullError> {
        if position.pg != pg {
            return Err(PullError::WrongPg { asked: pg, got: position.pg });
        }
        let Some(s) = self.pgs[pg.0 as usize].stream.filter(|s| s.id == id) else { return Err(PullError::StreamClosed) };
        self.on_position(s.segment, position);
        let p = &mut self.pgs[pg.0 as usize];
        let s = p.stream.as_mut().expect("checked above");
        let after = s.next_after;
        s.next_after = last_lsn.max(after);
        s.credit = s.credit.saturating_sub(records.len());
        if after > p.have {
            return Ok(None);
        }
        let (recs, chain) = p.take(after, last_lsn, records)?;
        self.pending_bytes += p.accept(recs, chain, last_lsn);
        Ok(self.apply())
    }

    /// `plan` failed on every segment tried.
    pub fn pull_failed(&mut self, plan: &PullPlan) {
        self.pgs[plan.pg.0 as usize].pulls.retain(|f| f.id != plan.id);
    }

    /// A pull reply from `segment`: records of `pg` after `after`; the segment holds no
    /// others up to `last_lsn`. Records the replica already holds (an earlier reply of an
    /// overlapping pull) are skipped; a reply that starts beyond them, after an earlier
    /// reply fell short, is dropped (its records are pulled again). Returns the new read
    /// point if it moved.
    pub fn on_pulled(&mut self, segment: usize, plan: &PullPlan, position: SegmentPosition, last_lsn: Lsn, records: Bytes) -> Result<Option<Lsn>, PullError> {
        let (pg, after) = (plan.pg, plan.after);
        if position.pg != pg {
            return Err(PullError::WrongPg { asked: pg, got: position.pg });
        }
        self.on_position(segment, position);
        let p = &mut self.pgs[pg.0 as usize];
        let Some(i) = p.pulls.iter().position(|f| f.id == plan.id) else {
            return Ok(None); // forgotten: an earlier reply fell short
        };
        if after > p.have {
            p.pulls.remove(i);
            return Ok(None);
        }
        if records.is_empty() && last_lsn <= p.have {
            return Err(PullError::Empty { after });
        }
        let (recs, chain) = p.take(after, last_lsn, records)?;
        // Accepted: the reservation becomes the records themselves. (A refused reply
        // keeps it for the retry on another segment, or `pull_failed`.)
        let target = p.pulls.remove(i).target;
        self.pending_bytes += p.accept(recs, chain, last_lsn);
        if p.have < target {
            // Short (a byte limit, a disk read, a restarted segment): later pulls of this PG
            // start beyond what is held and would be dropped; forget them and go on from here.
            p.pulls.clear();
        }
        Ok(self.apply())
    }

    /// How far every PG holds all its records, within VDL.
    fn frontier(&self) -> Lsn {
        self.pgs.iter().map(|p| p.complete_to(self.vdl)).min().unwrap_or(self.vdl)
    }

    /// Applies every pending record up to the highest CPL that all PGs hold and VDL covers.
    fn apply(&mut self) -> Option<Lsn> {
        let frontier = self.frontier();
        let to = self.pgs.iter().filter_map(|p| p.pending.iter().take_while(|r| r.lsn <= frontier).filter(|r| r.cpl).last()).map(|r| r.lsn).max()?;
        for pg in 0..self.pgs.len() {
            while self.pgs[pg].pending.front().is_some_and(|r| r.lsn <= to) {
                let rec = self.pgs[pg].pending.pop_front().expect("front exists");
                self.apply_record(&rec);
                self.pending_bytes -= rec.bytes.len();
                self.retained_bytes += rec.bytes.len();
                self.pgs[pg].retained.push_back(rec);
            }
        }
        // What a write quorum already flushed need not be retained.
        let freed: usize = self.pgs.iter_mut().map(PgState::release_flushed).sum();
        self.retained_bytes -= freed;
        self.read_point = Some(to);
        self.cache.evict(to);
        Some(to)
    }

    fn apply_record(&mut self, rec: &Rec) {
        if let Some(Err(_)) = self.cache.update(rec.page, |img| img.apply(rec.as_ref())) {
            // Cannot happen with a consistent log; the page is read from storage again.
            self.pages_dropped += 1;
            self.cache.remove(rec.page);
        }
        if let Some(f) = self.fetching.get_mut(&rec.page) {
            f.records.push(rec.bytes.clone());
        }
    }

    /// How to read `key` at the read point.
    pub fn read(&mut self, key: &[u8]) -> ReadPlan {
        let Some(read_point) = self.read_point else { return ReadPlan::NotReady };
        let page = self.volume.page_of(key);
        if let Some(img) = self.cache.get(page) {
            return ReadPlan::Cached { read_point, value: img.get(key).map(<[u8]>::to_vec) };
        }
        let pg = self.volume.pg_of(page);
        let p = &self.pgs[pg.0 as usize];
        // The PG has no records in (lsn, read_point]: the page as of `lsn` is the page now,
        // and a write quorum of segments holds `lsn` (the bound came from their SCLs).
        let lsn = read_point.min(p.bound);
        let mut segments: Vec<usize> = (0..SEGMENTS_PER_PG).filter(|&s| p.segments[s].scl >= lsn).collect();
        if segments.is_empty() {
            // This replica's view is behind (most segments report only when they flush, and a
            // notification can arrive after a newer pull reply): ask them all; a segment
            // whose SCL is short of `lsn` refuses.
            segments = (0..SEGMENTS_PER_PG).collect();
        }
        self.fetching.entry(page).or_insert(Fetching { count: 0, records: Vec::new() }).count += 1;
        ReadPlan::Fetch { pg, page, lsn, segments }
    }

    /// A fetch from `read` of `key`'s page ended (`None`: it failed). Returns the value as
    /// of the read point, caching the page, when the image could be brought up to date.
    pub fn fetched(&mut self, page: PageId, image: Option<PageImage>, key: &[u8]) -> Option<(Lsn, Option<Vec<u8>>)> {
        let f = self.fetching.get_mut(&page).expect("fetched follows read");
        f.count -= 1;
        let records = if f.count == 0 { self.fetching.remove(&page).expect("present").records } else { f.records.clone() };
        let read_point = self.read_point.expect("a fetch needs a read point");
        if let Some(img) = self.cache.get(page) {
            return Some((read_point, img.get(key).map(<[u8]>::to_vec)));
        }
        let mut img = image?;
        for bytes in &records {
            let rec = TrustedRecords::new(bytes).next().expect("one valid record").0;
            if rec.lsn() > img.lsn && img.apply(rec).is_err() {
                return None;
            }
        }
        let value = img.get(key).map(<[u8]>::to_vec);
        // A page larger than the whole cache is not kept, yet answers this read.
        self.cache.insert(img);
        self.cache.evict(read_point);
        Some((read_point, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::PageOp;
    use crate::record::RecordHeader;
    use crate::volume::NodeSpec;

    fn volume() -> Volume {
        let nodes = (1..=6).map(|i| NodeSpec { id: i, az: format!("az{}", i.div_ceil(2)), addr: format!("127.0.0.1:{i}") }).collect();
        Volume::local("127.0.0.1:9".into(), nodes, 2, 64).unwrap()
    }

    /// Builds a volume's log the way the writer does: one record per put, the last a CPL.
    struct Log {
        volume: Volume,
        next: u64,
        seg_last: Vec<Lsn>,
        page_last: HashMap<PageId, Lsn>,
        /// Per PG, encoded records.
        records: Vec<Vec<(Lsn, Vec<u8>)>>,
    }

    impl Log {
        fn new() -> Log {
            Log { volume: volume(), next: 1, seg_last: vec![Lsn::ZERO; 2], page_last: HashMap::new(), records: vec![vec![], vec![]] }
        }
        /// Appends a transaction; returns its commit LSN.
        fn txn(&mut self, puts: &[(&[u8], &[u8])]) -> Lsn {
            for (i, (k, v)) in puts.iter().enumerate() {
                let (lsn, page) = (Lsn(self.next), self.volume.page_of(k));
                self.next += 1;
                let pg = self.volume.pg_of(page).0 as usize;
                let h = RecordHeader {
                    lsn,
                    prev_lsn_in_segment: self.seg_last[pg],
                    prev_lsn_for_page: self.page_last.get(&page).copied().unwrap_or(Lsn::ZERO),
                    page,
                    cpl: i + 1 == puts.len(),
                };
                let (mut payload, mut out) = (Vec::new(), Vec::new());
                PageOp::Put { key: k.to_vec(), value: v.to_vec() }.encode(&mut payload);
                h.encode(&payload, &mut out);
                self.seg_last[pg] = lsn;
                self.page_last.insert(page, lsn);
                self.records[pg].push((lsn, out));
            }
            Lsn(self.next - 1)
        }
        /// Records of `pg` in `(after, upto]`, as a pull reply carries them.
        fn pull(&self, pg: usize, after: Lsn, upto: Lsn) -> Bytes {
            let b: Vec<u8> = self.records[pg].iter().filter(|(l, _)| *l > after && *l <= upto).flat_map(|(_, r)| r.clone()).collect();
            Bytes::from(b)
        }
        fn key_in(&self, pg: u32, n: usize) -> Vec<Vec<u8>> {
            (0..).map(|i: u32| format!("k{i}").into_bytes()).filter(|k| self.volume.pg_of(self.volume.page_of(k)).0 == pg).take(n).collect()
        }
    }

    fn pos(pg: u32, scl: Lsn, flushed: Lsn) -> SegmentPosition {
        SegmentPosition { pg: PgId(pg), scl, flushed_lsn: flushed }
    }

    fn replica(buffer: usize) -> ReplicaCore {
        ReplicaCore::new(
            volume(),
            ReplicaConfig { buffer_bytes_max: buffer, cache_bytes_max: 1 << 20 },
            Start { durable: Lsn::ZERO, bounds: vec![Lsn::ZERO; 2] },
        )
    }

    /// Tells `r` every segment of both PGs holds the log up to `scl`, flushed to `flushed`.
    fn segments_at(r: &mut ReplicaCore, scl: Lsn, flushed: Lsn) {
        for pg in 0..2 {
            pg_at(r, pg, scl, flushed);
        }
    }

    /// Tells `r` every segment of `pg` holds the log up to `scl`, flushed to `flushed`.
    fn pg_at(r: &mut ReplicaCore, pg: u32, scl: Lsn, flushed: Lsn) {
        for s in 0..SEGMENTS_PER_PG {
            r.on_position(s, pos(pg, scl, flushed));
        }
    }

    /// Makes the pull `r` plans for `pg`, served as storage would from a log up to `scl`:
    /// about `bytes_max` (at least one record), `last_lsn` = `scl` when all fit.
    fn pull(r: &mut ReplicaCore, log: &Log, pg: u32, scl: Lsn) -> Option<Lsn> {
        let plan = r.plan_pull(PgId(pg))?;
        let (mut out, mut last) = (Vec::new(), scl);
        for (lsn, rec) in log.records[pg as usize].iter().filter(|(l, _)| *l > plan.after && *l <= scl) {
            if !out.is_empty() && out.len() + rec.len() > plan.bytes_max {
                break;
            }
            out.extend_from_slice(rec);
            last = *lsn;
        }
        let last = if last == scl || log.records[pg as usize].iter().any(|(l, _)| *l > last && *l <= scl) { last } else { scl };
        r.on_pulled(plan.segments[0], &plan, pos(pg, scl, Lsn::ZERO), last, Bytes::from(out)).unwrap()
    }

    #[test]
    fn applies_whole_transactions_and_never_past_vdl() {
        let mut log = Log::new();
        let (a, b) = (log.key_in(0, 2), log.key_in(1, 2));
        let t1 = log.txn(&[(&a[0], b"1"), (&b[0], b"1")]);
        let t2 = log.txn(&[(&a[1], b"2"), (&b[1], b"2")]);
        let mut r = replica(1 << 20);
        assert_eq!(r.read_point(), Some(Lsn::ZERO));
        segments_at(&mut r, t2, Lsn::ZERO);
        // Both transactions pulled ahead of VDL: nothing applied yet.
        assert_eq!(pull(&mut r, &log, 0, t2), None);
        assert_eq!(pull(&mut r, &log, 1, t2), None);
        assert_eq!(r.read_point(), Some(Lsn::ZERO));
        // VDL covers t1: exactly t1 becomes visible.
        assert_eq!(r.on_progress(t1, &[t1, t1]), Some(t1));
        assert_eq!(r.on_progress(t2, &[t2, t2]), Some(t2));
        assert_eq!(r.pending_bytes(), 0);
        assert!(r.retained_bytes() > 0);
    }

    #[test]
    fn half_a_transaction_waits_for_the_other_pg() {
        let mut log = Log::new();
        let (a, b) = (log.key_in(0, 1), log.key_in(1, 1));
        let t1 = log.txn(&[(&a[0], b"1"), (&b[0], b"1")]);
        let mut r = replica(1 << 20);
        pg_at(&mut r, 0, Lsn(1), Lsn::ZERO);
        r.on_progress(t1, &[Lsn(1), t1]);
        assert_eq!(pull(&mut r, &log, 0, Lsn(1)), None, "PG 1's half is missing");
        pg_at(&mut r, 1, t1, Lsn::ZERO);
        assert_eq!(pull(&mut r, &log, 1, t1), Some(t1));
    }

    #[test]
    fn an_idle_pg_does_not_hold_the_read_point_back() {
        let mut log = Log::new();
        let a = log.key_in(0, 3);
        let t: Vec<Lsn> = a.iter().map(|k| log.txn(&[(k, b"v")])).collect();
        let mut r = replica(1 << 20);
        pg_at(&mut r, 0, t[2], Lsn::ZERO);
        // PG 1 has no records: its PGCL stays 0, so it is complete whatever VDL is.
        r.on_progress(t[2], &[t[2], Lsn::ZERO]);
        assert_eq!(pull(&mut r, &log, 0, t[2]), Some(t[2]));
        assert!(r.plan_pull(PgId(1)).is_none(), "nothing to pull from an idle PG");
    }

    #[test]
    fn a_read_asks_every_segment_when_none_is_known_to_hold_the_page() {
        let mut log = Log::new();
        let k = log.key_in(0, 1).remove(0);
        let t1 = log.txn(&[(&k, b"v")]);
        let mut r = replica(1 << 20);
        segments_at(&mut r, t1, Lsn::ZERO);
        r.on_progress(t1, &[t1, Lsn::ZERO]);
        assert_eq!(pull(&mut r, &log, 0, t1), Some(t1));
        // Notifications older than the pull reply arrive after it.
        pg_at(&mut r, 0, Lsn::ZERO, Lsn::ZERO);
        let ReadPlan::Fetch { lsn, segments, .. } = r.read(&k) else { panic!("page not cached yet") };
        assert_eq!((lsn, segments), (t1, (0..SEGMENTS_PER_PG).collect::<Vec<_>>()));
    }

    #[test]
    fn reads_fetch_missing_pages_and_catch_them_up() {
        let mut log = Log::new();
        let k = log.key_in(0, 1).remove(0);
        let t1 = log.txn(&[(&k, b"old")]);
        let mut r = replica(1 << 20);
        segments_at(&mut r, t1, Lsn::ZERO);
        r.on_progress(t1, &[t1, Lsn::ZERO]);
        assert_eq!(pull(&mut r, &log, 0, t1), Some(t1));
        let page = log.volume.page_of(&k);
        let ReadPlan::Fetch { lsn, segments, .. } = r.read(&k) else { panic!("page not cached yet") };
        assert_eq!((lsn, segments.len()), (t1, 6));
        // A new write lands while the fetch is in flight: the image from storage is older.
        let t2 = log.txn(&[(&k, b"new")]);
        segments_at(&mut r, t2, Lsn::ZERO);
        r.on_progress(t2, &[t2, Lsn::ZERO]);
        assert_eq!(pull(&mut r, &log, 0, t2), Some(t2));
        let mut old = PageImage::empty(page);
        old.apply_op(t1, PageOp::Put { key: k.clone(), value: b"old".to_vec() });
        assert_eq!(r.fetched(page, Some(old), &k), Some((t2, Some(b"new".to_vec()))), "image caught up");
        // Cached now: later records apply to it directly.
        let t3 = log.txn(&[(&k, b"newer")]);
        segments_at(&mut r, t3, Lsn::ZERO);
        r.on_progress(t3, &[t3, Lsn::ZERO]);
        pull(&mut r, &log, 0, t3);
        assert!(matches!(r.read(&k), ReadPlan::Cached { read_point, value: Some(v) } if read_point == t3 && v == b"newer"));
    }

    #[test]
    fn the_cache_keeps_to_its_bytes_and_evicted_pages_are_fetched_again() {
        let mut log = Log::new();
        let mut pages = std::collections::HashSet::new();
        let keys: Vec<Vec<u8>> = log.key_in(0, 64).into_iter().filter(|k| pages.insert(log.volume.page_of(k))).take(3).collect();
        let value = vec![7u8; 1000];
        let t = log.txn(&[(&keys[0], &value), (&keys[1], &value), (&keys[2], &value)]);
        // Each page as storage serves it: its one record.
        let images: Vec<PageImage> = (0..3)
            .map(|i| {
                let mut img = PageImage::empty(log.volume.page_of(&keys[i]));
                img.apply_op(Lsn(t.0 - 2 + i as u64), PageOp::Put { key: keys[i].clone(), value: value.clone() });
                img
            })
            .collect();
        let one = images[0].memory_bytes();
        let started = |log: &Log, cache_bytes_max| {
            let mut r = ReplicaCore::new(
                volume(),
                ReplicaConfig { buffer_bytes_max: 1 << 20, cache_bytes_max },
                Start { durable: Lsn::ZERO, bounds: vec![Lsn::ZERO; 2] },
            );
            segments_at(&mut r, t, Lsn::ZERO);
            r.on_progress(t, &[t, Lsn::ZERO]);
            assert_eq!(pull(&mut r, log, 0, t), Some(t));
            r
        };
        let mut r = started(&log, 2 * one + one / 2);
        for (i, img) in images.iter().enumerate() {
            assert!(matches!(r.read(&keys[i]), ReadPlan::Fetch { lsn, .. } if lsn == t));
            assert_eq!(r.fetched(img.page, Some(img.clone()), &keys[i]), Some((t, Some(value.clone()))));
        }
        assert_eq!(r.cached().1, 2, "room for two pages");
        assert!(matches!(r.read(&keys[0]), ReadPlan::Fetch { .. }), "the least recently used page went");
        assert!(matches!(r.read(&keys[2]), ReadPlan::Cached { .. }));
        // A page that grows as records apply pushes out the least recently used other one.
        let t2 = log.txn(&[(&keys[1], &[8u8; 2000])]);
        segments_at(&mut r, t2, Lsn::ZERO);
        r.on_progress(t2, &[t2, Lsn::ZERO]);
        assert_eq!(pull(&mut r, &log, 0, t2), Some(t2));
        assert_eq!(r.cached().1, 1);
        assert!(matches!(r.read(&keys[1]), ReadPlan::Cached { read_point, value: Some(v) } if read_point == t2 && v.len() == 2000));
        r.check_invariants();
        // No room for any page: a fetched page still answers its read.
        let mut r = started(&log, 0);
        assert!(matches!(r.read(&keys[0]), ReadPlan::Fetch { .. }));
        assert_eq!(r.fetched(images[0].page, Some(images[0].clone()), &keys[0]), Some((t, Some(value))));
        assert_eq!(r.cached(), (0, 0));
    }

    #[test]
    fn a_full_buffer_stops_pulls_until_a_flush_frees_it() {
        let mut log = Log::new();
        let a = log.key_in(0, 40);
        let t: Vec<Lsn> = a.iter().map(|k| log.txn(&[(k, &[7u8; 100][..])])).collect();
        let last = *t.last().unwrap();
        let mut r = replica(1000);
        segments_at(&mut r, last, Lsn::ZERO);
        r.on_progress(last, &[last, Lsn::ZERO]);
        let mut seen = Vec::new();
        while let Some(rp) = pull(&mut r, &log, 0, last) {
            seen.push(rp);
        }
        let behind = r.read_point().unwrap();
        assert!(behind < last && behind > Lsn::ZERO, "a partial catch-up: {behind}");
        assert!(r.buffer_full() && r.plan_pull(PgId(0)).is_none(), "full and something to free: wait");
        assert_eq!(r.throttled(), (true, 1));
        // Storage flushes what was applied: room again, and the pulls resume until caught up.
        for _ in 0..100 {
            let rp = r.read_point().unwrap();
            pg_at(&mut r, 0, last, rp);
            assert_eq!(r.flushed_lsn(), rp);
            if rp == last {
                break;
            }
            pull(&mut r, &log, 0, last).expect("progress after the flush");
        }
        assert_eq!(r.read_point(), Some(last));
        assert_eq!(r.retained_bytes(), 0);
    }

    #[test]
    fn a_transaction_larger_than_the_buffer_still_gets_through() {
        let mut log = Log::new();
        let a = log.key_in(0, 30);
        let puts: Vec<(&[u8], &[u8])> = a.iter().map(|k| (k.as_slice(), &[1u8; 100][..])).collect();
        let t = log.txn(&puts);
        let mut r = replica(500);
        segments_at(&mut r, t, Lsn::ZERO);
        r.on_progress(t, &[t, Lsn::ZERO]);
        let mut applied = None;
        for _ in 0..100 {
            applied = pull(&mut r, &log, 0, t);
            if applied.is_some() {
                break;
            }
        }
        assert_eq!(applied, Some(t));
    }

    #[test]
    fn a_broken_chain_a_foreign_range_or_pg_or_an_empty_reply_is_refused() {
        let mut log = Log::new();
        let a = log.key_in(0, 3);
        for k in &a {
            log.txn(&[(k, b"v")]);
        }
        let mut r = replica(1 << 20);
        segments_at(&mut r, Lsn(3), Lsn::ZERO);
        let plan = r.plan_pull(PgId(0)).unwrap();
        r.on_pulled(0, &plan, pos(0, Lsn(1), Lsn::ZERO), Lsn(1), log.pull(0, Lsn::ZERO, Lsn(1))).unwrap();
        let plan = r.plan_pull(PgId(0)).unwrap();
        // Record 3 without record 2: its backlink names 2.
        let err = r.on_pulled(0, &plan, pos(0, Lsn(3), Lsn::ZERO), Lsn(3), log.pull(0, Lsn(2), Lsn(3))).unwrap_err();
        assert_eq!(err, PullError::Broken { lsn: Lsn(3), prev: Lsn(2), last: Lsn(1) });
        // The pull stays in flight for the next segment: a record beyond `last_lsn`...
        let err = r.on_pulled(1, &plan, pos(0, Lsn(3), Lsn::ZERO), Lsn(2), log.pull(0, Lsn(1), Lsn(3))).unwrap_err();
        assert!(matches!(err, PullError::OutOfRange { lsn: Lsn(3), .. }));
        // ...a reply naming another PG (it must not touch that PG's state)...
        let err = r.on_pulled(2, &plan, pos(7, Lsn(3), Lsn::ZERO), Lsn(3), Bytes::new()).unwrap_err();
        assert_eq!(err, PullError::WrongPg { asked: PgId(0), got: PgId(7) });
        // ...and nothing at all, from a segment that said it had more.
        let err = r.on_pulled(3, &plan, pos(0, Lsn(3), Lsn::ZERO), Lsn(1), Bytes::new()).unwrap_err();
        assert_eq!(err, PullError::Empty { after: Lsn(1) });
        r.pull_failed(&plan);
        let plan = r.plan_pull(PgId(0)).unwrap();
        assert_eq!(r.on_pulled(4, &plan, pos(0, Lsn(3), Lsn::ZERO), Lsn(3), log.pull(0, Lsn(1), Lsn(3))), Ok(None));
        assert_eq!(r.on_progress(Lsn(3), &[Lsn(3), Lsn::ZERO]), Some(Lsn(3)), "all three, once VDL covers them");
    }

    /// Serves `plan`'s stream a chunk as storage would: the records after where the
    /// last one ended up to `upto` (`after` is that point, as the test tracks it).
    fn chunk(r: &mut ReplicaCore, log: &Log, plan: &StreamPlan, after: Lsn, upto: Lsn) -> Result<Option<Lsn>, PullError> {
        let pg = plan.pg.0;
        r.on_streamed(plan.pg, plan.id, pos(pg, upto, Lsn::ZERO), upto, log.pull(pg as usize, after, upto))
    }

    #[test]
    fn streamed_records_apply_as_pulled_ones_within_the_credit_granted() {
        let mut log = Log::new();
        let (a, b) = (log.key_in(0, 2), log.key_in(1, 2));
        let t1 = log.txn(&[(&a[0], b"1"), (&b[0], b"1")]);
        let t2 = log.txn(&[(&a[1], b"2"), (&b[1], b"2")]);
        let mut r = replica(64 << 20);
        let (s0, s1) = (r.open_stream(PgId(0), 2), r.open_stream(PgId(1), 3));
        assert_eq!((s0.after, s0.credit as usize, s0.segment), (Lsn::ZERO, STREAM_CREDIT_MAX, 2));
        assert_eq!(chunk(&mut r, &log, &s0, Lsn::ZERO, t1), Ok(None), "ahead of VDL: pending");
        assert_eq!(chunk(&mut r, &log, &s1, Lsn::ZERO, t2), Ok(None));
        assert!(!r.behind(PgId(1)), "the stream brought everything its segment holds");
        assert_eq!(r.on_progress(t2, &[t2, t2]), Some(t1), "pg 0 holds t1 only");
        assert!(r.plan_pull(PgId(0)).is_none(), "no segment is known to hold more");
        assert_eq!(chunk(&mut r, &log, &s0, t1, t2), Ok(Some(t2)));
        // The credit used is granted again once under half is left.
        assert_eq!(r.stream_credit(PgId(0), s0.id), None, "most of it is left");
        let big = log.key_in(0, 30);
        let value = vec![9u8; STREAM_CREDIT_MAX / 40];
        let last = big.iter().map(|k| log.txn(&[(k, &value[..])])).last().unwrap();
        chunk(&mut r, &log, &s0, t2, last).unwrap();
        let granted = r.stream_credit(PgId(0), s0.id).expect("more credit");
        assert_eq!(granted as usize, log.pull(0, Lsn::ZERO, last).len(), "back to the most a stream holds");
        // A new writer ends the streams; their chunks are refused from then on.
        r.new_epoch(&[last, t2]);
        assert!(!r.stream_open(PgId(0), s0.id));
        assert_eq!(chunk(&mut r, &log, &s1, t2, t2), Err(PullError::StreamClosed));
    }

    #[test]
    fn streams_get_credit_only_with_room_to_spare_and_leave_the_rest_to_pulls() {
        let mut log = Log::new();
        let a = log.key_in(0, 40);
        let value = vec![7u8; 60 << 10];
        let t: Vec<Lsn> = a.iter().map(|k| log.txn(&[(k, &value[..])])).collect();
        // A buffer smaller than the headroom: no credit at all, pulls as before.
        let mut tiny = replica(STREAM_HEADROOM_BYTES / 2);
        assert_eq!(tiny.open_stream(PgId(0), 0).credit, 0);
        // 2 MiB: credit for what is left above the headroom.
        let mut r = replica(2 * STREAM_HEADROOM_BYTES);
        let s = r.open_stream(PgId(0), 0);
        assert_eq!(s.credit as usize, STREAM_HEADROOM_BYTES);
        r.on_progress(t[39], &[t[39], Lsn::ZERO]);
        // The stream fills its credit (and one record over it) ahead of what applies.
        let mut at = Lsn::ZERO;
        for &lsn in &t {
            if r.pending_bytes() + r.retained_bytes() > STREAM_HEADROOM_BYTES {
                break;
            }
            chunk(&mut r, &log, &s, at, lsn).unwrap();
            at = lsn;
        }
        assert_eq!(r.stream_credit(PgId(0), s.id), None, "no room above the headroom");
        // Pulls go on in the headroom; as records are flushed, the stream gets credit again.
        pg_at(&mut r, 0, t[39], Lsn::ZERO);
        assert!(r.plan_pull(PgId(0)).is_some());
        let applied = r.read_point().unwrap();
        pg_at(&mut r, 0, t[39], applied);
        assert!(r.stream_credit(PgId(0), s.id).is_some(), "room again once flushed records were released");
    }

    #[test]
    fn a_new_replica_starts_from_a_write_quorum_of_scls() {
        let mut scls = [[Some(Lsn(10)), Some(Lsn(9)), Some(Lsn(8)), None, Some(Lsn(7)), Some(Lsn(3))]; 2];
        let s = Start::from_scls(&scls).unwrap();
        assert_eq!((s.durable, s.bounds), (Lsn(7), vec![Lsn(7), Lsn(7)]));
        scls[1] = [Some(Lsn(5)), None, None, Some(Lsn(5)), Some(Lsn(5)), None];
        assert!(Start::from_scls(&scls).is_none(), "PG 1 lacks a write quorum of answers");
        // Far into the log, the replica starts without a read point until it meets a CPL.
        let r = ReplicaCore::new(volume(), ReplicaConfig { buffer_bytes_max: 1, cache_bytes_max: 0 }, Start { durable: Lsn(5000), bounds: vec![Lsn(5000); 2] });
        assert_eq!(r.read_point(), None);
    }
    #[test]
    fn pipelined_pulls_drop_what_would_leave_a_gap_and_go_on_after_a_short_reply() {
        let mut log = Log::new();
        let a = log.key_in(0, 40);
        let t: Vec<Lsn> = a.iter().map(|k| log.txn(&[(k, b"v")])).collect();
        let mut r = replica(4 << 20);
        r.on_progress(t[39], &[t[39], Lsn::ZERO]);
        let answer = |r: &mut ReplicaCore, plan: &PullPlan, last: Lsn| r.on_pulled(0, plan, pos(0, plan.upto, Lsn::ZERO), last, log.pull(0, plan.after, last));
        pg_at(&mut r, 0, t[9], Lsn::ZERO);
        let first = r.plan_pull(PgId(0)).unwrap();
        pg_at(&mut r, 0, t[19], Lsn::ZERO);
        // The second pull starts where the first is expected to end.
        let second = r.plan_pull(PgId(0)).unwrap();
        assert_eq!((first.after, first.upto, second.after, second.upto), (Lsn::ZERO, t[9], t[9], t[19]));
        assert!(r.plan_pull(PgId(0)).is_none(), "two in flight at most");
        // The first falls short (a byte limit): the second is forgotten, and pulls go on
        // from what is held, even while writes keep coming.
        assert_eq!(answer(&mut r, &first, t[4]), Ok(Some(t[4])));
        assert_eq!(answer(&mut r, &second, t[19]), Ok(None), "forgotten");
        pg_at(&mut r, 0, t[29], Lsn::ZERO);
        let third = r.plan_pull(PgId(0)).unwrap();
        assert_eq!(third.after, t[4]);
        pg_at(&mut r, 0, t[39], Lsn::ZERO);
        let fourth = r.plan_pull(PgId(0)).unwrap();
        // The fourth answers first: it would leave a gap, so it is dropped.
        assert_eq!(answer(&mut r, &fourth, t[39]), Ok(None));
        assert_eq!(answer(&mut r, &third, t[29]), Ok(Some(t[29])));
        let fifth = r.plan_pull(PgId(0)).unwrap();
        assert_eq!(answer(&mut r, &fifth, t[39]), Ok(Some(t[39])));
        assert_eq!(r.pending_bytes(), 0);
    }

    #[test]
    fn a_replica_started_far_behind_moves_up_to_the_writers_vdl() {
        // Storage alone says LSN 10 is durable (an idle PG holds it back); the writer's
        // VDL is 5000: the replica starts pulling near 5000, not from 0.
        let mut r = ReplicaCore::new(
            volume(),
            ReplicaConfig { buffer_bytes_max: 1 << 20, cache_bytes_max: 1 << 20 },
            Start { durable: Lsn(10), bounds: vec![Lsn(10); 2] },
        );
        assert_eq!(r.read_point(), None, "no read point before a CPL");
        pg_at(&mut r, 0, Lsn(5000), Lsn::ZERO);
        r.on_progress(Lsn(5000), &[Lsn(5000), Lsn(10)]);
        assert_eq!(r.plan_pull(PgId(0)).unwrap().after, Lsn(5000 - TXN_OPS_MAX as u64));
    }

    #[test]
    fn a_newer_writer_takes_over_and_an_older_ones_progress_is_ignored() {
        let mut log = Log::new();
        let a = log.key_in(0, 2);
        let t1 = log.txn(&[(&a[0], b"1")]);
        let t2 = log.txn(&[(&a[1], b"2")]);
        let mut r = replica(1 << 20);
        let (old, new) = (Epoch(1 << 32), Epoch(2 << 32));
        assert_eq!(r.on_writer(old, t1, &[t1, t1]), WriterHeard::Progress { new_writer: false, read_point: None });
        segments_at(&mut r, t2, Lsn::ZERO);
        pull(&mut r, &log, 0, t2);
        pull(&mut r, &log, 1, t2);
        assert!(r.pending_bytes() > 0);
        assert!(matches!(r.on_writer(new, t1, &[t1, t1]), WriterHeard::Progress { new_writer: true, .. }));
        assert_eq!(r.pending_bytes(), 0, "what was pulled above the VDL heard is dropped");
        assert_eq!(r.writer_epoch(), Some(new));
        assert_eq!(r.on_writer(old, t2, &[t2, t2]), WriterHeard::Stale);
        assert_eq!((r.vdl(), r.writer_epoch()), (t1, Some(new)), "the deposed writer's VDL is not taken");
    }

    #[test]
    fn a_new_epoch_drops_the_old_writers_unacknowledged_tail() {
        // The new writer truncated at t1, or (after a takeover this replica never
        // heard of, whose writer wrote t2' durably) at t2: either way, what the
        // replica pulled above the VDL it heard is dropped.
        for new_starts_at_t2 in [false, true] {
            let (mut old, mut new) = (Log::new(), Log::new());
            let (a, b) = (old.key_in(0, 2), old.key_in(1, 2));
            let t1 = old.txn(&[(&a[0], b"1"), (&b[0], b"1")]);
            assert_eq!(new.txn(&[(&a[0], b"1"), (&b[0], b"1")]), t1);
            // The old writer's t2 reached the segments but was never acknowledged; a later
            // recovery truncated it and t2' was written at the same LSNs, other keys.
            let t2 = old.txn(&[(&a[1], b"old"), (&b[1], b"old")]);
            assert_eq!(new.txn(&[(&b[1], b"new"), (&a[1], b"new")]), t2);
            let mut r = replica(1 << 20);
            r.on_progress(t1, &[t1, t1]);
            segments_at(&mut r, t2, Lsn::ZERO);
            pull(&mut r, &old, 0, t2);
            pull(&mut r, &old, 1, t2);
            assert_eq!(r.read_point(), Some(t1));
            let held: usize = r.held_records(1 << 20).iter().flatten().map(|b| b.len()).sum();
            assert_eq!(held, r.pending_bytes() + r.retained_bytes(), "everything held is offered back");
            let truncated_above = if new_starts_at_t2 { t2 } else { t1 };
            r.new_epoch(&[truncated_above; 2]);
            assert!(r.pending_bytes() == 0, "the old tail is dropped (new writer from {truncated_above})");
            segments_at(&mut r, t2, Lsn::ZERO);
            pull(&mut r, &new, 0, t2);
            pull(&mut r, &new, 1, t2);
            assert_eq!(r.on_progress(t2, &[t2, t2]), Some(t2));
            // What it applied and retains is the new writers' log, not the old tail.
            let held = r.held_records(1 << 20);
            for (pg, records) in held.iter().enumerate() {
                assert_eq!(records.concat(), new.pull(pg, Lsn::ZERO, t2), "pg{pg}");
            }
        }
    }
}
