//! replicad options.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Result};
use borealis_net::parse_bytes;
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct Config {
    /// Volume layout (TOML): storage nodes, protection groups and their six segments, writer address.
    #[arg(long)]
    pub volume: PathBuf,
    /// UDP address of this replica's client API (QUIC).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Certificate directory (ca.pem and NAME.pem/NAME.key, made by `storaged certs`).
    #[arg(long)]
    pub certs: PathBuf,
    /// Certificate name in --certs to present to storage nodes, the writer and clients.
    #[arg(long, default_value = "replicad")]
    pub cert_name: String,
    /// TCP address for `GET /metrics` (Prometheus text); off when absent.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Bytes of redo held in memory: records pulled but not yet applied, plus records applied
    /// but not yet flushed by a write quorum. When full the replica stops pulling and lags
    /// (reads go on at its read point) until a flush frees room. One transaction larger than
    /// this still gets through.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub buffer_bytes_max: u64,
    /// Memory for page images; redo is applied only to these, least recently used pages
    /// leave first, and a miss is read from storage with GetPage@LSN at the read point. A
    /// page larger than this is not kept. Once promoted, the writer's cache gets the same bound.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub cache_bytes_max: u64,
    /// How long a read-your-writes get (min_lsn above the read point) waits before Timeout.
    #[arg(long, default_value_t = 5000)]
    pub read_wait_ms: u64,
    /// Largest client request frame; larger ones are refused with TooLarge.
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    pub request_bytes_max: u64,
    /// Threads running network work; 1 runs everything on one thread (best when many
    /// daemons share few cores, as in a local cluster).
    #[arg(long, default_value_t = 2)]
    pub worker_threads: usize,
    /// How long to wait at start for the writer, or else a write quorum of every protection
    /// group, to say where the volume stands (with the writer, a read quorum of segments serves).
    #[arg(long, default_value_t = 30_000)]
    pub start_timeout_ms: u64,
    /// The other replicas' client-API addresses (comma-separated). They agree which of them
    /// promotes when the writer falls silent, and follow whichever is the writer after; a
    /// starting replica finds the writer among them too.
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<SocketAddr>,
    /// Promotion priority: among replicas with the same read point, the highest promotes.
    #[arg(long, default_value_t = 0)]
    pub priority: u32,
    /// Promote automatically once the writer's heartbeat (every 50 ms) has been silent this
    /// long and this replica is the best one that answers (highest read point, then
    /// priority); 0 never promotes automatically (only `replicad promote`).
    #[arg(long, default_value_t = 300)]
    pub failover_silence_ms: u64,
    /// How long a promotion may take to claim the volume before it gives up.
    #[arg(long, default_value_t = 10_000)]
    pub promote_timeout_ms: u64,
    /// The writer this replica becomes when promoted.
    #[command(flatten)]
    pub tuning: writerd::Tuning,
}

/// Smallest buffer: a few records, so that a test can make a replica fall behind.
const BUFFER_BYTES_MIN: u64 = 4096;

impl Config {
    pub fn validate(&self) -> Result<()> {
        if self.buffer_bytes_max < BUFFER_BYTES_MIN {
            bail!("--buffer-bytes-max must be at least {BUFFER_BYTES_MIN} bytes");
        }
        if self.failover_silence_ms != 0 && self.failover_silence_ms <= 2 * borealis_net::api_server::HEARTBEAT.as_millis() as u64 {
            bail!("--failover-silence-ms must exceed two heartbeats ({:?}), or be 0", 2 * borealis_net::api_server::HEARTBEAT);
        }
        self.tuning.validate()
    }
}
