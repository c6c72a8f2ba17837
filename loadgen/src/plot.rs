//! SVG charts of benchmark results, drawn with `plotters` (SVG backend only: text is written as
//! `<text>` elements for the viewer to render, so no font library is linked).
//! Plain data in, an ~800x500 SVG file out. Empty input still writes a valid chart, captioned
//! "(no data)", so a failed run leaves a readable file rather than a missing one.

use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Chart size in pixels.
const SIZE: (u32, u32) = (800, 500);
/// The lowest value drawn on a logarithmic axis: non-positive values are clamped to it.
const LOG_FLOOR: f64 = 1e-3;
const FONT: &str = "sans-serif";
/// Tableau 10: distinct colours, readable on white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One line on a chart: a label and its (x, y) points, drawn in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { label: label.into(), points }
    }
}

/// The y axis of a line chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YScale {
    /// Logarithmic (latencies span µs to seconds): values below 0.001 are drawn at 0.001.
    Log,
    /// Linear from 0 (sizes, counts): how a quantity grows shows as it is.
    Linear,
}

/// A line chart with a linear x axis and a logarithmic y axis (latencies span µs to seconds):
/// one coloured line with point markers per series, and a legend. Empty series are skipped;
/// y values below 0.001 (zero, negative) are drawn at 0.001 so the log axis works.
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    line_chart_with(path, title, (x_label, y_label), series, YScale::Log, &[])
}

/// `line_chart` with the y axis on `scale`, and `markers`: labelled vertical lines at x values
/// (events, such as a node's restart). `labels` are the x and y axes' descriptions.
pub fn line_chart_with(path: &Path, title: &str, labels: (&str, &str), series: &[Series], scale: YScale, markers: &[(f64, &str)]) -> Result<()> {
    let floor = |y: f64| if scale == YScale::Log { y.max(LOG_FLOOR) } else { y };
    let drawn: Vec<(&str, Vec<(f64, f64)>)> =
        series.iter().filter(|s| !s.points.is_empty()).map(|s| (s.label.as_str(), s.points.iter().map(|&(x, y)| (x, floor(y))).collect())).collect();
    let xs = drawn.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.0)).chain(markers.iter().map(|m| m.0));
    let ys = drawn.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.1));
    let x_range = linear_range(xs);
    let caption = caption(title, drawn.is_empty());

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.caption(&caption, (FONT, 22)).margin(12).x_label_area_size(45).y_label_area_size(75);
    // A linear axis from 0 mostly leaves its lower right empty (quantities that grow); a log one its upper left.
    match scale {
        YScale::Log => draw_lines(builder.build_cartesian_2d(x_range, log_range(ys).log_scale())?, labels, &drawn, markers, SeriesLabelPosition::UpperLeft)?,
        YScale::Linear => draw_lines(builder.build_cartesian_2d(x_range, zero_based_range(ys))?, labels, &drawn, markers, SeriesLabelPosition::LowerRight)?,
    }
    finish(root, path)
}

/// The mesh, the lines with point markers, the legend (at `legend_at`) and the vertical markers of a line chart.
fn draw_lines<'a, Y>(
    mut chart: ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    (x_label, y_label): (&str, &str),
    drawn: &[(&str, Vec<(f64, f64)>)],
    markers: &[(f64, &str)],
    legend_at: SeriesLabelPosition,
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_labels(10)
        .y_labels(12)
        .x_label_formatter(&|v| fmt_num(*v))
        .y_label_formatter(&|v| fmt_num(*v))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .draw()?;
    let (y_low, y_high) = (chart.y_range().start, chart.y_range().end);
    let (line, text_colour) = (BLACK.mix(0.45), BLACK.mix(0.7));
    for (i, &(x, text)) in markers.iter().enumerate() {
        chart.draw_series(std::iter::once(PathElement::new(vec![(x, y_low), (x, y_high)], line.stroke_width(1))))?;
        // Labels alternate between two heights, so that close markers stay readable.
        let y = if i % 2 == 0 { y_high } else { y_low };
        let pos = Pos::new(HPos::Left, if i % 2 == 0 { VPos::Top } else { VPos::Bottom });
        let style = TextStyle::from((FONT, 12)).color(&text_colour).pos(pos);
        chart.draw_series(std::iter::once(EmptyElement::at((x, y)) + Text::new(text.to_string(), (3, 0), style)))?;
    }
    for (i, (label, pts)) in drawn.iter().enumerate() {
        let c = colour(i);
        chart.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?.label(*label).legend(move |(x, y)| legend_mark(x, y, c));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
    }
    if !drawn.is_empty() {
        legend(&mut chart, legend_at)?;
    }
    Ok(())
}

/// HdrHistogram's classic percentile plot: x is the percentile on the 1/(1-q) log scale (ticks 0%, 90%,
/// 99%, … 99.999%), y the latency in milliseconds on a log axis, from histograms recorded in µs. One line each.
pub fn percentile_chart(path: &Path, title: &str, hists: &[(&str, &Histogram<u64>)]) -> Result<()> {
    let drawn: Vec<(&str, Vec<(f64, f64)>)> = hists.iter().filter(|(_, h)| !h.is_empty()).map(|&(label, h)| (label, percentile_points(h))).collect();
    // Nines on the x axis: 5 (99.999%) unless more than 10^6 samples reach further.
    let max_len = hists.iter().map(|(_, h)| h.len()).max().unwrap_or(0);
    let nines = if max_len > 1_000_000 { 6 } else { 5 };
    let ys = drawn.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.1));
    let y_range = log_range(ys);
    let caption = caption(title, drawn.is_empty());

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&caption, (FONT, 22))
        .margin(12)
        .margin_right(30)
        .x_label_area_size(45)
        .y_label_area_size(85)
        .build_cartesian_2d(0.0..f64::from(nines), y_range.log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency")
        .x_labels(nines as usize + 1)
        .y_labels(12)
        .x_label_formatter(&|v| nines_label(*v))
        .y_label_formatter(&|v| format!("{} ms", fmt_num(*v)))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .draw()?;
    for (i, (label, pts)) in drawn.iter().enumerate() {
        let c = colour(i);
        let x_max = f64::from(nines);
        let pts = pts.iter().map(move |&(x, y)| (x.min(x_max), y));
        chart.draw_series(LineSeries::new(pts, c.stroke_width(2)))?.label(*label).legend(move |(x, y)| legend_mark(x, y, c));
    }
    if !drawn.is_empty() {
        legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    }
    finish(root, path)
}

/// A failover timeline: bars of acknowledged commits per `bucket_ms` over milliseconds since the start
/// of the load (`acks_ms` holds each acknowledgement's time), plus labelled vertical markers at given times.
pub fn failover_timeline(path: &Path, title: &str, acks_ms: &[f64], bucket_ms: f64, markers: &[(f64, &str)]) -> Result<()> {
    anyhow::ensure!(bucket_ms > 0.0 && bucket_ms.is_finite(), "bucket_ms must be positive, got {bucket_ms}");
    let acks: Vec<f64> = acks_ms.iter().copied().filter(|t| t.is_finite() && *t >= 0.0).collect();
    let end = acks.iter().chain(markers.iter().map(|(t, _)| t)).fold(0.0f64, |m, &t| m.max(t));
    let buckets = ((end / bucket_ms).floor() as usize + 1).min(1_000_000);
    let mut counts = vec![0u64; buckets];
    for t in &acks {
        counts[((t / bucket_ms) as usize).min(buckets - 1)] += 1;
    }
    let x_end = buckets as f64 * bucket_ms;
    let y_max = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let caption = caption(title, acks.is_empty());

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&caption, (FONT, 22))
        .margin(12)
        .margin_right(20)
        .x_label_area_size(45)
        .y_label_area_size(75)
        // Headroom above the tallest bar for the marker labels.
        .build_cartesian_2d(0.0..x_end, 0.0..y_max * (1.15 + 0.08 * markers.len() as f64))?;
    let bucket_label = fmt_num(bucket_ms);
    chart
        .configure_mesh()
        .x_desc("ms since start of load")
        .y_desc(format!("commits acknowledged per {bucket_label} ms"))
        .x_labels(10)
        .x_label_formatter(&|v| fmt_num(*v))
        .y_label_formatter(&|v| fmt_num(*v))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 15))
        .disable_x_mesh()
        .y_max_light_lines(1)
        .draw()?;
    let bar = colour(0);
    chart.draw_series(counts.iter().enumerate().filter(|(_, &n)| n > 0).map(|(i, &n)| {
        let x0 = i as f64 * bucket_ms;
        Rectangle::new([(x0, 0.0), (x0 + bucket_ms, n as f64)], bar.mix(0.8).filled())
    }))?;
    // Each marker: a vertical line and its label, stacked top-down so close markers don't overlap;
    // labels on the right half of the chart are right-aligned so they stay inside it.
    let top = chart.y_range().end;
    for (i, &(t, text)) in markers.iter().enumerate() {
        let c = colour(i + 3);
        chart.draw_series(std::iter::once(PathElement::new(vec![(t, 0.0), (t, top)], c.stroke_width(2))))?;
        let y = top * (0.98 - 0.065 * i as f64);
        let right_half = t > x_end / 2.0;
        let pos = Pos::new(if right_half { HPos::Right } else { HPos::Left }, VPos::Top);
        let style = TextStyle::from((FONT, 14)).color(&c).pos(pos);
        let label = format!("{text} ({} ms)", fmt_num(t));
        let dx = if right_half { -5 } else { 5 };
        chart.draw_series(std::iter::once(EmptyElement::at((t, y)) + Text::new(label, (dx, 0), style)))?;
    }
    finish(root, path)
}

/// (x, latency in ms) points of a percentile plot; x = log10(1/(1-q)), so 1 is 90%, 2 is 99%, ...
/// The last point (q = 1) has x = infinity: the caller caps it at the axis end.
fn percentile_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    h.iter_quantiles(5)
        .map(|v| {
            let q = v.quantile_iterated_to();
            let x = if q >= 1.0 { f64::INFINITY } else { (1.0 / (1.0 - q)).log10() };
            (x, (h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0).max(LOG_FLOOR))
        })
        .collect()
}

/// "0%", "90%", "99%", "99.9%", ... for x = 0, 1, 2, 3, ...
fn nines_label(x: f64) -> String {
    let n = x.round() as i32;
    if (x - f64::from(n)).abs() > 1e-9 || n < 0 {
        return String::new();
    }
    match n {
        0 => "0%".into(),
        1 => "90%".into(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)).replace(".%", "%"),
    }
}

/// The x range of the data, padded by 3% on each side (a single x gets a unit-wide range).
fn linear_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return 0.0..1.0;
    }
    if lo == hi {
        return lo - 0.5..hi + 0.5;
    }
    let pad = (hi - lo) * 0.03;
    // Don't pad below zero when the data starts at or above zero: a rate axis shouldn't show -500.
    let start = if lo >= 0.0 { (lo - pad).max(0.0) } else { lo - pad };
    start..hi + pad
}

/// A linear range from 0 (or the smallest value, when negative) to a tenth above the largest.
fn zero_based_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi <= lo {
        return lo..lo + 1.0;
    }
    lo..hi + (hi - lo) * 0.1
}

/// A log-axis range holding the values: from the power of ten at or below the smallest (so the axis
/// always has a labelled tick) to 1.5 times the largest.
fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.filter(|v| v.is_finite()).map(|v| v.max(LOG_FLOOR)).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return 0.1..10.0;
    }
    let decade = 10f64.powf(lo.log10().floor());
    // A hair below the power of ten, or rounding in plotters' tick placement skips its label.
    decade * 0.999..(hi * 1.5).max(decade * 2.0)
}

fn caption(title: &str, empty: bool) -> String {
    if empty {
        format!("{title} (no data)")
    } else {
        title.to_string()
    }
}

/// A readable tick label: "1,500", "25", "2.5", "0.05", "0.001".
fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let a = v.abs();
    if a >= 1000.0 {
        let digits = format!("{:.0}", a);
        let mut out = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        return if v < 0.0 { format!("-{out}") } else { out };
    }
    // Three significant digits at most, trailing zeros trimmed.
    let decimals = if a == 0.0 { 0 } else { (2 - a.log10().floor() as i32).clamp(0, 9) as usize };
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

fn legend_mark(x: i32, y: i32, c: RGBColor) -> PathElement<(i32, i32)> {
    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
}

fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(chart: &mut ChartContext<'a, DB, CT>, position: SeriesLabelPosition) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(|e| anyhow::anyhow!("drawing the legend: {e}"))
}

fn finish(root: DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, path: &Path) -> Result<()> {
    root.present().with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> String {
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "not an SVG: {}", &svg[..svg.len().min(80)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        svg
    }

    #[test]
    fn plot_line_chart_has_title_labels_and_legend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lat.svg");
        let series = [
            Series::new("Borealis p99", vec![(1000.0, 0.8), (5000.0, 1.2), (20000.0, 3.5)]),
            Series::new("PostgreSQL p99", vec![(1000.0, 2.0), (5000.0, 9.0), (20000.0, 450.0)]),
            Series::new("zero and negative", vec![(1000.0, 0.0), (2000.0, -1.0)]),
            Series::new("empty one", vec![]),
        ];
        line_chart(&path, "Commit latency vs rate", "commits/s", "latency (ms)", &series).unwrap();
        let svg = read(&path);
        for s in ["Commit latency vs rate", "commits/s", "latency (ms)", "Borealis p99", "PostgreSQL p99", "zero and negative", "20,000"] {
            assert!(svg.contains(s), "missing {s:?}");
        }
        assert!(!svg.contains("empty one"), "an empty series is skipped");
        assert!(svg.contains("<circle"), "point markers");
    }

    #[test]
    fn plot_linear_chart_with_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.svg");
        let series = [Series::new("node 1", vec![(0.0, 0.0), (1.0, 50.0), (2.0, 80.0)]), Series::new("node 2", vec![(0.0, 10.0), (2.0, 90.0)])];
        line_chart_with(&path, "Disk per node", ("s", "MiB"), &series, YScale::Linear, &[(1.5, "restart n1"), (1.8, "restart n2")]).unwrap();
        let svg = read(&path);
        for s in ["Disk per node", "node 1", "node 2", "restart n1", "restart n2", "MiB"] {
            assert!(svg.contains(s), "missing {s:?}");
        }
        let p = dir.path().join("empty.svg");
        line_chart_with(&p, "Nothing", ("s", "MiB"), &[], YScale::Linear, &[]).unwrap();
        assert!(read(&p).contains("Nothing (no data)"));
    }

    #[test]
    fn plot_empty_inputs_write_a_chart_marked_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.svg");
        line_chart(&p, "Nothing", "x", "y", &[]).unwrap();
        assert!(read(&p).contains("Nothing (no data)"));
        let p = dir.path().join("b.svg");
        percentile_chart(&p, "No histograms", &[]).unwrap();
        assert!(read(&p).contains("No histograms (no data)"));
        let p = dir.path().join("c.svg");
        failover_timeline(&p, "No acks", &[], 10.0, &[(5.0, "writer killed")]).unwrap();
        let svg = read(&p);
        assert!(svg.contains("No acks (no data)") && svg.contains("writer killed"));
        assert!(failover_timeline(&p, "bad", &[1.0], 0.0, &[]).is_err());
    }

    #[test]
    fn plot_percentile_chart_of_two_histograms() {
        let mut fast = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let mut slow = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for i in 0..100_000u64 {
            fast.record(300 + i % 700).unwrap(); // 0.3 to 1 ms
            slow.record(1_000 + (i * 7919) % 20_000).unwrap(); // 1 to 21 ms
        }
        slow.record(2_000_000).unwrap(); // one 2 s outlier
        let empty = Histogram::<u64>::new(3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pct.svg");
        percentile_chart(&path, "Commit latency at 5,000/s", &[("Borealis", &fast), ("PostgreSQL", &slow), ("none", &empty)]).unwrap();
        let svg = read(&path);
        for s in ["Commit latency at 5,000/s", "Borealis", "PostgreSQL", "percentile", "0%", "90%", "99%", "99.9%", "99.99%", "99.999%", " ms"] {
            assert!(svg.contains(s), "missing {s:?}");
        }
        assert!(!svg.contains(">none<"));
    }

    #[test]
    fn plot_failover_timeline_has_bars_and_markers() {
        let mut acks: Vec<f64> = (0..2000).map(|i| i as f64).collect();
        acks.extend((0..1500).map(|i| 2020.0 + i as f64 * 0.66));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("failover.svg");
        let markers = [(2000.0, "writer killed"), (2020.0, "first commit on new writer")];
        failover_timeline(&path, "Failover under 1,000 commits/s", &acks, 50.0, &markers).unwrap();
        let svg = read(&path);
        for s in ["Failover under 1,000 commits/s", "writer killed (2,000 ms)", "first commit on new writer (2,020 ms)", "ms since start of load", "per 50 ms"]
        {
            assert!(svg.contains(s), "missing {s:?}");
        }
        assert!(svg.contains("<rect"));
    }

    #[test]
    fn plot_tick_labels_read_as_numbers() {
        assert_eq!(fmt_num(1000.0), "1,000");
        assert_eq!(fmt_num(1234567.0), "1,234,567");
        assert_eq!(fmt_num(0.5), "0.5");
        assert_eq!(fmt_num(0.05), "0.05");
        assert_eq!(fmt_num(2.50), "2.5");
        assert_eq!(fmt_num(20.0), "20");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(-1500.0), "-1,500");
        let labels: Vec<String> = (0..=5).map(|n| nines_label(f64::from(n))).collect();
        assert_eq!(labels, ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]);
        assert_eq!(nines_label(0.5), "");
    }
}
