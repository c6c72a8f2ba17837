//! Saturation ladders: the offered rate climbs step by step, a fresh cluster
//! or set of servers per step and run, until a step is not sustained; the
//! highest sustained rate is the system's capacity under a latency bound.
//! The ladder's arithmetic lives here, free of I/O; `compare` runs it.

use serde::Serialize;

use crate::open_loop::Measurement;
use crate::report::median;

/// A rate is sustained when at least this share of it is acknowledged.
pub const ACKED_SHARE_MIN: f64 = 0.99;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct SaturationArgs {
    /// Saturation: the ladder's first offered rate, commits/s.
    #[arg(long, default_value_t = 1000.0)]
    pub saturation_start: f64,
    /// Saturation: each step offers this many times the previous step's rate (rounded to a whole commit/s).
    #[arg(long, default_value_t = 1.25)]
    pub saturation_factor: f64,
    /// Saturation: the ladder ends at this rate even if a system still keeps up, commits/s.
    #[arg(long, default_value_t = 100_000.0)]
    pub saturation_max: f64,
    /// Saturation: measured seconds per step (after --saturation-warmup-seconds).
    #[arg(long, default_value_t = 3.0)]
    pub saturation_seconds: f64,
    /// Saturation: seconds of load at the step's rate before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub saturation_warmup_seconds: f64,
    /// Saturation: a step is sustained when at least 99% of its rate is acknowledged and the commit p99 is at most this, ms.
    #[arg(long, default_value_t = 50.0)]
    pub saturation_p99_ms: f64,
    /// Saturation: Borealis' client connections, one ladder each (ack = disk and memory).
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub borealis_saturation_connections: Vec<usize>,
    /// Saturation: PostgreSQL's client sessions, one ladder each (synchronous_commit on and local); a session
    /// runs one transaction at a time, so each system is reported at its best count.
    #[arg(long, value_delimiter = ',', default_value = "8,32,64")]
    pub pg_saturation_connections: Vec<usize>,
}

impl SaturationArgs {
    pub fn check(&self) -> anyhow::Result<()> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !(positive(self.saturation_start)
            && self.saturation_factor.is_finite()
            && self.saturation_factor > 1.0
            && self.saturation_max >= self.saturation_start)
        {
            anyhow::bail!("--saturation-start must be positive, --saturation-factor above 1, --saturation-max at least the start");
        }
        if !(positive(self.saturation_seconds) && positive(self.saturation_warmup_seconds) && positive(self.saturation_p99_ms)) {
            anyhow::bail!("--saturation-seconds, --saturation-warmup-seconds and --saturation-p99-ms must be positive");
        }
        if self.borealis_saturation_connections.iter().chain(&self.pg_saturation_connections).any(|&c| c == 0)
            || self.borealis_saturation_connections.is_empty()
            || self.pg_saturation_connections.is_empty()
        {
            anyhow::bail!("--borealis-saturation-connections and --pg-saturation-connections: positive counts, at least one each");
        }
        Ok(())
    }

    /// The ladder's rates: the start, then each the previous times the factor, rounded, up to the maximum.
    pub fn rates(&self) -> Vec<f64> {
        let mut rates = vec![self.saturation_start];
        loop {
            let last = *rates.last().expect("the start");
            // At least one more commit/s, so that the ladder climbs whatever the rounding.
            let next = (last * self.saturation_factor).round().max(last + 1.0);
            if next > self.saturation_max {
                return rates;
            }
            rates.push(next);
        }
    }
}

/// One step of a ladder: medians over its runs.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Step {
    pub rate: f64,
    /// Runs measured: fewer than --runs when the first ones decided the step.
    pub runs: usize,
    pub throughput_commits_per_s: f64,
    pub commit_p99_us: f64,
    /// Sum over runs of failed or unanswered commits.
    pub errors: u64,
    /// At least 99% of the rate acknowledged, and commit p99 within the bound.
    pub sustained: bool,
}

impl Step {
    pub fn new(rate: f64, runs: usize, throughput_commits_per_s: f64, commit_p99_us: f64, errors: u64, p99_us_max: f64) -> Self {
        let sustained = throughput_commits_per_s >= ACKED_SHARE_MIN * rate && commit_p99_us <= p99_us_max;
        Step { rate, runs, throughput_commits_per_s, commit_p99_us, errors, sustained }
    }

    /// The step from its runs' measurements.
    pub fn of(rate: f64, runs: &[Measurement], p99_us_max: f64) -> Self {
        let m = |f: &dyn Fn(&Measurement) -> f64| median(runs.iter().map(f).collect());
        Step::new(rate, runs.len(), m(&|r| r.throughput_commits_per_s), m(&|r| r.commit_latency_us.p99 as f64), runs.iter().map(|r| r.errors).sum(), p99_us_max)
    }
}

/// Whether a step's verdict is already known from the first of its `runs` runs, as (acknowledged
/// commits/s, commit p99 µs): it is when a majority of all its runs is on the same side of a bound, so
/// the medians of all of them would be too. The remaining runs of such a step are skipped.
pub fn known_verdict(done: &[(f64, f64)], runs: usize, rate: f64, p99_us_max: f64) -> Option<bool> {
    let majority = runs / 2 + 1;
    let acked = done.iter().filter(|(t, _)| *t >= ACKED_SHARE_MIN * rate).count();
    let fast = done.iter().filter(|(_, p99)| *p99 <= p99_us_max).count();
    if done.len() - acked >= majority || done.len() - fast >= majority {
        Some(false)
    } else if acked >= majority && fast >= majority {
        Some(true)
    } else {
        None
    }
}

/// One system, durability and connection count up the ladder.
#[derive(Serialize, Clone, Debug)]
pub struct Ladder {
    pub system: String,
    pub durability: String,
    pub connections: usize,
    pub steps: Vec<Step>,
}

impl Ladder {
    /// Still climbing: every step so far was sustained (the ladder stops at the first that is not).
    pub fn climbing(&self) -> bool {
        self.steps.iter().all(|s| s.sustained)
    }

    /// The highest rate sustained before the first step that was not; 0 when the first was not.
    pub fn highest_sustained(&self) -> f64 {
        self.steps.iter().take_while(|s| s.sustained).map(|s| s.rate).fold(0.0, f64::max)
    }

    /// The step that ended the ladder, if one did (else it reached the maximum rate).
    pub fn first_unsustained(&self) -> Option<&Step> {
        self.steps.iter().find(|s| !s.sustained)
    }
}

/// The ladder of `system` and `durability` with the highest sustained rate (the fewest connections on a tie).
pub fn best<'a>(ladders: impl IntoIterator<Item = &'a Ladder>, system: &str, durability: &str) -> Option<&'a Ladder> {
    ladders
        .into_iter()
        .filter(|l| l.system == system && l.durability == durability)
        .min_by(|a, b| b.highest_sustained().total_cmp(&a.highest_sustained()).then(a.connections.cmp(&b.connections)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::args_from;

    #[test]
    fn the_ladder_climbs_by_the_factor_up_to_the_maximum() {
        let a: SaturationArgs = args_from(&["--saturation-max", "3000"]).unwrap();
        assert_eq!(a.rates(), vec![1000.0, 1250.0, 1563.0, 1954.0, 2443.0]);
        let a: SaturationArgs = args_from(&["--saturation-start", "2", "--saturation-factor", "1.1", "--saturation-max", "5"]).unwrap();
        assert_eq!(a.rates(), vec![2.0, 3.0, 4.0, 5.0], "at least 1 commit/s more per step");
        assert!(args_from::<SaturationArgs>(&["--saturation-factor", "1"]).unwrap().check().is_err());
        assert!(args_from::<SaturationArgs>(&[]).unwrap().check().is_ok());
    }

    #[test]
    fn a_step_is_sustained_with_99_percent_acknowledged_and_p99_in_bound() {
        let limit = 50_000.0;
        assert!(Step::new(1000.0, 1, 990.0, 50_000.0, 0, limit).sustained);
        assert!(!Step::new(1000.0, 1, 989.0, 1_000.0, 0, limit).sustained, "less than 99% acknowledged");
        assert!(!Step::new(1000.0, 1, 1000.0, 50_001.0, 0, limit).sustained, "p99 over the bound");
    }

    #[test]
    fn a_step_ends_early_once_a_majority_of_its_runs_decides_it() {
        let (rate, limit) = (1000.0, 50_000.0);
        let (pass, slow, short) = ((1000.0, 10_000.0), (1000.0, 60_000.0), (900.0, 10_000.0));
        assert_eq!(known_verdict(&[], 3, rate, limit), None);
        assert_eq!(known_verdict(&[pass], 3, rate, limit), None);
        assert_eq!(known_verdict(&[pass, pass], 3, rate, limit), Some(true));
        assert_eq!(known_verdict(&[slow, slow], 3, rate, limit), Some(false));
        assert_eq!(known_verdict(&[short, short], 3, rate, limit), Some(false));
        assert_eq!(known_verdict(&[slow, short], 3, rate, limit), None, "each bound is missed once only: the medians may pass");
        assert_eq!(known_verdict(&[pass, slow], 3, rate, limit), None);
        assert_eq!(known_verdict(&[pass], 1, rate, limit), Some(true));
        // With an even count the median is the mean of the middle two: only unanimity decides.
        assert_eq!(known_verdict(&[pass], 2, rate, limit), None);
        assert_eq!(known_verdict(&[pass, slow], 2, rate, limit), None);
    }

    #[test]
    fn the_highest_sustained_rate_is_the_last_before_the_first_failure() {
        let step = |rate: f64, sustained: bool| Step::new(rate, 1, if sustained { rate } else { rate * 0.5 }, 1_000.0, 0, 50_000.0);
        let ladder = |connections: usize, steps: Vec<Step>| Ladder { system: "postgres".into(), durability: "on".into(), connections, steps };
        let l = ladder(8, vec![step(1000.0, true), step(1250.0, true), step(1563.0, false)]);
        assert!(!l.climbing());
        assert_eq!(l.highest_sustained(), 1250.0);
        assert_eq!(l.first_unsustained().unwrap().rate, 1563.0);
        // A later sustained step does not count: the ladder had stopped.
        assert_eq!(ladder(8, vec![step(1000.0, true), step(1250.0, false), step(1563.0, true)]).highest_sustained(), 1000.0);
        assert_eq!(ladder(8, vec![step(1000.0, false)]).highest_sustained(), 0.0);
        let top = ladder(64, vec![step(1000.0, true), step(1250.0, true), step(1563.0, true)]);
        assert!(top.climbing() && top.first_unsustained().is_none());
        let ladders = vec![ladder(32, vec![step(1000.0, true), step(1250.0, true), step(1563.0, false)]), l, top];
        assert_eq!(best(&ladders, "postgres", "on").unwrap().connections, 64, "the highest rate");
        assert_eq!(best(&ladders[..2], "postgres", "on").unwrap().connections, 8, "on a tie, the fewest connections");
        assert!(best(&ladders, "postgres", "local").is_none());
    }
}
