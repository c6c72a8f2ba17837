//! storaged: one Borealis storage node. Hosts one segment per configured
//! protection group; ingests redo over QUIC into each segment's memory log,
//! acks, flushes with io_uring, serves pulls, pushes position changes,
//! serves GetPage@LSN and coalesces page images in the background. With a
//! volume file, each segment fills its holes by gossip with its PG's peers.

mod coalescer;
pub mod config;
pub mod flush_bench;
mod flusher;
mod gc;
mod gossip;
mod metrics;
mod node;
mod pages;
mod server;
mod store;
mod wake;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

/// Lowers the calling thread to nice 10: background work (coalescer rounds) then takes
/// about a tenth of a CPU from a thread on the commit path when they compete, and all it
/// wants when they do not.
fn background_priority() {
    // SAFETY: setpriority with plain integers; on Linux `who` 0 is the calling thread.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
}

pub use config::{AckMode, Config};

/// How long shutdown waits for clients to receive their last replies.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Recovers the node, serves until SIGTERM/SIGINT, then flushes every
/// complete record to disk and returns.
pub fn run(config: Config) -> Result<()> {
    config.validate()?;
    // A file-size limit must surface as EFBIG on our write, not kill the daemon.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let identity = borealis_net::TlsIdentity::load(&config.certs, &config.cert_name())
        .with_context(|| format!("load certificates for {} from {}", config.cert_name(), config.certs.display()))?;
    let volume = match &config.volume {
        Some(path) => {
            let v = borealis_net::load_volume(path)?;
            gossip::check_volume(&v, redo_core::NodeId(config.node_id), &config.pgs).with_context(|| format!("volume file {}", path.display()))?;
            Some(v)
        }
        None => None,
    };
    let (node, files) = node::Node::open(config.clone(), node::Pages::Indexed)?;
    let targets = flusher::targets(&node, files);
    // With ack = disk every ack waits for its flush: no interval between flushes.
    let flush_interval = match config.ack {
        AckMode::Memory => Duration::from_micros(config.flush_interval_us),
        AckMode::Disk => Duration::ZERO,
    };
    let runtime = borealis_net::runtime(config.worker_threads)?;
    runtime.block_on(async {
        let flusher = flusher::Flusher::spawn_with(targets, node.wake.clone(), Duration::from_millis(config.flush_delay_ms), flush_interval)?;
        let endpoint = borealis_net::server_endpoint(&identity, config.listen)?;
        if let Some(addr) = config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind metrics on {addr}"))?;
            let n = node.clone();
            tokio::spawn(borealis_net::metrics::serve_metrics(listener, std::sync::Arc::new(move || n.render_metrics())));
        }
        tracing::info!(
            node = %node.node_id, az = %config.az, listen = %endpoint.local_addr()?, ack = ?config.ack,
            pgs = ?config.pgs, "storaged ready"
        );
        let n = node.clone();
        tokio::spawn(borealis_net::serve_streams(endpoint.clone(), move |send, recv| server::serve_stream(n.clone(), send, recv)));
        for seg in node.segments.values() {
            tokio::spawn(coalescer::run(node.clone(), seg.clone()));
        }
        match &volume {
            Some(volume) if config.gossip_interval_ms > 0 => {
                // Peers accept cluster members: this node's certificate serves as a client one too.
                let peers = borealis_net::client_endpoint(&identity).context("client endpoint for gossip")?;
                gossip::spawn(&node, volume, &peers, Duration::from_millis(config.gossip_interval_ms))?;
                tracing::info!(interval_ms = config.gossip_interval_ms, "gossip with PG peers started");
            }
            Some(_) => tracing::info!("gossip disabled (--gossip-interval-ms 0)"),
            None => tracing::info!("no --volume: segments do not know their peers; no gossip"),
        }
        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: flushing and shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: flushing and shutting down"),
        }
        node.shutting_down.store(true, Ordering::Release);
        for seg in node.segments.values() {
            drop(seg.log.lock().expect("segment lock")); // appends in progress have landed
        }
        flusher.stop().await.context("flusher failed: records acked from memory were not all flushed")?;
        for seg in node.segments.values() {
            let log = seg.log.lock().expect("segment lock");
            tracing::info!(segment = %seg.id, scl = %log.scl(), flushed_lsn = %log.flushed_lsn(), "segment closed");
        }
        endpoint.close(0u32.into(), b"shutting down");
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, endpoint.wait_idle()).await;
        Ok(())
    })
}
