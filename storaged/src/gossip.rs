//! Hole filling by gossip. A segment that missed
//! records (the node was down, lost its memory log, or a batch was dropped)
//! asks its PG's peers their position, and pulls what it misses from one of
//! them into its log through the path appends take.
//!
//! One task per hosted segment runs rounds: every `--gossip-interval-ms`,
//! and at once when records start waiting above a hole. A segment that its
//! writer keeps feeding (its SCL moved since the last round and reached the
//! best SCL its peers reported then) has nothing to ask them and skips the
//! round; after rounds that found nothing missing the interval doubles, up to
//! `IDLE_BACKOFF_MAX` times; each wait is jittered so that the segments of a
//! cluster do not all ask at once. (Every round costs each peer a stream and
//! a reply: with rounds in lockstep, every 100 ms the six nodes of a local
//! cluster answered sixty Status requests together, and commits that came
//! during such a burst waited for it.) A round asks every
//! peer `Status` at epoch 0 (read-only), hands the answers to the core's
//! `Repair` (the decision: whom to pull from, up to where), then pulls
//! `(SCL, upto]` in runs of at most `PULL_BYTES_MAX`.
//!
//! A segment with no epoch state (a new node, or a wiped one) first joins:
//! it asks its peers the same way until enough answered, and takes the
//! newest epoch state among them (`redo_core::join`); until then it grants
//! no claim and takes no append, so a deposed writer cannot count it.
//!
//! Safety: records are taken only from a peer at the segment's own epoch
//! and newest truncation, checked before the round and again after every
//! pulled run (a peer at another epoch may still hold records that a
//! recovery truncated), and inserted only while the segment is still at
//! that epoch. No lock is held across I/O.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use borealis_net::storage::{ClientError, NodeLink, SegmentStatus, StorageConn};
use redo_core::join::{Join, PeerState};
use redo_core::record::ValidRecords;
use redo_core::repair::{Own, PeerView, Repair};
use redo_core::segment_claim::EpochState;
use redo_core::segment_log::{AppendError, SegmentLog};
use redo_core::volume::Volume;
use redo_core::wire::{ErrorCode, Truncation, PULL_BYTES_MAX};
use redo_core::{Epoch, Lsn, NodeId, PgId};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics::GossipGauges;
use crate::node::{Node, Segment};
use crate::server::blocking;
use crate::store;

/// Largest pull reply asked of a peer.
/// A peer that does not answer a request within this is skipped for the round.
const PEER_TIMEOUT: Duration = Duration::from_secs(1);
/// After failures, a peer sits out 1, 2, 4, ... rounds, at most this many.
const PEER_BACKOFF_ROUNDS_MAX: u32 = 32;
/// After rounds that found nothing missing, the interval doubles up to this factor.
const IDLE_BACKOFF_MAX: u32 = 8;

/// Checks that the volume places every hosted segment on this node.
pub fn check_volume(volume: &Volume, node: NodeId, pgs: &[u32]) -> Result<()> {
    if volume.node(node).is_none() {
        bail!("the volume does not declare {node}");
    }
    let placed = volume.pgs_on(node);
    for &pg in pgs {
        if !placed.contains(&PgId(pg)) {
            bail!("--pgs names {} but the volume does not place a segment of it on {node} (it places {placed:?})", PgId(pg));
        }
    }
    Ok(())
}

/// Starts one gossip task per hosted segment, talking to peers through
/// `endpoint` (which presents this node's certificate).
pub fn spawn(node: &Arc<Node>, volume: &Volume, endpoint: &quinn::Endpoint, interval: Duration) -> Result<()> {
    let links: HashMap<u32, Arc<NodeLink>> = NodeLink::for_volume(volume, endpoint)?.into_iter().map(|l| (l.id, l)).collect();
    for (&pg, seg) in &node.segments {
        let peers: Vec<Peer> =
            volume.segments(pg).filter(|n| n.id != node.node_id.0).map(|n| Peer { link: links[&n.id].clone(), backoff: Backoff::default() }).collect();
        let gauges = Arc::new(GossipGauges::default());
        node.metrics.gossip_segments.lock().expect("gossip gauges lock").insert(pg.0, gauges.clone());
        let task = SegmentGossip { node: node.clone(), seg: seg.clone(), peers, repair: Repair::default(), gauges, interval };
        tokio::spawn(task.run());
    }
    Ok(())
}

struct Peer {
    link: Arc<NodeLink>,
    backoff: Backoff,
}

/// Rounds an unreachable peer sits out: 1, 2, 4, ... after consecutive
/// failures, at most `PEER_BACKOFF_ROUNDS_MAX`; none once it answers.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    skip_rounds: u32,
}

impl Backoff {
    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.skip_rounds = (1u32 << (self.failures - 1).min(5)).min(PEER_BACKOFF_ROUNDS_MAX);
    }

    fn answered(&mut self) {
        self.failures = 0;
    }

    /// Whether to leave the peer out of this round (counts the round).
    fn sit_out(&mut self) -> bool {
        let skip = self.skip_rounds > 0;
        self.skip_rounds = self.skip_rounds.saturating_sub(1);
        skip
    }
}

/// How pulling from one peer ended.
enum PullEnd {
    /// Reached `upto` (or the segment already had it).
    Done,
    /// The segment cannot take records now (shutting down, hot log full,
    /// disk failed, epoch moved): not the peer's fault; try next round.
    Stop(String),
}

struct SegmentGossip {
    node: Arc<Node>,
    seg: Arc<Segment>,
    peers: Vec<Peer>,
    repair: Repair,
    gauges: Arc<GossipGauges>,
    interval: Duration,
}

/// The segment's newest truncation.
fn own_truncation(log: &SegmentLog) -> Option<Truncation> {
    log.truncations().last().copied()
}

impl SegmentGossip {
    async fn run(mut self) {
        if self.seg.log.lock().expect("segment lock").is_joining() {
            self.join().await;
        }
        let mut last_round: Option<Instant> = None;
        // Whether the last round left records waiting above a hole that it could not fill:
        // then the next round waits for the interval instead of coming at once.
        let mut hole_unfilled = false;
        // The segment's SCL when the last round was due, and how many rounds in a row found nothing missing.
        let mut scl_then = Lsn::ZERO;
        let mut idle_rounds = 0u32;
        let jitter = std::collections::hash_map::RandomState::new();
        let mut wait = self.interval;
        loop {
            if self.node.is_shutting_down() {
                return;
            }
            let (pending, scl) = {
                let log = self.seg.log.lock().expect("segment lock");
                (log.pending_records() > 0, log.scl())
            };
            let since = last_round.map_or(wait, |t| t.elapsed());
            let urgent = pending && !hole_unfilled;
            if since < wait && !urgent {
                if !pending {
                    hole_unfilled = false;
                }
                let rest = tokio::time::sleep(wait - since);
                if hole_unfilled {
                    rest.await; // appends above the hole would only wake us again
                } else {
                    tokio::select! {
                        _ = rest => {}
                        _ = self.seg.holes.notified() => {}
                    }
                }
                continue;
            }
            let now = Instant::now();
            // Between 3/4 and 5/4 of the (backed-off) interval until the next round.
            let backoff = self.interval * (1 << idle_rounds.min(IDLE_BACKOFF_MAX.ilog2()));
            let spread = std::hash::BuildHasher::hash_one(&jitter, now) % 1024;
            wait = backoff * 3 / 4 + backoff * spread as u32 / 2048;
            let fed = last_round.is_some() && scl > scl_then && scl >= self.repair.peer_scl();
            last_round = Some(now);
            scl_then = scl;
            if fed && !pending {
                idle_rounds = 0;
                continue;
            }
            let own = self.round().await;
            hole_unfilled = own.pending;
            let found = own.pending || self.repair.missing_through() != Lsn::ZERO;
            idle_rounds = if found { 0 } else { idle_rounds.saturating_add(1) };
        }
    }

    fn own(&self) -> Own {
        let log = self.seg.log.lock().expect("segment lock");
        Own { epoch: log.epoch(), truncation: own_truncation(&log), scl: log.scl(), pending: log.pending_records() > 0 }
    }

    /// One round; returns the segment's state after it.
    async fn round(&mut self) -> Own {
        self.node.metrics.gossip_rounds.fetch_add(1, Relaxed);
        let own = self.own();
        let answers = self.ask_peers(self.seg.id.pg).await;
        let views: Vec<PeerView> = answers.iter().filter_map(|(node, s)| Some(PeerView::from_status(*node, s.as_ref()?))).collect();
        let plan = self.repair.handle_round(own, &views);
        self.gauges.peer_scl.store(self.repair.peer_scl().0, Relaxed);
        self.gauges.missing_through.store(self.repair.missing_through().0, Relaxed);
        for (peer, upto) in plan {
            let i = self.peers.iter().position(|p| p.link.id == peer).expect("plans name our peers");
            match self.pull_from(i, own, upto).await {
                Ok(PullEnd::Done) => break,
                Ok(PullEnd::Stop(why)) => {
                    tracing::debug!(segment = %self.seg.id, %why, "gossip paused for this round");
                    break;
                }
                Err(e) => {
                    self.node.metrics.gossip_failures.fetch_add(1, Relaxed);
                    self.peers[i].backoff.failed();
                    tracing::warn!(segment = %self.seg.id, peer = peer, error = %format!("{e:#}"), "gossip pull failed; trying another peer");
                }
            }
        }
        let after = self.own();
        if after.scl >= self.repair.missing_through() {
            self.gauges.missing_through.store(0, Relaxed);
        }
        after
    }

    /// Asks every peer not sitting out its status, at once, each within
    /// `PEER_TIMEOUT`: the answers by node, `None` from a peer that is joining.
    async fn ask_peers(&mut self, pg: PgId) -> Vec<(u32, Option<SegmentStatus>)> {
        let mut asks = JoinSet::new();
        for (i, peer) in self.peers.iter_mut().enumerate() {
            if peer.backoff.sit_out() {
                continue;
            }
            let link = peer.link.clone();
            asks.spawn(async move { (i, status(&link, pg).await) });
        }
        let mut answers = Vec::with_capacity(self.peers.len());
        while let Some(joined) = asks.join_next().await {
            let Ok((i, answer)) = joined else { continue };
            let peer = &mut self.peers[i];
            match answer {
                Ok(s) => {
                    peer.backoff.answered();
                    answers.push((peer.link.id, Some(s)));
                }
                Err(e) if matches!(e.downcast_ref(), Some(ClientError::Refused { code: ErrorCode::Joining, .. })) => {
                    peer.backoff.answered();
                    answers.push((peer.link.id, None));
                }
                Err(e) => {
                    tracing::debug!(segment = %self.seg.id, peer = peer.link.id, error = %format!("{e:#}"), "gossip: no position from peer");
                    self.node.metrics.gossip_failures.fetch_add(1, Relaxed);
                    peer.backoff.failed();
                }
            }
        }
        answers
    }

    /// A segment with no epoch state (new, or wiped) joins at the newest state
    /// its peers hold (`redo_core::join` decides): rounds of `Status` until
    /// enough answered, then the state is persisted and taken. No claim runs
    /// meanwhile (a joining segment refuses them all).
    async fn join(&mut self) {
        let mut join = Join::default();
        let started = Instant::now();
        loop {
            if self.node.is_shutting_down() {
                return;
            }
            for (node, answer) in self.ask_peers(self.seg.id.pg).await {
                let state = answer.map_or(PeerState::Joining, |s| PeerState::Member(EpochState { epoch: s.epoch, truncations: s.truncations }));
                join.on_answer(node, state);
            }
            if let Some(state) = join.decided() {
                let _turn = self.seg.claims.lock().await;
                let (dir, pg, persisted) = (self.node.data_dir().clone(), self.seg.id.pg, state.clone());
                match blocking(move || store::write_epoch(&dir, pg, &persisted)).await {
                    Ok(()) => {
                        self.seg.with_log(|log| log.join(&state));
                        let (members, joining) = join.heard();
                        let elapsed_ms = started.elapsed().as_millis() as u64;
                        tracing::info!(segment = %self.seg.id, epoch = %state.epoch, truncations = state.truncations.len(), members, joining, elapsed_ms, "joined at the newest epoch state of the PG's peers");
                        return;
                    }
                    Err(why) => tracing::error!(segment = %self.seg.id, error = %why, "cannot write the epoch state it joins at; retrying"),
                }
            } else {
                let (members, joining) = join.heard();
                tracing::debug!(segment = %self.seg.id, members, joining, "joining: too few peers answered");
            }
            tokio::time::sleep(self.interval).await;
        }
    }

    /// Pulls `(SCL, upto]` from peer `i` into the segment, run by run.
    async fn pull_from(&mut self, i: usize, own: Own, upto: Lsn) -> Result<PullEnd> {
        let link = self.peers[i].link.clone();
        let conn = match tokio::time::timeout(PEER_TIMEOUT, link.get()).await {
            Ok(c) => c?,
            Err(_) => bail!("no connection to node {} in {PEER_TIMEOUT:?}", link.id),
        };
        let result = self.pull_runs(&link, &conn, own, upto).await;
        if result.is_err() {
            link.forget(conn.conn.stable_id()).await;
        }
        result
    }

    async fn pull_runs(&mut self, link: &NodeLink, conn: &StorageConn, own: Own, upto: Lsn) -> Result<PullEnd> {
        let (pg, peer) = (self.seg.id.pg, link.id);
        let metrics = self.node.metrics.clone();
        let start = self.own().scl;
        let (mut from, mut inserted_total) = (start, 0u64);
        while from < upto {
            metrics.gossip_pulls.fetch_add(1, Relaxed);
            let pulled = match tokio::time::timeout(PEER_TIMEOUT, conn.pull(pg, from, upto, PULL_BYTES_MAX)).await {
                Ok(p) => p?,
                Err(_) => bail!("no pull reply from node {peer} in {PEER_TIMEOUT:?}"),
            };
            metrics.gossip_bytes.fetch_add(pulled.records.len() as u64, Relaxed);
            if pulled.last_lsn <= from {
                bail!("node {peer} served nothing above {from} (its SCL is {})", pulled.position.scl);
            }
            let records = ValidRecords::validate(pulled.records, 0).map_err(|e| anyhow::anyhow!("node {peer} sent bad records: {e}"))?;
            if let Some(r) = &records {
                let run = r.run();
                if run.first_lsn <= from || run.last_lsn > pulled.last_lsn {
                    bail!("node {peer} answered a pull after {from} with records {}..={} (complete through {})", run.first_lsn, run.last_lsn, pulled.last_lsn);
                }
            }
            // The peer must still be at our epoch and truncation: then the
            // records were part of the history we share when it served them.
            let now = match tokio::time::timeout(PEER_TIMEOUT, conn.status(Epoch(0), pg, None)).await {
                Ok(s) => PeerView::from_status(peer, &s?),
                Err(_) => bail!("no Status reply from node {peer} in {PEER_TIMEOUT:?}"),
            };
            if !now.agrees_with(&own) {
                return Ok(PullEnd::Stop(format!("node {peer} moved to {} / {:?} while we pulled", now.epoch, now.truncation)));
            }
            let Some(records) = records else {
                from = pulled.last_lsn;
                continue;
            };
            let node = &self.node;
            let result = self.seg.with_log(|log| {
                // Checked under the segment lock, as appends are: no record lands after the final flush began.
                if node.is_shutting_down() {
                    return Err(PullEnd::Stop("shutting down".into()));
                }
                if log.epoch() != own.epoch || own_truncation(log) != own.truncation {
                    return Err(PullEnd::Stop(format!("segment moved to {} while it pulled", log.epoch())));
                }
                let epoch = log.epoch();
                Ok(log.handle_append(epoch, &records).map(|out| (out, log.scl())))
            });
            let (out, scl) = match result {
                Ok(Ok(r)) => r,
                Ok(Err(e @ AppendError::Conflict { .. })) => bail!("records from node {peer} conflict with the segment's: {e}"),
                // Busy, disk failed, truncating: the segment cannot take them now.
                Ok(Err(e)) => return Ok(PullEnd::Stop(e.to_string())),
                Err(stop) => return Ok(stop),
            };
            metrics.ingest_records.fetch_add(out.inserted as u64, Relaxed);
            metrics.ingest_bytes.fetch_add(out.inserted_bytes as u64, Relaxed);
            metrics.gossip_records.fetch_add(out.inserted as u64, Relaxed);
            inserted_total += out.inserted as u64;
            node.wake.wake();
            if scl < pulled.last_lsn {
                bail!("records from node {peer} up to {} left the segment's SCL at {scl}: they do not continue its chain", pulled.last_lsn);
            }
            from = scl;
        }
        if inserted_total > 0 {
            tracing::info!(segment = %self.seg.id, peer, from = %start, to = %from, records = inserted_total, "gossip filled records from a peer");
        }
        Ok(PullEnd::Done)
    }
}

/// The segment's position from `link`'s node: a connection and a request,
/// each within `PEER_TIMEOUT`; a connection that failed a request is dropped.
async fn status(link: &NodeLink, pg: PgId) -> Result<SegmentStatus> {
    let conn = match tokio::time::timeout(PEER_TIMEOUT, link.get()).await {
        Ok(c) => c?,
        Err(_) => bail!("no connection in {PEER_TIMEOUT:?}"),
    };
    let answer = match tokio::time::timeout(PEER_TIMEOUT, conn.status(Epoch(0), pg, None)).await {
        Ok(Ok(s)) => return Ok(s),
        Ok(Err(e)) => anyhow::Error::from(e),
        Err(_) => anyhow::anyhow!("no Status reply in {PEER_TIMEOUT:?}"),
    };
    link.forget(conn.conn.stable_id()).await;
    Err(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_peers_sit_out_more_rounds_each_time() {
        let mut b = Backoff::default();
        assert!(!b.sit_out());
        let mut sat_out = Vec::new();
        for _ in 0..7 {
            b.failed();
            let mut n = 0;
            while b.sit_out() {
                n += 1;
            }
            sat_out.push(n);
        }
        assert_eq!(sat_out, [1, 2, 4, 8, 16, 32, 32]);
        b.answered();
        b.failed();
        assert!(b.sit_out() && !b.sit_out(), "an answer resets the backoff");
    }
}
