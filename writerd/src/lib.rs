//! writerd: the single writer of a Borealis volume. Runs the paged key-value
//! engine (`redo_core::writer`), ships each protection group's redo to its six
//! segments, acknowledges a transaction once a write quorum of every PG it
//! touched holds it (VDL >= its commit LSN), and serves the client API.

pub mod api_server;
pub mod config;
mod metrics;
pub mod recovery;
mod senders;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use borealis_net::storage::NodeLink;
use redo_core::quorum::{READ_QUORUM, SEGMENTS_PER_PG, WRITE_QUORUM};
use redo_core::volume::Volume;
use redo_core::writer::{WriterConfig, WriterCore};
use redo_core::{Lsn, PgId};
use tokio::signal::unix::{signal, SignalKind};

pub use config::{Config, Tuning};

use crate::metrics::Gauges;
use crate::writer::Writer;

/// How long a stopping writer waits for its allocated records to become durable.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long VDL may stand still with commits waiting before the writer says why.
const STALL_REPORT_AFTER: Duration = Duration::from_secs(1);
/// How often the GC horizon moves (each move rides on the next frames).
const HORIZON_INTERVAL: Duration = Duration::from_millis(100);

/// Exit status of a writer deposed by a newer epoch.
pub const EXIT_FENCED: i32 = 3;

/// Serves until SIGTERM/SIGINT (returns `Ok(0)`) or until a newer writer fences this one (`Ok(EXIT_FENCED)`).
pub fn run(config: Config) -> Result<i32> {
    config.validate()?;
    let volume = borealis_net::load_volume(&config.volume)?;
    let listen = match config.listen {
        Some(a) => a,
        None => volume.writer.parse().with_context(|| format!("volume writer address {:?}", volume.writer))?,
    };
    let identity = borealis_net::TlsIdentity::load(&config.certs, &config.cert_name)
        .with_context(|| format!("load certificates for {} from {}", config.cert_name, config.certs.display()))?;
    let runtime = borealis_net::runtime(config.worker_threads)?;
    runtime.block_on(async {
        let storage_endpoint = borealis_net::client_endpoint(&identity)?;
        let links = borealis_net::storage::NodeLink::for_volume(&volume, &storage_endpoint)?;
        let timeout = Duration::from_millis(config.start_timeout_ms);
        let taken = recovery::take_over(&volume, &links, Lsn::ZERO, recovery::Offer::default(), timeout, READ_QUORUM).await.context("claim the volume")?;
        let epoch = taken.epoch;
        tracing::info!(%epoch, vdl = %taken.recovered.vdl, "claimed the volume");
        let writer = start(&volume, &links, taken, &config.tuning, config.cache_bytes_max as usize);
        if let Some(addr) = config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind metrics on {addr}"))?;
            let w = writer.clone();
            tokio::spawn(borealis_net::metrics::serve_metrics(listener, Arc::new(move || render_metrics(&w))));
        }
        let endpoint = borealis_net::server_endpoint(&identity, listen)?;
        let api = Arc::new(api_server::Api { writer: writer.clone(), volume: volume.clone(), links, request_bytes_max: config.request_bytes_max as usize });
        tokio::spawn(borealis_net::serve_streams(endpoint.clone(), move |send, recv| borealis_net::api_server::serve_stream(api.clone(), send, recv)));
        tracing::info!(listen = %endpoint.local_addr()?, %epoch, pgs = volume.pg_count(), "writerd ready");

        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let mut fenced = writer.fenced.subscribe();
        let code = tokio::select! {
            _ = term.recv() => 0,
            _ = int.recv() => 0,
            _ = fenced.wait_for(|f| f.is_some()) => EXIT_FENCED,
        };
        endpoint.set_server_config(None); // no new clients
        if code == 0 {
            let last = {
                let g = writer.lock();
                writer.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
                g.core.last_allocated()
            };
            tracing::info!(last_allocated = %last, "stopping: waiting for allocated records to become durable");
            if tokio::time::timeout(DRAIN_TIMEOUT, writer.wait_vdl(last)).await.is_err() {
                tracing::warn!(vdl = %writer.lock().core.vdl(), %last, "stopped before every allocated record was durable");
            }
        }
        endpoint.close(0u32.into(), b"writer stopping");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        Ok(code)
    })
}

/// Starts the engine of a claimed volume: one sender per segment and the stall
/// reporter. The caller serves `api_server::Api` over it.
pub fn start(volume: &Volume, links: &[Arc<NodeLink>], taken: recovery::TakenOver, tuning: &Tuning, cache_bytes_max: usize) -> Arc<Writer> {
    let core_config = WriterConfig {
        epoch: taken.epoch,
        lal: tuning.lal,
        unquorumed_bytes_max: tuning.unquorumed_bytes_max as usize,
        batch_bytes_max: tuning.batch_bytes_max as usize,
        batch_inflight_max: tuning.batch_inflight_max,
        retain_bytes_max: tuning.retain_bytes_max as usize,
        cache_bytes_max,
        reader_grace: Duration::from_millis(tuning.gc_reader_grace_ms),
    };
    let writer = Writer::new(WriterCore::new(volume.clone(), core_config, taken.recovered), taken.history);
    let short = writer.lock().core.short_of_claims();
    if !short.is_empty() {
        tracing::warn!(segments_claimed = %writer::claims_held(&short), "took over with a read quorum only: reads are served at VDL, writes wait until a write quorum of every PG holds this writer's claim");
    }
    for pg in 0..volume.pg_count() {
        let pg = PgId(pg as u32);
        for (segment, node) in volume.segments(pg).enumerate() {
            let link = borealis_net::storage::link_of(links, node.id).clone();
            tokio::spawn(senders::segment_loop(writer.clone(), pg, segment, link));
        }
    }
    tokio::spawn(report_stalls(writer.clone()));
    tokio::spawn(advance_horizon(writer.clone()));
    writer
}

/// Moves the GC horizon that the writer's frames carry, every `HORIZON_INTERVAL`.
async fn advance_horizon(w: Arc<Writer>) {
    let mut tick = tokio::time::interval(HORIZON_INTERVAL);
    while w.is_fenced().is_none() {
        tick.tick().await;
        let now = w.now();
        w.lock().core.advance_horizon(now);
    }
}

fn render_metrics(w: &Writer) -> String {
    let g = {
        let inner = w.lock();
        let c = &inner.core;
        Gauges {
            vcl: c.vcl().0,
            vdl: c.vdl().0,
            last_allocated: c.last_allocated().0,
            inflight_bytes: c.inflight_bytes() as u64,
            gc_horizon: c.horizon().get().0,
            gc_readers: c.horizon().readers() as u64,
            cache_bytes: c.cached().0 as u64,
            cached_pages: c.cached().1 as u64,
            writable: c.writable() as u64,
            pgcl: (0..c.volume().pg_count()).map(|pg| c.pgcl(PgId(pg as u32)).0).collect(),
            segments_current: (0..c.volume().pg_count()).map(|pg| c.segments_current(PgId(pg as u32)) as u64).collect(),
        }
    };
    w.metrics.render(&g)
}

/// Logs, once a second while it lasts, why commits are waiting: the PGs that
/// lack a write quorum of current segments.
async fn report_stalls(w: Arc<Writer>) {
    let mut last_vdl = Lsn::ZERO;
    let mut tick = tokio::time::interval(STALL_REPORT_AFTER);
    loop {
        tick.tick().await;
        let g = w.lock();
        let c = &g.core;
        let (vdl, last) = (c.vdl(), c.last_allocated());
        if vdl == last_vdl && last > vdl {
            let short: Vec<String> = (0..c.volume().pg_count() as u32)
                .map(|pg| (PgId(pg), c.segments_current(PgId(pg))))
                .filter(|&(_, n)| n < WRITE_QUORUM)
                .map(|(pg, n)| format!("{pg}: {n} of {SEGMENTS_PER_PG} segments current"))
                .collect();
            drop(g);
            tracing::warn!(%vdl, last_allocated = %last, pgs = %short.join(", "), "commits waiting: no write quorum");
        }
        last_vdl = vdl;
    }
}
