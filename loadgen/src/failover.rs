//! `loadgen failover`: open-loop commits through a `ClusterClient` against an
//! embedded cluster, SIGKILL of writerd after the warm-up, and a replica's
//! promotion (automatic, or `Promote` sent right after the kill). Reports how
//! long clients could not commit and checks that no acknowledged write was
//! lost: every write is read back from the new writer afterwards.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use borealis_net::api::{ApiClient, ClusterClient, Committed, FailoverConfig, WriterInfo};
use redo_core::api::Promoted;
use redo_core::page::PageOp;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::audit::{AuditTotals, Workload, WriteAudit};
use crate::cluster::{ClusterSpec, EmbeddedClusterArgs, LocalCluster, WorkDir};
use crate::pacing::{pace, TICKS_QUEUED_MAX};
use crate::report::{latency_histogram, median, LatencyUs};

/// How the new writer is chosen after the kill.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PromoteMode {
    /// The replicas notice the writer's silence (replicad --failover-silence-ms) and the best one promotes.
    Auto,
    /// loadgen sends `Promote` to replica 1 right after the kill (as `pg_ctl promote` in the PostgreSQL comparison).
    Now,
}

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct FailoverArgs {
    /// How a replica takes over once writerd is killed.
    #[arg(long, value_enum, default_value = "auto")]
    pub promote: PromoteMode,
    /// Read replicas of the embedded cluster; each knows the others (--peers) and has a distinct priority, replica 1 the highest.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Offered commits/s, open loop, every one on keys of its own.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Seconds of load before writerd is killed.
    #[arg(long, visible_alias = "warmup-secs", default_value_t = 2.0)]
    pub warmup_seconds: f64,
    /// Seconds of load after the kill.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Fresh clusters, one failover each; the summary reports medians.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Cluster clients (a QUIC endpoint and connection each); commits go round-robin.
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// Puts per transaction, each on a key of its own: read back, a transaction must be wholly present or wholly absent.
    #[arg(long, default_value_t = 2)]
    pub txn_ops: usize,
    /// Bytes of each put's value.
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
    /// Longest a commit may take, re-sends to a new writer included; later it counts as unacknowledged.
    #[arg(long, default_value_t = 10.0)]
    pub deadline_seconds: f64,
    /// The replicas' automatic-promotion silence (replicad --failover-silence-ms) [default: replicad's].
    #[arg(long)]
    pub failover_silence_ms: Option<u64>,
    /// The embedded cluster.
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: EmbeddedClusterArgs,
    /// Where to write the results (JSON).
    #[arg(long, default_value = "bench-results/latest/failover/summary.json")]
    pub json: PathBuf,
}

/// Where the time from the kill to the first new commit went, in milliseconds.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Breakdown {
    /// Kill to the start of the promotion. `now`: until loadgen sent `Promote`. `auto`: the
    /// client's switch to the new writer minus the promotion, so it includes the client's
    /// probing delay (at most one probe interval, 5 ms).
    pub detection_ms: Option<f64>,
    /// The promotion's steps (from its `Promoted` reply): claim the new epoch on a write
    /// quorum of every PG, offer held records back, decide VDL, truncate above it.
    pub claim_ms: Option<f64>,
    pub offer_ms: Option<f64>,
    pub decide_ms: Option<f64>,
    pub truncate_ms: Option<f64>,
    /// The whole promotion, from its start until it accepts writes.
    pub promotion_ms: Option<f64>,
    /// Kill to the client's switch to the new writer (the first client to switch).
    pub discover_ms: f64,
    /// The switch to the first commit the new writer acknowledged.
    pub first_commit_ms: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct Run {
    pub run: usize,
    pub promote: PromoteMode,
    /// Kill to the first commit acknowledged by the new writer (client-observed).
    pub failover_ms: f64,
    /// The last acknowledgement before the kill to the first after it.
    pub unavailable_ms: f64,
    pub breakdown: Breakdown,
    pub old_writer: SocketAddr,
    pub old_epoch: u64,
    /// The writer that acknowledged the first commit after the kill.
    pub new_writer: SocketAddr,
    pub new_epoch: u64,
    /// Promotions after that one within the run (a replica deposing the new writer); 0 normally.
    pub later_promotions: u64,
    /// The writer the clients sent to at the end.
    pub last_writer: SocketAddr,
    pub last_epoch: u64,
    /// The new writer's promotion (null if it could not be asked).
    pub promoted: Option<PromotedReply>,
    #[serde(flatten)]
    pub audit: WriteAudit,
    /// Due time on the open-loop schedule to acknowledgement, every acknowledged transaction.
    pub commit_latency_us: LatencyUs,
    /// Unacknowledged transactions by error.
    pub error_kinds: BTreeMap<String, u64>,
    /// Load start to the kill, ms: the origin of the failover timeline is the load's start.
    pub kill_at_ms: f64,
    /// Each acknowledgement's arrival, ms since the load's start (the failover timeline).
    #[serde(skip)]
    pub acks_at_ms: Vec<f64>,
}

/// `Promoted` as JSON.
#[derive(Serialize, Clone, Debug)]
pub struct PromotedReply {
    pub epoch: u64,
    pub vdl: u64,
    pub claim_us: u64,
    pub offer_us: u64,
    pub decide_us: u64,
    pub truncate_us: u64,
    pub total_us: u64,
}

impl From<&Promoted> for PromotedReply {
    fn from(p: &Promoted) -> Self {
        PromotedReply {
            epoch: p.epoch.0,
            vdl: p.vdl.0,
            claim_us: p.claim_us,
            offer_us: p.offer_us,
            decide_us: p.decide_us,
            truncate_us: p.truncate_us,
            total_us: p.total_us,
        }
    }
}

/// Medians over runs (sums for the counts).
#[derive(Serialize, Debug)]
pub struct Summary {
    pub promote: PromoteMode,
    pub runs: usize,
    pub rate: f64,
    pub failover_ms: f64,
    pub failover_ms_max: f64,
    pub unavailable_ms: f64,
    /// Medians of each step (over the runs that have it).
    #[serde(flatten)]
    pub breakdown: Breakdown,
    #[serde(flatten)]
    pub totals: AuditTotals,
    /// Sum over runs of `later_promotions`.
    pub later_promotions: u64,
}

/// What one transaction came to.
struct Outcome {
    seq: u64,
    due: Instant,
    result: Result<(Committed, Instant), String>,
}

/// The transaction `seq` of `workload`.
fn txn(workload: &Workload, seq: u64) -> Vec<PageOp> {
    (0..workload.txn_ops).map(|op| PageOp::Put { key: workload.key(seq, op).into_bytes(), value: workload.value(seq, op) }).collect()
}

/// Reads in flight during the read-back.
const READS_INFLIGHT_MAX: usize = 256;

pub async fn run(args: FailoverArgs) -> Result<()> {
    if args.rate.is_nan() || args.rate <= 0.0 || args.runs == 0 || args.connections == 0 || args.txn_ops == 0 || args.replicas == 0 {
        bail!("--rate, --runs, --connections, --txn-ops and --replicas must be positive");
    }
    if args.warmup_seconds <= 0.0 || args.seconds <= 0.0 || args.deadline_seconds <= 0.0 {
        bail!("--warmup-seconds, --seconds and --deadline-seconds must be positive");
    }
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    tokio::select! {
        r = bench(&args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

async fn bench(args: &FailoverArgs) -> Result<()> {
    let work = WorkDir::new(args.cluster.work_dir.as_deref(), "borealis-failover")?;
    let mut runs = Vec::new();
    for run in 0..args.runs {
        let r = measure_embedded(args, &work, run).await.with_context(|| format!("run {} (cluster under {})", run + 1, work.path.display()))?;
        eprintln!(
            "[run {}/{}] failover {:.1} ms, unavailable {:.1} ms, {} acknowledged, {} lost",
            run + 1,
            args.runs,
            r.failover_ms,
            r.unavailable_ms,
            r.audit.acked_writes,
            r.audit.lost_acked_writes
        );
        runs.push(r);
    }
    let summary = summarize(args, &runs);
    let json = serde_json::json!({
        "failover_ms": summary.failover_ms,
        "unavailable_ms": summary.unavailable_ms,
        "lost_acked_writes": summary.totals.lost_acked_writes,
        "summary": summary,
        "params": args,
        "runs": runs,
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", args.json.display()))?;
    println!("{}", table(&summary, &runs));
    println!("wrote {}", args.json.display());
    if summary.totals.lost_or_torn() {
        bail!("{} acknowledged writes lost, {} torn; see {}", summary.totals.lost_acked_writes, summary.totals.torn_writes, args.json.display());
    }
    work.cleanup();
    Ok(())
}

/// One failover on a fresh cluster, stopped afterwards whatever happened.
pub async fn measure_embedded(args: &FailoverArgs, work: &WorkDir, run: usize) -> Result<Run> {
    let dir = work.path.join(format!("run-{}", run + 1));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let storaged_args = args.cluster.storaged_args();
    let mut replicad_args = Vec::new();
    if let Some(ms) = args.failover_silence_ms {
        replicad_args.extend(["--failover-silence-ms".to_string(), ms.to_string()]);
    }
    replicad_args.extend(args.cluster.replicad_args.iter().cloned());
    let spec = ClusterSpec {
        pgs: args.cluster.pgs,
        page_count: args.cluster.page_count,
        replicas: args.replicas,
        storaged_args: &storaged_args,
        writerd_args: &args.cluster.writerd_args,
        replicad_args: &replicad_args,
    };
    let mut cluster = LocalCluster::start_for_failover(&dir, &spec).await?;
    let result = measure(args, &mut cluster, run).await;
    let stopped = cluster.stop();
    let r = result?;
    if let Err(e) = stopped {
        tracing::warn!(error = %format!("{e:#}"), "stopping the cluster");
    }
    Ok(r)
}

async fn measure(args: &FailoverArgs, cluster: &mut LocalCluster, run: usize) -> Result<Run> {
    let identity = cluster.storage.identity()?;
    let addrs = cluster.api_addrs();
    let config = FailoverConfig { deadline: Duration::from_secs_f64(args.deadline_seconds), ..FailoverConfig::default() };
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let endpoint = borealis_net::client_endpoint(&identity)?;
        let client = ClusterClient::connect(&endpoint, &addrs, config.clone()).await?;
        clients.push((endpoint, client));
    }
    let old = clients[0].1.writer().context("no writer")?;
    if old.addr != cluster.writer_addr {
        bail!("the clients found the writer at {}, not at writerd's {}", old.addr, cluster.writer_addr);
    }
    // Connected before the kill, so that `Promote` is not delayed by a handshake.
    let admin_endpoint = borealis_net::client_endpoint(&identity)?;
    let admin = ApiClient::connect(&admin_endpoint, cluster.replicas[0].addr).await.context("connect to replica 1")?;

    let workload = Arc::new(Workload { run, txn_ops: args.txn_ops, value_bytes: args.value_bytes });
    let warmup = Duration::from_secs_f64(args.warmup_seconds);
    let total = warmup + Duration::from_secs_f64(args.seconds);
    let start = Instant::now() + Duration::from_millis(20);
    let (tick_tx, mut ticks) = mpsc::channel(TICKS_QUEUED_MAX);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let pacer = std::thread::spawn(move || pace(start, interval, total, vec![tick_tx]));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let clients: Vec<ClusterClient> = clients.iter().map(|(_, c)| c.clone()).collect();
        let outcomes = outcomes.clone();
        let workload = workload.clone();
        tokio::spawn(async move {
            let mut inflight = JoinSet::new();
            let mut seq = 0u64;
            while let Some(due) = ticks.recv().await {
                let client = clients[seq as usize % clients.len()].clone();
                let ops = txn(&workload, seq);
                let outcomes = outcomes.clone();
                inflight.spawn(async move {
                    let result = client.txn(ops).await.map(|c| (c, Instant::now())).map_err(|e| e.to_string());
                    outcomes.lock().expect("outcomes").push(Outcome { seq, due, result });
                });
                seq += 1;
                while inflight.try_join_next().is_some() {}
            }
            // Every call ends by its deadline.
            while inflight.join_next().await.is_some() {}
            seq
        })
    };

    tokio::time::sleep_until((start + warmup).into()).await;
    let killed_at = cluster.kill_writer();
    let promoted_now = match args.promote {
        PromoteMode::Now => {
            let sent_at = Instant::now();
            let p = admin.promote().await.context("promote replica 1")?;
            Some((sent_at, p))
        }
        PromoteMode::Auto => None,
    };
    let writes = load.await.context("load task")?;
    pacer.join().map_err(|_| anyhow!("pacer thread panicked"))?;

    // The last writer the clients know; a second promotion may have followed the first.
    let last = clients.iter().filter_map(|(_, c)| c.writer()).max_by_key(|w| w.epoch).context("no writer")?;
    if last.epoch <= old.epoch {
        bail!("no new writer: the clients still send to {} ({}) after the kill", last.addr, last.epoch);
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    let mut audit = read_back(&clients[0].1, &workload, &outcomes).await?;
    for (endpoint, client) in clients {
        client.close();
        endpoint.close(0u32.into(), b"done");
    }

    let mut latency = latency_histogram();
    let mut errors = BTreeMap::<String, u64>::new();
    let mut last_before: Option<Instant> = None;
    let mut first_new: Option<(Instant, WriterInfo)> = None;
    let mut new_epochs = BTreeSet::new();
    for o in &outcomes {
        match &o.result {
            Ok((c, at)) => {
                latency.saturating_record((*at - o.due).as_micros() as u64);
                audit.acked(c.attempts, c.writer.epoch == old.epoch, *at <= killed_at);
                if c.writer.epoch == old.epoch {
                    if *at <= killed_at {
                        last_before = last_before.max(Some(*at));
                    }
                } else {
                    new_epochs.insert(c.writer.epoch);
                    if first_new.is_none_or(|(f, _)| *at < f) {
                        first_new = Some((*at, c.writer));
                    }
                }
            }
            Err(e) => *errors.entry(e.clone()).or_default() += 1,
        }
    }
    let (first_new, first_writer) = first_new.context("no commit acknowledged by a new writer")?;
    let last_before = last_before.context("no commit acknowledged before the kill")?;
    // When the first client switched to the writer that acknowledged first.
    let discovered_at = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok())
        .filter(|(c, _)| c.writer.epoch == first_writer.epoch)
        .map(|(c, _)| c.writer.since)
        .min()
        .expect("the first new acknowledgement at least");
    // The promotion that made it the writer: from the reply to loadgen's `Promote`, else
    // from the replica itself (a promoted replica answers `Promote` with its earlier promotion).
    let promoted = match &promoted_now {
        Some((_, p)) if p.epoch == first_writer.epoch => Some(p.clone()),
        _ => match tokio::time::timeout(PROMOTED_ASK_TIMEOUT, ask_promoted(&admin_endpoint, first_writer.addr)).await {
            Ok(Ok(p)) if p.epoch == first_writer.epoch => Some(p),
            Ok(Ok(p)) => {
                tracing::warn!(writer = %first_writer.addr, reported = %p.epoch, seen = %first_writer.epoch, "the new writer reports another promotion");
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(writer = %first_writer.addr, error = %format!("{e:#}"), "could not ask the new writer how its promotion went");
                None
            }
            Err(_) => None,
        },
    };
    admin.close();
    admin_endpoint.close(0u32.into(), b"done");

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let us_ms = |us: u64| us as f64 / 1e3;
    let step = |f: fn(&Promoted) -> u64| promoted.as_ref().map(|p| us_ms(f(p)));
    let discover_ms = ms(discovered_at.saturating_duration_since(killed_at));
    let promotion_ms = step(|p| p.total_us);
    let detection_ms = match &promoted_now {
        Some((sent_at, p)) if p.epoch == first_writer.epoch => Some(ms(*sent_at - killed_at)),
        _ => promotion_ms.map(|p| (discover_ms - p).max(0.0)),
    };
    Ok(Run {
        run,
        promote: args.promote,
        failover_ms: ms(first_new - killed_at),
        unavailable_ms: ms(first_new - last_before),
        breakdown: Breakdown {
            detection_ms,
            claim_ms: step(|p| p.claim_us),
            offer_ms: step(|p| p.offer_us),
            decide_ms: step(|p| p.decide_us),
            truncate_ms: step(|p| p.truncate_us),
            promotion_ms,
            discover_ms,
            first_commit_ms: ms(first_new.saturating_duration_since(discovered_at)),
        },
        old_writer: old.addr,
        old_epoch: old.epoch.0,
        new_writer: first_writer.addr,
        new_epoch: first_writer.epoch.0,
        later_promotions: new_epochs.len() as u64 - 1,
        last_writer: last.addr,
        last_epoch: last.epoch.0,
        promoted: promoted.as_ref().map(PromotedReply::from),
        audit: WriteAudit { writes, ..audit },
        commit_latency_us: LatencyUs::of(&latency),
        error_kinds: errors,
        kill_at_ms: ms(killed_at.saturating_duration_since(start)),
        acks_at_ms: outcomes.iter().filter_map(|o| o.result.as_ref().ok()).map(|(_, at)| ms(at.saturating_duration_since(start))).collect(),
    })
}

/// How long the promoted replica may take to say how its promotion went.
const PROMOTED_ASK_TIMEOUT: Duration = Duration::from_secs(5);

async fn ask_promoted(endpoint: &quinn::Endpoint, addr: SocketAddr) -> Result<Promoted> {
    let c = ApiClient::connect(endpoint, addr).await?;
    let p = c.promote().await;
    c.close();
    Ok(p?)
}

/// Reads every key of every transaction from the current writer and classifies the transactions.
async fn read_back(client: &ClusterClient, workload: &Arc<Workload>, outcomes: &[Outcome]) -> Result<WriteAudit> {
    let mut reads = JoinSet::new();
    let mut out = WriteAudit::default();
    let mut pending = outcomes.iter().map(|o| (o.seq, o.result.is_ok()));
    loop {
        while reads.len() < READS_INFLIGHT_MAX {
            let Some((seq, acked)) = pending.next() else { break };
            let (client, workload) = (client.clone(), workload.clone());
            reads.spawn(async move {
                let mut present = 0;
                for op in 0..workload.txn_ops {
                    let (_, value) = client.get(workload.key(seq, op).as_bytes()).await.with_context(|| format!("read back transaction {seq}"))?;
                    present += (value.as_deref() == Some(&workload.value(seq, op)[..])) as usize;
                }
                Ok::<_, anyhow::Error>((acked, present))
            });
        }
        match reads.join_next().await {
            Some(r) => {
                let (acked, present) = r.context("read-back task")??;
                out.read_back(acked, present, workload.txn_ops);
            }
            None => break,
        }
    }
    Ok(out)
}

pub fn summarize(args: &FailoverArgs, runs: &[Run]) -> Summary {
    let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    // Medians over the runs that have the value.
    let some = |f: &dyn Fn(&Breakdown) -> Option<f64>| {
        let xs: Vec<f64> = runs.iter().filter_map(|r| f(&r.breakdown)).collect();
        (!xs.is_empty()).then(|| median(xs))
    };
    let sum = |f: &dyn Fn(&Run) -> u64| runs.iter().map(f).sum();
    Summary {
        promote: args.promote,
        runs: runs.len(),
        rate: args.rate,
        failover_ms: m(&|r| r.failover_ms),
        failover_ms_max: runs.iter().map(|r| r.failover_ms).fold(0.0, f64::max),
        unavailable_ms: m(&|r| r.unavailable_ms),
        breakdown: Breakdown {
            detection_ms: some(&|b| b.detection_ms),
            claim_ms: some(&|b| b.claim_ms),
            offer_ms: some(&|b| b.offer_ms),
            decide_ms: some(&|b| b.decide_ms),
            truncate_ms: some(&|b| b.truncate_ms),
            promotion_ms: some(&|b| b.promotion_ms),
            discover_ms: m(&|r| r.breakdown.discover_ms),
            first_commit_ms: m(&|r| r.breakdown.first_commit_ms),
        },
        totals: AuditTotals::of(runs.iter().map(|r| &r.audit)),
        later_promotions: sum(&|r| r.later_promotions),
    }
}

pub fn table(s: &Summary, runs: &[Run]) -> String {
    let mode = match s.promote {
        PromoteMode::Auto => "auto",
        PromoteMode::Now => "now",
    };
    let mut t = format!(
        "failover (promote {mode}, {:.0} commits/s offered)\n\n| run | failover ms | unavailable ms | detection ms | claim ms | offer ms | decide ms | truncate ms | promotion ms | discover ms | first commit ms | acked | lost acked | unacked present/absent/torn |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        s.rate
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let mut row = |name: String, failover: f64, unavailable: f64, b: &Breakdown, acked: u64, lost: u64, unacked: [u64; 3]| {
        t += &format!(
            "| {name} | {failover:.1} | {unavailable:.1} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {acked} | {lost} | {}/{}/{} |\n",
            opt(b.detection_ms),
            opt(b.claim_ms),
            opt(b.offer_ms),
            opt(b.decide_ms),
            opt(b.truncate_ms),
            opt(b.promotion_ms),
            b.discover_ms,
            b.first_commit_ms,
            unacked[0],
            unacked[1],
            unacked[2]
        );
    };
    for r in runs {
        row(
            format!("{}", r.run + 1),
            r.failover_ms,
            r.unavailable_ms,
            &r.breakdown,
            r.audit.acked_writes,
            r.audit.lost_acked_writes,
            [r.audit.unacked_present, r.audit.unacked_absent, r.audit.torn_writes],
        );
    }
    row(
        "median (counts: sum)".into(),
        s.failover_ms,
        s.unavailable_ms,
        &s.breakdown,
        s.totals.acked_writes,
        s.totals.lost_acked_writes,
        [s.totals.unacked_present, s.totals.unacked_absent, s.totals.torn_writes],
    );
    if s.later_promotions > 0 {
        t += &format!("\n{} later promotions: a replica deposed the new writer (see later_promotions in the runs)\n", s.later_promotions);
    }
    t
}
