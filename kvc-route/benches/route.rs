//! Criterion benchmark of one routing decision: a 32k-token prompt (2,048 blocks of 16
//! tokens) over 64 engines, each holding 8 prompts of its own plus a share of the request's
//! prefix (engine `e` holds the first `32·e` blocks of it on device, with the next 256 in host
//! memory), so the walk goes deep and every engine stays in it for a while. Also the same
//! decision with the prompt hashed first (kvc-reuse's xxh3 chain hash), as a router that
//! receives tokens pays it.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
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

fn route(c: &mut Criterion) {
    let prompt = tokens(7);
    let request = hashes(&prompt);
    let mut r = router(&request);
    c.bench_function("route/decide 32k-token prompt over 64 engines", |b| {
        b.iter(|| {
            let d = r
                .route(&RouteRequest {
                    scope: Scope::default(),
                    hashes: black_box(&request),
                })
                .expect("engines");
            black_box(d.chosen.engine)
        });
    });
    let mut buf = Vec::with_capacity(request.len());
    let hasher = Xxh3Hasher;
    let root = hasher.root(&HashExtra::new("bench", 1));
    c.bench_function(
        "route/hash (xxh3) + decide 32k-token prompt over 64 engines",
        |b| {
            b.iter(|| {
                let mut raw = Vec::with_capacity(request.len());
                hasher.hash_blocks(root, black_box(&prompt), BS, &mut raw);
                buf.clear();
                buf.extend(raw.iter().map(|h| ChainHash(h.0)));
                let d = r
                    .route(&RouteRequest {
                        scope: Scope::default(),
                        hashes: &buf,
                    })
                    .expect("engines");
                black_box(d.chosen.engine)
            });
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = route
}
criterion_main!(benches);
