//! [`SessionCache`]: multi-turn contexts bound to a session id.
//!
//! A session holds the KV blocks of its context between turns. Each turn appends only its new
//! tokens; the caller computes the tokens after the held prefix and [`commit`](SessionCache::commit)s
//! the new full blocks. Blocks of the system prompt are shared through the
//! [`PrefixCache`] (any session or request of the tenant may hit them); every later block is
//! private to the session: it never enters the prefix cache, so no other session or request
//! can hit it.
//!
//! A session is a holder under the ownership rule of [`kvc_core::ReuseIndex`]: it holds one
//! pool reference on every block of its context, and counts as one user of each shared block
//! in the prefix cache. The caller keeps the pool's counts:
//!
//! - [`open`](SessionCache::open): take one reference on each block of [`Turn::blocks`] (prefix
//!   cache hits) for the session;
//! - [`commit`](SessionCache::commit): the references the caller took when it allocated the
//!   new blocks become the session's; take one more on each block appended to `newly_cached`,
//!   for the prefix cache;
//! - [`turn`](SessionCache::turn), [`close`](SessionCache::close) and
//!   [`expire`](SessionCache::expire): drop one reference on each block they hand back in
//!   `released` (shared blocks stay cached: the prefix cache keeps its own reference).
//!
//! When the context outgrows [`SessionConfig::max_tokens`] it is truncated by a
//! [`Truncation`] policy. Tokens after the cut move to new positions, so blocks from the cut on
//! are released and recomputed; the blocks before it stay. Sessions idle for longer than
//! [`SessionConfig::idle_ms`] are closed by [`expire`](SessionCache::expire).

use ahash::AHashMap;
use kvc_core::{BlockId, ReuseError, SessionId};
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
    /// Keep the last `tokens` tokens (at most the maximum, at least 1), system prompt
    /// included or not: a turn longer than that keeps only its own last tokens.
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

/// Why a [`SessionConfig`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SessionConfigError {
    /// `max_tokens` is 0: no context, not even a system prompt, would fit.
    #[error("sessions need a context of at least 1 token (max_tokens is 0)")]
    ZeroMaxTokens,
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
    /// A committed block is already tracked by the prefix cache: new blocks must be freshly
    /// computed for this session.
    #[error("{session}: {block} is already in the prefix cache, not a newly computed block")]
    BlockCached {
        /// The session.
        session: SessionId,
        /// The block.
        block: BlockId,
    },
    /// The prefix cache refused to count the session's use of its shared blocks: the session
    /// and the cache disagree (a block released by someone else on the session's behalf).
    #[error("{session}: the prefix cache refused the session's blocks: {source}")]
    Cache {
        /// The session.
        session: SessionId,
        /// What the cache said.
        source: ReuseError,
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
    /// The prefix cache passed in has another block size than the sessions were made with:
    /// the sessions' block hashes and token counts would be wrong there.
    #[error(
        "{session}: the prefix cache has {cache}-token blocks but the sessions {sessions}-token blocks"
    )]
    BlockSizeMismatch {
        /// The session.
        session: SessionId,
        /// The prefix cache's block size.
        cache: u32,
        /// The sessions' block size.
        sessions: u32,
    },
    /// A turn with no new tokens: there is nothing to compute, yet the model must compute at
    /// least the context's last token to produce logits.
    #[error("{session}: a turn must add at least one token")]
    EmptyTurn {
        /// The session.
        session: SessionId,
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
    /// Blocks holding the cached tokens, in context order. From
    /// [`open`](SessionCache::open) they are prefix-cache hits: take one pool reference on
    /// each for the session. From [`turn`](SessionCache::turn) they are the blocks the session
    /// already holds.
    pub blocks: Vec<BlockId>,
    /// Blocks the session dropped (truncation): drop the session's pool reference on each.
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
/// use kvc_reuse::{
///     BlockHasher, BlockId, HashExtra, PolicyKind, PrefixCache, ReuseError, SessionCache,
///     SessionConfig, SessionId, Truncation, Xxh3Hasher,
/// };
///
/// let cfg = SessionConfig {
///     max_tokens: 64,
///     truncation: Truncation::KeepSystemAndLastTurns { turns: 2 },
///     idle_ms: 60_000,
/// };
/// let mut prefix = PrefixCache::new(4, PolicyKind::Lru);
/// let mut sessions = SessionCache::new(cfg, 4).expect("max_tokens is above 0");
/// let root = Xxh3Hasher.root(&HashExtra::new("m", 1));
/// let id = SessionId(1);
///
/// let turn = sessions.open(&mut prefix, &Xxh3Hasher, id, root, &[1, 2, 3, 4, 5, 6, 7, 8], 0)?;
/// assert_eq!(turn.cached_tokens, 0);
/// let mut newly = Vec::new(); // the prefix cache's share: take a pool reference on each
/// sessions.commit(&mut prefix, &Xxh3Hasher, id, &[BlockId(0), BlockId(1)], 0, &mut newly)?;
/// assert_eq!(newly, [BlockId(0), BlockId(1)]); // the system prompt is shared
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
    /// No sessions yet; blocks of `block_size` tokens, which must be the prefix cache's
    /// ([`open`](Self::open), [`turn`](Self::turn) and [`commit`](Self::commit) refuse a
    /// prefix cache of another block size with [`SessionError::BlockSizeMismatch`]). A
    /// `block_size` of 0 is taken as 1, as [`PrefixCache::new`] takes it.
    ///
    /// # Errors
    /// [`SessionConfigError::ZeroMaxTokens`].
    pub fn new(cfg: SessionConfig, block_size: u32) -> Result<Self, SessionConfigError> {
        if cfg.max_tokens == 0 {
            return Err(SessionConfigError::ZeroMaxTokens);
        }
        Ok(Self {
            cfg,
            block_size: block_size.max(1) as usize,
            sessions: AHashMap::new(),
            hashes: Vec::new(),
        })
    }

    /// Tokens per block (the prefix cache's, which every call checks).
    #[must_use]
    pub fn block_size(&self) -> u32 {
        self.block_size as u32
    }

    /// [`SessionError::BlockSizeMismatch`] unless `prefix` has the sessions' block size.
    fn check_block_size(&self, prefix: &PrefixCache, id: SessionId) -> Result<(), SessionError> {
        if prefix.block_size() as usize == self.block_size {
            Ok(())
        } else {
            Err(SessionError::BlockSizeMismatch {
                session: id,
                cache: prefix.block_size(),
                sessions: self.block_size as u32,
            })
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
    ///
    /// # Errors
    /// [`SessionError::AlreadyOpen`], [`SessionError::BlockSizeMismatch`],
    /// [`SessionError::TurnTooLong`] (a system prompt over `max_tokens`): nothing changes.
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
        self.check_block_size(prefix, id)?;
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
    /// maximum, and says what is cached and what to compute. The cached tokens never cover
    /// the whole context: at least the new turn's tokens are left to compute.
    ///
    /// # Errors
    /// [`SessionError::UnknownSession`], [`SessionError::BlockSizeMismatch`],
    /// [`SessionError::EmptyTurn`] (no new tokens), [`SessionError::TurnTooLong`]: nothing
    /// changes.
    pub fn turn(
        &mut self,
        prefix: &mut PrefixCache,
        id: SessionId,
        new_tokens: &[u32],
        now_ms: u64,
    ) -> Result<Turn, SessionError> {
        if !self.sessions.contains_key(&id) {
            return Err(SessionError::UnknownSession { session: id });
        }
        self.check_block_size(prefix, id)?;
        if new_tokens.is_empty() {
            return Err(SessionError::EmptyTurn { session: id });
        }
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
                // Counted as the session's in the prefix cache: give them back there too.
                let counted = prefix.release(&gone);
                released.extend_from_slice(&gone);
                released.append(&mut s.private);
                if let Err(source) = counted {
                    debug_assert!(false, "the session held {gone:?}: {source}");
                    s.last_active_ms = now_ms;
                    return Err(SessionError::Cache {
                        session: id,
                        source,
                    });
                }
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
    /// context's full blocks after those the session already held, in order; the caller's
    /// references on them become the session's. Full blocks of the system prompt are offered
    /// to `prefix` so other sessions can share them: those it caches are appended to
    /// `newly_cached` (take one pool reference on each for the prefix cache). A block whose
    /// tokens another session or request already cached under another block stays private,
    /// with every block after it.
    ///
    /// # Errors
    /// [`SessionError::UnknownSession`], [`SessionError::BlockSizeMismatch`],
    /// [`SessionError::BlockCountMismatch`], [`SessionError::BlockCached`]: nothing changes.
    pub fn commit<H: BlockHasher + ?Sized>(
        &mut self,
        prefix: &mut PrefixCache,
        hasher: &H,
        id: SessionId,
        new_blocks: &[BlockId],
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
    ) -> Result<(), SessionError> {
        if !self.sessions.contains_key(&id) {
            return Err(SessionError::UnknownSession { session: id });
        }
        self.check_block_size(prefix, id)?;
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
        if let Some(&block) = new_blocks.iter().find(|&&b| prefix.is_cached(b)) {
            return Err(SessionError::BlockCached { session: id, block });
        }
        s.last_active_ms = now_ms;
        let system_full = s.system_len / bs;
        let mut rest = new_blocks;
        if s.private.is_empty() && s.shared.len() < system_full {
            // Share the system prompt's full blocks through the prefix cache. The session
            // holds the blocks it offers: a newly cached one counts the session as its user.
            let n = (system_full - s.shared.len()).min(rest.len());
            let offered = s.shared.len() + n;
            self.hashes.clear();
            hasher.hash_blocks(s.root, &s.tokens[..offered * bs], bs, &mut self.hashes);
            let mut all = s.shared.clone();
            all.extend_from_slice(&rest[..n]);
            let before = newly_cached.len();
            let inserted = prefix.insert(&self.hashes, &all, now_ms, newly_cached);
            // Cached ones are a leading run of the new blocks; the rest stay private.
            let cached = newly_cached.len() - before;
            debug_assert_eq!(&newly_cached[before..], &rest[..cached]);
            s.shared.extend_from_slice(&rest[..cached]);
            rest = &rest[cached..];
            if let Err(source) = inserted {
                // Lengths match and no new block was tracked: the cache broke its own rules.
                debug_assert!(false, "insert of checked blocks failed: {source}");
                s.private.extend_from_slice(rest);
                return Err(SessionError::Cache {
                    session: id,
                    source,
                });
            }
        }
        s.private.extend_from_slice(rest);
        Ok(())
    }

    /// Closes session `id`: every block it held is appended to `released` (drop the session's
    /// pool reference on each); its shared blocks stop counting it as a user in `prefix` and
    /// stay cached there.
    ///
    /// # Errors
    /// [`SessionError::UnknownSession`]; [`SessionError::Cache`] if `prefix` did not count the
    /// session on a shared block (the session is closed and its blocks handed back anyway).
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
        let counted = prefix.release(&s.shared);
        released.extend_from_slice(&s.shared);
        released.extend(s.private);
        counted.map_err(|source| {
            debug_assert!(false, "{id} held its shared blocks: {source}");
            SessionError::Cache {
                session: id,
                source,
            }
        })
    }

    /// Closes every session idle for longer than the configured time, appending their blocks
    /// to `released` (as [`close`](Self::close)); returns how many sessions closed.
    ///
    /// # Errors
    /// [`SessionError::Cache`] as [`close`](Self::close) (every expired session is still
    /// closed).
    pub fn expire(
        &mut self,
        prefix: &mut PrefixCache,
        now_ms: u64,
        released: &mut Vec<BlockId>,
    ) -> Result<usize, SessionError> {
        let idle = self.cfg.idle_ms;
        let expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| now_ms.saturating_sub(s.last_active_ms) > idle)
            .map(|(&id, _)| id)
            .collect();
        let mut result = Ok(expired.len());
        for &id in &expired {
            if let Err(e) = self.close(prefix, id, released) {
                result = result.and(Err(e));
            }
        }
        result
    }
}
