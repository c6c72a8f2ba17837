//! Client library of the Borealis client API (`redo_core::api`): put, get,
//! delete and multi-key transactions against a writer. One QUIC connection,
//! one pipelined stream; any number of requests may be outstanding and each
//! caller waits only for its own reply.
//!
//! `ClusterClient` adds failover: it knows every endpoint of a cluster (the
//! writer and the replicas, any of which may be promoted), finds the current
//! writer with `find_writer`, and re-sends a call whose outcome it did not
//! learn to whichever server is the writer next.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redo_core::api::{ApiErrorCode, Progress, Promoted, Request, RequestError, Response, Role, REQUEST_BYTES_MAX};
use redo_core::page::PageOp;
use redo_core::{Epoch, Lsn};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;

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
        self.follow_reading(None).await
    }

    /// `follow` for a follower that reads at `read_point` (a replica): the writer keeps
    /// its GC horizon at or below it, and below the points `Follower::report` sends later.
    pub async fn follow_reading(&self, read_point: Option<Lsn>) -> Result<Follower, ApiError> {
        let (send, recv) = self.conn.open_bi().await.map_err(|e| ApiError::Lost(e.to_string()))?;
        let mut follower = Follower { send, recv };
        follower.send_follow(read_point).await?;
        Ok(follower)
    }

    /// Who the server is: the writer (of which epoch) or a replica.
    pub async fn role(&self) -> Result<Role, ApiError> {
        match self.call(&Request::Role).await? {
            Response::RoleIs(role) => Ok(role),
            other => Err(unexpected(other)),
        }
    }

    /// Admin, to a replica: take over the volume now. Returns once it accepts writes.
    pub async fn promote(&self) -> Result<Promoted, ApiError> {
        match self.call(&Request::Promote).await? {
            Response::Promoted(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Whether the connection is gone (every call fails at once).
    pub fn is_lost(&self) -> bool {
        self.pending.lock().expect("pending lock").lost.is_some() || self.conn.close_reason().is_some()
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
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Follower {
    /// Tells the server the follower now reads at `read_point`.
    pub async fn report(&mut self, read_point: Lsn) -> Result<(), ApiError> {
        self.send_follow(Some(read_point)).await
    }

    async fn send_follow(&mut self, read_point: Option<Lsn>) -> Result<(), ApiError> {
        let mut frame = Vec::new();
        Request::Follow { read_point }.encode(1, &mut frame);
        self.send.write_all(&frame).await.map_err(|e| ApiError::Lost(e.to_string()))
    }

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

/// How long `find_writer` waits for each address's answer, connection included.
pub const ROLE_TIMEOUT: Duration = Duration::from_millis(200);

/// Asks `Role` of every address at once (each on a fresh connection, at most
/// `ROLE_TIMEOUT` each) and returns the writer with the highest epoch. A fenced
/// writer answers `writer: false`; one that does not answer in time is skipped.
pub async fn find_writer(endpoint: &quinn::Endpoint, addrs: &[SocketAddr]) -> Option<(SocketAddr, Role)> {
    find_writer_within(endpoint, addrs, ROLE_TIMEOUT).await
}

/// `find_writer` with a timeout of the caller's choice.
pub async fn find_writer_within(endpoint: &quinn::Endpoint, addrs: &[SocketAddr], timeout: Duration) -> Option<(SocketAddr, Role)> {
    let mut asks = JoinSet::new();
    for &addr in addrs {
        let endpoint = endpoint.clone();
        asks.spawn(async move {
            let ask = async {
                let client = ApiClient::connect(&endpoint, addr).await?;
                let role = client.role().await;
                client.close();
                role
            };
            (addr, tokio::time::timeout(timeout, ask).await)
        });
    }
    let mut best: Option<(SocketAddr, Role)> = None;
    while let Some(answer) = asks.join_next().await {
        if let Ok((addr, Ok(Ok(role)))) = answer {
            if role.writer && best.as_ref().is_none_or(|(_, b)| role.epoch > b.epoch) {
                best = Some((addr, role));
            }
        }
    }
    best
}

/// How a `ClusterClient` waits, suspects and retries.
#[derive(Clone, Debug)]
pub struct FailoverConfig {
    /// Longest a call may take, retries included; past it the call fails with `ClusterError::Unknown`.
    pub deadline: Duration,
    /// A reply slower than this puts the writer in doubt: every endpoint is asked who the
    /// writer is (the call keeps waiting for its reply meanwhile).
    pub suspect_after: Duration,
    /// Between two `Role` asks of one endpoint while the writer is in doubt.
    pub probe_interval: Duration,
    /// Longest one `Role` ask may take (a dead server never answers; the connection included).
    pub role_timeout: Duration,
    /// How long a doubt lasts after the last slow call.
    pub doubt: Duration,
    /// Longest pause before re-sending a call that failed while no other writer was found
    /// (it starts at 1 ms and doubles).
    pub backoff_max: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            deadline: Duration::from_secs(10),
            suspect_after: Duration::from_millis(10),
            probe_interval: Duration::from_millis(5),
            role_timeout: Duration::from_millis(200),
            doubt: Duration::from_millis(500),
            backoff_max: Duration::from_millis(50),
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(1);

#[derive(Debug, Error, Clone)]
pub enum ClusterError {
    #[error("no writer among {addrs:?} within {waited:?}")]
    NoWriter { addrs: Vec<SocketAddr>, waited: Duration },
    /// The writer refused the request as such (limits, framing): retrying would not help. Nothing was written.
    #[error("refused: {code:?}: {message}")]
    Refused { code: ApiErrorCode, message: String },
    #[error("invalid request: {0}")]
    Invalid(#[from] RequestError),
    /// No answer within the deadline: a write may or may not have committed.
    #[error("outcome unknown after {attempts} attempts within {deadline:?} (a write may or may not have committed); last: {last}")]
    Unknown { attempts: u32, deadline: Duration, last: String },
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

/// A transaction the writer acknowledged: durable at `commit_lsn` in `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    pub commit_lsn: Lsn,
    /// The writer that acknowledged it.
    pub writer: WriterInfo,
    /// Sends it took (1 without failover).
    pub attempts: u32,
}

/// The writer a `ClusterClient` sends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterInfo {
    pub addr: SocketAddr,
    pub epoch: Epoch,
    /// When the client switched to it.
    pub since: Instant,
}

struct Writer {
    info: WriterInfo,
    /// Bumped at every switch, so that a failure reported against an old writer is ignored.
    generation: u64,
    client: ApiClient,
}

#[derive(Default)]
struct Doubt {
    /// Slow replies put the writer in doubt until then.
    until: Option<Instant>,
    /// The writer of this generation failed (connection lost, `Unavailable`): find one, even itself again.
    failed: Option<u64>,
}

struct Shared {
    endpoint: quinn::Endpoint,
    config: FailoverConfig,
    writer: watch::Sender<Option<Arc<Writer>>>,
    doubt: Mutex<Doubt>,
    /// Wakes the probes when a doubt starts.
    doubted: Notify,
    /// One switch at a time.
    switching: tokio::sync::Mutex<()>,
}

struct Inner {
    shared: Arc<Shared>,
    probes: JoinSet<()>,
}

/// A client of a whole cluster that follows the writer through failovers.
///
/// It sends every call to the current writer. A call that fails with a lost
/// connection or `Unavailable`, or gets no reply within `suspect_after`, puts
/// the writer in doubt: one probe per endpoint asks `Role` every
/// `probe_interval` and the client switches to a writer of a higher epoch as
/// soon as one answers (or, after a failure, to any writer, the same one on a
/// fresh connection included). Calls in flight on the old writer are then
/// re-sent to the new one; a call that fails while no other writer is known is
/// re-sent after a backoff (1 ms doubling to `backoff_max`), until `deadline`.
///
/// Semantics. A write is reported committed only when a writer answered
/// `Committed`. A re-sent write may therefore have been carried out twice, or
/// once by a writer that was then deposed: our transactions are blind puts and
/// deletes, so applying one again leaves the same state (unless another client
/// wrote the same keys in between; order conflicting writes by waiting for
/// each one's outcome). Recovery truncates the log at a consistency point, so
/// a write whose outcome was never learnt is afterwards either wholly present
/// or wholly absent, never torn; `ClusterError::Unknown` reports such a write.
/// Reads go to the writer too and are re-sent the same way.
#[derive(Clone)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.probes.abort_all();
        if let Some(w) = self.shared.writer.borrow().as_ref() {
            w.client.close();
        }
    }
}

enum Attempt {
    Reply(Response),
    Lost(ApiError),
    Replaced,
    Deadline,
}

impl ClusterClient {
    /// Finds the writer among `addrs` (the volume's writer address and every replica's)
    /// and connects to it; waits up to `config.deadline` for one.
    pub async fn connect(endpoint: &quinn::Endpoint, addrs: &[SocketAddr], config: FailoverConfig) -> Result<Self, ClusterError> {
        assert!(!addrs.is_empty(), "a cluster client needs at least one endpoint");
        let (writer, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            endpoint: endpoint.clone(),
            config: config.clone(),
            writer,
            doubt: Mutex::new(Doubt::default()),
            doubted: Notify::new(),
            switching: tokio::sync::Mutex::new(()),
        });
        let mut probes = JoinSet::new();
        for &addr in addrs {
            probes.spawn(probe(shared.clone(), addr));
        }
        let client = ClusterClient { inner: Arc::new(Inner { shared: shared.clone(), probes }) };
        shared.failed(0);
        let mut rx = shared.writer.subscribe();
        let found = tokio::time::timeout(config.deadline, rx.wait_for(|w| w.is_some())).await.is_ok_and(|r| r.is_ok());
        if !found {
            return Err(ClusterError::NoWriter { addrs: addrs.to_vec(), waited: config.deadline });
        }
        Ok(client)
    }

    /// The writer calls go to now.
    pub fn writer(&self) -> Option<WriterInfo> {
        self.inner.shared.writer.borrow().as_ref().map(|w| w.info)
    }

    /// Commits `ops` atomically on the current writer, following failovers; see the type's doc for the semantics.
    pub async fn txn(&self, ops: Vec<PageOp>) -> Result<Committed, ClusterError> {
        let req = Request::Txn(ops);
        req.check()?;
        match self.call(&req).await? {
            (Response::Committed { commit_lsn }, writer, attempts) => Ok(Committed { commit_lsn, writer, attempts }),
            (other, ..) => Err(ClusterError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<Committed, ClusterError> {
        self.txn(vec![PageOp::Put { key: key.to_vec(), value: value.to_vec() }]).await
    }

    pub async fn delete(&self, key: &[u8]) -> Result<Committed, ClusterError> {
        self.txn(vec![PageOp::Delete { key: key.to_vec() }]).await
    }

    /// The key's value on the current writer and the durable LSN it was read at.
    pub async fn get(&self, key: &[u8]) -> Result<(Lsn, Option<Vec<u8>>), ClusterError> {
        let req = Request::Get { key: key.to_vec(), min_lsn: Lsn::ZERO };
        req.check()?;
        match self.call(&req).await? {
            (Response::Value { read_lsn, value }, ..) => Ok((read_lsn, value)),
            (other, ..) => Err(ClusterError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends `req` to the writer until one answers it (anything but `Unavailable`) or the deadline passes.
    async fn call(&self, req: &Request) -> Result<(Response, WriterInfo, u32), ClusterError> {
        let shared = &self.inner.shared;
        let deadline = tokio::time::Instant::now() + shared.config.deadline;
        let mut attempts = 0u32;
        let mut backoff = BACKOFF_MIN;
        let mut last = String::from("no writer known");
        let unknown = |attempts, last: String| ClusterError::Unknown { attempts, deadline: shared.config.deadline, last };
        loop {
            let current = shared.writer.borrow().clone();
            let Some(w) = current else {
                shared.failed(0);
                let mut rx = shared.writer.subscribe();
                if tokio::time::timeout_at(deadline, rx.wait_for(|w| w.is_some())).await.is_err() {
                    return Err(unknown(attempts, last));
                }
                continue;
            };
            attempts += 1;
            match self.attempt(&w, req, deadline).await {
                Attempt::Reply(Response::Error { code: code @ (ApiErrorCode::Unavailable | ApiErrorCode::Timeout), message }) => {
                    if code == ApiErrorCode::Unavailable {
                        shared.failed(w.generation);
                    }
                    last = format!("{} answered {code:?}: {message}", w.info.addr);
                }
                Attempt::Reply(Response::Error { code, message }) => return Err(ClusterError::Refused { code, message }),
                Attempt::Reply(resp) => return Ok((resp, w.info, attempts)),
                Attempt::Lost(e) => {
                    shared.failed(w.generation);
                    last = format!("{}: {e}", w.info.addr);
                }
                Attempt::Replaced => {
                    backoff = BACKOFF_MIN;
                    continue;
                }
                Attempt::Deadline => return Err(unknown(attempts, format!("{last}; then no reply from {}", w.info.addr))),
            }
            // Re-send as soon as another writer is known, else after the backoff.
            let replaced = shared.replaced(w.generation);
            tokio::select! {
                _ = replaced => backoff = BACKOFF_MIN,
                _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(shared.config.backoff_max),
                _ = tokio::time::sleep_until(deadline) => return Err(unknown(attempts, last)),
            }
        }
    }

    async fn attempt(&self, w: &Writer, req: &Request, deadline: tokio::time::Instant) -> Attempt {
        let shared = &self.inner.shared;
        let call = w.client.call(req);
        tokio::pin!(call);
        let slow = tokio::time::sleep(shared.config.suspect_after);
        tokio::pin!(slow);
        let replaced = shared.replaced(w.generation);
        tokio::pin!(replaced);
        let mut doubted = false;
        loop {
            tokio::select! {
                r = &mut call => return match r {
                    Ok(resp) => Attempt::Reply(resp),
                    Err(e) => Attempt::Lost(e),
                },
                _ = &mut slow, if !doubted => {
                    doubted = true;
                    shared.doubt();
                }
                _ = &mut replaced => return Attempt::Replaced,
                _ = tokio::time::sleep_until(deadline) => return Attempt::Deadline,
            }
        }
    }

    /// Closes the connection to the writer and stops probing (also done when the last clone is dropped).
    pub fn close(&self) {
        if let Some(w) = self.inner.shared.writer.borrow().as_ref() {
            w.client.close();
        }
    }
}

impl Shared {
    fn generation(&self) -> u64 {
        self.writer.borrow().as_ref().map_or(0, |w| w.generation)
    }

    /// Waits until the writer of `generation` has been replaced.
    async fn replaced(&self, generation: u64) {
        let mut rx = self.writer.subscribe();
        let _ = rx.wait_for(|w| w.as_ref().map_or(0, |w| w.generation) != generation).await;
    }

    /// A reply was slow: ask around for a while.
    fn doubt(&self) {
        self.doubt.lock().expect("doubt lock").until = Some(Instant::now() + self.config.doubt);
        self.doubted.notify_waiters();
    }

    /// The writer of `generation` failed (0: none is known): find one.
    fn failed(&self, generation: u64) {
        if generation != self.generation() {
            return;
        }
        self.doubt.lock().expect("doubt lock").failed = Some(generation);
        self.doubted.notify_waiters();
    }

    /// Returns at once while the writer is in doubt, else when a doubt starts.
    async fn in_doubt(&self) {
        loop {
            let notified = self.doubted.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let d = self.doubt.lock().expect("doubt lock");
                if d.failed.is_some() || d.until.is_some_and(|u| Instant::now() < u) {
                    return;
                }
            }
            notified.await;
        }
    }

    /// `addr` answered `role` on `conn`: switch to it if it is a newer writer, or any writer
    /// after a failure. Calls go on the same connection (no second handshake): a replica
    /// serves transactions on connections it accepted before its promotion too.
    async fn consider(&self, addr: SocketAddr, role: &Role, conn: &ApiClient) {
        if !role.writer {
            return;
        }
        let _one = self.switching.lock().await;
        let current = self.writer.borrow().clone();
        let failed = self.doubt.lock().expect("doubt lock").failed == Some(current.as_ref().map_or(0, |w| w.generation));
        let newer = match &current {
            None => true,
            Some(w) => role.epoch > w.info.epoch || (failed && role.epoch >= w.info.epoch),
        };
        if !newer {
            return;
        }
        let client = if !conn.is_lost() {
            conn.clone()
        } else {
            match tokio::time::timeout(self.config.role_timeout, ApiClient::connect(&self.endpoint, addr)).await {
                Ok(Ok(c)) => c,
                _ => return,
            }
        };
        let generation = current.as_ref().map_or(0, |w| w.generation) + 1;
        let info = WriterInfo { addr, epoch: role.epoch, since: Instant::now() };
        tracing::info!(%addr, epoch = %role.epoch, "client switches to the writer");
        self.writer.send_replace(Some(Arc::new(Writer { info, generation, client })));
        *self.doubt.lock().expect("doubt lock") = Doubt::default();
        if let Some(old) = current.filter(|old| old.client.conn.stable_id() != conn.conn.stable_id()) {
            // Fails what is still in flight there at once: those calls are re-sent.
            old.client.close();
        }
    }
}

/// Asks `addr` who it is every `probe_interval` while the writer is in doubt, on a connection kept between asks.
async fn probe(shared: Arc<Shared>, addr: SocketAddr) {
    let mut conn: Option<ApiClient> = None;
    loop {
        shared.in_doubt().await;
        let started = tokio::time::Instant::now();
        let ask = async {
            let client = match conn.take() {
                Some(c) if !c.is_lost() => c,
                _ => ApiClient::connect(&shared.endpoint, addr).await?,
            };
            let role = client.role().await;
            Ok::<_, ApiError>((client, role?))
        };
        match tokio::time::timeout(shared.config.role_timeout, ask).await {
            Ok(Ok((client, role))) => {
                shared.consider(addr, &role, &client).await;
                conn = Some(client);
            }
            Ok(Err(e)) => tracing::debug!(%addr, error = %e, "role probe failed"),
            Err(_) => tracing::debug!(%addr, "role probe timed out"),
        }
        tokio::time::sleep_until(started + shared.config.probe_interval).await;
    }
}
