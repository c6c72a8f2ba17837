//! The writer through the real binaries: quorum commits on a six-node local
//! volume, storage nodes killed under load, a node that returns catching up,
//! epochs fencing an old writer, and reads served after a writer restart.

use std::time::Duration;

use borealis_net::api::{ApiClient, ApiError};
use redo_core::api::ApiErrorCode;
use redo_core::page::PageOp;
use redo_core::PgId;
use test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_and_transactions_commit_and_survive_a_writer_restart() {
    let metrics_addr = free_tcp_addr();
    let (mut c, mut w, client) = cluster_with_writer(&["--metrics-listen", &metrics_addr.to_string()]).await;

    let a = client.put(b"alpha", b"1").await.unwrap();
    let b = client.put(b"beta", b"2").await.unwrap();
    assert!(b > a, "commit LSNs increase");
    assert_eq!(client.get(b"alpha").await.unwrap().1.as_deref(), Some(&b"1"[..]));
    assert!(client.delete(b"alpha").await.unwrap() > b);
    assert_eq!(client.get(b"alpha").await.unwrap().1, None);
    // A transaction over keys on both PGs commits at its last record.
    let ops: Vec<PageOp> = (0..20u64).map(|i| PageOp::Put { key: key(i), value: value(i, 0) }).collect();
    let pgs: std::collections::BTreeSet<PgId> = ops.iter().map(|o| c.volume.pg_of(c.volume.page_of(o.key()))).collect();
    assert_eq!(pgs.len(), 2, "the transaction spans both PGs");
    let t = client.txn(ops).await.unwrap();
    let (read_lsn, v) = client.get(&key(7)).await.unwrap();
    assert_eq!(v, Some(value(7, 0)));
    assert!(read_lsn <= t);

    // The writer's metrics show the volume's progress and per-segment ack latency.
    let m = scrape(metrics_addr);
    assert!(metric(&m, "writerd_vdl") >= t.0 as f64, "{m}");
    assert!(metric(&m, "writerd_vcl") >= metric(&m, "writerd_vdl"));
    assert_eq!(metric(&m, "writerd_commits_total"), 4.0);
    assert!(metric(&m, "writerd_commit_latency_us_count") >= 4.0);
    assert!(m.contains("writerd_segment_ack_latency_us{pg=\"1\",node=\"6\",quantile=\"0.99\"}"), "{m}");
    assert!(m.contains("writerd_inflight_bytes "));

    // A clean stop, then a new writer with an empty cache: reads come from storage (GetPage@LSN).
    client.close();
    assert_eq!(w.stop().await.code(), Some(0));
    let _w2 = c.start_writer(None, &[]).await;
    let client = c.client(c.writer_addr()).await;
    assert_all_present(&client, &(0..20).collect::<Vec<_>>()).await;
    assert_eq!(client.get(b"beta").await.unwrap().1.as_deref(), Some(&b"2"[..]));
    assert_eq!(client.get(b"alpha").await.unwrap().1, None);
    // Writes to pages the new writer has not seen fetch them first, then chain onto them.
    let l = client.put(&key(3), b"new").await.unwrap();
    assert!(l > t);
    assert_eq!(client.get(&key(3)).await.unwrap().1.as_deref(), Some(&b"new"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_storage_nodes_killed_under_load_fail_no_commit() {
    let (mut c, mut w, client) = cluster_with_writer(&[]).await;
    let load = Load::start(&client, 8, 0);
    load.wait_more(300, REPLY_TIMEOUT).await;
    c.kill9(2);
    c.kill9(5); // one node in each of two AZs
    load.wait_more(1000, REPLY_TIMEOUT).await;
    let (acked, errors) = load.finish().await;
    assert!(errors.is_empty(), "commits failed with two of six nodes down: {errors:?}");
    // Read back through a new writer, whose empty cache reads every page from the four
    // surviving storage nodes: what was acknowledged is in storage, not just in memory.
    client.close();
    assert_eq!(w.stop().await.code(), Some(0));
    let _w2 = c.start_writer(None, &[]).await;
    assert_all_present(&c.client(c.writer_addr()).await, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_down_commits_wait_then_resume_and_a_returning_node_fills_its_hole() {
    let metrics_addr = free_tcp_addr();
    let (mut c, mut w, client) = cluster_with_writer(&["--metrics-listen", &metrics_addr.to_string()]).await;
    let load = Load::start(&client, 4, 0);
    load.wait_more(200, REPLY_TIMEOUT).await;
    let stall_line = "commits waiting: no write quorum";
    let before = w.log_text().matches(stall_line).count(); // a CPU hiccup may have logged one already
    for id in [1, 3, 6] {
        c.kill9(id);
    }
    // With three segments of six, no write quorum: commits wait, and the writer says why.
    w.wait_log_more(stall_line, before, REPLY_TIMEOUT).await;
    let stalled = load.count();
    // One put per PG: each PG then has a record newer than the kills, on the survivors only
    // (the load alone may be stalled on one PG, the other's newest record from before a kill).
    let keys: Vec<Vec<u8>> = (0..PGS)
        .map(|pg| (0..).map(|i| format!("during-outage-{i}").into_bytes()).find(|k| c.volume.pg_of(c.volume.page_of(k)).0 == pg).expect("a key"))
        .collect();
    let pending: Vec<_> = keys
        .iter()
        .map(|k| {
            let (client, k) = (client.clone(), k.clone());
            tokio::spawn(async move { client.put(&k, b"v").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await; // a window in which nothing may commit
    assert_eq!(load.count(), stalled, "a commit was acknowledged without a write quorum");
    assert!(pending.iter().all(|p| !p.is_finished()));
    // The metrics say why: no PG has a write quorum of current segments.
    let m = scrape(metrics_addr);
    for pg in 0..PGS {
        let line = m.lines().find(|l| l.starts_with(&format!("writerd_pg_segments_current{{pg=\"{pg}\"}}"))).expect("gauge");
        assert!(line.ends_with(" 3"), "{line}");
    }

    c.restart(3).await;
    let mut l = redo_core::Lsn::ZERO;
    for p in pending {
        l = l.max(match tokio::time::timeout(REPLY_TIMEOUT, p).await {
            Ok(r) => r.unwrap().unwrap(),
            Err(_) => panic!("the commit did not resume once node 3 returned; writer log:\n{}", w.log_text()),
        });
    }
    load.wait_more(300, REPLY_TIMEOUT).await;
    let (acked, errors) = load.finish().await;
    assert!(errors.is_empty(), "commits failed: {errors:?}");
    assert_all_present(&client, &acked).await;
    for k in &keys {
        assert_eq!(client.get(k).await.unwrap().1.as_deref(), Some(&b"v"[..]));
    }

    // The node that came back (it lost its unflushed tail on kill -9) is resent what it
    // missed: its SCL reaches everything the writer allocated, with no hole left.
    let ep = c.endpoint();
    let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
    for pg in 0..PGS {
        let pgl = c.volume.pgs[pg as usize].id;
        loop {
            let scl = c.scl(&ep, 3, PgId(pgl)).await;
            let best = live_max_scl(&c, &ep, PgId(pgl)).await;
            if scl.is_some() && scl == best && best.is_some_and(|b| b.0 > 0) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "node 3 pg{pg} SCL {scl:?} never reached {best:?} (commit {l})");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The highest SCL of `pg` among the live nodes.
async fn live_max_scl(c: &Cluster, ep: &quinn::Endpoint, pg: PgId) -> Option<redo_core::Lsn> {
    let mut best = None;
    for id in [2, 4, 5] {
        best = best.max(c.scl(ep, id, pg).await);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_writer_fences_the_old_one() {
    let (mut c, mut old, old_client) = cluster_with_writer(&[]).await;
    old_client.put(b"k", b"from-old").await.unwrap();

    let new_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _new = c.start_writer(Some(new_addr), &[]).await;
    // The old writer's next write meets the new epoch at storage and is refused; it steps down.
    match old_client.put(b"k", b"late").await {
        Err(ApiError::Refused { code: ApiErrorCode::Unavailable, .. }) | Err(ApiError::Lost(_)) => {}
        other => panic!("a deposed writer acknowledged a write: {other:?}"),
    }
    assert_eq!(old.wait_exit(REPLY_TIMEOUT).await.code(), Some(3));
    let new_client = c.client(new_addr).await;
    assert_eq!(new_client.get(b"k").await.unwrap().1.as_deref(), Some(&b"from-old"[..]));
    new_client.put(b"k", b"from-new").await.unwrap();
    assert_eq!(new_client.get(b"k").await.unwrap().1.as_deref(), Some(&b"from-new"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_evicted_pages_come_from_storage_at_the_page_lsn() {
    let metrics_addr = free_tcp_addr();
    // Room for a few of the 40 pages written: most reads are misses served by GetPage@LSN.
    let (_c, _w, client) = cluster_with_writer(&["--cache-bytes-max", "2KiB", "--metrics-listen", &metrics_addr.to_string()]).await;
    for round in 0..3 {
        for i in 0..40 {
            client.put(&key(i), &value(i, round)).await.unwrap();
        }
    }
    client.delete(&key(0)).await.unwrap();
    for i in 1..40 {
        assert_eq!(client.get(&key(i)).await.unwrap().1, Some(value(i, 2)), "key {i}");
    }
    assert_eq!(client.get(&key(0)).await.unwrap().1, None);
    let m = scrape(metrics_addr);
    assert!(metric(&m, "writerd_page_fetches_total") >= 30.0, "{m}");
    // Every write is durable: nothing holds the cache past its bound.
    assert!(metric(&m, "writerd_cache_bytes") <= 2048.0, "{m}");
    assert!(metric(&m, "writerd_cached_pages") >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lal_makes_new_transactions_wait_for_vdl() {
    let metrics_addr = free_tcp_addr();
    // Room for one 1000-record transaction above VDL at a time.
    let (_c, _w, client) = cluster_with_writer(&["--lal", "1024", "--metrics-listen", &metrics_addr.to_string()]).await;
    let txns: Vec<_> = (0..4u64)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                let ops = (0..1000).map(|i| PageOp::Put { key: key(t * 1000 + i), value: value(i, t) }).collect();
                client.txn(ops).await
            })
        })
        .collect();
    for t in txns {
        tokio::time::timeout(REPLY_TIMEOUT, t).await.expect("commits in time").unwrap().unwrap();
    }
    let m = scrape(metrics_addr);
    assert!(metric(&m, "writerd_lal_stalls_total") >= 1.0, "no transaction waited for LAL:\n{m}");
    assert_eq!(metric(&m, "writerd_commits_total"), 4.0);
    assert_eq!(client.get(&key(3999)).await.unwrap().1, Some(value(999, 3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_killed_while_segments_lag_is_replaced_and_every_segment_catches_up() {
    let (mut c, mut w, client) = cluster_with_writer(&[]).await;
    let load = Load::start(&client, 4, 0);
    load.wait_more(200, REPLY_TIMEOUT).await;
    // Two nodes freeze: commits go on with the other four, which get ahead of them.
    c.nodes[0].signal(libc::SIGSTOP);
    c.nodes[3].signal(libc::SIGSTOP);
    load.wait_more(300, REPLY_TIMEOUT).await;
    w.kill9();
    let (acked, _) = load.finish().await; // calls in flight at the kill fail: they were never acknowledged
    c.nodes[0].signal(libc::SIGCONT);
    c.nodes[3].signal(libc::SIGCONT);

    // The new writer recovers (VDL from the segments that answer, the tail above it
    // truncated), resends what the lagging segments lack, and goes on.
    let mut w2 = c.start_writer(None, &[]).await;
    w2.wait_log("recovery decided", REPLY_TIMEOUT).await;
    let client = c.client(c.writer_addr()).await;
    client.put(b"after-crash", b"v").await.unwrap();
    assert_all_present(&client, &acked).await;
    let ep = c.endpoint();
    let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
    for pg in 0..PGS {
        loop {
            let lagging = [c.scl(&ep, 1, PgId(pg)).await, c.scl(&ep, 4, PgId(pg)).await];
            let best = live_max_scl(&c, &ep, PgId(pg)).await;
            if lagging.iter().all(|&s| s.is_some() && s == best) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "pg{pg}: nodes 1 and 4 at {lagging:?}, others at {best:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_starting_at_once_never_both_commit() {
    let mut c = Cluster::start(&[]).await;
    let addrs: Vec<std::net::SocketAddr> = (0..2).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
    let mut writers: Vec<Proc> = addrs.iter().map(|a| c.spawn_writer(Some(*a), &[])).collect();
    // Each either becomes ready or gives up at start-up because the other claimed a newer epoch.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    let mut ready = Vec::new();
    for (w, addr) in writers.iter_mut().zip(&addrs) {
        loop {
            if w.log_text().contains("writerd ready") {
                ready.push(*addr);
                break;
            }
            if w.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                assert!(w.log_text().contains("another candidate claimed"), "{}", w.log_text());
                break;
            }
            assert!(std::time::Instant::now() < deadline, "writer neither ready nor gone:\n{}", w.log_text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(!ready.is_empty(), "neither writer started");
    // Both claims are done: only the newer epoch may commit. (The older writer may
    // already have met the newer epoch at storage and exited: it cannot be reached.)
    let mut committed = Vec::new();
    let ep = c.endpoint();
    for addr in &ready {
        let put = async {
            let client = ApiClient::connect(&ep, *addr).await?;
            client.put(b"race", addr.to_string().as_bytes()).await
        };
        if let Ok(Ok(_)) = tokio::time::timeout(REPLY_TIMEOUT, put).await {
            committed.push(*addr);
        }
    }
    assert_eq!(committed.len(), 1, "writers that acknowledged a write: {committed:?}");
    let survivor = c.client(committed[0]).await;
    assert_eq!(survivor.get(b"race").await.unwrap().1, Some(committed[0].to_string().into_bytes()));
}
