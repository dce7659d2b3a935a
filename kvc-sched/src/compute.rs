//! [`ComputeReserve`]: a share of every step's token budget held for the reserved QoS classes,
//! sized from their observed load.
//!
//! Pinning KV memory keeps a critical request from waiting for blocks, but not from waiting for
//! compute: its prefill still shares the step's token budget with best-effort prefill chunks
//! and decodes. The compute reserve closes that gap. At the start of each step the scheduler
//! tells it how many tokens each class could compute now (its [`ClassDemand`]); it answers with
//! a [`StepGate`] that
//! - **holds** `min(share, demand)` tokens for each reserved class, which no other class may
//!   take this step (work-conserving: a share its class does not need this step is not held,
//!   so a light critical load costs best-effort work nothing);
//! - lets a reserved class **borrow** beyond its share from whatever nobody holds, but never
//!   the best-effort floor ([`ComputeReserveConfig::best_effort_floor_tokens`]), so best-effort
//!   work always makes progress;
//! - while a reserved class's first token is **at risk** (a request of it has waited at least
//!   [`ComputeReserveConfig::at_risk_after_ms`] with prefill pending), shrinks best-effort
//!   prefill chunks and caps best-effort decodes, so the step that carries the critical
//!   prefill is short;
//! - lets a reserved class's admission **preempt** best-effort sequences when a running slot or
//!   memory, which holding tokens cannot free, is what it waits for;
//! - optionally, while a reserved class is **live** (it had work within
//!   [`ComputeReserveConfig::live_window_ms`]), caps the tokens of classes without a share in
//!   every step ([`ComputeReserveConfig::best_effort_tokens_while_live`]), so that each step is
//!   short and a reserved request that arrives while one runs waits less for it: the step
//!   already running when a request arrives is the one wait no rationing inside a step can
//!   remove. It costs best-effort throughput (more, shorter steps).
//!
//! A class's share is static, or adaptive ([`AdaptiveShare`]): the chosen percentile (p99) of
//! its per-step demand over a sliding window, plus headroom, within bounds, changed only past a
//! hysteresis band and after a cool-down (grow quickly, shrink slowly), like the adaptive
//! memory reserve.
//!
//! ```
//! use kvc_sched::QosClass;
//! use kvc_sched::{ClassDemand, ClassShare, ComputeReserve, ComputeReserveConfig};
//!
//! // Critical (class 0) may always use 256 of a 512-token step.
//! let cfg = ComputeReserveConfig::new(vec![Some(ClassShare::Static { tokens: 256 })]);
//! let mut reserve = ComputeReserve::new(cfg, 3, 512)?;
//! let demand = [
//!     ClassDemand { tokens: 300, first_token_waiting_since_ms: Some(0) },
//!     ClassDemand::default(),
//!     ClassDemand { tokens: 1_000, first_token_waiting_since_ms: None },
//! ];
//! let mut gate = reserve.begin_step(10, &demand, 512);
//! // Best-effort prefill may take only what critical does not hold, and while critical's
//! // first token is at risk it shrinks to the best-effort floor (16 tokens by default).
//! assert_eq!(gate.grant(QosClass::BEST_EFFORT, 1_000, false, 512), 16);
//! gate.commit(QosClass::BEST_EFFORT, 16, false);
//! // Critical still finds its 256 held tokens, and may borrow from the rest.
//! assert_eq!(gate.grant(QosClass::CRITICAL, 300, false, 496), 300);
//! # Ok::<(), kvc_sched::ComputeConfigError>(())
//! ```

use std::collections::VecDeque;

use kvc_core::QosClass;
use thiserror::Error;

/// How big one class's compute share is.
#[derive(Clone, Debug, PartialEq)]
pub enum ClassShare {
    /// A fixed number of tokens per step.
    Static {
        /// Tokens per step.
        tokens: usize,
    },
    /// Follows the class's observed demand.
    Adaptive(AdaptiveShare),
}

/// Sizing of an adaptive share: `percentile` of the class's per-step token demand over the
/// window, plus headroom, within `min_tokens..=max_tokens`, with hysteresis and cool-downs.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveShare {
    /// The demand quantile followed (0..=1; default 0.99).
    pub percentile: f64,
    /// Headroom as a fraction of that quantile (default 0.25).
    pub headroom_fraction: f64,
    /// Headroom in tokens, added after the fraction (default 0).
    pub headroom_tokens: usize,
    /// The share never goes below this (default 0).
    pub min_tokens: usize,
    /// The share never goes above this (default `usize::MAX`: the step budget less the
    /// best-effort floor).
    pub max_tokens: usize,
    /// The share before the window holds `min_samples` observations (default 0).
    pub initial_tokens: usize,
    /// Changes smaller than this fraction of the current share are ignored (default 0.05).
    pub hysteresis_fraction: f64,
    /// Changes of at most this many tokens are ignored (default 8).
    pub hysteresis_tokens: usize,
    /// After a change, wait this long before growing again (ms; default 500).
    pub grow_cooldown_ms: u64,
    /// After a change, wait this long before shrinking (ms; default 10 000).
    pub shrink_cooldown_ms: u64,
    /// The sliding window of per-step observations (ms; default 30 000).
    pub window_ms: u64,
    /// At most this many observations in the window (default 4 096).
    pub max_samples: usize,
    /// The share follows demand once the window holds this many observations (default 50).
    pub min_samples: usize,
}

impl Default for AdaptiveShare {
    fn default() -> Self {
        Self {
            percentile: 0.99,
            headroom_fraction: 0.25,
            headroom_tokens: 0,
            min_tokens: 0,
            max_tokens: usize::MAX,
            initial_tokens: 0,
            hysteresis_fraction: 0.05,
            hysteresis_tokens: 8,
            grow_cooldown_ms: 500,
            shrink_cooldown_ms: 10_000,
            window_ms: 30_000,
            max_samples: 4_096,
            min_samples: 50,
        }
    }
}

/// Settings of the compute reserve.
#[derive(Clone, Debug, PartialEq)]
pub struct ComputeReserveConfig {
    /// Per class rank (index 0 = most important): its share, or `None` for a class without
    /// one (best effort). Classes past the end have none.
    pub classes: Vec<Option<ClassShare>>,
    /// Tokens of each step that classes without a share can always use when they have work:
    /// shares never add up to more than the budget less this, and borrowing never takes it
    /// (default 16; must be below the step budget).
    pub best_effort_floor_tokens: usize,
    /// A reserved class's first token is at risk once one of its requests has waited this
    /// long with prefill pending (ms; default 0: whenever it has prefill pending).
    pub at_risk_after_ms: u64,
    /// While at risk, a prefill chunk of a class without a share is at most this many tokens
    /// (default 0: such prefills wait, but for the best-effort floor).
    pub best_effort_chunk_at_risk: usize,
    /// While at risk, at most this many decodes of classes without a share run per step
    /// (default 16), or as many as the best-effort floor covers.
    pub best_effort_decodes_at_risk: usize,
    /// Whether a reserved class's admission may preempt sequences of classes without a share
    /// when a running slot or memory is what it waits for (default true).
    pub preempt_for_reserved: bool,
    /// At most this many such preemptions per step (default 4).
    pub max_preemptions_per_step: usize,
    /// While a reserved class is live, classes without a share get at most this many tokens
    /// per step, prefill and decodes together, but never less than the best-effort floor
    /// (default `None`: no cap).
    pub best_effort_tokens_while_live: Option<usize>,
    /// A reserved class is live from a step in which it had work until this long after the
    /// last such step (ms; default 1,000).
    pub live_window_ms: u64,
}

impl ComputeReserveConfig {
    /// The defaults, with these per-class shares.
    #[must_use]
    pub fn new(classes: Vec<Option<ClassShare>>) -> Self {
        Self {
            classes,
            best_effort_floor_tokens: 16,
            at_risk_after_ms: 0,
            best_effort_chunk_at_risk: 0,
            best_effort_decodes_at_risk: 16,
            preempt_for_reserved: true,
            max_preemptions_per_step: 4,
            best_effort_tokens_while_live: None,
            live_window_ms: 1_000,
        }
    }

    /// The critical class (rank 0) with an adaptive share of default sizing; every other
    /// class without one.
    #[must_use]
    pub fn adaptive_critical() -> Self {
        Self::new(vec![Some(ClassShare::Adaptive(AdaptiveShare::default()))])
    }
}

/// Why a compute-reserve configuration was refused.
#[derive(Clone, Debug, PartialEq, Error)]
#[non_exhaustive]
pub enum ComputeConfigError {
    /// More per-class entries than the scheduler has classes.
    #[error("compute shares are given for {given} classes but the scheduler has {classes}")]
    TooManyClasses {
        /// Entries given.
        given: usize,
        /// Classes configured.
        classes: u8,
    },
    /// The best-effort floor leaves nothing to reserve.
    #[error("best-effort floor of {floor} tokens must be below the step budget of {budget}")]
    FloorTooLarge {
        /// The floor.
        floor: usize,
        /// The step budget.
        budget: usize,
    },
    /// A fraction or quantile is out of range (or not a number).
    #[error("class {class}: {name} is {value}, outside {min}..={max}")]
    OutOfRange {
        /// The class rank.
        class: u8,
        /// The setting.
        name: &'static str,
        /// Its value.
        value: f64,
        /// Lowest allowed.
        min: f64,
        /// Highest allowed.
        max: f64,
    },
    /// `min_tokens` exceeds `max_tokens`.
    #[error("class {class}: min_tokens {min} exceeds max_tokens {max}")]
    InvertedBounds {
        /// The class rank.
        class: u8,
        /// The lower bound.
        min: usize,
        /// The upper bound.
        max: usize,
    },
    /// A window setting that must be at least 1 is 0.
    #[error("class {class}: {name} must be at least 1")]
    Zero {
        /// The class rank.
        class: u8,
        /// The setting.
        name: &'static str,
    },
}

/// What one class could compute this step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassDemand {
    /// Tokens its running and waiting sequences have pending (prefill chunks and decodes).
    pub tokens: usize,
    /// Arrival (ms) of its longest-waiting request that has not had its first token, if any.
    pub first_token_waiting_since_ms: Option<u64>,
}

/// Counters of the compute reserve since it was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ComputeStats {
    /// Steps gated.
    pub steps: u64,
    /// Steps in which a reserved class's first token was at risk.
    pub steps_at_risk: u64,
    /// Steps in which a reserved class was live and best effort was held to
    /// [`ComputeReserveConfig::best_effort_tokens_while_live`].
    pub steps_capped_live: u64,
    /// Steps in which a reserved class wanted more than its share (its load exceeded the
    /// reserve).
    pub steps_over_share: u64,
    /// Tokens reserved classes computed within their held shares.
    pub reserved_tokens: u64,
    /// Tokens reserved classes computed beyond their shares, borrowed from the unheld budget.
    pub borrowed_tokens: u64,
    /// Tokens reserved classes wanted but did not get in the step they wanted them
    /// (they queued).
    pub queued_tokens: u64,
    /// Held tokens their class did not use after all (it could not be placed).
    pub idle_held_tokens: u64,
    /// Best-effort prefill chunks cut short to leave room for reserved work.
    pub chunks_shrunk: u64,
    /// Best-effort prefill chunks deferred to a later step.
    pub chunks_deferred: u64,
    /// Best-effort decodes deferred to a later step.
    pub decodes_deferred: u64,
    /// Best-effort sequences preempted to admit reserved work.
    pub preemptions: u64,
}

/// A sliding window of per-step token demands with percentile queries.
///
/// Demands are counted in 256 buckets (zero, then 255 equal ranges up to `max_tokens`; larger
/// demands count as `max_tokens`); a percentile reads the upper edge of its bucket, so it errs
/// by less than one bucket, upwards (it never under-reserves).
#[derive(Clone, Debug)]
struct DemandWindow {
    ring: VecDeque<(u64, u16)>,
    counts: [u32; Self::BUCKETS],
    bucket_tokens: usize,
    max_tokens: usize,
    window_ms: u64,
    max_samples: usize,
}

impl DemandWindow {
    const BUCKETS: usize = 256;

    fn new(max_tokens: usize, window_ms: u64, max_samples: usize) -> Self {
        Self {
            ring: VecDeque::new(),
            counts: [0; Self::BUCKETS],
            bucket_tokens: max_tokens.div_ceil(Self::BUCKETS - 1).max(1),
            max_tokens,
            window_ms,
            max_samples: max_samples.max(1),
        }
    }

    fn len(&self) -> usize {
        self.ring.len()
    }

    fn push(&mut self, now_ms: u64, tokens: usize) {
        // The window is `(now - window_ms, now]`, and at most `max_samples` long.
        let horizon = now_ms.checked_sub(self.window_ms);
        while let Some(&(t, b)) = self.ring.front() {
            if horizon.is_none_or(|h| t > h) && self.ring.len() < self.max_samples {
                break;
            }
            self.ring.pop_front();
            self.counts[usize::from(b)] -= 1;
        }
        // Bucket 0 holds exactly zero; bucket k ≥ 1 holds ((k-1)·w, k·w].
        let bucket = tokens
            .min(self.max_tokens)
            .div_ceil(self.bucket_tokens)
            .min(Self::BUCKETS - 1);
        self.ring.push_back((now_ms, bucket as u16));
        self.counts[bucket] += 1;
    }

    /// Nearest-rank `p`-quantile, as the upper edge of its bucket; `None` when empty.
    fn percentile(&self, p: f64) -> Option<usize> {
        let n = self.ring.len();
        if n == 0 {
            return None;
        }
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        let mut seen = 0usize;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count as usize;
            if seen >= rank {
                return Some((bucket * self.bucket_tokens).min(self.max_tokens));
            }
        }
        Some(self.max_tokens)
    }
}

/// One class's share and its sizing state.
#[derive(Clone, Debug)]
struct ClassState {
    share: ClassShare,
    tokens: usize,
    window: Option<DemandWindow>,
    last_change_ms: Option<u64>,
}

impl ClassState {
    fn observe(&mut self, now_ms: u64, demand: usize) {
        let (ClassShare::Adaptive(a), Some(window)) = (&self.share, &mut self.window) else {
            return;
        };
        window.push(now_ms, demand);
        let target = if window.len() < a.min_samples {
            a.initial_tokens
        } else {
            let q = window.percentile(a.percentile).unwrap_or(0);
            let headroom = (q as f64 * a.headroom_fraction).ceil() as usize;
            q.saturating_add(headroom).saturating_add(a.headroom_tokens)
        }
        .clamp(a.min_tokens, a.max_tokens);
        let current = self.tokens;
        let band = a
            .hysteresis_tokens
            .max((current as f64 * a.hysteresis_fraction) as usize);
        if target.abs_diff(current) <= band && (a.min_tokens..=a.max_tokens).contains(&current) {
            return;
        }
        let since = self.last_change_ms.map(|t| now_ms.saturating_sub(t));
        let cooldown = if target > current {
            a.grow_cooldown_ms
        } else {
            a.shrink_cooldown_ms
        };
        if since.is_none_or(|s| s >= cooldown) {
            self.tokens = target;
            self.last_change_ms = Some(now_ms);
        }
    }
}

/// The compute reserve: per-class shares of the step budget, their sizing, and counters.
#[derive(Clone, Debug)]
pub struct ComputeReserve {
    cfg: ComputeReserveConfig,
    classes: Vec<Option<ClassState>>,
    stats: ComputeStats,
    /// The last step in which a reserved class had work.
    last_reserved_work_ms: Option<u64>,
}

impl ComputeReserve {
    /// A reserve for a scheduler of `num_classes` classes and `max_batch_tokens` per step.
    pub fn new(
        cfg: ComputeReserveConfig,
        num_classes: u8,
        max_batch_tokens: usize,
    ) -> Result<Self, ComputeConfigError> {
        if cfg.classes.len() > usize::from(num_classes) {
            return Err(ComputeConfigError::TooManyClasses {
                given: cfg.classes.len(),
                classes: num_classes,
            });
        }
        if cfg.best_effort_floor_tokens >= max_batch_tokens {
            return Err(ComputeConfigError::FloorTooLarge {
                floor: cfg.best_effort_floor_tokens,
                budget: max_batch_tokens,
            });
        }
        let mut classes = Vec::with_capacity(cfg.classes.len());
        for (rank, share) in cfg.classes.iter().enumerate() {
            let class = rank as u8;
            let state = match share {
                None => None,
                Some(ClassShare::Static { tokens }) => Some(ClassState {
                    share: ClassShare::Static { tokens: *tokens },
                    tokens: *tokens,
                    window: None,
                    last_change_ms: None,
                }),
                Some(ClassShare::Adaptive(a)) => {
                    validate_adaptive(class, a)?;
                    Some(ClassState {
                        share: ClassShare::Adaptive(a.clone()),
                        tokens: a.initial_tokens.clamp(a.min_tokens, a.max_tokens),
                        window: Some(DemandWindow::new(
                            max_batch_tokens,
                            a.window_ms,
                            a.max_samples,
                        )),
                        last_change_ms: None,
                    })
                }
            };
            classes.push(state);
        }
        Ok(Self {
            cfg,
            classes,
            stats: ComputeStats::default(),
            last_reserved_work_ms: None,
        })
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &ComputeReserveConfig {
        &self.cfg
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> ComputeStats {
        self.stats
    }

    /// Whether `class` has a share.
    #[must_use]
    pub fn is_reserved(&self, class: QosClass) -> bool {
        matches!(self.classes.get(class.index()), Some(Some(_)))
    }

    /// `class`'s current share in tokens per step (0 for a class without one), before the
    /// cap that keeps the best-effort floor free.
    #[must_use]
    pub fn share_tokens(&self, class: QosClass) -> usize {
        match self.classes.get(class.index()) {
            Some(Some(state)) => state.tokens,
            _ => 0,
        }
    }

    /// Records this step's demand (one entry per class rank; missing entries are 0), resizes
    /// adaptive shares, and returns the gate that rations a `budget`-token step.
    pub fn begin_step(&mut self, now_ms: u64, demand: &[ClassDemand], budget: usize) -> StepGate {
        let n = demand.len().max(self.classes.len());
        let mut held = vec![0usize; n];
        let mut reserved = vec![false; n];
        let mut at_risk = false;
        let mut be_demand = 0usize;
        let floor = self.cfg.best_effort_floor_tokens;
        let mut room = budget.saturating_sub(floor);
        for rank in 0..n {
            let d = demand.get(rank).copied().unwrap_or_default();
            match self.classes.get_mut(rank) {
                Some(Some(state)) => {
                    let want = d.tokens.min(budget);
                    state.observe(now_ms, want);
                    reserved[rank] = true;
                    // More important classes are served first when shares overbook the room.
                    held[rank] = state.tokens.min(want).min(room);
                    room -= held[rank];
                    if want > state.tokens {
                        self.stats.steps_over_share += 1;
                    }
                    if d.first_token_waiting_since_ms.is_some_and(|since| {
                        now_ms.saturating_sub(since) >= self.cfg.at_risk_after_ms
                    }) {
                        at_risk = true;
                    }
                    if d.tokens > 0 {
                        self.last_reserved_work_ms = Some(now_ms);
                    }
                }
                _ => be_demand = be_demand.saturating_add(d.tokens),
            }
        }
        self.stats.steps += 1;
        if at_risk {
            self.stats.steps_at_risk += 1;
        }
        let live = self
            .last_reserved_work_ms
            .is_some_and(|last| now_ms.saturating_sub(last) <= self.cfg.live_window_ms);
        let best_effort_left = match self.cfg.best_effort_tokens_while_live {
            Some(cap) if live => {
                self.stats.steps_capped_live += 1;
                cap
            }
            _ => usize::MAX,
        };
        let wanted = demand
            .iter()
            .zip(&reserved)
            .map(|(d, &r)| if r { d.tokens.min(budget) } else { 0 })
            .collect();
        StepGate {
            held_total: held.iter().sum(),
            held,
            reserved,
            wanted,
            used: vec![0; n],
            floor_left: floor.min(be_demand),
            best_effort_left,
            at_risk,
            chunk_cap: self.cfg.best_effort_chunk_at_risk,
            decodes_left: self.cfg.best_effort_decodes_at_risk,
            preemptions_left: if self.cfg.preempt_for_reserved {
                self.cfg.max_preemptions_per_step
            } else {
                0
            },
            stats: ComputeStats::default(),
        }
    }

    /// Folds a finished step's gate into the counters.
    pub fn end_step(&mut self, gate: StepGate) {
        let s = &mut self.stats;
        let g = gate.stats;
        s.reserved_tokens += g.reserved_tokens;
        s.borrowed_tokens += g.borrowed_tokens;
        s.chunks_shrunk += g.chunks_shrunk;
        s.chunks_deferred += g.chunks_deferred;
        s.decodes_deferred += g.decodes_deferred;
        s.preemptions += g.preemptions;
        s.idle_held_tokens += gate.held.iter().map(|&h| h as u64).sum::<u64>();
        s.queued_tokens += gate
            .wanted
            .iter()
            .zip(&gate.used)
            .map(|(&w, &u)| w.saturating_sub(u) as u64)
            .sum::<u64>();
    }
}

fn validate_adaptive(class: u8, a: &AdaptiveShare) -> Result<(), ComputeConfigError> {
    for (name, value, max) in [
        ("percentile", a.percentile, 1.0),
        ("headroom_fraction", a.headroom_fraction, 100.0),
        ("hysteresis_fraction", a.hysteresis_fraction, 1.0),
    ] {
        if !(0.0..=max).contains(&value) {
            return Err(ComputeConfigError::OutOfRange {
                class,
                name,
                value,
                min: 0.0,
                max,
            });
        }
    }
    if a.min_tokens > a.max_tokens {
        return Err(ComputeConfigError::InvertedBounds {
            class,
            min: a.min_tokens,
            max: a.max_tokens,
        });
    }
    for (name, value) in [
        ("window_ms", a.window_ms as usize),
        ("max_samples", a.max_samples),
    ] {
        if value == 0 {
            return Err(ComputeConfigError::Zero { class, name });
        }
    }
    Ok(())
}

/// The rationing of one step's token budget, from [`ComputeReserve::begin_step`].
///
/// For each sequence the scheduler asks [`grant`](Self::grant) how many of its pending tokens
/// may run, and reports what it scheduled with [`commit`](Self::commit); the scheduler's own
/// budget counter stays the single count of tokens left.
#[derive(Clone, Debug)]
#[must_use = "a gate rations the step; hand it back with ComputeReserve::end_step"]
pub struct StepGate {
    /// Per class: tokens still held for it this step.
    held: Vec<usize>,
    held_total: usize,
    reserved: Vec<bool>,
    wanted: Vec<usize>,
    used: Vec<usize>,
    /// Best-effort floor tokens not yet used this step (only as much as best effort wants).
    floor_left: usize,
    /// Tokens classes without a share may still use this step under the live cap
    /// (`usize::MAX`: no cap).
    best_effort_left: usize,
    at_risk: bool,
    chunk_cap: usize,
    decodes_left: usize,
    preemptions_left: usize,
    stats: ComputeStats,
}

impl StepGate {
    /// Whether `class` has a share.
    #[must_use]
    pub fn is_reserved(&self, class: QosClass) -> bool {
        self.reserved.get(class.index()).copied().unwrap_or(false)
    }

    /// Whether a reserved class's first token is at risk this step.
    #[must_use]
    pub fn at_risk(&self) -> bool {
        self.at_risk
    }

    /// Tokens held for `class` and not yet used this step.
    #[must_use]
    pub fn held(&self, class: QosClass) -> usize {
        self.held.get(class.index()).copied().unwrap_or(0)
    }

    /// How many of `pending` tokens a sequence of `class` may compute now, with `budget`
    /// tokens left in the step; `decode` says whether it is a decode (else a prefill chunk).
    /// Counts best-effort work it shrinks or defers; see [`allowance`](Self::allowance) for
    /// the same answer without counting.
    pub fn grant(&mut self, class: QosClass, pending: u64, decode: bool, budget: usize) -> u64 {
        let n = self.allowance(class, pending, decode, budget);
        if self.is_reserved(class) {
            return n;
        }
        if !decode && n < pending.min(budget as u64) {
            if n == 0 {
                self.stats.chunks_deferred += 1;
            } else {
                self.stats.chunks_shrunk += 1;
            }
        } else if decode && n == 0 && pending > 0 {
            self.stats.decodes_deferred += 1;
        }
        n
    }

    /// What [`grant`](Self::grant) would answer, without counting anything. It never grows
    /// when `pending` shrinks, and is positive for every positive `pending` once it is
    /// positive for one.
    #[must_use]
    pub fn allowance(&self, class: QosClass, pending: u64, decode: bool, budget: usize) -> u64 {
        let own = self.held(class);
        let others = self.held_total - own;
        let room = budget.saturating_sub(others);
        if self.is_reserved(class) {
            // Borrowing beyond the share never takes the best-effort floor.
            let room = room.saturating_sub(self.floor_left).max(own.min(room));
            return pending.min(room as u64);
        }
        let mut n = pending.min(room as u64);
        let floor = self.floor_left as u64;
        // While a reserved class is live, best effort shares a per-step cap (never below the
        // floor), so that every step stays short.
        n = n.min((self.best_effort_left as u64).max(floor));
        // While a reserved first token is at risk, best-effort work shrinks to its caps, but
        // never below the floor: that is what keeps it from starving under critical overload.
        if self.at_risk && pending > 0 {
            if decode {
                if self.decodes_left == 0 && floor == 0 {
                    return 0;
                }
            } else {
                n = n.min((self.chunk_cap as u64).max(floor));
            }
        }
        n
    }

    /// Records that `n` tokens of `class` were scheduled.
    pub fn commit(&mut self, class: QosClass, n: u64, decode: bool) {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let i = class.index();
        if self.is_reserved(class) {
            let from_held = n.min(self.held[i]);
            self.held[i] -= from_held;
            self.held_total -= from_held;
            self.used[i] = self.used[i].saturating_add(n);
            self.stats.reserved_tokens += from_held as u64;
            self.stats.borrowed_tokens += (n - from_held) as u64;
        } else {
            self.floor_left = self.floor_left.saturating_sub(n);
            self.best_effort_left = self.best_effort_left.saturating_sub(n);
            if decode && self.at_risk {
                self.decodes_left = self.decodes_left.saturating_sub(1);
            }
        }
    }

    /// Takes one of the step's preemptions for reserved admissions, if any is left.
    pub fn take_preemption(&mut self) -> bool {
        if self.preemptions_left == 0 {
            return false;
        }
        self.preemptions_left -= 1;
        self.stats.preemptions += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CRIT: QosClass = QosClass::CRITICAL;
    const BE: QosClass = QosClass::BEST_EFFORT;

    fn demand(tokens: usize, waiting_since: Option<u64>) -> ClassDemand {
        ClassDemand {
            tokens,
            first_token_waiting_since_ms: waiting_since,
        }
    }

    fn fixed(tokens: usize) -> ComputeReserve {
        let cfg = ComputeReserveConfig::new(vec![Some(ClassShare::Static { tokens })]);
        ComputeReserve::new(cfg, 3, 512).unwrap()
    }

    fn adaptive(a: AdaptiveShare) -> ComputeReserve {
        let cfg = ComputeReserveConfig::new(vec![Some(ClassShare::Adaptive(a))]);
        ComputeReserve::new(cfg, 3, 512).unwrap()
    }

    #[test]
    fn best_effort_shares_a_short_step_while_a_reserved_class_is_live() {
        let mut cfg = ComputeReserveConfig::new(vec![Some(ClassShare::Static { tokens: 256 })]);
        cfg.best_effort_tokens_while_live = Some(64);
        cfg.live_window_ms = 1_000;
        let mut r = ComputeReserve::new(cfg, 3, 512).unwrap();
        let step = |r: &mut ComputeReserve, now, critical| {
            r.begin_step(
                now,
                &[demand(critical, None), demand(0, None), demand(2_000, None)],
                512,
            )
        };
        // Critical decodes: best effort may take 64 tokens of the step, prefill and decode
        // together (the 16-token floor is inside them).
        let mut gate = step(&mut r, 0, 10);
        assert_eq!(gate.grant(BE, 1_000, false, 502), 64);
        gate.commit(BE, 64, false);
        assert_eq!(gate.grant(BE, 1, true, 438), 0, "a decode waits a step");
        assert_eq!(gate.grant(CRIT, 10, true, 438), 10);
        r.end_step(gate);
        // Still live 600 ms later without critical work: the cap holds.
        let mut gate = step(&mut r, 600, 0);
        assert_eq!(gate.grant(BE, 1_000, false, 512), 64);
        r.end_step(gate);
        // Past the window: the whole step again.
        let mut gate = step(&mut r, 1_601, 0);
        assert_eq!(gate.grant(BE, 1_000, false, 512), 512);
        r.end_step(gate);
        let s = r.stats();
        assert_eq!(s.steps_capped_live, 2);
        assert_eq!((s.chunks_shrunk, s.decodes_deferred), (2, 1));
    }

    #[test]
    fn the_live_cap_never_takes_the_best_effort_floor() {
        let mut cfg = ComputeReserveConfig::new(vec![Some(ClassShare::Static { tokens: 256 })]);
        cfg.best_effort_tokens_while_live = Some(0);
        let mut r = ComputeReserve::new(cfg, 3, 512).unwrap();
        let mut gate = r.begin_step(
            0,
            &[demand(300, None), demand(0, None), demand(50, None)],
            512,
        );
        assert_eq!(gate.grant(BE, 50, false, 512), 16, "the floor");
        gate.commit(BE, 16, false);
        assert_eq!(gate.grant(BE, 1, true, 496), 0);
        r.end_step(gate);
    }

    #[test]
    fn window_percentiles_round_up_by_at_most_one_bucket() {
        let mut w = DemandWindow::new(512, u64::MAX, 1_000);
        let mut all = Vec::new();
        let mut x: u64 = 99;
        for t in 0..2_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let v = ((x >> 33) % 600) as usize;
            w.push(t, v);
            all.push(v.min(512));
            let tail = &all[all.len().saturating_sub(1_000)..];
            let mut sorted = tail.to_vec();
            sorted.sort_unstable();
            for p in [0.0, 0.5, 0.9, 0.99, 1.0] {
                let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
                let exact = sorted[rank - 1];
                let got = w.percentile(p).unwrap();
                assert!(
                    got >= exact && got < exact + 2 * w.bucket_tokens,
                    "{p}: {got} vs {exact}"
                );
            }
        }
        assert_eq!(w.len(), 1_000);
    }

    #[test]
    fn window_forgets_old_observations() {
        let mut w = DemandWindow::new(512, 1_000, 100);
        w.push(0, 500);
        w.push(600, 10);
        assert!(w.percentile(1.0).unwrap() >= 500);
        w.push(1_200, 0);
        assert_eq!(w.len(), 2);
        assert!(w.percentile(1.0).unwrap() < 20);
    }

    #[test]
    fn a_share_holds_only_what_its_class_wants() {
        let mut r = fixed(256);
        // Not at risk in this test: no first token waits.
        // Critical idle: best effort may use the whole step.
        let mut g = r.begin_step(
            0,
            &[demand(0, None), demand(0, None), demand(900, None)],
            512,
        );
        assert_eq!(g.held(CRIT), 0);
        assert_eq!(g.grant(BE, 900, false, 512), 512);
        r.end_step(g);
        // Critical wants 100: only 100 are held.
        let mut g = r.begin_step(
            1,
            &[demand(100, None), demand(0, None), demand(900, None)],
            512,
        );
        assert_eq!(g.held(CRIT), 100);
        assert_eq!(g.grant(BE, 900, false, 512), 412);
        g.commit(BE, 412, false);
        assert_eq!(g.grant(CRIT, 100, false, 100), 100);
        g.commit(CRIT, 100, false);
        r.end_step(g);
        let s = r.stats();
        assert_eq!((s.steps, s.reserved_tokens, s.borrowed_tokens), (2, 100, 0));
        assert_eq!(s.idle_held_tokens, 0);
    }

    #[test]
    fn borrowing_never_takes_the_best_effort_floor() {
        let mut r = fixed(100);
        let mut g = r.begin_step(
            0,
            &[demand(500, None), demand(0, None), demand(10, None)],
            512,
        );
        // Held 100, may borrow up to 512 - 10 (the floor best effort wants is 10 of 16).
        assert_eq!(g.grant(CRIT, 600, false, 512), 502);
        g.commit(CRIT, 500, false);
        assert_eq!(g.grant(BE, 10, false, 12), 10);
        r.end_step(g);
        assert_eq!(r.stats().borrowed_tokens, 400);
        assert_eq!(r.stats().steps_over_share, 1);
        // With best effort wanting a lot, the critical class leaves the whole floor.
        let mut g = r.begin_step(
            1,
            &[demand(500, None), demand(0, None), demand(900, None)],
            512,
        );
        assert_eq!(g.grant(CRIT, 600, false, 512), 496);
    }

    #[test]
    fn shares_never_overbook_the_step() {
        let cfg = ComputeReserveConfig::new(vec![
            Some(ClassShare::Static { tokens: 400 }),
            Some(ClassShare::Static { tokens: 400 }),
        ]);
        let mut r = ComputeReserve::new(cfg, 3, 512).unwrap();
        let g = r.begin_step(0, &[demand(500, None), demand(500, None)], 512);
        // The more important class first; together at most the budget less the floor.
        assert_eq!(g.held(CRIT), 400);
        assert_eq!(g.held(QosClass::STANDARD), 96);
    }

    #[test]
    fn best_effort_shrinks_while_a_first_token_is_at_risk() {
        let mut cfg = ComputeReserveConfig::new(vec![Some(ClassShare::Static { tokens: 200 })]);
        cfg.at_risk_after_ms = 50;
        cfg.best_effort_chunk_at_risk = 32;
        cfg.best_effort_decodes_at_risk = 2;
        cfg.best_effort_floor_tokens = 0;
        let mut r = ComputeReserve::new(cfg, 3, 512).unwrap();
        // Waiting 10 ms: not yet at risk.
        let mut g = r.begin_step(
            100,
            &[demand(200, Some(90)), demand(0, None), demand(900, None)],
            512,
        );
        assert!(!g.at_risk());
        assert_eq!(g.grant(BE, 900, false, 512), 312);
        r.end_step(g);
        // Waiting 60 ms: at risk; prefill chunks cut to 32, two decodes only.
        let mut g = r.begin_step(
            150,
            &[demand(200, Some(90)), demand(0, None), demand(900, None)],
            512,
        );
        assert!(g.at_risk());
        assert_eq!(g.grant(BE, 900, false, 512), 32);
        for _ in 0..2 {
            assert_eq!(g.grant(BE, 1, true, 400), 1);
            g.commit(BE, 1, true);
        }
        assert_eq!(g.grant(BE, 1, true, 400), 0);
        r.end_step(g);
        let s = r.stats();
        assert_eq!(
            (s.steps_at_risk, s.chunks_shrunk, s.decodes_deferred),
            (1, 2, 1)
        );
        assert_eq!(s.idle_held_tokens, 400, "critical never used its holds");
        assert_eq!(s.queued_tokens, 400);
    }

    #[test]
    fn the_floor_outlasts_the_at_risk_caps() {
        let mut cfg = ComputeReserveConfig::new(vec![Some(ClassShare::Static { tokens: 448 })]);
        cfg.best_effort_chunk_at_risk = 0;
        cfg.best_effort_decodes_at_risk = 0;
        cfg.best_effort_floor_tokens = 16;
        let mut r = ComputeReserve::new(cfg, 3, 512).unwrap();
        let mut g = r.begin_step(
            0,
            &[demand(5_000, Some(0)), demand(0, None), demand(900, None)],
            512,
        );
        assert_eq!(g.grant(BE, 900, false, 512), 16);
        g.commit(BE, 10, false);
        assert_eq!(g.grant(BE, 1, true, 502), 1);
        g.commit(BE, 6, false);
        assert_eq!(g.grant(BE, 1, true, 496), 0);
    }

    #[test]
    fn adaptive_share_follows_demand_with_bounds_and_hysteresis() {
        let mut r = adaptive(AdaptiveShare {
            min_samples: 10,
            max_tokens: 400,
            grow_cooldown_ms: 0,
            shrink_cooldown_ms: 1_000,
            ..AdaptiveShare::default()
        });
        assert_eq!(r.share_tokens(CRIT), 0);
        // Light critical load (a few decodes a step): a small share.
        for t in 0..100 {
            let g = r.begin_step(t, &[demand(8, None)], 512);
            r.end_step(g);
        }
        let light = r.share_tokens(CRIT);
        assert!((8..=16).contains(&light), "{light}");
        // A heavy burst: the share grows at once, to p99 + 25%, within the bound.
        for t in 100..200 {
            let g = r.begin_step(t, &[demand(300, Some(t))], 512);
            r.end_step(g);
        }
        assert_eq!(r.share_tokens(CRIT), 375, "300 + 25%");
        for t in 200..300 {
            let g = r.begin_step(t, &[demand(500, Some(t))], 512);
            r.end_step(g);
        }
        assert_eq!(r.share_tokens(CRIT), 400, "500 + 25%, capped at 400");
        // Load falls back: no shrink before the cool-down...
        for t in 300..1_000 {
            let g = r.begin_step(t, &[demand(8, None)], 512);
            r.end_step(g);
        }
        assert_eq!(r.share_tokens(CRIT), 400);
        // ...and once the window has forgotten the burst, the share falls.
        for t in 1_000..40_000 {
            let g = r.begin_step(t, &[demand(8, None)], 512);
            r.end_step(g);
        }
        assert!(r.share_tokens(CRIT) <= 16, "{}", r.share_tokens(CRIT));
    }

    #[test]
    fn bad_configurations_are_typed_errors() {
        let floor = ComputeReserveConfig {
            best_effort_floor_tokens: 512,
            ..ComputeReserveConfig::adaptive_critical()
        };
        assert!(matches!(
            ComputeReserve::new(floor, 3, 512),
            Err(ComputeConfigError::FloorTooLarge { .. })
        ));
        let many = ComputeReserveConfig::new(vec![None; 4]);
        assert!(matches!(
            ComputeReserve::new(many, 3, 512),
            Err(ComputeConfigError::TooManyClasses { .. })
        ));
        for (a, want) in [
            (
                AdaptiveShare {
                    percentile: 1.5,
                    ..AdaptiveShare::default()
                },
                "percentile",
            ),
            (
                AdaptiveShare {
                    headroom_fraction: f64::NAN,
                    ..AdaptiveShare::default()
                },
                "headroom_fraction",
            ),
            (
                AdaptiveShare {
                    min_tokens: 9,
                    max_tokens: 8,
                    ..AdaptiveShare::default()
                },
                "min_tokens",
            ),
            (
                AdaptiveShare {
                    window_ms: 0,
                    ..AdaptiveShare::default()
                },
                "window_ms",
            ),
        ] {
            let cfg = ComputeReserveConfig::new(vec![Some(ClassShare::Adaptive(a))]);
            let err = ComputeReserve::new(cfg, 3, 512).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever the demands, a reserved class is granted at least its hold, the holds fit
        /// the step less the floor, and best effort keeps at least the floor it wants.
        #[test]
        fn holds_are_honoured_and_the_floor_is_kept(
            budget in 16usize..2_048,
            floor_frac in 0.0f64..0.5,
            shares in proptest::collection::vec(0usize..3_000, 1..3),
            demands in proptest::collection::vec(0usize..5_000, 3),
            at_risk in any::<bool>(),
            live_cap in proptest::option::of(0usize..600),
        ) {
            let floor = ((budget as f64 * floor_frac) as usize).min(budget - 1);
            let mut cfg = ComputeReserveConfig::new(
                shares.iter().map(|&tokens| Some(ClassShare::Static { tokens })).collect(),
            );
            cfg.best_effort_floor_tokens = floor;
            cfg.best_effort_chunk_at_risk = 0;
            cfg.best_effort_decodes_at_risk = 0;
            cfg.best_effort_tokens_while_live = live_cap;
            let mut r = ComputeReserve::new(cfg, 3, budget).unwrap();
            let d: Vec<ClassDemand> = demands
                .iter()
                .map(|&tokens| demand(tokens, at_risk.then_some(0)))
                .collect();
            let mut g = r.begin_step(0, &d, budget);
            let held: usize = (0..3u8).map(|c| g.held(QosClass(c))).sum();
            prop_assert!(held <= budget - floor);
            let mut left = budget;
            // Reserved classes first, as the scheduler orders them.
            for (c, dc) in d.iter().enumerate().take(shares.len()) {
                let class = QosClass(c as u8);
                let want = dc.tokens.min(budget) as u64;
                let hold = g.held(class) as u64;
                let n = g.grant(class, want, false, left);
                prop_assert!(n >= hold.min(want), "class {c}: {n} < hold {hold}");
                prop_assert!(n as usize <= left);
                g.commit(class, n, false);
                left -= n as usize;
            }
            let be = QosClass(2);
            if shares.len() < 3 {
                let want = d[2].tokens as u64;
                let n = g.grant(be, want, false, left);
                prop_assert!(n >= want.min(floor as u64), "best effort got {n} of floor {floor}");
                // A reserved class with work this step is live: the cap holds, above the floor.
                let live = d.iter().take(shares.len()).any(|dc| dc.tokens > 0);
                if let (Some(cap), true) = (live_cap, live) {
                    prop_assert!(n <= cap.max(floor) as u64, "best effort got {n} over cap {cap}");
                }
            }
        }
    }
}
