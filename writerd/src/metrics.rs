//! writerd metrics, rendered in the Prometheus text format at /metrics.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use borealis_net::metrics::{header, Distribution};
use redo_core::quorum::SEGMENTS_PER_PG;
use redo_core::volume::Volume;
use redo_core::PgId;

pub struct Metrics {
    pub commits: AtomicU64,
    pub commit_errors: AtomicU64,
    pub reads: AtomicU64,
    pub page_fetches: AtomicU64,
    pub lal_stalls: AtomicU64,
    pub requests_refused: AtomicU64,
    pub commit_latency_us: Distribution,
    /// Per PG, per segment: frame sent to its ack received.
    pub ack_latency_us: Vec<[Distribution; SEGMENTS_PER_PG]>,
    /// Per PG, per segment: 1 while a session (connection + append stream) is up.
    pub segment_up: Vec<[AtomicU64; SEGMENTS_PER_PG]>,
    /// Node id of each PG's segments, for labels.
    nodes: Vec<Vec<u32>>,
}

/// Engine gauges read under the state lock at scrape time.
pub struct Gauges {
    pub vcl: u64,
    pub vdl: u64,
    pub last_allocated: u64,
    pub inflight_bytes: u64,
    pub gc_horizon: u64,
    pub gc_readers: u64,
    pub cache_bytes: u64,
    pub cached_pages: u64,
    pub writable: u64,
    pub pgcl: Vec<u64>,
    /// Per PG, segments at the newest position any of them acknowledged.
    pub segments_current: Vec<u64>,
}

impl Metrics {
    pub fn new(volume: &Volume) -> Self {
        let pgs = volume.pg_count();
        Metrics {
            commits: AtomicU64::new(0),
            commit_errors: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            page_fetches: AtomicU64::new(0),
            lal_stalls: AtomicU64::new(0),
            requests_refused: AtomicU64::new(0),
            commit_latency_us: Distribution::default(),
            ack_latency_us: (0..pgs).map(|_| Default::default()).collect(),
            segment_up: (0..pgs).map(|_| Default::default()).collect(),
            nodes: (0..pgs).map(|pg| volume.segments(PgId(pg as u32)).map(|n| n.id).collect()).collect(),
        }
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let counters = [
            ("writerd_commits_total", "Transactions acknowledged to clients.", &self.commits),
            ("writerd_commit_errors_total", "Transactions answered with an error (never acknowledged).", &self.commit_errors),
            ("writerd_reads_total", "Gets answered.", &self.reads),
            ("writerd_page_fetches_total", "Page-cache misses served by GetPage@LSN.", &self.page_fetches),
            ("writerd_lal_stalls_total", "Transactions that waited because allocation would pass VDL + LAL.", &self.lal_stalls),
            ("writerd_requests_refused_total", "Client requests refused (malformed, too large, invalid, unavailable).", &self.requests_refused),
        ];
        for (name, help, c) in counters {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", c.load(Relaxed));
        }
        let gauges = [
            ("writerd_vcl", "Volume complete LSN.", g.vcl),
            ("writerd_vdl", "Volume durable LSN: commits at or below it are acknowledged.", g.vdl),
            ("writerd_last_allocated_lsn", "Highest LSN allocated.", g.last_allocated),
            ("writerd_inflight_bytes", "Record bytes queued or retained for segments that do not hold them yet.", g.inflight_bytes),
            ("writerd_gc_horizon", "GC horizon sent to storage: the lowest read point in use (never above VDL or the volume flushed LSN).", g.gc_horizon),
            ("writerd_gc_readers", "Readers (replica feeds) whose read points bound the GC horizon.", g.gc_readers),
            ("writerd_cache_bytes", "Memory the cached page images take (bounded by --cache-bytes-max once VDL covers them).", g.cache_bytes),
            ("writerd_cached_pages", "Page images in memory.", g.cached_pages),
            (
                "writerd_writable",
                "1 once a write quorum of every PG holds this writer's claim; 0 after a takeover from a read quorum (reads served, writes wait).",
                g.writable,
            ),
        ];
        for (name, help, v) in gauges {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
        header(&mut out, "writerd_pgcl", "gauge", "Protection-group complete LSN.");
        for (pg, v) in g.pgcl.iter().enumerate() {
            let _ = writeln!(out, "writerd_pgcl{{pg=\"{pg}\"}} {v}");
        }
        let cur = "writerd_pg_segments_current";
        header(&mut out, cur, "gauge", "Segments of the PG at the newest position any of them acknowledged; below 4, its commits wait.");
        for (pg, v) in g.segments_current.iter().enumerate() {
            let _ = writeln!(out, "{cur}{{pg=\"{pg}\"}} {v}");
        }
        self.commit_latency_us.render(&mut out, "writerd_commit_latency_us", "Transaction received to acknowledged, microseconds.");
        let ack = "writerd_segment_ack_latency_us";
        header(&mut out, ack, "summary", "Append frame sent to a segment until its ack, microseconds.");
        for (pg, segs) in self.ack_latency_us.iter().enumerate() {
            for (s, d) in segs.iter().enumerate() {
                d.render_samples(&mut out, ack, &format!("pg=\"{pg}\",node=\"{}\"", self.nodes[pg][s]));
            }
        }
        let up = "writerd_segment_up";
        header(&mut out, up, "gauge", "1 while the writer has a live append session with the segment.");
        for (pg, segs) in self.segment_up.iter().enumerate() {
            for (s, v) in segs.iter().enumerate() {
                let _ = writeln!(out, "{up}{{pg=\"{pg}\",node=\"{}\"}} {}", self.nodes[pg][s], v.load(Relaxed));
            }
        }
        out
    }
}
