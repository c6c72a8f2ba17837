//! writerd options.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Result};
use borealis_net::parse_bytes;
use clap::Args;
use redo_core::api::TXN_OPS_MAX;

#[derive(Args, Debug, Clone)]
pub struct Config {
    /// Volume layout (TOML): storage nodes, protection groups and their six segments, writer address.
    #[arg(long)]
    pub volume: PathBuf,
    /// UDP address of the client API (QUIC) [default: the volume file's `writer`].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Certificate directory (ca.pem and NAME.pem/NAME.key, made by `storaged certs`).
    #[arg(long)]
    pub certs: PathBuf,
    /// Certificate name in --certs to present to storage nodes and clients.
    #[arg(long, default_value = "writerd")]
    pub cert_name: String,
    /// TCP address for `GET /metrics` (Prometheus text); off when absent.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tuning: Tuning,
    /// Memory for page images, for reads and for sizing writes. Least recently used pages
    /// leave first, once VDL covers their last write (a miss is read from storage with
    /// GetPage@LSN); a page larger than this is not kept.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub cache_bytes_max: u64,
    /// Largest client request frame; larger ones are refused with TooLarge.
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    pub request_bytes_max: u64,
    /// Threads running network work; 1 runs everything on one thread (best when many
    /// daemons share few cores, as in a local cluster).
    #[arg(long, default_value_t = 2)]
    pub worker_threads: usize,
    /// How long to wait at start for a read quorum of every protection group to answer
    /// (writes then wait for a write quorum to hold the claim).
    #[arg(long, default_value_t = 30_000)]
    pub start_timeout_ms: u64,
}

/// How the engine batches, retains and limits its log: shared by writerd and a
/// replica that may be promoted to writer.
#[derive(Args, Debug, Clone)]
pub struct Tuning {
    /// LSN allocation limit: no LSN beyond VDL + LAL is allocated; new transactions wait instead.
    #[arg(long, default_value_t = 1_000_000)]
    pub lal: u64,
    /// The allocation limit in bytes: while records not yet on a write quorum take more than
    /// this, new transactions wait (LAL counts records, which may be large).
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub unquorumed_bytes_max: u64,
    /// A protection group's queued records are sent as one frame once they reach this size...
    #[arg(long, default_value = "1MiB", value_parser = parse_bytes)]
    pub batch_bytes_max: u64,
    /// ...or as soon as fewer than this many of its frames await a write quorum (1 = classic group commit).
    #[arg(long, default_value_t = 2)]
    pub batch_inflight_max: usize,
    /// Per protection group, bytes of frames kept for segments that are behind (down or slow) after a
    /// write quorum holds them; beyond it such a segment must be repaired from its peers.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub retain_bytes_max: u64,
    /// GC horizon: how long a new writer waits for its replicas to report their read points
    /// before the horizon moves, and how long a replica that went away still holds it.
    #[arg(long, default_value_t = redo_core::gc::READER_GRACE.as_millis() as u64)]
    pub gc_reader_grace_ms: u64,
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        self.tuning.validate()
    }
}

impl Tuning {
    pub fn validate(&self) -> Result<()> {
        if self.lal < TXN_OPS_MAX as u64 {
            bail!("--lal {} is below the largest transaction ({TXN_OPS_MAX} records)", self.lal);
        }
        if self.batch_inflight_max == 0 {
            bail!("--batch-inflight-max must be at least 1");
        }
        // A frame holds up to this much plus one record: it must fit a storage node's frame limit.
        if self.batch_bytes_max < 4096 || self.batch_bytes_max > 4 << 20 {
            bail!("--batch-bytes-max must be between 4KiB and 4MiB (storage nodes take frames of 8MiB by default)");
        }
        Ok(())
    }
}
