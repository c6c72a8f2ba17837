//! Which segment to ask first: each PG's request latency per segment, and how
//! long to wait for each before the next is tried.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use borealis_net::storage::REQUEST_TIMEOUT;
use redo_core::quorum::SEGMENTS_PER_PG;

/// Bounds on how long a pull may take before the next segment is tried (the last
/// candidate gets the full request timeout).
const PATIENCE_MIN: Duration = Duration::from_millis(50);
const PATIENCE_MAX: Duration = Duration::from_secs(1);

/// Request latency per segment of one PG (smoothed, µs): pulls and page reads go to the
/// fastest segment that has what they need.
#[derive(Default)]
pub struct Latency([AtomicU64; SEGMENTS_PER_PG]);

impl Latency {
    pub fn record(&self, segment: usize, us: u64) {
        let old = self.0[segment].load(Relaxed);
        self.0[segment].store(if old == 0 { us } else { (old * 7 + us) / 8 }, Relaxed);
    }

    /// A failed segment goes to the back until it serves again.
    pub fn penalize(&self, segment: usize) {
        self.0[segment].store(u64::MAX / 16, Relaxed);
    }

    /// Candidates fastest first within each group, groups in order, each with how long to
    /// wait for it: a few times its usual time, so that a frozen or overloaded node costs
    /// little; the last candidate gets the full request timeout.
    pub fn order(&self, groups: &[&[usize]]) -> Vec<(usize, Duration)> {
        let mut order = Vec::new();
        for group in groups {
            let mut g = group.to_vec();
            g.sort_by_key(|&s| self.0[s].load(Relaxed));
            order.extend(g);
        }
        let last = order.len().saturating_sub(1);
        order
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let usual = Duration::from_micros(self.0[s].load(Relaxed).min(PATIENCE_MAX.as_micros() as u64));
                (s, if i == last { REQUEST_TIMEOUT } else { (usual * 8).clamp(PATIENCE_MIN, PATIENCE_MAX) })
            })
            .collect()
    }
}
