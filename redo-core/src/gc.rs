//! The GC horizon (Aurora's PGMRPL, minimum read point LSN): the lowest read
//! point still in use by the writer and any replica. Storage may reclaim
//! every page version below it, so it never passes a reader's read point.
//!
//! The writer decides it (`Horizon`, sans-IO): replicas report their read
//! point on the stream that follows the writer's VDL, the writer reads at
//! VDL itself, and the horizon never passes the volume flushed LSN either
//! (storage keeps what is not durable on a write quorum). It rides on every
//! Append frame to storage, which reclaims below it and refuses reads there
//! (`SegmentLog::page_read`).
//!
//! It never moves back (storage may have reclaimed below it). A reader that
//! goes quiet keeps its read point for `READER_GRACE` (its stream may come
//! back), and a new writer holds the horizon for as long after it starts, so
//! that the replicas of the old writer can report theirs first.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::ids::Lsn;

/// How long a reader's read point counts after its stream closed, and how
/// long a new writer waits for its readers before the horizon moves (writerd's).
pub const READER_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Horizon {
    grace: Duration,
    /// Each reader's read point, and when it stops counting (`None`: connected).
    readers: BTreeMap<u64, (Lsn, Option<Duration>)>,
    horizon: Lsn,
    /// Before this, the horizon does not move (set at the first `advance`).
    hold_until: Option<Duration>,
}

impl Horizon {
    /// A new writer's horizon: `Lsn::ZERO` (storage keeps the highest it was
    /// told) for `grace` (`READER_GRACE`) from the first `advance`; a reader
    /// that went counts for as long.
    pub fn new(grace: Duration) -> Self {
        Horizon { grace, readers: BTreeMap::new(), horizon: Lsn::ZERO, hold_until: None }
    }

    /// Reader `reader` reads at `read_point` (and every read point after it).
    pub fn on_read_point(&mut self, reader: u64, read_point: Lsn) {
        self.readers.insert(reader, (read_point, None));
    }

    /// Reader `reader`'s stream closed at `now`.
    pub fn on_reader_gone(&mut self, reader: u64, now: Duration) {
        if let Some((_, until)) = self.readers.get_mut(&reader) {
            *until = Some(now + self.grace);
        }
    }

    /// The horizon at `now`, given the writer's VDL and the volume flushed LSN.
    pub fn advance(&mut self, now: Duration, vdl: Lsn, volume_flushed: Lsn) -> Lsn {
        self.readers.retain(|_, (_, until)| until.is_none_or(|u| now < u));
        if now < *self.hold_until.get_or_insert(now + self.grace) {
            return self.horizon;
        }
        let lowest_reader = self.readers.values().map(|&(r, _)| r).min().unwrap_or(Lsn(u64::MAX));
        self.horizon = self.horizon.max(vdl.min(volume_flushed).min(lowest_reader));
        self.horizon
    }

    pub fn get(&self) -> Lsn {
        self.horizon
    }

    /// Readers counted, for metrics.
    pub fn readers(&self) -> usize {
        self.readers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::ZERO;

    fn after_hold() -> Duration {
        READER_GRACE
    }

    /// A horizon whose hold started at `T0`.
    fn started() -> Horizon {
        let mut h = Horizon::new(READER_GRACE);
        h.advance(T0, Lsn::ZERO, Lsn::ZERO);
        h
    }

    #[test]
    fn the_lowest_read_point_bounds_it_and_it_never_moves_back() {
        let mut h = started();
        h.on_read_point(1, Lsn(50));
        h.on_read_point(2, Lsn(30));
        assert_eq!(h.advance(T0, Lsn(100), Lsn(100)), Lsn::ZERO, "a new writer holds it while its readers report");
        let t = after_hold();
        assert_eq!(h.advance(t, Lsn(100), Lsn(100)), Lsn(30));
        assert_eq!(h.advance(t, Lsn(100), Lsn(20)), Lsn(30), "never back, even below the flushed LSN");
        h.on_read_point(2, Lsn(80));
        assert_eq!(h.advance(t, Lsn(100), Lsn(70)), Lsn(50));
        h.on_read_point(1, Lsn(90));
        assert_eq!(h.advance(t, Lsn(85), Lsn(100)), Lsn(80));
        assert_eq!(h.readers(), 2);
    }

    #[test]
    fn without_readers_it_follows_vdl_and_the_flushed_lsn() {
        let mut h = started();
        assert_eq!(h.advance(after_hold(), Lsn(40), Lsn(25)), Lsn(25));
        assert_eq!(h.advance(after_hold(), Lsn(30), Lsn(60)), Lsn(30));
    }

    #[test]
    fn a_gone_reader_counts_until_its_grace_ends() {
        let mut h = started();
        let t = after_hold();
        h.on_read_point(1, Lsn(10));
        h.on_reader_gone(1, t);
        assert_eq!(h.advance(t + READER_GRACE / 2, Lsn(100), Lsn(100)), Lsn(10));
        assert_eq!(h.advance(t + READER_GRACE, Lsn(100), Lsn(100)), Lsn(100));
        assert_eq!(h.readers(), 0);
        // Back on its stream before the grace ended: it counts again.
        h.on_read_point(2, Lsn(120));
        h.on_reader_gone(2, t);
        h.on_read_point(2, Lsn(130));
        assert_eq!(h.advance(t + 2 * READER_GRACE, Lsn(200), Lsn(200)), Lsn(130));
    }
}
