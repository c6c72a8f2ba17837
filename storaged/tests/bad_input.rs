//! Bad input against a running node: each is refused with the right code,
//! and a separate, well-behaved client keeps appending afterwards.

mod common;

use std::time::{Duration, Instant};

use borealis_net::storage::ClientError;
use common::*;
use redo_core::wire::ErrorCode;
use redo_core::{Epoch, Lsn, PgId};

/// After a refusal that closes the stream, the stream yields nothing more,
/// and our writes on it eventually fail because the node stopped reading.
async fn assert_stream_closed(tx: &mut borealis_net::storage::AppendSender, rx: &mut borealis_net::storage::AppendReceiver) {
    match timely("read after refusal", rx.recv()).await {
        Err(ClientError::Closed) => {}
        other => panic!("the node must finish the stream after a refusal, got {other:?}"),
    }
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while tx.send_raw(&[0u8; 1024]).await.is_ok() {
        assert!(Instant::now() < deadline, "the node never stopped reading the refused stream");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn expect_refusal<T: std::fmt::Debug>(r: Result<T, ClientError>, code: ErrorCode) -> String {
    match r {
        Err(ClientError::Refused { code: c, message }) if c == code => message,
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_frames_are_refused_and_close_the_stream() {
    let env = TestEnv::new();
    let node = env.start(&env.launch(&[0], &[])).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut chain = Chain::new(0, 100);

    // A frame with a sane length word but an unknown message kind, then junk.
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    tx.send_raw(&[5, 0, 0, 0, 0xee, 1, 2, 3, 4, 0xde, 0xad, 0xbe, 0xef]).await.expect("send garbage");
    let msg = expect_refusal(timely("reply to garbage", rx.recv()).await, ErrorCode::Malformed);
    assert!(msg.contains("message kind"), "{msg}");
    assert_stream_closed(&mut tx, &mut rx).await;

    // A well-formed Append frame whose record fails its CRC.
    let mut bad = chain.batch(3);
    let n = bad.bytes.len();
    bad.bytes[n - 10] ^= 0x40;
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    tx.send(Epoch(1), PgId(0), &bad.bytes).await.expect("send corrupt batch");
    let msg = expect_refusal(timely("reply to corrupt batch", rx.recv()).await, ErrorCode::Malformed);
    assert!(msg.contains("CRC"), "{msg}");
    assert_stream_closed(&mut tx, &mut rx).await;

    // A zero length word.
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    tx.send_raw(&[0, 0, 0, 0]).await.expect("send empty frame");
    expect_refusal(timely("reply to empty frame", rx.recv()).await, ErrorCode::Malformed);
    assert_stream_closed(&mut tx, &mut rx).await;

    // Nothing of it landed; the same connection and a new one still work.
    assert_eq!(position(&conn, 0).await.scl, Lsn::ZERO);
    let mut chain = Chain::new(0, 100);
    let batch = chain.batch(2);
    append_once(&conn, 1, PgId(0), &batch).await.expect("a new stream on the same connection is served");
    well_behaved_append(&node, &ep, &mut chain, 1).await;
}

#[tokio::test]
async fn oversized_frames_get_too_large() {
    const FRAME_MAX: usize = 64 << 10;
    let env = TestEnv::new();
    let node = env.start(&env.launch(&[0], &["--frame-bytes-max", "64KiB"])).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;

    // Only a length word one byte over the limit: refused before any body arrives.
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    tx.send_raw(&((FRAME_MAX + 1) as u32).to_le_bytes()).await.expect("send header");
    let msg = expect_refusal(timely("reply to oversized header", rx.recv()).await, ErrorCode::TooLarge);
    assert!(msg.contains(&format!("{}", FRAME_MAX + 1)), "{msg}");
    assert_stream_closed(&mut tx, &mut rx).await;

    // A real batch: the append frame's header after its length word, then records of 41 bytes
    // + payload. Exactly at the limit it is accepted; one payload byte more is refused.
    let header = redo_core::wire::APPEND_HEADER_BYTES - redo_core::wire::FRAME_HEADER_BYTES;
    let mut chain = Chain::new(0, FRAME_MAX - header - 41);
    let fits = chain.batch(1);
    assert_eq!(fits.bytes.len() + header, FRAME_MAX);
    let (pos, _) = append_once(&conn, 1, PgId(0), &fits).await.expect("a frame of exactly --frame-bytes-max is accepted");
    assert_eq!(pos.scl, fits.last_lsn());
    chain.payload_bytes += 1;
    let over = chain.batch(1);
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    // The node may stop the stream while the body is still on its way.
    let _ = tx.send(Epoch(1), PgId(0), &over.bytes).await;
    expect_refusal(timely("reply to oversized batch", rx.recv()).await, ErrorCode::TooLarge);
    assert_stream_closed(&mut tx, &mut rx).await;

    chain.rebase(fits.last_lsn());
    chain.payload_bytes = 100;
    well_behaved_append(&node, &ep, &mut chain, 1).await;
}

#[tokio::test]
async fn stale_epoch_is_refused_and_the_epoch_survives_restart() {
    let env = TestEnv::new();
    let launch = env.launch(&[0], &[]);
    let mut node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut chain = Chain::new(0, 100);

    let b5 = chain.batch(3);
    let (pos, _) = append_once(&conn, 5, PgId(0), &b5).await.expect("append at epoch 5");
    assert_eq!(pos.scl, b5.last_lsn());
    let b3 = chain.batch(3);
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    tx.send(Epoch(3), PgId(0), &b3.bytes).await.expect("send at epoch 3");
    let msg = expect_refusal(timely("reply at epoch 3", rx.recv()).await, ErrorCode::StaleEpoch);
    assert!(msg.contains("e3") && msg.contains("e5"), "{msg}");
    assert_stream_closed(&mut tx, &mut rx).await;
    assert_eq!(position(&conn, 0).await.scl, b5.last_lsn(), "nothing of the stale batch was inserted");

    // The current writer resends the same records at epoch 5 and carries on.
    let (pos, _) = append_once(&node.connect(&ep).await, 5, PgId(0), &b3).await.expect("resend at epoch 5");
    assert_eq!(pos.scl, b3.last_lsn());
    well_behaved_append(&node, &ep, &mut chain, 5).await;

    // The epoch is durable: after a restart epoch 4 is still fenced off.
    let epoch_file = std::fs::read_to_string(env.data_dir().join("pg-0.epoch")).expect("epoch file");
    assert_eq!(epoch_file.trim(), "5");
    assert!(node.terminate().success());
    let node = env.start(&launch).await;
    let conn = node.connect(&ep).await;
    let b4 = chain.batch(1);
    expect_refusal(append_once(&conn, 4, PgId(0), &b4).await, ErrorCode::StaleEpoch);
    let (pos, _) = append_once(&conn, 5, PgId(0), &b4).await.expect("epoch 5 still appends after restart");
    assert_eq!(pos.scl, b4.last_lsn());
}

#[tokio::test]
async fn unhosted_pg_is_refused() {
    let env = TestEnv::new();
    let node = env.start(&env.launch(&[0, 1], &[])).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;

    let mut other = Chain::new(7, 100);
    let msg = expect_refusal(append_once(&conn, 1, PgId(7), &other.batch(2)).await, ErrorCode::NotHosted);
    assert!(msg.contains("pg7") && msg.contains("[0, 1]"), "the refusal names the PG and what is hosted: {msg}");
    expect_refusal(timely("pull", conn.pull(PgId(7), Lsn::ZERO, Lsn(100), 4096)).await, ErrorCode::NotHosted);
    let mut sub = conn.subscribe(vec![PgId(0), PgId(7)], true).await.expect("send subscribe");
    expect_refusal(timely("subscribe", sub.next()).await, ErrorCode::NotHosted);
    assert!(!env.segment_path(7).exists(), "no segment file for an unhosted PG");

    let mut chain = Chain::new(0, 100);
    well_behaved_append(&node, &ep, &mut chain, 1).await;
    let mut chain1 = Chain::new(1, 100);
    well_behaved_append(&node, &ep, &mut chain1, 1).await;
}

#[tokio::test]
async fn disk_full_fails_the_segment_but_not_the_node() {
    const PREALLOC: u64 = 1 << 20;
    // pg-0.seg and pg-1.seg are each preallocated to 1 MiB at creation; the
    // first growth of either (to 2 MiB) exceeds the limit and fails with EFBIG.
    const FSIZE_LIMIT: u64 = PREALLOC + (256 << 10);
    let env = TestEnv::new();
    // A small hot log makes the appends below wait for the flush that meets the limit, however
    // late the flusher runs (the flush interval, a busy machine): without it they could outrun
    // the flusher by the whole 16 MiB, acked from memory.
    let mut launch = env.launch(&[0, 1], &["--frame-bytes-max", "1MiB", "--hot-log-bytes-max", "2MiB", "--busy-wait-ms", "30000"]);
    launch.fsize_limit = Some(FSIZE_LIMIT);
    let mut node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;

    // Fill pg 0 past its preallocated megabyte.
    let mut chain = Chain::new(0, 4000);
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    let mut acked = Lsn::ZERO;
    let mut flushed_reported = Lsn::ZERO;
    let mut sent_bytes = 0usize;
    let refusal = loop {
        assert!(sent_bytes < 16 << 20, "16 MiB appended to a 1.25 MiB file limit and no DiskFailed");
        let batch = chain.batch(16);
        sent_bytes += batch.bytes.len();
        tx.send(Epoch(1), PgId(0), &batch.bytes).await.expect("send batch");
        match timely("append reply", rx.recv()).await {
            Ok((pos, last)) => {
                assert_eq!(last, batch.last_lsn());
                acked = last;
                flushed_reported = flushed_reported.max(pos.flushed_lsn);
            }
            Err(e) => break e,
        }
        if flushed_reported == Lsn::ZERO {
            // Some records reach the disk before it fills, however late the flusher runs.
            flushed_reported = wait_position(&conn, 0, "the first flush", |p| p.flushed_lsn >= acked).await.flushed_lsn;
        }
    };
    let msg = expect_refusal(Err::<(), _>(refusal), ErrorCode::DiskFailed);
    assert!(msg.contains("File too large"), "the refusal says why: {msg}");
    assert_stream_closed(&mut tx, &mut rx).await;
    assert!(acked > Lsn::ZERO, "appends were acked before the disk filled");
    let log = node.wait_log("flush failed; segment stops accepting appends", REPLY_TIMEOUT).await;
    assert!(
        log.lines().any(|l| l.contains("flush failed") && l.contains("pg0@n1") && l.contains("File too large")),
        "the log names the segment and the cause; log:\n{log}"
    );

    // The failed segment refuses every new append, on any connection.
    let conn2 = node.connect(&ep).await;
    let more = chain.batch(1);
    expect_refusal(append_once(&conn2, 1, PgId(0), &more).await, ErrorCode::DiskFailed);

    // The node is alive, answers pulls, and still holds every acked record of pg 0.
    assert!(node.is_alive());
    let (records, pos) = pull_all(&conn2, 0, Lsn::ZERO, acked, 256 << 10).await;
    assert_eq!(pos.scl, acked);
    assert!(pos.flushed_lsn < acked, "the failed flush did not advance flushed_lsn");
    assert_chain(&records, Lsn::ZERO);
    assert_eq!(records.last().map(|r| r.header.lsn), Some(acked));
    for r in &records {
        assert_eq!(&r.bytes, &chain.sent[&r.header.lsn], "record {} changed", r.header.lsn);
    }
    let pg0_flushed = pos.flushed_lsn.max(flushed_reported);

    // pg 1, another segment file with preallocated room below the limit, still appends and flushes.
    let mut chain1 = Chain::new(1, 4000);
    for _ in 0..3 {
        let p = well_behaved_append(&node, &ep, &mut chain1, 1).await;
        assert_eq!(p.scl, chain1.last_lsn);
    }
    wait_position(&conn2, 1, "pg 1 flush", |p| p.flushed_lsn >= chain1.last_lsn).await;

    // A graceful stop flushes what it can; after a restart without the
    // limit, pg 0 holds every record it reported flushed, and takes appends again.
    assert!(node.terminate().success(), "storaged exits cleanly; log:\n{}", node.log());
    launch.fsize_limit = None;
    let node = env.start(&launch).await;
    let conn = node.connect(&ep).await;
    let scl = position(&conn, 0).await.scl;
    assert!(scl >= pg0_flushed && scl <= acked, "recovered scl {scl}: flushed {pg0_flushed}, acked {acked}");
    let (records, _) = pull_all(&conn, 0, Lsn::ZERO, scl, 256 << 10).await;
    assert_chain(&records, Lsn::ZERO);
    assert_eq!(records.last().map(|r| r.header.lsn), Some(scl));
    for r in &records {
        assert_eq!(&r.bytes, &chain.sent[&r.header.lsn], "record {} changed", r.header.lsn);
    }
    chain.rebase(scl);
    for _ in 0..20 {
        let p = well_behaved_append(&node, &ep, &mut chain, 1).await;
        assert_eq!(p.scl, chain.last_lsn);
    }
    wait_position(&conn, 0, "pg 0 flush after restart", |p| p.flushed_lsn == chain.last_lsn).await;
}
