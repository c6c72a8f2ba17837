use anyhow::Result;
use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Borealis read replica of a volume.
#[derive(Parser)]
#[command(version, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Learn where the volume stands from its storage nodes, then follow the writer's VDL,
    /// pull the redo log from storage, apply whole transactions up to VDL and serve reads at
    /// that read point. Needs no writer to start; exits 0 on SIGTERM.
    Serve(replicad::Config),
    /// Make the replica at --replica take over the volume now (claim the next epoch, recover,
    /// accept writes); prints how long each step took, as JSON. For a writer known dead: a
    /// live writer is fenced by the new epoch and stops.
    Promote(replicad::PromoteArgs),
}

fn main() -> Result<()> {
    borealis_net::init_logging("info");
    match Cli::parse().command {
        Command::Serve(config) => std::process::exit(replicad::run(config)?),
        Command::Promote(args) => std::process::exit(replicad::promote_cmd(args)?),
    }
}
