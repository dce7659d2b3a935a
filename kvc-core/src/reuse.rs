//! The [`ReuseIndex`] trait a scheduler consults to reuse computed KV: the longest cached
//! prefix of a prompt (or a session's earlier turns), the offer of newly computed blocks, and
//! eviction when memory is needed.
//!
//! The ownership rule every method follows is on [`ReuseIndex`].

use thiserror::Error;

use crate::{BlockId, Retention, SessionId, StoreKey, TenantId};

/// A cached block as the tiers below device memory see it when it leaves the device (written
/// back when evicted, or through when cached): the key it is stored under, and the retention
/// it had on the device then, so a tier can refuse blocks below its floor (a host tier's
/// `min_priority`) or rank what it keeps, until the pin expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TierKey {
    /// The block's key: its chained hash.
    pub key: StoreKey,
    /// Its retention then: the priority in force (0–100; [`Retention::DEFAULT_PRIORITY`]
    /// unless pinned) and, for a pin with an expiry, when it decays to the default.
    pub retention: Retention,
}

/// Whose cache a lookup or insert may touch: a tenant's, and optionally one session's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReuseScope {
    /// The tenant: lookups never hit another tenant's blocks unless their salts are shared.
    pub tenant: TenantId,
    /// The multi-turn session the request continues, if any.
    pub session: Option<SessionId>,
}

/// A cache hit: the first `blocks.len()` full blocks of the prompt are already computed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use = "hit blocks are in use by the caller: take a pool reference on each, release them when done"]
pub struct PrefixHit {
    /// The cached blocks, in prompt order.
    pub blocks: Vec<BlockId>,
    /// Tokens they cover (`blocks.len() × block size`; never the whole prompt, so the last
    /// prompt token is always computed and yields logits).
    pub tokens: u64,
}

/// Why a [`ReuseIndex`] (or a cache behind one) refused an operation.
///
/// Each variant says what was kept: calls that take several blocks process every block they
/// can and report the first failure.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReuseError {
    /// A release of a cached block no holder uses (released more often than it was looked up,
    /// inserted or acquired). The block's use count stays 0.
    #[error("{block} is cached but not in use: released more often than it was held")]
    NotInUse {
        /// The block.
        block: BlockId,
    },
    /// An insert whose blocks do not match its tokens' full blocks one to one. Nothing was
    /// cached.
    #[error(
        "insert of {full_blocks} full blocks of tokens with {blocks} blocks: one block per full block is required"
    )]
    LengthMismatch {
        /// Full blocks of the tokens (or hashes) given.
        full_blocks: usize,
        /// Blocks given.
        blocks: usize,
    },
    /// An insert offered a block that already caches another hash (the caller wrote new tokens
    /// into a cached block). Blocks before `index` were processed; nothing from `index` on was.
    #[error("{block} (position {index}) already caches another hash")]
    BlockAlreadyCached {
        /// The block.
        block: BlockId,
        /// Its position in the insert.
        index: usize,
    },
    /// A block's use count would exceed `u32::MAX` holders. The count is unchanged.
    #[error("{block} has too many holders")]
    TooManyHolders {
        /// The block.
        block: BlockId,
    },
    /// A reset while blocks are in use: their holders still read them. Nothing was dropped.
    #[error("{in_use} cached blocks are still in use")]
    InUse {
        /// Cached blocks with a use count above 0.
        in_use: usize,
    },
    /// An ending whose blocks the index caches, but not as one chain from a prompt's first
    /// block (block `index` is not cached right after block `index - 1`). Nothing changed.
    #[error(
        "block {index} of the ended conversation is cached, but not right after block {index} - 1 of it"
    )]
    BrokenChain {
        /// The position of the block among the conversation's full blocks.
        index: usize,
    },
}

/// A prefix and session cache as a scheduler sees it.
///
/// Implemented by `kvc_reuse` caches; a scheduler with reuse off uses [`NoReuse`].
///
/// # Ownership
///
/// The index never allocates or frees memory; it tells the caller which blocks to take or drop
/// a pool reference on, and the caller does that through its
/// [`BlockAllocator`](crate::BlockAllocator). One rule covers every block:
///
/// - **Every holder of a block holds one pool reference on it**: each running request whose
///   table contains it, the index while the block is cached, each session that keeps it, each
///   transfer in flight.
/// - **The index counts, per cached block, the holders other than itself** (its *use count*):
///   [`lookup`](Self::lookup) adds one for each hit block, [`insert`](Self::insert)
///   starts a newly cached block at one (the offering request),
///   [`acquire`](Self::acquire) adds one (a fork, a second holder) and
///   [`release`](Self::release) takes one away.
/// - **A cached block with use count 0 is evictable**: only the index's reference keeps it.
///   [`evict`](Self::evict) only ever picks evictable blocks, so dropping the index's
///   reference on each evicted block frees it. [`evictable_blocks`](Self::evictable_blocks)
///   is how many blocks eviction can free right now.
/// - A holder of a block holds every block before it in its chain (requests and sessions hold
///   whole prefixes), so all evictable blocks can be evicted one after another, leaf first.
pub trait ReuseIndex {
    /// Tokens per block of this index.
    fn block_size(&self) -> u32;

    /// The longest cached prefix of `prompt` for `scope`, never covering its last token. The
    /// use count of each hit block goes up by one: the caller takes one pool reference on each
    /// for the request and [`release`](Self::release)s them when the request stops using them.
    fn lookup(&mut self, scope: &ReuseScope, prompt: &[u32], now_ms: u64) -> PrefixHit;

    /// Offers the computed full blocks of a request: `blocks[i]` holds
    /// `tokens[i × block_size..(i + 1) × block_size]` (`tokens.len()` is a multiple of the
    /// block size, or its partial tail is ignored: pass one block per full block, without the
    /// tail's block, or the offer is a [`ReuseError::LengthMismatch`]). The blocks are in use
    /// by the offering request, and stay so until it releases them:
    ///
    /// - a block newly cached by this call starts with use count 1 (the request) and is
    ///   appended to `newly_cached`: the caller takes one pool reference on it for the index;
    /// - a hash already cached under the same block changes nothing (the request already holds
    ///   it, through its lookup or an earlier insert);
    /// - a hash already cached under another block ends the offer there: the request's block
    ///   and every block after it stay private (uncached), and nothing changes for them
    ///   ([`offer_adopting`](Self::offer_adopting) takes the cached copy instead and goes on).
    ///
    /// # Errors
    /// [`ReuseError::LengthMismatch`] (nothing cached) or [`ReuseError::BlockAlreadyCached`]
    /// (blocks before it processed).
    fn insert(
        &mut self,
        scope: &ReuseScope,
        tokens: &[u32],
        blocks: &[BlockId],
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
    ) -> Result<(), ReuseError>;

    /// Another holder of these blocks (a fork for beam search or parallel sampling, a session
    /// keeping a request's blocks): the use count of each cached one goes up by one. Uncached
    /// (private) blocks are skipped. The caller takes its own pool reference on every block.
    /// Pass whole tables from their first block: the ownership rule's last point (a holder
    /// holds every block before the ones it holds) is what lets every evictable block be
    /// evicted.
    ///
    /// # Errors
    /// [`ReuseError::TooManyHolders`]; the other blocks are still processed.
    fn acquire(&mut self, blocks: &[BlockId]) -> Result<(), ReuseError>;

    /// A holder stopped using these blocks (a request passes its whole table, in order, when
    /// it finishes, is preempted or cancelled): the use count of each cached one goes down by
    /// one; at 0 the block becomes evictable (indexes that order by recency count this as its
    /// last use, tail first). Uncached (private) blocks are skipped. The caller drops the
    /// holder's pool reference on every block.
    ///
    /// # Errors
    /// [`ReuseError::NotInUse`] for a cached block with use count 0 (a double release); the
    /// other blocks are still processed.
    fn release(&mut self, blocks: &[BlockId]) -> Result<(), ReuseError>;

    /// Cached blocks no holder uses: how many blocks [`evict`](Self::evict) can free now.
    /// Constant time.
    fn evictable_blocks(&self) -> usize;

    /// Forgets up to `count` evictable blocks, leaf first, appending them to `evicted`, and
    /// returns how many. The caller drops the index's pool reference on each, which frees it.
    fn evict(&mut self, count: usize, now_ms: u64, evicted: &mut Vec<BlockId>) -> usize;

    /// Changes the retention of a cached block (from a pin policy's soft pins). `block_hash`
    /// names the block by the low 64 bits of its [`StoreKey`] (the key
    /// [`block_keys`](Self::block_keys) gives for the prefix ending at it: `key.0 as u64`,
    /// `kvc_reuse::BlockHash::short`); a block the index does not cache is ignored.
    fn set_retention(&mut self, block_hash: u64, retention: Retention);

    /// The application's word that a conversation has ended (the user closed the chat, the
    /// session expired): `tokens` is its latest context under `scope` (the last turn's prompt
    /// and reply, as far as they were computed). The blocks only that conversation used are
    /// evicted before every other block, until something uses one of them again; its first
    /// `keep_first` full blocks (a system prompt or document the application knows others
    /// share) and every block another holder or another conversation still needs keep their
    /// standing. Call it once the conversation's requests have released their blocks (and a
    /// session its context): blocks in use are kept. Returns how many blocks were demoted.
    ///
    /// No eviction policy can infer this from the prompt stream; on a multi-turn trace it is
    /// worth more than any policy (see the reuse guide, "Ending a conversation").
    ///
    /// The default does nothing and returns 0: an index without a notion of ending evicts as
    /// before.
    ///
    /// # Errors
    /// [`ReuseError::BrokenChain`] when the cached blocks of `tokens` do not form one chain
    /// (only possible on a hash collision); nothing changes.
    fn end_conversation(
        &mut self,
        scope: &ReuseScope,
        tokens: &[u32],
        keep_first: usize,
        now_ms: u64,
    ) -> Result<usize, ReuseError> {
        let _ = (scope, tokens, keep_first, now_ms);
        Ok(0)
    }

    /// Appends to `keys` the [`StoreKey`] of each full block of `tokens` under `scope`: the
    /// same chained hash [`lookup`](Self::lookup) and [`insert`](Self::insert) use, so it
    /// mixes in the model namespace and the tenant's salt, and tenants stay isolated in the
    /// tiers below device memory too. Changes no use count.
    ///
    /// A memory manager names blocks in the lower tiers by these keys. The default appends
    /// nothing: an index that cannot name its blocks never hits in the tiers.
    fn block_keys(&mut self, scope: &ReuseScope, tokens: &[u32], keys: &mut Vec<StoreKey>) {
        let _ = (scope, tokens, keys);
    }

    /// The key `scope`'s chains start from (the "parent" of every first block), or `None`
    /// when the index cannot name blocks ([`block_keys`](Self::block_keys) appends nothing).
    /// It stays the same while the index names `scope`'s blocks the same way, and changes
    /// when that changes (a tenant given a new cache salt): keys a caller kept from before
    /// then no longer name `scope`'s blocks, so a caller that keeps keys between calls (see
    /// [`extend_keys`](Self::extend_keys)) compares this first.
    ///
    /// The default is `None`.
    fn chain_root(&mut self, scope: &ReuseScope) -> Option<StoreKey> {
        let _ = scope;
        None
    }

    /// Appends to `keys` the keys of the full blocks of `tokens` after the first
    /// `keys.len()`, which the caller computed earlier (with [`block_keys`](Self::block_keys)
    /// or this method) from the same leading tokens under the same `scope` and
    /// [`chain_root`](Self::chain_root): only the new blocks are hashed, so a request's keys
    /// can grow with it, each block hashed once. With `keys` empty it is `block_keys`;
    /// with `keys` already covering every full block it appends nothing.
    ///
    /// The default hashes every block again and keeps the new ones.
    fn extend_keys(&mut self, scope: &ReuseScope, tokens: &[u32], keys: &mut Vec<StoreKey>) {
        let known = keys.len();
        let mut all = Vec::new();
        self.block_keys(scope, tokens, &mut all);
        keys.extend(all.into_iter().skip(known));
    }

    /// [`lookup`](Self::lookup), given `keys`: the keys of the full blocks of `prompt` under
    /// `scope`, from [`block_keys`](Self::block_keys) or [`extend_keys`](Self::extend_keys),
    /// so the index does not hash the prompt again. Keys that do not cover every full block
    /// of `prompt` are not used (the prompt is hashed as by `lookup`). The index trusts the
    /// keys: they carry the scope (its tenant's salt), so keys made under another scope reach
    /// that scope's blocks. Take them only from the index, for this scope, as `KvManager`
    /// does; never from a request.
    ///
    /// The default is `lookup`, which hashes the prompt.
    fn lookup_keyed(
        &mut self,
        scope: &ReuseScope,
        prompt: &[u32],
        keys: &[StoreKey],
        now_ms: u64,
    ) -> PrefixHit {
        let _ = keys;
        self.lookup(scope, prompt, now_ms)
    }

    /// [`insert`](Self::insert) as a memory manager offers a request's blocks over its life:
    /// with the keys it kept ([`Offer::keys`], so the index need not hash the tokens) and
    /// what the offer is to the request ([`Offer::role`]): its prompt, which an eviction
    /// policy that learns from requests counts as one request, or more blocks of a request
    /// whose prompt was offered (or is yet to be), which it must not count again. A request
    /// offered twice as two prompts looks like a second request reusing every block: such a
    /// policy's odds then say every block is reused, and it evicts like LRU.
    ///
    /// The default is `insert` of the offer's tokens and blocks (an index without such a
    /// policy has nothing to tell apart).
    ///
    /// # Errors
    /// As [`insert`](Self::insert).
    fn offer(
        &mut self,
        scope: &ReuseScope,
        offer: Offer<'_>,
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
    ) -> Result<(), ReuseError> {
        self.insert(scope, offer.tokens, offer.blocks, now_ms, newly_cached)
    }

    /// [`offer`](Self::offer) for a caller that can put another block in the request's table:
    /// where two requests computed the same blocks at once (both looked the prefix up before
    /// either cached it), `offer` keeps the first copy cached and ends the later request's
    /// offer at its copy, so none of that request's later blocks is ever cached. Here the
    /// index instead counts the request as a user of the cached copy, reports it in `adopted`
    /// (the request's own copy, which the index does not track, and the cached one), and
    /// goes on caching the request's later blocks after the cached copy. For each entry the
    /// caller takes one pool reference on [`Adopted::cached`] for the request, puts it in the
    /// request's table at [`Adopted::index`] (the tokens are the same), and drops the
    /// request's pool reference on [`Adopted::own`], which frees the duplicate. The request
    /// then holds whole cached prefixes again, as the ownership rule asks.
    ///
    /// A request's own block the index tracks (invalidated while in use) or a cached copy at
    /// the largest use count still ends the offer there, as in `offer`.
    ///
    /// The default is `offer`, which adopts nothing.
    ///
    /// # Errors
    /// As [`insert`](Self::insert); entries appended before the error stand (the index counts
    /// the request on those cached copies).
    fn offer_adopting(
        &mut self,
        scope: &ReuseScope,
        offer: Offer<'_>,
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
        adopted: &mut Vec<Adopted>,
    ) -> Result<(), ReuseError> {
        let _ = adopted;
        self.offer(scope, offer, now_ms, newly_cached)
    }

    /// The key the cached block `block` is cached under and its retention now, or
    /// `None` when the index does not cache it (private, invalidated, or evicted). A memory
    /// manager reads it when the block is cached (to write it through to the tiers).
    ///
    /// The default knows no keys.
    fn cached_key(&self, block: BlockId) -> Option<TierKey> {
        let _ = block;
        None
    }

    /// [`evict`](Self::evict), also appending to `keys` the key each evicted block was
    /// cached under and its retention when it was evicted, read before it was
    /// forgotten: one entry per evicted block, in the same order, `None` for a block whose
    /// contents must not be reused (invalidated) or when the index knows no keys. A memory
    /// manager writes the evicted blocks back to the tiers under these keys.
    ///
    /// The default evicts and knows no keys.
    fn evict_keyed(
        &mut self,
        count: usize,
        now_ms: u64,
        evicted: &mut Vec<BlockId>,
        keys: &mut Vec<Option<TierKey>>,
    ) -> usize {
        let before = evicted.len();
        let n = self.evict(count, now_ms, evicted);
        keys.extend(std::iter::repeat_n(None, evicted.len() - before));
        n
    }
}

/// A request's offer of its computed full blocks ([`ReuseIndex::offer`]).
#[derive(Clone, Copy, Debug)]
pub struct Offer<'a> {
    /// The tokens: `blocks[i]` holds `tokens[i × block_size..(i + 1) × block_size]`, as for
    /// [`ReuseIndex::insert`].
    pub tokens: &'a [u32],
    /// The keys of the full blocks of `tokens` under the request's scope, from
    /// [`ReuseIndex::block_keys`] or [`ReuseIndex::extend_keys`]; not used (the tokens are
    /// hashed) unless there is one per full block. Trusted as for
    /// [`ReuseIndex::lookup_keyed`]: keys of another scope cache the blocks in that scope.
    pub keys: &'a [StoreKey],
    /// The blocks, one per full block of `tokens`.
    pub blocks: &'a [BlockId],
    /// What the offer is to the request.
    pub role: OfferRole,
}

/// A block of an offer the index already caches under another block
/// ([`ReuseIndex::offer_adopting`]): the offering request computed the same tokens as another
/// request at the same time. The index now counts the request as a user of `cached`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Adopted {
    /// Position of the block in the offer (and in the request's table).
    pub index: usize,
    /// The request's own copy, which the index does not track: drop the request's pool
    /// reference on it.
    pub own: BlockId,
    /// The cached copy with the same tokens: take one pool reference on it for the request
    /// and put it in the request's table at `index`.
    pub cached: BlockId,
}

/// What an [`Offer`] is to the request making it: an eviction policy that learns from
/// requests counts each request's prompt once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OfferRole {
    /// The request's prompt (with whatever it computed after it, if it is offered once at
    /// the end): every block is an access of this request, a hit block a reuse. Offer a
    /// request's prompt once.
    Prompt,
    /// Blocks of a request whose prompt is offered in another offer: a prefix loaded from
    /// the tiers before the prompt is computed, the reply after it, the computed part of a
    /// preempted request. The first `offered_before` blocks were offered by this request
    /// before: offering them again is no access at all. The others are cached (or found
    /// cached) without counting as a request.
    More {
        /// Leading blocks this request offered before.
        offered_before: usize,
    },
}

/// The index of a deployment with reuse off: never hits, keeps nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoReuse {
    /// Tokens per block.
    pub block_size: u32,
}

impl ReuseIndex for NoReuse {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn lookup(&mut self, _: &ReuseScope, _: &[u32], _: u64) -> PrefixHit {
        PrefixHit::default()
    }
    fn insert(
        &mut self,
        _: &ReuseScope,
        tokens: &[u32],
        blocks: &[BlockId],
        _: u64,
        _: &mut Vec<BlockId>,
    ) -> Result<(), ReuseError> {
        let full_blocks = tokens.len() / self.block_size.max(1) as usize;
        if full_blocks == blocks.len() {
            Ok(())
        } else {
            Err(ReuseError::LengthMismatch {
                full_blocks,
                blocks: blocks.len(),
            })
        }
    }
    fn acquire(&mut self, _: &[BlockId]) -> Result<(), ReuseError> {
        Ok(())
    }
    fn release(&mut self, _: &[BlockId]) -> Result<(), ReuseError> {
        Ok(())
    }
    fn evictable_blocks(&self) -> usize {
        0
    }
    fn evict(&mut self, _: usize, _: u64, _: &mut Vec<BlockId>) -> usize {
        0
    }
    fn set_retention(&mut self, _: u64, _: Retention) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_reuse_checks_insert_lengths_and_holds_nothing() {
        let mut idx = NoReuse { block_size: 4 };
        let scope = ReuseScope {
            tenant: TenantId(1),
            session: None,
        };
        let mut newly = Vec::new();
        assert_eq!(
            idx.insert(&scope, &[0; 9], &[BlockId(0), BlockId(1)], 0, &mut newly),
            Ok(())
        );
        assert_eq!(
            idx.insert(&scope, &[0; 4], &[BlockId(0), BlockId(1)], 0, &mut newly),
            Err(ReuseError::LengthMismatch {
                full_blocks: 1,
                blocks: 2
            })
        );
        assert!(newly.is_empty());
        assert_eq!(idx.lookup(&scope, &[0; 9], 0), PrefixHit::default());
        assert_eq!(idx.evictable_blocks(), 0);
        let mut evicted = Vec::new();
        assert_eq!(idx.evict(3, 0, &mut evicted), 0);
        assert!(evicted.is_empty());
    }
}
