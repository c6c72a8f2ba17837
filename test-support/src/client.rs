//! What the writer and replica tests do through the client API and the metrics pages:
//! read points followed, loads of distinct puts, acknowledged writes read back, frames a
//! server must refuse.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use borealis_net::api::ApiClient;
use borealis_net::TlsIdentity;
use redo_core::Lsn;

use crate::cluster::Cluster;
use crate::process::Proc;
use crate::process::REPLY_TIMEOUT;

/// `GET /metrics` from `addr` (status line and headers included).
pub fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of an unlabelled sample.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' '))).unwrap_or_else(|| panic!("no {name} in:\n{text}")).parse().unwrap()
}

/// A server's read point (VDL from a writer, applied VDL from a replica) as of now: the
/// first report of a new `Follow` feed, which is at least the read point when this was called.
pub async fn read_point(client: &ApiClient) -> Lsn {
    let first = async { client.follow().await?.next().await };
    tokio::time::timeout(REPLY_TIMEOUT, first).await.expect("progress in time").expect("follow").vdl
}

/// A server's read point, followed in the background.
pub struct ReadPoint {
    rx: tokio::sync::watch::Receiver<Lsn>,
    /// Set when a report went below the one before: the feed stops there.
    went_back: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadPoint {
    pub async fn follow(client: &ApiClient) -> ReadPoint {
        let mut feed = tokio::time::timeout(REPLY_TIMEOUT, client.follow()).await.expect("follow in time").expect("follow");
        let first = tokio::time::timeout(REPLY_TIMEOUT, feed.next()).await.expect("progress in time").expect("progress").vdl;
        let (tx, rx) = tokio::sync::watch::channel(first);
        let went_back = std::sync::Arc::new(std::sync::Mutex::new(None));
        let task = tokio::spawn({
            let went_back = went_back.clone();
            async move {
                while let Ok(p) = feed.next().await {
                    let last = *tx.borrow();
                    if p.vdl < last {
                        *went_back.lock().unwrap() = Some(format!("the read point went back from {last} to {}", p.vdl));
                        return;
                    }
                    if tx.send(p.vdl).is_err() {
                        return;
                    }
                }
            }
        });
        ReadPoint { rx, went_back, task }
    }

    /// Panics if the feed ever reported a lower read point than before.
    pub fn assert_monotonic(&self) {
        if let Some(e) = self.went_back.lock().unwrap().as_ref() {
            panic!("{e}");
        }
    }

    /// The last reported read point: at or below the server's read point now.
    pub fn now(&self) -> Lsn {
        self.assert_monotonic();
        *self.rx.borrow()
    }

    /// Waits until the read point reaches `lsn`; panics (saying `why`) at the deadline.
    pub async fn wait_for(&mut self, lsn: Lsn, timeout: Duration, why: impl FnOnce() -> String) -> Lsn {
        let r = tokio::time::timeout(timeout, self.rx.wait_for(|&at| at >= lsn)).await.map(|r| r.map(|at| *at));
        self.assert_monotonic();
        match r {
            Ok(Ok(at)) => at,
            Ok(Err(_)) => panic!("the feed ended at {} before reaching {lsn}: {}", *self.rx.borrow(), why()),
            Err(_) => panic!("the read point stayed at {} below {lsn} for {timeout:?}: {}", *self.rx.borrow(), why()),
        }
    }
}

impl Drop for ReadPoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A cluster, a writer on the volume's address, and a client of it.
pub async fn cluster_with_writer(writer_args: &[&str]) -> (Cluster, Proc, ApiClient) {
    let mut c = Cluster::start(&[]).await;
    let w = c.start_writer(None, writer_args).await;
    let client = c.client(c.writer_addr()).await;
    (c, w, client)
}

/// Keys guaranteed to land on every PG: `key-0`, `key-1`, ... are spread by hash.
pub fn key(i: u64) -> Vec<u8> {
    format!("key-{i:08}").into_bytes()
}

pub fn value(i: u64, round: u64) -> Vec<u8> {
    format!("value-{i}-{round}-{}", "x".repeat(64)).into_bytes()
}

/// One acknowledged put: its key index, commit LSN, and when the client got the ack.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub key: u64,
    pub lsn: Lsn,
    pub at: Instant,
}

/// Closed-loop writers putting distinct keys until stopped; records every outcome.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub committed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<Ack>, Vec<String>)>>,
}

impl Load {
    /// `workers` concurrent writers on one client; worker w writes keys w, w + workers, ...
    pub fn start(client: &ApiClient, workers: u64, first_key: u64) -> Load {
        Load::start_values(client, workers, first_key, |i| value(i, 0))
    }

    /// Like `start`, writing `value_of(i)` to key i.
    pub fn start_values(client: &ApiClient, workers: u64, first_key: u64, value_of: fn(u64) -> Vec<u8>) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let tasks = (0..workers)
            .map(|w| {
                let (client, stop, committed) = (client.clone(), stop.clone(), committed.clone());
                tokio::spawn(async move {
                    let (mut acked, mut errors) = (Vec::new(), Vec::new());
                    let mut i = first_key + w;
                    while !stop.load(Ordering::Relaxed) {
                        match tokio::time::timeout(REPLY_TIMEOUT, client.put(&key(i), &value_of(i))).await {
                            Ok(Ok(lsn)) => {
                                acked.push(Ack { key: i, lsn, at: Instant::now() });
                                committed.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Err(e)) => {
                                errors.push(format!("key {i}: {e}"));
                                // A lost connection fails at once: back off instead of spinning.
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            Err(_) => errors.push(format!("key {i}: no reply in {REPLY_TIMEOUT:?}")),
                        }
                        i += workers;
                    }
                    (acked, errors)
                })
            })
            .collect();
        Load { stop, committed, tasks }
    }

    pub fn count(&self) -> u64 {
        self.committed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until at least `n` more commits than now have landed.
    pub async fn wait_more(&self, n: u64, timeout: Duration) {
        let target = self.count() + n;
        let deadline = Instant::now() + timeout;
        while self.count() < target {
            assert!(Instant::now() < deadline, "only {} of {target} commits within {timeout:?}", self.count());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the writers; returns the acknowledged key indexes and every error.
    pub async fn finish(self) -> (Vec<u64>, Vec<String>) {
        let (acked, errors) = self.finish_acks().await;
        (acked.iter().map(|a| a.key).collect(), errors)
    }

    /// Stops the writers; returns every ack (with its LSN and arrival time) and every error.
    pub async fn finish_acks(self) -> (Vec<Ack>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut acked, mut errors) = (Vec::new(), Vec::new());
        for t in self.tasks {
            let (a, e) = t.await.expect("load task");
            acked.extend(a);
            errors.extend(e);
        }
        (acked, errors)
    }
}

/// Reads every key back and asserts it holds its acknowledged value.
pub async fn assert_all_present(client: &ApiClient, acked: &[u64]) {
    for &i in acked {
        let (_, v) = tokio::time::timeout(REPLY_TIMEOUT, client.get(&key(i))).await.expect("get in time").expect("get");
        assert_eq!(v.as_deref(), Some(value(i, 0).as_slice()), "acknowledged write of key {i} is missing or wrong");
    }
}

/// Frames a server cannot read, each on a client of its own: an unknown operation and
/// garbage are `Malformed`, a frame beyond the request limit is `TooLarge` (refused
/// before it is buffered), and the refused stream is closed.
pub async fn assert_bad_frames_refused(c: &Cluster, addr: SocketAddr) {
    use borealis_net::api::ApiError;
    use redo_core::api::Request;
    use redo_core::page::PageOp;

    let mut frame = Vec::new();
    Request::Txn(vec![PageOp::Put { key: b"x".to_vec(), value: b"v".to_vec() }]).encode(77, &mut frame);
    frame[4 + 1 + 8 + 4] = 9;
    let bad = c.client(addr).await;
    match bad.call_raw(77, frame).await {
        Err(ApiError::Lost(message)) => assert!(message.contains("Malformed") && message.contains("operation"), "{message}"),
        other => panic!("expected Malformed, got {other:?}"),
    }
    assert!(bad.get(b"good").await.is_err(), "the refused stream is closed");

    let huge = c.client(addr).await;
    let mut frame = (64u32 << 20).to_le_bytes().to_vec();
    frame.extend_from_slice(&[1; 64]);
    match huge.call_raw(1, frame).await {
        Err(ApiError::Lost(message)) if message.contains("TooLarge") => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }

    let junk = c.client(addr).await;
    match junk.call_raw(1, vec![9, 0, 0, 0, 42, 1, 2, 3, 4, 5, 6, 7, 8]).await {
        Err(ApiError::Lost(message)) if message.contains("Malformed") => {}
        other => panic!("expected Malformed, got {other:?}"),
    }
}

/// A client endpoint whose certificate is from a CA other than the cluster's.
pub fn foreign_endpoint(c: &Cluster) -> quinn::Endpoint {
    let foreign = c.dir.path().join("foreign");
    borealis_net::certs::generate(&foreign, &["client".to_string()]).expect("foreign certificates");
    let id = TlsIdentity::load(&foreign, "client").expect("foreign identity");
    borealis_net::client_endpoint(&id).expect("foreign endpoint")
}
