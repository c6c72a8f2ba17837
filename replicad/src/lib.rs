//! replicad: a read replica of a Borealis volume. It starts from what the
//! storage nodes report (no writer needed), follows the writer's VDL and the
//! segments' positions, pulls the redo log from storage, applies whole
//! transactions up to VDL to the pages it caches (`redo_core::replica`), and
//! serves reads at that read point.

mod api;
pub mod config;
mod follow;
mod latency;
mod metrics;
mod promote;
mod replica;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use borealis_net::storage::NodeLink;
use redo_core::replica::{ReplicaConfig, ReplicaCore};
use redo_core::PgId;
use tokio::signal::unix::{signal, SignalKind};

pub use config::Config;

use crate::replica::Replica;

/// How often a replica that has no read point yet says why it is not serving.
const NOT_READY_REPORT: Duration = Duration::from_secs(5);

/// Serves until SIGTERM/SIGINT (`Ok(0)`), or, once promoted, until a newer writer fences it (`Ok(writerd::EXIT_FENCED)`).
pub fn run(config: Config) -> Result<i32> {
    config.validate()?;
    let volume = borealis_net::load_volume(&config.volume)?;
    let writer = volume.writer.parse().with_context(|| format!("volume writer address {:?}", volume.writer))?;
    let identity = borealis_net::TlsIdentity::load(&config.certs, &config.cert_name)
        .with_context(|| format!("load certificates for {} from {}", config.cert_name, config.certs.display()))?;
    let runtime = borealis_net::runtime(config.worker_threads)?;
    runtime.block_on(async {
        let endpoint = borealis_net::client_endpoint(&identity)?;
        let links = NodeLink::for_volume(&volume, &endpoint)?;
        // Who may be the writer: the volume's writer address, then the peers (one promoted since).
        let candidates: Vec<SocketAddr> = std::iter::once(writer).chain(config.peers.iter().copied()).collect();
        let (start, positions, progress) = follow::start(&volume, &links, &endpoint, &candidates, Duration::from_millis(config.start_timeout_ms)).await?;
        let from = if progress.is_some() { "the writer" } else { "storage" };
        tracing::info!(durable = %start.durable, from, "learned the volume's position");
        let core_config = ReplicaConfig { buffer_bytes_max: config.buffer_bytes_max as usize, cache_bytes_max: config.cache_bytes_max as usize };
        let replica = Arc::new(Replica::new(ReplicaCore::new(volume.clone(), core_config, start)));
        for (segment, position) in positions {
            replica.on_position(segment, position);
        }
        if let Some(p) = progress {
            // The writer followed from the start: a cut tail of an older writer is not taken for the log.
            replica.on_progress(&p);
        }
        let mut replica_tasks = Vec::new();
        for pg in 0..volume.pg_count() as u32 {
            replica_tasks.push(tokio::spawn(follow::puller(replica.clone(), volume.clone(), links.clone(), PgId(pg))).abort_handle());
        }
        // Each PG's records streamed from one segment (replicas of a volume start on different
        // ones), every segment's position with its flushes.
        let first = config.listen.port() as usize;
        for pg in 0..volume.pg_count() as u32 {
            replica_tasks.push(tokio::spawn(follow::log_stream(replica.clone(), volume.clone(), links.clone(), PgId(pg), first)).abort_handle());
        }
        for link in &links {
            replica_tasks.push(tokio::spawn(follow::storage_feed(replica.clone(), volume.clone(), link.clone())).abort_handle());
        }
        let promoter = Arc::new(promote::Promoter::new(
            replica.clone(),
            volume.clone(),
            links.clone(),
            config.tuning.clone(),
            config.cache_bytes_max as usize,
            config.request_bytes_max as usize,
            Duration::from_millis(config.promote_timeout_ms),
            config.priority,
        ));
        *promoter.replica_tasks.lock().expect("tasks lock") = replica_tasks;
        tokio::spawn(follow::writer_feed(promoter.clone(), endpoint.clone(), candidates.clone()));
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
                _ = term.recv() => return Ok(0),
                _ = int.recv() => return Ok(0),
                _ = waiting.tick() => {
                    let (vdl, pending) = { let c = replica.lock(); (c.vdl(), c.pending_bytes()) };
                    tracing::warn!(%vdl, pending_bytes = pending, %writer, "no read point yet: waiting for the writer's VDL and the records up to a commit");
                }
            }
        }
        let server = borealis_net::server_endpoint(&identity, config.listen)?;
        if config.failover_silence_ms > 0 {
            let silence = Duration::from_millis(config.failover_silence_ms);
            tokio::spawn(promote::watch(promoter.clone(), endpoint.clone(), config.listen, candidates, silence));
        }
        let api = Arc::new(api::Api {
            replica: replica.clone(),
            promoter: promoter.clone(),
            links,
            writer: volume.writer.clone(),
            read_wait: Duration::from_millis(config.read_wait_ms),
            request_bytes_max: config.request_bytes_max as usize,
        });
        tokio::spawn(borealis_net::serve_streams(server.clone(), move |send, recv| borealis_net::api_server::serve_stream(api.clone(), send, recv)));
        let read_point = replica.progress.borrow().vdl;
        tracing::info!(listen = %server.local_addr()?, %read_point, "replicad ready");
        let fenced = async {
            promoter.promoted.notified().await;
            let api = promoter.writer.get().expect("notified once promoted");
            let _ = api.writer.fenced.subscribe().wait_for(|f| f.is_some()).await;
        };
        let code = tokio::select! {
            _ = term.recv() => 0,
            _ = int.recv() => 0,
            _ = fenced => writerd::EXIT_FENCED,
        };
        server.close(0u32.into(), b"replica stopping");
        let _ = tokio::time::timeout(Duration::from_secs(1), server.wait_idle()).await;
        Ok(code)
    })
}

/// `replicad promote`.
#[derive(clap::Args, Debug)]
pub struct PromoteArgs {
    /// Client-API address of the replica to promote.
    #[arg(long)]
    pub replica: std::net::SocketAddr,
    /// Certificate directory of the cluster (ca.pem, NAME.pem, NAME.key).
    #[arg(long)]
    pub certs: std::path::PathBuf,
    /// Certificate to present.
    #[arg(long, default_value = "client")]
    pub cert_name: String,
}

/// Sends `Promote` to a replica and prints the outcome as JSON.
pub fn promote_cmd(args: PromoteArgs) -> Result<i32> {
    let identity = borealis_net::TlsIdentity::load(&args.certs, &args.cert_name)
        .with_context(|| format!("load certificates for {} from {}", args.cert_name, args.certs.display()))?;
    borealis_net::runtime(1)?.block_on(async {
        let endpoint = borealis_net::client_endpoint(&identity)?;
        let client = borealis_net::api::ApiClient::connect(&endpoint, args.replica).await.with_context(|| format!("connect to {}", args.replica))?;
        match client.call(&redo_core::api::Request::Promote).await.context("promote")? {
            redo_core::api::Response::Promoted(p) => {
                println!(
                    "{{\"epoch\":{},\"vdl\":{},\"claim_us\":{},\"offer_us\":{},\"decide_us\":{},\"truncate_us\":{},\"total_us\":{}}}",
                    p.epoch.0, p.vdl.0, p.claim_us, p.offer_us, p.decide_us, p.truncate_us, p.total_us
                );
                Ok(0)
            }
            other => anyhow::bail!("{} did not promote: {other:?}", args.replica),
        }
    })
}
