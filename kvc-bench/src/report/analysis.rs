//! The report's workload-analysis section: [`crate::analyze`] on the trace, with its
//! recommendations and the hit-rate curve it draws them from.

use std::fmt::Write as _;

use super::svg::{BarChart, LineChart};
use super::{Mode, ReportData, ReportError};
use crate::analyze::{Analysis, AnalyzeConfig, analyze};
use crate::trace::TraceRequest;

/// The section's heading.
pub const HEADING: &str = "## Workload analysis and recommended sizes";

/// Analyses the trace at the mode's size.
pub(crate) fn measure(trace: &[TraceRequest], mode: Mode) -> Result<Analysis, ReportError> {
    let mut cfg = AnalyzeConfig::new();
    let (limit, block, points) = match mode {
        Mode::Tiny => (300, 512, 3),
        Mode::Quick => (3_000, 512, 5),
        Mode::Default => (usize::MAX, 64, 8),
        Mode::Full => (usize::MAX, 16, 10),
    };
    cfg.block_size = block;
    cfg.capacity_points = points;
    analyze(&trace[..limit.min(trace.len())], &cfg).map_err(|e| ReportError::Section {
        section: "analysis",
        message: e.to_string(),
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Writes the section (and its plots) from the data.
pub(crate) fn render(md: &mut String, plots: &mut Vec<(String, String)>, d: &ReportData) {
    let _ = writeln!(md, "{HEADING}\n");
    let Some(a) = &d.analysis else {
        let _ = writeln!(md, "Skipped: no trace.\n");
        return;
    };
    let _ = writeln!(
        md,
        "> **Workload:** {} requests over {:.0} s ({:.2}/s); sizes for {} on {} ({} KV bytes \
         per token, {} KV tokens on the device)  \n> **Machine:** {}  \n> **Measured:** {} · \
         **Reproduce:** `{}` (or `kvc-bench analyze --trace PATH`)\n",
        a.requests,
        a.duration_s,
        a.arrival_rate,
        a.model,
        a.gpu,
        a.kv_bytes_per_token,
        a.device_kv_tokens,
        d.host.describe(),
        d.date,
        d.command
    );
    let _ = writeln!(
        md,
        "| | mean | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|---:|"
    );
    for (name, x) in [
        ("input tokens", &a.input),
        ("output tokens", &a.output),
        ("turns per conversation", &a.sessions.turns),
        ("gap between turns (ms)", &a.sessions.gap_ms),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {} | {} | {} | {} |",
            x.mean, x.p50, x.p90, x.p99, x.max
        );
    }
    let _ = writeln!(
        md,
        "\nAn unbounded cache serves {} of input tokens ({}-token blocks); {} of requests \
         reuse an earlier request's first block; {} conversations inferred ({} multi-turn, \
         {} of requests continue one).\n",
        pct(a.prefix_repetition),
        a.block_size,
        pct(a.requests_reusing),
        a.sessions.sessions,
        a.sessions.multi_turn,
        pct(a.sessions.continuation_share)
    );
    let _ = writeln!(md, "| recommendation | value | from |\n|---|---:|---|");
    for r in &a.recommendations {
        let gib = r
            .bytes
            .map(|b| format!(" ({:.1} GiB)", b as f64 / f64::from(1u32 << 30)))
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} {}{gib} | {} |",
            r.what,
            r.value,
            r.unit,
            r.because.replace('|', "\\|")
        );
    }
    md.push('\n');
    let note = format!("{} · {} · {}", d.date, d.host.describe(), d.command);
    let curve = LineChart {
        title: "Hit rate against capacity (analyzer)".into(),
        note: note.clone(),
        x_label: "cache capacity (tokens, log scale)".into(),
        y_label: "% of input tokens from cache".into(),
        log_x: true,
        series: vec![
            (
                "LRU".into(),
                a.capacity
                    .iter()
                    .map(|r| (r.capacity_tokens as f64, 100.0 * r.lru))
                    .collect(),
            ),
            (
                "offline optimum".into(),
                a.capacity
                    .iter()
                    .map(|r| (r.capacity_tokens as f64, 100.0 * r.optimal))
                    .collect(),
            ),
        ],
    }
    .to_svg();
    let lengths = BarChart {
        title: "Input length distribution (requests per power-of-two bucket)".into(),
        note,
        y_label: "requests".into(),
        categories: a
            .input
            .histogram
            .iter()
            .map(|(lo, hi, _)| format!("{lo}-{hi}"))
            .collect(),
        series: vec![(
            "requests".into(),
            a.input
                .histogram
                .iter()
                .map(|&(_, _, n)| n as f64)
                .collect(),
        )],
    }
    .to_svg();
    let _ = writeln!(
        md,
        "![analyzer hit rate](analysis-hit-rate.svg)\n\n![input lengths](analysis-input-lengths.svg)\n"
    );
    plots.push(("analysis-hit-rate.svg".into(), curve));
    plots.push(("analysis-input-lengths.svg".into(), lengths));
}
