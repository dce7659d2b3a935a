//! [`RecentHitRate`]: the prefix cache's hit rate over the most recent requests, as an
//! operator's dashboard shows it (the cumulative [`Metrics::hit_rate`] barely moves once a
//! server has run for a while).

use std::collections::VecDeque;

use crate::Metrics;

/// One observation: what a batch of requests (one scheduler step, say) asked and hit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Observation {
    requests: u64,
    query_tokens: u64,
    hit_tokens: u64,
}

/// The hit rate over the last `max_requests` requests.
///
/// Each [`observe`](Self::observe) adds a batch of requests (their count, the prompt tokens
/// they looked up and the tokens the cache covered); batches are dropped oldest first while
/// the requests they hold exceed `max_requests`, but the latest batch always stays, however
/// many requests it holds. A batch with no request and no token is ignored, so idle steps do
/// not push real ones out.
///
/// ```
/// use kvc_reuse::RecentHitRate;
///
/// let mut recent = RecentHitRate::new(5);
/// recent.observe(1, 20, 9);
/// recent.observe(4, 80, 16);
/// assert_eq!(recent.hit_rate(), 0.25); // 25 of 100 tokens
/// recent.observe(1, 10, 2); // 6 requests: the first batch leaves
/// assert_eq!((recent.requests(), recent.query_tokens(), recent.hit_tokens()), (5, 90, 18));
/// assert_eq!(recent.hit_rate(), 0.2);
/// ```
///
/// Fed from a [`PrefixCache`](crate::PrefixCache)'s counters, one step at a time:
///
/// ```
/// use kvc_reuse::{Metrics, PolicyKind, PrefixCache, RecentHitRate};
///
/// let mut cache = PrefixCache::new(16, PolicyKind::Lru);
/// let mut recent = RecentHitRate::new(1_000);
/// let mut last = cache.metrics();
/// // ... a step's lookups ...
/// let _ = cache.lookup(&[], 40, 0);
/// let now = cache.metrics();
/// recent.observe_metrics(&now.since(&last));
/// last = now;
/// assert_eq!((recent.requests(), recent.query_tokens()), (1, 40));
/// # let _ = last;
/// ```
#[derive(Clone, Debug)]
pub struct RecentHitRate {
    max_requests: u64,
    window: VecDeque<Observation>,
    sum: Observation,
}

impl RecentHitRate {
    /// A window of the last `max_requests` requests (0 is taken as 1).
    #[must_use]
    pub fn new(max_requests: u64) -> Self {
        Self {
            max_requests: max_requests.max(1),
            window: VecDeque::new(),
            sum: Observation::default(),
        }
    }

    /// The window's size in requests.
    #[must_use]
    pub const fn max_requests(&self) -> u64 {
        self.max_requests
    }

    /// Adds a batch of `requests` requests that looked up `query_tokens` prompt tokens and
    /// were covered for `hit_tokens` of them, then drops the oldest batches beyond the window.
    pub fn observe(&mut self, requests: u64, query_tokens: u64, hit_tokens: u64) {
        if requests == 0 && query_tokens == 0 && hit_tokens == 0 {
            return;
        }
        let o = Observation {
            requests,
            query_tokens,
            hit_tokens,
        };
        self.window.push_back(o);
        self.sum.requests = self.sum.requests.saturating_add(requests);
        self.sum.query_tokens = self.sum.query_tokens.saturating_add(query_tokens);
        self.sum.hit_tokens = self.sum.hit_tokens.saturating_add(hit_tokens);
        while self.sum.requests > self.max_requests && self.window.len() > 1 {
            if let Some(old) = self.window.pop_front() {
                self.sum.requests -= old.requests;
                self.sum.query_tokens -= old.query_tokens;
                self.sum.hit_tokens -= old.hit_tokens;
            }
        }
    }

    /// [`observe`](Self::observe) of the lookups a [`Metrics`] difference counts (see
    /// [`Metrics::since`]): its queries, query tokens and hit tokens.
    pub fn observe_metrics(&mut self, delta: &Metrics) {
        self.observe(delta.queries, delta.query_tokens, delta.hit_tokens);
    }

    /// Requests in the window.
    #[must_use]
    pub const fn requests(&self) -> u64 {
        self.sum.requests
    }

    /// Prompt tokens the window's requests looked up.
    #[must_use]
    pub const fn query_tokens(&self) -> u64 {
        self.sum.query_tokens
    }

    /// Tokens the cache covered for them.
    #[must_use]
    pub const fn hit_tokens(&self) -> u64 {
        self.sum.hit_tokens
    }

    /// Hit tokens over queried tokens in the window (0 when nothing was queried).
    #[must_use]
    pub fn hit_rate(&self) -> f64 {
        if self.sum.query_tokens == 0 {
            0.0
        } else {
            self.sum.hit_tokens as f64 / self.sum.query_tokens as f64
        }
    }

    /// Forgets every batch (after a cache reset, say).
    pub fn reset(&mut self) {
        self.window.clear();
        self.sum = Observation::default();
    }
}
