//! Taking over a volume (a writer starting, or a replica being promoted):
//! claim the next epoch on a write quorum of every PG, offer back records the
//! caller still holds, decide VDL from the segments' answers and the records
//! above a known-complete point (`redo_core::recovery`), and have storage
//! truncate everything above it for the new epoch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use borealis_net::storage::{link_of, ClientError, NodeLink, SegmentStatus, REQUEST_TIMEOUT};
use bytes::Bytes;
use redo_core::quorum::{SEGMENTS_PER_PG, WRITE_QUORUM};
use redo_core::recovery::{self, Answer};
use redo_core::volume::Volume;
use redo_core::wire::{ErrorCode, Truncation};
use redo_core::writer::Recovered;
use redo_core::{Epoch, Lsn, PgId};
use tokio::task::JoinSet;

/// How long a recovery step waits between rounds for segments that did not answer.
const ROUND_PAUSE: Duration = Duration::from_millis(20);
/// Once every PG has a write quorum of answers, how much longer the others get: a dead
/// node would hold the step for a connect timeout, and a segment that misses a claim or
/// truncation is claimed with it again before the new writer appends there.
const STRAGGLER_WAIT: Duration = Duration::from_millis(100);
/// A candidate whose claim split the segments retries after this plus a random part of the jitter.
const CLAIM_RETRY_MIN: Duration = Duration::from_millis(5);
const CLAIM_RETRY_JITTER: Duration = Duration::from_millis(50);

/// How long each step of a takeover took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub claim: Duration,
    pub offer: Duration,
    pub decide: Duration,
    pub truncate: Duration,
}

/// Why a takeover failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// Another candidate holds this generation (or a newer one) on too many segments.
    #[error("another candidate claimed the volume: {0}")]
    Lost(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Asks every segment `Status { epoch, truncate_above }` until each PG has a
/// write quorum of answers (or `deadline`), then waits `STRAGGLER_WAIT` at most
/// for the rest. Refusals count as lost claims.
async fn ask_all(
    volume: &Volume,
    links: &[Arc<NodeLink>],
    epoch: Epoch,
    truncate: Option<(Lsn, &[Truncation])>,
    deadline: Instant,
) -> Result<Vec<Vec<(usize, SegmentStatus)>>, TakeoverError> {
    let (truncate_above, history) = (truncate.map(|t| t.0), truncate.map_or(Vec::new(), |t| t.1.to_vec()));
    let pgs = volume.pg_count();
    let mut answers: Vec<Vec<Option<SegmentStatus>>> = vec![vec![None; SEGMENTS_PER_PG]; pgs];
    let mut refused: Vec<Vec<bool>> = vec![vec![false; SEGMENTS_PER_PG]; pgs];
    loop {
        let mut asks = JoinSet::new();
        for pg in 0..pgs {
            for (s, node) in volume.segments(PgId(pg as u32)).enumerate() {
                if answers[pg][s].is_none() && !refused[pg][s] {
                    let link = link_of(links, node.id).clone();
                    let history = history.clone();
                    asks.spawn(async move { (pg, s, link.id, link.status_truncating(epoch, PgId(pg as u32), truncate_above, history).await) });
                }
            }
        }
        let quorate = |answers: &[Vec<Option<SegmentStatus>>]| answers.iter().all(|pg| pg.iter().flatten().count() >= WRITE_QUORUM);
        let mut errors = Vec::new();
        let mut grace = None;
        loop {
            let next = match grace {
                None => asks.join_next().await,
                Some(until) => match tokio::time::timeout_at(until, asks.join_next()).await {
                    Ok(next) => next,
                    Err(_) => break, // dropping `asks` aborts the stragglers
                },
            };
            let Some(r) = next else { break };
            let (pg, s, node, r) = r.context("status task")?;
            match r {
                Ok(st) => answers[pg][s] = Some(st),
                Err(ClientError::Refused { code: ErrorCode::StaleEpoch, message }) => {
                    refused[pg][s] = true;
                    errors.push(format!("pg{pg} on node {node}: {message}"));
                }
                Err(e) => errors.push(format!("pg{pg} on node {node}: {e}")),
            }
            if grace.is_none() && quorate(&answers) {
                grace = Some(tokio::time::Instant::now() + STRAGGLER_WAIT);
            }
        }
        if let Some(pg) = (0..pgs).find(|&pg| refused[pg].iter().filter(|&&r| r).count() > SEGMENTS_PER_PG - WRITE_QUORUM) {
            return Err(TakeoverError::Lost(format!("{epoch} refused by a third of pg{pg}'s segments: {}", errors.join("; "))));
        }
        let short: Vec<String> = (0..pgs)
            .filter(|&pg| answers[pg].iter().flatten().count() < WRITE_QUORUM)
            .map(|pg| format!("pg{pg}: {} of {SEGMENTS_PER_PG}", answers[pg].iter().flatten().count()))
            .collect();
        if short.is_empty() {
            return Ok(answers.into_iter().map(|a| a.into_iter().enumerate().filter_map(|(s, a)| Some((s, a?))).collect()).collect());
        }
        if Instant::now() >= deadline {
            return Err(anyhow::anyhow!("no write quorum of storage nodes answered ({}); last errors: {}", short.join(", "), errors.join("; ")).into());
        }
        tokio::time::sleep(ROUND_PAUSE).await;
    }
}

/// Records a promoted replica still holds, per PG, to offer back to storage.
pub type Offer = Vec<Vec<Bytes>>;

/// A volume taken over.
pub struct TakenOver {
    pub epoch: Epoch,
    pub recovered: Recovered,
    /// Every truncation the segments reported, oldest first: sent with each
    /// later claim, so that a segment that missed one is cut there too.
    pub history: Vec<Truncation>,
    pub timings: Timings,
}

/// Claims the volume and decides where it ends. `known_cpl` is a CPL every PG
/// is known complete up to (a replica's last VDL from the writer; `Lsn::ZERO`
/// when nothing is known). `offer[pg]` are encoded records to append to every
/// claimed segment first (a replica's retained log), so that a commit
/// acknowledged from memory survives segments that restarted before flushing it.
pub async fn take_over(
    volume: &Volume,
    links: &[Arc<NodeLink>],
    known_cpl: Lsn,
    offer: Offer,
    timeout: Duration,
) -> Result<TakenOver, TakeoverError> {
    let deadline = Instant::now() + timeout;
    let mut t = Timings::default();
    let started = Instant::now();
    let (epoch, mut claimed) = claim(volume, links, deadline).await?;
    t.claim = started.elapsed();

    let started = Instant::now();
    if offer.iter().any(|runs| !runs.is_empty()) {
        offer_back(volume, links, epoch, &offer, &claimed).await;
        claimed = ask_all(volume, links, epoch, None, deadline).await?;
    }
    t.offer = started.elapsed();

    let started = Instant::now();
    let answers: Vec<Vec<Answer>> = claimed
        .iter()
        .map(|pg| {
            // A segment's log is as of its newest truncation's epoch (the claim just
            // raised its epoch; what it holds was written before).
            pg.iter()
                .map(|(s, st)| Answer {
                    segment: *s,
                    epoch: st.truncations.last().map_or(Epoch(0), |t| t.epoch),
                    scl: st.position.scl,
                    truncations: st.truncations.clone(),
                })
                .collect()
        })
        .collect();
    let plan = recovery::plan(&answers, known_cpl).context("recovery plan")?;
    let mut pulls = JoinSet::new();
    for pg in 0..volume.pg_count() {
        let node = volume.segments(PgId(pg as u32)).nth(plan.source[pg]).expect("six segments").id;
        let link = link_of(links, node).clone();
        let (from, upto) = (plan.from[pg], plan.upto[pg]);
        pulls.spawn(async move { (pg, pull_range(&link, PgId(pg as u32), from, upto).await) });
    }
    let mut pulled = vec![Vec::new(); volume.pg_count()];
    while let Some(r) = pulls.join_next().await {
        let (pg, runs) = r.context("pull task")?;
        pulled[pg] = runs?;
    }
    let d = recovery::decide(&plan, &pulled);
    t.decide = started.elapsed();
    tracing::info!(%epoch, vcl = %d.vcl, vdl = %d.vdl, complete = ?plan.complete, "recovery decided; truncating above VDL");

    let mut history: Vec<Truncation> = answers.iter().flatten().flat_map(|a| a.truncations.iter().copied()).filter(|t| t.epoch != epoch).collect();
    history.sort_by_key(|t| t.epoch);
    history.dedup();
    let started = Instant::now();
    ask_all(volume, links, epoch, Some((d.vdl, &history)), deadline).await?;
    t.truncate = started.elapsed();
    Ok(TakenOver { epoch, recovered: Recovered { vdl: d.vdl, pg_last: d.pg_last, tails: d.tails }, history, timings: t })
}

/// Claims the next generation on a write quorum of every PG. Candidates that
/// split the segments between them (each short of a quorum somewhere) both
/// lose: each then retries at the next generation after a random pause,
/// unless a rival holds a write quorum of some PG (then it stands down).
async fn claim(volume: &Volume, links: &[Arc<NodeLink>], deadline: Instant) -> Result<(Epoch, Vec<Vec<(usize, SegmentStatus)>>), TakeoverError> {
    loop {
        let seen = ask_all(volume, links, Epoch(0), None, deadline).await?;
        let newest = seen.iter().flatten().map(|(_, st)| st.epoch).max().unwrap_or_default();
        let epoch = Epoch::claim_after(newest, nonce());
        match ask_all(volume, links, epoch, None, deadline).await {
            Err(TakeoverError::Lost(why)) => {
                // Give the other candidate time to finish its claim before looking.
                tokio::time::sleep(CLAIM_RETRY_MIN + Duration::from_micros(nonce() as u64 % CLAIM_RETRY_JITTER.as_micros() as u64)).await;
                let now = ask_all(volume, links, Epoch(0), None, deadline).await?;
                if let Some(other) = rival(&now, epoch) {
                    return Err(TakeoverError::Lost(format!("{why}; {other} holds a write quorum of a PG")));
                }
                if Instant::now() >= deadline {
                    return Err(TakeoverError::Lost(why));
                }
                tracing::info!(%epoch, %why, "the claim split the segments with another candidate: retrying at the next generation");
            }
            other => return other.map(|claimed| (epoch, claimed)),
        }
    }
}

/// A claimant of `ours`' generation or a newer one that this candidate must
/// yield to: one holding a write quorum of every PG (it won), or of some PG
/// with a higher epoch (after a split the higher one retries, the other
/// stands down; a winner still finishing its claim is most likely seen whole
/// after the pause).
fn rival(answers: &[Vec<(usize, SegmentStatus)>], ours: Epoch) -> Option<Epoch> {
    let quorum_in = |e: Epoch, pg: &Vec<(usize, SegmentStatus)>| pg.iter().filter(|(_, st)| st.epoch == e).count() >= WRITE_QUORUM;
    let mut others: Vec<Epoch> = answers.iter().flatten().map(|(_, st)| st.epoch).filter(|e| *e != ours && e.generation() >= ours.generation()).collect();
    others.sort();
    others.dedup();
    others.into_iter().find(|&e| answers.iter().all(|pg| quorum_in(e, pg)) || (e > ours && answers.iter().any(|pg| quorum_in(e, pg))))
}

/// Appends `offer[pg]` at `epoch` to every segment of each PG that took the claim
/// (best effort: segments that hold the records ignore them as duplicates).
async fn offer_back(volume: &Volume, links: &[Arc<NodeLink>], epoch: Epoch, offer: &Offer, claimed: &[Vec<(usize, SegmentStatus)>]) {
    let mut sends = JoinSet::new();
    for (pg, runs) in offer.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
        for &(s, _) in &claimed[pg] {
            let node = volume.segments(PgId(pg as u32)).nth(s).expect("six segments");
            let (link, runs) = (link_of(links, node.id).clone(), runs.clone());
            sends.spawn(async move {
                let r = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    let conn = link.get().await?;
                    let (mut tx, mut rx) = conn.open_append().await?;
                    for run in &runs {
                        tx.send(epoch, PgId(pg as u32), run).await?;
                    }
                    for _ in &runs {
                        rx.recv().await?;
                    }
                    Ok::<_, ClientError>(())
                })
                .await;
                if let Ok(Err(e)) | Err(e) = r.map_err(|_| ClientError::Unexpected("offer timed out".into())) {
                    tracing::warn!(node = link.id, pg, error = %e, "offering retained records back failed");
                }
            });
        }
    }
    while sends.join_next().await.is_some() {}
}

/// Records of `pg` with `after < lsn <= upto`, from one node, in pull-sized runs.
pub async fn pull_range(link: &NodeLink, pg: PgId, after: Lsn, upto: Lsn) -> Result<Vec<Bytes>> {
    const PULL_BYTES_MAX: u32 = 1 << 20;
    let conn = link.get().await.with_context(|| format!("connect to node {} to read {pg}'s tail", link.id))?;
    let (mut at, mut runs) = (after, Vec::new());
    while at < upto {
        let p = tokio::time::timeout(REQUEST_TIMEOUT, conn.pull(pg, at, upto, PULL_BYTES_MAX))
            .await
            .map_err(|_| anyhow::anyhow!("no pull reply from node {} in {REQUEST_TIMEOUT:?}", link.id))?
            .with_context(|| format!("pull {pg} ({at}, {upto}] from node {}", link.id))?;
        if p.last_lsn <= at {
            bail!("node {} returned nothing of {pg} after {at} although its SCL is {upto}", link.id);
        }
        at = p.last_lsn;
        runs.push(p.records);
    }
    Ok(runs)
}

/// 32 bits that differ between writers starting at the same moment.
fn nonce() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness; mixing in the pid and the
    // clock makes two processes' values independent.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() as u32
}
