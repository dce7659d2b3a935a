//! [`SessionCache`]: multi-turn contexts bound to a session id.
//!
//! A session holds the KV blocks of its context between turns. Each turn appends only its new
//! tokens; the caller computes the tokens after the held prefix and [`commit`](SessionCache::commit)s
//! the new full blocks. Blocks of the system prompt are shared through the
//! [`PrefixCache`] (any session or request of the tenant may hit them); every later block is
//! private to the session: it never enters the prefix cache, so no other session or request
//! can hit it.
//!
//! When the context outgrows [`SessionConfig::max_tokens`] it is truncated by a
//! [`Truncation`] policy. Tokens after the cut move to new positions, so blocks from the cut on
//! are released and recomputed; the blocks before it stay. Sessions idle for longer than
//! [`SessionConfig::idle_ms`] are closed by [`expire`](SessionCache::expire).

use ahash::AHashMap;
use kvc_core::{BlockId, SessionId};
use thiserror::Error;

use crate::{BlockHash, BlockHasher, PrefixCache};

/// What to keep when a context exceeds its maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Truncation {
    /// Keep the system prompt and at most the last `turns` turns (fewer if they still do not
    /// fit the maximum; never fewer than the newest one).
    KeepSystemAndLastTurns {
        /// Turns kept.
        turns: usize,
    },
    /// Keep the last `tokens` tokens (at most the maximum), system prompt included or not.
    LastTokens {
        /// Tokens kept.
        tokens: usize,
    },
}

/// How sessions are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionConfig {
    /// Largest context, in tokens (the model's context window).
    pub max_tokens: usize,
    /// What to drop when a turn takes the context over `max_tokens`.
    pub truncation: Truncation,
    /// Sessions idle for longer than this are closed by [`SessionCache::expire`].
    pub idle_ms: u64,
}

/// Why a session operation failed. The session is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No open session has this id.
    #[error("{session} is not open")]
    UnknownSession {
        /// The session.
        session: SessionId,
    },
    /// A session with this id is already open.
    #[error("{session} is already open")]
    AlreadyOpen {
        /// The session.
        session: SessionId,
    },
    /// A commit gave a different number of blocks than the context's new full blocks.
    #[error("{session} expected {expected} new full blocks, got {got}")]
    BlockCountMismatch {
        /// The session.
        session: SessionId,
        /// Blocks expected.
        expected: usize,
        /// Blocks given.
        got: usize,
    },
    /// Even after truncation the context does not fit (a single turn larger than allowed).
    #[error("{session}: a turn of {tokens} tokens leaves no context within {max_tokens}")]
    TurnTooLong {
        /// The session.
        session: SessionId,
        /// Tokens of the context after the best truncation.
        tokens: usize,
        /// The maximum.
        max_tokens: usize,
    },
}

/// What the caller must do for a turn.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use = "a turn carries blocks to compute from and blocks to free"]
pub struct Turn {
    /// Tokens of the context (after truncation) the model must attend to.
    pub context_tokens: usize,
    /// The first `cached_tokens` tokens already have KV in `blocks`; compute the rest.
    pub cached_tokens: usize,
    /// Blocks holding the cached tokens, in context order.
    pub blocks: Vec<BlockId>,
    /// Private blocks the session dropped (truncation): free them.
    pub released: Vec<BlockId>,
    /// Whether this turn truncated the context.
    pub truncated: bool,
}

#[derive(Debug)]
struct Session {
    root: BlockHash,
    system_len: usize,
    tokens: Vec<u32>,
    /// Start of each turn after the system prompt.
    turn_starts: Vec<usize>,
    /// Leading blocks held through the prefix cache (looked up, so in use there).
    shared: Vec<BlockId>,
    /// Blocks after `shared`, held by the session alone.
    private: Vec<BlockId>,
    last_active_ms: u64,
}

impl Session {
    fn held(&self) -> usize {
        self.shared.len() + self.private.len()
    }
}

/// Multi-turn contexts bound to session ids.
///
/// ```
/// use kvc_core::{BlockId, SessionId};
/// use kvc_reuse::{
///     BlockHasher, HashExtra, PolicyKind, PrefixCache, SessionCache, SessionConfig, Truncation,
///     Xxh3Hasher,
/// };
///
/// let cfg = SessionConfig {
///     max_tokens: 64,
///     truncation: Truncation::KeepSystemAndLastTurns { turns: 2 },
///     idle_ms: 60_000,
/// };
/// let mut prefix = PrefixCache::new(4, PolicyKind::Lru);
/// let mut sessions = SessionCache::new(cfg, 4);
/// let root = Xxh3Hasher.root(&HashExtra::new("m", 1));
/// let id = SessionId(1);
///
/// let turn = sessions.open(&mut prefix, &Xxh3Hasher, id, root, &[1, 2, 3, 4, 5, 6, 7, 8], 0)?;
/// assert_eq!(turn.cached_tokens, 0);
/// sessions.commit(&mut prefix, &Xxh3Hasher, id, &[BlockId(0), BlockId(1)], 0)?;
///
/// let turn = sessions.turn(&mut prefix, id, &[9, 10, 11, 12, 13], 1)?;
/// assert_eq!((turn.context_tokens, turn.cached_tokens), (13, 8)); // compute only the new turn
/// # Ok::<(), kvc_reuse::SessionError>(())
/// ```
#[derive(Debug)]
pub struct SessionCache {
    cfg: SessionConfig,
    block_size: usize,
    sessions: AHashMap<SessionId, Session>,
    hashes: Vec<BlockHash>,
}

impl SessionCache {
    /// No sessions yet; blocks of `block_size` tokens (the prefix cache's).
    #[must_use]
    pub fn new(cfg: SessionConfig, block_size: u32) -> Self {
        Self {
            cfg,
            block_size: block_size.max(1) as usize,
            sessions: AHashMap::new(),
            hashes: Vec::new(),
        }
    }

    /// Open sessions.
    #[must_use]
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is open.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The context of session `id`, if open.
    #[must_use]
    pub fn context(&self, id: SessionId) -> Option<&[u32]> {
        self.sessions.get(&id).map(|s| s.tokens.as_slice())
    }

    /// Opens session `id` under the chain root `root` (the tenant's) with its system prompt.
    /// Full blocks of the system prompt already in `prefix` are shared from it.
    pub fn open<H: BlockHasher + ?Sized>(
        &mut self,
        prefix: &mut PrefixCache,
        hasher: &H,
        id: SessionId,
        root: BlockHash,
        system: &[u32],
        now_ms: u64,
    ) -> Result<Turn, SessionError> {
        if self.sessions.contains_key(&id) {
            return Err(SessionError::AlreadyOpen { session: id });
        }
        if system.len() > self.cfg.max_tokens {
            return Err(SessionError::TurnTooLong {
                session: id,
                tokens: system.len(),
                max_tokens: self.cfg.max_tokens,
            });
        }
        self.hashes.clear();
        hasher.hash_blocks(root, system, self.block_size, &mut self.hashes);
        // `+ 1`: the prompt goes on after the system prompt, so its last full block may hit.
        let hit = prefix.lookup(&self.hashes, system.len() + 1, now_ms);
        let session = Session {
            root,
            system_len: system.len(),
            tokens: system.to_vec(),
            turn_starts: Vec::new(),
            shared: hit.blocks,
            private: Vec::new(),
            last_active_ms: now_ms,
        };
        let turn = Turn {
            context_tokens: session.tokens.len(),
            cached_tokens: session.held() * self.block_size,
            blocks: session.shared.clone(),
            released: Vec::new(),
            truncated: false,
        };
        self.sessions.insert(id, session);
        Ok(turn)
    }

    /// Appends a turn's new tokens to session `id`, truncating if the context outgrows the
    /// maximum, and says what is cached and what to compute.
    pub fn turn(
        &mut self,
        prefix: &mut PrefixCache,
        id: SessionId,
        new_tokens: &[u32],
        now_ms: u64,
    ) -> Result<Turn, SessionError> {
        let max = self.cfg.max_tokens;
        let bs = self.block_size;
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(SessionError::UnknownSession { session: id })?;
        let total = s.tokens.len() + new_tokens.len();
        // Plan the truncation before changing anything.
        let cut = if total <= max {
            None
        } else {
            match self.cfg.truncation {
                Truncation::KeepSystemAndLastTurns { turns } => {
                    let mut starts = s.turn_starts.clone();
                    starts.push(s.tokens.len());
                    let mut first = starts.len().saturating_sub(turns.max(1));
                    let kept = |first: usize| s.system_len + (total - starts[first]);
                    while first + 1 < starts.len() && kept(first) > max {
                        first += 1;
                    }
                    if kept(first) > max {
                        return Err(SessionError::TurnTooLong {
                            session: id,
                            tokens: kept(first),
                            max_tokens: max,
                        });
                    }
                    Some((s.system_len, starts[first]))
                }
                Truncation::LastTokens { tokens } => {
                    let keep = tokens.min(max).max(1);
                    Some((0, total - keep))
                }
            }
        };
        let mut released = Vec::new();
        let truncated = cut.is_some();
        s.tokens.extend_from_slice(new_tokens);
        s.turn_starts.push(total - new_tokens.len());
        if let Some((keep_head, drop_from)) = cut {
            // Tokens [keep_head, drop_from) go; blocks from the one holding `keep_head` on
            // no longer match their positions.
            s.tokens.drain(keep_head..drop_from);
            let removed = drop_from - keep_head;
            s.turn_starts = s
                .turn_starts
                .iter()
                .filter(|&&t| t >= drop_from)
                .map(|&t| t - removed)
                .collect();
            let valid = keep_head / bs;
            if s.shared.len() > valid {
                let gone = s.shared.split_off(valid);
                // Held through lookups: give them back to the prefix cache.
                let _ = prefix.release(&gone);
                released.append(&mut s.private);
            } else {
                let keep_private = valid - s.shared.len();
                if s.private.len() > keep_private {
                    released.extend(s.private.drain(keep_private..));
                }
            }
            if keep_head == 0 {
                s.system_len = 0;
            }
        }
        s.last_active_ms = now_ms;
        let mut blocks = s.shared.clone();
        blocks.extend_from_slice(&s.private);
        Ok(Turn {
            context_tokens: s.tokens.len(),
            cached_tokens: s.held() * bs,
            blocks,
            released,
            truncated,
        })
    }

    /// Records the blocks the caller computed for session `id`: `new_blocks` holds the
    /// context's full blocks after those the session already held, in order. Full blocks of
    /// the system prompt are also offered to `prefix` so other sessions can share them.
    pub fn commit<H: BlockHasher + ?Sized>(
        &mut self,
        prefix: &mut PrefixCache,
        hasher: &H,
        id: SessionId,
        new_blocks: &[BlockId],
        now_ms: u64,
    ) -> Result<(), SessionError> {
        let bs = self.block_size;
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(SessionError::UnknownSession { session: id })?;
        let expected = s.tokens.len() / bs - s.held();
        if new_blocks.len() != expected {
            return Err(SessionError::BlockCountMismatch {
                session: id,
                expected,
                got: new_blocks.len(),
            });
        }
        s.last_active_ms = now_ms;
        let system_full = s.system_len / bs;
        let mut rest = new_blocks;
        if s.private.is_empty() && s.shared.len() < system_full {
            // Share the system prompt's full blocks through the prefix cache: offer them,
            // then hold them with a lookup like any other shared block.
            let n = (system_full - s.shared.len()).min(rest.len());
            self.hashes.clear();
            hasher.hash_blocks(s.root, &s.tokens[..system_full * bs], bs, &mut self.hashes);
            let mut all = s.shared.clone();
            all.extend_from_slice(&rest[..n]);
            let mut newly = Vec::new();
            let offered = all.len();
            if prefix
                .insert(&self.hashes[..offered], &all, now_ms, &mut newly)
                .is_ok()
            {
                let old = std::mem::take(&mut s.shared);
                let hit = prefix.lookup(&self.hashes[..offered], offered * bs + 1, now_ms);
                let _ = prefix.release(&old);
                if hit.blocks == all {
                    s.shared = hit.blocks;
                    rest = &rest[n..];
                } else {
                    // Another block already caches this prefix: keep ours private.
                    let _ = prefix.release(&hit.blocks);
                    s.shared = old;
                    let _ = prefix.lookup(
                        &self.hashes[..s.shared.len()],
                        s.shared.len() * bs + 1,
                        now_ms,
                    );
                }
            }
        }
        s.private.extend_from_slice(rest);
        Ok(())
    }

    /// Closes session `id`: its private blocks are appended to `released` for the caller to
    /// free, its shared blocks are released in `prefix` (they stay cached there).
    pub fn close(
        &mut self,
        prefix: &mut PrefixCache,
        id: SessionId,
        released: &mut Vec<BlockId>,
    ) -> Result<(), SessionError> {
        let s = self
            .sessions
            .remove(&id)
            .ok_or(SessionError::UnknownSession { session: id })?;
        let _ = prefix.release(&s.shared);
        released.extend(s.private);
        Ok(())
    }

    /// Closes every session idle for longer than the configured time, appending their
    /// private blocks to `released`; returns how many sessions closed.
    pub fn expire(
        &mut self,
        prefix: &mut PrefixCache,
        now_ms: u64,
        released: &mut Vec<BlockId>,
    ) -> usize {
        let idle = self.cfg.idle_ms;
        let expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| now_ms.saturating_sub(s.last_active_ms) > idle)
            .map(|(&id, _)| id)
            .collect();
        for &id in &expired {
            let _ = self.close(prefix, id, released);
        }
        expired.len()
    }
}
