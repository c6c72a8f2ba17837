//! Durability: acks with `--ack disk` mean on disk; kill -9 loses nothing
//! that was reported flushed; a torn tail is truncated on recovery.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use redo_core::segment_file::{scan_records, ScanStop, SEGMENT_HEADER_BYTES};
use redo_core::{Epoch, Lsn, PgId};

#[tokio::test]
async fn ack_disk_survives_kill_9() {
    const BATCHES: usize = 60;
    let env = TestEnv::new();
    let launch = env.launch(&[0, 1], &["--ack", "disk"]);
    let mut node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut chains = [Chain::new(0, 300), Chain::new(1, 300)];

    // Pipelined: all batches in flight at once, alternating segments on one stream.
    let batches: Vec<(PgId, Lsn, Vec<u8>)> = (0..BATCHES)
        .map(|i| {
            let chain = &mut chains[i % 2];
            let b = chain.batch(1 + i % 7);
            (chain.pg, b.last_lsn(), b.bytes)
        })
        .collect();
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    let send = async {
        for (pg, _, bytes) in &batches {
            tx.send(Epoch(1), *pg, bytes).await.expect("send batch");
        }
    };
    let receive = async {
        for (pg, last, _) in &batches {
            let (pos, acked) = timely("ack", rx.recv()).await.expect("ack");
            assert_eq!((pos.pg, acked), (*pg, *last), "acks come in send order");
            assert!(pos.flushed_lsn >= *last, "ack=disk acked {last} with flushed_lsn {}", pos.flushed_lsn);
            assert!(pos.scl >= pos.flushed_lsn);
        }
    };
    tokio::join!(send, receive);
    // Right after the last ack: no graceful flush.
    node.kill9();

    let node = env.start(&launch).await;
    let conn = node.connect(&ep).await;
    for chain in &chains {
        let pos = position(&conn, chain.pg.0).await;
        assert_eq!((pos.scl, pos.flushed_lsn), (chain.last_lsn, chain.last_lsn), "pg {} recovered", chain.pg);
        let (records, _) = pull_all(&conn, chain.pg.0, Lsn::ZERO, pos.scl, 16 << 10).await;
        assert_chain(&records, Lsn::ZERO);
        let pulled: Vec<Lsn> = records.iter().map(|r| r.header.lsn).collect();
        let sent: Vec<Lsn> = chain.sent.keys().copied().collect();
        assert_eq!(pulled, sent, "every acked record of {} is back", chain.pg);
        for r in &records {
            assert_eq!(&r.bytes, &chain.sent[&r.header.lsn]);
        }
    }
    assert!(!node.log().contains("truncating"), "a clean tail needs no truncation");
}

/// Scans a segment file the way recovery does: returns the offset where the
/// valid log ends and the last LSN of the chain.
fn scan_segment(file: &[u8]) -> (u64, Lsn, ScanStop) {
    let mut last = Lsn::ZERO;
    let (used, stop) = scan_records(&file[SEGMENT_HEADER_BYTES..], SEGMENT_HEADER_BYTES as u64, &mut last, |_, _| {});
    (SEGMENT_HEADER_BYTES as u64 + used as u64, last, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_flush_then_torn_tail_recovers_every_flushed_record() {
    let env = TestEnv::new();
    // Small flushes: many write + fdatasync rounds, so the kill lands amid them.
    let launch = env.launch(&[0], &["--flush-bytes-max", "64KiB"]);
    let mut node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;

    // Highest flushed_lsn the node ever reported, by ack or notification.
    let flushed_max = Arc::new(AtomicU64::new(0));
    let acked_batches = Arc::new(AtomicU64::new(0));
    let mut sub = conn.subscribe(vec![PgId(0)], true).await.expect("subscribe");
    let watcher = {
        let flushed_max = flushed_max.clone();
        tokio::spawn(async move {
            let mut notes = 0u64;
            while let Ok(p) = sub.next().await {
                flushed_max.fetch_max(p.flushed_lsn.0, Ordering::SeqCst);
                notes += 1;
            }
            notes
        })
    };

    let mut chain = Chain::new(0, 700);
    let batches: Vec<_> = (0..4000).map(|i| chain.batch(1 + i % 5)).collect();
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        let frames: Vec<Vec<u8>> = batches.iter().map(|b| b.bytes.clone()).collect();
        tokio::spawn(async move {
            let mut sent = 0;
            for f in &frames {
                if stop.load(Ordering::SeqCst) || tx.send(Epoch(1), PgId(0), f).await.is_err() {
                    break;
                }
                sent += 1;
            }
            (sent, tx)
        })
    };
    // The receiver itself fires SIGKILL at the first ack past KILL_AT_ACKS once a
    // flush has been reported, so the kill lands mid-load however the machine
    // schedules this test.
    const KILL_AT_ACKS: u64 = 1000;
    let pid = node.pid();
    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel();
    let receiver = {
        let flushed_max = flushed_max.clone();
        let acked_batches = acked_batches.clone();
        tokio::spawn(async move {
            let mut killed_tx = Some(killed_tx);
            while let Ok((pos, _)) = rx.recv().await {
                flushed_max.fetch_max(pos.flushed_lsn.0, Ordering::SeqCst);
                let acked = acked_batches.fetch_add(1, Ordering::SeqCst) + 1;
                if killed_tx.is_some() && acked >= KILL_AT_ACKS && flushed_max.load(Ordering::SeqCst) > 0 {
                    // SAFETY: signalling our own, not yet reaped child by pid.
                    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
                    let _ = killed_tx.take().expect("kill once").send(());
                }
            }
        })
    };
    timely("the kill", killed_rx).await.expect("receiver fired the kill");
    node.kill9();
    // Nothing more can arrive from a dead node; stop waiting for the idle timeout.
    stop.store(true, Ordering::SeqCst);
    conn.conn.close(0u32.into(), b"node killed");
    let (sent, _tx) = timely("sender", sender).await.expect("sender task");
    timely("receiver", receiver).await.expect("receiver task");
    let notes = timely("watcher", watcher).await.expect("watcher task");
    let flushed_max = Lsn(flushed_max.load(Ordering::SeqCst));
    let acked = acked_batches.load(Ordering::SeqCst);
    assert!(notes > 1, "the subscription reported progress");
    assert!(flushed_max > Lsn::ZERO, "flushes were reported before the kill");
    eprintln!("sent {sent} batches, {acked} acked, {notes} notifications, flushed_max {flushed_max}");

    // Find the end of the valid log, and tear a record in half there.
    let seg = env.segment_path(0);
    let file = std::fs::read(&seg).expect("read segment file");
    let (end, last_on_disk, stop_reason) = scan_segment(&file);
    assert!(matches!(stop_reason, ScanStop::End | ScanStop::Corrupt { .. }), "{stop_reason:?}");
    assert!(last_on_disk >= flushed_max, "the file holds {last_on_disk}, less than the reported flushed {flushed_max}");
    assert!(last_on_disk < chain.last_lsn, "the kill landed after the whole load was on disk: nothing was tested");
    let mut torn = Vec::new();
    encode_record(Lsn(chain.last_lsn.0 + 1000), last_on_disk, 700, &mut torn);
    let half = &torn[..torn.len() / 2];
    let f = std::fs::OpenOptions::new().write(true).open(&seg).expect("open segment file");
    f.write_all_at(half, end).expect("write torn record");
    f.sync_all().expect("fsync segment file");
    drop(f);

    let mut node = env.start(&launch).await;
    let log = node.log();
    assert!(
        log.lines().any(|l| l.contains("truncating segment log") && l.contains(&format!("offset={end}"))),
        "recovery reports the torn tail at offset {end}; log:\n{log}"
    );
    let after = std::fs::read(&seg).expect("read segment file");
    assert!(after[end as usize..end as usize + half.len()].iter().all(|&b| b == 0), "the torn bytes are zeroed");

    let conn = node.connect(&ep).await;
    let pos = position(&conn, 0).await;
    assert_eq!(pos.scl, last_on_disk, "SCL is the end of the valid chain");
    assert_eq!(pos.flushed_lsn, pos.scl);
    assert!(pos.scl >= flushed_max, "SCL {} is below the highest reported flushed_lsn {flushed_max}", pos.scl);
    let (records, _) = pull_all(&conn, 0, Lsn::ZERO, pos.scl, 128 << 10).await;
    assert_chain(&records, Lsn::ZERO);
    let pulled: Vec<Lsn> = records.iter().map(|r| r.header.lsn).collect();
    let expected: Vec<Lsn> = chain.sent.range(..=pos.scl).map(|(l, _)| *l).collect();
    assert_eq!(pulled, expected, "the recovered log is exactly the sent chain up to SCL");
    for r in &records {
        assert_eq!(&r.bytes, &chain.sent[&r.header.lsn], "record {} changed", r.header.lsn);
    }

    // The writer carries on from the recovered SCL; then a graceful stop and restart.
    chain.rebase(pos.scl);
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    for _ in 0..50 {
        let b = chain.batch(3);
        tx.send(Epoch(1), PgId(0), &b.bytes).await.expect("send");
        let (p, last) = timely("ack", rx.recv()).await.expect("continuing the chain is accepted");
        assert_eq!((p.scl, last), (b.last_lsn(), b.last_lsn()));
    }
    tx.finish();
    let status = node.terminate();
    assert!(status.success(), "SIGTERM exits 0, got {status}; log:\n{}", node.log());

    let node = env.start(&launch).await;
    assert!(!node.log().contains("truncating"), "a graceful stop leaves a clean tail; log:\n{}", node.log());
    let conn = node.connect(&ep).await;
    let pos = position(&conn, 0).await;
    assert_eq!((pos.scl, pos.flushed_lsn), (chain.last_lsn, chain.last_lsn));
    let (records, _) = pull_all(&conn, 0, Lsn::ZERO, pos.scl, 128 << 10).await;
    assert_chain(&records, Lsn::ZERO);
    let pulled: Vec<Lsn> = records.iter().map(|r| r.header.lsn).collect();
    assert_eq!(pulled, chain.sent.keys().copied().collect::<Vec<_>>());
    for r in &records {
        assert_eq!(&r.bytes, &chain.sent[&r.header.lsn], "record {} changed", r.header.lsn);
    }
}

#[tokio::test]
async fn batch_larger_than_a_flush_is_flushed_whole() {
    let env = TestEnv::new();
    // One 3 MiB frame against 64 KiB flushes: the flusher must take it in one write.
    let launch = env.launch(&[0], &["--ack", "disk", "--flush-bytes-max", "64KiB"]);
    let mut node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut chain = Chain::new(0, 60 << 10);
    for n in [50, 1, 7] {
        let b = chain.batch(n);
        let (pos, last) = append_once(&conn, 1, PgId(0), &b).await.expect("big batch acked after its flush");
        assert_eq!(last, b.last_lsn());
        assert!(pos.flushed_lsn >= last, "{pos:?}");
    }
    node.kill9();
    let node = env.start(&launch).await;
    let conn = node.connect(&ep).await;
    let (records, pos) = pull_all(&conn, 0, Lsn::ZERO, chain.last_lsn, 1 << 20).await;
    assert_eq!(pos.scl, chain.last_lsn);
    assert_chain(&records, Lsn::ZERO);
    assert_eq!(records.len(), chain.sent.len());
    for r in &records {
        assert_eq!(&r.bytes, &chain.sent[&r.header.lsn]);
    }
}
