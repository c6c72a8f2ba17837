//! Harness for end-to-end tests: a local volume of six real `storaged`
//! processes (two per AZ), real `writerd` and `replicad` processes on
//! loopback, driven through the client library. Every wait is on a condition
//! with a deadline. Shared by writerd's tests and replicad's (which include it
//! with `#[path]`); the binaries are found next to the test's own.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use borealis_net::api::ApiClient;
use borealis_net::storage::StorageConn;
use borealis_net::TlsIdentity;
use redo_core::volume::{NodeSpec, Volume};
use redo_core::{Epoch, Lsn, PgId};

pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
pub const PGS: u32 = 2;

/// A daemon's binary, from the directory cargo built the tested package's binary into
/// (`cargo test -p replicad` builds only replicad: `cargo build --release` builds the others).
pub fn bin(name: &str) -> PathBuf {
    let tested = option_env!("CARGO_BIN_EXE_writerd").or(option_env!("CARGO_BIN_EXE_replicad")).expect("tested from writerd or replicad");
    let path = Path::new(tested).with_file_name(name);
    assert!(path.exists(), "no {} (build the workspace first: cargo build --release)", path.display());
    path
}

pub fn free_port() -> u16 {
    borealis_net::free_port().expect("probe free loopback port")
}

/// A loopback TCP address free a moment ago (for `--metrics-listen`).
pub fn free_tcp_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A child process, SIGKILLed on drop unless it was stopped.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(bin: &Path, args: &[String], log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("create log");
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", std::env::var("BOREALIS_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        Proc { child: Some(child), log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics if the process exits first.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) {
        self.wait_log_more(needle, 0, timeout).await
    }

    /// Waits until the log contains `needle` more than `seen` times.
    pub async fn wait_log_more(&mut self, needle: &str, seen: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log_text().matches(needle).count() <= seen {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("poll child")) {
                panic!("{} exited ({status}) before logging {needle:?}; log:\n{}", self.log.display(), self.log_text());
            }
            assert!(Instant::now() < deadline, "no {needle:?} in {} within {timeout:?}; log:\n{}", self.log.display(), self.log_text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `sig` (e.g. SIGSTOP/SIGCONT) to the running process.
    pub fn signal(&self, sig: i32) {
        let c = self.child.as_ref().expect("process is running");
        // SAFETY: signalling a child we own and have not reaped.
        unsafe { libc::kill(c.id() as i32, sig) };
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        let c = self.child.take().expect("process is running");
        // SAFETY: signalling a child we own and have not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        self.wait_exit_of(c).await
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.as_mut().expect("process is running").try_wait().expect("poll child") {
                self.child = None;
                return s;
            }
            assert!(Instant::now() < deadline, "{} still running after {timeout:?}; log:\n{}", self.log.display(), self.log_text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_exit_of(&mut self, mut c: Child) -> ExitStatus {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(s) = c.try_wait().expect("poll child") {
                return s;
            }
            assert!(Instant::now() < deadline, "{} did not stop; log:\n{}", self.log.display(), self.log_text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub volume: Volume,
    pub volume_path: PathBuf,
    /// Index i is node id i + 1.
    pub nodes: Vec<Proc>,
    storaged_args: Vec<String>,
    starts: u32,
}

impl Cluster {
    /// Six storage nodes, each hosting every PG, plus certificates for writers and clients.
    pub async fn start(storaged_args: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new().prefix("writerd-e2e-").tempdir().expect("temp dir");
        let certs = dir.path().join("certs");
        let mut names: Vec<String> = (1..=6).map(|i| format!("storaged-{i}")).collect();
        names.extend(["writerd".into(), "replicad".into(), "client".into()]);
        borealis_net::certs::generate(&certs, &names).expect("certificates");
        let nodes = (1..=6)
            .map(|i| NodeSpec { id: i, az: format!("az{}", (i - 1) / 2 + 1), addr: format!("127.0.0.1:{}", free_port()) })
            .collect();
        let volume = Volume::local(format!("127.0.0.1:{}", free_port()), nodes, PGS, 256).expect("volume");
        let volume_path = dir.path().join("volume.toml");
        std::fs::write(&volume_path, volume.to_toml()).expect("write volume file");
        let mut c = Cluster {
            dir,
            certs,
            volume,
            volume_path,
            nodes: Vec::new(),
            storaged_args: storaged_args.iter().map(|s| s.to_string()).collect(),
            starts: 0,
        };
        for id in 1..=6 {
            let p = c.spawn_storaged(id);
            c.nodes.push(p);
        }
        for n in &mut c.nodes {
            n.wait_log("storaged ready", READY_TIMEOUT).await;
        }
        c
    }

    /// Where the logs are: kept when the test fails.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn spawn_storaged(&mut self, id: u32) -> Proc {
        let extra = self.storaged_args.clone();
        self.spawn_storaged_with(id, &extra)
    }

    /// Starts node `id` with `extra` in place of the cluster's own storaged arguments.
    fn spawn_storaged_with(&mut self, id: u32, extra: &[String]) -> Proc {
        self.starts += 1;
        let spec = &self.volume.nodes[id as usize - 1];
        let pgs: Vec<String> = (0..PGS).map(|p| p.to_string()).collect();
        let mut args: Vec<String> = vec!["serve".into(), "--node-id".into(), id.to_string(), "--az".into(), spec.az.clone()];
        args.extend(["--listen".into(), spec.addr.clone(), "--pgs".into(), pgs.join(",")]);
        args.extend(["--data-dir".into(), self.dir.path().join(format!("data-{id}")).display().to_string()]);
        args.extend(["--certs".into(), self.certs.display().to_string(), "--segment-prealloc-bytes".into(), "1MiB".into()]);
        args.extend(["--volume".into(), self.volume_path.display().to_string()]);
        args.extend(extra.iter().cloned());
        Proc::spawn(&bin("storaged"), &args, self.dir.path().join(format!("storaged-{id}.{}.log", self.starts)))
    }

    pub fn kill9(&mut self, id: u32) {
        self.nodes[id as usize - 1].kill9();
    }

    /// Restarts node `id` on its address and data dir (it recovers from disk).
    pub async fn restart(&mut self, id: u32) {
        let mut p = self.spawn_storaged(id);
        p.wait_log("storaged ready", READY_TIMEOUT).await;
        self.nodes[id as usize - 1] = p;
    }

    /// Restarts node `id` like `restart`, with `extra` in place of the arguments the
    /// cluster was started with (e.g. without a fault-injection knob).
    pub async fn restart_with(&mut self, id: u32, extra: &[&str]) {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut p = self.spawn_storaged_with(id, &extra);
        p.wait_log("storaged ready", READY_TIMEOUT).await;
        self.nodes[id as usize - 1] = p;
    }

    pub fn writer_addr(&self) -> SocketAddr {
        self.volume.writer.parse().expect("writer address")
    }

    /// Starts `writerd serve` on the volume's writer address (or `listen`) and waits until it is ready.
    pub async fn start_writer(&mut self, listen: Option<SocketAddr>, extra: &[&str]) -> Proc {
        let mut p = self.spawn_writer(listen, extra);
        p.wait_log("writerd ready", READY_TIMEOUT).await;
        p
    }

    /// Starts `writerd serve` without waiting for it.
    pub fn spawn_writer(&mut self, listen: Option<SocketAddr>, extra: &[&str]) -> Proc {
        let volume = self.volume_path.clone();
        self.spawn_writer_with_volume(&volume, listen, extra)
    }

    /// Starts `writerd serve --volume <volume>` (a volume file other than the cluster's,
    /// e.g. one that reaches the nodes through proxies) and waits until it is ready.
    pub async fn start_writer_with_volume(&mut self, volume: &Path, extra: &[&str]) -> Proc {
        let mut p = self.spawn_writer_with_volume(volume, None, extra);
        p.wait_log("writerd ready", READY_TIMEOUT).await;
        p
    }

    /// Starts `writerd serve --volume <volume>` without waiting for it.
    pub fn spawn_writer_with_volume(&mut self, volume: &Path, listen: Option<SocketAddr>, extra: &[&str]) -> Proc {
        self.starts += 1;
        let mut args: Vec<String> = vec!["serve".into(), "--volume".into(), volume.display().to_string()];
        args.extend(["--certs".into(), self.certs.display().to_string()]);
        if let Some(l) = listen {
            args.extend(["--listen".into(), l.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::spawn(&bin("writerd"), &args, self.dir.path().join(format!("writerd.{}.log", self.starts)))
    }

    /// Starts `replicad serve` on `listen` (a fresh address when `None`), with metrics on
    /// a fresh TCP address, and waits until it is ready.
    pub async fn start_replica(&mut self, listen: Option<SocketAddr>, extra: &[&str]) -> Replica {
        let mut r = self.spawn_replica(listen, extra);
        r.proc.wait_log("replicad ready", READY_TIMEOUT).await;
        r
    }

    /// Starts `replicad serve` without waiting for it.
    pub fn spawn_replica(&mut self, listen: Option<SocketAddr>, extra: &[&str]) -> Replica {
        self.starts += 1;
        let addr = listen.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().expect("address"));
        let metrics = free_tcp_addr();
        let mut args: Vec<String> = vec!["serve".into(), "--volume".into(), self.volume_path.display().to_string()];
        args.extend(["--listen".into(), addr.to_string(), "--certs".into(), self.certs.display().to_string()]);
        args.extend(["--metrics-listen".into(), metrics.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(&bin("replicad"), &args, self.dir.path().join(format!("replicad.{}.log", self.starts)));
        Replica { proc, addr, metrics }
    }

    pub fn endpoint(&self) -> quinn::Endpoint {
        let id = TlsIdentity::load(&self.certs, "client").expect("client identity");
        borealis_net::client_endpoint(&id).expect("client endpoint")
    }

    pub async fn client(&self, addr: SocketAddr) -> ApiClient {
        tokio::time::timeout(REPLY_TIMEOUT, ApiClient::connect(&self.endpoint(), addr)).await.expect("connect in time").expect("connect to server")
    }

    /// Node `id`'s SCL for `pg`, read without raising its epoch.
    pub async fn scl(&self, ep: &quinn::Endpoint, id: u32, pg: PgId) -> Option<Lsn> {
        self.position(ep, id, pg).await.map(|p| p.scl)
    }

    /// Node `id`'s position (SCL, flushed LSN) for `pg`, read without raising its epoch;
    /// `None` if it does not answer within 2 s.
    pub async fn position(&self, ep: &quinn::Endpoint, id: u32, pg: PgId) -> Option<redo_core::wire::SegmentPosition> {
        let addr = self.volume.nodes[id as usize - 1].addr.parse().expect("node address");
        let r = tokio::time::timeout(Duration::from_secs(2), async {
            let conn = StorageConn::connect(ep, addr).await.ok()?;
            conn.status(Epoch(0), pg, None).await.ok().map(|s| s.position)
        });
        r.await.ok().flatten()
    }
}

impl Drop for Cluster {
    /// A failing test keeps its directory (logs, data, certificates) and says where.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("test failed: cluster directory kept at {}", self.dir.path().display());
        }
    }
}

/// A running `replicad`: its client API and metrics addresses.
pub struct Replica {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

impl Replica {
    /// Its metrics now; the process must be serving them.
    pub fn scrape(&self) -> String {
        scrape(self.metrics)
    }
}

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
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .parse()
        .unwrap()
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
