//! CPU time of one routing decision (32k-token prompt, 64 engines; the setup of
//! `benches/route.rs`), read from the thread's scheduler statistics so time spent waiting for
//! a core on a busy machine is left out. Linux only. `cargo run --release -p kvc-route
//! --example route_cpu`.
#![allow(clippy::print_stdout)]

use std::hint::black_box;

use kvc_reuse::{BlockHash, BlockHasher, HashExtra, Xxh3Hasher};
use kvc_route::{
    ChainHash, EngineId, Event, EventBody, KvIndex, LoadReport, RouteConfig, RouteRequest, Router,
    Scope, Stored, Tier,
};

const TOKENS: usize = 32 * 1024;
const BS: usize = 16;
const ENGINES: u32 = 64;

fn tokens(seed: u32) -> Vec<u32> {
    (0..TOKENS as u32)
        .map(|i| (i ^ seed.wrapping_mul(0x9E37_79B9)).wrapping_mul(2_654_435_761) % 128_000)
        .collect()
}

fn hashes(tokens: &[u32]) -> Vec<ChainHash> {
    let h = Xxh3Hasher;
    let mut out: Vec<BlockHash> = Vec::new();
    h.hash_blocks(h.root(&HashExtra::new("bench", 1)), tokens, BS, &mut out);
    out.into_iter().map(|b| ChainHash(b.0)).collect()
}

fn store(ix: &mut KvIndex, engine: u32, seq: u64, tier: Tier, hashes: &[ChainHash]) {
    let e = Event {
        engine: EngineId(engine),
        seq,
        time_ms: 0,
        body: EventBody::Stored(Stored {
            tier,
            scope: Scope::default(),
            parent: None,
            block_size: BS as u32,
            token_count: (BS * hashes.len()) as u32,
            hashes: hashes.to_vec(),
        }),
    };
    ix.apply(&e, 0).expect("block size matches");
}

fn router(request: &[ChainHash]) -> Router {
    let mut ix = KvIndex::new(BS as u32);
    for e in 0..ENGINES {
        for p in 0..8 {
            store(
                &mut ix,
                e,
                1,
                Tier::Device,
                &hashes(&tokens(1_000 + e * 8 + p)),
            );
        }
        let dev = (32 * e as usize).min(request.len());
        let host = (dev + 256).min(request.len());
        store(&mut ix, e, 2, Tier::Device, &request[..dev]);
        store(&mut ix, e, 3, Tier::Host, &request[dev..host]);
        let load = Event {
            engine: EngineId(e),
            seq: 4,
            time_ms: 0,
            body: EventBody::Load(LoadReport {
                queued: e % 5,
                running: 8,
                kv_used_blocks: 1_000 + 100 * e,
                kv_total_blocks: 20_000,
            }),
        };
        ix.apply(&load, 0).expect("load");
    }
    Router::new(ix, RouteConfig::default()).expect("weights")
}

/// Nanoseconds this thread has run on a CPU.
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    let prompt = tokens(7);
    let request = hashes(&prompt);
    let mut r = router(&request);
    let req = RouteRequest {
        scope: Scope::default(),
        hashes: &request,
    };
    for _ in 0..200 {
        black_box(r.route(&req).expect("engines").chosen.engine);
    }
    let mut best = f64::INFINITY;
    let mut all = Vec::new();
    for _ in 0..20 {
        let (c0, w0) = (cpu_ns(), std::time::Instant::now());
        for _ in 0..100 {
            black_box(r.route(black_box(&req)).expect("engines").chosen.engine);
        }
        let cpu = (cpu_ns() - c0) as f64 / 100.0 / 1e3;
        let wall = w0.elapsed().as_secs_f64() / 100.0 * 1e6;
        best = best.min(cpu);
        all.push((cpu, wall));
    }
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (cpu, wall) = all[all.len() / 2];
    println!(
        "one decision, 32k-token prompt over 64 engines: CPU time median {cpu:.1} us (best {best:.1} us), wall {wall:.1} us"
    );
}
