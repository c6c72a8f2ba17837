//! Replica visibility lag bookkeeping, kept free of I/O so it can be tested:
//! acknowledged commits (commit LSN, ack time) and `Follow` progress events
//! of the writer and of each replica in, lag samples out.
//!
//! A commit's lag on a replica is the time from its acknowledgement until a
//! progress event of that replica with `vdl >= commit LSN` is received; the
//! replica-to-client notification hop is included, so the number errs high.
//! A commit the replica had already shown when the ack arrived has lag 0.

use std::collections::BTreeMap;
use std::time::Instant;

use hdrhistogram::Histogram;
use redo_core::Lsn;

use crate::report::latency_histogram;

/// An acknowledged commit that a replica has not shown yet.
#[derive(Clone, Copy, Debug)]
struct Pending {
    acked: Instant,
    /// Counts in the measurement (not warm-up).
    measured: bool,
}

struct Replica {
    /// Acks nearly arrive in LSN order, so draining a prefix of this map is cheap.
    pending: BTreeMap<Lsn, Vec<Pending>>,
    shown: Lsn,
    lag_us: Histogram<u64>,
}

pub struct LagTracker {
    replicas: Vec<Replica>,
    writer_vdl: Lsn,
    lag_lsn: Histogram<u64>,
    /// Every sample, warm-up included, for the progress line (which resets it).
    pub second_lag_us: Histogram<u64>,
}

/// An auto-resizing histogram for LSN distances (unbounded, unlike microseconds).
fn lsn_histogram() -> Histogram<u64> {
    Histogram::new(3).expect("valid histogram precision")
}

impl LagTracker {
    pub fn new(replicas: usize) -> Self {
        let replica = || Replica { pending: BTreeMap::new(), shown: Lsn::ZERO, lag_us: latency_histogram() };
        LagTracker { replicas: (0..replicas).map(|_| replica()).collect(), writer_vdl: Lsn::ZERO, lag_lsn: lsn_histogram(), second_lag_us: latency_histogram() }
    }

    pub fn replicas(&self) -> usize {
        self.replicas.len()
    }

    /// A commit acknowledged at `acked`; `measured` as for its commit latency.
    pub fn ack(&mut self, commit_lsn: Lsn, acked: Instant, measured: bool) {
        let p = Pending { acked, measured };
        for r in &mut self.replicas {
            if r.shown >= commit_lsn {
                record(&mut r.lag_us, &mut self.second_lag_us, p, acked);
            } else {
                r.pending.entry(commit_lsn).or_default().push(p);
            }
        }
    }

    pub fn writer_progress(&mut self, vdl: Lsn) {
        self.writer_vdl = self.writer_vdl.max(vdl);
    }

    /// Replica `replica` reported `vdl` at `at`; `measured` says whether the event
    /// falls in the measured window (for the LSN distance to the writer's VDL).
    pub fn replica_progress(&mut self, replica: usize, vdl: Lsn, at: Instant, measured: bool) {
        let r = &mut self.replicas[replica];
        r.shown = r.shown.max(vdl);
        // Everything above `vdl` stays; the drained prefix is at or below it.
        let above = r.pending.split_off(&Lsn(vdl.0.saturating_add(1)));
        for p in std::mem::replace(&mut r.pending, above).into_values().flatten() {
            record(&mut r.lag_us, &mut self.second_lag_us, p, at);
        }
        if measured {
            self.lag_lsn.saturating_record(self.writer_vdl.0.saturating_sub(vdl.0));
        }
    }

    /// Measured commits that replica `replica` has not shown.
    pub fn unseen(&self, replica: usize) -> u64 {
        self.replicas[replica].pending.values().flatten().filter(|p| p.measured).count() as u64
    }

    pub fn all_seen(&self) -> bool {
        (0..self.replicas.len()).all(|i| self.unseen(i) == 0)
    }

    /// Measured lag of one replica, microseconds.
    pub fn lag_us(&self, replica: usize) -> &Histogram<u64> {
        &self.replicas[replica].lag_us
    }

    /// Measured lag of every replica together, microseconds.
    pub fn all_lag_us(&self) -> Histogram<u64> {
        let mut all = latency_histogram();
        for r in &self.replicas {
            all.add(&r.lag_us).expect("histograms of the same bounds");
        }
        all
    }

    /// Writer VDL minus replica VDL at each measured replica progress event, in LSNs.
    pub fn lag_lsn(&self) -> &Histogram<u64> {
        &self.lag_lsn
    }
}

fn record(measured: &mut Histogram<u64>, second: &mut Histogram<u64>, p: Pending, shown: Instant) {
    let us = shown.saturating_duration_since(p.acked).as_micros() as u64;
    second.saturating_record(us);
    if p.measured {
        measured.saturating_record(us);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Microseconds after `t0`: values below 2048 are exact in the histograms.
    fn us(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_micros(n)
    }

    fn values(h: &Histogram<u64>) -> Vec<u64> {
        h.iter_recorded().flat_map(|v| std::iter::repeat_n(v.value_iterated_to(), v.count_at_value() as usize)).collect()
    }

    #[test]
    fn lag_runs_from_ack_to_the_first_progress_covering_the_commit() {
        let t0 = Instant::now();
        let mut t = LagTracker::new(2);
        t.writer_progress(Lsn(100));
        t.ack(Lsn(10), us(t0, 0), true);
        t.ack(Lsn(20), us(t0, 100), true);
        t.replica_progress(0, Lsn(15), us(t0, 500), true);
        t.replica_progress(1, Lsn(25), us(t0, 700), true);
        t.replica_progress(0, Lsn(20), us(t0, 900), true);
        assert_eq!(values(t.lag_us(0)), vec![500, 800]);
        assert_eq!(values(t.lag_us(1)), vec![600, 700]);
        assert_eq!(t.all_lag_us().len(), 4);
        assert!(t.all_seen());
        assert_eq!(values(t.lag_lsn()), vec![75, 80, 85]);
    }

    #[test]
    fn out_of_order_acks_and_acks_already_shown() {
        let t0 = Instant::now();
        let mut t = LagTracker::new(1);
        t.ack(Lsn(30), us(t0, 0), true);
        t.ack(Lsn(10), us(t0, 100), true);
        t.ack(Lsn(10), us(t0, 200), true); // two commits can share a commit LSN
        t.replica_progress(0, Lsn(10), us(t0, 400), true);
        assert_eq!(values(t.lag_us(0)), vec![200, 300]);
        assert_eq!(t.unseen(0), 1);
        // Acked after the replica showed it: visible at once.
        t.replica_progress(0, Lsn(40), us(t0, 600), true);
        t.ack(Lsn(35), us(t0, 800), true);
        assert_eq!(values(t.lag_us(0)), vec![0, 200, 300, 600]);
        assert!(t.all_seen());
    }

    #[test]
    fn warm_up_is_not_measured_and_a_stuck_replica_counts_unseen() {
        let t0 = Instant::now();
        let mut t = LagTracker::new(2);
        t.writer_progress(Lsn(3));
        t.ack(Lsn(1), us(t0, 0), false);
        t.replica_progress(0, Lsn(1), us(t0, 100), false);
        t.ack(Lsn(2), us(t0, 200), true);
        t.ack(Lsn(3), us(t0, 300), true);
        t.replica_progress(0, Lsn(3), us(t0, 400), true);
        assert_eq!(values(t.lag_us(0)), vec![100, 200]);
        assert_eq!(t.second_lag_us.len(), 3, "the progress line sees warm-up too");
        // Replica 1 never moves: its measured commits are unseen, the warm-up one is not counted.
        assert_eq!((t.unseen(0), t.unseen(1)), (0, 2));
        assert!(!t.all_seen());
        assert!(t.lag_us(1).is_empty());
        // The LSN distance counts measured events only, and never goes below 0.
        t.writer_progress(Lsn(2));
        t.replica_progress(0, Lsn(5), us(t0, 500), true);
        assert_eq!(values(t.lag_lsn()), vec![0, 0]);
    }
}
