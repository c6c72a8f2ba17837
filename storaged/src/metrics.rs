//! storaged metrics, rendered in the Prometheus text format at /metrics.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use borealis_net::metrics::{header, Distribution};

pub struct Metrics {
    pub ingest_records: AtomicU64,
    pub ingest_bytes: AtomicU64,
    pub appends_busy: AtomicU64,
    pub requests_refused: AtomicU64,
    /// Truncations performed for a new writer, and the records they discarded.
    pub truncations: AtomicU64,
    pub truncated_records: AtomicU64,
    pub flushed_bytes: AtomicU64,
    pub get_page_requests: AtomicU64,
    pub pages_coalesced: AtomicU64,
    pub page_image_bytes: AtomicU64,
    pub get_page_latency_us: Distribution,
    pub ack_latency_us: Distribution,
    pub flush_latency_us: Distribution,
    pub append_batch_records: Distribution,
    pub flush_batch_bytes: Distribution,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ingest_records: AtomicU64::new(0),
            ingest_bytes: AtomicU64::new(0),
            appends_busy: AtomicU64::new(0),
            requests_refused: AtomicU64::new(0),
            truncations: AtomicU64::new(0),
            truncated_records: AtomicU64::new(0),
            flushed_bytes: AtomicU64::new(0),
            get_page_requests: AtomicU64::new(0),
            pages_coalesced: AtomicU64::new(0),
            page_image_bytes: AtomicU64::new(0),
            get_page_latency_us: Distribution::default(),
            ack_latency_us: Distribution::default(),
            flush_latency_us: Distribution::default(),
            append_batch_records: Distribution::default(),
            flush_batch_bytes: Distribution::default(),
        }
    }
}

/// One segment's gauges at scrape time.
pub struct SegmentGauges {
    pub pg: u32,
    pub scl: u64,
    pub flushed_lsn: u64,
    pub hot_bytes: u64,
    pub pending_records: u64,
    pub page_index_records: u64,
    pub disk_failed: bool,
    pub epoch_generation: u64,
}

impl Metrics {
    pub fn render(&self, node_id: u32, segments: &[SegmentGauges]) -> String {
        let mut out = String::new();
        let counters = [
            ("storaged_ingest_records_total", "Records newly inserted into segment logs.", &self.ingest_records),
            ("storaged_ingest_bytes_total", "Record bytes newly inserted into segment logs.", &self.ingest_bytes),
            ("storaged_appends_busy_total", "Appends answered Busy because the hot log was full.", &self.appends_busy),
            ("storaged_requests_refused_total", "Requests answered with an error other than Busy.", &self.requests_refused),
            ("storaged_truncations_total", "Truncations of a segment's log above a new writer's point (repeats not counted).", &self.truncations),
            ("storaged_truncated_records_total", "Records discarded by truncations.", &self.truncated_records),
            ("storaged_flushed_bytes_total", "Record bytes made durable by fdatasync.", &self.flushed_bytes),
            ("storaged_get_page_requests_total", "GetPage@LSN requests for a hosted segment.", &self.get_page_requests),
            ("storaged_pages_coalesced_total", "Page images materialised and written to page files.", &self.pages_coalesced),
            ("storaged_page_image_bytes_total", "Bytes of page-file entries made durable by fsync.", &self.page_image_bytes),
        ];
        for (name, help, c) in counters {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name}{{node=\"{node_id}\"}} {}", c.load(Relaxed));
        }
        self.ack_latency_us.render(&mut out, "storaged_ack_latency_us", "Append frame received to ack sent, microseconds.");
        self.flush_latency_us.render(&mut out, "storaged_flush_latency_us", "Flush write submitted to fdatasync completed, microseconds.");
        self.append_batch_records.render(&mut out, "storaged_append_batch_records", "Records per append batch.");
        self.flush_batch_bytes.render(&mut out, "storaged_flush_batch_bytes", "Record bytes per flush (one write + fdatasync).");
        self.get_page_latency_us.render(&mut out, "storaged_get_page_latency_us", "GetPage request received to page materialised, microseconds.");
        let gauges: [(&str, &str, fn(&SegmentGauges) -> u64); 7] = [
            ("storaged_segment_scl", "Segment complete LSN.", |s| s.scl),
            ("storaged_segment_flushed_lsn", "Highest LSN durable on disk.", |s| s.flushed_lsn),
            ("storaged_segment_hot_bytes", "Unflushed bytes in the segment's memory log.", |s| s.hot_bytes),
            ("storaged_segment_pending_records", "Records held above a hole, waiting for it to fill.", |s| s.pending_records),
            ("storaged_segment_page_index_records", "Records in the per-page index (bounded by the coalescer).", |s| s.page_index_records),
            ("storaged_segment_disk_failed", "1 if the segment stopped accepting appends after a disk error.", |s| s.disk_failed as u64),
            ("storaged_segment_epoch_generation", "Generation (high 32 bits) of the epoch the segment granted last.", |s| s.epoch_generation),
        ];
        for (name, help, get) in gauges {
            header(&mut out, name, "gauge", help);
            for s in segments {
                let _ = writeln!(out, "{name}{{node=\"{node_id}\",pg=\"{}\"}} {}", s.pg, get(s));
            }
        }
        out
    }
}
