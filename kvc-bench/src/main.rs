//! `kvc-bench`: the workbench's command line. One subcommand per tool; each prints its
//! result and exits non-zero with a one-line error on failure.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use kvc_bench::block_replay::{BlockReplayConfig, block_replay};
use kvc_bench::replay::{ReplayConfig, ReplayReport, replay};
use kvc_bench::report::{self, Mode, ReportConfig};
use kvc_bench::sim::scenarios::{self, Size};
use kvc_bench::size::{SizeQuery, size};
use kvc_bench::trace::read_trace;
use kvc_reuse::{HasherKind, PolicyKind};

#[derive(Parser)]
#[command(name = "kvc-bench", about = "The kvc workbench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a Mooncake-format trace through the prefix cache and report the hit rate.
    Replay(ReplayArgs),
    /// Run a serving scenario in the simulator: memory, qos-overload, shared-prefix,
    /// multi-turn, trace.
    Scenario(ScenarioArgs),
    /// KV bytes per token and per block of a model, and how much fits on a GPU.
    Size(SizeArgs),
    /// Serve requests with the real CPU engine (a small llama-style model with random
    /// weights) through the whole kvc stack, and report real throughput.
    Engine(EngineArgs),
    /// Hit rates of every eviction policy on the generated workload shapes (doc-qa, agents,
    /// one-shot, scan, long-think) at three cache sizes.
    Shapes(ShapesArgs),
    /// Run every benchmark and write a markdown report with SVG plots (what `cargo xtask
    /// bench` runs).
    Report(ReportArgs),
}

#[derive(Args)]
struct EngineArgs {
    /// Requests to serve (they share a system prompt; every third is critical).
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    new_tokens: u32,
    /// Serve without the prefix cache.
    #[arg(long)]
    no_reuse: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ShapesArgs {
    /// Requests generated per shape.
    #[arg(long, default_value_t = 3000)]
    requests: usize,
    /// Generator seed.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Print one JSON array instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReportArgs {
    /// Smoke run: under a minute.
    #[arg(long, conflicts_with_all = ["full", "tiny"])]
    quick: bool,
    /// The long versions of everything.
    #[arg(long, conflicts_with = "tiny")]
    full: bool,
    /// The smallest sizes, for the test suite.
    #[arg(long, hide = true)]
    tiny: bool,
    /// Mooncake JSONL trace for the hit-rate section (default:
    /// ../shared/traces/mooncake-conversation.jsonl; skipped when absent).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Folder to write index.md, the SVG plots and report.json into.
    #[arg(long, default_value = "target/kvc-report")]
    out: PathBuf,
    /// The command to print as the way to reproduce the report (default: the `cargo xtask
    /// bench` line of these options).
    #[arg(long, hide = true)]
    command: Option<String>,
}

#[derive(Args)]
struct ScenarioArgs {
    /// The scenario: memory, qos-overload, shared-prefix, multi-turn, trace.
    name: String,
    /// Run size: small (seconds), default, or full (long).
    #[arg(long, default_value = "default")]
    size: String,
    /// Mooncake JSONL trace for the `trace` scenario (default:
    /// ../shared/traces/mooncake-conversation.jsonl).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SizeArgs {
    /// Model: Llama-3-8B, Llama-2-13B, Llama-3-70B.
    #[arg(long)]
    model: String,
    /// GPU: H200, H100, A100-80GB.
    #[arg(long)]
    gpu: String,
    /// Sequence length to count sequences of.
    #[arg(long, default_value_t = 1024)]
    tokens: u64,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// Share of GPU memory the engine may use.
    #[arg(long, default_value_t = 0.9)]
    utilisation: f64,
}

#[derive(Args)]
struct ReplayArgs {
    /// Mooncake JSONL trace (`timestamp`, `input_length`, `output_length`, `hash_ids`).
    #[arg(long)]
    trace: PathBuf,
    /// Cache capacity in tokens (cached blocks × block size).
    #[arg(long)]
    capacity_tokens: u64,
    /// Eviction policy (see `PolicyKind` in kvc-reuse).
    #[arg(long, default_value = "lru")]
    policy: String,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// Block hasher: `xxh3` (fast) or `blake3` (collision resistant).
    #[arg(long, default_value = "xxh3")]
    hasher: String,
    /// Also compute the offline optimum (Belady) and the infinite-cache hit rate.
    #[arg(long)]
    optimal: bool,
    /// Replay as an engine's block manager instead: `--alive` requests at once, each hashing,
    /// looking up, allocating from a block pool of `--capacity-tokens`, caching its prompt
    /// blocks and appending its output one token at a time; reports microseconds per request.
    #[arg(long, conflicts_with = "optimal")]
    engine_like: bool,
    /// With `--engine-like`: cache a block only once its hash has been seen before
    /// (admission control; reports its hit rate beside LRU's).
    #[arg(long, requires = "engine_like")]
    admission: bool,
    /// Requests alive at once, with `--engine-like`.
    #[arg(long, default_value_t = 64)]
    alive: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Replay(args) => run_replay(&args),
        Command::Scenario(args) => run_scenario(&args),
        Command::Size(args) => run_size(&args),
        Command::Engine(args) => run_engine(&args),
        Command::Shapes(args) => run_shapes(&args),
        Command::Report(args) => run_report(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kvc-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run_replay(args: &ReplayArgs) -> Result<(), String> {
    let policy = PolicyKind::from_name(&args.policy).ok_or_else(|| {
        let known: Vec<&str> = PolicyKind::ALL.iter().map(|k| k.name()).collect();
        format!(
            "unknown policy `{}` (known: {})",
            args.policy,
            known.join(", ")
        )
    })?;
    let hasher = HasherKind::from_name(&args.hasher)
        .ok_or_else(|| format!("unknown hasher `{}` (known: blake3, xxh3)", args.hasher))?;
    let trace = read_trace(&args.trace).map_err(|e| format!("{}: {e}", args.trace.display()))?;
    if args.engine_like {
        let cfg = BlockReplayConfig {
            capacity_tokens: args.capacity_tokens,
            block_size: args.block_size,
            alive: args.alive,
            policy,
            hasher,
            admission: args.admission,
        };
        let r = block_replay(&trace, &cfg).map_err(|e| e.to_string())?;
        if args.json {
            println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
        } else {
            println!(
                "{} requests, {} alive at once, pool {} tokens ({}-token blocks), policy {}, \
                 hasher {}{}: {:.1} us of block management per request ({:.2} s; CPU time {:.1} \
                 us per request), hit rate {:.2}%, {} decode tokens, {} blocks evicted",
                r.requests,
                r.alive,
                r.capacity_tokens,
                r.block_size,
                r.policy,
                r.hasher,
                if r.admission { ", admission" } else { "" },
                r.us_per_request,
                r.management_s,
                r.cpu_us_per_request,
                100.0 * r.hit_rate,
                r.decode_tokens,
                r.evicted_blocks
            );
        }
        return Ok(());
    }
    let cfg = ReplayConfig {
        capacity_tokens: args.capacity_tokens,
        block_size: args.block_size,
        policy,
        hasher,
        optimal: args.optimal,
    };
    let report = replay(&trace, &cfg).map_err(|e| e.to_string())?;
    if args.json {
        let json = serde_json::to_string(&report).map_err(|e| e.to_string())?;
        println!("{json}");
    } else {
        print_text(&report);
    }
    Ok(())
}

fn run_shapes(args: &ShapesArgs) -> Result<(), String> {
    let rows = kvc_bench::workload::compare(args.requests, args.seed, &[0.05, 0.15, 0.4]);
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&rows).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    for row in &rows {
        let rates: Vec<String> = row
            .hit_rates
            .iter()
            .map(|(p, r)| format!("{p} {:.2}%", 100.0 * r))
            .collect();
        println!(
            "{:<10} {:>6} blocks ({:>2.0}% of infinite): {}; infinite {:.2}%",
            row.shape,
            row.capacity_blocks,
            100.0 * row.fraction,
            rates.join(", "),
            100.0 * row.infinite
        );
    }
    Ok(())
}

fn print_text(r: &ReplayReport) {
    println!(
        "{} requests, {} input tokens, capacity {} tokens ({}-token blocks), policy {}, hasher {}",
        r.requests, r.input_tokens, r.capacity_tokens, r.block_size, r.policy, r.hasher
    );
    println!(
        "hit rate {:.2}% ({} hit tokens), {} blocks evicted, {:.2} s",
        100.0 * r.hit_rate,
        r.hit_tokens,
        r.evicted_blocks,
        r.elapsed_s
    );
    if let (Some(opt), Some(inf)) = (r.optimal_hit_rate, r.infinite_hit_rate) {
        println!(
            "offline optimum {:.2}%, infinite cache {:.2}%",
            100.0 * opt,
            100.0 * inf
        );
    }
}

fn run_scenario(args: &ScenarioArgs) -> Result<(), String> {
    let size = match args.size.as_str() {
        "small" => Size::Small,
        "default" => Size::Default,
        "full" => Size::Full,
        other => {
            return Err(format!(
                "unknown size `{other}` (known: small, default, full)"
            ));
        }
    };
    let report =
        scenarios::run(&args.name, size, args.trace.as_deref()).map_err(|e| e.to_string())?;
    if args.json {
        let json = serde_json::to_string(&report).map_err(|e| e.to_string())?;
        println!("{json}");
        return Ok(());
    }
    println!("scenario {}: {}", report.scenario, report.workload);
    println!("machine: {}", report.machine);
    for v in &report.variants {
        let r = &v.result;
        println!(
            "\n{} ({} blocks of {} tokens): {}/{} finished, {} rejected, {:.0} tokens/s, \
             {} preemptions, KV use mean {:.1}% peak {:.1}%, real tokens {:.1}% of allocated \
             slots, {:.1} running on average, prefix hits {:.1}%",
            v.name,
            v.blocks,
            v.block_size,
            r.finished,
            r.requests,
            r.rejected,
            r.throughput_tok_s,
            r.preemptions,
            100.0 * r.mean_kv_util,
            100.0 * r.peak_kv_util,
            100.0 * r.token_util,
            r.mean_running,
            100.0 * r.prefix_hit_rate
        );
        for c in &r.classes {
            println!(
                "  class {}: {} finished, TTFT p50 {:.0} ms p99 {:.0} ms, TBT p50 {:.1} ms p99 {:.1} ms",
                c.qos, c.finished, c.ttft_p50_ms, c.ttft_p99_ms, c.tbt_p50_ms, c.tbt_p99_ms
            );
        }
    }
    println!();
    for g in &report.goals {
        let verdict = if g.met { "met" } else { "NOT MET" };
        println!("goal: {} — {} ({verdict})", g.goal, g.measured);
    }
    Ok(())
}

fn run_size(args: &SizeArgs) -> Result<(), String> {
    let query = SizeQuery {
        model: args.model.clone(),
        gpu: args.gpu.clone(),
        tokens: args.tokens,
        block_size: args.block_size,
        utilisation: args.utilisation,
    };
    let report = size(&query).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}

fn run_report(args: ReportArgs) -> Result<(), String> {
    let mode = if args.tiny {
        Mode::Tiny
    } else if args.quick {
        Mode::Quick
    } else if args.full {
        Mode::Full
    } else {
        Mode::Default
    };
    let mut cfg = ReportConfig::new(mode, args.out);
    cfg.trace = args.trace;
    cfg.command = args.command.unwrap_or_else(|| cfg.default_command());
    let start = Instant::now();
    let written = report::run(&cfg, &mut |line| {
        eprintln!(
            "[kvc-bench report {:>6.1} s] {line}",
            start.elapsed().as_secs_f64()
        );
    })
    .map_err(|e| e.to_string())?;
    println!(
        "report written in {:.1} s: {} ({} plots, data in {})",
        written.elapsed_s,
        written.index.display(),
        written.plots.len(),
        written.json.display()
    );
    Ok(())
}

fn run_engine(args: &EngineArgs) -> Result<(), String> {
    use kvc_bench::engine::model::ModelConfig;
    use kvc_bench::engine::{Engine, EngineConfig, EngineReport, EngineRequest};
    use kvc_core::{NoReuse, QosClass, TenantId};
    use kvc_pin::{PinningPolicy, PolicyConfig, Reserve, SoftPinConfig, StaticReserve};
    use kvc_reuse::{HashExtra, PrefixCache, ScopedIndex, Xxh3Hasher};

    if args.requests == 0 || args.new_tokens == 0 {
        return Err("--requests and --new-tokens must be at least 1".into());
    }
    let mut cfg = EngineConfig::new(ModelConfig::small(), 2_048);
    cfg.pinned = 256;
    let pin = || -> Result<PinningPolicy, String> {
        let soft = SoftPinConfig::new(1 << 16, 2_048, 0.05).map_err(|e| e.to_string())?;
        PinningPolicy::new(PolicyConfig::new(
            Reserve::Static(StaticReserve::blocks(256)),
            soft,
        ))
        .map_err(|e| e.to_string())
    };
    let system: Vec<u32> = (0..256).map(|i| (i * 7 + 3) % 1024).collect();
    let requests: Vec<EngineRequest> = (0..args.requests as u32)
        .map(|i| {
            let mut prompt = system.clone();
            prompt.extend((0..64).map(|j| (i * 131 + j * 17) % 1024));
            EngineRequest {
                tenant: TenantId(0),
                qos: if i % 3 == 0 {
                    QosClass::CRITICAL
                } else {
                    QosClass::STANDARD
                },
                session: None,
                prompt,
                max_new_tokens: args.new_tokens,
            }
        })
        .collect();
    let report: EngineReport = if args.no_reuse {
        let mut e = Engine::new(
            &cfg,
            pin()?,
            NoReuse {
                block_size: cfg.block_size,
            },
        )
        .map_err(|e| e.to_string())?;
        e.serve(requests).map_err(|e| e.to_string())?
    } else {
        let index = ScopedIndex::new(
            PrefixCache::new(cfg.block_size, kvc_reuse::PolicyKind::Lru),
            Xxh3Hasher,
            HashExtra::new("kvc-engine-small", 1),
        );
        let mut e = Engine::new(&cfg, pin()?, index).map_err(|e| e.to_string())?;
        e.serve(requests).map_err(|e| e.to_string())?
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "{} requests in {:.2} s: {:.0} tokens/s computed ({} tokens), {:.0} generated/s; \
             {} steps, {} preemptions, prefix hits {:.1}% of prompt tokens, peak {} pinned blocks",
            report.requests,
            report.wall_s,
            report.tokens_per_s,
            report.computed_tokens,
            report.generated_per_s,
            report.steps,
            report.preemptions,
            100.0 * report.prefix_hit_rate,
            report.peak_pinned_used
        );
    }
    Ok(())
}
