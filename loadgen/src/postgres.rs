//! PostgreSQL 15 streaming replication as a target of the same open-loop
//! workload (`open_loop`): a primary and hot standbys on loopback, started
//! and stopped by loadgen like the embedded Borealis cluster.
//!
//! `loadgen pg-bench` measures commit latency, throughput, standby
//! visibility lag and the servers' CPU per commit for each `synchronous_commit`
//! mode; `loadgen pg-failover` SIGKILLs the primary under load, promotes the
//! standby at once, and reads every transaction back from it.
//!
//! The servers: `initdb` of the primary in a temp directory, `postgres` on a
//! free loopback port (fsync on, `synchronous_standby_names = '*'`, or quorum
//! commit `'ANY 1 (s1, s2, …)'` with several standbys), `pg_basebackup -R` hot
//! standbys on other ports, streaming before any load. Each postmaster runs in
//! a process group of its own (its children each make their own), as the
//! `postgres` user when loadgen runs as root (PostgreSQL refuses root), and
//! dies with loadgen (`PR_SET_PDEATHSIG`); stopping sends the immediate
//! shutdown signal, then SIGKILL to whatever is left of the postmaster and the
//! processes under it, and only those.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use redo_core::page::PageOp;
use redo_core::Lsn;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::types::{PgLsn, ToSql};
use tokio_postgres::{Client, NoTls, Statement};

use crate::audit::{AuditTotals, Workload, WriteAudit};
use crate::cluster::{free_port, proc_stat_fields, WorkDir};
use crate::open_loop::{self, Feeds, LoadArgs, Measurement, Point, ReadPoint, System};
use crate::pause::{DutyCycle, Pauser};
use crate::procs;
use crate::pacing::{pace, TICKS_QUEUED_MAX};
use crate::report::{latency_histogram, median, LatencyUs};

/// Where PostgreSQL is and how its servers are configured; shared by the commands that start a pair.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct PgArgs {
    /// Directory of PostgreSQL's server binaries (initdb, postgres, pg_basebackup).
    #[arg(long, env = "BOREALIS_PG_BIN", default_value = DEFAULT_PG_BIN)]
    pub pg_bin: PathBuf,
    /// shared_buffers of every server (the data set is a few tens of MB: it fits).
    #[arg(long, default_value = "256MB")]
    pub pg_shared_buffers: String,
    /// Extra server setting for every server, e.g. `--pg-setting wal_compression=on` (repeatable; later ones win).
    #[arg(long = "pg-setting", value_name = "NAME=VALUE")]
    pub pg_settings: Vec<String>,
}

/// Debian's postgresql-15 package.
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// When PostgreSQL acknowledges a commit (`synchronous_commit`, set per client session).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum SyncCommit {
    /// After the commit record is in WAL buffers; WAL writer flushes within wal_writer_delay (an acknowledged commit can be lost).
    #[value(name = "off")]
    #[serde(rename = "off")]
    Off,
    /// After the local WAL flush; the standby is asynchronous.
    #[value(name = "local")]
    #[serde(rename = "local")]
    Local,
    /// After the local flush and the synchronous standby's flush.
    #[value(name = "on")]
    #[serde(rename = "on")]
    On,
    /// After the local flush and the synchronous standby's replay (visible there).
    #[value(name = "remote_apply")]
    #[serde(rename = "remote_apply")]
    RemoteApply,
}

impl SyncCommit {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncCommit::Off => "off",
            SyncCommit::Local => "local",
            SyncCommit::On => "on",
            SyncCommit::RemoteApply => "remote_apply",
        }
    }
}

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The uid and gid to run PostgreSQL as: `postgres` when loadgen is root, else loadgen's own (None).
fn server_user() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the fields are read at once, before any other getpw* call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("loadgen runs as root and PostgreSQL refuses to: there is no `postgres` user to run it as (install postgresql-15, or run loadgen as another user)");
    }
    // SAFETY: pw is non-null and points to getpwnam's static record.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
}

/// SIGKILLs a process and every process under it when dropped, unless disarmed (`None`) first.
struct KillTreeOnDrop(Option<i32>);

impl Drop for KillTreeOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            for member in procs::tree_pids(&[pid]) {
                // SAFETY: our unreaped child (armed only until it is reaped) and the processes under it, listed just now.
                unsafe { libc::kill(member, libc::SIGKILL) };
            }
        }
    }
}

/// A PostgreSQL tool run to completion, as the server user, in `dir`. Cancelled (Ctrl-C, an error elsewhere),
/// it is killed with every process it started (pg_basebackup streams WAL from a child process).
async fn run_tool(bin: &Path, tool: &str, user: Option<(u32, u32)>, dir: &Path, args: &[&std::ffi::OsStr]) -> Result<()> {
    let path = bin.join(tool);
    let mut cmd = tokio::process::Command::new(&path);
    cmd.args(args).current_dir(dir).env("HOME", dir).kill_on_drop(true).stdin(Stdio::null());
    for var in ["PGHOST", "PGPORT", "PGDATA", "PGUSER", "PGDATABASE", "PGOPTIONS", "PGSERVICE"] {
        cmd.env_remove(var);
    }
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("run {}", path.display()))?;
    let mut running = KillTreeOnDrop(child.id().map(|pid| pid as i32));
    let out = child.wait_with_output().await;
    // Reaped: its pid may be reused from now on.
    running.0 = None;
    let out = out.with_context(|| format!("run {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} failed ({}): {}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A postmaster loadgen started, in a process group of its own (its children each make their own).
pub struct Postmaster {
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Child,
    /// Reaped: the group id may be reused, so nothing is signalled any more.
    reaped: bool,
    /// The dynamic shared memory segments the server had mapped when it was killed: a killed
    /// server cannot remove them, and they would hold RAM in /dev/shm until a reboot.
    orphans: BTreeSet<PathBuf>,
    /// The processes SIGKILLed: `stop` waits until none runs.
    killed: Vec<i32>,
}

impl Postmaster {
    fn spawn(bin: &Path, name: &str, data_dir: &Path, log: PathBuf, user: Option<(u32, u32)>, settings: &[(String, String)]) -> Result<Self> {
        let port = settings.iter().rev().find(|(k, _)| k == "port").and_then(|(_, v)| v.parse().ok()).context("a port setting")?;
        let log_file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = std::process::Command::new(bin.join("postgres"));
        cmd.arg("-D").arg(data_dir);
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        for var in ["PGHOST", "PGPORT", "PGDATA", "PGUSER", "PGDATABASE", "PGOPTIONS"] {
            cmd.env_remove(var);
        }
        cmd.current_dir(data_dir).process_group(0).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file);
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        // SAFETY: runs in the forked child before exec (after the uid change, which would clear it) and only calls prctl.
        unsafe {
            cmd.pre_exec(|| {
                // Dies with loadgen even when no destructor runs; its backends follow (PostgreSQL's postmaster-death signal).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("start {name} ({})", bin.join("postgres").display()))?;
        Ok(Postmaster { name: name.to_string(), port, data_dir: data_dir.to_path_buf(), log, child, reaped: false, orphans: BTreeSet::new(), killed: Vec::new() })
    }

    /// The postmaster's pid, which is its process group's id.
    pub fn pgid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails if the postmaster has exited (it should be serving).
    fn check_running(&self) -> Result<()> {
        if !is_running(self.pgid()) {
            bail!("{} exited during start-up; {}:\n{}", self.name, self.log.display(), self.log_tail());
        }
        Ok(())
    }

    /// SIGKILL to the whole server at once (postmaster and every process under it, as a crash of its
    /// machine): returns when sent.
    pub fn kill(&mut self) -> Instant {
        if self.reaped {
            return Instant::now();
        }
        let members = self.members();
        self.orphans = with_listed_segments(mapped_shm_segments(&members));
        let at = Instant::now();
        self.sigkill(members);
        at
    }

    /// The postmaster and every process under it, parents first (PostgreSQL gives each child a process
    /// group of its own, so the postmaster's group is not the server). Listed while the postmaster is
    /// unreaped, so none of their pids can have been reused.
    fn members(&self) -> Vec<i32> {
        procs::tree_pids(&[self.pgid()])
    }

    /// SIGKILL to `members` (the postmaster first, so it forks no new child); `stop` waits for them.
    fn sigkill(&mut self, members: Vec<i32>) {
        for &pid in &members {
            // SAFETY: processes of the server, listed just now by `members`.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.killed.extend(members);
    }

    /// Immediate shutdown (SIGQUIT: the postmaster stops its backends and exits), SIGKILL to every process
    /// of the server after a timeout or if any is left; waits until none runs.
    pub fn stop(&mut self) -> Result<()> {
        if self.reaped {
            return Ok(());
        }
        let pid = self.pgid();
        if is_running(pid) {
            // SAFETY: signalling our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while is_running(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Whatever is left: the postmaster and its processes if it did not stop.
        let left = self.members();
        self.sigkill(left);
        let _ = self.child.wait();
        self.reaped = true;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let left: Vec<i32> = self.killed.iter().copied().filter(|&pid| is_running(pid)).collect();
            if left.is_empty() {
                for segment in std::mem::take(&mut self.orphans) {
                    let _ = std::fs::remove_file(segment);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: processes {left:?} still run after SIGKILL", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Postmaster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %format!("{e:#}"), "stopping PostgreSQL");
        }
    }
}

/// Whether process `pid` exists and is not a zombie (state, field 3 of /proc/PID/stat, is not Z).
fn is_running(pid: i32) -> bool {
    proc_stat_fields(&pid.to_string()).is_some_and(|f| !f.first().is_some_and(|state| state.starts_with('Z')))
}

/// Where PostgreSQL's dynamic shared memory segments live, with the default
/// `dynamic_shared_memory_type = posix`: this prefix, then the segment's handle.
pub const SHM_SEGMENT_PREFIX: &str = "/dev/shm/PostgreSQL.";

/// PostgreSQL's dynamic shared memory segments that processes `pids` have mapped.
pub fn mapped_shm_segments(pids: &[i32]) -> BTreeSet<PathBuf> {
    let mapped = |maps: String| -> Vec<PathBuf> {
        maps.lines().filter_map(|line| line.split_whitespace().nth(5).filter(|p| p.starts_with(SHM_SEGMENT_PREFIX)).map(PathBuf::from)).collect()
    };
    pids.iter().filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()).flat_map(mapped).collect()
}

/// `segments` with every segment that a control segment among them lists as in use: what
/// PostgreSQL's next start would remove (`dsm_cleanup_using_control_segment`), since a segment
/// can outlive its last mapping (pinned). The layout is `dsm_control_header` of PostgreSQL 15's
/// dsm.c on a 64-bit machine: magic, nitems, maxitems, then 40-byte items of handle, refcnt,
/// first_page, npages, a pointer and `pinned`; anything without the magic is left alone.
fn with_listed_segments(mut segments: BTreeSet<PathBuf>) -> BTreeSet<PathBuf> {
    const MAGIC: u32 = 0x9a50_3d32;
    const ITEMS_AT: usize = 16;
    const ITEM_BYTES: usize = 40;
    let u32_at = |b: &[u8], at: usize| b.get(at..at + 4).map(|w| u32::from_ne_bytes(w.try_into().expect("4 bytes")));
    let mut listed = Vec::new();
    for control in segments.iter().filter_map(|path| std::fs::read(path).ok()).filter(|b| u32_at(b, 0) == Some(MAGIC)) {
        let nitems = u32_at(&control, 4).unwrap_or(0) as usize;
        for item in (0..nitems).map(|i| ITEMS_AT + i * ITEM_BYTES) {
            let (Some(handle), Some(refcnt)) = (u32_at(&control, item), u32_at(&control, item + 4)) else { break };
            // Refcount 0: a free slot. Odd handles live in the main shared memory area, not in /dev/shm.
            if refcnt > 0 && handle.is_multiple_of(2) {
                listed.push(PathBuf::from(format!("{SHM_SEGMENT_PREFIX}{handle}")));
            }
        }
    }
    segments.extend(listed);
    segments
}

/// Settings every server gets (then its own, then the user's `--pg-setting`s).
fn common_settings(pg: &PgArgs, socket_dir: &Path) -> Vec<(String, String)> {
    let s = |k: &str, v: &str| (k.to_string(), v.to_string());
    vec![
        s("listen_addresses", "127.0.0.1"),
        s("unix_socket_directories", &socket_dir.display().to_string()),
        s("shared_buffers", &pg.pg_shared_buffers),
        // Default durability: WAL fsynced (fdatasync) at commit, full-page writes, on the disk Borealis uses.
        s("fsync", "on"),
        s("full_page_writes", "on"),
        s("wal_level", "replica"),
        s("max_wal_senders", "4"),
        s("hot_standby", "on"),
        s("max_connections", "100"),
        s("logging_collector", "off"),
    ]
}

fn user_settings(pg: &PgArgs) -> Result<Vec<(String, String)>> {
    pg.pg_settings
        .iter()
        .map(|kv| kv.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).with_context(|| format!("--pg-setting {kv}: expected NAME=VALUE")))
        .collect()
}

/// A PostgreSQL configuration under test: the client sessions' `synchronous_commit` and the primary's standbys.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct PgSetup {
    pub synchronous_commit: SyncCommit,
    /// Hot standbys (application_name s1, s2, …). One is the synchronous standby; with more, the primary
    /// commits on any one of them (quorum commit, `synchronous_standby_names = 'ANY 1 (s1, s2, …)'`).
    pub standbys: usize,
}

impl PgSetup {
    pub fn new(synchronous_commit: SyncCommit, standbys: usize) -> Self {
        assert!(standbys >= 1, "PostgreSQL runs with at least one standby here");
        PgSetup { synchronous_commit, standbys }
    }

    /// How rows, points and file names call it: the mode, then `-any1of2` with quorum commit over two standbys.
    pub fn durability(&self) -> String {
        match self.standbys {
            1 => self.synchronous_commit.as_str().to_string(),
            n => format!("{}-any1of{n}", self.synchronous_commit.as_str()),
        }
    }
}

/// The primary's `synchronous_standby_names` with `standbys` standbys named s1, s2, …: any standby with one,
/// quorum commit on any one of them with more.
pub fn synchronous_standby_names(standbys: usize) -> String {
    match standbys {
        1 => "*".to_string(),
        n => format!("ANY 1 ({})", (1..=n).map(|i| format!("s{i}")).collect::<Vec<_>>().join(", ")),
    }
}

/// A primary and its hot standbys on loopback, stopped (standbys first) by `stop` or on drop.
pub struct PgServers {
    pub dir: PathBuf,
    /// s1, s2, … in order (their `cluster_name`, hence their walreceiver's application_name).
    pub standbys: Vec<Postmaster>,
    pub primary: Postmaster,
    bin: PathBuf,
    user: Option<(u32, u32)>,
}

impl PgServers {
    /// initdb, the primary, `standbys` hot standbys made with `pg_basebackup -R`, all streaming as synchronous
    /// (or quorum) standbys, and an empty `kv` table that every standby shows.
    pub async fn start(pg: &PgArgs, dir: &Path, standbys: usize) -> Result<Self> {
        assert!(standbys >= 1, "PostgreSQL runs with at least one standby here");
        let user = server_user()?;
        let bin = pg.pg_bin.clone();
        if !bin.join("postgres").exists() {
            bail!("{} not found: install PostgreSQL 15 (Debian: apt-get install postgresql-15) or point --pg-bin / BOREALIS_PG_BIN at its bin directory", bin.join("postgres").display());
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).with_context(|| format!("chown {} to postgres", dir.display()))?;
        }
        let primary_dir = dir.join("primary");
        run_tool(&bin, "initdb", user, dir, &["-D".as_ref(), primary_dir.as_os_str(), "-U".as_ref(), "postgres".as_ref(), "--auth=trust".as_ref(), "--locale=C".as_ref(), "--encoding=UTF8".as_ref(), "--no-sync".as_ref()])
            .await
            .with_context(|| format!("initdb under {} (the postgres user must be able to reach it)", dir.display()))?;
        let extra = user_settings(pg)?;
        let primary_port = free_port()?;
        let mut primary_settings = common_settings(pg, dir);
        primary_settings.extend([("port".to_string(), primary_port.to_string()), ("synchronous_standby_names".to_string(), synchronous_standby_names(standbys))]);
        primary_settings.extend(extra.iter().cloned());
        // Each postmaster stops when dropped: an error below stops what runs.
        let primary = Postmaster::spawn(&bin, "postgres primary", &primary_dir, dir.join("primary.log"), user, &primary_settings)?;
        wait_ready(&primary).await?;
        let port = primary_port.to_string();
        let mut servers = PgServers { dir: dir.to_path_buf(), standbys: Vec::new(), primary, bin, user };
        for name in (1..=standbys).map(|i| format!("s{i}")) {
            let standby_dir = dir.join(format!("standby-{name}"));
            run_tool(
                &servers.bin,
                "pg_basebackup",
                user,
                dir,
                &["-h".as_ref(), "127.0.0.1".as_ref(), "-p".as_ref(), port.as_ref(), "-U".as_ref(), "postgres".as_ref(), "-D".as_ref(), standby_dir.as_os_str(), "-R".as_ref(), "-X".as_ref(), "stream".as_ref(), "--checkpoint=fast".as_ref(), "--no-sync".as_ref()],
            )
            .await?;
            let mut standby_settings = common_settings(pg, dir);
            standby_settings.extend([
                ("port".to_string(), free_port()?.to_string()),
                // The walreceiver's application_name, which synchronous_standby_names lists.
                ("cluster_name".to_string(), name.clone()),
                // After a promotion it has no standby of its own: it must not wait for one.
                ("synchronous_standby_names".to_string(), String::new()),
                // In PostgreSQL's favour: a promotion that races the walreceiver's exit can otherwise sleep out this
                // interval (5 s by default) before it takes effect.
                ("wal_retrieve_retry_interval".to_string(), "50ms".to_string()),
            ]);
            standby_settings.extend(extra.iter().cloned());
            let standby = Postmaster::spawn(&servers.bin, &format!("postgres standby {name}"), &standby_dir, dir.join(format!("standby-{name}.log")), user, &standby_settings)?;
            wait_ready(&standby).await?;
            servers.standbys.push(standby);
        }
        let setup = connect(primary_port, "loadgen-setup", false).await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let row = setup.query_one("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum')", &[]).await?;
            if row.get::<_, i64>(0) >= standbys as i64 {
                break;
            }
            for standby in &servers.standbys {
                standby.check_running()?;
            }
            if Instant::now() > deadline {
                bail!("the standbys did not all stream within {READY_TIMEOUT:?}; see {}/standby-*.log", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        setup.batch_execute("CREATE TABLE kv (key text PRIMARY KEY, value bytea)").await.context("create table kv")?;
        // Committed with a synchronous standby's flush; wait until every standby shows it.
        for standby in &servers.standbys {
            let on_standby = connect(standby.port, "loadgen-setup", false).await?;
            loop {
                if on_standby.query_one("SELECT to_regclass('kv') IS NOT NULL", &[]).await?.get::<_, bool>(0) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("table kv did not reach {} within {READY_TIMEOUT:?}", standby.name);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(servers)
    }

    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    /// The postmasters' pids, each its process group's id (for the record).
    pub fn pgids(&self) -> Vec<i32> {
        std::iter::once(&self.primary).chain(&self.standbys).map(Postmaster::pgid).collect()
    }

    /// Promotes the first standby with `pg_ctl promote` (no wait), as the server user.
    pub async fn pg_ctl_promote(&self) -> Result<()> {
        run_tool(&self.bin, "pg_ctl", self.user, &self.dir, &["promote".as_ref(), "-W".as_ref(), "-D".as_ref(), self.standbys[0].data_dir.as_os_str()]).await
    }

    /// Stops the standbys, then the primary.
    pub fn stop(&mut self) -> Result<()> {
        let standbys = self.standbys.iter_mut().map(Postmaster::stop).fold(Ok(()), Result::and);
        let primary = self.primary.stop();
        standbys.and(primary)
    }
}

/// Ready means a client can connect and run a query.
async fn wait_ready(p: &Postmaster) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        p.check_running()?;
        match connect(p.port, "loadgen-probe", false).await {
            Ok(c) if c.simple_query("SELECT 1").await.is_ok() => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(_) => bail!("{} did not answer within {READY_TIMEOUT:?}", p.name),
            Err(e) => return Err(e).with_context(|| format!("{} did not become ready; {}:\n{}", p.name, p.log.display(), p.log_tail())),
        }
    }
}

/// A client of the server on 127.0.0.1:`port` (database and user `postgres`); `read_write` refuses a server in recovery.
pub async fn connect(port: u16, app: &str, read_write: bool) -> Result<Client> {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port).user("postgres").dbname("postgres").application_name(app).connect_timeout(CONNECT_TIMEOUT);
    if read_write {
        config.target_session_attrs(TargetSessionAttrs::ReadWrite);
    }
    let (client, connection) = config.connect(NoTls).await.with_context(|| format!("connect to PostgreSQL on 127.0.0.1:{port}"))?;
    tokio::spawn(async move {
        // Ends with an error when the server goes away; the client's calls report it.
        let _ = connection.await;
    });
    Ok(client)
}

/// One client session that commits puts: `synchronous_commit` set, statements prepared.
pub struct PgConn {
    client: Client,
    put: Statement,
    begin: Statement,
    commit: Statement,
    /// Held while a transaction's statements are queued, so that transactions pipelined on this session do not interleave.
    order: tokio::sync::Mutex<()>,
}

type Step<'a> = Pin<Box<dyn Future<Output = Result<Option<u64>, tokio_postgres::Error>> + Send + 'a>>;

impl PgConn {
    pub async fn open(port: u16, mode: SyncCommit, app: &str, read_write: bool) -> Result<Self> {
        let client = connect(port, app, read_write).await?;
        client.batch_execute(&format!("SET synchronous_commit = {}", mode.as_str())).await.context("set synchronous_commit")?;
        // The commit position for the lag probe: the WAL insert position just after this row's
        // records. The transaction's commit record follows them, so a standby whose replay point
        // reaches it may not show the row yet: the lag errs low by the replay of the records
        // between them (the commit record, and other sessions' records in between), in
        // PostgreSQL's favour. (PostgreSQL 15 has no function for the commit record's own LSN.)
        let put = client
            .prepare("INSERT INTO kv (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value RETURNING pg_current_wal_insert_lsn()")
            .await
            .context("prepare the put")?;
        let begin = client.prepare("BEGIN").await?;
        let commit = client.prepare("COMMIT").await?;
        Ok(PgConn { client, put, begin, commit, order: tokio::sync::Mutex::new(()) })
    }

    /// One transaction: a put alone commits by itself; several go between BEGIN and COMMIT. Every
    /// statement is queued at once (pipelined, like Borealis' client; PostgreSQL runs a session's
    /// statements one after the other), then the replies are awaited. Returns the WAL position after the last put.
    pub async fn txn(&self, ops: &[(String, Vec<u8>)]) -> Result<u64, tokio_postgres::Error> {
        let multi = ops.len() > 1;
        let mut steps: Vec<Step<'_>> = Vec::with_capacity(ops.len() + 2);
        if multi {
            steps.push(Box::pin(async { self.client.execute(&self.begin, &[]).await.map(|_| None) }));
        }
        for (key, value) in ops {
            steps.push(Box::pin(async move {
                let params: [&(dyn ToSql + Sync); 2] = [key, value];
                let row = self.client.query_one(&self.put, &params).await?;
                Ok(Some(u64::from(row.get::<_, PgLsn>(0))))
            }));
        }
        if multi {
            steps.push(Box::pin(async { self.client.execute(&self.commit, &[]).await.map(|_| None) }));
        }
        // A statement is sent on its future's first poll: poll each once, in order, under the session's lock.
        let mut done: Vec<Option<Result<Option<u64>, tokio_postgres::Error>>> = steps.iter().map(|_| None).collect();
        {
            let _order = self.order.lock().await;
            std::future::poll_fn(|cx| {
                for (step, d) in steps.iter_mut().zip(done.iter_mut()) {
                    if let Poll::Ready(r) = step.as_mut().poll(cx) {
                        *d = Some(r);
                    }
                }
                Poll::Ready(())
            })
            .await;
        }
        let mut lsn = 0;
        for (step, d) in steps.into_iter().zip(done) {
            let r = match d {
                Some(r) => r,
                None => step.await,
            };
            // An error anywhere fails the transaction (a COMMIT after a failed statement answers ROLLBACK without an error).
            if let Some(l) = r? {
                lsn = l;
            }
        }
        Ok(lsn)
    }
}

/// The puts of a transaction as (key, value); keys are text in PostgreSQL.
fn puts(ops: Vec<PageOp>) -> Result<Vec<(String, Vec<u8>)>, String> {
    ops.into_iter()
        .map(|op| match op {
            PageOp::Put { key, value } => String::from_utf8(key).map(|k| (k, value)).map_err(|_| "PostgreSQL keys are text: a key is not UTF-8".to_string()),
            PageOp::Delete { .. } => Err("the PostgreSQL target runs puts only".to_string()),
        })
        .collect()
}

/// PostgreSQL's primary behind `connections` client sessions.
pub struct PgPrimary {
    conns: Vec<PgConn>,
    acked: Arc<AckedPosition>,
}

/// The highest commit position acknowledged so far: the standby feed polls only while the standby is below it.
#[derive(Default)]
pub struct AckedPosition {
    lsn: std::sync::atomic::AtomicU64,
    advanced: tokio::sync::Notify,
}

impl AckedPosition {
    fn ack(&self, lsn: u64) {
        self.lsn.fetch_max(lsn, std::sync::atomic::Ordering::SeqCst);
        self.advanced.notify_waiters();
    }

    /// Returns once a commit above `lsn` has been acknowledged.
    async fn above(&self, lsn: u64) {
        loop {
            // Registered before the check, so an ack in between is not missed.
            let advanced = self.advanced.notified();
            if self.lsn.load(std::sync::atomic::Ordering::SeqCst) > lsn {
                return;
            }
            advanced.await;
        }
    }
}

impl PgPrimary {
    pub async fn connect(port: u16, mode: SyncCommit, connections: usize) -> Result<Self> {
        let mut conns = Vec::new();
        for i in 0..connections {
            conns.push(PgConn::open(port, mode, &format!("loadgen-{i}"), true).await?);
        }
        Ok(PgPrimary { conns, acked: Default::default() })
    }

    /// What the standby feed waits on (`WalFeed::standby`).
    pub fn acked(&self) -> Arc<AckedPosition> {
        self.acked.clone()
    }
}

impl System for PgPrimary {
    async fn commit(&self, conn: usize, ops: Vec<PageOp>) -> Result<Lsn, String> {
        let ops = puts(ops)?;
        let lsn = self.conns[conn].txn(&ops).await.map_err(|e| e.to_string())?;
        self.acked.ack(lsn);
        Ok(Lsn(lsn))
    }
}

/// A server's WAL position polled on one session, reported when it advances.
///
/// The standby's `pg_last_wal_replay_lsn()` is polled back to back while an acknowledged commit is
/// above its last replay point (and not at all otherwise): a commit is seen on the first poll answered
/// after its replay, so the lag errs high by up to one poll round trip (loopback, tens of µs), like the
/// replica-to-loadgen notification hop of Borealis' Follow feed. The polling costs CPU on the standby
/// and in loadgen that Borealis' event-driven feed does not (a third of a core at 1,000 commits/s here).
pub struct WalFeed {
    client: Client,
    query: Statement,
    last: Option<u64>,
    pause: Duration,
    /// Poll only while a commit above `last` is acknowledged (the standby feed).
    acked: Option<Arc<AckedPosition>>,
}

impl WalFeed {
    /// The standby's replay point (`pg_last_wal_replay_lsn()`), polled without pause while `acked` is above it.
    pub async fn standby(port: u16, acked: Arc<AckedPosition>) -> Result<Self> {
        Self::open(port, "SELECT pg_last_wal_replay_lsn()", Duration::ZERO, Some(acked)).await
    }

    /// The primary's WAL position (`pg_current_wal_lsn()`): only the LSN distance (replica_lag_lsn, in WAL bytes)
    /// uses it, so it is polled about once a millisecond, to spare the primary's CPU.
    pub async fn primary(port: u16) -> Result<Self> {
        Self::open(port, "SELECT pg_current_wal_lsn()", Duration::from_millis(1), None).await
    }

    async fn open(port: u16, sql: &str, pause: Duration, acked: Option<Arc<AckedPosition>>) -> Result<Self> {
        let client = connect(port, "loadgen-feed", false).await?;
        let query = client.prepare(sql).await?;
        Ok(WalFeed { client, query, last: None, pause, acked })
    }
}

impl ReadPoint for WalFeed {
    async fn next(&mut self) -> Result<Lsn> {
        loop {
            if let (Some(acked), Some(last)) = (&self.acked, self.last) {
                acked.above(last).await;
            }
            let lsn: Option<PgLsn> = self.client.query_one(&self.query, &[]).await?.get(0);
            if let Some(lsn) = lsn.map(u64::from) {
                if self.last.is_none_or(|last| lsn > last) {
                    self.last = Some(lsn);
                    return Ok(Lsn(lsn));
                }
            }
            if !self.pause.is_zero() {
                tokio::time::sleep(self.pause).await;
            }
        }
    }
}

/// One open-loop point against a fresh primary and standbys under `dir` (`setup`), stopped afterwards
/// whatever happened; with `pause`, every process of every standby is paused on that duty cycle for the
/// whole load (gray failure). Returns the measurement and the postmasters' pids (`PgServers::pgids`).
pub async fn measure_point(load: &LoadArgs, pg: &PgArgs, dir: &Path, setup: PgSetup, pause: Option<DutyCycle>, run: usize, rate: f64) -> Result<(Measurement, Vec<i32>)> {
    let mut servers = PgServers::start(pg, dir, setup.standbys).await?;
    let pgids = servers.pgids();
    let result = async {
        let mode = setup.synchronous_commit;
        let primary = Arc::new(PgPrimary::connect(servers.primary_port(), mode, load.connections).await?);
        let mut feeds = Feeds { writer: None, replicas: Vec::new() };
        if load.lag_probe {
            feeds.writer = Some(WalFeed::primary(servers.primary_port()).await?);
            for standby in &servers.standbys {
                feeds.replicas.push((format!("{} 127.0.0.1:{}", standby.name, standby.port), WalFeed::standby(standby.port, primary.acked()).await?));
            }
        }
        // The postmasters: a standby pauses whole, and the CPU counts every process under them.
        let pauser = pause.map(|duty| Pauser::start(servers.standbys.iter().map(Postmaster::pgid).collect(), duty));
        let m = open_loop::measure(load, primary, feeds, &pgids, &format!("postgres synchronous_commit={}", setup.durability()), run, rate).await;
        drop(pauser);
        m
    }
    .await;
    let stopped = servers.stop();
    let m = result?;
    stopped?;
    Ok((m, pgids))
}

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct PgBenchArgs {
    /// synchronous_commit modes to measure (each client session sets it); the standbys' visibility lag is measured in every mode.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "off,local,on,remote_apply")]
    pub synchronous_commit: Vec<SyncCommit>,
    /// Hot standbys of the primary (application_name s1, s2, …): with 1 it is the synchronous standby
    /// (synchronous_standby_names = '*'); with more the primary commits on any one of them
    /// (quorum commit: 'ANY 1 (s1, s2, …)').
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=3))]
    pub standbys: u16,
    /// Offered commit rates, commits/s over all connections.
    #[arg(long, value_delimiter = ',', default_value = "1000,4000")]
    pub rates: Vec<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub pg: PgArgs,
    /// Where the pairs live [default: a temp dir, removed after a successful run]; the postgres user must be able to reach it.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Directory for results: summary.json and .hgrm files per mode and rate.
    #[arg(long, default_value = "bench-results/latest/pg-bench")]
    pub out: PathBuf,
}

/// `loadgen pg-bench`: every (run, rate, mode) on a fresh pair, runs outermost so drift spreads over every point.
pub async fn bench_run(args: PgBenchArgs) -> Result<()> {
    args.load.check(&args.rates)?;
    if args.synchronous_commit.is_empty() {
        bail!("--synchronous-commit: name at least one mode");
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    tokio::select! {
        r = pg_bench(&args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

async fn pg_bench(args: &PgBenchArgs) -> Result<()> {
    let work = WorkDir::new(args.work_dir.as_deref(), "borealis-pg-bench")?;
    let setups: Vec<PgSetup> = args.synchronous_commit.iter().map(|&mode| PgSetup::new(mode, args.standbys.into())).collect();
    let mut runs: Vec<(PgSetup, Measurement)> = Vec::new();
    let mut pgids = Vec::new();
    for run in 0..args.load.runs {
        for &rate in &args.rates {
            for &setup in &setups {
                let (m, ids) = measure_point(&args.load, &args.pg, &work.path.join("pg"), setup, None, run, rate)
                    .await
                    .with_context(|| format!("synchronous_commit={} run {} at {rate} commits/s (servers under {})", setup.durability(), run + 1, work.path.display()))?;
                pgids.extend(ids);
                runs.push((setup, m));
            }
        }
    }
    let points = pg_points(&args.load, &args.rates, &setups, &runs, &args.out, "")?;
    let json = serde_json::json!({
        "target": "postgres",
        "params": args,
        "points": points,
        "runs": runs_json(&runs),
        "postgres_pgids": pgids,
    });
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", path.display()))?;
    println!("{}", open_loop::table(&points));
    println!("wrote {}", path.display());
    work.cleanup();
    open_loop::verdict(&points, &path)
}

/// Every run as JSON: its setup and its measurement.
pub fn runs_json(runs: &[(PgSetup, Measurement)]) -> Vec<serde_json::Value> {
    runs.iter().map(|(setup, m)| serde_json::json!({ "synchronous_commit": setup.synchronous_commit, "standbys": setup.standbys, "measurement": m })).collect()
}

/// One point per (setup, rate), medians over runs; histograms go to `out`, file names starting with
/// `prefix` and the setup's (`postgres-on-`).
pub fn pg_points(load: &LoadArgs, rates: &[f64], setups: &[PgSetup], runs: &[(PgSetup, Measurement)], out: &Path, prefix: &str) -> Result<Vec<Point>> {
    let mut points = Vec::new();
    for &setup in setups {
        for &rate in rates {
            let rs: Vec<&Measurement> = runs.iter().filter(|(s, r)| *s == setup && r.rate == rate).map(|(_, r)| r).collect();
            if !rs.is_empty() {
                let durability = setup.durability();
                points.push(open_loop::summarize(load, "postgres", &durability, rate, &rs, out, &format!("{prefix}postgres-{durability}-"))?);
            }
        }
    }
    Ok(points)
}

// ---------------------------------------------------------------------------------------------
// Failover

/// How the standby is told to take over.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PromoteWith {
    /// `SELECT pg_promote(wait => false)` on a session opened before the kill: what `pg_ctl promote`
    /// does (signal file + SIGUSR1 to the postmaster), without starting a process; as Borealis' Promote.
    Sql,
    /// `pg_ctl promote -W` (started as a process after the kill).
    PgCtl,
}

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct PgFailoverArgs {
    /// Offered transactions/s, open loop, every one on keys of its own (as `loadgen failover`).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Seconds of load before the primary is killed.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_seconds: f64,
    /// Seconds of load after the kill.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Fresh pairs, one failover each; the summary reports medians.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Client sessions; transactions go round-robin. (More than `loadgen failover`'s 2 connections: a
    /// PostgreSQL session runs one transaction at a time, and 2 cannot carry 2,000 synchronous
    /// two-put transactions/s here; the backlog would grow for the whole run.)
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Puts per transaction, each on a key of its own: read back, a transaction must be wholly present or wholly absent.
    #[arg(long, default_value_t = 2)]
    pub txn_ops: usize,
    /// Bytes of each put's value.
    #[arg(long, default_value_t = 100)]
    pub value_bytes: usize,
    /// Longest a transaction may take, re-sends to the new primary included; later it counts as unacknowledged.
    #[arg(long, default_value_t = 10.0)]
    pub deadline_seconds: f64,
    /// synchronous_commit of the client sessions (`on`: the standby holds every acknowledged commit).
    #[arg(long, value_enum, default_value = "on")]
    pub synchronous_commit: SyncCommit,
    /// How the standby is promoted, right after the kill.
    #[arg(long, value_enum, default_value = "sql")]
    pub promote_with: PromoteWith,
    /// Sessions whose connection broke reconnect (read-write only) with attempts this far apart over all sessions.
    #[arg(long, default_value_t = 5)]
    pub retry_ms: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub pg: PgArgs,
    /// Where the pairs live [default: a temp dir, removed after a successful run].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Where to write the results (JSON).
    #[arg(long, default_value = "bench-results/latest/pg-failover/summary.json")]
    pub json: PathBuf,
}

#[derive(Serialize, Clone, Debug)]
pub struct PgFailoverRun {
    pub run: usize,
    /// Kill to the first transaction acknowledged by the promoted standby (client-observed).
    pub failover_ms: f64,
    /// The last acknowledgement before the kill to the first after it.
    pub unavailable_ms: f64,
    /// Kill to the promotion request sent.
    pub promote_sent_ms: f64,
    /// Kill to the standby leaving recovery (`pg_is_in_recovery()` false, polled each millisecond; null with pg-ctl).
    pub promoted_ms: Option<f64>,
    #[serde(flatten)]
    pub audit: WriteAudit,
    pub commit_latency_us: LatencyUs,
    pub error_kinds: BTreeMap<String, u64>,
    /// The postmasters' pids (all stopped when the run ends).
    pub postgres_pgids: Vec<i32>,
    /// Load start to the kill, ms: the origin of the failover timeline is the load's start.
    pub kill_at_ms: f64,
    /// Each acknowledgement's arrival, ms since the load's start (the failover timeline).
    #[serde(skip)]
    pub acks_at_ms: Vec<f64>,
}

#[derive(Serialize, Debug, Clone)]
pub struct PgFailoverSummary {
    pub synchronous_commit: SyncCommit,
    pub promote_with: PromoteWith,
    pub runs: usize,
    pub rate: f64,
    pub failover_ms: f64,
    pub failover_ms_max: f64,
    pub unavailable_ms: f64,
    pub promote_sent_ms: f64,
    pub promoted_ms: Option<f64>,
    #[serde(flatten)]
    pub totals: AuditTotals,
}

/// The transaction `seq` of `workload`.
fn failover_txn(workload: &Workload, seq: u64) -> Vec<(String, Vec<u8>)> {
    (0..workload.txn_ops).map(|op| (workload.key(seq, op), workload.value(seq, op))).collect()
}

/// A session that follows the writable server: on an error it reconnects and re-sends the transaction.
struct Session {
    current: tokio::sync::Mutex<Option<Arc<Current>>>,
}

struct Current {
    conn: PgConn,
    /// 0: the primary, 1: the standby.
    server: usize,
    id: u64,
}

/// Which server takes writes, as the sessions found out.
struct Discovery {
    /// The server a session last connected to read-write.
    writable: Option<usize>,
    /// When the last connection attempt started: attempts are at least `retry` apart over all sessions.
    last_attempt: Option<Instant>,
}

struct FailoverClient {
    sessions: Vec<Session>,
    ports: [u16; 2],
    mode: SyncCommit,
    retry: Duration,
    deadline: Duration,
    next_id: std::sync::atomic::AtomicU64,
    /// Connection attempts go one at a time: every attempt on a server that refuses writes still
    /// starts a backend there (a fork), and a storm of them would slow the promotion it waits for.
    discovery: tokio::sync::Mutex<Discovery>,
}

struct Acked {
    server: usize,
    at: Instant,
    attempts: u32,
}

impl FailoverClient {
    /// The session's live connection, or a new one if there is none or `failed` is the current one:
    /// read-write only (a standby still in recovery refuses), the server known to take writes first,
    /// then the primary, then the standby.
    async fn connection(&self, s: usize, failed: Option<u64>) -> Result<Arc<Current>, String> {
        let mut current = self.sessions[s].current.lock().await;
        if let Some(c) = current.as_ref().filter(|c| Some(c.id) != failed) {
            return Ok(c.clone());
        }
        *current = None;
        let mut discovery = self.discovery.lock().await;
        if let Some(last) = discovery.last_attempt {
            tokio::time::sleep_until((last + self.retry).into()).await;
        }
        discovery.last_attempt = Some(Instant::now());
        let mut order = vec![0, 1];
        if let Some(w) = discovery.writable {
            order.retain(|&x| x != w);
            order.insert(0, w);
        }
        let mut errors = Vec::new();
        for server in order {
            match PgConn::open(self.ports[server], self.mode, &format!("loadgen-failover-{s}"), true).await {
                Ok(conn) => {
                    discovery.writable = Some(server);
                    let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let c = Arc::new(Current { conn, server, id });
                    *current = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        Err(format!("no writable server: {}", errors.join("; ")))
    }

    async fn txn(&self, s: usize, ops: &[(String, Vec<u8>)]) -> Result<Acked, String> {
        let deadline = tokio::time::Instant::now() + self.deadline;
        let mut failed = None;
        let mut attempts = 0;
        let mut last_error = String::from("deadline passed before the first attempt");
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(last_error);
            }
            let c = match tokio::time::timeout_at(deadline, self.connection(s, failed)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    // The next attempt waits its turn (`discovery` paces them).
                    last_error = e;
                    continue;
                }
                Err(_) => return Err(format!("deadline passed while connecting ({last_error})")),
            };
            attempts += 1;
            match tokio::time::timeout_at(deadline, c.conn.txn(ops)).await {
                Ok(Ok(_)) => return Ok(Acked { server: c.server, at: Instant::now(), attempts }),
                Ok(Err(e)) => {
                    last_error = if e.is_closed() { "connection closed".to_string() } else { e.to_string() };
                    failed = Some(c.id);
                }
                Err(_) => return Err("deadline passed waiting for the commit".into()),
            }
        }
    }
}

struct FailoverOutcome {
    seq: u64,
    due: Instant,
    result: Result<Acked, String>,
}

pub async fn failover_run(args: PgFailoverArgs) -> Result<()> {
    check_failover_args(&args)?;
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    tokio::select! {
        r = failover_bench(&args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

pub fn check_failover_args(args: &PgFailoverArgs) -> Result<()> {
    if args.rate.is_nan() || args.rate <= 0.0 || args.runs == 0 || args.connections == 0 || args.txn_ops == 0 {
        bail!("--rate, --runs, --connections and --txn-ops must be positive");
    }
    if args.warmup_seconds <= 0.0 || args.seconds <= 0.0 || args.deadline_seconds <= 0.0 {
        bail!("--warmup-seconds, --seconds and --deadline-seconds must be positive");
    }
    Ok(())
}

async fn failover_bench(args: &PgFailoverArgs) -> Result<()> {
    let work = WorkDir::new(args.work_dir.as_deref(), "borealis-pg-failover")?;
    let mut runs = Vec::new();
    for run in 0..args.runs {
        let r = failover_measure(args, &work.path.join(format!("run-{}", run + 1)), run).await.with_context(|| format!("run {} (pair under {})", run + 1, work.path.display()))?;
        eprintln!("[postgres run {}/{}] failover {:.1} ms, unavailable {:.1} ms, {} acknowledged, {} lost", run + 1, args.runs, r.failover_ms, r.unavailable_ms, r.audit.acked_writes, r.audit.lost_acked_writes);
        runs.push(r);
    }
    let summary = failover_summary(args, &runs);
    let json = serde_json::json!({
        "failover_ms": summary.failover_ms,
        "unavailable_ms": summary.unavailable_ms,
        "lost_acked_writes": summary.totals.lost_acked_writes,
        "summary": summary,
        "params": args,
        "runs": runs,
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", args.json.display()))?;
    println!("{}", failover_table(&summary, &runs));
    println!("wrote {}", args.json.display());
    let must_keep = matches!(args.synchronous_commit, SyncCommit::On | SyncCommit::RemoteApply);
    let t = &summary.totals;
    if t.torn_writes > 0 || (must_keep && t.lost_acked_writes > 0) {
        bail!("{} acknowledged writes lost, {} torn with synchronous_commit={}; see {}", t.lost_acked_writes, t.torn_writes, args.synchronous_commit.as_str(), args.json.display());
    }
    work.cleanup();
    Ok(())
}

/// One failover on a fresh pair under `dir`, stopped afterwards whatever happened.
pub async fn failover_measure(args: &PgFailoverArgs, dir: &Path, run: usize) -> Result<PgFailoverRun> {
    let mut pair = PgServers::start(&args.pg, dir, 1).await?;
    let result = failover_load(args, &mut pair, run).await;
    let stopped = pair.stop();
    let mut r = result?;
    stopped?;
    r.postgres_pgids = pair.pgids();
    Ok(r)
}

async fn failover_load(args: &PgFailoverArgs, pair: &mut PgServers, run: usize) -> Result<PgFailoverRun> {
    let client = Arc::new(FailoverClient {
        sessions: (0..args.connections).map(|_| Session { current: tokio::sync::Mutex::new(None) }).collect(),
        ports: [pair.primary_port(), pair.standbys[0].port],
        mode: args.synchronous_commit,
        retry: Duration::from_millis(args.retry_ms),
        deadline: Duration::from_secs_f64(args.deadline_seconds),
        next_id: Default::default(),
        discovery: tokio::sync::Mutex::new(Discovery { writable: None, last_attempt: None }),
    });
    for s in 0..args.connections {
        let c = client.connection(s, None).await.map_err(|e| anyhow!(e))?;
        if c.server != 0 {
            bail!("the clients connected to the standby before the kill");
        }
    }
    // Opened before the kill, so that the promotion is not delayed by a connection.
    let admin = connect(pair.standbys[0].port, "loadgen-promote", false).await?;
    let workload = Arc::new(Workload { run, txn_ops: args.txn_ops, value_bytes: args.value_bytes });
    let warmup = Duration::from_secs_f64(args.warmup_seconds);
    let total = warmup + Duration::from_secs_f64(args.seconds);
    let start = Instant::now() + Duration::from_millis(20);
    let (tick_tx, mut ticks) = mpsc::channel(TICKS_QUEUED_MAX);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let pacer = std::thread::spawn(move || pace(start, interval, total, vec![tick_tx]));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (client, outcomes, workload) = (client.clone(), outcomes.clone(), workload.clone());
        let sessions = args.connections;
        tokio::spawn(async move {
            let mut inflight = JoinSet::new();
            let mut seq = 0u64;
            while let Some(due) = ticks.recv().await {
                let (client, outcomes) = (client.clone(), outcomes.clone());
                let ops = failover_txn(&workload, seq);
                inflight.spawn(async move {
                    let result = client.txn(seq as usize % sessions, &ops).await;
                    outcomes.lock().expect("outcomes").push(FailoverOutcome { seq, due, result });
                });
                seq += 1;
                while inflight.try_join_next().is_some() {}
            }
            // Every transaction ends by its deadline.
            while inflight.join_next().await.is_some() {}
            seq
        })
    };

    tokio::time::sleep_until((start + warmup).into()).await;
    let killed_at = pair.primary.kill();
    let promote_sent = Instant::now();
    match args.promote_with {
        PromoteWith::Sql => {
            admin.query_one("SELECT pg_promote(wait => false)", &[]).await.context("pg_promote on the standby")?;
        }
        PromoteWith::PgCtl => pair.pg_ctl_promote().await.context("pg_ctl promote")?,
    }
    let promoted_at = match args.promote_with {
        PromoteWith::Sql => {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if !admin.query_one("SELECT pg_is_in_recovery()", &[]).await.context("pg_is_in_recovery")?.get::<_, bool>(0) {
                    break Some(Instant::now());
                }
                if Instant::now() > deadline {
                    bail!("the standby was still in recovery {READY_TIMEOUT:?} after pg_promote; see {}", pair.standbys[0].log.display());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        PromoteWith::PgCtl => None,
    };
    let writes = load.await.context("load task")?;
    pacer.join().map_err(|_| anyhow!("pacer thread panicked"))?;
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    drop(client);

    // Read every transaction back from the promoted standby.
    let reader = connect(pair.standbys[0].port, "loadgen-read-back", true).await.context("connect to the promoted standby for the read-back")?;
    let rows = reader.query("SELECT key, value FROM kv", &[]).await.context("read back")?;
    let stored: HashMap<String, Vec<u8>> = rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut audit = WriteAudit::default();
    for o in &outcomes {
        let present = (0..args.txn_ops).filter(|&op| stored.get(&workload.key(o.seq, op)) == Some(&workload.value(o.seq, op))).count();
        audit.read_back(o.result.is_ok(), present, args.txn_ops);
    }

    let mut latency = latency_histogram();
    let mut errors = BTreeMap::<String, u64>::new();
    let mut last_before: Option<Instant> = None;
    let mut first_new: Option<Instant> = None;
    let mut acks_at_ms = Vec::new();
    for o in &outcomes {
        match &o.result {
            Ok(a) => {
                latency.saturating_record((a.at - o.due).as_micros() as u64);
                acks_at_ms.push((a.at.saturating_duration_since(start)).as_secs_f64() * 1e3);
                audit.acked(a.attempts, a.server == 0, a.at <= killed_at);
                if a.server == 0 {
                    if a.at <= killed_at {
                        last_before = last_before.max(Some(a.at));
                    }
                } else if first_new.is_none_or(|f| a.at < f) {
                    first_new = Some(a.at);
                }
            }
            Err(e) => *errors.entry(e.clone()).or_default() += 1,
        }
    }
    let first_new = first_new.context("no transaction acknowledged by the promoted standby")?;
    let last_before = last_before.context("no transaction acknowledged before the kill")?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(PgFailoverRun {
        run,
        failover_ms: ms(first_new - killed_at),
        unavailable_ms: ms(first_new - last_before),
        promote_sent_ms: ms(promote_sent - killed_at),
        promoted_ms: promoted_at.map(|p| ms(p - killed_at)),
        audit: WriteAudit { writes, ..audit },
        commit_latency_us: LatencyUs::of(&latency),
        error_kinds: errors,
        postgres_pgids: Vec::new(),
        kill_at_ms: ms(killed_at.saturating_duration_since(start)),
        acks_at_ms,
    })
}

pub fn failover_summary(args: &PgFailoverArgs, runs: &[PgFailoverRun]) -> PgFailoverSummary {
    let m = |f: &dyn Fn(&PgFailoverRun) -> f64| median(runs.iter().map(f).collect());
    let promoted: Vec<f64> = runs.iter().filter_map(|r| r.promoted_ms).collect();
    PgFailoverSummary {
        synchronous_commit: args.synchronous_commit,
        promote_with: args.promote_with,
        runs: runs.len(),
        rate: args.rate,
        failover_ms: m(&|r| r.failover_ms),
        failover_ms_max: runs.iter().map(|r| r.failover_ms).fold(0.0, f64::max),
        unavailable_ms: m(&|r| r.unavailable_ms),
        promote_sent_ms: m(&|r| r.promote_sent_ms),
        promoted_ms: (!promoted.is_empty()).then(|| median(promoted)),
        totals: AuditTotals::of(runs.iter().map(|r| &r.audit)),
    }
}

pub fn failover_table(s: &PgFailoverSummary, runs: &[PgFailoverRun]) -> String {
    let mut t = format!(
        "PostgreSQL failover (synchronous_commit={}, SIGKILL of the primary, promote {:?}, {:.0} transactions/s offered)\n\n| run | failover ms | unavailable ms | promote sent ms | promoted ms | acked | lost acked | unacked present/absent/torn |\n|---|---|---|---|---|---|---|---|\n",
        s.synchronous_commit.as_str(),
        s.promote_with,
        s.rate
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for r in runs {
        t += &format!(
            "| {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {}/{}/{} |\n",
            r.run + 1,
            r.failover_ms,
            r.unavailable_ms,
            r.promote_sent_ms,
            opt(r.promoted_ms),
            r.audit.acked_writes,
            r.audit.lost_acked_writes,
            r.audit.unacked_present,
            r.audit.unacked_absent,
            r.audit.torn_writes
        );
    }
    t += &format!(
        "| median (counts: sum) | {:.1} | {:.1} | {:.1} | {} | {} | {} | {}/{}/{} |\n",
        s.failover_ms,
        s.unavailable_ms,
        s.promote_sent_ms,
        opt(s.promoted_ms),
        s.totals.acked_writes,
        s.totals.lost_acked_writes,
        s.totals.unacked_present,
        s.totals.unacked_absent,
        s.totals.torn_writes
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puts_are_text_keys() {
        let ops = vec![PageOp::Put { key: b"key-1".to_vec(), value: vec![1, 2] }];
        assert_eq!(puts(ops).unwrap(), vec![("key-1".to_string(), vec![1, 2])]);
        assert!(puts(vec![PageOp::Delete { key: b"k".to_vec() }]).is_err());
        assert!(puts(vec![PageOp::Put { key: vec![0xff], value: vec![] }]).is_err());
    }

    #[test]
    fn this_process_is_running() {
        assert!(is_running(std::process::id() as i32));
        assert!(!is_running(0), "no process 0 in /proc");
    }

    #[test]
    fn quorum_commit_names_every_standby() {
        assert_eq!(synchronous_standby_names(1), "*");
        assert_eq!(synchronous_standby_names(2), "ANY 1 (s1, s2)");
        assert_eq!(PgSetup::new(SyncCommit::On, 2).durability(), "on-any1of2");
        assert_eq!(PgSetup::new(SyncCommit::Local, 1).durability(), "local");
    }
}
