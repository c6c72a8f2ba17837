//! `storaged bench-flush`: the flush path alone (segment logs, the io_uring
//! flusher, O_DIRECT + O_DSYNC writes on real files) fed from memory as
//! fast as the hot-log limit allows, without the network. loadgen compares
//! it with the raw disk ceiling.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use redo_core::record::{RecordHeader, ValidRecords};
use redo_core::{Epoch, Lsn, PageId, PgId};

use crate::config::{AckMode, Config};
use crate::flusher::Flusher;
use crate::node::{Node, Pages};

#[derive(clap::Args, Debug, Clone)]
pub struct FlushBenchArgs {
    /// Directory for the segment files (on the disk to measure); emptied first.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Segments flushed concurrently.
    #[arg(long, default_value_t = 2)]
    pub segments: u32,
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    #[arg(long, default_value = "2MiB", value_parser = borealis_net::parse_bytes)]
    pub flush_bytes_max: u64,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 100)]
    pub record_bytes: usize,
}

/// Feeds every segment in round-robin, waiting while a hot log is full, then
/// prints `{"flushed_bytes": .., "seconds": .., "mb_per_s": ..}`.
pub fn run(args: FlushBenchArgs) -> Result<()> {
    let _ = std::fs::remove_dir_all(&args.data_dir);
    let config = Config {
        node_id: 1,
        az: "bench".into(),
        listen: "127.0.0.1:0".parse().expect("literal"),
        data_dir: args.data_dir.clone(),
        certs: PathBuf::new(),
        cert_name: None,
        pgs: (0..args.segments).collect(),
        ack: AckMode::Memory,
        hot_log_bytes_max: 8 * args.flush_bytes_max,
        cache_bytes_max: 0,
        frame_bytes_max: args.flush_bytes_max,
        inflight_bytes_max: args.flush_bytes_max,
        flush_bytes_max: args.flush_bytes_max,
        flush_delay_ms: 0,
        flush_interval_us: 0,
        segment_prealloc_bytes: 256 << 20,
        busy_wait_ms: 0,
        coalesce_interval_ms: 1000,
        coalesce_records: 64,
        log_retain_bytes: 64 << 20,
        metrics_listen: None,
        volume: None,
        gossip_interval_ms: 0,
        worker_threads: 1,
    };
    let (node, files) = Node::open(config, Pages::LogOnly)?;
    let targets = crate::flusher::targets(&node, files);
    let runtime = crate::flusher::runtime_thread()?;
    let flusher = runtime.block_on(async { Flusher::spawn(targets, node.wake.clone()) })?;

    let payload = vec![0x5Au8; args.record_bytes];
    let batch_bytes = args.flush_bytes_max as usize / 4;
    let mut lsns = vec![Lsn::ZERO; args.segments as usize];
    let mut buf = Vec::with_capacity(batch_bytes + 4096);
    let duration = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let mut appended = 0u64;
    while start.elapsed() < duration {
        let mut progressed = false;
        for (i, lsn) in lsns.iter_mut().enumerate() {
            let seg = &node.segments[&PgId(i as u32)];
            buf.clear();
            let mut next = *lsn;
            while buf.len() < batch_bytes {
                let l = Lsn(next.0 + 1);
                RecordHeader { lsn: l, prev_lsn_in_segment: next, prev_lsn_for_page: Lsn::ZERO, page: PageId(l.0 % 64), cpl: true }.encode(&payload, &mut buf);
                next = l;
            }
            // The batch overshoots batch_bytes by up to a record: check what it really adds.
            if seg.log.lock().expect("segment lock").hot_bytes() + buf.len() > 8 * args.flush_bytes_max as usize {
                continue;
            }
            let records = ValidRecords::validate(Bytes::copy_from_slice(&buf), 0)?.expect("non-empty");
            seg.with_log(|log| log.handle_append(Epoch(1), &records)).context("append")?;
            node.wake.wake();
            *lsn = next;
            appended += buf.len() as u64;
            progressed = true;
        }
        if !progressed {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    runtime.block_on(flusher.stop())?;
    let secs = start.elapsed().as_secs_f64();
    let flushed = node.metrics.flushed_bytes.load(Ordering::Relaxed);
    anyhow::ensure!(flushed == appended, "flushed {flushed} bytes of {appended} appended");
    println!("{{\"flushed_bytes\": {flushed}, \"seconds\": {secs:.4}, \"mb_per_s\": {:.1}}}", flushed as f64 / secs / 1e6);
    let _ = std::fs::remove_dir_all(&args.data_dir);
    Ok(())
}
