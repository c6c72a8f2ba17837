//! replicad: a read replica of a Borealis volume. It starts from what the
//! storage nodes report (no writer needed), follows the writer's VDL and the
//! segments' positions, pulls the redo log from storage, applies whole
//! transactions up to VDL to the pages it caches (`redo_core::replica`), and
//! serves reads at that read point.

mod api;
pub mod config;
mod feeds;
mod metrics;
mod state;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use borealis_net::storage::NodeLink;
use redo_core::replica::{ReplicaConfig, ReplicaCore};
use redo_core::PgId;
use tokio::signal::unix::{signal, SignalKind};

pub use config::Config;

use crate::state::Replica;

/// How often a replica that has no read point yet says why it is not serving.
const NOT_READY_REPORT: Duration = Duration::from_secs(5);

/// Serves until SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<()> {
    config.validate()?;
    let volume = borealis_net::load_volume(&config.volume)?;
    let writer = volume.writer.parse().with_context(|| format!("volume writer address {:?}", volume.writer))?;
    let identity = borealis_net::TlsIdentity::load(&config.certs, &config.cert_name)
        .with_context(|| format!("load certificates for {} from {}", config.cert_name, config.certs.display()))?;
    let runtime = borealis_net::runtime(config.worker_threads)?;
    runtime.block_on(async {
        let endpoint = borealis_net::client_endpoint(&identity)?;
        let links = NodeLink::for_volume(&volume, &endpoint)?;
        let (start, positions) = feeds::start(&volume, &links, Duration::from_millis(config.start_timeout_ms)).await?;
        tracing::info!(durable = %start.durable, "learned the volume's position from storage");
        let core_config = ReplicaConfig { buffer_bytes_max: config.buffer_bytes_max as usize, cache_pages_max: config.cache_pages_max };
        let replica = Arc::new(Replica::new(ReplicaCore::new(volume.clone(), core_config, start)));
        for (segment, position) in positions {
            replica.on_position(segment, position);
        }
        for pg in 0..volume.pg_count() as u32 {
            tokio::spawn(feeds::puller(replica.clone(), volume.clone(), links.clone(), PgId(pg)));
        }
        for link in &links {
            tokio::spawn(feeds::storage_feed(replica.clone(), volume.clone(), link.clone()));
        }
        tokio::spawn(feeds::writer_feed(replica.clone(), endpoint.clone(), writer));
        if let Some(addr) = config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind metrics on {addr}"))?;
            let r = replica.clone();
            tokio::spawn(borealis_net::metrics::serve_metrics(listener, Arc::new(move || r.metrics.render(&r.lock()))));
        }

        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let mut ready = replica.ready.subscribe();
        let mut waiting = tokio::time::interval_at(tokio::time::Instant::now() + NOT_READY_REPORT, NOT_READY_REPORT);
        loop {
            tokio::select! {
                _ = ready.wait_for(|r| *r) => break,
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                _ = waiting.tick() => {
                    let (vdl, pending) = { let c = replica.lock(); (c.vdl(), c.pending_bytes()) };
                    tracing::warn!(%vdl, pending_bytes = pending, %writer, "no read point yet: waiting for the writer's VDL and the records up to a commit");
                }
            }
        }
        let server = borealis_net::server_endpoint(&identity, config.listen)?;
        let api = Arc::new(api::Api {
            replica: replica.clone(),
            links,
            writer: volume.writer.clone(),
            read_wait: Duration::from_millis(config.read_wait_ms),
            request_bytes_max: config.request_bytes_max as usize,
        });
        tokio::spawn(borealis_net::serve_streams(server.clone(), move |send, recv| borealis_net::api_server::serve_stream(api.clone(), send, recv)));
        let read_point = replica.progress.borrow().vdl;
        tracing::info!(listen = %server.local_addr()?, %read_point, "replicad ready");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        server.close(0u32.into(), b"replica stopping");
        let _ = tokio::time::timeout(Duration::from_secs(1), server.wait_idle()).await;
        Ok(())
    })
}
