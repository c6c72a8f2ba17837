//! Failover under faults, through the real binaries (issue 5, item 7): the
//! writer killed together with two storage nodes; all six storage nodes
//! restarted after the flush (data from disk) and before it (the replica's
//! re-offer); a network partition that isolates a live writer. Each ends with
//! every acknowledged write present on the new writer and the other replica
//! equal to it.
//!
//! The tests run one at a time (`SERIAL`): each is a cluster of nine
//! processes, and two at once on a small machine turn timing into noise.
#![allow(clippy::await_holding_lock)] // SERIAL's guard is held for a whole test on purpose

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redo_core::wire::SegmentPosition;
use redo_core::{Lsn, PgId};
use support::*;
use test_support::*;
use tokio::net::UdpSocket;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A flush delay no test outlives: records stay in memory only.
const FLUSH_NEVER_MS: &str = "600000";

fn keys_of(acked: &[Ack]) -> Vec<u64> {
    acked.iter().map(|a| a.key).collect()
}

fn last_lsn(acked: &[Ack]) -> Lsn {
    acked.iter().map(|a| a.lsn).max().expect("some acks")
}

/// Every node's position for every PG (`None`: did not answer), index [node - 1][pg].
async fn positions(c: &Cluster, ep: &quinn::Endpoint) -> Vec<Vec<Option<SegmentPosition>>> {
    let mut out = Vec::new();
    for id in 1..=6 {
        let mut row = Vec::new();
        for pg in 0..PGS {
            row.push(c.position(ep, id, PgId(pg)).await);
        }
        out.push(row);
    }
    out
}

/// Waits until every segment of every PG is complete to the same point, has flushed all
/// of it, and the PGs together reach `last` (the last acknowledged commit): every acked
/// record is on every node's disk. Returns the positions.
async fn wait_flushed_everywhere(c: &Cluster, ep: &quinn::Endpoint, last: Lsn, timeout: Duration) -> Vec<Vec<SegmentPosition>> {
    let deadline = Instant::now() + timeout;
    loop {
        let all = positions(c, ep).await;
        let answered: Option<Vec<Vec<SegmentPosition>>> = all.iter().map(|row| row.iter().copied().collect()).collect();
        if let Some(pos) = &answered {
            let scl_of_pg = |pg: usize| pos.iter().map(|row| row[pg].scl).max().expect("six nodes");
            let everywhere = pos.iter().all(|row| row.iter().enumerate().all(|(pg, p)| p.scl == scl_of_pg(pg) && p.flushed_lsn >= p.scl));
            let reach = (0..PGS as usize).map(scl_of_pg).max().expect("PGs");
            if everywhere && reach >= last {
                return pos.clone();
            }
        }
        assert!(Instant::now() < deadline, "the nodes did not all flush up to {last} within {timeout:?}: {all:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until each node of `ids` has, for every PG, the SCL the other nodes have now.
async fn wait_caught_up(c: &Cluster, ep: &quinn::Endpoint, ids: &[u32], timeout: Duration) {
    let mut target = vec![Lsn::ZERO; PGS as usize];
    for id in (1..=6).filter(|id| !ids.contains(id)) {
        for pg in 0..PGS {
            let scl = c.scl(ep, id, PgId(pg)).await.unwrap_or_else(|| panic!("node {id} answers Status"));
            target[pg as usize] = target[pg as usize].max(scl);
        }
    }
    let deadline = Instant::now() + timeout;
    let started = Instant::now();
    loop {
        let mut behind = Vec::new();
        for &id in ids {
            for pg in 0..PGS {
                let scl = c.scl(ep, id, PgId(pg)).await;
                if scl.is_none_or(|s| s < target[pg as usize]) {
                    behind.push(format!("node {id} pg{pg} at {scl:?} < {}", target[pg as usize]));
                }
            }
        }
        if behind.is_empty() {
            eprintln!("restarted nodes {ids:?} caught up with {target:?} in {:?}", started.elapsed());
            return;
        }
        assert!(Instant::now() < deadline, "restarted nodes did not catch up within {timeout:?}: {}", behind.join("; "));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the sample `name` of `r` satisfies `ok`.
async fn wait_metric(r: &Replica, name: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric(&r.scrape(), name);
        if ok(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {v} for {timeout:?}{}", diagnose(r));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (promoted, other) of two replicas, by the promoted one's address.
fn split<'a>(addr: SocketAddr, ra: &'a Replica, rb: &'a Replica) -> (&'a Replica, &'a Replica) {
    if addr == ra.addr {
        (ra, rb)
    } else {
        (rb, ra)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_killed_with_two_storage_nodes_is_replaced_and_the_nodes_catch_up() {
    let _serial = serial();
    let (mut c, mut w, client) = cluster_with_writer(&[]).await;
    let ep = c.endpoint();
    let (ra, rb) = two_replicas(&mut c, &["--failover-silence-ms", "300"]).await;
    let load = Load::start(&client, 4, 0);
    load.wait_more(300, REPLY_TIMEOUT).await;
    // The writer and one node of az1 and one of az2 at the same moment.
    let killed = Instant::now();
    w.kill9();
    c.kill9(1);
    c.kill9(3);
    let (addr, role) = wait_writer(&c, &[ra.addr, rb.addr], READY_TIMEOUT).await;
    eprintln!("kill of the writer and nodes 1, 3 to a writer answering: {:?}", killed.elapsed());
    let (mut acked, _) = load.finish().await;
    assert!(acked.len() >= 300);
    let (promoted, other) = split(addr, &ra, &rb);
    assert!(role.epoch.generation() >= 2, "a new epoch was claimed: {:?}", role.epoch);
    assert!(metric(&promoted.scrape(), "replicad_promoted_us") > 0.0);

    // Commits go on with two of six nodes down, and while they come back.
    let writer = c.client(addr).await;
    let load = Load::start(&writer, 4, 1_000_000);
    load.wait_more(200, REPLY_TIMEOUT).await;
    c.restart(1).await;
    c.restart(3).await;
    load.wait_more(200, REPLY_TIMEOUT).await;
    let (more, errors) = load.finish().await;
    assert!(errors.is_empty(), "the new writer failed {} commits with two nodes down or restarting, e.g. {:?}", errors.len(), &errors[..errors.len().min(5)]);
    acked.extend(more);

    // The restarted nodes fill what they missed (the new writer's resends, gossip).
    wait_caught_up(&c, &ep, &[1, 3], CATCH_UP_TIMEOUT).await;
    check_after_failover(&c, &writer, other, &acked).await;
}

/// Aurora's design point for reads: an AZ (nodes 1 and 2) and one more node (3)
/// go down with the writer. The replicas serve every acknowledged write. One
/// told to promote (a replica promotes itself only with a write quorum) takes
/// over from the three segments left of each PG: it serves every acknowledged
/// write, as do the other replica and one started now, and refuses writes
/// (nothing written, a clear error) until a fourth node is back, when the same
/// put commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_and_replica_reads_with_an_az_and_one_more_node_down() {
    let _serial = serial();
    let (mut c, mut w, client) = cluster_with_writer(&[]).await;
    let (ra, rb) = two_replicas(&mut c, &["--failover-silence-ms", "0"]).await;
    let load = Load::start(&client, 4, 0);
    load.wait_more(300, REPLY_TIMEOUT).await;
    let (acked, _) = load.finish().await;
    let (ca, cb) = (c.client(ra.addr).await, c.client(rb.addr).await);
    let committed = read_point(&client).await;
    for (rc, r) in [(&ca, &ra), (&cb, &rb)] {
        ReadPoint::follow(rc).await.wait_for(committed, CATCH_UP_TIMEOUT, || format!("the replica did not apply the last commit{}", diagnose(r))).await;
    }
    w.kill9();
    for id in [1, 2, 3] {
        c.kill9(id);
    }
    assert_all_present(&ca, &acked).await;
    assert_all_present(&cb, &acked).await;

    let promoted = promote(&c, ra.addr).await.expect("a promotion by hand takes over from a read quorum");
    assert!(promoted.epoch.generation() >= 2, "a new epoch was claimed with three nodes down: {:?}", promoted.epoch);
    let writer = ca;
    assert_all_present(&writer, &acked).await;
    let keys: Vec<Vec<u8>> = acked.iter().map(|&i| key(i)).collect();
    // The other replica reads at the new epoch once it follows the new writer (storage refuses an older epoch's reads).
    let deadline = Instant::now() + READY_TIMEOUT;
    while role_of(&c, rb.addr).await.epoch < promoted.epoch {
        assert!(Instant::now() < deadline, "the other replica did not follow the new writer{}", diagnose(&rb));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_converges(&c, &rb, &writer, &keys).await;
    // A replica starting now, from the new writer's progress (found among its peers) and three segments per PG.
    let peers = format!("{},{}", ra.addr, rb.addr);
    let rc = c.start_replica(None, &["--peers", &peers]).await;
    assert_converges(&c, &rc, &writer, &keys).await;

    let vdl = read_point(&writer).await;
    let refused = writer.put(b"with-three-down", b"v").await.expect_err("no write quorum: the put must be refused");
    let why = refused.to_string();
    assert!(why.contains("nothing was written") && why.contains("read-only") && why.contains("3 of 6"), "{why}");
    assert_eq!(read_point(&writer).await, vdl, "nothing allocated while read-only");
    assert!(ra.proc.log_text().contains("took over with a read quorum only"), "{}", ra.proc.log_tail(20));

    // A fourth node back: the writer's session claims it, and writes open.
    c.restart(3).await;
    let lsn = tokio::time::timeout(READY_TIMEOUT, async {
        loop {
            match writer.put(b"with-three-down", b"v").await {
                Ok(lsn) => return lsn,
                Err(e) => assert!(e.to_string().contains("read-only"), "{e}"),
            }
        }
    })
    .await
    .expect("writes open once a fourth node is back");
    assert!(lsn > vdl);
    let (_, v) = cb.get_at(b"with-three-down", lsn).await.expect("the other replica reads the new write");
    assert_eq!(v.as_deref(), Some(&b"v"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_storage_nodes_restarted_after_the_flush_serve_every_acked_write_from_disk() {
    let _serial = serial();
    let (mut c, mut w, client) = cluster_with_writer(&[]).await;
    let ep = c.endpoint();
    let (ra, rb) = two_replicas(&mut c, &["--failover-silence-ms", "0"]).await;
    let load = Load::start(&client, 4, 0);
    load.wait_more(300, REPLY_TIMEOUT).await;
    let (acked, _) = load.finish_acks().await;
    let last = last_lsn(&acked);

    let flushed = wait_flushed_everywhere(&c, &ep, last, CATCH_UP_TIMEOUT).await;
    // The replica learns that the volume flushed it all, and holds nothing to offer back:
    // the new writer gets everything from the disks.
    wait_metric(&ra, "replicad_flushed_lsn", CATCH_UP_TIMEOUT, |v| v >= last.0 as f64).await;
    wait_metric(&ra, "replicad_retained_bytes", CATCH_UP_TIMEOUT, |v| v == 0.0).await;

    w.kill9();
    for id in 1..=6 {
        c.kill9(id);
    }
    for id in 1..=6 {
        c.restart(id).await;
    }
    // Each node recovered from its files exactly what it had flushed.
    let after = positions(&c, &ep).await;
    for (i, row) in after.iter().enumerate() {
        for (pg, p) in row.iter().enumerate() {
            let p = p.unwrap_or_else(|| panic!("node {} answers Status after its restart", i + 1));
            assert_eq!(p.scl, flushed[i][pg].scl, "node {} pg{pg} recovered to {} but had flushed {}", i + 1, p.scl, flushed[i][pg].scl);
        }
    }

    let p = promote(&c, ra.addr).await.expect("promote by hand");
    assert!(p.vdl >= last, "recovered VDL {} is below the last acked commit {last}", p.vdl);
    let writer = c.client(ra.addr).await;
    let lsn = writer.put(b"after-restart", b"v").await.expect("the new writer commits");
    assert!(lsn > p.vdl);
    check_after_failover(&c, &writer, &rb, &keys_of(&acked)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_restarted_before_the_flush_gets_acked_writes_back_from_the_replica() {
    let _serial = serial();
    // A disk so slow that nothing acknowledged reaches it during the test.
    let mut c = Cluster::start(&["--flush-delay-ms", FLUSH_NEVER_MS]).await;
    let mut w = c.start_writer(None, &[]).await;
    let client = c.client(c.writer_addr()).await;
    let ep = c.endpoint();
    let (ra, rb) = two_replicas(&mut c, &["--failover-silence-ms", "0"]).await;
    let load = Load::start(&client, 4, 0);
    load.wait_more(300, REPLY_TIMEOUT).await;
    let (acked, _) = load.finish_acks().await;
    let last = last_lsn(&acked);

    // The replica to promote has applied every acked commit, and still holds them.
    let ra_client = c.client(ra.addr).await;
    ReadPoint::follow(&ra_client).await.wait_for(last, CATCH_UP_TIMEOUT, || diagnose(&ra)).await;
    let m = ra.scrape();
    assert!(metric(&m, "replicad_flushed_lsn") < last.0 as f64, "nothing was to be flushed:\n{m}");
    assert!(metric(&m, "replicad_retained_bytes") > 0.0, "the replica retains the unflushed records:\n{m}");
    for (i, row) in positions(&c, &ep).await.iter().enumerate() {
        for (pg, p) in row.iter().enumerate() {
            let p = p.unwrap_or_else(|| panic!("node {} answers Status", i + 1));
            assert!(p.flushed_lsn < last, "node {} pg{pg} flushed {} despite the delay", i + 1, p.flushed_lsn);
        }
    }

    w.kill9();
    for id in 1..=6 {
        c.kill9(id);
    }
    // Back without the delay: what the new writer writes reaches the disks.
    for id in 1..=6 {
        c.restart_with(id, &[]).await;
    }
    // They lost the acked records: no node's PGs reach the last ack.
    for (i, row) in positions(&c, &ep).await.iter().enumerate() {
        let reach = row.iter().map(|p| p.unwrap_or_else(|| panic!("node {} answers Status after its restart", i + 1)).scl).max().expect("PGs");
        assert!(reach < last, "node {} recovered to {reach}, at or above the last ack {last}: the flush was not delayed", i + 1);
    }

    let p = promote(&c, ra.addr).await.expect("promote by hand");
    assert!(p.offer_us > 0, "the replica offered its records back: {p:?}");
    assert!(p.vdl >= last, "recovered VDL {} is below the last acked commit {last}: the offer back was lost", p.vdl);
    let writer = c.client(ra.addr).await;
    let lsn = writer.put(b"after-restart", b"v").await.expect("the new writer commits");
    assert!(lsn > p.vdl);
    check_after_failover(&c, &writer, &rb, &keys_of(&acked)).await;
    // The offered records are durable now: a node restarted once more still has them.
    let reach = wait_flushed_everywhere(&c, &ep, lsn, CATCH_UP_TIMEOUT).await;
    assert!(reach.iter().all(|row| row.iter().map(|p| p.scl).max() >= Some(last)));
}

/// A UDP relay in front of one storage node, with a switch that drops every packet
/// both ways. One upstream socket per client address, so replies find their way back.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Packets relayed and dropped, both ways.
    relayed: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind proxy"));
        let addr = front.local_addr().expect("proxy address");
        let cut = Arc::new(AtomicBool::new(false));
        let (relayed, dropped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let task = tokio::spawn({
            let (cut, relayed, dropped) = (cut.clone(), relayed.clone(), dropped.clone());
            async move {
                // Dropped with this task: the relays back to each client stop with it.
                let mut back = tokio::task::JoinSet::new();
                let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
                let mut buf = vec![0u8; 65_536];
                loop {
                    let Ok((n, from)) = front.recv_from(&mut buf).await else { return };
                    if cut.load(Relaxed) {
                        dropped.fetch_add(1, Relaxed);
                        continue;
                    }
                    relayed.fetch_add(1, Relaxed);
                    let up = match upstream.get(&from) {
                        Some(up) => up.clone(),
                        None => {
                            let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream"));
                            up.connect(target).await.expect("connect upstream");
                            let (up2, front, cut, relayed, dropped) = (up.clone(), front.clone(), cut.clone(), relayed.clone(), dropped.clone());
                            back.spawn(async move {
                                let mut buf = vec![0u8; 65_536];
                                while let Ok(n) = up2.recv(&mut buf).await {
                                    if cut.load(Relaxed) {
                                        dropped.fetch_add(1, Relaxed);
                                    } else {
                                        relayed.fetch_add(1, Relaxed);
                                        let _ = front.send_to(&buf[..n], from).await;
                                    }
                                }
                            });
                            upstream.insert(from, up.clone());
                            up
                        }
                    };
                    let _ = up.send(&buf[..n]).await;
                }
            }
        });
        Proxy { addr, cut, relayed, dropped, task }
    }

    fn relayed(&self) -> u64 {
        self.relayed.load(Relaxed)
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_writer_acknowledges_nothing_after_the_promotion_and_is_fenced_when_healed() {
    let _serial = serial();
    let mut c = Cluster::start(&[]).await;
    // The old writer reaches storage only through the proxies; everyone else directly.
    let mut proxies = Vec::new();
    for n in &c.volume.nodes {
        proxies.push(Proxy::start(n.addr.parse().expect("node address")).await);
    }
    let mut proxied = c.volume.clone();
    for (n, p) in proxied.nodes.iter_mut().zip(&proxies) {
        n.addr = p.addr.to_string();
    }
    let proxied_path = c.path().join("volume-proxied.toml");
    std::fs::write(&proxied_path, proxied.to_toml()).expect("write the proxied volume file");
    let mut w = c.start_writer_with_volume(&proxied_path, &[]).await;
    let client = c.client(c.writer_addr()).await;
    // Promotion by hand only: the old writer's heartbeats reach the replicas throughout.
    let (ra, rb) = two_replicas(&mut c, &["--failover-silence-ms", "0"]).await;
    let load = Load::start(&client, 4, 0);
    load.wait_more(300, REPLY_TIMEOUT).await;
    assert!(proxies.iter().all(|p| p.relayed() > 0), "the old writer talks to every node through its proxy");

    proxies.iter().for_each(|p| p.set_cut(true));
    let promote_sent = Instant::now();
    let p = promote(&c, ra.addr).await.expect("promote by hand");
    let promoted_at = Instant::now();
    eprintln!("promoted while the old writer is cut off: {p:?}");
    let writer = c.client(ra.addr).await;
    let lsn = writer.put(b"after-partition", b"v").await.expect("the new writer commits");
    assert!(lsn > p.vdl);
    // Cut off, the old writer cannot have heard of the new epoch: it still runs, and tries.
    assert!(w.child.as_mut().expect("old writer").try_wait().expect("poll").is_none(), "the partitioned writer is still running");
    let dropped: u64 = proxies.iter().map(Proxy::dropped).sum();
    assert!(dropped > 0, "the old writer's packets were dropped during the partition");

    proxies.iter().for_each(|p| p.set_cut(false));
    let status = w.wait_exit(REPLY_TIMEOUT).await;
    assert_eq!(status.code(), Some(writerd::EXIT_FENCED), "the healed old writer finds itself fenced and steps down");
    let (acked, errors) = load.finish_acks().await;
    assert!(!errors.is_empty(), "some calls were in flight at the partition: they must fail, not be acknowledged");

    // Nothing the old writer acknowledged lies above the VDL the new epoch recovered: every
    // ack was decided on storage acks from before the claim. (An ack's arrival time alone
    // proves nothing: one decided on storage acks that passed the proxies just before the
    // cut may reach the client after Promote returned; it is counted, not failed.)
    let before_promote = acked.iter().filter(|a| a.at < promote_sent).count();
    let arrived_after = acked.iter().filter(|a| a.at > promoted_at).count();
    eprintln!("{} acks: {before_promote} before Promote was sent, {arrived_after} arrived after it returned; {} errors", acked.len(), errors.len());
    let above: Vec<&Ack> = acked.iter().filter(|a| a.lsn > p.vdl).collect();
    assert!(above.is_empty(), "the old writer acknowledged commits above the new epoch's VDL {}: {:?}", p.vdl, &above[..above.len().min(5)]);
    check_after_failover(&c, &writer, &rb, &keys_of(&acked)).await;
}
