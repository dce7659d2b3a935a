//! `kvc-bench`: the workbench's command line. One subcommand per tool; each prints its
//! result and exits non-zero with a one-line error on failure.
#![allow(clippy::print_stdout, clippy::print_stderr)]
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use kvc_bench::block_replay::{BlockReplayConfig, CacheKind, block_replay};
use kvc_bench::replay::{
    EndSignal, ReplayConfig, ReplayReport, SharedPrefix, replay, replay_with_end_signal,
    reuse_oracle_hit_rate,
};
use kvc_bench::report::{self, Mode, ReportConfig};
use kvc_bench::sim::scenarios::{self, Size};
use kvc_bench::size::{self, GpuChoice, KvDtype, ModelShape, SizeQuery};
use kvc_bench::trace::{TraceError, TraceRequest, read_trace};
use kvc_bench::units::{parse_bytes, parse_count};
use kvc_reuse::{BlockHasher, HasherKind, PolicyKind};

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
    /// Run a serving scenario in the simulator: memory, qos-overload, qos-finance,
    /// qos-degradation, shared-prefix, multi-turn, trace, cluster; or `tiers`, the trace through
    /// a device cache with the host, disk and shared tiers below it.
    Scenario(ScenarioArgs),
    /// KV bytes per token and per block of a model, and how much fits on a GPU.
    Size(SizeArgs),
    /// Serve requests with the real CPU engine (a small llama-style model with random
    /// weights) through the whole kvc stack, and report real throughput.
    Engine(EngineArgs),
    /// Hit rates of every eviction policy on the generated workload shapes (doc-qa, agents,
    /// one-shot, scan, long-think, abandoned) at three cache sizes.
    Shapes(ShapesArgs),
    /// Run every benchmark and write a markdown report with SVG plots (what `cargo xtask
    /// bench` runs).
    Report(ReportArgs),
    /// Analyse a trace: length distributions, prefix repetition, conversations, hit rate
    /// against capacity, and recommended cache sizes for a model and GPU.
    Analyze(AnalyzeArgs),
}

#[derive(Args)]
struct AnalyzeArgs {
    /// Mooncake JSONL trace (`timestamp`, `input_length`, `output_length`, `hash_ids`).
    #[arg(long)]
    trace: PathBuf,
    /// Model: Llama-3-8B, Llama-2-13B, Llama-3-70B.
    #[arg(long, default_value = "Llama-3-8B")]
    model: String,
    /// GPU: H200, H100, A100-80GB.
    #[arg(long, default_value = "H200")]
    gpu: String,
    /// Tokens per block of the hit-rate replays.
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// Capacities on the hit-rate curve.
    #[arg(long, default_value_t = 8)]
    points: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EngineArgs {
    /// Requests to serve (they share a system prompt; every third is critical); at most
    /// 10k (about 15 minutes on 2 cores). Accepts `200`, `1k`.
    #[arg(long, default_value = "32", value_parser = count)]
    requests: u64,
    /// Tokens generated per request; the prompt (320 tokens) and these must fit the
    /// engine's 4,096-token context.
    #[arg(long, default_value = "32", value_parser = count)]
    new_tokens: u64,
    /// Serve without the prefix cache.
    #[arg(long)]
    no_reuse: bool,
    /// Serve Prometheus metrics on this address (`127.0.0.1:9100`; port 0 picks a free one,
    /// printed on stderr) while the engine runs.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// With `--metrics-addr`: keep the endpoint up this many seconds after the run (for a
    /// last scrape).
    #[arg(long, default_value_t = 0)]
    metrics_linger_s: u64,
    /// Device KV blocks of 16 tokens (an eighth of them, at most 256, pinned for critical
    /// traffic).
    #[arg(long, default_value = "2048", value_parser = count)]
    blocks: u64,
    /// Distinct 256-token system prompts, request `i` using prompt `i mod N` (more than the
    /// device holds makes the device evict prefixes that come back).
    #[arg(long, default_value = "1", value_parser = count)]
    system_prompts: u64,
    #[command(flatten)]
    tiers: EngineTierArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `kvc-bench engine`'s tiers below device memory: real KV bytes written down and loaded back.
#[derive(Args)]
struct EngineTierArgs {
    /// Add a host tier of this many device blocks: prefix blocks the device evicts are kept
    /// there and loaded back by later requests.
    #[arg(long, value_parser = count)]
    host_tier_blocks: Option<u64>,
    /// Device blocks per host (and disk) page.
    #[arg(long, default_value = "4", value_parser = count, requires = "host_tier_blocks")]
    tier_page_blocks: u64,
    /// Add a disk tier in this folder below the host tier (host evictions are demoted there).
    #[arg(long, requires = "host_tier_blocks")]
    disk_dir: Option<PathBuf>,
    /// The disk tier's byte budget (`512M`, `4G`).
    #[arg(long, default_value = "1G", value_parser = bytes, requires = "disk_dir")]
    disk_budget: u64,
    /// Add a shared tier on this Redis or Valkey server (`redis://127.0.0.1:6379/`).
    #[arg(long, requires = "host_tier_blocks")]
    shared_url: Option<String>,
    /// When device blocks are written down: when the device evicts them (`write-back`) or
    /// when it caches them (`write-through`).
    #[arg(long, default_value = "write-back", value_parser = ["write-back", "write-through"], requires = "host_tier_blocks")]
    offload: String,
    /// Fetch each step's loads from the tiers on a background thread while the step computes
    /// (they are reported at the start of the next step; same schedule, same tokens).
    #[arg(long, requires = "host_tier_blocks")]
    background_loads: bool,
}

impl EngineTierArgs {
    fn options(&self) -> Result<Option<kvc_bench::engine::tiers::TierOptions>, String> {
        use kvc_bench::engine::tiers::{DiskOptions, TierOptions};
        let Some(host) = self.host_tier_blocks else {
            return Ok(None);
        };
        let mut t =
            TierOptions::host(at_most("--host-tier-blocks", host, u64::from(u32::MAX), "")? as u32);
        t.blocks_per_page = at_most("--tier-page-blocks", self.tier_page_blocks, 1024, "")? as u32;
        t.disk = self.disk_dir.clone().map(|dir| DiskOptions {
            dir,
            budget_bytes: self.disk_budget,
        });
        t.shared_url.clone_from(&self.shared_url);
        if self.offload == "write-through" {
            t.mode = kvc_tier::OffloadMode::WriteThrough;
        }
        t.background_loads = self.background_loads;
        Ok(Some(t))
    }
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
    /// The scenario: memory, qos-overload, qos-finance, qos-degradation, shared-prefix,
    /// multi-turn, trace, cluster, tiers.
    name: String,
    /// Run size: small (seconds), default, or full (long).
    #[arg(long, default_value = "default")]
    size: String,
    /// Mooncake JSONL trace for the `trace` and `tiers` scenarios (default:
    /// ../shared/traces/mooncake-conversation.jsonl).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Engines of the `cluster` scenario.
    #[arg(long, default_value_t = 8)]
    engines: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// `tiers`: device prefix-cache capacity in tokens.
    #[arg(long, default_value_t = kvc_bench::tiers::DEFAULT_DEVICE_TOKENS, value_parser = count)]
    device_tokens: u64,
    /// `tiers`: host tier capacity in tokens.
    #[arg(long, default_value_t = kvc_bench::tiers::DEFAULT_HOST_TOKENS, value_parser = count)]
    host_tokens: u64,
    /// `tiers`: add a disk tier of this many tokens (in a temporary folder, or --disk-dir).
    #[arg(long, value_parser = count)]
    disk_tokens: Option<u64>,
    /// `tiers`: folder for the disk tier.
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// `tiers`: add a shared tier on this Redis server (for example redis://127.0.0.1:6379/).
    #[arg(long)]
    shared_url: Option<String>,
    /// `tiers`: device blocks per host and disk page.
    #[arg(long, default_value_t = 16)]
    blocks_per_page: u32,
    /// `tiers`: copy blocks to the host tier when the device caches them, not when it evicts.
    #[arg(long)]
    write_through: bool,
    /// `tiers`: replay only the first N requests (default: 500 with --size small, else all).
    #[arg(long)]
    requests: Option<usize>,
    /// `tiers`: add a run with predictive promotion (blocks of requests predicted to get a
    /// follow-up copied back from the host tier to the device ahead of it).
    #[arg(long)]
    promote: bool,
    /// `tiers`: with --promote, plan a promotion when the learned odds that it is used reach
    /// this (0.5: used more often than wasted; 0: every request with a learned delay).
    #[arg(long, default_value_t = 0.5)]
    promote_min_odds: f64,
}

#[derive(Args)]
struct SizeArgs {
    /// A built-in model: Llama-3-8B, Llama-2-13B, Llama-3-70B, Mistral-7B, Gemma-2-9B,
    /// Falcon-7B, DeepSeek-V3.
    #[arg(
        long,
        required_unless_present = "model_config",
        conflicts_with = "model_config"
    )]
    model: Option<String>,
    /// A Hugging Face `config.json` to read the model's shape from instead (layers, heads,
    /// KV heads, head size, MLA latent, sliding window).
    #[arg(long, value_name = "PATH")]
    model_config: Option<PathBuf>,
    /// The model's parameter count (`70.6G`, `8B`), when it should not be estimated from
    /// the config.
    #[arg(long, value_parser = params)]
    params: Option<u64>,
    /// GPU: H200, H100, A100-80GB (or give --gpu-memory).
    #[arg(long, required_unless_present = "gpu_memory")]
    gpu: Option<String>,
    /// Memory of one GPU (`80GiB`, `141GB`), for a GPU not in the list.
    #[arg(long, value_parser = bytes, conflicts_with = "gpu")]
    gpu_memory: Option<u64>,
    /// GPUs in tensor parallelism: weights split evenly, KV heads split across them.
    #[arg(long, default_value = "1", value_parser = count)]
    gpus: u64,
    /// Sequence length to count sequences of (`32k` = 32,000, `32Ki` = 32,768, `1M`).
    #[arg(long, default_value = "1024", value_parser = count)]
    tokens: u64,
    /// KV element type: fp16, bf16, fp8, int8.
    #[arg(long, default_value = "bf16", value_parser = kv_dtype)]
    kv_dtype: KvDtype,
    /// Weight element type: fp16, bf16, fp8, int8 (DeepSeek-V3's checkpoint is fp8).
    #[arg(long, default_value = "bf16", value_parser = kv_dtype)]
    weight_dtype: KvDtype,
    /// Tokens per block.
    #[arg(long, default_value = "16", value_parser = count)]
    block_size: u64,
    /// Share of GPU memory the engine may use.
    #[arg(long, default_value_t = 0.9)]
    utilisation: f64,
}

#[derive(Args)]
struct ReplayArgs {
    /// Mooncake JSONL trace (`timestamp`, `input_length`, `output_length`, `hash_ids`).
    #[arg(long)]
    trace: PathBuf,
    /// Cache capacity in tokens (cached blocks × block size): `3M`, `250k`, `3000000`.
    #[arg(long, value_parser = count)]
    capacity_tokens: u64,
    /// Eviction policy of the prefix cache.
    #[arg(long, default_value = "lru", value_parser = policy_parser())]
    policy: PolicyKind,
    /// Tokens per block.
    #[arg(long, default_value = "16", value_parser = count)]
    block_size: u64,
    /// Block hasher. The default is BLAKE3, as in the library: block identity decides whose
    /// KV a request reads, and only a cryptographic hash keeps tenants from crafting
    /// collisions; pick xxh3 for speed when every tenant is trusted.
    #[arg(long, default_value = "blake3", value_parser = hasher_parser())]
    hasher: HasherKind,
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
    /// With `--engine-like`: the prefix cache, `prefix` (a node per block, every policy) or
    /// `radix` (runs of blocks, LRU only; the same evictions, less work per block).
    #[arg(long, default_value = "prefix", requires = "engine_like", value_parser = cache_parser())]
    cache: CacheKind,
    /// Requests alive at once, with `--engine-like` (more than the trace holds means all).
    #[arg(long, default_value = "64", value_parser = count)]
    alive: u64,
    /// Simulate an application that tells the cache when a conversation ended
    /// (`PrefixCache::end_conversation`): after each request that no later request continues
    /// (judged from the whole trace), with this probability, 0 to 1. An outside signal, not a
    /// policy; 0 replays exactly as without the option.
    #[arg(long, value_name = "SHARE", conflicts_with = "engine_like")]
    end_signal: Option<f64>,
    /// With `--end-signal`: seed of the per-request coins.
    #[arg(long, default_value = "1", requires = "end_signal")]
    end_signal_seed: u64,
    /// With `--end-signal`: which leading blocks of an ended conversation the application
    /// knows are shared and keeps.
    #[arg(long, default_value = "hindsight", requires = "end_signal", value_parser = shared_prefix_parser())]
    end_signal_prefix: SharedPrefix,
    /// With `--end-signal`: tell each end this long after the request arrived (the trace's
    /// clock): `0` at once, `30s`, `5m`, `1h` for an application that learns of it later
    /// (a session timeout).
    #[arg(long, default_value = "0", requires = "end_signal", value_parser = duration_ms)]
    end_signal_delay: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn count(text: &str) -> Result<u64, String> {
    parse_count(text).map_err(|e| e.to_string())
}

/// A duration in milliseconds: a whole number with `ms` (the default), `s`, `m` or `h`.
fn duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (n, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "ms"),
    };
    let scale: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "'{text}' is not a duration: a whole number with ms, s, m or h (`500ms`, `30s`, `5m`)"
            ));
        }
    };
    n.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("'{text}' is not a duration: a whole number with ms, s, m or h"))
}

fn bytes(text: &str) -> Result<u64, String> {
    parse_bytes(text).map_err(|e| e.to_string())
}

/// A parameter count: a count, where a trailing `B` means billions (`8B`, `70.6B`); never 0.
fn params(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let n = match t.strip_suffix('B') {
        Some(n) if !n.ends_with(['K', 'M', 'G', 'T', 'i', 'k']) => count(&format!("{n}G")),
        _ => count(t),
    }?;
    if n == 0 {
        return Err("a model has at least one parameter".into());
    }
    Ok(n)
}

fn kv_dtype(text: &str) -> Result<KvDtype, String> {
    KvDtype::from_name(text).map_err(|e| e.to_string())
}

fn policy_parser() -> impl TypedValueParser<Value = PolicyKind> {
    let values = PolicyKind::ALL.iter().map(|&k| {
        let help = match k {
            PolicyKind::Lru => "least recently used",
            PolicyKind::S3Fifo => "S3-FIFO: a small probation queue before the main one",
            PolicyKind::Conversation => {
                "keeps the blocks a conversation's next turn is likely to reuse"
            }
            PolicyKind::Adaptive => {
                "follows whichever expert (LRU, S3-FIFO, reuse odds at two shifts) would hit most on this traffic"
            }
            PolicyKind::ReuseOdds => "LRU shifted by each block's learned odds of reuse",
            _ => "",
        };
        PossibleValue::new(k.name()).help(help)
    });
    PossibleValuesParser::new(values.collect::<Vec<_>>())
        .map(|name| PolicyKind::from_name(&name).unwrap_or(PolicyKind::Lru))
}

fn shared_prefix_parser() -> impl TypedValueParser<Value = SharedPrefix> {
    PossibleValuesParser::new([
        PossibleValue::new(SharedPrefix::Hindsight.name())
            .help("the blocks any later request uses (known from the whole trace)"),
        PossibleValue::new(SharedPrefix::CacheOnly.name())
            .help("none: only the cache's own rule (in use, branch points) keeps blocks"),
    ])
    .map(|name| SharedPrefix::from_name(&name).unwrap_or(SharedPrefix::Hindsight))
}

fn cache_parser() -> impl TypedValueParser<Value = CacheKind> {
    let values = CacheKind::ALL.iter().map(|&k| {
        let help = match k {
            CacheKind::Prefix => "PrefixCache: a node per block, every policy (default)",
            CacheKind::Radix => "RadixCache: runs of blocks, LRU only, less work per block",
        };
        PossibleValue::new(k.name()).help(help)
    });
    PossibleValuesParser::new(values.collect::<Vec<_>>())
        .map(|name| CacheKind::from_name(&name).unwrap_or_default())
}

fn hasher_parser() -> impl TypedValueParser<Value = HasherKind> {
    let values = HasherKind::ALL.iter().map(|&k| {
        let help = match k {
            HasherKind::Blake3 => "collision resistant: safe across tenants (default)",
            HasherKind::Xxh3 => "fast: for a single tenant or tenants that trust each other",
            HasherKind::Blake3Keyed => "collision resistant, one BLAKE3 compression per block",
            HasherKind::Sha256 => {
                "collision resistant, one SHA-256 compression per block (fastest with SHA-NI)"
            }
            _ => "",
        };
        PossibleValue::new(k.name()).help(help)
    });
    PossibleValuesParser::new(values.collect::<Vec<_>>())
        .map(|name| HasherKind::from_name(&name).unwrap_or_default())
}

/// Bounds a setting, naming the flag, the limit and why (`why` may be empty).
fn at_most(name: &str, value: u64, max: u64, why: &str) -> Result<u64, String> {
    if value > max {
        Err(format!("{name} {value} is over the limit of {max}{why}"))
    } else {
        Ok(value)
    }
}

/// clap's error as one line: its message, then its hints, without the usage block.
fn one_line(err: &clap::Error) -> String {
    let text = err.to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect();
    format!("{} (see --help)", parts.join("; "))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("kvc-bench: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Replay(args) => run_replay(&args),
        Command::Scenario(args) => run_scenario(&args),
        Command::Size(args) => run_size(&args),
        Command::Engine(args) => run_engine(&args),
        Command::Shapes(args) => run_shapes(&args),
        Command::Report(args) => run_report(args),
        Command::Analyze(args) => run_analyze(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kvc-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Reads a trace for a subcommand; the error is one line that names the file once.
fn load_trace(path: &std::path::Path) -> Result<Vec<TraceRequest>, String> {
    read_trace(path).map_err(|e| match e {
        // Its message already names the file.
        TraceError::Io { .. } => e.to_string(),
        other => format!("{}: {other}", path.display()),
    })
}

fn run_replay(args: &ReplayArgs) -> Result<(), String> {
    let (policy, hasher) = (args.policy, args.hasher);
    let block_size = at_most("--block-size", args.block_size, 1 << 16, "")? as u32;
    let trace = load_trace(&args.trace)?;
    if args.engine_like {
        let cfg = BlockReplayConfig {
            capacity_tokens: args.capacity_tokens,
            block_size,
            // More alive requests than the trace holds is the same as all of them.
            alive: usize::try_from(args.alive.min(trace.len() as u64)).unwrap_or(usize::MAX),
            policy,
            cache: args.cache,
            hasher,
            admission: args.admission,
        };
        let r = block_replay(&trace, &cfg).map_err(|e| e.to_string())?;
        if args.json {
            println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
        } else {
            println!(
                "{} requests, {} alive at once, pool {} tokens ({}-token blocks), policy {}, \
                 {} cache, hasher {}{}: {:.1} us of block management per request ({:.2} s; CPU time {:.1} \
                 us per request), hit rate {:.2}%, {} decode tokens, {} blocks evicted",
                r.requests,
                r.alive,
                r.capacity_tokens,
                r.block_size,
                r.policy,
                r.cache,
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
        block_size,
        policy,
        hasher,
        optimal: args.optimal,
    };
    let mut report = match args.end_signal {
        Some(share) => {
            let signal = EndSignal {
                share,
                seed: args.end_signal_seed,
                shared: args.end_signal_prefix,
                delay_ms: args.end_signal_delay,
            };
            replay_with_end_signal(&trace, &cfg, &signal)
        }
        None => replay(&trace, &cfg),
    }
    .map_err(|e| e.to_string())?;
    if args.optimal {
        let cap_blocks = cfg.capacity_tokens / u64::from(cfg.block_size);
        report.reuse_oracle_hit_rate = Some(reuse_oracle_hit_rate(
            &trace,
            cfg.block_size,
            usize::try_from(cap_blocks).unwrap_or(usize::MAX),
        ));
    }
    if args.json {
        let json = serde_json::to_string(&report).map_err(|e| e.to_string())?;
        println!("{json}");
    } else {
        print_text(&report);
    }
    Ok(())
}

fn run_shapes(args: &ShapesArgs) -> Result<(), String> {
    if args.requests == 0 {
        return Err("--requests must be at least 1".into());
    }
    let requests = at_most(
        "--requests",
        args.requests as u64,
        kvc_bench::trace::MAX_REQUESTS as u64,
        " (requests generated per shape)",
    )? as usize;
    let rows = kvc_bench::workload::compare(requests, args.seed, &[0.05, 0.15, 0.4])
        .map_err(|e| e.to_string())?;
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
    if let Some(oracle) = r.reuse_oracle_hit_rate {
        println!(
            "LRU told which blocks will be used again {:.2}%",
            100.0 * oracle
        );
    }
    if let Some(e) = &r.end_signal {
        println!(
            "conversation ends signalled: {} of {} never-continued requests (share {}, seed {}, \
             shared prefix {}, {} ms late), {} blocks demoted, {} kept",
            e.signalled_requests,
            e.ended_requests,
            e.share,
            e.seed,
            e.shared,
            e.delay_ms,
            e.demoted_blocks,
            e.kept_blocks
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
    if args.trace.is_some() && !matches!(args.name.as_str(), "trace" | "tiers" | "cluster") {
        return Err(format!(
            "--trace applies to the trace, tiers and cluster scenarios, not `{}`",
            args.name
        ));
    }
    if args.name == "cluster" {
        return run_cluster(args, size);
    }
    if args.name == "tiers" {
        return run_tiers(args, size);
    }
    let report = scenarios::run(&args.name, size, args.trace.as_deref()).map_err(|e| match e {
        // `cluster` and `tiers` run from here, not from the simulator's list.
        scenarios::ScenarioError::Unknown { name, known } => {
            format!("unknown scenario `{name}` (known: {known}, cluster, tiers)")
        }
        other => other.to_string(),
    })?;
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
             {} preemptions, KV use mean {:.1}% peak {:.1}%, running tokens / slots in use {:.1}%, \
             {:.1} running on average, prefix hits {:.1}%",
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
        print_classes(&r.classes);
    }
    println!();
    for g in &report.goals {
        let verdict = if g.met { "met" } else { "NOT MET" };
        println!("goal: {} — {} ({verdict})", g.goal, g.measured);
    }
    Ok(())
}

fn print_classes(classes: &[kvc_bench::sim::engine::ClassLatency]) {
    for c in classes {
        println!(
            "  {}: {} finished, TTFT p50 {:.0} ms p99 {:.0} ms, TBT p50 {:.1} ms p99 {:.1} ms",
            c.name, c.finished, c.ttft_p50_ms, c.ttft_p99_ms, c.tbt_p50_ms, c.tbt_p99_ms
        );
    }
}

/// The largest `config.json` read (they are a few kilobytes).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

fn run_size(args: &SizeArgs) -> Result<(), String> {
    let model = match (&args.model, &args.model_config) {
        (_, Some(path)) => {
            use std::io::Read;
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if text.len() as u64 > MAX_CONFIG_BYTES {
                return Err(format!(
                    "{}: over the limit of {MAX_CONFIG_BYTES} bytes for a config.json",
                    path.display()
                ));
            }
            let name = path
                .parent()
                .and_then(|p| p.file_name())
                .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
            ModelShape::from_hf_config(&name, &text, args.params)
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        (Some(name), None) => {
            let mut m = size::model(name).map_err(|e| e.to_string())?;
            if let Some(p) = args.params {
                m.params = p;
            }
            m
        }
        (None, None) => return Err("give --model NAME or --model-config config.json".into()),
    };
    let gpu = match (&args.gpu, args.gpu_memory) {
        (_, Some(bytes)) => GpuChoice::Memory(bytes),
        (Some(name), None) => GpuChoice::Named(name.clone()),
        (None, None) => return Err("give --gpu NAME or --gpu-memory SIZE".into()),
    };
    let query = SizeQuery {
        model,
        gpu,
        gpus: u32::try_from(args.gpus).unwrap_or(u32::MAX),
        tokens: args.tokens,
        block_size: u32::try_from(args.block_size).unwrap_or(u32::MAX),
        dtype: args.kv_dtype,
        weight_dtype: args.weight_dtype,
        utilisation: args.utilisation,
    };
    let report = size::size(&query).map_err(|e| e.to_string())?;
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
    use kvc_reuse::{HashExtra, PrefixCache, ScopedIndex};

    if args.requests == 0 || args.new_tokens == 0 {
        return Err("--requests and --new-tokens must be at least 1".into());
    }
    let endpoint = match &args.metrics_addr {
        Some(addr) => {
            let e = kvc_bench::metrics_export::MetricsEndpoint::serve(addr)
                .map_err(|e| e.to_string())?;
            eprintln!("metrics: http://{}/metrics", e.local_addr());
            Some(e)
        }
        None => None,
    };
    let blocks = at_most("--blocks", args.blocks, 1 << 20, "")? as u32;
    let mut cfg = EngineConfig::new(ModelConfig::small(), blocks);
    cfg.tiers = args.tiers.options()?;
    const PROMPT: u64 = 256 + 64;
    let n = at_most(
        "--requests",
        args.requests,
        MAX_ENGINE_REQUESTS,
        " (about a quarter of an hour on 2 cores)",
    )? as u32;
    let new_tokens = at_most(
        "--new-tokens",
        args.new_tokens,
        cfg.sched.max_model_len.saturating_sub(PROMPT),
        &format!(
            " (the engine's {}-token context less the {PROMPT}-token prompt)",
            cfg.sched.max_model_len
        ),
    )? as u32;
    cfg.pinned = (blocks / 8).min(256);
    let pinned = cfg.pinned;
    let pin = || -> Result<PinningPolicy, String> {
        let soft = SoftPinConfig::new(1 << 16, blocks as usize, 0.05).map_err(|e| e.to_string())?;
        PinningPolicy::new(PolicyConfig::new(
            Reserve::Static(StaticReserve::blocks(pinned as usize)),
            soft,
        ))
        .map_err(|e| e.to_string())
    };
    let prompts = at_most(
        "--system-prompts",
        args.system_prompts,
        u64::from(n),
        " (one per request)",
    )? as u32;
    let system = |k: u32| -> Vec<u32> { (0..256).map(|i| (i * 7 + 3 + k * 389) % 1024).collect() };
    let requests: Vec<EngineRequest> = (0..n)
        .map(|i| {
            let mut prompt = system(i % prompts.max(1));
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
                max_new_tokens: new_tokens,
            }
        })
        .collect();
    let m = cfg.model;
    if !args.json {
        println!(
            "model: {} layers, d_model {}, {} query / {} KV heads of {}, vocabulary {} (random \
             weights, f32, CPU kernels)",
            m.layers, m.d_model, m.q_heads, m.kv_heads, m.head_dim, m.vocab
        );
        println!(
            "pool: {} blocks of {} tokens ({} pinned for critical traffic), {}; {n} requests \
             of {PROMPT} prompt tokens (256 shared, {prompts} system prompts) + {new_tokens} new, \
             every third critical",
            cfg.blocks,
            cfg.block_size,
            cfg.pinned,
            if args.no_reuse {
                "no prefix cache".to_owned()
            } else {
                format!("prefix cache LRU, {} hashes", HasherKind::default().name())
            }
        );
    }
    let start = Instant::now();
    let mut progress = |p: kvc_bench::engine::Progress| {
        eprintln!(
            "[kvc-bench engine {:>6.1} s] {}/{} requests finished, {} tokens generated",
            start.elapsed().as_secs_f64(),
            p.finished,
            p.total,
            p.generated
        );
    };
    let report: EngineReport = if args.no_reuse {
        let mut e = Engine::new(
            &cfg,
            pin()?,
            NoReuse {
                block_size: cfg.block_size,
            },
        )
        .map_err(|e| e.to_string())?;
        e.serve_with_progress(requests, 2.0, &mut progress)
            .map_err(|e| e.to_string())?
    } else {
        let index = ScopedIndex::new(
            PrefixCache::new(cfg.block_size, kvc_reuse::PolicyKind::Lru),
            HasherKind::default(),
            HashExtra::new("kvc-engine-small", 1),
        );
        let mut e = Engine::new(&cfg, pin()?, index).map_err(|e| e.to_string())?;
        e.serve_with_progress(requests, 2.0, &mut progress)
            .map_err(|e| e.to_string())?
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
        print_classes(&report.classes);
        println!(
            "prompt tokens: {}, of which {} hit on the device, {} loaded from the tiers, {} \
             computed",
            report.prompt_tokens,
            report.device_hit_tokens,
            report.tier_hit_tokens,
            report.prompt_tokens - report.device_hit_tokens - report.tier_hit_tokens
        );
        if let Some(t) = &report.tiers {
            println!(
                "tiers: {} blocks written down; loaded {} host / {} disk / {} shared blocks \
                 ({:.1} MiB in {:.3} s, steps waited {:.3} s for it); {} loads short, {} blocks \
                 recomputed; {} admissions waited for a load in flight",
                t.offloaded_blocks,
                t.loaded_host_blocks,
                t.loaded_disk_blocks,
                t.loaded_shared_blocks,
                t.loaded_bytes as f64 / f64::from(1 << 20),
                t.load_s,
                t.load_wait_s,
                t.failed_loads,
                t.missed_load_blocks,
                t.load_waits
            );
        }
    }
    if let Some(e) = endpoint {
        if args.metrics_linger_s > 0 {
            eprintln!(
                "metrics: serving {} for {} s more",
                e.local_addr(),
                args.metrics_linger_s
            );
            std::thread::sleep(std::time::Duration::from_secs(args.metrics_linger_s));
        }
        drop(e);
    }
    Ok(())
}

fn run_analyze(args: &AnalyzeArgs) -> Result<(), String> {
    use kvc_bench::analyze::{AnalyzeConfig, Distribution, analyze};

    if args.block_size == 0 {
        return Err("the block size must be at least 1 token".into());
    }
    at_most("--block-size", u64::from(args.block_size), 1 << 16, "")?;
    if args.points == 0 {
        return Err("--points must be at least 1".into());
    }
    // Each point halves the capacity: past 64 halvings of a u64 nothing is left.
    at_most("--points", args.points as u64, 64, "")?;
    let trace = load_trace(&args.trace)?;
    let mut cfg = AnalyzeConfig::new();
    cfg.model.clone_from(&args.model);
    cfg.gpu.clone_from(&args.gpu);
    cfg.block_size = args.block_size;
    cfg.capacity_points = args.points;
    let a = analyze(&trace, &cfg).map_err(|e| e.to_string())?;
    if args.json {
        println!("{}", serde_json::to_string(&a).map_err(|e| e.to_string())?);
        return Ok(());
    }
    let dist = |name: &str, d: &Distribution| {
        // Small means (turns per conversation) keep their decimals: 1.16 is not 1.
        let digits = if d.mean < 100.0 { 2 } else { 0 };
        println!(
            "{name}: mean {:.digits$}, min {}, p50 {}, p90 {}, p99 {}, max {}",
            d.mean, d.min, d.p50, d.p90, d.p99, d.max
        );
    };
    println!(
        "{}: {} requests over {:.0} s ({:.2} requests/s)",
        args.trace.display(),
        a.requests,
        a.duration_s,
        a.arrival_rate
    );
    dist("input tokens", &a.input);
    dist("output tokens", &a.output);
    println!(
        "prefix repetition: an unbounded cache serves {:.1}% of input tokens; {:.1}% of \
         requests reuse an earlier request's first block",
        100.0 * a.prefix_repetition,
        100.0 * a.requests_reusing
    );
    println!(
        "conversations (inferred): {} ({} multi-turn), {:.1}% of requests continue one",
        a.sessions.sessions,
        a.sessions.multi_turn,
        100.0 * a.sessions.continuation_share
    );
    dist("turns per conversation", &a.sessions.turns);
    dist("gap between turns (ms)", &a.sessions.gap_ms);
    println!(
        "\nhit rate against capacity ({}-token blocks; footprint {} tokens):",
        a.block_size, a.footprint_tokens
    );
    for r in &a.capacity {
        println!(
            "  {:>12} tokens: LRU {:5.1}%  optimum {:5.1}%",
            r.capacity_tokens,
            100.0 * r.lru,
            100.0 * r.optimal
        );
    }
    println!(
        "\nrecommendations for {} on {} ({} KV bytes per token, {} KV tokens on the device):",
        a.model, a.gpu, a.kv_bytes_per_token, a.device_kv_tokens
    );
    for r in &a.recommendations {
        let bytes = r
            .bytes
            .map(|b| format!(" ({:.2} GiB)", b as f64 / f64::from(1u32 << 30)))
            .unwrap_or_default();
        println!(
            "  {}: {} {}{bytes} — {}",
            r.what, r.value, r.unit, r.because
        );
    }
    Ok(())
}

fn run_cluster(args: &ScenarioArgs, size: Size) -> Result<(), String> {
    use kvc_bench::cluster::{ClusterConfig, run};
    use kvc_bench::report::locate_trace;

    let path = locate_trace(args.trace.as_deref(), scenarios::DEFAULT_TRACE).ok_or_else(|| {
        format!(
            "no trace at {} and none given with --trace PATH",
            scenarios::DEFAULT_TRACE
        )
    })?;
    let trace = load_trace(&path)?;
    let mut cfg = ClusterConfig::new();
    cfg.engines = at_most(
        "--engines",
        args.engines as u64,
        kvc_bench::cluster::MAX_ENGINES as u64,
        "",
    )? as usize;
    cfg.limit = match size {
        Size::Small => 2_000,
        _ => usize::MAX,
    };
    let r = run(&trace, &cfg).map_err(|e| e.to_string())?;
    if args.json {
        println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!(
        "scenario cluster: {} requests of {} on {} engines ({} on {}), arrivals x{:.2} for \
         {:.0}% offered load; one engine prefills {:.0} tokens/s",
        r.requests,
        path.display(),
        cfg.engines,
        cfg.model,
        cfg.gpu,
        r.time_scale,
        100.0 * cfg.target_utilisation,
        r.engine_prefill_tok_s
    );
    println!(
        "caches: {} device tokens and {} host tokens per engine; an unbounded cache would hit \
         {:.1}%",
        cfg.device_tokens,
        cfg.host_tokens,
        100.0 * r.infinite_hit_rate
    );
    for v in &r.variants {
        println!(
            "{:>13} {:<14} hit {:5.1}% (device {:.1}, host {:.1}, shared {:.1}), TTFT p50 \
             {:.0} ms p99 {:.0} ms, busiest engine {:.2}x the mean",
            v.policy,
            if v.shared_tier {
                "shared tier"
            } else {
                "local tiers"
            },
            100.0 * v.hit_rate,
            100.0 * v.hit_device,
            100.0 * v.hit_host,
            100.0 * v.hit_shared,
            v.ttft_p50_ms,
            v.ttft_p99_ms,
            v.busy_max_over_mean
        );
    }
    for (p, x) in &r.global_over_local {
        println!("global (shared tier) over local hit rate, {p}: {x:.2}x (Mooncake: up to 2.36x)");
    }
    Ok(())
}

/// The most requests `kvc-bench engine` serves in one run: 10,000 (200 take about 17 s on
/// 2 cores, so this is about a quarter of an hour).
const MAX_ENGINE_REQUESTS: u64 = 10_000;

fn run_tiers(args: &ScenarioArgs, size: Size) -> Result<(), String> {
    use kvc_bench::profiles::{gpu, model};
    use kvc_bench::tiers::{Links, PromoteConfig, TiersConfig, scenario};
    use kvc_tier::OffloadMode;

    if !(0.0..=1.0).contains(&args.promote_min_odds) {
        return Err(format!(
            "--promote-min-odds must be between 0 and 1, not {}",
            args.promote_min_odds
        ));
    }

    let path = kvc_bench::report::locate_trace(args.trace.as_deref(), scenarios::DEFAULT_TRACE)
        .ok_or_else(|| {
            format!(
                "no trace at {} and none given with --trace PATH",
                scenarios::DEFAULT_TRACE
            )
        })?;
    let trace = load_trace(&path)?;
    let cfg = TiersConfig {
        device_tokens: args.device_tokens,
        host_tokens: args.host_tokens,
        disk_tokens: args.disk_tokens,
        disk_dir: args.disk_dir.clone(),
        shared_url: args.shared_url.clone(),
        block_size: 16,
        blocks_per_page: args.blocks_per_page,
        mode: if args.write_through {
            OffloadMode::WriteThrough
        } else {
            OffloadMode::WriteBack
        },
        limit: args
            .requests
            .unwrap_or(if size == Size::Small { 500 } else { usize::MAX }),
        gpu: *gpu("H200").ok_or("no H200 profile")?,
        model: *model("Llama-3-8B").ok_or("no Llama-3-8B profile")?,
        links: Links::default(),
        promote: args.promote.then(|| PromoteConfig {
            min_odds: args.promote_min_odds,
            ..PromoteConfig::default()
        }),
    };
    let report = scenario(&trace, &cfg).map_err(|e| e.to_string())?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!("scenario tiers: {}", report.workload);
    println!("cost model: {}", report.machine);
    for r in &report.runs {
        let p = &r.hit_rate_per_tier;
        println!(
            "\n{}: prefix hits {:.2}% (device {:.2}%, host {:.2}%, disk {:.2}%, shared {:.2}%), \
             {} prefill tokens saved, {:.1} GB loaded, PCIe {:.1} s, disk {:.1} s, network \
             {:.1} s, prefill saved {:.0} s, mean TTFT {:.0} ms, replay {:.1} s",
            r.name,
            100.0 * r.hit_rate,
            100.0 * p.device,
            100.0 * p.host,
            100.0 * p.disk,
            100.0 * p.shared,
            r.hit_tokens,
            (r.bytes_loaded.host + r.bytes_loaded.disk + r.bytes_loaded.shared) / 1e9,
            r.pcie_s,
            r.disk_s,
            r.network_s,
            r.prefill_s_saved,
            r.mean_ttft_ms,
            r.elapsed_s
        );
        if let Some(p) = &r.promotion {
            println!(
                "  promotion: {} planned, {} cancelled by an earlier follow-up, {} blocks \
                 promoted ({:.1} GB, PCIe {:.1} s off the critical path): {} used, {} evicted \
                 unused, {} unused at the end",
                p.planned,
                p.cancelled,
                p.promoted_blocks,
                p.promoted_bytes / 1e9,
                p.pcie_s,
                p.used_blocks,
                p.wasted_blocks,
                p.unused_at_end
            );
        }
    }
    for g in &report.goals {
        let verdict = if g.met { "met" } else { "NOT MET" };
        println!("\ngoal: {} — {} ({verdict})", g.goal, g.measured);
    }
    Ok(())
}
