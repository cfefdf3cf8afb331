//! PNG line plots for the benchmark sweeps (plotters' bitmap backend; text in DejaVu Sans,
//! embedded, so no system font library is needed).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::{Error, Result};

/// One named line of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// Axis scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Linear.
    Linear,
    /// Base-2 logarithmic (for sizes that double).
    Log2,
}

/// A line plot: title, axis labels and scales, series.
#[derive(Debug, Clone)]
pub struct LinePlot {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// X scale.
    pub x_scale: Scale,
    /// The lines.
    pub series: Vec<Series>,
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font parses; a failure here would only lose the text.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn plot_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Other(format!("plotting {}: {e}", path.display()))
}

impl LinePlot {
    /// Draws the plot into a `width × height` PNG at `path`. Series with no finite point are
    /// skipped; a plot with none is an error.
    pub fn write_png(&self, path: &Path, width: u32, height: u32) -> Result<()> {
        register_font();
        let fail = plot_err(path);
        let series: Vec<&Series> = self
            .series
            .iter()
            .filter(|s| s.points.iter().any(|(x, y)| x.is_finite() && y.is_finite()))
            .collect();
        let points = || {
            series
                .iter()
                .flat_map(|s| s.points.iter())
                .filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0)
        };
        let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
        for &(x, y) in points() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if !x0.is_finite() {
            return Err(fail("no finite points to plot".into()));
        }
        let tx = |x: f64| match self.x_scale {
            Scale::Linear => x,
            Scale::Log2 => x.log2(),
        };
        let (a, b) = (tx(x0), tx(x1));
        let pad = match self.x_scale {
            Scale::Linear => ((b - a) * 0.05).max(0.5),
            Scale::Log2 => 0.5,
        };
        let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d((a - pad)..(b + pad), 0f64..(y1 * 1.1).max(1e-9))
            .map_err(|e| fail(e.to_string()))?;
        let scale = self.x_scale;
        // Log2 axes label the powers of two only (ticks fall on quarter steps).
        let x_fmt = move |v: &f64| match scale {
            Scale::Linear => format!("{v:.0}"),
            Scale::Log2 if (v - v.round()).abs() < 1e-6 => format!("{:.0}", 2f64.powf(v.round())),
            Scale::Log2 => String::new(),
        };
        let x_ticks = match scale {
            Scale::Linear => 10,
            Scale::Log2 => ((b - a + 2.0 * pad) * 4.0).round() as usize + 1,
        };
        chart
            .configure_mesh()
            .x_labels(x_ticks)
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_label_formatter(&x_fmt)
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0)
                .map(|&(x, y)| (tx(x), y))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| fail(e.to_string()))?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
                .map_err(|e| fail(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
        Ok(())
    }
}
