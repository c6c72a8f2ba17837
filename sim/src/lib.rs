//! A deterministic simulation of one volume, driving the real core state
//! machines from one seed: the writer is `WriterCore`, each segment a
//! `SegmentLog`, over a network that drops, duplicates, delays and reorders
//! messages, while segments crash and restart with only what they flushed,
//! and their disks fail (in `disk`). Safety is checked after every event; once the faults stop, the volume
//! must converge (liveness). `SIM_SEED=n cargo test --profile release-checked -p sim`
//! replays one seed.
//!
//! Read replicas (`ReplicaCore`, in `replica`) run beside the writer over
//! the same network; what they serve is checked against the committed history.
//!
//! The writer side is driven the way writerd drives it: one sender per
//! segment with a cursor `at`, sending the Append frames `poll_send` returns
//! after it and feeding every ack into `handle_ack`. A session fails when
//! the segment's SCL stops catching up with the cursor (a frame or ack was
//! lost) or the segment crashes; the sender then reconnects, re-learns the
//! segment's position (writerd's Status) and resends from its SCL.

mod disk;
mod recovery;
mod replica;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use redo_core::join::Join;
use redo_core::page::{entry_bytes, PageOp, PAGE_HEADER_BYTES};
use redo_core::quorum::{SEGMENTS_PER_PG, WRITE_QUORUM};
use redo_core::rand::SplitMix64;
use redo_core::record::RECORD_OVERHEAD_BYTES;
use redo_core::repair::Repair;
use redo_core::replica::{ReplicaConfig, WriterHeard};
use redo_core::segment_claim::EpochState;
use redo_core::segment_file::SEGMENT_HEADER_BYTES;
use redo_core::segment_log::{SegmentLog, SegmentLogConfig};
use redo_core::volume::{NodeSpec, Volume};
use redo_core::wire::{Message, SegmentPosition};
use redo_core::writer::{Admit, ReadPlan, Recovered, WriterConfig, WriterCore};
use redo_core::{Epoch, Lsn, NodeId, PgId, SegmentId};

/// SplitMix64: a tiny seeded generator, so the simulator needs no
/// dependency and a seed means the same run on every platform.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

pub use replica::Bug;

#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub drop_percent: u64,
    pub duplicate_percent: u64,
    /// Extra delay, in ticks, drawn uniformly: reorders messages.
    pub delay_ticks_max: u64,
    /// Chance per tick that one random segment crashes, losing what it had not flushed.
    pub crash_percent: u64,
}

pub const NO_FAULTS: Faults = Faults { drop_percent: 0, duplicate_percent: 0, delay_ticks_max: 0, crash_percent: 0 };
/// The faults of the seeds CI runs and of the long search (`sim --seeds N`).
pub const FAULTY: Faults = Faults { drop_percent: 20, duplicate_percent: 10, delay_ticks_max: 15, crash_percent: 3 };

/// What a run went through, to show that the faults really were exercised.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Messages delivered (each followed by a safety check).
    pub delivered: u64,
    pub commits: u64,
    pub crashes: u64,
    pub reconnects: u64,
    /// Replica reads answered and checked, and how many of them fetched their page.
    pub reads: u64,
    pub fetches: u64,
    /// Times a replica's pulls stopped for a full buffer.
    pub throttles: u64,
    /// The most a replica's pending plus retained bytes went over `buffer_bytes_max`.
    pub buffer_over_bytes_max: usize,
    /// Checks that found a replica's read point past the writer's VDL (allowed
    /// only up to where a replica started from storage).
    pub read_points_past_vdl: u64,
    /// Writer crashes, recoveries (of which promotions offering back a
    /// replica's records), attempts that found no write quorum reachable.
    pub writer_crashes: u64,
    pub recoveries: u64,
    pub promotions: u64,
    pub recovery_retries: u64,
    /// Takeovers by two candidates at once: claims that lost to the other.
    pub claims_lost: u64,
    /// Replicas that deferred to a better-placed or promoting peer.
    pub deferrals: u64,
    /// Crashes that left part of an unflushed record (or other bytes) at the file's end.
    pub torn_tails: u64,
    /// Flushes that failed (EIO or ENOSPC), epoch-file writes that failed, nodes wiped.
    pub flush_faults: u64,
    pub epoch_write_faults: u64,
    pub wipes: u64,
    /// Wiped segments that joined at their peers' epoch state (`redo_core::join`).
    pub joins: u64,
    /// Frames a deposed writer resent after a takeover.
    pub deposed_frames: u64,
    /// Moves of the writer's GC horizon, and page reads refused below it (of replicas
    /// whose first reads were below it).
    pub horizon_moves: u64,
    pub reads_below_horizon: u64,
    /// Unacknowledged transactions a recovery dropped, and kept (whole).
    pub txns_dropped: u64,
    pub txns_kept_unacked: u64,
    /// Truncations a segment got from the new writer's session, having missed the recovery.
    pub late_truncations: u64,
    /// Segments filled from a peer because the writer could not resend what they lacked.
    pub gossip_fills: u64,
    /// Log streams a replica opened, chunks they brought, and chunks refused (the stream closed).
    pub streams: u64,
    pub stream_chunks: u64,
    pub stream_refusals: u64,
    /// Transactions refused for growing a page past the volume's limit (checked against the history).
    pub pages_full: u64,
    /// Takeovers with an AZ and one more node unreachable, and transactions a writer
    /// taken over from a read quorum refused until a write quorum held its claim.
    pub az_plus_one_takeovers: u64,
    pub writes_before_write_quorum: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.delivered += o.delivered;
        self.commits += o.commits;
        self.crashes += o.crashes;
        self.reconnects += o.reconnects;
        self.reads += o.reads;
        self.fetches += o.fetches;
        self.throttles += o.throttles;
        self.read_points_past_vdl += o.read_points_past_vdl;
        self.buffer_over_bytes_max = self.buffer_over_bytes_max.max(o.buffer_over_bytes_max);
        self.writer_crashes += o.writer_crashes;
        self.recoveries += o.recoveries;
        self.promotions += o.promotions;
        self.recovery_retries += o.recovery_retries;
        self.claims_lost += o.claims_lost;
        self.deferrals += o.deferrals;
        self.torn_tails += o.torn_tails;
        self.flush_faults += o.flush_faults;
        self.epoch_write_faults += o.epoch_write_faults;
        self.wipes += o.wipes;
        self.joins += o.joins;
        self.deposed_frames += o.deposed_frames;
        self.horizon_moves += o.horizon_moves;
        self.reads_below_horizon += o.reads_below_horizon;
        self.txns_dropped += o.txns_dropped;
        self.txns_kept_unacked += o.txns_kept_unacked;
        self.late_truncations += o.late_truncations;
        self.gossip_fills += o.gossip_fills;
        self.streams += o.streams;
        self.stream_chunks += o.stream_chunks;
        self.stream_refusals += o.stream_refusals;
        self.pages_full += o.pages_full;
        self.az_plus_one_takeovers += o.az_plus_one_takeovers;
        self.writes_before_write_quorum += o.writes_before_write_quorum;
    }
}

#[derive(Clone)]
enum Msg {
    Append {
        pg: usize,
        seg: usize,
        session: u64,
        frame: Bytes,
    },
    Ack {
        seg: usize,
        session: u64,
        position: SegmentPosition,
    },
    /// The writer's progress feed (`Follow`) to replica `to`.
    Progress {
        to: usize,
        epoch: Epoch,
        vdl: Lsn,
        pgcl: Vec<Lsn>,
    },
    /// A segment's position notification to replica `to`.
    Position {
        to: usize,
        seg: usize,
        position: SegmentPosition,
    },
    /// A replica's request to one segment, and the segment's answer.
    Ask {
        from: usize,
        seg: usize,
        id: u64,
        ask: replica::Ask,
    },
    Answer {
        to: usize,
        seg: usize,
        id: u64,
        answer: replica::Answer,
    },
}

/// A storage node's segment: its log and what survives a crash.
struct Segment {
    log: SegmentLog,
    /// The segment file: what it flushed, which pulls and page reads may read back.
    file: Vec<u8>,
    /// Its epoch file (`pg-N.epoch`).
    epoch_file: EpochState,
    /// Its disk failed: an operator restarts it at this tick.
    restart_at: Option<u64>,
    /// Its disk was wiped once: the writer may no longer hold what it lacks.
    wiped: bool,
    /// Wiped, and has granted no epoch since: its first must be the volume's or newer.
    lost_state: bool,
    /// Its join decision while it has no epoch state (storaged's gossip keeps one).
    join: Join,
    /// Crashed and unreachable until this tick.
    down_until: u64,
    /// The highest SCL it lost in a crash. With `ack = memory` those records
    /// may have counted towards a quorum; they stay durable only because the
    /// writer retains frames until every segment flushed them.
    lost_upto: Lsn,
    /// Its gossip decision (storaged's gossip task keeps one per segment, anew at a restart).
    repair: Repair,
}

/// writerd's per-segment sender.
struct Sender {
    session: u64,
    /// Everything up to here was sent on this session; `None` while disconnected.
    at: Option<Lsn>,
    /// The highest SCL acked on this session, and when it last rose.
    acked: Lsn,
    progress_at: u64,
}

const PAGE_COUNT: u64 = 64;
/// How long a new writer holds the GC horizon for its readers, and a gone reader counts.
const READER_GRACE_TICKS: u64 = 100;
/// Frames of the writer a deposed writer may resend, on a session of its own.
const RECENT_FRAMES: usize = 16;
const DEPOSED_SESSION: u64 = u64::MAX;
const KEYS: u64 = 200;
const TXN_PUTS_MAX: u64 = 4;
/// Four entries of a key and an 8-byte value, not five.
const SMALL_PAGE_BYTES_MAX: u64 = 100;
/// About four of the sim's pages in memory.
const WRITER_CACHE_BYTES_SMALL: usize = 1600;

fn key(n: u64) -> Vec<u8> {
    format!("k{n}").into_bytes()
}

/// The most one transaction's records take: `TXN_PUTS_MAX` puts of the longest key.
pub fn txn_bytes_max() -> usize {
    let mut payload = Vec::new();
    PageOp::Put { key: key(KEYS - 1), value: vec![0; 8] }.encode(&mut payload);
    TXN_PUTS_MAX as usize * (RECORD_OVERHEAD_BYTES + payload.len())
}

/// Longer than a round trip at the largest delay: a sender with unacked
/// frames and no progress for this long has lost its session.
const RECONNECT_AFTER_TICKS: u64 = 40;
const CRASH_DOWN_TICKS_MAX: u64 = 60;
const FLUSH_PERCENT: u64 = 30;
const SEGMENT_CONFIG: SegmentLogConfig = SegmentLogConfig { hot_bytes_max: 1 << 30, cache_bytes_max: 4096, flush_bytes_max: 2048 };

pub struct Sim {
    rng: Rng,
    /// Draws for the replicas' log streams, apart from `rng`, so that streams shift
    /// the other draws of a seed (faults, writer, recoveries) less.
    stream_rng: Rng,
    /// The deposed writer's own, so that its resends leave the other faults as they were.
    deposed_rng: Rng,
    now: u64,
    /// In flight, by delivery time (then sequence, for determinism).
    net: BTreeMap<(u64, u64), Msg>,
    sent: u64,
    writer: WriterCore,
    segments: Vec<Vec<Segment>>,
    senders: Vec<Vec<Sender>>,
    /// The oracle: each PG's LSNs in allocation order, every commit LSN, each key's values by commit LSN.
    allocated: Vec<Vec<Lsn>>,
    commits: BTreeSet<Lsn>,
    history: BTreeMap<Vec<u8>, BTreeMap<Lsn, Vec<u8>>>,
    vdl_seen: Lsn,
    replicas: Vec<replica::Replica>,
    /// Replicas to start at a tick (or as soon after as a write quorum of every PG answers).
    to_start: Vec<(u64, ReplicaConfig)>,
    stats: Stats,
    pub faults: Faults,
    pub bug: Option<Bug>,
    /// The writer's configuration (each new writer's, but for its epoch).
    writer_config: WriterConfig,
    /// False from a writer crash until a recovery completes.
    writer_up: bool,
    /// When the next recovery attempt is due while the writer is down.
    recover_at: u64,
    /// The VDL acknowledged when the writer last crashed.
    acked_floor: Lsn,
    /// The last recovery's VDL and truncation (`None`: the first writer, which recovered nothing).
    recovered_vdl: Lsn,
    truncation: Option<redo_core::wire::Truncation>,
    /// The current writer's truncation history (writerd's `Writer::history`):
    /// the older truncations its recovery's claim answers reported, oldest
    /// first, sent with every claim (the truncation round and each session's).
    truncation_history: Vec<redo_core::wire::Truncation>,
    /// Every recovery's truncation, oldest first: the oracle's, to check the history against.
    truncations_all: Vec<redo_core::wire::Truncation>,
    /// Ticks at which the writer crashes (if it is up and may: see `recovery::ACKED_HOLDERS_MIN`).
    pub writer_crash_at: Vec<u64>,
    /// Per PG, the newest epoch a write quorum of its segments granted (the oracle's).
    quorum_epoch: Vec<Epoch>,
    /// The writer's last frames, by PG, and those of the writer that crashed last:
    /// a deposed writer that does not know it resends them.
    recent_frames: VecDeque<(usize, Bytes)>,
    deposed: Vec<(usize, Bytes)>,
    /// The highest GC horizon of any PG that a writer decided (the oracle's).
    horizon_decided: Lsn,
}

impl Sim {
    pub fn new(seed: u64, pgs: usize) -> Self {
        let nodes = (0..SEGMENTS_PER_PG as u32).map(|i| NodeSpec { id: i, az: ["a", "b", "c"][i as usize / 2].into(), addr: format!("node{i}") }).collect();
        let mut volume = Volume::local("writer".into(), nodes, pgs as u32, PAGE_COUNT).expect("a valid layout");
        // Half the seeds limit pages to four of the sim's entries (below what a volume file may
        // say: one largest put), so that transactions are refused for it; the seed decides, not
        // `rng`, so that every other choice of the run is the same as without a limit.
        if seed % 4 >= 2 {
            volume.page_bytes_max = SMALL_PAGE_BYTES_MAX;
        }
        let config = WriterConfig {
            epoch: Epoch(1),
            lal: redo_core::api::TXN_OPS_MAX as u64,
            // Small, so that faults make transactions wait for quorum in bytes too.
            unquorumed_bytes_max: 16 << 10,
            batch_bytes_max: 1024,
            batch_inflight_max: 2,
            // Unbounded retention: a restarted segment must always be caught up by resending.
            retain_bytes_max: usize::MAX,
            // Odd seeds: a cache of a few pages, so that pages are evicted, read back from storage
            // and sized without their images. The cache does not change what the writer sends.
            cache_bytes_max: if seed % 2 == 1 { WRITER_CACHE_BYTES_SMALL } else { usize::MAX },
            reader_grace: replica::tick(READER_GRACE_TICKS),
        };
        let writer = WriterCore::new(volume, config.clone(), Recovered::new_volume(pgs));
        let segments = (0..pgs)
            .map(|pg| {
                (0..SEGMENTS_PER_PG)
                    .map(|n| Segment {
                        log: SegmentLog::new(SegmentId { pg: PgId(pg as u32), node: NodeId(n as u32) }, SEGMENT_CONFIG),
                        file: vec![0; SEGMENT_HEADER_BYTES],
                        epoch_file: EpochState::default(),
                        restart_at: None,
                        wiped: false,
                        lost_state: false,
                        join: Join::default(),
                        down_until: 0,
                        lost_upto: Lsn::ZERO,
                        repair: Repair::default(),
                    })
                    .collect()
            })
            .collect();
        let senders = (0..pgs).map(|_| (0..SEGMENTS_PER_PG).map(|_| Sender { session: 0, at: None, acked: Lsn::ZERO, progress_at: 0 }).collect()).collect();
        Sim {
            rng: Rng::new(seed),
            stream_rng: Rng::new(seed ^ 0x5eed_5eed_5eed_5eed),
            deposed_rng: Rng::new(seed ^ 0xdead_0000_dead_0000),
            now: 0,
            net: BTreeMap::new(),
            sent: 0,
            writer,
            segments,
            senders,
            allocated: vec![Vec::new(); pgs],
            commits: BTreeSet::new(),
            history: BTreeMap::new(),
            vdl_seen: Lsn::ZERO,
            replicas: Vec::new(),
            to_start: Vec::new(),
            stats: Stats::default(),
            faults: NO_FAULTS,
            bug: None,
            writer_config: config,
            writer_up: true,
            recover_at: 0,
            acked_floor: Lsn::ZERO,
            recovered_vdl: Lsn::ZERO,
            truncation: None,
            truncation_history: Vec::new(),
            truncations_all: Vec::new(),
            writer_crash_at: Vec::new(),
            quorum_epoch: vec![Epoch(0); pgs],
            recent_frames: VecDeque::new(),
            deposed: Vec::new(),
            horizon_decided: Lsn::ZERO,
        }
    }

    pub fn vdl(&self) -> Lsn {
        self.writer.vdl()
    }

    pub fn stats(&self) -> Stats {
        Stats { throttles: self.replicas.iter().map(|r| r.core.throttled().1).sum(), ..self.stats }
    }

    pub fn last_commit(&self) -> Lsn {
        self.commits.last().copied().unwrap_or(Lsn::ZERO)
    }

    fn send(&mut self, msg: Msg) {
        if self.rng.chance(self.faults.drop_percent) {
            return;
        }
        let copies = if self.rng.chance(self.faults.duplicate_percent) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(self.faults.delay_ticks_max + 1);
            self.sent += 1;
            self.net.insert((self.now + delay, self.sent), msg.clone());
        }
    }

    /// One client transaction: 1 to `TXN_PUTS_MAX` puts over random keys, so some span both PGs.
    pub fn write_txn(&mut self) {
        if !self.writer_up {
            return;
        }
        let ops: Vec<PageOp> = (0..1 + self.rng.below(TXN_PUTS_MAX))
            .map(|_| PageOp::Put { key: key(self.rng.below(KEYS)), value: self.rng.next_u64().to_le_bytes().to_vec() })
            .collect();
        // GetPage@LSN what the writer asks for, as writerd does: pages a recovered writer does
        // not know, then pages it must see to size the transaction.
        let mut fetched = Vec::new();
        let admit = loop {
            match self.writer.submit(&ops, &fetched) {
                Admit::NeedPages(pages) => {
                    assert!(fetched.len() < 2 * ops.len(), "the writer learned its pages, yet asks for {pages:?}");
                    for (pg, page, lsn) in pages {
                        match recovery::fetch_for_writer(self, pg, page, lsn) {
                            Some(image) => {
                                self.writer.learn_page(image.clone());
                                fetched.push(image);
                            }
                            None => return, // no segment can serve it yet: the client gives up
                        }
                    }
                }
                admit => break admit,
            }
        };
        let past_limit = self.puts_past_page_limit(&ops);
        match admit {
            Admit::Allocated { commit_lsn, .. } => {
                assert_eq!(past_limit, [], "the writer allocated a transaction that grows a page past its limit");
                let volume = self.writer.volume();
                for (lsn, op) in (commit_lsn.0 + 1 - ops.len() as u64..).zip(ops) {
                    let pg = volume.pg_of(volume.page_of(op.key()));
                    self.allocated[pg.0 as usize].push(Lsn(lsn));
                    if let PageOp::Put { key, value } = op {
                        self.history.entry(key).or_default().insert(commit_lsn, value);
                    }
                }
                self.commits.insert(commit_lsn);
                self.stats.commits += 1;
            }
            Admit::PageFull(full) => {
                assert!(past_limit.contains(&(full.key.clone(), full.bytes)), "{full}, but by the history {past_limit:?}");
                self.stats.pages_full += 1;
            }
            // Backpressure: the client gives up on this one.
            Admit::Stalled { .. } => {}
            Admit::NoWriteQuorum(_) => self.stats.writes_before_write_quorum += 1,
            Admit::NeedPages(_) => unreachable!("fetched above"),
        }
    }

    /// The puts of `ops` that grow their page past the volume's limit, each with the size it
    /// would reach after the puts before it, by the history (the writer's view: every
    /// transaction it allocated). The writer names one of them, not necessarily the first: it
    /// need not fetch a page to refuse a transaction that another page refuses already.
    fn puts_past_page_limit(&self, ops: &[PageOp]) -> Vec<(Vec<u8>, usize)> {
        let volume = self.writer.volume();
        let mut entries: HashMap<&[u8], usize> = self.history.iter().filter_map(|(k, v)| Some((k.as_slice(), v.values().next_back()?.len()))).collect();
        let size = |entries: &HashMap<&[u8], usize>, page| {
            PAGE_HEADER_BYTES + entries.iter().filter(|(k, _)| volume.page_of(k) == page).map(|(k, &v)| entry_bytes(k.len(), v)).sum::<usize>()
        };
        let mut past = Vec::new();
        for op in ops {
            let page = volume.page_of(op.key());
            let before = size(&entries, page);
            entries.insert(op.key(), op.value_len().expect("the sim only puts"));
            let after = size(&entries, page);
            if after > volume.page_bytes_max as usize && after > before {
                past.push((op.key().to_vec(), after));
            }
        }
        past
    }

    /// Advances one tick: deliver what is due, then per segment maybe flush and run its sender.
    pub fn tick(&mut self) {
        self.now += 1;
        while let Some(entry) = self.net.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            match entry.remove() {
                Msg::Append { pg, seg, session, frame } => {
                    let s = &mut self.segments[pg][seg];
                    if s.down_until > self.now {
                        continue;
                    }
                    let Ok(Message::Append { epoch, horizon, records, .. }) = Message::decode(frame.slice(4..)) else {
                        panic!("the writer sends valid Append frames")
                    };
                    let out = match self.append(pg, seg, epoch, &records) {
                        Ok(out) => out,
                        // A dead writer's frame reaching a segment a newer writer (or claimant) claimed.
                        Err(disk::Refused::Stale) if epoch < self.writer.epoch() || !self.writer_up => continue,
                        Err(disk::Refused::Stale) => panic!("pg{pg} segment {seg} refuses the writer's frame at {epoch} as stale"),
                        // No ack: the session times out and reconnects.
                        Err(disk::Refused::Disk) => continue,
                        Err(disk::Refused::Conflict(_)) if session == DEPOSED_SESSION => continue,
                        Err(disk::Refused::Conflict(e)) => panic!("pg{pg} segment {seg} refuses the writer's frame: {e}"),
                    };
                    self.segments[pg][seg].log.note_horizon(horizon);
                    self.send(Msg::Ack { seg, session, position: out.position });
                }
                Msg::Ack { seg, session, position } => {
                    let sender = &mut self.senders[position.pg.0 as usize][seg];
                    // The acks of a failed session are lost with its stream.
                    if sender.at.is_none() || sender.session != session {
                        continue;
                    }
                    if position.scl > sender.acked {
                        sender.acked = position.scl;
                        sender.progress_at = self.now;
                    }
                    self.writer.handle_ack(position.pg, seg, position.scl, position.flushed_lsn);
                }
                Msg::Progress { to, epoch, vdl, pgcl } => {
                    // replicad: a new writer's first progress drops what was pulled above
                    // the VDL heard; an older writer's is ignored.
                    let r = &mut self.replicas[to];
                    if r.core.on_writer(epoch, vdl, &pgcl) != WriterHeard::Stale {
                        r.heard = Some(self.now);
                    }
                }
                Msg::Position { to, seg, position } => {
                    self.replicas[to].core.on_position(seg, position);
                }
                Msg::Ask { from, seg, id, ask } => self.serve(from, seg, id, ask),
                Msg::Answer { to, seg, id, answer } => self.answered(to, seg, id, answer),
            }
            self.stats.delivered += 1;
            self.check_safety();
        }
        self.disk_faults(self.faults.crash_percent);
        self.join_rounds();
        self.resend_deposed();
        if self.writer_up && self.writer_crash_at.first().is_some_and(|&at| at <= self.now) && self.acked_held(recovery::ACKED_HOLDERS_MIN, None) {
            self.writer_crash_at.remove(0);
            self.crash_writer();
        }
        if !self.writer_up {
            let elected = self.elect();
            let restarted = self.now >= self.recover_at;
            if restarted || !elected.is_empty() {
                self.try_recover(&elected, restarted);
            }
        }
        for pg in 0..self.segments.len() {
            for seg in 0..SEGMENTS_PER_PG {
                if self.rng.chance(FLUSH_PERCENT) {
                    self.flush(pg, seg);
                }
                if self.writer_up {
                    self.run_sender(pg, seg);
                }
            }
        }
        self.run_replicas();
        if self.writer_up {
            let before = self.writer.horizon().get();
            self.stats.horizon_moves += (self.writer.advance_horizon(replica::tick(self.now)) > before) as u64;
            let pgs = (0..self.segments.len()).map(|pg| self.writer.pg_horizon(PgId(pg as u32)));
            self.horizon_decided = pgs.fold(self.horizon_decided, Lsn::max);
        }
        self.check_safety();
    }

    /// One turn of writerd's sender: reconnect if the session failed, then
    /// send the frames after the cursor.
    fn run_sender(&mut self, pg: usize, seg: usize) {
        let sender = &mut self.senders[pg][seg];
        let failed = sender.at.is_none_or(|at| at > sender.acked && self.now - sender.progress_at > RECONNECT_AFTER_TICKS);
        if failed {
            sender.at = None;
            let session = sender.session;
            if self.segments[pg][seg].down_until > self.now {
                return;
            }
            // Status with the recovery's truncation, before any append.
            if !self.late_truncation(pg, seg) {
                return;
            }
            // Status: the segment's actual position, which writerd folds in like an ack.
            let position = self.segments[pg][seg].log.position();
            self.senders[pg][seg] = Sender { session: session + 1, at: Some(position.scl), acked: position.scl, progress_at: self.now };
            self.writer.handle_ack(position.pg, seg, position.scl, position.flushed_lsn);
            self.stats.reconnects += 1;
        }
        let (session, mut at) = (self.senders[pg][seg].session, self.senders[pg][seg].at.expect("connected"));
        let mut batches = Vec::new();
        if let Err(gap) = self.writer.poll_send(PgId(pg as u32), at, &mut batches) {
            // Only a recovered writer, which holds no frames below what it read back, or a wiped segment leaves gaps.
            let wiped = self.segments[pg][seg].wiped;
            assert!(self.truncation.is_some() || wiped, "pg{pg} segment {seg} cannot be caught up though retention is unbounded: {gap:?}");
            self.gossip_fill(pg, seg);
            self.senders[pg][seg].at = None;
            return;
        }
        for b in batches {
            at = b.last_lsn;
            if self.recent_frames.len() == RECENT_FRAMES {
                self.recent_frames.pop_front();
            }
            self.recent_frames.push_back((pg, b.frame.clone()));
            self.send(Msg::Append { pg, seg, session, frame: b.frame });
        }
        self.senders[pg][seg].at = Some(at);
    }

    /// Safety: VDL only moves forward, to a commit LSN within VCL that is
    /// durable; every segment's own invariants hold; so do the replicas'.
    pub fn check_safety(&mut self) {
        let vdl = self.writer.vdl();
        assert!(vdl >= self.vdl_seen, "vdl went back from {} to {vdl}", self.vdl_seen);
        self.vdl_seen = vdl;
        assert!(vdl <= self.writer.vcl());
        assert!(vdl == Lsn::ZERO || self.commits.contains(&vdl), "vdl {vdl} is not a commit LSN");
        self.assert_durable(vdl, "vdl");
        self.segments.iter().flatten().for_each(|s| s.log.check_invariants());
        self.check_disks();
        self.writer.check_invariants();
        self.replicas.iter().for_each(|r| r.core.check_invariants());
        self.check_replicas();
    }

    /// Every LSN up to `upto` is held by a write quorum of its PG (counting
    /// what a crash took, which the writer must resend). Only the live writer's
    /// own records: what lies at or below a recovery's VDL was checked by the
    /// recovery, and a recovered writer resends only part of it.
    fn assert_durable(&self, upto: Lsn, what: &str) {
        if !self.writer_up {
            return;
        }
        for (pg, segs) in self.segments.iter().enumerate() {
            let log = &self.allocated[pg];
            if let Some(&lsn) = log[..log.partition_point(|&l| l <= upto)].last().filter(|&&l| l > self.recovered_vdl) {
                let holders = segs.iter().filter(|s| self.at_current_truncation(s) && (s.log.scl() >= lsn || s.lost_upto >= lsn)).count();
                assert!(holders >= WRITE_QUORUM, "{lsn} of pg{pg} is durable ({what} {upto}) but only {holders} segments hold it");
            }
        }
    }

    /// Liveness: with the network quiet, VDL reaches the last commit,
    /// every segment holds and has flushed its whole PG log, and every
    /// replica has applied it all and released what it retained.
    pub fn converged(&self) -> bool {
        self.writer_up
            && self.writer.vdl() == self.last_commit()
            && self.segments.iter().zip(&self.allocated).all(|(segs, log)| {
                let last = log.last().copied().unwrap_or(Lsn::ZERO);
                segs.iter().all(|s| s.log.scl() == last && s.log.flushed_lsn() == last)
            })
            && self.to_start.is_empty()
            && self.replicas.iter().all(|r| r.caught_up(self.writer.vdl()))
    }

    /// After convergence: once the writer learns every segment's position it
    /// releases every frame (acks carry the position at insertion, so the
    /// final flushes reach an idle writer only by Status), and it reads back
    /// every key's last value.
    fn check_converged_state(&mut self) {
        for (pg, segs) in self.segments.iter().enumerate() {
            for (seg, s) in segs.iter().enumerate() {
                self.writer.handle_ack(PgId(pg as u32), seg, s.log.scl(), s.log.flushed_lsn());
            }
        }
        assert_eq!(self.writer.inflight_bytes(), 0, "every segment flushed everything, yet frames are retained");
        for (key, versions) in &self.history {
            let value = match self.writer.read(key) {
                ReadPlan::Cached { lsn, value } if lsn <= self.writer.vdl() => value,
                // A recovered writer reads what it has not cached from storage (GetPage@LSN).
                ReadPlan::Fetch { pg, page, lsn } if lsn <= self.writer.vdl() => {
                    let image = recovery::fetch_for_writer(self, pg, page, lsn).expect("every segment is up and holds the whole log");
                    image.get(key).map(<[u8]>::to_vec)
                }
                other => panic!("{} reads as {other:?}", String::from_utf8_lossy(key)),
            };
            assert_eq!(value.as_ref(), versions.values().next_back(), "{} after {} writer crashes", String::from_utf8_lossy(key), self.stats.writer_crashes);
        }
    }
}

/// Runs one seed: a faulty phase with writes, then a quiet phase that must
/// converge. A replica follows from the start; on most seeds a second one
/// joins during the faulty phase.
pub fn run(seed: u64, faults: Faults, bug: Option<Bug>) -> Stats {
    const WRITE_TICKS: u64 = 400;
    let mut sim = Sim::new(seed, 2);
    sim.faults = faults;
    sim.bug = bug;
    // On about half the seeds the writer crashes, up to three times, and a recovery takes over.
    if sim.rng.chance(50) {
        let mut at: Vec<u64> = (0..1 + sim.rng.below(3)).map(|_| 1 + sim.rng.below(WRITE_TICKS)).collect();
        at.sort_unstable();
        sim.writer_crash_at = at;
    }
    sim.add_replica(0);
    if sim.rng.chance(70) {
        let at = 1 + sim.rng.below(WRITE_TICKS);
        sim.add_replica(at);
    }
    for _ in 0..WRITE_TICKS {
        if sim.rng.chance(60) {
            sim.write_txn();
        }
        sim.tick();
    }
    sim.faults = NO_FAULTS;
    for _ in 0..2000 {
        sim.tick();
        if sim.converged() {
            sim.check_converged_state();
            return sim.stats();
        }
    }
    let positions: Vec<Vec<(Lsn, Lsn)>> = sim.segments.iter().map(|segs| segs.iter().map(|s| (s.log.scl(), s.log.flushed_lsn())).collect()).collect();
    panic!(
        "seed {seed}: no convergence: vdl {} of last commit {}; replicas {:?}; segments (scl, flushed) {positions:?}; {:?}",
        sim.vdl(),
        sim.last_commit(),
        sim.replica_states(),
        sim.stats()
    );
}
