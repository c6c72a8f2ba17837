//! Harness for storaged's end-to-end tests: starts the real `storaged` binary on
//! loopback (one node here; six with `test_support::Cluster`) and talks to it over
//! QUIC with mutual TLS. Every wait is on a condition with a deadline; nothing sleeps
//! and hopes.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use borealis_net::storage::{ClientError, StorageConn};
use borealis_net::TlsIdentity;
use redo_core::page::PageImage;
use redo_core::record::{RecordHeader, RecordRef, Records};
use redo_core::wire::{ErrorCode, SegmentPosition};
use redo_core::{Epoch, Lsn, PageId, PgId};
pub use test_support::free_port;
use test_support::{storaged_args, Proc, Started, STORAGED_READY};

pub const STORAGED: &str = env!("CARGO_BIN_EXE_storaged");
/// Start-up (recovery included) must finish within this.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// One connection attempt once the node says it listens.
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// SIGTERM to exit: the node flushes first.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Any single reply from a live node.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const BIND_RETRIES_MAX: u32 = 5;
/// Lines of a node's log printed when a test fails.
const LOG_TAIL_ON_PANIC: usize = 60;

/// Runs `storaged certs` (creating the CA unless DIR/ca.pem exists).
pub fn make_certs(out: &Path, names: &[&str]) {
    let mut cmd = Command::new(STORAGED);
    cmd.arg("certs").arg("--out").arg(out);
    for n in names {
        cmd.args(["--name", n]);
    }
    let o = cmd.output().expect("run storaged certs");
    assert!(o.status.success(), "storaged certs failed: {}", String::from_utf8_lossy(&o.stderr));
}

/// A temporary directory with the cluster certificates (`storaged-1`, `client`).
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    starts: AtomicU32,
}

impl TestEnv {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("storaged-e2e-").tempdir().expect("temp dir");
        let certs = dir.path().join("certs");
        make_certs(&certs, &["storaged-1", "client"]);
        TestEnv { dir, certs, starts: AtomicU32::new(0) }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }

    pub fn segment_path(&self, pg: u32) -> PathBuf {
        self.data_dir().join(format!("pg-{pg}.seg"))
    }

    pub fn pages_path(&self, pg: u32) -> PathBuf {
        self.data_dir().join(format!("pg-{pg}.pages"))
    }

    /// A client endpoint presenting the cluster's `client` certificate.
    pub fn client(&self) -> quinn::Endpoint {
        let id = TlsIdentity::load(&self.certs, "client").expect("load client identity");
        borealis_net::client_endpoint(&id).expect("client endpoint")
    }

    /// The common launch (`test_support::storaged_args`): node 1, this env's data dir and certs, `pgs`, then `extra` flags.
    pub fn launch(&self, pgs: &[u32], extra: &[&str]) -> Launch {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let args = storaged_args(1, &self.data_dir(), &self.certs, pgs, &extra);
        Launch { args, listen_flag: true, fsize_limit: None, config_file: None }
    }

    /// Starts `storaged serve` and waits until a client can connect.
    pub async fn start(&self, launch: &Launch) -> Storaged {
        let ep = self.client();
        for _ in 0..BIND_RETRIES_MAX {
            let n = self.starts.fetch_add(1, Ordering::Relaxed) + 1;
            let log_path = self.path().join(format!("storaged-{n}.log"));
            let port = free_port();
            let mut node = Storaged::spawn(launch, port, &log_path);
            match node.wait_ready(&ep).await {
                Started::Ready => return node,
                // Another process took the probed port between probe and bind: try another.
                Started::PortTaken => continue,
            }
        }
        panic!("storaged could not bind a free port in {BIND_RETRIES_MAX} attempts");
    }
}

/// How to run one `storaged serve`.
#[derive(Clone)]
pub struct Launch {
    /// Everything after `serve` except `--listen`.
    pub args: Vec<String>,
    /// Add `--listen 127.0.0.1:PORT` (off when a config file names the address).
    pub listen_flag: bool,
    /// Run under `prlimit --fsize=BYTES`.
    pub fsize_limit: Option<u64>,
    /// Write this TOML to the path before starting, with `{LISTEN}` replaced by the chosen address.
    pub config_file: Option<(PathBuf, String)>,
}

/// A running storaged; SIGKILLed on drop (its log's tail printed if the test failed).
pub struct Storaged {
    proc: Proc,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
    probe: Option<StorageConn>,
}

impl Storaged {
    fn spawn(launch: &Launch, port: u16, log_path: &Path) -> Storaged {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        if let Some((path, template)) = &launch.config_file {
            fs::write(path, template.replace("{LISTEN}", &addr.to_string())).expect("write config file");
        }
        let mut cmd = match launch.fsize_limit {
            Some(bytes) => {
                // prlimit sets the limit and execs storaged: the child's pid is storaged's.
                let mut c = Command::new("prlimit");
                c.arg(format!("--fsize={bytes}")).arg("--").arg(STORAGED);
                c
            }
            None => Command::new(STORAGED),
        };
        cmd.arg("serve").args(&launch.args);
        if launch.listen_flag {
            cmd.args(["--listen", &addr.to_string()]);
        }
        // BOREALIS_TEST_LOG (or STORAGED_TEST_LOG) overrides the node's log filter when debugging a test.
        let mut proc = Proc::spawn_command(cmd, log_path.to_path_buf());
        proc.tail_on_panic = LOG_TAIL_ON_PANIC;
        Storaged { proc, addr, log_path: log_path.to_path_buf(), probe: None }
    }

    async fn wait_ready(&mut self, ep: &quinn::Endpoint) -> Started {
        let deadline = Instant::now() + READY_TIMEOUT;
        // First the log line that follows binding the endpoint: connection
        // attempts abandoned before the node listens would linger in its
        // endpoint (quinn keeps a handshake the client gave up on until the
        // idle timeout), and stretch its graceful shutdown to the drain timeout.
        if self.proc.wait_started(STORAGED_READY, READY_TIMEOUT).await == Started::PortTaken {
            return Started::PortTaken;
        }
        // Then a real mutual-TLS handshake, retried until the deadline.
        loop {
            if let Ok(Ok(conn)) = tokio::time::timeout(CONNECT_ATTEMPT_TIMEOUT, StorageConn::connect(ep, self.addr)).await {
                // Kept open: dropping it mid-handshake would leave the node a half-open connection.
                self.probe = Some(conn);
                return Started::Ready;
            }
            assert!(self.is_alive(), "storaged exited after start-up; log:\n{}", self.log());
            assert!(Instant::now() < deadline, "storaged did not accept a connection within {READY_TIMEOUT:?}; log:\n{}", self.log());
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// The node's stderr so far.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    pub fn is_alive(&mut self) -> bool {
        self.proc.is_alive()
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        let status = self.proc.kill9().expect("storaged is running");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    }

    /// SIGTERM, then wait (with a deadline) for the node to flush and exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate(STOP_TIMEOUT)
    }

    pub async fn connect(&self, ep: &quinn::Endpoint) -> StorageConn {
        tokio::time::timeout(REPLY_TIMEOUT, StorageConn::connect(ep, self.addr)).await.expect("connect timed out").expect("connect to storaged")
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "log never showed {needle:?} within {timeout:?}; log:\n{log}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Bounds a future by `REPLY_TIMEOUT`.
pub async fn timely<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(REPLY_TIMEOUT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {REPLY_TIMEOUT:?}"),
    }
}

/// Deterministic payload of a record: verifiable after a round trip.
pub fn payload(lsn: Lsn, len: usize) -> Vec<u8> {
    let seed = lsn.0.to_le_bytes();
    (0..len).map(|i| seed[i % 8] ^ (i as u8).wrapping_mul(31)).collect()
}

pub fn encode_record(lsn: Lsn, prev: Lsn, payload_bytes: usize, out: &mut Vec<u8>) {
    RecordHeader { lsn, prev_lsn_in_segment: prev, prev_lsn_for_page: Lsn::ZERO, page: PageId(lsn.0 % 17), cpl: lsn.0.is_multiple_of(4) }
        .encode(&payload(lsn, payload_bytes), out);
}

/// A writer's view of one segment's chain: hands out LSNs (with gaps, as a
/// volume-wide allocator would) and remembers every record sent.
pub struct Chain {
    pub pg: PgId,
    pub last_lsn: Lsn,
    pub lsn_step: u64,
    pub payload_bytes: usize,
    /// New LSNs are above this (after a rebase, above everything sent before).
    pub lsn_floor: Lsn,
    pub sent: BTreeMap<Lsn, Vec<u8>>,
}

impl Chain {
    pub fn new(pg: u32, payload_bytes: usize) -> Self {
        Chain { pg: PgId(pg), last_lsn: Lsn::ZERO, lsn_step: 3, payload_bytes, lsn_floor: Lsn::ZERO, sent: BTreeMap::new() }
    }

    /// The next `n` records, continuing the chain.
    pub fn batch(&mut self, n: usize) -> Batch {
        let mut bytes = Vec::with_capacity(n * (self.payload_bytes + 64));
        let mut lsns = Vec::with_capacity(n);
        for _ in 0..n {
            let lsn = Lsn(self.last_lsn.max(self.lsn_floor).0 + self.lsn_step);
            let start = bytes.len();
            encode_record(lsn, self.last_lsn, self.payload_bytes, &mut bytes);
            self.sent.insert(lsn, bytes[start..].to_vec());
            lsns.push(lsn);
            self.last_lsn = lsn;
        }
        Batch { bytes, lsns }
    }

    /// Continues the chain from `prev` (e.g. a recovered SCL): forgets what was
    /// sent above it, and gives new records LSNs above everything sent before,
    /// as a writer that moved on would.
    pub fn rebase(&mut self, prev: Lsn) {
        self.lsn_floor = self.lsn_floor.max(self.last_lsn);
        self.sent.retain(|&l, _| l <= prev);
        self.last_lsn = prev;
    }
}

pub struct Batch {
    pub bytes: Vec<u8>,
    pub lsns: Vec<Lsn>,
}

impl Batch {
    pub fn last_lsn(&self) -> Lsn {
        *self.lsns.last().expect("non-empty batch")
    }
}

/// One decoded, CRC-checked record from a pull.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub header: RecordHeader,
    pub bytes: Vec<u8>,
}

/// Pulls `(after, upto]` of `pg`, looping on `last_lsn`, in replies of about
/// `bytes_max`. Checks each reply: CRC-valid records, in order, `last_lsn`
/// at or above the last record's and within SCL. Stops when a reply makes no progress.
pub async fn pull_all(conn: &StorageConn, pg: u32, after: Lsn, upto: Lsn, bytes_max: u32) -> (Vec<Pulled>, SegmentPosition) {
    let mut out = Vec::new();
    let mut from = after;
    loop {
        let reply = timely("pull", conn.pull(PgId(pg), from, upto, bytes_max)).await.expect("pull");
        let mut last = from;
        for rec in Records::new(&reply.records, 0) {
            let rec: RecordRef = rec.expect("pulled records decode and pass their CRC");
            assert!(rec.lsn() > last, "pulled records out of order: {} after {last}", rec.lsn());
            assert!(rec.lsn() <= upto, "pulled record {} beyond upto {upto}", rec.lsn());
            last = rec.lsn();
            out.push(Pulled { header: rec.header(), bytes: rec.as_bytes().to_vec() });
        }
        assert!(reply.last_lsn >= last, "pull reply's last_lsn {} is below its last record {last}", reply.last_lsn);
        assert!(reply.last_lsn <= upto.min(reply.position.scl).max(from), "pull reply claims {} beyond SCL", reply.last_lsn);
        if reply.last_lsn == from || reply.last_lsn >= upto {
            return (out, reply.position);
        }
        from = reply.last_lsn;
    }
}

/// The segment's position, by an empty pull.
pub async fn position(conn: &StorageConn, pg: u32) -> SegmentPosition {
    timely("pull position", conn.pull(PgId(pg), Lsn::ZERO, Lsn::ZERO, 1)).await.expect("pull position").position
}

/// Asserts `records` form a gap-free backlink chain starting after `base`.
pub fn assert_chain(records: &[Pulled], base: Lsn) {
    let mut prev = base;
    for r in records {
        assert_eq!(r.header.prev_lsn_in_segment, prev, "chain broken at record {}", r.header.lsn);
        prev = r.header.lsn;
    }
}

/// The code and message a request was refused with.
pub fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (ErrorCode, String) {
    match r {
        Err(ClientError::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Sends one batch on a fresh append stream and waits for its reply.
pub async fn append_once(conn: &StorageConn, epoch: u64, pg: PgId, batch: &Batch) -> Result<(SegmentPosition, Lsn), ClientError> {
    let (mut tx, mut rx) = timely("open append stream", conn.open_append()).await?;
    tx.send(Epoch(epoch), pg, &batch.bytes).await?;
    let reply = timely("append reply", rx.recv()).await;
    tx.finish();
    reply
}

/// A separate, well-behaved client: a new connection appends the next
/// records of `chain` at `epoch` and must get an Ack that covers them.
pub async fn well_behaved_append(node: &Storaged, ep: &quinn::Endpoint, chain: &mut Chain, epoch: u64) -> SegmentPosition {
    let conn = node.connect(ep).await;
    let batch = chain.batch(4);
    let (pos, last) = append_once(&conn, epoch, chain.pg, &batch).await.expect("well-behaved append is acked");
    assert_eq!(last, batch.last_lsn());
    assert_eq!(pos.pg, chain.pg);
    assert_eq!(pos.scl, batch.last_lsn(), "the well-behaved batch completes the chain");
    conn.conn.close(0u32.into(), b"done");
    pos
}

/// Subscribes to `pg` and waits (with a deadline) for a notification that
/// satisfies `cond`. The first notification is the current position, so a
/// condition that already holds returns at once.
pub async fn wait_position(conn: &StorageConn, pg: u32, what: &str, cond: impl Fn(&SegmentPosition) -> bool) -> SegmentPosition {
    let mut sub = timely("subscribe", conn.subscribe(vec![PgId(pg)], true)).await.expect("subscribe");
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    loop {
        let p = match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(p) => p.expect("notification"),
            Err(_) => panic!("{what}: not reached within {REPLY_TIMEOUT:?}"),
        };
        assert_eq!(p.pg, PgId(pg));
        assert!(p.flushed_lsn <= p.scl, "notification with flushed_lsn above scl: {p:?}");
        if cond(&p) {
            return p;
        }
    }
}

/// A free loopback TCP address, for `--metrics-listen`.
pub fn free_tcp_addr() -> String {
    test_support::free_tcp_addr().to_string()
}

/// The value of `series` (name and labels, e.g. `x_total{node="1"}`) on the node's /metrics page.
pub async fn metric(addr: &str, series: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to metrics port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("send request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.expect("read reply");
    reply.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits (with a deadline) until `series` satisfies `cond`; returns its value.
pub async fn wait_metric(addr: &str, series: &str, cond: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let v = metric(addr, series).await;
        if let Some(v) = v.filter(|&v| cond(v)) {
            return v;
        }
        assert!(Instant::now() < deadline, "{series} not as expected within {REPLY_TIMEOUT:?}: {v:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The model of a segment's pages: `page` as of `lsn`, by applying the page's
/// records in `sent` (every record sent, by LSN) in order.
pub fn model_image(sent: &BTreeMap<Lsn, Vec<u8>>, page: PageId, lsn: Lsn) -> PageImage {
    let mut image = PageImage::empty(page);
    for bytes in sent.range(..=lsn).map(|(_, b)| b) {
        let rec = RecordRef::decode(bytes, 0).expect("model record");
        if rec.header().page == page {
            image.apply(rec).expect("model records apply");
        }
    }
    image
}
