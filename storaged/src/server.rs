//! The QUIC shell around the node: accepts mutual-TLS connections, runs each
//! stream as an ordered request/reply pipe (appends pipelined and acked in
//! order, pulls, status with claims and truncations, GetPage@LSN,
//! subscriptions), and serves /metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use borealis_net::frame::{read_frame_body, read_frame_len, write_message, FrameError};
use bytes::{Bytes, BytesMut};
use redo_core::log_stream::{LogStream, StreamPoll};
use redo_core::page_index::{PageIndex, IMAGE_BYTES_MAX};
use redo_core::record::ValidRecords;
use redo_core::segment_claim::{ClaimError, SegmentClaim, Step};
use redo_core::segment_log::{AppendError, Unserved};
use redo_core::wire::{ErrorCode, Message, SegmentPosition, Truncation};
use redo_core::{Epoch, Lsn, PageId, PgId};
use tokio::sync::{mpsc, watch};

use crate::config::AckMode;
use crate::metrics::Metrics;
use crate::node::{Node, Segment};
use crate::pages::{self, PageError};
use crate::store;

/// Replies a stream may have queued before it stops reading requests.
const REPLIES_INFLIGHT_MAX: usize = 1024;
/// Least time between two notifications of a flush subscription (see `push_notifications`).
const FLUSH_NOTIFY_INTERVAL: Duration = Duration::from_millis(10);

/// What the reply writer sends, in request order.
enum Reply {
    Now {
        msg: Message,
        received: Option<Instant>,
    },
    /// `ack = disk`: ack once the segment's flushed LSN reaches `last_lsn`.
    AfterFlush {
        seg: Arc<Segment>,
        last_lsn: Lsn,
        received: Instant,
    },
    /// Send the error, then close the stream.
    Close(Message),
    Subscribe(Vec<Arc<Segment>>, bool),
    /// A log stream: push the segment's records as they arrive, within the credit the
    /// request loop adds to `granted` (record bytes granted in all; closed when the
    /// reader goes or breaks the stream).
    Stream {
        seg: Arc<Segment>,
        stream: LogStream,
        granted: watch::Receiver<u64>,
        chunk_bytes_max: usize,
    },
}

fn error(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error { code, message: message.into() }
}

pub async fn serve_stream(node: Arc<Node>, send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let (tx, rx) = mpsc::channel(REPLIES_INFLIGHT_MAX);
    let writer = tokio::spawn(write_replies(send, rx, node.metrics.clone()));
    let frame_max = node.config.frame_bytes_max as usize;
    let mut subscribed = false;
    // On a log stream: the credit its reader granted in all.
    let mut granted: Option<watch::Sender<u64>> = None;
    loop {
        // Frames in flight on every stream of every client share one byte budget.
        let frame = match read_frame_len(&mut recv, frame_max).await {
            Ok(Some(len)) => match node.frame_budget.acquire_many(len as u32).await {
                Ok(permit) => read_frame_body(&mut recv, len).await.map(|m| Some((m, permit))),
                Err(_) => break, // closed: shutting down
            },
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        let reply = match frame {
            Ok(None) => break,
            Ok(Some((Message::Credit { bytes }, _))) if granted.is_some() => {
                granted.as_ref().expect("checked").send_modify(|g| *g += bytes as u64);
                continue;
            }
            Ok(Some(_)) if granted.is_some() => {
                // The pusher owns the reply side: ending the credit ends the stream.
                node.metrics.requests_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("refusing a request on a log stream (only Credit is allowed) and closing it");
                let _ = recv.stop(0u32.into());
                break;
            }
            Ok(Some(_)) if subscribed => Reply::Close(error(ErrorCode::Malformed, "no requests allowed on a subscription stream")),
            Ok(Some((Message::StreamLog { pg, after, credit, epoch }, _permit))) => match node.segments.get(&pg) {
                None => not_hosted(&node, pg),
                Some(seg) => {
                    let log = seg.log.lock().expect("segment lock");
                    match log.check_truncated_for(epoch) {
                        Err(missed) => Reply::Close(error(ErrorCode::Behind, missed.to_string())),
                        Ok(()) => {
                            let (tx, rx) = watch::channel(credit as u64);
                            granted = Some(tx);
                            let chunk_bytes_max = node.config.frame_bytes_max as usize / 2;
                            Reply::Stream { seg: seg.clone(), stream: LogStream::new(&log, after, credit), granted: rx, chunk_bytes_max }
                        }
                    }
                }
            },
            Ok(Some((msg, _permit))) => handle_request(&node, msg).await,
            Err(e @ (FrameError::Read(_) | FrameError::Io(_))) => {
                tracing::debug!(error = %e, "stream ended");
                break;
            }
            Err(e @ FrameError::TooLarge { .. }) => Reply::Close(error(ErrorCode::TooLarge, e.to_string())),
            Err(e @ FrameError::Malformed(_)) => Reply::Close(error(ErrorCode::Malformed, e.to_string())),
        };
        let close = matches!(reply, Reply::Close(_));
        if let Reply::Close(Message::Error { code, message }) = &reply {
            node.metrics.requests_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(?code, %message, "refusing request and closing its stream");
        }
        subscribed |= matches!(reply, Reply::Subscribe(..));
        if tx.send(reply).await.is_err() || close {
            let _ = recv.stop(0u32.into());
            break;
        }
    }
    // Ends a log stream's pusher (it waits for more credit) as well as the reply writer.
    drop((tx, granted));
    let _ = writer.await;
}

async fn handle_request(node: &Arc<Node>, msg: Message) -> Reply {
    let received = Instant::now();
    match msg {
        Message::Append { epoch, pg, horizon, records } => append(node, epoch, pg, horizon, records, received).await,
        Message::Pull { pg, after, upto, bytes_max, epoch } => match node.segments.get(&pg) {
            None => not_hosted(node, pg),
            Some(seg) => pull(node, seg.clone(), after, upto, bytes_max, epoch).await,
        },
        Message::Status { epoch, pg, truncate_above, history } => match node.segments.get(&pg) {
            None => not_hosted(node, pg),
            Some(seg) => status(node, seg, epoch, truncate_above, history).await,
        },
        Message::GetPage { pg, page, lsn, epoch } => match node.segments.get(&pg) {
            None => not_hosted(node, pg),
            Some(seg) => get_page(node, seg.clone(), page, lsn, epoch, received).await,
        },
        Message::Subscribe { pgs, every_scl } => {
            let mut segs = Vec::with_capacity(pgs.len());
            for pg in pgs {
                match node.segments.get(&pg) {
                    Some(s) => segs.push(s.clone()),
                    None => return not_hosted(node, pg),
                }
            }
            Reply::Subscribe(segs, every_scl)
        }
        other => Reply::Close(error(ErrorCode::Malformed, format!("unexpected request {:?}", std::mem::discriminant(&other)))),
    }
}

fn not_hosted(node: &Node, pg: PgId) -> Reply {
    let mut hosted: Vec<u32> = node.segments.keys().map(|p| p.0).collect();
    hosted.sort();
    Reply::Close(error(ErrorCode::NotHosted, format!("{pg} is not hosted on {} (hosts pgs {hosted:?})", node.node_id)))
}

async fn append(node: &Arc<Node>, epoch: Epoch, pg: PgId, horizon: Lsn, records: ValidRecords, received: Instant) -> Reply {
    let run = records.run();
    let Some(seg) = node.segments.get(&pg) else { return not_hosted(node, pg) };
    if let Err(reply) = claim(node, seg, epoch, None).await {
        return reply;
    }
    let deadline = received + Duration::from_millis(node.config.busy_wait_ms);
    let mut flushes = seg.flushes.subscribe();
    loop {
        // Checked under the segment lock: shutdown takes every lock once after
        // raising the flag, so no append lands after the final flush began.
        let result = seg.with_log(|log| {
            (!node.is_shutting_down()).then(|| {
                let appended = log.handle_append(epoch, &records);
                if appended.is_ok() {
                    log.note_horizon(horizon);
                }
                (appended, log.hot_bytes())
            })
        });
        let Some((result, unflushed)) = result else {
            return Reply::Close(error(ErrorCode::ShuttingDown, "storage node is shutting down"));
        };
        let err = match result {
            Ok(out) => {
                node.metrics.ingest_records.fetch_add(out.inserted as u64, Ordering::Relaxed);
                node.metrics.ingest_bytes.fetch_add(out.inserted_bytes as u64, Ordering::Relaxed);
                node.metrics.append_batch_records.record(run.count as u64);
                node.wake.wake_for(unflushed);
                debug_assert!(!out.epoch_raised, "epochs are persisted and raised before appends apply");
                return match node.config.ack {
                    AckMode::Memory => Reply::Now { msg: Message::Ack { position: out.position, batch_last_lsn: run.last_lsn }, received: Some(received) },
                    AckMode::Disk => Reply::AfterFlush { seg: seg.clone(), last_lsn: run.last_lsn, received },
                };
            }
            Err(e) => e,
        };
        let code = match err {
            AppendError::Busy { .. } | AppendError::Truncating => {
                node.metrics.appends_busy.fetch_add(1, Ordering::Relaxed);
                let left = deadline.saturating_duration_since(Instant::now());
                if !left.is_zero() && tokio::time::timeout(left, flushes.changed()).await.is_ok() {
                    continue;
                }
                return Reply::Now { msg: error(ErrorCode::Busy, err.to_string()), received: None };
            }
            AppendError::Joining => return joining(seg),
            AppendError::StaleEpoch(_) => ErrorCode::StaleEpoch,
            AppendError::DiskFailed(_) => ErrorCode::DiskFailed,
            AppendError::Conflict { .. } => ErrorCode::Conflict,
        };
        return Reply::Close(error(code, format!("{pg}: {err}")));
    }
}

/// Runs a claim on the segment at `epoch`, with the truncation `truncate` asks
/// for (`redo_core::segment_claim` decides; this executes its steps). An append
/// at an epoch the segment is not at yet claims it too. `Err` is the reply.
async fn claim(node: &Node, seg: &Arc<Segment>, epoch: Epoch, truncate: Option<(Lsn, Vec<Truncation>)>) -> Result<(), Reply> {
    // The common case, every append: the segment is at this epoch already (the claim would do nothing).
    if truncate.is_none() && seg.log.lock().expect("segment lock").epoch() == epoch {
        return Ok(());
    }
    let _turn = seg.claims.lock().await;
    let started = Instant::now();
    let mut claim = SegmentClaim::new(epoch, truncate);
    let mut files = None;
    let mut flushes = seg.flushes.subscribe();
    let mut step = seg.with_log(|log| claim.poll(log));
    let outcome = loop {
        step = match step {
            Step::Done(outcome) => break outcome,
            Step::PersistEpoch(state) => {
                let (dir, pg) = (node.data_dir().clone(), seg.id.pg);
                match blocking(move || store::write_epoch(&dir, pg, &state)).await {
                    Ok(()) => seg.with_log(|log| claim.on_persisted(log)),
                    Err(why) => seg.with_log(|log| claim.on_failed(log, why)),
                }
            }
            Step::HoldFiles => {
                files = Some(seg.files.write().await);
                seg.with_log(|log| claim.on_files_held(log))
            }
            Step::WaitFlush => {
                // Subscribed before the log was polled: a flush that ended since has marked it changed.
                let _ = flushes.changed().await;
                seg.with_log(|log| claim.poll(log))
            }
            Step::FindCut(scan) => {
                let seg2 = seg.clone();
                match blocking(move || store::find_cut(&seg2.reader, scan)).await {
                    Ok(cut) => seg.with_log(|log| claim.on_scanned(log, cut)),
                    Err(why) => seg.with_log(|log| claim.on_failed(log, why)),
                }
            }
            Step::CutFiles { offset, reindex, above } => {
                let (start, flushed_end, horizon) = {
                    let log = seg.log.lock().expect("segment lock");
                    (log.log_start(), log.flushed_end(), log.horizon())
                };
                let (dir, seg2, coalesce_records) = (node.data_dir().clone(), seg.clone(), node.config.coalesce_records);
                let cut = blocking(move || -> anyhow::Result<Option<PageIndex>> {
                    if let Some(offset) = offset {
                        store::cut_segment(&dir, seg2.id.pg, offset)?;
                    }
                    if !reindex {
                        return Ok(None);
                    }
                    let mut index = PageIndex::new(coalesce_records);
                    seg2.page_file.cut_above(above, &mut index)?;
                    index.retire(horizon);
                    store::index_pages(&seg2.reader, start, flushed_end, &mut index)?;
                    Ok(Some(index))
                });
                match cut.await {
                    Ok(index) => seg.with_log(|log| claim.on_files_cut(log, index)),
                    Err(why) => seg.with_log(|log| claim.on_failed(log, why)),
                }
            }
        };
    };
    if files.take().is_some() {
        // Appends held off by the truncation retry, the flusher takes what is dirty, and
        // log streams opened before it end (their position may not have moved).
        seg.wake_waiters();
        node.wake.wake();
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(claimed) => {
            if claimed.raised {
                tracing::info!(segment = %seg.id, %epoch, "segment moved to a new epoch");
            }
            if let Some(cut) = claimed.cut {
                node.metrics.truncations.fetch_add(1, Ordering::Relaxed);
                node.metrics.truncated_records.fetch_add(cut.records, Ordering::Relaxed);
                let scl = seg.log.lock().expect("segment lock").scl();
                tracing::info!(segment = %seg.id, %epoch, above = %cut.above, at = %cut.at, missed = cut.missed, records = cut.records, %scl, elapsed_ms, "truncated the segment log");
            }
            Ok(())
        }
        Err(e @ ClaimError::Stale(_)) => Err(Reply::Close(error(ErrorCode::StaleEpoch, format!("{}: {e}", seg.id.pg)))),
        Err(e @ ClaimError::NoEpoch) => Err(Reply::Close(error(ErrorCode::Malformed, e.to_string()))),
        Err(ClaimError::Joining) => Err(joining(seg)),
        Err(e @ (ClaimError::DiskFailed { .. } | ClaimError::PersistFailed { .. })) => {
            let lost = seg.log.lock().expect("segment lock").disk_failed().map(str::to_string);
            tracing::error!(segment = %seg.id, %epoch, error = %e, lost, elapsed_ms, "claim failed on disk");
            Err(Reply::Close(error(ErrorCode::DiskFailed, format!("{}: {e}", seg.id))))
        }
    }
}

/// A joining segment's refusal: retried later, so the stream stays open.
fn joining(seg: &Segment) -> Reply {
    Reply::Now { msg: error(ErrorCode::Joining, format!("{}: {}", seg.id, ClaimError::Joining)), received: None }
}

/// Runs blocking disk work off the network thread; its error as text.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(e) => Err(format!("disk task: {e}")),
    }
}

/// The segment's epoch, position and truncations. A nonzero `epoch` is a
/// claim; with `truncate_above`, the claimant also has the segment discard its
/// records above that LSN, durably, before the reply (see `claim`).
async fn status(node: &Node, seg: &Arc<Segment>, epoch: Epoch, truncate_above: Option<Lsn>, history: Vec<Truncation>) -> Reply {
    if epoch != Epoch(0) || truncate_above.is_some() {
        if let Err(reply) = claim(node, seg, epoch, truncate_above.map(|above| (above, history))).await {
            return reply;
        }
    }
    let log = seg.log.lock().expect("segment lock");
    if log.is_joining() {
        // It has no epoch state to report: a peer joining too must not count it as a member.
        return joining(seg);
    }
    let position = log.position().vouched(node.config.ack == AckMode::Disk);
    Reply::Now { msg: Message::StatusReply { epoch: log.epoch(), position, reclaimed: log.log_start().prev, truncations: log.truncations() }, received: None }
}

/// GetPage@LSN: the page as of `lsn`, from its newest image at or below
/// `lsn` plus its records up to `lsn`. Refusals that are about the page, not
/// the stream (Behind, a page that cannot be materialised), keep it open.
async fn get_page(node: &Node, seg: Arc<Segment>, page: PageId, lsn: Lsn, epoch: Epoch, received: Instant) -> Reply {
    node.metrics.get_page_requests.fetch_add(1, Ordering::Relaxed);
    let refuse = |code, message: String| Reply::Now { msg: error(code, message), received: None };
    let _files = seg.files.read().await;
    let (read, position) = {
        let log = seg.log.lock().expect("segment lock");
        if log.scl() < lsn {
            return refuse(ErrorCode::Behind, format!("{} SCL {} < requested {lsn}", seg.id, log.scl()));
        }
        if let Err(missed) = log.check_truncated_for(epoch) {
            return refuse(ErrorCode::Behind, missed.to_string());
        }
        if let Err(below) = log.check_readable(lsn) {
            return refuse(ErrorCode::BelowHorizon, below.to_string());
        }
        (log.page_read(page, lsn), log.position())
    };
    let read = match read {
        Ok(read) => read,
        Err(broken) => return refuse(ErrorCode::Conflict, format!("{}: {broken}", seg.id)),
    };
    let image = if pages::needs_io(&read) {
        let seg = seg.clone();
        tokio::task::spawn_blocking(move || pages::materialise(&seg.page_file, &seg.reader, page, &read))
            .await
            .unwrap_or_else(|e| Err(PageError::Io(anyhow::anyhow!("page read task: {e}"))))
    } else {
        pages::materialise(&seg.page_file, &seg.reader, page, &read)
    };
    let image = match image {
        Ok(image) => image,
        Err(PageError::Broken(broken, _)) => return refuse(ErrorCode::Conflict, format!("{}: {broken}", seg.id)),
        Err(PageError::Io(e)) => {
            tracing::error!(segment = %seg.id, %page, %lsn, error = %format!("{e:#}"), "GetPage read failed");
            return Reply::Close(error(ErrorCode::DiskFailed, format!("{}: GetPage {page}@{lsn}: {e:#}", seg.id)));
        }
    };
    let mut buf = Vec::new();
    image.encode(&mut buf);
    if buf.len() > IMAGE_BYTES_MAX {
        return refuse(ErrorCode::TooLarge, format!("{}: {page}@{lsn} is {} bytes, more than a reply carries", seg.id, buf.len()));
    }
    node.metrics.get_page_latency_us.record(received.elapsed().as_micros() as u64);
    Reply::Now { msg: Message::PageReply { position, image: Bytes::from(buf) }, received: None }
}

async fn pull(node: &Node, seg: Arc<Segment>, after: Lsn, upto: Lsn, bytes_max: u32, epoch: Epoch) -> Reply {
    let bytes_max = (bytes_max as usize).min(node.config.frame_bytes_max as usize / 2).max(1);
    let _files = seg.files.read().await;
    if let Err(missed) = seg.log.lock().expect("segment lock").check_truncated_for(epoch) {
        return Reply::Now { msg: error(ErrorCode::Behind, missed.to_string()), received: None };
    }
    match read_records(&seg, after, upto, bytes_max).await {
        Ok((position, last_lsn, records)) => Reply::Now { msg: Message::PullReply { position, last_lsn, records }, received: None },
        Err(msg) => Reply::Close(msg),
    }
}

/// The segment's records in `(after, upto]`, about `bytes_max` (at least one), with the
/// segment's position and the last record's LSN: from memory, or from the segment file
/// (the caller holds `files`). An error is the message that ends the exchange.
async fn read_records(seg: &Arc<Segment>, after: Lsn, upto: Lsn, bytes_max: usize) -> Result<(SegmentPosition, Lsn, Bytes), Message> {
    let mut parts = Vec::new();
    let (read, position) = {
        let log = seg.log.lock().expect("segment lock");
        (log.read(after, upto, bytes_max, &mut parts), log.position())
    };
    let (records, last_lsn) = match read {
        Ok(last) => {
            let mut buf = BytesMut::with_capacity(parts.iter().map(|p| p.len()).sum());
            parts.iter().for_each(|p| buf.extend_from_slice(p));
            (buf.freeze(), last)
        }
        Err(Unserved::Reclaimed(gone)) => return Err(error(ErrorCode::BelowHorizon, gone.to_string())),
        Err(Unserved::Disk(disk)) => {
            let seg2 = seg.clone();
            match blocking(move || store::read_from_disk(&seg2.reader, disk, bytes_max, |_| true)).await {
                Ok((buf, last)) => (Bytes::from(buf), last),
                Err(why) => {
                    tracing::error!(segment = %seg.id, error = %why, "read from disk failed");
                    return Err(error(ErrorCode::DiskFailed, format!("{}: read from disk: {why}", seg.id)));
                }
            }
        }
    };
    Ok((position, last_lsn, records))
}

async fn write_replies(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Reply>, metrics: Arc<Metrics>) {
    while let Some(reply) = rx.recv().await {
        let result = match reply {
            Reply::Now { msg, received } => {
                let r = write_message(&mut send, &msg).await;
                if let Some(t) = received {
                    metrics.ack_latency_us.record(t.elapsed().as_micros() as u64);
                }
                r
            }
            Reply::AfterFlush { seg, last_lsn, received } => {
                let msg = wait_flushed(&seg, last_lsn).await;
                let r = write_message(&mut send, &msg).await;
                metrics.ack_latency_us.record(received.elapsed().as_micros() as u64);
                r
            }
            Reply::Close(msg) => {
                let _ = write_message(&mut send, &msg).await;
                let _ = send.finish();
                return;
            }
            Reply::Subscribe(segs, every_scl) => return push_notifications(send, segs, every_scl).await,
            Reply::Stream { seg, stream, granted, chunk_bytes_max } => return push_log(send, seg, stream, granted, chunk_bytes_max, &metrics).await,
        };
        if result.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn wait_flushed(seg: &Segment, last_lsn: Lsn) -> Message {
    let mut flushes = seg.flushes.subscribe();
    loop {
        flushes.borrow_and_update();
        let position: SegmentPosition = *seg.position.borrow();
        // A batch above a hole cannot be flushed until the hole is filled:
        // answer now with the position, which shows it is not durable.
        if position.flushed_lsn >= last_lsn || position.scl < last_lsn {
            return Message::Ack { position: position.vouched(true), batch_last_lsn: last_lsn };
        }
        if let Some(why) = seg.log.lock().expect("segment lock").disk_failed() {
            return error(ErrorCode::DiskFailed, format!("{}: {why}", seg.id));
        }
        if flushes.changed().await.is_err() {
            return error(ErrorCode::ShuttingDown, "storage node is shutting down");
        }
    }
}

/// Pushes the flushed-LSN (and with `every_scl` the SCL) changes of `segs` until the
/// subscriber goes away: each write carries the latest position of every segment that
/// changed since the last one, so a busy node sends fewer, fuller packets instead of a
/// queue of stale positions. An SCL change alone rides along with the next flush.
/// Flushes are pushed at most every `FLUSH_NOTIFY_INTERVAL`: a replica needs them to
/// release what it retains and to know which segments could serve a pull, neither
/// urgent (its records come on a log stream), and with `ack = disk` every append is a
/// flush.
async fn push_notifications(mut send: quinn::SendStream, segs: Vec<Arc<Segment>>, every_scl: bool) {
    let wake = Arc::new(tokio::sync::Notify::new());
    let forwarders: Vec<_> = segs
        .iter()
        .map(|seg| match every_scl {
            true => forward(seg.position.subscribe(), wake.clone()),
            false => forward(seg.flushes.subscribe(), wake.clone()),
        })
        .collect();
    let mut latest: Vec<_> = segs.iter().map(|seg| seg.position.subscribe()).collect();
    latest.iter_mut().for_each(|w| w.mark_changed());
    let mut buf = Vec::new();
    loop {
        buf.clear();
        for w in &mut latest {
            if w.has_changed().unwrap_or(false) {
                Message::Notify { position: *w.borrow_and_update() }.encode(&mut buf);
            }
        }
        if !buf.is_empty() {
            if send.write_all(&buf).await.is_err() {
                break;
            }
            if !every_scl {
                tokio::select! {
                    _ = tokio::time::sleep(FLUSH_NOTIFY_INTERVAL) => {}
                    _ = send.stopped() => break,
                }
            }
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = send.stopped() => break,
        }
    }
    forwarders.iter().for_each(|f| f.abort());
}

/// Wakes `wake` at each change `watch` sees, until its sender is gone.
fn forward<T: Send + Sync + 'static>(mut watch: watch::Receiver<T>, wake: Arc<tokio::sync::Notify>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while watch.changed().await.is_ok() {
            wake.notify_one();
        }
    })
}

/// Pushes the segment's records to a log stream's reader as they arrive, within its
/// credit (`LogStream` decides what), until the reader goes, breaks the stream, or the
/// segment truncates its log (then `Behind`: the reader opens a new stream).
async fn push_log(
    mut send: quinn::SendStream,
    seg: Arc<Segment>,
    mut stream: LogStream,
    mut granted: watch::Receiver<u64>,
    chunk_bytes_max: usize,
    metrics: &Metrics,
) {
    let mut position = seg.position.subscribe();
    let mut buf = Vec::new();
    loop {
        let poll = stream.poll(&seg.log.lock().expect("segment lock"), chunk_bytes_max);
        let end = match poll {
            StreamPoll::Send { after, upto, bytes_max } => {
                let read = {
                    let _files = seg.files.read().await;
                    read_records(&seg, after, upto, bytes_max).await
                };
                match read {
                    Ok((at, last_lsn, records)) => {
                        stream.sent(last_lsn, records.len());
                        metrics.streamed_bytes.fetch_add(records.len() as u64, Ordering::Relaxed);
                        buf.clear();
                        Message::PullReply { position: at, last_lsn, records }.encode(&mut buf);
                        if send.write_all(&buf).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(msg) => msg,
                }
            }
            StreamPoll::Truncated => error(ErrorCode::Behind, format!("{} truncated its log: open a new stream", seg.id)),
            StreamPoll::Wait => {
                tokio::select! {
                    changed = position.changed() => if changed.is_err() { error(ErrorCode::ShuttingDown, "storage node is shutting down") } else { continue },
                    changed = granted.changed() => match changed {
                        Ok(()) => {
                            let total = *granted.borrow_and_update();
                            stream.granted(total);
                            continue;
                        }
                        Err(_) => error(ErrorCode::Malformed, "the reader ended the log stream (or sent something other than Credit on it)"),
                    },
                    _ = send.stopped() => return,
                }
            }
        };
        let _ = write_message(&mut send, &end).await;
        let _ = send.finish();
        return;
    }
}
