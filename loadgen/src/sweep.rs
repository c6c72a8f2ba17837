//! `loadgen sweep`: commit latency and replica visibility lag over a grid of
//! offered rates and value sizes, each point on a fresh embedded cluster, then
//! failovers; one JSON file with every point and run, .hgrm files and SVG
//! plots (latency against throughput, replica lag, percentile distributions,
//! the failover timeline). `loadgen bench` is the canonical short sweep the
//! README's first command runs.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::cluster::{EmbeddedClusterArgs, WorkDir};
use crate::commit_bench::{self, CommitBenchArgs};
use crate::failover::{self, FailoverArgs, PromoteMode};
use crate::open_loop::{self, LoadArgs, Measurement, Point};
use crate::pause::GrayFailure;
use crate::plot::{self, Series};
use crate::report::median_by;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct SweepArgs {
    /// Offered commit rates, commits/s over all connections; each is a separate point.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000,10000,20000")]
    pub rates: Vec<f64>,
    /// Value sizes to sweep, bytes: every rate at every size [default: --value-bytes alone].
    #[arg(long, value_delimiter = ',', conflicts_with = "value_bytes")]
    pub value_sizes: Vec<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub load: LoadArgs,
    /// Read replicas of each embedded cluster; every one's visibility lag is measured.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Failovers after the commit points, each on a fresh cluster: writerd SIGKILLed under 2,000
    /// two-put transactions/s and a replica promoted at once (`loadgen failover --promote now`); 0 for none.
    #[arg(long, default_value_t = 1)]
    pub failover_runs: usize,
    /// The embedded cluster.
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: EmbeddedClusterArgs,
    /// Gray failure of every commit point (the failovers run without).
    #[command(flatten)]
    #[serde(flatten)]
    pub gray: GrayFailure,
    /// Directory for results: summary.json, .hgrm per histogram, .svg plots.
    #[arg(long, default_value = "bench-results/latest/sweep")]
    pub out: PathBuf,
}

/// `loadgen bench`: the canonical benchmark, fixed so that its numbers compare across builds and machines.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Directory for results: summary.json, .hgrm per histogram, .svg plots.
    #[arg(long, default_value = "bench-results/latest")]
    pub out: PathBuf,
    /// Where the embedded clusters keep certificates, data and logs [default: a temp dir, removed after a successful run].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// The canonical benchmark: 1,000 and 4,000 single-put commits/s (100-byte values, 8 connections, ack = memory,
/// one replica), 3 runs of 3 s after 1 s of warm-up, then one failover (promote at once).
const CANONICAL: &[&str] = &["--rates", "1000,4000", "--seconds", "3", "--warmup-seconds", "1", "--runs", "3", "--failover-runs", "1"];

/// The options `argv` gives an `Args` group, every other at its default.
pub fn args_from<A: clap::Args>(argv: &[&str]) -> Result<A> {
    #[derive(clap::Parser)]
    struct Wrap<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    use clap::Parser;
    Ok(Wrap::<A>::try_parse_from(std::iter::once("loadgen").chain(argv.iter().copied()))?.args)
}

pub async fn bench(args: BenchArgs) -> Result<()> {
    let mut sweep: SweepArgs = args_from(CANONICAL)?;
    sweep.out = args.out;
    sweep.cluster.work_dir = args.work_dir;
    run(sweep).await
}

pub async fn run(args: SweepArgs) -> Result<()> {
    args.load.check(&args.rates)?;
    if args.value_sizes.contains(&0) {
        bail!("--value-sizes must be positive");
    }
    args.gray.check()?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    // Ctrl-C drops the sweep future, and with it the embedded cluster's processes.
    tokio::select! {
        r = sweep(&args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

/// A measurement and the value size it was taken at.
#[derive(Serialize)]
struct SweepRun {
    value_bytes: usize,
    #[serde(flatten)]
    measurement: Measurement,
}

impl SweepArgs {
    fn sizes(&self) -> Vec<usize> {
        if self.value_sizes.is_empty() {
            vec![self.load.value_bytes]
        } else {
            self.value_sizes.clone()
        }
    }

    /// commit-bench's options for the points of one value size.
    fn commit_bench(&self, value_bytes: usize) -> Result<CommitBenchArgs> {
        let mut a: CommitBenchArgs = args_from(&[])?;
        a.rates = self.rates.clone();
        a.load = LoadArgs { value_bytes, ..self.load.clone() };
        a.replicas = Some(self.replicas);
        a.cluster = self.cluster.clone();
        a.gray = self.gray;
        a.out = self.out.clone();
        Ok(a)
    }

    fn failover(&self) -> Result<FailoverArgs> {
        let mut a: FailoverArgs = args_from(&[])?;
        a.promote = PromoteMode::Now;
        a.runs = self.failover_runs;
        a.cluster = self.cluster.clone();
        a.json = self.out.join("summary.json");
        Ok(a)
    }
}

async fn sweep(args: &SweepArgs) -> Result<()> {
    let sizes = args.sizes();
    let total = args.load.runs * sizes.len() * args.rates.len() + args.failover_runs;
    let bar = ProgressBar::new(total as u64)
        .with_style(ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} points, ETA {eta} {prefix}\n{wide_msg}")?.progress_chars("=> "));
    open_loop::status_to(bar.clone());
    let work = WorkDir::new(args.cluster.work_dir.as_deref(), "borealis-sweep")?;
    let mut runs = Vec::new();
    // Points interleave across runs so that slow drift of the machine spreads over every point.
    for run in 0..args.load.runs {
        for &size in &sizes {
            let cb = args.commit_bench(size)?;
            for &rate in &args.rates {
                bar.set_prefix(format!("(run {}/{}, {size}-byte values, {rate:.0} commits/s)", run + 1, args.load.runs));
                let m = commit_bench::measure_embedded(&cb, &work, run, rate)
                    .await
                    .with_context(|| format!("run {} at {rate} commits/s, {size}-byte values (cluster under {})", run + 1, work.path.display()))?;
                runs.push(SweepRun { value_bytes: size, measurement: m });
                bar.inc(1);
            }
        }
    }
    let fa = args.failover()?;
    let mut failovers = Vec::new();
    for run in 0..args.failover_runs {
        bar.set_prefix(format!("(failover {}/{})", run + 1, args.failover_runs));
        failovers
            .push(failover::measure_embedded(&fa, &work, run).await.with_context(|| format!("failover {} (cluster under {})", run + 1, work.path.display()))?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Every point's cluster data (about 1.6 GB for `bench`): kept only when a point failed.
    work.cleanup();

    let mut points = Vec::new();
    for &size in &sizes {
        let of_size: Vec<Measurement> = runs.iter().filter(|r| r.value_bytes == size).map(|r| r.measurement.clone()).collect();
        let prefix = if sizes.len() > 1 { format!("{size}B-") } else { String::new() };
        points.extend(commit_bench::points(&args.commit_bench(size)?, &of_size, &prefix)?);
    }
    plot_points(&args.out, &points, &runs)?;
    let failover = (!failovers.is_empty()).then(|| failover::summarize(&fa, &failovers));
    if let Some(median_run) = (!failovers.is_empty()).then(|| median_by(&failovers, |r| (r.failover_ms * 1e3) as u64)) {
        let first_commit = median_run.kill_at_ms + median_run.failover_ms;
        plot::failover_timeline(
            &args.out.join("failover-timeline.svg"),
            &format!("Failover at {:.0} commits/s: writer SIGKILLed, replica promoted (median run)", fa.rate),
            &median_run.acks_at_ms,
            10.0,
            &[(median_run.kill_at_ms, "writer killed"), (first_commit, "first commit on the promoted replica")],
        )?;
    }
    let path = args.out.join("summary.json");
    let json = serde_json::json!({ "params": args, "points": points, "failover": failover, "runs": runs, "failover_runs": failovers });
    std::fs::write(&path, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", path.display()))?;
    println!("{}", open_loop::table(&points));
    if let Some(f) = &failover {
        println!(
            "| failover (promote now, {:.0} two-put commits/s) | kill → first commit {:.1} ms (median of {}, max {:.1}) | unavailable {:.1} ms | lost acknowledged writes {} of {} |\n",
            f.rate, f.failover_ms, f.runs, f.failover_ms_max, f.unavailable_ms, f.totals.lost_acked_writes, f.totals.acked_writes
        );
    }
    println!("wrote {} (and .hgrm, .svg beside it)", path.display());
    if let Some(f) = failover.filter(|f| f.totals.lost_or_torn()) {
        bail!("failover: {} acknowledged writes lost, {} torn; see {}", f.totals.lost_acked_writes, f.totals.torn_writes, path.display());
    }
    open_loop::verdict(&points, &path)
}

fn ms(us: f64) -> f64 {
    us / 1e3
}

/// Latency against throughput and replica lag against offered rate (a line per value size and percentile),
/// and the percentile distributions of every point's median run.
fn plot_points(out: &Path, points: &[Point], runs: &[SweepRun]) -> Result<()> {
    let mut sizes: Vec<usize> = points.iter().map(|p| p.value_bytes).collect();
    sizes.dedup();
    let mut latency = Vec::new();
    let mut lag = Vec::new();
    for &size in &sizes {
        let of_size: Vec<&Point> = points.iter().filter(|p| p.value_bytes == size).collect();
        let line = |name: &str, x: &dyn Fn(&Point) -> f64, y: &dyn Fn(&Point) -> Option<f64>| {
            Series::new(format!("{name}, {size} B values"), of_size.iter().filter_map(|p| y(p).map(|y| (x(p), ms(y)))).collect())
        };
        let throughput = |p: &Point| p.throughput_commits_per_s;
        latency.push(line("p50", &throughput, &|p| Some(p.commit_latency_us.p50)));
        latency.push(line("p99", &throughput, &|p| Some(p.commit_latency_us.p99)));
        latency.push(line("p99.9", &throughput, &|p| Some(p.commit_latency_us.p999)));
        let rate = |p: &Point| p.rate;
        lag.push(line("p50", &rate, &|p| p.replica_lag_us.as_ref().map(|l| l.p50)));
        lag.push(line("p99", &rate, &|p| p.replica_lag_us.as_ref().map(|l| l.p99)));
    }
    plot::line_chart(
        &out.join("latency-vs-throughput.svg"),
        "Commit latency against acknowledged throughput",
        "acknowledged commits/s",
        "commit latency (ms)",
        &latency,
    )?;
    plot::line_chart(&out.join("replica-lag.svg"), "Replica visibility lag against offered rate", "offered commits/s", "replica lag (ms)", &lag)?;
    // The run each point's .hgrm was written from (median by p99), labelled by rate and size.
    let median_runs = |key: &dyn Fn(&Measurement) -> Option<u64>, hist: fn(&Measurement) -> &Histogram<u64>| -> Vec<(String, &Histogram<u64>)> {
        points
            .iter()
            .filter_map(|p| {
                let rs: Vec<&Measurement> =
                    runs.iter().filter(|r| r.value_bytes == p.value_bytes && r.measurement.rate == p.rate).map(|r| &r.measurement).collect();
                rs.iter().all(|r| key(r).is_some()).then(|| {
                    let median_run: &Measurement = median_by(&rs, |r| key(r)).to_owned();
                    (format!("{:.0}/s, {} B", p.rate, p.value_bytes), hist(median_run))
                })
            })
            .collect()
    };
    let chart = |file: &str, title: &str, hists: Vec<(String, &Histogram<u64>)>| {
        let hists: Vec<(&str, &Histogram<u64>)> = hists.iter().map(|(l, h)| (l.as_str(), *h)).collect();
        plot::percentile_chart(&out.join(file), title, &hists)
    };
    chart(
        "commit-latency-percentiles.svg",
        "Commit latency by percentile (median run of each point)",
        median_runs(&|r| Some(r.commit_latency_us.p99), |r| &r.hist),
    )?;
    chart(
        "replica-lag-percentiles.svg",
        "Replica visibility lag by percentile (median run of each point)",
        median_runs(&|r| r.replica_lag_us.map(|l| l.p99), |r| &r.replica_hist),
    )
}
