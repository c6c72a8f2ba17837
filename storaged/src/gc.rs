//! Reclaiming a segment's disk, after each interval round of its coalescer.
//! The core decides what may go (`PageIndex::retire`, `SegmentLog::reclaim_point`);
//! this executes it in an order a crash at any point survives:
//!
//! 1. A page file holding mostly dead images is copied, live images only, to
//!    its next generation (`PageFile::compact`); nothing refers to it yet.
//! 2. The checkpoint (`redo_core::checkpoint`) is written: the image index
//!    with the new offsets, the page file in use, the new log start and the
//!    GC horizon. From here on a restart reads only what it names.
//! 3. The segment switches to the new page file and log start in memory, the
//!    old page file is removed and the log's blocks below its start are freed
//!    (`store::punch_log`: the segment file keeps its size and offsets).
//!
//! Steps 2 and 3 hold the segment's `files` exclusively, so that no reader
//! holds an offset into the old page file or the freed log, and no truncation
//! rebuilds the index meanwhile.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use redo_core::checkpoint::Checkpoint;
use redo_core::page_index::Located;

use crate::node::{Node, Segment};
use crate::pages::{Compacted, PageFile};
use crate::server::blocking;
use crate::store;

pub async fn collect(node: &Node, seg: &Arc<Segment>) {
    if let Err(e) = reclaim(node, seg).await {
        tracing::error!(segment = %seg.id, error = %format!("{e:#}"), "reclaiming disk failed; retrying at the next round");
    }
}

async fn reclaim(node: &Node, seg: &Arc<Segment>) -> Result<()> {
    let (mut images, truncation) = {
        let mut log = seg.log.lock().expect("segment lock");
        let horizon = log.horizon();
        let truncation = log.last_truncation();
        let Some(index) = log.page_index_mut() else { return Ok(()) };
        index.retire(horizon);
        (index.images().map(|(_, at)| at).collect::<Vec<Located>>(), truncation)
    };
    let live = images.iter().map(|at| at.len as u64).sum();
    let compacted = match PageFile::worth_compacting(seg.page_file.end(), live, node.config.log_retain_bytes) {
        true => {
            images.sort_by_key(|at| at.offset);
            let seg2 = seg.clone();
            Some(blocking(move || seg2.page_file.compact(&images)).await.map_err(|e| anyhow!("compact the page file: {e}"))?)
        }
        false => None,
    };
    let files = seg.files.write().await;
    let planned = plan(node, seg, truncation, compacted.as_ref());
    let written = match planned {
        Ok(Some(checkpoint)) => {
            let (dir, c2) = (node.data_dir().clone(), checkpoint.clone());
            blocking(move || store::write_checkpoint(&dir, &c2)).await.map(|()| Some(checkpoint)).map_err(|e| anyhow!("write the checkpoint: {e}"))
        }
        other => other,
    };
    let checkpoint = match written {
        Ok(Some(checkpoint)) => checkpoint,
        other => {
            if let Some(c) = compacted {
                PageFile::discard(c);
            }
            return other.map(|_| ());
        }
    };
    node.metrics.checkpoints.fetch_add(1, Relaxed);
    if let Some(c) = compacted {
        seg.log.lock().expect("segment lock").page_index_mut().expect("checked by plan").relocate(|at| c.moved[&at.offset]);
        let (end, gen, before) = (c.end(), c.gen(), seg.page_file.end());
        seg.page_file.install(c)?;
        node.metrics.page_compactions.fetch_add(1, Relaxed);
        node.metrics.page_compacted_bytes.fetch_add(end, Relaxed);
        tracing::info!(segment = %seg.id, gen, bytes_before = before, bytes_after = end, "compacted the page file");
    }
    let old = seg.log.lock().expect("segment lock").log_start();
    if checkpoint.log_start != old {
        seg.log.lock().expect("segment lock").reclaim(checkpoint.log_start);
        drop(files);
        let (dir, pg, to) = (node.data_dir().clone(), seg.id.pg, checkpoint.log_start.offset);
        blocking(move || store::punch_log(&dir, pg, to)).await.map_err(|e| anyhow!("free the reclaimed log: {e}"))?;
        node.metrics.log_reclaimed_bytes.fetch_add(checkpoint.log_start.offset - old.offset, Relaxed);
        tracing::debug!(segment = %seg.id, offset = checkpoint.log_start.offset, reclaimed = %checkpoint.log_start.prev, "reclaimed the log");
    }
    Ok(())
}

/// The checkpoint to write, or `None` when there is nothing to do. `Err` when
/// a truncation rebuilt the page index since the images were listed.
fn plan(node: &Node, seg: &Segment, truncation: Option<redo_core::wire::Truncation>, compacted: Option<&Compacted>) -> Result<Option<Checkpoint>> {
    let log = seg.log.lock().expect("segment lock");
    if log.last_truncation() != truncation {
        bail!("a truncation rebuilt the page index meanwhile");
    }
    let index = log.page_index().expect("a segment with a page index");
    let point = log.reclaim_point(node.config.log_retain_bytes);
    if point.is_none() && compacted.is_none() {
        return Ok(None);
    }
    let moved = |at: Located| compacted.map_or(Some(at), |c| c.moved.get(&at.offset).map(|&offset| Located { offset, ..at }));
    let images = index.images().map(|(page, at)| moved(at).map(|at| (page, at))).collect::<Option<Vec<_>>>();
    let Some(images) = images else { bail!("an image the compaction did not copy") };
    Ok(Some(Checkpoint {
        pg: seg.id.pg,
        page_gen: compacted.map_or(seg.page_file.gen(), Compacted::gen),
        page_end: compacted.map_or(seg.page_file.end(), Compacted::end),
        log_start: point.unwrap_or(log.log_start()),
        horizon: log.horizon(),
        images,
    }))
}
