//! `loadgen pg-failover`: SIGKILL of the primary under an open-loop load, the standby promoted
//! at once, sessions that follow the writable server, and every transaction read back from the
//! promoted standby.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::pair::{connect, PgArgs, PgConn, PgServers, SyncCommit, READY_TIMEOUT};
use crate::audit::{AuditTotals, Workload, WriteAudit};
use crate::cluster::WorkDir;
use crate::pacing::{pace, TICKS_QUEUED_MAX};
use crate::report::{latency_histogram, median, LatencyUs};

/// How the standby is told to take over.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PromoteWith {
    /// `SELECT pg_promote(wait => false)` on a session opened before the kill: what `pg_ctl promote`
    /// does (signal file + SIGUSR1 to the postmaster), without starting a process; as Borealis' Promote.
    Sql,
    /// `pg_ctl promote -W` (started as a process after the kill).
    PgCtl,
}

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct PgFailoverArgs {
    /// Offered transactions/s, open loop, every one on keys of its own (as `loadgen failover`).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Seconds of load before the primary is killed.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_seconds: f64,
    /// Seconds of load after the kill.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Fresh pairs, one failover each; the summary reports medians.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Client sessions; transactions go round-robin. (More than `loadgen failover`'s 2 connections: a
    /// PostgreSQL session runs one transaction at a time, and 2 cannot carry 2,000 synchronous
    /// two-put transactions/s here; the backlog would grow for the whole run.)
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Puts per transaction, each on a key of its own: read back, a transaction must be wholly present or wholly absent.
    #[arg(long, default_value_t = 2)]
    pub txn_ops: usize,
    /// Bytes of each put's value.
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
    /// Longest a transaction may take, re-sends to the new primary included; later it counts as unacknowledged.
    #[arg(long, default_value_t = 10.0)]
    pub deadline_seconds: f64,
    /// synchronous_commit of the client sessions (`on`: the standby holds every acknowledged commit).
    #[arg(long, value_enum, default_value = "on")]
    pub synchronous_commit: SyncCommit,
    /// How the standby is promoted, right after the kill.
    #[arg(long, value_enum, default_value = "sql")]
    pub promote_with: PromoteWith,
    /// Sessions whose connection broke reconnect (read-write only) with attempts this far apart over all sessions.
    #[arg(long, default_value_t = 5)]
    pub retry_ms: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub pg: PgArgs,
    /// Where the pairs live [default: a temp dir, removed after a successful run].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Where to write the results (JSON).
    #[arg(long, default_value = "bench-results/latest/pg-failover/summary.json")]
    pub json: PathBuf,
}

#[derive(Serialize, Clone, Debug)]
pub struct PgFailoverRun {
    pub run: usize,
    /// Kill to the first transaction acknowledged by the promoted standby (client-observed).
    pub failover_ms: f64,
    /// The last acknowledgement before the kill to the first after it.
    pub unavailable_ms: f64,
    /// Kill to the promotion request sent.
    pub promote_sent_ms: f64,
    /// Kill to the standby leaving recovery (`pg_is_in_recovery()` false, polled each millisecond; null with pg-ctl).
    pub promoted_ms: Option<f64>,
    #[serde(flatten)]
    pub audit: WriteAudit,
    pub commit_latency_us: LatencyUs,
    pub error_kinds: BTreeMap<String, u64>,
    /// The postmasters' pids (all stopped when the run ends).
    pub postgres_pgids: Vec<i32>,
    /// Load start to the kill, ms: the origin of the failover timeline is the load's start.
    pub kill_at_ms: f64,
    /// Each acknowledgement's arrival, ms since the load's start (the failover timeline).
    #[serde(skip)]
    pub acks_at_ms: Vec<f64>,
}

#[derive(Serialize, Debug, Clone)]
pub struct PgFailoverSummary {
    pub synchronous_commit: SyncCommit,
    pub promote_with: PromoteWith,
    pub runs: usize,
    pub rate: f64,
    pub failover_ms: f64,
    pub failover_ms_max: f64,
    pub unavailable_ms: f64,
    pub promote_sent_ms: f64,
    pub promoted_ms: Option<f64>,
    #[serde(flatten)]
    pub totals: AuditTotals,
}

/// The transaction `seq` of `workload`.
fn failover_txn(workload: &Workload, seq: u64) -> Vec<(String, Vec<u8>)> {
    (0..workload.txn_ops).map(|op| (workload.key(seq, op), workload.value(seq, op))).collect()
}

/// A session that follows the writable server: on an error it reconnects and re-sends the transaction.
struct Session {
    current: tokio::sync::Mutex<Option<Arc<Current>>>,
}

struct Current {
    conn: PgConn,
    /// 0: the primary, 1: the standby.
    server: usize,
    id: u64,
}

/// Which server takes writes, as the sessions found out.
struct Discovery {
    /// The server a session last connected to read-write.
    writable: Option<usize>,
    /// When the last connection attempt started: attempts are at least `retry` apart over all sessions.
    last_attempt: Option<Instant>,
}

struct FailoverClient {
    sessions: Vec<Session>,
    ports: [u16; 2],
    mode: SyncCommit,
    retry: Duration,
    deadline: Duration,
    next_id: std::sync::atomic::AtomicU64,
    /// Connection attempts go one at a time: every attempt on a server that refuses writes still
    /// starts a backend there (a fork), and a storm of them would slow the promotion it waits for.
    discovery: tokio::sync::Mutex<Discovery>,
}

struct Acked {
    server: usize,
    at: Instant,
    attempts: u32,
}

impl FailoverClient {
    /// The session's live connection, or a new one if there is none or `failed` is the current one:
    /// read-write only (a standby still in recovery refuses), the server known to take writes first,
    /// then the primary, then the standby.
    async fn connection(&self, s: usize, failed: Option<u64>) -> Result<Arc<Current>, String> {
        let mut current = self.sessions[s].current.lock().await;
        if let Some(c) = current.as_ref().filter(|c| Some(c.id) != failed) {
            return Ok(c.clone());
        }
        *current = None;
        let mut discovery = self.discovery.lock().await;
        if let Some(last) = discovery.last_attempt {
            tokio::time::sleep_until((last + self.retry).into()).await;
        }
        discovery.last_attempt = Some(Instant::now());
        let mut order = vec![0, 1];
        if let Some(w) = discovery.writable {
            order.retain(|&x| x != w);
            order.insert(0, w);
        }
        let mut errors = Vec::new();
        for server in order {
            match PgConn::open(self.ports[server], self.mode, &format!("loadgen-failover-{s}"), true).await {
                Ok(conn) => {
                    discovery.writable = Some(server);
                    let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let c = Arc::new(Current { conn, server, id });
                    *current = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        Err(format!("no writable server: {}", errors.join("; ")))
    }

    async fn txn(&self, s: usize, ops: &[(String, Vec<u8>)]) -> Result<Acked, String> {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let mut failed = None;
        let mut attempts = 0;
        let mut last_error = String::from("deadline passed before the first attempt");
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(last_error);
            }
            let c = match tokio::time::timeout_at(deadline, self.connection(s, failed)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    // The next attempt waits its turn (`discovery` paces them).
                    last_error = e;
                    continue;
                }
                Err(_) => return Err(format!("deadline passed while connecting ({last_error})")),
            };
            attempts += 1;
            match tokio::time::timeout_at(deadline, c.conn.txn(ops)).await {
                Ok(Ok(_)) => return Ok(Acked { server: c.server, at: Instant::now(), attempts }),
                Ok(Err(e)) => {
                    last_error = if e.is_closed() { "connection closed".to_string() } else { e.to_string() };
                    failed = Some(c.id);
                }
                Err(_) => return Err("deadline passed waiting for the commit".into()),
            }
        }
    }
}

struct FailoverOutcome {
    seq: u64,
    due: Instant,
    result: Result<Acked, String>,
}

pub async fn failover_run(args: PgFailoverArgs) -> Result<()> {
    check_failover_args(&args)?;
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    tokio::select! {
        r = failover_bench(&args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

pub fn check_failover_args(args: &PgFailoverArgs) -> Result<()> {
    if args.rate.is_nan() || args.rate <= 0.0 || args.runs == 0 || args.connections == 0 || args.txn_ops == 0 {
        bail!("--rate, --runs, --connections and --txn-ops must be positive");
    }
    if args.warmup_seconds <= 0.0 || args.seconds <= 0.0 || args.deadline_seconds <= 0.0 {
        bail!("--warmup-seconds, --seconds and --deadline-seconds must be positive");
    }
    Ok(())
}

async fn failover_bench(args: &PgFailoverArgs) -> Result<()> {
    let work = WorkDir::new(args.work_dir.as_deref(), "borealis-pg-failover")?;
    let mut runs = Vec::new();
    for run in 0..args.runs {
        let r = failover_measure(args, &work.path.join(format!("run-{}", run + 1)), run)
            .await
            .with_context(|| format!("run {} (pair under {})", run + 1, work.path.display()))?;
        eprintln!(
            "[postgres run {}/{}] failover {:.1} ms, unavailable {:.1} ms, {} acknowledged, {} lost",
            run + 1,
            args.runs,
            r.failover_ms,
            r.unavailable_ms,
            r.audit.acked_writes,
            r.audit.lost_acked_writes
        );
        runs.push(r);
    }
    let summary = failover_summary(args, &runs);
    let json = serde_json::json!({
        "failover_ms": summary.failover_ms,
        "unavailable_ms": summary.unavailable_ms,
        "lost_acked_writes": summary.totals.lost_acked_writes,
        "summary": summary,
        "params": args,
        "runs": runs,
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", args.json.display()))?;
    println!("{}", failover_table(&summary, &runs));
    println!("wrote {}", args.json.display());
    let must_keep = matches!(args.synchronous_commit, SyncCommit::On | SyncCommit::RemoteApply);
    let t = &summary.totals;
    if t.torn_writes > 0 || (must_keep && t.lost_acked_writes > 0) {
        bail!(
            "{} acknowledged writes lost, {} torn with synchronous_commit={}; see {}",
            t.lost_acked_writes,
            t.torn_writes,
            args.synchronous_commit.as_str(),
            args.json.display()
        );
    }
    work.cleanup();
    Ok(())
}

/// One failover on a fresh pair under `dir`, stopped afterwards whatever happened.
pub async fn failover_measure(args: &PgFailoverArgs, dir: &Path, run: usize) -> Result<PgFailoverRun> {
    let mut pair = PgServers::start(&args.pg, dir, 1).await?;
    let result = failover_load(args, &mut pair, run).await;
    let stopped = pair.stop();
    let mut r = result?;
    stopped?;
    r.postgres_pgids = pair.pgids();
    Ok(r)
}

async fn failover_load(args: &PgFailoverArgs, pair: &mut PgServers, run: usize) -> Result<PgFailoverRun> {
    let client = Arc::new(FailoverClient {
        sessions: (0..args.connections).map(|_| Session { current: tokio::sync::Mutex::new(None) }).collect(),
        ports: [pair.primary_port(), pair.standbys[0].port],
        mode: args.synchronous_commit,
        retry: Duration::from_millis(args.retry_ms),
        deadline: Duration::from_secs_f64(args.deadline_seconds),
        next_id: Default::default(),
        discovery: tokio::sync::Mutex::new(Discovery { writable: None, last_attempt: None }),
    });
    for s in 0..args.connections {
        let c = client.connection(s, None).await.map_err(|e| anyhow!(e))?;
        if c.server != 0 {
            bail!("the clients connected to the standby before the kill");
        }
    }
    // Opened before the kill, so that the promotion is not delayed by a connection.
    let admin = connect(pair.standbys[0].port, "loadgen-promote", false).await?;
    let workload = Arc::new(Workload { run, txn_ops: args.txn_ops, value_bytes: args.value_bytes });
    let warmup = Duration::from_secs_f64(args.warmup_seconds);
    let total = warmup + Duration::from_secs_f64(args.seconds);
    let start = Instant::now() + Duration::from_millis(20);
    let (tick_tx, mut ticks) = mpsc::channel(TICKS_QUEUED_MAX);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let pacer = std::thread::spawn(move || pace(start, interval, total, vec![tick_tx]));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (client, outcomes, workload) = (client.clone(), outcomes.clone(), workload.clone());
        let sessions = args.connections;
        tokio::spawn(async move {
            let mut inflight = JoinSet::new();
            let mut seq = 0u64;
            while let Some(due) = ticks.recv().await {
                let (client, outcomes) = (client.clone(), outcomes.clone());
                let ops = failover_txn(&workload, seq);
                inflight.spawn(async move {
                    let result = client.txn(seq as usize % sessions, &ops).await;
                    outcomes.lock().expect("outcomes").push(FailoverOutcome { seq, due, result });
                });
                seq += 1;
                while inflight.try_join_next().is_some() {}
            }
            // Every transaction ends by its deadline.
            while inflight.join_next().await.is_some() {}
            seq
        })
    };

    tokio::time::sleep_until((start + warmup).into()).await;
    let killed_at = pair.primary.kill();
    let promote_sent = Instant::now();
    match args.promote_with {
        PromoteWith::Sql => {
            admin.query_one("SELECT pg_promote(wait => false)", &[]).await.context("pg_promote on the standby")?;
        }
        PromoteWith::PgCtl => pair.pg_ctl_promote().await.context("pg_ctl promote")?,
    }
    let promoted_at = match args.promote_with {
        PromoteWith::Sql => {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if !admin.query_one("SELECT pg_is_in_recovery()", &[]).await.context("pg_is_in_recovery")?.get::<_, bool>(0) {
                    break Some(Instant::now());
                }
                if Instant::now() > deadline {
                    bail!("the standby was still in recovery {READY_TIMEOUT:?} after pg_promote; see {}", pair.standbys[0].log.display());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        PromoteWith::PgCtl => None,
    };
    let writes = load.await.context("load task")?;
    pacer.join().map_err(|_| anyhow!("pacer thread panicked"))?;
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    drop(client);

    // Read every transaction back from the promoted standby.
    let reader = connect(pair.standbys[0].port, "loadgen-read-back", true).await.context("connect to the promoted standby for the read-back")?;
    let rows = reader.query("SELECT key, value FROM kv", &[]).await.context("read back")?;
    let stored: HashMap<String, Vec<u8>> = rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut audit = WriteAudit::default();
    for o in &outcomes {
        let present = (0..args.txn_ops).filter(|&op| stored.get(&workload.key(o.seq, op)) == Some(&workload.value(o.seq, op))).count();
        audit.read_back(o.result.is_ok(), present, args.txn_ops);
    }

    let mut latency = latency_histogram();
    let mut errors = BTreeMap::<String, u64>::new();
    let mut last_before: Option<Instant> = None;
    let mut first_new: Option<Instant> = None;
    let mut acks_at_ms = Vec::new();
    for o in &outcomes {
        match &o.result {
            Ok(a) => {
                latency.saturating_record((a.at - o.due).as_micros() as u64);
                acks_at_ms.push((a.at.saturating_duration_since(start)).as_secs_f64() * 1e3);
                audit.acked(a.attempts, a.server == 0, a.at <= killed_at);
                if a.server == 0 {
                    if a.at <= killed_at {
                        last_before = last_before.max(Some(a.at));
                    }
                } else if first_new.is_none_or(|f| a.at < f) {
                    first_new = Some(a.at);
                }
            }
            Err(e) => *errors.entry(e.clone()).or_default() += 1,
        }
    }
    let first_new = first_new.context("no transaction acknowledged by the promoted standby")?;
    let last_before = last_before.context("no transaction acknowledged before the kill")?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(PgFailoverRun {
        run,
        failover_ms: ms(first_new - killed_at),
        unavailable_ms: ms(first_new - last_before),
        promote_sent_ms: ms(promote_sent - killed_at),
        promoted_ms: promoted_at.map(|p| ms(p - killed_at)),
        audit: WriteAudit { writes, ..audit },
        commit_latency_us: LatencyUs::of(&latency),
        error_kinds: errors,
        postgres_pgids: Vec::new(),
        kill_at_ms: ms(killed_at.saturating_duration_since(start)),
        acks_at_ms,
    })
}

pub fn failover_summary(args: &PgFailoverArgs, runs: &[PgFailoverRun]) -> PgFailoverSummary {
    let m = |f: &dyn Fn(&PgFailoverRun) -> f64| median(runs.iter().map(f).collect());
    let promoted: Vec<f64> = runs.iter().filter_map(|r| r.promoted_ms).collect();
    PgFailoverSummary {
        synchronous_commit: args.synchronous_commit,
        promote_with: args.promote_with,
        runs: runs.len(),
        rate: args.rate,
        failover_ms: m(&|r| r.failover_ms),
        failover_ms_max: runs.iter().map(|r| r.failover_ms).fold(0.0, f64::max),
        unavailable_ms: m(&|r| r.unavailable_ms),
        promote_sent_ms: m(&|r| r.promote_sent_ms),
        promoted_ms: (!promoted.is_empty()).then(|| median(promoted)),
        totals: AuditTotals::of(runs.iter().map(|r| &r.audit)),
    }
}

pub fn failover_table(s: &PgFailoverSummary, runs: &[PgFailoverRun]) -> String {
    let mut t = format!(
        "PostgreSQL failover (synchronous_commit={}, SIGKILL of the primary, promote {:?}, {:.0} transactions/s offered)\n\n| run | failover ms | unavailable ms | promote sent ms | promoted ms | acked | lost acked | unacked present/absent/torn |\n|---|---|---|---|---|---|---|---|\n",
        s.synchronous_commit.as_str(),
        s.promote_with,
        s.rate
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for r in runs {
        t += &format!(
            "| {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {}/{}/{} |\n",
            r.run + 1,
            r.failover_ms,
            r.unavailable_ms,
            r.promote_sent_ms,
            opt(r.promoted_ms),
            r.audit.acked_writes,
            r.audit.lost_acked_writes,
            r.audit.unacked_present,
            r.audit.unacked_absent,
            r.audit.torn_writes
        );
    }
    t += &format!(
        "| median (counts: sum) | {:.1} | {:.1} | {:.1} | {} | {} | {} | {}/{}/{} |\n",
        s.failover_ms,
        s.unavailable_ms,
        s.promote_sent_ms,
        opt(s.promoted_ms),
        s.totals.acked_writes,
        s.totals.lost_acked_writes,
        s.totals.unacked_present,
        s.totals.unacked_absent,
        s.totals.torn_writes
    );
    t
}
