//! Trace replay through the real [`PrefixCache`]: requests in trace order, one at a time —
//! look up, count hit tokens, cache every full prompt block, release, evict down to the
//! capacity — plus the offline Belady bound and the infinite-cache hit rate on the same trace.
//! [`replay_with_end_signal`] also simulates an application that tells the cache when a
//! conversation has ended ([`PrefixCache::end_conversation`]), judged from the whole trace.
//!
//! Token ids are synthesised: token `j` of Mooncake block `i` is a fixed function of
//! (`hash_ids[i]`, `j`), truncated to `input_length`, so two requests share exactly the
//! prefixes their `hash_ids` share, at any block size.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::time::Instant;

use ahash::AHashMap;
use kvc_core::BlockId;
use kvc_reuse::{
    BlockHasher, EndError, HashExtra, HasherKind, PolicyKind, PrefixCache, ReuseError,
};
use serde::Serialize;
use thiserror::Error;

use crate::trace::{MOONCAKE_BLOCK_TOKENS, TraceRequest};

/// What to replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayConfig {
    /// Cache capacity in tokens (cached blocks × block size).
    pub capacity_tokens: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// The eviction policy.
    pub policy: PolicyKind,
    /// The block hasher.
    pub hasher: HasherKind,
    /// Also compute the offline optimum and the infinite-cache hit rate.
    pub optimal: bool,
}

/// Why a replay cannot run.
#[derive(Clone, Debug, PartialEq, Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The trace holds no request.
    #[error("the trace holds no request")]
    EmptyTrace,
    /// The block size is zero.
    #[error("the block size must be at least 1 token")]
    ZeroBlockSize,
    /// The capacity holds no block.
    #[error("a capacity of {capacity_tokens} token(s) is less than one {block_size}-token block")]
    ZeroCapacity {
        /// Capacity asked.
        capacity_tokens: u64,
        /// Block size.
        block_size: u32,
    },
    /// The trace needs more distinct blocks than a `BlockId` can number.
    #[error("the trace needs more than {max} block ids")]
    TooManyBlocks {
        /// The largest count.
        max: u64,
    },
    /// The share of ended conversations signalled is not a probability.
    #[error("the share of conversation ends signalled must be between 0 and 1, not {share}")]
    BadShare {
        /// The share given.
        share: f64,
    },
    /// The prefix cache refused a conversation end (the replay's hashes are not one chain).
    #[error("the prefix cache refused a conversation end: {source}")]
    End {
        /// What the cache said.
        #[from]
        source: EndError,
    },
    /// The prefix cache refused an insert or release (a broken ownership invariant).
    #[error("the prefix cache refused the replay's blocks: {source}")]
    Cache {
        /// What the cache said.
        #[from]
        source: ReuseError,
    },
}

/// The result of a replay; `--json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Requests replayed.
    pub requests: u64,
    /// Prompt tokens of all requests.
    pub input_tokens: u64,
    /// Prompt tokens served from the cache.
    pub hit_tokens: u64,
    /// `hit_tokens / input_tokens`.
    pub hit_rate: f64,
    /// The eviction policy.
    pub policy: &'static str,
    /// The block hasher.
    pub hasher: &'static str,
    /// Cache capacity in tokens.
    pub capacity_tokens: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// Blocks evicted.
    pub evicted_blocks: u64,
    /// Wall time of the cache replay (not of the optimum), in seconds.
    pub elapsed_s: f64,
    /// Offline Belady bound at the same capacity (with `--optimal`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimal_hit_rate: Option<f64>,
    /// Hit rate of an unbounded cache (with `--optimal`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub infinite_hit_rate: Option<f64>,
    /// Hit rate of LRU told which blocks will ever be used again, but not when: how much of
    /// the optimum knowing *which* blocks come back is worth. `kvc-bench replay --optimal`
    /// fills it through [`reuse_oracle_hit_rate`]; [`replay`] leaves it out, so callers that
    /// only want the optimum do not pay for a third offline pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reuse_oracle_hit_rate: Option<f64>,
    /// What the simulated conversation-end signal did ([`replay_with_end_signal`] only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_signal: Option<EndSignalReport>,
}

/// An application's "this conversation ended" signal, simulated from hindsight for
/// [`replay_with_end_signal`].
///
/// The trace records no conversation ids, so endings are read from its prompts. A request is
/// *continued* when some later request's prompt holds every full 512-token Mooncake block of
/// its prompt (`hash_ids[..input_length / 512]`): what a next turn carries over unchanged,
/// since it rewrites the partial last block as it appends the reply and the new message. A
/// request whose full Mooncake blocks are only the first block every prompt of the trace
/// shares, or that has none, therefore counts as continued (the trace cannot tell; its tail
/// is left alone). Every other request's conversation has ended after it, as far as the
/// whole trace shows, which is what an application that saw the user close the chat would
/// know; with probability `share` (a seeded coin per request, the same coin at every share,
/// so a larger share signals a superset) the replay tells the cache right after the request
/// finishes, before evicting down to the capacity. It ends the conversation's earlier turns'
/// prompts first, oldest first (a request's next turn is the first later request that
/// continues it), then the request's own, as an engine would (see
/// [`PrefixCache::end_conversation`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EndSignal {
    /// Probability that an ended conversation is signalled, 0 to 1.
    pub share: f64,
    /// Seed of the per-request coins.
    pub seed: u64,
    /// Which leading blocks of an ended request are known to be shared.
    pub shared: SharedPrefix,
    /// How long after the request's arrival the cache is told, in the trace's milliseconds:
    /// 0 at once (right after the request), more for an application that learns of the end
    /// later (a session timeout, a user closing the tab). The end is told before the first
    /// request arriving at or after that time.
    pub delay_ms: u64,
}

/// Which leading blocks of an ended conversation's prompt the simulated application keeps
/// (passes as `keep_first` to [`PrefixCache::end_conversation`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedPrefix {
    /// Those any later request uses (known from the whole trace): the application knows
    /// which part of its prompt is a shared system prompt or document. Only the blocks no
    /// later prompt uses are demoted.
    Hindsight,
    /// None: only the cache's own rule stops the demotion (blocks in use, or where another
    /// cached prompt branches off).
    CacheOnly,
}

impl SharedPrefix {
    /// The name used on command lines and in reports.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Hindsight => "hindsight",
            Self::CacheOnly => "cache-only",
        }
    }

    /// The kind named `name`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Hindsight, Self::CacheOnly]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

/// What the simulated conversation-end signal did in a replay.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndSignalReport {
    /// [`EndSignal::share`].
    pub share: f64,
    /// [`EndSignal::seed`].
    pub seed: u64,
    /// [`EndSignal::shared`], by name.
    pub shared: &'static str,
    /// [`EndSignal::delay_ms`].
    pub delay_ms: u64,
    /// Requests never continued (see [`EndSignal`]).
    pub ended_requests: u64,
    /// Of those, the ones whose end the cache was told.
    pub signalled_requests: u64,
    /// Earlier turns of the signalled conversations, whose prompts were ended too.
    pub earlier_turns: u64,
    /// Blocks the cache demoted over all signals.
    pub demoted_blocks: u64,
    /// Cached blocks past the shared prefix the cache kept (in use, branch points).
    pub kept_blocks: u64,
}

/// What the whole trace tells of each request's future (see [`EndSignal`]).
struct Hindsight {
    /// Per request: the leading full `bs`-token blocks of its prompt some later request
    /// holds (a leading run: a later prompt holding block `k` holds all before it), and
    /// whether it is never continued.
    ends: Vec<(usize, bool)>,
    /// Per request: the earlier requests it is the first continuation of (its conversation's
    /// previous turns, one level back).
    earlier: Vec<Vec<u32>>,
}

impl Hindsight {
    fn new(trace: &[TraceRequest], bs: usize) -> Self {
        let index = ChainIndex::new(trace, bs);
        let mut earlier = vec![Vec::new(); trace.len()];
        let ends = trace
            .iter()
            .enumerate()
            .map(|(r, req)| {
                let full = req.input_length as usize / bs;
                let shared = (0..full)
                    .take_while(|&k| index.next_use(r, k) != NEVER)
                    .count();
                let mooncake_full = (req.input_length / MOONCAKE_BLOCK_TOKENS) as usize;
                let carried =
                    mooncake_full.min(req.hash_ids.len()) * MOONCAKE_BLOCK_TOKENS as usize / bs;
                // Continued: a later prompt holds every block of its full Mooncake blocks;
                // the first such prompt is its next turn.
                let ended = shared < carried;
                if !ended && carried > 0 {
                    let next = index.next_use(r, carried - 1);
                    if let Some(e) = earlier.get_mut(next as usize) {
                        e.push(r as u32);
                    }
                }
                (shared, ended)
            })
            .collect();
        Self { ends, earlier }
    }

    /// The earlier turns of the conversation request `r` ends, oldest first.
    fn turns_before(&self, r: usize, out: &mut Vec<u32>) {
        out.clear();
        let mut stack = self.earlier[r].clone();
        while let Some(p) = stack.pop() {
            out.push(p);
            stack.extend_from_slice(&self.earlier[p as usize]);
        }
        out.sort_unstable();
    }
}

/// Whether the coin of request `r` says to signal, at probability `share`.
fn coin(seed: u64, r: usize, share: f64) -> bool {
    let u = kvc_core::rng::SplitMix64::new(seed ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .next_u64();
    ((u >> 11) as f64 / (1u64 << 53) as f64) < share
}

/// The synthetic token `j` of Mooncake block `hash_id`: the high half of the first
/// [`SplitMix64`](kvc_core::rng::SplitMix64) output seeded with the pair.
#[inline]
#[must_use]
pub fn synth_token(hash_id: u32, j: u32) -> u32 {
    let seed = u64::from(hash_id) << 32 | u64::from(j);
    (kvc_core::rng::SplitMix64::new(seed).next_u64() >> 32) as u32
}

/// Appends the synthetic prompt of `req` to `out`.
pub fn synth_prompt(req: &TraceRequest, out: &mut Vec<u32>) {
    let len = req.input_length as usize;
    'blocks: for &id in &req.hash_ids {
        for j in 0..MOONCAKE_BLOCK_TOKENS {
            if out.len() == len {
                break 'blocks;
            }
            out.push(synth_token(id, j));
        }
    }
}

fn check(trace: &[TraceRequest], cfg: &ReplayConfig) -> Result<usize, ReplayError> {
    if trace.is_empty() {
        return Err(ReplayError::EmptyTrace);
    }
    if cfg.block_size == 0 {
        return Err(ReplayError::ZeroBlockSize);
    }
    let cap = cfg.capacity_tokens / u64::from(cfg.block_size);
    if cap == 0 {
        return Err(ReplayError::ZeroCapacity {
            capacity_tokens: cfg.capacity_tokens,
            block_size: cfg.block_size,
        });
    }
    Ok(usize::try_from(cap).unwrap_or(usize::MAX))
}

/// Replays `trace` through a [`PrefixCache`] (and, with `optimal`, the offline bounds).
pub fn replay(trace: &[TraceRequest], cfg: &ReplayConfig) -> Result<ReplayReport, ReplayError> {
    replay_inner(trace, cfg, None)
}

/// [`replay`], with an application telling the cache when conversations end (see
/// [`EndSignal`]). At `share` 0 it is [`replay`] exactly (the cache is never told).
///
/// # Errors
/// As [`replay`], and [`ReplayError::BadShare`] for a share outside 0–1.
pub fn replay_with_end_signal(
    trace: &[TraceRequest],
    cfg: &ReplayConfig,
    signal: &EndSignal,
) -> Result<ReplayReport, ReplayError> {
    if !(0.0..=1.0).contains(&signal.share) {
        return Err(ReplayError::BadShare {
            share: signal.share,
        });
    }
    replay_inner(trace, cfg, Some(signal))
}

fn replay_inner(
    trace: &[TraceRequest],
    cfg: &ReplayConfig,
    signal: Option<&EndSignal>,
) -> Result<ReplayReport, ReplayError> {
    let cap_blocks = check(trace, cfg)?;
    let bs = cfg.block_size as usize;
    // Known before the replay starts (hindsight), so not timed.
    let hindsight = signal.map(|_| Hindsight::new(trace, bs));
    let (mut turns, mut turn_tokens, mut turn_hashes) = (Vec::new(), Vec::new(), Vec::new());
    let mut end_report = signal.map(|s| EndSignalReport {
        share: s.share,
        seed: s.seed,
        shared: s.shared.name(),
        delay_ms: s.delay_ms,
        ended_requests: 0,
        signalled_requests: 0,
        earlier_turns: 0,
        demoted_blocks: 0,
        kept_blocks: 0,
    });
    let start = Instant::now();
    let mut cache = PrefixCache::with_policy(cfg.block_size, cfg.policy.build(cap_blocks));
    let root = cfg.hasher.root(&HashExtra::new("mooncake-replay", 1));
    let (mut tokens, mut hashes, mut blocks, mut newly, mut free) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::<BlockId>::new(),
    );
    let mut next_block: u64 = 0;
    let (mut input_tokens, mut hit_tokens, mut evicted) = (0u64, 0u64, 0u64);
    // Ends to tell later: (when, request), earliest first.
    let mut pending: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    // Tells the cache that request `q`'s conversation ended: its earlier turns' prompts first
    // (oldest first), then its own.
    let mut tell = |cache: &mut PrefixCache,
                    q: usize,
                    now: u64,
                    rep: &mut EndSignalReport,
                    signal: &EndSignal,
                    h: &Hindsight|
     -> Result<(), ReplayError> {
        let keep = |q: usize| match signal.shared {
            SharedPrefix::Hindsight => h.ends[q].0,
            SharedPrefix::CacheOnly => 0,
        };
        h.turns_before(q, &mut turns);
        for t in turns.iter().map(|&t| t as usize).chain(std::iter::once(q)) {
            turn_tokens.clear();
            synth_prompt(&trace[t], &mut turn_tokens);
            turn_hashes.clear();
            cfg.hasher
                .hash_blocks(root, &turn_tokens, bs, &mut turn_hashes);
            let end = cache.end_conversation(&turn_hashes, keep(t), now)?;
            rep.demoted_blocks += end.demoted as u64;
            rep.kept_blocks += end.kept as u64;
        }
        rep.signalled_requests += 1;
        rep.earlier_turns += turns.len() as u64;
        Ok(())
    };
    for (r, req) in trace.iter().enumerate() {
        if let (Some(signal), Some(h), Some(rep)) = (signal, &hindsight, end_report.as_mut()) {
            while let Some(&Reverse((due, q))) = pending.peek()
                && due <= req.timestamp_ms
            {
                pending.pop();
                tell(&mut cache, q, due, rep, signal, h)?;
            }
        }
        tokens.clear();
        synth_prompt(req, &mut tokens);
        hashes.clear();
        cfg.hasher.hash_blocks(root, &tokens, bs, &mut hashes);
        let now = req.timestamp_ms;
        let hit = cache.lookup(&hashes, tokens.len(), now);
        input_tokens += tokens.len() as u64;
        hit_tokens += hit.tokens;
        blocks.clear();
        blocks.extend_from_slice(&hit.blocks);
        // Fresh blocks come from a free list like a block pool's, so ids stay dense.
        while blocks.len() < hashes.len() {
            let id = match free.pop() {
                Some(id) => id,
                None => {
                    let id = u32::try_from(next_block).map_err(|_| ReplayError::TooManyBlocks {
                        max: u64::from(u32::MAX),
                    })?;
                    next_block += 1;
                    BlockId(id)
                }
            };
            blocks.push(id);
        }
        newly.clear();
        // Fresh ids are never cached yet, so the insert cannot fail. The request finishes at
        // once: it stops using its hit blocks and the blocks it newly cached.
        cache.insert(&hashes, &blocks, now, &mut newly)?;
        cache.release(&hit.blocks)?;
        cache.release(&newly)?;
        // Fresh blocks the cache did not keep (their hash was already cached) go back.
        let mut kept = newly.iter().peekable();
        for &b in &blocks[hit.blocks.len()..] {
            if kept.peek() == Some(&&b) {
                kept.next();
            } else {
                free.push(b);
            }
        }
        if let (Some(signal), Some(h), Some(rep)) = (signal, &hindsight, end_report.as_mut())
            && h.ends[r].1
        {
            rep.ended_requests += 1;
            if coin(signal.seed, r, signal.share) {
                if signal.delay_ms == 0 {
                    tell(&mut cache, r, now, rep, signal, h)?;
                } else {
                    pending.push(Reverse((now.saturating_add(signal.delay_ms), r)));
                }
            }
        }
        if cache.len() > cap_blocks {
            evicted += cache.evict(cache.len() - cap_blocks, now, &mut free) as u64;
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    let rate = |hits: u64| {
        if input_tokens == 0 {
            0.0
        } else {
            hits as f64 / input_tokens as f64
        }
    };
    let (optimal_hit_rate, infinite_hit_rate) = if cfg.optimal {
        let index = ChainIndex::new(trace, bs);
        (
            Some(rate(index.offline_hits(Some(cap_blocks)))),
            Some(rate(index.offline_hits(None))),
        )
    } else {
        (None, None)
    };
    Ok(ReplayReport {
        requests: trace.len() as u64,
        input_tokens,
        hit_tokens,
        hit_rate: rate(hit_tokens),
        policy: cfg.policy.name(),
        hasher: cfg.hasher.name(),
        capacity_tokens: cfg.capacity_tokens,
        block_size: cfg.block_size,
        evicted_blocks: evicted,
        elapsed_s,
        optimal_hit_rate,
        infinite_hit_rate,
        reuse_oracle_hit_rate: None,
        end_signal: end_report,
    })
}

/// Hit tokens over input tokens of the offline optimum (Belady) with `cap_blocks` blocks of
/// `block_size` tokens, or of an unbounded cache with `None`, for the requests in order. No
/// hashing: prefixes are compared through the trace's ids.
#[must_use]
pub fn offline_hit_rate(trace: &[TraceRequest], block_size: u32, cap_blocks: Option<usize>) -> f64 {
    let input: u64 = trace.iter().map(|r| u64::from(r.input_length)).sum();
    if input == 0 || block_size == 0 {
        return 0.0;
    }
    let index = ChainIndex::new(trace, block_size as usize);
    index.offline_hits(cap_blocks) as f64 / input as f64
}

/// Hit tokens over input tokens of LRU with `cap_blocks` blocks of `block_size` tokens that
/// keeps only the blocks that will be used again (an oracle for *which* blocks come back,
/// blind to *when*), for the requests in order. Between LRU and the offline optimum: what an
/// online policy could reach by predicting reuse perfectly but not its timing.
#[must_use]
pub fn reuse_oracle_hit_rate(trace: &[TraceRequest], block_size: u32, cap_blocks: usize) -> f64 {
    let input: u64 = trace.iter().map(|r| u64::from(r.input_length)).sum();
    if input == 0 || block_size == 0 {
        return 0.0;
    }
    let index = ChainIndex::new(trace, block_size as usize);
    index.offline_hits_by(cap_blocks, Offline::ReuseOracleLru) as f64 / input as f64
}

/// Distinct full blocks of `block_size` tokens over the whole trace: what an unbounded cache
/// ends up holding.
#[must_use]
pub fn distinct_blocks(trace: &[TraceRequest], block_size: u32) -> u64 {
    if block_size == 0 {
        return 0;
    }
    let index = ChainIndex::new(trace, block_size as usize);
    let mut seen = ahash::AHashSet::new();
    for (r, (input, _)) in index.requests.iter().enumerate() {
        for k in 0..input / index.bs {
            seen.insert(index.key(r, k));
        }
    }
    seen.len() as u64
}

/// The trace's prefixes as dense chain ids, for the offline simulations: block `k` of a
/// request is identified by (the id of the Mooncake-block prefix holding its last token, `k`).
struct ChainIndex {
    bs: usize,
    /// Per request: input tokens and, per Mooncake block, (chain id, position of this
    /// request in that chain's occurrence list).
    requests: Vec<(usize, Vec<(u32, u32)>)>,
    /// Per chain id: (request, full blocks of that request) for every request containing it.
    occurrences: Vec<Vec<(u32, u32)>>,
}

const NEVER: u32 = u32::MAX;

/// Which offline rule evicts in [`ChainIndex::offline_hits_by`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Offline {
    /// Belady: the block needed furthest in the future first.
    Belady,
    /// LRU over the blocks that will be used again (the others are never kept): an oracle
    /// for *which* blocks come back, blind to *when*.
    ReuseOracleLru,
}

impl ChainIndex {
    fn new(trace: &[TraceRequest], bs: usize) -> Self {
        let mut ids: AHashMap<(u32, u32), u32> = AHashMap::new();
        let mut occurrences: Vec<Vec<(u32, u32)>> = Vec::new();
        let mut requests = Vec::with_capacity(trace.len());
        for (r, req) in trace.iter().enumerate() {
            let full = (req.input_length as usize / bs) as u32;
            let mut parent = u32::MAX;
            let mut chains = Vec::with_capacity(req.hash_ids.len());
            for &h in &req.hash_ids {
                let next = ids.len() as u32;
                let c = *ids.entry((parent, h)).or_insert(next);
                if c as usize == occurrences.len() {
                    occurrences.push(Vec::new());
                }
                let pos = occurrences[c as usize].len() as u32;
                occurrences[c as usize].push((r as u32, full));
                chains.push((c, pos));
                parent = c;
            }
            requests.push((req.input_length as usize, chains));
        }
        Self {
            bs,
            requests,
            occurrences,
        }
    }

    /// Chain id and occurrence position of block `k` of request `r`.
    fn chain_of(&self, r: usize, k: usize) -> (u32, u32) {
        let e = ((k + 1) * self.bs - 1) / MOONCAKE_BLOCK_TOKENS as usize;
        self.requests[r].1[e]
    }

    fn key(&self, r: usize, k: usize) -> u64 {
        u64::from(self.chain_of(r, k).0) << 32 | k as u64
    }

    /// The next request after `r` that holds block `k` of `r` as a full block.
    fn next_use(&self, r: usize, k: usize) -> u32 {
        let (c, pos) = self.chain_of(r, k);
        self.occurrences[c as usize][pos as usize + 1..]
            .iter()
            .find(|&&(_, full)| full as usize > k)
            .map_or(NEVER, |&(r2, _)| r2)
    }

    /// Hit tokens of the offline optimum (Belady: evict the block needed furthest in the
    /// future, deeper first on ties, which keeps eviction leaf-first) with `cap` blocks, or of
    /// an unbounded cache with `None`.
    fn offline_hits(&self, cap: Option<usize>) -> u64 {
        match cap {
            Some(cap) => self.offline_hits_by(cap, Offline::Belady),
            None => self.unbounded_hits(),
        }
    }

    /// Hit tokens of an unbounded cache.
    fn unbounded_hits(&self) -> u64 {
        let mut cached = ahash::AHashSet::new();
        let mut hits = 0u64;
        for (r, (input, _)) in self.requests.iter().enumerate() {
            let full = input / self.bs;
            let usable = input.saturating_sub(1) / self.bs;
            let hit = (0..usable.min(full))
                .take_while(|&k| cached.contains(&self.key(r, k)))
                .count();
            hits += (hit * self.bs) as u64;
            for k in 0..full {
                cached.insert(self.key(r, k));
            }
        }
        hits
    }

    /// Hit tokens with `cap` blocks under the offline `rule`. Ties go to the deeper block,
    /// which keeps eviction leaf-first (a block's ancestors are used whenever it is, so they
    /// are never needed later nor used less recently than it).
    fn offline_hits_by(&self, cap: usize, rule: Offline) -> u64 {
        let mut cached: AHashMap<u64, (u32, u32)> = AHashMap::new();
        let mut order: BTreeSet<(u32, u32, u64)> = BTreeSet::new();
        let mut hits = 0u64;
        for (r, (input, _)) in self.requests.iter().enumerate() {
            let full = input / self.bs;
            let usable = input.saturating_sub(1) / self.bs;
            let hit = (0..usable.min(full))
                .take_while(|&k| cached.contains_key(&self.key(r, k)))
                .count();
            hits += (hit * self.bs) as u64;
            for k in 0..full {
                let key = self.key(r, k);
                let next = self.next_use(r, k);
                if let Some(old) = cached.remove(&key) {
                    order.remove(&(old.0, old.1, key));
                }
                // A block never used again cannot earn a hit: neither rule keeps one.
                if next != NEVER {
                    // The largest rank is evicted first.
                    let rank = match rule {
                        Offline::Belady => next,
                        Offline::ReuseOracleLru => NEVER - r as u32,
                    };
                    cached.insert(key, (rank, k as u32));
                    order.insert((rank, k as u32, key));
                }
            }
            while cached.len() > cap {
                if let Some((_, _, key)) = order.pop_last() {
                    cached.remove(&key);
                }
            }
        }
        hits
    }

    #[cfg(test)]
    fn offline_hits_reference(&self, cap: Option<usize>) -> u64 {
        let mut cached: AHashMap<u64, (u32, u32)> = AHashMap::new();
        let mut order: BTreeSet<(u32, u32, u64)> = BTreeSet::new();
        let mut hits = 0u64;
        for (r, (input, _)) in self.requests.iter().enumerate() {
            let full = input / self.bs;
            let usable = input.saturating_sub(1) / self.bs;
            let hit = (0..usable.min(full))
                .take_while(|&k| cached.contains_key(&self.key(r, k)))
                .count();
            hits += (hit * self.bs) as u64;
            for k in 0..full {
                let key = self.key(r, k);
                match cap {
                    None => {
                        cached.insert(key, (0, 0));
                    }
                    Some(_) => {
                        let next = self.next_use(r, k);
                        if let Some(old) = cached.remove(&key) {
                            order.remove(&(old.0, old.1, key));
                        }
                        // A block never used again cannot earn a hit: the optimum keeps none.
                        if next != NEVER {
                            cached.insert(key, (next, k as u32));
                            order.insert((next, k as u32, key));
                        }
                    }
                }
            }
            if let Some(cap) = cap {
                while cached.len() > cap {
                    if let Some((_, _, key)) = order.pop_last() {
                        cached.remove(&key);
                    }
                }
            }
        }
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ts: u64, input: u32, ids: &[u32]) -> TraceRequest {
        TraceRequest {
            timestamp_ms: ts,
            input_length: input,
            output_length: 1,
            hash_ids: ids.to_vec(),
        }
    }

    fn cfg(capacity_tokens: u64, block_size: u32) -> ReplayConfig {
        ReplayConfig {
            capacity_tokens,
            block_size,
            policy: PolicyKind::Lru,
            hasher: HasherKind::Xxh3,
            optimal: true,
        }
    }

    #[test]
    fn shared_prefix_hits_at_any_block_size() {
        // Request 2 shares Mooncake block 0 (512 tokens) with request 1.
        let trace = [req(0, 1000, &[1, 2]), req(1, 1000, &[1, 3])];
        for bs in [16, 64, 100, 512] {
            let r = replay(&trace, &cfg(1 << 20, bs)).unwrap();
            let expected = (512 / bs * bs) as u64;
            assert_eq!(r.hit_tokens, expected, "block size {bs}");
            assert_eq!(r.input_tokens, 2000);
            assert_eq!(r.infinite_hit_rate, Some(expected as f64 / 2000.0));
        }
    }

    #[test]
    fn hit_never_covers_the_last_token() {
        let trace = [req(0, 512, &[1]), req(1, 512, &[1])];
        let r = replay(&trace, &cfg(1 << 20, 16)).unwrap();
        assert_eq!(r.hit_tokens, 512 - 16);
    }

    #[test]
    fn capacity_bounds_the_cache_and_optimum_beats_lru() {
        // A, B, A, B ... with room for one prompt: LRU always misses; the optimum keeps A.
        let mut trace = Vec::new();
        for i in 0..6 {
            trace.push(req(
                i,
                1024,
                &[if i % 2 == 0 { 10 } else { 20 }, 30 + i as u32],
            ));
        }
        let r = replay(&trace, &cfg(1024, 16)).unwrap();
        assert_eq!(r.hit_tokens, 0);
        assert!(r.evicted_blocks > 0);
        let opt = r.optimal_hit_rate.unwrap();
        assert!(opt > 0.0 && opt <= r.infinite_hit_rate.unwrap());
        // Knowing which blocks come back is enough here: only A ever does.
        assert_eq!(r.reuse_oracle_hit_rate, None);
        assert_eq!(reuse_oracle_hit_rate(&trace, 16, 1024 / 16), opt);
    }

    #[test]
    fn the_reuse_oracle_sits_between_lru_and_the_optimum() {
        // Three chats of two blocks cycling with one-off prompts between them, in a cache too
        // small for all: the oracle skips the one-offs, Belady also picks whom to keep.
        let mut trace = Vec::new();
        let mut fresh = 1000;
        for round in 0..20u64 {
            for c in 0..3u32 {
                trace.push(req(round * 10 + u64::from(c), 1025, &[c, 100 + c, fresh]));
                fresh += 1;
                trace.push(req(round * 10 + 5, 1025, &[fresh, fresh + 1, fresh + 2]));
                fresh += 3;
            }
        }
        let bs = 512;
        let r = replay(&trace, &cfg(4 * 512, bs)).unwrap();
        let oracle = reuse_oracle_hit_rate(&trace, bs, 4);
        let opt = r.optimal_hit_rate.unwrap();
        assert!(r.hit_rate < oracle, "lru {} oracle {oracle}", r.hit_rate);
        assert!(oracle < opt, "oracle {oracle} optimum {opt}");
        // The refactored optimum and unbounded cache agree with the single-loop original.
        let index = ChainIndex::new(&trace, bs as usize);
        for cap in [None, Some(1), Some(4), Some(9)] {
            assert_eq!(index.offline_hits(cap), index.offline_hits_reference(cap));
        }
    }

    #[test]
    fn endings_are_requests_no_later_prompt_continues() {
        let trace = [
            req(0, 1536, &[0, 1, 2]), // continued by the next: all three blocks carried
            req(1, 2000, &[0, 1, 2, 3]), // its full blocks [0, 1, 2]: only [0, 1] come back
            req(2, 1536, &[0, 1, 9]), // nothing after it
            req(3, 700, &[5, 6]),     // one full block, never seen again
            req(4, 300, &[7]),        // no full Mooncake block: nothing to carry
        ];
        let h = Hindsight::new(&trace, 512);
        assert_eq!(
            h.ends,
            [(3, false), (2, true), (0, true), (0, true), (0, false)]
        );
        assert_eq!(
            Hindsight::new(&trace, 16).ends[1],
            (64, true),
            "the shared run in 16-token blocks"
        );
        let mut turns = Vec::new();
        h.turns_before(1, &mut turns);
        assert_eq!(turns, [0], "request 1 is request 0's next turn");
        h.turns_before(2, &mut turns);
        assert!(turns.is_empty());
    }

    #[test]
    fn an_ended_conversation_no_longer_pushes_out_one_that_continues() {
        // B's first turn, then A's only turn (sharing B's first block), then B's second turn,
        // in a cache of four 512-token blocks: A's tail evicts B's last block under LRU,
        // unless the cache is told A ended (A's own blocks go first).
        let trace = [
            req(0, 1600, &[0, 10, 11, 99]),
            req(1, 1536, &[0, 20, 21]),
            req(2, 2048, &[0, 10, 11, 12]),
        ];
        let cfg = ReplayConfig {
            optimal: false,
            ..cfg(4 * 512, 512)
        };
        let plain = replay(&trace, &cfg).unwrap();
        assert_eq!(plain.hit_tokens, 512 + 1024);
        let signal = |share, shared| EndSignal {
            share,
            seed: 9,
            shared,
            delay_ms: 0,
        };
        for shared in [SharedPrefix::Hindsight, SharedPrefix::CacheOnly] {
            let told = replay_with_end_signal(&trace, &cfg, &signal(1.0, shared)).unwrap();
            assert_eq!(told.hit_tokens, 512 + 1536, "{shared:?}");
            let ends = told.end_signal.unwrap();
            // A and B's last turn ended; A's block 0 is B's too (kept: by hindsight, or as a
            // branch point in the cache).
            assert_eq!(ends.ended_requests, 2);
            assert_eq!(ends.signalled_requests, 2);
            let zero = replay_with_end_signal(&trace, &cfg, &signal(0.0, shared)).unwrap();
            assert_eq!(
                (zero.hit_tokens, zero.evicted_blocks),
                (plain.hit_tokens, plain.evicted_blocks)
            );
        }
        assert!(matches!(
            replay_with_end_signal(&trace, &cfg, &signal(-0.1, SharedPrefix::Hindsight)),
            Err(ReplayError::BadShare { .. })
        ));
    }

    #[test]
    fn coins_nest_across_shares() {
        for r in 0..1000 {
            for (lo, hi) in [(0.25, 0.5), (0.5, 0.75), (0.75, 1.0)] {
                assert!(!coin(3, r, lo) || coin(3, r, hi));
            }
            assert!(!coin(3, r, 0.0) && coin(3, r, 1.0));
        }
        let told = (0..1000).filter(|&r| coin(3, r, 0.5)).count();
        assert!((400..600).contains(&told), "{told} of 1000 at one half");
    }

    #[test]
    fn errors_for_empty_trace_and_zero_capacity() {
        assert_eq!(replay(&[], &cfg(100, 16)), Err(ReplayError::EmptyTrace));
        assert!(matches!(
            replay(&[req(0, 10, &[1])], &cfg(15, 16)),
            Err(ReplayError::ZeroCapacity { .. })
        ));
        assert_eq!(
            replay(&[req(0, 10, &[1])], &cfg(15, 0)),
            Err(ReplayError::ZeroBlockSize)
        );
    }
}
