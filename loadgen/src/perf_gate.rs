//! `loadgen perf-gate`: a short benchmark judged against a committed baseline,
//! robust to a noisy shared machine. Each repetition measures a reference
//! first (raw mutual-TLS QUIC request/response on loopback at the same rate,
//! in loadgen's own process) and then Borealis on a fresh embedded cluster;
//! every metric is a ratio to that repetition's reference, so a machine that
//! is slower today moves both. The medians of the ratios over the repetitions
//! are compared with the baseline's; a metric fails when its median ratio
//! exceeds the baseline's by more than the baseline's allowance for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::ceilings::raw_quic_latency;
use crate::cluster::{process_cpu_seconds, EmbeddedClusterArgs, WorkDir};
use crate::commit_bench::{self, CommitBenchArgs};
use crate::open_loop::LoadArgs;
use crate::report::{median, LatencyUs};
use crate::sweep::args_from;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct PerfGateArgs {
    /// The baseline to compare with (written by --write-baseline on a good build).
    #[arg(long, default_value = "bench-results/perf-gate/baseline.json")]
    pub baseline: PathBuf,
    /// Record this run as the baseline (metrics and run parameters; allowances kept from an existing baseline) instead of judging it.
    #[arg(long)]
    pub write_baseline: bool,
    /// Repetitions, each a reference then a Borealis measurement; medians over them are judged.
    #[arg(long, default_value_t = 5)]
    pub repetitions: usize,
    /// Offered commits/s (single puts of 100-byte values over 8 connections, ack = memory, one replica);
    /// the reference sends as many messages/s. Low enough that the local cluster leaves most of a
    /// 2-core machine idle: near saturation, queueing makes even the p50 swing 2x between runs.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Seconds measured per repetition, after 1 s of warm-up.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// This run's measurements and verdicts (JSON).
    #[arg(long, default_value = "bench-results/latest/perf-gate.json")]
    pub out: PathBuf,
    /// The embedded cluster.
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: EmbeddedClusterArgs,
}

/// Connections of the workload and of the reference.
const CONNECTIONS: usize = 8;

/// Bytes of a reference request: about a single-put transaction of a 100-byte value on the wire.
const REFERENCE_MESSAGE_BYTES: usize = 160;

/// Allowances of a new baseline, as a multiple of its ratio: latency percentiles are noisier than CPU time.
const DEFAULT_ALLOWANCES: &[(&str, f64)] =
    &[("commit_p50_per_quic_rtt", 1.8), ("commit_p99_per_quic_rtt", 2.5), ("replica_lag_p99_per_quic_rtt", 5.0), ("cpu_per_commit_per_quic_message", 1.3)];

/// One repetition: the reference and Borealis, and the metrics (ratios) they give.
#[derive(Serialize, Debug)]
struct Repetition {
    quic_rtt_us: LatencyUs,
    /// loadgen's CPU time per reference message (client and server both in loadgen).
    quic_cpu_us_per_message: f64,
    commit_latency_us: LatencyUs,
    replica_lag_us: Option<LatencyUs>,
    cluster_cpu_us_per_commit: f64,
    errors: u64,
    metrics: BTreeMap<String, f64>,
}

/// What the gate compares with: each metric's median ratio on a good build and how far above it a run may go.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Baseline {
    /// The run parameters the ratios hold for.
    pub rate: f64,
    pub seconds: f64,
    pub repetitions: usize,
    pub metrics: BTreeMap<String, BaselineMetric>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BaselineMetric {
    /// Median over the baseline's repetitions.
    pub ratio: f64,
    /// A run fails when its median exceeds `ratio × allowance`.
    pub allowance: f64,
}

/// One metric's judgement.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Verdict {
    pub metric: String,
    pub baseline: f64,
    pub current: f64,
    /// current / baseline.
    pub change: f64,
    pub allowance: f64,
    pub pass: bool,
}

/// Judges every baseline metric against this run's medians (pure: the gate's whole decision).
pub fn judge(baseline: &Baseline, current: &BTreeMap<String, f64>) -> Result<Vec<Verdict>> {
    baseline
        .metrics
        .iter()
        .map(|(name, b)| {
            let &c = current.get(name).with_context(|| format!("this run did not measure {name}, which the baseline has"))?;
            let change = c / b.ratio;
            Ok(Verdict { metric: name.clone(), baseline: b.ratio, current: c, change, allowance: b.allowance, pass: c.is_finite() && change <= b.allowance })
        })
        .collect()
}

pub async fn run(args: PerfGateArgs) -> Result<()> {
    if args.repetitions == 0 || args.rate.is_nan() || args.rate <= 0.0 || args.seconds.is_nan() || args.seconds <= 0.0 {
        bail!("--repetitions, --rate and --seconds must be positive");
    }
    let baseline = read_baseline(&args.baseline)?;
    if let (Some(b), false) = (&baseline, args.write_baseline) {
        if b.rate != args.rate || b.seconds != args.seconds {
            bail!(
                "{} was recorded at {} commits/s for {} s; run with --rate {} --seconds {}, or record a new baseline with --write-baseline",
                args.baseline.display(),
                b.rate,
                b.seconds,
                b.rate,
                b.seconds
            );
        }
    } else if baseline.is_none() && !args.write_baseline {
        bail!("no baseline at {}: record one on a good build with --write-baseline", args.baseline.display());
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    tokio::select! {
        r = gate(&args, baseline) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    }
}

fn read_baseline(path: &Path) -> Result<Option<Baseline>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("parse the baseline {}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

async fn gate(args: &PerfGateArgs, baseline: Option<Baseline>) -> Result<()> {
    let work = WorkDir::new(args.cluster.work_dir.as_deref(), "borealis-perf-gate")?;
    let certs = work.path.join("reference-certs");
    borealis_net::certs::generate(&certs, &["loadgen".to_string()])?;
    let identity = borealis_net::TlsIdentity::load(&certs, "loadgen")?;
    let mut cb: CommitBenchArgs = args_from(&[])?;
    cb.rates = vec![args.rate];
    cb.load = LoadArgs { connections: CONNECTIONS, seconds: args.seconds, warmup_seconds: 1.0, runs: args.repetitions, ..cb.load };
    cb.cluster = args.cluster.clone();
    let duration = Duration::from_secs_f64(args.seconds);
    let mut reps = Vec::new();
    for rep in 0..args.repetitions {
        let cpu_before = process_cpu_seconds(std::process::id())?;
        let started = Instant::now();
        let quic_rtt_us = raw_quic_latency(&identity, REFERENCE_MESSAGE_BYTES, args.rate / CONNECTIONS as f64, duration, CONNECTIONS as u32)
            .await
            .context("the reference (raw QUIC)")?;
        let quic_cpu_us_per_message = (process_cpu_seconds(std::process::id())? - cpu_before) * 1e6 / quic_rtt_us.count.max(1) as f64;
        let m = commit_bench::measure_embedded(&cb, &work, rep, args.rate)
            .await
            .with_context(|| format!("repetition {} (cluster under {})", rep + 1, work.path.display()))?;
        let cpu = m.cluster_cpu_us_per_commit.context("the embedded cluster's CPU time")?;
        let rtt = quic_rtt_us.p50.max(1) as f64;
        let mut metrics = BTreeMap::from([
            ("commit_p50_per_quic_rtt".to_string(), m.commit_latency_us.p50 as f64 / rtt),
            ("commit_p99_per_quic_rtt".to_string(), m.commit_latency_us.p99 as f64 / rtt),
            ("cpu_per_commit_per_quic_message".to_string(), cpu / quic_cpu_us_per_message),
        ]);
        if let Some(lag) = m.replica_lag_us {
            // The p99: a replica's p50 lag is often a few microseconds (shown before the ack arrived), too small to compare.
            metrics.insert("replica_lag_p99_per_quic_rtt".to_string(), lag.p99 as f64 / rtt);
        }
        eprintln!(
            "[perf-gate {}/{}] {:.0} s: QUIC rtt p50 {} us; commit p50/p99 {}/{} us, replica lag p99 {} us, {cpu:.0} CPU us/commit (QUIC {quic_cpu_us_per_message:.0} us/message)",
            rep + 1,
            args.repetitions,
            started.elapsed().as_secs_f64(),
            quic_rtt_us.p50,
            m.commit_latency_us.p50,
            m.commit_latency_us.p99,
            m.replica_lag_us.map_or(0, |l| l.p99)
        );
        reps.push(Repetition {
            quic_rtt_us,
            quic_cpu_us_per_message,
            commit_latency_us: m.commit_latency_us,
            replica_lag_us: m.replica_lag_us,
            cluster_cpu_us_per_commit: cpu,
            errors: m.errors,
            metrics,
        });
    }
    work.cleanup();
    let errors: u64 = reps.iter().map(|r| r.errors).sum();
    let names: Vec<String> = reps[0].metrics.keys().cloned().collect();
    let medians: BTreeMap<String, f64> =
        names.into_iter().map(|n| (n.clone(), median(reps.iter().filter_map(|r| r.metrics.get(&n).copied()).collect()))).collect();

    if args.write_baseline {
        let allowance = |name: &str| {
            let kept = baseline.as_ref().and_then(|b| b.metrics.get(name)).map(|m| m.allowance);
            kept.or_else(|| DEFAULT_ALLOWANCES.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)).unwrap_or(1.5)
        };
        let new = Baseline {
            rate: args.rate,
            seconds: args.seconds,
            repetitions: args.repetitions,
            metrics: medians.iter().map(|(n, &ratio)| (n.clone(), BaselineMetric { ratio, allowance: allowance(n) })).collect(),
        };
        if let Some(dir) = args.baseline.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        std::fs::write(&args.baseline, serde_json::to_string_pretty(&new)? + "\n").with_context(|| format!("write {}", args.baseline.display()))?;
        write_out(args, &reps, &medians, &[])?;
        println!("{}", baseline_table(&new));
        println!("wrote the baseline {}", args.baseline.display());
        if errors > 0 {
            bail!("{errors} commits failed while recording the baseline; see {}", args.out.display());
        }
        return Ok(());
    }
    let baseline = baseline.expect("checked in run()");
    let verdicts = judge(&baseline, &medians)?;
    write_out(args, &reps, &medians, &verdicts)?;
    println!("{}", verdict_table(&verdicts));
    let failed: Vec<&Verdict> = verdicts.iter().filter(|v| !v.pass).collect();
    if errors > 0 {
        bail!("perf gate FAILED: {errors} commits failed; see {}", args.out.display());
    }
    if !failed.is_empty() {
        let why: Vec<String> = failed
            .iter()
            .map(|v| format!("{} is {:.2}x its baseline (allowed {:.2}x): median {:.3} against {:.3}", v.metric, v.change, v.allowance, v.current, v.baseline))
            .collect();
        bail!("perf gate FAILED, a clear regression against {}:\n  {}\n(details in {})", args.baseline.display(), why.join("\n  "), args.out.display());
    }
    println!("perf gate passed: every metric within its allowance of {}", args.baseline.display());
    Ok(())
}

fn write_out(args: &PerfGateArgs, reps: &[Repetition], medians: &BTreeMap<String, f64>, verdicts: &[Verdict]) -> Result<()> {
    let json = serde_json::json!({ "params": args, "medians": medians, "verdicts": verdicts, "repetitions": reps });
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?).with_context(|| format!("write {}", args.out.display()))
}

fn verdict_table(verdicts: &[Verdict]) -> String {
    let mut t = String::from(
        "| metric (median ratio to the same repetition's reference) | baseline | this run | change | allowed | verdict |\n|---|---|---|---|---|---|\n",
    );
    for v in verdicts {
        t += &format!(
            "| {} | {:.3} | {:.3} | {:.2}x | {:.2}x | {} |\n",
            v.metric,
            v.baseline,
            v.current,
            v.change,
            v.allowance,
            if v.pass { "pass" } else { "FAIL" }
        );
    }
    t
}

fn baseline_table(b: &Baseline) -> String {
    let mut t = String::from("| metric | baseline ratio | allowed |\n|---|---|---|\n");
    for (name, m) in &b.metrics {
        t += &format!("| {name} | {:.3} | {:.2}x |\n", m.ratio, m.allowance);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline() -> Baseline {
        Baseline {
            rate: 2000.0,
            seconds: 3.0,
            repetitions: 5,
            metrics: BTreeMap::from([
                ("commit_p50_per_quic_rtt".to_string(), BaselineMetric { ratio: 4.0, allowance: 1.5 }),
                ("cpu_per_commit_per_quic_message".to_string(), BaselineMetric { ratio: 10.0, allowance: 1.3 }),
            ]),
        }
    }

    fn current(p50: f64, cpu: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([("commit_p50_per_quic_rtt".to_string(), p50), ("cpu_per_commit_per_quic_message".to_string(), cpu)])
    }

    #[test]
    fn within_the_allowance_passes_and_above_it_fails() {
        let v = judge(&baseline(), &current(5.9, 12.9)).unwrap();
        assert!(v.iter().all(|v| v.pass), "{v:?}");
        let v = judge(&baseline(), &current(6.1, 9.0)).unwrap();
        assert_eq!(
            v.iter().map(|v| (v.metric.as_str(), v.pass)).collect::<Vec<_>>(),
            vec![("commit_p50_per_quic_rtt", false), ("cpu_per_commit_per_quic_message", true)]
        );
        assert!((v[0].change - 1.525).abs() < 1e-9);
    }

    #[test]
    fn a_metric_the_run_lacks_or_cannot_compute_is_not_a_pass() {
        let mut c = current(4.0, 10.0);
        c.remove("cpu_per_commit_per_quic_message");
        assert!(judge(&baseline(), &c).unwrap_err().to_string().contains("did not measure cpu_per_commit_per_quic_message"));
        assert!(!judge(&baseline(), &current(f64::NAN, 10.0)).unwrap()[0].pass);
    }

    #[test]
    fn the_baseline_round_trips_through_json() {
        let b = baseline();
        assert_eq!(serde_json::from_str::<Baseline>(&serde_json::to_string(&b).unwrap()).unwrap(), b);
    }
}
