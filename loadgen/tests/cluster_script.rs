//! `scripts/cluster up` starts six storage nodes, a writerd and two replicas,
//! the loadgen client commits through the writer and reads its writes back
//! from the writer and from each replica, and `down` leaves no process behind.
//! Needs storaged, writerd and replicad built next to loadgen (`cargo build --release`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cluster");
const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");
/// A stopped process's pid disappears once its new parent reaps it.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);

fn bin_dir() -> &'static Path {
    Path::new(LOADGEN).parent().expect("binary directory")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn cluster(dir: &Path, args: &[&str]) -> Output {
    Command::new("bash").arg(SCRIPT).args(args).arg("--dir").arg(dir).env("BOREALIS_BIN", bin_dir()).output().expect("run scripts/cluster")
}

/// Runs `scripts/cluster down` however the test ends.
struct Cluster {
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        cluster(&self.dir, &["down"]);
    }
}

fn loadgen(dir: &Path, args: &[&str]) -> Output {
    Command::new(LOADGEN).args(args).arg("--volume").arg(dir.join("volume.toml")).arg("--certs").arg(dir.join("certs")).output().expect("run loadgen")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn committed_lsn(out: &Output) -> u64 {
    assert!(out.status.success(), "write failed: {}", text(out));
    stdout(out).parse().unwrap_or_else(|_| panic!("a write prints its commit LSN: {}", text(out)))
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn up_put_get_down() {
    for daemon in ["storaged", "writerd", "replicad"] {
        assert!(bin_dir().join(daemon).exists(), "{daemon} is not built next to loadgen: run cargo build --release first");
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().to_path_buf();
    let base = borealis_net::free_port().expect("free port") - 1;
    let guard = Cluster { dir: dir.clone() };
    let out = cluster(&dir, &["up", "--base-port", &base.to_string()]);
    assert!(out.status.success(), "up failed: {}", text(&out));
    let out = text(&out);
    let pids: Vec<i32> = out.lines().filter_map(|l| l.split("running pid ").nth(1)?.trim().parse().ok()).collect();
    assert_eq!(pids.len(), 9, "six storage nodes, writerd and two replicas: {out}");
    assert!(out.contains("writerd running pid") && out.contains("replicad-2 running pid"), "{out}");
    assert!(pids.iter().all(|&p| pid_alive(p)));
    let replicas: Vec<String> = std::fs::read_to_string(dir.join("replicas")).expect("up lists the replicas").lines().map(String::from).collect();
    assert_eq!(replicas, [format!("127.0.0.1:{}", base - 21), format!("127.0.0.1:{}", base - 22)]);

    let first = committed_lsn(&loadgen(&dir, &["put", "k1", "v1"]));
    let got = loadgen(&dir, &["get", "k1"]);
    assert!(got.status.success(), "{}", text(&got));
    assert_eq!(stdout(&got), "v1");
    // Read-your-writes on a replica: it answers once it has applied the commit LSN.
    let first_lsn = first.to_string();
    for replica in &replicas {
        let got = loadgen(&dir, &["get", "k1", "--replica", replica, "--min-lsn", &first_lsn]);
        assert!(got.status.success(), "{}", text(&got));
        assert_eq!(stdout(&got), "v1", "from {replica}");
    }
    let refused = loadgen(&dir, &["put", "k1", "v2", "--writer", &replicas[0]]);
    assert!(refused.status.code() == Some(2) && text(&refused).contains("Unavailable"), "a replica takes no writes: {}", text(&refused));

    let second = committed_lsn(&loadgen(&dir, &["txn", "put:k2=v=2", "del:k1"]));
    assert!(second > first, "LSNs increase: {first} then {second}");
    let gone = loadgen(&dir, &["get", "k1"]);
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone));
    assert_eq!(stdout(&gone), "(not found)");
    let gone = loadgen(&dir, &["get", "k1", "--replica", &replicas[1], "--min-lsn", &second.to_string()]);
    assert_eq!((gone.status.code(), stdout(&gone)), (Some(1), "(not found)".to_string()), "{}", text(&gone));
    assert_eq!(stdout(&loadgen(&dir, &["get", "k2"])), "v=2");
    assert!(committed_lsn(&loadgen(&dir, &["delete", "k2"])) > second);

    let bad = loadgen(&dir, &["put", &"k".repeat(2000), "v"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("keys are 1 to 1024 bytes"), "{}", text(&bad));

    let status = text(&cluster(&dir, &["status"]));
    assert!(status.contains("writerd running pid") && status.contains(&format!("127.0.0.1:{}", base - 10)), "{status}");
    assert!(status.contains(&format!("replicad-2 client API {}", replicas[1])), "{status}");

    drop(guard);
    let deadline = Instant::now() + GONE_TIMEOUT;
    while pids.iter().any(|&p| pid_alive(p)) {
        assert!(Instant::now() < deadline, "processes left after down: {:?}", pids.iter().filter(|&&p| pid_alive(p)).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(text(&cluster(&dir, &["status"])).contains("no cluster"));
}
