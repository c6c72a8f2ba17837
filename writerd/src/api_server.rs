//! The writer's client API: transactions and reads (the request loop is
//! `borealis_net::api_server`); `Follow` streams VDL to replicas.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use borealis_net::api_server::{error, ApiService};
use redo_core::api::{ApiErrorCode, Progress, Request, Response, Role};
use redo_core::page::PageOp;
use redo_core::quorum::WRITE_QUORUM;
use redo_core::volume::Volume;
use redo_core::writer::{Admit, ReadPlan};
use redo_core::Lsn;
use tokio::sync::watch;

use borealis_net::storage::NodeLink;

use crate::senders::fetch_page;
use crate::writer::{Deposed, Writer};

pub struct Api {
    pub writer: Arc<Writer>,
    pub volume: Volume,
    pub links: Vec<Arc<NodeLink>>,
    pub request_bytes_max: usize,
}

impl ApiService for Api {
    async fn handle(self: Arc<Self>, req: Request) -> Response {
        handle(&self, req).await
    }
    fn progress(&self) -> watch::Receiver<Progress> {
        self.writer.progress.subscribe()
    }
    fn refused(&self) {
        self.writer.metrics.requests_refused.fetch_add(1, Relaxed);
    }
    fn request_bytes_max(&self) -> usize {
        self.request_bytes_max
    }
    fn on_read_point(&self, reader: u64, read_point: Lsn) {
        self.writer.on_read_point(reader, read_point);
    }
    fn on_reader_gone(&self, reader: u64) {
        self.writer.on_reader_gone(reader);
    }
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
        Request::Get { key, min_lsn } => {
            w.metrics.reads.fetch_add(1, Relaxed);
            // Every commit this writer acknowledged is at or below VDL; a later LSN it
            // allocated becomes durable soon; one it never allocated cannot be waited for.
            let last = w.lock().core.last_allocated();
            if min_lsn > last {
                return error(ApiErrorCode::Invalid, format!("min_lsn {min_lsn} is beyond the last LSN this writer allocated ({last})"));
            }
            if let Err(e) = w.wait_vdl(min_lsn).await {
                return read_unavailable(e);
            }
            get(api, key).await
        }
        Request::Role => {
            let g = w.lock();
            Response::RoleIs(Role {
                writer: w.is_fenced().is_none(),
                promoting: false,
                epoch: g.core.epoch(),
                vdl: g.core.vdl(),
                priority: 0,
                writer_silent_ms: 0,
            })
        }
        Request::Promote => error(ApiErrorCode::Invalid, "this server is the writer already"),
        Request::Follow { .. } => unreachable!("the request loop serves Follow itself"),
    }
}

fn read_unavailable(e: Deposed) -> Response {
    error(ApiErrorCode::Unavailable, format!("writer unavailable: {}", e.0))
}

fn unavailable(why: String) -> Response {
    error(ApiErrorCode::Unavailable, format!("writer unavailable, the write may or may not have committed: {why}"))
}

/// How long a transaction waits for a writer taken over from a read quorum to become writable.
const WRITE_QUORUM_WAIT: Duration = Duration::from_secs(5);

/// A deliberately slowed build (`BOREALIS_SLOW_COMMIT_US=2000 cargo build --release`) delays
/// every commit's reply by that many microseconds: it shows that CI's perf gate catches a regression.
const SLOW_COMMIT_US: Option<&str> = option_env!("BOREALIS_SLOW_COMMIT_US");

async fn commit(api: &Api, ops: &[PageOp]) -> Response {
    let w = &api.writer;
    // Pages fetched for this transaction: it is sized with them even if the cache cannot keep them.
    let mut fetched = Vec::new();
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
            let admit = g.core.submit(ops, &fetched);
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
                if let Some(us) = SLOW_COMMIT_US {
                    tokio::time::sleep(std::time::Duration::from_micros(us.parse().expect("BOREALIS_SLOW_COMMIT_US: microseconds"))).await;
                }
                return Response::Committed { commit_lsn };
            }
            Admit::NeedPages(pages) => {
                for (pg, page, lsn) in pages {
                    // A page written since VDL is on no write quorum yet.
                    if let Err(e) = w.wait_vdl(lsn).await {
                        return error(ApiErrorCode::Unavailable, format!("nothing was written: {}", e.0));
                    }
                    w.metrics.page_fetches.fetch_add(1, Relaxed);
                    match fetch_page(w, &api.volume, &api.links, pg, page, lsn).await {
                        Ok(image) => {
                            w.lock().core.learn_page(image.clone());
                            fetched.push(image);
                        }
                        Err(e) => return error(ApiErrorCode::Unavailable, format!("nothing was written: {e}")),
                    }
                }
            }
            Admit::PageFull(full) => return error(ApiErrorCode::Invalid, full.to_string()),
            Admit::NoWriteQuorum(short) => {
                let (mut writable, mut fenced) = (w.writable.subscribe(), w.fenced.subscribe());
                let opened = tokio::time::timeout(WRITE_QUORUM_WAIT, async {
                    tokio::select! {
                        _ = writable.wait_for(|&w| w) => true,
                        _ = fenced.wait_for(Option::is_some) => false,
                    }
                });
                if !matches!(opened.await, Ok(true)) {
                    let why = format!(
                        "nothing was written: read-only until a write quorum ({WRITE_QUORUM}) of every PG's segments holds this writer's claim \
                         (segments holding it: {}); reads are served",
                        crate::writer::claims_held(&short)
                    );
                    return error(ApiErrorCode::Unavailable, why);
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
            Err(e) => read_unavailable(e),
        },
        ReadPlan::Fetch { pg, page, lsn } => {
            if let Err(e) = w.wait_vdl(lsn).await {
                return read_unavailable(e);
            }
            w.metrics.page_fetches.fetch_add(1, Relaxed);
            match fetch_page(w, &api.volume, &api.links, pg, page, lsn).await {
                Ok(image) => {
                    let value = image.get(&key).map(<[u8]>::to_vec);
                    w.lock().core.learn_page(image);
                    Response::Value { read_lsn: lsn, value }
                }
                Err(e) => error(ApiErrorCode::Unavailable, e.to_string()),
            }
        }
    }
}
