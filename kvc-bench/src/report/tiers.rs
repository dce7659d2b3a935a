//! The report's tiers section: the trace through a device cache (3M tokens; less in the
//! short modes, which replay a prefix of the trace) with host tiers of several sizes below it ([`crate::tiers`]), plotting hit rate and time to first token against
//! the host tier's size, plus a disk tier and (when a Redis server is at `KVC_REDIS_URL`) a
//! shared tier below a small host tier.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kvc_tier::OffloadMode;
use serde::Serialize;

use super::svg::LineChart;
use super::{Mode, ReportData, ReportError};
use crate::profiles;
use crate::tiers::{self, Links, TiersConfig, TiersRun};
use crate::trace::TraceRequest;

/// The section's measurements, or why it was skipped.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TiersSection {
    /// The runs, when a trace was found.
    pub result: Option<TiersResult>,
    /// Why the section was skipped, when it was.
    pub skipped: Option<String>,
}

impl TiersSection {
    /// A section skipped for `why`.
    #[must_use]
    pub fn skipped(why: impl Into<String>) -> Self {
        Self {
            result: None,
            skipped: Some(why.into()),
        }
    }
}

/// The tiered replays of the trace.
#[derive(Clone, Debug, Serialize)]
pub struct TiersResult {
    /// The trace file.
    pub trace: PathBuf,
    /// Device cache capacity in tokens.
    pub device_tokens: u64,
    /// The cost model's machine and links, in words.
    pub machine: String,
    /// One run per host-tier size (0 = device only), ascending.
    pub sweep: Vec<TiersRun>,
    /// Disk and shared tiers below a small host tier (on a prefix of the trace).
    pub lower: Vec<TiersRun>,
    /// Why the shared-tier run was left out, when it was.
    pub shared_skipped: Option<String>,
}

/// (requests of the sweep, device tokens, host sizes, requests of the disk and shared runs).
/// Shorter runs shrink the device cache with the trace prefix, so that it still evicts.
fn plan(mode: Mode) -> (usize, u64, &'static [u64], usize) {
    match mode {
        Mode::Tiny => (200, 200_000, &[0, 200_000, 1_000_000], 100),
        Mode::Quick => (
            1_500,
            1_000_000,
            &[0, 1_000_000, 3_000_000, 10_000_000],
            500,
        ),
        Mode::Default => (
            usize::MAX,
            tiers::DEFAULT_DEVICE_TOKENS,
            &[0, 3_000_000, 10_000_000, 30_000_000],
            1_000,
        ),
        Mode::Full => (
            usize::MAX,
            tiers::DEFAULT_DEVICE_TOKENS,
            &[0, 1_000_000, 3_000_000, 10_000_000, 30_000_000, 100_000_000],
            usize::MAX,
        ),
    }
}

/// The section's heading.
pub const TIERS_HEADING: &str = "## Tiers below device memory";

fn err(e: tiers::TiersError) -> ReportError {
    ReportError::Section {
        section: "tiers",
        message: e.to_string(),
    }
}

/// Runs the section on `trace`.
pub(crate) fn run(
    path: &Path,
    trace: &[TraceRequest],
    mode: Mode,
    progress: &mut dyn FnMut(String),
) -> Result<TiersResult, ReportError> {
    let (limit, device_tokens, hosts, lower_limit) = plan(mode);
    let (Some(gpu), Some(model)) = (profiles::gpu("H200"), profiles::model("Llama-3-8B")) else {
        return Err(ReportError::Section {
            section: "tiers",
            message: "no H200 or Llama-3-8B profile".into(),
        });
    };
    let base = TiersConfig {
        device_tokens,
        host_tokens: 0,
        disk_tokens: None,
        disk_dir: None,
        shared_url: None,
        block_size: 16,
        blocks_per_page: 16,
        mode: OffloadMode::WriteBack,
        limit,
        gpu: *gpu,
        model: *model,
        links: Links::default(),
        promote: None,
    };
    let mut sweep = Vec::with_capacity(hosts.len());
    for (i, &host) in hosts.iter().enumerate() {
        progress(format!(
            "tiers: host tier {} tokens ({}/{})",
            tiers::tokens(host),
            i + 1,
            hosts.len()
        ));
        let cfg = TiersConfig {
            host_tokens: host,
            ..base.clone()
        };
        let name = if host == 0 {
            "device only".to_string()
        } else {
            format!("host {}", tiers::tokens(host))
        };
        sweep.push(tiers::run(trace, &cfg, &name).map_err(err)?);
    }
    // Below a host tier as large as the device: a disk tier of nine times that, then a
    // shared one.
    let small = TiersConfig {
        host_tokens: device_tokens,
        limit: lower_limit,
        ..base.clone()
    };
    let host = tiers::tokens(device_tokens);
    let mut lower = Vec::new();
    progress(format!("tiers: disk tier below a {host}-token host tier"));
    lower.push(tiers::run(trace, &small, &format!("host {host}")).map_err(err)?);
    let disk = TiersConfig {
        disk_tokens: Some(9 * device_tokens),
        ..small.clone()
    };
    let name = format!("host {host} + disk {}", tiers::tokens(9 * device_tokens));
    lower.push(tiers::run(trace, &disk, &name).map_err(err)?);
    let shared_skipped = match std::env::var(kvc_tier::REDIS_URL_ENV) {
        Ok(url) if !url.is_empty() => {
            progress(format!("tiers: shared tier on {url}"));
            let shared = TiersConfig {
                shared_url: Some(url),
                ..small
            };
            let name = format!("host {host} + shared");
            lower.push(tiers::run(trace, &shared, &name).map_err(err)?);
            None
        }
        _ => Some(format!(
            "no Redis server: {} is not set (cargo xtask test sets it for the smoke run)",
            kvc_tier::REDIS_URL_ENV
        )),
    };
    Ok(TiersResult {
        trace: path.to_path_buf(),
        device_tokens: base.device_tokens,
        machine: format!(
            "cost model: {} serving {}, PCIe {:.0} GB/s, disk {:.0} GB/s, network {:.0} GB/s",
            gpu.name,
            model.name,
            base.links.pcie / 1e9,
            base.links.disk / 1e9,
            base.links.network / 1e9
        ),
        sweep,
        lower,
        shared_skipped,
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn row(md: &mut String, r: &TiersRun) {
    let p = &r.hit_rate_per_tier;
    let b = &r.bytes_loaded;
    let _ = writeln!(
        md,
        "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} / {:.1} / {:.1} | {:.0} | {:.0} | {:.1} s |",
        r.name,
        r.requests,
        pct(r.hit_rate),
        pct(p.device),
        pct(p.host),
        pct(p.disk),
        pct(p.shared),
        (b.host + b.disk + b.shared) / 1e9,
        r.pcie_s,
        r.disk_s,
        r.network_s,
        r.prefill_s_saved,
        r.mean_ttft_ms,
        r.elapsed_s
    );
}

/// Renders the section into `md`, its plots into `plots`.
pub(crate) fn render(md: &mut String, plots: &mut Vec<(String, String)>, d: &ReportData) {
    let _ = writeln!(md, "{TIERS_HEADING}\n");
    let Some(t) = &d.tiers.result else {
        let _ = writeln!(
            md,
            "Skipped: {}.\n",
            d.tiers.skipped.as_deref().unwrap_or("no trace")
        );
        return;
    };
    let _ = writeln!(
        md,
        "> **Workload:** {} replayed through kvc-sched's memory manager over a {}-token device \
         (LRU prefix cache, 16-token blocks) with kvc-tier's host tier (16-block pages, LRU pages, write-back) below it; \
         lower tiers on a prefix of the trace. The tiers move a 32-byte stand-in per block, \
         checked on every load; bytes and times are charged at the model's 2 MiB per block.  \n\
         > **Machine:** {}; {}  \n> **Measured:** {} · **Reproduce:** `{}`\n",
        t.trace.display(),
        tiers::tokens(t.device_tokens),
        d.host.describe(),
        t.machine,
        d.date,
        d.command
    );
    let _ = writeln!(
        md,
        "| tiers | requests | prefix hits | device | host | disk | shared | GB loaded | PCIe / \
         disk / network s | prefill s saved | mean TTFT ms | replay |"
    );
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in t.sweep.iter().chain(&t.lower) {
        row(md, r);
    }
    if let Some(why) = &t.shared_skipped {
        let _ = writeln!(md, "\nShared tier left out: {why}.");
    }
    let full_default = t
        .sweep
        .iter()
        .find(|r| r.host_tokens == tiers::DEFAULT_HOST_TOKENS);
    if let (Some(r), Some(base)) = (full_default, t.sweep.first()) {
        let _ = writeln!(
            md,
            "\nGoal: >= {} prefix hits with device 3M + host 30M (device only {}): {} ({}).",
            pct(tiers::TARGET_HIT_RATE),
            pct(base.hit_rate),
            pct(r.hit_rate),
            if r.hit_rate >= tiers::TARGET_HIT_RATE {
                "met"
            } else {
                "not met on this run's requests"
            }
        );
    }
    let note = format!("{} · {} · {}", d.date, d.host.describe(), d.command);
    let xs: Vec<f64> = t.sweep.iter().map(|r| r.host_tokens as f64 / 1e6).collect();
    let series = |name: &str, f: fn(&TiersRun) -> f64| {
        (
            name.to_string(),
            xs.iter()
                .zip(&t.sweep)
                .map(|(&x, r)| (x, f(r)))
                .collect::<Vec<_>>(),
        )
    };
    let hit = LineChart {
        title: format!(
            "Prefix hit rate against host-tier size (device {} tokens)",
            tiers::tokens(t.device_tokens)
        ),
        note: note.clone(),
        x_label: "host tier (million tokens)".into(),
        y_label: "% of prompt tokens served from cache".into(),
        log_x: false,
        series: vec![
            series("all tiers", |r| 100.0 * r.hit_rate),
            series("device", |r| 100.0 * r.hit_rate_per_tier.device),
            series("host", |r| 100.0 * r.hit_rate_per_tier.host),
        ],
    }
    .to_svg();
    let ttft = LineChart {
        title: "Mean time to first token against host-tier size (cost model)".into(),
        note,
        x_label: "host tier (million tokens)".into(),
        y_label: "mean TTFT (ms), prefill and loads, no queueing".into(),
        log_x: false,
        series: vec![series("mean TTFT", |r| r.mean_ttft_ms)],
    }
    .to_svg();
    let _ = writeln!(
        md,
        "\n![hit rate against host-tier size](tiers-hit-rate.svg)\n\n\
         ![TTFT against host-tier size](tiers-ttft.svg)\n"
    );
    plots.push(("tiers-hit-rate.svg".into(), hit));
    plots.push(("tiers-ttft.svg".into(), ttft));
}
