//! The ceilings storage is measured against, taken in the same run on the
//! same machine: raw sequential O_DIRECT + O_DSYNC writes through io_uring
//! (the flusher's own pattern, one durable write in flight), and raw QUIC
//! loopback throughput through quinn with the cluster's TLS configuration.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use io_uring::{opcode, types, IoUring};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::pacing::{pace, TICKS_QUEUED_MAX};
use crate::report::{latency_histogram, LatencyUs};

const BLOCK: usize = 4096;
const QUIC_CHUNK_BYTES: usize = 64 << 10;

#[derive(Serialize, Clone, Copy, Debug)]
pub struct DiskCeiling {
    pub write_bytes: usize,
    pub mb_per_s: f64,
    pub syncs_per_s: f64,
}

/// Writes `write_bytes` blocks sequentially into a fresh preallocated file in
/// `dir`, each O_DSYNC (durable when it completes), for `duration`.
pub fn raw_disk(dir: &Path, write_bytes: usize, duration: Duration) -> Result<DiskCeiling> {
    assert!(write_bytes.is_multiple_of(BLOCK) && write_bytes > 0);
    let path = dir.join("raw-disk-ceiling.tmp");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let mut allocated = 0u64;
    let layout = std::alloc::Layout::from_size_align(write_bytes, BLOCK).expect("layout");
    // SAFETY: non-zero size; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!buf.is_null());
    // SAFETY: buf holds write_bytes initialised bytes.
    unsafe { std::slice::from_raw_parts_mut(buf, write_bytes) }.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    let mut ring = IoUring::new(8).context("create io_uring")?;
    let fd = types::Fd(file.as_raw_fd());
    let start = Instant::now();
    let (mut offset, mut syncs) = (0u64, 0u64);
    let result = (|| -> Result<()> {
        while start.elapsed() < duration {
            if offset + write_bytes as u64 > allocated {
                let grow = 64u64 << 20;
                // SAFETY: plain syscall on our descriptor.
                if unsafe { libc::fallocate(file.as_raw_fd(), 0, allocated as i64, grow as i64) } != 0 {
                    bail!("fallocate: {}", std::io::Error::last_os_error());
                }
                allocated += grow;
            }
            let write = opcode::Write::new(fd, buf, write_bytes as u32).offset(offset).rw_flags(libc::RWF_DSYNC).build();
            // SAFETY: buffer and file outlive the write, which completes before the next loop.
            unsafe { ring.submission().push(&write).expect("room") };
            ring.submit_and_wait(1)?;
            for c in ring.completion() {
                if c.result() < 0 {
                    bail!("raw disk write: {}", std::io::Error::from_raw_os_error(-c.result()));
                }
            }
            offset += write_bytes as u64;
            syncs += 1;
        }
        Ok(())
    })();
    let secs = start.elapsed().as_secs_f64();
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    drop(file);
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(DiskCeiling { write_bytes, mb_per_s: offset as f64 / secs / 1e6, syncs_per_s: syncs as f64 / secs })
}

#[derive(Serialize, Clone, Copy, Debug)]
pub struct QuicCeiling {
    pub mb_per_s: f64,
}

/// Streams bulk data over one mutual-TLS QUIC stream on loopback for `duration`.
pub async fn raw_quic(identity: &borealis_net::TlsIdentity, duration: Duration) -> Result<QuicCeiling> {
    let server = borealis_net::server_endpoint(identity, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let sink = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (_send, mut recv) = conn.accept_bi().await?;
        let mut bytes = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            bytes += chunk.bytes.len() as u64;
        }
        Ok::<_, anyhow::Error>((bytes, Instant::now()))
    });
    let client = borealis_net::client_endpoint(identity)?;
    let conn = borealis_net::connect(&client, addr).await?;
    let (mut send, _recv) = conn.open_bi().await?;
    let chunk = bytes::Bytes::from(vec![7u8; QUIC_CHUNK_BYTES]);
    let start = Instant::now();
    while start.elapsed() < duration {
        send.write_chunk(chunk.clone()).await?;
    }
    send.finish()?;
    let (bytes, end) = sink.await??;
    Ok(QuicCeiling { mb_per_s: bytes as f64 / (end - start).as_secs_f64() / 1e6 })
}

/// Request/response over mutual-TLS quinn streams on loopback, open-loop at
/// `rate` messages/s of `message_bytes` on each of `connections` connections
/// (one per storage node), each message answered with a 40-byte reply: the
/// latency floor of QUIC itself for the storage bench's traffic.
pub async fn raw_quic_latency(
    identity: &borealis_net::TlsIdentity,
    message_bytes: usize,
    rate: f64,
    duration: Duration,
    connections: u32,
) -> Result<LatencyUs> {
    const REPLY_BYTES: usize = 40;
    let client = borealis_net::client_endpoint(identity)?;
    let mut tick_senders = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let server = borealis_net::server_endpoint(identity, "127.0.0.1:0".parse()?)?;
        let addr = server.local_addr()?;
        tokio::spawn(async move {
            let conn = server.accept().await.context("no connection")?.await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut buf = vec![0u8; message_bytes];
            while recv.read_exact(&mut buf).await.is_ok() {
                send.write_all(&[1u8; REPLY_BYTES]).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
        let conn = borealis_net::connect(&client, addr).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let (inflight_tx, mut inflight_rx) = mpsc::channel::<Instant>(TICKS_QUEUED_MAX);
        let reader = tokio::spawn(async move {
            let mut hist = latency_histogram();
            let mut reply = [0u8; REPLY_BYTES];
            while let Some(due) = inflight_rx.recv().await {
                recv.read_exact(&mut reply).await?;
                hist.saturating_record(due.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(hist)
        });
        let (tick_tx, mut ticks) = mpsc::channel(TICKS_QUEUED_MAX);
        tick_senders.push(tick_tx);
        tasks.push(tokio::spawn(async move {
            let message = vec![7u8; message_bytes];
            while let Some(due) = ticks.recv().await {
                inflight_tx.send(due).await?;
                send.write_all(&message).await?;
            }
            drop(inflight_tx);
            let hist = reader.await??;
            conn.close(0u32.into(), b"done");
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    std::thread::spawn(move || pace(start, interval, duration, tick_senders));
    let mut all = latency_histogram();
    for t in tasks {
        all.add(t.await??).expect("same bounds");
    }
    Ok(LatencyUs::of(&all))
}

/// The flush path alone: `storaged bench-flush` (segment logs fed from
/// memory, the real io_uring flusher, no network), in MB/s.
pub fn flush_path(dir: &Path, write_bytes: usize, duration: Duration) -> Result<f64> {
    let bin = crate::cluster::storaged_binary()?;
    let out = std::process::Command::new(&bin)
        .arg("bench-flush")
        .arg("--data-dir")
        .arg(dir.join("bench-flush"))
        .args(["--seconds", &duration.as_secs_f64().to_string(), "--flush-bytes-max", &write_bytes.to_string()])
        .stderr(std::process::Stdio::null())
        .output()
        .with_context(|| format!("run {} bench-flush", bin.display()))?;
    if !out.status.success() {
        bail!("storaged bench-flush failed: {}", out.status);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parse bench-flush output")?;
    v["mb_per_s"].as_f64().context("bench-flush output lacks mb_per_s")
}
