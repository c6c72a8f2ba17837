//! Hole filling by gossip, through the real binaries: six storaged that know
//! their volume fill each other's holes from their PG peers, pulling only
//! from peers at their own epoch and newest truncation.

mod common;

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use borealis_net::storage::StorageConn;
use common::*;
use redo_core::volume::{NodeSpec, Volume};
use redo_core::{Epoch, Lsn, PgId};

const PG: u32 = 0;
const NODES: u32 = 6;
/// The node the tests starve or wipe.
const LAGGARD: u32 = 6;
const GOSSIP_INTERVAL_MS: &str = "50";
const CLUSTER_START_ATTEMPTS_MAX: u32 = 3;

/// Generation-1 and generation-2 epochs, as writers would claim them.
fn epoch1() -> Epoch {
    Epoch::claim_after(Epoch(0), 11)
}
fn epoch2() -> Epoch {
    Epoch::claim_after(epoch1(), 22)
}

struct Node {
    addr: SocketAddr,
    metrics: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- {} (last {} lines) ----", self.log_path.display(), tail.len());
            tail.iter().rev().for_each(|l| eprintln!("{l}"));
        }
    }
}

/// Six storage nodes hosting PG 0, each started with `--volume`.
struct Cluster {
    /// Index i is node id i + 1. Dropped before `dir`, so that a failing test prints their logs.
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
    certs: PathBuf,
    volume_path: PathBuf,
    starts: u32,
}

enum Started {
    Ready,
    PortTaken,
}

impl Cluster {
    async fn start() -> Cluster {
        for _ in 0..CLUSTER_START_ATTEMPTS_MAX {
            let mut c = Cluster::spawn_all();
            let mut ok = true;
            for id in 1..=NODES {
                if let Started::PortTaken = c.wait_ready(id).await {
                    ok = false;
                    break;
                }
            }
            if ok {
                return c;
            }
        }
        panic!("could not start six storaged on free ports in {CLUSTER_START_ATTEMPTS_MAX} attempts");
    }

    fn spawn_all() -> Cluster {
        let dir = tempfile::Builder::new().prefix("storaged-gossip-").tempdir().expect("temp dir");
        let certs = dir.path().join("certs");
        let mut names: Vec<String> = (1..=NODES).map(|i| format!("storaged-{i}")).collect();
        names.push("client".into());
        borealis_net::certs::generate(&certs, &names).expect("certificates");
        let specs: Vec<NodeSpec> = (1..=NODES)
            .map(|i| NodeSpec { id: i, az: format!("az{}", (i - 1) / 2 + 1), addr: format!("127.0.0.1:{}", free_port()) })
            .collect();
        let volume = Volume::local("127.0.0.1:1".into(), specs.clone(), 1, 64).expect("volume");
        let volume_path = dir.path().join("volume.toml");
        std::fs::write(&volume_path, volume.to_toml()).expect("write volume file");
        let nodes = specs
            .iter()
            .map(|s| Node {
                addr: s.addr.parse().expect("address"),
                metrics: free_tcp_addr(),
                data_dir: dir.path().join(format!("data-{}", s.id)),
                log_path: PathBuf::new(),
                child: None,
            })
            .collect();
        let mut c = Cluster { nodes, dir, certs, volume_path, starts: 0 };
        for id in 1..=NODES {
            c.spawn(id);
        }
        c
    }

    fn node(&self, id: u32) -> &Node {
        &self.nodes[id as usize - 1]
    }

    fn spawn(&mut self, id: u32) {
        self.starts += 1;
        let log_path = self.dir.path().join(format!("storaged-{id}.{}.log", self.starts));
        let (certs, volume) = (self.certs.display().to_string(), self.volume_path.display().to_string());
        let n = &mut self.nodes[id as usize - 1];
        let child = Command::new(STORAGED)
            .arg("serve")
            .args(["--node-id", &id.to_string(), "--az", &format!("az{}", (id - 1) / 2 + 1)])
            .args(["--listen", &n.addr.to_string(), "--metrics-listen", &n.metrics])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .args(["--certs", &certs, "--pgs", &PG.to_string(), "--segment-prealloc-bytes", "1MiB"])
            .args(["--volume", &volume, "--gossip-interval-ms", GOSSIP_INTERVAL_MS, "--worker-threads", "1"])
            .env("RUST_LOG", std::env::var("STORAGED_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log_path).expect("create log"))
            .spawn()
            .expect("spawn storaged");
        n.child = Some(child);
        n.log_path = log_path;
    }

    async fn wait_ready(&mut self, id: u32) -> Started {
        let deadline = Instant::now() + READY_TIMEOUT;
        let n = &mut self.nodes[id as usize - 1];
        loop {
            if let Some(status) = n.child.as_mut().expect("running").try_wait().expect("poll child") {
                let log = n.log();
                n.child = None;
                if log.contains("bind UDP") {
                    return Started::PortTaken;
                }
                panic!("storaged {id} exited during start-up ({status}); log:\n{log}");
            }
            if n.log().contains("gossip with PG peers started") {
                return Started::Ready;
            }
            assert!(Instant::now() < deadline, "storaged {id} not ready within {READY_TIMEOUT:?}; log:\n{}", n.log());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn client(&self) -> quinn::Endpoint {
        let id = borealis_net::TlsIdentity::load(&self.certs, "client").expect("client identity");
        borealis_net::client_endpoint(&id).expect("client endpoint")
    }

    async fn connect(&self, ep: &quinn::Endpoint, id: u32) -> StorageConn {
        timely("connect", StorageConn::connect(ep, self.node(id).addr)).await.expect("connect to storaged")
    }

    async fn metric(&self, id: u32, name: &str) -> f64 {
        let series = series(id, name);
        metric(&self.node(id).metrics, &series).await.unwrap_or_else(|| panic!("{series} missing from /metrics"))
    }

    /// Waits until node `id`'s segment has run `rounds` more gossip rounds
    /// than it had (every peer was asked every time).
    async fn wait_rounds(&self, id: u32, rounds: f64) {
        let now = self.metric(id, "storaged_gossip_rounds_total").await;
        wait_metric(&self.node(id).metrics, &series(id, "storaged_gossip_rounds_total"), |v| v >= now + rounds).await;
    }
}

/// A node-level series (`_total`) or a segment gauge of PG 0.
fn series(id: u32, name: &str) -> String {
    if name.ends_with("_total") {
        format!("{name}{{node=\"{id}\"}}")
    } else {
        format!("{name}{{node=\"{id}\",pg=\"{PG}\"}}")
    }
}

async fn append(c: &Cluster, ep: &quinn::Endpoint, ids: impl IntoIterator<Item = u32>, epoch: Epoch, batch: &Batch) {
    for id in ids {
        let conn = c.connect(ep, id).await;
        append_once(&conn, epoch.0, PgId(PG), batch).await.unwrap_or_else(|e| panic!("append to node {id}: {e}"));
        conn.conn.close(0u32.into(), b"done");
    }
}

async fn claim(c: &Cluster, ep: &quinn::Endpoint, ids: impl IntoIterator<Item = u32>, epoch: Epoch, truncate_above: Option<Lsn>) {
    for id in ids {
        let conn = c.connect(ep, id).await;
        let s = timely("status", conn.status(epoch, PgId(PG), truncate_above)).await.unwrap_or_else(|e| panic!("claim {epoch} on node {id}: {e}"));
        assert_eq!(s.epoch, epoch);
        conn.conn.close(0u32.into(), b"done");
    }
}

/// Every record of node `id`'s segment up to `scl` is the record the writer sent, byte for byte.
async fn assert_holds_exactly(c: &Cluster, ep: &quinn::Endpoint, id: u32, chain: &Chain, scl: Lsn) {
    let conn = c.connect(ep, id).await;
    let (records, pos) = pull_all(&conn, PG, Lsn::ZERO, scl, 256 << 10).await;
    assert_eq!(pos.scl, scl);
    assert_chain(&records, Lsn::ZERO);
    let sent: Vec<(&Lsn, &Vec<u8>)> = chain.sent.range(..=scl).collect();
    assert_eq!(records.len(), sent.len(), "node {id} holds {} records up to {scl}, the writer sent {}", records.len(), sent.len());
    for (r, (lsn, bytes)) in records.iter().zip(sent) {
        assert_eq!(r.header.lsn, *lsn);
        assert_eq!(&r.bytes, bytes, "record {lsn} on node {id} differs from the one sent");
    }
}

/// The laggard received only the later half of the log, so it holds it above
/// a hole; it pulls the earlier half from its peers in runs of at most 1 MiB
/// until its SCL reaches theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_fills_its_hole_from_its_peers() {
    let c = Cluster::start().await;
    let ep = c.client();
    let mut chain = Chain::new(PG, 1000);
    let (early, late) = (chain.batch(1500), chain.batch(500));
    append(&c, &ep, 1..LAGGARD, epoch1(), &early).await;
    append(&c, &ep, 1..=LAGGARD, epoch1(), &late).await;

    let conn = c.connect(&ep, LAGGARD).await;
    wait_position(&conn, PG, "the laggard's SCL reaches its peers'", |p| p.scl == late.last_lsn()).await;
    assert_holds_exactly(&c, &ep, LAGGARD, &chain, late.last_lsn()).await;

    let pulled = c.metric(LAGGARD, "storaged_gossip_records_total").await;
    assert!(pulled >= early.lsns.len() as f64, "gossip inserted {pulled} records, the hole held {}", early.lsns.len());
    assert!(c.metric(LAGGARD, "storaged_gossip_bytes_total").await > (1 << 20) as f64);
    assert!(c.metric(LAGGARD, "storaged_gossip_pulls_total").await >= 2.0, "1.5 MB comes in runs of at most 1 MiB");
    wait_metric(&c.node(LAGGARD).metrics, &series(LAGGARD, "storaged_segment_holes"), |v| v == 0.0).await;
    assert_eq!(c.metric(LAGGARD, "storaged_segment_pending_records").await, 0.0);
    assert_eq!(c.metric(LAGGARD, "storaged_segment_peer_scl").await, late.last_lsn().0 as f64);
    // Its peers had nothing to take from it.
    assert_eq!(c.metric(1, "storaged_gossip_records_total").await, 0.0);
    // The filled chain is flushed like any other.
    wait_position(&conn, PG, "the laggard flushes what it pulled", |p| p.flushed_lsn == late.last_lsn()).await;
}

/// A node whose data dir was removed comes back empty (and unclaimed: it
/// pulls from nobody); once the writer's next batch reaches it at the
/// cluster's epoch, it refills everything from its peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_refills_completely_from_its_peers() {
    let mut c = Cluster::start().await;
    let ep = c.client();
    let mut chain = Chain::new(PG, 500);
    let batches = [chain.batch(800), chain.batch(800)];
    for b in &batches {
        append(&c, &ep, 1..=NODES, epoch1(), b).await;
    }
    let conn = c.connect(&ep, LAGGARD).await;
    wait_position(&conn, PG, "the laggard flushes", |p| p.flushed_lsn == batches[1].last_lsn()).await;
    conn.conn.close(0u32.into(), b"restart");

    let failures = c.metric(1, "storaged_gossip_failures_total").await;
    c.nodes[LAGGARD as usize - 1].kill9();
    // Its peers notice: asking it fails (and they go on without it).
    wait_metric(&c.node(1).metrics, &series(1, "storaged_gossip_failures_total"), |v| v > failures).await;
    std::fs::remove_dir_all(&c.node(LAGGARD).data_dir).expect("wipe the laggard's data dir");
    c.spawn(LAGGARD);
    assert!(matches!(c.wait_ready(LAGGARD).await, Started::Ready));
    // At epoch 0 it agrees with no peer (they are at epoch 1): it takes nothing.
    c.wait_rounds(LAGGARD, 3.0).await;
    let conn = c.connect(&ep, LAGGARD).await;
    assert_eq!(position(&conn, PG).await.scl, Lsn::ZERO);
    assert_eq!(c.metric(LAGGARD, "storaged_gossip_pulls_total").await, 0.0);

    let next = chain.batch(100);
    append(&c, &ep, 1..=NODES, epoch1(), &next).await;
    wait_position(&conn, PG, "the wiped node's SCL reaches its peers'", |p| p.scl == next.last_lsn()).await;
    assert_holds_exactly(&c, &ep, LAGGARD, &chain, next.last_lsn()).await;
    assert!(c.metric(LAGGARD, "storaged_gossip_records_total").await >= 1600.0);
}

/// A segment pulls nothing from peers at another epoch, even with records
/// waiting above a hole; once they are at its epoch, it fills the hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_at_another_epoch_are_not_pulled_from() {
    let c = Cluster::start().await;
    let ep = c.client();
    let mut chain = Chain::new(PG, 200);
    let (a, b) = (chain.batch(100), chain.batch(100));
    append(&c, &ep, 1..=NODES, epoch1(), &a).await;
    append(&c, &ep, 1..LAGGARD, epoch1(), &b).await;
    // A new writer reached only the laggard so far, and sends it new records.
    claim(&c, &ep, [LAGGARD], epoch2(), None).await;
    let late = chain.batch(50);
    append(&c, &ep, [LAGGARD], epoch2(), &late).await;

    c.wait_rounds(LAGGARD, 5.0).await;
    let conn = c.connect(&ep, LAGGARD).await;
    assert_eq!(position(&conn, PG).await.scl, a.last_lsn(), "the laggard took records from peers at another epoch");
    assert_eq!(c.metric(LAGGARD, "storaged_gossip_pulls_total").await, 0.0);
    assert_eq!(c.metric(LAGGARD, "storaged_segment_holes").await, 1.0, "records wait above a hole");
    assert_eq!(c.metric(LAGGARD, "storaged_segment_peer_scl").await, 0.0, "no peer agrees with it");

    claim(&c, &ep, 1..LAGGARD, epoch2(), None).await;
    wait_position(&conn, PG, "the laggard fills its hole from peers at its epoch", |p| p.scl == late.last_lsn()).await;
    assert_holds_exactly(&c, &ep, LAGGARD, &chain, late.last_lsn()).await;
    wait_metric(&c.node(LAGGARD).metrics, &series(LAGGARD, "storaged_segment_holes"), |v| v == 0.0).await;
}

/// Same epoch, different newest truncation: not pulled from until the
/// segment has applied the same truncation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_another_truncation_are_not_pulled_from() {
    let c = Cluster::start().await;
    let ep = c.client();
    let mut chain = Chain::new(PG, 200);
    let (a, b) = (chain.batch(100), chain.batch(100));
    append(&c, &ep, 1..=NODES, epoch1(), &a).await;
    append(&c, &ep, 1..LAGGARD, epoch1(), &b).await;
    // Recovery at epoch 2 truncates above b on the peers; the laggard is claimed but not yet truncated.
    claim(&c, &ep, 1..LAGGARD, epoch2(), Some(b.last_lsn())).await;
    claim(&c, &ep, [LAGGARD], epoch2(), None).await;

    c.wait_rounds(LAGGARD, 5.0).await;
    let conn = c.connect(&ep, LAGGARD).await;
    assert_eq!(position(&conn, PG).await.scl, a.last_lsn(), "the laggard took records from peers with another truncation history");
    assert_eq!(c.metric(LAGGARD, "storaged_gossip_pulls_total").await, 0.0);

    claim(&c, &ep, [LAGGARD], epoch2(), Some(b.last_lsn())).await;
    wait_position(&conn, PG, "the laggard catches up once truncated alike", |p| p.scl == b.last_lsn()).await;
    assert_holds_exactly(&c, &ep, LAGGARD, &chain, b.last_lsn()).await;
}
