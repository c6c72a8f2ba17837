//! storaged configuration: command-line flags, optionally preceded by a TOML
//! file whose keys are the same long option names (`node_id` or `node-id`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

/// When a segment acknowledges an append.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum AckMode {
    /// After insertion into the in-memory segment log (Aurora's default; flush is asynchronous).
    Memory,
    /// Only once a durable (O_DSYNC) write of the segment file covers the batch.
    Disk,
}

#[derive(Args, Debug, Clone)]
pub struct Config {
    /// This node's id: recorded in every segment file header it writes.
    #[arg(long)]
    pub node_id: u32,
    /// Availability zone label, reported in logs and metrics.
    #[arg(long, default_value = "az1")]
    pub az: String,
    /// UDP address for QUIC (writers, replicas, tools).
    #[arg(long, default_value = "127.0.0.1:7100")]
    pub listen: SocketAddr,
    /// Directory for segment files (`pg-N.seg`), page images (`pg-N.pages`) and epochs (`pg-N.epoch`); created if missing.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Certificate directory made by `storaged certs`: ca.pem and NAME.pem/NAME.key.
    #[arg(long)]
    pub certs: PathBuf,
    /// Certificate name in --certs to present [default: storaged-<node-id>].
    #[arg(long)]
    pub cert_name: Option<String>,
    /// Protection groups this node hosts a segment of (comma-separated ids).
    #[arg(long, value_delimiter = ',', required = true)]
    pub pgs: Vec<u32>,
    /// When to acknowledge an append.
    #[arg(long, value_enum, default_value = "memory")]
    pub ack: AckMode,
    /// Per segment: unflushed bytes past which appends wait (see --busy-wait-ms), then get Busy.
    /// Records held above a hole have a limit of the same size of their own.
    #[arg(long, default_value = "256MiB", value_parser = borealis_net::parse_bytes)]
    pub hot_log_bytes_max: u64,
    /// Per segment: flushed records kept in memory to serve pulls without disk reads.
    #[arg(long, default_value = "64MiB", value_parser = borealis_net::parse_bytes)]
    pub cache_bytes_max: u64,
    /// Largest frame (one append batch) accepted; larger ones get TooLarge and the stream is closed.
    #[arg(long, default_value = "8MiB", value_parser = borealis_net::parse_bytes)]
    pub frame_bytes_max: u64,
    /// Node-wide: bytes of request frames being read or handled at once, over
    /// every stream of every client; a stream waits for room before reading a frame.
    #[arg(long, default_value = "512MiB", value_parser = borealis_net::parse_bytes)]
    pub inflight_bytes_max: u64,
    /// Largest single write of a flush.
    #[arg(long, default_value = "2MiB", value_parser = borealis_net::parse_bytes)]
    pub flush_bytes_max: u64,
    /// Test and fault-injection knob, not for production: every flush job waits this long
    /// before it writes, simulating a slow disk (records stay in memory only, unflushed,
    /// that much longer; a SIGTERM waits for the delayed flushes). 0 = no delay.
    #[arg(long, default_value_t = 0)]
    pub flush_delay_ms: u64,
    /// With `--ack memory`: after a flush starts, the next one waits this long (µs) so that it
    /// carries every record that arrived meanwhile. Nothing waits for these flushes but the
    /// flushed LSN (replicas' and the writer's release of retained records), and each one costs
    /// the node a wake-up and a durable write: one per append at a few thousand appends/s. The
    /// first flush after a quiet spell starts at once, and a segment with 256 KiB unflushed does
    /// not wait. Ignored with `--ack disk`, whose acks wait for the flush. 0 = flush as soon as
    /// the previous flush is done.
    #[arg(long, default_value_t = 5000)]
    pub flush_interval_us: u64,
    /// Segment files grow by fallocate in steps of this size.
    #[arg(long, default_value = "64MiB", value_parser = borealis_net::parse_bytes)]
    pub segment_prealloc_bytes: u64,
    /// How long an append waits for the flush to free hot-log memory before answering Busy.
    #[arg(long, default_value_t = 1000)]
    pub busy_wait_ms: u64,
    /// Per segment: how often the coalescer images the pages whose records pin the log (see
    /// --log-retain-bytes) and storage reclaims disk: the log below the GC horizon that page
    /// images cover, and page images no reader needs (the page file is rewritten once they
    /// outweigh the live ones twice over).
    #[arg(long, default_value_t = 1000)]
    pub coalesce_interval_ms: u64,
    /// A page is imaged (to `pg-N.pages`) as soon as its records since its last image outweigh
    /// that image twice, or outnumber this, once they are flushed: image bytes stay below half
    /// the record bytes, and a page read applies at most this many records.
    #[arg(long, default_value_t = 64)]
    pub coalesce_records: usize,
    /// Per segment: log kept on disk above what storage could reclaim, so that a peer that fell
    /// behind by up to this much catches up from this segment's log. A segment's disk use is
    /// about this plus its live page images (at most three times them). Pages whose oldest
    /// record lies three quarters this far back from the log's end are imaged, so that the log
    /// can go: the larger this is, the fewer images are written.
    #[arg(long, default_value = "128MiB", value_parser = borealis_net::parse_bytes)]
    pub log_retain_bytes: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// The volume layout (the TOML file writerd reads): with it, each segment learns its
    /// PG's peers and fills its holes by gossip with them. Without it, no gossip.
    #[arg(long)]
    pub volume: Option<PathBuf>,
    /// With --volume: how often each segment asks its peers their SCL and pulls what it
    /// misses (sooner while it holds records above a hole); 0 disables gossip. A new or
    /// wiped segment first learns its epoch from its peers this way, and grants nothing
    /// until then.
    #[arg(long, default_value_t = 100)]
    pub gossip_interval_ms: u64,
    /// Threads running network work; 1 runs everything on one thread (best when many
    /// daemons share few cores, as in a local cluster). Disk writes are submitted from them too,
    /// through io_uring.
    #[arg(long, default_value_t = 2)]
    pub worker_threads: usize,
}

impl Config {
    /// Whether segments know their peers: with gossip, a segment with no epoch state joins through them.
    pub fn gossips(&self) -> bool {
        self.volume.is_some() && self.gossip_interval_ms > 0
    }

    pub fn cert_name(&self) -> String {
        self.cert_name.clone().unwrap_or_else(|| format!("storaged-{}", self.node_id))
    }

    pub fn validate(&self) -> Result<()> {
        if self.frame_bytes_max > self.hot_log_bytes_max {
            bail!("--frame-bytes-max ({}) must not exceed --hot-log-bytes-max ({})", self.frame_bytes_max, self.hot_log_bytes_max);
        }
        if self.inflight_bytes_max < self.frame_bytes_max {
            bail!("--inflight-bytes-max ({}) must be at least --frame-bytes-max ({})", self.inflight_bytes_max, self.frame_bytes_max);
        }
        if self.frame_bytes_max > redo_core::wire::FRAME_BYTES_MAX as u64 {
            bail!("--frame-bytes-max is at most {}", redo_core::wire::FRAME_BYTES_MAX);
        }
        if self.coalesce_interval_ms == 0 || self.coalesce_records == 0 {
            bail!("--coalesce-interval-ms and --coalesce-records must be at least 1");
        }
        if self.segment_prealloc_bytes < 1 << 20 || !self.segment_prealloc_bytes.is_multiple_of(4096) {
            bail!("--segment-prealloc-bytes must be a multiple of 4096 and at least 1MiB");
        }
        Ok(())
    }
}

/// Turns a TOML config file into `--key value` arguments, to be placed
/// before the command line's own so that flags override the file.
pub fn toml_args(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))?;
    let table: toml::Table = text.parse().with_context(|| format!("parse config {}", path.display()))?;
    let mut args = Vec::new();
    for (key, value) in table {
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    other => bail!("config {}: {key}: unsupported list item {other}", path.display()),
                })
                .collect::<Result<Vec<_>>>()?
                .join(","),
            other => bail!("config {}: {key}: unsupported value {other}", path.display()),
        };
        args.push(format!("--{}", key.replace('_', "-")));
        args.push(value);
    }
    Ok(args)
}
