use anyhow::Result;
use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Borealis load generator and benchmark harness.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmark storage nodes: starts 1 and/or 6 storaged processes on loopback, drives them
    /// with pipelined redo batches at full speed and at a fraction of it, and reports records/s,
    /// MB/s, ack and flush latency against raw io_uring disk and raw QUIC ceilings from the same run.
    StorageBench(loadgen::storage_bench::StorageBenchArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match Cli::parse().command {
        Command::StorageBench(args) => runtime.block_on(loadgen::storage_bench::run(args)),
    }
}
