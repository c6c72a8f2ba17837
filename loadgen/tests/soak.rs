//! `loadgen soak` through the real binaries, briefly: restarts measured, a disk
//! sample per node per second, write amplification, and every process it
//! started stopped at the end. Needs storaged and writerd built next to loadgen
//! (`cargo build --profile release-checked --workspace`).

use std::path::Path;
use std::process::Command;

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");
const DURATION_S: usize = 20;

/// Processes whose command line mentions `path` (the cluster's daemons name their data dirs under it).
fn processes_using(path: &Path) -> Vec<String> {
    let needle = path.to_str().unwrap().as_bytes();
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()) && n != me))
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            cmdline.windows(needle.len()).any(|w| w == needle).then(|| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect()
}

#[test]
fn soak_measures_restarts_disk_and_writes_and_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (out, work) = (dir.path().join("out"), dir.path().join("work"));
    let o = Command::new(LOADGEN)
        .args(["soak", "--duration", &format!("{DURATION_S}s"), "--restart-every", "7s", "--rate", "300", "--value-bytes", "1024", "--keys", "500"])
        .args(["--log-retain-bytes", "1MiB"])
        .arg("--out")
        .arg(&out)
        .arg("--work-dir")
        .arg(&work)
        .output()
        .expect("run loadgen");
    let text = format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    let left = processes_using(&work);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    // Each node's last storaged stopped on SIGTERM, flushing, rather than being killed.
    for node in 1..=6 {
        let last = (1..).map(|start| if start == 1 { format!("storaged-{node}.log") } else { format!("storaged-{node}.{start}.log") });
        let last = last.take_while(|name| work.join("cluster").join(name).exists()).last().expect("a log per node");
        let log = std::fs::read_to_string(work.join("cluster").join(&last)).unwrap();
        assert!(log.contains("SIGTERM: flushing and shutting down"), "{last}:\n{log}");
    }

    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in [
        "disk_bytes_max_per_node",
        "live_bytes",
        "hot_log_budget_bytes",
        "restart_ms_first",
        "restart_ms_last",
        "write_amplification",
        "rate",
        "value_bytes",
        "keys",
        "duration_s",
        "restart_every_s",
        "log_retain_bytes",
        "acked_commits",
        "commits_per_s",
        "commit_latency_us_p50",
        "commit_latency_us_p99",
        "restarts",
        "disk_series",
        "verdict",
    ] {
        assert!(s.get(key).is_some_and(|v| !v.is_null()), "summary lacks {key}: {s}");
    }
    for target in ["disk_bounded", "disk_flat", "restart_not_slower", "write_amplification"] {
        assert!(s["verdict"][target]["met"].is_boolean(), "verdict.{target}: {}", s["verdict"]);
    }
    assert_eq!(s["duration_s"], 20.0);
    assert!(s["stopped_early"].is_null(), "{}", s["stopped_early"]);
    assert_eq!(s["log_retain_bytes"], 1 << 20);
    assert_eq!(s["hot_log_budget_bytes"], 2 << 20, "1 MiB for each of the 2 segments of a node");
    let restarts = s["restarts"].as_array().unwrap();
    assert!(restarts.len() >= 2, "{restarts:?}");
    for (i, r) in restarts.iter().enumerate() {
        assert_eq!(r["node"], i + 1, "round robin from node 1");
        assert!(r["restart_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(s["acked_commits"].as_u64().unwrap() > 0);
    assert!(s["write_amplification"].as_f64().unwrap() > 0.0);
    // 500 keys of 12 bytes with 1 KiB values, nearly all written in 20 s at 300 puts/s.
    let live = s["live_bytes"].as_u64().unwrap();
    assert!((400 * 1036..=500 * 1036).contains(&live), "live_bytes {live}");
    let series = s["disk_series"].as_array().unwrap();
    assert_eq!(series.len(), 6);
    for n in series {
        let t: Vec<f64> = n["t_s"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
        assert!((DURATION_S - 1..=DURATION_S + 3).contains(&t.len()), "{} samples of node {}: {t:?}", t.len(), n["node"]);
        assert!(t.windows(2).all(|w| w[1] - w[0] <= 1.5), "a sample a second: {t:?}");
        let disk = n["disk_bytes"].as_array().unwrap();
        assert_eq!(disk.len(), t.len());
        assert!(disk.iter().all(|b| b.as_u64().unwrap() > 0), "node {} has data on disk", n["node"]);
    }
    for svg in ["disk-bytes.svg", "restart-ms.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).unwrap();
        assert!(text.contains("<svg"), "{svg}");
    }
    assert!(std::fs::read_to_string(out.join("disk-bytes.svg")).unwrap().contains("restart n2"));
    assert!(String::from_utf8_lossy(&o.stdout).contains("write_amplification"), "{text}");
}
