//! Taking over a volume (a writer starting, or a replica being promoted): the
//! shell that executes the core's `redo_core::takeover::Takeover` over QUIC
//! (Status claims and truncations, offers, pulls) and feeds it the replies and
//! the time. Every decision (the epoch, quorums, rivals, VDL, the truncation
//! history) is the machine's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use borealis_net::storage::{link_of, ClientError, NodeLink, REQUEST_TIMEOUT};
use bytes::Bytes;
use redo_core::takeover::{Command, Reply, Takeover};
pub use redo_core::takeover::{Offer, TakenOver, TakeoverError};
use redo_core::volume::Volume;
use redo_core::wire::{ErrorCode, PULL_BYTES_MAX};
use redo_core::{Lsn, PgId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// A command's result, for the machine.
enum Done {
    Status { ask: u64, pg: PgId, segment: usize, reply: Reply },
    Offered,
    Pulled { ask: u64, pg: PgId, runs: Result<Vec<Bytes>, String> },
}

/// Claims the volume and decides where it ends, by executing the core's
/// `Takeover` over QUIC. `known_cpl` is a CPL every PG is known complete up to
/// (a replica's last VDL from the writer; `Lsn::ZERO` when nothing is known);
/// `offer` are the records a promoted replica retains (`Takeover::new`);
/// `quorum` the answers each PG needs (`Takeover::with_quorum`).
pub async fn take_over(
    volume: &Volume,
    links: &[Arc<NodeLink>],
    known_cpl: Lsn,
    offer: Offer,
    timeout: Duration,
    quorum: usize,
) -> Result<TakenOver, TakeoverError> {
    let origin = Instant::now();
    let mut machine = Takeover::new(volume.pg_count(), known_cpl, offer, Duration::ZERO, timeout, seed()).with_quorum(quorum);
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Dropped with the outcome: requests still running (stragglers) are aborted.
    let mut running = JoinSet::new();
    loop {
        while let Some(command) = machine.poll_command() {
            running.spawn(execute(volume, links, command, tx.clone()));
        }
        if let Some(outcome) = machine.outcome() {
            if let Ok(t) = outcome {
                tracing::info!(epoch = %t.epoch, vcl = %t.vcl, vdl = %t.recovered.vdl, claims = t.claims, timings = ?t.timings, "recovery decided: took over the volume, truncated above VDL");
            }
            return outcome.clone();
        }
        let wake = machine.poll_timeout().map(|t| tokio::time::Instant::from_std(origin + t));
        tokio::select! {
            Some(done) = rx.recv() => match done {
                Done::Status { ask, pg, segment, reply } => machine.on_status(ask, pg, segment, reply, origin.elapsed()),
                Done::Offered => machine.on_offered(),
                Done::Pulled { ask, pg, runs } => machine.on_pulled(ask, pg, runs, origin.elapsed()),
            },
            _ = async { tokio::time::sleep_until(wake.expect("checked")).await }, if wake.is_some() => machine.handle_timeout(origin.elapsed()),
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
}

/// Runs one of the machine's commands against the storage node that holds the segment.
fn execute(
    volume: &Volume,
    links: &[Arc<NodeLink>],
    command: Command,
    tx: mpsc::UnboundedSender<Done>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let node_of = |pg: PgId, segment: usize| link_of(links, volume.segments(pg).nth(segment).expect("six segments").id).clone();
    let link = match &command {
        Command::Status { pg, segment, .. } | Command::Offer { pg, segment, .. } | Command::Pull { pg, segment, .. } => node_of(*pg, *segment),
    };
    async move {
        let done = match command {
            Command::Status { ask, pg, segment, epoch, truncate } => {
                let (above, history) = truncate.map_or((None, Vec::new()), |(above, history)| (Some(above), history));
                let reply = match link.status_truncating(epoch, pg, above, history).await {
                    Ok(st) => Reply::Status(st),
                    Err(ClientError::Refused { code: ErrorCode::StaleEpoch, message }) => Reply::Refused(format!("node {}: {message}", link.id)),
                    Err(e) => Reply::Failed(format!("node {}: {e}", link.id)),
                };
                Done::Status { ask, pg, segment, reply }
            }
            Command::Offer { pg, epoch, runs, .. } => {
                let sent = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    let conn = link.get().await?;
                    let (mut tx, mut rx) = conn.open_append().await?;
                    for run in &runs {
                        tx.send(epoch, pg, run).await?;
                    }
                    for _ in &runs {
                        rx.recv().await?;
                    }
                    Ok::<_, ClientError>(())
                })
                .await;
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(node = link.id, %pg, error = %e, "offering retained records back failed"),
                    Err(_) => tracing::warn!(node = link.id, %pg, "offering retained records back timed out"),
                }
                Done::Offered
            }
            Command::Pull { ask, pg, after, upto, .. } => {
                Done::Pulled { ask, pg, runs: pull_range(&link, pg, after, upto).await.map_err(|e| format!("{e:#}")) }
            }
        };
        let _ = tx.send(done);
    }
}

/// Records of `pg` with `after < lsn <= upto`, from one node, in pull-sized runs.
pub async fn pull_range(link: &NodeLink, pg: PgId, after: Lsn, upto: Lsn) -> Result<Vec<Bytes>> {
    let conn = link.get().await.with_context(|| format!("connect to node {} to read {pg}'s tail", link.id))?;
    let (mut at, mut runs) = (after, Vec::new());
    while at < upto {
        let p = tokio::time::timeout(REQUEST_TIMEOUT, conn.pull(pg, at, upto, PULL_BYTES_MAX))
            .await
            .map_err(|_| anyhow::anyhow!("no pull reply from node {} in {REQUEST_TIMEOUT:?}", link.id))?
            .with_context(|| format!("pull {pg} ({at}, {upto}] from node {}", link.id))?;
        if p.last_lsn <= at {
            bail!("node {} returned nothing of {pg} after {at} although its SCL is {upto}", link.id);
        }
        at = p.last_lsn;
        runs.push(p.records);
    }
    Ok(runs)
}

/// A seed that differs between candidates starting at the same moment.
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness; mixing in the pid and the
    // clock makes two processes' values independent.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}
