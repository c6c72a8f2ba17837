//! A segment that starts with no epoch state (a new node, or one whose disk
//! was wiped) must not grant anything yet: at epoch 0 it would take any
//! claim or append, a deposed writer's too, and a deposed writer that found
//! two such segments besides the two that missed the takeover would have a
//! write quorum again. So it joins first: it asks its peers their status,
//! and once `READ_QUORUM` of them answered with an epoch state it takes the
//! state of the newest (its epoch and truncations) as its own.
//!
//! Why that is enough: the volume's epoch was granted by a write quorum of
//! the PG, so at least `WRITE_QUORUM - 1` of this segment's five peers hold
//! it (or a newer one), and any `READ_QUORUM` of the five include one of
//! them, as long as no more than `SEGMENTS_PER_PG - WRITE_QUORUM + 1`
//! segments lost their state (an AZ and one more).
//!
//! A new volume has no epoch state anywhere: when `READ_QUORUM` peers answer
//! that they are joining too (with this segment, a write quorum of empty
//! segments, which a volume past its first claim cannot have within the
//! fault model), the segment joins at the newest state heard, epoch 0 if none.

use std::collections::BTreeMap;

use crate::quorum::READ_QUORUM;
use crate::segment_claim::EpochState;

/// One peer's answer to `Status` at epoch 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// It has an epoch state (the one it answered with).
    Member(EpochState),
    /// It is joining too (`ErrorCode::Joining`).
    Joining,
}

/// The join decision of one segment (sans-IO): feed every peer's answer,
/// round after round, until `decided` says what to persist and `join`.
#[derive(Debug, Default)]
pub struct Join {
    /// The latest answer of each peer, by node.
    heard: BTreeMap<u32, PeerState>,
}

impl Join {
    pub fn on_answer(&mut self, node: u32, state: PeerState) {
        self.heard.insert(node, state);
    }

    /// The epoch state to join at, once enough peers answered.
    pub fn decided(&self) -> Option<EpochState> {
        let members: Vec<&EpochState> = self.heard.values().filter_map(|s| if let PeerState::Member(m) = s { Some(m) } else { None }).collect();
        let joining = self.heard.len() - members.len();
        if members.len() < READ_QUORUM && joining < READ_QUORUM {
            return None;
        }
        Some(members.into_iter().max_by_key(|m| m.epoch).cloned().unwrap_or_default())
    }

    /// Peers heard, as (members, joining), for logs and errors.
    pub fn heard(&self) -> (usize, usize) {
        let members = self.heard.values().filter(|s| matches!(s, PeerState::Member(_))).count();
        (members, self.heard.len() - members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Truncation;
    use crate::{Epoch, Lsn};

    fn member(epoch: u64) -> PeerState {
        PeerState::Member(EpochState { epoch: Epoch(epoch), truncations: vec![] })
    }

    #[test]
    fn joins_at_the_newest_of_a_read_quorum_of_members() {
        let mut j = Join::default();
        j.on_answer(1, member(5));
        j.on_answer(2, PeerState::Joining);
        assert_eq!(j.decided(), None, "two answers decide nothing");
        let newest = EpochState { epoch: Epoch(9), truncations: vec![Truncation { epoch: Epoch(9), above: Lsn(40) }] };
        j.on_answer(3, PeerState::Member(newest.clone()));
        assert_eq!(j.decided(), None, "two members and one joining peer may all have missed the newest epoch");
        j.on_answer(4, member(7));
        assert_eq!(j.decided(), Some(newest));
        assert_eq!(j.heard(), (3, 1));
    }

    #[test]
    fn a_new_volume_joins_at_epoch_0() {
        let mut j = Join::default();
        for node in 1..=3 {
            j.on_answer(node, PeerState::Joining);
        }
        assert_eq!(j.decided(), Some(EpochState::default()));
        // A peer that joined meanwhile answers with its state: the newest is taken.
        j.on_answer(2, member(3));
        j.on_answer(5, PeerState::Joining);
        assert_eq!(j.decided().map(|s| s.epoch), Some(Epoch(3)));
    }

    #[test]
    fn the_latest_answer_of_a_peer_counts_once() {
        let mut j = Join::default();
        for _ in 0..3 {
            j.on_answer(1, PeerState::Joining);
        }
        j.on_answer(1, member(2));
        j.on_answer(2, member(2));
        assert_eq!(j.decided(), None);
        assert_eq!(j.heard(), (2, 0));
    }
}
