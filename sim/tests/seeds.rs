use sim::{run, run_with, AnswerEpoch, Bug, Faults, Sim, Stats};

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
    if seeds.len() > 1 {
        assert!(total.recoveries > 0 && total.promotions > 0 && total.late_truncations > 0, "no writer recovery was exercised: {total:?}");
        assert!(total.txns_dropped > 0 && total.txns_kept_unacked > 0, "recoveries never decided an unacknowledged transaction: {total:?}");
    }
}

/// Whether some seed of `seeds` fails with the given bug or shell choices.
fn some_seed_fails(seeds: std::ops::Range<u64>, bug: Option<Bug>, shell: fn(&mut Sim)) -> Option<u64> {
    seeds.into_iter().find(|&seed| std::panic::catch_unwind(|| run_with(seed, FAULTY, bug, shell)).is_err())
}

/// The recovery checks catch a decision that ignores holes (VDL from the highest CPL pulled).
#[test]
fn a_buggy_recovery_fails_some_seed() {
    assert!(some_seed_fails(0..100, Some(Bug::RecoveryMaxScl), |_| {}).is_some(), "RecoveryMaxScl passed every check");
}

// Core bugs the sim works around. Each test passes while the bug is there (some seed
// fails without the workaround); once the core is fixed it fails: drop the workaround.

/// A recovered WriterCore reports PGCL = recovered VDL for every PG, above the SCLs of
/// a PG whose last record is lower: replicas wait for that PG forever (until it is written).
#[test]
fn core_bug_recovered_pgcl_stalls_replicas_on_an_idle_pg() {
    let seed = some_seed_fails(0..200, None, |s| s.pgcl_bound_fix = false);
    eprintln!("first failing seed: {seed:?}");
    assert!(seed.is_some(), "fixed? every seed converges with the recovered writer's own PGCL");
}

/// A recovery truncates every segment above VDL only: a segment that missed an earlier
/// recovery keeps the older writer's records between that truncation point and VDL.
#[test]
fn core_bug_truncation_keeps_a_stale_tail_below_vdl() {
    let seed = some_seed_fails(0..1000, None, |s| s.stale_cut = false);
    eprintln!("first failing seed: {seed:?}");
    assert!(seed.is_some(), "fixed? every seed passes truncating above VDL only");
}

/// writerd passes the epoch of the claim's StatusReply (the epoch just claimed) as
/// `Answer::epoch`: `effective_scl` then never clamps a segment that missed a truncation.
#[test]
fn shell_bug_claimed_epoch_in_answers_never_clamps() {
    let seed = some_seed_fails(0..1000, None, |s| s.answer_epoch = AnswerEpoch::Claimed);
    eprintln!("first failing seed: {seed:?}");
    assert!(seed.is_some(), "fixed? every seed passes with the claimed epoch in the answers");
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
