//! Multi-turn chat sessions from the `kvc-reuse` docs, over a real block pool (`kvc-alloc`'s
//! `BlockPool`): two sessions share a system prompt through the prefix cache, later turns
//! stay private to their session, contexts over the model's window are truncated (keep the
//! system prompt and the last turns, or the last tokens), idle sessions expire, and every
//! block goes back to the pool.
//!
//! The reference counting follows the docs' "Sessions" section: one pool reference per
//! holder (the session, the prefix cache), checked against the pool after every step.
//!
//! ```sh
//! cargo run -p kvc-reuse --example sessions
//! ```

#![allow(clippy::print_stdout)] // a program: it says what it did

use kvc_alloc::{BlockAllocator, BlockPool, PoolConfig, RegionId, Released};
use kvc_reuse::{
    BlockHash, BlockHasher, BlockId, HashExtra, PolicyKind, PrefixCache, SessionCache,
    SessionConfig, SessionError, SessionId, Truncation, Turn, Xxh3Hasher,
};

const BS: u32 = 16;
const POOL_BLOCKS: u64 = 64;
const D: RegionId = RegionId::DYNAMIC;

type Error = Box<dyn std::error::Error>;

struct Chat {
    pool: BlockPool,
    prefix: PrefixCache,
    sessions: SessionCache,
    root: BlockHash,
    /// Blocks each session holds (its view, to check the pool against).
    held: Vec<(SessionId, Vec<BlockId>)>,
}

impl Chat {
    fn new(truncation: Truncation) -> Result<Self, Error> {
        let cfg = SessionConfig {
            max_tokens: 96,
            truncation,
            idle_ms: 60_000,
        };
        Ok(Self {
            pool: BlockPool::new(PoolConfig::new(POOL_BLOCKS))?,
            prefix: PrefixCache::new(BS, PolicyKind::Lru),
            sessions: SessionCache::new(cfg, BS)?,
            root: Xxh3Hasher.root(&HashExtra::new("chat-model", 1)),
            held: Vec::new(),
        })
    }

    /// Does what a turn asks: references on hits, fresh blocks for the new full blocks
    /// (the partial tail is the request's own and is dropped after it), and the commit.
    fn run(&mut self, id: SessionId, turn: &Turn, opened: bool, now: u64) -> Result<(), Error> {
        if opened {
            for &b in &turn.blocks {
                self.pool.retain(b)?; // the session's reference on a prefix-cache hit
            }
        }
        for &b in &turn.released {
            // Truncation handed these back: freed unless the cache still holds them.
            let _freed_or_shared = self.pool.release(b)?;
        }
        let bs = BS as usize;
        assert!(
            turn.cached_tokens < turn.context_tokens || opened,
            "the model computes the last token"
        );
        let full = turn.context_tokens / bs - turn.cached_tokens / bs;
        let fresh: Vec<BlockId> = (0..full)
            .map(|_| self.pool.allocate(D))
            .collect::<Result<_, _>>()?;
        let tail = if !turn.context_tokens.is_multiple_of(bs) {
            Some(self.pool.allocate(D)?)
        } else {
            None
        };
        // ... the model computes tokens cached_tokens.. into `fresh` and `tail` ...
        let mut newly = Vec::new();
        self.sessions
            .commit(&mut self.prefix, &Xxh3Hasher, id, &fresh, now, &mut newly)?;
        for &b in &newly {
            self.pool.retain(b)?; // the prefix cache's share of the system prompt
        }
        if let Some(b) = tail {
            // The partial block is recomputed next turn.
            assert_eq!(self.pool.release(b)?, Released::Freed);
        }
        let mut blocks = turn.blocks.clone();
        blocks.extend(fresh);
        match self.held.iter_mut().find(|(s, _)| *s == id) {
            Some((_, held)) => *held = blocks,
            None => self.held.push((id, blocks)),
        }
        self.check()
    }

    fn open(&mut self, id: SessionId, system: &[u32], now: u64) -> Result<usize, Error> {
        let turn = self
            .sessions
            .open(&mut self.prefix, &Xxh3Hasher, id, self.root, system, now)?;
        self.run(id, &turn, true, now)?;
        Ok(turn.cached_tokens)
    }

    fn turn(&mut self, id: SessionId, tokens: &[u32], now: u64) -> Result<Turn, Error> {
        let turn = self.sessions.turn(&mut self.prefix, id, tokens, now)?;
        self.run(id, &turn, false, now)?;
        Ok(turn)
    }

    /// Every held block's pool references: one per session holding it, plus the cache's.
    fn check(&self) -> Result<(), Error> {
        for (_, blocks) in &self.held {
            for &b in blocks {
                let sessions = self.held.iter().filter(|(_, h)| h.contains(&b)).count() as u32;
                let cache = u32::from(self.prefix.is_cached(b));
                assert_eq!(self.pool.refcount(b)?, sessions + cache, "{b}");
            }
        }
        Ok(())
    }

    /// Hands back what closing or expiring gave, then empties the cache: the pool is whole.
    fn drain(&mut self, released: Vec<BlockId>) -> Result<(), Error> {
        for b in released {
            let _freed_or_cached = self.pool.release(b)?;
        }
        self.held.clear();
        let mut evicted = Vec::new();
        self.prefix.evict(usize::MAX, u64::MAX, &mut evicted);
        for b in evicted {
            assert_eq!(self.pool.release(b)?, Released::Freed);
        }
        assert_eq!(
            self.pool.free_blocks(D)?,
            POOL_BLOCKS as usize,
            "no block leaked"
        );
        Ok(())
    }
}

fn words(first: u32, n: u32) -> Vec<u32> {
    (first..first + n).collect()
}

fn main() -> Result<(), Error> {
    let system = words(1, 32); // two full blocks
    let mut chat = Chat::new(Truncation::KeepSystemAndLastTurns { turns: 2 })?;
    let (alice, bob) = (SessionId(1), SessionId(2));

    assert_eq!(chat.open(alice, &system, 0)?, 0);
    let t = chat.turn(alice, &words(1_000, 20), 1_000)?;
    assert_eq!((t.context_tokens, t.cached_tokens), (52, 32));
    // Bob opens with the same system prompt: shared through the prefix cache.
    assert_eq!(chat.open(bob, &system, 1_500)?, 32);
    println!("bob reused alice's system prompt: 32 tokens");

    // Alice's own turns are private: a plain request with her context hits only the system.
    let mut context = chat.sessions.context(alice).ok_or("open")?.to_vec();
    context.push(7);
    let mut hashes = Vec::new();
    Xxh3Hasher.hash_blocks(chat.root, &context, BS as usize, &mut hashes);
    let hit = chat.prefix.lookup(&hashes, context.len(), 2_000);
    assert_eq!(hit.tokens, 32);
    chat.prefix.release(&hit.blocks)?;

    // Alice's context grows past 96 tokens: the oldest turn goes, the system prompt stays.
    let t = chat.turn(alice, &words(2_000, 30), 3_000)?; // 82 tokens
    assert!(!t.truncated);
    let t = chat.turn(alice, &words(3_000, 25), 4_000)?; // 107 > 96
    assert!(t.truncated);
    assert_eq!(t.context_tokens, 32 + 30 + 25);
    assert_eq!(
        t.cached_tokens, 32,
        "tokens after the cut moved: recomputed"
    );
    assert!(!t.released.is_empty());
    let context = chat.sessions.context(alice).ok_or("open")?;
    assert_eq!(&context[..32], &system[..]);
    println!(
        "alice truncated to {} tokens, {} blocks released",
        t.context_tokens,
        t.released.len()
    );

    // An empty turn is refused: the model must compute at least one token.
    let empty = chat.sessions.turn(&mut chat.prefix, bob, &[], 5_000);
    assert_eq!(empty.err(), Some(SessionError::EmptyTurn { session: bob }));

    // Bob goes quiet; an hour later both sessions have expired.
    let _ = chat.turn(alice, &words(4_000, 5), 10_000)?;
    let mut released = Vec::new();
    assert_eq!(
        chat.sessions
            .expire(&mut chat.prefix, 62_000, &mut released)?,
        1
    );
    assert_eq!(
        chat.sessions.len(),
        1,
        "bob expired, alice was active at 10 s"
    );
    assert_eq!(
        chat.sessions
            .expire(&mut chat.prefix, 80_000, &mut released)?,
        1
    );
    chat.drain(released)?;

    // Keeping the last tokens instead: the system prompt can go too.
    let mut chat = Chat::new(Truncation::LastTokens { tokens: 64 })?;
    let carol = SessionId(3);
    chat.open(carol, &system, 0)?;
    let t = chat.turn(carol, &words(5_000, 70), 1)?; // 102 > 96: keep the last 64
    assert!(t.truncated);
    assert_eq!((t.context_tokens, t.cached_tokens), (64, 0));
    assert_eq!(chat.sessions.context(carol), Some(&words(5_006, 64)[..]));
    let mut released = Vec::new();
    chat.sessions
        .close(&mut chat.prefix, carol, &mut released)?;
    chat.drain(released)?;
    println!("carol kept her last 64 tokens; every block is back in the pool");
    Ok(())
}
