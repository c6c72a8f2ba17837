//! Read replicas: `ReplicaCore` driven the way replicad drives it. A replica
//! starts from a write quorum of segment SCLs, follows the writer's progress
//! feed and every segment's position notifications, streams each PG's log
//! from one segment (storaged's `LogStream` on the segment's side), pulls
//! what the stream does not bring from one segment at a time, and serves
//! reads, fetching missing pages with GetPage@LSN. Requests fail over to the
//! next candidate segment when one is behind or does not answer in time.
//! Requests travel over the sim's faulty network; a stream's chunks arrive in
//! order, late, until the stream breaks (its segment crashes, it truncates,
//! or at random: a lost connection).
//!
//! Checked after every event: the read point never moves back nor passes the
//! writer's VDL, and every read matches the committed history as of the read
//! point it reports. How far the buffer goes over its bound is measured.

use bytes::Bytes;
use std::time::Duration;

use redo_core::api::Role;
use redo_core::failover::{Verdict, Watch};
use redo_core::log_stream::{LogStream, StreamPoll};
use redo_core::page::PageImage;
use redo_core::quorum::SEGMENTS_PER_PG;
use redo_core::record::{RecordRef, Records};
use redo_core::replica::{PullError, PullPlan, ReadPlan, ReplicaConfig, ReplicaCore, Start, StreamPlan};
use redo_core::segment_log::{DiskRead, PagePart, Unserved};
use redo_core::wire::SegmentPosition;
use redo_core::{Epoch, Lsn, PageId, PgId};

use crate::{key, Msg, Segment, Sim, KEYS, RECONNECT_AFTER_TICKS};

/// The feeds are streams in replicad: a lost message stands for a lost
/// stream, which is re-established and sends the current state again.
const FEED_RESEND_TICKS: u64 = 25;
/// How long a replica must not hear its writer before it looks for a new one.
const ELECTION_SILENCE: Duration = Duration::from_millis(20);
/// Chance that a peer (or the writer) answers one `Role` request.
const ROLE_ANSWER_PERCENT: u64 = 80;
const READ_PERCENT: u64 = 30;
const READS_INFLIGHT_MAX: usize = 4;
/// Chance that a segment answers the Status a starting replica sends.
const STATUS_ANSWER_PERCENT: u64 = 80;
/// Chance per tick that a log stream breaks (its connection is lost).
const STREAM_BREAK_PERCENT: u64 = 2;
/// Largest chunk a stream sends (storaged: half its frame limit).
const STREAM_CHUNK_BYTES_MAX: usize = 4096;

/// A PG's log stream: the segment's side (`LogStream`) and the chunks on their way,
/// in order, each with the tick it arrives.
struct Stream {
    plan: StreamPlan,
    cursor: LogStream,
    /// Credit granted in all.
    granted: u64,
    chunks: std::collections::VecDeque<(u64, SegmentPosition, Lsn, Bytes)>,
}

/// Deliberate bugs, to show that the checks catch them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// The writer's feed reports its last allocated LSN as VDL and PGCL: the replica applies past VDL.
    FeedPastVdl,
    /// Segments serve GetPage@LSN as of half the LSN asked for: a stale page.
    StalePage,
    /// Recovery takes VDL as the highest CPL pulled, ignoring the holes below it.
    RecoveryMaxScl,
    /// Claims carry no truncation history (as before the fix): a segment that
    /// missed a recovery is cut above the new VDL only, and keeps the older
    /// writer's discarded tail below it.
    NoTruncationHistory,
    /// Claim answers report the epoch just claimed (as writerd did before the
    /// fix), not that of the segment's newest truncation: `effective_scl` never
    /// clamps a segment that missed a truncation.
    ClaimedEpochInAnswers,
    /// Segments answer a claim they refused as if they had granted it: two
    /// concurrent candidates can both count a write quorum.
    RefusalsAsGrants,
    /// A restarted segment takes its file's length for the end of its log
    /// instead of scanning for the last whole record: a torn tail is served.
    TrustFileLength,
    /// A restarted segment reports the SCL it had before the crash, as if its
    /// unflushed records had survived.
    RestartKeepsScl,
    /// A flush that failed (EIO, ENOSPC) is reported done: the flushed LSN
    /// vouches for records that are not on disk.
    FailedFlushCounted,
    /// An epoch-file write that failed (ENOSPC) is taken as done: the segment
    /// acts on an epoch, or a truncation, that a restart forgets.
    EpochWriteFailureIgnored,
    /// A wiped node comes back with its old epoch and position (stale
    /// metadata) over an empty segment file.
    WipeKeepsPosition,
    /// Replicas do not report their read points: the writer's GC horizon
    /// passes them, and storage refuses their page reads.
    HorizonIgnoresReaders,
    /// A wiped segment grants epochs at once instead of joining first (as
    /// before `redo_core::join`): a deposed writer's frame can move it to an
    /// epoch below the volume's, and the deposed writer count it.
    JoinSkipped,
    /// Takeovers go on with 2 answers per PG, below a read quorum: with an AZ
    /// and two more nodes unreachable, recovery can miss an acknowledged record.
    RecoveryFromTwo,
}

#[derive(Clone)]
pub(crate) enum Ask {
    /// A pull at the writer epoch the replica heard last (`Epoch(1)`, the first
    /// writer's, recovered nothing: no truncation to ask for).
    Pull(PullPlan, Epoch),
    /// GetPage@`lsn` to answer a read of `key`.
    Page { key: Vec<u8>, pg: PgId, page: PageId, lsn: Lsn },
}

impl Ask {
    fn pg(&self) -> PgId {
        match self {
            Ask::Pull(plan, _) => plan.pg,
            Ask::Page { pg, .. } => *pg,
        }
    }
}

#[derive(Clone)]
pub(crate) enum Answer {
    Pulled {
        position: SegmentPosition,
        last_lsn: Lsn,
        records: Bytes,
    },
    /// The segment has not recorded the truncation of the epoch pulled at (storaged's Behind).
    Behind,
    /// `None`: refused, the segment's SCL is below the LSN asked for (Behind).
    Page(Option<PageImage>),
    /// Refused: the page read is below the segment's GC horizon.
    BelowHorizon(String),
}

struct Request {
    id: u64,
    ask: Ask,
    /// Segments still to try, the next one last.
    left: Vec<usize>,
    sent_at: u64,
}

pub(crate) struct Replica {
    pub(crate) core: ReplicaCore,
    inflight: Vec<Request>,
    next_id: u64,
    /// The read point at the last check: it never moves back.
    read_point: Option<Lsn>,
    /// Where it started from storage: its read point may pass the writer's VDL up to there.
    start_durable: Lsn,
    /// Its reads started at or above every GC horizon a writer decided (frames may bring
    /// it to storage late): a horizon past one of its reads is a bug (the early reads of
    /// one that started below are refused until its read point passes the horizon).
    above_horizon: bool,
    /// What the writer's feed and each segment's notifications last sent it.
    progress_sent: Lsn,
    notified: Vec<[SegmentPosition; SEGMENTS_PER_PG]>,
    /// Per PG, its log stream.
    streams: Vec<Option<Stream>>,
    /// The tick its writer feed last brought progress (`None`: never).
    pub(crate) heard: Option<u64>,
    /// Its failure detector (replicad's `watch`), in ticks as milliseconds.
    watch: Watch<usize>,
}

impl Replica {
    /// The epoch of the writer it follows: what its reads, its role and its offer carry.
    pub(crate) fn epoch(&self) -> Epoch {
        self.core.writer_epoch().expect("a replica follows the writer of the moment from its start")
    }

    pub(crate) fn caught_up(&self, vdl: Lsn) -> bool {
        self.core.read_point() == Some(vdl) && self.core.pending_bytes() == 0 && self.core.retained_bytes() == 0
    }
}

impl Sim {
    /// A replica to start at tick `at`: on some seeds with a buffer small
    /// enough to throttle pulls, or a cache small enough to evict.
    pub fn add_replica(&mut self, at: u64) {
        let buffer_bytes_max = if self.rng.chance(50) { 256 + self.rng.below(2048) as usize } else { 4 << 20 };
        // Up to about seven of the sim's pages, or none (every read fetches).
        let cache_bytes_max = if self.rng.chance(50) { 400 * self.rng.below(8) as usize } else { usize::MAX };
        self.to_start.push((at, ReplicaConfig { buffer_bytes_max, cache_bytes_max }));
    }

    /// Starts the replicas that are due, each once a write quorum of every
    /// PG's segments answered its Status (it asks again next tick otherwise).
    fn start_replicas(&mut self) {
        for i in (0..self.to_start.len()).rev() {
            if self.to_start[i].0 > self.now {
                continue;
            }
            let mut answers = Vec::new();
            let mut scls = vec![[None; SEGMENTS_PER_PG]; self.segments.len()];
            for (pg, segs) in self.segments.iter().enumerate() {
                for (seg, s) in segs.iter().enumerate() {
                    if s.down_until <= self.now && self.rng.chance(STATUS_ANSWER_PERCENT) {
                        scls[pg][seg] = Some(s.log.scl());
                        answers.push((seg, s.log.position()));
                    }
                }
            }
            let Some(start) = Start::from_scls(&scls) else { continue };
            let (_, config) = self.to_start.remove(i);
            let start_durable = start.durable;
            let core = ReplicaCore::new(self.writer.volume().clone(), config, start);
            let above_horizon = self.horizon_decided <= core.lowest_read_point();
            // It follows the writer of the moment from the start (replicad learns it from
            // the first progress it hears).
            let mut core = core.following(self.writer.epoch());
            for (seg, position) in answers {
                core.on_position(seg, position);
            }
            let notified = vec![[SegmentPosition::default(); SEGMENTS_PER_PG]; self.segments.len()];
            let streams = (0..self.segments.len()).map(|_| None).collect();
            self.replicas.push(Replica {
                core,
                inflight: Vec::new(),
                next_id: 0,
                read_point: None,
                start_durable,
                above_horizon,
                progress_sent: Lsn::ZERO,
                notified,
                streams,
                heard: None,
                watch: Watch::new(ELECTION_SILENCE, tick(self.now)),
            });
        }
    }

    /// Each replica's failure detector (the core's `Watch`, as replicad's
    /// `watch` runs it): the replicas that decide to promote now. The roles
    /// of the peers and of the writer each answer or not.
    pub(crate) fn elect(&mut self) -> Vec<usize> {
        let now = tick(self.now);
        let role = |sim: &Sim, q: usize| {
            let r = &sim.replicas[q];
            Role { epoch: r.epoch(), vdl: r.core.vdl(), writer_silent_ms: r.heard.map_or(u64::MAX, |h| sim.now - h), ..Role::default() }
        };
        let mut elected = Vec::new();
        for r in 0..self.replicas.len() {
            let heard = self.replicas[r].heard.map(tick);
            if now < self.replicas[r].watch.poll_timeout() || !self.replicas[r].watch.handle_timeout(now, heard) {
                continue;
            }
            let answering: Vec<usize> = (0..self.replicas.len()).filter(|&q| q != r && self.rng.chance(ROLE_ANSWER_PERCENT)).collect();
            let mut roles: Vec<(usize, Role)> = answering.into_iter().map(|q| (q, role(self, q))).collect();
            if self.writer_up && self.rng.chance(ROLE_ANSWER_PERCENT) {
                // The volume's writer address (a replica's index never reaches it).
                roles.push((usize::MAX, Role { writer: true, epoch: self.writer.epoch(), vdl: self.writer.vdl(), ..Role::default() }));
            }
            let mine = role(self, r);
            match self.replicas[r].watch.on_roles(now, r, &mine, &roles) {
                Verdict::Promote => elected.push(r),
                Verdict::Defer { .. } => self.stats.deferrals += 1,
                Verdict::Follow(_) | Verdict::Wait(_) => {}
            }
        }
        elected
    }

    /// One turn of every replica: feeds, requests that timed out, pulls, maybe a read.
    pub(crate) fn run_replicas(&mut self) {
        self.start_replicas();
        let resend = self.now.is_multiple_of(FEED_RESEND_TICKS);
        for r in 0..self.replicas.len() {
            self.feed(r, resend);
            self.report_read_point(r);
            let now = self.now;
            let (late, waiting) = std::mem::take(&mut self.replicas[r].inflight).into_iter().partition(|q| now - q.sent_at >= RECONNECT_AFTER_TICKS);
            self.replicas[r].inflight = waiting;
            for req in late {
                self.ask_next(r, req);
            }
            for pg in 0..self.segments.len() {
                self.stream(r, pg);
                if let Some(plan) = self.replicas[r].core.plan_pull(PgId(pg as u32)) {
                    // A random segment among those holding what the read point needs, then the others.
                    let (mut order, mut rest) = (plan.segments[..plan.covering].to_vec(), plan.segments[plan.covering..].to_vec());
                    self.rng.shuffle(&mut order);
                    self.rng.shuffle(&mut rest);
                    order.extend(rest);
                    let epoch = self.replicas[r].epoch();
                    self.request(r, Ask::Pull(plan, epoch), order);
                }
            }
            let reading = self.replicas[r].inflight.iter().filter(|q| matches!(q.ask, Ask::Page { .. })).count();
            if reading < READS_INFLIGHT_MAX && self.rng.chance(READ_PERCENT) {
                self.read(r);
            }
        }
    }

    /// replicad's read point reports on the writer's feed: the lowest LSN its
    /// reads use (its read point, or an older one a page fetch still asks for).
    fn report_read_point(&mut self, r: usize) {
        if !self.writer_up || self.bug == Some(Bug::HorizonIgnoresReaders) {
            return;
        }
        let replica = &self.replicas[r];
        let asked = replica.inflight.iter().filter_map(|q| if let Ask::Page { lsn, .. } = q.ask { Some(lsn) } else { None });
        self.writer.on_read_point(r as u64, asked.fold(replica.core.lowest_read_point(), Lsn::min));
    }

    /// The writer's feed and the segments' notifications: each sends when
    /// its state changed, and again every `FEED_RESEND_TICKS`.
    fn feed(&mut self, r: usize, resend: bool) {
        let pgs = self.segments.len();
        let (vdl, pgcl) = match self.bug {
            Some(Bug::FeedPastVdl) => (self.writer.last_allocated(), vec![self.writer.last_allocated(); pgs]),
            _ => (self.writer.vdl(), (0..pgs).map(|pg| self.writer.pgcl(PgId(pg as u32))).collect()),
        };
        // A dead writer sends nothing; a new one's first progress goes out at once.
        let epoch = self.writer.epoch();
        if self.writer_up && (resend || vdl > self.replicas[r].progress_sent || epoch != self.replicas[r].epoch()) {
            self.replicas[r].progress_sent = vdl;
            self.send(Msg::Progress { to: r, epoch, vdl, pgcl });
        }
        for pg in 0..pgs {
            for seg in 0..SEGMENTS_PER_PG {
                let s = &self.segments[pg][seg];
                let position = s.log.position();
                if s.down_until > self.now || !(resend || position != self.replicas[r].notified[pg][seg]) {
                    continue;
                }
                self.replicas[r].notified[pg][seg] = position;
                self.send(Msg::Position { to: r, seg, position });
            }
        }
    }

    /// One turn of replica `r`'s log stream of `pg`, as replicad's `log_stream` and
    /// storaged's `push_log` run it: open one on a random segment if there is none,
    /// let the segment send what its cursor allows, deliver what arrived, grant credit.
    fn stream(&mut self, r: usize, pg: usize) {
        let pgid = PgId(pg as u32);
        let replica = &mut self.replicas[r];
        if replica.streams[pg].as_ref().is_some_and(|st| !replica.core.stream_open(pgid, st.plan.id)) {
            replica.streams[pg] = None; // a new epoch ended it
        }
        let Some(mut st) = replica.streams[pg].take() else {
            let seg = self.stream_rng.below(SEGMENTS_PER_PG as u64) as usize;
            let (s, epoch) = (&self.segments[pg][seg], replica.epoch());
            // storaged refuses a segment that is down, or one that missed the epoch's truncation.
            let behind = epoch != Epoch(1) && s.log.last_truncation().is_none_or(|t| t.epoch != epoch);
            if s.down_until > self.now || behind {
                return;
            }
            let plan = replica.core.open_stream(pgid, seg);
            let cursor = LogStream::new(&s.log, plan.after, plan.credit);
            replica.streams[pg] = Some(Stream { granted: plan.credit as u64, plan, cursor, chunks: Default::default() });
            self.stats.streams += 1;
            return;
        };
        let s = &self.segments[pg][st.plan.segment];
        let broken = s.down_until > self.now || self.stream_rng.chance(STREAM_BREAK_PERCENT);
        match st.cursor.poll(&s.log, STREAM_CHUNK_BYTES_MAX) {
            _ if broken => return self.replicas[r].core.stream_closed(pgid, st.plan.id),
            StreamPoll::Truncated => return self.replicas[r].core.stream_closed(pgid, st.plan.id),
            StreamPoll::Send { after, upto, bytes_max } => {
                let (records, last_lsn) = pull(s, after, upto, bytes_max);
                st.cursor.sent(last_lsn, records.len());
                let arrives = st.chunks.back().map_or(self.now, |c| c.0).max(self.now + self.stream_rng.below(5));
                st.chunks.push_back((arrives, s.log.position(), last_lsn, records));
            }
            StreamPoll::Wait => {}
        }
        let replica = &mut self.replicas[r];
        while st.chunks.front().is_some_and(|c| c.0 <= self.now) {
            let (_, position, last_lsn, records) = st.chunks.pop_front().expect("front exists");
            self.stats.stream_chunks += 1;
            match replica.core.on_streamed(pgid, st.plan.id, position, last_lsn, records) {
                Ok(_) => {}
                Err(PullError::StreamClosed) => return,
                // A replica that has not heard of a takeover yet may stream a truncated
                // segment after an untruncated one: the records do not link up. As replicad,
                // close the stream; the next one, or the new epoch, goes on.
                Err(_) => {
                    self.stats.stream_refusals += 1;
                    return replica.core.stream_closed(pgid, st.plan.id);
                }
            }
        }
        if let Some(credit) = replica.core.stream_credit(pgid, st.plan.id) {
            st.granted += credit as u64;
            st.cursor.granted(st.granted);
        }
        replica.streams[pg] = Some(st);
    }

    fn read(&mut self, r: usize) {
        let key = key(self.rng.below(KEYS));
        match self.replicas[r].core.read(&key) {
            ReadPlan::Cached { read_point, value } => self.check_read(&key, read_point, value.as_ref()),
            ReadPlan::Fetch { pg, page, lsn, mut segments } => {
                self.stats.fetches += 1;
                self.rng.shuffle(&mut segments);
                self.request(r, Ask::Page { key, pg, page, lsn }, segments);
            }
            ReadPlan::NotReady => {}
        }
    }

    fn request(&mut self, r: usize, ask: Ask, mut order: Vec<usize>) {
        order.reverse();
        self.ask_next(r, Request { id: 0, ask, left: order, sent_at: 0 });
    }

    /// Sends `req` to its next segment, under a new id (an answer to an
    /// attempt given up on is dropped with its stream), or gives up once
    /// none is left: the pull is released, the fetch ends without an image.
    fn ask_next(&mut self, r: usize, mut req: Request) {
        let Some(seg) = req.left.pop() else {
            match req.ask {
                Ask::Pull(plan, _) => self.replicas[r].core.pull_failed(&plan),
                Ask::Page { key, page, .. } => self.fetched(r, &key, page, None),
            }
            return;
        };
        let replica = &mut self.replicas[r];
        (req.id, req.sent_at) = (replica.next_id, self.now);
        replica.next_id += 1;
        self.send(Msg::Ask { from: r, seg, id: req.id, ask: req.ask.clone() });
        self.replicas[r].inflight.push(req);
    }

    /// A segment serves a request as storaged does; a crashed one does not answer.
    pub(crate) fn serve(&mut self, from: usize, seg: usize, id: u64, ask: Ask) {
        let s = &self.segments[ask.pg().0 as usize][seg];
        if s.down_until > self.now {
            return;
        }
        let answer = match ask {
            Ask::Pull(_, epoch) if epoch != Epoch(1) && s.log.last_truncation().is_none_or(|t| t.epoch != epoch) => Answer::Behind,
            Ask::Pull(plan, _) => {
                let (records, last_lsn) = pull(s, plan.after, plan.upto, plan.bytes_max);
                Answer::Pulled { position: s.log.position(), last_lsn, records }
            }
            Ask::Page { page, lsn, .. } => {
                let lsn = if self.bug == Some(Bug::StalePage) { Lsn(lsn.0 / 2) } else { lsn };
                match s.log.check_readable(lsn) {
                    Err(below) => Answer::BelowHorizon(below.to_string()),
                    Ok(()) => Answer::Page((s.log.scl() >= lsn).then(|| page_at(s, page, lsn))),
                }
            }
        };
        self.send(Msg::Answer { to: from, seg, id, answer });
    }

    pub(crate) fn answered(&mut self, r: usize, seg: usize, id: u64, answer: Answer) {
        let inflight = &mut self.replicas[r].inflight;
        // A duplicate, or the answer to an attempt given up on.
        let Some(i) = inflight.iter().position(|q| q.id == id) else { return };
        let req = inflight.remove(i);
        match (req.ask, answer) {
            (Ask::Pull(plan, epoch), Answer::Pulled { position, last_lsn, records }) => {
                match self.replicas[r].core.on_pulled(seg, &plan, position, last_lsn, records) {
                    Ok(_) => {}
                    // The segment lost records in a crash since it reported its SCL: try another.
                    Err(PullError::Empty { .. }) => self.ask_next(r, Request { ask: Ask::Pull(plan, epoch), ..req }),
                    Err(e) => panic!("replica {r} refuses the log segment {seg} of {} served after {}: {e}", plan.pg, plan.after),
                }
            }
            (Ask::Page { key, page, .. }, Answer::Page(Some(image))) => self.fetched(r, &key, page, Some(image)),
            (Ask::Page { key, page, lsn, .. }, Answer::BelowHorizon(why)) => {
                assert!(!self.replicas[r].above_horizon, "replica {r}'s page read at {lsn} refused ({why}): the GC horizon passed a read in use");
                self.stats.reads_below_horizon += 1;
                self.fetched(r, &key, page, None);
            }
            // Behind (it lost records in a crash): another segment may have the page.
            (ask, Answer::Page(None) | Answer::Behind) => self.ask_next(r, Request { ask, ..req }),
            _ => unreachable!("answers match their requests"),
        }
    }

    fn fetched(&mut self, r: usize, key: &[u8], page: PageId, image: Option<PageImage>) {
        let had_image = image.is_some();
        let read = self.replicas[r].core.fetched(page, image, key);
        match read {
            Some((read_point, value)) => self.check_read(key, read_point, value.as_ref()),
            None => assert!(!had_image, "a page from storage does not link to the records the replica applied since"),
        }
    }

    /// The value read at `read_point` is the last one committed at or below it.
    fn check_read(&mut self, key: &[u8], read_point: Lsn, value: Option<&Vec<u8>>) {
        let committed = self.history.get(key).and_then(|h| h.range(..=read_point).next_back()).map(|(_, v)| v);
        assert_eq!(value, committed, "{} read at {read_point}", String::from_utf8_lossy(key));
        self.stats.reads += 1;
    }

    /// Read points only move forward, to durable commit LSNs the writer's
    /// VDL reached.
    pub(crate) fn check_replicas(&mut self) {
        for r in 0..self.replicas.len() {
            let replica = &self.replicas[r];
            let read_point = replica.core.read_point();
            assert!(read_point >= replica.read_point, "replica {r}'s read point went back from {:?} to {read_point:?}", replica.read_point);
            if let Some(at) = read_point {
                // A replica's start from storage may be past VDL: a write quorum holds
                // the records, but the acks have not reached the writer yet.
                assert!(at <= self.vdl_seen.max(replica.start_durable), "replica {r} reads at {at}, past the writer's VDL {}", self.vdl_seen);
                self.stats.read_points_past_vdl += (at > self.vdl_seen) as u64;
                assert!(at == Lsn::ZERO || self.commits.contains(&at), "replica {r} reads at {at}, not a commit LSN");
                self.assert_durable(at, "replica read point");
            }
            // ReplicaCore's promise: over its buffer by at most one transaction plus one record.
            let core = &replica.core;
            let over = (core.pending_bytes() + core.retained_bytes()).saturating_sub(core.buffer_bytes_max());
            let allowed = crate::txn_bytes_max() + crate::txn_bytes_max() / crate::TXN_PUTS_MAX as usize;
            assert!(over <= allowed, "replica {r} holds {over} bytes beyond its buffer (allowed: {allowed})");
            self.stats.buffer_over_bytes_max = self.stats.buffer_over_bytes_max.max(over);
            self.replicas[r].read_point = read_point;
        }
    }

    pub fn replica_states(&self) -> Vec<String> {
        let state = |r: &Replica| {
            let c = &r.core;
            format!("read point {:?} vdl {} pending {} retained {}", c.read_point(), c.vdl(), c.pending_bytes(), c.retained_bytes())
        };
        self.replicas.iter().map(state).collect()
    }
}

/// A pull as storaged serves it: from memory, else from the segment file.
pub(crate) fn pull(s: &Segment, after: Lsn, upto: Lsn, bytes_max: usize) -> (Bytes, Lsn) {
    let mut parts = Vec::new();
    match s.log.read(after, upto, bytes_max, &mut parts) {
        Ok(last) => (Bytes::from(parts.concat()), last),
        Err(Unserved::Disk(disk)) => {
            let (records, last) = read_file(&s.file, disk, bytes_max, |_| true);
            (Bytes::from(records), last)
        }
        Err(Unserved::Reclaimed(r)) => unreachable!("the sim stores no page images, so it reclaims no log: {r}"),
    }
}

/// GetPage@`lsn` as storaged serves it: the page's records from the
/// segment file and memory applied to the empty page (the sim stores no images).
pub(crate) fn page_at(s: &Segment, page: PageId, lsn: Lsn) -> PageImage {
    let read = s.log.page_read(page, lsn).expect("the sim keeps no page index that could break");
    assert!(read.base.is_none(), "the sim stores no page images");
    let mut image = PageImage::empty(page);
    for part in read.parts {
        let records = match part {
            PagePart::Memory(bytes) => bytes.to_vec(),
            PagePart::Scan(scan) => read_file(&s.file, scan, usize::MAX, |r| r.header().page == page).0,
            PagePart::Disk(_) => unreachable!("records located on disk come from a page index"),
        };
        for rec in Records::new(&records, 0) {
            image.apply(rec.expect("records the segment holds decode")).expect("a segment's records of a page link up");
        }
    }
    image
}

/// storaged's `read_from_disk` over the simulated file: the records in
/// `(after, upto]` that `keep` accepts, about `bytes_max` at most (at least
/// one), and the last LSN served. Also checks that the file's records chain.
fn read_file(file: &[u8], read: DiskRead, bytes_max: usize, keep: impl Fn(&RecordRef) -> bool) -> (Vec<u8>, Lsn) {
    let (mut out, mut last, mut prev) = (Vec::new(), read.after, read.prev);
    let (from, to) = (read.offset as usize, read.end_offset as usize);
    assert!(to <= file.len(), "the file ends at {}, before the flushed end {to}: a flush reported durable is not on disk", file.len());
    for rec in Records::new(&file[from..to], from) {
        let rec = rec.expect("the file holds whole records");
        assert_eq!(rec.prev_lsn_in_segment(), prev, "record {} in the file does not link to the one before", rec.lsn());
        prev = rec.lsn();
        if rec.lsn() > read.upto {
            break;
        }
        if rec.lsn() <= read.after || !keep(&rec) {
            continue;
        }
        if !out.is_empty() && out.len() + rec.as_bytes().len() > bytes_max {
            break;
        }
        out.extend_from_slice(rec.as_bytes());
        last = rec.lsn();
    }
    (out, last)
}

/// A tick as the core's time (a millisecond each).
pub(crate) fn tick(t: u64) -> Duration {
    Duration::from_millis(t)
}
