//! SVG plots of a benchmark's rounds, written next to its JSON: one panel
//! per metric, one line per variant (plain, mesh…), so that drift, noise
//! and outliers show at a glance where a median hides them.
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use serde_json::Value;

/// One metric: a line of (x, value) points per variant; x is the round
/// unless `x` says otherwise.
pub(crate) struct Panel {
    pub title: String,
    pub unit: &'static str,
    pub x: &'static str,
    pub series: Vec<(&'static str, Vec<(f64, f64)>)>,
}

impl Panel {
    /// A panel over rounds: for each variant, the samples of it that
    /// `keep` keeps, as (their `round`, their `key` × `scale`).
    pub fn of_rounds(
        title: impl Into<String>,
        unit: &'static str,
        samples: &[Value],
        variants: &[&'static str],
        keep: impl Fn(&Value) -> bool,
        key: &str,
        scale: f64,
    ) -> Self {
        let series = variants
            .iter()
            .map(|&variant| {
                let line = samples
                    .iter()
                    .filter(|s| s["variant"] == variant && keep(s))
                    .filter_map(|s| Some((s["round"].as_f64()?, s[key].as_f64()? * scale)))
                    .collect();
                (variant, line)
            })
            .collect();
        Self {
            title: title.into(),
            unit,
            x: "round",
            series,
        }
    }
}

/// Writes the plot beside the report `json_path` (same name, `.svg`) and
/// says where; a plot that cannot be drawn fails the run like a report
/// that cannot be written.
pub(crate) fn beside(json_path: &Path, title: &str, panels: &[Panel]) -> anyhow::Result<()> {
    let svg = json_path.with_extension("svg");
    rounds(&svg, title, panels)?;
    println!("plot: {}", svg.display());
    Ok(())
}

/// Colours of the variants, in the order they are given.
const COLOURS: [RGBColor; 4] = [
    RGBColor(0x55, 0x55, 0x55),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
];

/// Writes `panels` as a grid of line charts (two columns) to `path`.
pub(crate) fn rounds(path: &Path, title: &str, panels: &[Panel]) -> anyhow::Result<()> {
    anyhow::ensure!(!panels.is_empty(), "nothing to plot");
    let rows = panels.len().div_ceil(2);
    let size = (1100, 60 + 320 * rows as u32);
    let root = SVGBackend::new(path, size).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let body = root.titled(title, ("sans-serif", 22))?;
        for (panel, area) in panels.iter().zip(body.split_evenly((rows, 2))) {
            chart(&area, panel)?;
        }
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("plotting {}", path.display()))
}

fn chart<'a>(
    area: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    panel: &Panel,
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let points = || panel.series.iter().flat_map(|(_, p)| p.iter());
    let x_max = points().map(|p| p.0).fold(0.0, f64::max);
    let y_max = points().map(|p| p.1).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        // From zero, so that ratios read off the picture are true.
        .build_cartesian_2d(-0.25..x_max + 0.25, 0.0..y_max * 1.15 + f64::EPSILON)?;
    chart
        .configure_mesh()
        .x_desc(panel.x)
        .y_desc(panel.unit)
        .x_labels((x_max as usize + 1).min(12))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    for ((name, line), colour) in panel.series.iter().zip(COLOURS.iter().cycle()) {
        chart
            .draw_series(LineSeries::new(
                line.iter().copied(),
                colour.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2)));
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    Ok(())
}
