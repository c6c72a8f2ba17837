//! Hole filling by gossip, through the real binaries: six storaged that know
//! their volume fill each other's holes from their PG peers, pulling only
//! from peers at their own epoch and newest truncation.

mod common;

use borealis_net::storage::StorageConn;
use common::*;
use redo_core::wire::ErrorCode;
use redo_core::{Epoch, Lsn, PgId};
use test_support::{Cluster, ClusterSpec, NODES, SEGMENT_JOINED};

const PG: u32 = 0;
/// The node the tests starve or wipe.
const LAGGARD: u32 = 6;
const GOSSIP_INTERVAL_MS: &str = "50";
/// What a node logs once it gossips (after it serves).
const GOSSIP_STARTED: &str = "gossip with PG peers started";

/// Generation-1 and generation-2 epochs, as writers would claim them.
fn epoch1() -> Epoch {
    Epoch::claim_after(Epoch(0), 11)
}
fn epoch2() -> Epoch {
    Epoch::claim_after(epoch1(), 22)
}

/// Six storage nodes hosting PG 0, each started with `--volume`, gossiping.
async fn start_cluster() -> Cluster {
    let mut c = Cluster::start_with(ClusterSpec {
        pgs: 1,
        page_count: 64,
        storaged_args: &["--gossip-interval-ms", GOSSIP_INTERVAL_MS, "--worker-threads", "1"],
        node_metrics: true,
        log_tail_on_panic: 40,
        dir_prefix: "storaged-gossip-",
    })
    .await;
    for id in 1..=NODES {
        c.nodes[id as usize - 1].wait_log(GOSSIP_STARTED, READY_TIMEOUT).await;
    }
    c
}

/// What these tests do with a node of the cluster.
trait Nodes {
    async fn connect(&self, ep: &quinn::Endpoint, id: u32) -> StorageConn;
    /// Node `id`'s metrics address.
    fn metrics(&self, id: u32) -> String;
    async fn metric(&self, id: u32, name: &str) -> f64;
    /// Waits until node `id`'s segment has run `rounds` more gossip rounds
    /// than it had (every peer was asked every time).
    async fn wait_rounds(&self, id: u32, rounds: f64);
}

impl Nodes for Cluster {
    async fn connect(&self, ep: &quinn::Endpoint, id: u32) -> StorageConn {
        timely("connect", StorageConn::connect(ep, self.node_addr(id))).await.expect("connect to storaged")
    }

    fn metrics(&self, id: u32) -> String {
        self.node_metrics(id).to_string()
    }

    async fn metric(&self, id: u32, name: &str) -> f64 {
        let series = series(id, name);
        metric(&self.metrics(id), &series).await.unwrap_or_else(|| panic!("{series} missing from /metrics"))
    }

    async fn wait_rounds(&self, id: u32, rounds: f64) {
        let now = self.metric(id, "storaged_gossip_rounds_total").await;
        wait_metric(&self.metrics(id), &series(id, "storaged_gossip_rounds_total"), |v| v >= now + rounds).await;
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
    let c = start_cluster().await;
    let ep = c.endpoint();
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
    wait_metric(&c.metrics(LAGGARD), &series(LAGGARD, "storaged_segment_holes"), |v| v == 0.0).await;
    assert_eq!(c.metric(LAGGARD, "storaged_segment_pending_records").await, 0.0);
    assert_eq!(c.metric(LAGGARD, "storaged_segment_peer_scl").await, late.last_lsn().0 as f64);
    // Its peers had nothing to take from it.
    assert_eq!(c.metric(1, "storaged_gossip_records_total").await, 0.0);
    // The filled chain is flushed like any other.
    wait_position(&conn, PG, "the laggard flushes what it pulled", |p| p.flushed_lsn == late.last_lsn()).await;
}

/// A node whose data dir was removed comes back empty, with no epoch state.
/// Until a read quorum of its peers told it theirs it grants nothing, so a
/// deposed writer cannot count it: with only two peers up it refuses every
/// claim and append (`Joining`). Once a third is back it joins at the newest
/// epoch among them, refuses the deposed writer's as stale, and refills
/// everything from its peers without waiting for the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_joins_at_its_peers_epoch_refuses_a_stale_one_and_refills() {
    let mut c = start_cluster().await;
    let ep = c.endpoint();
    let mut chain = Chain::new(PG, 500);
    let batches = [chain.batch(800), chain.batch(800)];
    for b in &batches {
        append(&c, &ep, 1..=NODES, epoch1(), b).await;
    }
    // A new writer takes over at epoch 2 and writes on.
    claim(&c, &ep, 1..=NODES, epoch2(), None).await;
    let next = chain.batch(100);
    append(&c, &ep, 1..=NODES, epoch2(), &next).await;
    let conn = c.connect(&ep, LAGGARD).await;
    wait_position(&conn, PG, "the laggard flushes", |p| p.flushed_lsn == next.last_lsn()).await;
    conn.conn.close(0u32.into(), b"restart");

    // The laggard is wiped while three of its peers are down.
    for id in [1, 2, 3, LAGGARD] {
        c.kill9(id);
    }
    std::fs::remove_dir_all(c.data_dir(LAGGARD)).expect("wipe the laggard's data dir");
    c.restart(LAGGARD).await;
    c.nodes[LAGGARD as usize - 1].wait_log(GOSSIP_STARTED, READY_TIMEOUT).await;
    assert_eq!(c.metric(LAGGARD, "storaged_segment_joining").await, 1.0);
    let conn = c.connect(&ep, LAGGARD).await;
    let deposed = Chain::new(PG, 100).batch(10);
    for epoch in [epoch1(), epoch2()] {
        let (code, message) = refusal(conn.status(epoch, PgId(PG), None).await);
        assert_eq!(code, ErrorCode::Joining, "claim at {epoch}: {message}");
    }
    let (code, message) = refusal(append_once(&conn, epoch1().0, PgId(PG), &deposed).await);
    assert_eq!(code, ErrorCode::Joining, "{message}");
    assert_eq!(c.metric(LAGGARD, "storaged_segment_joining").await, 1.0, "two members of five decide nothing");

    c.restart(1).await;
    c.nodes[LAGGARD as usize - 1].wait_log(SEGMENT_JOINED, READY_TIMEOUT).await;
    assert_eq!(c.metric(LAGGARD, "storaged_segment_joining").await, 0.0);
    let (code, message) = refusal(conn.status(epoch1(), PgId(PG), None).await);
    assert_eq!(code, ErrorCode::StaleEpoch, "{message}");
    let (code, message) = refusal(append_once(&conn, epoch1().0, PgId(PG), &deposed).await);
    assert_eq!(code, ErrorCode::StaleEpoch, "{message}");
    let status = timely("status", conn.status(Epoch(0), PgId(PG), None)).await.expect("status once joined");
    assert_eq!(status.epoch, epoch2());

    wait_position(&conn, PG, "the wiped node's SCL reaches its peers'", |p| p.scl == next.last_lsn()).await;
    assert_holds_exactly(&c, &ep, LAGGARD, &chain, next.last_lsn()).await;
    assert!(c.metric(LAGGARD, "storaged_gossip_records_total").await >= 1700.0);
}

/// A segment pulls nothing from peers at another epoch, even with records
/// waiting above a hole; once they are at its epoch, it fills the hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_at_another_epoch_are_not_pulled_from() {
    let c = start_cluster().await;
    let ep = c.endpoint();
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
    wait_metric(&c.metrics(LAGGARD), &series(LAGGARD, "storaged_segment_holes"), |v| v == 0.0).await;
}

/// Same epoch, different newest truncation: not pulled from until the
/// segment has applied the same truncation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_another_truncation_are_not_pulled_from() {
    let c = start_cluster().await;
    let ep = c.endpoint();
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
