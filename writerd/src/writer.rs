//! The writer's shared state: the core engine behind one mutex, the commit
//! waiters ordered by LSN, and the wake-ups of each segment's sender.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redo_core::api::Progress;
use redo_core::quorum::SEGMENTS_PER_PG;
use redo_core::wire::{SegmentPosition, Truncation};
use redo_core::writer::WriterCore;
use redo_core::{Lsn, PgId};
use tokio::sync::{oneshot, watch, Notify};

use crate::metrics::Metrics;

pub struct Inner {
    pub core: WriterCore,
    /// Callers waiting for VDL to reach an LSN.
    waiters: BTreeMap<Lsn, Vec<oneshot::Sender<()>>>,
}

pub struct Writer {
    inner: Mutex<Inner>,
    /// Per PG, per segment: there may be new frames to send.
    wake: Vec<[Notify; SEGMENTS_PER_PG]>,
    /// VDL and every PG's PGCL, pushed to replicas (`Follow`) as VDL advances.
    pub progress: watch::Sender<Progress>,
    /// The truncations of earlier recoveries, sent with every claim of a segment.
    pub history: Vec<Truncation>,
    /// Set once a storage node reports a newer epoch: this writer is deposed.
    pub fenced: watch::Sender<Option<String>>,
    /// `WriterCore::writable`: false after a takeover from a read quorum until
    /// a write quorum of every PG holds this writer's claim.
    pub writable: watch::Sender<bool>,
    /// Set (under the state lock) when the writer stops: no transaction is admitted after it.
    pub stopping: AtomicBool,
    pub metrics: Metrics,
    /// The origin of the core's clock (`now`).
    started: Instant,
}

/// Why a wait for VDL ended without reaching it.
#[derive(Debug)]
pub struct Deposed(pub String);

/// `WriterCore::short_of_claims` for a log line or an error: "pg0: 3 of 6, ...".
pub fn claims_held(short: &[(PgId, usize)]) -> String {
    short.iter().map(|(pg, n)| format!("{pg}: {n} of {SEGMENTS_PER_PG}")).collect::<Vec<_>>().join(", ")
}

impl Writer {
    pub fn new(core: WriterCore, history: Vec<Truncation>) -> Arc<Writer> {
        let pgs = core.volume().pg_count();
        let metrics = Metrics::new(core.volume());
        let progress = watch::channel(Self::progress_of(&core)).0;
        let writable = watch::channel(core.writable()).0;
        Arc::new(Writer {
            progress,
            inner: Mutex::new(Inner { core, waiters: BTreeMap::new() }),
            wake: (0..pgs).map(|_| std::array::from_fn(|_| Notify::new())).collect(),
            history,
            fenced: watch::channel(None).0,
            writable,
            stopping: AtomicBool::new(false),
            metrics,
            started: Instant::now(),
        })
    }

    /// Time for the core's machines (the GC horizon's grace periods).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// A `Follow` stream reads at `read_point` (`ApiService::on_read_point`).
    pub fn on_read_point(&self, reader: u64, read_point: Lsn) {
        self.lock().core.on_read_point(reader, read_point);
    }

    pub fn on_reader_gone(&self, reader: u64) {
        let now = self.now();
        self.lock().core.on_reader_gone(reader, now);
    }

    fn progress_of(core: &WriterCore) -> Progress {
        Progress {
            epoch: core.epoch(),
            truncated_above: core.truncated_above(),
            vdl: core.vdl(),
            pgcl: (0..core.volume().pg_count() as u32).map(|pg| core.pgcl(PgId(pg))).collect(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("writer state lock")
    }

    pub fn wake_pg(&self, pg: PgId) {
        self.wake[pg.0 as usize].iter().for_each(Notify::notify_one);
    }

    pub fn wake_segment(&self, pg: PgId, segment: usize) -> &Notify {
        &self.wake[pg.0 as usize][segment]
    }

    /// Folds a segment's position in (from an ack, or from `Status` at the start of a
    /// session, which may be lower after a restart); releases every waiter that VDL now covers.
    /// Segment `segment` of `pg` granted this writer's claim (its session's).
    pub fn on_claimed(&self, pg: PgId, segment: usize) {
        if self.lock().core.on_claimed(pg, segment) {
            tracing::info!(%pg, segment, "a write quorum of every PG holds this writer's claim: writes open");
            self.writable.send_replace(true);
        }
    }

    pub fn on_position(&self, segment: usize, position: SegmentPosition, from_status: bool) {
        let pg = position.pg;
        let (ready, sealable, progress) = {
            let mut g = self.lock();
            if from_status {
                g.core.reset_segment(pg, segment, position.scl);
            }
            let pgcl = g.core.pgcl(pg);
            let vdl_advanced = g.core.handle_ack(pg, segment, position.scl, position.flushed_lsn);
            // Fewer frames await quorum: the PG's queued records may be sealed now.
            let sealable = g.core.pgcl(pg) > pgcl;
            let (ready, progress) = if vdl_advanced {
                let vdl = g.core.vdl();
                let later = g.waiters.split_off(&Lsn(vdl.0 + 1));
                (std::mem::replace(&mut g.waiters, later), Some(Self::progress_of(&g.core)))
            } else {
                (BTreeMap::new(), None)
            };
            (ready, sealable, progress)
        };
        if let Some(p) = progress {
            // Under concurrent acks an older value may arrive late: keep the newest.
            self.progress.send_if_modified(|cur| {
                let newer = p.vdl > cur.vdl;
                if newer {
                    *cur = p;
                }
                newer
            });
        }
        if sealable {
            self.wake_pg(pg);
        }
        for w in ready.into_values().flatten() {
            let _ = w.send(());
        }
    }

    /// Registers a wait for VDL >= `lsn` under the caller's lock; `None` if it already is.
    pub fn wait_in(inner: &mut Inner, lsn: Lsn) -> Option<oneshot::Receiver<()>> {
        if inner.core.vdl() >= lsn {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        inner.waiters.entry(lsn).or_default().push(tx);
        Some(rx)
    }

    /// Waits until VDL >= `lsn`.
    pub async fn wait_vdl(&self, lsn: Lsn) -> Result<(), Deposed> {
        let rx = {
            let mut g = self.lock();
            // Checked under the lock: `fence` clears waiters under it.
            if self.is_fenced().is_some() {
                return Err(self.deposed());
            }
            Self::wait_in(&mut g, lsn)
        };
        match rx {
            None => Ok(()),
            Some(rx) => rx.await.map_err(|_| self.deposed()),
        }
    }

    fn deposed(&self) -> Deposed {
        Deposed(self.fenced.borrow().clone().unwrap_or_else(|| "writer stopped".into()))
    }

    /// A newer writer holds the volume: fail every waiter; nothing more commits here.
    pub fn fence(&self, why: String) {
        if self.fenced.send_replace(Some(why.clone())).is_none() {
            tracing::error!(%why, "fenced by a newer epoch: stepping down");
        }
        self.lock().waiters.clear();
    }

    pub fn is_fenced(&self) -> Option<String> {
        self.fenced.borrow().clone()
    }
}
