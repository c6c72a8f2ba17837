//! The coalescer: one task per segment that materialises page images and
//! appends them to the segment's page file, so that GetPage starts from a
//! recent image and the log below the images can be reclaimed (`gc`, after
//! each interval round). A page is imaged as soon as the flushed LSN covers
//! the record that made it due (`PageIndex::take_due`); every
//! `--coalesce-interval-ms`, also the pages whose records pin the log
//! (`PageIndex::pinning_pages`). Images are taken at the flushed LSN: an image must never hold a record
//! that a crash could lose. A round's pages are materialised on a thread at
//! nice 10, and each segment's interval starts at a random point, so that
//! rounds neither delay the commit path nor coincide across segments and nodes.

use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Result;
use redo_core::page_index::{encode_image_entry, Located, PageBroken};
use redo_core::segment_log::PageRead;
use redo_core::{Lsn, PageId};
use tokio::time::MissedTickBehavior;

use crate::node::{Node, Segment};
use crate::pages::{self, PageError};

/// Pages whose reads are planned per hold of the segment lock.
const PAGES_PER_LOCK: usize = 32;

pub async fn run(node: Arc<Node>, seg: Arc<Segment>) {
    // Every segment of every node starts its clock at a random point of the interval:
    // rounds started together (a cluster started at once) would take the CPU together.
    let period = Duration::from_millis(node.config.coalesce_interval_ms);
    let phase = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), ()) % 1024;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period * phase as u32 / 1024, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut flushes = seg.flushes.subscribe();
    loop {
        let interval_round = tokio::select! {
            _ = tick.tick() => true,
            changed = flushes.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
        };
        if node.is_shutting_down() {
            return;
        }
        // A truncation waits for the round and holds the next one off.
        let files = seg.files.read().await;
        let (upto, due) = {
            let mut log = seg.log.lock().expect("segment lock");
            let (upto, pin) = (log.flushed_lsn(), log.pin_lsn(node.config.log_retain_bytes));
            // None after a truncation that could not rebuild it (the disk failed).
            let Some(index) = log.page_index_mut() else { continue };
            let mut due = index.take_due(upto);
            if interval_round {
                let pinning: Vec<PageId> = index.pinning_pages(pin, upto).into_iter().filter(|p| !due.contains(p)).collect();
                due.extend(pinning);
            }
            (upto, due)
        };
        coalesce(&node, &seg, upto, &due).await;
        drop(files);
        if interval_round {
            crate::gc::collect(&node, &seg).await;
        }
    }
}

/// Images `due` as of `upto` and notes the images in the page index.
async fn coalesce(node: &Node, seg: &Arc<Segment>, upto: Lsn, due: &[PageId]) {
    // A few pages per lock hold: appends wait on this lock, and a round may cover thousands of pages.
    let mut reads: Vec<(PageId, PageRead)> = Vec::with_capacity(due.len());
    for chunk in due.chunks(PAGES_PER_LOCK) {
        let log = seg.log.lock().expect("segment lock");
        reads.extend(chunk.iter().filter_map(|&page| log.page_read(page, upto).ok().map(|r| (page, r))));
    }
    if reads.is_empty() {
        return;
    }
    let seg2 = seg.clone();
    let written = match in_background(move || write_images(&seg2, reads)).await {
        Ok(w) => w,
        Err(e) => Err(anyhow::anyhow!("coalescer thread: {e}")),
    };
    let Written { images, broken, bytes } = match written {
        Ok(w) => w,
        Err(e) => {
            // Nothing was noted: the same pages are retried at the next round.
            tracing::error!(segment = %seg.id, error = %format!("{e:#}"), "coalescing page images failed");
            return;
        }
    };
    let mut log = seg.log.lock().expect("segment lock");
    let Some(index) = log.page_index_mut() else { return };
    for (page, at) in &images {
        if let Err(e) = index.note_image(*page, *at) {
            tracing::error!(segment = %seg.id, error = %e, "coalescer wrote an image the index refuses");
        }
    }
    if let Some(first) = broken.first() {
        // One line per round: a log of foreign payloads (benchmarks) breaks every page.
        tracing::warn!(segment = %seg.id, pages = broken.len(), first = %first,
            "pages cannot be materialised; GetPage at or past the failing record is refused");
    }
    broken.into_iter().for_each(|b| index.note_broken(b));
    drop(log);
    node.metrics.pages_coalesced.fetch_add(images.len() as u64, Ordering::Relaxed);
    node.metrics.page_image_bytes.fetch_add(bytes, Ordering::Relaxed);
    tracing::debug!(segment = %seg.id, %upto, pages = images.len(), bytes, "coalesced page images");
}

/// A round waiting for the background thread; each segment has at most one.
type Round = Box<dyn FnOnce() + Send>;

/// Rounds queued for the background thread at once: more than a node has segments,
/// and each segment's task waits for its round before it queues the next.
const ROUNDS_QUEUED_MAX: usize = 1024;

/// Runs `f` on the node's background thread at nice 10: materialising a round's pages
/// takes milliseconds of CPU that appends, acks and pulls must not wait behind. One
/// thread for every round (started once: a thread per round cost its start and its
/// stack's page faults every second per segment).
async fn in_background<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    static BACKGROUND: OnceLock<SyncSender<Round>> = OnceLock::new();
    let queue = BACKGROUND.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Round>(ROUNDS_QUEUED_MAX);
        std::thread::Builder::new()
            .name("coalescer".into())
            .spawn(move || {
                crate::background_priority();
                rx.into_iter().for_each(|round| round());
            })
            .expect("start the coalescer thread");
        tx
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    queue
        .send(Box::new(move || {
            let _ = tx.send(f());
        }))
        .map_err(|_| anyhow::anyhow!("the coalescer thread is gone"))?;
    Ok(rx.await?)
}

struct Written {
    images: Vec<(PageId, Located)>,
    broken: Vec<PageBroken>,
    bytes: u64,
}

/// Materialises each page, then appends all images with one write and fsync.
/// A page whose records stop applying is imaged up to the record before.
fn write_images(seg: &Segment, reads: Vec<(PageId, PageRead)>) -> Result<Written> {
    let mut buf = Vec::new();
    let mut placed = Vec::new();
    let mut broken = Vec::new();
    for (page, read) in reads {
        let image = match pages::materialise(&seg.page_file, &seg.reader, page, &read) {
            Ok(image) => image,
            Err(PageError::Broken(b, image)) => {
                broken.push(b);
                image
            }
            Err(PageError::Io(e)) => return Err(e),
        };
        if image.lsn <= pages::base_lsn(&read) {
            continue;
        }
        let start = buf.len();
        match encode_image_entry(&image, &mut buf) {
            Ok(()) => placed.push((page, image.lsn, start, buf.len() - start)),
            Err(e) => tracing::warn!(segment = %seg.id, error = %e, "page not coalesced"),
        }
    }
    if buf.is_empty() {
        return Ok(Written { images: vec![], broken, bytes: 0 });
    }
    let at = seg.page_file.append(&buf)?;
    let images = placed.into_iter().map(|(page, lsn, start, len)| (page, Located { lsn, offset: at + start as u64, len: len as u32 })).collect();
    Ok(Written { images, broken, bytes: buf.len() as u64 })
}
