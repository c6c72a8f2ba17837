//! The Prometheus endpoint reports what the node did.

mod common;

use std::time::{Duration, Instant};

use common::*;
use redo_core::{Epoch, PgId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to metrics port");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("send request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.expect("read reply");
    reply
}

fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_report_ingest_positions_and_latencies() {
    let env = TestEnv::new();
    let metrics_addr = free_tcp_addr();
    let launch = env.launch(&[0, 1], &["--metrics-listen", &metrics_addr]);
    let node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;

    let mut chain = Chain::new(0, 100);
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    for _ in 0..20 {
        let b = chain.batch(5);
        tx.send(Epoch(1), PgId(0), &b.bytes).await.expect("send");
        timely("ack", rx.recv()).await.expect("ack");
    }
    let last = chain.last_lsn.0 as f64;
    let pg0 = "{node=\"1\",pg=\"0\"}";

    // The flush is asynchronous: wait (with a deadline) until the gauge shows it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let reply = scrape(&metrics_addr, "/metrics").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        let page = reply.split_once("\r\n\r\n").expect("body").1.to_string();
        if sample(&page, &format!("storaged_segment_flushed_lsn{pg0}")) == Some(last) {
            break page;
        }
        assert!(Instant::now() < deadline, "flushed_lsn gauge never reached {last}:\n{page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(sample(&page, &format!("storaged_segment_scl{pg0}")), Some(last));
    assert_eq!(sample(&page, "storaged_segment_scl{node=\"1\",pg=\"1\"}"), Some(0.0));
    assert_eq!(sample(&page, "storaged_ingest_records_total{node=\"1\"}"), Some(100.0));
    assert_eq!(sample(&page, "storaged_ingest_bytes_total{node=\"1\"}"), Some(100.0 * 141.0));
    assert_eq!(sample(&page, "storaged_flushed_bytes_total{node=\"1\"}"), Some(100.0 * 141.0));
    assert_eq!(sample(&page, &format!("storaged_segment_hot_bytes{pg0}")), Some(0.0));
    assert_eq!(sample(&page, "storaged_ack_latency_us_count"), Some(20.0));
    assert_eq!(sample(&page, "storaged_append_batch_records{quantile=\"0.5\"}"), Some(5.0));
    assert!(sample(&page, "storaged_flush_latency_us_count").is_some_and(|n| n >= 1.0));

    let other = scrape(&metrics_addr, "/nope").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}
