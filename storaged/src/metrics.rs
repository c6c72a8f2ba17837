//! storaged metrics, rendered in the Prometheus text format at /metrics.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

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
    /// Record bytes pushed on log streams to readers (replicas).
    pub streamed_bytes: AtomicU64,
    pub get_page_requests: AtomicU64,
    pub pages_coalesced: AtomicU64,
    pub page_image_bytes: AtomicU64,
    /// GC: log bytes whose disk blocks were freed, page-file compactions and the bytes they copied, checkpoints written.
    pub log_reclaimed_bytes: AtomicU64,
    pub page_compactions: AtomicU64,
    pub page_compacted_bytes: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Gossip: rounds (each asks every peer its position), pull requests sent to peers, records newly inserted from their
    /// replies, record bytes received in them, and failed exchanges.
    pub gossip_rounds: AtomicU64,
    pub gossip_pulls: AtomicU64,
    pub gossip_records: AtomicU64,
    pub gossip_bytes: AtomicU64,
    pub gossip_failures: AtomicU64,
    /// Per PG id: what gossip last learned about the segment's peers.
    pub gossip_segments: Mutex<BTreeMap<u32, Arc<GossipGauges>>>,
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
            streamed_bytes: AtomicU64::new(0),
            get_page_requests: AtomicU64::new(0),
            pages_coalesced: AtomicU64::new(0),
            page_image_bytes: AtomicU64::new(0),
            log_reclaimed_bytes: AtomicU64::new(0),
            page_compactions: AtomicU64::new(0),
            page_compacted_bytes: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            gossip_rounds: AtomicU64::new(0),
            gossip_pulls: AtomicU64::new(0),
            gossip_records: AtomicU64::new(0),
            gossip_bytes: AtomicU64::new(0),
            gossip_failures: AtomicU64::new(0),
            gossip_segments: Mutex::new(BTreeMap::new()),
            get_page_latency_us: Distribution::default(),
            ack_latency_us: Distribution::default(),
            flush_latency_us: Distribution::default(),
            append_batch_records: Distribution::default(),
            flush_batch_bytes: Distribution::default(),
        }
    }
}

/// One segment's gossip state, written by its gossip task.
#[derive(Default)]
pub struct GossipGauges {
    /// Highest SCL among the peers at the segment's epoch (and newest
    /// truncation) at the last round; 0 before the first answer.
    pub peer_scl: AtomicU64,
    /// The LSN gossip is filling up to: a peer held it at least a round ago
    /// (or the segment holds records above a hole); 0 when nothing is missing.
    pub missing_through: AtomicU64,
}

/// A per-segment gauge: metric name, help text and how to read it.
type Gauge = (&'static str, &'static str, fn(&SegmentGauges) -> u64);

/// One segment's gauges at scrape time.
pub struct SegmentGauges {
    pub pg: u32,
    pub scl: u64,
    pub flushed_lsn: u64,
    pub hot_bytes: u64,
    pub pending_records: u64,
    pub page_index_records: u64,
    pub disk_failed: bool,
    pub joining: bool,
    pub gc_horizon: u64,
    pub epoch_generation: u64,
    /// The log up to this LSN is reclaimed (`LogStart::prev`).
    pub reclaimed_lsn: u64,
    pub live_image_bytes: u64,
    pub page_file_bytes: u64,
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
            ("storaged_flushed_bytes_total", "Record bytes made durable by flushes.", &self.flushed_bytes),
            ("storaged_streamed_bytes_total", "Record bytes pushed on log streams to readers (replicas).", &self.streamed_bytes),
            ("storaged_get_page_requests_total", "GetPage@LSN requests for a hosted segment.", &self.get_page_requests),
            ("storaged_pages_coalesced_total", "Page images materialised and written to page files.", &self.pages_coalesced),
            ("storaged_page_image_bytes_total", "Bytes of page-file entries made durable by fsync.", &self.page_image_bytes),
            ("storaged_log_reclaimed_bytes_total", "Segment-file bytes below the log's start whose disk blocks were freed.", &self.log_reclaimed_bytes),
            ("storaged_page_compactions_total", "Page files rewritten with their live images only.", &self.page_compactions),
            ("storaged_page_compacted_bytes_total", "Bytes of live images copied by page-file compactions.", &self.page_compacted_bytes),
            ("storaged_checkpoints_total", "Segment checkpoints written (image index, log start, GC horizon).", &self.checkpoints),
            ("storaged_gossip_rounds_total", "Gossip rounds: each segment asking its PG peers their position.", &self.gossip_rounds),
            ("storaged_gossip_pulls_total", "Pull requests sent to PG peers to fill holes.", &self.gossip_pulls),
            ("storaged_gossip_records_total", "Records pulled from PG peers that were new to the segment.", &self.gossip_records),
            ("storaged_gossip_bytes_total", "Record bytes received from PG peers by gossip pulls.", &self.gossip_bytes),
            ("storaged_gossip_failures_total", "Gossip exchanges with a PG peer that failed (unreachable, refused, bad reply).", &self.gossip_failures),
        ];
        for (name, help, c) in counters {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name}{{node=\"{node_id}\"}} {}", c.load(Relaxed));
        }
        self.ack_latency_us.render(&mut out, "storaged_ack_latency_us", "Append frame received to ack sent, microseconds.");
        self.flush_latency_us.render(&mut out, "storaged_flush_latency_us", "Flush write submitted to durable, microseconds.");
        self.append_batch_records.render(&mut out, "storaged_append_batch_records", "Records per append batch.");
        self.flush_batch_bytes.render(&mut out, "storaged_flush_batch_bytes", "Record bytes per flush (one durable write).");
        self.get_page_latency_us.render(&mut out, "storaged_get_page_latency_us", "GetPage request received to page materialised, microseconds.");
        let gauges: [Gauge; 12] = [
            ("storaged_segment_scl", "Segment complete LSN.", |s| s.scl),
            ("storaged_segment_flushed_lsn", "Highest LSN durable on disk.", |s| s.flushed_lsn),
            ("storaged_segment_hot_bytes", "Unflushed bytes in the segment's memory log.", |s| s.hot_bytes),
            ("storaged_segment_pending_records", "Records held above a hole, waiting for it to fill.", |s| s.pending_records),
            ("storaged_segment_page_index_records", "Records in the per-page index (bounded by the coalescer).", |s| s.page_index_records),
            ("storaged_segment_disk_failed", "1 if the segment stopped accepting appends after a disk error.", |s| s.disk_failed as u64),
            ("storaged_segment_gc_horizon", "The GC horizon the writer sent last: page reads below it are refused.", |s| s.gc_horizon),
            ("storaged_segment_joining", "1 while the segment, new or wiped, learns its epoch state from its peers and grants nothing.", |s| s.joining as u64),
            ("storaged_segment_epoch_generation", "Generation (high 32 bits) of the epoch the segment granted last.", |s| s.epoch_generation),
            ("storaged_segment_reclaimed_lsn", "The segment's log up to this LSN is reclaimed: pulls that need it are refused.", |s| s.reclaimed_lsn),
            ("storaged_segment_live_image_bytes", "Bytes of the page images that reads may still need (the rest of the page file is dead).", |s| {
                s.live_image_bytes
            }),
            ("storaged_segment_page_file_bytes", "Size of the segment's page file.", |s| s.page_file_bytes),
        ];
        for (name, help, get) in gauges {
            header(&mut out, name, "gauge", help);
            for s in segments {
                let _ = writeln!(out, "{name}{{node=\"{node_id}\",pg=\"{}\"}} {}", s.pg, get(s));
            }
        }
        let gossip = self.gossip_segments.lock().expect("gossip gauges lock");
        let gossip_of = |pg: u32, get: fn(&GossipGauges) -> u64| gossip.get(&pg).map_or(0, |g| get(g));
        let name = "storaged_segment_holes";
        header(
            &mut out,
            name,
            "gauge",
            "1 while the segment knows it misses records: it holds records above a hole, or gossip found a peer at its epoch \
             whose SCL has been above the segment's for a whole round; else 0.",
        );
        for s in segments {
            let missing = gossip_of(s.pg, |g| g.missing_through.load(Relaxed));
            let _ = writeln!(out, "{name}{{node=\"{node_id}\",pg=\"{}\"}} {}", s.pg, (s.pending_records > 0 || missing > s.scl) as u64);
        }
        let name = "storaged_segment_peer_scl";
        header(&mut out, name, "gauge", "Highest SCL a PG peer at the segment's epoch reported at the last gossip round (0: none yet, or no gossip).");
        for s in segments {
            let _ = writeln!(out, "{name}{{node=\"{node_id}\",pg=\"{}\"}} {}", s.pg, gossip_of(s.pg, |g| g.peer_scl.load(Relaxed)));
        }
        out
    }
}
