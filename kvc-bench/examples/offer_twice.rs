//! What offering each request twice does to the eviction policies that learn from requests.
//!
//! Replays a Mooncake-format trace through a `PrefixCache` as `kvc_bench::workload`'s
//! block-level replay does (one block per 512-token trace block, each request looked up,
//! inserted, released, the cache trimmed to its capacity), offering each request's blocks
//! once, or a second time as a memory manager does when a request finishes: as another
//! prompt (`insert`), or as more of the same request (`insert_as` with `OfferRole::More`).
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
use kvc_reuse::{BlockHash, BlockHasher, BlockId, OfferRole, PolicyKind, PrefixCache, Xxh3Hasher};

/// The chained identity of trace block `id` under `parent`.
fn chain(parent: u128, id: u32) -> BlockHash {
    Xxh3Hasher.chain(BlockHash(parent), &[id])
}

fn run(args: &[String]) -> Result<f64, String> {
    let [trace, capacity, policy, mode] = args else {
        return Err("usage: offer_twice TRACE CAPACITY_TOKENS POLICY once|prompt|more".into());
    };
    let trace = read_trace(trace.as_ref()).map_err(|e| e.to_string())?;
    let capacity: usize = capacity.parse().map_err(|e| format!("capacity: {e}"))?;
    let policy = PolicyKind::from_name(policy).ok_or(format!("unknown policy {policy}"))?;
    let second = match mode.as_str() {
        "once" => None,
        "prompt" => Some(OfferRole::Prompt),
        "more" => Some(OfferRole::More { offered_before: 0 }),
        _ => return Err(format!("unknown mode {mode}: once, prompt or more")),
    };
    let bs = MOONCAKE_BLOCK_TOKENS as usize;
    let capacity = capacity / bs;
    let mut cache = PrefixCache::with_policy(MOONCAKE_BLOCK_TOKENS, policy.build(capacity));
    let (mut hashes, mut blocks, mut newly) = (Vec::new(), Vec::new(), Vec::new());
    let (mut free, mut fresh) = (Vec::<BlockId>::new(), 0u32);
    let (mut input, mut hit_tokens) = (0u64, 0u64);
    for req in &trace {
        let full = (req.input_length as usize / bs).min(req.hash_ids.len());
        hashes.clear();
        let mut parent = 0u128;
        for &id in &req.hash_ids[..full] {
            let h = chain(parent, id);
            hashes.push(h);
            parent = h.0;
        }
        let now = req.timestamp_ms;
        let hit = cache.lookup(&hashes, req.input_length as usize, now);
        input += u64::from(req.input_length);
        hit_tokens += hit.tokens;
        blocks.clear();
        blocks.extend_from_slice(&hit.blocks);
        while blocks.len() < hashes.len() {
            blocks.push(free.pop().unwrap_or_else(|| {
                fresh += 1;
                BlockId(fresh - 1)
            }));
        }
        newly.clear();
        let insert = cache.insert(&hashes, &blocks, now, &mut newly);
        insert.map_err(|e| e.to_string())?;
        if let Some(role) = second {
            let role = match role {
                OfferRole::More { .. } => OfferRole::More {
                    offered_before: hashes.len(),
                },
                prompt => prompt,
            };
            let again = cache.insert_as(&hashes, &blocks, role, now, &mut Vec::new());
            again.map_err(|e| e.to_string())?;
        }
        cache.release(&hit.blocks).map_err(|e| e.to_string())?;
        cache.release(&newly).map_err(|e| e.to_string())?;
        let private = blocks[hit.blocks.len()..]
            .iter()
            .filter(|b| !newly.contains(b));
        free.extend(private);
        if cache.len() > capacity {
            cache.evict(cache.len() - capacity, now, &mut free);
        }
    }
    Ok(hit_tokens as f64 / input.max(1) as f64)
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
