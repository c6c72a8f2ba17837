//! The replica's shared state: the engine behind one mutex, the read point
//! published to readers and `Follow` streams, and the wake-ups of the pullers.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use redo_core::api::Progress;
use redo_core::replica::{ReplicaCore, WriterHeard};
use redo_core::wire::SegmentPosition;
use redo_core::{Epoch, Lsn};
use tokio::sync::{watch, Notify};

use crate::latency::Latency;
use crate::metrics::Metrics;

/// VDLs remembered for `replicad_apply_delay_us` while the read point lags (beyond, unmeasured).
const HEARD_MAX: usize = 65536;

pub struct Replica {
    core: Mutex<ReplicaCore>,
    /// The read point (applied VDL); `Follow` streams and read-your-writes waits watch it.
    pub progress: watch::Sender<Progress>,
    /// Set once the replica has a read point.
    pub ready: watch::Sender<bool>,
    /// Per PG: a segment or the writer reported progress; there may be records to pull.
    kick: Vec<Notify>,
    /// Per PG: the buffer has room again, or a new writer ended the log stream.
    stream_wake: Vec<Notify>,
    /// Per PG, how fast each segment answers.
    pub latency: Vec<Latency>,
    /// VDLs heard from the writer and when, until the read point reaches them.
    heard: Mutex<VecDeque<(Lsn, Instant)>>,
    /// The writer followed: its epoch, the highest VDL it reported, and when it was last
    /// heard (its heartbeat); `None` before any writer was heard.
    writer: Mutex<Option<Heard>>,
    pub metrics: Metrics,
}

#[derive(Clone, Copy, Debug)]
pub struct Heard {
    pub epoch: Epoch,
    pub vdl: Lsn,
    pub at: Instant,
}

impl Replica {
    pub fn new(core: ReplicaCore) -> Replica {
        let pgs = core.volume().pg_count();
        let read_point = core.read_point();
        Replica {
            progress: watch::channel(Progress { epoch: Epoch(0), truncated_above: Lsn::ZERO, vdl: read_point.unwrap_or(Lsn::ZERO), pgcl: Vec::new() }).0,
            ready: watch::channel(read_point.is_some()).0,
            core: Mutex::new(core),
            kick: (0..pgs).map(|_| Notify::new()).collect(),
            stream_wake: (0..pgs).map(|_| Notify::new()).collect(),
            latency: (0..pgs).map(|_| Latency::default()).collect(),
            heard: Mutex::new(VecDeque::new()),
            writer: Mutex::new(None),
            metrics: Metrics::default(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, ReplicaCore> {
        self.core.lock().expect("replica state lock")
    }

    /// Publishes a read point the engine moved to.
    pub fn publish(&self, read_point: Option<Lsn>) {
        let Some(vdl) = read_point else { return };
        {
            let mut heard = self.heard.lock().expect("heard lock");
            while heard.front().is_some_and(|&(l, _)| l <= vdl) {
                let (_, at) = heard.pop_front().expect("front exists");
                self.metrics.apply_delay_us.record(at.elapsed().as_micros() as u64);
            }
        }
        self.progress.send_if_modified(|p| {
            let newer = vdl > p.vdl;
            if newer {
                p.vdl = vdl;
            }
            newer
        });
        self.ready.send_if_modified(|r| !std::mem::replace(r, true));
    }

    pub fn kick(&self, pg: usize) -> &Notify {
        &self.kick[pg]
    }

    pub fn stream_wake(&self, pg: usize) -> &Notify {
        &self.stream_wake[pg]
    }

    /// Room was freed (or the epoch moved): every puller and stream looks again.
    pub fn kick_all(&self) {
        self.kick.iter().chain(&self.stream_wake).for_each(Notify::notify_one);
    }

    /// Wakes the pullers of the PGs that some segment holds records of that the replica
    /// lacks: the log streams bring the rest without them.
    pub fn kick_behind(&self) {
        let core = self.lock();
        for (pg, kick) in self.kick.iter().enumerate() {
            if core.behind(redo_core::PgId(pg as u32)) {
                kick.notify_one();
            }
        }
    }

    /// The writer that was last heard from.
    pub fn writer(&self) -> Option<Heard> {
        *self.writer.lock().expect("writer lock")
    }

    /// The writer's progress (or heartbeat) arrived.
    pub fn on_progress(&self, p: &Progress) {
        let before = self.writer();
        // A heartbeat repeating what was heard: nothing for the engine or the pullers.
        let repeat = before.is_some_and(|b| b.epoch == p.epoch && b.vdl >= p.vdl);
        let heard = (!repeat).then(|| self.lock().on_writer(p.epoch, p.vdl, &p.pgcl));
        if heard == Some(WriterHeard::Stale) {
            tracing::debug!(epoch = %p.epoch, "ignoring the progress of a writer older than the one followed");
            return;
        }
        {
            let mut w = self.writer.lock().expect("writer lock");
            let vdl = w.filter(|w| w.epoch == p.epoch).map_or(p.vdl, |w| w.vdl.max(p.vdl));
            *w = Some(Heard { epoch: p.epoch, vdl, at: Instant::now() });
        }
        let Some(WriterHeard::Progress { new_writer, read_point }) = heard else { return };
        if new_writer {
            tracing::info!(epoch = %p.epoch, truncated_above = %p.truncated_above, "a new writer took over: dropped what was pulled above the VDL heard");
        }
        let switched = before.is_none_or(|b| b.epoch != p.epoch);
        if switched {
            self.progress.send_modify(|cur| (cur.epoch, cur.truncated_above) = (p.epoch, p.truncated_above));
        }
        let mut heard = self.heard.lock().expect("heard lock");
        if heard.back().is_none_or(|&(l, _)| p.vdl > l) && heard.len() < HEARD_MAX {
            heard.push_back((p.vdl, Instant::now()));
        }
        drop(heard);
        self.publish(read_point);
        if switched {
            self.kick_all();
        } else {
            self.kick_behind();
        }
    }

    /// A segment's SCL or flushed LSN moved: its PG may have records to pull, and a
    /// flush may have freed room for every PG.
    pub fn on_position(&self, segment: usize, position: SegmentPosition) {
        let (freed, behind) = {
            let mut core = self.lock();
            (core.on_position(segment, position), core.behind(position.pg))
        };
        if freed {
            self.kick_all();
        } else if behind {
            self.kick[position.pg.0 as usize].notify_one();
        }
    }
}
