//! Turns a [`ReportData`] into `index.md` and its SVG plots. Pure formatting: every number
//! comes from the data.

use std::fmt::Write as _;

use super::svg::{BarChart, LineChart};
use super::{ReportData, SECTION_HEADINGS};
use crate::sim::engine::SimResult;
use crate::sim::scenarios::ScenarioReport;

/// `(file name, SVG document)`.
type Plot = (String, String);

/// A figure of one variant's result, for a bar chart.
type Metric = fn(&SimResult) -> f64;

/// The footnote of a measured plot: date, machine, command.
fn measured_note(d: &ReportData) -> String {
    format!("{} · {} · {}", d.date, d.host.describe(), d.command)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Thousands separated by commas.
fn int(x: u64) -> String {
    let s = x.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A duration in ns, µs or ms, three significant figures or so.
fn dur(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

fn table_cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The provenance line every figure carries.
fn provenance(out: &mut String, d: &ReportData, workload: &str, machine: &str) {
    let _ = writeln!(
        out,
        "> **Workload:** {}  \n> **Machine:** {}  \n> **Measured:** {} · **Reproduce:** `{}`\n",
        workload, machine, d.date, d.command
    );
}

/// Renders the report.
pub(crate) fn render(d: &ReportData) -> (String, Vec<Plot>) {
    let mut md = String::new();
    let mut plots = Vec::new();
    let _ = writeln!(md, "# kvc benchmark report\n");
    let _ = writeln!(
        md,
        "Mode `{}`, measured {} on {}. Reproduce with `{}`. Every figure below was computed by \
         this run; `docs/reading-the-report.md` in the kvc repository explains each one.\n",
        d.mode.name(),
        d.date,
        d.host.describe(),
        d.command
    );
    scenarios(&mut md, &mut plots, d);
    hit_rate(&mut md, &mut plots, d);
    super::engine_replay::render(&mut md, d);
    bandwidth(&mut md, &mut plots, d);
    micro(&mut md, d);
    super::tiers::render(&mut md, &mut plots, d);
    super::cluster::render(&mut md, &mut plots, d, d.trace.as_deref());
    super::analysis::render(&mut md, &mut plots, d);
    how(&mut md, d);
    (md, plots)
}

fn scenarios(md: &mut String, plots: &mut Vec<Plot>, d: &ReportData) {
    let _ = writeln!(md, "{}\n", SECTION_HEADINGS[0]);
    let _ = writeln!(
        md,
        "The discrete-event simulator runs the real scheduler, allocator, pin policy and prefix \
         cache; a roofline cost model of the GPU stands in for the kernels, so times are \
         simulated. The first variant of each scenario is its baseline.\n"
    );
    for s in &d.scenarios {
        scenario(md, plots, d, s);
    }
}

fn scenario(md: &mut String, plots: &mut Vec<Plot>, d: &ReportData, s: &ScenarioReport) {
    let _ = writeln!(md, "### {}\n", s.scenario);
    let machine = format!("{} — simulated on {}", s.machine, d.host.describe());
    provenance(md, d, &s.workload, &machine);
    let _ = writeln!(
        md,
        "| variant | pool | finished | rejected | tokens/s | vs baseline | preemptions | KV \
         blocks in use (mean / peak) | {TOKEN_UTIL} | mean running | prefix \
         hits | mean latency |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (i, v) in s.variants.iter().enumerate() {
        let r = &v.result;
        // The baseline of a row is the first row that ran the same workload.
        let base = s.variants[..i]
            .iter()
            .find(|b| b.workload_id == v.workload_id);
        let vs = match base {
            Some(b) => format!(
                "{:.2}x",
                r.throughput_tok_s / b.result.throughput_tok_s.max(1e-9)
            ),
            None => "baseline".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} × {} | {}/{} | {} | {:.0} | {} | {} | {} / {} | {} | {:.1} | {} | {:.0} ms |",
            table_cell(&v.name),
            int(v.blocks as u64),
            v.block_size,
            r.finished,
            r.requests,
            r.rejected,
            r.throughput_tok_s,
            vs,
            r.preemptions,
            pct(r.mean_kv_util),
            pct(r.peak_kv_util),
            pct(r.token_util),
            r.mean_running,
            pct(r.prefix_hit_rate),
            r.mean_latency_ms
        );
    }
    let _ = writeln!(md, "\n{TOKEN_UTIL_DEFINITION} {VS_BASELINE_DEFINITION}");
    let _ = writeln!(
        md,
        "\n| variant | QoS class | finished | TTFT p50 | TTFT p99 | TBT p50 | TBT p99 |\n\
         |---|---:|---:|---:|---:|---:|---:|"
    );
    for v in &s.variants {
        for c in &v.result.classes {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} ms | {:.0} ms | {:.1} ms | {:.1} ms |",
                table_cell(&v.name),
                c.name,
                c.finished,
                c.ttft_p50_ms,
                c.ttft_p99_ms,
                c.tbt_p50_ms,
                c.tbt_p99_ms
            );
        }
    }
    let _ = writeln!(md, "\nGoals:\n");
    for g in &s.goals {
        let verdict = if g.met { "met" } else { "**NOT MET**" };
        let _ = writeln!(md, "- {} — {} ({verdict})", g.goal, g.measured);
    }
    md.push('\n');
    let note = format!("{} · {} · {}", s.machine, d.date, d.command);
    // The QoS scenarios' reservation counters and plots.
    for (file, svg) in super::qos::section(md, s, &note) {
        let _ = writeln!(md, "![{}]({file})\n", s.scenario);
        plots.push((file, svg));
    }
    for (file, svg) in scenario_plots(s, &note) {
        let _ = writeln!(md, "![{}]({file})\n", s.scenario);
        plots.push((file, svg));
    }
}

/// The column of [`crate::sim::engine::SimResult::token_util`], and its one definition,
/// stated under every scenario table and in `docs/reading-the-report.md`.
pub(crate) const TOKEN_UTIL: &str = "running tokens / slots in use";

/// The definition printed under each scenario table.
pub(crate) const TOKEN_UTIL_DEFINITION: &str = "*Running tokens / slots in use:* the tokens \
    of the running sequences over the token slots of every allocated block (block size × \
    blocks in use), time-weighted. Blocks the prefix cache keeps for later requests count as \
    in use and hold no running token, so with reuse on this share falls by design.";

/// How "vs baseline" reads, printed under each scenario table.
pub(crate) const VS_BASELINE_DEFINITION: &str = "*vs baseline:* throughput over that of the \
    first row that ran the same workload (a row that is the first of its workload says \
    `baseline`).";

fn bars(
    note: &str,
    title: &str,
    y_label: &str,
    s: &ScenarioReport,
    series: &[(&str, Metric)],
) -> String {
    BarChart {
        title: title.to_string(),
        note: note.to_string(),
        y_label: y_label.to_string(),
        categories: s.variants.iter().map(|v| v.name.clone()).collect(),
        series: series
            .iter()
            .map(|(name, f)| {
                (
                    (*name).to_string(),
                    s.variants.iter().map(|v| f(&v.result)).collect(),
                )
            })
            .collect(),
    }
    .to_svg()
}

fn scenario_plots(s: &ScenarioReport, note: &str) -> Vec<Plot> {
    let name = s.scenario.as_str();
    let mut out = Vec::new();
    match name {
        "memory" => {
            out.push((
                "memory-kv-utilisation.svg".to_string(),
                bars(
                    note,
                    "memory: KV utilisation per variant",
                    "percent",
                    s,
                    &[
                        (TOKEN_UTIL, |r| 100.0 * r.token_util),
                        ("KV blocks in use (mean)", |r| 100.0 * r.mean_kv_util),
                    ],
                ),
            ));
            out.push((
                "memory-concurrency.svg".to_string(),
                bars(
                    note,
                    "memory: admitted concurrency",
                    "mean running requests",
                    s,
                    &[("mean running", |r| r.mean_running)],
                ),
            ));
        }
        "qos-overload" => out.push((
            "qos-overload-ttft.svg".to_string(),
            bars(
                note,
                "qos-overload: TTFT of the most important class",
                "ms",
                s,
                &[
                    ("TTFT p99", |r| {
                        r.classes.first().map_or(0.0, |c| c.ttft_p99_ms)
                    }),
                    ("TTFT p50", |r| {
                        r.classes.first().map_or(0.0, |c| c.ttft_p50_ms)
                    }),
                ],
            ),
        )),
        "shared-prefix" => out.push((
            "shared-prefix-prefill.svg".to_string(),
            bars(
                note,
                "shared-prefix: prompt tokens computed",
                "prompt tokens",
                s,
                &[("prefill tokens", |r| r.prefill_tokens as f64)],
            ),
        )),
        "multi-turn" => out.push((
            "multi-turn-latency.svg".to_string(),
            bars(
                note,
                "multi-turn: mean turn latency",
                "ms",
                s,
                &[("mean latency", |r| r.mean_latency_ms)],
            ),
        )),
        _ => {}
    }
    out.push((
        format!("{name}-throughput.svg"),
        bars(
            note,
            &format!("{name}: throughput"),
            "generated tokens/s (simulated)",
            s,
            &[("tokens/s", |r| r.throughput_tok_s)],
        ),
    ));
    out
}

fn hit_rate(md: &mut String, plots: &mut Vec<Plot>, d: &ReportData) {
    let _ = writeln!(md, "{}\n", SECTION_HEADINGS[1]);
    let Some(h) = &d.hit_rate else {
        let _ = writeln!(
            md,
            "Skipped: {}.\n",
            d.hit_rate_skipped.as_deref().unwrap_or("no trace")
        );
        return;
    };
    let workload = format!(
        "{} requests of {} ({} in the file), {} prompt tokens; each request looks up its \
         longest cached prefix, then caches its full prompt blocks ({}-token blocks, {} \
         hashes: a hit rate does not depend on the hasher, and the fast one keeps the replay \
         short), evicting down to the capacity",
        int(h.requests),
        h.trace.display(),
        int(h.requests_in_file as u64),
        int(h.input_tokens),
        h.block_size,
        h.hasher
    );
    provenance(md, d, &workload, &d.host.describe());
    let names: Vec<&str> = h
        .points
        .first()
        .map(|p| p.policies.iter().map(|(n, _)| n.as_str()).collect())
        .unwrap_or_default();
    let _ = write!(md, "| capacity (tokens) |");
    for n in &names {
        let _ = write!(md, " {n} |");
    }
    let _ = writeln!(
        md,
        " offline optimum | infinite cache | best policy / optimum | replay time |"
    );
    let _ = writeln!(
        md,
        "|---:|{}---:|---:|---:|---:|",
        "---:|".repeat(names.len())
    );
    for p in &h.points {
        let _ = write!(md, "| {} |", int(p.capacity_tokens));
        for (_, rate) in &p.policies {
            let _ = write!(md, " {} |", pct(*rate));
        }
        let best = p.policies.iter().map(|(_, r)| *r).fold(0.0, f64::max);
        let _ = writeln!(
            md,
            " {} | {} | {} | {:.1} s |",
            pct(p.optimal),
            pct(h.infinite),
            if p.optimal > 0.0 {
                pct(best / p.optimal)
            } else {
                "–".into()
            },
            p.elapsed_s
        );
    }
    let mut series: Vec<(String, Vec<(f64, f64)>)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                (*n).to_string(),
                h.points
                    .iter()
                    .map(|p| (p.capacity_tokens as f64, 100.0 * p.policies[i].1))
                    .collect(),
            )
        })
        .collect();
    series.push((
        "offline optimum (Belady)".into(),
        h.points
            .iter()
            .map(|p| (p.capacity_tokens as f64, 100.0 * p.optimal))
            .collect(),
    ));
    series.push((
        "infinite cache".into(),
        h.points
            .iter()
            .map(|p| (p.capacity_tokens as f64, 100.0 * h.infinite))
            .collect(),
    ));
    let svg = LineChart {
        title: "Prefix hit rate against cache capacity".into(),
        note: measured_note(d),
        x_label: "cache capacity (tokens, log scale)".into(),
        y_label: "% of prompt tokens served from cache".into(),
        log_x: true,
        series,
    }
    .to_svg();
    let file = "hit-rate.svg".to_string();
    let _ = writeln!(md, "\n![hit rate against capacity]({file})\n");
    plots.push((file, svg));
}

fn gbs(bytes_per_s: f64) -> String {
    format!("{:.2} GB/s", bytes_per_s / 1e9)
}

fn bandwidth(md: &mut String, plots: &mut Vec<Plot>, d: &ReportData) {
    let b = &d.bandwidth;
    let s = b.shape;
    let _ = writeln!(md, "{}\n", SECTION_HEADINGS[3]);
    let workload = format!(
        "`kvc_kernels::paged_decode`, bf16 KV, batch {} × {} tokens, {} query / {} KV heads of \
         {}, {}-token blocks: {:.0} MiB of KV in buffers that ask for transparent huge pages \
         (`madvise`; the kernel's mode is `{}`) unless noted; read probe: a rayon streaming sum \
         over the same number of bytes; the four take turns, median of {} runs each, {} threads",
        s.batch,
        int(u64::from(s.len)),
        s.q_heads,
        s.kv_heads,
        s.head_dim,
        s.block_size,
        b.kv_bytes as f64 / f64::from(1u32 << 20),
        b.huge_pages,
        b.runs,
        b.threads
    );
    provenance(md, d, &workload, &d.host.describe());
    let read = b.read_bytes_per_s.max(1e-9);
    let _ = writeln!(
        md,
        "| measurement | bandwidth | share of read bandwidth |\n|---|---:|---:|\n\
         | read probe (streaming sum) | {} | 100% |\n\
         | paged decode (blocks in random order) | {} | {} |\n\
         | same kernel, contiguous blocks | {} | {} |\n\
         | paged decode, KV on ordinary pages (no huge-page request) | {} | {} |\n",
        gbs(b.read_bytes_per_s),
        gbs(b.paged_bytes_per_s),
        pct(b.paged_bytes_per_s / read),
        gbs(b.contiguous_bytes_per_s),
        pct(b.contiguous_bytes_per_s / read),
        gbs(b.paged_small_pages_bytes_per_s),
        pct(b.paged_small_pages_bytes_per_s / read)
    );
    let _ = writeln!(
        md,
        "Paged / contiguous: {:.2}. Goals (design guide): decode ≥ 70% of read bandwidth ({}), \
         paged within 10% of contiguous ({}).\n",
        b.paged_bytes_per_s / b.contiguous_bytes_per_s.max(1e-9),
        if b.paged_bytes_per_s >= 0.7 * read {
            "met"
        } else {
            "**NOT MET**"
        },
        if b.paged_bytes_per_s >= 0.9 * b.contiguous_bytes_per_s {
            "met"
        } else {
            "**NOT MET**"
        }
    );
    let svg = BarChart {
        title: "CPU decode bandwidth against read bandwidth".into(),
        note: measured_note(d),
        y_label: "GB/s".into(),
        categories: vec![
            "read probe".into(),
            "paged decode".into(),
            "contiguous decode".into(),
            "paged, ordinary pages".into(),
        ],
        series: vec![(
            "GB/s".into(),
            vec![
                b.read_bytes_per_s / 1e9,
                b.paged_bytes_per_s / 1e9,
                b.contiguous_bytes_per_s / 1e9,
                b.paged_small_pages_bytes_per_s / 1e9,
            ],
        )],
    }
    .to_svg();
    let file = "kernel-bandwidth.svg".to_string();
    let _ = writeln!(md, "![kernel bandwidth]({file})\n");
    plots.push((file, svg));
}

fn micro(md: &mut String, d: &ReportData) {
    let _ = writeln!(md, "{}\n", SECTION_HEADINGS[4]);
    let workload = "in-process timing loops (`std::time::Instant`): one warm-up batch, then the \
                    median batch's time per iteration; quick measurements, not criterion \
                    statistics (`cargo xtask bench --criterion` runs those)";
    provenance(md, d, workload, &d.host.describe());
    let _ = writeln!(
        md,
        "| operation | median | fastest batch | batches × iterations |\n|---|---:|---:|---:|"
    );
    for m in &d.micro {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} × {} |",
            table_cell(&m.name),
            dur(m.median_ns),
            dur(m.min_ns),
            m.batches,
            int(m.iters as u64)
        );
    }
    md.push('\n');
}

fn how(md: &mut String, d: &ReportData) {
    let _ = writeln!(md, "{}\n", SECTION_HEADINGS[SECTION_HEADINGS.len() - 1]);
    let _ = writeln!(
        md,
        "- Command: `{}` (mode `{}`)\n- Date: {}\n- Machine: {}\n- Files: `index.md`, one SVG \
         per plot, and `report.json` with every figure",
        d.command,
        d.mode.name(),
        d.date,
        d.host.describe()
    );
    let _ = write!(md, "- Section wall times:");
    for (i, (name, secs)) in d.section_seconds.iter().enumerate() {
        let _ = write!(md, "{} {name} {secs:.1} s", if i == 0 { "" } else { ";" });
    }
    md.push('\n');
}

#[cfg(test)]
mod tests {
    use super::super::{BandwidthResult, DecodeShape, Host, MicroResult, Mode};
    use super::*;

    fn data() -> ReportData {
        ReportData {
            mode: Mode::Quick,
            date: "2026-01-02 03:04 UTC".into(),
            host: Host {
                cpu: "Test CPU".into(),
                cores: 2,
                threads: 2,
            },
            command: "cargo xtask bench --quick".into(),
            scenarios: Vec::new(),
            hit_rate: None,
            hit_rate_skipped: Some("no trace here".into()),
            engine_replay: None,
            bandwidth: BandwidthResult {
                shape: DecodeShape {
                    batch: 1,
                    len: 16,
                    q_heads: 8,
                    kv_heads: 8,
                    head_dim: 64,
                    block_size: 16,
                },
                kv_bytes: 1 << 20,
                threads: 2,
                runs: 3,
                huge_pages: "madvise".into(),
                read_bytes_per_s: 10e9,
                paged_bytes_per_s: 8e9,
                contiguous_bytes_per_s: 8.5e9,
                paged_small_pages_bytes_per_s: 6e9,
            },
            micro: vec![MicroResult {
                name: "pair | with a pipe".into(),
                median_ns: 7.25,
                min_ns: 7.0,
                batches: 3,
                iters: 1000,
            }],
            tiers: super::super::TiersSection::skipped("no trace here"),
            section_seconds: vec![("micro-benchmarks".into(), 0.5)],
            cluster: None,
            analysis: None,
            trace: None,
        }
    }

    #[test]
    fn a_missing_trace_is_said_and_the_rest_is_rendered() {
        let (md, plots) = render(&data());
        assert!(md.contains("Skipped: no trace here."));
        assert!(!md.contains("hit-rate.svg"));
        for heading in SECTION_HEADINGS {
            assert!(md.contains(heading), "{heading}");
        }
        // Figures come from the data: 8 of 10 GB/s is 80% of the read bandwidth, which meets
        // the 70% goal; 8 / 8.5 is within 10%.
        assert!(md.contains("| 8.00 GB/s | 80.0% |"), "{md}");
        assert!(md.contains("(met), paged within 10% of contiguous (met)"));
        assert!(
            md.contains("| pair \\| with a pipe | 7.2 ns | 7.0 ns | 3 × 1,000 |"),
            "{md}"
        );
        assert_eq!(plots.len(), 1);
        assert_eq!(plots[0].0, "kernel-bandwidth.svg");
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(int(0), "0");
        assert_eq!(int(1_234), "1,234");
        assert_eq!(int(12_031), "12,031");
        assert_eq!(int(144_793_823), "144,793,823");
        assert_eq!(dur(18.26), "18.3 ns");
        assert_eq!(dur(41_500.0), "41.50 µs");
    }
}
