//! The replica's client API: gets at the read point, read-your-writes with
//! `min_lsn`, and `Follow` of the read point; transactions go to the writer.
//! `Role` and `Promote` serve failover; once promoted, transactions and gets
//! are served by the writer this replica became.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use borealis_net::api_server::{error, ApiService};
use borealis_net::storage::{get_page_from, link_of, NodeLink};
use redo_core::api::{ApiErrorCode, Progress, Request, Response};
use redo_core::quorum::READ_QUORUM;
use redo_core::replica::ReadPlan;
use redo_core::Lsn;
use tokio::sync::watch;

use crate::promote::Promoter;
use crate::replica::Replica;

pub struct Api {
    pub replica: Arc<Replica>,
    pub promoter: Arc<Promoter>,
    pub links: Vec<Arc<NodeLink>>,
    pub writer: String,
    pub read_wait: Duration,
    pub request_bytes_max: usize,
}

impl ApiService for Api {
    async fn handle(self: Arc<Self>, req: Request) -> Response {
        if let (Some(writer), Request::Txn(_) | Request::Get { .. }) = (self.promoter.writer.get(), &req) {
            return writer.clone().handle(req).await;
        }
        match req {
            Request::Role => Response::RoleIs(self.promoter.role()),
            Request::Promote => match self.promoter.promote(READ_QUORUM).await {
                Ok(p) => Response::Promoted(p),
                Err(e) => error(ApiErrorCode::Unavailable, format!("promotion failed: {e}")),
            },
            Request::Txn(_) => {
                self.refused();
                error(ApiErrorCode::Unavailable, format!("a read replica takes no writes; send transactions to the writer at {}", self.writer))
            }
            Request::Get { key, min_lsn } => {
                self.replica.metrics.reads.fetch_add(1, Relaxed);
                self.get(key, min_lsn).await
            }
            Request::Follow { .. } => unreachable!("the request loop serves Follow itself"),
        }
    }
    fn progress(&self) -> watch::Receiver<Progress> {
        self.replica.progress.subscribe()
    }
    fn refused(&self) {
        self.replica.metrics.requests_refused.fetch_add(1, Relaxed);
    }
    fn request_bytes_max(&self) -> usize {
        self.request_bytes_max
    }
    // Once promoted, the replicas that follow this one bound its GC horizon.
    fn on_read_point(&self, reader: u64, read_point: Lsn) {
        if let Some(writer) = self.promoter.writer.get() {
            writer.on_read_point(reader, read_point);
        }
    }
    fn on_reader_gone(&self, reader: u64) {
        if let Some(writer) = self.promoter.writer.get() {
            writer.on_reader_gone(reader);
        }
    }
}

impl Api {
    async fn get(&self, key: Vec<u8>, min_lsn: Lsn) -> Response {
        let r = &self.replica;
        let mut progress = r.progress.subscribe();
        if tokio::time::timeout(self.read_wait, progress.wait_for(|p| p.vdl >= min_lsn)).await.is_err() {
            r.metrics.read_timeouts.fetch_add(1, Relaxed);
            let at = r.progress.borrow().vdl;
            return error(
                ApiErrorCode::Timeout,
                format!("replica applied VDL {at} did not reach {min_lsn} within {:?}; retry, or read from the writer", self.read_wait),
            );
        }
        let plan = r.lock().read(&key);
        match plan {
            ReadPlan::Cached { read_point, value } => Response::Value { read_lsn: read_point, value },
            ReadPlan::NotReady => error(ApiErrorCode::Unavailable, "replica starting: it has not reached its first read point yet"),
            ReadPlan::Fetch { pg, page, lsn, segments } => {
                r.metrics.page_fetches.fetch_add(1, Relaxed);
                let nodes: Vec<u32> = r.lock().volume().segments(pg).map(|n| n.id).collect();
                let order = r.latency[pg.0 as usize].order(&[&segments]);
                let order: Vec<(&NodeLink, Duration)> = order.into_iter().map(|(s, wait)| (link_of(&self.links, nodes[s]).as_ref(), wait)).collect();
                let epoch = r.writer().map(|h| h.epoch).unwrap_or_default();
                let image = get_page_from(order, epoch, pg, page, lsn).await;
                let failure = image.as_ref().err().cloned();
                let mut core = r.lock();
                match (core.fetched(page, image.ok(), &key), failure) {
                    (Some((read_lsn, value)), _) => Response::Value { read_lsn, value },
                    (None, Some(e)) => error(ApiErrorCode::Unavailable, e.to_string()),
                    (None, None) => error(ApiErrorCode::Unavailable, format!("page {page} from storage does not link to the records applied since; retry")),
                }
            }
        }
    }
}
