//! Soft prefix pins: raise the retention priority of cached blocks for a while, under a budget.
//!
//! A pin names blocks by the caller's block (or prefix) hashes, directly or as a token range of
//! a chain of block hashes, with a priority 0–100 and a time to live. While it lives, those
//! blocks report that priority with the pin's expiry as `until`; at expiry (or `unpin`) they fall
//! back to the next live pin's priority or to [`Retention::DEFAULT`]. Pins are soft: the prefix
//! cache may still evict pinned blocks, last. Every pin has a finite TTL (at most
//! [`SoftPinConfig::max_ttl_ms`]) and its bytes count against a global budget and the tenant's
//! share of it; a pin over either is a typed error, never silently accepted.
//!
//! Accounting is per pin: a block named by two live pins is charged twice. That over-counts
//! shared blocks but keeps every charge tied to one pin, so `unpin` and expiry give back exactly
//! what was taken and the budget can never be exceeded.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use kvc_core::{Retention, RetentionUpdate, TenantId};
use smallvec::SmallVec;
use thiserror::Error;

/// A live soft pin.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PinId(pub u64);

impl std::fmt::Display for PinId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pin#{}", self.0)
    }
}

/// Which cached blocks a pin covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinTarget<'a> {
    /// These block (or prefix) hashes.
    Blocks(&'a [u64]),
    /// Tokens `start..end` of a prefix whose full blocks have the chained hashes `chain`
    /// (block `i` holds tokens `i * block_size .. (i + 1) * block_size`): every block that holds
    /// a token of the range.
    TokenRange {
        /// The chained block hashes of the prefix, first block first.
        chain: &'a [u64],
        /// Tokens per block.
        block_size: u32,
        /// First token pinned.
        start: u64,
        /// One past the last token pinned.
        end: u64,
    },
}

/// A pin request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinRequest<'a> {
    /// Who pins (charged against its share of the budget).
    pub tenant: TenantId,
    /// The blocks.
    pub target: PinTarget<'a>,
    /// Retention priority while pinned, 0–100.
    pub priority: u8,
    /// How long the pin lives (ms); 1 ..= the configured maximum.
    pub ttl_ms: u64,
    /// The caller's clock (ms).
    pub now_ms: u64,
}

/// Why a pin was refused. Nothing was pinned.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PinError {
    /// Priority above 100.
    #[error("pin priority {priority} is above {max}", max = Retention::MAX_PRIORITY)]
    InvalidPriority {
        /// The priority given.
        priority: u8,
    },
    /// A TTL of zero, or above the maximum: pins are never unbounded.
    #[error("pin TTL {ttl_ms} ms is outside 1..={max_ttl_ms} ms")]
    InvalidTtl {
        /// The TTL given.
        ttl_ms: u64,
        /// The longest TTL allowed.
        max_ttl_ms: u64,
    },
    /// The target names no block.
    #[error("the pin covers no block")]
    Empty,
    /// A token range with a zero block size, an empty range, or one beyond the chain.
    #[error("token range {start}..{end} is not within {blocks} blocks of {block_size} tokens")]
    BadRange {
        /// First token.
        start: u64,
        /// One past the last token.
        end: u64,
        /// Blocks in the chain.
        blocks: usize,
        /// Tokens per block.
        block_size: u32,
    },
    /// The pin would take the total of pinned bytes over the budget.
    #[error(
        "pin of {requested_bytes} B over the soft-pin budget: {used_bytes} of {budget_bytes} B in use"
    )]
    OverBudget {
        /// Bytes the pin needs.
        requested_bytes: u64,
        /// Bytes pinned now.
        used_bytes: u64,
        /// The budget.
        budget_bytes: u64,
    },
    /// The pin would take the tenant over its share of the budget.
    #[error(
        "pin of {requested_bytes} B over {tenant}'s soft-pin share: {used_bytes} of {limit_bytes} B in use"
    )]
    TenantOverBudget {
        /// The tenant.
        tenant: TenantId,
        /// Bytes the pin needs.
        requested_bytes: u64,
        /// Bytes the tenant has pinned now.
        used_bytes: u64,
        /// The tenant's share.
        limit_bytes: u64,
    },
}

/// Why an unpin failed. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UnpinError {
    /// No live pin has this id (never issued, already unpinned, or expired and collected).
    #[error("{pin} is not a live pin")]
    NotPinned {
        /// The id given.
        pin: PinId,
    },
}

/// Why a soft-pin configuration was refused.
#[derive(Clone, Debug, PartialEq, Error)]
#[non_exhaustive]
pub enum SoftPinConfigError {
    /// A fraction outside 0..=1 (or not a number).
    #[error("{what} must be in 0..=1, got {value}")]
    BadFraction {
        /// The setting.
        what: &'static str,
        /// The value given.
        value: f64,
    },
    /// Blocks of zero bytes.
    #[error("bytes per block must be at least 1")]
    ZeroBlockBytes,
    /// A maximum TTL of zero.
    #[error("the maximum pin TTL must be at least 1 ms")]
    ZeroMaxTtl,
}

/// Settings of [`SoftPins`].
#[derive(Clone, Debug, PartialEq)]
pub struct SoftPinConfig {
    /// Bytes of one KV block (`KvLayout::bytes_per_block`).
    pub bytes_per_block: u64,
    /// Cap on the bytes of all live pins together.
    pub budget_bytes: u64,
    /// Each tenant's cap, as a fraction of `budget_bytes` (default 1: no per-tenant cap).
    pub tenant_share: f64,
    /// Per-tenant caps in bytes, overriding `tenant_share`.
    pub tenant_limits: HashMap<TenantId, u64>,
    /// The longest TTL a pin may ask for (ms; default one hour).
    pub max_ttl_ms: u64,
}

impl SoftPinConfig {
    /// A budget of `budget_fraction` (0..=1) of a pool of `pool_blocks` blocks of
    /// `bytes_per_block` bytes.
    pub fn new(
        bytes_per_block: u64,
        pool_blocks: usize,
        budget_fraction: f64,
    ) -> Result<Self, SoftPinConfigError> {
        if bytes_per_block == 0 {
            return Err(SoftPinConfigError::ZeroBlockBytes);
        }
        if budget_fraction.is_nan() || !(0.0..=1.0).contains(&budget_fraction) {
            return Err(SoftPinConfigError::BadFraction {
                what: "soft-pin budget fraction",
                value: budget_fraction,
            });
        }
        let pool_bytes = bytes_per_block.saturating_mul(pool_blocks as u64);
        Ok(Self {
            bytes_per_block,
            budget_bytes: (pool_bytes as f64 * budget_fraction).floor() as u64,
            tenant_share: 1.0,
            tenant_limits: HashMap::new(),
            max_ttl_ms: 3_600_000,
        })
    }

    /// Caps every tenant at `share` (0..=1) of the budget.
    pub fn tenant_share(mut self, share: f64) -> Result<Self, SoftPinConfigError> {
        if share.is_nan() || !(0.0..=1.0).contains(&share) {
            return Err(SoftPinConfigError::BadFraction {
                what: "tenant soft-pin share",
                value: share,
            });
        }
        self.tenant_share = share;
        Ok(self)
    }

    /// Caps one tenant at `bytes`, whatever the share.
    #[must_use]
    pub fn tenant_limit(mut self, tenant: TenantId, bytes: u64) -> Self {
        self.tenant_limits.insert(tenant, bytes);
        self
    }

    /// Sets the longest TTL a pin may ask for.
    pub fn max_ttl_ms(mut self, ms: u64) -> Result<Self, SoftPinConfigError> {
        if ms == 0 {
            return Err(SoftPinConfigError::ZeroMaxTtl);
        }
        self.max_ttl_ms = ms;
        Ok(self)
    }

    /// The cap on `tenant`'s pinned bytes.
    #[must_use]
    pub fn limit_of(&self, tenant: TenantId) -> u64 {
        self.tenant_limits.get(&tenant).copied().unwrap_or_else(|| {
            ((self.budget_bytes as f64 * self.tenant_share).floor() as u64).min(self.budget_bytes)
        })
    }
}

/// A granted pin: its id and the retentions to push to the prefix cache.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "the retention updates must reach the prefix cache"]
pub struct PinGrant {
    /// The new pin, for `unpin`.
    pub id: PinId,
    /// When it expires (ms).
    pub until: u64,
    /// Bytes it takes from the budget.
    pub bytes: u64,
    /// Retentions that changed: the pinned blocks, and blocks of pins that expired meanwhile.
    pub updates: Vec<RetentionUpdate>,
}

#[derive(Clone, Debug)]
struct Pin {
    tenant: TenantId,
    priority: u8,
    until: u64,
    bytes: u64,
    hashes: Box<[u64]>,
}

/// The soft pins of a pool: live pins, the index from block hash to pins, and budgets.
///
/// ```
/// use kvc_pin::{Retention, TenantId};
/// use kvc_pin::{PinRequest, PinTarget, SoftPinConfig, SoftPins};
///
/// // Blocks of 2 MiB, a pool of 1 000 blocks, 5% of it for pins: 50 blocks.
/// let mut pins = SoftPins::new(SoftPinConfig::new(2 << 20, 1_000, 0.05)?);
/// let system_prompt = [0xa1, 0xb2, 0xc3];
/// let grant = pins.pin(&PinRequest {
///     tenant: TenantId(7),
///     target: PinTarget::Blocks(&system_prompt),
///     priority: 90,
///     ttl_ms: 60_000,
///     now_ms: 0,
/// })?;
/// assert_eq!(grant.updates.len(), 3);
/// assert_eq!(pins.retention(0xb2, 1_000).priority, 90);
/// assert_eq!(pins.retention(0xb2, 60_000), Retention::DEFAULT); // expired
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct SoftPins {
    config: SoftPinConfig,
    pins: HashMap<PinId, Pin>,
    by_hash: HashMap<u64, SmallVec<[PinId; 2]>>,
    tenant_used: HashMap<TenantId, u64>,
    used: u64,
    expiry: BinaryHeap<Reverse<(u64, PinId)>>,
    next_id: u64,
    /// Updates of pins collected by a `pin` call that then failed, handed out by the next call.
    pending: Vec<RetentionUpdate>,
}

impl SoftPins {
    /// No pins yet.
    #[must_use]
    pub fn new(config: SoftPinConfig) -> Self {
        Self {
            config,
            pins: HashMap::new(),
            by_hash: HashMap::new(),
            tenant_used: HashMap::new(),
            used: 0,
            expiry: BinaryHeap::new(),
            next_id: 0,
            pending: Vec::new(),
        }
    }

    /// The settings.
    #[must_use]
    pub const fn config(&self) -> &SoftPinConfig {
        &self.config
    }

    /// Bytes held by live pins (including expired ones not yet collected by
    /// [`expire`](Self::expire)).
    #[must_use]
    pub const fn used_bytes(&self) -> u64 {
        self.used
    }

    /// Bytes held by `tenant`'s pins.
    #[must_use]
    pub fn tenant_bytes(&self, tenant: TenantId) -> u64 {
        self.tenant_used.get(&tenant).copied().unwrap_or(0)
    }

    /// Live (uncollected) pins.
    #[must_use]
    pub fn len(&self) -> usize {
        self.pins.len()
    }

    /// Whether there is no pin.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pins.is_empty()
    }

    /// Pins blocks. Expired pins are collected first, so their bytes count as free.
    pub fn pin(&mut self, req: &PinRequest<'_>) -> Result<PinGrant, PinError> {
        if req.priority > Retention::MAX_PRIORITY {
            return Err(PinError::InvalidPriority {
                priority: req.priority,
            });
        }
        if req.ttl_ms == 0 || req.ttl_ms > self.config.max_ttl_ms {
            return Err(PinError::InvalidTtl {
                ttl_ms: req.ttl_ms,
                max_ttl_ms: self.config.max_ttl_ms,
            });
        }
        let mut hashes: Vec<u64> = target_hashes(&req.target)?.to_vec();
        hashes.sort_unstable();
        hashes.dedup();
        if hashes.is_empty() {
            return Err(PinError::Empty);
        }
        // Collect expired pins first so their bytes count as free. Their updates wait in
        // `pending` until this call succeeds or the next `expire` hands them out.
        let mut pending = std::mem::take(&mut self.pending);
        self.expire(req.now_ms, &mut pending);
        self.pending = pending;

        let bytes = (hashes.len() as u64).saturating_mul(self.config.bytes_per_block);
        if self.used.saturating_add(bytes) > self.config.budget_bytes {
            return Err(PinError::OverBudget {
                requested_bytes: bytes,
                used_bytes: self.used,
                budget_bytes: self.config.budget_bytes,
            });
        }
        let tenant_used = self.tenant_bytes(req.tenant);
        let limit = self.config.limit_of(req.tenant);
        if tenant_used.saturating_add(bytes) > limit {
            return Err(PinError::TenantOverBudget {
                tenant: req.tenant,
                requested_bytes: bytes,
                used_bytes: tenant_used,
                limit_bytes: limit,
            });
        }

        let id = PinId(self.next_id);
        self.next_id += 1;
        let until = req.now_ms.saturating_add(req.ttl_ms);
        for &h in &hashes {
            self.by_hash.entry(h).or_default().push(id);
        }
        self.pins.insert(
            id,
            Pin {
                tenant: req.tenant,
                priority: req.priority,
                until,
                bytes,
                hashes: hashes.into_boxed_slice(),
            },
        );
        self.used += bytes;
        *self.tenant_used.entry(req.tenant).or_default() += bytes;
        self.expiry.push(Reverse((until, id)));
        let mut updates = std::mem::take(&mut self.pending);
        let pin = &self.pins[&id];
        updates.extend(pin.hashes.iter().map(|&h| RetentionUpdate {
            block_hash: h,
            retention: self.retention(h, req.now_ms),
        }));
        Ok(PinGrant {
            id,
            until,
            bytes,
            updates,
        })
    }

    /// Removes a pin before its expiry; returns the retentions of its blocks from now on.
    pub fn unpin(&mut self, id: PinId, now_ms: u64) -> Result<Vec<RetentionUpdate>, UnpinError> {
        let pin = self.remove(id).ok_or(UnpinError::NotPinned { pin: id })?;
        let mut updates = Vec::with_capacity(pin.hashes.len());
        updates.extend(pin.hashes.iter().map(|&h| RetentionUpdate {
            block_hash: h,
            retention: self.retention(h, now_ms),
        }));
        Ok(updates)
    }

    /// Collects pins whose TTL ran out by `now_ms`, giving back their bytes, and appends the
    /// retentions of their blocks from now on.
    pub fn expire(&mut self, now_ms: u64, changed: &mut Vec<RetentionUpdate>) {
        changed.append(&mut self.pending);
        while let Some(&Reverse((until, id))) = self.expiry.peek() {
            if until > now_ms {
                break;
            }
            self.expiry.pop();
            // Unpinned pins leave their heap entry behind: skip it.
            if let Some(pin) = self.remove(id) {
                changed.extend(pin.hashes.iter().map(|&h| RetentionUpdate {
                    block_hash: h,
                    retention: self.retention(h, now_ms),
                }));
            }
        }
    }

    /// The retention of a block at `now_ms`: the highest priority among the live pins that
    /// cover it (the latest expiry among equals), or the default.
    #[must_use]
    pub fn retention(&self, block_hash: u64, now_ms: u64) -> Retention {
        let Some(ids) = self.by_hash.get(&block_hash) else {
            return Retention::DEFAULT;
        };
        ids.iter()
            .filter_map(|id| self.pins.get(id))
            .filter(|p| p.until > now_ms)
            .map(|p| (p.priority, p.until))
            .max()
            .map_or(Retention::DEFAULT, |(priority, until)| Retention {
                priority,
                until: Some(until),
            })
    }

    /// The pins of a tenant, with their expiry.
    pub fn pins_of(&self, tenant: TenantId) -> impl Iterator<Item = (PinId, u64)> + '_ {
        self.pins
            .iter()
            .filter(move |(_, p)| p.tenant == tenant)
            .map(|(&id, p)| (id, p.until))
    }

    fn remove(&mut self, id: PinId) -> Option<Pin> {
        let pin = self.pins.remove(&id)?;
        for h in &pin.hashes {
            if let Some(ids) = self.by_hash.get_mut(h) {
                ids.retain(|x| *x != id);
                if ids.is_empty() {
                    self.by_hash.remove(h);
                }
            }
        }
        self.used -= pin.bytes;
        if let Some(t) = self.tenant_used.get_mut(&pin.tenant) {
            *t -= pin.bytes;
            if *t == 0 {
                self.tenant_used.remove(&pin.tenant);
            }
        }
        Some(pin)
    }
}

fn target_hashes<'a>(target: &PinTarget<'a>) -> Result<&'a [u64], PinError> {
    match *target {
        PinTarget::Blocks(h) => Ok(h),
        PinTarget::TokenRange {
            chain,
            block_size,
            start,
            end,
        } => {
            let bad = PinError::BadRange {
                start,
                end,
                blocks: chain.len(),
                block_size,
            };
            if block_size == 0 || start >= end {
                return Err(bad);
            }
            let bs = u64::from(block_size);
            let first = start / bs;
            let last = end.div_ceil(bs);
            if last > chain.len() as u64 {
                return Err(bad);
            }
            // Both within `chain.len()`, so they fit in usize.
            Ok(&chain[first as usize..last as usize])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 1 << 20;

    fn pins(budget_blocks: usize) -> SoftPins {
        // Pool of 100 blocks; the budget is budget_blocks of them.
        SoftPins::new(SoftPinConfig::new(BLOCK, 100, budget_blocks as f64 / 100.0).unwrap())
    }

    fn req(tenant: u32, hashes: &[u64], priority: u8, ttl: u64, now: u64) -> PinRequest<'_> {
        PinRequest {
            tenant: TenantId(tenant),
            target: PinTarget::Blocks(hashes),
            priority,
            ttl_ms: ttl,
            now_ms: now,
        }
    }

    #[test]
    fn over_budget_is_an_error_and_pins_nothing() {
        let mut p = pins(4);
        let g = p.pin(&req(1, &[1, 2, 3], 80, 100, 0)).unwrap();
        assert_eq!(g.bytes, 3 * BLOCK);
        assert_eq!(
            p.pin(&req(2, &[4, 5], 80, 100, 0)),
            Err(PinError::OverBudget {
                requested_bytes: 2 * BLOCK,
                used_bytes: 3 * BLOCK,
                budget_bytes: 4 * BLOCK
            })
        );
        assert_eq!(p.retention(4, 0), Retention::DEFAULT);
        assert_eq!(p.used_bytes(), 3 * BLOCK);
        // Once the first pin expires its bytes are free again.
        let g2 = p.pin(&req(2, &[4, 5], 80, 100, 100)).unwrap();
        assert_eq!(p.used_bytes(), 2 * BLOCK);
        assert!(g2.updates.contains(&RetentionUpdate {
            block_hash: 1,
            retention: Retention::DEFAULT
        }));
    }

    #[test]
    fn invalid_pins_are_typed_errors() {
        let mut p = pins(10);
        assert_eq!(
            p.pin(&req(1, &[1], 101, 10, 0)),
            Err(PinError::InvalidPriority { priority: 101 })
        );
        assert!(matches!(
            p.pin(&req(1, &[1], 50, 0, 0)),
            Err(PinError::InvalidTtl { ttl_ms: 0, .. })
        ));
        assert!(matches!(
            p.pin(&req(1, &[1], 50, u64::MAX, 0)),
            Err(PinError::InvalidTtl { .. })
        ));
        assert_eq!(p.pin(&req(1, &[], 50, 10, 0)), Err(PinError::Empty));
        assert!(p.is_empty());
    }

    #[test]
    fn tenant_share_bounds_each_tenant() {
        let cfg = SoftPinConfig::new(BLOCK, 100, 0.10)
            .unwrap()
            .tenant_share(0.5)
            .unwrap()
            .tenant_limit(TenantId(9), BLOCK);
        let mut p = SoftPins::new(cfg);
        let _ = p.pin(&req(1, &[1, 2, 3, 4, 5], 60, 100, 0)).unwrap();
        assert_eq!(
            p.pin(&req(1, &[6], 60, 100, 0)),
            Err(PinError::TenantOverBudget {
                tenant: TenantId(1),
                requested_bytes: BLOCK,
                used_bytes: 5 * BLOCK,
                limit_bytes: 5 * BLOCK
            })
        );
        // Tenant 2 still has its half.
        let _ = p.pin(&req(2, &[6, 7], 60, 100, 0)).unwrap();
        assert!(matches!(
            p.pin(&req(9, &[8, 9], 60, 100, 0)),
            Err(PinError::TenantOverBudget { limit_bytes, .. }) if limit_bytes == BLOCK
        ));
        assert_eq!(p.tenant_bytes(TenantId(2)), 2 * BLOCK);
    }

    #[test]
    fn overlapping_pins_take_the_highest_live_priority_and_decay() {
        let mut p = pins(10);
        let a = p.pin(&req(1, &[7], 90, 100, 0)).unwrap();
        let b = p.pin(&req(2, &[7], 60, 500, 0)).unwrap();
        assert_eq!(
            p.retention(7, 50),
            Retention {
                priority: 90,
                until: Some(100)
            }
        );
        let mut changed = Vec::new();
        p.expire(100, &mut changed);
        assert_eq!(
            changed,
            vec![RetentionUpdate {
                block_hash: 7,
                retention: Retention {
                    priority: 60,
                    until: Some(500)
                }
            }]
        );
        assert_eq!(p.unpin(a.id, 100), Err(UnpinError::NotPinned { pin: a.id }));
        let back = p.unpin(b.id, 200).unwrap();
        assert_eq!(back[0].retention, Retention::DEFAULT);
        assert_eq!(p.used_bytes(), 0);
        assert!(p.is_empty());
        // The heap entry of the unpinned pin is skipped at its expiry time.
        changed.clear();
        p.expire(1_000, &mut changed);
        assert!(changed.is_empty());
    }

    #[test]
    fn token_ranges_cover_the_blocks_holding_their_tokens() {
        let chain = [10, 11, 12, 13];
        let mut p = pins(10);
        let g = p
            .pin(&PinRequest {
                tenant: TenantId(1),
                target: PinTarget::TokenRange {
                    chain: &chain,
                    block_size: 16,
                    start: 20,
                    end: 33,
                },
                priority: 70,
                ttl_ms: 10,
                now_ms: 0,
            })
            .unwrap();
        let pinned: Vec<u64> = g.updates.iter().map(|u| u.block_hash).collect();
        assert_eq!(pinned, vec![11, 12]);
        assert_eq!(g.bytes, 2 * BLOCK);
        let beyond = PinRequest {
            tenant: TenantId(1),
            target: PinTarget::TokenRange {
                chain: &chain,
                block_size: 16,
                start: 0,
                end: 65,
            },
            priority: 70,
            ttl_ms: 10,
            now_ms: 0,
        };
        assert!(matches!(p.pin(&beyond), Err(PinError::BadRange { .. })));
    }
}
