//! Open-loop pacing: batches are due at fixed times whether or not earlier
//! ones were answered, and latency counts from when each was due.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// Due times queued per stream before the pacer blocks (the stream is far behind).
pub const TICKS_QUEUED_MAX: usize = 1 << 16;

/// Open-loop pacing on a thread of its own: tokio's timer ticks in whole
/// milliseconds, too coarse for sub-millisecond latencies, while a thread
/// sleep with 1 µs timer slack wakes within microseconds.
pub fn pace(start: Instant, interval: Duration, duration: Duration, ticks: Vec<mpsc::Sender<Instant>>) {
    // SAFETY: prctl on the calling thread with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1) };
    for seq in 0u32.. {
        let offset = interval * seq;
        if offset >= duration {
            return;
        }
        let due = start + offset;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        for t in &ticks {
            if t.blocking_send(due).is_err() {
                return;
            }
        }
    }
}
