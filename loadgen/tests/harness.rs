//! The benchmark harness through the real binaries: `loadgen sweep` writes
//! every point, histogram and plot, and `loadgen perf-gate` fails a run that
//! regressed against its baseline and passes one within its allowances.
//! Needs storaged, writerd and replicad built next to loadgen (`cargo build --release`).

use std::path::Path;
use std::process::{Command, Output};

use loadgen::perf_gate::{Baseline, BaselineMetric};

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

fn loadgen(args: &[&str]) -> Output {
    Command::new(LOADGEN).args(args).output().expect("run loadgen")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn sweep_writes_every_point_histogram_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    // loadgen's own temp dir, to see that a successful sweep leaves nothing there.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let o = Command::new(LOADGEN)
        .args([
            "sweep",
            "--rates",
            "300,600",
            "--value-sizes",
            "100,2000",
            "--seconds",
            "1",
            "--warmup-seconds",
            "0.5",
            "--runs",
            "1",
            "--failover-runs",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
        .env("TMPDIR", &tmp)
        .output()
        .expect("run loadgen");
    assert!(o.status.success(), "stdout:\n{}\nstderr:\n{}", text(&o.stdout), text(&o.stderr));
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "the sweep left its clusters' data behind: {left:?}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let points = summary["points"].as_array().unwrap();
    let grid: Vec<(f64, u64)> = points.iter().map(|p| (p["rate"].as_f64().unwrap(), p["value_bytes"].as_u64().unwrap())).collect();
    assert_eq!(grid, vec![(300.0, 100), (600.0, 100), (300.0, 2000), (600.0, 2000)]);
    for p in points {
        assert!(p["commit_latency_us"]["count"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["replica_lag_us"]["count"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["cluster_cpu_us_per_commit"].as_f64().unwrap() > 0.0, "{p}");
        assert_eq!(p["errors"], 0);
        for file in [&p["hgrm"], &p["replica_lag_hgrm"]] {
            let hgrm = std::fs::read_to_string(out.join(file.as_str().unwrap())).unwrap();
            assert!(hgrm.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"), "{hgrm}");
        }
    }
    assert_eq!(summary["runs"].as_array().unwrap().len(), 4);
    assert_eq!(summary["failover"]["lost_acked_writes"], 0);
    assert!(summary["failover"]["failover_ms"].as_f64().unwrap() > 0.0);
    for (svg, needle) in [
        ("latency-vs-throughput.svg", "p99, 2000 B values"),
        ("replica-lag.svg", "p50, 100 B values"),
        ("commit-latency-percentiles.svg", "600/s, 2000 B"),
        ("replica-lag-percentiles.svg", "300/s, 100 B"),
        ("failover-timeline.svg", "writer killed"),
    ] {
        let s = std::fs::read_to_string(out.join(svg)).unwrap_or_else(|e| panic!("{svg}: {e}"));
        assert!(s.contains("<svg") && s.contains(needle), "{svg} lacks {needle:?}");
    }
    let table = text(&o.stdout);
    assert!(table.contains("| borealis | memory | 2000 | 600 |") && table.contains("lost acknowledged writes 0"), "{table}");
}

fn write_baseline(path: &Path, ratio: f64, allowance: f64) {
    let metrics = ["commit_p50_per_quic_rtt", "commit_p99_per_quic_rtt", "replica_lag_p99_per_quic_rtt", "cpu_per_commit_per_quic_message"]
        .into_iter()
        .map(|m| (m.to_string(), BaselineMetric { ratio, allowance }))
        .collect();
    let b = Baseline { rate: 500.0, seconds: 1.0, repetitions: 1, metrics };
    std::fs::write(path, serde_json::to_string(&b).unwrap()).unwrap();
}

#[test]
fn perf_gate_fails_a_regression_and_passes_within_the_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let baseline = dir.path().join("baseline.json");
    let out = dir.path().join("gate.json");
    let gate = |extra: &[&str]| {
        let mut args = vec!["perf-gate", "--baseline", baseline.to_str().unwrap(), "--out", out.to_str().unwrap(), "--repetitions", "1", "--seconds", "1"];
        args.extend_from_slice(extra);
        loadgen(&args)
    };

    // No baseline: a clear error, nothing measured.
    let o = gate(&["--rate", "500"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("no baseline"), "{}", text(&o.stderr));

    // A baseline far better than any real run: every metric regressed.
    write_baseline(&baseline, 1e-6, 1.5);
    let o = gate(&["--rate", "500"]);
    assert_eq!(o.status.code(), Some(2), "stdout:\n{}", text(&o.stdout));
    let err = text(&o.stderr);
    assert!(err.contains("perf gate FAILED") && err.contains("commit_p50_per_quic_rtt is"), "{err}");
    assert!(text(&o.stdout).contains("| FAIL |"));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(report["verdicts"].as_array().unwrap().len(), 4);

    // Recorded from a run, then judged with generous allowances: passes.
    let o = gate(&["--rate", "500", "--write-baseline"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mut recorded: Baseline = serde_json::from_str(&std::fs::read_to_string(&baseline).unwrap()).unwrap();
    assert_eq!(recorded.metrics.len(), 4);
    assert!(recorded.metrics.values().all(|m| m.ratio > 0.0 && m.ratio.is_finite()), "{recorded:?}");
    recorded.metrics.values_mut().for_each(|m| m.allowance = 1000.0);
    std::fs::write(&baseline, serde_json::to_string(&recorded).unwrap()).unwrap();
    let o = gate(&["--rate", "500"]);
    assert!(o.status.success(), "stdout:\n{}\nstderr:\n{}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stdout).contains("perf gate passed"));

    // A run at other parameters than the baseline's is refused, not misjudged.
    let o = gate(&["--rate", "900"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("was recorded at 500 commits/s"), "{}", text(&o.stderr));
}
