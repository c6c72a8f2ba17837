use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Borealis storage node.
#[derive(Parser)]
#[command(version, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of `Serve` costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a storage node. Options may also come from a TOML file (--config FILE,
    /// keys are the option names below); options on the command line win.
    Serve {
        /// TOML file with any of the options below, e.g. `node_id = 1`, `pgs = [0, 1]`.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        options: storaged::Config,
    },
    /// Measure the flush path alone (memory logs -> io_uring O_DIRECT, O_DSYNC writes), no network.
    BenchFlush(storaged::flush_bench::FlushBenchArgs),
    /// Create the cluster CA (unless DIR/ca.pem exists) and a certificate per name.
    Certs {
        /// Certificate directory.
        #[arg(long)]
        out: PathBuf,
        /// Certificates to issue, e.g. storaged-1 ... storaged-6, writerd, client.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
}

/// Places `--config FILE`'s options before the command line's, so flags win.
fn args_with_config_file() -> Result<Vec<String>> {
    let args: Vec<String> = std::env::args().collect();
    let pos = args.iter().position(|a| a == "--config" || a.starts_with("--config="));
    let Some(pos) = pos else { return Ok(args) };
    let path = match args[pos].strip_prefix("--config=") {
        Some(p) => p.to_string(),
        None => match args.get(pos + 1) {
            Some(p) => p.clone(),
            None => return Ok(args),
        },
    };
    let serve = args.iter().position(|a| a == "serve").unwrap_or(1);
    let given = &args[serve + 1..];
    // A list option (--pgs) given twice accumulates instead of overriding, so
    // leave out the file's value of every option the command line sets.
    let on_command_line = |flag: &str| given.iter().any(|a| a == flag || a.strip_prefix(flag).is_some_and(|v| v.starts_with('=')));
    let mut out = args[..=serve].to_vec();
    for pair in storaged::config::toml_args(path.as_ref())?.chunks(2) {
        if !on_command_line(&pair[0]) {
            out.extend_from_slice(pair);
        }
    }
    out.extend_from_slice(given);
    Ok(out)
}

fn main() -> Result<()> {
    borealis_net::init_logging("info");
    match Cli::parse_from(args_with_config_file()?).command {
        Command::Serve { options, .. } => storaged::run(options),
        Command::BenchFlush(args) => storaged::flush_bench::run(args),
        Command::Certs { out, names } => borealis_net::certs::generate(&out, &names),
    }
}
