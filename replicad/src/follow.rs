//! Everything the replica hears and fetches: its start from storage, the
//! storage nodes' position notifications, the writer's VDL feed, and one
//! puller per protection group that pulls the log when notified.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use borealis_net::api::ApiClient;
use borealis_net::storage::{link_of, ClientError, NodeLink, StorageConn, REQUEST_TIMEOUT};
use redo_core::api::Progress;
use redo_core::quorum::SEGMENTS_PER_PG;
use redo_core::replica::{PullError, PullPlan, Start, StreamPlan};
use redo_core::volume::Volume;
use redo_core::wire::SegmentPosition;
use redo_core::{Epoch, PgId};
use tokio::task::JoinSet;

use crate::promote::Promoter;
use crate::replica::Replica;

const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// A writer feed with no heartbeat for this long is dropped and the writer looked for.
const WRITER_SILENT: Duration = Duration::from_millis(4 * borealis_net::api_server::HEARTBEAT.as_millis() as u64);
/// Safety net under the notifications: a puller looks again this often even when
/// nothing woke it (a notification lost with a connection is then late, not lost).
const RECHECK: Duration = Duration::from_secs(1);
/// How often at most a replica reports its read point to the writer.
const READ_POINT_REPORT: Duration = Duration::from_millis(100);
/// How long a starting replica waits for the writer's first progress before it asks storage.
const WRITER_ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a pull failed on every candidate segment.
const FAILED_PULL_BACKOFF: Duration = Duration::from_millis(100);

/// Where to start. From the writer's first progress when it answers (the volume's
/// writer, or a peer replica promoted since; `candidates`): its VDL is durable,
/// its PGCLs bound each PG, it names the writer to follow from the start, and it needs no
/// write quorum of segments up (a read quorum serves the reads). Else from the segments'
/// SCLs (read without raising any epoch), once every PG has a write quorum of answers.
/// Also returns the positions heard, and the writer's progress if it answered.
pub async fn start(
    volume: &Volume,
    links: &[Arc<NodeLink>],
    endpoint: &quinn::Endpoint,
    candidates: &[SocketAddr],
    timeout: Duration,
) -> Result<(Start, Vec<(usize, SegmentPosition)>, Option<Progress>)> {
    let deadline = Instant::now() + timeout;
    let mut scls = vec![[None; SEGMENTS_PER_PG]; volume.pg_count()];
    let mut positions = Vec::new();
    loop {
        if let Some(p) = first_progress(endpoint, candidates).await {
            return Ok((Start { durable: p.vdl, bounds: p.pgcl.clone() }, positions, Some(p)));
        }
        let mut asks = JoinSet::new();
        for pg in 0..volume.pg_count() as u32 {
            for (segment, node) in volume.segments(PgId(pg)).enumerate() {
                if scls[pg as usize][segment].is_none() {
                    let link = link_of(links, node.id).clone();
                    asks.spawn(async move { (pg, segment, link.status(Epoch(0), PgId(pg), None).await) });
                }
            }
        }
        while let Some(joined) = asks.join_next().await {
            let (pg, segment, answer) = joined.expect("status task");
            if let Ok(status) = answer {
                let position = status.position;
                scls[pg as usize][segment] = Some(position.scl);
                positions.push((segment, position));
            }
        }
        if let Some(start) = Start::from_scls(&scls) {
            return Ok((start, positions, None));
        }
        if Instant::now() > deadline {
            let short: Vec<String> =
                scls.iter().enumerate().map(|(pg, s)| format!("pg{pg}: {} of {SEGMENTS_PER_PG} answered", s.iter().flatten().count())).collect();
            bail!("neither a writer at {candidates:?} nor a write quorum of segments answered within {timeout:?} ({})", short.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first `Progress` of the writer among `candidates` (the newest epoch's), if
/// it answers within `WRITER_ASK_TIMEOUT`.
async fn first_progress(endpoint: &quinn::Endpoint, candidates: &[SocketAddr]) -> Option<Progress> {
    let (writer, _) = borealis_net::api::find_writer_within(endpoint, candidates, WRITER_ASK_TIMEOUT).await?;
    let ask = async {
        let client = ApiClient::connect(endpoint, writer).await?;
        let mut follower = client.follow().await?;
        follower.next().await
    };
    match tokio::time::timeout(WRITER_ASK_TIMEOUT, ask).await {
        Ok(Ok(p)) => Some(p),
        Ok(Err(e)) => {
            tracing::debug!(%writer, error = %e, "no progress from the writer; asking storage");
            None
        }
        Err(_) => None,
    }
}

/// Follows one storage node's position notifications for every PG it hosts (its flushes:
/// SCLs ride along), reconnecting forever.
pub async fn storage_feed(replica: Arc<Replica>, volume: Volume, link: Arc<NodeLink>) {
    let pgs = volume.pgs_on(redo_core::NodeId(link.id));
    let segment_of = |pg: PgId| volume.segments(pg).position(|n| n.id == link.id).expect("hosted pg");
    let mut backoff = RETRY_MIN;
    loop {
        let session = async {
            let conn = link.get().await?;
            let mut sub = conn.subscribe(pgs.clone(), false).await?;
            loop {
                let position = sub.next().await?;
                if pgs.contains(&position.pg) {
                    replica.on_position(segment_of(position.pg), position);
                    backoff = RETRY_MIN;
                }
            }
        };
        let e: ClientError = match session.await {
            Ok(()) => unreachable!("the feed ends only by an error"),
            Err(e) => e,
        };
        tracing::debug!(node = link.id, error = %e, "storage notifications lost; resubscribing");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

/// Follows the writer's VDL (and heartbeat), reconnecting while the replica is not
/// the writer itself: the replica serves at its read point while the writer is away.
/// On the same stream it reports where it reads, every `READ_POINT_REPORT` at most,
/// one report behind (a page fetch planned at the previous read point may still be
/// on its way), so that the writer's GC horizon stays below its reads.
/// When the writer it follows is lost, it asks `candidates` (the volume's writer
/// address, then the peer replicas) who the writer is now (a peer may have been promoted).
pub async fn writer_feed(promoter: Arc<Promoter>, endpoint: quinn::Endpoint, candidates: Vec<SocketAddr>) {
    let replica = promoter.replica.clone();
    let mut writer = candidates[0];
    let mut backoff = RETRY_MIN;
    let mut connected = true;
    while promoter.writer.get().is_none() {
        let session = async {
            let client = tokio::time::timeout(REQUEST_TIMEOUT, ApiClient::connect(&endpoint, writer))
                .await
                .map_err(|_| borealis_net::api::ApiError::Lost(format!("no answer in {REQUEST_TIMEOUT:?}")))??;
            // The lowest read point not reported yet, and when the last report went out.
            let mut unreported = replica.lock().lowest_read_point();
            let mut follower = client.follow_reading(Some(unreported)).await?;
            let mut reported_at = Instant::now();
            loop {
                let p = follower.next().await?;
                if !connected {
                    tracing::info!(%writer, epoch = %p.epoch, vdl = %p.vdl, "following the writer");
                    connected = true;
                }
                backoff = RETRY_MIN;
                replica.on_progress(&p);
                if reported_at.elapsed() >= READ_POINT_REPORT {
                    let now = replica.lock().lowest_read_point();
                    follower.report(unreported).await?;
                    (unreported, reported_at) = (now, Instant::now());
                }
            }
        };
        let e: borealis_net::api::ApiError = tokio::select! {
            r = session => match r {
                Ok(()) => unreachable!("the feed ends only by an error"),
                Err(e) => e,
            },
            // A silent writer whose connection lingers (QUIC idle timeout) counts as lost.
            _ = silent(&replica, Instant::now()) => borealis_net::api::ApiError::Lost(format!("no heartbeat for {WRITER_SILENT:?}")),
        };
        if connected {
            tracing::warn!(%writer, error = %e, "lost the writer's VDL feed; serving at the current read point and looking for the writer");
            connected = false;
        }
        let known = replica.writer().map(|h| h.epoch).unwrap_or_default();
        let newest =
            crate::promote::roles_of(&endpoint, &candidates).await.into_iter().filter(|(_, r)| r.writer && r.epoch >= known).max_by_key(|(_, r)| r.epoch);
        match newest {
            Some((addr, _)) if addr != writer => {
                tracing::info!(from = %writer, to = %addr, "the writer moved");
                writer = addr;
            }
            _ => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Resolves once the writer has not been heard for `WRITER_SILENT` since `since`.
async fn silent(replica: &Replica, since: Instant) {
    loop {
        let quiet = replica.writer().map_or(since, |h| h.at.max(since)).elapsed();
        if quiet >= WRITER_SILENT {
            return;
        }
        tokio::time::sleep(WRITER_SILENT - quiet).await;
    }
}

/// Streams `pg`'s log from one segment at a time, from the `first`-th on (`StreamLog`),
/// granting credit as the buffer allows (`ReplicaCore` decides how much): the records
/// arrive as the segment gets them, with no request per batch. After a failure the
/// stream moves to the next segment; a new writer's epoch reopens it where it was.
pub async fn log_stream(replica: Arc<Replica>, volume: Volume, links: Vec<Arc<NodeLink>>, pg: PgId, first: usize) {
    let nodes: Vec<u32> = volume.segments(pg).map(|n| n.id).collect();
    let mut segment = first % nodes.len();
    let mut backoff = RETRY_MIN;
    loop {
        let plan = replica.lock().open_stream(pg, segment);
        replica.metrics.streams.fetch_add(1, Relaxed);
        let link = link_of(&links, nodes[segment]);
        let started = Instant::now();
        let ended = stream_session(&replica, link, &plan).await;
        replica.lock().stream_closed(pg, plan.id);
        if let Err(e) = ended {
            tracing::debug!(%pg, node = link.id, error = %e, "log stream ended; opening one on the next segment");
            segment = (segment + 1) % nodes.len();
            backoff = if started.elapsed() > RETRY_MAX { RETRY_MIN } else { (backoff * 2).min(RETRY_MAX) };
            tokio::time::sleep(backoff).await;
        }
    }
}

/// One log stream, until it fails (`Err`) or the engine closed it (a new epoch: `Ok`).
async fn stream_session(replica: &Replica, link: &NodeLink, plan: &StreamPlan) -> Result<(), ClientError> {
    // Only from a segment that has the current writer's truncation (as pulls).
    let epoch = replica.writer().map(|h| h.epoch).unwrap_or_default();
    let conn = link.get().await?;
    let r = stream_on(replica, &conn, epoch, plan).await;
    link.forget_failed(&conn, &r).await;
    r
}

async fn stream_on(replica: &Replica, conn: &StorageConn, epoch: Epoch, plan: &StreamPlan) -> Result<(), ClientError> {
    let pg = plan.pg;
    let mut stream = conn.stream_log(epoch, pg, plan.after, plan.credit).await?;
    loop {
        tokio::select! {
            chunk = stream.next() => {
                let chunk = chunk?;
                replica.metrics.streamed_bytes.fetch_add(chunk.records.len() as u64, Relaxed);
                let applied = replica.lock().on_streamed(pg, plan.id, chunk.position, chunk.last_lsn, chunk.records);
                match applied {
                    Ok(read_point) => replica.publish(read_point),
                    Err(PullError::StreamClosed) => return Ok(()),
                    Err(e) => return Err(ClientError::Unexpected(format!("refusing a log stream chunk: {e}"))),
                }
                if replica.lock().behind(pg) {
                    replica.kick(pg.0 as usize).notify_one();
                }
            }
            _ = replica.stream_wake(pg.0 as usize).notified() => {
                if !replica.lock().stream_open(pg, plan.id) {
                    return Ok(());
                }
            }
        }
        let credit = replica.lock().stream_credit(pg, plan.id);
        if let Some(bytes) = credit {
            stream.grant(bytes).await?;
        }
    }
}

/// Starts `pg`'s pulls whenever woken and the engine has a pull to make; each runs as
/// its own task (a second may overlap the first) and wakes the puller when done.
pub async fn puller(replica: Arc<Replica>, volume: Volume, links: Vec<Arc<NodeLink>>, pg: PgId) {
    let nodes: Arc<Vec<u32>> = Arc::new(volume.segments(pg).map(|n| n.id).collect());
    loop {
        while let Some(plan) = replica.lock().plan_pull(pg) {
            let (replica, links, nodes) = (replica.clone(), links.clone(), nodes.clone());
            tokio::spawn(async move {
                if !pull(&replica, &links, &nodes, &plan).await {
                    replica.lock().pull_failed(&plan);
                    // Every segment that had the records failed: back off instead of spinning.
                    tokio::time::sleep(FAILED_PULL_BACKOFF).await;
                }
                // A reservation was released: any PG may pull now.
                replica.kick_all();
            });
        }
        let _ = tokio::time::timeout(RECHECK, replica.kick(pg.0 as usize).notified()).await;
    }
}

/// Makes `plan`'s pull from the fastest candidate, falling over to the next on failure.
async fn pull(replica: &Replica, links: &[Arc<NodeLink>], nodes: &[u32], plan: &PullPlan) -> bool {
    let m = &replica.metrics;
    let latency = &replica.latency[plan.pg.0 as usize];
    let (covering, rest) = plan.segments.split_at(plan.covering);
    let epoch = replica.writer().map(|h| h.epoch).unwrap_or_default();
    for (i, (segment, wait)) in latency.order(&[covering, rest]).into_iter().enumerate() {
        if i > 0 {
            m.pull_failovers.fetch_add(1, Relaxed);
        }
        let link = link_of(links, nodes[segment]);
        let started = Instant::now();
        // Only from a segment that has the current writer's truncation: one that
        // missed the recovery may still hold the old writer's records above its VDL.
        let reply = link.pull_at(epoch, plan.pg, plan.after, plan.upto, plan.bytes_max as u32);
        let reply = tokio::time::timeout(wait, reply).await.unwrap_or_else(|_| Err(ClientError::Unexpected(format!("no pull reply in {wait:?}"))));
        match reply {
            Ok(p) => {
                let us = started.elapsed().as_micros() as u64;
                latency.record(segment, us);
                m.pull_latency_us.record(us);
                m.pulls.fetch_add(1, Relaxed);
                m.pull_bytes.fetch_add(p.records.len() as u64, Relaxed);
                let applied = replica.lock().on_pulled(segment, plan, p.position, p.last_lsn, p.records);
                match applied {
                    Ok(read_point) => {
                        replica.publish(read_point);
                        return true;
                    }
                    Err(e) => tracing::warn!(pg = %plan.pg, node = link.id, error = %e, "refusing a pull reply; trying another segment"),
                }
            }
            Err(e) => tracing::debug!(pg = %plan.pg, node = link.id, error = %e, "pull failed; trying another segment"),
        }
        latency.penalize(segment);
    }
    false
}
