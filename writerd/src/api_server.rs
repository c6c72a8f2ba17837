//! The client API: QUIC + mutual TLS, one pipelined stream per client
//! connection (or several), each request answered by id as it completes.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use borealis_net::frame::{read_frame_bytes, read_frame_len, FrameError};
use redo_core::api::{ApiErrorCode, Request, Response};
use redo_core::page::PageOp;
use redo_core::volume::Volume;
use redo_core::writer::{Admit, ReadPlan};
use tokio::sync::mpsc;

use crate::segments::{fetch_page, NodeLink};
use crate::state::Writer;

/// Requests a stream may have in flight (read, not yet answered) before the
/// server stops reading it: bounds what one client can make the writer hold.
const REQUESTS_INFLIGHT_MAX: usize = 4096;

pub struct Api {
    pub writer: Arc<Writer>,
    pub volume: Volume,
    pub links: Vec<Arc<NodeLink>>,
    pub request_bytes_max: usize,
}

fn error(code: ApiErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: message.into() }
}

pub async fn serve_stream(api: Arc<Api>, send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let (tx, rx) = mpsc::channel(REQUESTS_INFLIGHT_MAX);
    let writer = tokio::spawn(write_replies(send, rx));
    let inflight = Arc::new(tokio::sync::Semaphore::new(REQUESTS_INFLIGHT_MAX));
    loop {
        let Ok(permit) = inflight.clone().acquire_owned().await else { break };
        let body = match read_frame_len(&mut recv, api.request_bytes_max).await {
            Ok(Some(len)) => read_frame_bytes(&mut recv, len).await,
            Ok(None) => break,
            Err(e) => Err(e),
        };
        let refusal = match body.as_ref().map(|b| Request::decode(b)) {
            Ok(Ok((id, req))) => match req.check() {
                Ok(()) => {
                    let (api, tx) = (api.clone(), tx.clone());
                    tokio::spawn(async move {
                        let _ = tx.send((id, handle(&api, req).await)).await;
                        drop(permit);
                    });
                    continue;
                }
                Err(e) => {
                    api.writer.metrics.requests_refused.fetch_add(1, Relaxed);
                    let _ = tx.send((id, error(ApiErrorCode::Invalid, e.to_string()))).await;
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
        api.writer.metrics.requests_refused.fetch_add(1, Relaxed);
        if let Response::Error { code, message } = &refusal {
            tracing::warn!(?code, %message, "refusing client stream");
        }
        let _ = tx.send((0, refusal)).await;
        let _ = recv.stop(0u32.into());
        break;
    }
    drop(tx);
    let _ = writer.await;
}

async fn write_replies(mut send: quinn::SendStream, mut rx: mpsc::Receiver<(u64, Response)>) {
    let mut buf = Vec::new();
    while let Some((id, resp)) = rx.recv().await {
        buf.clear();
        resp.encode(id, &mut buf);
        while let Ok((id, resp)) = rx.try_recv() {
            resp.encode(id, &mut buf);
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn handle(api: &Api, req: Request) -> Response {
    let w = &api.writer;
    let start = Instant::now();
    match req {
        Request::Txn(ops) => {
            let r = commit(api, &ops).await;
            match &r {
                Response::Committed { .. } => {
                    w.metrics.commits.fetch_add(1, Relaxed);
                    w.metrics.commit_latency_us.record(start.elapsed().as_micros() as u64);
                }
                _ => {
                    w.metrics.commit_errors.fetch_add(1, Relaxed);
                }
            }
            r
        }
        Request::Get(key) => {
            w.metrics.reads.fetch_add(1, Relaxed);
            get(api, key).await
        }
    }
}

fn unavailable(why: String) -> Response {
    error(ApiErrorCode::Unavailable, format!("writer unavailable, the write may or may not have committed: {why}"))
}

async fn commit(api: &Api, ops: &[PageOp]) -> Response {
    let w = &api.writer;
    loop {
        let (admit, committed) = {
            let mut g = w.lock();
            // Checked under the lock: `fence` clears waiters under it.
            if let Some(why) = w.is_fenced() {
                return error(ApiErrorCode::Unavailable, format!("writer deposed, nothing was written: {why}"));
            }
            if w.stopping.load(Relaxed) {
                return error(ApiErrorCode::Unavailable, "writer stopping, nothing was written");
            }
            let admit = g.core.submit(ops);
            let committed = match &admit {
                Admit::Allocated { commit_lsn, .. } => Writer::wait_in(&mut g, *commit_lsn),
                _ => None,
            };
            (admit, committed)
        };
        match admit {
            Admit::Allocated { commit_lsn, pgs } => {
                pgs.into_iter().for_each(|pg| w.wake_pg(pg));
                if let Some(rx) = committed {
                    if rx.await.is_err() {
                        return unavailable(w.is_fenced().unwrap_or_else(|| "stopped".into()));
                    }
                }
                return Response::Committed { commit_lsn };
            }
            Admit::NeedPages(pages) => {
                for (pg, page, lsn) in pages {
                    w.metrics.page_fetches.fetch_add(1, Relaxed);
                    match fetch_page(w, &api.volume, &api.links, pg, page, lsn).await {
                        Ok(image) => w.lock().core.learn_page(image),
                        Err(e) => return error(ApiErrorCode::Unavailable, format!("nothing was written: {e}")),
                    }
                }
            }
            Admit::Stalled { vdl } => {
                w.metrics.lal_stalls.fetch_add(1, Relaxed);
                if let Err(e) = w.wait_vdl(vdl).await {
                    return error(ApiErrorCode::Unavailable, format!("nothing was written: {}", e.0));
                }
            }
        }
    }
}

async fn get(api: &Api, key: Vec<u8>) -> Response {
    let w = &api.writer;
    let plan = w.lock().core.read(&key);
    match plan {
        ReadPlan::Cached { lsn, value } => match w.wait_vdl(lsn).await {
            Ok(()) => Response::Value { read_lsn: lsn, value },
            Err(e) => unavailable(e.0),
        },
        ReadPlan::Fetch { pg, page, lsn } => {
            if let Err(e) = w.wait_vdl(lsn).await {
                return unavailable(e.0);
            }
            w.metrics.page_fetches.fetch_add(1, Relaxed);
            match fetch_page(w, &api.volume, &api.links, pg, page, lsn).await {
                Ok(image) => {
                    let value = image.entries.get(&key).cloned();
                    w.lock().core.learn_page(image);
                    Response::Value { read_lsn: lsn, value }
                }
                Err(e) => error(ApiErrorCode::Unavailable, e),
            }
        }
    }
}
