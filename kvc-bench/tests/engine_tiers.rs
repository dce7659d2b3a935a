//! End-to-end equality through the tiers below device memory: a prompt's KV is evicted from the
//! engine's device pool, written down as real bytes (host, then disk; or uploaded to a shared
//! Redis server), loaded back into other device blocks for a later request (or by a second
//! engine), and every generated token's logits still equal those of the contiguous f64
//! reference. Each test also checks, from the tier counters, that the path was really taken,
//! and the fault tests that a damaged disk page or a lost shared server degrades to recompute
//! with the same logits.
#![allow(clippy::print_stderr)]

mod support;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvc_bench::engine::tiers::{DiskOptions, TierOptions, TierReport};
use kvc_bench::engine::{Completed, Engine};
use kvc_core::{BlockStore, Retention, ReuseIndex, ReuseScope, TenantId};
use kvc_reuse::{BlockHash, ScopedIndex, Xxh3Hasher};
use kvc_sched::DynamicOnly;
use kvc_tier::OffloadMode;
use support::{check, config, index, prompt, request};

type TinyEngine = Engine<DynamicOnly, ScopedIndex<Xxh3Hasher>>;

/// 16 device blocks of 4 tokens: four 24-token requests do not fit, so the oldest prompt's
/// cached blocks are evicted.
const DEVICE_BLOCKS: u32 = 16;

fn engine(tiers: TierOptions) -> TinyEngine {
    let mut cfg = config(DEVICE_BLOCKS);
    cfg.tiers = Some(tiers);
    Engine::new(&cfg, DynamicOnly::default(), index()).unwrap()
}

fn run(e: &mut TinyEngine, prompt: Vec<u32>) -> Vec<Completed> {
    e.submit(request(prompt, 4)).unwrap();
    let done = e.run_until_idle(1_000).unwrap();
    assert_eq!(done.len(), 1);
    check(e, &done);
    done
}

/// The prompt reused later: 24 tokens, 6 full blocks.
fn first_prompt(seed: u32) -> Vec<u32> {
    prompt(seed, 24)
}

/// The same prompt continued by 3 tokens: its 6 full blocks can come from the tiers.
fn continued(seed: u32) -> Vec<u32> {
    let mut p = first_prompt(seed);
    p.extend([9, 8, 7]);
    p
}

/// Serves the first prompt, then `fillers` unrelated prompts that push its blocks out of the
/// device pool.
fn serve_then_evict(e: &mut TinyEngine, seed: u32, fillers: u32) {
    run(e, first_prompt(seed));
    for i in 0..fillers {
        run(e, prompt(seed + 100 + i, 24));
    }
}

fn report(e: &TinyEngine) -> TierReport {
    e.tier_report().expect("tiers are configured")
}

/// A fresh folder under the system's temporary folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "kvc-engine-{name}-{}-{nanos:x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A host tier of `host_blocks` in pages of 4 over a disk tier of 1 MiB in `dir`.
fn host_and_disk(host_blocks: u32, dir: &Path) -> TierOptions {
    let mut t = TierOptions::host(host_blocks);
    t.disk = Some(DiskOptions {
        dir: dir.to_path_buf(),
        budget_bytes: 1 << 20,
    });
    t
}

#[test]
fn a_prefix_evicted_to_the_host_tier_loads_back_with_the_same_logits() {
    let mut e = engine(TierOptions::host(64));
    serve_then_evict(&mut e, 1, 3);
    let before = report(&e);
    assert!(before.offloaded_blocks >= 6, "{before:?}");
    assert_eq!(before.loaded_blocks(), 0);

    let again = run(&mut e, continued(1));
    let r = report(&e);
    assert_eq!(r.loaded_host_blocks, 6, "{r:?}");
    assert_eq!(r.failed_loads, 0, "{r:?}");
    assert_eq!(
        r.loaded_bytes,
        6 * e.tier_stack().unwrap().host().block_bytes()
    );
    assert_eq!(again[0].cached_tokens, 24);
    let s = e.scheduler().stats();
    assert_eq!(
        s.tier_tokens, 24,
        "the prefix came from the host tier, not the device"
    );
}

/// Serves `seed`'s first prompt, pins its first four blocks (priority 90, for `pin_steps`
/// steps from now) when `pin_steps` is set, pushes it out of the device and through a host
/// tier of two pages with fillers, then serves its continuation: its cached tokens, and how
/// many of its blocks came back from the host tier.
fn after_churn(pin_steps: Option<u64>) -> (u64, u64) {
    // Two host pages of four blocks.
    let mut e = engine(TierOptions::host(8));
    let seed = 7;
    run(&mut e, first_prompt(seed));
    if let Some(steps) = pin_steps {
        let now = e.scheduler().stats().steps;
        let scope = ReuseScope {
            tenant: TenantId(0),
            session: None,
        };
        let mut keys = Vec::new();
        e.reuse_index_mut()
            .block_keys(&scope, &first_prompt(seed), &mut keys);
        assert_eq!(keys.len(), 6);
        let pin = Retention {
            priority: 90,
            until: Some(now + steps),
        };
        for k in &keys[..4] {
            e.reuse_index_mut()
                .set_retention(BlockHash(k.0).short(), pin);
        }
    }
    // A long prompt needs 15 of the 16 device blocks, so all but one of the pinned blocks
    // are evicted too (a pin orders eviction; it reserves no memory), then short prompts
    // churn the host tier.
    run(&mut e, prompt(seed + 99, 56));
    for i in 0..4 {
        run(&mut e, prompt(seed + 100 + i, 24));
    }
    let before = report(&e).loaded_host_blocks;
    let again = run(&mut e, continued(seed));
    let r = report(&e);
    assert_eq!(r.failed_loads, 0, "{r:?}");
    (again[0].cached_tokens, r.loaded_host_blocks - before)
}

#[test]
fn a_pinned_prefix_outlives_churn_in_a_small_host_tier_and_loads_back_with_the_same_logits() {
    // Unpinned, the fillers push the whole prefix out of the device and the host tier.
    assert_eq!(after_churn(None), (0, 0));
    // Pinned, its first block stays on the device and the other three are written back with
    // their pin: the host tier keeps their page while the fillers come and go, and they load
    // back (`run` checks every logit against the reference).
    assert_eq!(after_churn(Some(10_000)), (16, 3));
    // A pin that ran out before the fillers came protects nothing.
    assert_eq!(after_churn(Some(1)), (0, 0));
}

#[test]
fn a_prefix_that_went_device_host_disk_loads_back_with_the_same_logits() {
    let dir = TempDir::new("disk");
    // One host page of 4 blocks: the first prompt's blocks are demoted to disk by the fillers'.
    let mut e = engine(host_and_disk(4, &dir.0));
    serve_then_evict(&mut e, 2, 4);
    let before = report(&e);
    assert!(before.demoted_blocks >= 6, "{before:?}");

    run(&mut e, continued(2));
    let r = report(&e);
    assert!(r.loaded_disk_blocks > 0, "{r:?}");
    assert_eq!(r.loaded_blocks(), 6, "{r:?}");
    assert!(
        r.promoted_blocks > 0,
        "disk blocks are promoted into the host tier: {r:?}"
    );
}

#[test]
fn a_restarted_engine_loads_a_prefix_from_the_disk_pages_it_left_with_the_same_logits() {
    let dir = TempDir::new("restart");
    {
        let mut e = engine(host_and_disk(4, &dir.0));
        serve_then_evict(&mut e, 5, 4);
        assert!(report(&e).demoted_blocks >= 6);
    }
    // A new engine (empty device pool and host tier) on the same folder.
    let mut e = engine(host_and_disk(4, &dir.0));
    let recovered = e
        .tier_stack()
        .unwrap()
        .disk()
        .unwrap()
        .stats()
        .recovered_pages;
    assert!(recovered > 0);
    let again = run(&mut e, continued(5));
    let r = report(&e);
    assert_eq!(r.loaded_disk_blocks, 6, "{r:?}");
    assert_eq!(again[0].cached_tokens, 24);
}

#[test]
fn a_corrupt_disk_page_degrades_to_recompute_with_the_same_logits() {
    corrupt_disk_page_degrades_to_recompute(false);
}

#[test]
fn a_corrupt_disk_page_met_by_a_background_load_degrades_to_recompute_with_the_same_logits() {
    corrupt_disk_page_degrades_to_recompute(true);
}

fn corrupt_disk_page_degrades_to_recompute(background_loads: bool) {
    let dir = TempDir::new("corrupt");
    let mut tiers = host_and_disk(4, &dir.0);
    tiers.background_loads = background_loads;
    let mut e = engine(tiers);
    serve_then_evict(&mut e, 3, 4);
    // Flip a byte near the end of every page file (inside the last block's payload); the
    // folder also holds the tier's lock file.
    let mut damaged = 0;
    for ns_dir in std::fs::read_dir(&dir.0).unwrap() {
        for page in std::fs::read_dir(ns_dir.unwrap().path()).unwrap() {
            let path = page.unwrap().path();
            if path.extension().is_none_or(|e| e != "kvcpage") {
                continue;
            }
            let mut bytes = std::fs::read(&path).unwrap();
            let at = bytes.len() - 9;
            bytes[at] ^= 0x5a;
            std::fs::write(&path, bytes).unwrap();
            damaged += 1;
        }
    }
    assert!(
        damaged > 0,
        "the fillers were meant to demote pages to disk"
    );

    let again = run(&mut e, continued(3));
    let r = report(&e);
    assert!(r.missed_load_blocks > 0, "{r:?}");
    assert!(r.failed_loads > 0, "{r:?}");
    let disk = e.tier_stack().unwrap().disk().unwrap().stats();
    assert!(disk.corrupt_pages > 0, "{disk:?}");
    // Whatever was not loaded was recomputed: the logits above matched the reference.
    assert!(again[0].cached_tokens < 24, "{}", again[0].cached_tokens);
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The Redis server of the test run (`KVC_REDIS_URL`). Unset: under `CI=true` the test fails;
/// otherwise it prints one skip line and the caller returns.
fn redis_url(test: &str) -> Option<String> {
    match std::env::var(kvc_tier::REDIS_URL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                !ci(),
                "{test}: KVC_REDIS_URL is not set under CI=true; run the tests through `cargo xtask test`, which starts a redis-server"
            );
            eprintln!("{test}: skipped, KVC_REDIS_URL is not set (cargo xtask test sets it)");
            None
        }
    }
}

/// Host tier plus the shared tier at `url`, writing blocks down as soon as the device caches
/// them (so the second engine sees them without an eviction on the first).
fn shared(url: &str) -> TierOptions {
    let mut t = TierOptions::host(64);
    t.shared_url = Some(url.to_owned());
    t.mode = OffloadMode::WriteThrough;
    t
}

#[test]
fn a_second_engine_loads_a_prefix_the_first_uploaded_with_the_same_logits() {
    let Some(url) = redis_url("a_second_engine_loads_a_prefix_the_first_uploaded") else {
        return;
    };
    // A prompt of this run only: the server may hold blocks of earlier runs (an upload of a
    // block already there is not counted).
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let own: Vec<u32> = (0..24)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 256) as u32
        })
        .collect();
    let mut first = engine(shared(&url));
    run(&mut first, own.clone());
    let up = report(&first);
    assert!(up.uploaded_blocks >= 6, "{up:?}");

    // Its own device pool and host tier; only the server is shared.
    let mut second = engine(shared(&url));
    let mut next = own;
    next.extend([9, 8, 7]);
    let again = run(&mut second, next);
    let r = report(&second);
    assert_eq!(r.loaded_shared_blocks, 6, "{r:?}");
    assert_eq!(again[0].cached_tokens, 24);
}

/// A redis-server this test starts and kills itself.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts one on a free loopback port; `None` (a skip line, or a failure under CI) when no
    /// `redis-server` is on PATH.
    fn start(test: &str) -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            assert!(
                !ci(),
                "{test}: cannot start redis-server from PATH under CI=true"
            );
            eprintln!("{test}: skipped, no redis-server on PATH");
            return None;
        };
        let r = Self {
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{test}: redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn a_shared_server_killed_during_a_load_degrades_to_recompute_with_the_same_logits() {
    let Some(mut server) = OwnRedis::start("a_shared_server_killed_during_a_load") else {
        return;
    };
    let mut first = engine(shared(&server.url()));
    run(&mut first, first_prompt(4));
    assert!(report(&first).uploaded_blocks >= 6);

    // The second engine plans the load from the shared tier; the server dies before the load.
    let mut second = engine(shared(&server.url()));
    second.submit(request(continued(4), 4)).unwrap();
    let mut done = Vec::new();
    let mut killed = false;
    for _ in 0..1_000 {
        if second.is_idle() {
            break;
        }
        done.extend(
            second
                .step_with(|plan| {
                    if !plan.loads.is_empty() && !killed {
                        server.kill();
                        killed = true;
                    }
                })
                .unwrap(),
        );
    }
    assert!(
        killed,
        "the second engine was meant to plan a load from the shared tier"
    );
    assert_eq!(done.len(), 1);
    check(&second, &done);
    let r = report(&second);
    assert_eq!(r.loaded_shared_blocks, 0, "{r:?}");
    assert_eq!((r.failed_loads, r.missed_load_blocks), (1, 6), "{r:?}");
    assert_eq!(done[0].cached_tokens, 0, "every block was recomputed");
    let shared = second.tier_stack().unwrap().shared().unwrap().stats();
    assert!(shared.unavailable_calls > 0, "{shared:?}");
}

/// `kvc-bench engine --json` with the given extra flags, parsed.
fn engine_cli(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "engine",
        "--requests",
        "8",
        "--new-tokens",
        "2",
        "--blocks",
        "64",
        "--system-prompts",
        "4",
        "--json",
    ];
    args.extend(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_kvc-bench"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_engine_command_loads_evicted_prefixes_from_host_and_disk() {
    // Four 16-block system prompts cycle through a 64-block device pool: without tiers the
    // device evicts each before it comes back.
    let base = engine_cli(&[]);
    assert!(base.get("tiers").is_none(), "{base}");
    assert_eq!(base["tier_hit_tokens"], 0);

    let dir = TempDir::new("cli");
    let disk = dir.0.to_str().unwrap();
    let tiered = engine_cli(&[
        "--host-tier-blocks",
        "16",
        "--disk-dir",
        disk,
        "--disk-budget",
        "64M",
    ]);
    let t = &tiered["tiers"];
    assert!(t["offloaded_blocks"].as_u64() > Some(0), "{tiered}");
    assert!(t["loaded_disk_blocks"].as_u64() > Some(0), "{tiered}");
    assert!(tiered["tier_hit_tokens"].as_u64() > Some(0), "{tiered}");
    assert_eq!(tiered["requests"], 8);
    let computed = |r: &serde_json::Value| r["computed_tokens"].as_u64().unwrap();
    assert!(
        computed(&tiered) < computed(&base),
        "loads replace prefill: {} computed with tiers, {} without",
        computed(&tiered),
        computed(&base)
    );
}

#[test]
fn concurrent_requests_under_preemption_with_loads_give_the_same_logits() {
    // Three prompts, then both rounds of six requests over them at once on 16 device blocks:
    // loads, evictions, write-backs and preemptions interleave in the same steps.
    let mut e = engine(TierOptions::host(64));
    for seed in 0..3 {
        run(&mut e, first_prompt(50 + seed));
    }
    let mut done = Vec::new();
    for round in 0..2u32 {
        for i in 0..6u32 {
            let mut p = first_prompt(50 + i % 3);
            p.extend([round, i, 200]);
            let mut r = request(p, 6);
            r.qos = kvc_core::QosClass((i % 3) as u8);
            e.submit(r).unwrap();
        }
        done.extend(e.run_until_idle(5_000).unwrap());
    }
    assert_eq!(done.len(), 12);
    check(&e, &done);
    let r = report(&e);
    assert!(r.loaded_host_blocks > 0, "{r:?}");
    assert!(
        e.scheduler().stats().preempted > 0,
        "the pool was meant to force preemption"
    );
}

#[test]
fn background_loads_give_the_same_schedule_and_logits_as_loads_in_the_step() {
    // The concurrent workload above, once with loads in the step and once with loads fetched on
    // a background thread while the step computes: the same tokens (checked against the
    // reference each time), the same steps and the same blocks loaded.
    let serve = |background: bool| {
        let mut t = TierOptions::host(64);
        t.background_loads = background;
        let mut e = engine(t);
        for seed in 0..3 {
            run(&mut e, first_prompt(60 + seed));
        }
        for i in 0..6u32 {
            let mut p = first_prompt(60 + i % 3);
            p.extend([i, 201]);
            e.submit(request(p, 5)).unwrap();
        }
        // Step by step, noting the loads still unreported between steps.
        let (mut done, mut in_flight_between_steps) = (Vec::new(), 0);
        for _ in 0..5_000 {
            if e.is_idle() {
                break;
            }
            done.extend(e.step().unwrap());
            in_flight_between_steps += e.scheduler().pending_loads();
        }
        assert_eq!(done.len(), 6);
        check(&e, &done);
        done.sort_by_key(|c| c.id);
        let outputs: Vec<Vec<u32>> = done.iter().map(|c| c.output.clone()).collect();
        let r = report(&e);
        let same = (
            outputs,
            e.scheduler().stats().steps,
            r.loaded_host_blocks,
            r.load_jobs,
        );
        (same, in_flight_between_steps)
    };
    let (in_step, none_pending) = serve(false);
    let (background, pending) = serve(true);
    assert!(
        in_step.2 > 0,
        "the workload was meant to load from the host tier"
    );
    assert_eq!(none_pending, 0, "loads in the step are reported within it");
    assert!(pending > 0, "background loads are reported a step later");
    assert_eq!(background, in_step);
}
