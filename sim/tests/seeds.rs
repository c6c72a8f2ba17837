use sim::{run, Bug, Faults, Stats};

const FAULTY: Faults = Faults { drop_percent: 20, duplicate_percent: 10, delay_ticks_max: 15, crash_percent: 3 };

fn seeds() -> Vec<u64> {
    match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED is a number")],
        Err(_) => (0..1000).collect(),
    }
}

fn replayable(seed: u64) -> Stats {
    let r = std::panic::catch_unwind(|| run(seed, FAULTY, None));
    r.unwrap_or_else(|_| panic!("simulation failed; replay with SIM_SEED={seed} cargo test --release -p sim"))
}

/// Many seeds, each a different run; a failure names its seed.
#[test]
fn safety_then_liveness_over_many_seeds() {
    let seeds = seeds();
    let mut total = Stats::default();
    for &seed in &seeds {
        total += replayable(seed);
    }
    eprintln!("{} seeds: {total:?}", seeds.len());
    assert!(total.crashes > 0 && total.reconnects > 0, "the faults never fired: {total:?}");
    assert!(total.fetches > 0 && total.throttles > 0, "the replicas never fetched a page or filled their buffer: {total:?}");
}

/// The checks catch a replica that applies past VDL, and one served stale pages.
#[test]
fn a_buggy_replica_fails_some_seed() {
    for bug in [Bug::FeedPastVdl, Bug::StalePage] {
        let caught = (0..100).any(|seed| std::panic::catch_unwind(|| run(seed, FAULTY, Some(bug))).is_err());
        assert!(caught, "{bug:?} passed every check");
    }
}

/// The same seed gives the same run.
#[test]
fn runs_are_deterministic() {
    let trace = |seed| {
        let mut s = sim::Sim::new(seed, 2);
        s.faults = FAULTY;
        s.add_replica(0);
        s.add_replica(100);
        (0..300).map(|_| { s.write_txn(); s.tick(); (s.vdl(), s.replica_states()) }).collect::<Vec<_>>()
    };
    assert_eq!(trace(7), trace(7));
    assert_ne!(trace(7), trace(8));
}
