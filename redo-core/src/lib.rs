//! Borealis core: everything that is not I/O. Formats, wire messages and
//! state machines take events and return decisions; the daemons do the I/O.

pub mod api;
pub mod checkpoint;
mod codec;
pub mod failover;
pub mod gc;
pub mod ids;
pub mod join;
pub mod log_stream;
pub mod page;
pub mod page_cache;
pub mod page_index;
pub mod quorum;
pub mod rand;
pub mod record;
pub mod recovery;
pub mod repair;
pub mod replica;
pub mod segment_claim;
pub mod segment_file;
pub mod segment_log;
pub mod takeover;
pub mod volume;
pub mod wire;
pub mod writer;

pub use codec::DecodeError;
pub use ids::{Epoch, Lsn, NodeId, PageId, PgId, SegmentId};
