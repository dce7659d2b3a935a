//! The report's charts, drawn with `plotters` through its SVG backend only: grouped bar charts
//! and line charts with axes, ticks, a legend and a provenance note. The output is plain SVG
//! that any browser or markdown viewer renders; text is left to the viewer's fonts (no font
//! library is linked).
//!
//! Values that are not finite are drawn as zero (bars) or skipped (line points), so a chart is
//! always well-formed and every number in it is finite. If drawing fails, the document still
//! parses: it holds the title and the error.

use plotters::coord::Shift;
use plotters::prelude::*;

const WIDTH: u32 = 720;
const HEIGHT: u32 = 400;
/// Room below the plot for the legend and the provenance note.
const FOOTER: u32 = 44;
/// Dash patterns (dash, gap in pixels) of line series after the first, so lines that
/// coincide stay distinguishable.
const DASHES: &[(u32, u32)] = &[(7, 4), (2, 3), (10, 3), (4, 2), (1, 5)];
const PALETTE: &[RGBColor] = &[
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x9c, 0x75, 0x5f),
];
const FONT: &str = "sans-serif";

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// A bar chart: one group of bars per category, one bar per series in each group.
#[derive(Clone, Debug, Default)]
pub struct BarChart {
    /// Title drawn above the plot.
    pub title: String,
    /// A small line at the bottom (where and when it was measured); empty for none.
    pub note: String,
    /// Label of the value axis.
    pub y_label: String,
    /// The category names along the x axis.
    pub categories: Vec<String>,
    /// `(series name, one value per category)`.
    pub series: Vec<(String, Vec<f64>)>,
}

/// A line chart over a numeric x axis, optionally logarithmic.
#[derive(Clone, Debug, Default)]
pub struct LineChart {
    /// Title drawn above the plot.
    pub title: String,
    /// A small line at the bottom (where and when it was measured); empty for none.
    pub note: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Whether x is drawn on a log10 scale (every x must then be positive; others are skipped).
    pub log_x: bool,
    /// `(series name, points (x, y))`.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Escapes text for SVG character data and attribute values.
#[must_use]
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn finite_or(x: f64, default: f64) -> f64 {
    if x.is_finite() { x } else { default }
}

/// A tick label: compact, with thousands as `k` and millions as `M`.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{}G", trim(v / 1e9))
    } else if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// Splits `text` at spaces into lines of at most `width` characters (a longer word stays
/// whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// The top of a value axis: a little above the largest finite value, 1 when there is none.
fn axis_top(values: impl Iterator<Item = f64>) -> f64 {
    let max = values.filter(|v| v.is_finite()).fold(0.0, f64::max);
    if max > 0.0 { max * 1.1 } else { 1.0 }
}

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Draws the legend (one swatch and name per series) and the note in the footer.
fn footer(area: &DrawingArea<SVGBackend<'_>, Shift>, names: &[&str], note: &str) -> DrawResult {
    let mut x = 80i32;
    for (i, name) in names.iter().enumerate() {
        area.draw(&Rectangle::new([(x, 4), (x + 12, 16)], color(i).filled()))?;
        area.draw(&Text::new((*name).to_string(), (x + 16, 4), (FONT, 13)))?;
        x += 28 + (6.5 * name.chars().count() as f64) as i32;
    }
    if !note.is_empty() {
        area.draw(&Text::new(
            note.to_string(),
            (8, 28),
            (FONT, 9).into_font().color(&RGBColor(0x66, 0x66, 0x66)),
        ))?;
    }
    Ok(())
}

/// A valid document holding only `title` and why the chart could not be drawn.
fn fallback(title: &str, err: &dyn std::fmt::Display) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\">\
         <text x=\"20\" y=\"30\">{}</text><text x=\"20\" y=\"60\">{}</text></svg>\n",
        escape(title),
        escape(&err.to_string())
    )
}

impl BarChart {
    /// Renders the chart as an SVG document.
    #[must_use]
    pub fn to_svg(&self) -> String {
        let mut svg = String::new();
        let drawn = self.draw(&mut svg);
        match drawn {
            Ok(()) => svg,
            Err(e) => fallback(&self.title, &e),
        }
    }

    fn draw(&self, out: &mut String) -> DrawResult {
        let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let (plot, foot) = root.split_vertically(HEIGHT - FOOTER);
        let n = self.categories.len().max(1);
        let top = axis_top(self.series.iter().flat_map(|(_, v)| v.iter().copied()));
        let mut chart = ChartBuilder::on(&plot)
            .caption(&self.title, (FONT, 16))
            .margin(10)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..n as f64, 0f64..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .max_light_lines(1)
            .x_labels(0)
            .y_desc(&self.y_label)
            .y_label_formatter(&|v| tick_label(*v))
            .draw()?;
        // Each category's group takes 80% of its slot, split evenly among the series.
        let k = self.series.len().max(1) as f64;
        let width = 0.8 / k;
        for (s, (_, values)) in self.series.iter().enumerate() {
            let fill = color(s).filled();
            chart.draw_series(values.iter().enumerate().map(|(c, &v)| {
                let x0 = c as f64 + 0.1 + width * s as f64;
                Rectangle::new([(x0, 0.0), (x0 + width, finite_or(v, 0.0).max(0.0))], fill)
            }))?;
        }
        // Category names under their groups, wrapped at spaces.
        let area = chart.plotting_area();
        for (c, name) in self.categories.iter().enumerate() {
            let (x, y) = area.map_coordinate(&(c as f64 + 0.5, 0.0));
            for (line, text) in wrap(name, 18).into_iter().enumerate() {
                let style = TextStyle::from((FONT, 12).into_font()).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Top,
                    ),
                );
                plot.draw(&Text::new(text, (x, y + 6 + 14 * line as i32), style))?;
            }
        }
        let names: Vec<&str> = self.series.iter().map(|(n, _)| n.as_str()).collect();
        footer(&foot, &names, &self.note)?;
        root.present()?;
        Ok(())
    }
}

impl LineChart {
    /// Renders the chart as an SVG document.
    #[must_use]
    pub fn to_svg(&self) -> String {
        let mut svg = String::new();
        let drawn = self.draw(&mut svg);
        match drawn {
            Ok(()) => svg,
            Err(e) => fallback(&self.title, &e),
        }
    }

    /// The points that can be drawn: finite, and with a positive x on a log axis.
    fn points(&self, s: usize) -> Vec<(f64, f64)> {
        self.series[s]
            .1
            .iter()
            .copied()
            .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!self.log_x || x > 0.0))
            .collect()
    }

    fn draw(&self, out: &mut String) -> DrawResult {
        let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let (plot, foot) = root.split_vertically(HEIGHT - FOOTER);
        let all: Vec<Vec<(f64, f64)>> = (0..self.series.len()).map(|s| self.points(s)).collect();
        let xs = || all.iter().flatten().map(|p| p.0);
        let (mut lo, mut hi) = (
            xs().fold(f64::INFINITY, f64::min),
            xs().fold(f64::NEG_INFINITY, f64::max),
        );
        if !(lo.is_finite() && hi.is_finite()) {
            (lo, hi) = if self.log_x { (1.0, 10.0) } else { (0.0, 1.0) };
        }
        if hi <= lo {
            (lo, hi) = if self.log_x {
                (lo / 2.0, hi * 2.0)
            } else {
                (lo - 1.0, hi + 1.0)
            };
        }
        let top = axis_top(all.iter().flatten().map(|p| p.1));
        let builder = || {
            let mut b = ChartBuilder::on(&plot);
            b.caption(&self.title, (FONT, 16))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(64);
            b
        };
        // The two axis kinds have different types; the drawing is the same.
        macro_rules! draw_on {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .max_light_lines(1)
                    .x_desc(&self.x_label)
                    .y_desc(&self.y_label)
                    .x_label_formatter(&|v| tick_label(*v))
                    .y_label_formatter(&|v| tick_label(*v))
                    .draw()?;
                for (s, points) in all.iter().enumerate() {
                    let style = color(s).stroke_width(2);
                    if s == 0 {
                        chart.draw_series(LineSeries::new(points.iter().copied(), style))?;
                    } else {
                        let (dash, gap) = DASHES[(s - 1) % DASHES.len()];
                        chart.draw_series(DashedLineSeries::new(
                            points.iter().copied(),
                            dash,
                            gap,
                            style,
                        ))?;
                    }
                    chart.draw_series(
                        points.iter().map(|&p| Circle::new(p, 3, color(s).filled())),
                    )?;
                }
            }};
        }
        if self.log_x {
            draw_on!(builder().build_cartesian_2d((lo..hi).log_scale(), 0f64..top)?);
        } else {
            draw_on!(builder().build_cartesian_2d(lo..hi, 0f64..top)?);
        }
        let names: Vec<&str> = self.series.iter().map(|(n, _)| n.as_str()).collect();
        footer(&foot, &names, &self.note)?;
        root.present()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_spaces() {
        assert_eq!(
            wrap("contiguous (max-length reservation)", 12),
            ["contiguous", "(max-length", "reservation)"]
        );
        assert_eq!(wrap("a b c", 3), ["a b", "c"]);
        assert!(wrap("", 5).is_empty());
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(tick_label(3_000_000.0), "3M");
        assert_eq!(tick_label(250_000.0), "250k");
        assert_eq!(tick_label(0.25), "0.25");
    }

    #[test]
    fn charts_draw_their_text_and_shapes() {
        let bars = BarChart {
            title: "memory: admitted <concurrency>".into(),
            note: "2026-11-30".into(),
            y_label: "requests".into(),
            categories: vec!["contiguous max-length reservation".into(), "paged".into()],
            series: vec![("mean running".into(), vec![25.6, 104.3])],
        }
        .to_svg();
        assert!(bars.contains("admitted &lt;concurrency&gt;"), "{bars}");
        assert!(bars.contains("reservation") && bars.contains("mean running"));
        assert!(
            bars.matches("<rect").count() >= 3,
            "two bars and a swatch: {bars}"
        );
        let lines = LineChart {
            title: "hit rate".into(),
            note: String::new(),
            x_label: "capacity (tokens)".into(),
            y_label: "percent".into(),
            log_x: true,
            series: vec![
                ("lru".into(), vec![(1e5, 4.3), (1e6, 5.5), (1e7, 29.4)]),
                ("optimum".into(), vec![(1e5, 9.2), (1e6, 25.8), (1e7, 37.4)]),
            ],
        }
        .to_svg();
        assert!(lines.contains("capacity (tokens)") && lines.contains("optimum"));
        assert_eq!(lines.matches("<circle").count(), 6, "{lines}");
    }

    #[test]
    fn non_finite_values_never_reach_the_document() {
        let bars = BarChart {
            title: "t".into(),
            note: "n".into(),
            y_label: "y".into(),
            categories: vec!["a".into(), "b".into()],
            series: vec![("s".into(), vec![f64::NAN, f64::INFINITY])],
        }
        .to_svg();
        let lines = LineChart {
            title: "t".into(),
            note: "n".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_x: true,
            series: vec![("s".into(), vec![(0.0, 1.0), (10.0, f64::NAN), (100.0, 2.0)])],
        }
        .to_svg();
        let empty = LineChart::default().to_svg();
        for svg in [bars, lines, empty] {
            assert!(svg.starts_with("<svg"), "{svg}");
            assert!(svg.trim_end().ends_with("</svg>"));
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
    }
}
