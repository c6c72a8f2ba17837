//! Recovery tells a torn tail from damage inside the log.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use redo_core::{Epoch, PgId};

#[tokio::test]
async fn damage_inside_the_log_is_refused_not_truncated() {
    let env = TestEnv::new();
    let launch = env.launch(&[0], &["--frame-bytes-max", "64KiB", "--flush-bytes-max", "64KiB", "--ack", "disk"]);
    let mut node = env.start(&launch).await;
    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut chain = Chain::new(0, 500);
    let (mut tx, mut rx) = conn.open_append().await.expect("open stream");
    for _ in 0..100 {
        let b = chain.batch(20);
        tx.send(Epoch(1), PgId(0), &b.bytes).await.expect("send");
        timely("ack", rx.recv()).await.expect("ack");
    }
    assert!(node.terminate().success());

    // Flip one byte of the first record: about 1 MB of flushed log follows it.
    let file = std::fs::OpenOptions::new().read(true).write(true).open(env.segment_path(0)).expect("open segment");
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, 4096 + 20).expect("read");
    file.write_all_at(&[b[0] ^ 0x40], 4096 + 20).expect("write");
    drop(file);
    let size_before = std::fs::metadata(env.segment_path(0)).expect("stat").len();

    let out = std::process::Command::new(STORAGED)
        .arg("serve")
        .args(&launch.args)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .expect("run storaged");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "storaged must refuse to start: {err}");
    assert!(err.contains("refusing to truncate") && err.contains("offset 4096"), "{err}");

    // Nothing was zeroed: the records after the damage are still on disk.
    let file = std::fs::File::open(env.segment_path(0)).expect("open segment");
    let mut tail = vec![0u8; 4096];
    file.read_exact_at(&mut tail, 4096 + 500_000).expect("read");
    assert!(tail.iter().any(|&b| b != 0), "flushed records after the damage were kept");
    assert_eq!(std::fs::metadata(env.segment_path(0)).expect("stat").len(), size_before);
}
