use sim::{run, Faults, Stats};

const FAULTY: Faults = Faults { drop_percent: 20, duplicate_percent: 10, delay_ticks_max: 15, crash_percent: 3 };

/// Many seeds, each a different run; a failure names its seed.
#[test]
fn safety_then_liveness_over_many_seeds() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED is a number")],
        Err(_) => (0..1000).collect(),
    };
    let mut total = Stats::default();
    for &seed in &seeds {
        let r = std::panic::catch_unwind(|| run(seed, FAULTY));
        total += r.unwrap_or_else(|_| panic!("simulation failed; replay with SIM_SEED={seed} cargo test --release -p sim"));
    }
    eprintln!("{} seeds: {total:?}", seeds.len());
    assert!(total.crashes > 0 && total.reconnects > 0, "the faults never fired: {total:?}");
}

/// The same seed gives the same run.
#[test]
fn runs_are_deterministic() {
    let trace = |seed| {
        let mut s = sim::Sim::new(seed, 2);
        s.faults = FAULTY;
        (0..300).map(|_| { s.write_txn(); s.tick(); s.vdl() }).collect::<Vec<_>>()
    };
    assert_eq!(trace(7), trace(7));
    assert_ne!(trace(7), trace(8));
}
