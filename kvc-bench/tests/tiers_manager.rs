//! The `tiers` scenario's device run by the memory manager, checked for content and
//! conservation: a short prefix of the Mooncake synthetic trace (`tests/data`) through a device
//! small enough that the manager evicts, offloads and loads all the time, with a host tier
//! (write-back and write-through) and a host tier over a disk tier below it.
//!
//! After every request: the tiers' hit tokens plus the device's never exceed the prompt's full
//! blocks; the pool's blocks in use are exactly the blocks the prefix cache holds (the request
//! gave everything else back); and every cached device block holds the bytes of the key it is
//! cached under, loaded blocks included. Every load was checked against the key it was stored
//! with (a wrong payload is an error, which a test provokes).

use std::path::Path;
use std::sync::Arc;

use kvc_bench::replay::synth_prompt;
use kvc_bench::tiers::{ManagedDevice, TiersError};
use kvc_bench::trace::{TraceRequest, read_trace};
use kvc_core::{DType, KvLayout, SeqId, StoreKey, StoreNamespace};
use kvc_tier::{DeviceEvent, DiskConfig, DiskTier, HostConfig, HostTier, OffloadMode, TierStack};

const BLOCK: u32 = 16;
/// Bytes of the scenario's stand-in payload per block.
const STAND_IN: u64 = 32;

fn trace(requests: usize) -> Vec<TraceRequest> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mooncake-synthetic.jsonl");
    let mut t = read_trace(&path).expect("the synthetic trace ships with the crate");
    t.truncate(requests);
    t
}

fn namespace() -> StoreNamespace {
    // The scenario's stand-in layout: 16 tokens of 2 bytes, 32 bytes a block.
    let layout = KvLayout::new(1, 1, 1, BLOCK, DType::Fp8E4M3).expect("layout");
    assert_eq!(layout.bytes_per_block(), STAND_IN);
    StoreNamespace::new("tiers-manager-test", layout, 0, 1).expect("namespace")
}

fn stack(host_tokens: u64, disk: Option<(&Path, u64)>, mode: OffloadMode) -> Arc<TierStack> {
    let ns = namespace();
    let host_bytes = host_tokens / u64::from(BLOCK) * STAND_IN;
    let host = HostTier::new(ns.clone(), HostConfig::new(host_bytes, 4)).expect("host tier");
    let disk = disk.map(|(dir, tokens)| {
        let blocks = tokens / u64::from(BLOCK);
        let budget = blocks * (STAND_IN + 24) + blocks.div_ceil(4) * 256;
        DiskTier::open(ns, &DiskConfig::new(dir, budget, 4)).expect("disk tier")
    });
    Arc::new(TierStack::new(host, disk, None, mode))
}

/// What a replay added up to.
#[derive(Debug, Default)]
struct Totals {
    device_blocks: u64,
    tier_blocks: [u64; 3],
}

/// Replays `trace` through `dev`, checking the invariants after every request.
fn replay(dev: &mut ManagedDevice, trace: &[TraceRequest]) -> Totals {
    let mut totals = Totals::default();
    let mut tokens = Vec::new();
    for (i, req) in trace.iter().enumerate() {
        tokens.clear();
        synth_prompt(req, &mut tokens);
        let s = dev
            .serve(SeqId(i as u64), &tokens, req.timestamp_ms)
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        let full = tokens.len() / BLOCK as usize;
        assert_eq!(s.full_blocks, full);
        assert!(
            s.device_blocks + s.loaded_blocks() <= full,
            "request {i}: {} device + {} tier blocks over {full} full blocks",
            s.device_blocks,
            s.loaded_blocks()
        );
        // Never the block of the last prompt token: it must be computed.
        assert!(s.device_blocks + s.loaded_blocks() <= tokens.len().saturating_sub(1) / 16);
        // Conservation: the request is freed, so the pool's blocks in use are the cache's.
        assert_eq!(dev.allocated_blocks(), dev.cached_blocks(), "request {i}");
        let usage = dev.usage().total();
        assert_eq!(usage.in_use, 0, "request {i}: {usage:?}");
        assert_eq!(usage.evictable, dev.cached_blocks(), "request {i}");
        assert_eq!(usage.free + usage.evictable, usage.capacity, "request {i}");
        let checked = dev
            .verify_cached()
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(checked, dev.cached_blocks());
        totals.device_blocks += s.device_blocks as u64;
        for (t, n) in s.tier_blocks.iter().enumerate() {
            totals.tier_blocks[t] += *n as u64;
        }
    }
    totals
}

/// A device of 100k tokens below the largest prompt's two: the manager evicts at once.
const DEVICE_BLOCKS: usize = 100_000 / BLOCK as usize;

#[test]
fn write_back_loads_hold_the_bytes_their_keys_were_stored_with() {
    let trace = trace(200);
    let stack = stack(400_000, None, OffloadMode::WriteBack);
    let mut dev = ManagedDevice::new(
        DEVICE_BLOCKS,
        BLOCK,
        Some(stack.clone()),
        OffloadMode::WriteBack,
    )
    .expect("device");
    let totals = replay(&mut dev, &trace);
    let (kv, engine, tiers) = (dev.kv_stats(), dev.counters(), stack.stats());
    // The device filled up, so the manager evicted and wrote back, and requests hit in the
    // host tier what the device had lost.
    assert!(kv.evicted_blocks > 0, "{kv:?}");
    assert!(totals.tier_blocks[0] > 0, "{totals:?}");
    assert!(totals.device_blocks > 0, "{totals:?}");
    // Every block the manager offloaded was gathered from the device and offered to the
    // tiers, and every block it evicted was written back (write-back).
    assert_eq!(engine.offloads, kv.offloaded_blocks);
    assert_eq!(kv.offloaded_blocks, kv.evicted_blocks);
    assert_eq!(tiers.offloaded, kv.offloaded_blocks);
    // Loads: what the requests counted, the manager was told, and the tiers served agree.
    assert_eq!(engine.loaded_blocks, totals.tier_blocks[0]);
    assert_eq!(kv.loaded_blocks, engine.loaded_blocks);
    assert_eq!(tiers.loaded[0], engine.loaded_blocks);
    assert_eq!(engine.short_loads, 0);
    assert_eq!(kv.tier_hit_blocks, kv.loaded_blocks);
}

#[test]
fn write_through_offloads_at_caching_and_never_writes_loaded_blocks_back() {
    let trace = trace(200);
    let stack = stack(400_000, None, OffloadMode::WriteThrough);
    let mut dev = ManagedDevice::new(
        DEVICE_BLOCKS,
        BLOCK,
        Some(stack.clone()),
        OffloadMode::WriteThrough,
    )
    .expect("device");
    let totals = replay(&mut dev, &trace);
    let (kv, engine) = (dev.kv_stats(), dev.counters());
    assert!(kv.evicted_blocks > 0 && totals.tier_blocks[0] > 0, "{kv:?}");
    // Written through when cached: every block cached, except those loaded from the tiers.
    assert_eq!(engine.offloads, kv.offloaded_blocks);
    assert_eq!(kv.offloaded_blocks, kv.cached_blocks - kv.loaded_blocks);
}

#[test]
fn blocks_come_back_from_the_disk_below_a_small_host_tier() {
    let trace = trace(120);
    let dir = std::env::temp_dir().join(format!("kvc-tiers-manager-{}", std::process::id()));
    let stack = stack(
        20_000,
        Some((dir.as_path(), 2_000_000)),
        OffloadMode::WriteBack,
    );
    let mut dev = ManagedDevice::new(
        DEVICE_BLOCKS,
        BLOCK,
        Some(stack.clone()),
        OffloadMode::WriteBack,
    )
    .expect("device");
    let totals = replay(&mut dev, &trace);
    let tiers = stack.stats();
    drop(dev);
    drop(stack);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(tiers.demoted > 0, "{tiers:?}");
    assert!(totals.tier_blocks[1] > 0, "{totals:?}");
    assert_eq!(tiers.loaded[1], totals.tier_blocks[1]);
}

#[test]
fn a_tier_block_holding_other_bytes_is_an_error_not_a_hit() {
    let stack = stack(10_000, None, OffloadMode::WriteBack);
    let mut dev =
        ManagedDevice::new(64, BLOCK, Some(stack.clone()), OffloadMode::WriteBack).expect("device");
    let prompt: Vec<u32> = (0..100).collect();
    let mut keys: Vec<StoreKey> = Vec::new();
    dev.block_keys(&prompt, &mut keys);
    assert_eq!(keys.len(), 6);
    // The host tier holds the prompt's first two blocks, but with bytes of no key.
    let wrong = vec![7u8; 2 * STAND_IN as usize];
    let _ = stack
        .offload(DeviceEvent::Evicted, &keys[..2], &wrong, 35)
        .expect("offload");
    match dev.serve(SeqId(1), &prompt, 0) {
        Err(TiersError::WrongBytes { tier, .. }) => assert_eq!(tier, "host"),
        other => panic!("a corrupt tier block was served: {other:?}"),
    }
}
