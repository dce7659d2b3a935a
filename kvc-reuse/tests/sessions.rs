//! Multi-turn sessions: append-only turns, sharing of the system prompt, privacy of later
//! blocks, truncation policies and idle expiry.

use kvc_core::{BlockId, SessionId};
use kvc_reuse::{
    BlockHash, BlockHasher, HashExtra, PolicyKind, PrefixCache, SessionCache, SessionConfig,
    SessionError, Truncation, Xxh3Hasher,
};

const BS: u32 = 4;

struct World {
    prefix: PrefixCache,
    sessions: SessionCache,
    root: BlockHash,
    next: u32,
}

impl World {
    fn new(max_tokens: usize, truncation: Truncation) -> Self {
        Self {
            prefix: PrefixCache::new(BS, PolicyKind::Lru),
            sessions: SessionCache::new(
                SessionConfig {
                    max_tokens,
                    truncation,
                    idle_ms: 1_000,
                },
                BS,
            )
            .unwrap(),
            root: Xxh3Hasher.root(&HashExtra::new("m", 1)),
            next: 0,
        }
    }

    /// Computes what a turn asks for: fresh blocks for the new full blocks, then commits.
    fn compute(&mut self, id: SessionId, context_tokens: usize, cached_tokens: usize, now: u64) {
        let new = context_tokens / BS as usize - cached_tokens / BS as usize;
        let blocks: Vec<BlockId> = (self.next..self.next + new as u32).map(BlockId).collect();
        self.next += new as u32;
        self.sessions
            .commit(
                &mut self.prefix,
                &Xxh3Hasher,
                id,
                &blocks,
                now,
                &mut Vec::new(),
            )
            .unwrap();
    }

    fn open(&mut self, id: SessionId, system: &[u32], now: u64) -> usize {
        let t = self
            .sessions
            .open(&mut self.prefix, &Xxh3Hasher, id, self.root, system, now)
            .unwrap();
        self.compute(id, t.context_tokens, t.cached_tokens, now);
        t.cached_tokens
    }

    fn turn(&mut self, id: SessionId, tokens: &[u32], now: u64) -> kvc_reuse::Turn {
        let t = self
            .sessions
            .turn(&mut self.prefix, id, tokens, now)
            .unwrap();
        self.compute(id, t.context_tokens, t.cached_tokens, now);
        t
    }
}

const SYSTEM: [u32; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

#[test]
fn turns_append_only_their_new_tokens() {
    let mut w = World::new(1_000, Truncation::KeepSystemAndLastTurns { turns: 8 });
    let s = SessionId(1);
    assert_eq!(w.open(s, &SYSTEM, 0), 0);
    let t = w.turn(s, &[10, 11, 12, 13, 14, 15], 1);
    assert_eq!((t.context_tokens, t.cached_tokens), (14, 8));
    // The partial block (tokens 12..14) is recomputed; everything before is held.
    let t = w.turn(s, &[20, 21, 22, 23, 24], 2);
    assert_eq!((t.context_tokens, t.cached_tokens), (19, 12));
    assert_eq!(t.blocks.len(), 3);
    assert!(!t.truncated && t.released.is_empty());
    assert_eq!(w.sessions.context(s).unwrap().len(), 19);
}

#[test]
fn system_prompt_is_shared_and_later_blocks_are_private() {
    let mut w = World::new(1_000, Truncation::KeepSystemAndLastTurns { turns: 8 });
    let (a, b) = (SessionId(1), SessionId(2));
    w.open(a, &SYSTEM, 0);
    let _ = w.turn(a, &[10, 11, 12, 13, 14, 15, 16, 17, 18], 1);
    // Session b with the same system prompt shares its two full blocks from the prefix cache.
    assert_eq!(w.open(b, &SYSTEM, 2), 8);
    // But neither b nor a plain request can hit a's turn, even with identical tokens.
    let mut a_context = Vec::new();
    Xxh3Hasher.hash_blocks(
        w.root,
        w.sessions.context(a).unwrap(),
        BS as usize,
        &mut a_context,
    );
    let hit = w.prefix.lookup(&a_context, 100, 3);
    assert_eq!(hit.tokens, 8, "only the shared system prompt hits");
    w.prefix.release(&hit.blocks).unwrap();
    let t = w.turn(b, &[10, 11, 12, 13, 14, 15, 16, 17, 18], 3);
    assert_eq!(t.cached_tokens, 8);
    // Closing a hands back all its blocks (2 shared, 2 private); the shared ones stay cached.
    let mut freed = Vec::new();
    w.sessions.close(&mut w.prefix, a, &mut freed).unwrap();
    assert_eq!(freed.len(), 4);
    assert_eq!(w.prefix.hittable_blocks(), 2);
    let mut evicted = Vec::new();
    w.prefix.evict(10, 4, &mut evicted);
    assert!(evicted.is_empty(), "b still holds the shared system prompt");
}

#[test]
fn keep_system_and_last_turns_truncates_and_releases_the_rest() {
    let mut w = World::new(24, Truncation::KeepSystemAndLastTurns { turns: 2 });
    let s = SessionId(7);
    w.open(s, &SYSTEM, 0);
    let _ = w.turn(s, &[10, 11, 12, 13], 1); // 12 tokens
    let _ = w.turn(s, &[20, 21, 22, 23], 2); // 16
    let _ = w.turn(s, &[30, 31, 32, 33], 3); // 20
    let t = w.turn(s, &[40, 41, 42, 43, 44, 45, 46, 47], 4); // 28 > 24: drop the oldest turns
    assert!(t.truncated);
    let ctx = w.sessions.context(s).unwrap();
    let mut want = SYSTEM.to_vec();
    want.extend([30, 31, 32, 33, 40, 41, 42, 43, 44, 45, 46, 47]);
    assert_eq!(ctx, want.as_slice());
    // The system prompt's blocks are still valid; the three turn blocks were released.
    assert_eq!(t.cached_tokens, 8);
    assert_eq!(t.released.len(), 3);
}

#[test]
fn last_tokens_truncation_and_too_long_turns() {
    let mut w = World::new(16, Truncation::LastTokens { tokens: 12 });
    let s = SessionId(3);
    w.open(s, &SYSTEM, 0);
    let t = w.turn(s, &[10, 11, 12, 13, 14, 15, 16, 17, 18, 19], 1); // 18 > 16
    assert!(t.truncated);
    assert_eq!(t.context_tokens, 12);
    assert_eq!(
        t.cached_tokens, 0,
        "every position moved: recompute everything"
    );
    assert_eq!(
        w.sessions.context(s).unwrap(),
        &[7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    );
    // With the turn policy, a single turn bigger than the maximum is an error, nothing changes.
    let mut w = World::new(16, Truncation::KeepSystemAndLastTurns { turns: 4 });
    w.open(s, &SYSTEM, 0);
    let too_long: Vec<u32> = (0..20).collect();
    let err = w.sessions.turn(&mut w.prefix, s, &too_long, 1).unwrap_err();
    assert!(matches!(err, SessionError::TurnTooLong { .. }), "{err}");
    assert_eq!(w.sessions.context(s).unwrap(), &SYSTEM);
}

#[test]
fn idle_sessions_expire_and_errors_are_typed() {
    let mut w = World::new(100, Truncation::LastTokens { tokens: 100 });
    let (a, b) = (SessionId(1), SessionId(2));
    w.open(a, &SYSTEM, 0);
    let _ = w.turn(a, &[9, 9, 9, 9], 0);
    w.open(b, &SYSTEM, 500);
    let mut freed = Vec::new();
    assert_eq!(w.sessions.expire(&mut w.prefix, 1_200, &mut freed), Ok(1));
    assert_eq!(
        freed.len(),
        3,
        "a's two shared system blocks and its private turn block"
    );
    assert!(w.sessions.context(a).is_none());
    assert_eq!(w.sessions.len(), 1);
    assert_eq!(
        w.sessions.turn(&mut w.prefix, a, &[1], 1_300).unwrap_err(),
        SessionError::UnknownSession { session: a }
    );
    assert!(matches!(
        w.sessions
            .open(&mut w.prefix, &Xxh3Hasher, b, w.root, &SYSTEM, 1_300),
        Err(SessionError::AlreadyOpen { .. })
    ));
    let err = w
        .sessions
        .commit(
            &mut w.prefix,
            &Xxh3Hasher,
            b,
            &[BlockId(99)],
            1_300,
            &mut Vec::new(),
        )
        .unwrap_err();
    assert!(matches!(
        err,
        SessionError::BlockCountMismatch {
            expected: 0,
            got: 1,
            ..
        }
    ));
}

#[test]
fn a_prefix_cache_of_another_block_size_is_refused() {
    // Sessions of 4-token blocks over a prefix cache of 16-token blocks would cache 4-token
    // hashes there, and a later lookup would claim 16 tokens for a block holding 4.
    let mut w = World::new(64, Truncation::LastTokens { tokens: 32 });
    let mut other = PrefixCache::new(16, PolicyKind::Lru);
    let id = SessionId(1);
    let mismatch = SessionError::BlockSizeMismatch {
        session: id,
        cache: 16,
        sessions: BS,
    };
    let opened = w
        .sessions
        .open(&mut other, &Xxh3Hasher, id, w.root, &SYSTEM, 0);
    assert_eq!(opened, Err(mismatch.clone()));
    assert!(w.sessions.is_empty(), "nothing opened");
    // Opened over the right cache, the other one is refused by turn and commit too.
    assert_eq!(w.open(id, &SYSTEM, 0), 0);
    assert_eq!(
        w.sessions.turn(&mut other, id, &[9, 10], 1),
        Err(mismatch.clone())
    );
    assert_eq!(w.sessions.context(id), Some(&SYSTEM[..]), "unchanged");
    let t = w
        .sessions
        .turn(&mut w.prefix, id, &[9, 10, 11, 12], 1)
        .unwrap();
    assert_eq!((t.context_tokens, t.cached_tokens), (12, 8));
    let mut newly = Vec::new();
    assert_eq!(
        w.sessions
            .commit(&mut other, &Xxh3Hasher, id, &[BlockId(90)], 1, &mut newly),
        Err(mismatch)
    );
    assert!(other.is_empty() && newly.is_empty());
    assert_eq!(w.sessions.block_size(), BS);
}

#[test]
fn an_empty_turn_is_refused_so_the_last_token_is_always_computed() {
    let mut w = World::new(64, Truncation::LastTokens { tokens: 32 });
    let id = SessionId(1);
    w.open(id, &SYSTEM, 0);
    // The context ends on a block boundary and every block is held: an empty turn would
    // report the whole context cached, leaving no token to compute logits from.
    assert_eq!(
        w.sessions.turn(&mut w.prefix, id, &[], 1),
        Err(SessionError::EmptyTurn { session: id })
    );
    assert_eq!(w.sessions.context(id), Some(&SYSTEM[..]));
    let t = w.turn(id, &[9], 2);
    assert_eq!((t.context_tokens, t.cached_tokens), (9, 8));
}
