//! Replicas that start empty, through the real binaries: one killed with
//! SIGKILL under load and restarted on its address, a new one joining a
//! volume that already holds data, one started with no writer at all, and one started
//! with only a read quorum of segments up. Each learns VDL (from the writer, else storage), reads pages
//! with GetPage@LSN, pulls the log, and converges to the writer's values.

mod support;

use borealis_net::api::ApiClient;
use redo_core::page::PageOp;
use support::*;
use test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_restarts_and_catches_up() {
    let (mut c, _w, writer) = cluster_with_writer(&[]).await;
    let mut replica = c.start_replica(None, &[]).await;
    let load = Load::start(&writer, 6, 0);
    load.wait_more(1000, REPLY_TIMEOUT).await;
    let rc = c.client(replica.addr).await;
    tokio::time::timeout(REPLY_TIMEOUT, rc.get(&key(0))).await.expect("replica read in time").expect("replica read");

    replica.proc.kill9();
    load.wait_more(1000, REPLY_TIMEOUT).await;
    let replica = c.start_replica(Some(replica.addr), &[]).await;
    assert_started_empty_and_converges(&c, &replica, &writer, load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_joins_a_volume_with_data_and_converges() {
    let (mut c, _w, writer) = cluster_with_writer(&[]).await;
    let load = Load::start(&writer, 8, 0);
    load.wait_more(3000, 2 * REPLY_TIMEOUT).await;
    let replica = c.start_replica(None, &[]).await;
    assert_started_empty_and_converges(&c, &replica, &writer, load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_serves_without_any_writer() {
    let (mut c, mut w, writer) = cluster_with_writer(&[]).await;
    let load = Load::start(&writer, 4, 0);
    load.wait_more(2000, 2 * REPLY_TIMEOUT).await;
    let (acked, errors) = load.finish().await;
    assert!(errors.is_empty(), "commits failed: {errors:?}");
    // A transaction over both PGs, then one put on each PG after it: storage alone shows
    // a commit complete only once every PG has records beyond it.
    let ops: Vec<PageOp> = (0..8).map(|i| PageOp::Put { key: format!("both-{i}").into_bytes(), value: b"v".to_vec() }).collect();
    let both = writer.txn(ops).await.expect("transaction over both PGs");
    let mut tail = Vec::new();
    for pg in 0..PGS {
        let k = (0..).map(|i| format!("tail-{i}").into_bytes()).find(|k| c.volume.pg_of(c.volume.page_of(k)).0 == pg).expect("a key");
        tail.push((writer.put(&k, b"t").await.expect("tail put"), k));
    }
    writer.close();
    assert!(w.stop().await.success(), "writerd stops cleanly");

    // Storage alone: the replica learns where the volume stands, reads pages and the log.
    let replica = c.start_replica(None, &[]).await;
    let rc = c.client(replica.addr).await;
    let (at, _) = tokio::time::timeout(REPLY_TIMEOUT, rc.get_at(b"both-0", both)).await.expect("replica read in time").expect("replica read");
    assert!(at >= both, "read point {at} below the transaction {both}, which every PG has records after{}", diagnose(&replica));
    for i in 0..8 {
        let (_, v) = rc.get(format!("both-{i}").as_bytes()).await.expect("replica read");
        assert_eq!(v.as_deref(), Some(&b"v"[..]), "part of the transaction over both PGs is missing{}", diagnose(&replica));
    }
    for &i in &acked {
        let (_, v) = rc.get(&key(i)).await.expect("replica read");
        assert_eq!(v, Some(value(i, 0)), "key {i} without a writer{}", diagnose(&replica));
    }
    // The newest puts show exactly when the read point covers them.
    for (lsn, k) in &tail {
        let (at, v) = rc.get(k).await.expect("replica read");
        assert_eq!(v.is_some(), at >= *lsn, "tail put at {lsn} read at {at} shows {v:?}");
    }
}

/// With an AZ and one more storage node down (3 of each PG's 6 segments left) the writer
/// commits nothing more, yet a new replica starts, from the writer's VDL (storage alone
/// would need a write quorum of answers), and reads every acknowledged write from the read
/// quorum left. Once a fourth node is back, commits go on and the replica follows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_starts_and_reads_with_an_az_and_one_more_node_down() {
    let (mut c, _w, writer) = cluster_with_writer(&[]).await;
    let load = Load::start(&writer, 4, 0);
    load.wait_more(1000, REPLY_TIMEOUT).await;
    let (acked, errors) = load.finish().await;
    assert!(errors.is_empty(), "commits failed: {errors:?}");
    // az1 (nodes 1 and 2) and node 3.
    for id in [1, 2, 3] {
        c.kill9(id);
    }
    let replica = c.start_replica(None, &[]).await;
    let from_writer = replica.proc.log_text().lines().any(|l| l.contains("learned the volume's position") && l.contains("the writer"));
    assert!(from_writer, "the replica did not start from the writer's VDL{}", diagnose(&replica));
    let rc = c.client(replica.addr).await;
    for &i in &acked {
        let (_, v) = tokio::time::timeout(REPLY_TIMEOUT, rc.get(&key(i))).await.expect("replica read in time").expect("replica read");
        assert_eq!(v, Some(value(i, 0)), "key {i} with three segments of six{}", diagnose(&replica));
    }

    c.restart(1).await;
    let lsn = tokio::time::timeout(REPLY_TIMEOUT, writer.put(b"after", b"v")).await.expect("commit in time").expect("a write quorum is back");
    let (at, v) = tokio::time::timeout(REPLY_TIMEOUT, rc.get_at(b"after", lsn)).await.expect("replica read in time").expect("replica read");
    assert!(at >= lsn);
    assert_eq!(v.as_deref(), Some(&b"v"[..]));
}

/// The writer's GC horizon follows the slowest reader: it moves once the replica
/// reported its read point, never passes it, and rides on the frames to storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gc_horizon_follows_the_replica_read_point_to_storage() {
    let mut c = Cluster::start_with(ClusterSpec { node_metrics: true, ..ClusterSpec::default() }).await;
    let writer_metrics = free_tcp_addr();
    let _w = c.start_writer(None, &["--gc-reader-grace-ms", "200", "--metrics-listen", &writer_metrics.to_string()]).await;
    let writer = c.client(c.writer_addr()).await;
    let replica = c.start_replica(None, &[]).await;
    let load = Load::start(&writer, 4, 0);
    load.wait_more(500, REPLY_TIMEOUT).await;
    let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
    let horizon = loop {
        let text = scrape(writer_metrics);
        let (horizon, readers) = (metric(&text, "writerd_gc_horizon"), metric(&text, "writerd_gc_readers"));
        if horizon > 0.0 {
            assert_eq!(readers, 1.0, "the replica's feed is the one reader");
            break horizon;
        }
        assert!(std::time::Instant::now() < deadline, "the GC horizon never moved");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let applied = metric(&replica.scrape(), "replicad_applied_vdl");
    assert!(horizon <= applied, "horizon {horizon} passed the replica's read point {applied}");
    load.wait_more(200, REPLY_TIMEOUT).await;
    let (_, errors) = load.finish().await;
    assert!(errors.is_empty(), "commits failed: {errors:?}");
    let series = "storaged_segment_gc_horizon{node=\"1\",pg=\"0\"}";
    assert!(metric(&scrape(c.node_metrics(1)), series) > 0.0, "node 1 never heard a horizon");
}

/// For a replica started empty while `load` runs: it serves a write committed before it
/// started, then, once the load stops, every acknowledged key as the writer has it, having
/// read pages from storage.
async fn assert_started_empty_and_converges(c: &Cluster, replica: &Replica, writer: &ApiClient, load: Load) {
    let rc = c.client(replica.addr).await;
    let (at, v) = tokio::time::timeout(REPLY_TIMEOUT, rc.get(&key(0))).await.expect("replica read in time").expect("replica read");
    assert_eq!(v, Some(value(0, 0)), "the replica at {at} misses a write committed before it started{}", diagnose(replica));
    load.wait_more(1000, REPLY_TIMEOUT).await;
    let (acked, errors) = load.finish().await;
    assert!(errors.is_empty(), "commits failed: {errors:?}");

    let keys: Vec<Vec<u8>> = acked.iter().map(|&i| key(i)).collect();
    assert_converges(c, replica, writer, &keys).await;
    assert!(metric(&replica.scrape(), "replicad_page_fetches_total") > 0.0, "the replica read no page from storage");
}
