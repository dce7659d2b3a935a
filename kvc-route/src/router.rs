//! [`Router`]: picks the engine for a request from the index's overlaps and the engines' load.
//!
//! The cost of sending a request of `n` blocks to engine `e` is
//!
//! ```text
//! cost(e) = prefill_weight × (n − d·device(e) − h·host(e) − s·shared(e)) / n
//!         + queue_weight × (queued(e) + running(e) + routed since its last report)
//!         + load_weight × KV load(e)
//! ```
//!
//! where `device`, `host` and `shared` are the leading request blocks the engine can serve from
//! each tier and `d`, `h`, `s` the share of the prefill a hit in that tier saves (a host hit
//! still copies over PCIe, a shared hit over the network). With temperature 0 the cheapest
//! engine wins (ties to the lower load, then the lower id); with temperature `t > 0` engine
//! `e` is drawn with probability ∝ exp(−cost(e) / t), from a seeded generator, so runs repeat.
//!
//! Each decision is counted through the `metrics` facade: `kvc_route_decisions_total{engine}`
//! and `kvc_route_cached_blocks_total{tier}` (the chosen engine's overlap).

use thiserror::Error;

use crate::event::{ChainHash, EngineId, Scope};
use crate::index::{KvIndex, OverlapScratch, TierOverlap};

/// The router's weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouteConfig {
    /// Share of a block's prefill a device hit saves (normally 1).
    pub device_weight: f64,
    /// Share a host hit saves.
    pub host_weight: f64,
    /// Share a shared-tier hit saves.
    pub shared_weight: f64,
    /// Weight of the uncached share of the prompt.
    pub prefill_weight: f64,
    /// Weight of each request queued, running or just routed at the engine.
    pub queue_weight: f64,
    /// Weight of the engine's KV load (used over total device blocks, 0–1).
    pub load_weight: f64,
    /// Softmax temperature over costs; 0 picks the cheapest.
    pub temperature: f64,
    /// Seed of the sampling generator.
    pub seed: u64,
}

impl Default for RouteConfig {
    fn default() -> Self {
        Self {
            device_weight: 1.0,
            host_weight: 0.8,
            shared_weight: 0.6,
            prefill_weight: 1.0,
            queue_weight: 0.05,
            load_weight: 0.2,
            temperature: 0.0,
            seed: 0x6b76_632d_726f_7574,
        }
    }
}

/// Why no engine was chosen.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RouteError {
    /// No engine is live.
    #[error("no live engine")]
    NoEngine,
    /// A weight is negative or not finite.
    #[error("route weight `{name}` must be finite and non-negative")]
    BadWeight {
        /// The weight.
        name: &'static str,
    },
    /// The index was made with a block size of 0 tokens: no engine's event could match it.
    #[error("the index's block size must be at least 1 token")]
    ZeroBlockSize,
}

/// A request as the router sees it: its scope and its blocks' chained hashes.
#[derive(Clone, Copy, Debug)]
pub struct RouteRequest<'a> {
    /// Whose cache it may hit.
    pub scope: Scope,
    /// The chained hashes of its full blocks, in order.
    pub hashes: &'a [ChainHash],
}

/// One engine's score for a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineScore {
    /// The engine.
    pub engine: EngineId,
    /// Its overlap per tier.
    pub overlap: TierOverlap,
    /// Requests queued, running and routed since its last report.
    pub queue: u32,
    /// Its KV load, 0–1.
    pub kv_load: f64,
    /// The cost (lower is better).
    pub cost: f64,
}

/// The decision.
#[derive(Clone, Copy, Debug, PartialEq)]
#[must_use]
pub struct RouteDecision {
    /// The chosen engine and its score.
    pub chosen: EngineScore,
    /// Engines considered.
    pub engines: usize,
}

/// The KV-aware router: an index plus weights.
#[derive(Debug)]
pub struct Router {
    index: KvIndex,
    cfg: RouteConfig,
    rng: u64,
    scratch: OverlapScratch,
    overlaps: Vec<(EngineId, TierOverlap)>,
    scores: Vec<EngineScore>,
}

impl Router {
    /// A router over `index`.
    ///
    /// # Errors
    /// [`RouteError::BadWeight`] for a negative or non-finite weight or temperature;
    /// [`RouteError::ZeroBlockSize`] for an index made with `KvIndex::new(0)`.
    pub fn new(index: KvIndex, cfg: RouteConfig) -> Result<Self, RouteError> {
        if index.block_size() == 0 {
            return Err(RouteError::ZeroBlockSize);
        }
        let weights = [
            ("device_weight", cfg.device_weight),
            ("host_weight", cfg.host_weight),
            ("shared_weight", cfg.shared_weight),
            ("prefill_weight", cfg.prefill_weight),
            ("queue_weight", cfg.queue_weight),
            ("load_weight", cfg.load_weight),
            ("temperature", cfg.temperature),
        ];
        for (name, w) in weights {
            if !w.is_finite() || w < 0.0 {
                return Err(RouteError::BadWeight { name });
            }
        }
        Ok(Self {
            index,
            cfg,
            rng: cfg.seed,
            scratch: OverlapScratch::default(),
            overlaps: Vec::new(),
            scores: Vec::new(),
        })
    }

    /// The index (to read engines and sizes).
    #[must_use]
    pub fn index(&self) -> &KvIndex {
        &self.index
    }

    /// The index, to apply events and snapshots.
    pub fn index_mut(&mut self) -> &mut KvIndex {
        &mut self.index
    }

    /// The weights.
    #[must_use]
    pub fn config(&self) -> &RouteConfig {
        &self.cfg
    }

    /// Scores every live engine for `req` (the scores stay readable through
    /// [`scores`](Self::scores)) and picks one; the chosen engine's routed count goes up by
    /// one until its next load report.
    ///
    /// # Errors
    /// [`RouteError::NoEngine`] when no engine is live.
    pub fn route(&mut self, req: &RouteRequest<'_>) -> Result<RouteDecision, RouteError> {
        self.score(req);
        if self.scores.is_empty() {
            return Err(RouteError::NoEngine);
        }
        let chosen = if self.cfg.temperature > 0.0 {
            self.sample()
        } else {
            let mut best = self.scores[0];
            for s in &self.scores[1..] {
                let better = s.cost < best.cost
                    || (s.cost == best.cost && (s.queue, s.engine) < (best.queue, best.engine));
                if better {
                    best = *s;
                }
            }
            best
        };
        self.index.note_routed(chosen.engine);
        metrics::counter!("kvc_route_decisions_total", "engine" => chosen.engine.0.to_string())
            .increment(1);
        for (tier, blocks) in [
            ("device", chosen.overlap.device),
            ("host", chosen.overlap.host),
            ("shared", chosen.overlap.shared),
        ] {
            metrics::counter!("kvc_route_cached_blocks_total", "tier" => tier)
                .increment(u64::from(blocks));
        }
        Ok(RouteDecision {
            chosen,
            engines: self.scores.len(),
        })
    }

    /// The scores of the last [`route`](Self::route), one per live engine.
    #[must_use]
    pub fn scores(&self) -> &[EngineScore] {
        &self.scores
    }

    fn score(&mut self, req: &RouteRequest<'_>) {
        self.overlaps.clear();
        self.index
            .overlaps(req.scope, req.hashes, &mut self.scratch, &mut self.overlaps);
        self.scores.clear();
        let n = req.hashes.len().max(1) as f64;
        let c = &self.cfg;
        for &(engine, overlap) in &self.overlaps {
            let Some(info) = self.index.engine(engine) else {
                continue;
            };
            let saved = c.device_weight * f64::from(overlap.device)
                + c.host_weight * f64::from(overlap.host)
                + c.shared_weight * f64::from(overlap.shared);
            let uncached = (req.hashes.len() as f64 - saved).max(0.0) / n;
            let queue = info
                .load
                .queued
                .saturating_add(info.load.running)
                .saturating_add(info.routed_since_report);
            let kv_load = info.load.kv_load();
            let cost = c.prefill_weight * uncached
                + c.queue_weight * f64::from(queue)
                + c.load_weight * kv_load;
            self.scores.push(EngineScore {
                engine,
                overlap,
                queue,
                kv_load,
                cost,
            });
        }
    }

    fn sample(&mut self) -> EngineScore {
        let t = self.cfg.temperature;
        let min = self
            .scores
            .iter()
            .map(|s| s.cost)
            .fold(f64::INFINITY, f64::min);
        let total: f64 = self
            .scores
            .iter()
            .map(|s| (-(s.cost - min) / t).exp())
            .sum();
        let mut x = self.uniform() * total;
        for s in &self.scores {
            x -= (-(s.cost - min) / t).exp();
            if x <= 0.0 {
                return *s;
            }
        }
        self.scores[self.scores.len() - 1]
    }

    /// SplitMix64, as a uniform draw in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventBody, LoadReport, Stored, Tier};

    fn router(cfg: RouteConfig) -> Router {
        let mut ix = KvIndex::new(16);
        for (engine, tier, blocks) in [
            (0, Tier::Device, 4u128),
            (1, Tier::Host, 8),
            (2, Tier::Device, 0),
        ] {
            let hashes: Vec<ChainHash> = (1..=blocks).map(ChainHash).collect();
            let body = if hashes.is_empty() {
                EventBody::Load(LoadReport::default())
            } else {
                EventBody::Stored(Stored {
                    tier,
                    scope: Scope::default(),
                    parent: None,
                    block_size: 16,
                    token_count: 16 * hashes.len() as u32,
                    hashes,
                })
            };
            let e = Event {
                engine: EngineId(engine),
                seq: 1,
                time_ms: 0,
                body,
            };
            ix.apply(&e, 0).unwrap();
        }
        Router::new(ix, cfg).unwrap()
    }

    fn request() -> Vec<ChainHash> {
        (1..=8).map(ChainHash).collect()
    }

    #[test]
    fn the_longest_weighted_prefix_wins_then_queues_spread_load() {
        let mut r = router(RouteConfig::default());
        let hashes = request();
        let req = RouteRequest {
            scope: Scope::default(),
            hashes: &hashes,
        };
        // Engine 1 holds all 8 blocks on host (6.4 saved) against engine 0's 4 on device.
        assert_eq!(r.route(&req).unwrap().chosen.engine, EngineId(1));
        assert_eq!(r.scores().len(), 3);
        // Each routed request adds queue cost; engine 1 stays cheapest only while the
        // difference in saved prefill (2.4 of 8 blocks = 0.3) beats the queue weight.
        let picks: Vec<EngineId> = (0..8)
            .map(|_| r.route(&req).unwrap().chosen.engine)
            .collect();
        assert!(picks.contains(&EngineId(0)));
        assert!(picks.iter().filter(|&&e| e == EngineId(1)).count() >= 4);
    }

    #[test]
    fn temperature_spreads_choices_reproducibly() {
        let cfg = RouteConfig {
            temperature: 1.0,
            queue_weight: 0.0,
            ..RouteConfig::default()
        };
        let hashes = request();
        let req = RouteRequest {
            scope: Scope::default(),
            hashes: &hashes,
        };
        let run = || {
            let mut r = router(cfg);
            (0..200)
                .map(|_| r.route(&req).unwrap().chosen.engine.0)
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        for e in 0..3 {
            assert!(a.contains(&e), "engine {e} never drawn");
        }
        // The cheapest engine is drawn most often.
        let count = |e| a.iter().filter(|&&x| x == e).count();
        assert!(count(1) > count(2));
    }

    #[test]
    fn no_engine_and_bad_weights_are_errors() {
        let mut r = Router::new(KvIndex::new(16), RouteConfig::default()).unwrap();
        let req = RouteRequest {
            scope: Scope::default(),
            hashes: &[],
        };
        assert_eq!(r.route(&req), Err(RouteError::NoEngine));
        let bad = RouteConfig {
            queue_weight: f64::NAN,
            ..RouteConfig::default()
        };
        assert!(matches!(
            Router::new(KvIndex::new(16), bad),
            Err(RouteError::BadWeight {
                name: "queue_weight"
            })
        ));
        assert!(matches!(
            Router::new(KvIndex::new(0), RouteConfig::default()),
            Err(RouteError::ZeroBlockSize)
        ));
    }
}
