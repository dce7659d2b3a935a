//! `kvc-bench`: the workbench's command line. One subcommand per tool; each prints its
//! result and exits non-zero with a one-line error on failure.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kvc_bench::replay::{ReplayConfig, ReplayReport, replay};
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
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Replay(args) => run_replay(&args),
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
