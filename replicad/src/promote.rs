//! Promotion: the replica takes over the volume (claim, offer back what it
//! holds, recover, truncate: the core's `Takeover`, executed by `writerd::recovery`) and from then on serves
//! transactions as the writer, with writerd's engine. Triggered by hand
//! (`Promote`) or by `watch`, when the core's failure detector says so (the
//! writer's heartbeat silent, this replica the best of those that answer).

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use borealis_net::api::ApiClient;
use borealis_net::storage::NodeLink;
use redo_core::api::{Promoted, Request, Response, Role};
use redo_core::failover::{Verdict, Watch};
use redo_core::quorum::WRITE_QUORUM;
use redo_core::volume::Volume;
use redo_core::Lsn;
use tokio::task::JoinSet;
use writerd::recovery::{Offer, TakeoverError};

use crate::replica::Replica;

/// Records per offered run (one Append frame each).
const OFFER_RUN_BYTES_MAX: usize = 1 << 20;
/// How long a peer (or the writer's address) gets to answer `Role` during the
/// agreement: two heartbeats; a dead writer's address costs this much.
const PEER_WAIT: Duration = Duration::from_millis(2 * borealis_net::api_server::HEARTBEAT.as_millis() as u64);

pub struct Promoter {
    pub replica: Arc<Replica>,
    pub volume: Volume,
    pub links: Vec<Arc<NodeLink>>,
    pub tuning: writerd::Tuning,
    pub cache_bytes_max: usize,
    pub request_bytes_max: usize,
    pub timeout: Duration,
    pub priority: u32,
    /// Set once promoted: the writer this replica now is.
    pub writer: OnceLock<Arc<writerd::api_server::Api>>,
    /// Notified once `writer` is set.
    pub promoted: tokio::sync::Notify,
    /// One promotion at a time; its outcome once it succeeded.
    done: tokio::sync::Mutex<Option<Promoted>>,
    /// A promotion is under way (`Role` says so: peers wait for it).
    promoting: AtomicBool,
    /// The replica's pullers and storage feeds: stopped once promoted (the writer
    /// needs neither, and they would cost its commit path).
    pub replica_tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Promoter {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        replica: Arc<Replica>,
        volume: Volume,
        links: Vec<Arc<NodeLink>>,
        tuning: writerd::Tuning,
        cache_bytes_max: usize,
        request_bytes_max: usize,
        timeout: Duration,
        priority: u32,
    ) -> Self {
        Promoter {
            replica,
            volume,
            links,
            tuning,
            cache_bytes_max,
            request_bytes_max,
            timeout,
            priority,
            writer: OnceLock::new(),
            promoted: Default::default(),
            done: Default::default(),
            promoting: Default::default(),
            replica_tasks: Default::default(),
        }
    }

    /// What this server is, for `Role`.
    pub fn role(&self) -> Role {
        if let Some(api) = self.writer.get() {
            let g = api.writer.lock();
            return Role {
                writer: api.writer.is_fenced().is_none(),
                promoting: false,
                epoch: g.core.epoch(),
                vdl: g.core.vdl(),
                priority: self.priority,
                writer_silent_ms: 0,
            };
        }
        let heard = self.replica.writer();
        Role {
            writer: false,
            promoting: self.promoting.load(Relaxed),
            epoch: heard.map(|h| h.epoch).unwrap_or_default(),
            vdl: self.replica.progress.borrow().vdl,
            priority: self.priority,
            writer_silent_ms: heard.map_or(u64::MAX, |h| h.at.elapsed().as_millis() as u64),
        }
    }

    /// Takes over the volume, or returns how the earlier promotion went. `quorum`:
    /// the claim answers each PG needs, a write quorum when the replica promotes
    /// itself, a read quorum when told to (`Takeover::with_quorum`).
    pub async fn promote(&self, quorum: usize) -> Result<Promoted, TakeoverError> {
        let mut done = self.done.lock().await;
        if let Some(p) = done.as_ref() {
            return Ok(p.clone());
        }
        // Cleared however the promotion ends, even if the request that started it is dropped.
        struct Promoting<'a>(&'a AtomicBool);
        impl Drop for Promoting<'_> {
            fn drop(&mut self) {
                self.0.store(false, Relaxed);
            }
        }
        self.promoting.store(true, Relaxed);
        let _promoting = Promoting(&self.promoting);
        let result = self.take_over(quorum).await;
        if let Ok(p) = &result {
            *done = Some(p.clone());
        }
        result
    }

    async fn take_over(&self, quorum: usize) -> Result<Promoted, TakeoverError> {
        let started = Instant::now();
        let r = &self.replica;
        // Every PG is complete up to the read point (a CPL), and up to the last VDL the
        // writer reported; what lies above is decided from storage.
        let known = r.writer().map_or(Lsn::ZERO, |h| h.vdl).max(r.progress.borrow().vdl);
        // Its records are the history of the newest writer it heard.
        let offer = Offer { epoch: r.writer().map(|h| h.epoch).unwrap_or_default(), runs: r.lock().held_records(OFFER_RUN_BYTES_MAX) };
        tracing::warn!(%known, offered_bytes = offer.runs.iter().flatten().map(|b| b.len()).sum::<usize>(), "promoting: taking over the volume");
        let taken = match writerd::recovery::take_over(&self.volume, &self.links, known, offer, self.timeout, quorum).await {
            Ok(x) => x,
            Err(e @ TakeoverError::Lost(_)) => {
                r.metrics.promotions_lost.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "another candidate won the promotion; standing down");
                return Err(e);
            }
            Err(e) => {
                r.metrics.promotions_failed.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "promotion failed; still a replica");
                return Err(e);
            }
        };
        let (epoch, vdl, t) = (taken.epoch, taken.recovered.vdl, taken.timings);
        self.replica_tasks.lock().expect("tasks lock").drain(..).for_each(|t| t.abort());
        let writer = writerd::start(&self.volume, &self.links, taken, &self.tuning, self.cache_bytes_max);
        // Follow streams opened on this replica now report the writer's progress.
        let (mut from, to) = (writer.progress.subscribe(), r.progress.clone());
        tokio::spawn(async move {
            loop {
                to.send_replace(from.borrow_and_update().clone());
                if from.changed().await.is_err() {
                    return;
                }
            }
        });
        let api = writerd::api_server::Api { writer, volume: self.volume.clone(), links: self.links.clone(), request_bytes_max: self.request_bytes_max };
        if self.writer.set(Arc::new(api)).is_err() {
            unreachable!("promotions are serialised by `done`");
        }
        // A permit is kept if nobody waits yet.
        self.promoted.notify_one();
        let us = |d: Duration| d.as_micros() as u64;
        let p = Promoted {
            epoch,
            vdl,
            claim_us: us(t.claim),
            offer_us: us(t.offer),
            decide_us: us(t.decide),
            truncate_us: us(t.truncate),
            total_us: us(started.elapsed()),
        };
        r.metrics.promoted_total_us.store(p.total_us, Relaxed);
        tracing::warn!(%epoch, %vdl, ?p, "promoted: this replica is the writer");
        Ok(p)
    }
}

/// Promotes automatically, executing the core's failure detector
/// (`redo_core::failover::Watch`): once the writer that was followed has been
/// silent for `silence`, asks `asked` (the volume's writer address and the peers)
/// their `Role`, and promotes when the watch says so.
pub async fn watch(promoter: Arc<Promoter>, endpoint: quinn::Endpoint, me: SocketAddr, asked: Vec<SocketAddr>, silence: Duration) {
    let r = promoter.replica.clone();
    let origin = Instant::now();
    let since = |at: Instant| at.saturating_duration_since(origin);
    let mut watch = Watch::new(silence, Duration::ZERO);
    loop {
        tokio::time::sleep_until((origin + watch.poll_timeout()).into()).await;
        if promoter.writer.get().is_some() {
            return;
        }
        if !watch.handle_timeout(origin.elapsed(), r.writer().map(|h| since(h.at))) {
            continue;
        }
        let mine = promoter.role();
        let roles = roles_of(&endpoint, &asked).await;
        match watch.on_roles(origin.elapsed(), me, &mine, &roles) {
            // The writer lives on (a peer promoted, maybe to the epoch heard last): the writer feed finds it.
            Verdict::Follow(_) => continue,
            Verdict::Defer { peer, first } => {
                if first {
                    tracing::info!(%peer, vdl = %mine.vdl, "writer silent; a better replica promotes");
                }
                continue;
            }
            Verdict::Wait(peer) => {
                tracing::debug!(%peer, "the replica deferred to does not answer; waiting before promoting");
                continue;
            }
            Verdict::Promote => {}
        }
        tracing::warn!(silent_ms = r.writer().map_or(0, |h| h.at.elapsed().as_millis()), "writer silent and this replica is the best: promoting");
        r.metrics.promotions_auto.fetch_add(1, Relaxed);
        let _ = promoter.promote(WRITE_QUORUM).await;
    }
}

/// The `Role` of each address that answers within `PEER_WAIT`.
pub async fn roles_of(endpoint: &quinn::Endpoint, addrs: &[SocketAddr]) -> Vec<(SocketAddr, Role)> {
    let mut asks = JoinSet::new();
    for &addr in addrs {
        let endpoint = endpoint.clone();
        asks.spawn(async move {
            let ask = async {
                let client = ApiClient::connect(&endpoint, addr).await.ok()?;
                let role = match client.call(&Request::Role).await {
                    Ok(Response::RoleIs(role)) => Some(role),
                    _ => None,
                };
                client.close();
                role
            };
            tokio::time::timeout(PEER_WAIT, ask).await.ok().flatten().map(|role| (addr, role))
        });
    }
    let mut out = Vec::new();
    while let Some(r) = asks.join_next().await {
        out.extend(r.ok().flatten());
    }
    out
}
