//! A storage node's shared state: its segments, each a core `SegmentLog`
//! behind a mutex plus a watch channel that publishes SCL / flushed LSN, and
//! its page file.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use redo_core::page_index::PageIndex;
use redo_core::segment_log::{FlushJob, LogStart, SegmentLog, SegmentLogConfig};
use redo_core::wire::SegmentPosition;
use redo_core::{Lsn, NodeId, PgId, SegmentId};
use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::{Metrics, SegmentGauges};
use crate::pages::PageFile;
use crate::store;
use crate::wake::Wake;

pub struct Segment {
    pub id: SegmentId,
    pub log: Mutex<SegmentLog>,
    /// Latest position, sent on every change (each append moves the SCL): what
    /// streams records or every SCL to subscribers watches it.
    pub position: watch::Sender<SegmentPosition>,
    /// Sent when the flushed LSN moves, a flush fails or a truncation ends: what
    /// waits for the disk (acks with `ack = disk`, Busy appends, truncations, the
    /// coalescer, flush subscribers) watches this and is not woken by every append.
    pub flushes: watch::Sender<()>,
    /// Woken while records wait above a hole: gossip looks for them at once.
    pub holes: tokio::sync::Notify,
    /// Buffered descriptor for pulls served from disk.
    pub reader: std::fs::File,
    pub metrics: Arc<Metrics>,
    /// Held by the segment's one running claim (`redo_core::segment_claim`).
    pub claims: tokio::sync::Mutex<()>,
    /// Held shared by whoever reads the segment or page file outside the log
    /// lock (pulls and GetPage from disk, a coalescer round), exclusively by a
    /// truncation while it cuts and re-reads them.
    pub files: tokio::sync::RwLock<()>,
    /// Page images written by the coalescer.
    pub page_file: PageFile,
}

impl Segment {
    fn publish(&self, log: &SegmentLog) {
        let p = log.position();
        let mut flushed = false;
        self.position.send_if_modified(|cur| {
            let old = std::mem::replace(cur, p);
            flushed = old.flushed_lsn != p.flushed_lsn;
            old != p
        });
        if flushed {
            self.flushes.send_replace(());
        }
        if log.pending_records() > 0 {
            self.holes.notify_one();
        }
    }

    /// Wakes every waiter, whatever it watches: a failure or a truncation changed what it waits for.
    pub fn wake_waiters(&self) {
        self.position.send_modify(|_| {});
        self.flushes.send_replace(());
    }

    /// Flusher: `job` is durable.
    pub fn flushed(&self, job: FlushJob) {
        let mut log = self.log.lock().expect("segment lock");
        log.handle_flushed(job);
        self.publish(&log);
    }

    /// Flusher: `job` failed; the segment refuses appends from now on.
    pub fn fail_flush(&self, job: FlushJob, why: String) {
        let mut log = self.log.lock().expect("segment lock");
        log.handle_flush_failed(job, why);
        // Wake waiters so that they see the failure.
        self.wake_waiters();
    }

    /// The flusher is gone: the segment refuses appends from now on.
    pub fn lose_disk(&self, why: String) {
        self.log.lock().expect("segment lock").handle_disk_lost(why);
        self.wake_waiters();
    }

    /// Runs `f` on the log under its lock and publishes any position change.
    pub fn with_log<T>(&self, f: impl FnOnce(&mut SegmentLog) -> T) -> T {
        let mut log = self.log.lock().expect("segment lock");
        let out = f(&mut log);
        self.publish(&log);
        out
    }
}

/// Whether segments keep a page index (for GetPage@LSN and the coalescer).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    Indexed,
    /// bench-flush: the flush path alone, without the index's per-record work and memory.
    LogOnly,
}

pub struct Node {
    pub config: Config,
    pub node_id: NodeId,
    pub segments: HashMap<PgId, Arc<Segment>>,
    pub wake: Arc<Wake>,
    pub metrics: Arc<Metrics>,
    pub shutting_down: AtomicBool,
    /// Permits are bytes of request frames in flight (`--inflight-bytes-max`).
    pub frame_budget: tokio::sync::Semaphore,
}

/// A segment's file as recovered, for the flusher to append to.
pub struct SegmentFile {
    pub seg: Arc<Segment>,
    /// The file opened for O_DIRECT writes.
    pub direct: std::fs::File,
    /// Bytes fallocated.
    pub allocated: u64,
    /// The partial last block of the log.
    pub tail: Vec<u8>,
    /// Where the recovered log (and `tail`) ends.
    pub file_end: u64,
}

impl Node {
    /// Recovers every hosted segment from disk and returns the node plus the
    /// segment files, for the flusher (`flusher::targets`).
    pub fn open(config: Config, pages: Pages) -> Result<(Arc<Node>, Vec<SegmentFile>)> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| anyhow::anyhow!("create data dir {}: {e}", config.data_dir.display()))?;
        let node_id = NodeId(config.node_id);
        let metrics = Arc::new(Metrics::default());
        let log_config = SegmentLogConfig {
            hot_bytes_max: config.hot_log_bytes_max as usize,
            cache_bytes_max: config.cache_bytes_max as usize,
            flush_bytes_max: config.flush_bytes_max as usize,
        };
        let mut segments = HashMap::new();
        let mut files = Vec::new();
        let write_bytes_max = config.flush_bytes_max.max(config.frame_bytes_max);
        for &pg in &config.pgs {
            let id = SegmentId { pg: PgId(pg), node: node_id };
            let dir = &config.data_dir;
            let checkpoint = match store::segment_path(dir, id.pg).exists() {
                true => store::read_checkpoint(dir, id.pg)?,
                false => store::forget_checkpoint(dir, id.pg).map(|()| None)?,
            };
            let (start, horizon) = checkpoint.as_ref().map_or((LogStart::FILE, Lsn::ZERO), |c| (c.log_start, c.horizon));
            // Images first, so that the log scan indexes only the records they do not cover.
            let mut index = PageIndex::new(config.coalesce_records);
            let page_file = PageFile::open(dir, id.pg, checkpoint.as_ref(), &mut index)?;
            index.retire(horizon);
            let indexed = pages == Pages::Indexed;
            let open = |index: Option<&mut PageIndex>| store::open_segment(dir, id, start, config.segment_prealloc_bytes, write_bytes_max, index);
            let mut r = open(indexed.then_some(&mut index))?;
            if indexed && index.newest_image() > r.last_lsn {
                if checkpoint.is_some() {
                    bail!("{id}: the page file holds images up to {} past the end of the log at {}, and the log below the checkpoint is reclaimed: the segment cannot be rebuilt here; move its files aside so that it refills from its peers", index.newest_image(), r.last_lsn);
                }
                // Not this log's images (e.g. the segment file was moved aside to be rebuilt).
                tracing::warn!(segment = %id, image_lsn = %index.newest_image(), scl = %r.last_lsn,
                    "page file holds images past the end of the log: discarding it; the coalescer rebuilds images from the log");
                page_file.truncate(0)?;
                index = PageIndex::new(config.coalesce_records);
                r = open(Some(&mut index))?;
            }
            let epoch = r.epoch.clone().unwrap_or_default();
            let mut log = SegmentLog::recovered(id, log_config.clone(), epoch.epoch, r.last_lsn, r.file_end, r.index).with_truncations(&epoch.truncations);
            log.note_horizon(horizon);
            if r.epoch.is_none() && r.last_lsn == Lsn::ZERO && config.gossips() {
                // New or wiped: it learns its epoch state from its peers first (`gossip`).
                log = log.awaiting_join();
            }
            if indexed {
                log = log.with_page_index(index);
            }
            let (position, _) = watch::channel(log.position());
            let seg = Arc::new(Segment {
                id,
                log: Mutex::new(log),
                position,
                flushes: watch::channel(()).0,
                holes: tokio::sync::Notify::new(),
                reader: r.reader,
                metrics: metrics.clone(),
                claims: tokio::sync::Mutex::new(()),
                files: tokio::sync::RwLock::new(()),
                page_file,
            });
            files.push(SegmentFile { seg: seg.clone(), direct: r.direct, allocated: r.allocated, tail: r.tail, file_end: r.file_end });
            segments.insert(PgId(pg), seg);
        }
        let frame_budget = tokio::sync::Semaphore::new(config.inflight_bytes_max as usize);
        let node = Node { config, node_id, segments, wake: Arc::default(), metrics, shutting_down: AtomicBool::new(false), frame_budget };
        Ok((Arc::new(node), files))
    }

    pub fn data_dir(&self) -> &PathBuf {
        &self.config.data_dir
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub fn render_metrics(&self) -> String {
        let mut gauges: Vec<SegmentGauges> = self
            .segments
            .values()
            .map(|s| {
                let log = s.log.lock().expect("segment lock");
                SegmentGauges {
                    pg: s.id.pg.0,
                    scl: log.scl().0,
                    flushed_lsn: log.flushed_lsn().0,
                    hot_bytes: log.hot_bytes() as u64,
                    pending_records: log.pending_records() as u64,
                    page_index_records: log.page_index().map_or(0, |p| p.records() as u64),
                    disk_failed: log.disk_failed().is_some(),
                    joining: log.is_joining(),
                    gc_horizon: log.horizon().0,
                    epoch_generation: log.epoch().generation(),
                    reclaimed_lsn: log.log_start().prev.0,
                    live_image_bytes: log.page_index().map_or(0, |p| p.images().map(|(_, at)| at.len as u64).sum()),
                    page_file_bytes: s.page_file.end(),
                }
            })
            .collect();
        gauges.sort_by_key(|g| g.pg);
        self.metrics.render(self.node_id.0, &gauges)
    }
}
