//! How appends wake the flusher (the flusher reads the flags; the node and the
//! request path only set them).

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A segment with at least this many unflushed bytes is flushed without waiting
/// for the rest of the flush interval: its flush is batched enough already.
pub const FLUSH_NOW_BYTES: usize = 256 << 10;

/// Wakes the flusher after appends. Every append wakes it: on the network thread that
/// costs a task poll, not a thread wake-up, and with an interval it reaps completions then.
#[derive(Default)]
pub struct Wake {
    pub(crate) notify: Notify,
    /// Records were appended since the flusher last started flushes.
    pub(crate) pending: AtomicBool,
    /// Set by `wake_for`: the next round starts flushes even within the interval.
    pub(crate) now: AtomicBool,
}

impl Wake {
    /// `wake` after an append that left `unflushed` bytes in its segment: with
    /// `FLUSH_NOW_BYTES` or more, the flush starts without waiting for the interval.
    pub fn wake_for(&self, unflushed: usize) {
        if unflushed >= FLUSH_NOW_BYTES {
            self.now.store(true, Ordering::Release);
        }
        self.wake();
    }

    pub fn wake(&self) {
        self.pending.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}
