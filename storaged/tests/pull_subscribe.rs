//! Pulls (from memory and from disk) and subscriptions.

mod common;

use common::*;
use redo_core::wire::SegmentPosition;
use redo_core::{Epoch, Lsn, PgId};

/// Asserts `records` are exactly the sent records in `(after, upto]`, in order, byte for byte.
fn assert_exact(records: &[Pulled], chain: &Chain, after: Lsn, upto: Lsn) {
    let pulled: Vec<Lsn> = records.iter().map(|r| r.header.lsn).collect();
    let expected: Vec<Lsn> = chain.sent.range(Lsn(after.0 + 1)..=upto).map(|(l, _)| *l).collect();
    assert_eq!(pulled, expected, "pull ({after}, {upto}]");
    for r in records {
        assert_eq!(&r.bytes, &chain.sent[&r.header.lsn], "record {} changed", r.header.lsn);
    }
}

#[tokio::test]
async fn subscription_and_pulls_from_memory_and_disk() {
    const RECORDS: usize = 3000;
    let env = TestEnv::new();
    // A 4 KiB read cache: all but the last few records must come from disk.
    let launch = env.launch(&[0, 1], &["--cache-bytes-max", "4096"]);
    let mut node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;

    let mut sub = conn.subscribe(vec![PgId(0), PgId(1)], true).await.expect("subscribe");
    let mut chain = Chain::new(0, 500);
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    for _ in 0..RECORDS / 10 {
        let b = chain.batch(10);
        tx.send(Epoch(1), PgId(0), &b.bytes).await.expect("send");
        let (pos, last) = timely("ack", rx.recv()).await.expect("ack");
        assert_eq!((pos.scl, last), (b.last_lsn(), b.last_lsn()));
    }
    let last = chain.last_lsn;

    // Notifications: per segment, positions never go back and flushed_lsn
    // never passes scl; pg 0 reaches the last LSN in both.
    let mut seen = [SegmentPosition::default(); 2];
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    while seen[0].scl < last || seen[0].flushed_lsn < last {
        let p = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("notifications stopped at {:?}, appended up to {last}", seen[0]))
            .expect("notification");
        let s = &mut seen[p.pg.0 as usize];
        assert!(p.scl >= s.scl && p.flushed_lsn >= s.flushed_lsn, "position went back: {s:?} -> {p:?}");
        assert!(p.flushed_lsn <= p.scl, "{p:?}");
        assert!(p.scl <= last, "{p:?}");
        *s = p;
    }
    assert_eq!(seen[1], SegmentPosition { pg: PgId(1), scl: Lsn::ZERO, flushed_lsn: Lsn::ZERO }, "pg 1 reported its (empty) position");
    // A late subscriber gets the current position at once.
    let p = wait_position(&conn, 0, "late subscriber", |_| true).await;
    assert_eq!((p.scl, p.flushed_lsn), (last, last));

    // The whole log in small replies: mostly from disk, the tail from memory.
    let (records, pos) = pull_all(&conn, 0, Lsn::ZERO, last, 8 << 10).await;
    assert_eq!((pos.scl, pos.flushed_lsn), (last, last));
    assert_chain(&records, Lsn::ZERO);
    assert_exact(&records, &chain, Lsn::ZERO, last);

    // Ranges that start mid-file (the disk index seeks), end short of SCL,
    // lie wholly in the cache, or ask beyond SCL.
    let lsns: Vec<Lsn> = chain.sent.keys().copied().collect();
    let ranges = [
        (lsns[1234], lsns[2345]),
        (lsns[0], lsns[1]),
        (lsns[RECORDS - 3], last),
        (lsns[RECORDS - 2], Lsn(last.0 + 1000)),
        (Lsn(lsns[500].0 + 1), lsns[600]), // `after` between two records of the segment
    ];
    for (after, upto) in ranges {
        let (records, _) = pull_all(&conn, 0, after, upto, 64 << 10).await;
        assert_exact(&records, &chain, after, upto.min(last));
    }
    // Nothing above SCL; nothing from an empty segment.
    let r = timely("pull above scl", conn.pull(PgId(0), last, Lsn(u64::MAX), 1 << 20)).await.expect("pull");
    assert!(r.records.is_empty() && r.last_lsn == last);
    let r = timely("pull empty pg", conn.pull(PgId(1), Lsn::ZERO, Lsn(u64::MAX), 1 << 20)).await.expect("pull");
    assert!(r.records.is_empty() && r.last_lsn == Lsn::ZERO);

    // A single reply respects bytes_max (but carries at least one record).
    let r = timely("small pull", conn.pull(PgId(0), Lsn::ZERO, last, 1)).await.expect("pull");
    assert_eq!(redo_core::record::Records::new(&r.records, 0).count(), 1);
    let r = timely("bounded pull", conn.pull(PgId(0), Lsn::ZERO, last, 16 << 10)).await.expect("pull");
    assert!(r.records.len() <= 16 << 10 && !r.records.is_empty());

    // After a restart everything is on disk only; the same pulls agree.
    assert!(node.terminate().success());
    let node = env.start(&launch).await;
    let conn = node.connect(&ep).await;
    let (records, _) = pull_all(&conn, 0, Lsn::ZERO, last, 32 << 10).await;
    assert_exact(&records, &chain, Lsn::ZERO, last);
    let (records, _) = pull_all(&conn, 0, lsns[1234], lsns[2345], 64 << 10).await;
    assert_exact(&records, &chain, lsns[1234], lsns[2345]);
}

/// A subscription without `every_scl` hears a segment only when its flushed LSN moves
/// (with the SCL of that moment); one with it hears every append too.
#[tokio::test]
async fn a_subscription_without_every_scl_hears_only_flushes() {
    let env = TestEnv::new();
    // A slow disk: each flush is held back long enough to see the appends before it.
    let launch = env.launch(&[0], &["--flush-delay-ms", "300"]);
    let node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut every = conn.subscribe(vec![PgId(0)], true).await.expect("subscribe");
    let mut flushes = conn.subscribe(vec![PgId(0)], false).await.expect("subscribe");
    let empty = SegmentPosition { pg: PgId(0), scl: Lsn::ZERO, flushed_lsn: Lsn::ZERO };
    assert_eq!(timely("first position", every.next()).await.expect("notification"), empty);
    assert_eq!(timely("first position", flushes.next()).await.expect("notification"), empty, "both start with the current position");

    let mut chain = Chain::new(0, 100);
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    for _ in 0..3 {
        let b = chain.batch(1);
        tx.send(Epoch(1), PgId(0), &b.bytes).await.expect("send");
        timely("ack", rx.recv()).await.expect("ack");
        // Each append is heard at once on the first subscription, before its flush.
        let mut p = timely("scl notification", every.next()).await.expect("notification");
        while p.scl < b.last_lsn() {
            p = timely("scl notification", every.next()).await.expect("notification");
        }
        assert!(p.flushed_lsn < b.last_lsn(), "heard after the flush: {p:?}");
    }
    let last = chain.last_lsn;
    // The second hears nothing until a flush lands, then the position with it.
    loop {
        let p = timely("flush notification", flushes.next()).await.expect("notification");
        assert!(p.flushed_lsn > Lsn::ZERO, "a notification without a flush: {p:?}");
        if p.flushed_lsn == last {
            assert_eq!(p.scl, last);
            break;
        }
    }
}
