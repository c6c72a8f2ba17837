//! Client library of the Borealis client API (`redo_core::api`): put, get,
//! delete and multi-key transactions against a writer. One QUIC connection,
//! one pipelined stream; any number of requests may be outstanding and each
//! caller waits only for its own reply.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redo_core::api::{ApiErrorCode, Progress, Request, RequestError, Response, REQUEST_BYTES_MAX};
use redo_core::page::PageOp;
use redo_core::Lsn;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::frame::{read_frame_bytes, read_frame_len};

/// Requests queued for the send task before callers wait.
const SEND_QUEUE_MAX: usize = 4096;

#[derive(Debug, Error, Clone)]
pub enum ApiError {
    #[error("connect to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("refused: {code:?}: {message}")]
    Refused { code: ApiErrorCode, message: String },
    #[error("invalid request: {0}")]
    Invalid(#[from] RequestError),
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

type Pending = Arc<Mutex<PendingState>>;

#[derive(Default)]
struct PendingState {
    waiters: HashMap<u64, oneshot::Sender<Result<Response, ApiError>>>,
    /// Set when the connection is gone: later calls fail at once.
    lost: Option<ApiError>,
}

/// A connection to a writer's client API. Cheap to clone; clones share the stream.
#[derive(Clone)]
pub struct ApiClient {
    next_id: Arc<AtomicU64>,
    pending: Pending,
    tx: mpsc::Sender<Vec<u8>>,
    conn: quinn::Connection,
}

impl ApiClient {
    pub async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> Result<Self, ApiError> {
        let fail = |e: &dyn std::fmt::Display| ApiError::Connect { addr, message: format!("{e:#}") };
        let conn = crate::connect(endpoint, addr).await.map_err(|e| fail(&e))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| fail(&e))?;
        let pending = Pending::default();
        let (tx, rx) = mpsc::channel(SEND_QUEUE_MAX);
        tokio::spawn(send_frames(send, rx, pending.clone()));
        tokio::spawn(read_replies(recv, pending.clone()));
        Ok(ApiClient { next_id: Arc::new(AtomicU64::new(1)), pending, tx, conn })
    }

    /// Sends `req` without the limit checks (the server applies them) and waits for its reply.
    pub async fn call(&self, req: &Request) -> Result<Response, ApiError> {
        if !req.encodable() {
            return Err(ApiError::Unexpected(format!("a key longer than {} bytes cannot be sent", u16::MAX)));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        req.encode(id, &mut frame);
        self.call_raw(id, frame).await
    }

    /// Sends pre-encoded bytes (for tests probing bad input) and waits for the reply to `id`.
    pub async fn call_raw(&self, id: u64, frame: Vec<u8>) -> Result<Response, ApiError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().expect("pending lock");
            if let Some(e) = &p.lost {
                return Err(e.clone());
            }
            p.waiters.insert(id, reply_tx);
        }
        if self.tx.send(frame).await.is_err() {
            self.pending.lock().expect("pending lock").waiters.remove(&id);
            return Err(ApiError::Lost("send task ended".into()));
        }
        reply_rx.await.map_err(|_| ApiError::Lost("reply dropped".into()))?
    }

    /// Commits `ops` atomically; returns the commit LSN once durable.
    pub async fn txn(&self, ops: Vec<PageOp>) -> Result<Lsn, ApiError> {
        let req = Request::Txn(ops);
        req.check()?;
        match self.call(&req).await? {
            Response::Committed { commit_lsn } => Ok(commit_lsn),
            other => Err(unexpected(other)),
        }
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<Lsn, ApiError> {
        self.txn(vec![PageOp::Put { key: key.to_vec(), value: value.to_vec() }]).await
    }

    pub async fn delete(&self, key: &[u8]) -> Result<Lsn, ApiError> {
        self.txn(vec![PageOp::Delete { key: key.to_vec() }]).await
    }

    /// The key's value and the durable LSN it was read at.
    pub async fn get(&self, key: &[u8]) -> Result<(Lsn, Option<Vec<u8>>), ApiError> {
        self.get_at(key, Lsn::ZERO).await
    }

    /// Like `get`, read at `min_lsn` or later: pass a commit LSN to read your own
    /// write on a replica (it waits until it has applied that far, or answers `Timeout`).
    pub async fn get_at(&self, key: &[u8], min_lsn: Lsn) -> Result<(Lsn, Option<Vec<u8>>), ApiError> {
        let req = Request::Get { key: key.to_vec(), min_lsn };
        req.check()?;
        match self.call(&req).await? {
            Response::Value { read_lsn, value } => Ok((read_lsn, value)),
            other => Err(unexpected(other)),
        }
    }

    /// Follows the server's read point on a stream of its own: VDL from a
    /// writer, the applied VDL from a replica.
    pub async fn follow(&self) -> Result<Follower, ApiError> {
        let lost = |e: &dyn std::fmt::Display| ApiError::Lost(e.to_string());
        let (mut send, recv) = self.conn.open_bi().await.map_err(|e| lost(&e))?;
        let mut frame = Vec::new();
        Request::Follow.encode(1, &mut frame);
        send.write_all(&frame).await.map_err(|e| lost(&e))?;
        Ok(Follower { _send: send, recv })
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}

fn unexpected(r: Response) -> ApiError {
    match r {
        Response::Error { code, message } => ApiError::Refused { code, message },
        other => ApiError::Unexpected(format!("{other:?}")),
    }
}

/// Fails every outstanding and later call with `err`.
fn lose(pending: &Pending, err: ApiError) {
    let mut p = pending.lock().expect("pending lock");
    p.lost.get_or_insert(err.clone());
    for (_, w) in p.waiters.drain() {
        let _ = w.send(Err(err.clone()));
    }
}

async fn send_frames(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Vec<u8>>, pending: Pending) {
    let mut buf = Vec::new();
    while let Some(frame) = rx.recv().await {
        // Coalesce whatever else is queued into one write.
        buf.clear();
        buf.extend_from_slice(&frame);
        while let Ok(more) = rx.try_recv() {
            buf.extend_from_slice(&more);
        }
        if let Err(e) = send.write_all(&buf).await {
            return lose(&pending, ApiError::Lost(e.to_string()));
        }
    }
    let _ = send.finish();
}

async fn read_replies(mut recv: quinn::RecvStream, pending: Pending) {
    let err = loop {
        let body = match read_frame_len(&mut recv, REQUEST_BYTES_MAX).await {
            Ok(Some(len)) => match read_frame_bytes(&mut recv, len).await {
                Ok(b) => b,
                Err(e) => break ApiError::Lost(e.to_string()),
            },
            Ok(None) => break ApiError::Lost("server finished the stream".into()),
            Err(e) => break ApiError::Lost(e.to_string()),
        };
        match Response::decode(&body) {
            // Id 0 answers a frame the server could not read, and it closes the stream: the
            // requests still in flight may or may not have been carried out.
            Ok((0, Response::Error { code, message })) => {
                break ApiError::Lost(format!("the server refused the stream ({code:?}: {message}); requests in flight have unknown outcomes"))
            }
            Ok((id, resp)) => {
                if let Some(w) = pending.lock().expect("pending lock").waiters.remove(&id) {
                    let _ = w.send(Ok(resp));
                }
            }
            Err(e) => break ApiError::Unexpected(format!("undecodable reply: {e}")),
        }
    };
    lose(&pending, err);
}

/// A `Follow` feed: the server's progress, newest first skipped to when behind.
pub struct Follower {
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Follower {
    pub async fn next(&mut self) -> Result<Progress, ApiError> {
        let len = match read_frame_len(&mut self.recv, REQUEST_BYTES_MAX).await {
            Ok(Some(len)) => len,
            Ok(None) => return Err(ApiError::Lost("server finished the feed".into())),
            Err(e) => return Err(ApiError::Lost(e.to_string())),
        };
        let body = read_frame_bytes(&mut self.recv, len).await.map_err(|e| ApiError::Lost(e.to_string()))?;
        match Response::decode(&body) {
            Ok((_, Response::Progress(p))) => Ok(p),
            Ok((_, other)) => Err(unexpected(other)),
            Err(e) => Err(ApiError::Unexpected(format!("undecodable progress: {e}"))),
        }
    }
}
