//! `loadgen commit-bench`: open-loop commit load against a writer, a sweep of
//! offered rates, each point measured `--runs` times. Latency counts from
//! each commit's due time on the open-loop schedule, so a stall of the writer
//! (or of loadgen) shows up as latency instead of as a pause in sending.
//! Meanwhile every replica's and the writer's `Follow` feeds give the replica
//! visibility lag of each acknowledged commit (see `lag`).

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use borealis_net::api::{ApiClient, Follower};
use hdrhistogram::Histogram;
use redo_core::page::PageOp;
use redo_core::Lsn;
use serde::Serialize;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use crate::client::Target;
use crate::cluster::{metric_sum, scrape, Ack, ClusterSpec, EmbeddedClusterArgs, LocalCluster, WorkDir};
use crate::lag::LagTracker;
use crate::pacing::{pace, TICKS_QUEUED_MAX};
use crate::report::{latency_histogram, median, median_by, write_hgrm, LatencyUs};

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct CommitBenchArgs {
    /// Target an existing cluster (--writer or --volume; certificates from --certs/--cert-name)
    /// instead of starting an embedded one (6 storaged, 2 per AZ, a writerd and --replicas replicads in a temp dir).
    #[command(flatten)]
    #[serde(skip)]
    pub target: Target,
    /// Read replicas of the embedded cluster [default: 1]. Each one's visibility lag is measured:
    /// from a commit's acknowledgement until the replica's Follow feed reports an applied VDL at or
    /// past its commit LSN. The replica-to-loadgen notification hop is included, so the lag errs high.
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Client API address of a replica of the existing cluster (--writer/--volume) whose
    /// visibility lag to measure, as with --replicas (repeatable).
    #[arg(long = "replica")]
    pub replica_addrs: Vec<SocketAddr>,
    /// Offered commit rates to sweep, commits/s over all connections; each is a separate measurement.
    #[arg(long, value_delimiter = ',', default_value = "1000,7000,15000,25000,40000")]
    pub rates: Vec<f64>,
    /// Client connections (one QUIC connection, one pipelined stream each); commits go round-robin.
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
    /// The embedded cluster.
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: EmbeddedClusterArgs,
    /// Directory for results: summary.json and .hgrm files per rate (commit latency, replica lag).
    #[arg(long, default_value = "bench-results/latest/commit-bench")]
    pub out: PathBuf,
}

/// A point is saturated when the writer acknowledged less than this share of the offered rate.
const SATURATED_BELOW: f64 = 0.95;

/// After the load, how long replicas get to show the commits they have not shown yet; the rest count as unseen.
const REPLICA_CATCH_UP: Duration = Duration::from_secs(5);

/// A Follow feed's first progress (the server's current read point) is due at once.
const FEED_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// writerd's own view of one measurement (embedded cluster only), from its /metrics at the end.
/// Counters and summaries cover writerd's whole life: the warm-up and the measured seconds.
#[derive(Serialize, Clone, Debug)]
pub struct WriterdMetrics {
    /// `writerd_commits_total`: transactions acknowledged.
    pub commits: u64,
    /// `writerd_commit_errors_total`: transactions answered with an error.
    pub commit_errors: u64,
    /// `writerd_lal_stalls_total`: transactions that waited for VDL to advance (LSN allocation limit).
    pub lal_stalls: u64,
    /// `writerd_page_fetches_total`: page-cache misses read from storage (GetPage@LSN).
    pub page_fetches: u64,
    /// `writerd_commit_latency_us`: transaction received to acknowledged, inside writerd.
    pub commit_latency_us_p50: u64,
    pub commit_latency_us_p99: u64,
    pub commit_latency_us_p999: u64,
}

/// A replica's own gauges at the end of a measurement (embedded cluster only).
#[derive(Serialize, Clone, Debug)]
pub struct ReplicadMetrics {
    pub applied_vdl: u64,
    pub writer_vdl: u64,
    pub flushed_lsn: u64,
    pub retained_bytes: u64,
    pub pending_bytes: u64,
    /// Inside the replica: from hearing a VDL to the read point reaching it.
    pub apply_delay_us_p50: u64,
    pub apply_delay_us_p99: u64,
}

/// One replica's part of a measurement.
#[derive(Serialize, Clone, Debug)]
pub struct ReplicaLagRun {
    pub addr: SocketAddr,
    pub lag_us: LatencyUs,
    /// Measured commits this replica had not shown `REPLICA_CATCH_UP` after the load (not in `lag_us`).
    pub unseen: u64,
    pub replicad: Option<ReplicadMetrics>,
}

/// Distance in LSNs from the writer's VDL to a replica's at its progress events.
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
    /// the offered rate while the writer keeps up, its capacity once it does not.
    pub throughput_commits_per_s: f64,
    /// Due time on the open-loop schedule to acknowledgement.
    pub commit_latency_us: LatencyUs,
    /// Commits that failed or got no reply within --drain-seconds, warm-up included.
    pub errors: u64,
    /// `errors` by message.
    pub error_kinds: BTreeMap<String, u64>,
    pub writerd: Option<WriterdMetrics>,
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
#[derive(Serialize, Debug)]
pub struct LatencyMediansUs {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: f64,
}

#[derive(Serialize, Debug)]
pub struct Point {
    pub rate: f64,
    pub connections: usize,
    pub value_bytes: usize,
    pub keys: u64,
    pub txn_ops: usize,
    pub ack: Ack,
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
    /// Medians over runs of writerd's own metrics (embedded cluster only).
    pub writerd_commit_latency_us_p50: Option<f64>,
    pub writerd_commit_latency_us_p99: Option<f64>,
    pub writerd_lal_stalls: Option<f64>,
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

/// Whose Follow feed a progress event came from.
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

/// A replica whose visibility lag is measured.
pub struct ReplicaTarget {
    pub addr: SocketAddr,
    /// Where to scrape its gauges, when loadgen started it.
    pub metrics_addr: Option<SocketAddr>,
    pub client: (quinn::Endpoint, ApiClient),
}

async fn connect_replicas(identity: &borealis_net::TlsIdentity, replicas: impl IntoIterator<Item = (SocketAddr, Option<SocketAddr>)>) -> Result<Vec<ReplicaTarget>> {
    let mut targets = Vec::new();
    for (addr, metrics_addr) in replicas {
        let client = connect(identity, addr, 1).await?.pop().expect("one connection");
        targets.push(ReplicaTarget { addr, metrics_addr, client });
    }
    Ok(targets)
}

/// Connects `connections` clients, each on an endpoint (UDP socket) of its own, like separate client processes.
async fn connect(identity: &borealis_net::TlsIdentity, addr: SocketAddr, connections: usize) -> Result<Vec<(quinn::Endpoint, ApiClient)>> {
    let mut clients = Vec::new();
    for _ in 0..connections {
        let endpoint = borealis_net::client_endpoint(identity)?;
        let client = ApiClient::connect(&endpoint, addr).await?;
        clients.push((endpoint, client));
    }
    Ok(clients)
}

fn close(clients: impl IntoIterator<Item = (quinn::Endpoint, ApiClient)>) {
    for (endpoint, client) in clients {
        client.close();
        endpoint.close(0u32.into(), b"done");
    }
}

/// Refreshes a one-line status about once a second: in place on a terminal, a line per second otherwise.
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
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// Opens a Follow feed and takes its first progress (the current read point): every later advance is reported.
async fn open_feed(client: &ApiClient, name: &str) -> Result<(Follower, Lsn)> {
    let mut feed = client.follow().await.with_context(|| format!("open the {name} follow feed"))?;
    let first = tokio::time::timeout(FEED_OPEN_TIMEOUT, feed.next()).await.map_err(|_| anyhow!("{name} follow feed: no progress within {FEED_OPEN_TIMEOUT:?}"))?;
    Ok((feed, first.with_context(|| format!("{name} follow feed"))?.vdl))
}

/// Hands a feed's progress to the recorder until aborted; a lost feed counts as an error.
async fn follow(mut feed: Follower, source: Feed, name: String, recorder: Arc<Mutex<Recorder>>, advanced: Arc<Notify>) {
    loop {
        match feed.next().await {
            Ok(p) => {
                let at = Instant::now();
                recorder.lock().expect("recorder").progress(source, p.vdl, at);
                advanced.notify_waiters();
            }
            Err(e) => {
                *recorder.lock().expect("recorder").errors.entry(format!("{name} follow feed: {e}")).or_default() += 1;
                return;
            }
        }
    }
}

/// One point: open-loop commits at `rate` for the warm-up plus the measured seconds, then waits for
/// every reply and for the replicas to show every acknowledged commit (up to `REPLICA_CATCH_UP`).
async fn measure(args: &CommitBenchArgs, clients: &[(quinn::Endpoint, ApiClient)], replicas: &[ReplicaTarget], run: usize, rate: f64) -> Result<Measurement> {
    // The writer's feed gives the replicas' distance in LSNs; without replicas no feed is needed.
    let writer = replicas.first().map(|_| (Feed::Writer, "writer".to_string(), &clients[0].1));
    let sources = writer.into_iter().chain(replicas.iter().enumerate().map(|(i, r)| (Feed::Replica(i), format!("replica {}", r.addr), &r.client.1)));
    // Feeds open before the load, so that every commit is acknowledged while they report.
    let mut feeds = Vec::new();
    for (source, name, client) in sources {
        let (feed, vdl) = open_feed(client, &name).await?;
        feeds.push((source, name, feed, vdl));
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
        lag: LagTracker::new(replicas.len()),
    }));
    let advanced = Arc::new(Notify::new());
    let mut followers = JoinSet::new();
    for (source, name, feed, vdl) in feeds {
        recorder.lock().expect("recorder").progress(source, vdl, Instant::now());
        followers.spawn(follow(feed, source, name, recorder.clone(), advanced.clone()));
    }
    let label = format!("[run {}/{} {rate:.0}/s]", run + 1, args.runs);
    let progress = tokio::spawn(progress(label, recorder.clone(), start));
    let (tick_tx, mut ticks) = mpsc::channel(TICKS_QUEUED_MAX);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let pacer = std::thread::spawn(move || pace(start, interval, total, vec![tick_tx]));
    let workload = Workload {
        keys: args.keys,
        txn_ops: args.txn_ops,
        value: vec![0x5A; args.value_bytes],
        hasher: Default::default(),
    };
    let mut inflight = JoinSet::new();
    let mut seq = 0u64;
    while let Some(due) = ticks.recv().await {
        let client = clients[seq as usize % clients.len()].1.clone();
        let ops = workload.txn(seq);
        seq += 1;
        recorder.lock().expect("recorder").outstanding += 1;
        let recorder = recorder.clone();
        inflight.spawn(async move {
            let result = client.txn(ops).await.map_err(|e| e.to_string());
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
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    let mut m = {
        let mut guard = recorder.lock().expect("recorder");
        let r = &mut *guard;
        if drained.is_err() {
            let n = std::mem::take(&mut r.outstanding);
            r.errors.insert(format!("no reply within --drain-seconds {} after the schedule ended", args.drain_seconds), n);
        }
        let lag = &r.lag;
        let replica_runs: Vec<ReplicaLagRun> = replicas
            .iter()
            .enumerate()
            .map(|(i, t)| ReplicaLagRun { addr: t.addr, lag_us: LatencyUs::of(lag.lag_us(i)), unseen: lag.unseen(i), replicad: None })
            .collect();
        let replica_hist = lag.all_lag_us();
        let lsn = lag.lag_lsn();
        Measurement {
            run,
            rate,
            commits: r.commits,
            throughput_commits_per_s: r.acks_in_window as f64 / args.seconds,
            commit_latency_us: LatencyUs::of(&r.hist),
            errors: r.errors.values().sum(),
            error_kinds: std::mem::take(&mut r.errors),
            writerd: None,
            replica_lag_us: (!replicas.is_empty()).then(|| LatencyUs::of(&replica_hist)),
            replica_lag_lsn: (!replicas.is_empty()).then(|| LsnLag {
                p50: lsn.value_at_quantile(0.5) as f64,
                p99: lsn.value_at_quantile(0.99) as f64,
                max: lsn.max() as f64,
            }),
            replica_lag_unseen: replica_runs.iter().map(|r| r.unseen).sum(),
            replicas: replica_runs,
            hist: r.hist.clone(),
            replica_hist,
        }
    };
    for (run, t) in m.replicas.iter_mut().zip(replicas) {
        if let Some(addr) = t.metrics_addr {
            run.replicad = Some(replicad_metrics(addr).await?);
        }
    }
    Ok(m)
}

async fn writerd_metrics(addr: SocketAddr) -> Result<WriterdMetrics> {
    let page = scrape(addr).await?;
    let q = |q: &str| metric_sum(&page, "writerd_commit_latency_us", &format!("quantile=\"{q}\"")) as u64;
    Ok(WriterdMetrics {
        commits: metric_sum(&page, "writerd_commits_total", "") as u64,
        commit_errors: metric_sum(&page, "writerd_commit_errors_total", "") as u64,
        lal_stalls: metric_sum(&page, "writerd_lal_stalls_total", "") as u64,
        page_fetches: metric_sum(&page, "writerd_page_fetches_total", "") as u64,
        commit_latency_us_p50: q("0.5"),
        commit_latency_us_p99: q("0.99"),
        commit_latency_us_p999: q("0.999"),
    })
}

async fn replicad_metrics(addr: SocketAddr) -> Result<ReplicadMetrics> {
    let page = scrape(addr).await?;
    let gauge = |name: &str| metric_sum(&page, name, "") as u64;
    Ok(ReplicadMetrics {
        applied_vdl: gauge("replicad_applied_vdl"),
        writer_vdl: gauge("replicad_writer_vdl"),
        flushed_lsn: gauge("replicad_flushed_lsn"),
        retained_bytes: gauge("replicad_retained_bytes"),
        pending_bytes: gauge("replicad_pending_bytes"),
        apply_delay_us_p50: metric_sum(&page, "replicad_apply_delay_us", "quantile=\"0.5\"") as u64,
        apply_delay_us_p99: metric_sum(&page, "replicad_apply_delay_us", "quantile=\"0.99\"") as u64,
    })
}

/// One point on a fresh embedded cluster, stopped afterwards whatever happened.
async fn measure_embedded(args: &CommitBenchArgs, work: &WorkDir, run: usize, rate: f64) -> Result<Measurement> {
    let dir = work.path.join("cluster");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let storaged_args = args.cluster.storaged_args();
    let spec = ClusterSpec {
        pgs: args.cluster.pgs,
        page_count: args.cluster.page_count,
        replicas: args.replicas.expect("run() sets the default"),
        storaged_args: &storaged_args,
        writerd_args: &args.cluster.writerd_args,
        replicad_args: &args.cluster.replicad_args,
    };
    let mut cluster = LocalCluster::start(&dir, &spec).await?;
    let result = async {
        let identity = cluster.storage.identity()?;
        let clients = connect(&identity, cluster.writer_addr, args.connections).await?;
        let replicas = connect_replicas(&identity, cluster.replicas.iter().map(|r| (r.addr, Some(r.metrics_addr)))).await?;
        let mut m = measure(args, &clients, &replicas, run, rate).await?;
        close(clients.into_iter().chain(replicas.into_iter().map(|r| r.client)));
        m.writerd = Some(writerd_metrics(cluster.writer_metrics_addr).await?);
        Ok::<_, anyhow::Error>(m)
    }
    .await;
    let stopped = cluster.stop();
    let m = result?;
    stopped?;
    Ok(m)
}

/// Embedded clusters start this many replicas unless --replicas says otherwise.
const DEFAULT_REPLICAS: usize = 1;

pub async fn run(mut args: CommitBenchArgs) -> Result<()> {
    if args.rates.iter().any(|&r| r.is_nan() || r <= 0.0) || args.connections == 0 || args.runs == 0 || args.keys == 0 || args.txn_ops == 0 {
        bail!("--rates, --connections, --runs, --keys and --txn-ops must be positive");
    }
    if let Some(r) = args.rates.iter().enumerate().find_map(|(i, r)| args.rates[..i].contains(r).then_some(r)) {
        bail!("--rates lists {r} twice (use --runs to repeat a point)");
    }
    let writer = args.target.named_writer()?;
    match (writer, args.replicas) {
        (Some(_), Some(_)) => bail!("--replicas sizes the embedded cluster; name an existing cluster's replicas with --replica ADDR"),
        (None, _) if !args.replica_addrs.is_empty() => bail!("--replica needs --writer or --volume (the embedded cluster starts --replicas replicads)"),
        (None, None) => args.replicas = Some(DEFAULT_REPLICAS),
        _ => {}
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    // Ctrl-C drops the benchmark future, and with it the embedded cluster's processes.
    tokio::select! {
        r = bench(&args, writer) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

async fn bench(args: &CommitBenchArgs, writer: Option<SocketAddr>) -> Result<()> {
    let mut runs = Vec::new();
    let target = match writer {
        Some(addr) => {
            let identity = args.target.identity()?;
            let clients = connect(&identity, addr, args.connections).await?;
            let replicas = connect_replicas(&identity, args.replica_addrs.iter().map(|&a| (a, None))).await?;
            for run in 0..args.runs {
                for &rate in &args.rates {
                    runs.push(measure(args, &clients, &replicas, run, rate).await?);
                }
            }
            close(clients.into_iter().chain(replicas.into_iter().map(|r| r.client)));
            addr.to_string()
        }
        None => {
            let work = WorkDir::new(args.cluster.work_dir.as_deref(), "borealis-commit-bench")?;
            // Rates interleave across runs so that slow drift of the machine spreads over every point.
            for run in 0..args.runs {
                for &rate in &args.rates {
                    let m = measure_embedded(args, &work, run, rate).await.with_context(|| format!("run {} at {rate} commits/s (cluster under {})", run + 1, work.path.display()))?;
                    runs.push(m);
                }
            }
            work.cleanup();
            "embedded".to_string()
        }
    };
    let points = summarize(args, &runs)?;
    let json = serde_json::json!({ "target": target, "params": args, "points": points, "runs": runs });
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", path.display()))?;
    println!("{}", table(&points));
    if let Some(p) = points.iter().find(|p| p.saturated) {
        println!("saturated from {:.0} commits/s offered: {:.0} commits/s acknowledged", p.rate, p.throughput_commits_per_s);
    }
    let unseen: u64 = points.iter().map(|p| p.replica_lag_unseen).sum();
    if unseen > 0 {
        println!(
            "replica lag: {unseen} acknowledged commits were not visible on a replica {} s after the load stopped (replica_lag_unseen; not in the lag percentiles)",
            REPLICA_CATCH_UP.as_secs()
        );
    }
    println!("wrote {}", path.display());
    let errors: u64 = points.iter().map(|p| p.errors).sum();
    if errors > 0 {
        bail!("{errors} errors (failed commits, lost follow feeds); see error_kinds in {}", path.display());
    }
    Ok(())
}

fn summarize(args: &CommitBenchArgs, runs: &[Measurement]) -> Result<Vec<Point>> {
    let mut points = Vec::new();
    for &rate in &args.rates {
        let rs: Vec<&Measurement> = runs.iter().filter(|m| m.rate == rate).collect();
        let m = |f: &dyn Fn(&Measurement) -> f64| median(rs.iter().map(|r| f(r)).collect());
        let writerd = |f: &dyn Fn(&WriterdMetrics) -> u64| rs.iter().all(|r| r.writerd.is_some()).then(|| m(&|r| f(r.writerd.as_ref().expect("checked")) as f64));
        let hgrm = format!("commit-latency-{rate:.0}-per-s.hgrm");
        write_hgrm(&args.out.join(&hgrm), &median_by(&rs, |r| r.commit_latency_us.p99).hist, 1.0)?;
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
        let replica_lag_hgrm = lagged.then(|| format!("replica-lag-{rate:.0}-per-s.hgrm"));
        if let Some(name) = &replica_lag_hgrm {
            let median_run = median_by(&rs, |r| r.replica_lag_us.expect("checked").p99);
            write_hgrm(&args.out.join(name), &median_run.replica_hist, 1.0)?;
        }
        let lsn = |f: &dyn Fn(&LsnLag) -> f64| m(&|r| f(&r.replica_lag_lsn.expect("measured with replicas")));
        points.push(Point {
            rate,
            connections: args.connections,
            value_bytes: args.value_bytes,
            keys: args.keys,
            txn_ops: args.txn_ops,
            ack: args.cluster.ack,
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
            replica_lag_us: lagged.then(|| medians(&|r| r.replica_lag_us.expect("checked"))),
            replica_lag_lsn: lagged.then(|| LsnLag { p50: lsn(&|l| l.p50), p99: lsn(&|l| l.p99), max: lsn(&|l| l.max) }),
            replica_lag_unseen: rs.iter().map(|r| r.replica_lag_unseen).sum(),
            replica_lag_hgrm,
        });
    }
    Ok(points)
}

fn table(points: &[Point]) -> String {
    let mut t = String::from(
        "| offered commits/s | acknowledged commits/s | p50 us | p99 us | p99.9 us | max us | errors | writerd p50/p99 us | replica lag p50/p99 us |\n|---|---|---|---|---|---|---|---|---|\n",
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
        t += &format!(
            "| {:.0} | {:.0}{} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {writerd} | {lag} |\n",
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
