//! A deterministic simulation of one volume, driving the real core state
//! machines (`SegmentLog` per segment, `VolumeDurability` for the writer)
//! over a network that drops, duplicates, delays and reorders messages,
//! from one seed. Safety is checked after every event; once the faults stop,
//! the volume must converge (liveness). `SIM_SEED=n cargo test -p sim`
//! replays one seed.
//!
//! The writer ships each new record to the six segments of its protection
//! group and, on a timer, resends to each segment whatever that segment has
//! not acknowledged yet: that is how holes are filled until storage gossip
//! exists.

use std::collections::BTreeMap;

use bytes::Bytes;
use redo_core::quorum::{VolumeDurability, SEGMENTS_PER_PG, WRITE_QUORUM};
use redo_core::record::{RecordHeader, ValidRecords};
use redo_core::segment_log::{SegmentLog, SegmentLogConfig};
use redo_core::{Epoch, Lsn, NodeId, PageId, PgId, SegmentId};

/// SplitMix64: a tiny seeded generator, so the simulator needs no
/// dependency and a seed means the same run on every platform.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub drop_percent: u64,
    pub duplicate_percent: u64,
    /// Extra delay, in ticks, drawn uniformly: reorders messages.
    pub delay_ticks_max: u64,
}

pub const NO_FAULTS: Faults = Faults { drop_percent: 0, duplicate_percent: 0, delay_ticks_max: 0 };

#[derive(Clone)]
enum Msg {
    Append { pg: usize, seg: usize, records: ValidRecords },
    Ack { pg: usize, seg: usize, scl: Lsn },
}

struct Record {
    lsn: Lsn,
    bytes: Vec<u8>,
}

pub struct Sim {
    rng: Rng,
    now: u64,
    /// In flight, by delivery time (then sequence, for determinism).
    net: BTreeMap<(u64, u64), Msg>,
    sent: u64,
    segments: Vec<Vec<SegmentLog>>,
    /// Each PG's records, in LSN order, as the writer built them.
    log: Vec<Vec<Record>>,
    /// Highest SCL each segment acknowledged, as the writer knows it.
    acked: Vec<[Lsn; SEGMENTS_PER_PG]>,
    durability: VolumeDurability,
    next_lsn: u64,
    last_cpl: Lsn,
    pub faults: Faults,
}

const RESEND_EVERY_TICKS: u64 = 20;
const RESEND_RECORDS_MAX: usize = 64;

impl Sim {
    pub fn new(seed: u64, pgs: usize) -> Self {
        let config = SegmentLogConfig { hot_bytes_max: 1 << 30, cache_bytes_max: 4096, flush_bytes_max: 2048 };
        let segments = (0..pgs)
            .map(|pg| {
                (0..SEGMENTS_PER_PG)
                    .map(|n| SegmentLog::new(SegmentId { pg: PgId(pg as u32), node: NodeId(n as u32) }, config.clone()))
                    .collect()
            })
            .collect();
        Sim {
            rng: Rng::new(seed),
            now: 0,
            net: BTreeMap::new(),
            sent: 0,
            segments,
            log: (0..pgs).map(|_| Vec::new()).collect(),
            acked: vec![[Lsn::ZERO; SEGMENTS_PER_PG]; pgs],
            durability: VolumeDurability::new(pgs, Lsn::ZERO),
            next_lsn: 1,
            last_cpl: Lsn::ZERO,
            faults: NO_FAULTS,
        }
    }

    pub fn vdl(&self) -> Lsn {
        self.durability.vdl()
    }

    pub fn last_cpl(&self) -> Lsn {
        self.last_cpl
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

    /// One mini-transaction of 1 to 3 records over random protection groups.
    pub fn write_mtr(&mut self) {
        let n = 1 + self.rng.below(3);
        let mut new: Vec<(usize, usize)> = Vec::new();
        for i in 0..n {
            let pg = self.rng.below(self.log.len() as u64) as usize;
            let lsn = Lsn(self.next_lsn);
            self.next_lsn += 1;
            let prev = self.log[pg].last().map_or(Lsn::ZERO, |r| r.lsn);
            let cpl = i == n - 1;
            let mut bytes = Vec::new();
            RecordHeader { lsn, prev_lsn_in_segment: prev, prev_lsn_for_page: Lsn::ZERO, page: PageId(pg as u64), cpl }
                .encode(&lsn.0.to_le_bytes(), &mut bytes);
            self.log[pg].push(Record { lsn, bytes });
            self.durability.allocate(PgId(pg as u32), lsn, cpl);
            if cpl {
                self.last_cpl = lsn;
            }
            new.push((pg, self.log[pg].len() - 1));
        }
        for (pg, i) in new {
            let records = self.batch(pg, i, i + 1);
            for seg in 0..SEGMENTS_PER_PG {
                self.send(Msg::Append { pg, seg, records: records.clone() });
            }
        }
    }

    fn batch(&self, pg: usize, from: usize, to: usize) -> ValidRecords {
        let bytes: Vec<u8> = self.log[pg][from..to].iter().flat_map(|r| r.bytes.iter().copied()).collect();
        ValidRecords::validate(Bytes::from(bytes), 0).expect("the writer builds valid records").expect("non-empty")
    }

    /// Resends to every segment what it has not acknowledged.
    fn resend(&mut self) {
        for pg in 0..self.log.len() {
            for seg in 0..SEGMENTS_PER_PG {
                let from = self.log[pg].partition_point(|r| r.lsn <= self.acked[pg][seg]);
                let to = self.log[pg].len().min(from + RESEND_RECORDS_MAX);
                if from < to {
                    let records = self.batch(pg, from, to);
                    self.send(Msg::Append { pg, seg, records });
                }
            }
        }
    }

    /// Advances one tick: deliver what is due, flush a little, resend on the timer.
    pub fn tick(&mut self) {
        self.now += 1;
        while let Some(entry) = self.net.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            match entry.remove() {
                Msg::Append { pg, seg, records } => {
                    let out = self.segments[pg][seg].handle_append(Epoch(1), &records).expect("a correct writer is never refused");
                    self.send(Msg::Ack { pg, seg, scl: out.position.scl });
                }
                Msg::Ack { pg, seg, scl } => {
                    self.acked[pg][seg] = self.acked[pg][seg].max(scl);
                    self.durability.handle_ack(PgId(pg as u32), seg, scl);
                }
            }
            self.check_safety();
        }
        for segs in &mut self.segments {
            for s in segs.iter_mut() {
                let mut out = Vec::new();
                if let Some(job) = s.poll_flush(&mut out) {
                    s.handle_flushed(job);
                }
            }
        }
        if self.now % RESEND_EVERY_TICKS == 0 {
            self.resend();
        }
    }

    /// Safety: every durable LSN is held by a write quorum of its PG; VDL is
    /// a consistency point within VCL; every segment's own invariants hold.
    pub fn check_safety(&self) {
        let vdl = self.durability.vdl();
        assert!(vdl <= self.durability.vcl());
        for (pg, segs) in self.segments.iter().enumerate() {
            let last_durable = self.log[pg].iter().take_while(|r| r.lsn <= vdl).last();
            if let Some(r) = last_durable {
                let holders = segs.iter().filter(|s| s.scl() >= r.lsn).count();
                assert!(holders >= WRITE_QUORUM, "{} of pg{pg} is durable (vdl {vdl}) but only {holders} segments hold it", r.lsn);
            }
            segs.iter().for_each(|s| s.check_invariants());
        }
    }

    /// Liveness: with the network quiet, every segment holds its whole PG log.
    pub fn converged(&self) -> bool {
        self.durability.vdl() == self.last_cpl
            && self.segments.iter().zip(&self.log).all(|(segs, log)| {
                let last = log.last().map_or(Lsn::ZERO, |r| r.lsn);
                segs.iter().all(|s| s.scl() == last && s.flushed_lsn() == last)
            })
    }
}

/// Runs one seed: a faulty phase with writes, then a quiet phase that must converge.
pub fn run(seed: u64, faults: Faults) {
    let mut sim = Sim::new(seed, 3);
    sim.faults = faults;
    for _ in 0..400 {
        if sim.rng.chance(60) {
            sim.write_mtr();
        }
        sim.tick();
    }
    sim.faults = NO_FAULTS;
    for _ in 0..2000 {
        sim.tick();
        if sim.converged() {
            return;
        }
    }
    panic!("seed {seed}: no convergence: vdl {} of last cpl {}", sim.vdl(), sim.last_cpl());
}
