//! The PNG chart: one panel per cell, a horizontal bar per contender
//! (median ops/s), labelled with the value and the ratio to pgassist.
//!
//! Text goes through plotters' `ab_glyph` backend, which needs a TrueType
//! file: the first one found of `BENCH_FONT` and a few Debian font packages
//! (fonts-dejavu-core, fonts-liberation). Without one the bars are drawn
//! without text, and the table printed by the bench says what they are.

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::CellResult;
use crate::workers::{BoxError, Contender, Res};

const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a system font as "sans-serif"; returns its path, or `None`.
fn register_system_font() -> Option<String> {
    let env = std::env::var("BENCH_FONT").ok();
    for path in env
        .iter()
        .map(String::as_str)
        .chain(FONT_FILES.iter().copied())
    {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps a `&'static` to the font: leak it once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Some(path.to_owned());
            }
        }
    }
    None
}

fn color(c: Contender) -> RGBColor {
    match c {
        Contender::Pgassist => RGBColor(214, 39, 40),
        Contender::PgassistJoin => RGBColor(255, 127, 14),
        Contender::PgassistPinned => RGBColor(240, 150, 150),
        Contender::PgassistPipelined => RGBColor(188, 20, 90),
        Contender::Raw => RGBColor(31, 119, 180),
        Contender::Bb8Tuned => RGBColor(44, 160, 44),
        Contender::Bb8Held => RGBColor(150, 210, 150),
        Contender::Bb8Naive => RGBColor(140, 86, 75),
        Contender::Deadpool => RGBColor(148, 103, 189),
        Contender::Sqlx => RGBColor(127, 127, 127),
        Contender::Pgbench => RGBColor(23, 190, 207),
    }
}

fn short(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

/// Draws the chart; returns the font used (if any) so the caller can say.
pub fn render(results: &[CellResult], path: &Path, subtitle: &str) -> Res<Option<String>> {
    let font = register_system_font();
    let text = font.is_some();
    let columns = 2;
    let rows = results.len().div_ceil(columns).max(1);
    let (w, h) = (1600u32, 90 + 330 * rows as u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(boxed)?;
    let body = if text {
        let (top, body) = root.split_vertically(80);
        top.draw(&Text::new(
            "pgassist vs peers: median ops/s (ratio to pgassist)",
            (20, 12),
            ("sans-serif", 30).into_font(),
        ))
        .map_err(boxed)?;
        top.draw(&Text::new(
            subtitle.to_owned(),
            (20, 50),
            ("sans-serif", 17).into_font().color(&RGBColor(90, 90, 90)),
        ))
        .map_err(boxed)?;
        body
    } else {
        root.clone()
    };
    let panels = body.split_evenly((rows, columns));
    for (r, area) in results.iter().zip(panels.iter()) {
        let n = r.series.len() as u32;
        let max = r.series.iter().map(|s| s.median()).fold(1.0_f64, f64::max);
        let reference = r.reference().unwrap_or(f64::NAN);
        let mut builder = ChartBuilder::on(area);
        builder.margin(12);
        if text {
            builder
                .caption(
                    format!(
                        "{} {} — {} clients, pool {}",
                        r.cell.workload.id(),
                        r.cell.workload.title(),
                        r.cell.clients,
                        r.cell.pool
                    ),
                    ("sans-serif", 19),
                )
                .x_label_area_size(28)
                .y_label_area_size(150);
        }
        let mut chart = builder
            // A segmented 0..k range has k + 1 slots: n bars need 0..n - 1.
            .build_cartesian_2d(0.0..max * 1.45, (0..n - 1).into_segmented())
            .map_err(boxed)?;
        // Index 0 is drawn at the bottom: put the first contender on top.
        let slot = |i: usize| n - 1 - i as u32;
        if text {
            let names: Vec<&str> = r.series.iter().map(|s| s.contender.name()).collect();
            chart
                .configure_mesh()
                .disable_y_mesh()
                .light_line_style(TRANSPARENT)
                .y_labels(n as usize)
                .y_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(k) => names
                        .get((n - 1 - k) as usize)
                        .map_or(String::new(), |s| s.to_string()),
                    _ => String::new(),
                })
                .x_label_formatter(&|x| short(*x))
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(boxed)?;
        }
        for (i, s) in r.series.iter().enumerate() {
            let v = s.median();
            let k = slot(i);
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(k)),
                    (v, SegmentValue::Exact(k + 1)),
                ],
                color(s.contender).filled(),
            );
            bar.set_margin(4, 4, 0, 0);
            chart.draw_series(std::iter::once(bar)).map_err(boxed)?;
            if text {
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("  {}  {:.2}×", short(v), v / reference),
                        (v, SegmentValue::CenterOf(k)),
                        TextStyle::from(("sans-serif", 14).into_font())
                            .pos(Pos::new(HPos::Left, VPos::Center)),
                    )))
                    .map_err(boxed)?;
            }
        }
    }
    root.present().map_err(boxed)?;
    Ok(font)
}

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(e)
}
