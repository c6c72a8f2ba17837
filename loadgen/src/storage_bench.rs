//! `loadgen storage-bench`: drives 1 or 6 storaged processes over QUIC with
//! pipelined redo batches, at full speed and then open-loop at a fraction of
//! the measured maximum, and compares the results with the raw disk and raw
//! QUIC ceilings measured in the same run.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use borealis_net::storage::ClientError;
use hdrhistogram::Histogram;
use redo_core::record::{RecordHeader, RECORD_OVERHEAD_BYTES};
use redo_core::wire::{encode_append, ErrorCode, APPEND_HEADER_BYTES};
use redo_core::{Epoch, Lsn, PageId, PgId};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::ceilings::{self, DiskCeiling, QuicCeiling};
use crate::cluster::{metric_sum, scrape, Ack, LocalStorage, WorkDir};
use crate::pacing::{pace, TICKS_QUEUED_MAX};
use crate::report::{latency_histogram, median, median_by, write_hgrm, LatencyUs};

#[derive(clap::Args, Debug, Clone)]
pub struct StorageBenchArgs {
    /// Storage node counts to measure: 1 (one node) and/or 6 (a protection group; a batch counts when 4 of 6 acked).
    #[arg(long, value_delimiter = ',', default_value = "1,6")]
    pub nodes: Vec<u32>,
    /// Protection groups per node; one pipelined append stream per PG and node.
    #[arg(long, default_value_t = 2)]
    pub pgs: u32,
    /// Repetitions; the summary reports medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds of load per phase.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Payload bytes per redo record (each record adds 41 bytes of header and CRC).
    #[arg(long, default_value_t = 100)]
    pub record_bytes: usize,
    /// Records per append batch.
    #[arg(long, default_value_t = 256)]
    pub batch_records: usize,
    /// Batches in flight per stream at full speed.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Storage ack mode.
    #[arg(long, value_enum, default_value = "memory")]
    pub ack: Ack,
    /// Load of the latency phase, as a fraction of the full-speed throughput of the same run.
    #[arg(long, default_value_t = 0.5)]
    pub latency_load: f64,
    /// storaged --flush-bytes-max, also the write size of the raw disk ceiling.
    #[arg(long, default_value = "2MiB", value_parser = storaged_size)]
    pub flush_bytes_max: u64,
    /// Extra storaged options, e.g. `--storaged-arg=--cache-bytes-max=8MiB` (repeatable).
    #[arg(long = "storaged-arg", allow_hyphen_values = true)]
    pub storaged_args: Vec<String>,
    /// Directory for results (JSON and .hgrm files); the committed results live in bench-results/storage-bench.
    #[arg(long, default_value = "bench-results/latest/storage-bench")]
    pub out: PathBuf,
    /// Working directory for data dirs and the raw-disk test file (same disk as the data) [default: a temp dir].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

fn storaged_size(s: &str) -> Result<u64, String> {
    let n = borealis_net::parse_bytes(s)?;
    if n == 0 || n % 4096 != 0 {
        return Err("must be a positive multiple of 4096".into());
    }
    Ok(n)
}

#[derive(Serialize, Clone, Debug)]
pub struct PhaseResult {
    pub offered_batches_per_s: Option<f64>,
    pub records_per_s: f64,
    /// Record bytes per second ingested by each node (the quorum stream).
    pub ingest_mb_per_s: f64,
    /// Record bytes per second made durable on each node, from start until the flush caught up.
    pub flush_mb_per_s: f64,
    /// Append sent (or due, open-loop) to ack received, every ack from every node.
    pub ack_latency_us: LatencyUs,
    /// Append sent (or due) to the 4th of 6 acks (the 1st with one node).
    pub quorum_latency_us: LatencyUs,
    /// storaged's own flush latency (write submitted to durable), median over nodes.
    pub flush_latency_us_p50: f64,
    pub flush_latency_us_p99: f64,
    /// storaged's own ack latency (frame received to ack sent), p99, median over nodes.
    pub server_ack_latency_us_p99: f64,
    pub busy_replies: u64,
    #[serde(skip)]
    pub quorum_hist: Option<Histogram<u64>>,
}

#[derive(Serialize, Clone, Debug)]
pub struct RunResult {
    pub nodes: u32,
    pub disk_ceiling: DiskCeiling,
    pub quic_ceiling: QuicCeiling,
    /// `storaged bench-flush`: the flush path without the network, MB/s.
    pub flush_path_mb_per_s: f64,
    pub full_speed: PhaseResult,
    pub at_load: PhaseResult,
    /// Raw quinn request/response at the at-load rate and batch size, one connection per node: the QUIC floor for `at_load`.
    pub raw_quic_latency_at_load_us: LatencyUs,
}

/// Batches a stream's quorum counter keeps after they reached quorum.
const QUORUM_TRACKED_MAX: usize = 64;

/// Counts acks per batch of one stream and records the latency of the
/// `needed`-th (the 4th of 6, or the only one).
struct Quorum {
    needed: u8,
    nodes: u8,
    /// Sequence number of `counts[0]`.
    base: u64,
    counts: VecDeque<u8>,
    hist: Histogram<u64>,
    records: u64,
    last: Instant,
}

impl Quorum {
    fn ack(&mut self, seq: u64, due: Instant, records: u64) {
        let Some(i) = seq.checked_sub(self.base) else { return }; // a straggler after its batch was retired
        let i = i as usize;
        while self.counts.len() <= i {
            self.counts.push_back(0);
        }
        self.counts[i] += 1;
        if self.counts[i] == self.needed {
            let now = Instant::now();
            self.hist.saturating_record((now - due).as_micros() as u64);
            self.records += records;
            self.last = now;
        }
        // Retire batches every node acked, and quorate ones once far behind (their stragglers no longer count).
        while self.counts.front().is_some_and(|&c| c == self.nodes || (c >= self.needed && self.counts.len() > QUORUM_TRACKED_MAX)) {
            self.counts.pop_front();
            self.base += 1;
        }
    }
}

fn encode_batch(next_lsn: &mut Lsn, records: usize, payload: &[u8], out: &mut Vec<u8>) -> Lsn {
    out.clear();
    for _ in 0..records {
        let prev = *next_lsn;
        let lsn = Lsn(prev.0 + 1);
        RecordHeader { lsn, prev_lsn_in_segment: prev, prev_lsn_for_page: Lsn::ZERO, page: PageId(lsn.0 % 1024), cpl: true }.encode(payload, out);
        *next_lsn = lsn;
    }
    *next_lsn
}

/// Runs one load phase against fresh storage nodes.
async fn phase(args: &StorageBenchArgs, storage: &mut LocalStorage, rate: Option<f64>) -> Result<PhaseResult> {
    let identity = storage.identity()?;
    let endpoint = borealis_net::client_endpoint(&identity)?;
    let conns = storage.connect_all(&endpoint).await?;
    let nodes = conns.len();
    let needed = if nodes >= 6 { 4 } else { 1 };
    let duration = Duration::from_secs_f64(args.seconds);
    let ack_hist = Arc::new(Mutex::new(latency_histogram()));
    let busy = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let mut streams = Vec::new();
    let mut quorums = Vec::new();
    let mut tick_senders = Vec::new();
    for pg in 0..args.pgs {
        let quorum = Quorum { needed, nodes: nodes as u8, base: 0, counts: VecDeque::new(), hist: latency_histogram(), records: 0, last: start };
        let quorum = Arc::new(Mutex::new(quorum));
        quorums.push(quorum.clone());
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for conn in &conns {
            let (send, mut recv) = conn.open_append().await?;
            let (win_tx, mut win_rx) = mpsc::channel::<(u64, Instant)>(args.window);
            senders.push((send, win_tx));
            let (quorum, ack_hist, busy) = (quorum.clone(), ack_hist.clone(), busy.clone());
            let batch_records = args.batch_records as u64;
            receivers.push(tokio::spawn(async move {
                while let Some((seq, due)) = win_rx.recv().await {
                    match recv.recv().await {
                        Ok((position, last)) if position.scl < last => {
                            anyhow::bail!("{} acked batch ending at {last} above a hole (SCL {})", position.pg, position.scl)
                        }
                        Ok(_) => {
                            ack_hist.lock().expect("hist").saturating_record(due.elapsed().as_micros() as u64);
                            quorum.lock().expect("quorum").ack(seq, due, batch_records);
                        }
                        Err(ClientError::Refused { code: ErrorCode::Busy, .. }) => {
                            busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => return Err(anyhow::Error::from(e).context("append")),
                    }
                }
                Ok(())
            }));
        }
        let mut ticks = match &rate {
            Some(_) => {
                let (tx, rx) = mpsc::channel(TICKS_QUEUED_MAX);
                tick_senders.push(tx);
                Some(rx)
            }
            None => None,
        };
        let payload = vec![0xA5u8; args.record_bytes];
        let batch_records = args.batch_records;
        streams.push(tokio::spawn(async move {
            let mut next_lsn = Lsn::ZERO;
            let mut buf = Vec::new();
            let mut seq = 0u64;
            loop {
                // Open loop: the pacer says when each batch is due, and latency counts from then.
                let due = match &mut ticks {
                    Some(ticks) => match ticks.recv().await {
                        Some(due) => due,
                        None => break,
                    },
                    None if start.elapsed() >= duration => break,
                    None => Instant::now(),
                };
                encode_batch(&mut next_lsn, batch_records, &payload, &mut buf);
                // One frame for every node of the protection group.
                let mut frame = Vec::with_capacity(APPEND_HEADER_BYTES + buf.len());
                encode_append(Epoch(1), PgId(pg), Lsn::ZERO, &buf, &mut frame);
                let frame = bytes::Bytes::from(frame);
                for (send, win) in &mut senders {
                    win.send((seq, due)).await.context("ack reader ended early")?;
                    send.send_frame(frame.clone()).await?;
                }
                seq += 1;
            }
            drop(senders);
            for r in receivers {
                r.await??;
            }
            Ok::<_, anyhow::Error>(next_lsn)
        }));
    }
    if let Some(rate) = rate {
        let interval = Duration::from_secs_f64(args.pgs as f64 / rate);
        std::thread::spawn(move || pace(start, interval, duration, tick_senders));
    }
    let mut last_lsns = Vec::new();
    for s in streams {
        last_lsns.push(s.await??);
    }
    // The flush has caught up once every segment's flushed LSN reaches the last record.
    let record_size = (args.record_bytes + RECORD_OVERHEAD_BYTES) as f64;
    let mut flush_secs = Vec::new();
    let mut flush_p50 = Vec::new();
    let mut flush_p99 = Vec::new();
    let mut server_ack_p99 = Vec::new();
    for node in &storage.nodes {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let page = scrape(node.metrics_addr).await?;
            let caught_up =
                (0..args.pgs).all(|pg| metric_sum(&page, "storaged_segment_flushed_lsn", &format!("pg=\"{pg}\"")) as u64 >= last_lsns[pg as usize].0);
            if caught_up {
                flush_secs.push(start.elapsed().as_secs_f64());
                flush_p50.push(metric_sum(&page, "storaged_flush_latency_us", "quantile=\"0.5\""));
                flush_p99.push(metric_sum(&page, "storaged_flush_latency_us", "quantile=\"0.99\""));
                server_ack_p99.push(metric_sum(&page, "storaged_ack_latency_us", "quantile=\"0.99\""));
                break;
            }
            if Instant::now() > deadline {
                let state: Vec<String> = (0..args.pgs)
                    .map(|pg| {
                        let get = |name| metric_sum(&page, name, &format!("pg=\"{pg}\"")) as u64;
                        format!(
                            "pg {pg}: last sent {}, scl {}, flushed {}, hot {} B, held above a hole {}",
                            last_lsns[pg as usize].0,
                            get("storaged_segment_scl"),
                            get("storaged_segment_flushed_lsn"),
                            get("storaged_segment_hot_bytes"),
                            get("storaged_segment_pending_records")
                        )
                    })
                    .collect();
                bail!(
                    "storaged-{} did not flush everything within 60 s ({}; {} Busy replies)",
                    node.node_id,
                    state.join("; "),
                    busy.load(std::sync::atomic::Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    endpoint.close(0u32.into(), b"done");
    let mut quorum_hist = latency_histogram();
    let (mut records, mut last) = (0u64, start);
    for q in &quorums {
        let q = q.lock().expect("quorum");
        quorum_hist.add(&q.hist).expect("same bounds");
        records += q.records;
        last = last.max(q.last);
    }
    let secs = (last - start).as_secs_f64().max(1e-3);
    let ack_latency_us = LatencyUs::of(&ack_hist.lock().expect("hist"));
    let total_bytes: f64 = last_lsns.iter().map(|l| l.0 as f64 * record_size).sum();
    Ok(PhaseResult {
        offered_batches_per_s: rate,
        records_per_s: records as f64 / secs,
        ingest_mb_per_s: records as f64 * record_size / secs / 1e6,
        flush_mb_per_s: total_bytes / median(flush_secs) / 1e6,
        ack_latency_us,
        quorum_latency_us: LatencyUs::of(&quorum_hist),
        flush_latency_us_p50: median(flush_p50),
        flush_latency_us_p99: median(flush_p99),
        server_ack_latency_us_p99: median(server_ack_p99),
        busy_replies: busy.load(std::sync::atomic::Ordering::Relaxed),
        quorum_hist: Some(quorum_hist),
    })
}

async fn with_storage(args: &StorageBenchArgs, dir: &std::path::Path, nodes: u32, rate: Option<f64>) -> Result<PhaseResult> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let pgs: Vec<u32> = (0..args.pgs).collect();
    let mut extra = vec!["--ack".into(), args.ack.as_str().into(), "--flush-bytes-max".into(), args.flush_bytes_max.to_string()];
    extra.extend(args.storaged_args.iter().cloned());
    let mut storage = LocalStorage::start(dir, nodes, &pgs, &extra)?;
    let result = phase(args, &mut storage, rate).await;
    storage.stop()?;
    let _ = std::fs::remove_dir_all(dir);
    result
}

pub async fn run(args: StorageBenchArgs) -> Result<()> {
    let work_dir = WorkDir::new(args.work_dir.as_deref(), "borealis-storage-bench")?;
    let work = work_dir.path.clone();
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let certs_dir = work.join("ceiling-certs");
    borealis_net::certs::generate(&certs_dir, &["loadgen".to_string()])?;
    let identity = borealis_net::TlsIdentity::load(&certs_dir, "loadgen")?;
    let ceiling_time = Duration::from_secs_f64(args.seconds.min(3.0));
    let duration = Duration::from_secs_f64(args.seconds);
    let mut runs: Vec<RunResult> = Vec::new();
    for run in 0..args.runs {
        for &nodes in &args.nodes {
            eprintln!("run {}/{} with {nodes} node(s): ceilings", run + 1, args.runs);
            let disk_ceiling = ceilings::raw_disk(&work, args.flush_bytes_max as usize, ceiling_time)?;
            let quic_ceiling = ceilings::raw_quic(&identity, ceiling_time).await?;
            let flush_path_mb_per_s = ceilings::flush_path(&work, args.flush_bytes_max as usize, ceiling_time)?;
            eprintln!(
                "  raw disk {:.0} MB/s, flush path {:.0} MB/s, raw QUIC {:.0} MB/s; full speed",
                disk_ceiling.mb_per_s, flush_path_mb_per_s, quic_ceiling.mb_per_s
            );
            let dir = work.join(format!("cluster-{nodes}"));
            let full_speed = with_storage(&args, &dir, nodes, None).await?;
            let batches_per_s = full_speed.records_per_s / args.batch_records as f64 * args.latency_load;
            eprintln!(
                "  full speed {:.0} records/s, {:.0} MB/s per node; at {:.0}% load",
                full_speed.records_per_s,
                full_speed.ingest_mb_per_s,
                args.latency_load * 100.0
            );
            let at_load = with_storage(&args, &dir, nodes, Some(batches_per_s)).await?;
            let batch_bytes = args.batch_records * (args.record_bytes + RECORD_OVERHEAD_BYTES) + APPEND_HEADER_BYTES;
            let raw_quic_latency_at_load_us = ceilings::raw_quic_latency(&identity, batch_bytes, batches_per_s, duration, nodes).await?;
            eprintln!(
                "  quorum ack p50 {} us p99 {} us; raw QUIC request/response at the same rate p50 {} us p99 {} us",
                at_load.quorum_latency_us.p50, at_load.quorum_latency_us.p99, raw_quic_latency_at_load_us.p50, raw_quic_latency_at_load_us.p99
            );
            runs.push(RunResult { nodes, disk_ceiling, quic_ceiling, flush_path_mb_per_s, full_speed, at_load, raw_quic_latency_at_load_us });
        }
    }
    let summary = summarize(&args, &runs)?;
    let json = serde_json::json!({ "params": format!("{args:?}"), "summary": summary, "runs": runs });
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", path.display()))?;
    println!("{}", table(&summary));
    println!("wrote {}", path.display());
    work_dir.cleanup();
    Ok(())
}

#[derive(Serialize, Debug)]
pub struct Summary {
    pub nodes: u32,
    pub runs: usize,
    pub raw_disk_mb_per_s: f64,
    pub raw_quic_mb_per_s: f64,
    pub full_speed_records_per_s: f64,
    pub full_speed_ingest_mb_per_s: f64,
    pub ingest_vs_raw_quic: f64,
    /// Flush during the network run (bounded by ingest).
    pub flush_mb_per_s: f64,
    pub flush_path_mb_per_s: f64,
    pub flush_path_vs_raw_disk: f64,
    pub full_speed_quorum_latency_us_p99: f64,
    pub at_load_records_per_s: f64,
    pub at_load_ack_latency_us_p50: f64,
    pub at_load_ack_latency_us_p99: f64,
    pub at_load_ack_latency_us_p999: f64,
    pub at_load_quorum_latency_us_p50: f64,
    pub at_load_quorum_latency_us_p99: f64,
    pub at_load_quorum_latency_us_p999: f64,
    pub flush_latency_us_p50: f64,
    pub flush_latency_us_p99: f64,
    pub raw_quic_latency_at_load_us_p50: f64,
    pub raw_quic_latency_at_load_us_p99: f64,
    pub busy_replies: u64,
}

fn summarize(args: &StorageBenchArgs, runs: &[RunResult]) -> Result<Vec<Summary>> {
    let mut out = Vec::new();
    for &nodes in &args.nodes {
        let rs: Vec<&RunResult> = runs.iter().filter(|r| r.nodes == nodes).collect();
        let m = |f: &dyn Fn(&RunResult) -> f64| median(rs.iter().map(|r| f(r)).collect());
        // The median run's histogram goes to disk, for plots.
        if let Some(h) = &median_by(&rs, |r| r.at_load.quorum_latency_us.p99).at_load.quorum_hist {
            write_hgrm(&args.out.join(format!("quorum-ack-latency-{nodes}-nodes.hgrm")), h, 1.0)?;
        }
        out.push(Summary {
            nodes,
            runs: rs.len(),
            raw_disk_mb_per_s: m(&|r| r.disk_ceiling.mb_per_s),
            raw_quic_mb_per_s: m(&|r| r.quic_ceiling.mb_per_s),
            full_speed_records_per_s: m(&|r| r.full_speed.records_per_s),
            full_speed_ingest_mb_per_s: m(&|r| r.full_speed.ingest_mb_per_s),
            ingest_vs_raw_quic: m(&|r| r.full_speed.ingest_mb_per_s * r.nodes as f64 / r.quic_ceiling.mb_per_s),
            flush_mb_per_s: m(&|r| r.full_speed.flush_mb_per_s),
            flush_path_mb_per_s: m(&|r| r.flush_path_mb_per_s),
            flush_path_vs_raw_disk: m(&|r| r.flush_path_mb_per_s / r.disk_ceiling.mb_per_s),
            full_speed_quorum_latency_us_p99: m(&|r| r.full_speed.quorum_latency_us.p99 as f64),
            at_load_records_per_s: m(&|r| r.at_load.records_per_s),
            at_load_ack_latency_us_p50: m(&|r| r.at_load.ack_latency_us.p50 as f64),
            at_load_ack_latency_us_p99: m(&|r| r.at_load.ack_latency_us.p99 as f64),
            at_load_ack_latency_us_p999: m(&|r| r.at_load.ack_latency_us.p999 as f64),
            at_load_quorum_latency_us_p50: m(&|r| r.at_load.quorum_latency_us.p50 as f64),
            at_load_quorum_latency_us_p99: m(&|r| r.at_load.quorum_latency_us.p99 as f64),
            at_load_quorum_latency_us_p999: m(&|r| r.at_load.quorum_latency_us.p999 as f64),
            flush_latency_us_p50: m(&|r| r.full_speed.flush_latency_us_p50),
            flush_latency_us_p99: m(&|r| r.full_speed.flush_latency_us_p99),
            raw_quic_latency_at_load_us_p50: m(&|r| r.raw_quic_latency_at_load_us.p50 as f64),
            raw_quic_latency_at_load_us_p99: m(&|r| r.raw_quic_latency_at_load_us.p99 as f64),
            busy_replies: rs.iter().map(|r| r.full_speed.busy_replies + r.at_load.busy_replies).sum(),
        });
    }
    Ok(out)
}

fn table(summary: &[Summary]) -> String {
    let mut t = String::from(
        "| nodes | raw disk MB/s | flush path MB/s | flush path/raw disk | raw QUIC MB/s | ingest rec/s | ingest MB/s/node | ingest/raw QUIC | flush MB/s (keeps up) | ack p50/p99/p99.9 us at load | quorum p50/p99/p99.9 us at load | raw QUIC req/resp p50/p99 us at load |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in summary {
        t += &format!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0}/{:.0}/{:.0} | {:.0}/{:.0}/{:.0} | {:.0}/{:.0} |\n",
            s.nodes,
            s.raw_disk_mb_per_s,
            s.flush_path_mb_per_s,
            s.flush_path_vs_raw_disk,
            s.raw_quic_mb_per_s,
            s.full_speed_records_per_s,
            s.full_speed_ingest_mb_per_s,
            s.ingest_vs_raw_quic,
            s.flush_mb_per_s,
            s.at_load_ack_latency_us_p50,
            s.at_load_ack_latency_us_p99,
            s.at_load_ack_latency_us_p999,
            s.at_load_quorum_latency_us_p50,
            s.at_load_quorum_latency_us_p99,
            s.at_load_quorum_latency_us_p999,
            s.raw_quic_latency_at_load_us_p50,
            s.raw_quic_latency_at_load_us_p99
        );
    }
    t
}
