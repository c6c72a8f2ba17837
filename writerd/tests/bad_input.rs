//! Bad client input against the real writer: each gets a clear error, nothing
//! is half-written, and well-behaved clients keep being served.

mod common;

use borealis_net::api::{ApiClient, ApiError};
use common::*;
use redo_core::api::{ApiErrorCode, Request, Response, TXN_OPS_MAX};
use redo_core::page::{PageOp, KEY_BYTES_MAX, VALUE_BYTES_MAX};

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
    let mut c = Cluster::start(&[]).await;
    let _w = c.start_writer(None, &[]).await;
    let client = c.client(c.writer_addr()).await;

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

    // An unknown operation breaks the framing: Malformed, and that stream closes.
    let mut frame = Vec::new();
    Request::Txn(vec![put(b"x", b"v")]).encode(77, &mut frame);
    frame[4 + 1 + 8 + 4] = 9;
    let bad = c.client(c.writer_addr()).await;
    match bad.call_raw(77, frame).await {
        Err(ApiError::Lost(message)) => assert!(message.contains("Malformed") && message.contains("operation"), "{message}"),
        other => panic!("expected Malformed, got {other:?}"),
    }
    assert!(bad.get(b"good").await.is_err(), "the refused stream is closed");

    // A frame beyond the request limit: TooLarge, before the writer buffers it.
    let huge = c.client(c.writer_addr()).await;
    let mut frame = ((64u32 << 20) as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&[1; 64]);
    match huge.call_raw(1, frame).await {
        Err(ApiError::Lost(message)) if message.contains("TooLarge") => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }

    // Garbage bytes.
    let junk = c.client(c.writer_addr()).await;
    match junk.call_raw(1, vec![9, 0, 0, 0, 42, 1, 2, 3, 4, 5, 6, 7, 8]).await {
        Err(ApiError::Lost(message)) if message.contains("Malformed") => {}
        other => panic!("expected Malformed, got {other:?}"),
    }

    // A client whose certificate is not from the cluster CA is refused.
    let foreign = c.dir.path().join("foreign");
    borealis_net::certs::generate(&foreign, &["client".to_string()]).unwrap();
    let id = borealis_net::TlsIdentity::load(&foreign, "client").unwrap();
    let ep = borealis_net::client_endpoint(&id).unwrap();
    let outsider = match ApiClient::connect(&ep, c.writer_addr()).await {
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
