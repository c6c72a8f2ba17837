//! Replicas that start empty, through the real binaries: one killed with
//! SIGKILL under load and restarted on its address, and a new one joining a
//! volume that already holds data. Each learns VDL from storage, reads pages
//! with GetPage@LSN, pulls the log, and converges to the writer's values.

#[path = "../../writerd/tests/common/mod.rs"]
mod common;
mod support;

use borealis_net::api::ApiClient;
use common::*;
use support::*;

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
