//! Log streams (`StreamLog`) through the real binary: records pushed as they
//! arrive, from disk for a reader far behind, within the reader's credit; a
//! truncation ends the stream with `Behind`; anything but `Credit` on it ends it.

mod common;

use borealis_net::storage::{ClientError, LogStreamReader};
use common::*;
use redo_core::record::{RecordRef, Records};
use redo_core::wire::ErrorCode;
use redo_core::{Epoch, Lsn, PgId};

/// Reads chunks until the reader holds the records up to `upto`; checks that each chunk
/// goes on where the last ended, with CRC-valid records in order. Returns record bytes.
async fn read_until(stream: &mut LogStreamReader, at: &mut Lsn, upto: Lsn, got: &mut Vec<Pulled>) -> usize {
    let mut bytes = 0;
    while *at < upto {
        let chunk = timely("stream chunk", stream.next()).await.expect("chunk");
        let mut last = *at;
        for rec in Records::new(&chunk.records, 0) {
            let rec: RecordRef = rec.expect("streamed records decode and pass their CRC");
            assert!(rec.lsn() > last, "record {} after {last}", rec.lsn());
            last = rec.lsn();
            got.push(Pulled { header: rec.header(), bytes: rec.as_bytes().to_vec() });
        }
        assert!(!chunk.records.is_empty() && chunk.last_lsn == last, "a chunk ends at its last record: {} vs {last}", chunk.last_lsn);
        bytes += chunk.records.len();
        *at = chunk.last_lsn;
    }
    bytes
}

#[tokio::test]
async fn a_log_stream_pushes_records_as_they_arrive_within_its_credit() {
    let env = TestEnv::new();
    let metrics = free_tcp_addr();
    // A tiny read cache: a stream that starts far behind reads the file.
    let node = env.start(&env.launch(&[0], &["--cache-bytes-max", "4096", "--metrics-listen", &metrics])).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut chain = Chain::new(0, 500);
    let (mut tx, mut rx) = conn.open_append().await.expect("open append stream");
    let mut append = async |chain: &mut Chain, n| {
        let b = chain.batch(n);
        tx.send(Epoch(1), PgId(0), &b.bytes).await.expect("send");
        timely("ack", rx.recv()).await.expect("ack");
    };
    for _ in 0..20 {
        append(&mut chain, 10).await;
    }
    wait_position(&conn, 0, "flushed", |p| p.flushed_lsn == chain.last_lsn).await;

    // From the start: the whole log, mostly from disk, then new records as they come.
    let mut stream = conn.stream_log(Epoch(0), PgId(0), Lsn::ZERO, 1 << 20).await.expect("open log stream");
    let (mut at, mut got) = (Lsn::ZERO, Vec::new());
    read_until(&mut stream, &mut at, chain.last_lsn, &mut got).await;
    for _ in 0..5 {
        append(&mut chain, 3).await;
        read_until(&mut stream, &mut at, chain.last_lsn, &mut got).await;
    }
    assert_chain(&got, Lsn::ZERO);
    assert_eq!(got.iter().map(|r| r.bytes.clone()).collect::<Vec<_>>(), chain.sent.values().cloned().collect::<Vec<_>>());

    // A reader that granted 2,000 bytes gets records up to that (one record over at most),
    // and the rest once it grants more.
    let mut small = conn.stream_log(Epoch(0), PgId(0), at, 2000).await.expect("open log stream");
    let before = metric(&metrics, "storaged_streamed_bytes_total{node=\"1\"}").await.expect("metric");
    append(&mut chain, 10).await;
    let (mut small_at, mut small_got) = (at, Vec::new());
    let record_bytes = chain.sent.values().last().expect("records").len();
    let mut received = 0;
    while received < 2000 {
        let next = Lsn(small_at.0 + 1);
        received += read_until(&mut small, &mut small_at, next, &mut small_got).await;
    }
    assert!(received < 2000 + record_bytes, "{received} bytes for a credit of 2000");
    assert!(small_at < chain.last_lsn, "the credit ran out before the batch did");
    // What the node sent: the big stream's 10 records and no more than the small one read.
    let sent = wait_metric(&metrics, "storaged_streamed_bytes_total{node=\"1\"}", |b| b >= before + (10 * record_bytes + received) as f64).await;
    assert_eq!(sent, before + (10 * record_bytes + received) as f64, "sent beyond the credit");
    small.grant(1 << 20).await.expect("grant");
    read_until(&mut small, &mut small_at, chain.last_lsn, &mut small_got).await;
    assert_chain(&small_got, at);

    // A new writer's truncation ends both streams: what they sent above it may be gone.
    let new = Epoch::claim_after(Epoch(1), 1);
    let above = chain.sent.keys().rev().nth(5).copied().expect("records");
    timely("truncate", conn.status(new, PgId(0), Some(above))).await.expect("claim and truncate");
    for s in [&mut stream, &mut small] {
        // Chunks sent before the truncation may come first.
        loop {
            match timely("end of stream", s.next()).await {
                Ok(chunk) => assert!(chunk.last_lsn <= chain.last_lsn),
                Err(ClientError::Refused { code: ErrorCode::Behind, message }) => break assert!(message.contains("truncated"), "{message}"),
                Err(e) => panic!("expected Behind after the truncation, got {e}"),
            }
        }
    }
    // Only a segment that recorded the truncation serves a stream at the new epoch.
    let mut at_new = conn.stream_log(new, PgId(0), Lsn::ZERO, 1 << 20).await.expect("open log stream");
    let (mut at, mut got) = (Lsn::ZERO, Vec::new());
    read_until(&mut at_new, &mut at, above, &mut got).await;
    assert_eq!(at, above);
}

#[tokio::test]
async fn a_log_stream_takes_only_credit() {
    let env = TestEnv::new();
    let node = env.start(&env.launch(&[0], &[])).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut stream = conn.stream_log(Epoch(0), PgId(0), Lsn::ZERO, 1 << 20).await.expect("open log stream");
    // A second StreamLog on the same stream is refused: the stream ends with an error.
    let (mut send, mut recv) = conn.conn.open_bi().await.expect("open stream");
    let open = redo_core::wire::Message::StreamLog { pg: PgId(0), after: Lsn::ZERO, credit: 100, epoch: Epoch(0) };
    borealis_net::frame::write_message(&mut send, &open).await.expect("send");
    borealis_net::frame::write_message(&mut send, &open).await.expect("send");
    match timely("refusal", borealis_net::frame::read_message(&mut recv, 1 << 20)).await {
        Ok(Some(redo_core::wire::Message::Error { code: ErrorCode::Malformed, .. })) => {}
        other => panic!("expected Malformed, got {other:?}"),
    }
    // A stream of a PG the node does not host is refused; the first stream still serves.
    match timely("not hosted", conn.stream_log(Epoch(0), PgId(9), Lsn::ZERO, 100).await.expect("open").next()).await {
        Err(ClientError::Refused { code: ErrorCode::NotHosted, .. }) => {}
        other => panic!("expected NotHosted, got {other:?}"),
    }
    let mut chain = Chain::new(0, 100);
    append_once(&conn, 1, PgId(0), &chain.batch(2)).await.expect("append");
    let (mut at, mut got) = (Lsn::ZERO, Vec::new());
    read_until(&mut stream, &mut at, chain.last_lsn, &mut got).await;
    assert_chain(&got, Lsn::ZERO);
}
