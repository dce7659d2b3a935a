//! Content-checked property tests of the prefix cache and the session cache, with every
//! eviction policy.
//!
//! The test keeps a model of a block pool: each block's reference count and a fingerprint of
//! the tokens written into it (its tenant and every token up to its end, since a block's KV
//! depends on all of them). Freed block ids are reused for new content, so a cache that
//! served a freed block would hand back a block whose fingerprint no longer matches. Random
//! streams of requests (lookups, offers, forks, finishes), sessions (open, turns with
//! truncation, commits, close, idle expiry), evictions, invalidations, retention changes and
//! resets run against the cache, following the ownership rule of `kvc_core::ReuseIndex`.
//! After every operation:
//!
//! - every hit names blocks that are allocated and hold exactly the tokens it claims;
//! - an eviction returns `min(asked, evictable_blocks())` blocks, each held by nothing but
//!   the cache (its model count is 1), so dropping the cache's reference frees it;
//! - `evictable_blocks()` equals the model's count of blocks only the cache holds;
//! - the cache's block count equals the blocks it holds a reference on, and every chain of
//!   hittable hashes is prefix-closed.
//!
//! At the end, once every request finishes and every session closes, everything is
//! evictable and eviction drains the cache and frees every block.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use kvc_reuse::{
    BlockHash, BlockHasher, BlockId, HashExtra, OfferRole, PolicyKind, PrefixCache, Retention,
    ReuseError, SessionCache, SessionConfig, SessionError, SessionId, Truncation, Xxh3Hasher,
};
use proptest::prelude::*;

const BS: usize = 2;
const TENANTS: usize = 2;
const PROMPTS: usize = 6;
const SESSIONS: u64 = 3;
const IDLE_MS: u64 = 40;

#[derive(Clone, Debug)]
enum Op {
    /// Tenant `t` runs prompt `p`: lookup, compute the rest, offer the full blocks; the
    /// request keeps running unless `finish`.
    Request {
        t: usize,
        p: usize,
        finish: bool,
    },
    /// Tenant `t` runs prompts `p` and `q` at once: both are looked up before either is
    /// offered, so blocks both compute are computed twice; each offer adopts the cached copy
    /// of a block computed twice (`insert_adopting`).
    Twin {
        t: usize,
        p: usize,
        q: usize,
    },
    /// A running request finishes (the `i`-th, modulo).
    Finish(usize),
    /// A running request forks (parallel sampling): another holder of the same blocks.
    Fork(usize),
    Evict(usize),
    Invalidate {
        t: usize,
        p: usize,
        block: usize,
    },
    Retain {
        t: usize,
        p: usize,
        block: usize,
        priority: u8,
        ttl: Option<u64>,
    },
    /// The conversation of tenant `t`'s prompt `p` ended: its own tail past `keep` blocks
    /// is demoted.
    End {
        t: usize,
        p: usize,
        keep: usize,
    },
    Clear,
    Open {
        s: u64,
        p: usize,
    },
    Turn {
        s: u64,
        tokens: Vec<u32>,
    },
    /// The session's new full blocks are computed and committed (other requests and sessions
    /// may have cached the same tokens since its open or turn).
    Commit(u64),
    Close(u64),
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..TENANTS, 0..PROMPTS, any::<bool>())
            .prop_map(|(t, p, finish)| Op::Request { t, p, finish }),
        2 => (0..TENANTS, 0..PROMPTS, 0..PROMPTS).prop_map(|(t, p, q)| Op::Twin { t, p, q }),
        3 => (0..8usize).prop_map(Op::Finish),
        1 => (0..8usize).prop_map(Op::Fork),
        3 => (1..6usize).prop_map(Op::Evict),
        1 => (0..TENANTS, 0..PROMPTS, 0..6usize)
            .prop_map(|(t, p, block)| Op::Invalidate { t, p, block }),
        1 => (0..TENANTS, 0..PROMPTS, 0..6usize, 0..=100u8, proptest::option::of(1..50u64))
            .prop_map(|(t, p, block, priority, ttl)| Op::Retain { t, p, block, priority, ttl }),
        2 => (0..TENANTS, 0..PROMPTS, 0..3usize).prop_map(|(t, p, keep)| Op::End { t, p, keep }),
        1 => Just(Op::Clear),
        2 => (0..SESSIONS, 0..PROMPTS).prop_map(|(s, p)| Op::Open { s, p }),
        3 => (0..SESSIONS, proptest::collection::vec(0..2u32, 1..7))
            .prop_map(|(s, tokens)| Op::Turn { s, tokens }),
        3 => (0..SESSIONS).prop_map(Op::Commit),
        1 => (0..SESSIONS).prop_map(Op::Close),
        1 => Just(Op::Expire),
    ]
}

/// Prompts over a two-token alphabet, so they share prefixes often.
fn prompts() -> impl Strategy<Value = Vec<Vec<u32>>> {
    proptest::collection::vec(proptest::collection::vec(0..2u32, 3..13), PROMPTS)
}

fn truncation() -> impl Strategy<Value = Truncation> {
    prop_oneof![
        (1..3usize).prop_map(|turns| Truncation::KeepSystemAndLastTurns { turns }),
        (4..16usize).prop_map(|tokens| Truncation::LastTokens { tokens }),
    ]
}

/// What the tokens `tokens` of tenant `t` put in the block that ends them.
fn fingerprint(t: usize, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    (t, tokens).hash(&mut h);
    h.finish()
}

/// The pool, the holders and the cache under test.
struct World {
    cache: PrefixCache,
    sessions: SessionCache,
    roots: Vec<BlockHash>,
    /// Reference count of every allocated block.
    refs: HashMap<BlockId, u32>,
    /// Fingerprint of what each allocated block holds.
    content: HashMap<BlockId, u64>,
    free: Vec<BlockId>,
    next: u32,
    /// Blocks the cache holds a reference on.
    cached: BTreeSet<BlockId>,
    /// Running requests' tables.
    running: Vec<Vec<BlockId>>,
    /// Open sessions' blocks and last activity.
    sessions_held: HashMap<SessionId, (Vec<BlockId>, u64)>,
}

type Check = Result<(), TestCaseError>;

impl World {
    fn alloc(&mut self, fp: u64) -> BlockId {
        let b = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            BlockId(self.next - 1)
        });
        self.refs.insert(b, 1);
        self.content.insert(b, fp);
        b
    }

    fn retain(&mut self, b: BlockId) -> Check {
        let r = self.refs.get_mut(&b);
        prop_assert!(r.is_some(), "{} is free", b);
        *r.unwrap() += 1;
        Ok(())
    }

    /// Drops a reference; returns whether the block was freed.
    fn drop_ref(&mut self, b: BlockId) -> Result<bool, TestCaseError> {
        let r = self.refs.get_mut(&b);
        prop_assert!(r.is_some(), "{} released while free", b);
        let r = r.unwrap();
        *r -= 1;
        if *r == 0 {
            self.refs.remove(&b);
            self.content.remove(&b);
            self.free.push(b);
            return Ok(true);
        }
        Ok(false)
    }

    /// The blocks of a hit hold what they claim: allocated, and the tokens of the prompt.
    fn check_blocks(&self, t: usize, tokens: &[u32], blocks: &[BlockId]) -> Check {
        for (i, b) in blocks.iter().enumerate() {
            prop_assert!(self.refs.contains_key(b), "hit on freed {}", b);
            let want = fingerprint(t, &tokens[..(i + 1) * BS]);
            prop_assert_eq!(self.content.get(b), Some(&want), "{} holds other tokens", b);
        }
        Ok(())
    }

    fn take_newly(&mut self, newly: &[BlockId]) -> Check {
        for &b in newly {
            prop_assert!(self.cached.insert(b), "{} cached twice", b);
            self.retain(b)?;
        }
        Ok(())
    }

    fn hashes(&self, t: usize, tokens: &[u32]) -> Vec<BlockHash> {
        let mut h = Vec::new();
        Xxh3Hasher.hash_blocks(self.roots[t], tokens, BS, &mut h);
        h
    }

    fn request(&mut self, t: usize, tokens: &[u32], finish: bool, now: u64) -> Check {
        let hashes = self.hashes(t, tokens);
        let blocks = self.lookup_and_compute(t, tokens, now)?;
        let full = tokens.len() / BS;
        let mut newly = Vec::new();
        self.cache
            .insert(&hashes, &blocks[..full], now, &mut newly)
            .map_err(|e| TestCaseError::fail(format!("insert: {e}")))?;
        self.take_newly(&newly)?;
        if finish {
            self.finish(blocks)
        } else {
            self.running.push(blocks);
            Ok(())
        }
    }

    /// A request's lookup, and its other blocks allocated and computed: its table.
    fn lookup_and_compute(
        &mut self,
        t: usize,
        tokens: &[u32],
        now: u64,
    ) -> Result<Vec<BlockId>, TestCaseError> {
        let hashes = self.hashes(t, tokens);
        let hit = self.cache.lookup(&hashes, tokens.len(), now);
        prop_assert!(
            hit.tokens < tokens.len() as u64,
            "the last token is never a hit"
        );
        prop_assert_eq!(hit.tokens, (hit.blocks.len() * BS) as u64);
        self.check_blocks(t, tokens, &hit.blocks)?;
        let mut blocks = hit.blocks;
        for &b in &blocks {
            self.retain(b)?;
        }
        for i in blocks.len()..tokens.len().div_ceil(BS) {
            let end = ((i + 1) * BS).min(tokens.len());
            let b = self.alloc(fingerprint(t, &tokens[..end]));
            blocks.push(b);
        }
        Ok(blocks)
    }

    /// Two requests of tenant `t` computed at once, then offered one after the other with
    /// adoption: a block the first cached is taken by the second in place of its own copy
    /// (same tokens), which is freed; the second's later blocks are cached after it.
    fn twin(&mut self, t: usize, a: &[u32], b: &[u32], now: u64) -> Check {
        let mut tables = [
            self.lookup_and_compute(t, a, now)?,
            self.lookup_and_compute(t, b, now)?,
        ];
        for (tokens, table) in [a, b].into_iter().zip(&mut tables) {
            let hashes = self.hashes(t, tokens);
            let full = tokens.len() / BS;
            let (mut newly, mut adopted) = (Vec::new(), Vec::new());
            self.cache
                .insert_adopting(
                    &hashes,
                    &table[..full],
                    OfferRole::Prompt,
                    now,
                    &mut newly,
                    &mut adopted,
                )
                .map_err(|e| TestCaseError::fail(format!("insert_adopting: {e}")))?;
            self.take_newly(&newly)?;
            for x in adopted {
                prop_assert_eq!(table[x.index], x.own);
                prop_assert!(
                    !self.cache.is_cached(x.own),
                    "{} adopted away but tracked",
                    x.own
                );
                prop_assert!(
                    self.cached.contains(&x.cached),
                    "{} adopted but not cached",
                    x.cached
                );
                prop_assert_eq!(
                    self.content.get(&x.cached),
                    self.content.get(&x.own),
                    "the cached copy holds the same tokens"
                );
                self.retain(x.cached)?;
                self.drop_ref(x.own)?;
                table[x.index] = x.cached;
            }
            self.check_blocks(t, tokens, &table[..full])?;
            // Every full block is cached now, so the whole prompt but its last token hits.
            let hit = self.cache.lookup(&hashes, tokens.len(), now);
            self.check_blocks(t, tokens, &hit.blocks)?;
            prop_assert_eq!(hit.blocks.len(), full.min((tokens.len() - 1) / BS));
            prop_assert_eq!(self.cache.release(&hit.blocks), Ok(()));
        }
        let [ta, tb] = tables;
        self.running.push(ta);
        self.running.push(tb);
        Ok(())
    }

    fn finish(&mut self, blocks: Vec<BlockId>) -> Check {
        prop_assert_eq!(self.cache.release(&blocks), Ok(()));
        for b in blocks {
            self.drop_ref(b)?;
        }
        Ok(())
    }

    fn evict(&mut self, n: usize, now: u64) -> Check {
        let evictable = self.cache.evictable_blocks();
        let mut out = Vec::new();
        let got = self.cache.evict(n, now, &mut out);
        prop_assert_eq!(got, out.len());
        prop_assert_eq!(
            got,
            n.min(evictable),
            "every evictable block can be evicted"
        );
        for b in out {
            prop_assert!(self.cached.remove(&b), "{} handed back but not cached", b);
            prop_assert_eq!(self.refs.get(&b), Some(&1), "{} evicted while in use", b);
            prop_assert!(self.drop_ref(b)?, "{} evicted without being freed", b);
        }
        Ok(())
    }

    /// Computes the new full blocks of a session's context and commits them.
    fn compute(&mut self, s: SessionId, now: u64) -> Check {
        let context = self.sessions.context(s).unwrap_or_default().to_vec();
        let held = self.sessions_held[&s].0.len();
        let mut new = Vec::new();
        for i in held..context.len() / BS {
            new.push(self.alloc(fingerprint(0, &context[..(i + 1) * BS])));
        }
        let mut newly = Vec::new();
        let committed =
            self.sessions
                .commit(&mut self.cache, &Xxh3Hasher, s, &new, now, &mut newly);
        prop_assert_eq!(committed, Ok(()));
        self.take_newly(&newly)?;
        let entry = self.sessions_held.get_mut(&s).unwrap();
        entry.0.extend(new);
        entry.1 = now;
        Ok(())
    }

    fn close_model(&mut self, s: SessionId, released: &mut Vec<BlockId>) -> Check {
        let (mut held, _) = self.sessions_held.remove(&s).unwrap();
        held.sort();
        released.sort();
        prop_assert_eq!(&held, &*released, "{} handed back other blocks", s);
        for b in released.drain(..) {
            self.drop_ref(b)?;
        }
        Ok(())
    }

    fn check(&self, prompts: &[Vec<u32>]) -> Check {
        let only_cache = self
            .cached
            .iter()
            .filter(|b| self.refs.get(b) == Some(&1))
            .count();
        prop_assert_eq!(self.cache.evictable_blocks(), only_cache);
        prop_assert_eq!(self.cache.len(), self.cached.len());
        for t in 0..TENANTS {
            for p in prompts {
                let cached: Vec<bool> = self
                    .hashes(t, p)
                    .iter()
                    .map(|&h| self.cache.contains(h))
                    .collect();
                prop_assert!(
                    cached.windows(2).all(|w| w[0] || !w[1]),
                    "a chain has a hole: {:?}",
                    cached
                );
            }
        }
        Ok(())
    }
}

fn run(policy: PolicyKind, prompts: &[Vec<u32>], truncation: Truncation, ops: Vec<Op>) -> Check {
    let cfg = SessionConfig {
        max_tokens: 16,
        truncation,
        idle_ms: IDLE_MS,
    };
    let mut w = World {
        cache: PrefixCache::with_policy(BS as u32, policy.build(16)),
        sessions: SessionCache::new(cfg, BS as u32).unwrap(),
        roots: (0..TENANTS)
            .map(|t| Xxh3Hasher.root(&HashExtra::new("m", 1).with_salt(vec![t as u8])))
            .collect(),
        refs: HashMap::new(),
        content: HashMap::new(),
        free: Vec::new(),
        next: 0,
        cached: BTreeSet::new(),
        running: Vec::new(),
        sessions_held: HashMap::new(),
    };
    for (now, op) in ops.into_iter().enumerate() {
        let now = now as u64;
        match op {
            Op::Request { t, p, finish } => w.request(t, &prompts[p], finish, now)?,
            Op::Twin { t, p, q } => w.twin(t, &prompts[p], &prompts[q], now)?,
            Op::Finish(i) => {
                if !w.running.is_empty() {
                    let blocks = w.running.swap_remove(i % w.running.len());
                    w.finish(blocks)?;
                }
            }
            Op::Fork(i) => {
                if !w.running.is_empty() {
                    let blocks = w.running[i % w.running.len()].clone();
                    prop_assert_eq!(w.cache.acquire(&blocks), Ok(()));
                    for &b in &blocks {
                        w.retain(b)?;
                    }
                    w.running.push(blocks);
                }
            }
            Op::Evict(n) => w.evict(n, now)?,
            Op::Invalidate { t, p, block } => {
                if let Some(&h) = w.hashes(t, &prompts[p]).get(block) {
                    let _ = w.cache.invalidate(h);
                }
            }
            Op::Retain {
                t,
                p,
                block,
                priority,
                ttl,
            } => {
                if let Some(&h) = w.hashes(t, &prompts[p]).get(block) {
                    let until = ttl.map(|d| now + d);
                    let _ = w.cache.set_retention(h, Retention { priority, until }, now);
                }
            }
            Op::End { t, p, keep } => {
                // A prompt's own hashes are always one chain: the cached part is a prefix.
                let h = w.hashes(t, &prompts[p]);
                let end = w.cache.end_conversation(&h, keep, now);
                prop_assert!(end.is_ok(), "{:?}", end);
            }
            Op::Clear => {
                let in_use = w.cached.iter().filter(|b| w.refs[b] > 1).count();
                match w.cache.clear() {
                    Ok(_) => prop_assert_eq!(in_use, 0),
                    Err(e) => prop_assert_eq!(e, ReuseError::InUse { in_use }),
                }
            }
            Op::Open { s, p } => {
                let s = SessionId(s);
                let system = &prompts[p];
                let opened = w
                    .sessions
                    .open(&mut w.cache, &Xxh3Hasher, s, w.roots[0], system, now);
                match opened {
                    Err(SessionError::AlreadyOpen { .. }) => {
                        prop_assert!(w.sessions_held.contains_key(&s));
                    }
                    Ok(turn) => {
                        w.check_blocks(0, system, &turn.blocks)?;
                        for &b in &turn.blocks {
                            w.retain(b)?;
                        }
                        prop_assert_eq!(turn.cached_tokens, turn.blocks.len() * BS);
                        w.sessions_held.insert(s, (turn.blocks, now));
                    }
                    Err(e) => prop_assert!(false, "open: {}", e),
                }
            }
            Op::Turn { s, tokens } => {
                let s = SessionId(s);
                match w.sessions.turn(&mut w.cache, s, &tokens, now) {
                    Err(SessionError::UnknownSession { .. }) => {
                        prop_assert!(!w.sessions_held.contains_key(&s));
                    }
                    Err(SessionError::TurnTooLong { .. }) => {}
                    Err(e) => prop_assert!(false, "turn: {}", e),
                    Ok(turn) => {
                        let held = &w.sessions_held[&s].0;
                        // The session keeps a prefix of its blocks and hands back the rest.
                        let kept = turn.blocks.len();
                        prop_assert_eq!(&held[..kept], &turn.blocks[..]);
                        let mut gone = held[kept..].to_vec();
                        let mut released = turn.released.clone();
                        gone.sort();
                        released.sort();
                        prop_assert_eq!(gone, released.clone());
                        for b in released {
                            w.drop_ref(b)?;
                        }
                        w.sessions_held.get_mut(&s).unwrap().0.truncate(kept);
                        let context = w.sessions.context(s).unwrap().to_vec();
                        w.check_blocks(0, &context, &turn.blocks)?;
                        prop_assert_eq!(turn.cached_tokens, kept * BS);
                        w.sessions_held.get_mut(&s).unwrap().1 = now;
                    }
                }
            }
            Op::Commit(s) => {
                let s = SessionId(s);
                if w.sessions_held.contains_key(&s) {
                    w.compute(s, now)?;
                }
            }
            Op::Close(s) => {
                let s = SessionId(s);
                let mut released = Vec::new();
                match w.sessions.close(&mut w.cache, s, &mut released) {
                    Ok(()) => w.close_model(s, &mut released)?,
                    Err(e) => prop_assert_eq!(e, SessionError::UnknownSession { session: s }),
                }
            }
            Op::Expire => {
                let mut released = Vec::new();
                let closed = w.sessions.expire(&mut w.cache, now, &mut released);
                let idle: Vec<SessionId> = w
                    .sessions_held
                    .iter()
                    .filter(|(_, (_, last))| now.saturating_sub(*last) > IDLE_MS)
                    .map(|(&s, _)| s)
                    .collect();
                prop_assert_eq!(closed, Ok(idle.len()));
                let mut want = Vec::new();
                for s in idle {
                    want.extend(w.sessions_held.remove(&s).unwrap().0);
                }
                want.sort();
                released.sort();
                prop_assert_eq!(&want, &released);
                for b in released {
                    w.drop_ref(b)?;
                }
            }
        }
        w.check(prompts)?;
    }
    // Everyone finishes: everything cached is evictable, and eviction drains and frees it.
    while let Some(blocks) = w.running.pop() {
        w.finish(blocks)?;
    }
    let open: Vec<SessionId> = w.sessions_held.keys().copied().collect();
    for s in open {
        let mut released = Vec::new();
        prop_assert_eq!(w.sessions.close(&mut w.cache, s, &mut released), Ok(()));
        w.close_model(s, &mut released)?;
    }
    w.check(prompts)?;
    prop_assert_eq!(w.cache.evictable_blocks(), w.cache.len());
    let all = w.cache.len();
    w.evict(usize::MAX, u64::MAX)?;
    prop_assert!(w.cache.is_empty());
    prop_assert!(w.refs.is_empty(), "leaked {:?} (cache had {})", w.refs, all);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn hits_hold_their_tokens_and_evictions_free_unused_blocks(
        policy in proptest::sample::select(PolicyKind::ALL),
        prompts in prompts(),
        truncation in truncation(),
        ops in proptest::collection::vec(op(), 1..90),
    ) {
        run(policy, &prompts, truncation, ops)?;
    }
}

/// Every policy, the same fixed stream: a deterministic smoke run so a policy is never left
/// out by chance.
#[test]
fn every_policy_survives_a_long_mixed_stream() {
    let prompts: Vec<Vec<u32>> = (0..PROMPTS)
        .map(|p| {
            (0..3 + p * 2)
                .map(|i| ((i * 7 + p) % 3 % 2) as u32)
                .collect()
        })
        .collect();
    let mut ops = Vec::new();
    for i in 0..200usize {
        ops.push(match i % 11 {
            0 | 1 => Op::Request {
                t: i % TENANTS,
                p: i % PROMPTS,
                finish: i % 3 == 0,
            },
            2 => Op::Finish(i),
            3 => Op::Fork(i),
            4 => Op::Evict(1 + i % 4),
            5 => Op::Open {
                s: (i % 3) as u64,
                p: i % PROMPTS,
            },
            6 => Op::Turn {
                s: (i % 3) as u64,
                tokens: vec![(i % 2) as u32; 1 + i % 5],
            },
            7 => Op::Invalidate {
                t: 0,
                p: i % PROMPTS,
                block: i % 4,
            },
            8 if i % 2 == 0 => Op::Close((i % 3) as u64),
            8 => Op::Commit((i % 3) as u64),
            9 => Op::Expire,
            _ => Op::Retain {
                t: 0,
                p: i % PROMPTS,
                block: i % 3,
                priority: (i * 13 % 101) as u8,
                ttl: Some(5),
            },
        });
    }
    for &policy in PolicyKind::ALL {
        for truncation in [
            Truncation::KeepSystemAndLastTurns { turns: 2 },
            Truncation::LastTokens { tokens: 9 },
        ] {
            run(policy, &prompts, truncation, ops.clone())
                .unwrap_or_else(|e| panic!("{}: {e}", policy.name()));
        }
    }
}
