//! The cluster scenario (`kvc-bench scenario cluster`): N simulated engines behind a router,
//! on a Mooncake-format trace.
//!
//! Each engine is a prefill instance (as in Mooncake's prefill pool: decode runs elsewhere and
//! does not delay the next prompt), served first come first served. A request's time is the
//! roofline cost model's prefill of its uncached tokens (over its whole context) plus the copy
//! of its cached tokens from where they are: nothing from the device, PCIe from host memory,
//! the network from the shared tier. TTFT is its wait plus that time.
//!
//! Caches hold 512-token blocks (the trace's resolution), LRU per tier. A prompt's full blocks
//! enter the engine's device cache when its prefill ends; a block evicted from the device
//! moves to the engine's host tier, and from there is dropped. With the shared tier the host
//! memory of all engines is pooled instead: one LRU of the same total size that every engine
//! writes its computed blocks to and reads from (Mooncake's global cache against local
//! caches, at equal memory).
//!
//! Every cache change and load report goes through `kvc-route`'s wire format (encoded,
//! decoded and applied in order by an `Ingest`) into the index the KV-aware router reads, so
//! the router sees what a subscriber would. Round-robin and least-loaded (fewest requests
//! queued or running) ignore it.
//!
//! Arrivals are scaled in time so that the offered prefill load (all tokens computed, none
//! cached) is `target_utilisation` of the cluster's capacity: the trace decides the mix, the
//! scale decides how busy the cluster is.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use kvc_route::{
    ChainHash, EngineId, Event, EventBody, Ingest, KvIndex, LoadReport, Offer, Removed,
    RouteConfig, RouteError, RouteRequest, Router, Scope, Stored, Tier, encode_event,
};
use serde::Serialize;
use thiserror::Error;

use crate::profiles;
use crate::replay::offline_hit_rate;
use crate::sim::cost::CostModel;
use crate::sim::engine::percentile;
use crate::trace::{MOONCAKE_BLOCK_TOKENS, TraceRequest};

/// How requests are spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Policy {
    /// `kvc-route`'s router: prefix overlap per tier, queue and KV load.
    KvAware,
    /// Engines in turn.
    RoundRobin,
    /// The engine with the fewest requests queued or running.
    LeastLoaded,
}

impl Policy {
    /// All policies.
    pub const ALL: [Policy; 3] = [Policy::KvAware, Policy::RoundRobin, Policy::LeastLoaded];

    /// Name in tables.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Policy::KvAware => "kv-aware",
            Policy::RoundRobin => "round-robin",
            Policy::LeastLoaded => "least-loaded",
        }
    }
}

/// The cluster.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterConfig {
    /// Engines.
    pub engines: usize,
    /// Model profile.
    pub model: String,
    /// GPU profile.
    pub gpu: String,
    /// Prefix-cache tokens on each engine's device.
    pub device_tokens: u64,
    /// Host-memory tokens per engine (pooled into the shared tier when it is on).
    pub host_tokens: u64,
    /// Host-to-device bandwidth, bytes/s (PCIe 5.0 x16 is 64 GB/s raw).
    pub host_bandwidth: f64,
    /// Shared-tier-to-device bandwidth, bytes/s (one 200 Gb/s NIC is 25 GB/s).
    pub shared_bandwidth: f64,
    /// Offered prefill load as a share of the cluster's capacity (sets the time scale).
    pub target_utilisation: f64,
    /// Requests taken from the start of the trace.
    pub limit: usize,
}

impl ClusterConfig {
    /// 8 engines of Llama-3-8B on H200: 500k device cache tokens (about half the KV an H200
    /// holds for this model), 2M host tokens each (256 GiB of DRAM at 128 KiB per token),
    /// 50 GB/s from host, 25 GB/s from the shared tier, 70% offered load, the whole trace.
    #[must_use]
    pub fn new() -> Self {
        Self {
            engines: 8,
            model: "Llama-3-8B".into(),
            gpu: "H200".into(),
            device_tokens: 500_000,
            host_tokens: 2_000_000,
            host_bandwidth: 50e9,
            shared_bandwidth: 25e9,
            target_utilisation: 0.7,
            limit: usize::MAX,
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Why the scenario cannot run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No request, no engine, or an impossible size.
    #[error("bad cluster setup: {0}")]
    Setup(String),
    /// The router refused.
    #[error("router: {0}")]
    Route(#[from] RouteError),
}

/// One variant's measurements.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterVariant {
    /// Routing policy.
    pub policy: &'static str,
    /// Whether host memory is pooled into a shared tier.
    pub shared_tier: bool,
    /// Cached over input tokens.
    pub hit_rate: f64,
    /// Of input tokens: served from a device, a host tier, the shared tier.
    pub hit_device: f64,
    /// See `hit_device`.
    pub hit_host: f64,
    /// See `hit_device`.
    pub hit_shared: f64,
    /// TTFT median, ms.
    pub ttft_p50_ms: f64,
    /// TTFT 99th percentile, ms.
    pub ttft_p99_ms: f64,
    /// Busiest engine's busy time over the mean (1 = perfectly even).
    pub busy_max_over_mean: f64,
    /// Requests per engine.
    pub requests_per_engine: Vec<u64>,
    /// Events through the wire format (kv-aware only).
    pub events: u64,
}

/// The scenario's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterReport {
    /// The configuration.
    pub config: ClusterConfig,
    /// Requests simulated.
    pub requests: usize,
    /// Input tokens.
    pub input_tokens: u64,
    /// Arrivals were compressed by this factor to reach the target load.
    pub time_scale: f64,
    /// Prefill tokens/s of one engine at the trace's mean prompt (cost model).
    pub engine_prefill_tok_s: f64,
    /// Hit rate of one unbounded cache seeing every request (the ceiling).
    pub infinite_hit_rate: f64,
    /// The variants: every policy without, then with, the shared tier.
    pub variants: Vec<ClusterVariant>,
    /// Hit rate with the shared tier over without, per policy (Mooncake reports up to 2.36).
    pub global_over_local: Vec<(&'static str, f64)>,
}

/// An LRU set of block hashes.
#[derive(Debug, Default)]
struct Lru {
    cap: usize,
    stamp: u64,
    at: HashMap<u128, u64>,
    order: BTreeMap<u64, u128>,
}

impl Lru {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Self::default()
        }
    }
    fn contains(&self, h: u128) -> bool {
        self.at.contains_key(&h)
    }
    fn touch(&mut self, h: u128) {
        if let Some(old) = self.at.get_mut(&h) {
            self.order.remove(old);
            self.stamp += 1;
            *old = self.stamp;
            self.order.insert(self.stamp, h);
        }
    }
    /// Inserts (or refreshes) `h`; returns what was evicted to make room.
    fn insert(&mut self, h: u128, evicted: &mut Vec<u128>) -> bool {
        if self.cap == 0 {
            return false;
        }
        if self.contains(h) {
            self.touch(h);
            return false;
        }
        while self.at.len() >= self.cap {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            self.at.remove(&old);
            evicted.push(old);
        }
        self.stamp += 1;
        self.at.insert(h, self.stamp);
        self.order.insert(self.stamp, h);
        true
    }
    fn remove(&mut self, h: u128) -> bool {
        match self.at.remove(&h) {
            Some(s) => {
                self.order.remove(&s);
                true
            }
            None => false,
        }
    }
}

/// The chained hashes of a request's full trace blocks.
fn chain(req: &TraceRequest) -> Vec<u128> {
    let full = (req.input_length / MOONCAKE_BLOCK_TOKENS) as usize;
    let mut h: u128 = 0x006b_7663_2d63_6c75_7374_6572;
    req.hash_ids
        .iter()
        .take(full)
        .map(|&id| {
            let mut z = (h as u64 ^ u64::from(id)).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            h = (h << 64) ^ u128::from(z ^ (z >> 31));
            h
        })
        .collect()
}

struct Sim<'a> {
    cfg: &'a ClusterConfig,
    shared_on: bool,
    device: Vec<Lru>,
    host: Vec<Lru>,
    shared: Lru,
    shared_writer: HashMap<u128, usize>,
    /// Per engine: requests queued or running, and when it is next free (s).
    outstanding: Vec<u32>,
    free_at: Vec<f64>,
    busy_s: Vec<f64>,
    /// The router and the wire between engines and it (kv-aware only).
    router: Option<(Router, Ingest, Vec<u64>)>,
    events: u64,
}

impl Sim<'_> {
    fn publish(&mut self, engine: usize, body: EventBody) {
        let Some((router, ingest, seqs)) = self.router.as_mut() else {
            return;
        };
        seqs[engine] += 1;
        let frame = encode_event(&Event {
            engine: EngineId(engine as u32),
            seq: seqs[engine],
            time_ms: 0,
            body,
        });
        self.events += 1;
        // In order, well formed and of the index's block size: always applied.
        let applied = ingest.offer(router.index_mut(), &frame, 0);
        debug_assert!(matches!(applied, Offer::Applied(_)));
    }

    fn blocks(tier: Tier, hashes: Vec<u128>, stored: bool) -> EventBody {
        let hashes: Vec<ChainHash> = hashes.into_iter().map(ChainHash).collect();
        if stored {
            EventBody::Stored(Stored {
                tier,
                scope: Scope::default(),
                parent: None,
                block_size: MOONCAKE_BLOCK_TOKENS,
                token_count: MOONCAKE_BLOCK_TOKENS * hashes.len() as u32,
                hashes,
            })
        } else {
            EventBody::Removed(Removed {
                tier,
                scope: Scope::default(),
                hashes,
            })
        }
    }

    fn load(&mut self, engine: usize) {
        let kv_total = (self.cfg.device_tokens / u64::from(MOONCAKE_BLOCK_TOKENS)) as u32;
        let report = LoadReport {
            queued: self.outstanding[engine].saturating_sub(1),
            running: self.outstanding[engine].min(1),
            kv_used_blocks: self.device[engine].at.len() as u32,
            kv_total_blocks: kv_total.max(1),
        };
        self.publish(engine, EventBody::Load(report));
    }

    /// The prompt's full blocks enter `engine`'s device cache when its prefill ends.
    fn store(&mut self, engine: usize, hashes: &[u128]) {
        let (mut added, mut evicted, mut demoted_evicted) = (Vec::new(), Vec::new(), Vec::new());
        for &h in hashes {
            if self.device[engine].insert(h, &mut evicted) {
                added.push(h);
            }
        }
        if !added.is_empty() {
            self.publish(engine, Self::blocks(Tier::Device, added, true));
        }
        if !evicted.is_empty() {
            self.publish(engine, Self::blocks(Tier::Device, evicted.clone(), false));
            if !self.shared_on {
                let mut demoted = Vec::new();
                for &h in &evicted {
                    if self.host[engine].insert(h, &mut demoted_evicted) {
                        demoted.push(h);
                    }
                }
                if !demoted.is_empty() {
                    self.publish(engine, Self::blocks(Tier::Host, demoted, true));
                }
                if !demoted_evicted.is_empty() {
                    self.publish(engine, Self::blocks(Tier::Host, demoted_evicted, false));
                }
            }
        }
        if self.shared_on {
            let (mut written, mut dropped) = (Vec::new(), Vec::new());
            for &h in hashes {
                if self.shared.insert(h, &mut dropped) {
                    written.push(h);
                    self.shared_writer.insert(h, engine);
                }
            }
            if !written.is_empty() {
                self.publish(engine, Self::blocks(Tier::Shared, written, true));
            }
            let mut by_writer: BTreeMap<usize, Vec<u128>> = BTreeMap::new();
            for h in dropped {
                let w = self.shared_writer.remove(&h).unwrap_or(engine);
                by_writer.entry(w).or_default().push(h);
            }
            for (w, hs) in by_writer {
                self.publish(w, Self::blocks(Tier::Shared, hs, false));
            }
        }
    }

    /// Leading blocks of `hashes` `engine` serves from (device, host, shared), touched.
    fn hits(&mut self, engine: usize, hashes: &[u128], usable: usize) -> (u64, u64, u64) {
        let (mut d, mut h, mut s) = (0, 0, 0);
        for &x in hashes.iter().take(usable) {
            if self.device[engine].contains(x) {
                self.device[engine].touch(x);
                d += 1;
            } else if self.host[engine].contains(x) {
                // A host hit is copied back to the device (and leaves the host tier).
                self.host[engine].remove(x);
                self.publish(engine, Self::blocks(Tier::Host, vec![x], false));
                h += 1;
            } else if self.shared_on && self.shared.contains(x) {
                self.shared.touch(x);
                s += 1;
            } else {
                break;
            }
        }
        (d, h, s)
    }
}

/// Runs one variant.
fn simulate(
    trace: &[TraceRequest],
    cfg: &ClusterConfig,
    cost: &CostModel,
    time_scale: f64,
    policy: Policy,
    shared_on: bool,
) -> Result<ClusterVariant, ClusterError> {
    let n = cfg.engines;
    let bt = u64::from(MOONCAKE_BLOCK_TOKENS);
    let dev_blocks = (cfg.device_tokens / bt) as usize;
    let host_blocks = (cfg.host_tokens / bt) as usize;
    let router = match policy {
        Policy::KvAware => Some((
            Router::new(KvIndex::new(MOONCAKE_BLOCK_TOKENS), RouteConfig::default())?,
            Ingest::new(),
            vec![0u64; n],
        )),
        _ => None,
    };
    let mut sim = Sim {
        cfg,
        shared_on,
        device: (0..n).map(|_| Lru::new(dev_blocks)).collect(),
        host: (0..n)
            .map(|_| Lru::new(if shared_on { 0 } else { host_blocks }))
            .collect(),
        shared: Lru::new(if shared_on { host_blocks * n } else { 0 }),
        shared_writer: HashMap::new(),
        outstanding: vec![0; n],
        free_at: vec![0.0; n],
        busy_s: vec![0.0; n],
        router,
        events: 0,
    };
    for e in 0..n {
        sim.load(e);
    }
    let bytes_per_token = cost.layout.bytes_per_token() as f64;
    // Completions in time order: (finish time in µs, request index, engine).
    let mut done: BinaryHeap<Reverse<(u64, usize, usize)>> = BinaryHeap::new();
    let mut chains: Vec<Vec<u128>> = Vec::with_capacity(trace.len());
    let mut ttft = Vec::with_capacity(trace.len());
    let (mut hit_d, mut hit_h, mut hit_s, mut input) = (0u64, 0u64, 0u64, 0u64);
    let mut per_engine = vec![0u64; n];
    let mut rr = 0usize;
    let t0 = trace.first().map_or(0, |r| r.timestamp_ms);
    for (i, req) in trace.iter().enumerate() {
        let arrival = (req.timestamp_ms - t0) as f64 / 1e3 / time_scale;
        let arrival_us = (arrival * 1e6) as u64;
        while let Some(&Reverse((at, r, e))) = done.peek() {
            if at > arrival_us {
                break;
            }
            done.pop();
            sim.outstanding[e] -= 1;
            let hashes = std::mem::take(&mut chains[r]);
            sim.store(e, &hashes);
            sim.load(e);
        }
        let hashes = chain(req);
        let engine = match policy {
            Policy::RoundRobin => {
                rr = (rr + 1) % n;
                rr
            }
            Policy::LeastLoaded => (0..n).min_by_key(|&e| (sim.outstanding[e], e)).unwrap_or(0),
            Policy::KvAware => {
                let Some((router, _, _)) = sim.router.as_mut() else {
                    return Err(ClusterError::Setup("no router".into()));
                };
                let wire: Vec<ChainHash> = hashes.iter().map(|&h| ChainHash(h)).collect();
                let d = router.route(&RouteRequest {
                    scope: Scope::default(),
                    hashes: &wire,
                })?;
                d.chosen.engine.0 as usize
            }
        };
        // The last prompt token is always computed.
        let usable = (req.input_length.saturating_sub(1) / MOONCAKE_BLOCK_TOKENS) as usize;
        let (d, h, s) = sim.hits(engine, &hashes, usable);
        let tokens = u64::from(req.input_length.max(1));
        let cached = ((d + h + s) * bt).min(tokens - 1);
        let new = (tokens - cached) as u32;
        let service = cost.step_seconds(&[new], &[tokens as u32])
            + (h * bt) as f64 * bytes_per_token / cfg.host_bandwidth
            + (s * bt) as f64 * bytes_per_token / cfg.shared_bandwidth;
        let start = arrival.max(sim.free_at[engine]);
        let finish = start + service;
        sim.free_at[engine] = finish;
        sim.busy_s[engine] += service;
        sim.outstanding[engine] += 1;
        per_engine[engine] += 1;
        sim.load(engine);
        ttft.push((finish - arrival) * 1e3);
        hit_d += d * bt;
        hit_h += h * bt;
        hit_s += s * bt;
        input += tokens;
        chains.push(hashes);
        done.push(Reverse(((finish * 1e6) as u64, i, engine)));
    }
    ttft.sort_by(f64::total_cmp);
    let mean_busy = sim.busy_s.iter().sum::<f64>() / n as f64;
    let max_busy = sim.busy_s.iter().copied().fold(0.0, f64::max);
    let share = |x: u64| x as f64 / input.max(1) as f64;
    Ok(ClusterVariant {
        policy: policy.name(),
        shared_tier: shared_on,
        hit_rate: share(hit_d + hit_h + hit_s),
        hit_device: share(hit_d),
        hit_host: share(hit_h),
        hit_shared: share(hit_s),
        ttft_p50_ms: percentile(&ttft, 50.0),
        ttft_p99_ms: percentile(&ttft, 99.0),
        busy_max_over_mean: if mean_busy > 0.0 {
            max_busy / mean_busy
        } else {
            1.0
        },
        requests_per_engine: per_engine,
        events: sim.events,
    })
}

/// The most engines [`run`] simulates (each keeps its own prefix cache).
pub const MAX_ENGINES: usize = 1024;

/// Runs every policy without and with the shared tier.
///
/// # Errors
/// An empty trace, no engine or more than [`MAX_ENGINES`], an unknown model or GPU, or a
/// router error.
pub fn run(trace: &[TraceRequest], cfg: &ClusterConfig) -> Result<ClusterReport, ClusterError> {
    let trace = &trace[..cfg.limit.min(trace.len())];
    if trace.is_empty() || cfg.engines == 0 {
        return Err(ClusterError::Setup("no request or no engine".into()));
    }
    if cfg.engines > MAX_ENGINES {
        return Err(ClusterError::Setup(format!(
            "{} engines; at most {MAX_ENGINES}",
            cfg.engines
        )));
    }
    if !(cfg.target_utilisation > 0.0 && cfg.target_utilisation.is_finite()) {
        return Err(ClusterError::Setup(
            "target utilisation must be positive".into(),
        ));
    }
    let (Some(gpu), Some(model)) = (profiles::gpu(&cfg.gpu), profiles::model(&cfg.model)) else {
        return Err(ClusterError::Setup(format!(
            "unknown model {} or GPU {}",
            cfg.model, cfg.gpu
        )));
    };
    let cost = CostModel::new(*gpu, *model, 16).map_err(|e| ClusterError::Setup(e.to_string()))?;
    let input_tokens: u64 = trace.iter().map(|r| u64::from(r.input_length)).sum();
    let mean = (input_tokens / trace.len() as u64).max(1) as u32;
    let engine_prefill_tok_s = f64::from(mean) / cost.step_seconds(&[mean], &[mean]);
    // Offered work with nothing cached, over the trace's span.
    let work_s: f64 = trace
        .iter()
        .map(|r| {
            let t = r.input_length.max(1);
            cost.step_seconds(&[t], &[t])
        })
        .sum();
    let span_s = (trace.last().map_or(0, |r| r.timestamp_ms)
        - trace.first().map_or(0, |r| r.timestamp_ms)) as f64
        / 1e3;
    let time_scale = if span_s > 0.0 {
        cfg.target_utilisation * cfg.engines as f64 * span_s / work_s
    } else {
        1.0
    };
    let mut variants = Vec::new();
    for shared in [false, true] {
        for policy in Policy::ALL {
            variants.push(simulate(trace, cfg, &cost, time_scale, policy, shared)?);
        }
    }
    let global_over_local = Policy::ALL
        .iter()
        .map(|p| {
            let rate = |shared: bool| {
                variants
                    .iter()
                    .find(|v| v.policy == p.name() && v.shared_tier == shared)
                    .map_or(0.0, |v| v.hit_rate)
            };
            let local = rate(false);
            (p.name(), if local > 0.0 { rate(true) / local } else { 0.0 })
        })
        .collect();
    Ok(ClusterReport {
        config: cfg.clone(),
        requests: trace.len(),
        input_tokens,
        time_scale,
        engine_prefill_tok_s,
        infinite_hit_rate: offline_hit_rate(trace, MOONCAKE_BLOCK_TOKENS, None),
        variants,
        global_over_local,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Conversations whose turns extend each other, arriving interleaved.
    fn conversations(n: u32, turns: u32) -> Vec<TraceRequest> {
        let mut t = Vec::new();
        for turn in 0..turns {
            for c in 0..n {
                let mut ids = vec![0];
                ids.extend((0..=turn).map(|k| 1_000 * (c + 1) + k));
                t.push(TraceRequest {
                    timestamp_ms: u64::from(turn * n + c) * 200,
                    input_length: 512 * ids.len() as u32 + 100,
                    output_length: 50,
                    hash_ids: ids,
                });
            }
        }
        t
    }

    #[test]
    fn kv_aware_routing_hits_more_than_round_robin() {
        // 13 conversations on 4 engines: round-robin does not keep a conversation in place.
        let trace = conversations(13, 6);
        let mut cfg = ClusterConfig::new();
        cfg.engines = 4;
        cfg.device_tokens = 512 * 20;
        cfg.host_tokens = 512 * 10;
        let r = run(&trace, &cfg).unwrap();
        assert_eq!(r.variants.len(), 6);
        let get = |p: Policy, shared: bool| {
            r.variants
                .iter()
                .find(|v| v.policy == p.name() && v.shared_tier == shared)
                .unwrap()
                .clone()
        };
        let kv = get(Policy::KvAware, false);
        let rr = get(Policy::RoundRobin, false);
        assert!(
            kv.hit_rate > rr.hit_rate,
            "{} vs {}",
            kv.hit_rate,
            rr.hit_rate
        );
        assert!(kv.events > 0);
        assert_eq!(rr.events, 0);
        // Nothing beats one unbounded cache.
        for v in &r.variants {
            assert!(v.hit_rate <= r.infinite_hit_rate + 1e-9, "{v:?}");
            assert_eq!(v.requests_per_engine.iter().sum::<u64>(), 78);
            assert!(v.ttft_p99_ms >= v.ttft_p50_ms);
            assert!(v.hit_shared == 0.0 || v.shared_tier);
        }
        // A pooled tier lets round-robin find what other engines computed.
        let rr_shared = get(Policy::RoundRobin, true);
        assert!(rr_shared.hit_rate > rr.hit_rate);
        assert!(rr_shared.hit_shared > 0.0);
    }

    #[test]
    fn lru_evicts_the_least_recent() {
        let mut l = Lru::new(2);
        let mut ev = Vec::new();
        l.insert(1, &mut ev);
        l.insert(2, &mut ev);
        l.touch(1);
        l.insert(3, &mut ev);
        assert_eq!(ev, vec![2]);
        assert!(l.contains(1) && l.contains(3));
    }
}
