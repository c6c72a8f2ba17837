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
