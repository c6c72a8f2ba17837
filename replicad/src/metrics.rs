//! replicad metrics, rendered in the Prometheus text format at /metrics.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use borealis_net::metrics::{header, Distribution};
use redo_core::replica::ReplicaCore;

#[derive(Default)]
pub struct Metrics {
    pub reads: AtomicU64,
    pub read_timeouts: AtomicU64,
    pub page_fetches: AtomicU64,
    pub pulls: AtomicU64,
    pub pull_bytes: AtomicU64,
    pub pull_failovers: AtomicU64,
    /// Log streams opened, and record bytes they brought.
    pub streams: AtomicU64,
    pub streamed_bytes: AtomicU64,
    pub requests_refused: AtomicU64,
    pub promotions_auto: AtomicU64,
    pub promotions_lost: AtomicU64,
    pub promotions_failed: AtomicU64,
    /// How long the promotion that made this replica the writer took (0: not promoted).
    pub promoted_total_us: AtomicU64,
    /// From hearing a VDL from the writer to the read point reaching it.
    pub apply_delay_us: Distribution,
    /// Pull request to reply, successful pulls.
    pub pull_latency_us: Distribution,
}

impl Metrics {
    /// Renders the counters and the engine's gauges (read under its lock by the caller).
    pub fn render(&self, core: &ReplicaCore) -> String {
        let mut out = String::new();
        let counters = [
            ("replicad_reads_total", "Gets answered or refused.", &self.reads),
            ("replicad_read_timeouts_total", "Read-your-writes gets whose min_lsn was not applied in time.", &self.read_timeouts),
            ("replicad_page_fetches_total", "Pages read from storage with GetPage@LSN (cache misses).", &self.page_fetches),
            ("replicad_pulls_total", "Log pulls answered by storage.", &self.pulls),
            ("replicad_pull_bytes_total", "Redo bytes pulled from storage.", &self.pull_bytes),
            ("replicad_pull_failovers_total", "Pulls retried on another segment after one failed.", &self.pull_failovers),
            ("replicad_streams_total", "Log streams opened on a storage node (one per PG at a time; again after a failure or a new writer).", &self.streams),
            ("replicad_streamed_bytes_total", "Redo bytes pushed by storage on log streams.", &self.streamed_bytes),
            ("replicad_requests_refused_total", "Client requests refused (malformed, too large, invalid, writes).", &self.requests_refused),
            ("replicad_promotions_auto_total", "Automatic promotions started (writer silent, this replica the best).", &self.promotions_auto),
            ("replicad_promotions_lost_total", "Promotions given up because another candidate claimed the volume.", &self.promotions_lost),
            ("replicad_promotions_failed_total", "Promotions that failed (storage unreachable); the replica stays one.", &self.promotions_failed),
            ("replicad_promoted_us", "How long the promotion that made this replica the writer took (0: not promoted).", &self.promoted_total_us),
        ];
        for (name, help, v) in counters {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", v.load(Relaxed));
        }
        self.apply_delay_us.render(&mut out, "replicad_apply_delay_us", "From hearing a VDL from the writer to the read point reaching it (µs).");
        self.pull_latency_us.render(&mut out, "replicad_pull_latency_us", "Log pull request to reply (µs).");
        let read_point = core.read_point().unwrap_or_default().0;
        let (throttled, episodes) = core.throttled();
        let engine_counters = [
            ("replicad_backpressure_total", "Times pulling stopped because the buffer was full.", episodes),
            ("replicad_pages_dropped_total", "Cached pages dropped because a record did not link to them.", core.pages_dropped()),
        ];
        for (name, help, v) in engine_counters {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {v}");
        }
        let gauges = [
            ("replicad_applied_vdl", "Read point: every committed record at or below it is applied.", read_point),
            ("replicad_writer_vdl", "Newest VDL heard (from the writer, or from storage at start).", core.vdl().0),
            ("replicad_lag_lsn", "LSNs between the newest VDL heard and the read point.", core.vdl().0.saturating_sub(read_point)),
            ("replicad_flushed_lsn", "Volume flushed LSN: every record at or below it is on disk on a write quorum.", core.flushed_lsn().0),
            ("replicad_retained_bytes", "Applied records kept until a write quorum flushes them.", core.retained_bytes() as u64),
            ("replicad_pending_bytes", "Pulled records not yet applied (beyond VDL, or awaiting another PG).", core.pending_bytes() as u64),
            ("replicad_buffer_bytes_max", "Limit on pending plus retained bytes.", core.buffer_bytes_max() as u64),
            ("replicad_throttled", "1 while pulling is stopped for a full buffer.", throttled as u64),
            ("replicad_cached_pages", "Page images in memory.", core.cached().1 as u64),
            ("replicad_cache_bytes", "Memory the cached page images take (at most --cache-bytes-max).", core.cached().0 as u64),
        ];
        for (name, help, v) in gauges {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
        out
    }
}
