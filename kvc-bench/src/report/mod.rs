//! The benchmark report of `cargo xtask bench`: runs the serving scenarios, the prefix hit
//! rate against cache capacity on a trace, CPU kernel bandwidth against the machine's read
//! bandwidth, quick micro-benchmarks, and the trace through the tiers below device memory,
//! then writes `index.md`, SVG plots and `report.json`
//! into one folder. Every figure is computed by this run; each section states its workload,
//! the machine, the date and the command that reproduces it.
//!
//! Library code prints nothing: progress goes to the caller's callback (the `kvc-bench report`
//! command prints it on stderr).
//!
//! ```no_run
//! use kvc_bench::report::{Mode, ReportConfig, run};
//!
//! let cfg = ReportConfig::new(Mode::Quick, "target/kvc-report".into());
//! let written = run(&cfg, &mut |line| eprintln!("{line}"))?;
//! println!("report: {}", written.index.display());
//! # Ok::<(), kvc_bench::report::ReportError>(())
//! ```

mod analysis;
mod bandwidth;
mod cluster;
mod engine_replay;
mod hitrate;
pub mod machine;
mod micro;
mod qos;
mod render;
pub mod svg;
mod tiers;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

pub use bandwidth::{BandwidthResult, DecodeShape};
pub use engine_replay::EngineReplayResult;
pub use hitrate::{CapacityPoint, HitRateResult, locate_trace};
pub use machine::Host;
pub use micro::MicroResult;
pub use tiers::{TIERS_HEADING, TiersResult, TiersSection};

use crate::replay::ReplayError;
use crate::sim::scenarios::{self, DEFAULT_TRACE, ScenarioError, ScenarioReport, Size};

/// The scenarios the report runs, in order.
pub const REPORT_SCENARIOS: &[&str] = &[
    "memory",
    "qos-overload",
    "qos-finance",
    "qos-degradation",
    "shared-prefix",
    "multi-turn",
];

/// The section headings of `index.md` (tests check for each); the cluster and analysis
/// sections are rendered before "How this report was made".
pub const SECTION_HEADINGS: &[&str] = &[
    "## Serving scenarios",
    "## Prefix hit rate against cache capacity",
    engine_replay::HEADING,
    "## CPU kernel bandwidth",
    "## Micro-benchmarks (quick measurements)",
    TIERS_HEADING,
    cluster::HEADING,
    analysis::HEADING,
    "## How this report was made",
];

/// How long a report runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum Mode {
    /// Seconds even unoptimised: the smallest sizes, for the test suite.
    Tiny,
    /// Smoke runs: under a minute on 2 cores (44 s in the test profile).
    Quick,
    /// The default: about 170 s in release on 2 cores (docs/benchmarks.md).
    Default,
    /// The long versions of everything.
    Full,
}

impl Mode {
    /// The mode's name, as the command line spells its flag.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Quick => "quick",
            Self::Default => "default",
            Self::Full => "full",
        }
    }

    fn scenario_size(self) -> Size {
        match self {
            Self::Tiny => Size::Small,
            // The default-size scenarios take about a second in release.
            Self::Quick | Self::Default => Size::Default,
            Self::Full => Size::Full,
        }
    }

    /// (requests replayed at most, block size, capacities in tokens).
    fn hit_rate_plan(self) -> (usize, u32, &'static [u64]) {
        const HANDFUL: &[u64] = &[250_000, 1_000_000, 3_000_000, 10_000_000];
        match self {
            Self::Tiny => (300, 512, HANDFUL),
            // Mooncake's own 512-token blocks: the replay is ~15x cheaper than at 16.
            Self::Quick => (usize::MAX, 512, HANDFUL),
            Self::Default => (usize::MAX, 16, HANDFUL),
            Self::Full => (
                usize::MAX,
                16,
                &[
                    100_000, 250_000, 500_000, 1_000_000, 2_000_000, 3_000_000, 5_000_000,
                    10_000_000,
                ],
            ),
        }
    }

    /// (decode shape, timed runs).
    fn decode_plan(self) -> (DecodeShape, usize) {
        let shape = |batch, len| DecodeShape {
            batch,
            len,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            block_size: 16,
        };
        // 4 KiB of bf16 KV per token at 8 KV heads of 128.
        match self {
            Self::Tiny => (shape(2, 1024), 3),
            Self::Quick => (shape(4, 4096), 5),
            Self::Default => (shape(8, 8192), 7),
            Self::Full => (shape(16, 8192), 9),
        }
    }

    fn micro_budget(self) -> micro::MicroBudget {
        let (batches, scale) = match self {
            Self::Tiny => (3, 0.01),
            Self::Quick => (7, 0.2),
            Self::Default => (11, 1.0),
            Self::Full => (21, 2.0),
        };
        micro::MicroBudget { batches, scale }
    }
}

/// What to run and where to write it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportConfig {
    /// How long to run.
    pub mode: Mode,
    /// A Mooncake-format trace for the hit-rate section; `None` looks for [`DEFAULT_TRACE`]
    /// and skips the section (saying so) when it is absent.
    pub trace: Option<PathBuf>,
    /// The folder to write `index.md`, the SVGs and `report.json` into (created if needed).
    pub out: PathBuf,
    /// The command line that reproduces the report, printed with every figure.
    pub command: String,
}

impl ReportConfig {
    /// A config with no explicit trace and the `cargo xtask bench` command of `mode`.
    #[must_use]
    pub fn new(mode: Mode, out: PathBuf) -> Self {
        let mut cfg = Self {
            mode,
            trace: None,
            out,
            command: String::new(),
        };
        cfg.command = cfg.default_command();
        cfg
    }

    /// The command that reproduces a report of this config: `cargo xtask bench` with the
    /// mode's flag and the trace, or the `kvc-bench` command for the test-only tiny mode.
    #[must_use]
    pub fn default_command(&self) -> String {
        let mut cmd = match self.mode {
            Mode::Tiny => "cargo run -p kvc-bench -- report --tiny".to_string(),
            Mode::Quick => "cargo xtask bench --quick".to_string(),
            Mode::Default => "cargo xtask bench".to_string(),
            Mode::Full => "cargo xtask bench --full".to_string(),
        };
        if let Some(trace) = &self.trace {
            cmd.push_str(&format!(" --trace {}", trace.display()));
        }
        cmd
    }
}

/// Why a report could not be made.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The output folder or a file in it could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A scenario failed.
    #[error("scenario {scenario}: {source}")]
    Scenario {
        /// The scenario's name.
        scenario: String,
        /// Why.
        #[source]
        source: ScenarioError,
    },
    /// The trace given could not be read.
    #[error("trace {path}: {message}")]
    Trace {
        /// The trace file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A trace replay refused its configuration.
    #[error("replay at {capacity_tokens} tokens with {policy}: {source}")]
    Replay {
        /// The capacity.
        capacity_tokens: u64,
        /// The policy.
        policy: &'static str,
        /// Why.
        #[source]
        source: ReplayError,
    },
    /// The kernel bandwidth measurement was rejected by the kernels.
    #[error("kernel bandwidth: {0}")]
    Kernel(String),
    /// A micro-benchmark's setup or step failed.
    #[error("micro-benchmark {bench}: {message}")]
    Micro {
        /// Which benchmark.
        bench: &'static str,
        /// Why.
        message: String,
    },
    /// The cluster or analysis section failed.
    #[error("{section}: {message}")]
    Section {
        /// The section.
        section: &'static str,
        /// Why.
        message: String,
    },
    /// The JSON dump could not be encoded.
    #[error("cannot encode report.json: {0}")]
    Json(String),
}

/// Everything a report measured; `report.json` holds it.
#[derive(Clone, Debug, Serialize)]
pub struct ReportData {
    /// The mode.
    pub mode: Mode,
    /// When the run started (UTC).
    pub date: String,
    /// The host.
    pub host: Host,
    /// The command that reproduces the report.
    pub command: String,
    /// The serving scenarios.
    pub scenarios: Vec<ScenarioReport>,
    /// The hit-rate curve, when a trace was found.
    pub hit_rate: Option<HitRateResult>,
    /// Why the hit-rate section was skipped, when it was.
    pub hit_rate_skipped: Option<String>,
    /// The engine-like replay with each hasher, when a trace was found.
    pub engine_replay: Option<EngineReplayResult>,
    /// CPU decode and read bandwidth.
    pub bandwidth: BandwidthResult,
    /// Quick micro-benchmarks.
    pub micro: Vec<MicroResult>,
    /// The trace through the tiers below device memory.
    pub tiers: TiersSection,
    /// Wall time of each section, in seconds.
    pub section_seconds: Vec<(String, f64)>,
    /// The cluster scenario on the trace, when a trace was found.
    pub cluster: Option<crate::cluster::ClusterReport>,
    /// The workload analysis of the trace, when a trace was found.
    pub analysis: Option<crate::analyze::Analysis>,
    /// The trace file, when one was found.
    pub trace: Option<PathBuf>,
}

/// What a report wrote.
#[derive(Clone, Debug)]
#[must_use]
pub struct Written {
    /// `index.md`.
    pub index: PathBuf,
    /// The SVG plots.
    pub plots: Vec<PathBuf>,
    /// `report.json`.
    pub json: PathBuf,
    /// Wall time of the whole run, in seconds.
    pub elapsed_s: f64,
}

fn write(path: &Path, contents: &str) -> Result<(), ReportError> {
    std::fs::write(path, contents).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs every section and writes the report; `progress` hears one line per long step.
pub fn run(cfg: &ReportConfig, progress: &mut dyn FnMut(String)) -> Result<Written, ReportError> {
    let start = Instant::now();
    std::fs::create_dir_all(&cfg.out).map_err(|source| ReportError::Write {
        path: cfg.out.clone(),
        source,
    })?;
    let data = measure(cfg, progress)?;
    let (index_md, plots) = render::render(&data);
    let index = cfg.out.join("index.md");
    let mut plot_paths = Vec::with_capacity(plots.len());
    for (name, svg) in &plots {
        let path = cfg.out.join(name);
        write(&path, svg)?;
        plot_paths.push(path);
    }
    write(&index, &index_md)?;
    let json = cfg.out.join("report.json");
    let text = serde_json::to_string_pretty(&data).map_err(|e| ReportError::Json(e.to_string()))?;
    write(&json, &text)?;
    Ok(Written {
        index,
        plots: plot_paths,
        json,
        elapsed_s: start.elapsed().as_secs_f64(),
    })
}

/// Runs every measurement.
fn measure(
    cfg: &ReportConfig,
    progress: &mut dyn FnMut(String),
) -> Result<ReportData, ReportError> {
    let date = machine::utc_now();
    let host = Host::detect();
    let mut section_seconds = Vec::new();
    let mut timed = |name: &str, t: Instant| {
        section_seconds.push((name.to_string(), t.elapsed().as_secs_f64()))
    };

    // Read the trace first, so a bad --trace fails before minutes of work.
    let trace = match locate_trace(cfg.trace.as_deref(), DEFAULT_TRACE) {
        Some(path) => {
            progress(format!("reading trace {}", path.display()));
            let requests = hitrate::load(&path)?;
            Some((path, requests))
        }
        None => None,
    };

    let t = Instant::now();
    let mut scenario_reports = Vec::with_capacity(REPORT_SCENARIOS.len());
    for (i, &name) in REPORT_SCENARIOS.iter().enumerate() {
        progress(format!(
            "scenario {name} ({}/{}, size {:?})",
            i + 1,
            REPORT_SCENARIOS.len(),
            cfg.mode.scenario_size()
        ));
        let report = scenarios::run(name, cfg.mode.scenario_size(), None).map_err(|source| {
            ReportError::Scenario {
                scenario: name.to_string(),
                source,
            }
        })?;
        scenario_reports.push(report);
    }
    timed("serving scenarios", t);

    let t = Instant::now();
    let (cluster, analysis) = match &trace {
        Some((_, requests)) => {
            progress(
                "cluster: engines behind the KV-aware router, round-robin, least-loaded".into(),
            );
            let c = cluster::measure(requests, cfg.mode)?;
            timed("cluster", t);
            let t = Instant::now();
            progress("analysis: lengths, repetition, conversations, hit rate, sizes".into());
            let a = analysis::measure(requests, cfg.mode)?;
            timed("workload analysis", t);
            (Some(c), Some(a))
        }
        None => (None, None),
    };
    let trace_path = trace.as_ref().map(|(p, _)| p.clone());

    let t = Instant::now();
    let (hit_rate, hit_rate_skipped) = match &trace {
        Some((path, trace)) => {
            let (limit, block_size, capacities) = cfg.mode.hit_rate_plan();
            let result = hitrate::run(path, trace, limit, block_size, capacities, &mut *progress)?;
            (Some(result), None)
        }
        None => {
            let why = format!(
                "no trace at {DEFAULT_TRACE} (relative to the repository root or the working \
                 directory) and none given with --trace PATH; section skipped"
            );
            progress(format!("hit rate: {why}"));
            (None, Some(why))
        }
    };
    timed("prefix hit rate", t);

    let t = Instant::now();
    let engine_replay = match &trace {
        Some((path, trace)) => Some(engine_replay::run(path, trace, cfg.mode, &mut *progress)?),
        None => None,
    };
    timed("engine-like replay", t);

    let t = Instant::now();
    let (shape, runs) = cfg.mode.decode_plan();
    progress(format!(
        "kernel bandwidth: paged decode over {} MiB of bf16 KV and the read probe",
        (u64::from(shape.batch) * u64::from(shape.len) * 4096) >> 20
    ));
    let bandwidth = bandwidth::run(shape, runs)?;
    timed("CPU kernel bandwidth", t);

    let t = Instant::now();
    progress("micro-benchmarks: allocator pair, prefix lookup, scheduler step".into());
    let micro = micro::run(cfg.mode.micro_budget())?;
    timed("micro-benchmarks", t);

    let t = Instant::now();
    let tiers = match &trace {
        Some((path, trace)) => TiersSection {
            result: Some(tiers::run(path, trace, cfg.mode, &mut *progress)?),
            skipped: None,
        },
        None => TiersSection::skipped(format!("no trace at {DEFAULT_TRACE}")),
    };
    timed("tiers below device memory", t);

    Ok(ReportData {
        mode: cfg.mode,
        date,
        host,
        command: cfg.command.clone(),
        scenarios: scenario_reports,
        hit_rate,
        hit_rate_skipped,
        engine_replay,
        bandwidth,
        micro,
        tiers,
        section_seconds,
        cluster,
        analysis,
        trace: trace_path,
    })
}
