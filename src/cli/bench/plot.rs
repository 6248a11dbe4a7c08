//! SVG plots of a benchmark run (plotters, SVG backend only: no fonts or image codecs
//! to build).

use std::path::Path;

use plotters::prelude::*;

use super::ramp::Step;
use crate::loadgen::report::{LoadReport, Sample};

type PlotResult = Result<(), String>;

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn max_of(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0_f64, f64::max).max(1e-9) * 1.1
}

/// One labelled line.
struct Series {
    label: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Labelled lines over time (or anything else on x), axes from 0 to the largest value.
fn lines(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> PlotResult {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let all = || series.iter().flat_map(|s| s.points.iter());
    let x_max = max_of(all().map(|p| p.0));
    let y_max = max_of(all().map(|p| p.1));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    for s in series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), &color))
            .map_err(err)?
            .label(s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Fixes sent and confirmed per second over a run.
pub(crate) fn throughput(r: &LoadReport, title: &str, path: &Path) -> PlotResult {
    let over_time = |f: fn(&Sample) -> f64| r.timeline.iter().map(|s| (s.t_s, f(s))).collect();
    lines(
        path,
        title,
        "time (s)",
        "fixes / s",
        &[
            Series {
                label: "sent",
                color: BLUE,
                points: over_time(|s| s.fixes_sent_per_s),
            },
            Series {
                label: "confirmed",
                color: RED,
                points: over_time(|s| s.fixes_acked_per_s),
            },
        ],
    )
}

/// p50 and p99 ACK latency per second over a run (seconds without confirmations left out).
pub(crate) fn latency(r: &LoadReport, title: &str, path: &Path) -> PlotResult {
    let over_time = |f: fn(&Sample) -> f64| {
        r.timeline
            .iter()
            .filter(|s| s.ack_count > 0)
            .map(|s| (s.t_s, f(s)))
            .collect()
    };
    lines(
        path,
        title,
        "time (s)",
        "ACK latency (ms)",
        &[
            Series {
                label: "p50",
                color: BLUE,
                points: over_time(|s| s.ack_p50_ms),
            },
            Series {
                label: "p99",
                color: RED,
                points: over_time(|s| s.ack_p99_ms),
            },
        ],
    )
}

/// The latency distribution: latency against percentile, the tail stretched out
/// (x = −log10(1 − p), so 90, 99, 99.9, 99.99 are evenly spaced).
pub(crate) fn cdf(r: &LoadReport, title: &str, path: &Path) -> PlotResult {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let nines = |p: f64| -(1.0 - (p / 100.0).min(0.99999)).log10();
    let pts: Vec<(f64, f64)> = r
        .latency_cdf
        .iter()
        .map(|&(p, ms)| (nines(p), ms))
        .collect();
    let y_max = max_of(pts.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..5.0, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .x_labels(6)
        .x_label_formatter(&|x: &f64| {
            let decimals = (x.round() as usize).saturating_sub(1);
            format!("{:.*}", decimals, 100.0 * (1.0 - 10f64.powf(-x.round())))
        })
        .y_desc("ACK latency (ms)")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(pts, &BLUE))
        .map_err(err)?;
    root.present().map_err(err)
}

/// Each ramp step: offered against confirmed rate, and its p99.
pub(crate) fn ramp(steps: &[Step], ceiling_per_s: f64, path: &Path) -> PlotResult {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let x_max = max_of(steps.iter().map(|s| s.offered_fixes_per_s));
    let y_max = max_of(steps.iter().map(|s| s.acked_fixes_per_s)).max(x_max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Ramp: confirmed vs offered (Redis XADD ceiling {ceiling_per_s:.0}/s)"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("offered fixes / s")
        .y_desc("confirmed fixes / s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (x_max, x_max)],
            &BLACK.mix(0.3),
        ))
        .map_err(err)?;
    let mut sorted: Vec<&Step> = steps.iter().collect();
    sorted.sort_by(|a, b| a.offered_fixes_per_s.total_cmp(&b.offered_fixes_per_s));
    chart
        .draw_series(LineSeries::new(
            sorted
                .iter()
                .map(|s| (s.offered_fixes_per_s, s.acked_fixes_per_s)),
            &BLUE,
        ))
        .map_err(err)?;
    chart
        .draw_series(sorted.iter().map(|s| {
            let color = if s.passed { GREEN } else { RED };
            Circle::new(
                (s.offered_fixes_per_s, s.acked_fixes_per_s),
                5,
                color.filled(),
            )
        }))
        .map_err(err)?;
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_written_as_svg() -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(err)?;
        let r = LoadReport {
            timeline: (1..=5)
                .map(|t| Sample {
                    t_s: f64::from(t),
                    fixes_sent_per_s: 100.0,
                    fixes_acked_per_s: 99.0,
                    ack_count: 10,
                    ack_p50_ms: 1.0,
                    ack_p99_ms: 3.0,
                    ..Sample::default()
                })
                .collect(),
            latency_cdf: vec![(50.0, 1.0), (99.0, 3.0), (99.9, 4.0)],
            ..LoadReport::default()
        };
        let steps = [Step {
            offered_fixes_per_s: 100.0,
            acked_fixes_per_s: 99.0,
            passed: true,
            ..Step::default()
        }];
        for (name, f) in [
            ("t.svg", throughput(&r, "t", &dir.path().join("t.svg"))),
            ("l.svg", latency(&r, "l", &dir.path().join("l.svg"))),
            ("c.svg", cdf(&r, "c", &dir.path().join("c.svg"))),
            ("r.svg", ramp(&steps, 1000.0, &dir.path().join("r.svg"))),
        ] {
            f?;
            let svg = std::fs::read_to_string(dir.path().join(name)).map_err(err)?;
            assert!(
                svg.starts_with("<svg") && svg.contains("polyline"),
                "{name}"
            );
        }
        Ok(())
    }
}
