//! What a failover did to the writes, the same for Borealis (`failover`) and
//! PostgreSQL (`pg-failover`): every transaction writes keys of its own with
//! values that name it, so reading them all back afterwards tells, for each
//! one, whether it survived whole, vanished or was torn.

use serde::Serialize;

/// The keys and values of one failover run.
pub struct Workload {
    pub run: usize,
    pub txn_ops: usize,
    pub value_bytes: usize,
}

impl Workload {
    pub fn key(&self, seq: u64, op: usize) -> String {
        format!("failover-{}-{seq:010}-{op}", self.run)
    }

    pub fn value(&self, seq: u64, op: usize) -> Vec<u8> {
        let mut v = format!("{seq}/{op}:").into_bytes();
        v.resize(self.value_bytes.max(v.len()), b'v');
        v
    }
}

/// One run's transactions, counted by what became of them.
#[derive(Serialize, Clone, Debug, Default)]
pub struct WriteAudit {
    /// Transactions sent.
    pub writes: u64,
    pub acked_writes: u64,
    pub acked_before_kill: u64,
    /// Acknowledged by the old writer after the kill was sent (replies already on their way).
    pub acked_by_old_after_kill: u64,
    /// Acknowledged transactions whose keys did not all read back with their values from the
    /// new writer. Must be 0.
    pub lost_acked_writes: u64,
    /// Transactions without an acknowledgement (the deadline passed) found wholly present,
    /// wholly absent, or torn (must be 0).
    pub unacked_present: u64,
    pub unacked_absent: u64,
    pub torn_writes: u64,
    /// Acknowledged transactions the client had to send more than once.
    pub resent_writes: u64,
}

impl WriteAudit {
    /// One acknowledged transaction: sent `attempts` times, acknowledged by the old writer
    /// (before the kill or after it) or by the new one.
    pub fn acked(&mut self, attempts: u32, by_old: bool, before_kill: bool) {
        self.acked_writes += 1;
        self.resent_writes += (attempts > 1) as u64;
        match (by_old, before_kill) {
            (true, true) => self.acked_before_kill += 1,
            (true, false) => self.acked_by_old_after_kill += 1,
            (false, _) => {}
        }
    }

    /// One transaction read back: `present` of its `ops` keys held its values.
    pub fn read_back(&mut self, acked: bool, present: usize, ops: usize) {
        match (acked, present) {
            (true, p) if p == ops => {}
            (true, _) => self.lost_acked_writes += 1,
            (false, p) if p == ops => self.unacked_present += 1,
            (false, 0) => self.unacked_absent += 1,
            (false, _) => self.torn_writes += 1,
        }
    }
}

/// The counts that a summary of several runs adds up.
#[derive(Serialize, Clone, Debug, Default)]
pub struct AuditTotals {
    pub lost_acked_writes: u64,
    pub torn_writes: u64,
    pub unacked_present: u64,
    pub unacked_absent: u64,
    pub acked_writes: u64,
}

impl AuditTotals {
    pub fn of<'a>(runs: impl IntoIterator<Item = &'a WriteAudit>) -> Self {
        runs.into_iter().fold(AuditTotals::default(), |t, a| AuditTotals {
            lost_acked_writes: t.lost_acked_writes + a.lost_acked_writes,
            torn_writes: t.torn_writes + a.torn_writes,
            unacked_present: t.unacked_present + a.unacked_present,
            unacked_absent: t.unacked_absent + a.unacked_absent,
            acked_writes: t.acked_writes + a.acked_writes,
        })
    }

    /// Whether anything acknowledged was lost or anything torn.
    pub fn lost_or_torn(&self) -> bool {
        self.lost_acked_writes > 0 || self.torn_writes > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_and_read_backs_are_counted_and_summed() {
        let mut a = WriteAudit::default();
        for (acked, present) in [(true, 3), (true, 2), (false, 3), (false, 0), (false, 1), (true, 0)] {
            a.read_back(acked, present, 3);
        }
        assert_eq!((a.lost_acked_writes, a.unacked_present, a.unacked_absent, a.torn_writes), (2, 1, 1, 1));
        for (attempts, by_old, before_kill) in [(1, true, true), (2, true, false), (3, false, false), (1, false, true)] {
            a.acked(attempts, by_old, before_kill);
        }
        assert_eq!((a.acked_writes, a.resent_writes, a.acked_before_kill, a.acked_by_old_after_kill), (4, 2, 1, 1));
        let totals = AuditTotals::of([&a, &WriteAudit { acked_writes: 5, torn_writes: 1, ..Default::default() }]);
        assert_eq!((totals.lost_acked_writes, totals.torn_writes, totals.acked_writes), (2, 2, 9));
        assert!(totals.lost_or_torn());
        assert!(!AuditTotals::default().lost_or_torn());
    }
}
