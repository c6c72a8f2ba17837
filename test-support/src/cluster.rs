//! The one launcher of the daemons: a storage node's command line, and `Cluster`, six
//! storage nodes (two per AZ) on a volume, with writers and read replicas started on it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use borealis_net::api::ApiClient;
use borealis_net::storage::StorageConn;
use borealis_net::TlsIdentity;
use redo_core::volume::{NodeSpec, Volume};
use redo_core::{Epoch, Lsn, PgId};

use crate::process::{bin, free_port, free_tcp_addr, Proc, Started, READY_TIMEOUT, REPLY_TIMEOUT};

/// Protection groups of a cluster's volume unless its `ClusterSpec` says otherwise.
pub const PGS: u32 = 2;
/// Storage nodes of a cluster: a protection group's six segments.
pub const NODES: u32 = 6;
/// The line a storage node logs once it serves.
pub const STORAGED_READY: &str = "storaged ready";
/// The line a new (or wiped) segment logs once it has its epoch state from its peers and grants claims.
pub const SEGMENT_JOINED: &str = "joined at the newest epoch state";
/// Fresh ports for the whole cluster when one was taken under a node at start-up.
const CLUSTER_START_ATTEMPTS_MAX: u32 = 3;

/// The options of `storaged serve` for node `id` (certificate `storaged-ID`), keeping its data in
/// `data_dir`, with the certificates in `certs`, hosting `pgs`, with small segment files (tests
/// write megabytes, not gigabytes), then `extra`. Without `--listen`.
pub fn storaged_args(id: u32, data_dir: &Path, certs: &Path, pgs: &[u32], extra: &[String]) -> Vec<String> {
    let pgs = pgs.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let mut args: Vec<String> = vec!["--node-id".into(), id.to_string()];
    args.extend(["--data-dir".into(), data_dir.display().to_string()]);
    args.extend(["--certs".into(), certs.display().to_string()]);
    args.extend(["--pgs".into(), pgs]);
    args.extend(["--segment-prealloc-bytes".into(), "1MiB".into()]);
    args.extend(extra.iter().cloned());
    args
}

/// Availability zone of node `id`: two nodes per AZ (az1, az1, az2, az2, az3, az3).
pub fn az_of(id: u32) -> String {
    format!("az{}", (id - 1) / 2 + 1)
}

/// What a cluster runs.
#[derive(Clone, Copy)]
pub struct ClusterSpec<'a> {
    /// Protection groups of the volume, each on all six nodes.
    pub pgs: u32,
    /// Pages of the volume.
    pub page_count: u64,
    /// Extra options of every storage node.
    pub storaged_args: &'a [&'a str],
    /// Serve each node's metrics (`--metrics-listen`, `Cluster::node_metrics`).
    pub node_metrics: bool,
    /// Lines of each node's log printed if the test panics (0: none; the cluster's directory is kept anyway).
    pub log_tail_on_panic: usize,
    /// Prefix of the cluster's temp dir.
    pub dir_prefix: &'a str,
}

impl Default for ClusterSpec<'_> {
    fn default() -> Self {
        ClusterSpec { pgs: PGS, page_count: 256, storaged_args: &[], node_metrics: false, log_tail_on_panic: 0, dir_prefix: "borealis-e2e-" }
    }
}

pub struct Cluster {
    /// Index i is node id i + 1. Before `dir`: the nodes stop before it goes.
    pub nodes: Vec<Proc>,
    /// Index i: node i + 1's metrics address, with `ClusterSpec::node_metrics`.
    pub node_metrics: Vec<Option<SocketAddr>>,
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub volume: Volume,
    pub volume_path: PathBuf,
    storaged_args: Vec<String>,
    log_tail_on_panic: usize,
    starts: u32,
}

impl Cluster {
    /// Six storage nodes, each hosting every PG (`PGS`), plus certificates for writers, replicas and clients.
    pub async fn start(storaged_args: &[&str]) -> Cluster {
        Cluster::start_with(ClusterSpec { storaged_args, ..ClusterSpec::default() }).await
    }

    /// Six storage nodes as `spec` says, each hosting every PG of the volume, all serving (and
    /// every segment joined) when this returns. A port taken under a node between its probe and its bind starts the
    /// cluster over on fresh ports.
    pub async fn start_with(spec: ClusterSpec<'_>) -> Cluster {
        'attempts: for _ in 0..CLUSTER_START_ATTEMPTS_MAX {
            let mut c = Cluster::spawn_all(&spec);
            for n in &mut c.nodes {
                if n.wait_started(STORAGED_READY, READY_TIMEOUT).await == Started::PortTaken {
                    continue 'attempts;
                }
            }
            // Every segment is new: each joins once enough of its peers serve.
            let pgs = c.volume.pg_count();
            for n in &mut c.nodes {
                n.wait_log_more(SEGMENT_JOINED, pgs - 1, READY_TIMEOUT).await;
            }
            return c;
        }
        panic!("could not start {NODES} storaged on free ports in {CLUSTER_START_ATTEMPTS_MAX} attempts");
    }

    fn spawn_all(spec: &ClusterSpec<'_>) -> Cluster {
        let dir = tempfile::Builder::new().prefix(spec.dir_prefix).tempdir().expect("temp dir");
        let certs = dir.path().join("certs");
        let mut names: Vec<String> = (1..=NODES).map(|i| format!("storaged-{i}")).collect();
        names.extend(["writerd".into(), "replicad".into(), "client".into()]);
        borealis_net::certs::generate(&certs, &names).expect("certificates");
        let nodes = (1..=NODES).map(|i| NodeSpec { id: i, az: az_of(i), addr: format!("127.0.0.1:{}", free_port()) }).collect();
        let volume = Volume::local(format!("127.0.0.1:{}", free_port()), nodes, spec.pgs, spec.page_count).expect("volume");
        let volume_path = dir.path().join("volume.toml");
        std::fs::write(&volume_path, volume.to_toml()).expect("write volume file");
        let mut c = Cluster {
            nodes: Vec::new(),
            node_metrics: (1..=NODES).map(|_| spec.node_metrics.then(free_tcp_addr)).collect(),
            dir,
            certs,
            volume,
            volume_path,
            storaged_args: spec.storaged_args.iter().map(|s| s.to_string()).collect(),
            log_tail_on_panic: spec.log_tail_on_panic,
            starts: 0,
        };
        for id in 1..=NODES {
            let p = c.spawn_storaged(id);
            c.nodes.push(p);
        }
        c
    }

    /// Where the logs are: kept when the test fails.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u32) -> PathBuf {
        self.dir.path().join(format!("data-{id}"))
    }

    /// Node `id`'s metrics address (with `ClusterSpec::node_metrics`).
    pub fn node_metrics(&self, id: u32) -> SocketAddr {
        self.node_metrics[id as usize - 1].expect("the cluster serves its nodes' metrics (ClusterSpec::node_metrics)")
    }

    fn spawn_storaged(&mut self, id: u32) -> Proc {
        let extra = self.storaged_args.clone();
        self.spawn_storaged_with(id, &extra)
    }

    /// Starts node `id` with `extra` in place of the cluster's own storaged arguments.
    fn spawn_storaged_with(&mut self, id: u32, extra: &[String]) -> Proc {
        self.starts += 1;
        let spec = &self.volume.nodes[id as usize - 1];
        let mut cluster_args: Vec<String> = vec!["--az".into(), spec.az.clone(), "--listen".into(), spec.addr.clone()];
        cluster_args.extend(["--volume".into(), self.volume_path.display().to_string()]);
        if let Some(metrics) = self.node_metrics[id as usize - 1] {
            cluster_args.extend(["--metrics-listen".into(), metrics.to_string()]);
        }
        cluster_args.extend(extra.iter().cloned());
        let pgs: Vec<u32> = (0..self.volume.pg_count() as u32).collect();
        let mut args = vec!["serve".to_string()];
        args.extend(storaged_args(id, &self.data_dir(id), &self.certs, &pgs, &cluster_args));
        let mut p = Proc::spawn(&bin("storaged"), &args, self.dir.path().join(format!("storaged-{id}.{}.log", self.starts)));
        p.tail_on_panic = self.log_tail_on_panic;
        p
    }

    pub fn kill9(&mut self, id: u32) {
        self.nodes[id as usize - 1].kill9();
    }

    /// Restarts node `id` on its address and data dir (it recovers from disk).
    pub async fn restart(&mut self, id: u32) {
        let mut p = self.spawn_storaged(id);
        p.wait_log(STORAGED_READY, READY_TIMEOUT).await;
        self.nodes[id as usize - 1] = p;
    }

    /// Restarts node `id` like `restart`, with `extra` in place of the arguments the
    /// cluster was started with (e.g. without a fault-injection knob).
    pub async fn restart_with(&mut self, id: u32, extra: &[&str]) {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut p = self.spawn_storaged_with(id, &extra);
        p.wait_log(STORAGED_READY, READY_TIMEOUT).await;
        self.nodes[id as usize - 1] = p;
    }

    pub fn writer_addr(&self) -> SocketAddr {
        self.volume.writer.parse().expect("writer address")
    }

    /// Starts `writerd serve` on the volume's writer address (or `listen`) and waits until it is ready.
    pub async fn start_writer(&mut self, listen: Option<SocketAddr>, extra: &[&str]) -> Proc {
        let mut p = self.spawn_writer(listen, extra);
        p.wait_log("writerd ready", READY_TIMEOUT).await;
        p
    }

    /// Starts `writerd serve` without waiting for it.
    pub fn spawn_writer(&mut self, listen: Option<SocketAddr>, extra: &[&str]) -> Proc {
        let volume = self.volume_path.clone();
        self.spawn_writer_with_volume(&volume, listen, extra)
    }

    /// Starts `writerd serve --volume <volume>` (a volume file other than the cluster's,
    /// e.g. one that reaches the nodes through proxies) and waits until it is ready.
    pub async fn start_writer_with_volume(&mut self, volume: &Path, extra: &[&str]) -> Proc {
        let mut p = self.spawn_writer_with_volume(volume, None, extra);
        p.wait_log("writerd ready", READY_TIMEOUT).await;
        p
    }

    /// Starts `writerd serve --volume <volume>` without waiting for it.
    pub fn spawn_writer_with_volume(&mut self, volume: &Path, listen: Option<SocketAddr>, extra: &[&str]) -> Proc {
        self.starts += 1;
        let mut args: Vec<String> = vec!["serve".into(), "--volume".into(), volume.display().to_string()];
        args.extend(["--certs".into(), self.certs.display().to_string()]);
        if let Some(l) = listen {
            args.extend(["--listen".into(), l.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::spawn(&bin("writerd"), &args, self.dir.path().join(format!("writerd.{}.log", self.starts)))
    }

    /// Starts `replicad serve` on `listen` (a fresh address when `None`), with metrics on
    /// a fresh TCP address, and waits until it is ready.
    pub async fn start_replica(&mut self, listen: Option<SocketAddr>, extra: &[&str]) -> Replica {
        let mut r = self.spawn_replica(listen, extra);
        r.proc.wait_log("replicad ready", READY_TIMEOUT).await;
        r
    }

    /// Starts `replicad serve` without waiting for it.
    pub fn spawn_replica(&mut self, listen: Option<SocketAddr>, extra: &[&str]) -> Replica {
        self.starts += 1;
        let addr = listen.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().expect("address"));
        let metrics = free_tcp_addr();
        let mut args: Vec<String> = vec!["serve".into(), "--volume".into(), self.volume_path.display().to_string()];
        args.extend(["--listen".into(), addr.to_string(), "--certs".into(), self.certs.display().to_string()]);
        args.extend(["--metrics-listen".into(), metrics.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(&bin("replicad"), &args, self.dir.path().join(format!("replicad.{}.log", self.starts)));
        Replica { proc, addr, metrics }
    }

    /// A client endpoint presenting the cluster's `client` certificate.
    pub fn endpoint(&self) -> quinn::Endpoint {
        let id = TlsIdentity::load(&self.certs, "client").expect("client identity");
        borealis_net::client_endpoint(&id).expect("client endpoint")
    }

    pub async fn client(&self, addr: SocketAddr) -> ApiClient {
        tokio::time::timeout(REPLY_TIMEOUT, ApiClient::connect(&self.endpoint(), addr)).await.expect("connect in time").expect("connect to server")
    }

    /// Node `id`'s client address.
    pub fn node_addr(&self, id: u32) -> SocketAddr {
        self.volume.nodes[id as usize - 1].addr.parse().expect("node address")
    }

    /// Node `id`'s SCL for `pg`, read without raising its epoch.
    pub async fn scl(&self, ep: &quinn::Endpoint, id: u32, pg: PgId) -> Option<Lsn> {
        self.position(ep, id, pg).await.map(|p| p.scl)
    }

    /// Node `id`'s position (SCL, flushed LSN) for `pg`, read without raising its epoch;
    /// `None` if it does not answer within 2 s.
    pub async fn position(&self, ep: &quinn::Endpoint, id: u32, pg: PgId) -> Option<redo_core::wire::SegmentPosition> {
        let addr = self.node_addr(id);
        let r = tokio::time::timeout(Duration::from_secs(2), async {
            let conn = StorageConn::connect(ep, addr).await.ok()?;
            conn.status(Epoch(0), pg, None).await.ok().map(|s| s.position)
        });
        r.await.ok().flatten()
    }
}

impl Drop for Cluster {
    /// A failing test keeps its directory (logs, data, certificates) and says where.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("test failed: cluster directory kept at {}", self.dir.path().display());
        }
    }
}

/// A running `replicad`: its client API and metrics addresses.
pub struct Replica {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

impl Replica {
    /// Its metrics now; the process must be serving them.
    pub fn scrape(&self) -> String {
        crate::client::scrape(self.metrics)
    }
}
