//! CPU time of one routing decision (32k-token prompt, 64 engines; the setup of
//! `benches/route.rs`), read from the thread's scheduler statistics so time spent waiting for
//! a core on a busy machine is left out. Linux only. `cargo run --release -p kvc-route
//! --example route_cpu`.
#![allow(clippy::print_stdout)]

use std::hint::black_box;

use kvc_route::{RouteRequest, Scope};

#[path = "../benches/support/mod.rs"]
mod support;
use support::{hashes, router, tokens};

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
