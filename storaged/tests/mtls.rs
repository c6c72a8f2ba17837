//! Mutual TLS: only clients with a certificate from the cluster CA get in.

mod common;

use borealis_net::certs::ca_cert_path;
use borealis_net::storage::StorageConn;
use borealis_net::TlsIdentity;
use common::*;
use redo_core::PgId;

/// Connects and appends one batch: Ok only if the whole exchange succeeds.
async fn try_append(ep: &quinn::Endpoint, node: &Storaged, chain: &mut Chain) -> Result<(), String> {
    let conn = timely("connect", StorageConn::connect(ep, node.addr)).await.map_err(|e| format!("connect: {e}"))?;
    let batch = chain.batch(2);
    match append_once(&conn, 1, PgId(0), &batch).await {
        Ok((pos, last)) if last == batch.last_lsn() && pos.scl == last => Ok(()),
        Ok(other) => Err(format!("unexpected ack {other:?}")),
        Err(e) => {
            // Report the connection's close reason, which names the TLS alert.
            let reason = conn.conn.close_reason().map(|r| r.to_string()).unwrap_or_default();
            Err(format!("append: {e}; connection: {reason}"))
        }
    }
}

#[tokio::test]
async fn foreign_ca_client_is_refused_and_cluster_client_appends() {
    let env = TestEnv::new();
    let node = env.start(&env.launch(&[0], &[])).await;
    let mut chain = Chain::new(0, 64);

    // A second CA and a client certificate it signed.
    let foreign = env.path().join("foreign-certs");
    make_certs(&foreign, &["client"]);

    // The impostor trusts the cluster CA, so it accepts the server: any
    // refusal must come from the server rejecting its certificate.
    let impostor =
        TlsIdentity::from_files(&ca_cert_path(&env.certs), &foreign.join("client.pem"), &foreign.join("client.key")).expect("load impostor identity");
    let impostor_ep = borealis_net::client_endpoint(&impostor).expect("impostor endpoint");
    let err = try_append(&impostor_ep, &node, &mut chain).await.expect_err("a client from a foreign CA must be refused");
    assert!(err.contains("handshake failed"), "the server aborts the TLS handshake: {err}");
    let log = node.wait_log("refused connection", REPLY_TIMEOUT).await;
    assert!(log.lines().any(|l| l.contains("refused connection") && l.contains("certificate")), "the node logs why it refused the handshake; log:\n{log}");
    assert_eq!(common::position(&node.connect(&env.client()).await, 0).await.scl, redo_core::Lsn::ZERO, "the impostor's records never landed");

    // A client wholly from the foreign CA refuses the server in turn.
    let stranger = TlsIdentity::load(&foreign, "client").expect("load stranger identity");
    let stranger_ep = borealis_net::client_endpoint(&stranger).expect("stranger endpoint");
    let err = try_append(&stranger_ep, &node, &mut chain).await.expect_err("a client that does not trust the cluster CA cannot connect");
    assert!(err.contains("connect"), "the stranger fails at the handshake: {err}");

    // The cluster's own client gets in and appends.
    let mut good = Chain::new(0, 64);
    try_append(&env.client(), &node, &mut good).await.expect("a cluster client connects and appends");
}
