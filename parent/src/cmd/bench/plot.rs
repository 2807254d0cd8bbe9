//! Latency distributions as an SVG plot: latency against percentile, the percentile axis in
//! "nines" (50 %, 90 %, 99 %, 99.9 % equally spaced), as HdrHistogram's own plots draw them,
//! so the tail is as readable as the median.

// Plot coordinates are floating point; the conversions are intended.
#![allow(clippy::as_conversions, clippy::cast_precision_loss)]

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::error::CliError;

/// The deepest percentile drawn: 99.999 %.
const MAX_NINES: f64 = 5.0;

/// The x coordinate of quantile `q`: −log10(1 − q), so 0.9 → 1, 0.99 → 2.
fn nines(q: f64) -> f64 {
    (-(1.0 - q).max(10f64.powf(-MAX_NINES)).log10()).clamp(0.0, MAX_NINES)
}

/// The axis label of `x` nines: 1 → "90%", 2 → "99%".
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = (x - 2.0).ceil().max(0.0) as usize;
    format!("{p:.digits$}%")
}

/// One line per histogram (microseconds), latency in milliseconds on a log axis.
fn points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    h.iter_quantiles(8)
        .map(|v| (nines(v.quantile_iterated_to()), (v.value_iterated_to() as f64 / 1000.0).max(0.001)))
        .collect()
}

fn draw_error(e: impl std::fmt::Display) -> CliError {
    CliError::input(format!("drawing the plot: {e}"))
}

/// Writes `series` (label, histogram in µs) as an SVG file at `path`.
pub(super) fn latency_svg(path: &Path, title: &str, series: &[(String, &Histogram<u64>)]) -> Result<(), CliError> {
    let lines: Vec<(&str, Vec<(f64, f64)>)> = series.iter().map(|(l, h)| (l.as_str(), points(h))).collect();
    let max_ms = lines.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y)).fold(1.0, f64::max);
    let min_ms = lines.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y)).fold(max_ms, f64::min);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..MAX_NINES, ((min_ms / 1.5).max(0.001)..max_ms * 1.5).log_scale())
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(6)
        .y_labels(12)
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(draw_error)?;
    for (i, (label, pts)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(draw_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)?;
    root.present().map_err(draw_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_percentile_axis_is_in_nines() {
        assert!(nines(0.0).abs() < 1e-9);
        assert!((nines(0.9) - 1.0).abs() < 1e-9);
        assert!((nines(0.999) - 3.0).abs() < 1e-9);
        assert!((nines(1.0) - MAX_NINES).abs() < 1e-9);
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(percentile_label(4.0), "99.99%");
    }

    #[test]
    fn a_plot_names_every_series_and_is_an_svg() {
        let dir = keygate_tests::TempDir::new("keygate-plot").expect("dir");
        let path = dir.path().join("p.svg");
        let mut a = Histogram::<u64>::new_with_bounds(1, 100_000_000, 3).expect("h");
        let mut b = a.clone();
        for v in 1..=1000u64 {
            a.record(v * 10).expect("record");
            b.record(v * 100).expect("record");
        }
        latency_svg(&path, "t", &[("one client".into(), &a), ("256 at 400/s".into(), &b)]).expect("plot");
        let svg = std::fs::read_to_string(&path).expect("read");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("one client") && svg.contains("256 at 400/s") && svg.contains("99.9%"));
    }
}
