//! `loadgen compare-postgres`: Borealis and PostgreSQL 15 streaming replication
//! side by side, from one invocation on one machine: the same open-loop
//! workload (rates, connections, value size, keys, transaction shape), the same
//! histograms, lag probe and CPU accounting, every point on a fresh cluster or
//! set of servers. In order:
//!
//! * the commit/lag table: every durability mode at `--rates`;
//! * server CPU per commit: Borealis ack = disk and PostgreSQL `on` at `--rates`, lag probes off on both sides;
//! * gray failure: one, then two storage nodes (distinct AZs) paused on a duty cycle, against PostgreSQL's
//!   synchronous standby, then both quorum standbys, paused the same way;
//!
//! these three interleaved (run, section, rate, system) so that the machine's drift spreads over every row;
//! then the saturation ladders (the runs of a step interleaved), then failovers of both, interleaved.
//! Writes summary.json, targets.json (the targets), .hgrm files, comparison.md and SVG plots.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde::{Serialize, Serializer};

use crate::audit::AuditTotals;
use crate::cluster::{Ack, WorkDir};
use crate::commit_bench::{self, CommitBenchArgs};
use crate::failover::{self, FailoverArgs};
use crate::open_loop::{self, LoadArgs, Measurement, Point};
use crate::pause::{DutyCycle, GrayFailure};
use crate::plot::{self, Series};
use crate::postgres::{self, PgArgs, PgFailoverArgs, PgFailoverRun, PgSetup, SyncCommit};
use crate::report::median_by;
use crate::saturation::{self, Ladder, SaturationArgs, Step};
use crate::sweep::args_from;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct CompareArgs {
    /// Offered commit rates (commits/s over all connections), the same for both systems: of the commit/lag table and of the CPU per commit.
    #[arg(long, value_delimiter = ',', default_value = "1000,4000")]
    pub rates: Vec<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub load: LoadArgs,
    /// Borealis storage ack modes of the commit/lag table (embedded cluster: 6 storaged, writerd, 1 replica).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "memory,disk")]
    pub borealis_ack: Vec<Ack>,
    /// PostgreSQL synchronous_commit modes of the commit/lag table (a primary and 1 hot standby). Quorum commit is
    /// a row too: `on` with two standbys, synchronous_standby_names = 'ANY 1 (s1, s2)'.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "off,local,on,remote_apply")]
    pub synchronous_commit: Vec<SyncCommit>,
    /// Gray failure: the offered rate while storage nodes (Borealis) or standbys (PostgreSQL) are paused on the
    /// duty cycle of --pause-ms and --pause-every-ms, commits/s.
    #[arg(long, default_value_t = 1000.0)]
    pub gray_rate: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub pause: DutyCycle,
    #[command(flatten)]
    #[serde(flatten)]
    pub saturation: SaturationArgs,
    /// Failovers of each system (fresh cluster / pair each, interleaved); 0 skips them.
    #[arg(long, default_value_t = 3)]
    pub failover_runs: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub pg: PgArgs,
    /// Where the clusters and servers live [default: a temp dir, removed after a successful run]; the postgres user must be able to reach it.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Directory for results: summary.json, targets.json, .hgrm files, comparison.md, SVG plots.
    #[arg(long, default_value = "bench-results/compare-postgres")]
    pub out: PathBuf,
}

/// Borealis' failover in the comparison: as PostgreSQL's, one replica, promoted right after the kill.
const BOREALIS_FAILOVER_REPLICAS: usize = 1;

/// Quorum commit: PostgreSQL's standbys in the quorum row and the second gray failure.
const QUORUM_STANDBYS: usize = 2;

/// A system as a row of the comparison: what runs, its workload (connections, durations, lag probe) and its gray failure.
#[derive(Clone, Debug)]
enum Subject {
    /// The embedded cluster (6 storaged, writerd, 1 replica): ack mode, workload and paused storage nodes are the commit benchmark's options.
    Borealis(Box<CommitBenchArgs>),
    /// A primary and its standbys; with `pause`, every standby is paused on that duty cycle.
    Postgres { load: LoadArgs, setup: PgSetup, pause: Option<DutyCycle> },
}

impl Subject {
    /// Borealis with `ack`, `load`, and `pause_nodes` storage nodes of distinct AZs paused on `--pause-*`.
    fn borealis(args: &CompareArgs, ack: Ack, load: LoadArgs, pause_nodes: usize) -> Result<Self> {
        let mut cb: CommitBenchArgs = args_from(&[])?;
        cb.load = load;
        cb.replicas = Some(1);
        cb.cluster.ack = ack;
        cb.gray = GrayFailure { pause_nodes, duty: args.pause };
        Ok(Subject::Borealis(Box::new(cb)))
    }

    /// PostgreSQL with `synchronous_commit` and `standbys` standbys, all paused on `--pause-*` if `paused`.
    fn postgres(args: &CompareArgs, synchronous_commit: SyncCommit, load: LoadArgs, standbys: usize, paused: bool) -> Self {
        Subject::Postgres { load, setup: PgSetup::new(synchronous_commit, standbys), pause: paused.then_some(args.pause) }
    }

    fn load(&self) -> &LoadArgs {
        match self {
            Subject::Borealis(cb) => &cb.load,
            Subject::Postgres { load, .. } => load,
        }
    }

    fn system(&self) -> &'static str {
        match self {
            Subject::Borealis(_) => "borealis",
            Subject::Postgres { .. } => "postgres",
        }
    }

    /// Its points' `durability`: Borealis' ack mode, PostgreSQL's setup (`on`, `on-any1of2`).
    fn durability(&self) -> String {
        match self {
            Subject::Borealis(cb) => cb.cluster.ack.as_str().to_string(),
            Subject::Postgres { setup, .. } => setup.durability(),
        }
    }

    /// Members paused: storage nodes (Borealis) or standbys (PostgreSQL); 0 without gray failure.
    fn paused(&self) -> usize {
        match self {
            Subject::Borealis(cb) => cb.gray.pause_nodes,
            Subject::Postgres { setup, pause, .. } => pause.map_or(0, |_| setup.standbys),
        }
    }

    /// How its files start: `borealis-disk`, `postgres-on-any1of2`, then `-2-paused` under gray failure.
    fn tag(&self) -> String {
        let tag = format!("{}-{}", self.system(), self.durability());
        match self.paused() {
            0 => tag,
            n => format!("{tag}-{n}-paused"),
        }
    }

    /// The setting that decides when a commit is acknowledged, as the table states it.
    fn setting(&self) -> String {
        match self {
            Subject::Borealis(cb) => format!("ack={}", cb.cluster.ack.as_str()),
            Subject::Postgres { setup, .. } if setup.standbys > 1 => {
                format!(
                    "synchronous_commit={}, {} standbys, synchronous_standby_names='{}'",
                    setup.synchronous_commit.as_str(),
                    setup.standbys,
                    postgres::synchronous_standby_names(setup.standbys)
                )
            }
            Subject::Postgres { setup, .. } => format!("synchronous_commit={}", setup.synchronous_commit.as_str()),
        }
    }

    /// When a commit is acknowledged, in words.
    fn note(&self) -> &'static str {
        match self {
            Subject::Borealis(cb) => match cb.cluster.ack {
                Ack::Memory => "4/6 storage nodes hold the record in memory (flushed asynchronously)",
                Ack::Disk => "4/6 storage nodes have flushed it (O_DSYNC write)",
            },
            Subject::Postgres { setup, .. } => match (setup.synchronous_commit, setup.standbys) {
                (SyncCommit::Off, _) => "WAL buffers only (flushed by the WAL writer; can lose acked commits)",
                (SyncCommit::Local, _) => "local WAL fsync; standby asynchronous",
                (SyncCommit::On, 1) => "local WAL fsync + synchronous standby's flush",
                (SyncCommit::On, _) => "local WAL fsync + the flush of any one standby (quorum commit)",
                (SyncCommit::RemoteApply, 1) => "local WAL fsync + synchronous standby's replay",
                (SyncCommit::RemoteApply, _) => "local WAL fsync + the replay of any one standby (quorum commit)",
            },
        }
    }

    /// A short name for progress lines, plots and run records.
    fn label(&self) -> String {
        let name = match self {
            Subject::Borealis(cb) => format!("Borealis ack={}", cb.cluster.ack.as_str()),
            Subject::Postgres { setup, .. } if setup.standbys > 1 => {
                format!("PostgreSQL sc={} {}", setup.synchronous_commit.as_str(), postgres::synchronous_standby_names(setup.standbys))
            }
            Subject::Postgres { setup, .. } => format!("PostgreSQL sc={}", setup.synchronous_commit.as_str()),
        };
        match (self, self.paused()) {
            (_, 0) => name,
            (Subject::Borealis(_), 1) => format!("{name}, 1 storage node paused"),
            (Subject::Borealis(_), n) => format!("{name}, {n} storage nodes paused ({n} AZs)"),
            (Subject::Postgres { .. }, 1) => format!("{name}, standby paused"),
            (Subject::Postgres { .. }, n) => format!("{name}, all {n} standbys paused"),
        }
    }

    /// One point on fresh servers; PostgreSQL's postmasters' pids go to `pgids`.
    async fn measure(&self, args: &CompareArgs, work: &WorkDir, run: usize, rate: f64, pgids: &mut Vec<i32>) -> Result<Measurement> {
        let m = match self {
            Subject::Borealis(cb) => commit_bench::measure_embedded(cb, work, run, rate).await,
            Subject::Postgres { load, setup, pause } => {
                postgres::measure_point(load, &args.pg, &work.path.join("pg"), *setup, *pause, run, rate).await.map(|(m, ids)| {
                    pgids.extend(ids);
                    m
                })
            }
        };
        m.with_context(|| format!("{} run {} at {rate} commits/s (under {})", self.label(), run + 1, work.path.display()))
    }
}

/// Subjects measured at the same rates; the runs of every section interleave.
struct Section {
    /// What it measures, for progress lines.
    title: &'static str,
    /// How its files start ("" for the commit/lag table).
    prefix: &'static str,
    subjects: Vec<Subject>,
    rates: Vec<f64>,
    /// Each subject's measurements: every rate and run.
    runs: Vec<Vec<Measurement>>,
}

/// A subject's point: medians over its runs at one rate.
struct Row<'a> {
    subject: &'a Subject,
    point: Point,
}

impl Section {
    fn new(title: &'static str, prefix: &'static str, subjects: Vec<Subject>, rates: Vec<f64>) -> Self {
        let runs = vec![Vec::new(); subjects.len()];
        Section { title, prefix, subjects, rates, runs }
    }

    /// A row per rate and subject, in that order; the median runs' histograms go to `out`.
    fn rows(&self, out: &Path) -> Result<Vec<Row<'_>>> {
        let mut rows = Vec::new();
        for &rate in &self.rates {
            for (subject, runs) in self.subjects.iter().zip(&self.runs) {
                let rs: Vec<&Measurement> = runs.iter().filter(|m| m.rate == rate).collect();
                let point = open_loop::summarize(
                    subject.load(),
                    subject.system(),
                    &subject.durability(),
                    rate,
                    &rs,
                    out,
                    &format!("{}{}-", self.prefix, subject.tag()),
                )?;
                rows.push(Row { subject, point });
            }
        }
        Ok(rows)
    }

    fn runs_json(&self) -> Vec<serde_json::Value> {
        self.subjects
            .iter()
            .zip(&self.runs)
            .map(|(s, runs)| serde_json::json!({ "section": self.title, "label": s.label(), "system": s.system(), "durability": s.durability(), "paused": s.paused(), "measurements": runs }))
            .collect()
    }
}

/// The commit/lag table, the CPU pass and the gray failures.
fn sections(args: &CompareArgs) -> Result<[Section; 3]> {
    let load = || args.load.clone();
    // The probe's work on the servers is not the system's: the CPU pass and the gray failures run without it, on both sides.
    let unprobed = || LoadArgs { lag_probe: false, ..args.load.clone() };
    let mut table = Vec::new();
    for &ack in &args.borealis_ack {
        table.push(Subject::borealis(args, ack, load(), 0)?);
    }
    for &mode in &args.synchronous_commit {
        table.push(Subject::postgres(args, mode, load(), 1, false));
    }
    table.push(Subject::postgres(args, SyncCommit::On, load(), QUORUM_STANDBYS, false));
    let cpu = vec![Subject::borealis(args, Ack::Disk, unprobed(), 0)?, Subject::postgres(args, SyncCommit::On, unprobed(), 1, false)];
    // One storage node against the synchronous standby, then two (of two AZs) against both standbys of quorum commit.
    let mut gray = Vec::new();
    for paused in [1, QUORUM_STANDBYS] {
        gray.push(Subject::borealis(args, Ack::Disk, unprobed(), paused)?);
        gray.push(Subject::postgres(args, SyncCommit::On, unprobed(), paused, true));
    }
    Ok([
        Section::new("commit/lag table", "", table, args.rates.clone()),
        Section::new("CPU per commit, lag probes off", "cpu-", cpu, args.rates.clone()),
        Section::new("gray failure", "gray-", gray, vec![args.gray_rate]),
    ])
}

/// The saturation ladders' subjects: Borealis ack = disk against PostgreSQL `on`, then ack = memory against
/// `local`, each at every connection count, lag probes off, the ladder's durations.
fn saturation_subjects(args: &CompareArgs) -> Result<Vec<Subject>> {
    let sat = &args.saturation;
    let load = |connections: usize| LoadArgs {
        connections,
        seconds: sat.saturation_seconds,
        warmup_seconds: sat.saturation_warmup_seconds,
        lag_probe: false,
        ..args.load.clone()
    };
    let mut subjects = Vec::new();
    for (ack, mode) in [(Ack::Disk, SyncCommit::On), (Ack::Memory, SyncCommit::Local)] {
        for &c in &sat.borealis_saturation_connections {
            subjects.push(Subject::borealis(args, ack, load(c), 0)?);
        }
        for &c in &sat.pg_saturation_connections {
            subjects.push(Subject::postgres(args, mode, load(c), 1, false));
        }
    }
    Ok(subjects)
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
    if !(args.gray_rate.is_finite() && args.gray_rate > 0.0) {
        bail!("--gray-rate must be positive");
    }
    args.pause.check()?;
    args.saturation.check()?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    tokio::select! {
        r = compare(&args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

/// The machine's 1-minute load average (other work on a shared machine shows here), and the UTC time.
fn machine_state() -> serde_json::Value {
    let load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()));
    let utc =
        std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    serde_json::json!({ "load_average_1m": load, "utc": utc })
}

async fn compare(args: &CompareArgs) -> Result<()> {
    let started = machine_state();
    let work = WorkDir::new(args.work_dir.as_deref(), "borealis-compare-postgres")?;
    let mut sections = sections(args)?;
    let total = args.load.runs * sections.iter().map(|s| s.subjects.len() * s.rates.len()).sum::<usize>();
    let mut done = 0;
    let mut pgids = Vec::new();
    for run in 0..args.load.runs {
        for section in &mut sections {
            for &rate in &section.rates {
                for (subject, runs) in section.subjects.iter().zip(&mut section.runs) {
                    done += 1;
                    eprintln!("[compare {done}/{total}] {}: {} at {rate} commits/s, run {}/{}", section.title, subject.label(), run + 1, args.load.runs);
                    runs.push(subject.measure(args, &work, run, rate, &mut pgids).await?);
                }
            }
        }
    }
    let ladders = saturation(args, &work, &mut pgids).await?;

    let mut failovers = None;
    if args.failover_runs > 0 {
        let (b, p) = failover_args(args)?;
        let (mut bruns, mut pruns) = (Vec::new(), Vec::new());
        for run in 0..args.failover_runs {
            eprintln!("[compare failover {}/{}] borealis (promote now)", run + 1, args.failover_runs);
            let r = failover::measure_embedded(&b, &work, run)
                .await
                .with_context(|| format!("borealis failover run {} (cluster under {})", run + 1, work.path.display()))?;
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
    let [table, cpu, gray] = &sections;
    let results = Results { table: table.rows(&args.out)?, cpu: cpu.rows(&args.out)?, gray: gray.rows(&args.out)?, ladders, failovers };
    let targets = targets(args, &results);
    plots(args, &sections, &results)?;
    let mut md = markdown(args, &results, &targets);
    md += &format!(
        "- The machine: from {} to {} (UTC), 1-minute load average {} at the start and {} at the end (with 2 vCPUs, above ~2 means the run shared the CPUs with other work: compare rows of this run with each other, not with other runs).\n",
        started["utc"].as_str().unwrap_or("?"),
        ended["utc"].as_str().unwrap_or("?"),
        started["load_average_1m"],
        ended["load_average_1m"]
    );
    let md_path = args.out.join("comparison.md");
    std::fs::write(&md_path, &md).with_context(|| format!("write {}", md_path.display()))?;
    let targets_path = args.out.join("targets.json");
    std::fs::write(&targets_path, serde_json::to_string_pretty(&targets)?).with_context(|| format!("write {}", targets_path.display()))?;
    let labelled = |rows: &[Row]| {
        rows.iter().map(|r| serde_json::json!({ "label": r.subject.label(), "paused": r.subject.paused(), "point": r.point })).collect::<Vec<_>>()
    };
    let f = results.failovers.as_ref();
    let json = serde_json::json!({
        "params": args,
        "machine": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "started": started, "ended": ended },
        "points": results.table.iter().map(|r| &r.point).collect::<Vec<_>>(),
        "cpu_points": labelled(&results.cpu),
        "gray_failure_points": labelled(&results.gray),
        "saturation": results.ladders.iter().map(|l| serde_json::json!({
            "label": l.subject.label(), "system": l.ladder.system, "durability": l.ladder.durability, "connections": l.ladder.connections,
            "highest_sustained_commits_per_s": l.ladder.highest_sustained(), "steps": l.ladder.steps,
        })).collect::<Vec<_>>(),
        "targets": targets,
        "runs": sections.iter().flat_map(Section::runs_json).collect::<Vec<_>>(),
        "failover": f.map(|f| serde_json::json!({
            "borealis": { "summary": f.bs, "params": f.b, "runs": f.bruns },
            "postgres": { "summary": f.ps, "params": f.p, "runs": f.pruns },
        })),
        "postgres_pgids": pgids,
    });
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", path.display()))?;
    println!("{md}");
    println!("wrote {}, {} and {}", md_path.display(), targets_path.display(), path.display());
    if let Some(f) = f {
        if f.bs.totals.lost_or_torn() || f.ps.totals.lost_or_torn() {
            bail!(
                "acknowledged writes lost in a failover (Borealis {}, PostgreSQL {}) or torn; see {}",
                f.bs.totals.lost_acked_writes,
                f.ps.totals.lost_acked_writes,
                path.display()
            );
        }
    }
    // Saturation steps may fail commits (that is what overload looks like); the other points may not.
    let points: Vec<Point> = [&results.table, &results.cpu, &results.gray].into_iter().flatten().map(|r| r.point.clone()).collect();
    open_loop::verdict(&points, &path)?;
    work.cleanup();
    Ok(())
}

/// A subject's saturation ladder.
struct Climb {
    subject: Subject,
    ladder: Ladder,
}

/// The saturation ladders: at each rate, every subject still climbing is measured (runs interleaved, until
/// a majority of the runs decides the step), and a subject whose step was not sustained stops there.
async fn saturation(args: &CompareArgs, work: &WorkDir, pgids: &mut Vec<i32>) -> Result<Vec<Climb>> {
    let sat = &args.saturation;
    let mut climbs: Vec<Climb> = saturation_subjects(args)?
        .into_iter()
        .map(|subject| {
            let ladder =
                Ladder { system: subject.system().to_string(), durability: subject.durability(), connections: subject.load().connections, steps: Vec::new() };
            Climb { subject, ladder }
        })
        .collect();
    for rate in sat.rates() {
        let climbing: Vec<usize> = (0..climbs.len()).filter(|&i| climbs[i].ladder.climbing()).collect();
        if climbing.is_empty() {
            break;
        }
        let mut runs: Vec<Vec<Measurement>> = vec![Vec::new(); climbs.len()];
        let p99_us_max = sat.saturation_p99_ms * 1e3;
        for run in 0..args.load.runs {
            for &i in &climbing {
                let done: Vec<(f64, f64)> = runs[i].iter().map(|m| (m.throughput_commits_per_s, m.commit_latency_us.p99 as f64)).collect();
                if saturation::known_verdict(&done, args.load.runs, rate, p99_us_max).is_some() {
                    continue;
                }
                let subject = &climbs[i].subject;
                eprintln!(
                    "[compare saturation at {rate} commits/s] {}, {} connections, run {}/{}",
                    subject.label(),
                    subject.load().connections,
                    run + 1,
                    args.load.runs
                );
                runs[i].push(subject.measure(args, work, run, rate, pgids).await?);
            }
        }
        for &i in &climbing {
            let step = Step::of(rate, &runs[i], p99_us_max);
            eprintln!(
                "  {}, {} connections: {:.0} acknowledged/s, p99 {:.1} ms: {}",
                climbs[i].subject.label(),
                climbs[i].ladder.connections,
                step.throughput_commits_per_s,
                step.commit_p99_us / 1e3,
                if step.sustained { "sustained" } else { "not sustained, stops" }
            );
            climbs[i].ladder.steps.push(step);
        }
    }
    Ok(climbs)
}

struct Failovers {
    b: FailoverArgs,
    p: PgFailoverArgs,
    bruns: Vec<failover::Run>,
    pruns: Vec<PgFailoverRun>,
    bs: failover::Summary,
    ps: postgres::PgFailoverSummary,
}

/// Everything a comparison measured, as medians.
struct Results<'a> {
    table: Vec<Row<'a>>,
    cpu: Vec<Row<'a>>,
    gray: Vec<Row<'a>>,
    ladders: Vec<Climb>,
    failovers: Option<Failovers>,
}

/// What a target's ratio must be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Goal::AtMost(x) => write!(f, "<= {x}"),
            Goal::AtLeast(x) => write!(f, ">= {x}"),
        }
    }
}

/// As its text: "<= 1.25".
impl Serialize for Goal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How a target's values read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unit {
    /// Latency, µs (shown in ms).
    LatencyUs,
    /// CPU µs per commit.
    CpuUs,
    /// Commits/s.
    Rate,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::LatencyUs => format!("{} ms", ms(v)),
            Unit::CpuUs => format!("{v:.0} µs"),
            Unit::Rate => format!("{v:.0}/s"),
        }
    }
}

/// One of the targets, from this run: Borealis' value against PostgreSQL's.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub borealis: f64,
    pub postgres: f64,
    /// Borealis over PostgreSQL; null when PostgreSQL's value is 0 (it sustained no rate of the ladder).
    pub ratio: Option<f64>,
    pub goal: Goal,
    pub met: bool,
    /// What is compared, for the table.
    #[serde(skip)]
    pub what: String,
    #[serde(skip)]
    pub unit: Unit,
}

impl Target {
    pub fn new(name: String, what: &str, unit: Unit, borealis: f64, postgres: f64, goal: Goal) -> Self {
        let ratio = (postgres > 0.0).then(|| borealis / postgres);
        let met = match (ratio, goal) {
            (Some(r), Goal::AtMost(x)) => r <= x,
            (Some(r), Goal::AtLeast(x)) => r >= x,
            // PostgreSQL at 0: any positive Borealis value is infinitely more.
            (None, Goal::AtMost(_)) => false,
            (None, Goal::AtLeast(_)) => borealis > 0.0,
        };
        Target { name, borealis, postgres, ratio, goal, met, what: what.to_string(), unit }
    }
}

fn find<'a>(rows: &'a [Row], system: &str, durability: &str, rate: f64) -> Option<&'a Point> {
    rows.iter().map(|r| &r.point).find(|p| p.system == system && p.durability == durability && p.rate == rate)
}

/// The targets that this run measured, in the order.
fn targets(args: &CompareArgs, r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let on = SyncCommit::On.as_str();
    for &rate in &args.rates {
        let cpu = |system, durability| find(&r.cpu, system, durability, rate).and_then(|p| p.server_cpu_us_per_commit);
        if let (Some(b), Some(p)) = (cpu("borealis", "disk"), cpu("postgres", on)) {
            let what = "server CPU per commit, lag probes off: Borealis ack=disk (6 storaged, writerd, replica) vs PostgreSQL on (primary, standby)";
            t.push(Target::new(format!("cpu_per_commit_{rate:.0}"), what, Unit::CpuUs, b, p, Goal::AtMost(1.25)));
        }
    }
    for (paused, name, what) in [
        (1, "gray_failure_one", "commit p99, gray failure: Borealis ack=disk with 1 storage node paused vs PostgreSQL on with its synchronous standby paused"),
        (
            QUORUM_STANDBYS,
            "gray_failure_two",
            "commit p99, gray failure: Borealis ack=disk with 2 storage nodes (2 AZs) paused vs PostgreSQL on, ANY 1 (s1, s2), both standbys paused",
        ),
    ] {
        let p99 = |system| r.gray.iter().find(|g| g.subject.system() == system && g.subject.paused() == paused).map(|g| g.point.commit_latency_us.p99);
        if let (Some(b), Some(p)) = (p99("borealis"), p99("postgres")) {
            t.push(Target::new(name.to_string(), &format!("{what} ({})", args.pause.describe()), Unit::LatencyUs, b, p, Goal::AtMost(0.2)));
        }
    }
    let best = |system, durability| saturation::best(r.ladders.iter().map(|c| &c.ladder), system, durability);
    if let (Some(b), Some(p)) = (best("borealis", "disk"), best("postgres", on)) {
        let what = format!(
            "highest sustained rate (≥ 99% acknowledged, commit p99 ≤ {} ms): Borealis ack=disk ({} connections) vs PostgreSQL on ({} sessions, its best)",
            args.saturation.saturation_p99_ms, b.connections, p.connections
        );
        t.push(Target::new("saturation".to_string(), &what, Unit::Rate, b.highest_sustained(), p.highest_sustained(), Goal::AtLeast(2.0)));
    }
    for &rate in &args.rates {
        if let (Some(b), Some(p)) = (find(&r.table, "borealis", "memory", rate), find(&r.table, "postgres", on, rate)) {
            let what = "commit p99: Borealis ack=memory vs PostgreSQL on (reported, not a closing condition)";
            t.push(Target::new(format!("commit_p99_{rate:.0}"), what, Unit::LatencyUs, b.commit_latency_us.p99, p.commit_latency_us.p99, Goal::AtMost(1.0)));
        }
    }
    for &rate in &args.rates {
        let lag = |system, durability| find(&r.table, system, durability, rate).and_then(|p| p.replica_lag_us.as_ref()).map(|l| l.p99);
        if let (Some(b), Some(p)) = (lag("borealis", "memory"), lag("postgres", SyncCommit::Local.as_str())) {
            let what = "replica lag p99: Borealis ack=memory vs PostgreSQL local (asynchronous standby)";
            t.push(Target::new(format!("lag_p99_{rate:.0}"), what, Unit::LatencyUs, b, p, Goal::AtMost(1.0)));
        }
    }
    t
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1e3)
}

/// The figures of a row: acknowledged/s, commit p50, p99, p99.9, max (ms), errors.
fn commit_cells(p: &Point) -> String {
    let c = &p.commit_latency_us;
    format!(
        "{:.0}{} | {} | {} | {} | {} | {}",
        p.throughput_commits_per_s,
        if p.saturated { " (saturated)" } else { "" },
        ms(c.p50),
        ms(c.p99),
        ms(c.p999),
        ms(c.max),
        p.errors
    )
}

fn markdown(args: &CompareArgs, r: &Results, targets: &[Target]) -> String {
    let l = &args.load;
    let sat = &args.saturation;
    let mut md = String::from("# Borealis vs PostgreSQL 15 streaming replication\n\n");
    md += &format!(
        "One `loadgen compare-postgres` invocation (`scripts/compare-postgres`) on one machine ({} CPUs), both systems on loopback and on the same disk. \
         Open loop at the same offered rates, {} connections, one put of a {}-byte value per transaction on {} uniformly random keys, \
         {} s measured after {} s of warm-up per point (saturation steps: {} s after {} s), each point on a fresh cluster / set of servers, {} runs interleaved (run, section, rate, system): medians over runs. \
         Commit latency counts from each commit's due time (coordinated omission corrected). \
         Visibility lag: from a commit's acknowledgement to the replica / standby reporting a read point at or past it.\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        l.connections,
        l.value_bytes,
        l.keys,
        l.seconds,
        l.warmup_seconds,
        sat.saturation_seconds,
        sat.saturation_warmup_seconds,
        l.runs
    );
    md += "## Targets (issue 16), from this run\n\nAlso in `targets.json` (latencies in µs there, CPU in µs per commit, rates in commits/s).\n\n| target | what | Borealis | PostgreSQL | ratio | goal | |\n|---|---|---|---|---|---|---|\n";
    for t in targets {
        md += &format!(
            "| `{}` | {} | {} | {} | {} | {} | {} |\n",
            t.name,
            t.what,
            t.unit.show(t.borealis),
            t.unit.show(t.postgres),
            t.ratio.map_or("-".to_string(), |x| format!("{x:.3}")),
            t.goal,
            if t.met { "met" } else { "**not met**" }
        );
    }
    md += "\n## Commit latency and visibility lag\n\n| system | durability (commit acknowledged when) | offered/s | acknowledged/s | commit p50 ms | p99 ms | p99.9 ms | max ms | errors | lag p50 ms | lag p99 ms |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    for row in &r.table {
        let p = &row.point;
        let (lag50, lag99) = match &p.replica_lag_us {
            Some(lag) => (ms(lag.p50), ms(lag.p99)),
            None => ("-".into(), "-".into()),
        };
        let unseen = if p.replica_lag_unseen > 0 { format!(" ({} unseen)", p.replica_lag_unseen) } else { String::new() };
        md += &format!(
            "| {} | {}: {} | {:.0} | {} | {lag50} | {lag99}{unseen} |\n",
            system_name(row.subject),
            row.subject.setting(),
            row.subject.note(),
            p.rate,
            commit_cells(p)
        );
    }
    md += "\n## Server CPU per commit\n\n\
CPU time (user + system) of every server process, read from `/proc/PID/stat` at the start and at the end of the measured seconds (after the warm-up), \
over the commits acknowledged in those seconds. Borealis: its 6 storaged, writerd and replicad. PostgreSQL: the primary's and the standby's postmasters and every \
process under them (backends, WAL senders and receivers, checkpointer, …): each process's own `utime + stime` (all its threads) plus `cutime + cstime` \
(the children it has reaped), so a process that exits in the window still counts. The lag probes are off on both sides for these points \
(no Follow feed to Borealis' replica and writer, no polling of PostgreSQL's standby or primary), so neither system pays for loadgen's measuring; \
loadgen's own CPU is not counted. The same open-loop load as the table otherwise.\n\n\
| system | durability | offered/s | acknowledged/s | commit p50 ms | p99 ms | p99.9 ms | max ms | errors | server CPU µs/commit | server CPU cores |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    for row in &r.cpu {
        let p = &row.point;
        let cpu = p.server_cpu_us_per_commit;
        md += &format!(
            "| {} | {} | {:.0} | {} | {} | {} |\n",
            system_name(row.subject),
            row.subject.setting(),
            p.rate,
            commit_cells(p),
            cpu.map_or("-".to_string(), |c| format!("{c:.0}")),
            cpu.map_or("-".to_string(), |c| format!("{:.2}", c * p.throughput_commits_per_s / 1e6))
        );
    }
    md += &format!(
        "\n## Gray failure\n\n\
Members that stall without dying: {} (SIGSTOP, then SIGCONT, for the whole load), at {:.0} commits/s offered, lag probes off. \
Borealis ack=disk with one storage node paused, then two in different AZs (nodes are 2 per AZ; a commit needs 4 of 6); \
PostgreSQL `on` with every process of its synchronous standby paused, then quorum commit over two standbys (`ANY 1 (s1, s2)`) with both paused in the same phase.\n\n\
| system | setup | paused | offered/s | acknowledged/s | commit p50 ms | p99 ms | p99.9 ms | max ms | errors |\n|---|---|---|---|---|---|---|---|---|---|\n",
        args.pause.describe(),
        args.gray_rate
    );
    for row in &r.gray {
        let paused = match (row.subject.system(), row.subject.paused()) {
            ("borealis", 1) => "1 storage node".to_string(),
            ("borealis", n) => format!("{n} storage nodes, {n} AZs"),
            (_, 1) => "the standby".to_string(),
            (_, n) => format!("all {n} standbys"),
        };
        md += &format!("| {} | {} | {paused} | {:.0} | {} |\n", system_name(row.subject), row.subject.setting(), row.point.rate, commit_cells(&row.point));
    }
    md += &format!(
        "\n## Saturation\n\n\
The offered rate climbs from {:.0} commits/s by ×{} per step (a fresh cluster / set of servers per step and run, {} s measured after {} s, lag probes off) \
until a step is not sustained: less than 99% of its rate acknowledged or commit p99 above {} ms (medians over runs). The highest sustained rate is the last step before. \
PostgreSQL runs one transaction per session at a time, so it climbs with {} sessions and counts at its best; Borealis with {} connections.\n\n\
| system | durability | connections | highest sustained /s | first step not sustained: offered/s, acknowledged/s, p99 ms | steps |\n|---|---|---|---|---|---|\n",
        sat.saturation_start,
        sat.saturation_factor,
        sat.saturation_seconds,
        sat.saturation_warmup_seconds,
        sat.saturation_p99_ms,
        list(&sat.pg_saturation_connections),
        list(&sat.borealis_saturation_connections)
    );
    for c in &r.ladders {
        let l = &c.ladder;
        let end = l
            .first_unsustained()
            .map_or(format!("none up to {:.0}", sat.saturation_max), |s| format!("{:.0}, {:.0}, {}", s.rate, s.throughput_commits_per_s, ms(s.commit_p99_us)));
        md += &format!(
            "| {} | {} | {} | {:.0} | {end} | {} |\n",
            system_name(&c.subject),
            c.subject.setting(),
            l.connections,
            l.highest_sustained(),
            l.steps.len()
        );
    }
    let best = |system, durability| saturation::best(r.ladders.iter().map(|c| &c.ladder), system, durability);
    for (ack, mode) in [(Ack::Disk, SyncCommit::On), (Ack::Memory, SyncCommit::Local)] {
        if let (Some(b), Some(p)) = (best("borealis", ack.as_str()), best("postgres", mode.as_str())) {
            let (bh, ph) = (b.highest_sustained(), p.highest_sustained());
            md += &format!(
                "\nBorealis ack={} sustains {bh:.0} commits/s ({} connections), PostgreSQL {} {ph:.0} ({} sessions, its best): {}.\n",
                ack.as_str(),
                b.connections,
                mode.as_str(),
                p.connections,
                if ph > 0.0 { format!("{:.2}x", bh / ph) } else { "PostgreSQL sustained no step".to_string() }
            );
        }
    }
    if let Some(f) = &r.failovers {
        md += &failover_markdown(f);
    }
    md += "\n## Known differences\n\n\
- Topology: Borealis runs 6 storage daemons, a writer and a replica; PostgreSQL a primary and one standby (two in the quorum-commit row and the second gray failure). All share the same 2 vCPUs and disk, so Borealis spends more CPU per commit on process hops; neither gets a core of its own.\n\
- Durability differs by design: Borealis ack=memory holds a commit in memory on 4 of 6 storage nodes (on one host here: a power loss could lose it), PostgreSQL `on` fsyncs it locally and on the standby; ack=disk is the closest match to `on` (4/6 durable writes vs fsync on 2/2); quorum commit `ANY 1 (s1, s2)` fsyncs locally and on either standby.\n\
- Lag probes: Borealis' replica pushes its read point to loadgen (event-driven); PostgreSQL's standby is polled back to back with `pg_last_wal_replay_lsn()` on one session whenever an acknowledged commit is above its last replay point (errs high by up to one poll round trip; the polling costs the standby and loadgen CPU that Borealis' probe does not, about a third of a core at 1,000 commits/s), and the primary's WAL position about once a millisecond. PostgreSQL's commit position is the WAL insert position after the row (`RETURNING pg_current_wal_insert_lsn()`): the commit record follows it, so its lag errs low by that record's replay, in its favour. The CPU, gray-failure and saturation points run with no probe on either side.\n\
- Clients: PostgreSQL sessions pipeline their statements (tokio-postgres); a session runs one transaction at a time on the server, so at most `connections` commits are in progress there, while Borealis' writer takes every pipelined commit of a connection at once (group commit across them). The saturation ladders give PostgreSQL several session counts for that reason.\n\
- Gray failure: a paused Borealis storage node is one process (SIGSTOP stops all its threads); a paused PostgreSQL standby is every process of it (postmaster, startup process, walreceiver, …, found by parent: PostgreSQL gives each child a process group of its own). Both kinds of member get the same duty cycle, and two paused members pause in the same phase.\n\
- Failover: PostgreSQL's standby is promoted with `pg_promote()` on a session opened before the kill (what `pg_ctl promote` does, without starting a process), as Borealis' replica gets `Promote` on a connection opened before; both sides' clients retry every 5 ms. Every process of PostgreSQL's primary is killed at once (the machine dies), as writerd is one process. After promotion PostgreSQL runs without a standby (commits are then only local), while Borealis' new writer still commits on 4/6 storage nodes.\n\
- PostgreSQL settings: defaults except listen_addresses, ports, unix_socket_directories, shared_buffers (256MB; the data set fits), wal_level=replica, max_wal_senders=4, synchronous_standby_names='*' on the primary with one standby ('ANY 1 (s1, s2)' with two; '' on the standbys), cluster_name s1, s2 on the standbys (their application_name), and wal_retrieve_retry_interval=50ms on the standby (in PostgreSQL's favour: with the default 5 s, a promotion that races the walreceiver's exit sometimes waits 5 s); fsync and full_page_writes on.\n";
    md
}

/// "8, 32 and 64".
fn list(xs: &[usize]) -> String {
    let xs: Vec<String> = xs.iter().map(|x| x.to_string()).collect();
    match xs.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

fn system_name(s: &Subject) -> &'static str {
    match s {
        Subject::Borealis(_) => "Borealis",
        Subject::Postgres { .. } => "PostgreSQL",
    }
}

fn failover_markdown(f: &Failovers) -> String {
    let mut md = String::new();
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
    // The figures of a row: failover median (max), unavailability, then the audit's counts.
    let cells = |failover_ms: f64, failover_ms_max: f64, unavailable_ms: f64, t: &AuditTotals| {
        format!(
            "{failover_ms:.1} ({failover_ms_max:.1}) | {unavailable_ms:.1} | {} | {} | {} | {}/{}",
            t.acked_writes, t.lost_acked_writes, t.torn_writes, t.unacked_present, t.unacked_absent
        )
    };
    md += &format!(
        "| Borealis | ack={}, 6 storaged, writerd SIGKILL, {} replica sent Promote at once | {} |\n",
        f.b.cluster.ack.as_str(),
        f.b.replicas,
        cells(f.bs.failover_ms, f.bs.failover_ms_max, f.bs.unavailable_ms, &f.bs.totals)
    );
    md += &format!(
        "| PostgreSQL | synchronous_commit={}, SIGKILL of every process of the primary, standby promoted at once ({}; promoted after {} ms) | {} |\n",
        f.p.synchronous_commit.as_str(),
        match f.p.promote_with {
            postgres::PromoteWith::Sql => "pg_promote()",
            postgres::PromoteWith::PgCtl => "pg_ctl promote",
        },
        f.ps.promoted_ms.map_or("-".to_string(), |v| format!("{v:.1}")),
        cells(f.ps.failover_ms, f.ps.failover_ms_max, f.ps.unavailable_ms, &f.ps.totals)
    );
    md
}

/// The median run's histogram (by p99), as `summarize` picks it for the .hgrm files.
fn median_hist<'a>(rs: &[&'a Measurement], f: impl Fn(&'a Measurement) -> &'a Histogram<u64>, key: impl Fn(&Measurement) -> u64) -> &'a Histogram<u64> {
    let m: &&'a Measurement = median_by(rs, |r| key(r));
    f(m)
}

/// Each subject of `section` with a run at `rate`: its label and its runs there.
fn at_rate(section: &Section, rate: f64) -> Vec<(String, Vec<&Measurement>)> {
    section
        .subjects
        .iter()
        .zip(&section.runs)
        .map(|(s, runs)| (s.label(), runs.iter().filter(|m| m.rate == rate).collect::<Vec<_>>()))
        .filter(|(_, rs)| !rs.is_empty())
        .collect()
}

/// Percentile charts of the median runs' commit latencies (and of their lag, when measured).
fn percentile_charts(section: &Section, rate: f64, commit_svg: &Path, lag_svg: Option<&Path>, title: &str) -> Result<()> {
    let groups = at_rate(section, rate);
    let commit: Vec<(&str, &Histogram<u64>)> = groups.iter().map(|(l, rs)| (l.as_str(), median_hist(rs, |m| &m.hist, |m| m.commit_latency_us.p99))).collect();
    plot::percentile_chart(commit_svg, &format!("Commit latency {title}"), &commit)?;
    if let Some(svg) = lag_svg {
        let lag: Vec<(&str, &Histogram<u64>)> = groups
            .iter()
            .filter(|(_, rs)| rs.iter().all(|m| m.replica_lag_us.is_some()))
            .map(|(l, rs)| (l.as_str(), median_hist(rs, |m| &m.replica_hist, |m| m.replica_lag_us.map_or(0, |l| l.p99))))
            .collect();
        plot::percentile_chart(svg, &format!("Replica / standby visibility lag {title}"), &lag)?;
    }
    Ok(())
}

fn plots(args: &CompareArgs, sections: &[Section; 3], r: &Results) -> Result<()> {
    let out = &args.out;
    let [table, _, gray] = sections;
    for &rate in &args.rates {
        let svg = |what: &str| out.join(format!("{what}-{rate:.0}-per-s.svg"));
        percentile_charts(table, rate, &svg("commit-latency"), Some(&svg("replica-lag")), &format!("at {rate:.0} commits/s offered"))?;
    }
    percentile_charts(
        gray,
        args.gray_rate,
        &out.join("gray-failure-commit-latency.svg"),
        None,
        &format!("under gray failure ({}) at {:.0} commits/s", args.pause.describe(), args.gray_rate),
    )?;
    let series = |value: &dyn Fn(&Point) -> Option<f64>| -> Vec<Series> {
        table
            .subjects
            .iter()
            .map(|s| {
                Series::new(
                    s.label(),
                    r.table.iter().filter(|row| std::ptr::eq(row.subject, s)).filter_map(|row| value(&row.point).map(|v| (row.point.rate, v / 1e3))).collect(),
                )
            })
            .collect()
    };
    plot::line_chart(
        &out.join("commit-p99-vs-rate.svg"),
        "Commit latency p99 against offered rate",
        "offered commits/s",
        "p99 ms",
        &series(&|p| Some(p.commit_latency_us.p99)),
    )?;
    plot::line_chart(
        &out.join("replica-lag-p99-vs-rate.svg"),
        "Replica / standby visibility lag p99 against offered rate",
        "offered commits/s",
        "lag p99 ms",
        &series(&|p| p.replica_lag_us.as_ref().map(|l| l.p99)),
    )?;
    let ladders: Vec<Series> = r
        .ladders
        .iter()
        .map(|c| {
            Series::new(
                format!("{}, {} conn.", c.subject.label(), c.ladder.connections),
                c.ladder.steps.iter().map(|s| (s.rate, s.commit_p99_us / 1e3)).collect(),
            )
        })
        .collect();
    plot::line_chart(
        &out.join("saturation-p99-vs-rate.svg"),
        "Saturation ladders: commit latency p99 against offered rate",
        "offered commits/s",
        "p99 ms",
        &ladders,
    )?;
    if let Some(f) = &r.failovers {
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
        assert_eq!(args.rates, vec![1000.0, 4000.0]);
        let [table, cpu, gray] = sections(&args).unwrap();
        for s in table.subjects.iter().chain(&cpu.subjects).chain(&gray.subjects) {
            let l = s.load();
            assert_eq!((l.connections, l.value_bytes, l.keys, l.seconds, l.runs), (8, 100, 100_000, 10.0, 3), "{}", s.label());
            if let Subject::Borealis(cb) = s {
                assert_eq!(cb.replicas, Some(1));
            }
        }
        let tags: Vec<String> = table.subjects.iter().map(Subject::tag).collect();
        assert_eq!(tags, ["borealis-memory", "borealis-disk", "postgres-off", "postgres-local", "postgres-on", "postgres-remote_apply", "postgres-on-any1of2"]);
        assert!(table.subjects.iter().all(|s| s.load().lag_probe));
        assert!(!args_from::<LoadArgs>(&["--lag-probe", "off"]).unwrap().lag_probe);
        assert!(args_from::<LoadArgs>(&["--lag-probe", "false"]).is_err(), "on or off");
        // Both systems pay for no probe where CPU or the tail under a stall is measured.
        assert!(cpu.subjects.iter().chain(&gray.subjects).all(|s| !s.load().lag_probe));
        assert_eq!(cpu.subjects.iter().map(Subject::tag).collect::<Vec<_>>(), ["borealis-disk", "postgres-on"]);
        let gray: Vec<(String, usize)> = gray.subjects.iter().map(|s| (s.tag(), s.paused())).collect();
        assert_eq!(
            gray,
            [
                ("borealis-disk-1-paused".to_string(), 1),
                ("postgres-on-1-paused".to_string(), 1),
                ("borealis-disk-2-paused".to_string(), 2),
                ("postgres-on-any1of2-2-paused".to_string(), 2)
            ]
        );
        let ladders: Vec<(String, usize)> = saturation_subjects(&args).unwrap().iter().map(|s| (s.tag(), s.load().connections)).collect();
        let expected = [
            ("borealis-disk", 8),
            ("postgres-on", 8),
            ("postgres-on", 32),
            ("postgres-on", 64),
            ("borealis-memory", 8),
            ("postgres-local", 8),
            ("postgres-local", 32),
            ("postgres-local", 64),
        ];
        assert_eq!(ladders, expected.map(|(t, c)| (t.to_string(), c)));
    }

    #[test]
    fn a_target_is_a_ratio_against_its_goal() {
        let t = Target::new("cpu_per_commit_1000".into(), "", Unit::CpuUs, 1200.0, 1000.0, Goal::AtMost(1.25));
        assert_eq!((t.ratio, t.met), (Some(1.2), true));
        let t = Target::new("gray_failure_one".into(), "", Unit::LatencyUs, 30_000.0, 100_000.0, Goal::AtMost(0.2));
        assert_eq!((t.ratio, t.met), (Some(0.3), false));
        let t = Target::new("saturation".into(), "", Unit::Rate, 8000.0, 4000.0, Goal::AtLeast(2.0));
        assert_eq!((t.ratio, t.met), (Some(2.0), true));
        assert!(!Target::new("saturation".into(), "", Unit::Rate, 7999.0, 4000.0, Goal::AtLeast(2.0)).met);
        // PostgreSQL sustained no step: no ratio; Borealis meets "at least" with any rate, never "at most".
        let t = Target::new("saturation".into(), "", Unit::Rate, 1000.0, 0.0, Goal::AtLeast(2.0));
        assert_eq!((t.ratio, t.met), (None, true));
        assert!(!Target::new("saturation".into(), "", Unit::Rate, 0.0, 0.0, Goal::AtLeast(2.0)).met);
        let json = serde_json::to_value(Target::new("lag_p99_1000".into(), "skipped", Unit::LatencyUs, 500.0, 1000.0, Goal::AtMost(1.0))).unwrap();
        assert_eq!(json, serde_json::json!({ "name": "lag_p99_1000", "borealis": 500.0, "postgres": 1000.0, "ratio": 0.5, "goal": "<= 1", "met": true }));
        assert_eq!(Goal::AtLeast(2.0).to_string(), ">= 2");
        assert_eq!(Goal::AtMost(1.25).to_string(), "<= 1.25");
    }
}
