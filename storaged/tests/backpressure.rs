//! Backpressure: a full hot log answers Busy without closing the stream,
//! and nothing acked is lost.

mod common;

use std::collections::BTreeSet;

use borealis_net::storage::ClientError;
use common::*;
use redo_core::wire::ErrorCode;
use redo_core::{Epoch, Lsn, PgId};

const ROUNDS_MAX: usize = 3;
const BATCHES_PER_ROUND: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_does_not_close_the_stream_and_acked_records_survive() {
    let env = TestEnv::new();
    // A hot log of one frame: a second unflushed batch cannot fit.
    let launch = env.launch(&[0], &["--frame-bytes-max", "64KiB", "--hot-log-bytes-max", "64KiB", "--busy-wait-ms", "0"]);
    let node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut sub = conn.subscribe(vec![PgId(0)], true).await.expect("subscribe");
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");

    // About 21 KiB per batch, all pipelined in one write: the node parses
    // them far faster than write + fdatasync frees the hot log.
    let mut chain = Chain::new(0, 3000);
    let mut acked: BTreeSet<Lsn> = BTreeSet::new();
    let mut refused = Vec::new();
    let mut busy_then_more = false;
    for round in 0..ROUNDS_MAX {
        let batches: Vec<Batch> = (0..BATCHES_PER_ROUND).map(|_| chain.batch(7)).collect();
        let mut frames = Vec::new();
        for b in &batches {
            redo_core::wire::encode_append(Epoch(1), PgId(0), Lsn::ZERO, &b.bytes, &mut frames);
        }
        let (sent, replies) = tokio::join!(tx.send_raw(&frames), async {
            let mut replies = Vec::with_capacity(batches.len());
            for _ in &batches {
                replies.push(timely("append reply", rx.recv()).await);
            }
            replies
        });
        sent.expect("send batches");
        let mut seen_busy = false;
        for (b, reply) in batches.into_iter().zip(replies) {
            match reply {
                Ok((pos, last)) => {
                    assert_eq!(last, b.last_lsn(), "acks come in send order");
                    if refused.is_empty() {
                        assert_eq!(pos.scl, last, "no hole yet: the batch completes the chain");
                    } else {
                        assert!(pos.scl < b.lsns[0], "a batch above a refused one waits above the hole: {pos:?}");
                    }
                    acked.extend(&b.lsns);
                    busy_then_more |= seen_busy;
                }
                Err(ClientError::Refused { code: ErrorCode::Busy, message }) => {
                    assert!(message.contains("hot log full"), "{message}");
                    busy_then_more |= seen_busy;
                    seen_busy = true;
                    refused.push(b);
                }
                Err(e) => panic!("only Ack or Busy may answer an append here, got {e}"),
            }
        }
        eprintln!("round {round}: {} records acked, {} batches busy so far", acked.len(), refused.len());
        if !refused.is_empty() {
            break;
        }
    }
    assert!(!refused.is_empty(), "{ROUNDS_MAX} rounds of {BATCHES_PER_ROUND} pipelined batches never filled a 64 KiB hot log");
    assert!(busy_then_more, "after a Busy the stream kept answering");

    // Resend each refused batch on the same stream until it is taken. A
    // Busy means a flush is due: wait for the next position change.
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    for b in &refused {
        loop {
            tx.send(Epoch(1), PgId(0), &b.bytes).await.expect("the stream is still open after Busy");
            match timely("append reply", rx.recv()).await {
                Ok((_, last)) => {
                    assert_eq!(last, b.last_lsn());
                    acked.extend(&b.lsns);
                    break;
                }
                Err(ClientError::Refused { code: ErrorCode::Busy, .. }) => match tokio::time::timeout_at(deadline, sub.next()).await {
                    Ok(p) => {
                        p.expect("notification");
                    }
                    Err(_) => panic!(
                        "batch ending at {} is refused Busy and the segment makes no progress; log tail:\n{}",
                        b.last_lsn(),
                        node.log().lines().rev().take(5).collect::<Vec<_>>().join("\n")
                    ),
                },
                Err(e) => panic!("resend got {e}"),
            }
        }
    }

    let pos = wait_position(&conn, 0, "everything flushed", |p| p.flushed_lsn == chain.last_lsn).await;
    assert_eq!(pos.scl, chain.last_lsn);
    let (records, _) = pull_all(&conn, 0, Lsn::ZERO, pos.scl, 1 << 20).await;
    assert_chain(&records, Lsn::ZERO);
    let pulled: BTreeSet<Lsn> = records.iter().map(|r| r.header.lsn).collect();
    assert!(acked.is_subset(&pulled), "every acked record is present");
    assert_eq!(pulled, chain.sent.keys().copied().collect(), "after the resends, every record is present");
    for r in &records {
        assert_eq!(&r.bytes, &chain.sent[&r.header.lsn]);
    }
}

/// A node-wide frame budget of one frame still serves every stream of every
/// client, one frame at a time, with nothing refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_frame_budget_serves_concurrent_streams() {
    let env = TestEnv::new();
    let launch = env.launch(&[0, 1, 2, 3], &["--frame-bytes-max", "64KiB", "--inflight-bytes-max", "64KiB"]);
    let node = env.start(&launch).await;
    let ep = env.client();
    let mut tasks = Vec::new();
    for pg in 0..4u32 {
        let conn = node.connect(&ep).await; // a client per stream
        tasks.push(tokio::spawn(async move {
            let mut chain = Chain::new(pg, 500);
            let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
            let batches: Vec<_> = (0..20).map(|_| chain.batch(100)).collect();
            for b in &batches {
                tx.send(Epoch(1), PgId(pg), &b.bytes).await.expect("send");
            }
            for b in &batches {
                let (pos, last) = timely("ack", rx.recv()).await.expect("acked, not refused");
                assert_eq!((pos.scl, last), (b.last_lsn(), b.last_lsn()));
            }
        }));
    }
    for t in tasks {
        t.await.expect("stream task");
    }

    let out = std::process::Command::new(STORAGED)
        .arg("serve")
        .args(&launch.args)
        .args(["--inflight-bytes-max", "4KiB", "--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .expect("run storaged");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--inflight-bytes-max"), "a budget below one frame is refused");
}
