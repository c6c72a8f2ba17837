//! `scripts/cluster` starts a local storage cluster, reports it, and stops
//! exactly the processes it started.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cluster");

fn cluster(dir: &Path, args: &[&str]) -> (bool, String) {
    let bin = Path::new(STORAGED).parent().expect("binary directory");
    let out = Command::new("bash").arg(SCRIPT).args(args).arg("--dir").arg(dir).env("BOREALIS_BIN", bin).output().expect("run scripts/cluster");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[tokio::test]
async fn up_status_down() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = (free_port() - 1).to_string();
    let (ok, out) = cluster(dir.path(), &["up", "--nodes", "3", "--base-port", &base]);
    assert!(ok, "up failed: {out}");
    let pids: Vec<i32> = out.lines().filter_map(|l| l.split("running pid ").nth(1)?.trim().parse().ok()).collect();
    assert_eq!(pids.len(), 3, "{out}");
    assert!(pids.iter().all(|&p| pid_alive(p)));

    // A cluster client (certificate from the script's CA) is served by node 1.
    let identity = borealis_net::TlsIdentity::load(&dir.path().join("certs"), "client").expect("client certificate");
    let ep = borealis_net::client_endpoint(&identity).expect("client endpoint");
    let addr = format!("127.0.0.1:{}", base.parse::<u16>().unwrap() + 1).parse().unwrap();
    let conn = borealis_net::storage::StorageConn::connect(&ep, addr).await.expect("connect to storaged-1");
    let pulled = conn.pull(redo_core::PgId(0), redo_core::Lsn::ZERO, redo_core::Lsn(10), 4096).await.expect("pull");
    assert_eq!(pulled.position.scl, redo_core::Lsn::ZERO);

    let (ok, out) = cluster(dir.path(), &["up", "--nodes", "3", "--base-port", &base]);
    assert!(!ok && out.contains("already running"), "a second up is refused: {out}");

    let (ok, out) = cluster(dir.path(), &["down"]);
    assert!(ok, "down failed: {out}");
    assert!(pids.iter().all(|&p| !pid_alive(p)), "every started process is gone");
    let (_, out) = cluster(dir.path(), &["status"]);
    assert!(out.contains("no cluster"), "{out}");
}
