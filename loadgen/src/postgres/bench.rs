//! `loadgen pg-bench`: the open-loop workload (`open_loop`) against a fresh primary and standbys
//! per point, for each `synchronous_commit` mode: commit latency, throughput, the standbys'
//! visibility lag (their replay position polled) and the servers' CPU per commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use redo_core::page::PageOp;
use redo_core::Lsn;
use serde::Serialize;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, Statement};

use super::pair::{connect, PgArgs, PgConn, PgServers, PgSetup, SyncCommit};
use super::process::Postmaster;
use crate::cluster::WorkDir;
use crate::open_loop::{self, Feeds, LoadArgs, Measurement, Point, ReadPoint, System};
use crate::pause::{DutyCycle, Pauser};

/// The puts of a transaction as (key, value); keys are text in PostgreSQL.
fn puts(ops: Vec<PageOp>) -> Result<Vec<(String, Vec<u8>)>, String> {
    ops.into_iter()
        .map(|op| match op {
            PageOp::Put { key, value } => String::from_utf8(key).map(|k| (k, value)).map_err(|_| "PostgreSQL keys are text: a key is not UTF-8".to_string()),
            PageOp::Delete { .. } => Err("the PostgreSQL target runs puts only".to_string()),
        })
        .collect()
}

/// PostgreSQL's primary behind `connections` client sessions.
pub struct PgPrimary {
    conns: Vec<PgConn>,
    acked: Arc<AckedPosition>,
}

/// The highest commit position acknowledged so far: the standby feed polls only while the standby is below it.
#[derive(Default)]
pub struct AckedPosition {
    lsn: std::sync::atomic::AtomicU64,
    advanced: tokio::sync::Notify,
}

impl AckedPosition {
    fn ack(&self, lsn: u64) {
        self.lsn.fetch_max(lsn, std::sync::atomic::Ordering::SeqCst);
        self.advanced.notify_waiters();
    }

    /// Returns once a commit above `lsn` has been acknowledged.
    async fn above(&self, lsn: u64) {
        loop {
            // Registered before the check, so an ack in between is not missed.
            let advanced = self.advanced.notified();
            if self.lsn.load(std::sync::atomic::Ordering::SeqCst) > lsn {
                return;
            }
            advanced.await;
        }
    }
}

impl PgPrimary {
    pub async fn connect(port: u16, mode: SyncCommit, connections: usize) -> Result<Self> {
        let mut conns = Vec::new();
        for i in 0..connections {
            conns.push(PgConn::open(port, mode, &format!("loadgen-{i}"), true).await?);
        }
        Ok(PgPrimary { conns, acked: Default::default() })
    }

    /// What the standby feed waits on (`WalFeed::standby`).
    pub fn acked(&self) -> Arc<AckedPosition> {
        self.acked.clone()
    }
}

impl System for PgPrimary {
    async fn commit(&self, conn: usize, ops: Vec<PageOp>) -> Result<Lsn, String> {
        let ops = puts(ops)?;
        let lsn = self.conns[conn].txn(&ops).await.map_err(|e| e.to_string())?;
        self.acked.ack(lsn);
        Ok(Lsn(lsn))
    }
}

/// A server's WAL position polled on one session, reported when it advances.
///
/// The standby's `pg_last_wal_replay_lsn()` is polled back to back while an acknowledged commit is
/// above its last replay point (and not at all otherwise): a commit is seen on the first poll answered
/// after its replay, so the lag errs high by up to one poll round trip (loopback, tens of µs), like the
/// replica-to-loadgen notification hop of Borealis' Follow feed. The polling costs CPU on the standby
/// and in loadgen that Borealis' event-driven feed does not (a third of a core at 1,000 commits/s here).
pub struct WalFeed {
    client: Client,
    query: Statement,
    last: Option<u64>,
    pause: Duration,
    /// Poll only while a commit above `last` is acknowledged (the standby feed).
    acked: Option<Arc<AckedPosition>>,
}

impl WalFeed {
    /// The standby's replay point (`pg_last_wal_replay_lsn()`), polled without pause while `acked` is above it.
    pub async fn standby(port: u16, acked: Arc<AckedPosition>) -> Result<Self> {
        Self::open(port, "SELECT pg_last_wal_replay_lsn()", Duration::ZERO, Some(acked)).await
    }

    /// The primary's WAL position (`pg_current_wal_lsn()`): only the LSN distance (replica_lag_lsn, in WAL bytes)
    /// uses it, so it is polled about once a millisecond, to spare the primary's CPU.
    pub async fn primary(port: u16) -> Result<Self> {
        Self::open(port, "SELECT pg_current_wal_lsn()", Duration::from_millis(1), None).await
    }

    async fn open(port: u16, sql: &str, pause: Duration, acked: Option<Arc<AckedPosition>>) -> Result<Self> {
        let client = connect(port, "loadgen-feed", false).await?;
        let query = client.prepare(sql).await?;
        Ok(WalFeed { client, query, last: None, pause, acked })
    }
}

impl ReadPoint for WalFeed {
    async fn next(&mut self) -> Result<Lsn> {
        loop {
            if let (Some(acked), Some(last)) = (&self.acked, self.last) {
                acked.above(last).await;
            }
            let lsn: Option<PgLsn> = self.client.query_one(&self.query, &[]).await?.get(0);
            if let Some(lsn) = lsn.map(u64::from) {
                if self.last.is_none_or(|last| lsn > last) {
                    self.last = Some(lsn);
                    return Ok(Lsn(lsn));
                }
            }
            if !self.pause.is_zero() {
                tokio::time::sleep(self.pause).await;
            }
        }
    }
}

/// One open-loop point against a fresh primary and standbys under `dir` (`setup`), stopped afterwards
/// whatever happened; with `pause`, every process of every standby is paused on that duty cycle for the
/// whole load (gray failure). Returns the measurement and the postmasters' pids (`PgServers::pgids`).
pub async fn measure_point(
    load: &LoadArgs,
    pg: &PgArgs,
    dir: &Path,
    setup: PgSetup,
    pause: Option<DutyCycle>,
    run: usize,
    rate: f64,
) -> Result<(Measurement, Vec<i32>)> {
    let mut servers = PgServers::start(pg, dir, setup.standbys).await?;
    let pgids = servers.pgids();
    let result = async {
        let mode = setup.synchronous_commit;
        let primary = Arc::new(PgPrimary::connect(servers.primary_port(), mode, load.connections).await?);
        let mut feeds = Feeds { writer: None, replicas: Vec::new() };
        if load.lag_probe {
            feeds.writer = Some(WalFeed::primary(servers.primary_port()).await?);
            for standby in &servers.standbys {
                feeds.replicas.push((format!("{} 127.0.0.1:{}", standby.name, standby.port), WalFeed::standby(standby.port, primary.acked()).await?));
            }
        }
        // The postmasters: a standby pauses whole, and the CPU counts every process under them.
        let pauser = pause.map(|duty| Pauser::start(servers.standbys.iter().map(Postmaster::pgid).collect(), duty));
        let m = open_loop::measure(load, primary, feeds, &pgids, &format!("postgres synchronous_commit={}", setup.durability()), run, rate).await;
        drop(pauser);
        m
    }
    .await;
    let stopped = servers.stop();
    let m = result?;
    stopped?;
    Ok((m, pgids))
}

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct PgBenchArgs {
    /// synchronous_commit modes to measure (each client session sets it); the standbys' visibility lag is measured in every mode.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "off,local,on,remote_apply")]
    pub synchronous_commit: Vec<SyncCommit>,
    /// Hot standbys of the primary (application_name s1, s2, …): with 1 it is the synchronous standby
    /// (synchronous_standby_names = '*'); with more the primary commits on any one of them
    /// (quorum commit: 'ANY 1 (s1, s2, …)').
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=3))]
    pub standbys: u16,
    /// Offered commit rates, commits/s over all connections.
    #[arg(long, value_delimiter = ',', default_value = "1000,4000")]
    pub rates: Vec<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub pg: PgArgs,
    /// Where the pairs live [default: a temp dir, removed after a successful run]; the postgres user must be able to reach it.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Directory for results: summary.json and .hgrm files per mode and rate.
    #[arg(long, default_value = "bench-results/latest/pg-bench")]
    pub out: PathBuf,
}

/// `loadgen pg-bench`: every (run, rate, mode) on a fresh pair, runs outermost so drift spreads over every point.
pub async fn bench_run(args: PgBenchArgs) -> Result<()> {
    args.load.check(&args.rates)?;
    if args.synchronous_commit.is_empty() {
        bail!("--synchronous-commit: name at least one mode");
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    tokio::select! {
        r = pg_bench(&args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

async fn pg_bench(args: &PgBenchArgs) -> Result<()> {
    let work = WorkDir::new(args.work_dir.as_deref(), "borealis-pg-bench")?;
    let setups: Vec<PgSetup> = args.synchronous_commit.iter().map(|&mode| PgSetup::new(mode, args.standbys.into())).collect();
    let mut runs: Vec<(PgSetup, Measurement)> = Vec::new();
    let mut pgids = Vec::new();
    for run in 0..args.load.runs {
        for &rate in &args.rates {
            for &setup in &setups {
                let (m, ids) = measure_point(&args.load, &args.pg, &work.path.join("pg"), setup, None, run, rate).await.with_context(|| {
                    format!("synchronous_commit={} run {} at {rate} commits/s (servers under {})", setup.durability(), run + 1, work.path.display())
                })?;
                pgids.extend(ids);
                runs.push((setup, m));
            }
        }
    }
    let points = pg_points(&args.load, &args.rates, &setups, &runs, &args.out, "")?;
    let json = serde_json::json!({
        "target": "postgres",
        "params": args,
        "points": points,
        "runs": runs_json(&runs),
        "postgres_pgids": pgids,
    });
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", path.display()))?;
    println!("{}", open_loop::table(&points));
    println!("wrote {}", path.display());
    work.cleanup();
    open_loop::verdict(&points, &path)
}

/// Every run as JSON: its setup and its measurement.
pub fn runs_json(runs: &[(PgSetup, Measurement)]) -> Vec<serde_json::Value> {
    runs.iter().map(|(setup, m)| serde_json::json!({ "synchronous_commit": setup.synchronous_commit, "standbys": setup.standbys, "measurement": m })).collect()
}

/// One point per (setup, rate), medians over runs; histograms go to `out`, file names starting with
/// `prefix` and the setup's (`postgres-on-`).
pub fn pg_points(load: &LoadArgs, rates: &[f64], setups: &[PgSetup], runs: &[(PgSetup, Measurement)], out: &Path, prefix: &str) -> Result<Vec<Point>> {
    let mut points = Vec::new();
    for &setup in setups {
        for &rate in rates {
            let rs: Vec<&Measurement> = runs.iter().filter(|(s, r)| *s == setup && r.rate == rate).map(|(_, r)| r).collect();
            if !rs.is_empty() {
                let durability = setup.durability();
                points.push(open_loop::summarize(load, "postgres", &durability, rate, &rs, out, &format!("{prefix}postgres-{durability}-"))?);
            }
        }
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puts_are_text_keys() {
        let ops = vec![PageOp::Put { key: b"key-1".to_vec(), value: vec![1, 2] }];
        assert_eq!(puts(ops).unwrap(), vec![("key-1".to_string(), vec![1, 2])]);
        assert!(puts(vec![PageOp::Delete { key: b"k".to_vec() }]).is_err());
        assert!(puts(vec![PageOp::Put { key: vec![0xff], value: vec![] }]).is_err());
    }
}
