use std::process::ExitCode;

use clap::{Parser, Subcommand};
use loadgen::client::{self, Outcome};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Borealis load generator, benchmark harness and command-line client.
///
/// Exit status: 0 on success, 1 when `get` finds no value, 2 on any error.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The canonical benchmark (the README's first command): an embedded cluster of 6 storaged,
    /// writerd and a replica on loopback; 1,000 and 4,000 single-put commits/s (100-byte values,
    /// 8 connections, ack = memory), 3 runs of 3 s each; then a writerd SIGKILL under load and a
    /// replica promoted at once. Prints throughput, commit latency p50/p99/p99.9, replica lag
    /// p50/p99, failover time and lost acknowledged writes; writes summary.json, .hgrm and .svg
    /// files to --out. About 2 minutes.
    Bench(loadgen::sweep::BenchArgs),
    /// Sweep offered rates and value sizes, each point on a fresh embedded cluster, then measure
    /// failovers; writes one summary.json with every point and run, .hgrm per histogram, and SVG
    /// plots: latency against throughput, replica lag, percentile distributions, failover timeline.
    /// --pause-nodes K sweeps under gray failure: K storage nodes of distinct AZs paused on a duty cycle.
    Sweep(loadgen::sweep::SweepArgs),
    /// CI's performance gate: a short benchmark compared with a committed baseline. Each repetition
    /// measures a reference (raw QUIC request/response on loopback at the same rate) and then
    /// Borealis; the medians of their ratios (commit p50 and p99, replica lag p99, CPU per commit)
    /// must stay within each metric's allowance of the baseline's. Exit status 2 and the reason on
    /// a regression. --write-baseline records a new baseline.
    PerfGate(loadgen::perf_gate::PerfGateArgs),
    /// Benchmark storage nodes: starts 1 and/or 6 storaged processes on loopback, drives them
    /// with pipelined redo batches at full speed and at a fraction of it, and reports records/s,
    /// MB/s, ack and flush latency against raw io_uring disk and raw QUIC ceilings from the same run.
    StorageBench(loadgen::storage_bench::StorageBenchArgs),
    /// Benchmark commits: open-loop puts at each offered rate of a sweep, against an embedded
    /// cluster (6 storaged + writerd + replicads, started and stopped by loadgen) or an existing
    /// writer; reports acknowledged commits/s, commit latency from each commit's due time,
    /// replica visibility lag from each commit's acknowledgement, and the daemons' CPU per commit.
    /// --pause-nodes K: gray failure, K storage nodes of distinct AZs paused on a duty cycle.
    CommitBench(loadgen::commit_bench::CommitBenchArgs),
    /// Measure failover: open-loop commits through a failover-aware client against an embedded
    /// cluster (6 storaged + writerd + --replicas replicads), SIGKILL of writerd after the warm-up,
    /// and a replica's promotion (automatic, or --promote now); reports kill to first new commit
    /// (failover_ms), the unavailability window, the promotion's breakdown, and lost_acked_writes
    /// from reading back every write. Repeated --runs times on fresh clusters.
    Failover(loadgen::failover::FailoverArgs),
    /// Soak storage: open-loop puts (--rate, --value-bytes) over a bounded key space (--keys) for
    /// --duration against an embedded cluster (6 storaged + writerd), one storage node SIGKILLed
    /// and started again on its data dir every --restart-every, nodes 1-6 in turn. Each second it
    /// samples every node's disk (allocated bytes of its data dir) and bytes written (/proc/PID/io).
    /// Reports the largest node's disk against live data plus the hot-log budget, whether the disk
    /// stays flat, restart-to-ready time (first and last restart), and write amplification;
    /// writes summary.json, disk-bytes.svg and restart-ms.svg to --out.
    Soak(loadgen::soak::SoakArgs),
    /// PostgreSQL 15 as the target: a primary and a synchronous hot standby on loopback (or
    /// --standbys N with quorum commit, ANY 1 of them), started and stopped by loadgen; the same
    /// open-loop puts for each --synchronous-commit mode and rate; commit latency, throughput,
    /// standby visibility lag and the servers' CPU per commit.
    PgBench(loadgen::postgres::PgBenchArgs),
    /// PostgreSQL failover: SIGKILL of the primary under load, the standby promoted at once, clients
    /// reconnecting to it; kill to first promoted commit and lost acknowledged writes (read back).
    PgFailover(loadgen::postgres::PgFailoverArgs),
    /// Borealis against PostgreSQL 15 streaming replication, the same workload, runs interleaved:
    /// commit latency and visibility lag (ack = memory and disk against synchronous_commit off,
    /// local, on, remote_apply and quorum commit ANY 1 of 2 standbys), server CPU per commit (lag
    /// probes off), gray failure (storage nodes against standbys paused on a duty cycle),
    /// saturation ladders, then failovers of both; writes comparison.md, targets.json,
    /// summary.json, .hgrm files and SVG plots to --out.
    ComparePostgres(loadgen::compare::CompareArgs),
    /// Put KEY=VALUE in one transaction; prints the commit LSN.
    Put(client::PutArgs),
    /// Print the value of KEY, or "(not found)" and exit 1; from the writer, or from a
    /// replica with --replica (with --min-lsn to read your own write there).
    Get(client::GetArgs),
    /// Delete KEY in one transaction; prints the commit LSN.
    Delete(client::KeyArgs),
    /// Commit several operations atomically, e.g. `txn put:a=1 put:b=2 del:c`; prints the commit LSN.
    Txn(client::TxnArgs),
    /// Print the volume file (TOML) of a local cluster: nodes on 127.0.0.1, each PG on nodes 1-6.
    Volume(client::VolumeArgs),
}

fn main() -> ExitCode {
    borealis_net::init_logging("warn");
    let command = Cli::parse().command;
    // One thread: a request, its reply and the recording of its latency then never wait for
    // another thread to be woken, and the generator takes a fifth less CPU from the cluster it
    // shares the machine with. storage-bench drives storage at full speed: both CPUs.
    let threads = if matches!(command, Command::StorageBench(_)) { 2 } else { 1 };
    let outcome = borealis_net::runtime(threads).and_then(|runtime| {
        runtime.block_on(async {
            let done = |r: anyhow::Result<()>| r.map(|()| Outcome::Done);
            match command {
                Command::Bench(args) => done(loadgen::sweep::bench(args).await),
                Command::Sweep(args) => done(loadgen::sweep::run(args).await),
                Command::PerfGate(args) => done(loadgen::perf_gate::run(args).await),
                Command::StorageBench(args) => done(loadgen::storage_bench::run(args).await),
                Command::CommitBench(args) => done(loadgen::commit_bench::run(args).await),
                Command::Failover(args) => done(loadgen::failover::run(args).await),
                Command::Soak(args) => done(loadgen::soak::run(args).await),
                Command::PgBench(args) => done(loadgen::postgres::bench_run(args).await),
                Command::PgFailover(args) => done(loadgen::postgres::failover_run(args).await),
                Command::ComparePostgres(args) => done(loadgen::compare::run(args).await),
                Command::Put(args) => client::put(args).await,
                Command::Get(args) => client::get(args).await,
                Command::Delete(args) => client::delete(args).await,
                Command::Txn(args) => client::txn(args).await,
                Command::Volume(args) => done(client::volume(args)),
            }
        })
    });
    match outcome {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::NotFound) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}
