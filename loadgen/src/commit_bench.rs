//! `loadgen commit-bench`: the open-loop generator (`open_loop`) against a
//! Borealis writer, a sweep of offered rates, each point measured `--runs`
//! times on a fresh embedded cluster (or against an existing one). Every
//! replica's and the writer's `Follow` feeds give the replica visibility lag
//! of each acknowledged commit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use borealis_net::api::{ApiClient, Follower};
use redo_core::page::PageOp;
use redo_core::Lsn;
use serde::Serialize;

use crate::client::Target;
use crate::cluster::{replicad_metrics, writerd_metrics, ClusterSpec, EmbeddedClusterArgs, LocalCluster, WorkDir};
use crate::open_loop::{self, Feeds, LoadArgs, Measurement, Point, ReadPoint, System};
use crate::pause::{one_per_az, GrayFailure, Pauser};

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
    #[command(flatten)]
    #[serde(flatten)]
    pub load: LoadArgs,
    /// The embedded cluster.
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: EmbeddedClusterArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub gray: GrayFailure,
    /// Directory for results: summary.json and .hgrm files per rate (commit latency, replica lag).
    #[arg(long, default_value = "bench-results/latest/commit-bench")]
    pub out: PathBuf,
}

/// A replica whose visibility lag is measured.
pub struct ReplicaTarget {
    pub addr: SocketAddr,
    /// Where to scrape its gauges, when loadgen started it.
    pub metrics_addr: Option<SocketAddr>,
    pub client: (quinn::Endpoint, ApiClient),
}

async fn connect_replicas(
    identity: &borealis_net::TlsIdentity,
    replicas: impl IntoIterator<Item = (SocketAddr, Option<SocketAddr>)>,
) -> Result<Vec<ReplicaTarget>> {
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

fn close(writer: Arc<Writer>, replicas: Vec<ReplicaTarget>) {
    let writer = Arc::into_inner(writer).expect("no commit in flight");
    close_clients(writer.0.into_iter().chain(replicas.into_iter().map(|r| r.client)));
}

fn close_clients(clients: impl IntoIterator<Item = (quinn::Endpoint, ApiClient)>) {
    for (endpoint, client) in clients {
        client.close();
        endpoint.close(0u32.into(), b"done");
    }
}

/// A Borealis writer behind `connections` client connections.
pub struct Writer(Vec<(quinn::Endpoint, ApiClient)>);

impl Writer {
    /// Connects `connections` clients to the writer at `addr`, each on an endpoint of its own.
    pub async fn connect(identity: &borealis_net::TlsIdentity, addr: SocketAddr, connections: usize) -> Result<Self> {
        Ok(Writer(connect(identity, addr, connections).await?))
    }

    /// Closes every connection (no commit may be in flight).
    pub fn close(self) {
        close_clients(self.0);
    }
}

impl System for Writer {
    async fn commit(&self, conn: usize, ops: Vec<PageOp>) -> Result<Lsn, String> {
        self.0[conn].1.txn(ops).await.map_err(|e| e.to_string())
    }
}

impl ReadPoint for Follower {
    async fn next(&mut self) -> Result<Lsn> {
        Ok(Follower::next(self).await?.vdl)
    }
}

/// One point against a writer and its replicas, over their Follow feeds (none with --lag-probe off);
/// the CPU of `servers` (pids) is measured.
async fn measure(args: &CommitBenchArgs, writer: &Arc<Writer>, replicas: &[ReplicaTarget], servers: &[i32], run: usize, rate: f64) -> Result<Measurement> {
    let probed = if args.load.lag_probe { replicas } else { &[] };
    // The writer's feed gives the replicas' distance in LSNs; without replicas no feed is needed.
    let writer_feed = match probed {
        [] => None,
        _ => Some(writer.0[0].1.follow().await.context("open the writer's follow feed")?),
    };
    let mut replica_feeds = Vec::new();
    for r in probed {
        replica_feeds.push((r.addr.to_string(), r.client.1.follow().await.with_context(|| format!("open replica {}'s follow feed", r.addr))?));
    }
    let label = format!("borealis ack={}", args.cluster.ack.as_str());
    let mut m = open_loop::measure(&args.load, writer.clone(), Feeds { writer: writer_feed, replicas: replica_feeds }, servers, &label, run, rate).await?;
    for (run, t) in m.replicas.iter_mut().zip(replicas) {
        if let Some(addr) = t.metrics_addr {
            run.replicad = Some(replicad_metrics(addr).await?);
        }
    }
    Ok(m)
}

/// One point on a fresh embedded cluster, stopped afterwards whatever happened.
pub async fn measure_embedded(args: &CommitBenchArgs, work: &WorkDir, run: usize, rate: f64) -> Result<Measurement> {
    let dir = work.path.join("cluster");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let storaged_args = args.cluster.storaged_args();
    let spec = ClusterSpec {
        pgs: args.cluster.pgs,
        page_count: args.cluster.page_count,
        replicas: args.replicas.unwrap_or(DEFAULT_REPLICAS),
        storaged_args: &storaged_args,
        writerd_args: &args.cluster.writerd_args,
        replicad_args: &args.cluster.replicad_args,
    };
    let mut cluster = LocalCluster::start(&dir, &spec).await?;
    let result = async {
        let identity = cluster.storage.identity()?;
        let writer = Arc::new(Writer(connect(&identity, cluster.writer_addr, args.load.connections).await?));
        let replicas = connect_replicas(&identity, cluster.replicas.iter().map(|r| (r.addr, Some(r.metrics_addr)))).await?;
        let paused = one_per_az(&cluster.storage.nodes.iter().map(|n| n.node_id).collect::<Vec<_>>(), args.gray.pause_nodes)?;
        let pauser = (!paused.is_empty())
            .then(|| Pauser::start(cluster.storage.nodes.iter().filter(|n| paused.contains(&n.node_id)).map(|n| n.pid()).collect(), args.gray.duty));
        let cpu_before = cluster.cpu_seconds()?;
        let m = measure(args, &writer, &replicas, &cluster.pids(), run, rate).await;
        drop(pauser);
        let mut m = m?;
        let cpu = cluster.cpu_seconds()? - cpu_before;
        close(writer, replicas);
        let writerd = writerd_metrics(cluster.writer_metrics_addr).await?;
        m.cluster_cpu_us_per_commit = Some(cpu * 1e6 / writerd.commits.max(1) as f64);
        m.writerd = Some(writerd);
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

pub async fn run(args: CommitBenchArgs) -> Result<()> {
    args.load.check(&args.rates)?;
    let writer = args.target.named_writer()?;
    match (writer, args.replicas) {
        (Some(_), Some(_)) => bail!("--replicas sizes the embedded cluster; name an existing cluster's replicas with --replica ADDR"),
        (None, _) if !args.replica_addrs.is_empty() => bail!("--replica needs --writer or --volume (the embedded cluster starts --replicas replicads)"),
        (Some(_), _) if args.gray.pause_nodes > 0 => bail!("--pause-nodes pauses nodes of the embedded cluster, which --writer/--volume replaces"),
        _ => {}
    }
    args.gray.check()?;
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
            let writer = Arc::new(Writer(connect(&identity, addr, args.load.connections).await?));
            let replicas = connect_replicas(&identity, args.replica_addrs.iter().map(|&a| (a, None))).await?;
            for run in 0..args.load.runs {
                for &rate in &args.rates {
                    runs.push(measure(args, &writer, &replicas, &[], run, rate).await?);
                }
            }
            close(writer, replicas);
            addr.to_string()
        }
        None => {
            let work = WorkDir::new(args.cluster.work_dir.as_deref(), "borealis-commit-bench")?;
            // Rates interleave across runs so that slow drift of the machine spreads over every point.
            for run in 0..args.load.runs {
                for &rate in &args.rates {
                    let m = measure_embedded(args, &work, run, rate)
                        .await
                        .with_context(|| format!("run {} at {rate} commits/s (cluster under {})", run + 1, work.path.display()))?;
                    runs.push(m);
                }
            }
            work.cleanup();
            "embedded".to_string()
        }
    };
    let points = points(args, &runs, "")?;
    let json = serde_json::json!({ "target": target, "params": args, "points": points, "runs": runs });
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", path.display()))?;
    println!("{}", open_loop::table(&points));
    println!("wrote {}", path.display());
    open_loop::verdict(&points, &path)
}

/// One point per rate of `args`, medians over `runs`; histograms go to `args.out` with file names starting with `prefix`.
pub fn points(args: &CommitBenchArgs, runs: &[Measurement], prefix: &str) -> Result<Vec<Point>> {
    args.rates
        .iter()
        .map(|&rate| {
            let rs: Vec<&Measurement> = runs.iter().filter(|m| m.rate == rate).collect();
            open_loop::summarize(&args.load, "borealis", args.cluster.ack.as_str(), rate, &rs, &args.out, prefix)
        })
        .collect()
}
