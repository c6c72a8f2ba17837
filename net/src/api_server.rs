//! Server side of the client API (`redo_core::api`), shared by writerd and
//! replicad: one task reads a stream's pipelined requests, each runs in its
//! own task, and one task writes the replies back as they complete. A
//! `Follow` request turns the stream into a feed of the service's progress, on
//! which the follower may report its read point as it moves.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redo_core::api::{ApiErrorCode, Progress, Request, Response};
use redo_core::Lsn;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::frame::{read_frame_bytes, read_frame_len, FrameError};

/// Requests a stream may have in flight (read, not yet answered) before the
/// server stops reading it: bounds what one client can make the server hold.
const REQUESTS_INFLIGHT_MAX: usize = 4096;
/// A `Follow` feed repeats its progress at least this often: the writer's
/// heartbeat, whose silence tells replicas it is gone. The feed is a stream of
/// its own on a connection that carries no log, so large transfers cannot delay it.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(50);

/// What a daemon plugs into the shared request loop.
pub trait ApiService: Send + Sync + 'static {
    /// Answers one request that passed `Request::check` (never `Follow`).
    fn handle(self: Arc<Self>, req: Request) -> impl Future<Output = Response> + Send;
    /// The read point that `Follow` streams report.
    fn progress(&self) -> watch::Receiver<Progress>;
    /// Counts a refused request (bad limits or framing).
    fn refused(&self);
    /// Largest request frame accepted.
    fn request_bytes_max(&self) -> usize;
    /// A `Follow` stream (`reader`, unique per stream) reads at `read_point` (the writer's GC horizon).
    fn on_read_point(&self, _reader: u64, _read_point: Lsn) {}
    /// That stream closed.
    fn on_reader_gone(&self, _reader: u64) {}
}

/// Numbers `Follow` streams for `ApiService::on_read_point`.
static READERS: AtomicU64 = AtomicU64::new(0);

enum Reply {
    Now(u64, Response),
    Follow(u64),
}

pub fn error(code: ApiErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: message.into() }
}

pub async fn serve_stream<S: ApiService>(svc: Arc<S>, send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let (tx, rx) = mpsc::channel(REQUESTS_INFLIGHT_MAX);
    let writer = tokio::spawn(write_replies(send, rx, svc.progress()));
    let inflight = Arc::new(Semaphore::new(REQUESTS_INFLIGHT_MAX));
    loop {
        let Ok(permit) = inflight.clone().acquire_owned().await else { break };
        let body = match read_frame_len(&mut recv, svc.request_bytes_max()).await {
            Ok(Some(len)) => read_frame_bytes(&mut recv, len).await,
            Ok(None) => break,
            Err(e) => Err(e),
        };
        let refusal = match body.as_ref().map(|b| Request::decode(b)) {
            Ok(Ok((id, Request::Follow { read_point }))) => {
                // The stream is a feed from now on: only the follower's read points are read from it.
                let _ = tx.send(Reply::Follow(id)).await;
                drop(permit);
                follow_read_points(&*svc, &mut recv, read_point).await;
                break;
            }
            Ok(Ok((id, req))) => match req.check() {
                Ok(()) => {
                    let (svc, tx) = (svc.clone(), tx.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(Reply::Now(id, svc.handle(req).await)).await;
                        drop(permit);
                    });
                    continue;
                }
                Err(e) => {
                    svc.refused();
                    let _ = tx.send(Reply::Now(id, error(ApiErrorCode::Invalid, e.to_string()))).await;
                    continue;
                }
            },
            Ok(Err(e)) => error(ApiErrorCode::Malformed, format!("malformed request: {e}")),
            Err(e @ FrameError::TooLarge { .. }) => error(ApiErrorCode::TooLarge, e.to_string()),
            Err(e @ FrameError::Malformed(_)) => error(ApiErrorCode::Malformed, e.to_string()),
            Err(e) => {
                tracing::debug!(error = %e, "client stream ended");
                break;
            }
        };
        // The stream's framing is lost: answer with id 0 and close it.
        svc.refused();
        if let Response::Error { code, message } = &refusal {
            tracing::warn!(?code, %message, "refusing client stream");
        }
        let _ = tx.send(Reply::Now(0, refusal)).await;
        let _ = recv.stop(0u32.into());
        break;
    }
    drop(tx);
    let _ = writer.await;
}

/// Reads a follower's later `Follow` frames (its read point as it moves) until the
/// stream ends, reporting them as one reader's.
async fn follow_read_points<S: ApiService>(svc: &S, recv: &mut quinn::RecvStream, first: Option<Lsn>) {
    let reader = READERS.fetch_add(1, Ordering::Relaxed);
    let mut reads = false;
    let mut read_point = first;
    loop {
        if let Some(lsn) = read_point {
            svc.on_read_point(reader, lsn);
            reads = true;
        }
        let body = match read_frame_len(recv, svc.request_bytes_max()).await {
            Ok(Some(len)) => read_frame_bytes(recv, len).await,
            _ => break,
        };
        match body.as_ref().map(|b| Request::decode(b)) {
            Ok(Ok((_, Request::Follow { read_point: r }))) => read_point = r,
            _ => break, // anything else on a feed ends it
        }
    }
    if reads {
        svc.on_reader_gone(reader);
    }
}

async fn write_replies(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Reply>, progress: watch::Receiver<Progress>) {
    let mut buf = Vec::new();
    while let Some(reply) = rx.recv().await {
        buf.clear();
        let mut next = Some(reply);
        while let Some(reply) = next.take() {
            match reply {
                Reply::Now(id, resp) => resp.encode(id, &mut buf),
                Reply::Follow(id) => {
                    if send.write_all(&buf).await.is_ok() {
                        follow(send, id, progress).await;
                    }
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// Sends the current progress, then the latest one after every change (a
/// slow reader skips intermediate values) or `HEARTBEAT`, until the client goes away.
async fn follow(mut send: quinn::SendStream, id: u64, mut progress: watch::Receiver<Progress>) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        Response::Progress(progress.borrow_and_update().clone()).encode(id, &mut buf);
        if send.write_all(&buf).await.is_err() {
            return;
        }
        tokio::select! {
            changed = progress.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = send.stopped() => return,
        }
    }
    let _ = send.finish();
}
