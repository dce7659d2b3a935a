//! Seeded generators of Mooncake-format traces for the workload shapes the shipped conversation
//! trace lacks, and a fast block-level hit-rate replay to compare eviction policies on them.
//!
//! Each [`Shape`] is a kind of traffic a prefix cache meets in production:
//! - [`Shape::DocQa`]: questions over a library of documents, a few of them hot (Zipf);
//! - [`Shape::Agents`]: agents looping over tool calls, all behind one long system prompt, each
//!   context growing by the tool output of every step;
//! - [`Shape::OneShot`]: unrelated one-off prompts, no reuse at all;
//! - [`Shape::Scan`]: a hot set of prefixes reused all the time, interrupted by bursts of long
//!   one-off prompts (batch jobs) that flush an LRU cache;
//! - [`Shape::LongThink`]: multi-turn chats whose users think for a long time, so a
//!   conversation's next turn comes after many other requests.
//! - [`Shape::Abandoned`]: chats abandoned more often than continued, each continued one
//!   exactly once after a gap spread over three orders of magnitude: a block reused once is
//!   never reused again, the opposite of chat traffic, where reuse predicts more reuse (a
//!   shape built to mislead policies that learn from continuations, as
//!   [`ReuseOdds`](kvc_reuse::ReuseOdds) does).
//!
//! The traces use the Mooncake convention: one id per 512 prompt tokens, equal ids at the same
//! position mean a shared prefix, and the last block of a prompt is usually partial (a new user
//! message or tool output that the next turn re-renders). Every id is drawn fresh from a
//! counter, so two prompts share exactly the prefixes the generator means them to.
//!
//! [`block_hit_rate`] replays such a trace through a real [`PrefixCache`] with one cache block
//! per Mooncake block (no token synthesis, no hashing of tokens), which is fast enough for
//! tests: it is the same request-at-a-time replay as [`crate::replay`], at 512-token
//! granularity.

use kvc_core::BlockId;
use kvc_reuse::{BlockHash, EvictionPolicy, OfferRole, PolicyKind, PrefixCache};
use serde::Serialize;
use thiserror::Error;

use crate::trace::{MAX_REQUESTS, MOONCAKE_BLOCK_TOKENS, TraceRequest};

/// Why a workload could not be generated.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// More requests than a trace may hold ([`MAX_REQUESTS`]).
    #[error("{requests} requests is over the limit of {max} per trace")]
    TooManyRequests {
        /// Requests asked for.
        requests: usize,
        /// The limit.
        max: usize,
    },
}

/// A workload shape; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[non_exhaustive]
pub enum Shape {
    /// Document QA over a few hot documents.
    DocQa,
    /// Agents looping over tool calls behind a long shared system prompt.
    Agents,
    /// One-shot requests with no reuse.
    OneShot,
    /// A hot set interrupted by scans that flush an LRU.
    Scan,
    /// Multi-turn chats with long think times.
    LongThink,
    /// Chats abandoned more often than continued, continued at most once.
    Abandoned,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 6] = [
        Shape::DocQa,
        Shape::Agents,
        Shape::OneShot,
        Shape::Scan,
        Shape::LongThink,
        Shape::Abandoned,
    ];

    /// The name used on command lines and in reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::DocQa => "doc-qa",
            Self::Agents => "agents",
            Self::OneShot => "one-shot",
            Self::Scan => "scan",
            Self::LongThink => "long-think",
            Self::Abandoned => "abandoned",
        }
    }

    /// The shape named `name`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// SplitMix64: a small, seeded, platform-independent generator.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % u64::from(hi - lo + 1)) as u32
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An index in `0..n` drawn with probability proportional to `1 / (i + 1)` (Zipf, s = 1).
    fn zipf(&mut self, n: usize) -> usize {
        let total: f64 = (1..=n).map(|i| 1.0 / i as f64).sum();
        let mut x = self.unit() * total;
        for i in 0..n {
            x -= 1.0 / (i + 1) as f64;
            if x < 0.0 {
                return i;
            }
        }
        n - 1
    }
}

/// Builds requests with fresh ids and advancing timestamps.
struct Builder {
    rng: Rng,
    next_id: u32,
    now_ms: u64,
    out: Vec<TraceRequest>,
}

impl Builder {
    fn new(seed: u64, requests: usize) -> Self {
        Self {
            rng: Rng(seed ^ 0x6b76_632d_776f_726b),
            next_id: 0,
            now_ms: 0,
            out: Vec::with_capacity(requests),
        }
    }

    fn fresh(&mut self, n: u32) -> Vec<u32> {
        let ids = (self.next_id..self.next_id + n).collect();
        self.next_id += n;
        ids
    }

    /// Emits a request whose prompt is `prefix` followed by a partial block of new tokens.
    fn emit(&mut self, prefix: &[u32]) {
        let tail_tokens = self.rng.range(64, MOONCAKE_BLOCK_TOKENS - 1);
        let tail = self.fresh(1);
        let mut hash_ids = prefix.to_vec();
        hash_ids.extend(tail);
        self.now_ms += u64::from(self.rng.range(1, 400));
        self.out.push(TraceRequest {
            timestamp_ms: self.now_ms,
            input_length: prefix.len() as u32 * MOONCAKE_BLOCK_TOKENS + tail_tokens,
            output_length: self.rng.range(32, 512),
            hash_ids,
        });
    }
}

/// A trace of `requests` requests of `shape`, the same for the same `seed` on every platform;
/// at most [`MAX_REQUESTS`], as a trace read from a file.
pub fn generate(
    shape: Shape,
    requests: usize,
    seed: u64,
) -> Result<Vec<TraceRequest>, WorkloadError> {
    if requests > MAX_REQUESTS {
        return Err(WorkloadError::TooManyRequests {
            requests,
            max: MAX_REQUESTS,
        });
    }
    let mut b = Builder::new(seed, requests);
    match shape {
        Shape::DocQa => doc_qa(&mut b, requests),
        Shape::Agents => agents(&mut b, requests),
        Shape::OneShot => {
            while b.out.len() < requests {
                let n = b.rng.range(1, 24);
                let prompt = b.fresh(n);
                b.emit(&prompt);
            }
        }
        Shape::Scan => scan(&mut b, requests),
        Shape::LongThink => long_think(&mut b, requests),
        Shape::Abandoned => abandoned(&mut b, requests),
    }
    b.out.truncate(requests);
    Ok(b.out)
}

/// A shared 2-block system prompt, then one of 60 documents (4 to 32 blocks; Zipf popularity,
/// so a handful are hot), then the question.
fn doc_qa(b: &mut Builder, requests: usize) {
    let system = b.fresh(2);
    let docs: Vec<Vec<u32>> = (0..60)
        .map(|_| {
            let n = b.rng.range(4, 32);
            let mut d = system.clone();
            d.extend(b.fresh(n));
            d
        })
        .collect();
    while b.out.len() < requests {
        let d = b.rng.zipf(docs.len());
        let doc = docs[d].clone();
        b.emit(&doc);
    }
}

/// 24 agents at a time behind a 16-block system prompt; each runs 4 to 40 steps, adding 1 to
/// 3 blocks of tool output per step, then a new agent takes its place.
fn agents(b: &mut Builder, requests: usize) {
    let system = b.fresh(16);
    let new_agent = |b: &mut Builder| (system.clone(), b.rng.range(4, 40));
    let mut live: Vec<(Vec<u32>, u32)> = (0..24).map(|_| new_agent(b)).collect();
    while b.out.len() < requests {
        let i = b.rng.range(0, live.len() as u32 - 1) as usize;
        let ctx = live[i].0.clone();
        b.emit(&ctx);
        // The step's prompt tail and the model's tool call become part of the context.
        let grow = b.rng.range(1, 3);
        let more = b.fresh(grow);
        live[i].0.extend(more);
        live[i].1 -= 1;
        if live[i].1 == 0 {
            live[i] = new_agent(b);
        }
    }
}

/// 40 hot prefixes of 2 to 8 blocks (Zipf), and every 100 requests a scan: 12 one-off prompts
/// of 24 to 48 blocks.
fn scan(b: &mut Builder, requests: usize) {
    let hot: Vec<Vec<u32>> = (0..40)
        .map(|_| {
            let n = b.rng.range(2, 8);
            b.fresh(n)
        })
        .collect();
    let mut since_scan = 0;
    while b.out.len() < requests {
        if since_scan == 100 {
            since_scan = 0;
            for _ in 0..12 {
                let n = b.rng.range(24, 48);
                let p = b.fresh(n);
                b.emit(&p);
            }
            continue;
        }
        since_scan += 1;
        let h = b.rng.zipf(hot.len());
        let p = hot[h].clone();
        b.emit(&p);
    }
}

/// 300 users at a time, each in a chat of 2 to 10 turns; a turn re-sends the conversation so
/// far (1 to 6 new blocks per turn), and the next turn comes after the user thinks: a random
/// user of the 300 speaks next, so a conversation returns after about 300 other requests.
fn long_think(b: &mut Builder, requests: usize) {
    let new_chat = |b: &mut Builder| {
        let n = b.rng.range(1, 4);
        (b.fresh(n), b.rng.range(2, 10))
    };
    let mut live: Vec<(Vec<u32>, u32)> = (0..300).map(|_| new_chat(b)).collect();
    while b.out.len() < requests {
        let i = b.rng.range(0, live.len() as u32 - 1) as usize;
        let ctx = live[i].0.clone();
        b.emit(&ctx);
        let grow = b.rng.range(1, 6);
        let more = b.fresh(grow);
        live[i].0.extend(more);
        live[i].1 -= 1;
        if live[i].1 == 0 {
            live[i] = new_chat(b);
        }
    }
}

/// Chats of 2 to 24 blocks; 30% of them get one follow-up (1 to 4 new blocks) after a gap
/// drawn log-uniformly from 1 to 2,000 requests, and none gets a second.
fn abandoned(b: &mut Builder, requests: usize) {
    // Follow-ups due: (request index it is due at, the first turn's context).
    let mut due: std::collections::BTreeMap<(usize, u32), Vec<u32>> = Default::default();
    let mut seq = 0u32;
    while b.out.len() < requests {
        let now = b.out.len();
        if let Some(entry) = due.first_entry()
            && entry.key().0 <= now
        {
            let mut ctx = entry.remove();
            let grow = b.rng.range(1, 4);
            ctx.extend(b.fresh(grow));
            b.emit(&ctx);
            continue;
        }
        let n = b.rng.range(2, 24);
        let ctx = b.fresh(n);
        b.emit(&ctx);
        if b.rng.unit() < 0.3 {
            let gap = 2000f64.powf(b.rng.unit()) as usize;
            seq += 1;
            due.insert((now + gap.max(1), seq), ctx);
        }
    }
}

/// The hit rate of a policy on a trace, replayed a block per Mooncake id.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct BlockHitRate {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Prompt tokens served from the cache.
    pub hit_tokens: u64,
    /// `hit_tokens / input_tokens`.
    pub hit_rate: f64,
    /// Blocks evicted.
    pub evicted_blocks: u64,
    /// Distinct full blocks of the trace: the cache an infinite capacity would hold.
    pub distinct_blocks: u64,
}

/// The chain hash of Mooncake block `id` under `parent` (a stand-in for hashing its tokens:
/// equal prefixes of ids give equal hashes).
fn chain(parent: u128, id: u32) -> BlockHash {
    let mut z = (parent as u64 ^ (parent >> 64) as u64 ^ u64::from(id)).wrapping_mul(0x9e37_79b9);
    let mut hi = parent as u64 ^ (u64::from(id) << 32);
    for _ in 0..2 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        hi = (hi ^ (hi >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb) ^ z;
    }
    BlockHash(u128::from(z) | u128::from(hi) << 64)
}

/// Replays `trace` through a [`PrefixCache`] of `capacity_blocks` 512-token blocks with
/// `policy`: requests in order, one at a time (look up, count hit tokens, cache the full
/// blocks, release, evict down to the capacity). `None` when the capacity is 0.
#[must_use]
pub fn block_hit_rate(
    trace: &[TraceRequest],
    capacity_blocks: usize,
    policy: PolicyKind,
) -> Option<BlockHitRate> {
    block_hit_rate_with(trace, capacity_blocks, policy.build(capacity_blocks))
}

/// [`block_hit_rate`] with a policy object of your own (any [`EvictionPolicy`], for example one
/// built with non-default parameters). `None` when the capacity is 0.
#[must_use]
pub fn block_hit_rate_with(
    trace: &[TraceRequest],
    capacity_blocks: usize,
    policy: Box<dyn EvictionPolicy>,
) -> Option<BlockHitRate> {
    block_hit_rate_offering(trace, capacity_blocks, policy, SecondOffer::None)
}

/// Whether [`block_hit_rate_offering`] offers each request's blocks a second time after its
/// prompt, as a memory manager offers a request again when it finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondOffer {
    /// Each request offered once.
    None,
    /// Offered again as another prompt (`PrefixCache::insert`): what a policy that learns
    /// from requests sees as a second request reusing every block.
    AsPrompt,
    /// Offered again as more of the same request (`PrefixCache::insert_as` with
    /// `OfferRole::More`, every block offered before).
    AsMore,
}

/// [`block_hit_rate_with`], each request's blocks offered a second time as `again` says
/// (see the `offer_twice` example).
#[must_use]
pub fn block_hit_rate_offering(
    trace: &[TraceRequest],
    capacity_blocks: usize,
    policy: Box<dyn EvictionPolicy>,
    again: SecondOffer,
) -> Option<BlockHitRate> {
    if capacity_blocks == 0 {
        return None;
    }
    let bs = MOONCAKE_BLOCK_TOKENS as usize;
    let mut cache = PrefixCache::with_policy(MOONCAKE_BLOCK_TOKENS, policy);
    let (mut hashes, mut blocks, mut newly, mut free) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::<BlockId>::new());
    let mut next_block = 0u32;
    let mut distinct = ahash::AHashSet::new();
    let (mut input_tokens, mut hit_tokens, mut evicted) = (0u64, 0u64, 0u64);
    for req in trace {
        let full = (req.input_length as usize / bs).min(req.hash_ids.len());
        hashes.clear();
        let mut parent = 0u128;
        for &id in &req.hash_ids[..full] {
            let h = chain(parent, id);
            hashes.push(h);
            distinct.insert(h);
            parent = h.0;
        }
        let hit = cache.lookup(&hashes, req.input_length as usize, req.timestamp_ms);
        input_tokens += u64::from(req.input_length);
        hit_tokens += hit.tokens;
        blocks.clear();
        blocks.extend_from_slice(&hit.blocks);
        while blocks.len() < hashes.len() {
            blocks.push(free.pop().unwrap_or_else(|| {
                next_block += 1;
                BlockId(next_block - 1)
            }));
        }
        newly.clear();
        // The request finishes at once: it stops using its hit blocks and those it cached.
        let _ = cache.insert(&hashes, &blocks, req.timestamp_ms, &mut newly);
        let role = match again {
            SecondOffer::None => None,
            SecondOffer::AsPrompt => Some(OfferRole::Prompt),
            SecondOffer::AsMore => Some(OfferRole::More {
                offered_before: hashes.len(),
            }),
        };
        if let Some(role) = role {
            let _ = cache.insert_as(&hashes, &blocks, role, req.timestamp_ms, &mut Vec::new());
        }
        let _ = cache.release(&hit.blocks);
        let _ = cache.release(&newly);
        let mut kept = newly.iter().peekable();
        for &b in &blocks[hit.blocks.len()..] {
            if kept.peek() == Some(&&b) {
                kept.next();
            } else {
                free.push(b);
            }
        }
        if cache.len() > capacity_blocks {
            evicted +=
                cache.evict(cache.len() - capacity_blocks, req.timestamp_ms, &mut free) as u64;
        }
    }
    Some(BlockHitRate {
        input_tokens,
        hit_tokens,
        hit_rate: hit_tokens as f64 / input_tokens.max(1) as f64,
        evicted_blocks: evicted,
        distinct_blocks: distinct.len() as u64,
    })
}

/// One row of [`compare`]: every shipped policy's hit rate on one shape at one cache size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShapeRow {
    /// The shape's name.
    pub shape: &'static str,
    /// Cache capacity in 512-token blocks.
    pub capacity_blocks: usize,
    /// The capacity as a share of the blocks an unbounded cache would hold.
    pub fraction: f64,
    /// `(policy name, hit rate)`, in [`PolicyKind::ALL`] order.
    pub hit_rates: Vec<(&'static str, f64)>,
    /// The hit rate of an unbounded cache.
    pub infinite: f64,
}

/// Every shipped policy on every shape (`requests` requests generated from `seed`, at most
/// [`MAX_REQUESTS`]) at caches holding each of `fractions` of the blocks an unbounded cache
/// would hold.
pub fn compare(
    requests: usize,
    seed: u64,
    fractions: &[f64],
) -> Result<Vec<ShapeRow>, WorkloadError> {
    let mut rows = Vec::new();
    for shape in Shape::ALL {
        let trace = generate(shape, requests, seed)?;
        let Some(inf) = block_hit_rate(&trace, usize::MAX >> 1, PolicyKind::Lru) else {
            continue;
        };
        for &fraction in fractions {
            let capacity_blocks = ((inf.distinct_blocks as f64 * fraction) as usize).max(1);
            let hit_rates = PolicyKind::ALL
                .iter()
                .filter_map(|&p| {
                    block_hit_rate(&trace, capacity_blocks, p).map(|r| (p.name(), r.hit_rate))
                })
                .collect();
            rows.push(ShapeRow {
                shape: shape.name(),
                capacity_blocks,
                fraction,
                hit_rates,
                infinite: inf.hit_rate,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_seeded_and_shapes_differ() {
        for shape in Shape::ALL {
            let a = generate(shape, 300, 7).unwrap();
            assert_eq!(a.len(), 300, "{shape:?}");
            assert_eq!(
                a,
                generate(shape, 300, 7).unwrap(),
                "{shape:?}: same seed, same trace"
            );
            assert_ne!(
                a,
                generate(shape, 300, 8).unwrap(),
                "{shape:?}: another seed differs"
            );
            for r in &a {
                let blocks = r.input_length.div_ceil(MOONCAKE_BLOCK_TOKENS) as usize;
                assert_eq!(blocks, r.hash_ids.len(), "{shape:?}: one id per 512 tokens");
            }
            assert_eq!(Shape::from_name(shape.name()), Some(shape));
        }
    }

    #[test]
    fn reuse_is_where_each_shape_puts_it() {
        let infinite = |shape| {
            let t = generate(shape, 2000, 1).unwrap();
            block_hit_rate(&t, 1 << 20, PolicyKind::Lru)
                .unwrap()
                .hit_rate
        };
        assert_eq!(infinite(Shape::OneShot), 0.0);
        for shape in [
            Shape::DocQa,
            Shape::Agents,
            Shape::Scan,
            Shape::LongThink,
            Shape::Abandoned,
        ] {
            assert!(infinite(shape) > 0.15, "{shape:?} reuses its prefixes");
        }
        // A scan flushes an LRU smaller than the scan burst: the hot set is lost every time.
        let t = generate(Shape::Scan, 2000, 1).unwrap();
        let small = block_hit_rate(&t, 200, PolicyKind::Lru).unwrap();
        let large = block_hit_rate(&t, 1 << 20, PolicyKind::Lru).unwrap();
        assert!(small.hit_rate < large.hit_rate);
        assert!(small.evicted_blocks > 0);
        assert_eq!(large.evicted_blocks, 0);
        assert!(block_hit_rate(&t, 0, PolicyKind::Lru).is_none());
    }

    #[test]
    fn more_requests_than_a_trace_holds_is_an_error() {
        // It used to panic reserving room for them (capacity overflow).
        for requests in [MAX_REQUESTS + 1, usize::MAX] {
            let err = WorkloadError::TooManyRequests {
                requests,
                max: MAX_REQUESTS,
            };
            assert_eq!(generate(Shape::OneShot, requests, 1), Err(err.clone()));
            assert_eq!(compare(requests, 1, &[0.1]), Err(err));
        }
        assert_eq!(generate(Shape::Agents, 0, 1), Ok(Vec::new()));
    }
}
