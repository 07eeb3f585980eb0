//! Metric curves as SVG (plotters' SVG backend needs no fonts on the machine).

use plotters::prelude::*;
use std::path::Path;

/// One named curve of `(step, value)` points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Plots one or more curves of a metric against the step, on linear axes.
pub fn plot_series(path: &Path, title: &str, metric: &str, series: &[Series]) -> Result<(), String> {
    let points = series.iter().flat_map(|series| series.points.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        if y.is_finite() {
            x_max = x_max.max(x);
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
    }
    if !y_min.is_finite() {
        return Err("no finite values to plot".to_string());
    }
    if y_max - y_min < 1e-12 {
        y_max = y_min + 1.0;
    }
    let temporary = path.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&temporary, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|error| error.to_string())?;
        let margin = (y_max - y_min) * 0.05;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, (y_min - margin)..(y_max + margin))
            .map_err(|error| error.to_string())?;
        chart.configure_mesh().x_desc("step").y_desc(metric).draw().map_err(|error| error.to_string())?;
        for (index, series) in series.iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    series.points.iter().copied().filter(|(_, y)| y.is_finite()),
                    color.stroke_width(2),
                ))
                .map_err(|error| error.to_string())?
                .label(series.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|error| error.to_string())?;
        }
        root.present().map_err(|error| error.to_string())?;
    }
    std::fs::rename(&temporary, path).map_err(|error| format!("cannot write {}: {error}", path.display()))
}
