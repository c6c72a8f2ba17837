//! `loadgen compare-postgres`: Borealis and PostgreSQL 15 streaming replication
//! side by side, from one invocation on one machine. The same open-loop
//! workload (rates, connections, value size, keys, transaction shape), the
//! same histograms and lag probe; every point on a fresh cluster or pair,
//! runs interleaved (run, then rate, then system) so that the machine's drift
//! spreads over every row; then failovers of both, interleaved too. Writes
//! summary.json, .hgrm files, comparison.md (the tables and the three
//! target ratios) and SVG plots.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cluster::{Ack, WorkDir};
use crate::commit_bench::{self, CommitBenchArgs};
use crate::failover::{self, FailoverArgs};
use crate::open_loop::{self, LoadArgs, Measurement, Point};
use crate::plot::{self, Series};
use crate::postgres::{self, PgArgs, PgFailoverArgs, PgFailoverRun, SyncCommit};
use crate::report::median_by;
use crate::sweep::args_from;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct CompareArgs {
    /// Offered commit rates (commits/s over all connections), the same for both systems.
    #[arg(long, value_delimiter = ',', default_value = "1000,4000")]
    pub rates: Vec<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub load: LoadArgs,
    /// Borealis storage ack modes to measure (embedded cluster: 6 storaged, writerd, 1 replica).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "memory,disk")]
    pub borealis_ack: Vec<Ack>,
    /// PostgreSQL synchronous_commit modes to measure (primary + 1 hot standby).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "off,local,on,remote_apply")]
    pub synchronous_commit: Vec<SyncCommit>,
    /// Failovers of each system (fresh cluster / pair each, interleaved); 0 skips them.
    #[arg(long, default_value_t = 3)]
    pub failover_runs: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub pg: PgArgs,
    /// Where the clusters and pairs live [default: a temp dir, removed after a successful run]; the postgres user must be able to reach it.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Directory for results: summary.json, .hgrm files, comparison.md, SVG plots.
    #[arg(long, default_value = "bench-results/compare-postgres")]
    pub out: PathBuf,
}

/// Borealis' failover in the comparison: as PostgreSQL's, one replica, promoted right after the kill.
const BOREALIS_FAILOVER_REPLICAS: usize = 1;

fn borealis_args(args: &CompareArgs, ack: Ack) -> Result<CommitBenchArgs> {
    let mut cb: CommitBenchArgs = args_from(&[])?;
    cb.rates = args.rates.clone();
    cb.load = args.load.clone();
    cb.replicas = Some(1);
    cb.cluster.ack = ack;
    cb.out = args.out.clone();
    Ok(cb)
}

fn failover_args(args: &CompareArgs) -> Result<(FailoverArgs, PgFailoverArgs)> {
    let mut b: FailoverArgs = args_from(&["--promote", "now"])?;
    b.runs = args.failover_runs.max(1);
    b.replicas = BOREALIS_FAILOVER_REPLICAS;
    // As many client connections as the commit benchmark: PostgreSQL needs them for 2,000 synchronous transactions/s.
    b.connections = args.load.connections;
    let mut p: PgFailoverArgs = args_from(&["--synchronous-commit", "on"])?;
    p.runs = args.failover_runs.max(1);
    p.pg = args.pg.clone();
    // The same transactions, schedule and clients on both sides.
    (p.rate, p.warmup_seconds, p.seconds, p.connections, p.txn_ops, p.value_bytes, p.deadline_seconds) =
        (b.rate, b.warmup_seconds, b.seconds, b.connections, b.txn_ops, b.value_bytes, b.deadline_seconds);
    Ok((b, p))
}

pub async fn run(args: CompareArgs) -> Result<()> {
    args.load.check(&args.rates)?;
    if args.borealis_ack.is_empty() || args.synchronous_commit.is_empty() {
        bail!("--borealis-ack and --synchronous-commit: name at least one mode each");
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    tokio::select! {
        r = compare(&args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

/// Display order of the rows: Borealis' modes, then PostgreSQL's, as given.
fn row_order(args: &CompareArgs, p: &Point) -> usize {
    match p.system.as_str() {
        "borealis" => args.borealis_ack.iter().position(|a| a.as_str() == p.durability).unwrap_or(0),
        _ => args.borealis_ack.len() + args.synchronous_commit.iter().position(|m| m.as_str() == p.durability).unwrap_or(0),
    }
}

/// The machine's 1-minute load average (other work on a shared machine shows here), and the UTC time.
fn machine_state() -> serde_json::Value {
    let load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()));
    let utc = std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    serde_json::json!({ "load_average_1m": load, "utc": utc })
}

async fn compare(args: &CompareArgs) -> Result<()> {
    let started = machine_state();
    let work = WorkDir::new(args.work_dir.as_deref(), "borealis-compare-postgres")?;
    let cb: Vec<(Ack, CommitBenchArgs)> = args.borealis_ack.iter().map(|&a| Ok((a, borealis_args(args, a)?))).collect::<Result<_>>()?;
    let total = args.load.runs * args.rates.len() * (cb.len() + args.synchronous_commit.len());
    let mut done = 0;
    let mut borealis_runs: Vec<(Ack, Measurement)> = Vec::new();
    let mut pg_runs: Vec<(SyncCommit, Measurement)> = Vec::new();
    let mut pgids = Vec::new();
    for run in 0..args.load.runs {
        for &rate in &args.rates {
            for (ack, a) in &cb {
                done += 1;
                eprintln!("[compare {done}/{total}] borealis ack={} at {rate} commits/s, run {}/{}", ack.as_str(), run + 1, args.load.runs);
                let m = commit_bench::measure_embedded(a, &work, run, rate).await.with_context(|| format!("borealis ack={} run {} at {rate} commits/s (cluster under {})", ack.as_str(), run + 1, work.path.display()))?;
                borealis_runs.push((*ack, m));
            }
            for &mode in &args.synchronous_commit {
                done += 1;
                eprintln!("[compare {done}/{total}] postgres synchronous_commit={} at {rate} commits/s, run {}/{}", mode.as_str(), run + 1, args.load.runs);
                let (m, ids) = postgres::measure_pair(&args.load, &args.pg, &work.path.join("pair"), mode, run, rate)
                    .await
                    .with_context(|| format!("postgres synchronous_commit={} run {} at {rate} commits/s (pair under {})", mode.as_str(), run + 1, work.path.display()))?;
                pgids.extend(ids);
                pg_runs.push((mode, m));
            }
        }
    }
    let mut points = Vec::new();
    for (ack, a) in &cb {
        let rs: Vec<Measurement> = borealis_runs.iter().filter(|(x, _)| x == ack).map(|(_, m)| m.clone()).collect();
        points.extend(commit_bench::points(a, &rs, &format!("borealis-{}-", ack.as_str()))?);
    }
    points.extend(postgres::pg_points(&args.load, &args.rates, &args.synchronous_commit, &pg_runs, &args.out)?);
    points.sort_by(|a, b| a.rate.total_cmp(&b.rate).then(row_order(args, a).cmp(&row_order(args, b))));

    let mut failovers = None;
    if args.failover_runs > 0 {
        let (b, p) = failover_args(args)?;
        let (mut bruns, mut pruns) = (Vec::new(), Vec::new());
        for run in 0..args.failover_runs {
            eprintln!("[compare failover {}/{}] borealis (promote now)", run + 1, args.failover_runs);
            let r = failover::measure_embedded(&b, &work, run).await.with_context(|| format!("borealis failover run {} (cluster under {})", run + 1, work.path.display()))?;
            eprintln!("  borealis failover {:.1} ms, {} acknowledged, {} lost", r.failover_ms, r.audit.acked_writes, r.audit.lost_acked_writes);
            bruns.push(r);
            eprintln!("[compare failover {}/{}] postgres (SIGKILL primary, promote standby)", run + 1, args.failover_runs);
            let r = postgres::failover_measure(&p, &work.path.join(format!("pg-failover-{}", run + 1)), run)
                .await
                .with_context(|| format!("postgres failover run {} (pair under {})", run + 1, work.path.display()))?;
            eprintln!("  postgres failover {:.1} ms, {} acknowledged, {} lost", r.failover_ms, r.audit.acked_writes, r.audit.lost_acked_writes);
            pgids.extend(r.postgres_pgids.iter().copied());
            pruns.push(r);
        }
        failovers = Some(Failovers { bs: failover::summarize(&b, &bruns), ps: postgres::failover_summary(&p, &pruns), b, p, bruns, pruns });
    }

    let ended = machine_state();
    let targets = targets(args, &points, failovers.as_ref());
    plots(args, &borealis_runs, &pg_runs, &points, failovers.as_ref())?;
    let mut md = markdown(args, &points, failovers.as_ref(), &targets);
    md += &format!(
        "- The machine: from {} to {} (UTC), 1-minute load average {} at the start and {} at the end (with 2 vCPUs, above ~2 means the run shared the CPUs with other work: compare rows of this run with each other, not with other runs).\n",
        started["utc"].as_str().unwrap_or("?"),
        ended["utc"].as_str().unwrap_or("?"),
        started["load_average_1m"],
        ended["load_average_1m"]
    );
    let md_path = args.out.join("comparison.md");
    std::fs::write(&md_path, &md).with_context(|| format!("write {}", md_path.display()))?;
    let json = serde_json::json!({
        "params": args,
        "machine": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "started": started, "ended": ended },
        "points": points,
        "targets": targets,
        "borealis_runs": borealis_runs.iter().map(|(ack, m)| serde_json::json!({ "ack": ack, "measurement": m })).collect::<Vec<_>>(),
        "postgres_runs": pg_runs.iter().map(|(mode, m)| serde_json::json!({ "synchronous_commit": mode, "measurement": m })).collect::<Vec<_>>(),
        "failover": failovers.as_ref().map(|f| serde_json::json!({
            "borealis": { "summary": f.bs, "params": f.b, "runs": f.bruns },
            "postgres": { "summary": f.ps, "params": f.p, "runs": f.pruns },
        })),
        "postgres_pgids": pgids,
    });
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", path.display()))?;
    println!("{md}");
    println!("wrote {} and {}", md_path.display(), path.display());
    if let Some(f) = &failovers {
        if f.bs.totals.lost_or_torn() || f.ps.totals.lost_or_torn() {
            bail!("acknowledged writes lost in a failover (Borealis {}, PostgreSQL {}) or torn; see {}", f.bs.totals.lost_acked_writes, f.ps.totals.lost_acked_writes, path.display());
        }
    }
    open_loop::verdict(&points, &path)?;
    work.cleanup();
    Ok(())
}

struct Failovers {
    b: FailoverArgs,
    p: PgFailoverArgs,
    bruns: Vec<failover::Run>,
    pruns: Vec<PgFailoverRun>,
    bs: failover::Summary,
    ps: postgres::PgFailoverSummary,
}

/// One of the targets, computed from this run.
#[derive(Serialize, Debug, Clone)]
pub struct Target {
    pub what: String,
    pub rate: Option<f64>,
    pub borealis: String,
    pub borealis_value: f64,
    pub postgres: String,
    pub postgres_value: f64,
    /// Borealis over PostgreSQL.
    pub ratio: f64,
    /// The ratio must be at most this.
    pub target: f64,
    pub met: bool,
}

fn find<'a>(points: &'a [Point], system: &str, durability: &str, rate: f64) -> Option<&'a Point> {
    points.iter().find(|p| p.system == system && p.durability == durability && p.rate == rate)
}

fn targets(args: &CompareArgs, points: &[Point], f: Option<&Failovers>) -> Vec<Target> {
    let mut t = Vec::new();
    let mut push = |what: &str, rate: Option<f64>, b: (String, f64), p: (String, f64), target: f64| {
        let ratio = b.1 / p.1;
        t.push(Target { what: what.into(), rate, borealis: b.0, borealis_value: b.1, postgres: p.0, postgres_value: p.1, ratio, target, met: ratio <= target });
    };
    for &rate in &args.rates {
        for ack in &args.borealis_ack {
            let Some(b) = find(points, "borealis", ack.as_str(), rate) else { continue };
            if let Some(p) = find(points, "postgres", "on", rate) {
                push(
                    "commit p99: Borealis vs PostgreSQL with a synchronous standby (synchronous_commit=on), ≤ 1/5",
                    Some(rate),
                    (format!("ack={}", ack.as_str()), b.commit_latency_us.p99),
                    ("on".into(), p.commit_latency_us.p99),
                    0.2,
                );
            }
            if let (Some(bl), Some(p)) = (&b.replica_lag_us, find(points, "postgres", "local", rate)) {
                if let Some(pl) = &p.replica_lag_us {
                    push(
                        "replica lag p99: Borealis replica vs PostgreSQL asynchronous standby (synchronous_commit=local), ≤ 1/2",
                        Some(rate),
                        (format!("ack={}", ack.as_str()), bl.p99),
                        ("local".into(), pl.p99),
                        0.5,
                    );
                }
            }
        }
    }
    if let Some(f) = f {
        push(
            "failover (kill to first commit on the new writer, median): Borealis vs PostgreSQL, ≤ 1×",
            None,
            (format!("promote now, ack={}", f.b.cluster.ack.as_str()), f.bs.failover_ms),
            (format!("pg_promote, synchronous_commit={}", f.p.synchronous_commit.as_str()), f.ps.failover_ms),
            1.0,
        );
    }
    t
}

/// What each durability mode means, for the table.
fn durability_note(system: &str, durability: &str) -> &'static str {
    match (system, durability) {
        ("borealis", "memory") => "4/6 storage nodes hold the record in memory (flushed asynchronously)",
        ("borealis", "disk") => "4/6 storage nodes have flushed it (O_DSYNC write)",
        ("postgres", "off") => "WAL buffers only (flushed by the WAL writer; can lose acked commits)",
        ("postgres", "local") => "local WAL fsync; standby asynchronous",
        ("postgres", "on") => "local WAL fsync + synchronous standby's flush",
        ("postgres", "remote_apply") => "local WAL fsync + synchronous standby's replay",
        _ => "",
    }
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1e3)
}

fn markdown(args: &CompareArgs, points: &[Point], f: Option<&Failovers>, targets: &[Target]) -> String {
    let l = &args.load;
    let mut md = String::from("# Borealis vs PostgreSQL 15 streaming replication\n\n");
    md += &format!(
        "One `loadgen compare-postgres` invocation (`scripts/compare-postgres`) on one machine ({} CPUs), both systems on loopback and on the same disk. \
         Open loop at the same offered rates, {} connections, one put of a {}-byte value per transaction on {} uniformly random keys, \
         {} s measured after {} s of warm-up per point, each point on a fresh cluster / pair, {} runs interleaved (run, rate, system): medians over runs. \
         Commit latency counts from each commit's due time (coordinated omission corrected). \
         Visibility lag: from a commit's acknowledgement to the replica / standby reporting a read point at or past it.\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        l.connections,
        l.value_bytes,
        l.keys,
        l.seconds,
        l.warmup_seconds,
        l.runs
    );
    md += "## Commit latency and visibility lag\n\n| system | durability (commit acknowledged when) | offered/s | acknowledged/s | commit p50 ms | p99 ms | p99.9 ms | lag p50 ms | lag p99 ms | errors |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for p in points {
        let c = &p.commit_latency_us;
        let (lag50, lag99) = match &p.replica_lag_us {
            Some(lag) => (ms(lag.p50), ms(lag.p99)),
            None => ("-".into(), "-".into()),
        };
        let unseen = if p.replica_lag_unseen > 0 { format!(" ({} unseen)", p.replica_lag_unseen) } else { String::new() };
        md += &format!(
            "| {} | {}: {} | {:.0} | {:.0}{} | {} | {} | {} | {lag50} | {lag99}{unseen} | {} |\n",
            if p.system == "borealis" { "Borealis" } else { "PostgreSQL" },
            if p.system == "borealis" { format!("ack={}", p.durability) } else { format!("synchronous_commit={}", p.durability) },
            durability_note(&p.system, &p.durability),
            p.rate,
            p.throughput_commits_per_s,
            if p.saturated { " (saturated)" } else { "" },
            ms(c.p50),
            ms(c.p99),
            ms(c.p999),
            p.errors
        );
    }
    if let Some(f) = f {
        md += &format!(
            "\n## Failover\n\nSIGKILL of the writer under {:.0} transactions/s of {} puts each ({} connections, {}-byte values, keys of their own), the replica / standby promoted right after the kill; \
             clients reconnect and re-send; every transaction is read back from the new writer. {} runs each, interleaved, fresh cluster / pair each: medians (max), counts summed.\n\n\
             | system | setup | failover ms: kill to first new commit, median (max) | unavailable ms | acknowledged | lost acknowledged | torn | unacknowledged present/absent |\n|---|---|---|---|---|---|---|---|\n",
            f.b.rate,
            f.b.txn_ops,
            f.b.connections,
            f.b.value_bytes,
            f.bs.runs
        );
        md += &format!(
            "| Borealis | ack={}, 6 storaged, writerd SIGKILL, {} replica sent Promote at once | {:.1} ({:.1}) | {:.1} | {} | {} | {} | {}/{} |\n",
            f.b.cluster.ack.as_str(),
            f.b.replicas,
            f.bs.failover_ms,
            f.bs.failover_ms_max,
            f.bs.unavailable_ms,
            f.bs.totals.acked_writes,
            f.bs.totals.lost_acked_writes,
            f.bs.totals.torn_writes,
            f.bs.totals.unacked_present,
            f.bs.totals.unacked_absent
        );
        md += &format!(
            "| PostgreSQL | synchronous_commit={}, SIGKILL of the primary's process group, standby promoted at once ({}; promoted after {} ms) | {:.1} ({:.1}) | {:.1} | {} | {} | {} | {}/{} |\n",
            f.p.synchronous_commit.as_str(),
            match f.p.promote_with {
                postgres::PromoteWith::Sql => "pg_promote()",
                postgres::PromoteWith::PgCtl => "pg_ctl promote",
            },
            f.ps.promoted_ms.map_or("-".to_string(), |v| format!("{v:.1}")),
            f.ps.failover_ms,
            f.ps.failover_ms_max,
            f.ps.unavailable_ms,
            f.ps.totals.acked_writes,
            f.ps.totals.lost_acked_writes,
            f.ps.totals.torn_writes,
            f.ps.totals.unacked_present,
            f.ps.totals.unacked_absent
        );
    }
    md += "\n## Targets (issue 6), from this run\n\n| target | rate/s | Borealis | PostgreSQL | ratio | target | |\n|---|---|---|---|---|---|---|\n";
    for t in targets {
        let unit = |v: f64| if t.what.starts_with("failover") { format!("{v:.1} ms") } else { format!("{} ms", ms(v)) };
        md += &format!(
            "| {} | {} | {}: {} | {}: {} | {:.3} | ≤ {} | {} |\n",
            t.what,
            t.rate.map_or("-".to_string(), |r| format!("{r:.0}")),
            t.borealis,
            unit(t.borealis_value),
            t.postgres,
            unit(t.postgres_value),
            t.ratio,
            t.target,
            if t.met { "met" } else { "**not met**" }
        );
    }
    md += "\n## Known differences\n\n\
- Topology: Borealis runs 6 storage daemons, a writer and a replica; PostgreSQL a primary and one standby. All share the same 2 vCPUs and disk, so Borealis spends more CPU per commit on process hops; neither gets a core of its own.\n\
- Durability differs by design: Borealis ack=memory holds a commit in memory on 4 of 6 storage nodes (on one host here: a power loss could lose it), PostgreSQL `on` fsyncs it locally and on the standby; ack=disk is the closest match to `on` (4/6 durable writes vs fsync on 2/2).\n\
- Lag probes: Borealis' replica pushes its read point to loadgen (event-driven); PostgreSQL's standby is polled back to back with `pg_last_wal_replay_lsn()` on one session whenever an acknowledged commit is above its last replay point (errs high by up to one poll round trip; the polling costs the standby and loadgen CPU that Borealis' probe does not, about a third of a core at 1,000 commits/s). PostgreSQL's commit position is the WAL insert position after the row (`RETURNING pg_current_wal_insert_lsn()`): the commit record follows it, so its lag errs low by that record's replay, in its favour.\n\
- Clients: PostgreSQL sessions pipeline their statements (tokio-postgres); a session runs one transaction at a time on the server, so at most `connections` commits are in progress there, while Borealis' writer takes every pipelined commit of a connection at once (group commit across them).\n\
- Failover: PostgreSQL's standby is promoted with `pg_promote()` on a session opened before the kill (what `pg_ctl promote` does, without starting a process), as Borealis' replica gets `Promote` on a connection opened before; both sides' clients retry every 5 ms. PostgreSQL's whole process group is killed at once (the machine dies), as writerd is one process. After promotion PostgreSQL runs without a standby (commits are then only local), while Borealis' new writer still commits on 4/6 storage nodes.\n\
- PostgreSQL settings: defaults except listen_addresses, ports, unix_socket_directories, shared_buffers (256MB; the data set fits), wal_level=replica, max_wal_senders=4, synchronous_standby_names='*' on the primary ('' on the standby), and wal_retrieve_retry_interval=50ms on the standby (in PostgreSQL's favour: with the default 5 s, a promotion that races the walreceiver's exit sometimes waits 5 s); fsync and full_page_writes on.\n";
    md
}

/// The median run's histogram (by p99), as `summarize` picks it for the .hgrm files.
fn median_hist<'a>(rs: &[&'a Measurement], f: impl Fn(&'a Measurement) -> &'a Histogram<u64>, key: impl Fn(&Measurement) -> u64) -> &'a Histogram<u64> {
    let m: &&'a Measurement = median_by(rs, |r| key(r));
    f(m)
}

fn label(system: &str, durability: &str) -> String {
    match system {
        "borealis" => format!("Borealis ack={durability}"),
        _ => format!("PostgreSQL sc={durability}"),
    }
}

fn plots(args: &CompareArgs, borealis: &[(Ack, Measurement)], pg: &[(SyncCommit, Measurement)], points: &[Point], f: Option<&Failovers>) -> Result<()> {
    let out = &args.out;
    for &rate in &args.rates {
        let mut groups: Vec<(String, Vec<&Measurement>)> = Vec::new();
        for ack in &args.borealis_ack {
            groups.push((label("borealis", ack.as_str()), borealis.iter().filter(|(a, m)| a == ack && m.rate == rate).map(|(_, m)| m).collect()));
        }
        for mode in &args.synchronous_commit {
            groups.push((label("postgres", mode.as_str()), pg.iter().filter(|(s, m)| s == mode && m.rate == rate).map(|(_, m)| m).collect()));
        }
        groups.retain(|(_, rs)| !rs.is_empty());
        let commit: Vec<(&str, &Histogram<u64>)> = groups.iter().map(|(l, rs)| (l.as_str(), median_hist(rs, |m| &m.hist, |m| m.commit_latency_us.p99))).collect();
        plot::percentile_chart(&out.join(format!("commit-latency-{rate:.0}-per-s.svg")), &format!("Commit latency at {rate:.0} commits/s offered"), &commit)?;
        let lag: Vec<(&str, &Histogram<u64>)> =
            groups.iter().filter(|(_, rs)| rs.iter().all(|m| m.replica_lag_us.is_some())).map(|(l, rs)| (l.as_str(), median_hist(rs, |m| &m.replica_hist, |m| m.replica_lag_us.map_or(0, |l| l.p99)))).collect();
        plot::percentile_chart(&out.join(format!("replica-lag-{rate:.0}-per-s.svg")), &format!("Replica / standby visibility lag at {rate:.0} commits/s offered"), &lag)?;
    }
    let series = |value: &dyn Fn(&Point) -> Option<f64>| -> Vec<Series> {
        let mut keys: Vec<(String, String)> = Vec::new();
        for p in points {
            let k = (p.system.clone(), p.durability.clone());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys.iter()
            .map(|(s, d)| Series::new(label(s, d), points.iter().filter(|p| &p.system == s && &p.durability == d).filter_map(|p| value(p).map(|v| (p.rate, v / 1e3))).collect()))
            .collect()
    };
    plot::line_chart(&out.join("commit-p99-vs-rate.svg"), "Commit latency p99 against offered rate", "offered commits/s", "p99 ms", &series(&|p| Some(p.commit_latency_us.p99)))?;
    plot::line_chart(&out.join("replica-lag-p99-vs-rate.svg"), "Replica / standby visibility lag p99 against offered rate", "offered commits/s", "lag p99 ms", &series(&|p| p.replica_lag_us.as_ref().map(|l| l.p99)))?;
    if let Some(f) = f {
        let b = median_by(&f.bruns, |r| (r.failover_ms * 1e3) as u64);
        plot::failover_timeline(
            &out.join("failover-timeline-borealis.svg"),
            &format!("Borealis failover (run {}): acknowledged transactions per 10 ms", b.run + 1),
            &b.acks_at_ms,
            10.0,
            &[(b.kill_at_ms, "writerd killed"), (b.kill_at_ms + b.failover_ms, "first new commit")],
        )?;
        let p = median_by(&f.pruns, |r| (r.failover_ms * 1e3) as u64);
        let mut markers = vec![(p.kill_at_ms, "primary killed")];
        if let Some(promoted) = p.promoted_ms {
            markers.push((p.kill_at_ms + promoted, "promoted"));
        }
        markers.push((p.kill_at_ms + p.failover_ms, "first new commit"));
        plot::failover_timeline(
            &out.join("failover-timeline-postgres.svg"),
            &format!("PostgreSQL failover (run {}): acknowledged transactions per 10 ms", p.run + 1),
            &p.acks_at_ms,
            10.0,
            &markers,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::PromoteMode;

    #[test]
    fn defaults_match_across_systems() {
        let args: CompareArgs = args_from(&[]).unwrap();
        let (b, p) = failover_args(&args).unwrap();
        assert_eq!(b.promote, PromoteMode::Now);
        assert_eq!((b.rate, b.connections, b.txn_ops, b.value_bytes), (p.rate, p.connections, p.txn_ops, p.value_bytes));
        assert_eq!(p.synchronous_commit, SyncCommit::On);
        let cb = borealis_args(&args, Ack::Disk).unwrap();
        assert_eq!((cb.load.connections, cb.load.value_bytes, cb.load.keys, cb.replicas), (8, 100, 100_000, Some(1)));
        assert_eq!(cb.cluster.ack, Ack::Disk);
        assert_eq!(args.rates, vec![1000.0, 4000.0]);
    }
}
