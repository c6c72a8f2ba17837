//! Bad client input against the real writer: each gets a clear error, nothing
//! is half-written, and well-behaved clients keep being served.

use borealis_net::api::ApiClient;
use redo_core::api::{ApiErrorCode, Request, Response, TXN_OPS_MAX};
use redo_core::page::{PageOp, KEY_BYTES_MAX, VALUE_BYTES_MAX};
use redo_core::Lsn;
use test_support::*;

fn put(k: &[u8], v: &[u8]) -> PageOp {
    PageOp::Put { key: k.to_vec(), value: v.to_vec() }
}

async fn refused(client: &ApiClient, req: Request) -> (ApiErrorCode, String) {
    match client.call(&req).await {
        Ok(Response::Error { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_write_nothing() {
    let (c, _w, client) = cluster_with_writer(&[]).await;

    let (code, msg) = refused(&client, Request::Get { key: vec![b'k'; KEY_BYTES_MAX + 1], min_lsn: Lsn::ZERO }).await;
    assert_eq!(code, ApiErrorCode::Invalid);
    assert!(msg.contains(&format!("key of {} bytes", KEY_BYTES_MAX + 1)), "{msg}");
    // One bad operation refuses the whole transaction: the good one is not written either.
    let (code, msg) = refused(&client, Request::Txn(vec![put(b"good", b"v"), put(b"big", &vec![0; VALUE_BYTES_MAX + 1])])).await;
    assert_eq!(code, ApiErrorCode::Invalid);
    assert!(msg.contains("value of"), "{msg}");
    assert_eq!(refused(&client, Request::Txn(vec![])).await.0, ApiErrorCode::Invalid);
    let many = (0..=TXN_OPS_MAX).map(|i| put(format!("k{i}").as_bytes(), b"v")).collect();
    assert_eq!(refused(&client, Request::Txn(many)).await.0, ApiErrorCode::Invalid);
    assert_eq!(refused(&client, Request::Txn(vec![put(b"", b"v")])).await.0, ApiErrorCode::Invalid);
    // The stream survived every refusal, and nothing was written.
    assert_eq!(client.get(b"good").await.unwrap().1, None);
    client.put(b"good", b"after").await.unwrap();

    // Frames that break the framing close their own stream only.
    assert_bad_frames_refused(&c, c.writer_addr()).await;

    // A client whose certificate is not from the cluster CA is refused.
    let outsider = match ApiClient::connect(&foreign_endpoint(&c), c.writer_addr()).await {
        Err(_) => None,
        Ok(cl) => Some(cl.put(b"intruder", b"v").await),
    };
    assert!(outsider.as_ref().is_none_or(|r| r.is_err()), "a client without a cluster certificate was served: {outsider:?}");

    // Everyone else is still served, and nothing from the bad requests is visible.
    client.put(b"still", b"served").await.unwrap();
    assert_eq!(client.get(b"good").await.unwrap().1.as_deref(), Some(&b"after"[..]));
    assert_eq!(client.get(b"x").await.unwrap().1, None);
    assert_eq!(client.get(b"intruder").await.unwrap().1, None);
}
