//! The writer's side of storage: one QUIC connection per storage node, and one sender per
//! segment that streams its PG's frames, feeds acks into the engine, and
//! resends what a returning segment missed.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use borealis_net::storage::{get_page_from, link_of, ClientError, NodeLink, PageUnavailable, StorageConn, REQUEST_TIMEOUT};
use redo_core::page::PageImage;
use redo_core::volume::Volume;
use redo_core::wire::ErrorCode;
use redo_core::writer::Batch;
use redo_core::{Lsn, PageId, PgId};

use crate::writer::Writer;

const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How often a segment that needs repair from its peers is looked at again.
const GAP_RETRY: Duration = Duration::from_secs(1);

/// GetPage@`lsn` from a segment of `pg`: those with a live session first, so
/// that a dead node costs no connection timeout.
pub async fn fetch_page(w: &Writer, volume: &Volume, links: &[Arc<NodeLink>], pg: PgId, page: PageId, lsn: Lsn) -> Result<PageImage, PageUnavailable> {
    let mut nodes: Vec<(usize, u32)> = volume.segments(pg).map(|n| n.id).enumerate().collect();
    nodes.sort_by_key(|&(s, _)| w.metrics.segment_up[pg.0 as usize][s].load(Relaxed) == 0);
    let order: Vec<(&NodeLink, Duration)> = nodes.iter().map(|&(_, id)| (link_of(links, id).as_ref(), REQUEST_TIMEOUT)).collect();
    let epoch = w.lock().core.epoch();
    get_page_from(order, epoch, pg, page, lsn).await
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
    // Claiming again with the recovery's truncation: a segment that missed the
    // takeover drops the old writer's records above VDL before taking new ones.
    let truncate_above = w.lock().core.truncated_above();
    let (seg_epoch, position) = match link.status_on(&conn, epoch, pg, Some(truncate_above), w.history.clone()).await {
        Ok(s) => (s.epoch, s.position),
        Err(e) => return fail(e),
    };
    if seg_epoch > epoch {
        return End::Fenced(format!("segment is at {seg_epoch}, this writer at {epoch}"));
    }
    w.on_claimed(pg, segment);
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
