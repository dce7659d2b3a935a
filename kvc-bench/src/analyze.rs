//! The workload analyzer (`kvc-bench analyze`): what a trace asks of a KV cache, and the
//! sizes it calls for on a given model and GPU, each with the figure it comes from.
//!
//! Everything is derived from the trace and the model/GPU profiles; the only fixed numbers are
//! the decision rules, stated with each recommendation:
//!
//! - **lengths**: input and output length distributions (percentiles, log₂ histogram);
//! - **prefix repetition**: the share of input tokens an unbounded cache would serve, and the
//!   share of requests that reuse anything;
//! - **conversations**: inferred, since traces carry no session id: a request continues the
//!   deepest earlier request whose whole prompt (its full trace blocks, or all its blocks) it
//!   strictly starts with, that has no continuation yet, and whose prompt and answer fit in
//!   its prompt; turns per conversation and the gaps between turns;
//! - **hit rate against capacity**: the trace replayed through the real prefix cache (LRU)
//!   with the offline optimum (Belady), at capacities spread geometrically below the trace's
//!   footprint, plus the device cache recommended below;
//! - **recommendations**: block size (the largest power of two from 16 to 256 that loses at
//!   most 1% of the unbounded hit rate and wastes at most 1% of KV in partial last blocks);
//!   pinned reserve (the p99 KV of running sequences, from the trace's arrivals and the
//!   roofline cost model's unloaded request times, so running requests never give memory to
//!   cached prefixes); device cache (the device's KV capacity minus that reserve); host tier
//!   (what it takes beyond the device cache for LRU to reach 90% of the unbounded hit rate).

use std::collections::HashMap;

use serde::Serialize;
use thiserror::Error;

use crate::profiles;
use crate::replay::{ReplayConfig, ReplayError, distinct_blocks, offline_hit_rate, replay};
use crate::sim::cost::CostModel;
use crate::size::{SizeError, SizeQuery, size};
use crate::trace::{MOONCAKE_BLOCK_TOKENS, TraceRequest};
use kvc_reuse::{HasherKind, PolicyKind};

/// What to analyse against.
#[derive(Clone, Debug, PartialEq)]
pub struct AnalyzeConfig {
    /// Model profile name (see `kvc-bench size`).
    pub model: String,
    /// GPU profile name.
    pub gpu: String,
    /// Block size of the hit-rate replays.
    pub block_size: u32,
    /// Share of GPU memory the engine may use.
    pub utilisation: f64,
    /// Capacities on the hit-rate curve (geometric, halving from the footprint; 1 to 64,
    /// anything outside taken as the nearest).
    pub capacity_points: usize,
}

impl AnalyzeConfig {
    /// Llama-3-8B on an H200, 16-token blocks, 90% of memory, 8 capacities.
    #[must_use]
    pub fn new() -> Self {
        Self {
            model: "Llama-3-8B".into(),
            gpu: "H200".into(),
            block_size: 16,
            utilisation: 0.9,
            capacity_points: 8,
        }
    }
}

impl Default for AnalyzeConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Why an analysis cannot run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AnalyzeError {
    /// No request.
    #[error("the trace holds no request")]
    EmptyTrace,
    /// Unknown model or GPU, or the weights do not fit.
    #[error(transparent)]
    Size(#[from] SizeError),
    /// A replay failed.
    #[error("replay: {0}")]
    Replay(#[from] ReplayError),
    /// The cost model could not be built.
    #[error("cost model: {0}")]
    Cost(String),
}

/// A distribution of non-negative values.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Distribution {
    /// Values.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Smallest.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
    /// `(low, high, count)`: values in `[low, high)`, power-of-two buckets, empty ones left out.
    pub histogram: Vec<(u64, u64, u64)>,
}

impl Distribution {
    /// The distribution of `values`.
    #[must_use]
    pub fn of(values: &[u64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_unstable();
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        let mut buckets: Vec<u64> = vec![0; 65];
        for &x in &v {
            buckets[(64 - x.leading_zeros()) as usize] += 1;
        }
        let histogram = buckets
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(b, &n)| {
                let (lo, hi) = if b == 0 {
                    (0, 1)
                } else {
                    (
                        1u64 << (b - 1),
                        1u64.checked_shl(b as u32).unwrap_or(u64::MAX),
                    )
                };
                (lo, hi, n)
            })
            .collect();
        Self {
            count: v.len() as u64,
            mean: v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64,
            min: v[0],
            p50: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            max: v[v.len() - 1],
            histogram,
        }
    }
}

/// Inferred conversations.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Sessions {
    /// Conversations (a request that continues nothing starts one).
    pub sessions: u64,
    /// Conversations of two turns or more.
    pub multi_turn: u64,
    /// Share of requests that continue an earlier one.
    pub continuation_share: f64,
    /// Turns per conversation.
    pub turns: Distribution,
    /// Milliseconds between a turn and the next.
    pub gap_ms: Distribution,
}

/// One capacity of the hit-rate curve.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CapacityRow {
    /// Cache capacity in tokens.
    pub capacity_tokens: u64,
    /// Hit rate of the real prefix cache with LRU.
    pub lru: f64,
    /// Hit rate of the offline optimum.
    pub optimal: f64,
}

/// One block size considered.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlockSizeRow {
    /// Tokens per block.
    pub block_size: u32,
    /// Unbounded-cache hit rate at that block size.
    pub infinite_hit_rate: f64,
    /// Share of KV slots left empty in sequences' last partial blocks.
    pub partial_block_waste: f64,
}

/// One recommended size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recommendation {
    /// What (`block size`, `pinned reserve`, `device cache`, `host tier`).
    pub what: &'static str,
    /// The value.
    pub value: u64,
    /// Its unit (`tokens`, `tokens per block`).
    pub unit: &'static str,
    /// Bytes of KV it takes, where it is a memory size.
    pub bytes: Option<u64>,
    /// The figure it comes from.
    pub because: String,
}

/// The analysis; `--json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Analysis {
    /// Requests.
    pub requests: u64,
    /// From the first to the last arrival, seconds.
    pub duration_s: f64,
    /// Requests per second over that span.
    pub arrival_rate: f64,
    /// Input tokens per request.
    pub input: Distribution,
    /// Output tokens per request.
    pub output: Distribution,
    /// Share of input tokens an unbounded cache serves (at the replay block size).
    pub prefix_repetition: f64,
    /// Share of requests that reuse at least one block of an earlier request.
    pub requests_reusing: f64,
    /// Conversations.
    pub sessions: Sessions,
    /// The model.
    pub model: String,
    /// The GPU.
    pub gpu: String,
    /// KV bytes per token of the model.
    pub kv_bytes_per_token: u64,
    /// KV tokens the GPU holds after the weights.
    pub device_kv_tokens: u64,
    /// Block size of the replays.
    pub block_size: u32,
    /// Tokens an unbounded cache ends up holding.
    pub footprint_tokens: u64,
    /// The hit-rate curve, ascending capacity.
    pub capacity: Vec<CapacityRow>,
    /// Block sizes considered.
    pub block_sizes: Vec<BlockSizeRow>,
    /// p50 and p99 KV of running sequences, tokens.
    pub running_kv_tokens_p50: u64,
    /// See `running_kv_tokens_p50`.
    pub running_kv_tokens_p99: u64,
    /// The recommendations.
    pub recommendations: Vec<Recommendation>,
}

/// Analyses `trace` for `cfg`'s model and GPU.
///
/// # Errors
/// An empty trace, an unknown model or GPU, or a replay error.
pub fn analyze(trace: &[TraceRequest], cfg: &AnalyzeConfig) -> Result<Analysis, AnalyzeError> {
    if trace.is_empty() {
        return Err(AnalyzeError::EmptyTrace);
    }
    let bs = cfg.block_size.max(1);
    let sized = size(&SizeQuery {
        tokens: 1024,
        block_size: bs,
        utilisation: cfg.utilisation,
        ..SizeQuery::new(&cfg.model, &cfg.gpu)
    })?;
    let per_token = sized.kv_bytes_per_token_per_gpu;
    let first = trace.iter().map(|r| r.timestamp_ms).min().unwrap_or(0);
    let last = trace.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
    let duration_s = (last - first) as f64 / 1e3;
    let inputs: Vec<u64> = trace.iter().map(|r| u64::from(r.input_length)).collect();
    let outputs: Vec<u64> = trace.iter().map(|r| u64::from(r.output_length)).collect();

    // Reuse at trace granularity: a request reuses if its first trace block was seen before.
    let mut seen_first = std::collections::HashSet::new();
    let reusing = trace
        .iter()
        .filter(|r| r.hash_ids.first().is_some_and(|&h| !seen_first.insert(h)))
        .count();

    // Block sizes: the unbounded hit rate and the waste of partial last blocks.
    let mut block_sizes = Vec::new();
    for b in [16u32, 32, 64, 128, 256] {
        let (mut waste, mut total) = (0u64, 0u64);
        for r in trace {
            let len = u64::from(r.input_length) + u64::from(r.output_length);
            waste += len.div_ceil(u64::from(b)) * u64::from(b) - len;
            total += len.div_ceil(u64::from(b)) * u64::from(b);
        }
        block_sizes.push(BlockSizeRow {
            block_size: b,
            infinite_hit_rate: offline_hit_rate(trace, b, None),
            partial_block_waste: if total == 0 {
                0.0
            } else {
                waste as f64 / total as f64
            },
        });
    }

    // Running KV from arrivals and the cost model's unloaded request times.
    let (gpu, model) = (
        profiles::gpu(&cfg.gpu).copied(),
        profiles::model(&cfg.model).copied(),
    );
    let (Some(gpu), Some(model)) = (gpu, model) else {
        return Err(AnalyzeError::Cost("unknown model or GPU".into()));
    };
    let cost = CostModel::new(gpu, model, bs).map_err(|e| AnalyzeError::Cost(e.to_string()))?;
    let mut edges: Vec<(f64, i64)> = Vec::with_capacity(2 * trace.len());
    for r in trace {
        let (i, o) = (r.input_length.max(1), r.output_length);
        let prefill = cost.step_seconds(&[i], &[i]);
        let decode = f64::from(o) * cost.step_seconds(&[1], &[i + o / 2]);
        let t0 = (r.timestamp_ms - first) as f64 / 1e3;
        let kv = i64::from(i) + i64::from(o);
        edges.push((t0, kv));
        edges.push((t0 + prefill + decode, -kv));
    }
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut running = 0i64;
    let mut at_arrivals = Vec::with_capacity(trace.len());
    for &(_, d) in &edges {
        running += d;
        if d > 0 {
            at_arrivals.push(running.max(0) as u64);
        }
    }
    let running_kv = Distribution::of(&at_arrivals);

    // The hit-rate curve.
    let footprint_tokens = distinct_blocks(trace, bs) * u64::from(bs);
    let pinned = running_kv.p99.div_ceil(u64::from(bs)) * u64::from(bs);
    let device_cache = sized.tokens.saturating_sub(pinned);
    // Each point halves the capacity: past 64 halvings of a u64 nothing is left.
    let mut caps: Vec<u64> = (0..cfg.capacity_points.clamp(1, 64))
        .map(|k| (footprint_tokens >> k).max(u64::from(bs)))
        .collect();
    if device_cache >= u64::from(bs) {
        caps.push(device_cache);
    }
    caps.sort_unstable();
    caps.dedup();
    let mut capacity = Vec::with_capacity(caps.len());
    let mut infinite = 0.0;
    for &c in &caps {
        let r = replay(
            trace,
            &ReplayConfig {
                capacity_tokens: c,
                block_size: bs,
                policy: PolicyKind::Lru,
                hasher: HasherKind::Xxh3,
                optimal: true,
            },
        )?;
        infinite = r.infinite_hit_rate.unwrap_or(infinite);
        capacity.push(CapacityRow {
            capacity_tokens: c,
            lru: r.hit_rate,
            optimal: r.optimal_hit_rate.unwrap_or(0.0),
        });
    }

    let recommendations = recommend(
        &block_sizes,
        &capacity,
        infinite,
        &running_kv,
        sized.tokens,
        device_cache,
        per_token,
    );
    Ok(Analysis {
        requests: trace.len() as u64,
        duration_s,
        arrival_rate: if duration_s > 0.0 {
            trace.len() as f64 / duration_s
        } else {
            0.0
        },
        input: Distribution::of(&inputs),
        output: Distribution::of(&outputs),
        prefix_repetition: infinite,
        requests_reusing: reusing as f64 / trace.len() as f64,
        sessions: sessions(trace),
        model: sized.query.model.name,
        gpu: sized.gpu_name,
        kv_bytes_per_token: per_token,
        device_kv_tokens: sized.tokens,
        block_size: bs,
        footprint_tokens,
        capacity,
        block_sizes,
        running_kv_tokens_p50: running_kv.p50,
        running_kv_tokens_p99: running_kv.p99,
        recommendations,
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn recommend(
    block_sizes: &[BlockSizeRow],
    capacity: &[CapacityRow],
    infinite: f64,
    running: &Distribution,
    device_tokens: u64,
    device_cache: u64,
    per_token: u64,
) -> Vec<Recommendation> {
    let mut out = Vec::new();
    let base = block_sizes.first().map_or(0.0, |b| b.infinite_hit_rate);
    let chosen = block_sizes
        .iter()
        .filter(|b| b.infinite_hit_rate >= 0.99 * base && b.partial_block_waste <= 0.01)
        .max_by_key(|b| b.block_size)
        .or(block_sizes.first());
    if let Some(b) = chosen {
        out.push(Recommendation {
            what: "block size",
            value: u64::from(b.block_size),
            unit: "tokens per block",
            bytes: None,
            because: format!(
                "largest of 16-256 within 1% of the unbounded hit rate at 16 ({} vs {}) and \
                 at most 1% of KV in partial last blocks ({}); {:.1} MiB per block; the trace \
                 resolves prefixes to {MOONCAKE_BLOCK_TOKENS} tokens",
                pct(b.infinite_hit_rate),
                pct(base),
                pct(b.partial_block_waste),
                (u64::from(b.block_size) * per_token) as f64 / f64::from(1u32 << 20)
            ),
        });
    }
    out.push(Recommendation {
        what: "pinned reserve",
        value: running.p99,
        unit: "tokens",
        bytes: Some(running.p99 * per_token),
        because: format!(
            "p99 KV of running sequences at arrivals ({} tokens; p50 {}), from the trace's \
             arrival times and the cost model's unloaded request times",
            running.p99, running.p50
        ),
    });
    let at = |c: u64| capacity.iter().find(|r| r.capacity_tokens == c);
    let dev_because = match at(device_cache) {
        Some(r) if device_cache > 0 => format!(
            "the device holds {device_tokens} KV tokens; minus the pinned reserve, {device_cache} \
             cache LRU hits {} (optimum {}, unbounded {})",
            pct(r.lru),
            pct(r.optimal),
            pct(infinite)
        ),
        _ => format!(
            "the running sequences' p99 ({}) exceeds the device's {device_tokens} KV tokens: \
             no room for a prefix cache on one GPU",
            running.p99
        ),
    };
    out.push(Recommendation {
        what: "device cache",
        value: device_cache,
        unit: "tokens",
        bytes: Some(device_cache * per_token),
        because: dev_because,
    });
    let target = 0.9 * infinite;
    let knee = capacity.iter().find(|r| r.lru >= target);
    let (host, because) = match knee {
        Some(r) if r.capacity_tokens > device_cache => (
            r.capacity_tokens - device_cache,
            format!(
                "LRU reaches {} (90% of the unbounded {}) at {} tokens; the device cache holds \
                 {device_cache}",
                pct(r.lru),
                pct(infinite),
                r.capacity_tokens
            ),
        ),
        Some(r) => (
            0,
            format!(
                "LRU already reaches {} (90% of the unbounded {}) at {} tokens, within the \
                 device cache",
                pct(r.lru),
                pct(infinite),
                r.capacity_tokens
            ),
        ),
        None => {
            let top = capacity.last().map_or(0, |r| r.capacity_tokens);
            (
                top.saturating_sub(device_cache),
                format!(
                    "LRU stays under 90% of the unbounded {} up to the footprint ({top} \
                     tokens): hold the footprint",
                    pct(infinite)
                ),
            )
        }
    };
    out.push(Recommendation {
        what: "host tier",
        value: host,
        unit: "tokens",
        bytes: Some(host * per_token),
        because,
    });
    out
}

/// Infers conversations (see the module docs).
fn sessions(trace: &[TraceRequest]) -> Sessions {
    // Chain ids of trace-block prefixes.
    let mut ids: HashMap<(u32, u32), u32> = HashMap::new();
    // The latest request without a continuation yet whose full prompt ends at a chain id.
    let mut ends: HashMap<u32, usize> = HashMap::new();
    let mut session_of: Vec<usize> = Vec::with_capacity(trace.len());
    let mut turns: Vec<u64> = Vec::new();
    let mut gaps = Vec::new();
    let mut continued = 0u64;
    let mut order: Vec<usize> = (0..trace.len()).collect();
    order.sort_by_key(|&i| (trace[i].timestamp_ms, i));
    let mut slot = vec![0usize; trace.len()];
    let mut has_next = vec![false; trace.len()];
    for &r in &order {
        let req = &trace[r];
        let mut parent = u32::MAX;
        let mut best: Option<usize> = None;
        let full = (req.input_length / MOONCAKE_BLOCK_TOKENS) as usize;
        let mut ends_at = Vec::with_capacity(2);
        for (k, &h) in req.hash_ids.iter().enumerate() {
            let next = ids.len() as u32;
            let c = *ids.entry((parent, h)).or_insert(next);
            // A parent's whole prompt must be a strict prefix of this one, and this prompt
            // long enough to hold the parent's prompt and answer; the deepest match wins.
            if k + 1 < req.hash_ids.len()
                && let Some(&p) = ends.get(&c)
                && !has_next[p]
                && u64::from(req.input_length)
                    >= u64::from(trace[p].input_length) + u64::from(trace[p].output_length)
            {
                best = Some(p);
            }
            // The prompt ends at its last full block, or at its last block if the next turn
            // keeps that block's id.
            if k + 1 == full || k + 1 == req.hash_ids.len() {
                ends_at.push(c);
            }
            parent = c;
        }
        match best {
            Some(p) => {
                has_next[p] = true;
                continued += 1;
                let s = session_of[slot[p]];
                turns[s] += 1;
                gaps.push(req.timestamp_ms.saturating_sub(trace[p].timestamp_ms));
                slot[r] = session_of.len();
                session_of.push(s);
            }
            None => {
                slot[r] = session_of.len();
                session_of.push(turns.len());
                turns.push(1);
            }
        }
        for c in ends_at {
            ends.insert(c, r);
        }
    }
    Sessions {
        sessions: turns.len() as u64,
        multi_turn: turns.iter().filter(|&&t| t > 1).count() as u64,
        continuation_share: continued as f64 / trace.len().max(1) as f64,
        turns: Distribution::of(&turns),
        gap_ms: Distribution::of(&gaps),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ts: u64, input: u32, output: u32, ids: &[u32]) -> TraceRequest {
        TraceRequest {
            timestamp_ms: ts,
            input_length: input,
            output_length: output,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn distributions_rank_and_bucket() {
        let d = Distribution::of(&[1, 2, 3, 4, 100]);
        assert_eq!((d.min, d.p50, d.p99, d.max), (1, 3, 100, 100));
        assert_eq!(
            d.histogram,
            vec![(1, 2, 1), (2, 4, 2), (4, 8, 1), (64, 128, 1)]
        );
        assert_eq!(Distribution::of(&[]).count, 0);
    }

    #[test]
    fn conversations_are_inferred_from_whole_prompt_prefixes() {
        // Two conversations sharing a system block 0; a third request only shares block 0.
        let t = vec![
            req(0, 1024, 10, &[0, 1]),
            req(10, 1024, 10, &[0, 5]),
            req(1_000, 2048, 10, &[0, 1, 2, 3]),
            req(1_500, 1024, 10, &[0, 9]),
            req(4_000, 3072, 10, &[0, 1, 2, 3, 4, 6]),
            req(5_000, 1536, 10, &[0, 5, 7]),
        ];
        let s = sessions(&t);
        assert_eq!(s.sessions, 3);
        assert_eq!(s.multi_turn, 2);
        assert_eq!(s.turns.max, 3);
        assert_eq!(s.gap_ms.min, 1_000);
        assert_eq!(s.gap_ms.max, 4_990);
    }

    #[test]
    fn a_small_trace_gets_every_recommendation_with_its_figure() {
        let mut t = Vec::new();
        for i in 0..60u32 {
            // Ten conversations of six turns, each turn extending the last by one block.
            let conv = i % 10;
            let turn = i / 10;
            let mut ids = vec![0, 1_000 + conv];
            ids.extend((0..turn).map(|k| 10_000 + conv * 100 + k));
            t.push(req(
                u64::from(i) * 500,
                512 * ids.len() as u32 - 100,
                200,
                &ids,
            ));
        }
        let mut cfg = AnalyzeConfig::new();
        cfg.block_size = 64;
        cfg.capacity_points = 4;
        let a = analyze(&t, &cfg).unwrap();
        assert_eq!(a.requests, 60);
        assert!(a.prefix_repetition > 0.5, "{}", a.prefix_repetition);
        assert_eq!(a.sessions.sessions, 10);
        assert_eq!(a.sessions.turns.p50, 6);
        let whats: Vec<&str> = a.recommendations.iter().map(|r| r.what).collect();
        assert_eq!(
            whats,
            ["block size", "pinned reserve", "device cache", "host tier"]
        );
        assert!(a.recommendations.iter().all(|r| !r.because.is_empty()));
        // Curves rise with capacity and the optimum is never below LRU.
        for w in a.capacity.windows(2) {
            assert!(w[1].optimal >= w[0].optimal);
        }
        assert!(a.capacity.iter().all(|r| r.optimal + 1e-9 >= r.lru));
        assert!(matches!(analyze(&[], &cfg), Err(AnalyzeError::EmptyTrace)));
    }

    #[test]
    fn any_number_of_capacity_points_gives_a_curve_of_at_most_65_capacities() {
        let t = [req(0, 1000, 10, &[1, 2]), req(5, 1500, 10, &[1, 3, 4])];
        for points in [0, 1, 64, 65, usize::MAX] {
            let mut cfg = AnalyzeConfig::new();
            cfg.capacity_points = points;
            let a = analyze(&t, &cfg).unwrap();
            assert!(!a.capacity.is_empty(), "{points} points");
            assert!(
                a.capacity.len() <= 65,
                "{points} points: {}",
                a.capacity.len()
            );
        }
    }
}
