//! A long search for a failing seed: `cargo run --release -p sim -- --seeds N`
//! runs N seeds of the faulty simulation (CI runs 1,000) and stops at the first
//! that fails, printing it and how to replay it.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Run many seeds of the Borealis simulation; print the first that fails")]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    from: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut total = sim::Stats::default();
    for seed in args.from..args.from.saturating_add(args.seeds) {
        // The panic hook prints what failed; the seed follows it.
        match std::panic::catch_unwind(|| sim::run(seed, sim::FAULTY, None)) {
            Ok(stats) => total += stats,
            Err(_) => {
                eprintln!("seed {seed} failed; replay it with SIM_SEED={seed} cargo test --profile release-checked -p sim");
                return ExitCode::FAILURE;
            }
        }
        if (seed + 1 - args.from).is_multiple_of(1000) {
            eprintln!("{} seeds passed", seed + 1 - args.from);
        }
    }
    println!("{} seeds from {} passed: {total:?}", args.seeds, args.from);
    ExitCode::SUCCESS
}
