//! PostgreSQL as a target, through the real loadgen binary: `pg-bench` starts a
//! primary and a synchronous standby and measures commits and standby lag;
//! `pg-failover` kills the primary under load and loses no acknowledged write;
//! an interrupted run leaves no PostgreSQL process behind.
//! Needs PostgreSQL 15's server binaries (Debian: postgresql-15); skipped, saying so, without them.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use loadgen::postgres::{mapped_shm_segments, DEFAULT_PG_BIN, SHM_SEGMENT_PREFIX};
use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

/// One PostgreSQL pair at a time: the machine has 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// PostgreSQL's bin directory, or None (and a message) when it is not installed.
fn pg_bin(test: &str) -> Option<PathBuf> {
    let bin = std::env::var_os("BOREALIS_PG_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN));
    if bin.join("postgres").exists() && bin.join("initdb").exists() && bin.join("pg_basebackup").exists() {
        Some(bin)
    } else {
        // Straight to stderr: the test harness captures println!/eprintln! of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: PostgreSQL 15 server binaries not found in {} (apt-get install postgresql-15, or set BOREALIS_PG_BIN)",
            bin.display()
        );
        None
    }
}

/// A temp dir the `postgres` user can reach (tempfile makes it 0700).
fn work_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn loadgen(args: &[&str], bin: &Path) {
    let out = Command::new(LOADGEN).args(args).env("BOREALIS_PG_BIN", bin).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "loadgen {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    println!("{stdout}");
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The processes working under `dir`: PostgreSQL's servers run in their data directories, and every
/// process of a server (each in a process group of its own) inherits the postmaster's.
fn processes_under(dir: &Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir)))
        .collect()
}

/// Fails, naming them, if processes still work under `work`.
fn assert_none_under(work: &Path) {
    let left: Vec<String> = processes_under(work)
        .into_iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| String::from_utf8_lossy(&c).replace('\0', " ")).unwrap_or_default();
            format!("{pid} [{cmdline}] {stat}")
        })
        .collect();
    assert!(left.is_empty(), "processes still run under {}:\n{}", work.display(), left.join("\n"));
}

fn assert_stopped(work: &Path, pgids: &Value) {
    assert!(!pgids.as_array().expect("postgres_pgids").is_empty(), "the run started PostgreSQL");
    assert_none_under(work);
}

#[test]
fn pg_bench_measures_commits_and_standby_lag() {
    let Some(bin) = pg_bin("pg_bench_measures_commits_and_standby_lag") else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = work_dir();
    let out = dir.path().join("out");
    let work = dir.path().join("work");
    loadgen(
        &[
            "pg-bench",
            "--synchronous-commit",
            "on",
            "--rates",
            "500",
            "--seconds",
            "1",
            "--warmup-seconds",
            "0.5",
            "--runs",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--work-dir",
            work.to_str().unwrap(),
        ],
        &bin,
    );
    let summary = read_json(&out.join("summary.json"));
    let point = &summary["points"][0];
    assert_eq!(point["system"], "postgres");
    assert_eq!(point["durability"], "on");
    assert!(point["commit_latency_us"]["count"].as_f64().unwrap() > 300.0, "{point}");
    assert!(point["throughput_commits_per_s"].as_f64().unwrap() > 400.0, "{point}");
    assert_eq!(point["errors"], 0, "{point}");
    let lag = &point["replica_lag_us"];
    assert!(lag["count"].as_f64().unwrap() > 300.0, "every commit has a standby lag: {point}");
    assert_eq!(point["replica_lag_unseen"], 0, "{point}");
    assert!(out.join(point["hgrm"].as_str().unwrap()).exists());
    assert!(out.join(point["replica_lag_hgrm"].as_str().unwrap()).exists());
    assert_stopped(&work, &summary["postgres_pgids"]);
}

#[test]
fn pg_failover_loses_no_acknowledged_write_with_a_synchronous_standby() {
    let Some(bin) = pg_bin("pg_failover_loses_no_acknowledged_write_with_a_synchronous_standby") else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = work_dir();
    let json = dir.path().join("failover.json");
    let work = dir.path().join("work");
    let segments_before = shm_segments();
    loadgen(
        &["pg-failover", "--runs", "1", "--warmup-seconds", "1", "--seconds", "1.5", "--json", json.to_str().unwrap(), "--work-dir", work.to_str().unwrap()],
        &bin,
    );
    let summary = read_json(&json);
    let run = &summary["runs"][0];
    assert_eq!(summary["lost_acked_writes"], 0, "{run}");
    assert_eq!(run["torn_writes"], 0, "{run}");
    assert!(run["acked_before_kill"].as_u64().unwrap() > 500, "{run}");
    assert!(run["acked_writes"].as_u64().unwrap() > run["acked_before_kill"].as_u64().unwrap(), "the promoted standby acknowledged commits: {run}");
    assert!(run["failover_ms"].as_f64().unwrap() > 0.0, "{run}");
    assert_stopped(&work, &run["postgres_pgids"]);
    // The killed primary's shared memory is gone too (anything new is some live server's).
    let all: Vec<i32> = std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    let mapped = mapped_shm_segments(&all);
    let left: Vec<_> = shm_segments().into_iter().filter(|s| !segments_before.contains(s) && !mapped.contains(s)).collect();
    assert!(left.is_empty(), "the run left PostgreSQL shared memory segments behind: {left:?}");
}

/// PostgreSQL's dynamic shared memory segments in /dev/shm.
fn shm_segments() -> Vec<PathBuf> {
    std::fs::read_dir("/dev/shm")
        .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.to_str().is_some_and(|p| p.starts_with(SHM_SEGMENT_PREFIX))).collect())
        .unwrap_or_default()
}

/// The pids of postmasters whose command line names `dir` (`.../postgres -D DIR/...`; not pg_basebackup's `-D`).
fn postmasters_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_str().unwrap().as_bytes();
    let is_postgres = |c: &[u8]| c.split(|&b| b == 0).next().is_some_and(|program| program.ends_with(b"/postgres"));
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| is_postgres(&c) && c.windows(needle.len()).any(|w| w == needle) && c.windows(3).any(|w| w == b"-D\0"))
        })
        .collect()
}

#[test]
fn an_interrupted_run_leaves_no_postgres_process() {
    let Some(bin) = pg_bin("an_interrupted_run_leaves_no_postgres_process") else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = work_dir();
    let work = dir.path().join("work");
    let mut child = Command::new(LOADGEN)
        .args(["pg-bench", "--synchronous-commit", "local", "--rates", "200", "--seconds", "30", "--runs", "1", "--out"])
        .arg(dir.path().join("out"))
        .arg("--work-dir")
        .arg(&work)
        .env("BOREALIS_PG_BIN", &bin)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Both servers up (the standby is the second postmaster), then a moment of load.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if postmasters_under(&work).len() == 2 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "loadgen exited before starting both servers");
        assert!(Instant::now() < deadline, "PostgreSQL did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(!status.success(), "interrupted: {status}");
    assert_none_under(&work);
}

/// The targets, in order, for the rates 1,000 and 4,000 commits/s.
const TARGETS: [&str; 9] = [
    "cpu_per_commit_1000",
    "cpu_per_commit_4000",
    "gray_failure_one",
    "gray_failure_two",
    "saturation",
    "commit_p99_1000",
    "commit_p99_4000",
    "lag_p99_1000",
    "lag_p99_4000",
];

#[test]
fn compare_postgres_writes_every_target() {
    let Some(bin) = pg_bin("compare_postgres_writes_every_target") else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = work_dir();
    let out = dir.path().join("out");
    let work = dir.path().join("work");
    // Every section at its smallest: one run of 1 s per point, the rows the targets need, a one-step saturation
    // ladder with a latency bound that a loaded machine meets too (the test checks the plumbing, not the systems).
    loadgen(
        &[
            "compare-postgres",
            "--runs",
            "1",
            "--seconds",
            "1",
            "--warmup-seconds",
            "0.5",
            "--borealis-ack",
            "memory",
            "--synchronous-commit",
            "local,on",
            "--saturation-start",
            "500",
            "--saturation-max",
            "500",
            "--saturation-seconds",
            "1",
            "--saturation-warmup-seconds",
            "0.5",
            "--saturation-p99-ms",
            "1000",
            "--pg-saturation-connections",
            "8",
            "--failover-runs",
            "0",
            "--out",
            out.to_str().unwrap(),
            "--work-dir",
            work.to_str().unwrap(),
        ],
        &bin,
    );
    let targets = read_json(&out.join("targets.json"));
    let names: Vec<&str> = targets.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, TARGETS);
    for t in targets.as_array().unwrap() {
        for field in ["borealis", "postgres", "ratio"] {
            assert!(t[field].as_f64().is_some_and(|v| v > 0.0), "{field} of {t}");
        }
        assert!(t["goal"].as_str().unwrap().starts_with(['<', '>']), "{t}");
        assert!(t["met"].is_boolean(), "{t}");
    }
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["targets"], targets);
    for p in summary["cpu_points"].as_array().unwrap() {
        assert!(p["point"]["server_cpu_us_per_commit"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["point"]["replica_lag_us"].is_null(), "no lag probe in the CPU pass: {p}");
    }
    let paused: Vec<u64> = summary["gray_failure_points"].as_array().unwrap().iter().map(|p| p["paused"].as_u64().unwrap()).collect();
    assert_eq!(paused, [1, 1, 2, 2]);
    assert_eq!(summary["saturation"].as_array().unwrap().len(), 4, "Borealis disk and memory, PostgreSQL on and local at 8 sessions");
    let md = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    for heading in ["## Targets (issue 16)", "## Server CPU per commit", "## Gray failure", "## Saturation", "ANY 1 (s1, s2)"] {
        assert!(md.contains(heading), "comparison.md lacks {heading:?}");
    }
    assert_stopped(&work, &summary["postgres_pgids"]);
}
