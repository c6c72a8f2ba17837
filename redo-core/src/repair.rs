//! Repair by gossip, the decision: a segment that missed records (its node
//! was down, lost its memory log, or a batch was dropped) asks its PG's peers
//! their position each round, and `Repair` says whom to pull from, up to
//! where. storaged's gossip task executes it (`storaged/src/gossip.rs`), the
//! simulator fills lagging segments with it.
//!
//! Safety: only a peer at the segment's own epoch and newest truncation
//! agrees with it (a peer at another epoch may still hold records that a
//! recovery truncated); the shell checks that again before it inserts
//! anything pulled.

use crate::ids::{Epoch, Lsn};
use crate::takeover::SegmentStatus;
use crate::wire::Truncation;

/// What a segment knows of itself at the start of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Own {
    pub epoch: Epoch,
    /// The newest truncation the segment applied.
    pub truncation: Option<Truncation>,
    pub scl: Lsn,
    /// Records wait above a hole.
    pub pending: bool,
}

/// One peer's answer to `Status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub node: u32,
    pub epoch: Epoch,
    pub truncation: Option<Truncation>,
    pub scl: Lsn,
}

impl PeerView {
    pub fn from_status(node: u32, s: &SegmentStatus) -> Self {
        PeerView { node, epoch: s.epoch, truncation: s.truncations.last().copied(), scl: s.position.scl }
    }

    /// Whether the peer's log has the same history as ours up to its SCL.
    pub fn agrees_with(&self, own: &Own) -> bool {
        self.epoch == own.epoch && self.truncation == own.truncation
    }
}

/// The gossip decision of one segment, round after round (sans-IO).
///
/// A segment that is merely behind (the writer's batches to it are in
/// flight) is not repaired: it pulls only up to the highest SCL a peer
/// reported a round ago, so gossip fills lag that lasts a whole interval.
/// A segment holding records above a hole pulls up to the best peer's
/// current SCL at once.
#[derive(Debug, Default)]
pub struct Repair {
    /// The best agreeing peer SCL of the previous round, and the epoch and truncation it agreed with.
    seen: Option<(Epoch, Option<Truncation>, Lsn)>,
    /// What the last plan was filling up to (`Lsn::ZERO`: nothing).
    missing_through: Lsn,
}

impl Repair {
    /// A round's answers: the peers to pull from, best first, each with the
    /// LSN to pull up to (`(own.scl, upto]`). Empty when nothing is missing.
    pub fn handle_round(&mut self, own: Own, peers: &[PeerView]) -> Vec<(u32, Lsn)> {
        let mut agreeing: Vec<&PeerView> = peers.iter().filter(|p| p.agrees_with(&own)).collect();
        agreeing.sort_by_key(|p| std::cmp::Reverse(p.scl));
        let best = agreeing.first().map_or(Lsn::ZERO, |p| p.scl);
        let seen_before = match self.seen {
            Some((epoch, truncation, lsn)) if epoch == own.epoch && truncation == own.truncation => lsn,
            _ => Lsn::ZERO,
        };
        self.seen = Some((own.epoch, own.truncation, best));
        let target = if own.pending { best } else { best.min(seen_before) };
        self.missing_through = if target > own.scl { target } else { Lsn::ZERO };
        if self.missing_through == Lsn::ZERO {
            return Vec::new();
        }
        agreeing.iter().filter(|p| p.scl > own.scl).map(|p| (p.node, p.scl.min(target))).collect()
    }

    /// The best SCL an agreeing peer reported at the last round.
    pub fn peer_scl(&self) -> Lsn {
        self.seen.map_or(Lsn::ZERO, |(_, _, lsn)| lsn)
    }

    /// The LSN the segment is missing records up to (`Lsn::ZERO`: none known).
    pub fn missing_through(&self) -> Lsn {
        self.missing_through
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(scl: u64, pending: bool) -> Own {
        Own { epoch: Epoch(1), truncation: None, scl: Lsn(scl), pending }
    }

    fn peer(node: u32, epoch: u64, scl: u64) -> PeerView {
        PeerView { node, epoch: Epoch(epoch), truncation: None, scl: Lsn(scl) }
    }

    #[test]
    fn lag_is_repaired_only_once_it_lasts_a_round() {
        let mut r = Repair::default();
        // First sight of peers ahead: the writer may still be sending to us.
        assert!(r.handle_round(own(10, false), &[peer(2, 1, 50), peer(3, 1, 40)]).is_empty());
        assert_eq!((r.peer_scl(), r.missing_through()), (Lsn(50), Lsn::ZERO));
        // A round later we are still below what they had: pull up to that, best peer first.
        assert_eq!(r.handle_round(own(20, false), &[peer(2, 1, 90), peer(3, 1, 60)]), vec![(2, Lsn(50)), (3, Lsn(50))]);
        assert_eq!(r.missing_through(), Lsn(50));
        // Caught up with what they had a round ago: nothing to do.
        assert!(r.handle_round(own(95, false), &[peer(2, 1, 120)]).is_empty());
        assert_eq!(r.missing_through(), Lsn::ZERO);
    }

    #[test]
    fn a_hole_is_filled_at_once_from_every_peer_ahead() {
        let mut r = Repair::default();
        let plan = r.handle_round(own(10, true), &[peer(2, 1, 50), peer(3, 1, 10), peer(4, 1, 30)]);
        assert_eq!(plan, vec![(2, Lsn(50)), (4, Lsn(30))]);
        assert_eq!(r.missing_through(), Lsn(50));
    }

    #[test]
    fn peers_at_another_epoch_or_truncation_are_never_pulled_from() {
        let mut r = Repair::default();
        let t = |epoch, above| Some(Truncation { epoch: Epoch(epoch), above: Lsn(above) });
        let other_truncation = PeerView { truncation: t(1, 5), ..peer(5, 1, 99) };
        for _ in 0..3 {
            let plan = r.handle_round(own(10, true), &[peer(2, 2, 90), peer(3, 0, 80), other_truncation]);
            assert!(plan.is_empty(), "{plan:?}");
            assert_eq!(r.peer_scl(), Lsn::ZERO);
        }
        // Same epoch and the same newest truncation: agreed.
        let ours = Own { truncation: t(1, 5), ..own(10, true) };
        assert_eq!(r.handle_round(ours, &[other_truncation]), vec![(5, Lsn(99))]);
    }

    #[test]
    fn what_was_seen_at_an_older_epoch_does_not_count() {
        let mut r = Repair::default();
        assert!(r.handle_round(own(10, false), &[peer(2, 1, 50)]).is_empty());
        let moved = Own { epoch: Epoch(2), ..own(10, false) };
        assert!(r.handle_round(moved, &[peer(2, 2, 60)]).is_empty(), "the epoch-1 sighting must not be pulled at epoch 2");
        assert_eq!(r.handle_round(moved, &[peer(2, 2, 60)]), vec![(2, Lsn(60))]);
    }
}
