//! Failover through the real binaries: the writer is killed under load, a
//! replica takes over (by itself, or when told), no acknowledged commit is
//! lost, and the other replica ends up with the new writer's state.

mod support;

use std::time::Instant;

use redo_core::api::{Request, Response};
use support::*;
use test_support::*;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_promoted_at_once_end_with_one_writer() {
    let (mut c, mut w, client) = cluster_with_writer(&[]).await;
    let (ra, rb) = two_replicas(&mut c, &["--failover-silence-ms", "0"]).await;
    let load = Load::start(&client, 4, 0);
    load.wait_more(200, REPLY_TIMEOUT).await;
    // Stopped first: calls in flight at a kill -9 would wait for the connection's idle timeout.
    let (acked, _) = load.finish().await;
    w.kill9();

    // Both connected first, so that the two Promote calls leave together.
    let (a, b) = (c.client(ra.addr).await, c.client(rb.addr).await);
    let (pa, pb) = tokio::join!(a.call(&Request::Promote), b.call(&Request::Promote));
    let won = |r: &Result<Response, _>| matches!(r, Ok(Response::Promoted(_)));
    assert!(won(&pa) != won(&pb), "exactly one promotion must win: {pa:?} / {pb:?}");
    let (winner, loser, p, refusal) = match (pa, pb) {
        (Ok(Response::Promoted(p)), other) => (&ra, &rb, p, other),
        (other, Ok(Response::Promoted(p))) => (&rb, &ra, p, other),
        _ => unreachable!("checked above"),
    };
    eprintln!("winner {} at {:?}; the other answered {refusal:?}", winner.addr, p.epoch);

    let (wr, lr) = (role_of(&c, winner.addr).await, role_of(&c, loser.addr).await);
    assert!(wr.writer && wr.epoch == p.epoch, "the winner is the writer at its epoch: {wr:?}");
    assert!(!lr.writer, "the loser is still a replica: {lr:?}");
    assert_eq!(metric(&loser.scrape(), "replicad_promoted_us"), 0.0);

    // The loser keeps serving as a replica, following the winner.
    let writer = c.client(winner.addr).await;
    let lsn = writer.put(b"after-race", b"v").await.expect("the winner commits");
    let other_client = c.client(loser.addr).await;
    let (_, v) =
        tokio::time::timeout(REPLY_TIMEOUT, other_client.get_at(b"after-race", lsn)).await.expect("read in time").expect("the loser reads the winner's commit");
    assert_eq!(v.as_deref(), Some(&b"v"[..]));
    assert!(other_client.put(b"to-the-loser", b"v").await.is_err(), "the loser takes no writes");
    check_after_failover(&c, &writer, loser, &acked).await;
}
