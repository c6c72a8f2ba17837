use sim::{run, Bug, Stats, FAULTY};

fn seeds() -> Vec<u64> {
    match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED is a number")],
        Err(_) => (0..1000).collect(),
    }
}

fn replayable(seed: u64) -> Stats {
    let r = std::panic::catch_unwind(|| run(seed, FAULTY, None));
    r.unwrap_or_else(|_| panic!("simulation failed; replay with SIM_SEED={seed} cargo test --profile release-checked -p sim"))
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
    assert!(total.stream_chunks > 0, "no log stream brought records: {total:?}");
    assert!(total.pages_full > 0, "no transaction met the page size limit: {total:?}");
    if seeds.len() > 1 {
        assert!(total.recoveries > 0 && total.promotions > 0 && total.late_truncations > 0, "no writer recovery was exercised: {total:?}");
        assert!(total.claims_lost > 0, "no takeover by two candidates at once had a loser: {total:?}");
        assert!(total.gossip_fills > 0, "no segment was filled by the core's Repair: {total:?}");
        assert!(total.deferrals > 0, "no replica's Watch deferred to a better peer: {total:?}");
        assert!(total.torn_tails > 0, "no crash tore a segment file's tail: {total:?}");
        assert!(total.flush_faults > 0 && total.epoch_write_faults > 0 && total.wipes > 0, "a disk fault never happened: {total:?}");
        assert!(total.joins > 0 && total.deposed_frames > 0, "no wiped segment joined, or no deposed writer resent: {total:?}");
        assert!(total.horizon_moves > 0, "the GC horizon never moved: {total:?}");
        assert!(total.txns_dropped > 0 && total.txns_kept_unacked > 0, "recoveries never decided an unacknowledged transaction: {total:?}");
        assert!(total.az_plus_one_takeovers > 0 && total.writes_before_write_quorum > 0, "no takeover from a read quorum held writes back: {total:?}");
    }
}

/// The first seed of `seeds` that fails with `bug`.
fn first_failing_seed(seeds: std::ops::Range<u64>, bug: Bug) -> Option<u64> {
    seeds.into_iter().find(|&seed| std::panic::catch_unwind(|| run(seed, FAULTY, Some(bug))).is_err())
}

/// Some seed below 1000 fails with `bug`; prints the first.
fn assert_caught(bug: Bug) {
    let seed = first_failing_seed(0..1000, bug);
    eprintln!("{bug:?}: first failing seed: {seed:?}");
    assert!(seed.is_some(), "{bug:?} passed every check");
}

/// The recovery checks catch a decision that ignores holes (VDL from the highest CPL pulled).
#[test]
fn a_buggy_recovery_fails_some_seed() {
    assert!(first_failing_seed(0..100, Bug::RecoveryMaxScl).is_some(), "RecoveryMaxScl passed every check");
}

/// Without the truncation history in claims, a segment that missed a recovery
/// keeps the older writer's tail below the new VDL: some seed fails.
#[test]
fn claims_without_the_truncation_history_fail_some_seed() {
    assert_caught(Bug::NoTruncationHistory);
}

/// With the claimed epoch in claim answers, `effective_scl` never clamps a
/// segment that missed a truncation: some seed fails.
#[test]
fn claim_answers_with_the_claimed_epoch_fail_some_seed() {
    assert_caught(Bug::ClaimedEpochInAnswers);
}

/// Two candidates at once: if segments answered claims they refused as
/// granted, both could count a write quorum; some seed fails.
#[test]
fn refused_claims_taken_for_grants_fail_some_seed() {
    assert_caught(Bug::RefusalsAsGrants);
}

/// A torn tail taken for records (the file's length trusted at a restart): some seed fails.
#[test]
fn a_torn_tail_taken_for_records_fails_some_seed() {
    assert_caught(Bug::TrustFileLength);
}

/// A crash's lost records taken as kept, a failed flush reported done, an
/// epoch-file write that failed taken as done, a wiped node back with its old
/// position: some seed fails each.
#[test]
fn disk_failures_taken_for_success_fail_some_seed() {
    for bug in [Bug::RestartKeepsScl, Bug::FailedFlushCounted, Bug::EpochWriteFailureIgnored, Bug::WipeKeepsPosition] {
        assert_caught(bug);
    }
}

/// Seeds beyond the 1000 run by default that once stalled: a recovery whose
/// `plan.from[pg]` (the window below the floor, or `known_cpl`) is above the
/// PG's last record at or below VDL, with no record of the PG in
/// `(from, VDL]`, truncates every segment of the PG to that last record; the
/// recovered writer must count that record, not `from`, as what segments hold
/// before its tail, or it reports a `Gap` for every segment forever.
/// 1013: pg1 from 3, last 2. 1945: pg0 from 424 (a promotion's known CPL), last 422.
#[test]
fn a_recovered_writer_sends_to_a_pg_ending_below_the_recovery_window() {
    for seed in [1013, 1945] {
        run(seed, FAULTY, None);
    }
}

/// A seed that once failed a takeover: the segment it pulled a PG's tail from
/// restarted after answering the claim and no longer held the tail (it had
/// not flushed it). The takeover claims again and plans from the positions now.
#[test]
fn a_takeover_whose_pull_source_restarted_plans_again() {
    run(1116, FAULTY, None);
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
        (0..300)
            .map(|_| {
                s.write_txn();
                s.tick();
                (s.vdl(), s.replica_states())
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(trace(7), trace(7));
    assert_ne!(trace(7), trace(8));
}

/// A wiped segment that grants epochs at once, without joining at its peers'
/// epoch state, takes a deposed writer's frame: some seed fails.
#[test]
fn a_wiped_segment_that_does_not_join_first_fails_some_seed() {
    assert_caught(Bug::JoinSkipped);
}

/// A GC horizon that ignores the replicas' read points passes them, and storage
/// refuses their page reads: some seed fails.
#[test]
fn a_horizon_above_a_replica_read_point_fails_some_seed() {
    assert_caught(Bug::HorizonIgnoresReaders);
}

/// Takeovers that go on with 2 of 6 answers (an AZ and two more nodes cut off)
/// miss an acknowledged record on some seed.
#[test]
fn recovery_from_two_of_six_fails_some_seed() {
    assert_caught(Bug::RecoveryFromTwo);
}
