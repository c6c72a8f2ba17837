//! `loadgen soak`: open-loop puts over a bounded key space for minutes against
//! an embedded cluster, while one storage node after another is SIGKILLed and
//! started again on its data dir. Each second it reads, per storage node, the
//! disk its data dir takes (allocated blocks) and the bytes its storaged
//! processes wrote (/proc/PID/io); each restart is timed from the spawn of
//! the new process until the node is ready. The summary judges the storage
//! engine's targets: disk bounded by the live data plus the hot-log budget and
//! flat over time, restarts that do not slow down as the run ages, and a
//! bounded write amplification.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use borealis_net::api::Follower;
use redo_core::page::PageOp;
use redo_core::Lsn;
use serde::Serialize;

use crate::cluster::{ClusterSpec, EmbeddedClusterArgs, LocalCluster, LocalStorage, WorkDir, CLUSTER_NODES};
use crate::commit_bench::Writer;
use crate::open_loop::{self, Feeds, LoadArgs, Measurement, System};
use crate::plot::{self, Series, YScale};
use crate::report::LatencyUs;

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// Offered commits/s, open loop (each due at a fixed time, latency counted from it): one put per commit.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Bytes of each put's value.
    #[arg(long, default_value_t = 4096)]
    pub value_bytes: usize,
    /// Distinct keys (`key-00000042`), chosen uniformly at random for every put: the volume's live
    /// data stays bounded (live_bytes = distinct keys written x (value + key bytes)).
    #[arg(long, default_value_t = 20_000)]
    pub keys: u64,
    /// How long the load runs, e.g. 10m, 90s, 1h30m, 1.5m (a bare number is seconds).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Every this long (same format as --duration) one storage node is SIGKILLed and started again
    /// on its data dir, nodes 1 to 6 in turn; each restart is timed from the new process's spawn
    /// until the node is ready (its /metrics answers and no segment is joining).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub restart_every: Duration,
    /// Passed to every storaged as --log-retain-bytes (per segment: log kept on disk above what
    /// storage could reclaim, for lagging peers); hot_log_budget_bytes = this x segments per node.
    #[arg(long, default_value = "128MiB", value_parser = borealis_net::parse_bytes)]
    pub log_retain_bytes: u64,
    /// Client connections (one pipelined stream each); commits go round-robin.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// After the load, seconds to wait for outstanding commits; those still unanswered count as errors.
    #[arg(long, default_value_t = 30.0)]
    pub drain_seconds: f64,
    /// Stop the load early once the filesystem of the cluster's work dir has less than this free
    /// (a storage engine that does not bound its disk fills it): the summary says so
    /// (`stopped_early`) and covers the run until then.
    #[arg(long, default_value = "5GiB", value_parser = borealis_net::parse_bytes)]
    pub disk_free_bytes_min: u64,
    /// The embedded cluster (6 storaged and a writerd; no replica).
    #[command(flatten)]
    pub cluster: EmbeddedClusterArgs,
    /// Directory for results: summary.json, disk-bytes.svg and restart-ms.svg.
    #[arg(long, default_value = "bench-results/soak")]
    pub out: PathBuf,
}

/// Parses a duration: `10m`, `30s`, `1h30m`, `1.5m`, `250ms`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let bad = || format!("{text:?} is not a duration like 10m, 30s, 1h30m or 250ms");
    if let Ok(seconds) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).map_err(|_| bad());
    }
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let unit_end = rest[number_end..].find(|c: char| c.is_ascii_digit() || c == '.').map_or(rest.len(), |i| number_end + i);
        let number: f64 = rest[..number_end].parse().map_err(|_| bad())?;
        let unit_seconds = match &rest[number_end..unit_end] {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * unit_seconds;
        rest = &rest[unit_end..];
    }
    if s.is_empty() {
        return Err(bad());
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// How long a restarted node may take to be ready (it recovers every segment from its files).
const RESTART_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The disk is "flat" when its maximum over the run's last half is at most this times its maximum over the first half.
const FLAT_RATIO_MAX: f64 = 1.25;
/// Targets: disk at most this times (live data + hot-log budget), the last restart at most this
/// times the first, written bytes at most this times the payload.
const DISK_OVER_LIVE_MAX: f64 = 2.0;
const RESTART_SLOWDOWN_MAX: f64 = 1.5;
const WRITE_AMPLIFICATION_MAX: f64 = 3.0;

/// A Borealis writer that counts acknowledged commits and remembers the keys of their puts (for live_bytes).
struct KeyedWriter {
    writer: Writer,
    acked: AtomicU64,
    /// Distinct keys acknowledged so far.
    keys: Mutex<HashSet<Vec<u8>>>,
}

impl System for KeyedWriter {
    async fn commit(&self, conn: usize, ops: Vec<PageOp>) -> Result<Lsn, String> {
        let keys: Vec<Vec<u8>> = ops
            .iter()
            .filter_map(|op| match op {
                PageOp::Put { key, .. } => Some(key.clone()),
                PageOp::Delete { .. } => None,
            })
            .collect();
        let committed = self.writer.commit(conn, ops).await;
        if committed.is_ok() {
            self.acked.fetch_add(1, Ordering::Relaxed);
            self.keys.lock().expect("keys").extend(keys);
        }
        committed
    }
}

/// One storage node as the sampler reads it.
struct Tracked {
    data_dir: PathBuf,
    /// The running storaged (none between a kill and the next spawn).
    pid: Option<i32>,
    /// `write_bytes` of the node's earlier processes, each read just before its kill.
    written_before_bytes: u64,
}

/// Every storage node at one instant.
#[derive(Clone, Debug)]
struct Sample {
    t_s: f64,
    /// Per node (index 0 is node 1): allocated bytes of every file under its data dir.
    disk_bytes: Vec<u64>,
    /// Per node: bytes its processes caused to be written to storage, every process so far.
    written_bytes: Vec<u64>,
}

/// Bytes allocated to every file under `dir`, recursively (st_blocks x 512: holes punched
/// into a file do not count, preallocated space does). Files that vanish meanwhile count 0.
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// `write_bytes` of /proc/PID/io: bytes the process caused to be sent to storage (None if it is gone).
pub fn process_write_bytes(pid: i32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|l| l.strip_prefix("write_bytes:")).and_then(|v| v.trim().parse().ok())
}

fn sample(nodes: &Mutex<Vec<Tracked>>, start: Instant) -> Sample {
    let (dirs, written_bytes): (Vec<PathBuf>, Vec<u64>) = {
        let nodes = nodes.lock().expect("tracked nodes");
        nodes.iter().map(|n| (n.data_dir.clone(), n.written_before_bytes + n.pid.and_then(process_write_bytes).unwrap_or(0))).unzip()
    };
    let disk_bytes = dirs.iter().map(|d| allocated_bytes(d)).collect();
    Sample { t_s: start.elapsed().as_secs_f64(), disk_bytes, written_bytes }
}

/// Bytes free to an unprivileged user on the filesystem of `path` (None if it cannot be read).
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct it is given; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::statvfs(path.as_ptr(), &mut st) } == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Where the sampler watches the free disk: the cluster's filesystem and its floor.
struct DiskGuard {
    dir: PathBuf,
    free_bytes_min: u64,
    /// Told the free bytes once they fall below the floor.
    low: tokio::sync::oneshot::Sender<u64>,
}

/// Samples every node at `start` and each second after it, until `stop` says so (or is dropped);
/// after each sample, tells `guard` once if the disk is short.
fn sample_every_second(nodes: Arc<Mutex<Vec<Tracked>>>, start: Instant, stop: mpsc::Receiver<()>, guard: DiskGuard) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut low = Some(guard.low);
    for second in 0u64.. {
        let due = start + Duration::from_secs(second);
        match stop.recv_timeout(due.saturating_duration_since(Instant::now())) {
            Err(mpsc::RecvTimeoutError::Timeout) => samples.push(sample(&nodes, start)),
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if let Some(free) = free_bytes(&guard.dir).filter(|&f| f < guard.free_bytes_min) {
            if let Some(low) = low.take() {
                let _ = low.send(free);
            }
        }
    }
    samples
}

#[derive(Serialize, Clone, Debug)]
pub struct Restart {
    pub node: u32,
    /// When it was killed, seconds since the load started.
    pub at_s: f64,
    /// The new process's spawn until the node was ready.
    pub restart_ms: f64,
}

/// Restarts node 1, 2, ... 6, 1, ... every `args.restart_every` from `start` until the load's end;
/// adds each to `restarts` once the node is ready.
async fn restart_nodes(
    args: &SoakArgs,
    storage: &mut LocalStorage,
    tracked: &Mutex<Vec<Tracked>>,
    restarts: &Mutex<Vec<Restart>>,
    start: Instant,
) -> Result<()> {
    for k in 1u32.. {
        let at = start + args.restart_every * k;
        if at >= start + args.duration {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let node = (k - 1) % CLUSTER_NODES + 1;
        let killed_at = Instant::now();
        {
            let mut tracked = tracked.lock().expect("tracked nodes");
            let t = &mut tracked[node as usize - 1];
            t.written_before_bytes += t.pid.take().and_then(process_write_bytes).unwrap_or(0);
        }
        storage.kill_node(node)?;
        let spawned_at = storage.respawn_node(node)?;
        tracked.lock().expect("tracked nodes")[node as usize - 1].pid = Some(storage.nodes[node as usize - 1].pid());
        storage.wait_node_ready(node, RESTART_READY_TIMEOUT).await.with_context(|| format!("restart of storage node {node}"))?;
        let restart_ms = spawned_at.elapsed().as_secs_f64() * 1e3;
        let at_s = (killed_at - start).as_secs_f64();
        eprintln!("[soak] storage node {node} killed at {at_s:.0} s: ready {restart_ms:.0} ms after its new process's spawn");
        restarts.lock().expect("restarts").push(Restart { node, at_s, restart_ms });
    }
    Ok(())
}

/// One target of the storage engine's, judged.
#[derive(Serialize, Clone, Debug)]
pub struct Target {
    pub rule: String,
    pub value: Option<f64>,
    pub limit: Option<f64>,
    /// Null when the run cannot tell (e.g. fewer than two restarts).
    pub met: Option<bool>,
}

impl Target {
    fn at_most(rule: String, value: Option<f64>, limit: Option<f64>) -> Self {
        let met = value.zip(limit).map(|(v, l)| v <= l);
        Target { rule, value, limit, met }
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct Verdict {
    pub disk_bounded: Target,
    pub disk_flat: Target,
    pub restart_not_slower: Target,
    pub write_amplification: Target,
    /// Every target met (null if one could not be judged and none failed).
    pub all_met: Option<bool>,
}

/// One node's samples, a second apart.
#[derive(Serialize, Clone, Debug)]
pub struct NodeSeries {
    pub node: u32,
    pub t_s: Vec<f64>,
    pub disk_bytes: Vec<u64>,
    pub written_bytes: Vec<u64>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Summary {
    pub disk_bytes_max_per_node: u64,
    pub live_bytes: u64,
    pub hot_log_budget_bytes: u64,
    pub restart_ms_first: Option<f64>,
    pub restart_ms_last: Option<f64>,
    pub write_amplification: f64,
    pub verdict: Verdict,
    pub rate: f64,
    pub value_bytes: usize,
    pub keys: u64,
    pub duration_s: f64,
    pub restart_every_s: f64,
    pub log_retain_bytes: u64,
    pub connections: usize,
    pub pgs: u32,
    pub page_count: u64,
    pub ack: &'static str,
    pub segments_per_node: u64,
    /// Why the load stopped before --duration (null: it ran its course).
    pub stopped_early: Option<String>,
    /// How long the load ran: duration_s, or less when stopped early.
    pub load_s: f64,
    pub acked_commits: u64,
    pub commits_per_s: f64,
    /// Commit latency from each commit's due time (null when stopped early: commits were abandoned).
    pub commit_latency_us_p50: Option<u64>,
    pub commit_latency_us_p99: Option<u64>,
    pub commit_latency_us: Option<LatencyUs>,
    pub errors: Option<u64>,
    pub error_kinds: std::collections::BTreeMap<String, u64>,
    pub distinct_keys: u64,
    /// acked_commits x value_bytes.
    pub payload_bytes: u64,
    /// Per node (index 0 is node 1): bytes written during the load, every process of the node.
    pub written_bytes_per_node: Vec<u64>,
    pub disk_bytes_max_by_node: Vec<u64>,
    pub restarts: Vec<Restart>,
    pub disk_series: Vec<NodeSeries>,
}

pub async fn run(args: SoakArgs) -> Result<()> {
    if args.rate.is_nan() || args.rate <= 0.0 || args.keys == 0 || args.connections == 0 || args.value_bytes == 0 {
        bail!("--rate, --keys, --connections and --value-bytes must be positive");
    }
    if args.duration.is_zero() || args.restart_every.is_zero() {
        bail!("--duration and --restart-every must be positive");
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    // Ctrl-C drops the soak, and with it the cluster's processes.
    let summary = tokio::select! {
        r = soak(&args) => r?,
        _ = tokio::signal::ctrl_c() => return Err(anyhow!("interrupted")),
    };
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?).with_context(|| format!("write {}", path.display()))?;
    plots(&summary, &args.out)?;
    println!("{}", table(&summary));
    println!("wrote {}, disk-bytes.svg and restart-ms.svg", path.display());
    Ok(())
}

/// The soak on a fresh embedded cluster, stopped afterwards whatever happened.
async fn soak(args: &SoakArgs) -> Result<Summary> {
    let work = WorkDir::new(args.cluster.work_dir.as_deref(), "borealis-soak")?;
    let dir = work.path.join("cluster");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // Before the user's --storaged-arg options, which win.
    let mut storaged_args = vec!["--log-retain-bytes".to_string(), args.log_retain_bytes.to_string()];
    storaged_args.extend(args.cluster.storaged_args());
    let spec = ClusterSpec {
        pgs: args.cluster.pgs,
        page_count: args.cluster.page_count,
        replicas: 0,
        storaged_args: &storaged_args,
        writerd_args: &args.cluster.writerd_args,
        replicad_args: &args.cluster.replicad_args,
    };
    let mut cluster = LocalCluster::start(&dir, &spec).await.with_context(|| format!("start the cluster under {}", dir.display()))?;
    let result = load(args, &mut cluster).await;
    let stopped = cluster.stop();
    let summary = result.with_context(|| format!("cluster under {}", dir.display()))?;
    stopped?;
    work.cleanup();
    Ok(summary)
}

/// Segments each storage node hosts: every PG of the volume, each on all six nodes (bails otherwise,
/// since live_bytes counts all the volume's data on every node).
fn segments_per_node(volume: &redo_core::volume::Volume) -> Result<u64> {
    for pg in &volume.pgs {
        if !(1..=CLUSTER_NODES).all(|n| pg.nodes.contains(&n)) {
            bail!("pg{} is on nodes {:?}, not on every node 1-{CLUSTER_NODES}: live_bytes would not be what a node holds", pg.id, pg.nodes);
        }
    }
    Ok(volume.pgs.len() as u64)
}

async fn load(args: &SoakArgs, cluster: &mut LocalCluster) -> Result<Summary> {
    let segments = segments_per_node(&borealis_net::load_volume(&cluster.volume_path)?)?;
    let identity = cluster.storage.identity()?;
    let system = Arc::new(KeyedWriter {
        writer: Writer::connect(&identity, cluster.writer_addr, args.connections).await?,
        acked: AtomicU64::new(0),
        keys: Mutex::default(),
    });
    let tracked: Vec<Tracked> =
        cluster.storage.nodes.iter().map(|n| Tracked { data_dir: cluster.storage.data_dir(n.node_id), pid: Some(n.pid()), written_before_bytes: 0 }).collect();
    let tracked = Arc::new(Mutex::new(tracked));
    let load = LoadArgs {
        connections: args.connections,
        seconds: args.duration.as_secs_f64(),
        warmup_seconds: 0.0,
        runs: 1,
        drain_seconds: args.drain_seconds,
        value_bytes: args.value_bytes,
        keys: args.keys,
        txn_ops: 1,
        lag_probe: false,
    };
    let restarts = Mutex::new(Vec::new());
    let start = Instant::now();
    let (stop_sampler, stop) = mpsc::channel();
    let (low, disk_low) = tokio::sync::oneshot::channel();
    let sampler = {
        let tracked = tracked.clone();
        let guard = DiskGuard { dir: cluster.storage.dir.clone(), free_bytes_min: args.disk_free_bytes_min, low };
        std::thread::spawn(move || sample_every_second(tracked, start, stop, guard))
    };
    let feeds = Feeds::<Follower> { writer: None, replicas: Vec::new() };
    let soak = async {
        tokio::try_join!(
            open_loop::measure(&load, system.clone(), feeds, &[], "soak", 0, args.rate),
            restart_nodes(args, &mut cluster.storage, &tracked, &restarts, start),
        )
    };
    let (m, stopped_early) = tokio::select! {
        r = soak => (Some(r?.0), None),
        Ok(free) = disk_low => {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            let why = format!("{:.1} GiB free on the work dir's filesystem, under --disk-free-bytes-min ({:.1} GiB)", gib(free), gib(args.disk_free_bytes_min));
            eprintln!("\n[soak] stopping the load at {:.0} s: {why}", start.elapsed().as_secs_f64());
            (None, Some(why))
        }
    };
    let load_s = if stopped_early.is_some() { start.elapsed().as_secs_f64() } else { args.duration.as_secs_f64() };
    let _ = stop_sampler.send(());
    let mut samples = sampler.join().map_err(|_| anyhow!("sampler thread panicked"))?;
    // Every commit answered (or abandoned): the bytes written for them are all counted.
    samples.push(sample(&tracked, start));
    let acked = system.acked.load(Ordering::Relaxed);
    let keys = std::mem::take(&mut *system.keys.lock().expect("keys"));
    // Abandoned commits (a load stopped early) may still hold the writer a moment: then it is just dropped.
    if let Some(system) = Arc::into_inner(system) {
        system.writer.close();
    }
    let restarts = restarts.into_inner().expect("restarts");
    let run = Run { measurement: m.as_ref(), stopped_early, load_s, acked, keys: &keys, restarts, samples: &samples };
    Ok(summarize(args, segments, run))
}

/// What a soak measured.
struct Run<'a> {
    /// The open-loop measurement (none when the load was stopped early).
    measurement: Option<&'a Measurement>,
    stopped_early: Option<String>,
    load_s: f64,
    acked: u64,
    keys: &'a HashSet<Vec<u8>>,
    restarts: Vec<Restart>,
    samples: &'a [Sample],
}

fn summarize(args: &SoakArgs, segments: u64, run: Run<'_>) -> Summary {
    let Run { measurement: m, stopped_early, load_s, acked, keys, restarts, samples } = run;
    let nodes = CLUSTER_NODES as usize;
    let live_bytes: u64 = keys.iter().map(|k| (k.len() + args.value_bytes) as u64).sum();
    let hot_log_budget_bytes = args.log_retain_bytes * segments;
    let disk_bytes_max_by_node: Vec<u64> = (0..nodes).map(|i| samples.iter().map(|s| s.disk_bytes[i]).max().unwrap_or(0)).collect();
    let disk_bytes_max_per_node = disk_bytes_max_by_node.iter().copied().max().unwrap_or(0);
    let (first, last) = (samples.first(), samples.last());
    let written_bytes_per_node: Vec<u64> =
        (0..nodes).map(|i| last.map(|l| l.written_bytes[i]).unwrap_or(0).saturating_sub(first.map(|f| f.written_bytes[i]).unwrap_or(0))).collect();
    let payload_bytes = acked * args.value_bytes as u64;
    let written_mean = written_bytes_per_node.iter().sum::<u64>() as f64 / nodes as f64;
    let write_amplification = if payload_bytes > 0 { written_mean / payload_bytes as f64 } else { 0.0 };
    let acked_any = payload_bytes > 0;
    let restart_ms_first = restarts.first().map(|r| r.restart_ms);
    let restart_ms_last = restarts.last().map(|r| r.restart_ms);
    let duration_s = args.duration.as_secs_f64();
    let verdict = verdict(
        disk_bytes_max_per_node,
        live_bytes + hot_log_budget_bytes,
        flat_ratio(samples, load_s),
        if restarts.len() >= 2 { restart_ms_first.zip(restart_ms_last) } else { None },
        acked_any.then_some(write_amplification),
    );
    let disk_series = (0..nodes)
        .map(|i| NodeSeries {
            node: i as u32 + 1,
            t_s: samples.iter().map(|s| s.t_s).collect(),
            disk_bytes: samples.iter().map(|s| s.disk_bytes[i]).collect(),
            written_bytes: samples.iter().map(|s| s.written_bytes[i]).collect(),
        })
        .collect();
    Summary {
        disk_bytes_max_per_node,
        live_bytes,
        hot_log_budget_bytes,
        restart_ms_first,
        restart_ms_last,
        write_amplification,
        verdict,
        rate: args.rate,
        value_bytes: args.value_bytes,
        keys: args.keys,
        duration_s,
        restart_every_s: args.restart_every.as_secs_f64(),
        log_retain_bytes: args.log_retain_bytes,
        connections: args.connections,
        pgs: args.cluster.pgs,
        page_count: args.cluster.page_count,
        ack: args.cluster.ack.as_str(),
        segments_per_node: segments,
        stopped_early,
        load_s,
        acked_commits: acked,
        commits_per_s: m.map_or(acked as f64 / load_s, |m| m.throughput_commits_per_s),
        commit_latency_us_p50: m.map(|m| m.commit_latency_us.p50),
        commit_latency_us_p99: m.map(|m| m.commit_latency_us.p99),
        commit_latency_us: m.map(|m| m.commit_latency_us),
        errors: m.map(|m| m.errors),
        error_kinds: m.map(|m| m.error_kinds.clone()).unwrap_or_default(),
        distinct_keys: keys.len() as u64,
        payload_bytes,
        written_bytes_per_node,
        disk_bytes_max_by_node,
        restarts,
        disk_series,
    }
}

/// The largest node's disk over the run's last half against over its first half (samples taken
/// before `load_s` / 2 against the others); None without a sample in each half.
fn flat_ratio(samples: &[Sample], load_s: f64) -> Option<f64> {
    let max_in = |last_half: bool| samples.iter().filter(|s| (s.t_s >= load_s / 2.0) == last_half).flat_map(|s| s.disk_bytes.iter().copied()).max();
    let (first, last) = (max_in(false)?, max_in(true)?);
    Some(last as f64 / first.max(1) as f64)
}

/// The targets: `restarts` is (first, last) restart ms when at least two were measured.
/// `write_amplification` is None when nothing was acknowledged.
fn verdict(disk_max: u64, live_and_budget: u64, flat: Option<f64>, restarts: Option<(f64, f64)>, write_amplification: Option<f64>) -> Verdict {
    let disk_bounded = Target::at_most(
        format!("disk_bytes_max_per_node <= {DISK_OVER_LIVE_MAX} x (live_bytes + hot_log_budget_bytes)"),
        Some(disk_max as f64),
        Some(DISK_OVER_LIVE_MAX * live_and_budget as f64),
    );
    let disk_flat = Target::at_most(
        format!("max disk bytes of any node over the run's last half <= {FLAT_RATIO_MAX} x over its first half (value: the ratio)"),
        flat,
        Some(FLAT_RATIO_MAX),
    );
    let restart_not_slower = Target::at_most(
        format!("restart_ms_last <= {RESTART_SLOWDOWN_MAX} x restart_ms_first (at least two restarts)"),
        restarts.map(|r| r.1),
        restarts.map(|r| RESTART_SLOWDOWN_MAX * r.0),
    );
    let write_amplification = Target::at_most(format!("write_amplification <= {WRITE_AMPLIFICATION_MAX}"), write_amplification, Some(WRITE_AMPLIFICATION_MAX));
    let all = [&disk_bounded, &disk_flat, &restart_not_slower, &write_amplification].map(|t| t.met);
    let all_met = if all.contains(&Some(false)) {
        Some(false)
    } else if all.contains(&None) {
        None
    } else {
        Some(true)
    };
    Verdict { disk_bounded, disk_flat, restart_not_slower, write_amplification, all_met }
}

const MIB: f64 = (1u64 << 20) as f64;

/// disk-bytes.svg (every node's disk over time, restarts marked) and restart-ms.svg.
fn plots(s: &Summary, out: &Path) -> Result<()> {
    let series: Vec<Series> = s
        .disk_series
        .iter()
        .map(|n| Series::new(format!("node {}", n.node), n.t_s.iter().zip(&n.disk_bytes).map(|(&t, &b)| (t, b as f64 / MIB)).collect()))
        .collect();
    let labels: Vec<String> = s.restarts.iter().map(|r| format!("restart n{}", r.node)).collect();
    let markers: Vec<(f64, &str)> = s.restarts.iter().zip(&labels).map(|(r, l)| (r.at_s, l.as_str())).collect();
    let title = format!("Disk per storage node, {:.0} commits/s of {} B values over {} keys", s.rate, s.value_bytes, s.keys);
    plot::line_chart_with(&out.join("disk-bytes.svg"), &title, ("s since the load started", "allocated MiB"), &series, YScale::Linear, &markers)?;
    let restarts = Series::new("spawn to ready", s.restarts.iter().map(|r| (r.at_s, r.restart_ms)).collect());
    plot::line_chart_with(
        &out.join("restart-ms.svg"),
        "Storage node restart: spawn to ready",
        ("s since the load started (kill)", "ms"),
        &[restarts],
        YScale::Linear,
        &[],
    )
}

/// The human summary: each target with its value, then the load.
pub fn table(s: &Summary) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / MIB);
    let met = |t: &Target| match t.met {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    };
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let v = &s.verdict;
    let mut t = format!(
        "soak: {:.0} commits/s offered, {} B values over {} keys, {:.0} s, a storage node restarted every {:.0} s\n\n| target | value | limit | met |\n|---|---|---|---|\n",
        s.rate, s.value_bytes, s.keys, s.duration_s, s.restart_every_s
    );
    t += &format!(
        "| disk_bytes_max_per_node <= 2 x (live {} + hot log budget {}) | {} | {} | {} |\n",
        mib(s.live_bytes),
        mib(s.hot_log_budget_bytes),
        mib(s.disk_bytes_max_per_node),
        mib(v.disk_bounded.limit.unwrap_or(0.0) as u64),
        met(&v.disk_bounded)
    );
    t += &format!(
        "| disk flat: last-half max / first-half max | {} | {FLAT_RATIO_MAX} | {} |\n",
        v.disk_flat.value.map_or("-".to_string(), |r| format!("{r:.2}")),
        met(&v.disk_flat)
    );
    t += &format!(
        "| restart_ms_last <= 1.5 x restart_ms_first ({} ms) | {} ms | {} ms | {} |\n",
        opt(s.restart_ms_first),
        opt(s.restart_ms_last),
        opt(v.restart_not_slower.limit),
        met(&v.restart_not_slower)
    );
    t += &format!("| write_amplification | {:.2} | {WRITE_AMPLIFICATION_MAX} | {} |\n\n", s.write_amplification, met(&v.write_amplification));
    let count = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    t += &format!(
        "{} commits acknowledged ({:.0}/s), commit latency p50 {} us, p99 {} us, {} errors; {} distinct keys\n",
        s.acked_commits,
        s.commits_per_s,
        count(s.commit_latency_us_p50),
        count(s.commit_latency_us_p99),
        count(s.errors),
        s.distinct_keys
    );
    if let Some(why) = &s.stopped_early {
        t += &format!("STOPPED EARLY at {:.0} s of {:.0} s: {why}\n", s.load_s, s.duration_s);
    }
    let restarts: Vec<String> = s.restarts.iter().map(|r| format!("n{} at {:.0} s: {:.0} ms", r.node, r.at_s, r.restart_ms)).collect();
    t += &format!("restarts: {}\n", if restarts.is_empty() { "none".to_string() } else { restarts.join(", ") });
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_humantime() {
        let s = Duration::from_secs;
        assert_eq!(parse_duration("10m"), Ok(s(600)));
        assert_eq!(parse_duration("30s"), Ok(s(30)));
        assert_eq!(parse_duration("1h30m"), Ok(s(5400)));
        assert_eq!(parse_duration("1m30s"), Ok(s(90)));
        assert_eq!(parse_duration("1.5m"), Ok(s(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("45"), Ok(s(45)));
        for bad in ["", "m", "10x", "ten minutes", "-5s", "5 s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    fn samples(maxima: &[u64]) -> Vec<Sample> {
        maxima.iter().enumerate().map(|(t, &m)| Sample { t_s: t as f64, disk_bytes: vec![m / 2, m], written_bytes: vec![0, 0] }).collect()
    }

    #[test]
    fn flat_compares_the_halves_maxima() {
        assert_eq!(flat_ratio(&samples(&[10, 100, 100, 120]), 4.0), Some(1.2));
        assert_eq!(flat_ratio(&samples(&[10, 100, 150, 200]), 4.0), Some(2.0));
        assert_eq!(flat_ratio(&samples(&[10]), 4.0), None, "no sample in the last half");
    }

    #[test]
    fn verdict_judges_each_target() {
        let v = verdict(300, 200, Some(1.1), Some((100.0, 140.0)), Some(2.5));
        assert_eq!([v.disk_bounded.met, v.disk_flat.met, v.restart_not_slower.met, v.write_amplification.met], [Some(true); 4]);
        assert_eq!(v.all_met, Some(true));
        let v = verdict(401, 200, Some(1.3), None, Some(3.5));
        assert_eq!([v.disk_bounded.met, v.disk_flat.met, v.restart_not_slower.met, v.write_amplification.met], [Some(false), Some(false), None, Some(false)]);
        assert_eq!(v.all_met, Some(false));
        assert_eq!(verdict(1, 200, Some(1.0), None, Some(1.0)).all_met, None, "a target the run could not judge");
        assert_eq!(verdict(1, 200, Some(1.0), Some((1.0, 1.0)), None).write_amplification.met, None, "nothing acknowledged");
    }

    #[test]
    fn allocated_bytes_counts_blocks_not_length() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/data"), vec![7u8; 64 << 10]).unwrap();
        // A sparse file: a large length, nothing allocated.
        std::fs::File::create(dir.path().join("sparse")).unwrap().set_len(1 << 30).unwrap();
        let bytes = allocated_bytes(dir.path());
        assert!((64 << 10..1 << 20).contains(&bytes), "{bytes}");
        assert_eq!(allocated_bytes(&dir.path().join("missing")), 0);
    }

    #[test]
    fn this_process_write_bytes_are_read() {
        assert!(process_write_bytes(std::process::id() as i32).is_some());
        assert_eq!(process_write_bytes(-1), None);
    }
}
