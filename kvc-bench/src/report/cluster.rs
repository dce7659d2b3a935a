//! The report's cluster section: [`crate::cluster`] on the trace, KV-aware routing against
//! round-robin and least-loaded, with local tiers and with a shared tier, beside Mooncake's
//! global-against-local hit-rate claim.

use std::fmt::Write as _;
use std::path::Path;

use super::svg::BarChart;
use super::{Mode, ReportData, ReportError};
use crate::cluster::{ClusterConfig, ClusterReport, run};
use crate::trace::TraceRequest;

/// The section's heading.
pub const HEADING: &str = "## Many engines: KV-aware routing";

/// Mooncake (FAST'25) reports up to this much higher hit rate from its global cache than from
/// local caches.
pub const MOONCAKE_GLOBAL_OVER_LOCAL: f64 = 2.36;

/// Runs the scenario at the mode's size.
pub(crate) fn measure(trace: &[TraceRequest], mode: Mode) -> Result<ClusterReport, ReportError> {
    let mut cfg = ClusterConfig::new();
    cfg.limit = match mode {
        Mode::Tiny => 300,
        Mode::Quick => 3_000,
        Mode::Default | Mode::Full => usize::MAX,
    };
    run(trace, &cfg).map_err(|e| ReportError::Section {
        section: "cluster",
        message: e.to_string(),
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Writes the section (and its plot) from the data.
pub(crate) fn render(
    md: &mut String,
    plots: &mut Vec<(String, String)>,
    d: &ReportData,
    trace: Option<&Path>,
) {
    let _ = writeln!(md, "{HEADING}\n");
    let Some(c) = &d.cluster else {
        let _ = writeln!(md, "Skipped: no trace.\n");
        return;
    };
    let cfg = &c.config;
    let _ = writeln!(
        md,
        "> **Workload:** the first {} requests of {}, arrivals compressed ×{:.2} so the \
         offered prefill load is {:.0}% of {} simulated {} engines on {} (one prefills {:.0} \
         tokens/s); {} device-cache and {} host tokens per engine, 512-token blocks, LRU per \
         tier; with the shared tier the host memory of all engines is one pool  \n\
         > **Machine:** simulated (roofline cost model) on {}  \n\
         > **Measured:** {} · **Reproduce:** `{}` (or `kvc-bench scenario cluster --json`)\n",
        c.requests,
        trace.map_or_else(|| "the trace".into(), |p| p.display().to_string()),
        c.time_scale,
        100.0 * cfg.target_utilisation,
        cfg.engines,
        cfg.model,
        cfg.gpu,
        c.engine_prefill_tok_s,
        cfg.device_tokens,
        cfg.host_tokens,
        d.host.describe(),
        d.date,
        d.command
    );
    let _ = writeln!(
        md,
        "| routing | tiers | hit rate | device | host | shared | TTFT p50 | TTFT p99 | busiest \
         engine / mean |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for v in &c.variants {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.0} ms | {:.0} ms | {:.2} |",
            v.policy,
            if v.shared_tier { "shared" } else { "local" },
            pct(v.hit_rate),
            pct(v.hit_device),
            pct(v.hit_host),
            pct(v.hit_shared),
            v.ttft_p50_ms,
            v.ttft_p99_ms,
            v.busy_max_over_mean
        );
    }
    let _ = writeln!(
        md,
        "\nOne unbounded cache seeing every request would serve {} of prompt tokens.\n",
        pct(c.infinite_hit_rate)
    );
    let _ = writeln!(
        md,
        "Global (shared tier) over local hit rate, against Mooncake's up to {MOONCAKE_GLOBAL_OVER_LOCAL}×:"
    );
    for (p, x) in &c.global_over_local {
        let _ = writeln!(md, "- {p}: {x:.2}×");
    }
    md.push('\n');
    let categories: Vec<String> = c
        .variants
        .iter()
        .map(|v| {
            format!(
                "{} ({})",
                v.policy,
                if v.shared_tier { "shared" } else { "local" }
            )
        })
        .collect();
    let svg = BarChart {
        title: format!("{} engines: hit rate and TTFT by routing", cfg.engines),
        note: format!("{} · {} · {}", d.date, d.host.describe(), d.command),
        y_label: "hit rate (%) / TTFT p99 (s)".into(),
        categories,
        series: vec![
            (
                "hit rate %".into(),
                c.variants.iter().map(|v| 100.0 * v.hit_rate).collect(),
            ),
            (
                "TTFT p99 (s)".into(),
                c.variants.iter().map(|v| v.ttft_p99_ms / 1e3).collect(),
            ),
        ],
    }
    .to_svg();
    let file = "cluster.svg".to_string();
    let _ = writeln!(md, "![cluster routing]({file})\n");
    plots.push((file, svg));
}
