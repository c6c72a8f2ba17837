//! Latency summaries, HdrHistogram percentile-distribution files (.hgrm) and medians.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Microsecond latency histogram: 1 µs to 1 h, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct LatencyUs {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub count: u64,
}

impl LatencyUs {
    pub fn of(h: &Histogram<u64>) -> Self {
        LatencyUs { p50: h.value_at_quantile(0.5), p99: h.value_at_quantile(0.99), p999: h.value_at_quantile(0.999), max: h.max(), count: h.len() }
    }
}

/// Writes `h` in HdrHistogram's percentile-distribution text format, values
/// scaled by `unit_ratio` (1000.0 gives milliseconds from microseconds).
pub fn write_hgrm(path: &Path, h: &Histogram<u64>, unit_ratio: f64) -> Result<()> {
    let mut out = String::new();
    let _ = writeln!(out, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 { format!("{:14.2}", 1.0 / (1.0 - q)) } else { format!("{:>14}", "inf") };
        let _ = writeln!(out, "{:12.3} {:2.12} {:10} {inv}", v.value_iterated_to() as f64 / unit_ratio, q, v.count_since_last_iteration());
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]\n#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.mean() / unit_ratio,
        h.stdev() / unit_ratio,
        h.max() as f64 / unit_ratio,
        h.len(),
        h.buckets(),
        h.distinct_values()
    );
    std::fs::write(path, out).with_context(|| format!("write {}", path.display()))
}

/// Median of a list (mean of the two middle values for an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    assert!(!xs.is_empty(), "median of nothing");
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The middle element of `xs` by `key` (the upper middle for an even count): the run whose histogram represents a set of runs.
pub fn median_by<T, K: Ord>(xs: &[T], key: impl Fn(&T) -> K) -> &T {
    let mut sorted: Vec<&T> = xs.iter().collect();
    sorted.sort_by_key(|x| key(x));
    sorted[sorted.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(*median_by(&[30, 10, 20], |&x| x), 20);
    }

    #[test]
    fn hgrm_has_the_standard_shape() {
        let mut h = latency_histogram();
        for v in 1..=1000 {
            h.record(v).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.hgrm");
        write_hgrm(&p, &h, 1.0).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
        assert!(text.contains("#[Max     =     1000.000, Total count    =         1000]"), "{text}");
    }
}
