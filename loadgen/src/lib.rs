//! loadgen: the Borealis benchmark harness. Today: `storage-bench`, which
//! measures storage nodes against raw disk and raw QUIC ceilings.

pub mod ceilings;
pub mod cluster;
pub mod pacing;
pub mod report;
pub mod storage_bench;
