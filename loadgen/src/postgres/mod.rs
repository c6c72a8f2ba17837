//! PostgreSQL 15 streaming replication as a target of the same open-loop
//! workload (`open_loop`): a primary and hot standbys on loopback, started
//! and stopped by loadgen like the embedded Borealis cluster.
//!
//! `loadgen pg-bench` measures commit latency, throughput, standby
//! visibility lag and the servers' CPU per commit for each `synchronous_commit`
//! mode; `loadgen pg-failover` SIGKILLs the primary under load, promotes the
//! standby at once, and reads every transaction back from it.
//!
//! The servers: `initdb` of the primary in a temp directory, `postgres` on a
//! free loopback port (fsync on, `synchronous_standby_names = '*'`, or quorum
//! commit `'ANY 1 (s1, s2, …)'` with several standbys), `pg_basebackup -R` hot
//! standbys on other ports, streaming before any load. Each postmaster runs in
//! a process group of its own (its children each make their own), as the
//! `postgres` user when loadgen runs as root (PostgreSQL refuses root), and
//! dies with loadgen (`PR_SET_PDEATHSIG`); stopping sends the immediate
//! shutdown signal, then SIGKILL to whatever is left of the postmaster and the
//! processes under it, and only those.
//!
//! By job: `process` supervises the servers' processes (postmasters and the
//! tools, the shared memory a killed server leaves), `pair` sets up a primary
//! and its standbys and the client sessions on them, `bench` is `pg-bench`'s
//! open-loop measurement and `failover` is `pg-failover`.

mod bench;
mod failover;
mod pair;
mod process;

pub use bench::{bench_run, measure_point, pg_points, runs_json, AckedPosition, PgBenchArgs, PgPrimary, WalFeed};
pub use failover::{
    check_failover_args, failover_measure, failover_run, failover_summary, failover_table, PgFailoverArgs, PgFailoverRun, PgFailoverSummary, PromoteWith,
};
pub use pair::{connect, synchronous_standby_names, PgArgs, PgConn, PgServers, PgSetup, SyncCommit, DEFAULT_PG_BIN};
pub use process::{mapped_shm_segments, Postmaster, SHM_SEGMENT_PREFIX};
