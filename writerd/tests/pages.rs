//! The page size limit through the real binaries: a put that would grow a page
//! past the volume's `page_bytes_max` is refused with an error naming the page,
//! the size and the limit (at the API and at `loadgen put`); the writer goes on,
//! a page at the limit still takes overwrites and deletes, and a new writer,
//! which reads the page from storage, enforces the same limit.

use borealis_net::api::ApiError;
use redo_core::api::ApiErrorCode;
use redo_core::page::{entry_bytes, PAGE_HEADER_BYTES, VALUE_BYTES_MAX};
use test_support::*;

fn assert_page_full(r: Result<redo_core::Lsn, ApiError>, page: redo_core::PageId, bytes: usize, limit: usize) {
    match r {
        Err(ApiError::Refused { code: ApiErrorCode::Invalid, message }) => {
            for part in [format!("{page} to {bytes} bytes"), format!("page_bytes_max of {limit}"), "nothing was written".into()] {
                assert!(message.contains(&part), "{message:?} does not say {part:?}");
            }
        }
        other => panic!("a put past the page limit answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_past_the_page_limit_is_refused_and_the_writer_goes_on() {
    let (mut c, mut w, client) = cluster_with_writer(&[]).await;
    let limit = c.volume.page_bytes_max as usize;
    let page = c.volume.page_of(b"full-0");
    let keys: Vec<Vec<u8>> = (0..).map(|i| format!("full-{i}").into_bytes()).filter(|k| c.volume.page_of(k) == page).take(64).collect();
    let big = vec![b'v'; VALUE_BYTES_MAX];
    let entry = |k: &[u8]| entry_bytes(k.len(), big.len());

    // Fill the page with the largest values until the next one would not fit.
    let (mut size, mut n) = (PAGE_HEADER_BYTES, 0);
    while size + entry(&keys[n]) <= limit {
        client.put(&keys[n], &big).await.unwrap();
        size += entry(&keys[n]);
        n += 1;
    }
    assert!(n >= 10, "a page of {limit} bytes took only {n} values of {} bytes", big.len());
    assert_page_full(client.put(&keys[n], &big).await, page, size + entry(&keys[n]), limit);

    // The same through the CLI: the error on stderr, exit status 2.
    let args: Vec<String> = vec![
        "put".into(),
        String::from_utf8(keys[n].clone()).unwrap(),
        String::from_utf8(big.clone()).unwrap(),
        "--writer".into(),
        c.writer_addr().to_string(),
        "--certs".into(),
        c.certs.display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(bin("loadgen")).args(&args).output().expect("run loadgen")).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Invalid") && stderr.contains(&format!("page_bytes_max of {limit}")), "{stderr}");

    // The writer goes on, and nothing of the refused puts was written.
    client.put(b"elsewhere", b"v").await.unwrap();
    assert_eq!(client.get(b"elsewhere").await.unwrap().1.as_deref(), Some(&b"v"[..]));
    assert_eq!(client.get(&keys[n]).await.unwrap().1, None);
    // A page at the limit still takes what does not grow it, then the put that fits again.
    client.put(&keys[0], &big).await.unwrap();
    client.delete(&keys[1]).await.unwrap();
    client.put(&keys[n], &big).await.unwrap();
    size += entry(&keys[n]) - entry(&keys[1]);

    // A new writer knows no page: it reads this one, near the limit, from storage and sizes it exactly.
    client.close();
    assert_eq!(w.stop().await.code(), Some(0));
    let _w2 = c.start_writer(None, &[]).await;
    let client = c.client(c.writer_addr()).await;
    assert_page_full(client.put(&keys[n + 1], &big).await, page, size + entry(&keys[n + 1]), limit);
    assert_eq!(client.get(&keys[n]).await.unwrap().1, Some(big.clone()));
    client.put(&keys[n + 1], b"small").await.unwrap();
    assert_eq!(client.get(&keys[n + 1]).await.unwrap().1.as_deref(), Some(&b"small"[..]));
}
