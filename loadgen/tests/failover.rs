//! Failover through the real binaries: a `ClusterClient` keeps committing
//! while writerd is killed and started again, and `loadgen failover` (writerd
//! killed under load, a replica promoted) loses no acknowledged write.
//! Needs storaged, writerd and replicad built next to loadgen (`cargo build --release`).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use borealis_net::api::{ClusterClient, FailoverConfig};
use loadgen::cluster::{ClusterSpec, LocalCluster};

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

/// The daemons next to the loadgen binary, for `LocalCluster` in this test process.
fn use_built_binaries() {
    let dir = Path::new(LOADGEN).parent().expect("binary directory");
    for (name, var) in [("storaged", "BOREALIS_STORAGED"), ("writerd", "BOREALIS_WRITERD"), ("replicad", "BOREALIS_REPLICAD")] {
        // SAFETY: set before any thread of this test reads the environment.
        unsafe { std::env::set_var(var, dir.join(name)) };
    }
}

/// Commits from three tasks while writerd is SIGKILLed and a new one started on
/// its address: commits resume without a caller seeing an error, and every
/// acknowledged one reads back from the new writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_follows_a_restarted_writer() {
    use_built_binaries();
    let dir = tempfile::tempdir().unwrap();
    let spec = ClusterSpec { pgs: 2, page_count: 1024, replicas: 0, storaged_args: &[], writerd_args: &[], replicad_args: &[] };
    let mut cluster = LocalCluster::start(dir.path(), &spec).await.unwrap();
    let endpoint = borealis_net::client_endpoint(&cluster.storage.identity().unwrap()).unwrap();
    let config = FailoverConfig { deadline: Duration::from_secs(30), ..FailoverConfig::default() };
    let client = ClusterClient::connect(&endpoint, &cluster.api_addrs(), config).await.unwrap();
    let first = client.writer().unwrap();
    assert_eq!(first.addr, cluster.writer_addr);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for task in 0..3 {
        let (client, stop, acked) = (client.clone(), stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("restart-{task}-{i}");
                let c = client.put(key.as_bytes(), key.as_bytes()).await.unwrap_or_else(|e| panic!("{key}: {e}"));
                acked.lock().unwrap().push((key, c.writer.epoch));
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill_writer();
    cluster.restart_writer(&[]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let now = client.writer().unwrap();
    assert_eq!(now.addr, cluster.writer_addr);
    assert!(now.epoch > first.epoch, "the restarted writer recovered into a new epoch: {:?} then {:?}", first, now);
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.iter().any(|(_, e)| *e == first.epoch), "commits before the kill");
    assert!(acked.iter().any(|(_, e)| *e == now.epoch), "commits after the restart");
    for (key, _) in &acked {
        let (_, value) = client.get(key.as_bytes()).await.unwrap();
        assert_eq!(value.as_deref(), Some(key.as_bytes()), "acknowledged {key} is lost");
    }
    client.close();
    cluster.stop().unwrap();
}

/// Runs `loadgen failover --runs 1` in `mode` and checks its JSON.
fn failover_run(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("failover.json");
    let out = Command::new(LOADGEN)
        .args(["failover", "--runs", "1", "--promote", mode, "--rate", "1000", "--warmup-seconds", "1", "--seconds", "2"])
        .arg("--json")
        .arg(&json)
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .output()
        .expect("run loadgen");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "loadgen failover --promote {mode} failed:\n{text}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["lost_acked_writes"], 0, "{text}");
    assert_eq!(v["summary"]["torn_writes"], 0, "{text}");
    let failover_ms = v["failover_ms"].as_f64().unwrap_or_else(|| panic!("failover_ms is a number: {text}"));
    assert!(failover_ms.is_finite() && failover_ms > 0.0 && failover_ms < 5000.0, "failover_ms {failover_ms}: {text}");
    let run = &v["runs"][0];
    assert!(run["acked_before_kill"].as_u64().unwrap() > 0, "{text}");
    assert!(run["new_epoch"].as_u64().unwrap() > run["old_epoch"].as_u64().unwrap(), "{text}");
    assert_ne!(run["new_writer"], run["old_writer"], "{text}");
}

#[test]
fn loadgen_failover_auto_loses_no_acknowledged_write() {
    failover_run("auto");
}

#[test]
fn loadgen_failover_now_loses_no_acknowledged_write() {
    failover_run("now");
}
