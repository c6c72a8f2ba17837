//! Local clusters for benchmarks: certificates, data dirs, ports, a volume
//! file, and child processes that are stopped (SIGTERM, then SIGKILL) when
//! dropped, or killed by the kernel if loadgen itself dies.

use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use borealis_net::api::ApiClient;
use borealis_net::storage::StorageConn;
use redo_core::volume::{NodeSpec, Volume};
use serde::Serialize;

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// One readiness probe: QUIC gives up on an unanswered handshake only at the idle timeout (10 s).
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Storage acknowledgement mode, passed to storaged as `--ack`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Ack {
    Memory,
    Disk,
}

impl Ack {
    pub fn as_str(self) -> &'static str {
        match self {
            Ack::Memory => "memory",
            Ack::Disk => "disk",
        }
    }
}

/// The embedded cluster's options, shared by the commands that start one.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct EmbeddedClusterArgs {
    /// Storage ack mode of the embedded cluster (storaged --ack). (commit-bench --writer: the existing cluster's mode, recorded only.)
    #[arg(long, value_enum, default_value = "memory")]
    pub ack: Ack,
    /// Protection groups of the embedded cluster's volume.
    #[arg(long, default_value_t = 2)]
    pub pgs: u32,
    /// Pages of the embedded cluster's volume.
    #[arg(long, default_value_t = 4096)]
    pub page_count: u64,
    /// Extra writerd options for the embedded cluster, e.g. `--writerd-arg=--lal=100000` (repeatable).
    #[arg(long = "writerd-arg", allow_hyphen_values = true)]
    pub writerd_args: Vec<String>,
    /// Extra storaged options for the embedded cluster, e.g. `--storaged-arg=--flush-bytes-max=1MiB` (repeatable).
    #[arg(long = "storaged-arg", allow_hyphen_values = true)]
    pub storaged_args: Vec<String>,
    /// Extra replicad options for the embedded cluster, e.g. `--replicad-arg=--buffer-bytes-max=16MiB` (repeatable).
    #[arg(long = "replicad-arg", allow_hyphen_values = true)]
    pub replicad_args: Vec<String>,
    /// Where the embedded cluster keeps certificates, data and logs [default: a temp dir, removed after a successful run].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

impl EmbeddedClusterArgs {
    /// storaged's options: `--ack` first, then the user's `--storaged-arg`s.
    pub fn storaged_args(&self) -> Vec<String> {
        let mut args = vec!["--ack".to_string(), self.ack.as_str().to_string()];
        args.extend(self.storaged_args.iter().cloned());
        args
    }
}

/// A binary next to this one (cargo builds them side by side), or the path in `$env_var`.
fn sibling_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("locate loadgen binary")?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!("{} not found: build it (cargo build --release -p {name}) or set {env_var}", p.display());
    }
    Ok(p)
}

pub fn storaged_binary() -> Result<PathBuf> {
    sibling_binary("storaged", "BOREALIS_STORAGED")
}

pub fn writerd_binary() -> Result<PathBuf> {
    sibling_binary("writerd", "BOREALIS_WRITERD")
}

pub fn replicad_binary() -> Result<PathBuf> {
    sibling_binary("replicad", "BOREALIS_REPLICAD")
}

pub fn free_port() -> Result<u16> {
    borealis_net::free_port().context("probe free loopback port")
}

/// A daemon's addresses on loopback: a free UDP one for QUIC and a free TCP one for metrics.
fn daemon_addrs() -> Result<(SocketAddr, SocketAddr)> {
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    Ok((loopback(free_port()?), loopback(free_port()?)))
}

/// Availability zone of a local node: two per AZ (az1, az1, az2, az2, az3, az3), as scripts/cluster places them.
pub fn az_of(node_id: u32) -> String {
    format!("az{}", (node_id - 1) / 2 + 1)
}

/// The volume of a local cluster: `pgs` protection groups, each on the first six of `nodes` (id, address).
pub fn local_volume(writer: SocketAddr, nodes: impl IntoIterator<Item = (u32, SocketAddr)>, pgs: u32, page_count: u64) -> Result<Volume> {
    let nodes = nodes.into_iter().map(|(id, addr)| NodeSpec { id, az: az_of(id), addr: addr.to_string() }).collect();
    Volume::local(writer.to_string(), nodes, pgs, page_count).context("local volume")
}

/// A working directory: the one given, or a fresh one under the system temp
/// dir that `cleanup` removes (a failed run keeps it, for the daemons' logs).
pub struct WorkDir {
    pub path: PathBuf,
    temporary: bool,
}

impl WorkDir {
    pub fn new(given: Option<&Path>, prefix: &str) -> Result<Self> {
        let (path, temporary) = match given {
            Some(p) => (p.to_path_buf(), false),
            None => (std::env::temp_dir().join(format!("{prefix}-{}", std::process::id())), true),
        };
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(WorkDir { path, temporary })
    }

    pub fn cleanup(self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A child daemon, logging to a file; killed on drop unless stopped first.
pub struct Daemon {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    /// SIGKILLed on purpose (`kill`) and reaped: there is nothing left to stop.
    killed: bool,
}

impl Daemon {
    fn spawn(name: &str, log: PathBuf, cmd: &mut Command) -> Result<Self> {
        let log_file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // Dies with loadgen even when loadgen is killed outright and no destructor runs. (The
                // signal follows the spawning thread: spawn from the main thread or a runtime worker.)
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file).spawn().with_context(|| format!("start {name} ({:?})", cmd.get_program()))?;
        Ok(Daemon { name: name.into(), log, child, killed: false })
    }

    /// Fails if the process has exited (it should be serving).
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited during start-up ({status}); see {}", self.name, self.log.display());
        }
        Ok(())
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// CPU time (user + system) the process has used so far.
    fn cpu_seconds(&self) -> Result<f64> {
        process_cpu_seconds(self.child.id())
    }

    /// SIGKILL (no flush, no goodbye) if it is still running, and reaps it.
    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.killed = true;
    }

    fn terminate(&self) {
        if self.killed {
            // Reaped: its pid may be another process's by now.
            return;
        }
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Waits for the exit that `terminate` asked for; SIGKILL at the deadline.
    fn wait_stopped(&mut self, deadline: Instant) -> Result<()> {
        if self.killed {
            return Ok(());
        }
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status}; see {}", self.name, self.log.display());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not stop within {STOP_TIMEOUT:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The fields of /proc/PID/stat after the command name (which may hold spaces): the
/// first is field 3 (state) in proc(5)'s numbering. None if the process is gone.
pub fn proc_stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(str::to_string).collect())
}

/// CPU time (user + system) process `pid` has used so far, from /proc/PID/stat.
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let fields = proc_stat_fields(&pid.to_string()).with_context(|| format!("read /proc/{pid}/stat"))?;
    // utime and stime are fields 14 and 15.
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok()).with_context(|| format!("field {i} of /proc/{pid}/stat"));
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(14)? + ticks(15)?) as f64 / per_second)
}

/// SIGTERM to every daemon at once, then waits for each to exit; SIGKILL after a timeout.
fn stop_all<'a>(daemons: impl IntoIterator<Item = &'a mut Daemon>) -> Result<()> {
    let mut daemons: Vec<&mut Daemon> = daemons.into_iter().collect();
    for d in &daemons {
        d.terminate();
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    daemons.iter_mut().map(|d| d.wait_stopped(deadline)).fold(Ok(()), Result::and)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct StorageNode {
    pub node_id: u32,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    process: Daemon,
    /// Processes started for this node so far: 1 until it is restarted.
    starts: u32,
}

impl StorageNode {
    pub fn pid(&self) -> i32 {
        self.process.pid()
    }
}

/// What every node of a `LocalStorage` is started with: all but its id, addresses and files.
struct NodeLaunch {
    bin: PathBuf,
    certs: PathBuf,
    pgs: String,
    segments: usize,
    volume_args: Vec<OsString>,
    extra_args: Vec<String>,
}

pub struct LocalStorage {
    pub dir: PathBuf,
    pub nodes: Vec<StorageNode>,
    launch: NodeLaunch,
}

impl LocalStorage {
    /// Starts `count` storage nodes, each hosting `pgs`, under `dir`.
    pub fn start(dir: &Path, count: u32, pgs: &[u32], extra_args: &[String]) -> Result<Self> {
        Self::start_nodes(dir, count, pgs, extra_args, None)
    }

    /// `start`; with `volume` (writer address, PG count, page count), first
    /// writes DIR/volume.toml placing every PG on these nodes and passes it to
    /// them (`--volume`), so that they fill holes by gossip with their peers.
    fn start_nodes(dir: &Path, count: u32, pgs: &[u32], extra_args: &[String], volume: Option<(SocketAddr, u32, u64)>) -> Result<Self> {
        let certs = dir.join("certs");
        let mut names: Vec<String> = (1..=count).map(|i| format!("storaged-{i}")).collect();
        names.push("loadgen".into());
        borealis_net::certs::generate(&certs, &names)?;
        let addrs = (1..=count).map(|_| daemon_addrs()).collect::<Result<Vec<_>>>()?;
        let mut volume_args = Vec::new();
        if let Some((writer, pg_count, page_count)) = volume {
            let volume = local_volume(writer, (1..=count).zip(addrs.iter().map(|a| a.0)), pg_count, page_count)?;
            let path = dir.join("volume.toml");
            std::fs::write(&path, volume.to_toml()).with_context(|| format!("write {}", path.display()))?;
            volume_args = vec!["--volume".into(), path.into_os_string()];
        }
        let launch = NodeLaunch {
            bin: storaged_binary()?,
            certs,
            pgs: pgs.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
            segments: pgs.len(),
            volume_args,
            extra_args: extra_args.to_vec(),
        };
        let mut storage = LocalStorage { dir: dir.to_path_buf(), nodes: Vec::new(), launch };
        for (node_id, (addr, metrics_addr)) in (1..=count).zip(addrs) {
            let process = storage.spawn_node(node_id, addr, metrics_addr, 1)?;
            storage.nodes.push(StorageNode { node_id, addr, metrics_addr, process, starts: 1 });
        }
        Ok(storage)
    }

    /// Node `node_id`'s data directory.
    pub fn data_dir(&self, node_id: u32) -> PathBuf {
        self.dir.join(format!("data-{node_id}"))
    }

    /// Starts storaged for node `node_id` on its addresses and data dir; its `start`th process
    /// logs to storaged-ID.log (the first) or storaged-ID.START.log.
    fn spawn_node(&self, node_id: u32, addr: SocketAddr, metrics_addr: SocketAddr, start: u32) -> Result<Daemon> {
        let name = format!("storaged-{node_id}");
        let log = if start == 1 { format!("{name}.log") } else { format!("{name}.{start}.log") };
        let l = &self.launch;
        Daemon::spawn(
            &name,
            self.dir.join(log),
            Command::new(&l.bin)
                .arg("serve")
                .args(["--node-id", &node_id.to_string()])
                .args(["--az", &az_of(node_id)])
                .args(["--listen", &addr.to_string()])
                .args(["--metrics-listen", &metrics_addr.to_string()])
                .arg("--data-dir")
                .arg(self.data_dir(node_id))
                .arg("--certs")
                .arg(&l.certs)
                .args(["--pgs", &l.pgs])
                .args(&l.volume_args)
                .args(&l.extra_args),
        )
    }

    fn node_mut(&mut self, node_id: u32) -> Result<&mut StorageNode> {
        self.nodes.iter_mut().find(|n| n.node_id == node_id).with_context(|| format!("no storage node {node_id}"))
    }

    /// SIGKILLs node `node_id`'s storaged (no flush, no goodbye) and reaps it.
    pub fn kill_node(&mut self, node_id: u32) -> Result<()> {
        self.node_mut(node_id)?.process.kill();
        Ok(())
    }

    /// Starts node `node_id` again (after `kill_node`) with the same options, addresses and data
    /// dir: it recovers its segments from their files. Returns the instant just before the spawn.
    pub fn respawn_node(&mut self, node_id: u32) -> Result<Instant> {
        let node = self.node_mut(node_id)?;
        let (addr, metrics_addr, start) = (node.addr, node.metrics_addr, node.starts + 1);
        let spawned_at = Instant::now();
        let process = self.spawn_node(node_id, addr, metrics_addr, start)?;
        let node = self.node_mut(node_id)?;
        node.process = process;
        node.starts = start;
        Ok(spawned_at)
    }

    /// Waits until node `node_id` is ready (`storage_node_ready`), polling every `STORAGE_READY_POLL`;
    /// fails at `timeout`, or if the process exits.
    pub async fn wait_node_ready(&mut self, node_id: u32, timeout: Duration) -> Result<()> {
        let segments = self.launch.segments;
        let node = self.node_mut(node_id)?;
        let metrics_addr = node.metrics_addr;
        wait_until(&mut node.process, timeout, STORAGE_READY_POLL, || storage_node_ready(metrics_addr, segments)).await
    }

    pub fn identity(&self) -> Result<borealis_net::TlsIdentity> {
        borealis_net::TlsIdentity::load(&self.dir.join("certs"), "loadgen")
    }

    /// Connects to every node, retrying until each answers or the deadline passes.
    pub async fn connect_all(&mut self, endpoint: &quinn::Endpoint) -> Result<Vec<StorageConn>> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut conns = Vec::new();
        for node in &mut self.nodes {
            loop {
                node.process.check_running()?;
                match tokio::time::timeout(PROBE_TIMEOUT, StorageConn::connect(endpoint, node.addr)).await {
                    Ok(Ok(c)) => break conns.push(c),
                    Ok(Err(e)) if Instant::now() > deadline => return Err(e).context("storage node did not become ready"),
                    _ if Instant::now() > deadline => bail!("{} did not become ready within {READY_TIMEOUT:?}", node.process.name),
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        Ok(conns)
    }

    /// Stops every node with SIGTERM (each flushes and exits), SIGKILL after a timeout.
    pub fn stop(&mut self) -> Result<()> {
        stop_all(self.nodes.iter_mut().map(|n| &mut n.process))
    }

    fn cpu_seconds(&self) -> Result<f64> {
        self.nodes.iter().map(|n| n.process.cpu_seconds()).sum()
    }
}

/// Six storage nodes (two per AZ), a writerd and read replicas, with the volume file that ties them together.
pub struct LocalCluster {
    pub storage: LocalStorage,
    pub writer_addr: SocketAddr,
    pub writer_metrics_addr: SocketAddr,
    writerd: Daemon,
    pub replicas: Vec<Replica>,
    /// The certificate directory (a `loadgen` client certificate included) and the volume file.
    pub certs: PathBuf,
    pub volume_path: PathBuf,
}

/// A replicad of a local cluster.
pub struct Replica {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    process: Daemon,
}

/// What a local cluster runs: its volume, how many replicas, and extra options per daemon.
pub struct ClusterSpec<'a> {
    pub pgs: u32,
    pub page_count: u64,
    pub replicas: usize,
    pub storaged_args: &'a [String],
    pub writerd_args: &'a [String],
    pub replicad_args: &'a [String],
}

/// Daemon option that precedes any user-given ones (later options win).
const ONE_THREAD: [&str; 2] = ["--worker-threads", "1"];

/// Writes need a full protection group: six segments.
pub const CLUSTER_NODES: u32 = 6;

impl LocalCluster {
    /// Starts the storage nodes, waits for them, then starts writerd and then
    /// the replicas, waiting until each serves a get.
    pub async fn start(dir: &Path, spec: &ClusterSpec<'_>) -> Result<Self> {
        Self::launch(dir, spec, false).await
    }

    /// Like `start`, with replicas that can take over: each gets the others' addresses
    /// (`--peers`) and a distinct `--priority`, replica 1 the highest.
    pub async fn start_for_failover(dir: &Path, spec: &ClusterSpec<'_>) -> Result<Self> {
        Self::launch(dir, spec, true).await
    }

    async fn launch(dir: &Path, spec: &ClusterSpec<'_>, failover: bool) -> Result<Self> {
        let all_pgs: Vec<u32> = (0..spec.pgs).collect();
        // The daemons share this host's cores: one network thread each switches least.
        let storaged_args: Vec<String> = ONE_THREAD.iter().map(|s| s.to_string()).chain(spec.storaged_args.iter().cloned()).collect();
        let (writer_addr, writer_metrics_addr) = daemon_addrs()?;
        let volume = (writer_addr, spec.pgs, spec.page_count);
        let mut storage = LocalStorage::start_nodes(dir, CLUSTER_NODES, &all_pgs, &storaged_args, Some(volume))?;
        let certs = dir.join("certs");
        // The CA made by LocalStorage::start signs these too.
        borealis_net::certs::generate(&certs, &["writerd".to_string(), "replicad".to_string()])?;
        let endpoint = borealis_net::client_endpoint(&storage.identity()?)?;
        drop(storage.connect_all(&endpoint).await?);
        let volume_path = dir.join("volume.toml");
        let mut writerd = Daemon::spawn(
            "writerd",
            dir.join("writerd.log"),
            serve_volume(writerd_binary()?, &volume_path, &certs, writer_metrics_addr).args(spec.writerd_args),
        )?;
        wait_serving(&endpoint, writer_addr, &mut writerd).await?;
        let mut replicas = Vec::new();
        let replica_addrs = (0..spec.replicas).map(|_| daemon_addrs()).collect::<Result<Vec<_>>>()?;
        for (i, &(addr, metrics_addr)) in replica_addrs.iter().enumerate() {
            let name = format!("replicad-{}", i + 1);
            let mut cmd = serve_volume(replicad_binary()?, &volume_path, &certs, metrics_addr);
            cmd.args(["--listen", &addr.to_string()]);
            if failover {
                let peers: Vec<String> = replica_addrs.iter().filter(|(a, _)| *a != addr).map(|(a, _)| a.to_string()).collect();
                if !peers.is_empty() {
                    cmd.args(["--peers", &peers.join(",")]);
                }
                cmd.args(["--priority", &(spec.replicas - i).to_string()]);
            }
            let process = Daemon::spawn(&name, dir.join(format!("{name}.log")), cmd.args(spec.replicad_args))?;
            replicas.push(Replica { addr, metrics_addr, process });
        }
        // Started together, they catch up together; then each must answer.
        for r in &mut replicas {
            wait_serving(&endpoint, r.addr, &mut r.process).await?;
        }
        endpoint.close(0u32.into(), b"ready");
        Ok(LocalCluster { storage, writer_addr, writer_metrics_addr, writerd, replicas, certs, volume_path })
    }

    /// CPU time (user + system) every daemon of the cluster has used so far, together.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let replicas: Result<f64> = self.replicas.iter().map(|r| r.process.cpu_seconds()).sum();
        Ok(self.storage.cpu_seconds()? + self.writerd.cpu_seconds()? + replicas?)
    }

    /// The pids of every daemon of the cluster (unreaped children of loadgen's).
    pub fn pids(&self) -> Vec<i32> {
        self.storage.nodes.iter().map(|n| &n.process).chain([&self.writerd]).chain(self.replicas.iter().map(|r| &r.process)).map(Daemon::pid).collect()
    }

    /// The client API addresses of every server that is or may become the writer: writerd's, then the replicas'.
    pub fn api_addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(self.writer_addr).chain(self.replicas.iter().map(|r| r.addr)).collect()
    }

    /// SIGKILLs writerd (no flush, no goodbye) and reaps it; returns when the signal was sent.
    pub fn kill_writer(&mut self) -> Instant {
        let at = Instant::now();
        self.writerd.kill();
        at
    }

    /// Starts a new writerd on the old one's addresses (after `kill_writer`), and waits until it serves.
    pub async fn restart_writer(&mut self, extra_args: &[String]) -> Result<()> {
        let dir = self.storage.dir.clone();
        let log = dir.join("writerd-restarted.log");
        self.writerd =
            Daemon::spawn("writerd", log, serve_volume(writerd_binary()?, &self.volume_path, &self.certs, self.writer_metrics_addr).args(extra_args))?;
        let endpoint = borealis_net::client_endpoint(&self.storage.identity()?)?;
        let served = wait_serving(&endpoint, self.writer_addr, &mut self.writerd).await;
        endpoint.close(0u32.into(), b"ready");
        served
    }

    /// Stops the replicas first (they read from the writer and storage), then
    /// writerd (it stops writing), then the storage nodes.
    pub fn stop(&mut self) -> Result<()> {
        let replicas = stop_all(self.replicas.iter_mut().map(|r| &mut r.process));
        // A writerd killed by `kill_writer` has nothing left to stop.
        let writer = if matches!(self.writerd.child.try_wait(), Ok(Some(_))) { Ok(()) } else { stop_all([&mut self.writerd]) };
        let storage = self.storage.stop();
        replicas.and(writer).and(storage)
    }
}

/// How writerd and replicad start: serving the volume, one network thread (user options come after and win).
fn serve_volume(bin: PathBuf, volume: &Path, certs: &Path, metrics_addr: SocketAddr) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg("--volume").arg(volume).arg("--certs").arg(certs).args(["--metrics-listen", &metrics_addr.to_string()]).args(ONE_THREAD);
    cmd
}

/// Ready means a client can connect and read.
async fn wait_serving(endpoint: &quinn::Endpoint, addr: SocketAddr, daemon: &mut Daemon) -> Result<()> {
    let probe = || async move {
        let client = ApiClient::connect(endpoint, addr).await?;
        client.get(b"readiness-probe").await?;
        client.close();
        Ok::<_, anyhow::Error>(())
    };
    wait_until(daemon, READY_TIMEOUT, Duration::from_millis(20), probe).await
}

/// Runs `probe` every `poll` (each try cut at `PROBE_TIMEOUT`) until it succeeds; fails once
/// `timeout` has passed, or as soon as `daemon` has exited.
async fn wait_until<F, P>(daemon: &mut Daemon, timeout: Duration, poll: Duration, mut probe: P) -> Result<()>
where
    P: FnMut() -> F,
    F: Future<Output = Result<()>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        daemon.check_running()?;
        let name = &daemon.name;
        match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => return Err(e).with_context(|| format!("{name} did not become ready; see {}", daemon.log.display())),
            _ if Instant::now() > deadline => bail!("{name} did not become ready within {timeout:?}; see {}", daemon.log.display()),
            _ => tokio::time::sleep(poll).await,
        }
    }
}

/// How often `LocalStorage::wait_node_ready` probes: the resolution of a measured restart.
const STORAGE_READY_POLL: Duration = Duration::from_millis(5);

/// Whether the storage node serving metrics at `metrics_addr` is ready, with `segments` segments:
/// its /metrics page answers, and shows a `storaged_segment_joining` gauge of 0 for every segment.
/// storaged serves metrics only once `Node::open` has recovered every segment from its files
/// and its QUIC endpoint is bound; a new or wiped segment is then still joining (1) until it has
/// learnt its epoch state from its PG's peers, and grants no claim before.
pub async fn storage_node_ready(metrics_addr: SocketAddr, segments: usize) -> Result<()> {
    segments_joined(&scrape(metrics_addr).await?, segments)
}

/// Whether a storage node's metrics `page` shows `segments` segments, none of them joining.
fn segments_joined(page: &str, segments: usize) -> Result<()> {
    let joining: Vec<f64> = metric_values(page, "storaged_segment_joining", "").collect();
    if joining.len() != segments || joining.iter().any(|&v| v != 0.0) {
        bail!("storaged_segment_joining of the {segments} segments: {joining:?}");
    }
    Ok(())
}

/// Reads one unlabelled-or-labelled sample value from a Prometheus text page:
/// the sum over all series of `name` whose labels contain `label_filter`.
pub fn metric_sum(page: &str, name: &str, label_filter: &str) -> f64 {
    metric_values(page, name, label_filter).sum()
}

/// The values of every series of `name` whose labels contain `label_filter`, in page order.
pub fn metric_values<'a>(page: &'a str, name: &'a str, label_filter: &'a str) -> impl Iterator<Item = f64> + 'a {
    page.lines().filter(|l| !l.starts_with('#')).filter_map(move |l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, labels) = series.split_once('{').unwrap_or((series, ""));
        (n == name && labels.contains(label_filter)).then(|| value.parse::<f64>().ok()).flatten()
    })
}

/// Fetches http://addr/metrics.
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect metrics {addr}"))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    let (_, page) = body.split_once("\r\n\r\n").context("metrics reply without body")?;
    Ok(page.to_string())
}

/// writerd's own view of one measurement (embedded cluster only), from its /metrics at the end.
/// Counters and summaries cover writerd's whole life: the warm-up and the measured seconds.
#[derive(Serialize, Clone, Debug)]
pub struct WriterdMetrics {
    /// `writerd_commits_total`: transactions acknowledged.
    pub commits: u64,
    /// `writerd_commit_errors_total`: transactions answered with an error.
    pub commit_errors: u64,
    /// `writerd_lal_stalls_total`: transactions that waited for VDL to advance (LSN allocation limit).
    pub lal_stalls: u64,
    /// `writerd_page_fetches_total`: page-cache misses read from storage (GetPage@LSN).
    pub page_fetches: u64,
    /// `writerd_commit_latency_us`: transaction received to acknowledged, inside writerd.
    pub commit_latency_us_p50: u64,
    pub commit_latency_us_p99: u64,
    pub commit_latency_us_p999: u64,
}

/// A replica's own gauges at the end of a measurement (embedded cluster only).
#[derive(Serialize, Clone, Debug)]
pub struct ReplicadMetrics {
    pub applied_vdl: u64,
    pub writer_vdl: u64,
    pub flushed_lsn: u64,
    pub retained_bytes: u64,
    pub pending_bytes: u64,
    /// Inside the replica: from hearing a VDL to the read point reaching it.
    pub apply_delay_us_p50: u64,
    pub apply_delay_us_p99: u64,
}

/// writerd's metrics, scraped from its /metrics at `addr`.
pub async fn writerd_metrics(addr: SocketAddr) -> Result<WriterdMetrics> {
    let page = scrape(addr).await?;
    let q = |q: &str| metric_sum(&page, "writerd_commit_latency_us", &format!("quantile=\"{q}\"")) as u64;
    Ok(WriterdMetrics {
        commits: metric_sum(&page, "writerd_commits_total", "") as u64,
        commit_errors: metric_sum(&page, "writerd_commit_errors_total", "") as u64,
        lal_stalls: metric_sum(&page, "writerd_lal_stalls_total", "") as u64,
        page_fetches: metric_sum(&page, "writerd_page_fetches_total", "") as u64,
        commit_latency_us_p50: q("0.5"),
        commit_latency_us_p99: q("0.99"),
        commit_latency_us_p999: q("0.999"),
    })
}

/// A replicad's gauges, scraped from its /metrics at `addr`.
pub async fn replicad_metrics(addr: SocketAddr) -> Result<ReplicadMetrics> {
    let page = scrape(addr).await?;
    let gauge = |name: &str| metric_sum(&page, name, "") as u64;
    Ok(ReplicadMetrics {
        applied_vdl: gauge("replicad_applied_vdl"),
        writer_vdl: gauge("replicad_writer_vdl"),
        flushed_lsn: gauge("replicad_flushed_lsn"),
        retained_bytes: gauge("replicad_retained_bytes"),
        pending_bytes: gauge("replicad_pending_bytes"),
        apply_delay_us_p50: metric_sum(&page, "replicad_apply_delay_us", "quantile=\"0.5\"") as u64,
        apply_delay_us_p99: metric_sum(&page, "replicad_apply_delay_us", "quantile=\"0.99\"") as u64,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn metric_sum_filters_by_name_and_label() {
        let page = "# HELP x\nfoo{node=\"1\",pg=\"0\"} 5\nfoo{node=\"1\",pg=\"1\"} 7\nfoo_sum 100\nbar 3\nfoo{quantile=\"0.99\"} 9\n";
        assert_eq!(super::metric_sum(page, "foo", "pg="), 12.0);
        assert_eq!(super::metric_sum(page, "bar", ""), 3.0);
        assert_eq!(super::metric_sum(page, "foo", "quantile=\"0.99\""), 9.0);
    }

    #[test]
    fn a_storage_node_is_ready_once_every_segment_has_joined() {
        let page = |a, b| {
            format!("# TYPE storaged_segment_joining gauge\nstoraged_segment_joining{{node=\"3\",pg=\"0\"}} {a}\nstoraged_segment_joining{{node=\"3\",pg=\"1\"}} {b}\n")
        };
        assert!(super::segments_joined(&page(0, 0), 2).is_ok());
        assert!(super::segments_joined(&page(0, 1), 2).is_err(), "a segment still joining");
        assert!(super::segments_joined(&page(0, 0), 3).is_err(), "a segment missing from the page");
        assert!(super::segments_joined("", 2).is_err());
    }
}
