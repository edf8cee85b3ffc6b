//! The bench's latency histograms as SVG (plotters' SVG backend): one chart
//! per timer phase with the guest-side, host-side and host-floor
//! distributions, on a logarithmic latency axis.

use std::path::Path;

use plotters::prelude::*;

/// One distribution: its name and its buckets (each bucket's largest value
/// in ns and how many values it holds), in increasing order.
#[derive(Clone, Debug)]
pub struct Series {
    /// The legend.
    pub name: String,
    /// `(upper bound ns, count)`.
    pub buckets: Vec<(u64, u64)>,
}

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw '{path}': {message}")]
pub struct SvgError {
    path: String,
    message: String,
}

const COLORS: [RGBColor; 3] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
];

/// Draws `series` as percent of values per bucket against latency in us
/// (log scale) into `path`.
pub fn latency_histogram(path: &Path, title: &str, series: &[Series]) -> Result<(), SvgError> {
    let fail = |e: &dyn std::fmt::Display| SvgError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let to_us = |ns: u64| (ns.max(1) as f64) / 1000.0;
    let (mut lo, mut hi) = (f64::MAX, 0f64);
    for (upper, _) in series.iter().flat_map(|s| &s.buckets) {
        lo = lo.min(to_us(*upper));
        hi = hi.max(to_us(*upper));
    }
    if hi == 0.0 {
        (lo, hi) = (1.0, 10.0);
    }
    let x_range = (lo / 1.5).max(0.01)..(hi * 1.5);
    let shares: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            let total: u64 = s.buckets.iter().map(|b| b.1).sum();
            s.buckets
                .iter()
                .map(|&(upper, n)| (to_us(upper), 100.0 * n as f64 / total.max(1) as f64))
                .collect()
        })
        .collect();
    let y_max = shares.iter().flatten().map(|p| p.1).fold(1.0f64, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range.log_scale(), 0.0..y_max)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("lateness (us, log scale; 12.5 % buckets)")
        .y_desc("% of deliveries")
        .draw()
        .map_err(|e| fail(&e))?;
    for (i, (s, points)) in series.iter().zip(shares).enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_chart_is_an_svg_document_with_its_legend() {
        let path = std::env::temp_dir().join(format!("metronome-svg-{}.svg", std::process::id()));
        let series = vec![
            Series {
                name: "guest".into(),
                buckets: vec![(20_000, 3), (40_000, 1)],
            },
            Series {
                name: "host".into(),
                buckets: vec![(5_000, 4)],
            },
        ];
        latency_histogram(&path, "timer", &series).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
        assert!(text.contains("<text"));
        assert!(
            text.contains("\nguest\n") && text.contains("\nhost\n"),
            "the legend"
        );
        assert!(text.trim_end().ends_with("</svg>"));
    }
}
