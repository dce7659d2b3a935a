//! The routing benchmark's setup, shared by `benches/route.rs` (criterion, wall time) and
//! `examples/route_cpu.rs` (CPU time): a 32k-token prompt (2,048 blocks of 16 tokens) over 64
//! engines, each holding 8 prompts of its own plus a share of the request's prefix (engine `e`
//! holds the first `32·e` blocks of it on device, with the next 256 in host memory).

use kvc_reuse::{BlockHash, BlockHasher, HashExtra, Xxh3Hasher};
use kvc_route::{
    ChainHash, EngineId, Event, EventBody, KvIndex, LoadReport, RouteConfig, Router, Scope, Stored,
    Tier,
};

pub const TOKENS: usize = 32 * 1024;
pub const BS: usize = 16;
pub const ENGINES: u32 = 64;

pub fn tokens(seed: u32) -> Vec<u32> {
    (0..TOKENS as u32)
        .map(|i| (i ^ seed.wrapping_mul(0x9E37_79B9)).wrapping_mul(2_654_435_761) % 128_000)
        .collect()
}

pub fn hashes(tokens: &[u32]) -> Vec<ChainHash> {
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

pub fn router(request: &[ChainHash]) -> Router {
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
