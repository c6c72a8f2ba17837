//! Status and GetPage@LSN through the real binary: pages materialised from
//! memory, disk and coalesced images agree with a model, before and after
//! kill -9, a damaged page-file tail is truncated at start, reads below the
//! GC horizon are refused, and the disk below it is reclaimed: a restart then
//! reads the checkpoint and the log's tail only.

mod common;

use std::collections::BTreeMap;

use borealis_net::frame::{read_message, write_message};
use borealis_net::storage::StorageConn;
use common::*;
use redo_core::page::{PageImage, PageOp};
use redo_core::record::RecordHeader;
use redo_core::wire::{encode_append, ErrorCode, Message, FRAME_BYTES_MAX};
use redo_core::{Epoch, Lsn, PageId, PgId};

const PG: PgId = PgId(0);
const PAGES: u64 = 6;
const COALESCED: &str = "storaged_pages_coalesced_total{node=\"1\"}";

/// A writer's records for one segment: put/delete operations on a few pages,
/// each record linking to its page's previous one.
#[derive(Clone)]
struct PageLog {
    last_lsn: Lsn,
    last_for_page: BTreeMap<PageId, Lsn>,
    /// Every record sent, by LSN.
    sent: BTreeMap<Lsn, Vec<u8>>,
    /// Bytes appended to every value.
    padding: usize,
}

impl PageLog {
    fn new() -> Self {
        PageLog { last_lsn: Lsn::ZERO, last_for_page: BTreeMap::new(), sent: BTreeMap::new(), padding: 0 }
    }

    /// `n` more records; LSNs step by 2 (a volume allocator leaves gaps).
    fn batch(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..n {
            let lsn = Lsn(self.last_lsn.0 + 2);
            let page = PageId((lsn.0 * 7 / 3) % PAGES);
            let key = format!("key-{}", lsn.0 % 11).into_bytes();
            let op = if lsn.0.is_multiple_of(5) {
                PageOp::Delete { key }
            } else {
                PageOp::Put { key, value: format!("value@{}{:1$}", lsn.0, self.padding).into_bytes() }
            };
            let mut payload = Vec::new();
            op.encode(&mut payload);
            let prev_for_page = self.last_for_page.insert(page, lsn).unwrap_or(Lsn::ZERO);
            let start = out.len();
            RecordHeader { lsn, prev_lsn_in_segment: self.last_lsn, prev_lsn_for_page: prev_for_page, page, cpl: true }.encode(&payload, &mut out);
            self.sent.insert(lsn, out[start..].to_vec());
            self.last_lsn = lsn;
        }
        out
    }

    /// LSNs worth asking at from `from` on: every record's and between records, spread over the log.
    fn probe_lsns(&self, from: Lsn) -> Vec<Lsn> {
        let mut lsns: Vec<Lsn> = self.sent.range(from..).step_by(23).flat_map(|(l, _)| [*l, Lsn(l.0 + 1)]).collect();
        lsns.extend([from, self.last_lsn]);
        lsns.retain(|&l| l <= self.last_lsn);
        lsns
    }
}

async fn append(conn: &StorageConn, epoch: u64, log: &mut PageLog, batches: usize) {
    append_with_horizon(conn, epoch, log, batches, |_| Lsn::ZERO).await
}

/// Appends `batches` batches of 20 records, each frame with the GC horizon `horizon(last LSN before it)`.
async fn append_with_horizon(conn: &StorageConn, epoch: u64, log: &mut PageLog, batches: usize, horizon: impl Fn(Lsn) -> Lsn) {
    let (mut tx, mut rx) = conn.open_append().await.expect("open append stream");
    for _ in 0..batches {
        let mut frame = Vec::new();
        let h = horizon(log.last_lsn);
        encode_append(Epoch(epoch), PG, h, &log.batch(20), &mut frame);
        tx.send_frame(frame.into()).await.expect("send");
        let (pos, last) = timely("ack", rx.recv()).await.expect("ack");
        assert_eq!((pos.scl, last), (log.last_lsn, log.last_lsn));
    }
    tx.finish();
}

/// Every page at every probe LSN equals the model.
async fn assert_pages(conn: &StorageConn, log: &PageLog) {
    assert_pages_from(conn, log, Lsn::ZERO).await
}

async fn assert_pages_from(conn: &StorageConn, log: &PageLog, from: Lsn) {
    for lsn in log.probe_lsns(from) {
        for p in 0..PAGES {
            let page = PageId(p);
            let (pos, image) = timely("get_page", conn.get_page(PG, page, lsn)).await.unwrap_or_else(|e| panic!("{page}@{lsn}: {e}"));
            assert_eq!(pos.scl, log.last_lsn);
            assert_eq!(image, model_image(&log.sent, page, lsn), "{page}@{lsn}");
        }
    }
}

/// The writer's GC horizon rides on its Append frames: a page read below it is
/// refused with `BelowHorizon`, naming it (those versions may be reclaimed), and
/// a read at it is served, on the same connection.
#[tokio::test]
async fn a_page_read_below_the_gc_horizon_is_refused() {
    let env = TestEnv::new();
    let node = env.start(&env.launch(&[0], &[])).await;
    let conn = node.connect(&env.client()).await;
    let mut log = PageLog::new();
    append(&conn, 1, &mut log, 3).await;
    let horizon = Lsn(log.last_lsn.0 / 2);
    let mut frame = Vec::new();
    encode_append(Epoch(1), PG, horizon, &log.batch(5), &mut frame);
    let (mut tx, mut rx) = conn.open_append().await.expect("open append stream");
    tx.send_frame(frame.into()).await.expect("send");
    assert_eq!(timely("ack", rx.recv()).await.expect("ack").0.scl, log.last_lsn);

    for page in (0..PAGES).map(PageId) {
        let (code, message) = refusal(timely("below", conn.get_page(PG, page, Lsn(horizon.0 - 1))).await);
        assert_eq!(code, ErrorCode::BelowHorizon, "{message}");
        assert!(message.contains(&format!("GC horizon {horizon}")), "{message}");
        let (_, image) = timely("at the horizon", conn.get_page(PG, page, horizon)).await.expect("a read at the horizon");
        assert_eq!(image, model_image(&log.sent, page, horizon));
    }
}

#[tokio::test]
async fn get_page_and_status_through_memory_disk_images_and_restarts() {
    let env = TestEnv::new();
    let metrics = free_tcp_addr();
    // First without coalescing: pages come from records only, most of them
    // evicted to disk by the 4 KiB read cache.
    let no_coalescing = env.launch(&[0], &["--cache-bytes-max", "4096", "--coalesce-interval-ms", "3600000", "--coalesce-records", "1000000"]);
    let mut node = env.start(&no_coalescing).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut log = PageLog::new();
    append(&conn, 1, &mut log, 30).await;
    assert_pages(&conn, &log).await;

    // Behind: an LSN above SCL is refused, and the stream stays open for the next request.
    let (mut send, mut recv) = conn.conn.open_bi().await.expect("open stream");
    let above = Lsn(log.last_lsn.0 + 1);
    write_message(&mut send, &Message::GetPage { pg: PG, page: PageId(1), lsn: above, epoch: Epoch(0) }).await.expect("send");
    match timely("behind", read_message(&mut recv, FRAME_BYTES_MAX)).await.expect("read") {
        Some(Message::Error { code: ErrorCode::Behind, message }) => {
            assert!(message.contains(&format!("SCL {} < requested {above}", log.last_lsn)), "{message}")
        }
        other => panic!("expected Behind, got {other:?}"),
    }
    write_message(&mut send, &Message::GetPage { pg: PG, page: PageId(1), lsn: log.last_lsn, epoch: Epoch(0) }).await.expect("send");
    match timely("after behind", read_message(&mut recv, FRAME_BYTES_MAX)).await.expect("read") {
        Some(Message::PageReply { image, .. }) => assert_eq!(PageImage::decode(&image).unwrap(), model_image(&log.sent, PageId(1), log.last_lsn)),
        other => panic!("expected a page, got {other:?}"),
    }
    assert_eq!(refusal(conn.get_page(PgId(9), PageId(1), Lsn::ZERO).await).0, ErrorCode::NotHosted);

    // Status: learn the epoch and position; a newer epoch is recorded and
    // fences appends at the old one.
    let s = timely("status", conn.status(Epoch(0), PG, None)).await.expect("status");
    assert_eq!((s.epoch, s.position.scl), (Epoch(1), log.last_lsn));
    // A new generation (the high 32 bits): epochs 1 and 4 are both generation 0.
    let s = timely("status", conn.status(Epoch(4 << 32), PG, None)).await.expect("status raising the epoch");
    assert_eq!(s.epoch, Epoch(4 << 32));
    let refused = Batch { bytes: log.clone().batch(1), lsns: vec![] };
    assert_eq!(refusal(timely("stale append", append_once(&conn, 1, PG, &refused)).await).0, ErrorCode::StaleEpoch);
    assert_eq!(refusal(conn.status(Epoch(0), PgId(9), None).await).0, ErrorCode::NotHosted);

    // kill -9, then with a coalescer that images pages every 50 ms and after 8 records.
    node.kill9();
    let coalescing = env.launch(&[0], &["--cache-bytes-max", "4096", "--coalesce-interval-ms", "50", "--coalesce-records", "8", "--metrics-listen", &metrics]);
    let mut node = env.start(&coalescing).await;
    let conn = node.connect(&ep).await;
    let s = timely("status", conn.status(Epoch(0), PG, None)).await.expect("status");
    assert_eq!(s.epoch, Epoch(4 << 32), "the raised epoch survived kill -9");
    // Every page passes 8 records since its last image (if any): each is imaged.
    append(&conn, 4 << 32, &mut log, 10).await;
    wait_metric(&metrics, COALESCED, |n| n >= PAGES as f64).await;
    assert!(std::fs::metadata(env.pages_path(0)).expect("page file").len() > 0);
    assert!(metric(&metrics, "storaged_page_image_bytes_total{node=\"1\"}").await.unwrap() > 0.0);
    // From images and the records above them.
    assert_pages(&conn, &log).await;
    assert!(metric(&metrics, "storaged_get_page_requests_total{node=\"1\"}").await.unwrap() > 0.0);

    // kill -9 and restart: images come back from the page file.
    node.kill9();
    let mut node = env.start(&coalescing).await;
    assert!(!node.log().contains("truncating page file"), "a clean page file is loaded whole");
    let conn = node.connect(&ep).await;
    assert_pages(&conn, &log).await;

    // A torn entry at the end of the page file is cut off at start, and the node serves.
    node.kill9();
    let pages = env.pages_path(0);
    let clean_len = std::fs::metadata(&pages).expect("page file").len();
    let mut bytes = std::fs::read(&pages).expect("read page file");
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 5, 6]); // header of a 40-byte image, then 2 bytes
    std::fs::write(&pages, &bytes).expect("tear page file");
    let node = env.start(&coalescing).await;
    node.wait_log("truncating page file", REPLY_TIMEOUT).await;
    let conn = node.connect(&ep).await;
    assert_pages(&conn, &log).await;
    assert!(std::fs::metadata(&pages).expect("page file").len() >= clean_len, "only the torn entry was cut");
}

#[tokio::test]
async fn a_corrupt_page_file_entry_is_truncated_and_pages_rebuilt_from_the_log() {
    let env = TestEnv::new();
    let metrics = free_tcp_addr();
    let launch = env.launch(&[0], &["--coalesce-interval-ms", "50", "--coalesce-records", "4", "--metrics-listen", &metrics]);
    let mut node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut log = PageLog::new();
    append(&conn, 1, &mut log, 5).await;
    wait_metric(&metrics, COALESCED, |n| n >= PAGES as f64).await;
    node.kill9();

    // Flip a byte inside the first image: its CRC fails, so it and everything after go.
    let pages = env.pages_path(0);
    let mut bytes = std::fs::read(&pages).expect("read page file");
    bytes[12] ^= 0xff;
    std::fs::write(&pages, &bytes).expect("corrupt page file");
    let node = env.start(&launch).await;
    node.wait_log("truncating page file", REPLY_TIMEOUT).await;
    let conn = node.connect(&ep).await;
    assert_pages(&conn, &log).await;
    // The coalescer writes the images again.
    wait_metric(&metrics, COALESCED, |n| n >= PAGES as f64).await;
    assert_pages(&conn, &log).await;
}

/// With a writer's GC horizon on its frames, storage drops what no read at or
/// above it needs: the page index keeps each page's records above its base
/// image only, the page file is rewritten with its live images once they are
/// a third of it, and the segment file's blocks below the log's new start
/// are freed. Pulls of the reclaimed log are refused, pages at the horizon
/// and above still match the model, and after kill -9 a restart reads the
/// checkpoint and the log above its start only.
/// `--segment-prealloc-bytes 1MiB`, the flusher's 1 MiB of zeros ahead of the log, the header.
const PREALLOC_AND_ZEROS: u64 = (2 << 20) + 4096;

#[tokio::test]
async fn disk_below_the_gc_horizon_is_reclaimed_and_a_restart_reads_only_the_tail() {
    let env = TestEnv::new();
    let metrics = free_tcp_addr();
    let retain = 256 << 10;
    let retain_arg = retain.to_string();
    let args = ["--coalesce-interval-ms", "50", "--log-retain-bytes", &retain_arg, "--segment-prealloc-bytes", "1MiB", "--metrics-listen", &metrics];
    let launch = env.launch(&[0], &args);
    let mut node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut log = PageLog::new();
    log.padding = 1000;
    // The horizon trails the log by one batch, like a writer whose replicas keep up.
    let series = |name: &str| format!("storaged_{name}{{node=\"1\"}}");
    let gauge = |name: &str| format!("storaged_segment_{name}{{node=\"1\",pg=\"0\"}}");
    while metric(&metrics, &series("page_compactions_total")).await.unwrap_or(0.0) < 1.0
        || metric(&metrics, &series("log_reclaimed_bytes_total")).await.unwrap_or(0.0) < (2 * PREALLOC_AND_ZEROS) as f64
    {
        append_with_horizon(&conn, 1, &mut log, 10, |last| last).await;
        assert!(log.sent.len() < 100_000, "nothing was reclaimed after {} records", log.sent.len());
    }
    let reclaimed = Lsn(wait_metric(&metrics, &gauge("reclaimed_lsn"), |l| l > 0.0).await as u64);
    let horizon = Lsn(metric(&metrics, &gauge("gc_horizon")).await.unwrap() as u64);
    assert!(reclaimed <= horizon, "reclaimed {reclaimed} above the horizon {horizon}");

    // The segment file keeps its size and offsets; its blocks below the start
    // are freed. Beyond the log it holds at most a preallocation step and the
    // flusher's zeros ahead.
    let written = log.sent.values().map(|r| r.len() as u64).sum::<u64>();
    let freed = metric(&metrics, &series("log_reclaimed_bytes_total")).await.unwrap() as u64;
    let seg = std::fs::metadata(env.segment_path(0)).expect("segment file");
    let allocated = std::os::unix::fs::MetadataExt::blocks(&seg) * 512;
    assert!(allocated + freed <= written + PREALLOC_AND_ZEROS, "segment file holds {allocated} bytes of {written} written, {freed} freed");
    let live = metric(&metrics, &gauge("live_image_bytes")).await.unwrap();
    let page_file = metric(&metrics, &gauge("page_file_bytes")).await.unwrap();
    assert!(page_file <= 3.0 * live + (retain as f64), "page file {page_file} bytes for {live} live ones");
    let indexed = metric(&metrics, &gauge("page_index_records")).await.unwrap();
    assert!(indexed < (log.sent.len() / 2) as f64, "the index keeps only records above each page's base: {indexed} of {}", log.sent.len());

    let (code, message) = refusal(timely("reclaimed pull", conn.pull(PG, Lsn::ZERO, log.last_lsn, 1 << 20)).await);
    assert_eq!(code, ErrorCode::BelowHorizon, "{message}");
    assert!(message.contains("reclaimed"), "{message}");
    assert_pages_from(&conn, &log, horizon).await;

    node.kill9();
    let node = env.start(&launch).await;
    let started = node.wait_log("recovered segment", REPLY_TIMEOUT).await;
    let line = started.lines().find(|l| l.contains("recovered segment")).expect("the recovery line");
    let records: usize = line.split("records=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()).expect("records=N");
    assert!(records < log.sent.len() / 2, "a restart scans the log above the checkpoint only: {records} of {} records\n{line}", log.sent.len());
    assert!(!started.contains("truncating page file"), "the checkpointed page file is whole");
    let conn = node.connect(&ep).await;
    // The horizon of the last checkpoint: at or above what was reclaimed, at or below the last one sent.
    let kept = Lsn(metric(&metrics, &gauge("gc_horizon")).await.unwrap() as u64);
    assert!(kept >= reclaimed && kept <= horizon, "the checkpoint kept horizon {kept}: reclaimed {reclaimed}, sent {horizon}");
    let (code, _) = refusal(timely("below the horizon after restart", conn.get_page(PG, PageId(0), Lsn(kept.0 - 1))).await);
    assert_eq!(code, ErrorCode::BelowHorizon, "the checkpoint kept the horizon");
    assert_pages_from(&conn, &log, horizon).await;
    // It takes appends on from where it was.
    append_with_horizon(&conn, 1, &mut log, 2, |last| last).await;
    assert_pages_from(&conn, &log, log.last_lsn).await;
}
