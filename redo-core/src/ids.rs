//! Identifier and position newtypes. Never a bare `u64` LSN.

use std::fmt;

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident($inner:ty), $fmt:literal) => {
        $(#[$m])*
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

newtype!(
    /// Log sequence number: allocated by the writer, strictly increasing across the volume.
    /// `Lsn::ZERO` means "nothing": the backlink of a segment's or page's first record.
    Lsn(u64), "{}"
);
newtype!(
    /// Protection group: a range of pages stored as six segments.
    PgId(u32), "pg{}"
);
newtype!(
    /// A storage node (one `storaged` process).
    NodeId(u32), "n{}"
);
newtype!(
    /// Volume epoch: raised at every recovery; storage refuses older epochs.
    Epoch(u64), "e{}"
);
newtype!(
    /// A database page.
    PageId(u64), "p{}"
);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl Epoch {
    /// The epoch a new writer claims after `seen` (the highest any segment
    /// reported): the next generation in the high 32 bits, and the claimant's
    /// random `nonce` in the low 32. Two writers that start at once claim
    /// different epochs, so the higher one fences the other, instead of both
    /// claiming the same epoch and both writing under it.
    pub fn claim_after(seen: Epoch, nonce: u32) -> Epoch {
        Epoch((((seen.0 >> 32) + 1) << 32) | nonce as u64)
    }

    /// The claim round: storage grants each generation to one claimant only.
    pub fn generation(self) -> u64 {
        self.0 >> 32
    }

    /// Whether a segment at `self` may move to (or stay at) `requested`:
    /// `Ok(true)` for a newer generation (record it durably first), `Ok(false)`
    /// for the epoch it already holds, `Err` for an older one or for another
    /// claimant's epoch of the same generation. So of two candidates claiming
    /// the same generation, at most one can win a write quorum.
    pub fn grant(self, requested: Epoch) -> Result<bool, EpochRefused> {
        if requested == self {
            Ok(false)
        } else if requested.generation() > self.generation() {
            Ok(true)
        } else {
            Err(EpochRefused { requested, current: self })
        }
    }
}

/// A request at an epoch the segment does not grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{requested} refused: the segment is at {current}{}", if .requested.generation() == .current.generation() { " (granted to another claimant)" } else { "" })]
pub struct EpochRefused {
    pub requested: Epoch,
    pub current: Epoch,
}

/// A segment: one protection group's copy on one storage node.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub pg: PgId,
    pub node: NodeId,
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.pg, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimed_epochs_are_newer_and_distinct_per_claimant() {
        let seen = Epoch::claim_after(Epoch(0), 7);
        let (a, b) = (Epoch::claim_after(seen, 1), Epoch::claim_after(seen, 2));
        assert!(a > seen && b > seen && a != b);
        // A claim made later, after either of them, is newer than both.
        assert!(Epoch::claim_after(a.max(b), 0) > a.max(b));
        assert!(Epoch::claim_after(Epoch(1), 0) > Epoch(1), "epochs of older writers (small numbers) are passed too");
    }

    #[test]
    fn each_generation_is_granted_to_one_claimant() {
        let seg = Epoch::claim_after(Epoch(0), 7);
        let (a, b) = (Epoch::claim_after(seg, 1), Epoch::claim_after(seg, 2));
        assert_eq!(seg.grant(a), Ok(true));
        // Once a holds the generation, b (same generation, higher nonce) is refused and a is still welcome.
        assert!(a.grant(b).is_err() && b.grant(a).is_err());
        assert_eq!(a.grant(a), Ok(false));
        // An older epoch is refused; the next generation is granted to whoever asks first.
        assert!(a.grant(seg).is_err());
        let next = Epoch::claim_after(a.max(b), 3);
        assert_eq!(a.grant(next), Ok(true));
        // Six segments, two claimants of one generation asking in every order: at most one
        // reaches a write quorum (4), since each segment grants the generation once.
        for order in 0u32..64 {
            let mut wins = [0; 2];
            for s in 0..6 {
                let first = (order >> s) & 1;
                let mut at = seg;
                for who in [first, 1 - first] {
                    let e = [a, b][who as usize];
                    if at.grant(e).is_ok() {
                        at = e;
                        wins[who as usize] += 1;
                    }
                }
            }
            assert!(wins.iter().filter(|&&w| w >= 4).count() <= 1, "{wins:?}");
            assert_eq!(wins[0] + wins[1], 6);
        }
    }
}
