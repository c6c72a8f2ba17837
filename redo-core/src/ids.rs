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
}
