//! `storaged serve --config FILE`: options from TOML, the command line wins.

mod common;

use borealis_net::storage::ClientError;
use common::*;
use redo_core::segment_file::{decode_header, SEGMENT_HEADER_BYTES};
use redo_core::wire::ErrorCode;
use redo_core::{Lsn, NodeId, PgId, SegmentId};

#[tokio::test]
async fn config_file_with_a_command_line_override() {
    let env = TestEnv::new();
    let config = env.path().join("storaged.toml");
    // Both key spellings; sizes as strings; lists as TOML arrays.
    let toml = format!(
        r#"
node_id = 1
pgs = [0, 1]
listen = "{{LISTEN}}"
data-dir = "{data}"
certs = "{certs}"
ack = "disk"
segment_prealloc_bytes = "2MiB"
"#,
        data = env.data_dir().display(),
        certs = env.certs.display(),
    );
    let launch = Launch {
        // The command line hosts pg 2 instead of the file's [0, 1].
        args: vec!["--config".into(), config.display().to_string(), "--pgs".into(), "2".into()],
        listen_flag: false,
        fsize_limit: None,
        config_file: Some((config.clone(), toml)),
    };
    let node = env.start(&launch).await;
    let log = node.log();
    assert!(log.contains("pgs=[2]"), "the command line's --pgs replaces the file's; log:\n{log}");
    assert!(log.contains(&format!("listen={}", node.addr)), "listen comes from the file; log:\n{log}");
    assert!(log.contains("ack=Disk"), "ack comes from the file; log:\n{log}");

    let ep = env.client();
    let conn = node.connect(&ep).await;
    let mut chain = Chain::new(2, 100);
    let b = chain.batch(5);
    let (pos, last) = append_once(&conn, 1, PgId(2), &b).await.expect("pg 2 is hosted");
    assert_eq!(last, b.last_lsn());
    assert!(pos.flushed_lsn >= last, "ack = \"disk\" from the file: acked before flushed: {pos:?}");
    for pg in [0, 1] {
        let mut c = Chain::new(pg, 100);
        match append_once(&conn, 1, PgId(pg), &c.batch(1)).await {
            Err(ClientError::Refused { code: ErrorCode::NotHosted, .. }) => {}
            other => panic!("pg {pg} from the file must not be hosted, got {other:?}"),
        }
        assert!(!env.segment_path(pg).exists(), "no segment file for pg {pg}");
    }

    // node_id and segment_prealloc_bytes from the file shape the segment file.
    let seg = std::fs::read(env.segment_path(2)).expect("pg-2.seg");
    assert_eq!(decode_header(&seg[..SEGMENT_HEADER_BYTES]).expect("segment header"), SegmentId { pg: PgId(2), node: NodeId(1) });
    assert_eq!(seg.len(), 2 << 20, "preallocated to the file's 2MiB");
    assert_eq!(position(&conn, 2).await.scl, b.last_lsn());
    assert_ne!(b.last_lsn(), Lsn::ZERO);
}

#[tokio::test]
async fn bad_config_file_is_a_clear_start_up_error() {
    let env = TestEnv::new();
    let config = env.path().join("bad.toml");
    std::fs::write(&config, "node_id = 1\npgs = [0, 1]\nack = true\n").expect("write config");
    let out = std::process::Command::new(STORAGED)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--data-dir", &env.data_dir().display().to_string(), "--certs", &env.certs.display().to_string()])
        .output()
        .expect("run storaged");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("ack"), "the error names the file and the key: {err}");
}
