//! Failover through the real binaries: the writer is killed under load, a
//! replica takes over (by itself, or when told), no acknowledged commit is
//! lost, and the other replica ends up with the new writer's state.

#[path = "../../writerd/tests/common/mod.rs"]
mod common;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use borealis_net::api::ApiClient;
use common::*;
use redo_core::api::{Request, Response, Role};
use support::*;

/// The writer a client finds among `addrs`, waiting up to `timeout` for one to answer `Role` as writer.
async fn wait_writer(c: &Cluster, addrs: &[SocketAddr], timeout: Duration) -> (SocketAddr, Role) {
    let deadline = Instant::now() + timeout;
    let ep = c.endpoint();
    loop {
        for &addr in addrs {
            let ask = async {
                let client = ApiClient::connect(&ep, addr).await.ok()?;
                match client.call(&Request::Role).await {
                    Ok(Response::RoleIs(r)) if r.writer => Some(r),
                    _ => None,
                }
            };
            if let Ok(Some(role)) = tokio::time::timeout(Duration::from_millis(500), ask).await {
                return (addr, role);
            }
        }
        assert!(Instant::now() < deadline, "no writer among {addrs:?} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two replicas that know each other, `--priority` 1 and 0.
async fn two_replicas(c: &mut Cluster, extra: &[&str]) -> (Replica, Replica) {
    let (a, b): (SocketAddr, SocketAddr) = (format!("127.0.0.1:{}", free_udp_port()).parse().unwrap(), format!("127.0.0.1:{}", free_udp_port()).parse().unwrap());
    let (pa, pb) = (b.to_string(), a.to_string());
    let mut args_a = vec!["--peers", &pa, "--priority", "1"];
    args_a.extend(extra);
    let mut args_b = vec!["--peers", &pb, "--priority", "0"];
    args_b.extend(extra);
    let ra = c.start_replica(Some(a), &args_a).await;
    let rb = c.start_replica(Some(b), &args_b).await;
    (ra, rb)
}

/// Every acknowledged key reads back from `writer`, and `replica` (following it) converges to it.
async fn check_after_failover(c: &Cluster, writer: &ApiClient, replica: &Replica, acked: &[u64]) {
    assert_all_present(writer, acked).await;
    let keys: Vec<Vec<u8>> = acked.iter().map(|&i| key(i)).collect();
    assert_converges(c, replica, writer, &keys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_writer_is_replaced_by_the_best_replica_without_losing_a_commit() {
    let (mut c, mut w, client) = cluster_with_writer(&[]).await;
    let (ra, rb) = two_replicas(&mut c, &["--failover-silence-ms", "300"]).await;
    let load = Load::start(&client, 4, 0);
    load.wait_more(300, REPLY_TIMEOUT).await;
    let killed = Instant::now();
    w.kill9();
    let (acked, _) = load.finish().await; // calls in flight at the kill fail: never acknowledged
    assert!(acked.len() >= 300);

    // One replica (either may be the best: equal read points go to priority) promotes by itself.
    let (addr, role) = wait_writer(&c, &[ra.addr, rb.addr], READY_TIMEOUT).await;
    let detected = killed.elapsed();
    let (promoted, other) = if addr == ra.addr { (&ra, &rb) } else { (&rb, &ra) };
    assert!(role.epoch.generation() >= 2, "a new epoch was claimed: {:?}", role.epoch);
    let writer = c.client(addr).await;
    let lsn = writer.put(b"after-failover", b"v").await.expect("the new writer commits");
    assert!(lsn > role.vdl, "the new writer allocates above its recovered VDL: {lsn} <= {}", role.vdl);
    eprintln!("kill to a writer answering: {detected:?}");
    check_after_failover(&c, &writer, other, &acked).await;
    assert!(metric(&promoted.scrape(), "replicad_promoted_us") > 0.0);
    // The other replica follows the new writer: it serves the post-failover write.
    let other_client = c.client(other.addr).await;
    let (_, v) = other_client.get_at(b"after-failover", lsn).await.expect("the other replica reads the new writer's commit");
    assert_eq!(v.as_deref(), Some(&b"v"[..]));
    assert!(read_point(&other_client).await >= lsn);
    // Only one promoted.
    assert_eq!(metric(&other.scrape(), "replicad_promoted_us"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_by_hand_fences_a_live_writer() {
    let (mut c, mut w, client) = cluster_with_writer(&[]).await;
    let r = c.start_replica(None, &["--failover-silence-ms", "0"]).await;
    let load = Load::start(&client, 4, 0);
    load.wait_more(200, REPLY_TIMEOUT).await;
    // Promote while the writer still runs: the new epoch fences it.
    let admin = c.client(r.addr).await;
    let p = match admin.call(&Request::Promote).await.expect("promote") {
        Response::Promoted(p) => p,
        other => panic!("expected Promoted, got {other:?}"),
    };
    assert!(p.total_us > 0 && p.claim_us > 0);
    let status = w.wait_exit(REPLY_TIMEOUT).await;
    assert_eq!(status.code(), Some(writerd::EXIT_FENCED), "the old writer steps down");
    let (acked, _) = load.finish().await;
    // Every commit the old writer acknowledged is at or below the new VDL, and present.
    let writer = c.client(r.addr).await;
    assert_all_present(&writer, &acked).await;
    writer.put(b"after-promotion", b"v").await.expect("the promoted replica commits");
    // A second promote is answered with the first one's outcome.
    match admin.call(&Request::Promote).await.expect("promote again") {
        Response::Promoted(again) => assert_eq!(again, p),
        other => panic!("expected Promoted, got {other:?}"),
    }
}
