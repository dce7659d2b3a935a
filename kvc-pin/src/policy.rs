//! [`PinningPolicy`]: the `kvc_core::PinPolicy` of this crate. QoS placement between the pinned
//! and dynamic regions, graceful degradation, the configured response to exhaustion, tenant
//! quotas on the pinned region, reserve sizing and soft prefix pins, in one value.

use std::collections::HashMap;

use kvc_core::{
    LoadSample, PinPolicy, PinReleaseError, PlaceRequest, Placement, PoolView, QosClass,
    QosClasses, Refusal, RegionBlocks, Resize, Retention, RetentionUpdate, Route, SeqId, TenantId,
    WaitReason,
};
use thiserror::Error;

use crate::{PinError, PinGrant, PinId, PinRequest, Reserve, SoftPinConfig, SoftPins, UnpinError};

/// What a request does when the region it may use has too few free blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum OnExhausted {
    /// It waits ([`Placement::Wait`]).
    #[default]
    Queue,
    /// A sequence of the lowest class below it that holds dynamic blocks is preempted
    /// ([`Placement::PreemptLowest`]); if there is none, it waits.
    PreemptLowest,
    /// It waits and the lowest class is capped at half its running sequences
    /// ([`Placement::Downgrade`]); the cap loosens by one per tick once the dynamic region has
    /// [`PolicyConfig::recover_free_fraction`] free, and is lifted when it no longer binds.
    Downgrade,
}

/// What a reserved-class request over its tenant's share of the pinned region does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum OverQuota {
    /// Its blocks beyond the share come from the dynamic region ([`Route::OverQuota`]).
    #[default]
    Dynamic,
    /// It is refused ([`Refusal::TenantOverQuota`]).
    Refuse,
}

/// Why a policy configuration was refused.
#[derive(Clone, Debug, PartialEq, Error)]
#[non_exhaustive]
pub enum PolicyConfigError {
    /// A fraction outside 0..=1 (or not a number).
    #[error("{what} must be in 0..=1, got {value}")]
    BadFraction {
        /// The setting.
        what: &'static str,
        /// The value given.
        value: f64,
    },
    /// The reserved class is not one of the configured classes.
    #[error("reserved class {class} is not among the {count} configured classes")]
    UnknownReservedClass {
        /// The class given.
        class: QosClass,
        /// Classes configured.
        count: usize,
    },
}

/// Settings of a [`PinningPolicy`].
#[derive(Clone, Debug)]
pub struct PolicyConfig {
    /// The QoS classes (default: critical, standard, best-effort).
    pub classes: QosClasses,
    /// Classes ranked at or above this one allocate from the pinned region; `None`: no class
    /// does (no pinning). Default: [`QosClass::CRITICAL`].
    pub reserved: Option<QosClass>,
    /// The response to an exhausted region (default: queue).
    pub on_exhausted: OnExhausted,
    /// The response to a tenant over its pinned share (default: fall to dynamic).
    pub over_quota: OverQuota,
    /// Each tenant's share of the pinned region's capacity (default 1: no per-tenant cap).
    pub tenant_pinned_share: f64,
    /// Per-tenant caps on pinned blocks, overriding the share.
    pub tenant_pinned_limits: HashMap<TenantId, usize>,
    /// Under [`OnExhausted::Downgrade`], caps loosen when at least this fraction of the dynamic
    /// region is free (default 0.05).
    pub recover_free_fraction: f64,
    /// Reserve sizing.
    pub reserve: Reserve,
    /// Soft prefix pins.
    pub soft_pins: SoftPinConfig,
}

impl PolicyConfig {
    /// The defaults, with this reserve sizing and soft-pin budget.
    #[must_use]
    pub fn new(reserve: Reserve, soft_pins: SoftPinConfig) -> Self {
        Self {
            classes: QosClasses::default(),
            reserved: Some(QosClass::CRITICAL),
            on_exhausted: OnExhausted::Queue,
            over_quota: OverQuota::Dynamic,
            tenant_pinned_share: 1.0,
            tenant_pinned_limits: HashMap::new(),
            recover_free_fraction: 0.05,
            reserve,
            soft_pins,
        }
    }

    /// No pinning at all: no class is reserved, and the pinned region is emptied.
    #[must_use]
    pub fn unpinned(soft_pins: SoftPinConfig) -> Self {
        Self {
            reserved: None,
            ..Self::new(Reserve::None, soft_pins)
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), PolicyConfigError> {
        for (what, value) in [
            ("tenant pinned share", self.tenant_pinned_share),
            ("recover free fraction", self.recover_free_fraction),
        ] {
            if value.is_nan() || !(0.0..=1.0).contains(&value) {
                return Err(PolicyConfigError::BadFraction { what, value });
            }
        }
        if let Some(class) = self.reserved
            && !self.classes.contains(class)
        {
            return Err(PolicyConfigError::UnknownReservedClass {
                class,
                count: self.classes.len(),
            });
        }
        Ok(())
    }
}

/// Counts of the policy's decisions, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// `Allocate` decisions.
    pub allocations: u64,
    /// Of which borrowed dynamic blocks because the pinned region was full.
    pub borrowed: u64,
    /// Of which fell to dynamic because the tenant was over its pinned share.
    pub over_quota: u64,
    /// `Wait` decisions.
    pub waits: u64,
    /// `PreemptLowest` decisions.
    pub preemptions: u64,
    /// `Downgrade` decisions.
    pub downgrades: u64,
    /// `Refuse` decisions.
    pub refusals: u64,
    /// Ticks that resized the pinned region.
    pub resizes: u64,
}

#[derive(Clone, Copy, Debug)]
struct SeqHold {
    tenant: TenantId,
    class: QosClass,
    held: RegionBlocks,
}

#[derive(Clone, Copy, Debug, Default)]
struct ClassState {
    running: usize,
    held: RegionBlocks,
    cap: Option<usize>,
}

/// The pin policy of kvc: QoS placement, reserve sizing, tenant quotas and soft pins.
///
/// ```
/// use kvc_pin::{PinPolicy, PlaceRequest, Placement, PoolView, QosClass, RegionBlocks, Route,
///     SeqId, TenantId};
/// use kvc_pin::{PinningPolicy, PolicyConfig, Reserve, SoftPinConfig, StaticReserve};
///
/// let soft = SoftPinConfig::new(1 << 20, 100, 0.1)?;
/// let mut policy = PinningPolicy::new(PolicyConfig::new(
///     Reserve::Static(StaticReserve::blocks(20)), soft))?;
/// let pool = PoolView { pinned_capacity: 20, pinned_free: 2, dynamic_capacity: 80, dynamic_free: 50 };
/// let req = PlaceRequest { seq: SeqId(1), tenant: TenantId(1), class: QosClass::CRITICAL,
///     blocks: 5, now_ms: 0 };
/// // The pinned region has only 2 free blocks: the critical request borrows 3 from dynamic.
/// assert_eq!(policy.place(&req, &pool), Placement::Allocate {
///     blocks: RegionBlocks { pinned: 2, dynamic: 3 }, route: Route::Borrowed });
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct PinningPolicy {
    config: PolicyConfig,
    seqs: HashMap<SeqId, SeqHold>,
    classes: Vec<ClassState>,
    tenant_pinned: HashMap<TenantId, usize>,
    soft: SoftPins,
    stats: PolicyStats,
}

impl PinningPolicy {
    /// A policy with these settings.
    pub fn new(config: PolicyConfig) -> Result<Self, PolicyConfigError> {
        config.validate()?;
        Ok(Self {
            classes: vec![ClassState::default(); config.classes.len()],
            soft: SoftPins::new(config.soft_pins.clone()),
            seqs: HashMap::new(),
            tenant_pinned: HashMap::new(),
            stats: PolicyStats::default(),
            config,
        })
    }

    /// The settings.
    #[must_use]
    pub const fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Counts of decisions so far.
    #[must_use]
    pub const fn stats(&self) -> PolicyStats {
        self.stats
    }

    /// The reserve sizing's name: `none`, `static` or `adaptive`.
    #[must_use]
    pub const fn reserve_name(&self) -> &'static str {
        self.config.reserve.name()
    }

    /// Whether `class` allocates from the pinned region.
    #[must_use]
    pub fn is_reserved(&self, class: QosClass) -> bool {
        self.config.reserved.is_some_and(|r| class <= r)
    }

    /// Blocks held by a class in each region.
    #[must_use]
    pub fn class_blocks(&self, class: QosClass) -> RegionBlocks {
        self.classes
            .get(class.index())
            .map_or_else(RegionBlocks::default, |c| c.held)
    }

    /// Sequences of a class holding blocks.
    #[must_use]
    pub fn class_running(&self, class: QosClass) -> usize {
        self.classes.get(class.index()).map_or(0, |c| c.running)
    }

    /// The concurrency cap on a class, if it is downgraded.
    #[must_use]
    pub fn class_cap(&self, class: QosClass) -> Option<usize> {
        self.classes.get(class.index()).and_then(|c| c.cap)
    }

    /// Blocks a sequence holds, as far as the policy knows.
    #[must_use]
    pub fn seq_blocks(&self, seq: SeqId) -> Option<RegionBlocks> {
        self.seqs.get(&seq).map(|s| s.held)
    }

    /// Pinned-region blocks held by a tenant.
    #[must_use]
    pub fn tenant_pinned(&self, tenant: TenantId) -> usize {
        self.tenant_pinned.get(&tenant).copied().unwrap_or(0)
    }

    /// A tenant's cap on pinned-region blocks, for a pinned region of `pinned_capacity` blocks.
    #[must_use]
    pub fn tenant_pinned_limit(&self, tenant: TenantId, pinned_capacity: usize) -> usize {
        self.config
            .tenant_pinned_limits
            .get(&tenant)
            .copied()
            .unwrap_or_else(|| {
                (pinned_capacity as f64 * self.config.tenant_pinned_share).floor() as usize
            })
            .min(pinned_capacity)
    }

    /// Blocks demanded by the reserved classes: held, plus `waiting` as reported.
    #[must_use]
    pub fn reserved_demand(&self, waiting: &[kvc_core::ClassBlocks]) -> usize {
        let held: usize = self
            .classes
            .iter()
            .enumerate()
            .filter(|&(i, _)| self.is_reserved(QosClass(i as u8)))
            .map(|(_, c)| c.held.total())
            .sum();
        let wanted: usize = waiting
            .iter()
            .filter(|w| self.is_reserved(w.class))
            .map(|w| w.blocks)
            .sum();
        held + wanted
    }

    /// The soft pins.
    #[must_use]
    pub const fn soft_pins(&self) -> &SoftPins {
        &self.soft
    }

    /// Soft-pins cached blocks (see [`SoftPins::pin`]).
    pub fn pin(&mut self, req: &PinRequest<'_>) -> Result<PinGrant, PinError> {
        self.soft.pin(req)
    }

    /// Removes a soft pin (see [`SoftPins::unpin`]).
    pub fn unpin(&mut self, id: PinId, now_ms: u64) -> Result<Vec<RetentionUpdate>, UnpinError> {
        self.soft.unpin(id, now_ms)
    }

    fn grant(&mut self, req: &PlaceRequest, blocks: RegionBlocks, route: Route) -> Placement {
        let hold = self.seqs.entry(req.seq).or_insert(SeqHold {
            tenant: req.tenant,
            class: req.class,
            held: RegionBlocks::default(),
        });
        let was_empty = hold.held.total() == 0;
        hold.held.pinned += blocks.pinned;
        hold.held.dynamic += blocks.dynamic;
        // A running sequence keeps the tenant and class it started with.
        let (tenant, class) = (hold.tenant, hold.class);
        let c = &mut self.classes[class.index()];
        c.held.pinned += blocks.pinned;
        c.held.dynamic += blocks.dynamic;
        if was_empty {
            c.running += 1;
        }
        if blocks.pinned > 0 {
            *self.tenant_pinned.entry(tenant).or_default() += blocks.pinned;
        }
        self.stats.allocations += 1;
        match route {
            Route::Borrowed => self.stats.borrowed += 1,
            Route::OverQuota => self.stats.over_quota += 1,
            _ => {}
        }
        Placement::Allocate { blocks, route }
    }

    fn wait(&mut self, reason: WaitReason) -> Placement {
        self.stats.waits += 1;
        Placement::Wait { reason }
    }

    fn refuse(&mut self, reason: Refusal) -> Placement {
        self.stats.refusals += 1;
        Placement::Refuse { reason }
    }

    fn exhausted(&mut self, class: QosClass) -> Placement {
        match self.config.on_exhausted {
            OnExhausted::Queue => self.wait(WaitReason::Exhausted),
            OnExhausted::PreemptLowest => {
                let victim = (class.index() + 1..self.classes.len())
                    .rev()
                    .find(|&i| self.classes[i].held.dynamic > 0);
                match victim {
                    Some(i) => {
                        self.stats.preemptions += 1;
                        Placement::PreemptLowest {
                            victim: QosClass(i as u8),
                        }
                    }
                    None => self.wait(WaitReason::Exhausted),
                }
            }
            OnExhausted::Downgrade => {
                let lowest = self.config.classes.lowest();
                let state = &mut self.classes[lowest.index()];
                if lowest != class && state.running > 0 {
                    // Halve the cap when the current one is already met and pressure remains.
                    let max_running = match state.cap {
                        Some(cap) if state.running > cap => cap,
                        _ => state.running / 2,
                    };
                    state.cap = Some(max_running);
                    self.stats.downgrades += 1;
                    Placement::Downgrade {
                        class: lowest,
                        max_running,
                    }
                } else {
                    self.wait(WaitReason::Exhausted)
                }
            }
        }
    }

    fn loosen_caps(&mut self, pool: &PoolView) {
        let recovered = pool.dynamic_free as f64
            >= pool.dynamic_capacity as f64 * self.config.recover_free_fraction;
        if !recovered {
            return;
        }
        for c in &mut self.classes {
            if let Some(cap) = c.cap {
                c.cap = if c.running < cap { None } else { Some(cap + 1) };
            }
        }
    }
}

impl PinPolicy for PinningPolicy {
    fn place(&mut self, req: &PlaceRequest, pool: &PoolView) -> Placement {
        if !self.config.classes.contains(req.class) {
            return self.refuse(Refusal::UnknownClass);
        }
        let running = self.seqs.get(&req.seq);
        // A running sequence keeps the class it started with.
        let class = running.map_or(req.class, |s| s.class);
        let tenant = running.map_or(req.tenant, |s| s.tenant);
        let is_new = running.is_none_or(|s| s.held.total() == 0);
        if req.blocks == 0 {
            return Placement::Allocate {
                blocks: RegionBlocks::default(),
                route: Route::Normal,
            };
        }
        if is_new
            && let Some(cap) = self.classes[class.index()].cap
            && self.classes[class.index()].running >= cap
        {
            return self.wait(WaitReason::Capped);
        }
        if self.is_reserved(class) {
            if req.blocks > pool.total() {
                return self.refuse(Refusal::Impossible);
            }
            let limit = self.tenant_pinned_limit(tenant, pool.pinned_capacity);
            let quota_left = limit.saturating_sub(self.tenant_pinned(tenant));
            let pinned = req.blocks.min(pool.pinned_free).min(quota_left);
            let rest = req.blocks - pinned;
            if rest == 0 {
                return self.grant(req, RegionBlocks { pinned, dynamic: 0 }, Route::Normal);
            }
            let quota_bound = quota_left < req.blocks.min(pool.pinned_free);
            if quota_bound && self.config.over_quota == OverQuota::Refuse {
                return self.refuse(Refusal::TenantOverQuota);
            }
            if pool.dynamic_free >= rest {
                let route = if quota_bound {
                    Route::OverQuota
                } else {
                    Route::Borrowed
                };
                return self.grant(
                    req,
                    RegionBlocks {
                        pinned,
                        dynamic: rest,
                    },
                    route,
                );
            }
            self.exhausted(class)
        } else {
            if req.blocks > pool.dynamic_capacity {
                return self.refuse(Refusal::Impossible);
            }
            if pool.dynamic_free >= req.blocks {
                return self.grant(
                    req,
                    RegionBlocks {
                        pinned: 0,
                        dynamic: req.blocks,
                    },
                    Route::Normal,
                );
            }
            self.exhausted(class)
        }
    }

    fn release(&mut self, seq: SeqId, blocks: RegionBlocks) -> Result<(), PinReleaseError> {
        let hold = self
            .seqs
            .get_mut(&seq)
            .ok_or(PinReleaseError::UnknownSeq { seq })?;
        if blocks.pinned > hold.held.pinned || blocks.dynamic > hold.held.dynamic {
            return Err(PinReleaseError::MoreThanHeld {
                seq,
                returned: blocks,
                held: hold.held,
            });
        }
        hold.held.pinned -= blocks.pinned;
        hold.held.dynamic -= blocks.dynamic;
        let (tenant, class, done) = (hold.tenant, hold.class, hold.held.total() == 0);
        let c = &mut self.classes[class.index()];
        // Every block counted for the sequence was counted for its class and tenant too.
        c.held.pinned -= blocks.pinned;
        c.held.dynamic -= blocks.dynamic;
        if done {
            c.running -= 1;
            self.seqs.remove(&seq);
        }
        if blocks.pinned > 0
            && let Some(t) = self.tenant_pinned.get_mut(&tenant)
        {
            *t -= blocks.pinned;
            if *t == 0 {
                self.tenant_pinned.remove(&tenant);
            }
        }
        Ok(())
    }

    fn tick(&mut self, sample: &LoadSample<'_>) -> Resize {
        self.loosen_caps(&sample.pool);
        let demand = self.reserved_demand(sample.waiting);
        let decision = self
            .config
            .reserve
            .decide(sample.now_ms, demand, &sample.pool);
        if decision != Resize::Hold {
            self.stats.resizes += 1;
        }
        decision
    }

    fn retention(&self, block_hash: u64, now_ms: u64) -> Retention {
        self.soft.retention(block_hash, now_ms)
    }

    fn expire(&mut self, now_ms: u64, changed: &mut Vec<RetentionUpdate>) {
        self.soft.expire(now_ms, changed);
    }

    /// Only the reserved classes: a lower class may not even reuse a cached pinned block.
    fn may_hold_pinned(&self, class: QosClass) -> bool {
        self.is_reserved(class)
    }
}
