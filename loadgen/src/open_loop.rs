//! The open-loop commit generator and its measurements, whatever the system
//! under test (Borealis' writer, PostgreSQL's primary): commits are due at
//! fixed times whether or not earlier ones were answered, and latency counts
//! from each commit's due time, so a stall of the system (or of loadgen)
//! shows up as latency instead of as a pause in sending. Meanwhile read-point
//! feeds of the writer and of each replica give the visibility lag of every
//! acknowledged commit (see `lag`).

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;
use redo_core::page::PageOp;
use redo_core::Lsn;
use serde::Serialize;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use crate::cluster::{ReplicadMetrics, WriterdMetrics};
use crate::lag::LagTracker;
use crate::pacing::{pace, TICKS_QUEUED_MAX};
use crate::procs;
use crate::report::{latency_histogram, median, median_by, write_hgrm, LatencyUs};

/// The workload and schedule of an open-loop measurement; the same for every system compared.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct LoadArgs {
    /// Client connections (one pipelined stream each); commits go round-robin.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Seconds measured per point (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Seconds of load at the same rate before measuring (not recorded).
    #[arg(long, default_value_t = 2.0)]
    pub warmup_seconds: f64,
    /// Repetitions of every point; the summary reports medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// After the schedule ends, seconds to wait for outstanding commits; those still unanswered count as errors.
    /// Past saturation the backlog drains at the acknowledged rate, so allow for it.
    #[arg(long, default_value_t = 60.0)]
    pub drain_seconds: f64,
    /// Bytes of each put's value.
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
    /// Distinct keys (`key-00000042`), chosen uniformly at random for every put.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Puts per transaction.
    #[arg(long, default_value_t = 1)]
    pub txn_ops: usize,
    /// Measure the replicas' / standbys' visibility lag (`on`), or open no read-point feed at all (`off`):
    /// the servers then do no work for the probe, e.g. to measure their CPU per commit.
    #[arg(long, default_value = "on", action = clap::ArgAction::Set,
          value_parser = clap::builder::TypedValueParser::map(clap::builder::PossibleValuesParser::new(["on", "off"]), |v: String| v == "on"))]
    pub lag_probe: bool,
}

impl LoadArgs {
    pub fn check(&self, rates: &[f64]) -> Result<()> {
        if rates.iter().any(|&r| r.is_nan() || r <= 0.0) || self.connections == 0 || self.runs == 0 || self.keys == 0 || self.txn_ops == 0 {
            anyhow::bail!("--rates, --connections, --runs, --keys and --txn-ops must be positive");
        }
        if let Some(r) = rates.iter().enumerate().find_map(|(i, r)| rates[..i].contains(r).then_some(r)) {
            anyhow::bail!("--rates lists {r} twice (use --runs to repeat a point)");
        }
        Ok(())
    }
}

/// The system under test, as the generator sees it.
pub trait System: Send + Sync + 'static {
    /// Commits one transaction of puts on client connection `conn`; once acknowledged, its
    /// position in the system's log (commit LSN, or PostgreSQL's WAL position), for the lag probe.
    fn commit(&self, conn: usize, ops: Vec<PageOp>) -> impl Future<Output = Result<Lsn, String>> + Send;
}

/// A feed of a writer's or replica's read point: each call returns it once it has advanced.
pub trait ReadPoint: Send + 'static {
    fn next(&mut self) -> impl Future<Output = Result<Lsn>> + Send;
}

/// A point is saturated when the system acknowledged less than this share of the offered rate.
const SATURATED_BELOW: f64 = 0.95;

/// After the load, how long replicas get to show the commits they have not shown yet; the rest count as unseen.
pub const REPLICA_CATCH_UP: Duration = Duration::from_secs(5);

/// A feed's first read point (the current one) is due at once.
const FEED_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// One replica's part of a measurement.
#[derive(Serialize, Clone, Debug)]
pub struct ReplicaLagRun {
    pub addr: String,
    pub lag_us: LatencyUs,
    /// Measured commits this replica had not shown `REPLICA_CATCH_UP` after the load (not in `lag_us`).
    pub unseen: u64,
    /// The replica's own gauges (Borealis replicas loadgen started; null otherwise).
    pub replicad: Option<ReplicadMetrics>,
}

/// Distance in LSNs from the writer's read point to a replica's at its progress events.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct LsnLag {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct Measurement {
    pub run: usize,
    pub rate: f64,
    /// Commits due in the measured window and acknowledged (those in `commit_latency_us`).
    pub commits: u64,
    /// Acknowledgements received during the measured seconds (whenever the commits were due), per second:
    /// the offered rate while the system keeps up, its capacity once it does not.
    pub throughput_commits_per_s: f64,
    /// Due time on the open-loop schedule to acknowledgement.
    pub commit_latency_us: LatencyUs,
    /// Commits that failed or got no reply within --drain-seconds, warm-up included.
    pub errors: u64,
    /// `errors` by message.
    pub error_kinds: BTreeMap<String, u64>,
    /// writerd's own metrics (Borealis embedded cluster only).
    pub writerd: Option<WriterdMetrics>,
    /// CPU time of every daemon of the cluster (user + system, warm-up to the end of the catch-up)
    /// over the commits writerd acknowledged: the cost of a commit, whatever the latency (Borealis embedded cluster only).
    pub cluster_cpu_us_per_commit: Option<f64>,
    /// CPU time of the servers (every process of theirs, `cpu`) during the measured seconds over the
    /// acknowledgements received in them (null when loadgen did not start the servers).
    pub server_cpu_us_per_commit: Option<f64>,
    /// Visibility lag of the measured commits on every replica together (null without replicas).
    pub replica_lag_us: Option<LatencyUs>,
    pub replica_lag_lsn: Option<LsnLag>,
    /// Sum over replicas of `unseen`.
    pub replica_lag_unseen: u64,
    pub replicas: Vec<ReplicaLagRun>,
    #[serde(skip)]
    pub hist: Histogram<u64>,
    #[serde(skip)]
    pub replica_hist: Histogram<u64>,
}

/// Medians over runs.
#[derive(Serialize, Debug, Clone)]
pub struct LatencyMediansUs {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: f64,
}

#[derive(Serialize, Debug, Clone)]
pub struct Point {
    /// `borealis` or `postgres`.
    pub system: String,
    /// When a commit is acknowledged: Borealis' `ack` (memory, disk), PostgreSQL's `synchronous_commit`.
    pub durability: String,
    pub rate: f64,
    pub connections: usize,
    pub value_bytes: usize,
    pub keys: u64,
    pub txn_ops: usize,
    pub runs: usize,
    pub seconds: f64,
    pub throughput_commits_per_s: f64,
    pub commit_latency_us: LatencyMediansUs,
    /// Sum over runs: every failed commit counts.
    pub errors: u64,
    /// Median throughput below 95% of the offered rate.
    pub saturated: bool,
    /// The median run's (by p99) latency histogram.
    pub hgrm: String,
    /// Medians over runs of writerd's own metrics (Borealis embedded cluster only).
    pub writerd_commit_latency_us_p50: Option<f64>,
    pub writerd_commit_latency_us_p99: Option<f64>,
    pub writerd_lal_stalls: Option<f64>,
    /// Median over runs of the daemons' CPU time per acknowledged commit (Borealis embedded cluster only).
    pub cluster_cpu_us_per_commit: Option<f64>,
    /// Median over runs of the servers' CPU time in the measured seconds per acknowledgement in them.
    pub server_cpu_us_per_commit: Option<f64>,
    /// Medians over runs of the replica visibility lag (null without replicas).
    pub replica_lag_us: Option<LatencyMediansUs>,
    pub replica_lag_lsn: Option<LsnLag>,
    /// Sum over runs: measured commits a replica never showed (within 5 s after the load).
    pub replica_lag_unseen: u64,
    /// The median run's (by p99) replica lag histogram.
    pub replica_lag_hgrm: Option<String>,
}

/// What the in-flight commits report back; the progress line reads and resets the `second_*` part.
struct Recorder {
    measure_start: Instant,
    measure_end: Instant,
    hist: Histogram<u64>,
    commits: u64,
    acks_in_window: u64,
    /// Every failed commit, warm-up included.
    errors: BTreeMap<String, u64>,
    /// Commits sent and not yet answered.
    outstanding: u64,
    second_hist: Histogram<u64>,
    second_commits: u64,
    second_errors: u64,
    lag: LagTracker,
}

/// Whose read-point feed a progress event came from.
#[derive(Clone, Copy)]
enum Feed {
    Writer,
    Replica(usize),
}

impl Recorder {
    fn in_window(&self, t: Instant) -> bool {
        (self.measure_start..self.measure_end).contains(&t)
    }

    fn finish(&mut self, due: Instant, result: Result<Lsn, String>) {
        let now = Instant::now();
        self.outstanding -= 1;
        match result {
            Ok(commit_lsn) => {
                let us = (now - due).as_micros() as u64;
                let measured = due >= self.measure_start;
                self.second_hist.saturating_record(us);
                self.second_commits += 1;
                if measured {
                    self.hist.saturating_record(us);
                    self.commits += 1;
                }
                if self.in_window(now) {
                    self.acks_in_window += 1;
                }
                self.lag.ack(commit_lsn, now, measured);
            }
            Err(e) => {
                self.second_errors += 1;
                *self.errors.entry(e).or_default() += 1;
            }
        }
    }

    fn progress(&mut self, feed: Feed, vdl: Lsn, at: Instant) {
        match feed {
            Feed::Writer => self.lag.writer_progress(vdl),
            Feed::Replica(i) => self.lag.replica_progress(i, vdl, at, self.in_window(at)),
        }
    }
}

/// The keys and value of the puts: uniform random keys from a randomly keyed SipHash of the sequence number.
struct Workload {
    keys: u64,
    txn_ops: usize,
    value: Vec<u8>,
    hasher: std::collections::hash_map::RandomState,
}

impl Workload {
    fn txn(&self, seq: u64) -> Vec<PageOp> {
        (0..self.txn_ops as u64)
            .map(|i| {
                let k = self.hasher.hash_one(seq * self.txn_ops as u64 + i) % self.keys;
                PageOp::Put { key: format!("key-{k:08}").into_bytes(), value: self.value.clone() }
            })
            .collect()
    }
}

/// A progress bar that owns the terminal (a sweep's): status lines become its message.
static STATUS: OnceLock<indicatif::ProgressBar> = OnceLock::new();

/// Sends the per-second status lines to `bar` from now on (once per process).
pub fn status_to(bar: indicatif::ProgressBar) {
    let _ = STATUS.set(bar);
}

/// Refreshes a one-line status about once a second: as a progress bar's message, in place on a
/// terminal, or a line per second otherwise.
async fn progress(label: String, recorder: Arc<Mutex<Recorder>>, start: Instant) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval_at((start + Duration::from_secs(1)).into(), Duration::from_secs(1));
    let mut last = start;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let line = {
            let mut r = recorder.lock().expect("recorder");
            let phase = if last < r.measure_start { "warm-up" } else { "measuring" };
            let lag = if r.lag.replicas() > 0 {
                let h = &r.lag.second_lag_us;
                format!(", replica lag p50/p99 {}/{} us", h.value_at_quantile(0.5), h.value_at_quantile(0.99))
            } else {
                String::new()
            };
            let line = format!(
                "{label} {phase} {:>3.0} s: {:>6.0} commits/s, p99 {} us{lag}, errors {} (last second)",
                (now - start).as_secs_f64(),
                r.second_commits as f64 / (now - last).as_secs_f64(),
                r.second_hist.value_at_quantile(0.99),
                r.second_errors
            );
            r.second_hist.reset();
            r.lag.second_lag_us.reset();
            r.second_commits = 0;
            r.second_errors = 0;
            line
        };
        last = now;
        if let Some(bar) = STATUS.get().filter(|b| !b.is_hidden()) {
            bar.set_message(line);
        } else if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// Takes a feed's first read point (the current one): every later advance is reported.
async fn open_feed<F: ReadPoint>(feed: &mut F, name: &str) -> Result<Lsn> {
    let first =
        tokio::time::timeout(FEED_OPEN_TIMEOUT, feed.next()).await.map_err(|_| anyhow!("{name} read-point feed: no progress within {FEED_OPEN_TIMEOUT:?}"))?;
    first.map_err(|e| e.context(format!("{name} read-point feed")))
}

/// Hands a feed's progress to the recorder until aborted; a lost feed counts as an error.
async fn follow<F: ReadPoint>(mut feed: F, source: Feed, name: String, recorder: Arc<Mutex<Recorder>>, advanced: Arc<Notify>) {
    loop {
        match feed.next().await {
            Ok(vdl) => {
                let at = Instant::now();
                recorder.lock().expect("recorder").progress(source, vdl, at);
                advanced.notify_waiters();
            }
            Err(e) => {
                *recorder.lock().expect("recorder").errors.entry(format!("{name} read-point feed: {e:#}")).or_default() += 1;
                return;
            }
        }
    }
}

/// The writer's feed (for the replicas' distance in LSNs) and each replica's, by name.
pub struct Feeds<F> {
    pub writer: Option<F>,
    pub replicas: Vec<(String, F)>,
}

/// Reads the CPU time of `servers` (pids, with their descendants) at `from` and at `to`, on a thread of
/// its own (reading /proc takes milliseconds that the load's thread cannot spare); returns the difference, s.
fn window_cpu(servers: Vec<i32>, from: Instant, to: Instant) -> std::thread::JoinHandle<f64> {
    std::thread::spawn(move || {
        std::thread::sleep(from.saturating_duration_since(Instant::now()));
        let before = procs::tree_cpu_seconds(&servers);
        std::thread::sleep(to.saturating_duration_since(Instant::now()));
        procs::tree_cpu_seconds(&servers) - before
    })
}

/// One point: open-loop commits at `rate` for the warm-up plus the measured seconds, then waits for
/// every reply and for the replicas to show every acknowledged commit (up to `REPLICA_CATCH_UP`).
/// `servers`: the pids of the system's server processes, whose CPU (with their descendants') is
/// measured over the measured seconds (none: not measured). `label` prefixes the progress line.
pub async fn measure<S: System, F: ReadPoint>(
    args: &LoadArgs,
    system: Arc<S>,
    feeds: Feeds<F>,
    servers: &[i32],
    label: &str,
    run: usize,
    rate: f64,
) -> Result<Measurement> {
    let replica_names: Vec<String> = feeds.replicas.iter().map(|(name, _)| name.clone()).collect();
    let sources = feeds
        .writer
        .map(|f| (Feed::Writer, "writer".to_string(), f))
        .into_iter()
        .chain(feeds.replicas.into_iter().enumerate().map(|(i, (name, f))| (Feed::Replica(i), name, f)));
    // Feeds report their first read point before the load, so that every commit is acknowledged while they report.
    let mut opened = Vec::new();
    for (source, name, mut feed) in sources {
        let vdl = open_feed(&mut feed, &name).await?;
        opened.push((source, name, feed, vdl));
    }
    let warmup = Duration::from_secs_f64(args.warmup_seconds);
    let total = warmup + Duration::from_secs_f64(args.seconds);
    // A moment's head start, so the first commits are not late from the start.
    let start = Instant::now() + Duration::from_millis(20);
    let measure_start = start + warmup;
    let recorder = Arc::new(Mutex::new(Recorder {
        measure_start,
        measure_end: start + total,
        hist: latency_histogram(),
        commits: 0,
        acks_in_window: 0,
        errors: BTreeMap::new(),
        outstanding: 0,
        second_hist: latency_histogram(),
        second_commits: 0,
        second_errors: 0,
        lag: LagTracker::new(replica_names.len()),
    }));
    let advanced = Arc::new(Notify::new());
    let mut followers = JoinSet::new();
    for (source, name, feed, vdl) in opened {
        recorder.lock().expect("recorder").progress(source, vdl, Instant::now());
        followers.spawn(follow(feed, source, name, recorder.clone(), advanced.clone()));
    }
    let progress = tokio::spawn(progress(format!("[{label} run {}/{} {rate:.0}/s]", run + 1, args.runs), recorder.clone(), start));
    let cpu = (!servers.is_empty()).then(|| window_cpu(servers.to_vec(), measure_start, start + total));
    let (tick_tx, mut ticks) = mpsc::channel(TICKS_QUEUED_MAX);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let pacer = std::thread::spawn(move || pace(start, interval, total, vec![tick_tx]));
    let workload = Workload { keys: args.keys, txn_ops: args.txn_ops, value: vec![0x5A; args.value_bytes], hasher: Default::default() };
    let mut inflight = JoinSet::new();
    let mut seq = 0u64;
    while let Some(due) = ticks.recv().await {
        let conn = seq as usize % args.connections;
        let ops = workload.txn(seq);
        seq += 1;
        recorder.lock().expect("recorder").outstanding += 1;
        let recorder = recorder.clone();
        let system = system.clone();
        inflight.spawn(async move {
            let result = system.commit(conn, ops).await;
            recorder.lock().expect("recorder").finish(due, result);
        });
        // Reap finished tasks as we go, so the set holds only what is in flight.
        while inflight.try_join_next().is_some() {}
    }
    pacer.join().map_err(|_| anyhow!("pacer thread panicked"))?;
    let drain = Duration::from_secs_f64(args.drain_seconds);
    let drained = tokio::time::timeout(drain, async { while inflight.join_next().await.is_some() {} }).await;
    // Abandon what is still unanswered, and wait until no task can touch the recorder any more.
    inflight.abort_all();
    while inflight.join_next().await.is_some() {}
    let cpu_seconds = cpu.map(|t| t.join().map_err(|_| anyhow!("CPU reading thread panicked"))).transpose()?;
    let catch_up = tokio::time::Instant::now() + REPLICA_CATCH_UP;
    loop {
        // Registered before the check, so an advance in between is not missed.
        let advanced = advanced.notified();
        if recorder.lock().expect("recorder").lag.all_seen() || tokio::time::timeout_at(catch_up, advanced).await.is_err() {
            break;
        }
    }
    followers.abort_all();
    while followers.join_next().await.is_some() {}
    progress.abort();
    if std::io::stderr().is_terminal() && STATUS.get().is_none() {
        eprintln!();
    }
    let mut guard = recorder.lock().expect("recorder");
    let r = &mut *guard;
    if drained.is_err() {
        let n = std::mem::take(&mut r.outstanding);
        r.errors.insert(format!("no reply within --drain-seconds {} after the schedule ended", args.drain_seconds), n);
    }
    let lag = &r.lag;
    let replicas: Vec<ReplicaLagRun> = replica_names
        .into_iter()
        .enumerate()
        .map(|(i, addr)| ReplicaLagRun { addr, lag_us: LatencyUs::of(lag.lag_us(i)), unseen: lag.unseen(i), replicad: None })
        .collect();
    let replica_hist = lag.all_lag_us();
    let lsn = lag.lag_lsn();
    let lagged = !replicas.is_empty();
    Ok(Measurement {
        run,
        rate,
        commits: r.commits,
        throughput_commits_per_s: r.acks_in_window as f64 / args.seconds,
        commit_latency_us: LatencyUs::of(&r.hist),
        errors: r.errors.values().sum(),
        error_kinds: std::mem::take(&mut r.errors),
        writerd: None,
        cluster_cpu_us_per_commit: None,
        server_cpu_us_per_commit: cpu_seconds.map(|s| s * 1e6 / r.acks_in_window.max(1) as f64),
        replica_lag_us: lagged.then(|| LatencyUs::of(&replica_hist)),
        replica_lag_lsn: lagged.then(|| LsnLag { p50: lsn.value_at_quantile(0.5) as f64, p99: lsn.value_at_quantile(0.99) as f64, max: lsn.max() as f64 }),
        replica_lag_unseen: replicas.iter().map(|r| r.unseen).sum(),
        replicas,
        hist: r.hist.clone(),
        replica_hist,
    })
}

/// The points of a set of runs at one rate, medians over runs; writes the median run's histograms to
/// `out/PREFIX-commit-latency-RATE-per-s.hgrm` and `out/PREFIX-replica-lag-RATE-per-s.hgrm` (no prefix when empty).
pub fn summarize(args: &LoadArgs, system: &str, durability: &str, rate: f64, rs: &[&Measurement], out: &Path, prefix: &str) -> Result<Point> {
    let m = |f: &dyn Fn(&Measurement) -> f64| median(rs.iter().map(|r| f(r)).collect());
    // The median of a value every run has, else null.
    let optional = |f: &dyn Fn(&Measurement) -> Option<f64>| rs.iter().all(|r| f(r).is_some()).then(|| m(&|r| f(r).expect("checked")));
    let writerd = |f: &dyn Fn(&WriterdMetrics) -> u64| optional(&|r| r.writerd.as_ref().map(|w| f(w) as f64));
    let hgrm = format!("{prefix}commit-latency-{rate:.0}-per-s.hgrm");
    write_hgrm(&out.join(&hgrm), &median_by(rs, |r| r.commit_latency_us.p99).hist, 1.0)?;
    let throughput = m(&|r| r.throughput_commits_per_s);
    let medians = |f: &dyn Fn(&Measurement) -> LatencyUs| LatencyMediansUs {
        p50: m(&|r| f(r).p50 as f64),
        p99: m(&|r| f(r).p99 as f64),
        p999: m(&|r| f(r).p999 as f64),
        max: m(&|r| f(r).max as f64),
        count: m(&|r| f(r).count as f64),
    };
    // Every run of a point has the same replicas: all or none measured a lag.
    let lagged = rs.iter().all(|r| r.replica_lag_us.is_some());
    let replica_lag_hgrm = lagged.then(|| format!("{prefix}replica-lag-{rate:.0}-per-s.hgrm"));
    if let Some(name) = &replica_lag_hgrm {
        let median_run = median_by(rs, |r| r.replica_lag_us.expect("checked").p99);
        write_hgrm(&out.join(name), &median_run.replica_hist, 1.0)?;
    }
    let lsn = |f: &dyn Fn(&LsnLag) -> f64| m(&|r| f(&r.replica_lag_lsn.expect("measured with replicas")));
    Ok(Point {
        system: system.to_string(),
        durability: durability.to_string(),
        rate,
        connections: args.connections,
        value_bytes: args.value_bytes,
        keys: args.keys,
        txn_ops: args.txn_ops,
        runs: rs.len(),
        seconds: args.seconds,
        throughput_commits_per_s: throughput,
        commit_latency_us: medians(&|r| r.commit_latency_us),
        errors: rs.iter().map(|r| r.errors).sum(),
        saturated: throughput < rate * SATURATED_BELOW,
        hgrm,
        writerd_commit_latency_us_p50: writerd(&|w| w.commit_latency_us_p50),
        writerd_commit_latency_us_p99: writerd(&|w| w.commit_latency_us_p99),
        writerd_lal_stalls: writerd(&|w| w.lal_stalls),
        cluster_cpu_us_per_commit: optional(&|r| r.cluster_cpu_us_per_commit),
        server_cpu_us_per_commit: optional(&|r| r.server_cpu_us_per_commit),
        replica_lag_us: lagged.then(|| medians(&|r| r.replica_lag_us.expect("checked"))),
        replica_lag_lsn: lagged.then(|| LsnLag { p50: lsn(&|l| l.p50), p99: lsn(&|l| l.p99), max: lsn(&|l| l.max) }),
        replica_lag_unseen: rs.iter().map(|r| r.replica_lag_unseen).sum(),
        replica_lag_hgrm,
    })
}

/// A markdown table of points: one row each, durability stated per row.
pub fn table(points: &[Point]) -> String {
    let mut t = String::from(
        "| system | durability | value B | offered commits/s | acknowledged commits/s | p50 us | p99 us | p99.9 us | max us | errors | writer-side p50/p99 us | replica lag p50/p99 us | server CPU us/commit | measured-window CPU us/commit |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in points {
        let l = &p.commit_latency_us;
        let writerd = match (p.writerd_commit_latency_us_p50, p.writerd_commit_latency_us_p99) {
            (Some(p50), Some(p99)) => format!("{p50:.0}/{p99:.0}"),
            _ => "-".into(),
        };
        let lag = match (&p.replica_lag_us, p.replica_lag_unseen) {
            (Some(l), 0) => format!("{:.0}/{:.0}", l.p50, l.p99),
            (Some(l), unseen) => format!("{:.0}/{:.0} ({unseen} unseen)", l.p50, l.p99),
            (None, _) => "-".into(),
        };
        let us = |v: Option<f64>| v.map_or("-".to_string(), |c| format!("{c:.0}"));
        let (cpu, window_cpu) = (us(p.cluster_cpu_us_per_commit), us(p.server_cpu_us_per_commit));
        t += &format!(
            "| {} | {} | {} | {:.0} | {:.0}{} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {writerd} | {lag} | {cpu} | {window_cpu} |\n",
            p.system,
            p.durability,
            p.value_bytes,
            p.rate,
            p.throughput_commits_per_s,
            if p.saturated { " (saturated)" } else { "" },
            l.p50,
            l.p99,
            l.p999,
            l.max,
            p.errors
        );
    }
    t
}

/// What a set of points adds up to, printed after the table: saturation, unseen commits; an error if any commit failed.
pub fn verdict(points: &[Point], summary: &Path) -> Result<()> {
    if let Some(p) = points.iter().find(|p| p.saturated) {
        println!("{} {}: saturated from {:.0} commits/s offered: {:.0} commits/s acknowledged", p.system, p.durability, p.rate, p.throughput_commits_per_s);
    }
    let unseen: u64 = points.iter().map(|p| p.replica_lag_unseen).sum();
    if unseen > 0 {
        println!(
            "replica lag: {unseen} acknowledged commits were not visible on a replica {} s after the load stopped (replica_lag_unseen; not in the lag percentiles)",
            REPLICA_CATCH_UP.as_secs()
        );
    }
    let errors: u64 = points.iter().map(|p| p.errors).sum();
    if errors > 0 {
        anyhow::bail!("{errors} errors (failed commits, lost read-point feeds); see error_kinds in {}", summary.display());
    }
    Ok(())
}
