//! The writer's side of storage: one QUIC connection per storage node, the
//! start-up protocol (learn positions, claim the epoch), and one sender per
//! segment that streams its PG's frames, feeds acks into the engine, and
//! resends what a returning segment missed.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use borealis_net::storage::{get_page_from, link_of, ClientError, NodeLink, StorageConn, REQUEST_TIMEOUT};
use redo_core::page::PageImage;
use redo_core::quorum::{SEGMENTS_PER_PG, WRITE_QUORUM};
use redo_core::volume::Volume;
use redo_core::wire::ErrorCode;
use redo_core::writer::{Batch, Recovered};
use redo_core::{Epoch, Lsn, PageId, PgId};
use tokio::task::JoinSet;

use crate::state::Writer;

const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How often a segment that needs repair from its peers is looked at again.
const GAP_RETRY: Duration = Duration::from_secs(5);

/// One segment's answer to `Status`.
#[derive(Clone, Copy)]
struct Answer {
    node: u32,
    epoch: Epoch,
    scl: Lsn,
}

/// Asks every segment of every PG for `Status { epoch }` until each PG has a
/// write quorum of answers; returns the answers per PG.
async fn status_quorum(volume: &Volume, links: &[Arc<NodeLink>], epoch: Epoch, deadline: Instant) -> Result<Vec<Vec<Answer>>> {
    let mut answers: Vec<Vec<Option<Answer>>> = vec![vec![None; SEGMENTS_PER_PG]; volume.pg_count()];
    loop {
        let mut asks = JoinSet::new();
        for (pg, segs) in answers.iter().enumerate() {
            for (s, node) in volume.segments(PgId(pg as u32)).enumerate() {
                if segs[s].is_none() {
                    let link = link_of(links, node.id).clone();
                    asks.spawn(async move { (pg, s, link.id, link.status(epoch, PgId(pg as u32), None).await) });
                }
            }
        }
        let mut last_errors = Vec::new();
        while let Some(r) = asks.join_next().await {
            let (pg, s, node, r) = r.context("status task")?;
            match r {
                Ok(st) => answers[pg][s] = Some(Answer { node, epoch: st.epoch, scl: st.position.scl }),
                Err(e) => last_errors.push(format!("pg{pg} on node {node}: {e}")),
            }
        }
        let short: Vec<String> = answers
            .iter()
            .enumerate()
            .filter(|(_, a)| a.iter().flatten().count() < WRITE_QUORUM)
            .map(|(pg, a)| format!("pg{pg}: {} of {SEGMENTS_PER_PG}", a.iter().flatten().count()))
            .collect();
        if short.is_empty() {
            return Ok(answers.into_iter().map(|a| a.into_iter().flatten().collect()).collect());
        }
        if Instant::now() >= deadline {
            bail!("no write quorum of storage nodes answered ({}); last errors: {}", short.join(", "), last_errors.join("; "));
        }
        tracing::info!(waiting_for = %short.join(", "), "waiting for storage nodes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Start-up: learns every PG's position from its segments, claims the next
/// epoch on a write quorum of each PG, and returns the epoch and where the
/// volume stands.
///
/// The volume is taken to end at the highest SCL any answering segment
/// reports. That is exact after a clean writer stop (every allocated record
/// reached a quorum before exit). After a writer crash the segments may
/// disagree: the records between the lowest and the highest SCL are pulled
/// from the segment that has them and resent to the others like any frame, so
/// no segment is left with a hole. (Truncating such an unacknowledged tail
/// instead is the promotion protocol's job.)
pub async fn recover(volume: &Volume, links: &[Arc<NodeLink>], timeout: Duration) -> Result<(Epoch, Recovered)> {
    let deadline = Instant::now() + timeout;
    let seen = status_quorum(volume, links, Epoch(0), deadline).await?;
    let epoch = Epoch::claim_after(seen.iter().flatten().map(|a| a.epoch).max().unwrap_or_default(), nonce());
    // After the claim no older writer can append: positions are final.
    let claimed = status_quorum(volume, links, epoch, deadline).await?;
    if let Some(a) = claimed.iter().flatten().find(|a| a.epoch != epoch) {
        bail!("another writer claimed {} while this one claimed {epoch}: not starting", a.epoch);
    }
    let mut pg_last = Vec::new();
    let mut tails = Vec::new();
    for (pg, answers) in claimed.iter().enumerate() {
        let best = *answers.iter().max_by_key(|a| a.scl).expect("a write quorum answered");
        let lowest = answers.iter().map(|a| a.scl).min().expect("a write quorum answered");
        let tail = if lowest < best.scl {
            tracing::warn!(
                pg, lowest = %lowest, highest = %best.scl, from_node = best.node,
                "segments disagree (the previous writer did not stop cleanly, or a node is behind): \
                 resending the records between to the segments that lack them"
            );
            pull_range(link_of(links, best.node), PgId(pg as u32), lowest, best.scl).await?
        } else {
            Vec::new()
        };
        pg_last.push(best.scl);
        tails.push((lowest, tail));
    }
    let vdl = pg_last.iter().copied().max().unwrap_or(Lsn::ZERO);
    Ok((epoch, Recovered { vdl, pg_last, tails }))
}

/// 32 bits that differ between writers starting at the same moment.
fn nonce() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness; mixing in the pid and the
    // clock makes two processes' values independent.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() as u32
}

/// Records of `pg` with `after < lsn <= upto`, from one node, in pull-sized runs.
async fn pull_range(link: &NodeLink, pg: PgId, after: Lsn, upto: Lsn) -> Result<Vec<Bytes>> {
    const PULL_BYTES_MAX: u32 = 1 << 20;
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
        (at, runs) = (p.last_lsn, [runs, vec![p.records]].concat());
    }
    Ok(runs)
}

/// GetPage@`lsn` from a segment of `pg`: those with a live session first, so
/// that a dead node costs no connection timeout.
pub async fn fetch_page(w: &Writer, volume: &Volume, links: &[Arc<NodeLink>], pg: PgId, page: PageId, lsn: Lsn) -> Result<PageImage, String> {
    let mut nodes: Vec<(usize, u32)> = volume.segments(pg).map(|n| n.id).enumerate().collect();
    nodes.sort_by_key(|&(s, _)| w.metrics.segment_up[pg.0 as usize][s].load(Relaxed) == 0);
    let order: Vec<(&NodeLink, Duration)> = nodes.iter().map(|&(_, id)| (link_of(links, id).as_ref(), REQUEST_TIMEOUT)).collect();
    get_page_from(order, pg, page, lsn).await
}

/// Why a segment session ended.
enum End {
    /// The segment has a newer epoch: this writer is deposed.
    Fenced(String),
    /// The segment is behind what the writer still retains: its peers must fill it.
    Gap(String),
    /// The node, the connection (`reset_link`: its stable id) or the stream failed; reconnect.
    Failed { error: ClientError, reset_link: Option<usize> },
}

impl End {
    fn from_error(error: ClientError, conn: Option<&StorageConn>) -> End {
        match error {
            ClientError::Refused { code: ErrorCode::StaleEpoch, message } => End::Fenced(message),
            e @ ClientError::Refused { .. } => End::Failed { error: e, reset_link: None },
            e => End::Failed { error: e, reset_link: conn.map(|c| c.conn.stable_id()) },
        }
    }
}

/// Streams `pg`'s frames to segment `segment` on `link` for as long as the writer lives.
pub async fn segment_loop(w: Arc<Writer>, pg: PgId, segment: usize, link: Arc<NodeLink>) {
    let mut retry = RETRY_MIN;
    let mut first = true;
    loop {
        let started = Instant::now();
        let end = session(&w, pg, segment, &link).await;
        // Report a failure once per outage, not once per retry.
        let was_up = w.metrics.segment_up[pg.0 as usize][segment].swap(0, Relaxed) == 1 || std::mem::take(&mut first);
        match end {
            End::Fenced(why) => return w.fence(format!("node {} for {pg}: {why}", link.id)),
            End::Gap(why) => {
                tracing::warn!(node = link.id, %pg, %why, "segment needs repair from its peers; not resending");
                tokio::time::sleep(GAP_RETRY).await;
            }
            End::Failed { error, reset_link } => {
                if was_up {
                    tracing::warn!(node = link.id, %pg, error = %error, "segment unreachable; commits continue while a write quorum acks");
                }
                if let Some(failed) = reset_link {
                    link.forget(failed).await;
                }
                retry = if started.elapsed() > RETRY_MAX { RETRY_MIN } else { (retry * 2).min(RETRY_MAX) };
                tokio::time::sleep(retry).await;
            }
        }
    }
}

async fn session(w: &Writer, pg: PgId, segment: usize, link: &NodeLink) -> End {
    let epoch = w.lock().core.epoch();
    let conn = match link.get().await {
        Ok(c) => c,
        Err(e) => return End::from_error(e, None),
    };
    let fail = |e: ClientError| End::from_error(e, Some(&conn));
    let (seg_epoch, position) = match link.status_on(&conn, epoch, pg, None).await {
        Ok(s) => (s.epoch, s.position),
        Err(e) => return fail(e),
    };
    if seg_epoch > epoch {
        return End::Fenced(format!("segment is at {seg_epoch}, this writer at {epoch}"));
    }
    let opened = tokio::time::timeout(REQUEST_TIMEOUT, conn.open_append()).await;
    let (mut tx, mut rx) = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(e),
        Err(_) => return fail(ClientError::Unexpected(format!("no append stream in {REQUEST_TIMEOUT:?}"))),
    };
    let scl = position.scl;
    // The segment may have restarted with less than it acked before: count what it holds now.
    w.on_position(segment, position, true);
    w.metrics.segment_up[pg.0 as usize][segment].store(1, Relaxed);
    tracing::info!(node = link.id, %pg, %scl, "segment session up; sending from its SCL");
    let sent: Mutex<VecDeque<Instant>> = Mutex::new(VecDeque::new());
    let acks = async {
        loop {
            let (position, _) = match rx.recv().await {
                Ok(a) if a.0.pg == pg => a,
                Ok((p, _)) => return fail(ClientError::Unexpected(format!("ack for {} on the {pg} stream", p.pg))),
                Err(e) => return fail(e),
            };
            if let Some(t) = sent.lock().expect("sent lock").pop_front() {
                w.metrics.ack_latency_us[pg.0 as usize][segment].record(t.elapsed().as_micros() as u64);
            }
            w.on_position(segment, position, false);
        }
    };
    let sends = async {
        let mut at = scl;
        let mut batches: Vec<Batch> = Vec::new();
        loop {
            if let Err(gap) = w.lock().core.poll_send(pg, at, &mut batches) {
                return End::Gap(format!("segment holds up to {}, frames after {} were released", gap.segment_at, gap.oldest_retained_after));
            }
            if batches.is_empty() {
                w.wake_segment(pg, segment).notified().await;
                continue;
            }
            for b in batches.drain(..) {
                sent.lock().expect("sent lock").push_back(Instant::now());
                at = b.last_lsn;
                if let Err(e) = tx.send_frame(b.frame).await {
                    return fail(e);
                }
            }
        }
    };
    let end = tokio::select! {
        end = acks => end,
        end = sends => end,
    };
    tx.finish();
    end
}
