//! What offering each request twice does to the eviction policies that learn from requests.
//!
//! Replays a Mooncake-format trace through `kvc_bench::workload`'s block-level replay (one
//! block per 512-token trace block, each request looked up, inserted, released, the cache
//! trimmed to its capacity), offering each request's blocks once, or a second time as a
//! memory manager does when a request finishes: as another prompt (`insert`), or as more of
//! the same request (`insert_as` with `OfferRole::More`); see `workload::SecondOffer`.
//!
//! ```sh
//! cargo run --release -p kvc-bench --example offer_twice -- \
//!     ../shared/traces/mooncake-conversation.jsonl 3000000 reuse-odds more
//! ```
//!
//! Arguments: trace, capacity in tokens, policy (`kvc-bench replay --help`), and `once`,
//! `prompt` or `more`. Prints the hit rate.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a program: it reports in one line

use std::process::ExitCode;

use kvc_bench::trace::{MOONCAKE_BLOCK_TOKENS, read_trace};
use kvc_bench::workload::{SecondOffer, block_hit_rate_offering};
use kvc_reuse::PolicyKind;

fn run(args: &[String]) -> Result<f64, String> {
    let [trace, capacity, policy, mode] = args else {
        return Err("usage: offer_twice TRACE CAPACITY_TOKENS POLICY once|prompt|more".into());
    };
    let trace = read_trace(trace.as_ref()).map_err(|e| e.to_string())?;
    let capacity: usize = capacity.parse().map_err(|e| format!("capacity: {e}"))?;
    let policy = PolicyKind::from_name(policy).ok_or(format!("unknown policy {policy}"))?;
    let again = match mode.as_str() {
        "once" => SecondOffer::None,
        "prompt" => SecondOffer::AsPrompt,
        "more" => SecondOffer::AsMore,
        _ => return Err(format!("unknown mode {mode}: once, prompt or more")),
    };
    let blocks = capacity / MOONCAKE_BLOCK_TOKENS as usize;
    let rate = block_hit_rate_offering(&trace, blocks, policy.build(blocks), again)
        .ok_or("the capacity holds no block")?;
    Ok(rate.hit_rate)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(rate) => {
            println!("hit rate {:.4}%", 100.0 * rate);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("offer_twice: {e}");
            ExitCode::FAILURE
        }
    }
}
