//! loadgen: the Borealis benchmark harness and command-line client.
//! `storage-bench` measures storage nodes against raw disk and raw QUIC
//! ceilings; `commit-bench` drives a writer with open-loop commits and
//! measures how soon read replicas show them; `failover` kills the writer
//! under load and measures how soon a promoted replica commits, with no
//! acknowledged write lost; `bench` (the canonical run) and `sweep` do both over
//! a grid and plot them; `pg-bench`, `pg-failover` and `compare-postgres` run the
//! same workload against PostgreSQL streaming replication; `perf-gate` judges a
//! build against a committed baseline; `soak` runs puts over a bounded key space for
//! minutes while restarting storage nodes, and judges disk use, restart time and
//! write amplification;
//! `put`/`get`/`delete`/`txn` send single requests; `volume` prints a local volume file.

pub mod audit;
pub mod ceilings;
pub mod client;
pub mod cluster;
pub mod commit_bench;
pub mod compare;
pub mod failover;
pub mod lag;
pub mod open_loop;
pub mod pacing;
pub mod pause;
pub mod perf_gate;
pub mod plot;
pub mod postgres;
pub mod procs;
pub mod report;
pub mod saturation;
pub mod soak;
pub mod storage_bench;
pub mod sweep;
