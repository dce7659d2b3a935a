//! Criterion benches of the tiers, each as bytes per second next to a plain `memcpy` of the
//! same size measured in the same run:
//!
//! - `memcpy/1024 blocks`: the machine's copy bandwidth for 1,024 blocks;
//! - `host/put 1024 blocks` and `host/get 1024 blocks`: a host tier of 16-block pages, full
//!   and evicting, so puts include eviction;
//! - `host beside a writer/get 16 blocks`: the same get of 16 resident blocks (1 MiB) while
//!   another thread offloads 1,024-block batches (64 MiB) into the same tier without pause, so
//!   the figure shows how long a load waits for an offload to other pages;
//! - `disk/put 256 blocks` and `disk/get 256 blocks`: page files in a temporary folder (gets
//!   read warm pages from the OS page cache; puts include the eviction of old pages);
//! - `shared/put 64 blocks` and `shared/get 64 blocks`: one pipelined round trip per batch to
//!   the Redis server of `KVC_REDIS_URL` on loopback (skipped with a line when unset).
//!
//! Blocks are 64 KiB (2 layers, 8 KV heads of 64, fp16, 16 tokens). Run with
//! `cargo bench -p kvc-tier --bench tiers`.
#![allow(missing_docs, clippy::print_stderr)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvc_core::{BlockStore, DType, KvLayout, StoreKey, StoreNamespace};
use kvc_tier::{DiskConfig, DiskTier, HostConfig, HostTier, SharedConfig, SharedTier};

fn ns() -> StoreNamespace {
    let layout = KvLayout::new(2, 8, 64, 16, DType::F16).expect("layout");
    StoreNamespace::new("bench", layout, 0, 1).expect("namespace")
}

fn keys(from: u128, n: usize) -> Vec<StoreKey> {
    (0..n as u128).map(|i| StoreKey(from + i)).collect()
}

fn tiers(c: &mut Criterion) {
    let ns = ns();
    let bb = ns.block_bytes() as usize;
    let mut found = Vec::new();

    let n = 1024;
    let src = vec![0x5Au8; n * bb];
    let mut dst = vec![0u8; n * bb];
    let mut g = c.benchmark_group("memcpy");
    g.throughput(Throughput::Bytes((n * bb) as u64));
    g.bench_function("1024 blocks", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    g.finish();

    let mut g = c.benchmark_group("host");
    g.throughput(Throughput::Bytes((n * bb) as u64));
    let host = HostTier::new(ns.clone(), HostConfig::new((2 * n * bb) as u64, 16)).expect("host");
    let mut next = 0u128;
    g.bench_function("put 1024 blocks", |b| {
        b.iter(|| {
            let k = keys(next, n);
            next += n as u128;
            black_box(host.put(&k, &src, 0).expect("put"))
        })
    });
    let resident = keys(next - n as u128, n);
    g.bench_function("get 1024 blocks", |b| {
        b.iter(|| black_box(host.get(&resident, &mut dst, &mut found).expect("get")))
    });
    g.finish();

    contended_host(c, &ns, &src);

    let dir = std::env::temp_dir().join(format!("kvc-tier-bench-{}", std::process::id()));
    let d = 256;
    let mut g = c.benchmark_group("disk");
    g.throughput(Throughput::Bytes((d * bb) as u64));
    let disk =
        DiskTier::open(ns.clone(), &DiskConfig::new(&dir, (8 * d * bb) as u64, 16)).expect("disk");
    g.bench_function("put 256 blocks", |b| {
        b.iter(|| {
            let k = keys(next, d);
            next += d as u128;
            black_box(disk.put(&k, &src[..d * bb], 0).expect("put"))
        })
    });
    let resident = keys(next - d as u128, d);
    g.bench_function("get 256 blocks", |b| {
        b.iter(|| {
            black_box(
                disk.get(&resident, &mut dst[..d * bb], &mut found)
                    .expect("get"),
            )
        })
    });
    g.finish();
    drop(disk);
    let _ = std::fs::remove_dir_all(&dir);

    let Some(url) = std::env::var(kvc_tier::REDIS_URL_ENV)
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("shared: skipped, KVC_REDIS_URL is not set");
        return;
    };
    let r = 64;
    let mut cfg = SharedConfig::new(url);
    cfg.prefix = format!("kvc-bench-{}", std::process::id());
    cfg.ttl = Duration::from_secs(60);
    cfg.timeout = Duration::from_secs(2);
    let shared = SharedTier::new(ns, cfg).expect("shared");
    let mut g = c.benchmark_group("shared");
    g.throughput(Throughput::Bytes((r * bb) as u64));
    let mut written = Vec::new();
    g.bench_function("put 64 blocks", |b| {
        b.iter(|| {
            let k = keys(next, r);
            next += r as u128;
            let out = shared.put(&k, &src[..r * bb], 0).expect("put");
            written.extend_from_slice(&k);
            black_box(out)
        })
    });
    let resident = keys(next - r as u128, r);
    g.bench_function("get 64 blocks", |b| {
        b.iter(|| {
            black_box(
                shared
                    .get(&resident, &mut dst[..r * bb], &mut found)
                    .expect("get"),
            )
        })
    });
    g.finish();
    for chunk in written.chunks(1024) {
        let _ = shared.remove(chunk);
    }
}

/// A get of 16 resident blocks while a writer thread offloads 1,024-block batches.
fn contended_host(c: &mut Criterion, ns: &StoreNamespace, src: &[u8]) {
    let bb = ns.block_bytes() as usize;
    let n = src.len() / bb;
    let host = Arc::new(
        HostTier::new(
            ns.clone(),
            HostConfig::new((2 * n * bb + 64 * bb) as u64, 16),
        )
        .expect("host"),
    );
    // Resident blocks at a high priority, so the writer's default blocks never evict them.
    let resident = keys(1 << 40, 16);
    let _ = host
        .put(&resident, &src[..16 * bb], 90)
        .expect("put resident");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (host, stop, src) = (Arc::clone(&host), Arc::clone(&stop), src.to_vec());
        std::thread::spawn(move || {
            let mut next = 0u128;
            while !stop.load(Ordering::Relaxed) {
                let k = keys(next, n);
                next += n as u128;
                let _ = host.put(&k, &src, 0);
            }
        })
    };
    let mut dst = vec![0u8; 16 * bb];
    let mut found = Vec::new();
    let mut g = c.benchmark_group("host beside a writer");
    g.throughput(Throughput::Bytes((16 * bb) as u64));
    g.bench_function("get 16 blocks", |b| {
        b.iter(|| black_box(host.get(&resident, &mut dst, &mut found).expect("get")))
    });
    g.finish();
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = tiers
}
criterion_main!(benches);
