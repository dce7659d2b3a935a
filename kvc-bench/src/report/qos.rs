//! The QoS part of a scenario's report: how the memory and compute reservations acted in each
//! variant (what was borrowed, what queued, what was downgraded), the first-token budget of the
//! finance example, and the plots of the QoS scenarios.

use std::fmt::Write as _;

use super::svg::BarChart;
use crate::sim::qos::{ComputeCounters, FINANCE_TTFT_BUDGET_MS};
use crate::sim::scenarios::ScenarioReport;

/// `(file name, SVG document)`.
type Plot = (String, String);

fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// Writes the reservation table of a scenario whose variants carry QoS counters (nothing for
/// others) and returns its plots; `note` is the plots' footnote.
pub(crate) fn section(md: &mut String, s: &ScenarioReport, note: &str) -> Vec<Plot> {
    if s.variants.iter().all(|v| v.qos.is_none()) {
        return Vec::new();
    }
    let _ = writeln!(
        md,
        "Reservations at work. Memory: allocations of the critical class that **borrowed** \
         dynamic blocks (its pinned region was full), placements told to **wait**, lower-class \
         preemptions, and **downgrades** (the lowest class capped). Compute: the critical share \
         at the end (tokens a step), steps with a critical first token at risk, critical tokens \
         run within the share and **borrowed** beyond it, critical tokens **queued** to a later \
         step, held tokens left idle, best-effort chunks shrunk or deferred, best-effort \
         decodes deferred, best-effort sequences preempted for critical admissions.\n"
    );
    let _ = writeln!(
        md,
        "| variant | mem borrowed | mem waits | mem preemptions | downgrades | share | at risk \
         | within share | borrowed | queued | idle held | chunks shrunk / deferred | decodes \
         deferred | preempted | p99 TTFT per class |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for v in &s.variants {
        let Some(q) = &v.qos else {
            continue;
        };
        let p99s: Vec<String> = v
            .result
            .classes
            .iter()
            .map(|c| format!("{}: {:.0} ms", c.qos, c.ttft_p99_ms))
            .collect();
        let compute = q.compute.as_ref().map_or_else(
            || "— | — | — | — | — | — | — | — | —".to_string(),
            |ComputeCounters {
                 final_share_tokens,
                 stats: c,
             }| {
                format!(
                    "{} | {} | {} | {} | {} | {} | {} / {} | {} | {}",
                    final_share_tokens,
                    c.steps_at_risk,
                    c.reserved_tokens,
                    c.borrowed_tokens,
                    c.queued_tokens,
                    c.idle_held_tokens,
                    c.chunks_shrunk,
                    c.chunks_deferred,
                    c.decodes_deferred,
                    c.preemptions
                )
            },
        );
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {compute} | {} |",
            cell(&v.name),
            q.mem_borrowed,
            q.mem_waits,
            q.mem_preemptions,
            q.mem_downgrades,
            p99s.join(", ")
        );
    }
    md.push('\n');
    let mut plots = Vec::new();
    match s.scenario.as_str() {
        "qos-finance" => {
            let b = FINANCE_TTFT_BUDGET_MS;
            let shares: Vec<f64> = s
                .variants
                .iter()
                .map(|v| {
                    let t = v.result.ttft_ms.first().map_or(&[][..], Vec::as_slice);
                    if t.is_empty() {
                        0.0
                    } else {
                        100.0 * t.iter().filter(|&&x| x <= b).count() as f64 / t.len() as f64
                    }
                })
                .collect();
            let _ = writeln!(md, "Critical questions answered within {b:.0} ms:\n");
            for (v, share) in s.variants.iter().zip(&shares) {
                let _ = writeln!(md, "- {}: {share:.1}%", v.name);
            }
            md.push('\n');
            plots.push((
                "qos-finance-within-budget.svg".to_string(),
                BarChart {
                    title: format!("qos-finance: critical first tokens within {b:.0} ms"),
                    note: note.to_string(),
                    y_label: "percent of critical requests".to_string(),
                    categories: s.variants.iter().map(|v| v.name.clone()).collect(),
                    series: vec![("within budget".to_string(), shares)],
                }
                .to_svg(),
            ));
        }
        "qos-degradation" => {
            let p99 = |rank: u8| -> Vec<f64> {
                s.variants
                    .iter()
                    .map(|v| {
                        v.result
                            .classes
                            .iter()
                            .find(|c| c.qos == rank)
                            .map_or(0.0, |c| c.ttft_p99_ms)
                    })
                    .collect()
            };
            plots.push((
                "qos-degradation-ttft.svg".to_string(),
                BarChart {
                    title: "qos-degradation: p99 TTFT per class as critical load rises".to_string(),
                    note: note.to_string(),
                    y_label: "ms".to_string(),
                    categories: s.variants.iter().map(|v| v.name.clone()).collect(),
                    series: vec![
                        ("critical p99".to_string(), p99(0)),
                        ("best-effort p99".to_string(), p99(2)),
                    ],
                }
                .to_svg(),
            ));
        }
        _ => {}
    }
    plots
}
