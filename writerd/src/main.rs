use anyhow::Result;
use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Borealis writer: the single writer of a volume.
#[derive(Parser)]
#[command(version, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Claim the volume (a new epoch on a write quorum of every protection group), then serve
    /// the client API: transactions commit once 4 of the 6 segments of every PG they touch hold
    /// their redo. Exits 0 on SIGTERM after in-flight commits land, 3 when a newer writer fences it.
    Serve(writerd::Config),
}

fn main() -> Result<()> {
    borealis_net::init_logging("info");
    match Cli::parse().command {
        Command::Serve(config) => {
            let code = writerd::run(config)?;
            std::process::exit(code);
        }
    }
}
