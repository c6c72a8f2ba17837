//! The replica's client API through the real binaries: read-your-writes with
//! a commit LSN, a read point that never comes refused with Timeout, writes
//! refused, and bad input refused without disturbing other clients.

mod support;

use std::time::{Duration, Instant};

use borealis_net::api::{ApiClient, ApiError};
use redo_core::api::{ApiErrorCode, Request, Response};
use redo_core::page::{PageOp, KEY_BYTES_MAX};
use redo_core::Lsn;
use support::*;
use test_support::*;

const READ_WAIT_MS: u64 = 300;

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(REPLY_TIMEOUT, f).await.unwrap_or_else(|_| panic!("{what}: no reply in {REPLY_TIMEOUT:?}"))
}

fn refused_with<T: std::fmt::Debug>(r: Result<T, ApiError>, code: ApiErrorCode) -> String {
    match r {
        Err(ApiError::Refused { code: c, message }) if c == code => message,
        other => panic!("expected a {code:?} refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reads_your_writes_refuses_what_it_cannot_serve_and_writes() {
    let (mut c, _w, writer) = cluster_with_writer(&[]).await;
    let wait_ms = READ_WAIT_MS.to_string();
    let replica = c.start_replica(None, &["--read-wait-ms", &wait_ms]).await;
    let rc = c.client(replica.addr).await;

    // Right after each commit, a read at its LSN sees it (the replica waits to apply it).
    let mut last = Lsn::ZERO;
    for round in 0..100 {
        let k = key(round % 10);
        let lsn = within("put", writer.put(&k, &value(round, round))).await.unwrap();
        let (at, v) = within("replica read", rc.get_at(&k, lsn)).await.unwrap_or_else(|e| panic!("read of commit {lsn}: {e}{}", diagnose(&replica)));
        assert!(at >= lsn, "asked to read at {lsn} or later, read at {at}");
        assert_eq!(v, Some(value(round, round)), "round {round}: the replica at {at} does not show the write committed at {lsn}");
        last = lsn;
    }
    let deleted = within("delete", writer.delete(&key(3))).await.unwrap();
    assert_eq!(within("replica read", rc.get_at(&key(3), deleted)).await.unwrap().1, None);
    let ops: Vec<PageOp> = (100..120).map(|i| PageOp::Put { key: key(i), value: value(i, 0) }).collect();
    let t = within("txn", writer.txn(ops)).await.unwrap();
    for i in 100..120 {
        assert_eq!(within("replica read", rc.get_at(&key(i), t)).await.unwrap().1, Some(value(i, 0)));
    }
    let at = within("replica feed", read_point(&rc)).await;
    assert!(at >= t && at > last, "the replica's feed reports {at} after reads at {t}");

    // A read point that never comes: Timeout after --read-wait-ms, and meanwhile and
    // afterwards the replica serves other reads on the same connection.
    let far = Lsn(1 << 62);
    let started = Instant::now();
    let waiting = tokio::spawn({
        let rc = rc.clone();
        async move { rc.get_at(&key(1), far).await }
    });
    assert_eq!(within("replica read", rc.get_at(&key(100), t)).await.unwrap().1, Some(value(100, 0)));
    let message = refused_with(within("read at a far LSN", waiting).await.unwrap(), ApiErrorCode::Timeout);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(READ_WAIT_MS) && waited < Duration::from_millis(READ_WAIT_MS) + Duration::from_secs(3),
        "Timeout after {waited:?} with --read-wait-ms {READ_WAIT_MS}: {message}"
    );
    let crowd: Vec<_> = (0..50)
        .map(|i| {
            let rc = rc.clone();
            tokio::spawn(async move { rc.get_at(&key(i), far).await })
        })
        .collect();
    for r in crowd {
        refused_with(within("read at a far LSN", r).await.unwrap(), ApiErrorCode::Timeout);
    }
    let fresh = within("put", writer.put(b"after-timeouts", b"v")).await.unwrap();
    assert_eq!(within("replica read", rc.get_at(b"after-timeouts", fresh)).await.unwrap().1.as_deref(), Some(&b"v"[..]));

    // Writes go to the writer: a replica refuses them and writes nothing.
    refused_with(within("put to replica", rc.put(b"on-replica", b"v")).await, ApiErrorCode::Unavailable);
    refused_with(within("delete on replica", rc.delete(&key(5))).await, ApiErrorCode::Unavailable);
    let two = vec![PageOp::Put { key: b"on-replica".to_vec(), value: b"v".to_vec() }, PageOp::Delete { key: key(6) }];
    refused_with(within("txn on replica", rc.txn(two)).await, ApiErrorCode::Unavailable);
    let after = within("put", writer.put(b"marker", b"m")).await.unwrap();
    assert_eq!(within("replica read", rc.get_at(b"on-replica", after)).await.unwrap().1, None);
    assert!(within("replica read", rc.get_at(&key(5), after)).await.unwrap().1.is_some());
    assert_eq!(within("writer read", writer.get(b"on-replica")).await.unwrap().1, None);
    assert!(metric(&replica.scrape(), "replicad_reads_total") >= 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_to_a_replica_is_refused_and_others_are_still_served() {
    let (mut c, _w, writer) = cluster_with_writer(&[]).await;
    let replica = c.start_replica(None, &[]).await;
    let good = c.client(replica.addr).await;
    let mut feed = within("follow", good.follow()).await.unwrap();
    within("progress", feed.next()).await.unwrap();
    let lsn = within("put", writer.put(b"k", b"v")).await.unwrap();

    // A request breaking a limit is refused, and its stream goes on.
    match within("oversized key", good.call(&Request::Get { key: vec![b'k'; KEY_BYTES_MAX + 1], min_lsn: Lsn::ZERO })).await {
        Ok(Response::Error { code: ApiErrorCode::Invalid, message }) => assert!(message.contains("key of"), "{message}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    // A get whose key length runs past the frame is malformed: that stream closes.
    let short = c.client(replica.addr).await;
    let mut frame = Vec::new();
    Request::Get { key: b"abc".to_vec(), min_lsn: Lsn::ZERO }.encode(5, &mut frame);
    frame[4 + 1 + 8] = 200;
    match within("malformed get", short.call_raw(5, frame)).await {
        Err(ApiError::Lost(message)) => assert!(message.contains("Malformed"), "{message}"),
        other => panic!("expected Malformed, got {other:?}"),
    }
    assert!(within("read on a refused stream", short.get(b"k")).await.is_err(), "the refused stream is closed");
    assert_bad_frames_refused(&c, replica.addr).await;

    // A client without a cluster certificate reads nothing.
    let outsider = match ApiClient::connect(&foreign_endpoint(&c), replica.addr).await {
        Err(_) => None,
        Ok(cl) => Some(within("outsider read", cl.get(b"k")).await),
    };
    assert!(outsider.as_ref().is_none_or(|r| r.is_err()), "a client without a cluster certificate was served: {outsider:?}");

    // The well-behaved client and its feed are still served, as are new ones.
    assert_eq!(within("replica read", good.get_at(b"k", lsn)).await.unwrap().1.as_deref(), Some(&b"v"[..]));
    let next = within("put", writer.put(b"k", b"w")).await.unwrap();
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while within("progress", feed.next()).await.unwrap().vdl < next {
        assert!(Instant::now() < deadline, "the feed stopped before {next}");
    }
    let other = c.client(replica.addr).await;
    assert_eq!(within("replica read", other.get_at(b"k", next)).await.unwrap().1.as_deref(), Some(&b"w"[..]));
}
