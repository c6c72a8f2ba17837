//! Replica checks shared by replicad's end-to-end tests, on top of the
//! cluster harness (`test_support`): convergence with the writer, a feed that must
//! stay at or below the writer's VDL, and bank accounts whose transfers a
//! reader must see whole and at exactly its read point.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use borealis_net::api::{ApiClient, ApiError};
use std::net::SocketAddr;

use redo_core::api::{ApiErrorCode, Request, Response, Role};
use redo_core::page::PageOp;
use redo_core::volume::Volume;
use redo_core::{Lsn, PgId};

use test_support::*;

/// How long a replica may take to reach the writer's VDL once the load stops.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a transfer may wait to commit: through a freeze of the storage nodes.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// Keys compared at once between writer and replica.
const COMPARE_INFLIGHT_MAX: usize = 32;

/// What to look at when a replica misbehaves: where its log is, its tail, and its metrics.
pub fn diagnose(r: &Replica) -> String {
    let log = r.proc.log_text();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    let metrics = std::net::TcpStream::connect(r.metrics).map(|_| scrape(r.metrics)).unwrap_or_else(|e| format!("(no metrics: {e})"));
    let metrics: String = metrics.lines().filter(|l| l.starts_with("replicad_")).collect::<Vec<_>>().join("\n");
    format!("\nreplica log {} (last lines):\n{}\nreplica metrics:\n{metrics}", r.proc.log.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
}

/// The writer a client finds among `addrs`, waiting up to `timeout` for one to answer `Role` as writer.
pub async fn wait_writer(c: &Cluster, addrs: &[SocketAddr], timeout: Duration) -> (SocketAddr, Role) {
    let deadline = Instant::now() + timeout;
    let ep = c.endpoint();
    loop {
        for &addr in addrs {
            let ask = async {
                let client = ApiClient::connect(&ep, addr).await.ok()?;
                match client.call(&Request::Role).await {
                    Ok(Response::RoleIs(r)) if r.writer => Some(r),
                    _ => None,
                }
            };
            if let Ok(Some(role)) = tokio::time::timeout(Duration::from_millis(500), ask).await {
                return (addr, role);
            }
        }
        assert!(Instant::now() < deadline, "no writer among {addrs:?} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two replicas that know each other, `--priority` 1 and 0.
pub async fn two_replicas(c: &mut Cluster, extra: &[&str]) -> (Replica, Replica) {
    let (a, b): (SocketAddr, SocketAddr) = (format!("127.0.0.1:{}", free_port()).parse().unwrap(), format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let (pa, pb) = (b.to_string(), a.to_string());
    let mut args_a = vec!["--peers", &pa, "--priority", "1"];
    args_a.extend(extra);
    let mut args_b = vec!["--peers", &pb, "--priority", "0"];
    args_b.extend(extra);
    let ra = c.start_replica(Some(a), &args_a).await;
    let rb = c.start_replica(Some(b), &args_b).await;
    (ra, rb)
}

/// Every acknowledged key reads back from `writer`, and `replica` (following it) converges to it.
pub async fn check_after_failover(c: &Cluster, writer: &ApiClient, replica: &Replica, acked: &[u64]) {
    assert_all_present(writer, acked).await;
    let keys: Vec<Vec<u8>> = acked.iter().map(|&i| key(i)).collect();
    assert_converges(c, replica, writer, &keys).await;
}

/// Sends `Promote` to the replica at `addr`: its outcome, or the error it answered.
pub async fn promote(c: &Cluster, addr: SocketAddr) -> Result<redo_core::api::Promoted, String> {
    let admin = c.client(addr).await;
    match tokio::time::timeout(READY_TIMEOUT, admin.call(&Request::Promote)).await {
        Ok(Ok(Response::Promoted(p))) => Ok(p),
        Ok(Ok(other)) => Err(format!("{other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer to Promote within {READY_TIMEOUT:?}")),
    }
}

/// The `Role` the server at `addr` answers now.
pub async fn role_of(c: &Cluster, addr: SocketAddr) -> Role {
    let client = c.client(addr).await;
    match tokio::time::timeout(REPLY_TIMEOUT, client.call(&Request::Role)).await.expect("Role in time").expect("Role") {
        Response::RoleIs(r) => r,
        other => panic!("expected RoleIs from {addr}, got {other:?}"),
    }
}

/// A key named `{prefix}-{i}` for the first i whose page is on `pg`.
pub fn key_on_pg(volume: &Volume, prefix: &str, pg: PgId) -> Vec<u8> {
    (0..).map(|i| format!("{prefix}-{i}").into_bytes()).find(|k| volume.pg_of(volume.page_of(k)) == pg).expect("some key lands on every PG")
}

/// Waits until the replica has applied the writer's VDL as of now, then asserts that it
/// serves the writer's value of every key in `keys`, at that VDL or later. Call it with
/// the writes stopped. Returns the VDL compared at.
pub async fn assert_converges(c: &Cluster, replica: &Replica, writer: &ApiClient, keys: &[Vec<u8>]) -> Lsn {
    let vdl = read_point(writer).await;
    let rc = c.client(replica.addr).await;
    let mut applied = ReadPoint::follow(&rc).await;
    let started = Instant::now();
    applied.wait_for(vdl, CATCH_UP_TIMEOUT, || format!("the replica did not catch up with the writer's VDL{}", diagnose(replica))).await;
    eprintln!("replica reached the writer's VDL {vdl} in {:?}", started.elapsed());

    let mut mismatches = Vec::new();
    for chunk in keys.chunks(COMPARE_INFLIGHT_MAX) {
        let mut reads = tokio::task::JoinSet::new();
        for k in chunk {
            let (rc, writer, k) = (rc.clone(), writer.clone(), k.clone());
            reads.spawn(async move {
                let on_writer = tokio::time::timeout(REPLY_TIMEOUT, writer.get(&k)).await.expect("writer read in time").expect("writer read").1;
                let on_replica = tokio::time::timeout(REPLY_TIMEOUT, rc.get_at(&k, vdl)).await.expect("replica read in time");
                (k, on_writer, on_replica)
            });
        }
        while let Some(r) = reads.join_next().await {
            let (k, on_writer, on_replica) = r.expect("read task");
            let key = String::from_utf8_lossy(&k).into_owned();
            match on_replica {
                Ok((read_lsn, v)) if read_lsn >= vdl && v == on_writer => {}
                Ok((read_lsn, v)) => mismatches.push(format!(
                    "{key}: replica at {read_lsn} has {:?}, writer (VDL {vdl}) has {:?}",
                    v.map(|v| String::from_utf8_lossy(&v[..v.len().min(40)]).into_owned()),
                    on_writer.map(|v| String::from_utf8_lossy(&v[..v.len().min(40)]).into_owned())
                )),
                Err(e) => mismatches.push(format!("{key}: replica read failed: {e}")),
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} keys differ between replica and writer, e.g.:\n{}{}",
        mismatches.len(),
        keys.len(),
        mismatches.iter().take(10).cloned().collect::<Vec<_>>().join("\n"),
        diagnose(replica)
    );
    vdl
}

/// Checks, until finished, that every read point a replica's feed reports is at or below
/// the writer's VDL when it arrives, and that it never goes back.
pub struct FeedBelowVdl {
    /// Reports checked, and the first violation.
    state: Arc<std::sync::Mutex<(u64, Option<String>)>>,
    task: tokio::task::JoinHandle<()>,
}

impl FeedBelowVdl {
    pub async fn start(replica: &ApiClient, writer: &ApiClient, writer_vdl: Arc<ReadPoint>) -> FeedBelowVdl {
        let mut feed = tokio::time::timeout(REPLY_TIMEOUT, replica.follow()).await.expect("follow in time").expect("follow the replica");
        let state = Arc::new(std::sync::Mutex::new((0, None)));
        let (writer, state2) = (writer.clone(), state.clone());
        let task = tokio::spawn(async move {
            let mut last = Lsn::ZERO;
            while let Ok(p) = feed.next().await {
                let verdict = if p.vdl < last {
                    Err(format!("the replica's read point went back from {last} to {}", p.vdl))
                } else {
                    check_below_vdl(p.vdl, &writer, &writer_vdl).await.map_err(|e| format!("replica feed: {e}"))
                };
                let mut st = state2.lock().unwrap();
                st.0 += 1;
                if let Err(e) = verdict {
                    st.1 = Some(e);
                    return;
                }
                last = p.vdl;
            }
        });
        FeedBelowVdl { state, task }
    }

    /// Stops the check; returns how many reports were checked, or the first violation.
    pub fn finish(self) -> Result<u64, String> {
        self.task.abort();
        let st = self.state.lock().unwrap();
        match &st.1 {
            Some(e) => Err(e.clone()),
            None => Ok(st.0),
        }
    }
}

/// Fails if `read_lsn`, answered by a replica a moment ago, is above the writer's VDL now
/// (which is at least the VDL when the replica answered: the check never fails wrongly,
/// and it is exact while VDL stands still).
pub async fn check_below_vdl(read_lsn: Lsn, writer: &ApiClient, writer_vdl: &ReadPoint) -> Result<(), String> {
    if read_lsn <= writer_vdl.now() {
        return Ok(());
    }
    let now = read_point(writer).await;
    if read_lsn > now {
        return Err(format!("answered at {read_lsn}, above the writer's VDL {now}"));
    }
    Ok(())
}

/// Accounts per group: every transfer rewrites all of them, so that at any LSN all of a
/// group's keys show the same transaction.
pub const ACCOUNTS: usize = 8;
const BALANCE_START: u64 = 1_000;

pub fn account_key(group: usize, account: usize) -> Vec<u8> {
    format!("account-{group}-{account}").into_bytes()
}

fn account_value(group: usize, txn: usize, balance: u64) -> Vec<u8> {
    format!("g{group} t{txn} b{balance}").into_bytes()
}

/// (txn, balance) from an account value of `group`.
fn parse_account(group: usize, v: &[u8]) -> Option<(usize, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let mut parts = s.split(' ');
    if parts.next()? != format!("g{group}") {
        return None;
    }
    let txn = parts.next()?.strip_prefix('t')?.parse().ok()?;
    let balance = parts.next()?.strip_prefix('b')?.parse().ok()?;
    Some((txn, balance))
}

/// One group's transfers in commit order: txn t committed at `commits[t]` and left `balances[t]`.
#[derive(Default)]
struct History {
    commits: Vec<Lsn>,
    balances: Vec<[u64; ACCOUNTS]>,
}

/// One read of an account on the replica.
struct Seen {
    group: usize,
    account: usize,
    read_lsn: Lsn,
    value: Option<Vec<u8>>,
}

/// What the readers saw, once checked.
#[derive(Debug)]
pub struct AccountsReport {
    pub transfers: usize,
    pub reads: usize,
    pub read_points: usize,
    /// Reads at the writer's VDL refused with Timeout.
    pub timeouts: u64,
}

/// Groups of accounts (each spread over both PGs) with one task per group moving money
/// between 2 to 4 of them per transaction, and readers reading every account of the
/// groups from a replica. Afterwards every read is checked against the commit history:
/// a read at `read_lsn` must show exactly the last transfer committed at or below it.
/// That rules out half a transaction, an uncommitted one, and a stale read point; online,
/// readers also check that no read is above the writer's VDL and read points never go back.
pub struct Accounts {
    groups: usize,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    read: Arc<AtomicU64>,
    /// Reads at a min_lsn the replica did not reach within --read-wait-ms.
    timeouts: Arc<AtomicU64>,
    /// The first reader or transfer failure, as soon as it happens.
    failed: Arc<std::sync::Mutex<Option<String>>>,
    transfers: Vec<tokio::task::JoinHandle<Result<History, String>>>,
    readers: Vec<tokio::task::JoinHandle<Result<Vec<Seen>, String>>>,
}

impl Accounts {
    pub fn start(volume: &Volume, writer: &ApiClient, replica: &ApiClient, writer_vdl: Arc<ReadPoint>, groups: usize, readers: usize) -> Accounts {
        for g in 0..groups {
            let pgs: std::collections::BTreeSet<PgId> = (0..ACCOUNTS).map(|a| volume.pg_of(volume.page_of(&account_key(g, a)))).collect();
            assert_eq!(pgs.len() as u32, PGS, "the accounts of group {g} are on PGs {pgs:?}: pick other names");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let read = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(std::sync::Mutex::new(None));
        let timeouts = Arc::new(AtomicU64::new(0));
        let transfers =
            (0..groups).map(|g| tokio::spawn(noting_failure(failed.clone(), transfer(g, writer.clone(), stop.clone(), committed.clone())))).collect();
        let readers = (0..readers)
            .map(|r| {
                let read = reader(r, groups, replica.clone(), writer.clone(), writer_vdl.clone(), stop.clone(), (read.clone(), timeouts.clone()));
                tokio::spawn(noting_failure(failed.clone(), read))
            })
            .collect();
        Accounts { groups, stop, committed, read, timeouts, failed, transfers, readers }
    }

    pub fn transfers(&self) -> u64 {
        self.committed.load(Relaxed)
    }

    pub fn reads(&self) -> u64 {
        self.read.load(Relaxed)
    }

    /// The first failure of a reader or a transfer so far.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap().clone()
    }

    /// Waits until `n` more transfers than now have committed.
    pub async fn wait_transfers(&self, n: u64, timeout: Duration) {
        let target = self.transfers() + n;
        let deadline = Instant::now() + timeout;
        while self.transfers() < target {
            assert!(Instant::now() < deadline, "only {} of {target} transfers within {timeout:?}; {:?}", self.transfers(), self.failure());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the readers have done `n` more reads than now.
    pub async fn wait_reads(&self, n: u64, timeout: Duration, why: impl FnOnce() -> String) {
        let target = self.reads() + n;
        let deadline = Instant::now() + timeout;
        while self.reads() < target {
            assert!(Instant::now() < deadline, "only {} of {target} replica reads within {timeout:?} ({:?}): {}", self.reads(), self.failure(), why());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops transfers and readers and checks every read against the commit history.
    pub async fn finish(self) -> Result<AccountsReport, String> {
        self.stop.store(true, Relaxed);
        let mut histories = Vec::new();
        for t in self.transfers {
            histories.push(t.await.expect("transfer task")?);
        }
        let mut seen = Vec::new();
        for r in self.readers {
            seen.extend(r.await.expect("reader task")?);
        }
        let mut read_points = std::collections::BTreeSet::new();
        for s in &seen {
            read_points.insert(s.read_lsn);
            check_read(&histories[s.group], s)?;
        }
        let transfers = histories.iter().map(|h| h.commits.len()).sum();
        Ok(AccountsReport { transfers, reads: seen.len(), read_points: read_points.len(), timeouts: self.timeouts.load(Relaxed) })
    }
}

/// Runs `task`, noting its error (if it is the first) where the test can see it at once.
async fn noting_failure<T>(failed: Arc<std::sync::Mutex<Option<String>>>, task: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    let r = task.await;
    if let Err(e) = &r {
        failed.lock().unwrap().get_or_insert_with(|| e.clone());
    }
    r
}

/// A read at `read_lsn` shows the last transfer of its group committed at or below it.
fn check_read(h: &History, s: &Seen) -> Result<(), String> {
    let (g, a, at) = (s.group, s.account, s.read_lsn);
    // The last transfer committed at or below the read point, if any.
    let expected = h.commits.partition_point(|&c| c <= at).checked_sub(1);
    let shown = match &s.value {
        None => None,
        Some(v) => Some(parse_account(g, v).ok_or_else(|| format!("account {g}/{a} at {at} holds {:?}", String::from_utf8_lossy(v)))?),
    };
    let describe = |t: Option<usize>| match t {
        None => "no transfer".to_string(),
        Some(t) => format!("transfer {t} (committed at {})", h.commits.get(t).map_or("never".into(), |c| c.to_string())),
    };
    if shown.map(|(t, _)| t) != expected {
        return Err(format!(
            "account {g}/{a} read at {at} shows {}, but the last transfer at or below {at} is {}: {}",
            describe(shown.map(|(t, _)| t)),
            describe(expected),
            if shown.map(|(t, _)| t) > expected { "a read above its read point" } else { "part of a transaction missing, or a stale read" }
        ));
    }
    if let Some((t, balance)) = shown {
        if h.balances[t][a] != balance {
            return Err(format!("account {g}/{a} at {at} shows balance {balance} of transfer {t}, which left {}", h.balances[t][a]));
        }
    }
    Ok(())
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Group `g`'s transfers, one at a time: transfer 0 opens the accounts, each later one
/// moves money from one account to 1 to 3 others and rewrites all of them.
async fn transfer(g: usize, writer: ApiClient, stop: Arc<AtomicBool>, committed: Arc<AtomicU64>) -> Result<History, String> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (g as u64 + 1));
    let mut h = History::default();
    let mut balances = [BALANCE_START; ACCOUNTS];
    while !stop.load(Relaxed) {
        let t = h.commits.len();
        if t > 0 {
            let mut touched: Vec<usize> = Vec::new();
            let n = 2 + rng.below(3) as usize;
            while touched.len() < n {
                let a = rng.below(ACCOUNTS as u64) as usize;
                if !touched.contains(&a) {
                    touched.push(a);
                }
            }
            let amount = rng.below(balances[touched[0]] / 2 + 1);
            balances[touched[0]] -= amount;
            let share = amount / (n as u64 - 1);
            for &a in &touched[1..] {
                balances[a] += share;
            }
            balances[touched[n - 1]] += amount - share * (n as u64 - 1);
        }
        assert_eq!(balances.iter().sum::<u64>(), BALANCE_START * ACCOUNTS as u64);
        let ops = (0..ACCOUNTS).map(|a| PageOp::Put { key: account_key(g, a), value: account_value(g, t, balances[a]) }).collect();
        let lsn = match tokio::time::timeout(TRANSFER_TIMEOUT, writer.txn(ops)).await {
            Ok(Ok(lsn)) => lsn,
            Ok(Err(e)) => return Err(format!("transfer {t} of group {g} failed: {e}")),
            Err(_) => return Err(format!("transfer {t} of group {g}: no reply in {TRANSFER_TIMEOUT:?}")),
        };
        if let Some(&before) = h.commits.last() {
            if lsn <= before {
                return Err(format!("transfer {t} of group {g} committed at {lsn}, not after transfer {} at {before}", t - 1));
            }
        }
        h.commits.push(lsn);
        h.balances.push(balances);
        committed.fetch_add(1, Relaxed);
    }
    Ok(h)
}

/// Reads every account of one group after another from the replica, in turn: plain
/// reads, and reads at the writer's VDL last seen (they wait for the replica to get there,
/// or are refused with Timeout: counted, not checked). `counts`: reads done, reads timed out.
async fn reader(
    r: usize,
    groups: usize,
    replica: ApiClient,
    writer: ApiClient,
    writer_vdl: Arc<ReadPoint>,
    stop: Arc<AtomicBool>,
    (read, timeouts): (Arc<AtomicU64>, Arc<AtomicU64>),
) -> Result<Vec<Seen>, String> {
    let mut seen = Vec::new();
    let mut last = Lsn::ZERO;
    let mut round = 0;
    while !stop.load(Relaxed) {
        let group = (r + round) % groups;
        let min_lsn = if round % 2 == 1 { writer_vdl.now() } else { Lsn::ZERO };
        for account in 0..ACCOUNTS {
            let started = Instant::now();
            let (read_lsn, value) = match tokio::time::timeout(REPLY_TIMEOUT, replica.get_at(&account_key(group, account), min_lsn)).await {
                Ok(Ok(v)) => v,
                // Allowed by the API when the replica cannot get there within --read-wait-ms
                // (a plain read, at the read point, must never time out).
                Ok(Err(ApiError::Refused { code: ApiErrorCode::Timeout, .. })) if min_lsn > Lsn::ZERO => {
                    timeouts.fetch_add(1, Relaxed);
                    continue;
                }
                Ok(Err(e)) => return Err(format!("replica read of account {group}/{account} (min {min_lsn}) failed after {:?}: {e}", started.elapsed())),
                Err(_) => return Err(format!("replica read of account {group}/{account}: no reply in {REPLY_TIMEOUT:?}")),
            };
            if read_lsn < last {
                return Err(format!("reader {r}: the read point went back from {last} to {read_lsn}"));
            }
            if read_lsn < min_lsn {
                return Err(format!("reader {r}: asked for {min_lsn} or later, read at {read_lsn}"));
            }
            check_below_vdl(read_lsn, &writer, &writer_vdl).await.map_err(|e| format!("reader {r}, account {group}/{account}: {e}"))?;
            last = read_lsn;
            seen.push(Seen { group, account, read_lsn, value });
            read.fetch_add(1, Relaxed);
        }
        round += 1;
    }
    Ok(seen)
}
