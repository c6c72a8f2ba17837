//! Claims and truncations through the real binary: each epoch generation goes
//! to one claimant per segment, older epochs are fenced, and a new writer's
//! truncation discards the records above its point in memory and on disk
//! (surviving kill -9), is reported in every status, and is idempotent.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use borealis_net::storage::{ClientError, StorageConn};
use common::*;
use redo_core::page::PageOp;
use redo_core::record::RecordHeader;
use redo_core::wire::{ErrorCode, Truncation};
use redo_core::{Epoch, Lsn, PageId, PgId};

const PG: PgId = PgId(0);
const PAGES: u64 = 4;

/// A writer's records for one segment: LSNs 1, 2, 3..., puts on a few pages,
/// each record linking to its page's previous one.
struct PageLog {
    last_lsn: Lsn,
    sent: BTreeMap<Lsn, Vec<u8>>,
}

impl PageLog {
    fn new() -> Self {
        PageLog { last_lsn: Lsn::ZERO, sent: BTreeMap::new() }
    }

    fn page_of(lsn: Lsn) -> PageId {
        PageId(lsn.0 % PAGES)
    }

    fn batch(&mut self, n: usize) -> Batch {
        let (mut bytes, mut lsns) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let lsn = Lsn(self.last_lsn.0 + 1);
            let page = Self::page_of(lsn);
            let prev_for_page = self.sent.keys().rev().find(|&&l| Self::page_of(l) == page).copied().unwrap_or(Lsn::ZERO);
            let mut payload = Vec::new();
            PageOp::Put { key: format!("key-{}", lsn.0 % 5).into_bytes(), value: format!("value@{}", lsn.0).into_bytes() }.encode(&mut payload);
            let start = bytes.len();
            RecordHeader { lsn, prev_lsn_in_segment: self.last_lsn, prev_lsn_for_page: prev_for_page, page, cpl: true }.encode(&payload, &mut bytes);
            self.sent.insert(lsn, bytes[start..].to_vec());
            lsns.push(lsn);
            self.last_lsn = lsn;
        }
        Batch { bytes, lsns }
    }

    /// What a truncation above `above` leaves: the new writer chains on from there.
    fn truncate(&mut self, above: Lsn) {
        self.sent.retain(|&l, _| l <= above);
        self.last_lsn = self.sent.keys().next_back().copied().unwrap_or(Lsn::ZERO);
    }
}

async fn append(conn: &StorageConn, epoch: Epoch, batch: &Batch) -> Result<(redo_core::wire::SegmentPosition, Lsn), ClientError> {
    append_once(conn, epoch.0, PG, batch).await
}

async fn wait_flushed(conn: &StorageConn, lsn: Lsn) {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let pos = position(conn, PG.0).await;
        if pos.flushed_lsn >= lsn {
            return;
        }
        assert!(Instant::now() < deadline, "flushed LSN stuck at {} below {lsn}", pos.flushed_lsn);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Pull and GetPage agree with the model at every LSN.
async fn assert_log(conn: &StorageConn, log: &PageLog) {
    let (records, pos) = pull_all(conn, PG.0, Lsn::ZERO, Lsn(1000), 1 << 20).await;
    assert_eq!(pos.scl, log.last_lsn);
    assert_chain(&records, Lsn::ZERO);
    let got: Vec<&[u8]> = records.iter().map(|r| &r.bytes[..]).collect();
    let want: Vec<&[u8]> = log.sent.values().map(|b| &b[..]).collect();
    assert_eq!(got, want, "pulled records equal the model's");
    for &lsn in log.sent.keys() {
        for p in 0..PAGES {
            let (_, image) = timely("get_page", conn.get_page(PG, PageId(p), lsn)).await.unwrap_or_else(|e| panic!("p{p}@{lsn}: {e}"));
            assert_eq!(image, model_image(&log.sent, PageId(p), lsn), "p{p}@{lsn}");
        }
    }
}

#[tokio::test]
async fn each_generation_goes_to_the_first_claimant_of_each_segment() {
    let env = TestEnv::new();
    let node = env.start(&env.launch(&[0, 1], &[])).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut log = PageLog::new();
    let old = Epoch(1);
    append(&conn, old, &log.batch(3)).await.expect("first writer appends");

    let (a, b) = (Epoch::claim_after(old, 1), Epoch::claim_after(old, 2));
    assert_eq!(a.generation(), b.generation());
    let s = timely("claim", conn.status(a, PgId(0), None)).await.expect("a claims pg0 first");
    assert_eq!((s.epoch, s.position.scl), (a, log.last_lsn));
    let (code, message) = refusal(conn.status(b, PgId(0), None).await);
    assert_eq!(code, ErrorCode::StaleEpoch);
    assert!(message.contains("another claimant"), "{message}");
    timely("claim", conn.status(b, PgId(1), None)).await.expect("b claims pg1 first");
    assert_eq!(refusal(conn.status(a, PgId(1), None).await).0, ErrorCode::StaleEpoch);
    // Asking again at the granted epoch is fine; epoch 0 only reads.
    assert_eq!(timely("again", conn.status(a, PgId(0), None)).await.expect("a again").epoch, a);
    assert_eq!(timely("read", conn.status(Epoch(0), PgId(1), None)).await.expect("read").epoch, b);

    // The old writer and the losing claimant are fenced off pg0; the winner appends.
    let batch = log.batch(2);
    assert_eq!(refusal(append(&conn, old, &batch).await).0, ErrorCode::StaleEpoch);
    assert_eq!(refusal(append(&conn, b, &batch).await).0, ErrorCode::StaleEpoch);
    let (pos, _) = append(&conn, a, &batch).await.expect("the claimant appends");
    assert_eq!(pos.scl, log.last_lsn);
    // An append at a newer generation raises the epoch, as a claim does.
    let c = Epoch::claim_after(a, 3);
    append(&conn, c, &log.batch(1)).await.expect("append at a newer generation");
    assert_eq!(timely("read", conn.status(Epoch(0), PG, None)).await.expect("read").epoch, c);
    assert_eq!(refusal(conn.status(a, PG, None).await).0, ErrorCode::StaleEpoch);
}

#[tokio::test]
async fn truncation_discards_records_above_the_point_durably_and_once() {
    let env = TestEnv::new();
    let metrics = free_tcp_addr();
    // A small read cache (flushed records leave memory, so the cut is found on
    // disk) and a busy coalescer (images above the point exist in the page file).
    let launch = env.launch(&[0], &["--cache-bytes-max", "512", "--coalesce-interval-ms", "20", "--coalesce-records", "2", "--metrics-listen", &metrics]);
    let mut node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut log = PageLog::new();
    let old = Epoch(1);
    for _ in 0..4 {
        append(&conn, old, &log.batch(5)).await.expect("append 1..=20");
    }
    wait_flushed(&conn, Lsn(20)).await;
    wait_metric(&metrics, "storaged_pages_coalesced_total{node=\"1\"}", |n| n >= PAGES as f64).await;
    // An unflushable record above a hole goes too.
    let mut ahead = PageLog { last_lsn: Lsn(21), sent: BTreeMap::new() };
    append(&conn, old, &ahead.batch(1)).await.expect("record 22 waits above a hole");

    let new = Epoch::claim_after(old, 7);
    let truncation = Truncation { epoch: new, above: Lsn(12) };
    let s = timely("truncate", conn.status(new, PG, Some(Lsn(12)))).await.expect("claim and truncate");
    assert_eq!((s.epoch, s.position.scl, s.truncations.clone()), (new, Lsn(12), vec![truncation]));
    assert!(s.position.flushed_lsn <= Lsn(12));
    log.truncate(Lsn(12));
    assert_log(&conn, &log).await;
    assert_eq!(refusal(conn.get_page(PG, PageId(1), Lsn(13)).await).0, ErrorCode::Behind);
    assert_eq!(metric(&metrics, "storaged_truncations_total{node=\"1\"}").await, Some(1.0));
    assert_eq!(metric(&metrics, "storaged_truncated_records_total{node=\"1\"}").await, Some(9.0));
    assert_eq!(metric(&metrics, "storaged_segment_epoch_generation{node=\"1\",pg=\"0\"}").await, Some(new.generation() as f64));

    // The old writer is fenced; the new one chains on from 12.
    let batch = log.batch(4);
    assert_eq!(refusal(append(&conn, old, &batch).await).0, ErrorCode::StaleEpoch);
    let (pos, _) = append(&conn, new, &batch).await.expect("the new writer appends 13..=16");
    assert_eq!(pos.scl, Lsn(16));
    wait_flushed(&conn, Lsn(16)).await;
    assert_log(&conn, &log).await;

    // kill -9: still truncated, the history and the epoch kept.
    node.kill9();
    let mut node = env.start(&launch).await;
    let conn = node.connect(&ep).await;
    let s = timely("status", conn.status(Epoch(0), PG, None)).await.expect("status after restart");
    assert_eq!((s.epoch, s.position.scl, s.truncations.clone()), (new, Lsn(16), vec![truncation]));
    assert_log(&conn, &log).await;

    // A repeat (the claimant retrying) discards nothing, not even the new records.
    let s = timely("repeat", conn.status(new, PG, Some(Lsn(12)))).await.expect("repeated truncation");
    assert_eq!((s.position.scl, s.truncations.len()), (Lsn(16), 1));
    assert_log(&conn, &log).await;
    // Truncations at an epoch that is not the segment's are refused.
    assert_eq!(refusal(conn.status(old, PG, Some(Lsn(5))).await).0, ErrorCode::StaleEpoch);
    let other = Epoch(new.0 ^ 1);
    assert_eq!(refusal(conn.status(other, PG, Some(Lsn(5))).await).0, ErrorCode::StaleEpoch);
    assert_eq!(timely("read", conn.status(Epoch(0), PG, None)).await.expect("read").position.scl, Lsn(16));

    // A later recovery truncates again, within memory this time; both are reported.
    let newer = Epoch::claim_after(new, 1);
    let s = timely("truncate again", conn.status(newer, PG, Some(Lsn(14)))).await.expect("second truncation");
    assert_eq!(s.truncations, vec![truncation, Truncation { epoch: newer, above: Lsn(14) }]);
    log.truncate(Lsn(14));
    let batch = log.batch(3);
    append(&conn, newer, &batch).await.expect("append 15..=17");
    wait_flushed(&conn, Lsn(17)).await;
    node.kill9();
    let node = env.start(&launch).await;
    let conn = node.connect(&ep).await;
    let s = timely("status", conn.status(Epoch(0), PG, None)).await.expect("status after restart");
    assert_eq!((s.epoch, s.position.scl, s.truncations.len()), (newer, Lsn(17), 2));
    assert_log(&conn, &log).await;
    let epoch_file = std::fs::read_to_string(env.data_dir().join("pg-0.epoch")).expect("epoch file");
    assert!(epoch_file.starts_with(&format!("{}\n", newer.0)) && epoch_file.lines().count() == 3, "{epoch_file}");
}
