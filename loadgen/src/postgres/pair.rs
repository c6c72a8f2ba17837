//! A PostgreSQL primary and its hot standbys on loopback, set up for a run (initdb,
//! `pg_basebackup -R`, streaming as synchronous or quorum standbys, an empty `kv` table
//! on every one), and the client sessions that commit on them.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::types::{PgLsn, ToSql};
use tokio_postgres::{Client, NoTls, Statement};

use super::process::{run_tool, server_user, Postmaster};
use crate::cluster::free_port;

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
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
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
        .map(|kv| {
            kv.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).with_context(|| format!("--pg-setting {kv}: expected NAME=VALUE"))
        })
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
            bail!(
                "{} not found: install PostgreSQL 15 (Debian: apt-get install postgresql-15) or point --pg-bin / BOREALIS_PG_BIN at its bin directory",
                bin.join("postgres").display()
            );
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).with_context(|| format!("chown {} to postgres", dir.display()))?;
        }
        let primary_dir = dir.join("primary");
        run_tool(
            &bin,
            "initdb",
            user,
            dir,
            &[
                "-D".as_ref(),
                primary_dir.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "--locale=C".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )
        .await
        .with_context(|| format!("initdb under {} (the postgres user must be able to reach it)", dir.display()))?;
        let extra = user_settings(pg)?;
        let primary_port = free_port()?;
        let mut primary_settings = common_settings(pg, dir);
        primary_settings
            .extend([("port".to_string(), primary_port.to_string()), ("synchronous_standby_names".to_string(), synchronous_standby_names(standbys))]);
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
                &[
                    "-h".as_ref(),
                    "127.0.0.1".as_ref(),
                    "-p".as_ref(),
                    port.as_ref(),
                    "-U".as_ref(),
                    "postgres".as_ref(),
                    "-D".as_ref(),
                    standby_dir.as_os_str(),
                    "-R".as_ref(),
                    "-X".as_ref(),
                    "stream".as_ref(),
                    "--checkpoint=fast".as_ref(),
                    "--no-sync".as_ref(),
                ],
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
            let standby = Postmaster::spawn(
                &servers.bin,
                &format!("postgres standby {name}"),
                &standby_dir,
                dir.join(format!("standby-{name}.log")),
                user,
                &standby_settings,
            )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_commit_names_every_standby() {
        assert_eq!(synchronous_standby_names(1), "*");
        assert_eq!(synchronous_standby_names(2), "ANY 1 (s1, s2)");
        assert_eq!(PgSetup::new(SyncCommit::On, 2).durability(), "on-any1of2");
        assert_eq!(PgSetup::new(SyncCommit::Local, 1).durability(), "local");
    }
}
