//! Criterion benchmark of one routing decision: a 32k-token prompt (2,048 blocks of 16
//! tokens) over 64 engines, each holding 8 prompts of its own plus a share of the request's
//! prefix (engine `e` holds the first `32·e` blocks of it on device, with the next 256 in host
//! memory), so the walk goes deep and every engine stays in it for a while. Also the same
//! decision with the prompt hashed first (kvc-reuse's xxh3 chain hash), as a router that
//! receives tokens pays it.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kvc_reuse::{BlockHasher, HashExtra, Xxh3Hasher};
use kvc_route::{ChainHash, RouteRequest, Scope};

mod support;
use support::{BS, hashes, router, tokens};

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
