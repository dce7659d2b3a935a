//! A small hand-written SVG chart writer: grouped bar charts and line charts with axes, ticks,
//! a legend and escaped labels. No plotting dependency; the output is plain SVG 1.1 that any
//! browser or markdown viewer renders.
//!
//! Values that are not finite are drawn as zero (bars) or skipped (line points), so a chart is
//! always well-formed and every number in it is finite.

use std::fmt::Write as _;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 110.0;
/// Dash patterns of line series, so lines that coincide stay distinguishable.
const DASHES: &[&str] = &["none", "7 4", "2 3", "10 3 2 3", "4 2", "1 5"];
const PALETTE: &[&str] = &[
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];

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

/// A "nice" step (1, 2 or 5 times a power of ten) giving about `target` intervals over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let span = if span.is_finite() && span > 0.0 {
        span
    } else {
        1.0
    };
    let raw = span / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
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

fn note(svg: &mut String, note: &str) {
    if !note.is_empty() {
        let _ = writeln!(
            svg,
            "<text x=\"8\" y=\"{:.1}\" font-size=\"9\" fill=\"#666\">{}</text>",
            HEIGHT - 5.0,
            escape(note)
        );
    }
}

fn open(svg: &mut String, title: &str) {
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        WIDTH / 2.0,
        escape(title)
    );
}

/// The y axis from 0 (or the data minimum when negative) to a nice maximum: gridlines, tick
/// labels and the axis label. Returns the value → pixel mapping's `(lo, hi)`.
fn y_axis(svg: &mut String, lo: f64, hi: f64, label: &str) -> (f64, f64) {
    let step = nice_step(hi - lo, 5.0);
    let lo = (lo / step).floor() * step;
    let hi = ((hi / step).ceil() * step).max(lo + step);
    let plot_h = HEIGHT - TOP - BOTTOM;
    let mut v = lo;
    while v <= hi + step * 1e-6 {
        let y = TOP + plot_h * (1.0 - (v - lo) / (hi - lo));
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            escape(&tick_label(v))
        );
        v += step;
    }
    let _ = writeln!(
        svg,
        "<text x=\"16\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {:.1})\">{}</text>\n\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
         <line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(label),
        TOP + plot_h,
        TOP + plot_h,
        WIDTH - RIGHT,
        TOP + plot_h,
    );
    (lo, hi)
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

fn legend(svg: &mut String, names: &[&str]) {
    let y = HEIGHT - 22.0;
    let mut x = LEFT;
    for (i, name) in names.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let _ = writeln!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/>\n\
             <text x=\"{:.1}\" y=\"{y:.1}\">{}</text>",
            y - 10.0,
            x + 16.0,
            escape(name)
        );
        x += 28.0 + 6.5 * name.chars().count() as f64;
    }
}

impl BarChart {
    /// Renders the chart as an SVG document.
    #[must_use]
    pub fn to_svg(&self) -> String {
        let mut svg = String::new();
        open(&mut svg, &self.title);
        let values = self
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().map(|&x| finite_or(x, 0.0)));
        let (min, max) = values.fold((0f64, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let (lo, hi) = y_axis(
            &mut svg,
            min,
            if max > min { max } else { min + 1.0 },
            &self.y_label,
        );
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let groups = self.categories.len().max(1) as f64;
        let group_w = plot_w / groups;
        let bars = self.series.len().max(1) as f64;
        let bar_w = group_w * 0.8 / bars;
        let to_y = |v: f64| TOP + plot_h * (1.0 - (v - lo) / (hi - lo));
        for (s, (_, values)) in self.series.iter().enumerate() {
            let color = PALETTE[s % PALETTE.len()];
            for (c, &v) in values.iter().enumerate().take(self.categories.len()) {
                let v = finite_or(v, 0.0);
                let x = LEFT + group_w * c as f64 + group_w * 0.1 + bar_w * s as f64;
                let (y0, y1) = (to_y(v.max(0.0)), to_y(v.min(0.0)));
                let _ = writeln!(
                    svg,
                    "<rect x=\"{x:.1}\" y=\"{y0:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{}</title></rect>",
                    (y1 - y0).max(0.0),
                    escape(&tick_label(v))
                );
            }
        }
        // Category names wrapped onto up to four lines under their group.
        let max_chars = ((group_w / 6.2) as usize).max(6);
        for (c, name) in self.categories.iter().enumerate() {
            let x = LEFT + group_w * (c as f64 + 0.5);
            let y = TOP + plot_h + 15.0;
            let _ = write!(
                svg,
                "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"middle\" font-size=\"11\">"
            );
            for (i, line) in wrap(name, max_chars).iter().take(4).enumerate() {
                let _ = write!(
                    svg,
                    "<tspan x=\"{x:.1}\" dy=\"{}\">{}</tspan>",
                    if i == 0 { "0" } else { "13" },
                    escape(line)
                );
            }
            svg.push_str("</text>\n");
        }
        if self.series.len() > 1 {
            let names: Vec<&str> = self.series.iter().map(|(n, _)| n.as_str()).collect();
            legend(&mut svg, &names);
        }
        note(&mut svg, &self.note);
        svg.push_str("</svg>\n");
        svg
    }
}

impl LineChart {
    /// Renders the chart as an SVG document.
    #[must_use]
    pub fn to_svg(&self) -> String {
        let mut svg = String::new();
        open(&mut svg, &self.title);
        let tx = |x: f64| if self.log_x { x.log10() } else { x };
        let points: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|(_, p)| p.iter().copied())
            .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!self.log_x || x > 0.0))
            .collect();
        let (xmin, xmax) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(x, _)| {
                (lo.min(tx(x)), hi.max(tx(x)))
            });
        let (xmin, xmax) = if xmin.is_finite() && xmax > xmin {
            (xmin, xmax)
        } else if xmin.is_finite() {
            (xmin - 1.0, xmin + 1.0)
        } else {
            (0.0, 1.0)
        };
        let ymax = points.iter().fold(0f64, |hi, &(_, y)| hi.max(y));
        let ymin = points.iter().fold(0f64, |lo, &(_, y)| lo.min(y));
        let (lo, hi) = y_axis(
            &mut svg,
            ymin,
            if ymax > ymin { ymax } else { ymin + 1.0 },
            &self.y_label,
        );
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        // A little margin so points at the ends are not on the axis.
        let pad = (xmax - xmin) * 0.04;
        let (xa, xb) = (xmin - pad, xmax + pad);
        let to_x = |x: f64| LEFT + plot_w * (tx(x) - xa) / (xb - xa);
        let to_y = |y: f64| TOP + plot_h * (1.0 - (y - lo) / (hi - lo));
        // X ticks at the distinct x values of the data (a handful of capacities, say).
        let mut xs: Vec<f64> = points.iter().map(|&(x, _)| x).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        for &x in &xs {
            let px = to_x(x);
            let _ = writeln!(
                svg,
                "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
                 <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                TOP + plot_h,
                TOP + plot_h + 5.0,
                TOP + plot_h + 18.0,
                escape(&tick_label(x))
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            LEFT + plot_w / 2.0,
            TOP + plot_h + 40.0,
            escape(&self.x_label)
        );
        for (s, (_, pts)) in self.series.iter().enumerate() {
            let color = PALETTE[s % PALETTE.len()];
            let mut path = String::new();
            for &(x, y) in pts
                .iter()
                .filter(|&&(x, y)| x.is_finite() && y.is_finite() && (!self.log_x || x > 0.0))
            {
                let _ = write!(
                    path,
                    "{}{:.1},{:.1}",
                    if path.is_empty() { "M" } else { " L" },
                    to_x(x),
                    to_y(y)
                );
                let _ = writeln!(
                    svg,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"><title>{}</title></circle>",
                    to_x(x),
                    to_y(y),
                    escape(&tick_label(y))
                );
            }
            if !path.is_empty() {
                let _ = writeln!(
                    svg,
                    "<path d=\"{path}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{}\"/>",
                    DASHES[s % DASHES.len()]
                );
            }
        }
        let names: Vec<&str> = self.series.iter().map(|(n, _)| n.as_str()).collect();
        legend(&mut svg, &names);
        note(&mut svg, &self.note);
        svg.push_str("</svg>\n");
        svg
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
    fn nice_steps_are_one_two_or_five() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(0.9, 5.0), 0.2);
        assert_eq!(nice_step(0.0, 5.0), 0.2);
        assert_eq!(tick_label(3_000_000.0), "3M");
        assert_eq!(tick_label(250_000.0), "250k");
        assert_eq!(tick_label(0.25), "0.25");
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
        for svg in [bars, lines] {
            assert!(svg.starts_with("<svg"));
            assert!(svg.trim_end().ends_with("</svg>"));
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
    }
}
