//! Client side of the storage protocol, for writers, replicas, tools and tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use bytes::Bytes;
use redo_core::page::PageImage;
use redo_core::volume::Volume;
use redo_core::wire::{encode_append, ErrorCode, Message, SegmentPosition, Truncation, FRAME_BYTES_MAX};
use redo_core::{Epoch, Lsn, PageId, PgId};
use thiserror::Error;

use crate::frame::{read_message, write_message, FrameError};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connect to storage node {addr}: {source:#}")]
    Connect { addr: SocketAddr, source: anyhow::Error },
    #[error("open stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    #[error("send: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("receive: {0}")]
    Frame(#[from] FrameError),
    #[error("storage node refused: {code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("storage node closed the stream")]
    Closed,
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

/// A connection to one storage node.
#[derive(Clone)]
pub struct StorageConn {
    pub conn: quinn::Connection,
}

pub use redo_core::takeover::SegmentStatus;

/// One segment's records from a pull.
#[derive(Debug)]
pub struct Pulled {
    pub position: SegmentPosition,
    pub last_lsn: Lsn,
    pub records: Bytes,
}

async fn next(recv: &mut quinn::RecvStream) -> Result<Message, ClientError> {
    match read_message(recv, FRAME_BYTES_MAX).await? {
        Some(Message::Error { code, message }) => Err(ClientError::Refused { code, message }),
        Some(m) => Ok(m),
        None => Err(ClientError::Closed),
    }
}

impl StorageConn {
    pub async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> Result<Self, ClientError> {
        let conn = crate::connect(endpoint, addr).await.map_err(|source| ClientError::Connect { addr, source })?;
        Ok(StorageConn { conn })
    }

    /// Opens a pipelined append stream: send batches on one half, read acks in order on the other.
    pub async fn open_append(&self) -> Result<(AppendSender, AppendReceiver), ClientError> {
        let (send, recv) = self.conn.open_bi().await?;
        Ok((AppendSender { send, buf: Vec::new() }, AppendReceiver { recv }))
    }

    /// Records with `after < lsn <= upto` (a prefix of them, about `bytes_max`).
    pub async fn pull(&self, pg: PgId, after: Lsn, upto: Lsn, bytes_max: u32) -> Result<Pulled, ClientError> {
        self.pull_at(Epoch(0), pg, after, upto, bytes_max).await
    }

    /// `pull`, answered only by a segment that recorded `epoch`'s truncation (`Behind` otherwise).
    pub async fn pull_at(&self, epoch: Epoch, pg: PgId, after: Lsn, upto: Lsn, bytes_max: u32) -> Result<Pulled, ClientError> {
        match self.request(&Message::Pull { pg, after, upto, bytes_max, epoch }).await? {
            Message::PullReply { position, last_lsn, records } => Ok(Pulled { position, last_lsn, records }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The segment's epoch, position and truncations. A nonzero `epoch` claims
    /// it first; `truncate_above` then has the segment discard what lies above.
    pub async fn status(&self, epoch: Epoch, pg: PgId, truncate_above: Option<Lsn>) -> Result<SegmentStatus, ClientError> {
        self.status_truncating(epoch, pg, truncate_above, Vec::new()).await
    }

    /// `status` with the older truncations the claimant knows of (see `Message::Status`).
    pub async fn status_truncating(&self, epoch: Epoch, pg: PgId, truncate_above: Option<Lsn>, history: Vec<Truncation>) -> Result<SegmentStatus, ClientError> {
        match self.request(&Message::Status { epoch, pg, truncate_above, history }).await? {
            Message::StatusReply { epoch, position, reclaimed, truncations } if position.pg == pg => {
                Ok(SegmentStatus { epoch, position, reclaimed, truncations })
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Page `page` of `pg` as of `lsn` (GetPage@LSN), decoded and checked.
    pub async fn get_page(&self, pg: PgId, page: PageId, lsn: Lsn) -> Result<(SegmentPosition, PageImage), ClientError> {
        self.get_page_at(Epoch(0), pg, page, lsn).await
    }

    /// `get_page`, answered only by a segment that recorded `epoch`'s truncation (`Behind` otherwise).
    pub async fn get_page_at(&self, epoch: Epoch, pg: PgId, page: PageId, lsn: Lsn) -> Result<(SegmentPosition, PageImage), ClientError> {
        match self.request(&Message::GetPage { pg, page, lsn, epoch }).await? {
            Message::PageReply { position, image } => {
                let image = PageImage::decode(&image).map_err(|e| ClientError::Unexpected(format!("page image: {e}")))?;
                if image.page != page || image.lsn > lsn {
                    return Err(ClientError::Unexpected(format!("asked {page}@{lsn}, got {}@{}", image.page, image.lsn)));
                }
                Ok((position, image))
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// One request on its own stream, one reply.
    async fn request(&self, msg: &Message) -> Result<Message, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_message(&mut send, msg).await?;
        let _ = send.finish();
        next(&mut recv).await
    }

    /// Opens a log stream of `pg`'s records after `after`, with `credit` bytes to start
    /// with, answered only by a segment that recorded `epoch`'s truncation (as `pull_at`).
    pub async fn stream_log(&self, epoch: Epoch, pg: PgId, after: Lsn, credit: u32) -> Result<LogStreamReader, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_message(&mut send, &Message::StreamLog { pg, after, credit, epoch }).await?;
        Ok(LogStreamReader { send, recv, buf: Vec::new() })
    }

    /// Subscribes to the positions of `pgs`: pushed when a flushed LSN advances, and with
    /// `every_scl` when an SCL does too.
    pub async fn subscribe(&self, pgs: Vec<PgId>, every_scl: bool) -> Result<Subscription, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_message(&mut send, &Message::Subscribe { pgs, every_scl }).await?;
        Ok(Subscription { _send: send, recv })
    }
}

/// A log stream (`StreamLog`): the segment's records as they arrive, within the credit granted.
pub struct LogStreamReader {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
}

impl LogStreamReader {
    /// The next chunk: records after the previous chunk's `last_lsn` (or the stream's start).
    pub async fn next(&mut self) -> Result<Pulled, ClientError> {
        match next(&mut self.recv).await? {
            Message::PullReply { position, last_lsn, records } => Ok(Pulled { position, last_lsn, records }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Lets the segment send `bytes` more.
    pub async fn grant(&mut self, bytes: u32) -> Result<(), ClientError> {
        self.buf.clear();
        Message::Credit { bytes }.encode(&mut self.buf);
        self.send.write_all(&self.buf).await?;
        Ok(())
    }
}

pub struct AppendSender {
    send: quinn::SendStream,
    buf: Vec<u8>,
}

impl AppendSender {
    /// Sends `records` (encoded, in LSN order) for segment `pg`, with no GC horizon
    /// (the writer's frames carry its horizon: `send_frame`).
    pub async fn send(&mut self, epoch: Epoch, pg: PgId, records: &[u8]) -> Result<(), ClientError> {
        self.buf.clear();
        encode_append(epoch, pg, Lsn::ZERO, records, &mut self.buf);
        self.send.write_all(&self.buf).await?;
        Ok(())
    }

    /// Sends an Append frame encoded once for several segments (see
    /// `redo_core::wire::encode_append`), without copying it again.
    pub async fn send_frame(&mut self, frame: Bytes) -> Result<(), ClientError> {
        self.send.write_chunk(frame).await?;
        Ok(())
    }

    /// Sends raw bytes, frame or not: for tools and tests that probe bad input.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

pub struct AppendReceiver {
    recv: quinn::RecvStream,
}

impl AppendReceiver {
    /// The next ack, in send order; a refusal comes back as `ClientError::Refused`.
    pub async fn recv(&mut self) -> Result<(SegmentPosition, Lsn), ClientError> {
        match next(&mut self.recv).await? {
            Message::Ack { position, batch_last_lsn } => Ok((position, batch_last_lsn)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

pub struct Subscription {
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Subscription {
    pub async fn next(&mut self) -> Result<SegmentPosition, ClientError> {
        match next(&mut self.recv).await? {
            Message::Notify { position } => Ok(position),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// The connection to one storage node, re-established on demand.
pub struct NodeLink {
    pub id: u32,
    pub addr: SocketAddr,
    endpoint: quinn::Endpoint,
    conn: tokio::sync::Mutex<Option<StorageConn>>,
}

impl NodeLink {
    pub fn for_volume(volume: &Volume, endpoint: &quinn::Endpoint) -> anyhow::Result<Vec<Arc<NodeLink>>> {
        volume
            .nodes
            .iter()
            .map(|n| {
                let addr = n.addr.parse().with_context(|| format!("node {} address {:?}", n.id, n.addr))?;
                Ok(Arc::new(NodeLink { id: n.id, addr, endpoint: endpoint.clone(), conn: Default::default() }))
            })
            .collect()
    }

    pub async fn get(&self) -> Result<StorageConn, ClientError> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref().filter(|c| c.conn.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(CONNECT_TIMEOUT, StorageConn::connect(&self.endpoint, self.addr))
            .await
            .map_err(|_| ClientError::Connect { addr: self.addr, source: anyhow::anyhow!("no answer in {CONNECT_TIMEOUT:?}") })??;
        *g = Some(c.clone());
        Ok(c)
    }

    pub async fn status(&self, epoch: Epoch, pg: PgId, truncate_above: Option<Lsn>) -> Result<SegmentStatus, ClientError> {
        self.status_truncating(epoch, pg, truncate_above, Vec::new()).await
    }

    pub async fn status_truncating(&self, epoch: Epoch, pg: PgId, truncate_above: Option<Lsn>, history: Vec<Truncation>) -> Result<SegmentStatus, ClientError> {
        let conn = self.get().await?;
        let r = self.status_on(&conn, epoch, pg, truncate_above, history).await;
        self.forget_failed(&conn, &r).await;
        r
    }

    /// `StorageConn::pull_at` on the cached connection.
    pub async fn pull_at(&self, epoch: Epoch, pg: PgId, after: Lsn, upto: Lsn, bytes_max: u32) -> Result<Pulled, ClientError> {
        let conn = self.get().await?;
        let r = conn.pull_at(epoch, pg, after, upto, bytes_max).await;
        self.forget_failed(&conn, &r).await;
        r
    }

    /// After a transport failure the node may have restarted: the next request connects afresh.
    pub async fn forget_failed<T>(&self, conn: &StorageConn, r: &Result<T, ClientError>) {
        if matches!(r, Err(e) if !matches!(e, ClientError::Refused { .. })) {
            self.forget(conn.conn.stable_id()).await;
        }
    }

    pub async fn status_on(
        &self,
        conn: &StorageConn,
        epoch: Epoch,
        pg: PgId,
        truncate_above: Option<Lsn>,
        history: Vec<Truncation>,
    ) -> Result<SegmentStatus, ClientError> {
        tokio::time::timeout(REQUEST_TIMEOUT, conn.status_truncating(epoch, pg, truncate_above, history))
            .await
            .map_err(|_| ClientError::Unexpected(format!("no status reply in {REQUEST_TIMEOUT:?}")))?
    }

    /// Drops the cached connection if it is still the one that failed (another
    /// session may already have replaced it).
    pub async fn forget(&self, failed: usize) {
        let mut g = self.conn.lock().await;
        if g.as_ref().is_some_and(|c| c.conn.stable_id() == failed) {
            *g = None;
        }
    }
}

/// The link to node `id` among `links` (made by `NodeLink::for_volume`).
pub fn link_of(links: &[Arc<NodeLink>], id: u32) -> &Arc<NodeLink> {
    links.iter().find(|l| l.id == id).expect("volume validated: every segment's node is declared")
}

/// No segment tried served a page: what each one said.
#[derive(Clone, Debug, Error)]
#[error("GetPage {page}@{lsn} of {pg} failed on every segment tried: {}", .tried.join("; "))]
pub struct PageUnavailable {
    pub pg: PgId,
    pub page: PageId,
    pub lsn: Lsn,
    /// "node N: why", one per segment tried.
    pub tried: Vec<String>,
}

/// GetPage@`lsn` of `pg` from the first of `links` that answers, each given its
/// own time, among segments that recorded the truncation of the writer at `epoch`.
pub async fn get_page_from(
    links: impl IntoIterator<Item = (&NodeLink, Duration)>,
    epoch: Epoch,
    pg: PgId,
    page: PageId,
    lsn: Lsn,
) -> Result<PageImage, PageUnavailable> {
    let mut errors = Vec::new();
    for (link, wait) in links {
        let r = async {
            let conn = link.get().await?;
            conn.get_page_at(epoch, pg, page, lsn).await
        };
        match tokio::time::timeout(wait, r).await {
            Ok(Ok((_, image))) => return Ok(image),
            Ok(Err(e)) => errors.push(format!("node {}: {e}", link.id)),
            Err(_) => errors.push(format!("node {}: no page reply in {wait:?}", link.id)),
        }
    }
    Err(PageUnavailable { pg, page, lsn, tried: errors })
}
