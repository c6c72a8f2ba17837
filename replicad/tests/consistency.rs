//! The read replica through the real binaries, on a six-node local volume
//! with a writer under load: it converges to the writer's state (also with a
//! page cache much smaller than the volume), never
//! answers above VDL nor shows half a transaction (also while VDL stands
//! still with records above it in storage), and with a tiny buffer it lags
//! behind, stays consistent, and catches up.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use redo_core::page::PageOp;
use redo_core::{Lsn, PgId};
use support::*;
use test_support::*;

/// How long a replica may take to reach VDL with three of six nodes frozen: pulls sent to
/// frozen nodes time out one after the other (5 s each) before a live node is asked.
const FROZEN_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_under_load_ends_with_the_writers_values() {
    let (mut c, _w, writer) = cluster_with_writer(&[]).await;
    // Room for about a tenth of the volume's pages: pages are evicted while records apply,
    // and read back from storage.
    let replica = c.start_replica(None, &["--cache-bytes-max", "64KiB"]).await;
    let rc = c.client(replica.addr).await;
    let writer_vdl = Arc::new(ReadPoint::follow(&writer).await);
    let feed = FeedBelowVdl::start(&rc, &writer, writer_vdl.clone()).await;

    let load = Load::start(&writer, 8, 0);
    // While the load runs, applied records are retained until a flush quorum passes them.
    let (mut retained_bytes_max, deadline) = (0.0f64, Instant::now() + REPLY_TIMEOUT);
    while load.count() < 3000 {
        retained_bytes_max = retained_bytes_max.max(metric(&replica.scrape(), "replicad_retained_bytes"));
        assert!(Instant::now() < deadline, "only {} commits within {REPLY_TIMEOUT:?}", load.count());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (acked, errors) = load.finish().await;
    assert!(errors.is_empty(), "commits failed: {errors:?}");

    let keys: Vec<Vec<u8>> = acked.iter().map(|&i| key(i)).collect();
    let vdl = assert_converges(&c, &replica, &writer, &keys).await;
    let reports = feed.finish().unwrap_or_else(|e| panic!("{e}{}", diagnose(&replica)));
    assert!(reports > 1, "the replica's feed reported {reports} times during the load");

    let m = replica.scrape();
    assert_eq!(metric(&m, "replicad_applied_vdl"), vdl.0 as f64, "{}", diagnose(&replica));
    assert_eq!(metric(&m, "replicad_writer_vdl"), vdl.0 as f64, "{}", diagnose(&replica));
    assert!(metric(&m, "replicad_pulls_total") > 0.0);
    assert!(metric(&m, "replicad_reads_total") >= keys.len() as f64);
    assert!(metric(&m, "replicad_cache_bytes") <= 65536.0, "{m}");
    let pages = c.volume.page_count as f64;
    assert!(metric(&m, "replicad_page_fetches_total") > pages, "no page was fetched again after its eviction:\n{m}");
    assert!(retained_bytes_max > 0.0, "no applied record was ever retained waiting for its flush");
    // With the writes stopped, storage flushes everything: the replica lets go of what it kept.
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let m = replica.scrape();
        if metric(&m, "replicad_flushed_lsn") >= vdl.0 as f64 && metric(&m, "replicad_retained_bytes") == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "retained records not released after the flush{}", diagnose(&replica));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_reads_never_pass_vdl_nor_show_half_a_transaction() {
    let (mut c, mut w, writer) = cluster_with_writer(&[]).await;
    let replica = c.start_replica(None, &[]).await;
    let rc = c.client(replica.addr).await;
    let writer_vdl = Arc::new(ReadPoint::follow(&writer).await);
    let load = Load::start(&writer, 4, 0);
    let accounts = Accounts::start(&c.volume, &writer, &rc, writer_vdl.clone(), 3, 3);
    accounts.wait_transfers(300, REPLY_TIMEOUT).await;
    let (acked, errors) = load.finish().await;
    assert!(errors.is_empty(), "commits failed: {errors:?}");

    // The probe's pages are cached (reads while frozen do not depend on which node a fetch picks).
    let probe_keys = [key_on_pg(&c.volume, "probe", PgId(0)), key_on_pg(&c.volume, "probe", PgId(1))];
    for k in &probe_keys {
        tokio::time::timeout(REPLY_TIMEOUT, rc.get(k)).await.expect("replica read in time").expect("replica read");
    }

    // Three nodes freeze: no write quorum, so VDL stands still while the records of the
    // transactions in flight (and of a probe spanning both PGs) reach the other three.
    let stall_line = "commits waiting: no write quorum";
    let before = w.log_text().matches(stall_line).count();
    let frozen_at = Instant::now();
    for id in [1, 3, 6] {
        c.nodes[id - 1].signal(libc::SIGSTOP);
    }
    w.wait_log_more(stall_line, before, REPLY_TIMEOUT).await;
    let frozen = read_point(&writer).await;
    let probe = tokio::spawn({
        let (writer, ops) = (writer.clone(), probe_keys.iter().map(|k| PageOp::Put { key: k.clone(), value: b"probe".to_vec() }).collect());
        async move { writer.txn(ops).await }
    });
    let ep = c.endpoint();
    let deadline = Instant::now() + REPLY_TIMEOUT;
    'above: loop {
        for pg in 0..PGS {
            for id in [2, 4, 5] {
                if c.scl(&ep, id, PgId(pg)).await.is_some_and(|scl| scl > frozen) {
                    break 'above;
                }
            }
        }
        assert!(Instant::now() < deadline, "no live segment got records above VDL {frozen}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every record up to VDL is on one of the three live nodes at least: the replica gets
    // there (reads go on with three of six segments), and no further.
    let mut applied = ReadPoint::follow(&rc).await;
    let started = Instant::now();
    applied.wait_for(frozen, FROZEN_CATCH_UP_TIMEOUT, || format!("the replica did not reach VDL with three of six nodes frozen{}", diagnose(&replica))).await;
    eprintln!("with three nodes frozen the replica reached VDL {frozen} in {:?}", started.elapsed());
    for k in probe_keys.iter().chain(&(0..ACCOUNTS).map(|a| account_key(0, a)).collect::<Vec<_>>()) {
        let (at, v) = tokio::time::timeout(REPLY_TIMEOUT, rc.get(k)).await.expect("replica read in time").expect("replica read");
        assert_eq!(at, frozen, "the replica read {} at {at}, with the writer's VDL frozen at {frozen}", String::from_utf8_lossy(k));
        assert!(v.as_deref() != Some(&b"probe"[..]), "the replica shows an uncommitted write");
    }
    assert_eq!(metric(&replica.scrape(), "replicad_applied_vdl"), frozen.0 as f64, "{}", diagnose(&replica));
    assert_eq!(applied.now(), frozen);
    assert_eq!(read_point(&writer).await, frozen, "VDL moved with three nodes frozen: the checks above prove less");
    eprintln!("nodes frozen for {:?}", frozen_at.elapsed());
    for id in [1, 3, 6] {
        c.nodes[id - 1].signal(libc::SIGCONT);
    }

    let probed = tokio::time::timeout(TRANSFER_TIMEOUT, probe).await.expect("the probe commits once the nodes thaw").unwrap().unwrap();
    accounts.wait_transfers(300, REPLY_TIMEOUT).await;
    let (rc_at, v) = tokio::time::timeout(REPLY_TIMEOUT, rc.get_at(&probe_keys[1], probed)).await.expect("replica read in time").expect("replica read");
    assert!(rc_at >= probed && v.as_deref() == Some(&b"probe"[..]));
    let report = accounts.finish().await.unwrap_or_else(|e| panic!("{e}{}", diagnose(&replica)));
    eprintln!("{report:?}");
    assert!(report.read_points > 10, "the replica's read point hardly moved: {report:?}");

    let mut keys: Vec<Vec<u8>> = acked.iter().map(|&i| key(i)).collect();
    keys.extend((0..3).flat_map(|g| (0..ACCOUNTS).map(move |a| account_key(g, a))));
    keys.extend(probe_keys);
    assert_converges(&c, &replica, &writer, &keys).await;
}

/// Values of 4 KiB: a 64 KiB buffer holds a handful of records.
fn big_value(i: u64) -> Vec<u8> {
    let mut v = value(i, 0);
    v.resize(4096, b'.');
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_tiny_buffer_lags_consistently_then_catches_up() {
    let (mut c, _w, writer) = cluster_with_writer(&[]).await;
    let replica = c.start_replica(None, &["--buffer-bytes-max", "64KiB"]).await;
    let rc = c.client(replica.addr).await;
    let writer_vdl = Arc::new(ReadPoint::follow(&writer).await);
    let load = Load::start_values(&writer, 8, 0, big_value);
    let accounts = Accounts::start(&c.volume, &writer, &rc, writer_vdl.clone(), 1, 1);

    let buffer_bytes_max = metric(&replica.scrape(), "replicad_buffer_bytes_max");
    assert_eq!(buffer_bytes_max, 65536.0);
    // The buffer may be exceeded by one transaction plus one record at most: here
    // each is one 4 KiB value and a few headers.
    let txn_bytes_max = 2.0 * 4200.0;
    let (mut lag_max, mut samples) = (0u64, 0);
    let deadline = Instant::now() + 2 * REPLY_TIMEOUT;
    loop {
        let writer_at = writer_vdl.now();
        let m = replica.scrape();
        let applied = metric(&m, "replicad_applied_vdl") as u64;
        lag_max = lag_max.max(writer_at.0.saturating_sub(applied));
        let held = metric(&m, "replicad_retained_bytes") + metric(&m, "replicad_pending_bytes");
        assert!(held <= buffer_bytes_max + txn_bytes_max, "the replica holds {held} bytes, beyond its buffer{}", diagnose(&replica));
        samples += 1;
        if load.count() >= 2000 && metric(&m, "replicad_backpressure_total") > 0.0 && lag_max > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {} commits: backpressure {}, largest lag seen {lag_max}{}",
            load.count(),
            metric(&m, "replicad_backpressure_total"),
            diagnose(&replica)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("largest lag behind the writer: {lag_max} LSNs in {samples} samples");
    let (acked, errors) = load.finish().await;
    assert!(errors.is_empty(), "commits failed: {errors:?}");
    let report = accounts.finish().await.unwrap_or_else(|e| panic!("{e}{}", diagnose(&replica)));
    eprintln!("{report:?}");
    assert!(report.reads > 0);

    let mut keys: Vec<Vec<u8>> = acked.iter().map(|&i| key(i)).collect();
    keys.extend((0..ACCOUNTS).map(|a| account_key(0, a)));
    let vdl = assert_converges(&c, &replica, &writer, &keys).await;
    assert!(vdl > Lsn::ZERO);
}
