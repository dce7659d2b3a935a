//! The engine's metrics, recorded through the `metrics` facade (a no-op until a recorder is
//! installed, for example by `kvc-bench engine --metrics-addr`). The families are listed in
//! [`crate::metrics_export`].

use std::collections::HashMap;
use std::time::Instant;

use kvc_alloc::PoolStats;
use kvc_core::{QosClass, RegionId, SeqId};
use kvc_sched::SchedStats;
use metrics::{counter, gauge, histogram};

/// Per-sequence timing and the scheduler counters seen at the last step.
#[derive(Debug)]
pub(crate) struct EngineMetrics {
    started: HashMap<SeqId, (Instant, QosClass)>,
    last_token: HashMap<SeqId, Instant>,
    last: SchedStats,
    finished: u64,
    reused: u64,
    block_bytes: u64,
}

impl EngineMetrics {
    pub(crate) fn new(block_bytes: u64) -> Self {
        Self {
            started: HashMap::new(),
            last_token: HashMap::new(),
            last: SchedStats::default(),
            finished: 0,
            reused: 0,
            block_bytes,
        }
    }

    pub(crate) fn submitted(&mut self, seq: SeqId, qos: QosClass) {
        self.started.insert(seq, (Instant::now(), qos));
    }

    /// A token was sampled for `seq`: its first gives the TTFT, later ones a TBT.
    pub(crate) fn sampled(&mut self, seq: SeqId) {
        let now = Instant::now();
        let Some(&(start, qos)) = self.started.get(&seq) else {
            return;
        };
        let qos = qos.0.to_string();
        match self.last_token.insert(seq, now) {
            None => histogram!("kvc_ttft_seconds", "qos" => qos)
                .record(now.duration_since(start).as_secs_f64()),
            Some(prev) => histogram!("kvc_tbt_seconds", "qos" => qos)
                .record(now.duration_since(prev).as_secs_f64()),
        }
    }

    pub(crate) fn finished(&mut self, seq: SeqId, cached_tokens: u64) {
        self.started.remove(&seq);
        self.last_token.remove(&seq);
        self.finished += 1;
        counter!("kvc_requests_finished_total").increment(1);
        if cached_tokens > 0 {
            self.reused += 1;
            counter!("kvc_requests_reused_total").increment(1);
        }
        gauge!("kvc_reuse_rate").set(self.reused as f64 / self.finished as f64);
    }

    pub(crate) fn swapped(&mut self, blocks: usize, out: bool) {
        let direction = if out { "demote" } else { "promote" };
        counter!("kvc_tier_moves_total", "direction" => direction).increment(blocks as u64);
        counter!("kvc_tier_bytes_total", "direction" => direction)
            .increment(blocks as u64 * self.block_bytes);
    }

    /// Blocks written down to the tiers below device memory.
    pub(crate) fn offloaded(&mut self, blocks: usize) {
        counter!("kvc_tier_offloaded_blocks_total").increment(blocks as u64);
        counter!("kvc_tier_offloaded_bytes_total").increment(blocks as u64 * self.block_bytes);
    }

    /// A load from the tiers: blocks loaded per tier (host, disk, shared), and whether it
    /// came back short (the rest recomputed).
    pub(crate) fn loaded(&mut self, per_tier: [usize; 3], failed: bool) {
        for (n, tier) in per_tier.into_iter().zip(["host", "disk", "shared"]) {
            if n > 0 {
                counter!("kvc_tier_loaded_blocks_total", "tier" => tier).increment(n as u64);
                counter!("kvc_tier_loaded_bytes_total", "tier" => tier)
                    .increment(n as u64 * self.block_bytes);
            }
        }
        if failed {
            counter!("kvc_tier_load_failures_total").increment(1);
        }
    }

    /// After a step: counters from the scheduler's deltas, gauges from the pool.
    pub(crate) fn step(&mut self, s: &SchedStats, pool: &PoolStats) {
        let d = |now: u64, before: u64| now.saturating_sub(before);
        let last = self.last;
        counter!("kvc_prompt_tokens_total").increment(d(s.prompt_tokens, last.prompt_tokens));
        counter!("kvc_prefix_cached_tokens_total")
            .increment(d(s.cached_tokens, last.cached_tokens));
        if s.prompt_tokens > 0 {
            gauge!("kvc_prefix_hit_rate").set(s.cached_tokens as f64 / s.prompt_tokens as f64);
        }
        let swapped = d(s.swapped_out, last.swapped_out);
        let recomputed = d(s.preempted, last.preempted).saturating_sub(swapped);
        counter!("kvc_evictions_total", "cause" => "make_room")
            .increment(d(s.evicted_blocks, last.evicted_blocks));
        counter!("kvc_evictions_total", "cause" => "preempt_recompute").increment(recomputed);
        counter!("kvc_evictions_total", "cause" => "preempt_swap").increment(swapped);
        counter!("kvc_preemptions_total", "mode" => "recompute").increment(recomputed);
        counter!("kvc_preemptions_total", "mode" => "swap").increment(swapped);
        for (region, name) in [(RegionId::PINNED, "pinned"), (RegionId::DYNAMIC, "dynamic")] {
            if let Some(r) = pool.regions.get(region.index()) {
                let util = if r.capacity == 0 {
                    0.0
                } else {
                    r.used as f64 / r.capacity as f64
                };
                gauge!("kvc_kv_region_utilisation", "region" => name).set(util);
            }
        }
        self.last = *s;
    }
}
