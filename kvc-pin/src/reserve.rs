//! Sizing the pinned region: [`StaticReserve`] (a fixed size), [`AdaptiveReserve`] (a demand
//! percentile over a sliding window plus headroom, with bounds, hysteresis and cool-downs) and
//! [`Reserve`], which holds any of them (or none) so a scheduler can switch by configuration.
//!
//! Every decision moves free blocks only: growing takes at most the dynamic region's free
//! blocks, shrinking gives back at most the pinned region's free blocks, so blocks in use never
//! change region.

use kvc_core::{PoolView, Resize};
use thiserror::Error;

use crate::PercentileWindow;

/// Why a reserve could not be configured.
#[derive(Clone, Debug, PartialEq, Error)]
#[non_exhaustive]
pub enum ReserveError {
    /// A fraction was outside its range (or not a number).
    #[error("{what} must be in {min}..={max}, got {value}")]
    OutOfRange {
        /// The setting.
        what: &'static str,
        /// The value given.
        value: f64,
        /// Smallest allowed.
        min: f64,
        /// Largest allowed.
        max: f64,
    },
    /// The lower bound is above the upper bound.
    #[error("reserve bounds inverted: min {min} > max {max}")]
    InvertedBounds {
        /// Lower bound (blocks).
        min: usize,
        /// Upper bound (blocks).
        max: usize,
    },
    /// The sliding window has no room for an observation.
    #[error("the demand window must span at least 1 ms and 1 sample")]
    EmptyWindow,
    /// The window can never hold the observations the reserve waits for.
    #[error("min_samples {min_samples} is above max_samples {max_samples}")]
    MinSamplesAboveMax {
        /// Observations needed before the reserve follows demand.
        min_samples: usize,
        /// Observations the window holds at most.
        max_samples: usize,
    },
}

/// The step from the pinned capacity `current` towards `target`, limited to free blocks.
fn step_towards(current: usize, target: usize, pool: &PoolView) -> Resize {
    if target > current {
        let blocks = (target - current).min(pool.dynamic_free);
        if blocks == 0 {
            Resize::Hold
        } else {
            Resize::Grow { blocks, target }
        }
    } else if target < current {
        let blocks = (current - target).min(pool.pinned_free);
        if blocks == 0 {
            Resize::Hold
        } else {
            Resize::Shrink { blocks, target }
        }
    } else {
        Resize::Hold
    }
}

fn check_fraction(what: &'static str, value: f64, min: f64, max: f64) -> Result<(), ReserveError> {
    if value.is_nan() || value < min || value > max {
        Err(ReserveError::OutOfRange {
            what,
            value,
            min,
            max,
        })
    } else {
        Ok(())
    }
}

/// How big a static reserve is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StaticSize {
    /// A number of blocks.
    Blocks(usize),
    /// A fraction (0..=1) of the blocks of both regions.
    Fraction(f64),
}

/// A pinned region of fixed size.
///
/// ```
/// use kvc_pin::{PoolView, Resize};
/// use kvc_pin::StaticReserve;
///
/// let reserve = StaticReserve::fraction(0.25)?;
/// let pool = PoolView { pinned_capacity: 0, pinned_free: 0, dynamic_capacity: 100, dynamic_free: 10 };
/// // Aims for 25 blocks but only 10 are free in dynamic: grows by 10 now, the rest later.
/// assert_eq!(reserve.decide(&pool), Resize::Grow { blocks: 10, target: 25 });
/// # Ok::<(), kvc_pin::ReserveError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StaticReserve {
    size: StaticSize,
}

impl StaticReserve {
    /// A reserve of `blocks` blocks.
    #[must_use]
    pub const fn blocks(blocks: usize) -> Self {
        Self {
            size: StaticSize::Blocks(blocks),
        }
    }

    /// A reserve of `fraction` (0..=1) of the pool.
    pub fn fraction(fraction: f64) -> Result<Self, ReserveError> {
        check_fraction("static reserve fraction", fraction, 0.0, 1.0)?;
        Ok(Self {
            size: StaticSize::Fraction(fraction),
        })
    }

    /// The configured size.
    #[must_use]
    pub const fn size(&self) -> StaticSize {
        self.size
    }

    /// The pinned capacity aimed for in a pool of `total` blocks.
    #[must_use]
    pub fn target(&self, total: usize) -> usize {
        match self.size {
            StaticSize::Blocks(b) => b.min(total),
            StaticSize::Fraction(f) => ((total as f64 * f).floor() as usize).min(total),
        }
    }

    /// The step towards the target from the regions as they are.
    #[must_use = "a resize decision must be applied to the allocator"]
    pub fn decide(&self, pool: &PoolView) -> Resize {
        step_towards(pool.pinned_capacity, self.target(pool.total()), pool)
    }
}

/// Settings of an [`AdaptiveReserve`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveConfig {
    /// The demand quantile the reserve follows (0..=1; default 0.99, the p99).
    pub percentile: f64,
    /// Headroom as a fraction of that quantile (default 0.10).
    pub headroom_fraction: f64,
    /// Headroom in blocks, added after the fraction (default 0).
    pub headroom_blocks: usize,
    /// The reserve never aims below this (blocks; default 0).
    pub min_blocks: usize,
    /// The reserve never aims above this (blocks; default `usize::MAX`, i.e. the pool).
    pub max_blocks: usize,
    /// Hysteresis: changes smaller than this fraction of the current reserve are ignored
    /// (default 0.05).
    pub hysteresis_fraction: f64,
    /// Hysteresis: changes of at most this many blocks are ignored (default 1).
    pub hysteresis_blocks: usize,
    /// After any change, wait this long before growing again (ms; default 1 000).
    pub grow_cooldown_ms: u64,
    /// After any change, wait this long before shrinking (ms; default 30 000): shrink slowly,
    /// because a burst that returns finds the reserve gone.
    pub shrink_cooldown_ms: u64,
    /// The sliding window of demand observations (ms; default 60 000).
    pub window_ms: u64,
    /// At most this many observations in the window (default 10 000).
    pub max_samples: usize,
    /// The reserve follows demand only once the window holds this many observations (default
    /// 100: a p99 of fewer is the maximum of a handful, and a reserve placed on it can sit at
    /// the edge of the hysteresis band for a long time). Bounds are enforced from the start.
    pub min_samples: usize,
    /// Observations above this many blocks are recorded as this many (the pool size).
    pub max_demand: usize,
}

impl AdaptiveConfig {
    /// The defaults for a pool of `pool_blocks` blocks.
    #[must_use]
    pub const fn new(pool_blocks: usize) -> Self {
        Self {
            percentile: 0.99,
            headroom_fraction: 0.10,
            headroom_blocks: 0,
            min_blocks: 0,
            max_blocks: usize::MAX,
            hysteresis_fraction: 0.05,
            hysteresis_blocks: 1,
            grow_cooldown_ms: 1_000,
            shrink_cooldown_ms: 30_000,
            window_ms: 60_000,
            max_samples: 10_000,
            min_samples: 100,
            max_demand: pool_blocks,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ReserveError> {
        check_fraction("percentile", self.percentile, 0.0, 1.0)?;
        check_fraction("headroom fraction", self.headroom_fraction, 0.0, 100.0)?;
        check_fraction("hysteresis fraction", self.hysteresis_fraction, 0.0, 1.0)?;
        if self.min_blocks > self.max_blocks {
            return Err(ReserveError::InvertedBounds {
                min: self.min_blocks,
                max: self.max_blocks,
            });
        }
        if self.window_ms == 0 || self.max_samples == 0 {
            return Err(ReserveError::EmptyWindow);
        }
        if self.min_samples > self.max_samples {
            return Err(ReserveError::MinSamplesAboveMax {
                min_samples: self.min_samples,
                max_samples: self.max_samples,
            });
        }
        Ok(())
    }
}

/// A pinned region that follows observed demand of the reserved classes.
///
/// Each [`decide`](Self::decide) records one demand observation, then aims for
/// `clamp(pXX(window) × (1 + headroom_fraction) + headroom_blocks, min, max)`. It moves only
/// once the window holds `min_samples` observations, when the gap to the current size exceeds
/// the hysteresis band and the cool-down since the last change has passed; a current size
/// outside the bounds is corrected at once.
///
/// ```
/// use kvc_pin::{PoolView, Resize};
/// use kvc_pin::{AdaptiveConfig, AdaptiveReserve};
///
/// let mut cfg = AdaptiveConfig::new(1_000);
/// cfg.headroom_fraction = 0.0;
/// cfg.min_samples = 1;
/// let mut reserve = AdaptiveReserve::new(cfg)?;
/// let pool = PoolView { pinned_capacity: 0, pinned_free: 0, dynamic_capacity: 1_000, dynamic_free: 1_000 };
/// assert_eq!(reserve.decide(0, 40, &pool), Resize::Grow { blocks: 40, target: 40 });
/// # Ok::<(), kvc_pin::ReserveError>(())
/// ```
#[derive(Clone, Debug)]
pub struct AdaptiveReserve {
    config: AdaptiveConfig,
    window: PercentileWindow,
    last_change_ms: Option<u64>,
}

impl AdaptiveReserve {
    /// A reserve with these settings and an empty window.
    pub fn new(config: AdaptiveConfig) -> Result<Self, ReserveError> {
        config.validate()?;
        Ok(Self {
            window: PercentileWindow::new(config.max_demand, config.window_ms, config.max_samples),
            config,
            last_change_ms: None,
        })
    }

    /// The settings.
    #[must_use]
    pub const fn config(&self) -> &AdaptiveConfig {
        &self.config
    }

    /// The demand window.
    #[must_use]
    pub const fn window(&self) -> &PercentileWindow {
        &self.window
    }

    /// The size the reserve aims for now (before hysteresis and cool-down), in a pool of
    /// `total` blocks.
    #[must_use]
    pub fn target(&self, total: usize) -> usize {
        let c = &self.config;
        let hi = c.max_blocks.min(total);
        let lo = c.min_blocks.min(hi);
        let Some(q) = self.window.percentile(c.percentile) else {
            return lo;
        };
        // Round the headroom up, but not for float noise (100 × 0.1 must give 10, not 11).
        let headroom = ((q as f64 * c.headroom_fraction) - 1e-9).ceil().max(0.0) as usize;
        q.saturating_add(headroom)
            .saturating_add(c.headroom_blocks)
            .clamp(lo, hi)
    }

    /// Records `demand` (blocks held and wanted by the reserved classes) at `now_ms` and decides
    /// the resize.
    #[must_use = "a resize decision must be applied to the allocator"]
    pub fn decide(&mut self, now_ms: u64, demand: usize, pool: &PoolView) -> Resize {
        self.window.push(now_ms, demand);
        let c = &self.config;
        let total = pool.total();
        let current = pool.pinned_capacity;
        let hi = c.max_blocks.min(total);
        let lo = c.min_blocks.min(hi);
        let in_bounds = (lo..=hi).contains(&current);
        let warm = self.window.len() >= c.min_samples;
        // Out of bounds with too few observations to trust: go to the nearest bound only.
        let target = if warm {
            self.target(total)
        } else {
            current.clamp(lo, hi)
        };
        if in_bounds {
            if !warm {
                return Resize::Hold;
            }
            let band = c
                .hysteresis_blocks
                .max((current as f64 * c.hysteresis_fraction).ceil() as usize);
            if target.abs_diff(current) <= band {
                return Resize::Hold;
            }
            if let Some(last) = self.last_change_ms {
                let cooldown = if target > current {
                    c.grow_cooldown_ms
                } else {
                    c.shrink_cooldown_ms
                };
                if now_ms.saturating_sub(last) < cooldown {
                    return Resize::Hold;
                }
            }
        }
        let decision = step_towards(current, target, pool);
        if decision != Resize::Hold {
            self.last_change_ms = Some(now_ms);
        }
        decision
    }
}

/// The reserve sizing a [`PinningPolicy`](crate::PinningPolicy) uses, chosen by configuration.
#[derive(Clone, Debug)]
pub enum Reserve {
    /// No reserve: the pinned region is emptied (as its blocks become free) and stays empty.
    None,
    /// A fixed reserve.
    Static(StaticReserve),
    /// A reserve that follows demand.
    Adaptive(Box<AdaptiveReserve>),
}

impl Reserve {
    /// Records `demand` at `now_ms` (adaptive only) and decides the resize.
    #[must_use = "a resize decision must be applied to the allocator"]
    pub fn decide(&mut self, now_ms: u64, demand: usize, pool: &PoolView) -> Resize {
        match self {
            Reserve::None => step_towards(pool.pinned_capacity, 0, pool),
            Reserve::Static(s) => s.decide(pool),
            Reserve::Adaptive(a) => a.decide(now_ms, demand, pool),
        }
    }

    /// A short name for reports: `none`, `static` or `adaptive`.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Reserve::None => "none",
            Reserve::Static(_) => "static",
            Reserve::Adaptive(_) => "adaptive",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(pinned: usize, pinned_free: usize, dynamic: usize, dynamic_free: usize) -> PoolView {
        PoolView {
            pinned_capacity: pinned,
            pinned_free,
            dynamic_capacity: dynamic,
            dynamic_free,
        }
    }

    #[test]
    fn static_reserve_moves_only_free_blocks() {
        let r = StaticReserve::blocks(30);
        assert_eq!(
            r.decide(&pool(10, 10, 90, 5)),
            Resize::Grow {
                blocks: 5,
                target: 30
            }
        );
        assert_eq!(
            r.decide(&pool(50, 3, 50, 50)),
            Resize::Shrink {
                blocks: 3,
                target: 30
            }
        );
        assert_eq!(r.decide(&pool(50, 0, 50, 50)), Resize::Hold);
        assert_eq!(r.decide(&pool(30, 30, 70, 70)), Resize::Hold);
        assert!(StaticReserve::fraction(1.5).is_err());
        assert!(StaticReserve::fraction(f64::NAN).is_err());
        assert_eq!(StaticReserve::fraction(0.5).unwrap().target(101), 50);
    }

    #[test]
    fn bad_adaptive_settings_are_refused() {
        let mut c = AdaptiveConfig::new(100);
        c.min_blocks = 10;
        c.max_blocks = 5;
        assert_eq!(
            AdaptiveReserve::new(c).unwrap_err(),
            ReserveError::InvertedBounds { min: 10, max: 5 }
        );
        let mut c = AdaptiveConfig::new(100);
        c.percentile = 1.01;
        assert!(matches!(
            AdaptiveReserve::new(c),
            Err(ReserveError::OutOfRange {
                what: "percentile",
                ..
            })
        ));
        let mut c = AdaptiveConfig::new(100);
        c.max_samples = 0;
        assert_eq!(
            AdaptiveReserve::new(c).unwrap_err(),
            ReserveError::EmptyWindow
        );
        let mut c = AdaptiveConfig::new(100);
        c.max_samples = 50;
        assert_eq!(
            AdaptiveReserve::new(c).unwrap_err(),
            ReserveError::MinSamplesAboveMax {
                min_samples: 100,
                max_samples: 50
            }
        );
    }

    #[test]
    fn hysteresis_and_cooldown_hold_small_or_early_changes() {
        let mut c = AdaptiveConfig::new(1_000);
        c.headroom_fraction = 0.0;
        c.hysteresis_fraction = 0.10;
        c.min_samples = 1;
        c.grow_cooldown_ms = 100;
        c.shrink_cooldown_ms = 1_000;
        c.window_ms = 50;
        let mut r = AdaptiveReserve::new(c).unwrap();
        let p = |cap| pool(cap, cap, 1_000 - cap, 1_000 - cap);
        assert_eq!(
            r.decide(0, 100, &p(0)),
            Resize::Grow {
                blocks: 100,
                target: 100
            }
        );
        // Within 10% of 100: held.
        assert_eq!(r.decide(200, 108, &p(100)), Resize::Hold);
        // A jump, but within the grow cool-down of the change at t=0? No: 300 ms later. Grows.
        assert_eq!(
            r.decide(300, 200, &p(100)),
            Resize::Grow {
                blocks: 100,
                target: 200
            }
        );
        // Another jump 50 ms later: inside the 100 ms grow cool-down.
        assert_eq!(r.decide(350, 400, &p(200)), Resize::Hold);
        // Demand falls: the shrink waits for its 1 s cool-down after the change at t=300.
        assert_eq!(r.decide(1_000, 10, &p(200)), Resize::Hold);
        assert_eq!(
            r.decide(1_400, 10, &p(200)),
            Resize::Shrink {
                blocks: 190,
                target: 10
            }
        );
    }

    #[test]
    fn out_of_bounds_reserve_is_corrected_at_once() {
        let mut c = AdaptiveConfig::new(100);
        c.min_blocks = 20;
        c.max_blocks = 40;
        c.hysteresis_blocks = 50;
        let mut r = AdaptiveReserve::new(c).unwrap();
        let d = r.decide(0, 0, &pool(0, 0, 100, 100));
        assert_eq!(
            d,
            Resize::Grow {
                blocks: 20,
                target: 20
            }
        );
        // Even inside a cool-down, a reserve above the maximum is brought down: to the nearest
        // bound while the window holds fewer than `min_samples` observations.
        let d = r.decide(1, 0, &pool(60, 60, 40, 40));
        assert_eq!(
            d,
            Resize::Shrink {
                blocks: 20,
                target: 40
            }
        );
        assert_eq!(Reserve::Adaptive(Box::new(r)).name(), "adaptive");
    }

    #[test]
    fn no_reserve_empties_the_pinned_region_as_blocks_free_up() {
        let mut r = Reserve::None;
        assert_eq!(
            r.decide(0, 50, &pool(8, 3, 92, 0)),
            Resize::Shrink {
                blocks: 3,
                target: 0
            }
        );
        assert_eq!(r.decide(0, 50, &pool(0, 0, 100, 0)), Resize::Hold);
    }
}
