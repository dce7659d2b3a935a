//! The `tiers` scenario: a Mooncake-format trace replayed through the memory manager
//! (`kvc_sched::KvManager`, with the real LRU [`PrefixCache`](kvc_reuse::PrefixCache) as its
//! reuse index over a pool of the device's blocks) with the real [`TierStack`] below it (host,
//! and optionally disk and a shared Redis server), against the same device alone.
//!
//! Per request, in trace order, the manager decides and the replay executes, as an engine
//! executes a step plan ([`ManagedDevice`], `tiers/managed.rs`): the device lookup, the load
//! of the blocks some tier holds after the device hit (the longest prefix across host, disk
//! and shared; the replay copies them in, checking every loaded byte, and reports the load),
//! the allocation of the rest of the prompt (evicting LRU blocks when the device is full),
//! the offloads of the blocks evicted (write-back) or newly cached (write-through), gathered
//! from device memory before anything is written over them, and the caching of every full
//! prompt block. The host tier's evictions go to disk.
//!
//! The tiers and device memory hold real bytes, but a small stand-in payload per block (32
//! bytes: the block's key, twice), so that 30M tokens of host tier fit in 60 MB on a laptop;
//! offloads and loads are checked against it. Bytes and times are then charged at the real
//! model's size in the cost model: each block loaded is `bytes_per_block` of the model
//! (Llama-3-8B bf16 by default: 2 MiB per 16 tokens), moved over PCIe from host memory, plus
//! the disk read or the network transfer for lower tiers, and each token hit saves its share
//! of the prefill compute of the cost model.
//!
//! Predictive promotion (`promote.rs`) goes through the manager too: a promotion is a sequence
//! of its own whose prefix continues into the host tier, loaded, cached and freed.

pub mod managed;
mod promote;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvc_core::{BlockId, DType, KvLayout, SeqId, StoreKey, StoreNamespace};
use kvc_tier::{
    DiskConfig, DiskTier, HostConfig, HostTier, LoadOutcome, OffloadMode, SharedConfig, SharedTier,
    TierKind, TierStack,
};
use serde::Serialize;
use thiserror::Error;

use crate::profiles::{GpuProfile, ModelProfile};
use crate::replay::synth_prompt;
use crate::sim::cost::CostModel;
use crate::trace::TraceRequest;
pub use managed::{EngineCounters, ManagedDevice, Served};
use promote::Predictor;

/// Bytes of the stand-in payload of one block in the tiers.
const STAND_IN_BYTES: usize = 32;

/// Link speeds of the cost model, in bytes per second.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Links {
    /// Host memory to GPU (PCIe Gen5 x16: 64 GB/s peak, about 50 GB/s reached by DMA).
    pub pcie: f64,
    /// Disk reads (one datacenter NVMe Gen4 drive: about 6 GB/s sequential).
    pub disk: f64,
    /// The shared tier's network (100 Gb/s Ethernet: about 11 GB/s of payload).
    pub network: f64,
}

impl Default for Links {
    fn default() -> Self {
        Self {
            pcie: 50e9,
            disk: 6e9,
            network: 11e9,
        }
    }
}

/// What to replay.
#[derive(Clone, Debug, PartialEq)]
pub struct TiersConfig {
    /// Device prefix-cache capacity in tokens.
    pub device_tokens: u64,
    /// Host tier capacity in tokens (0: device only).
    pub host_tokens: u64,
    /// Disk tier budget in tokens, under `disk_dir` (a fresh subfolder per run).
    pub disk_tokens: Option<u64>,
    /// Folder for the disk tier (default: the system's temporary folder).
    pub disk_dir: Option<PathBuf>,
    /// Shared tier server URL.
    pub shared_url: Option<String>,
    /// Tokens per block.
    pub block_size: u32,
    /// Device blocks per host (and disk) page.
    pub blocks_per_page: u32,
    /// When blocks are copied down.
    pub mode: OffloadMode,
    /// Replay at most this many requests of the trace.
    pub limit: usize,
    /// The GPU of the cost model.
    pub gpu: GpuProfile,
    /// The model of the cost model.
    pub model: ModelProfile,
    /// Link speeds.
    pub links: Links,
    /// Predictive promotion from the host tier back to the device (`None`: off).
    pub promote: Option<PromoteConfig>,
}

/// Predictive promotion: when a request ends and its follow-up is predicted, its blocks that
/// left the device for the host tier are copied back ahead of the predicted next turn (see
/// the `promote` module for what is learned and how).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PromoteConfig {
    /// Plan a promotion when the odds that it is used reach this (0.5: used more often than
    /// wasted).
    pub min_odds: f64,
    /// Promote at most this many blocks per request.
    pub max_blocks: usize,
}

impl Default for PromoteConfig {
    fn default() -> Self {
        Self {
            min_odds: 0.5,
            max_blocks: usize::MAX,
        }
    }
}

/// Why the scenario could not run.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TiersError {
    /// The trace holds no request.
    #[error("the trace holds no request")]
    EmptyTrace,
    /// A tier or cache refused its configuration.
    #[error("tiers setup: {0}")]
    Setup(String),
    /// A tier failed during the replay.
    #[error("tier failed during the replay: {0}")]
    Tier(String),
    /// The memory manager or its device prefix cache refused an operation (a broken
    /// invariant).
    #[error("device memory: {0}")]
    Cache(String),
    /// A prompt needs more blocks than the whole device holds.
    #[error("a prompt of {tokens} tokens does not fit a device of {device_tokens} tokens")]
    PromptTooLarge {
        /// The prompt's tokens.
        tokens: u64,
        /// The device's capacity in tokens.
        device_tokens: u64,
    },
    /// A device block the manager offloaded under `key` held the bytes of another key (the
    /// offload came after the block was written over).
    #[error("device block {block} offloaded as {key} holds other bytes")]
    WrongOffload {
        /// The key.
        key: String,
        /// The device block.
        block: BlockId,
    },
    /// A loaded block did not hold the bytes stored for its key.
    #[error("block {key} loaded from the {tier} tier holds other bytes")]
    WrongBytes {
        /// The key.
        key: String,
        /// The tier.
        tier: &'static str,
    },
}

fn setup<E: std::fmt::Display>(e: E) -> TiersError {
    TiersError::Setup(e.to_string())
}

fn tier_err<E: std::fmt::Display>(e: E) -> TiersError {
    TiersError::Tier(e.to_string())
}

/// Tokens served by each place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PerTier {
    /// Device memory.
    pub device: f64,
    /// Host tier.
    pub host: f64,
    /// Disk tier.
    pub disk: f64,
    /// Shared tier.
    pub shared: f64,
}

/// One replay's results.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TiersRun {
    /// What ran, in words.
    pub name: String,
    /// Host tier capacity in tokens.
    pub host_tokens: u64,
    /// Requests replayed.
    pub requests: u64,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Prompt tokens served from some cache (prefill tokens saved).
    pub hit_tokens: u64,
    /// `hit_tokens / input_tokens`.
    pub hit_rate: f64,
    /// Hit rate by where the tokens came from.
    pub hit_rate_per_tier: PerTier,
    /// Bytes loaded from each tier, at the model's block size.
    pub bytes_loaded: PerTier,
    /// Seconds of transfers in the cost model: PCIe (every tier's blocks cross it), disk reads
    /// and network.
    pub pcie_s: f64,
    /// Disk read time.
    pub disk_s: f64,
    /// Network time.
    pub network_s: f64,
    /// Prefill compute saved by the hits, in the cost model's seconds.
    pub prefill_s_saved: f64,
    /// Mean time to first token in the cost model (prefill of the missed tokens plus the loads,
    /// one request at a time, no queueing), in milliseconds.
    pub mean_ttft_ms: f64,
    /// Blocks offloaded to the host tier, demoted to disk and promoted back.
    pub offloaded_blocks: u64,
    /// Blocks demoted from host to disk.
    pub demoted_blocks: u64,
    /// Blocks promoted from disk or shared into host.
    pub promoted_blocks: u64,
    /// Shared-tier calls answered as misses because the server was out of reach.
    pub shared_unavailable_calls: u64,
    /// Loads that brought back fewer blocks than the memory manager planned: a tier lost
    /// blocks between the manager's lookup and the load (in this replay, to the offloads the
    /// same plan executes first); the rest of those prompts is computed.
    pub short_loads: u64,
    /// Wall time of the replay, in seconds.
    pub elapsed_s: f64,
    /// Predictive promotion's figures, when it ran.
    pub promotion: Option<Promotion>,
}

/// What predictive promotion did in one replay.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Promotion {
    /// Requests whose promotion was planned (follow-up predicted likely enough).
    pub planned: u64,
    /// Planned promotions dropped because the follow-up came first.
    pub cancelled: u64,
    /// Requests that had blocks promoted.
    pub conversations: u64,
    /// Blocks copied from the host tier to the device by promotions.
    pub promoted_blocks: u64,
    /// Their bytes at the model's block size (PCIe traffic off the requests' critical path).
    pub promoted_bytes: f64,
    /// Their PCIe time in the cost model, in seconds.
    pub pcie_s: f64,
    /// Promoted blocks later hit on the device.
    pub used_blocks: u64,
    /// Promoted blocks evicted from the device before any hit.
    pub wasted_blocks: u64,
    /// Promoted blocks still on the device, unused, when the trace ended.
    pub unused_at_end: u64,
    /// The device residence learned last (how long an unused block stays on the device), in
    /// milliseconds.
    pub residence_ms: Option<u64>,
    /// The median time from a request to its follow-up, in milliseconds.
    pub median_gap_ms: Option<u64>,
    /// The learned probability of a follow-up per turn class (1, 2-3, 4-7, 8-15, 16-31, 32+)
    /// at the end of the trace.
    pub follow_odds_per_turn_class: Vec<f64>,
}

fn stand_in(key: StoreKey) -> [u8; STAND_IN_BYTES] {
    let b = key.to_le_bytes();
    let mut out = [0; STAND_IN_BYTES];
    out[..16].copy_from_slice(&b);
    out[16..].copy_from_slice(&b);
    out
}

fn build_stack(cfg: &TiersConfig, run_id: &str) -> Result<Option<TierStack>, TiersError> {
    if cfg.host_tokens == 0 {
        return Ok(None);
    }
    let bs = u64::from(cfg.block_size);
    // The stand-in layout has 16-token blocks of 2 bytes per token; a namespace per block size.
    let stand_in = KvLayout::new(1, 1, 1, cfg.block_size, DType::Fp8E4M3).map_err(setup)?;
    let per_block = stand_in.bytes_per_block();
    if per_block != STAND_IN_BYTES as u64 {
        return Err(TiersError::Setup(format!(
            "the stand-in payload needs 16-token blocks, not {}",
            cfg.block_size
        )));
    }
    let ns = StoreNamespace::new("tiers-scenario", stand_in, 0, 1).map_err(setup)?;
    let host_blocks = cfg.host_tokens / bs;
    let host = HostTier::new(
        ns.clone(),
        HostConfig::new(host_blocks * per_block, cfg.blocks_per_page),
    )
    .map_err(setup)?;
    let disk = match cfg.disk_tokens {
        Some(tokens) => {
            let dir = cfg
                .disk_dir
                .clone()
                .unwrap_or_else(std::env::temp_dir)
                .join(format!("kvc-tiers-{run_id}"));
            // Page files carry 24 bytes of key and checksum per block and a small header.
            let pages = (tokens / bs).div_ceil(u64::from(cfg.blocks_per_page));
            let budget = (tokens / bs) * (per_block + 24) + pages * 128;
            Some(
                DiskTier::open(
                    ns.clone(),
                    &DiskConfig::new(dir, budget, cfg.blocks_per_page),
                )
                .map_err(setup)?,
            )
        }
        None => None,
    };
    let shared = match &cfg.shared_url {
        Some(url) => {
            let mut sc = SharedConfig::new(url.clone());
            sc.prefix = format!("kvc-tiers-{run_id}");
            sc.ttl = Duration::from_secs(600);
            Some(SharedTier::new(ns, sc).map_err(setup)?)
        }
        None => None,
    };
    Ok(Some(TierStack::new(host, disk, shared, cfg.mode)))
}

/// Loads the blocks of `keys` found in `tiers` into `buf`, checking every loaded byte.
fn load_checked(
    stack: &TierStack,
    keys: &[StoreKey],
    tiers: &[TierKind],
    buf: &mut Vec<u8>,
) -> Result<LoadOutcome, TiersError> {
    buf.clear();
    buf.resize(tiers.len() * STAND_IN_BYTES, 0);
    let out = stack.load(keys, tiers, buf).map_err(tier_err)?;
    for (i, t) in tiers[..out.blocks].iter().enumerate() {
        if buf[i * STAND_IN_BYTES..(i + 1) * STAND_IN_BYTES] != stand_in(keys[i]) {
            return Err(TiersError::WrongBytes {
                key: keys[i].to_string(),
                tier: t.name(),
            });
        }
    }
    Ok(out)
}

/// Replays `trace` with the tiers of `cfg` (`host_tokens == 0`: the device alone), through
/// the memory manager ([`ManagedDevice`]).
///
/// # Errors
/// [`TiersError::EmptyTrace`], [`TiersError::Setup`] for a configuration a tier or the
/// manager refuses, [`TiersError::PromptTooLarge`] for a prompt larger than the device, and
/// the errors of [`ManagedDevice::serve`].
pub fn run(trace: &[TraceRequest], cfg: &TiersConfig, name: &str) -> Result<TiersRun, TiersError> {
    let trace = &trace[..cfg.limit.min(trace.len())];
    if trace.is_empty() {
        return Err(TiersError::EmptyTrace);
    }
    let bs = cfg.block_size as usize;
    let cap_blocks = usize::try_from(cfg.device_tokens / u64::from(cfg.block_size.max(1)))
        .map_err(setup)?
        .max(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let run_id = format!("{}-{nanos:x}", std::process::id());
    let stack = build_stack(cfg, &run_id)?.map(Arc::new);
    let cost = CostModel::new(cfg.gpu, cfg.model, cfg.block_size).map_err(setup)?;
    let model_block = cost.layout.bytes_per_block() as f64;

    let start = Instant::now();
    let mut dev = ManagedDevice::new(cap_blocks, cfg.block_size, stack.clone(), cfg.mode)?;
    let (mut tokens, mut keys) = (Vec::new(), Vec::new());
    let mut input_tokens = 0u64;
    let mut hit = [0u64; 4];
    let (mut pcie_s, mut disk_s, mut network_s, mut saved_s, mut ttft_s) =
        (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut predictor = (cfg.promote.is_some() && stack.is_some()).then(Predictor::default);
    let mut plans: BinaryHeap<Reverse<(u64, u32, usize)>> = BinaryHeap::new();
    let mut promo = Promotion::default();
    for (ri, req) in trace.iter().enumerate() {
        let now = req.timestamp_ms;
        // Promotions planned before this request, in time order.
        if let (Some(pred), Some(pc)) = (&predictor, &cfg.promote) {
            while let Some(&Reverse((due, parent, idx))) = plans.peek()
                && due <= now
            {
                plans.pop();
                if !pred.waiting(parent) {
                    promo.cancelled += 1;
                    continue;
                }
                tokens.clear();
                synth_prompt(&trace[idx], &mut tokens);
                let depth = pred.promote_depth(tokens.len() / bs).min(pc.max_blocks);
                let n = dev.promote(&tokens, depth, due)?;
                promo.promoted_blocks += n as u64;
                promo.conversations += u64::from(n > 0);
            }
        }
        tokens.clear();
        synth_prompt(req, &mut tokens);
        let arrival = match &mut predictor {
            Some(pred) => {
                dev.block_hashes(&tokens, &mut keys);
                Some(pred.arrive(&keys, now))
            }
            None => None,
        };
        let seq = SeqId(u64::try_from(ri).map_err(setup)?);
        let served = dev.serve(seq, &tokens, now)?;
        input_tokens += served.prompt_tokens;
        hit[0] += (served.device_blocks * bs) as u64;
        let per = served.tier_blocks;
        for (t, &n) in per.iter().enumerate() {
            hit[t + 1] += (n * bs) as u64;
        }
        // The cost model: loads over the links, then the prefill of what is left.
        let bytes = |n: usize| n as f64 * model_block;
        let req_pcie = bytes(served.loaded_blocks()) / cfg.links.pcie;
        let req_disk = bytes(per[1]) / cfg.links.disk;
        let req_net = bytes(per[2]) / cfg.links.network;
        pcie_s += req_pcie;
        disk_s += req_disk;
        network_s += req_net;
        let cached = ((served.device_blocks + served.loaded_blocks()) * bs) as u32;
        let len = tokens.len() as u32;
        let full = cost.step_seconds(&[len], &[len]);
        let rest = cost.step_seconds(&[len - cached.min(len)], &[len]);
        saved_s += full - rest;
        ttft_s += rest + req_pcie + req_disk + req_net;

        if let (Some(pred), Some(arrival), Some(pc)) = (&mut predictor, arrival, &cfg.promote) {
            if let Some(age) = dev.take_eviction_age() {
                pred.evicted(age);
            }
            if let Some(delay) = pred.end(&keys, arrival.turn, now, pc.min_odds) {
                let me = u32::try_from(ri).map_err(setup)?;
                plans.push(Reverse((now.saturating_add(delay), me, ri)));
                promo.planned += 1;
            }
        }
    }
    (promo.used_blocks, promo.wasted_blocks, promo.unused_at_end) = dev.promotion_use();
    promo.promoted_bytes = promo.promoted_blocks as f64 * model_block;
    promo.pcie_s = promo.promoted_bytes / cfg.links.pcie;
    if let Some(pred) = &predictor {
        promo.follow_odds_per_turn_class = pred.follow_odds();
        promo.residence_ms = pred.residence_ms();
        promo.median_gap_ms = pred.median_gap_ms();
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    let short_loads = dev.counters().short_loads;
    // The manager holds the stack too: drop it before the disk folder goes.
    drop(dev);
    let stats = stack.as_deref().map(TierStack::stats).unwrap_or_default();
    let unavailable = stack
        .as_deref()
        .and_then(|s| s.shared().map(|t| t.stats().unavailable_calls))
        .unwrap_or(0);
    if let Some(dir) = stack
        .as_deref()
        .and_then(|s| s.disk().map(|d| d.dir().to_path_buf()))
    {
        drop(stack);
        // The run's folder: the namespace folder's parent.
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
    let input = input_tokens.max(1) as f64;
    let hit_tokens: u64 = hit.iter().sum();
    // Promotions' host loads are off the requests' path: counted apart.
    let mut loaded = stats.loaded;
    loaded[0] = loaded[0].saturating_sub(promo.promoted_blocks);
    let tier_bytes = |t: usize| loaded[t] as f64 * model_block;
    Ok(TiersRun {
        name: name.to_string(),
        host_tokens: cfg.host_tokens,
        requests: trace.len() as u64,
        input_tokens,
        hit_tokens,
        hit_rate: hit_tokens as f64 / input,
        hit_rate_per_tier: PerTier {
            device: hit[0] as f64 / input,
            host: hit[1] as f64 / input,
            disk: hit[2] as f64 / input,
            shared: hit[3] as f64 / input,
        },
        bytes_loaded: PerTier {
            device: 0.0,
            host: tier_bytes(0),
            disk: tier_bytes(1),
            shared: tier_bytes(2),
        },
        pcie_s,
        disk_s,
        network_s,
        prefill_s_saved: saved_s,
        mean_ttft_ms: 1e3 * ttft_s / trace.len() as f64,
        offloaded_blocks: stats.offloaded,
        demoted_blocks: stats.demoted,
        promoted_blocks: stats.promoted,
        shared_unavailable_calls: unavailable,
        short_loads,
        elapsed_s,
        promotion: predictor.map(|_| promo),
    })
}

/// The `tiers` scenario's report: the device cache alone, then with the tiers.
#[derive(Clone, Debug, Serialize)]
pub struct TiersScenario {
    /// `"tiers"`.
    pub scenario: &'static str,
    /// The workload, in words.
    pub workload: String,
    /// The cost model's machine and model.
    pub machine: String,
    /// Device-only first, then the tiered configuration, then (with promotion on) the same
    /// with predictive promotion.
    pub runs: Vec<TiersRun>,
    /// The goal and whether this run met it (only judged on the whole trace at the default
    /// sizes).
    pub goals: Vec<crate::sim::scenarios::Goal>,
}

/// The default sizes of the scenario: device 3M tokens, host 30M.
pub const DEFAULT_DEVICE_TOKENS: u64 = 3_000_000;
/// Host tier of the default run.
pub const DEFAULT_HOST_TOKENS: u64 = 30_000_000;
/// The hit rate the default run must reach.
pub const TARGET_HIT_RATE: f64 = 0.36;

/// Runs the device-only replay and the tiered one of `cfg`, side by side.
pub fn scenario(trace: &[TraceRequest], cfg: &TiersConfig) -> Result<TiersScenario, TiersError> {
    let mut device_only = cfg.clone();
    device_only.promote = None;
    device_only.host_tokens = 0;
    device_only.disk_tokens = None;
    device_only.shared_url = None;
    let base = run(trace, &device_only, "device only (LRU)")?;
    let mut name = format!("device + host {}", tokens(cfg.host_tokens));
    if let Some(d) = cfg.disk_tokens {
        name.push_str(&format!(" + disk {}", tokens(d)));
    }
    if cfg.shared_url.is_some() {
        name.push_str(" + shared (Redis)");
    }
    let plain = TiersConfig {
        promote: None,
        ..cfg.clone()
    };
    let tiered = run(trace, &plain, &name)?;
    let promoted = match cfg.promote {
        Some(_) => Some(run(trace, cfg, &format!("{name} + predictive promotion"))?),
        None => None,
    };
    let mut goals = Vec::new();
    let whole = tiered.requests as usize == trace.len();
    if whole && cfg.device_tokens == DEFAULT_DEVICE_TOKENS && cfg.host_tokens == DEFAULT_HOST_TOKENS
    {
        goals.push(crate::sim::scenarios::Goal {
            goal: format!(
                "prefix hits >= {:.0}% with device 3M + host 30M tokens (device only: {:.1}%)",
                100.0 * TARGET_HIT_RATE,
                100.0 * base.hit_rate
            ),
            measured: format!("{:.2}%", 100.0 * tiered.hit_rate),
            met: tiered.hit_rate >= TARGET_HIT_RATE,
        });
    }
    Ok(TiersScenario {
        scenario: "tiers",
        workload: format!(
            "{} requests of the trace, {}-token blocks, device {} tokens (LRU), host pages of \
             {} blocks, {:?}",
            tiered.requests,
            cfg.block_size,
            tokens(cfg.device_tokens),
            cfg.blocks_per_page,
            cfg.mode
        ),
        machine: format!(
            "{} serving {} (bf16 KV), PCIe {:.0} GB/s, disk {:.0} GB/s, network {:.0} GB/s",
            cfg.gpu.name,
            cfg.model.name,
            cfg.links.pcie / 1e9,
            cfg.links.disk / 1e9,
            cfg.links.network / 1e9
        ),
        runs: [base, tiered].into_iter().chain(promoted).collect(),
        goals,
    })
}

/// `3M`, `30M`, `250k`.
#[must_use]
pub fn tokens(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::{gpu, model};

    fn req(ts: u64, input: u32, ids: &[u32]) -> TraceRequest {
        TraceRequest {
            timestamp_ms: ts,
            input_length: input,
            output_length: 1,
            hash_ids: ids.to_vec(),
        }
    }

    fn cfg(device: u64, host: u64) -> TiersConfig {
        TiersConfig {
            device_tokens: device,
            host_tokens: host,
            disk_tokens: None,
            disk_dir: None,
            shared_url: None,
            block_size: 16,
            blocks_per_page: 4,
            mode: OffloadMode::WriteBack,
            limit: usize::MAX,
            gpu: *gpu("H200").unwrap(),
            model: *model("Llama-3-8B").unwrap(),
            links: Links::default(),
            promote: None,
        }
    }

    #[test]
    fn blocks_evicted_from_the_device_hit_in_the_host_tier() {
        // A, B, A with room for one prompt on the device: the second A misses on the device
        // and hits in the host tier.
        let trace = [
            req(0, 1024, &[1, 2]),
            req(1, 1024, &[3, 4]),
            req(2, 1024, &[1, 2]),
        ];
        let s = scenario(&trace, &cfg(1024, 1 << 20)).unwrap();
        let (base, tiered) = (&s.runs[0], &s.runs[1]);
        assert_eq!(base.hit_tokens, 0);
        assert_eq!(tiered.hit_tokens, 1024 - 16);
        assert_eq!(tiered.hit_rate_per_tier.device, 0.0);
        assert!(tiered.hit_rate_per_tier.host > 0.0);
        assert!(tiered.pcie_s > 0.0 && tiered.prefill_s_saved > 0.0);
        assert!(tiered.mean_ttft_ms < base.mean_ttft_ms);
        assert_eq!(tiered.bytes_loaded.host, 63.0 * 2_097_152.0);
        assert!(s.goals.is_empty(), "no goal is judged on a toy trace");
    }

    #[test]
    fn host_evictions_reach_the_disk_and_hit_there() {
        let trace = [
            req(0, 1024, &[1, 2]),
            req(1, 1024, &[3, 4]),
            req(2, 1024, &[5, 6]),
            req(3, 1024, &[1, 2]),
        ];
        let mut c = cfg(1024, 1024);
        c.disk_tokens = Some(1 << 20);
        let r = run(&trace, &c, "disk").unwrap();
        assert!(r.hit_rate_per_tier.disk > 0.0, "{r:?}");
        assert!(r.demoted_blocks > 0 && r.promoted_blocks > 0);
        assert!(r.disk_s > 0.0);
    }

    #[test]
    fn a_promoted_block_is_served_from_the_device() {
        // Device room for two 1024-token prompts (128 blocks). Fillers teach the predictor how
        // long an unused block stays on the device (20 ms); A1 ends at 30, is evicted at 45,
        // promoted back at its planned time (50) and hit on the device by A2, its follow-up, at 55.
        let trace = [
            req(0, 1024, &[10, 11]),
            req(10, 1024, &[12, 13]),
            req(20, 1024, &[14, 15]),
            req(30, 1024, &[1, 2]),
            req(40, 1024, &[16, 17]),
            req(45, 1024, &[18, 19]),
            req(55, 1536, &[1, 2, 3]),
        ];
        let mut c = cfg(2048, 1 << 20);
        // With no follow-up seen yet the odds are 0: take every plan.
        c.promote = Some(PromoteConfig {
            min_odds: 0.0,
            max_blocks: usize::MAX,
        });
        let s = scenario(&trace, &c).unwrap();
        assert_eq!(s.runs.len(), 3);
        let (plain, promoted) = (&s.runs[1], &s.runs[2]);
        let p = promoted.promotion.as_ref().unwrap();
        // A1's 64 blocks came back (checked byte for byte on the load) and A2 hit all of them
        // on the device, where without promotion it loaded them from the host tier.
        assert_eq!(p.promoted_blocks, 64, "{p:?}");
        assert_eq!(p.used_blocks, 64, "{p:?}");
        assert_eq!(p.wasted_blocks, 0);
        assert_eq!(p.promoted_bytes, 64.0 * 2_097_152.0);
        assert_eq!(plain.hit_tokens, promoted.hit_tokens);
        assert_eq!(plain.hit_rate_per_tier.device, 0.0);
        assert_eq!(promoted.hit_rate_per_tier.host, 0.0);
        assert_eq!(plain.bytes_loaded.host, 64.0 * 2_097_152.0);
        assert_eq!(promoted.bytes_loaded.host, 0.0);
        assert!(promoted.pcie_s < plain.pcie_s);
        assert!(promoted.mean_ttft_ms < plain.mean_ttft_ms);
        assert!(plain.promotion.is_none());

        // Promotion off: the same figures as before it existed.
        c.promote = None;
        let off = scenario(&trace, &c).unwrap();
        assert_eq!(off.runs.len(), 2);
        for (a, b) in off.runs.iter().zip(&s.runs) {
            let (mut a, mut b) = (a.clone(), b.clone());
            a.elapsed_s = 0.0;
            b.elapsed_s = 0.0;
            assert_eq!(a, b);
        }
    }
}
