//! [`ScopedIndex`]: a [`PrefixCache`] behind the `kvc_core::ReuseIndex` trait, so a scheduler
//! written against `kvc-core` reuses prefixes through it.
//!
//! The index hashes prompts itself: each tenant's chains are rooted in the deployment's
//! namespace (model and version, adapter) with the tenant's cache salt mixed in, so tenants
//! never hit each other's blocks unless they are given the same salt. Multi-turn sessions reuse
//! their earlier turns through the same chains (a turn's prompt starts with the conversation so
//! far).

use ahash::AHashMap;
use kvc_core::{
    Adopted, BlockId, Offer, OfferRole, PrefixHit, Retention, ReuseError, ReuseIndex, ReuseScope,
    StoreKey, TenantId, TierKey,
};

use crate::{BlockHash, BlockHasher, EndError, HashExtra, PrefixCache};

/// A prefix cache that hashes prompts per tenant and implements `kvc_core::ReuseIndex`.
///
/// Isolation is per tenant only: [`ReuseScope::session`] is not used, so a session's turns
/// are cached in its tenant's chains like any prompt and other requests of the same tenant
/// can hit them. For blocks private to a session, keep the session in a
/// [`SessionCache`](crate::SessionCache).
///
/// ```
/// use kvc_reuse::{
///     BlockId, HashExtra, PolicyKind, PrefixCache, ReuseIndex, ReuseScope, ScopedIndex, TenantId,
///     Xxh3Hasher,
/// };
///
/// let cache = PrefixCache::new(4, PolicyKind::Lru);
/// let mut index = ScopedIndex::new(cache, Xxh3Hasher, HashExtra::new("llama-3-8b", 1));
/// let scope = ReuseScope { tenant: TenantId(1), session: None };
/// let prompt: Vec<u32> = (0..10).collect();
///
/// // A request computed two full blocks into blocks 4 and 5 and offers them.
/// let mut newly = Vec::new();
/// index.insert(&scope, &prompt[..8], &[BlockId(4), BlockId(5)], 0, &mut newly)?;
/// assert_eq!(newly, [BlockId(4), BlockId(5)]); // take a pool reference on each for the index
/// assert_eq!(index.evictable_blocks(), 0); // the request still uses them
///
/// let hit = index.lookup(&scope, &prompt, 1); // a second request: one more holder
/// assert_eq!(hit.tokens, 8);
/// index.release(&hit.blocks)?; // the second request is done
/// index.release(&[BlockId(4), BlockId(5)])?; // the first one too
/// assert_eq!(index.evictable_blocks(), 2);
///
/// let stranger = ReuseScope { tenant: TenantId(2), session: None };
/// assert_eq!(index.lookup(&stranger, &prompt, 2).tokens, 0); // other tenant: no hit
/// # Ok::<(), kvc_core::ReuseError>(())
/// ```
#[derive(Debug)]
pub struct ScopedIndex<H> {
    cache: PrefixCache,
    hasher: H,
    namespace: HashExtra,
    salts: AHashMap<TenantId, Vec<u8>>,
    roots: AHashMap<TenantId, BlockHash>,
    hashes: Vec<BlockHash>,
    now_ms: u64,
}

impl<H: BlockHasher> ScopedIndex<H> {
    /// An index over `cache`, hashing with `hasher` under `namespace` (model, version,
    /// adapter; its salt is replaced by each tenant's).
    pub fn new(cache: PrefixCache, hasher: H, namespace: HashExtra) -> Self {
        Self {
            cache,
            hasher,
            namespace,
            salts: AHashMap::new(),
            roots: AHashMap::new(),
            hashes: Vec::new(),
            now_ms: 0,
        }
    }

    /// Gives `tenant` the cache salt `salt`. Tenants given equal salts share cached blocks;
    /// a tenant given none has a salt of its own, derived from its id, so it shares nothing.
    /// The two kinds are kept apart: no salt set here, whatever its bytes, equals a tenant's
    /// own salt, so no choice of salt reaches the blocks of a tenant that was given none.
    pub fn set_salt(&mut self, tenant: TenantId, salt: impl Into<Vec<u8>>) {
        let salt = salt.into();
        let mut tagged = Vec::with_capacity(salt.len() + 1);
        tagged.push(Self::SET_SALT);
        tagged.extend_from_slice(&salt);
        self.salts.insert(tenant, tagged);
        self.roots.remove(&tenant);
    }

    /// First byte of a salt given with [`set_salt`](Self::set_salt).
    const SET_SALT: u8 = 1;
    /// First byte of a tenant's own salt (then its id's 4 little-endian bytes).
    const OWN_SALT: u8 = 0;

    /// The prefix cache.
    pub fn cache(&self) -> &PrefixCache {
        &self.cache
    }

    /// The prefix cache, for invalidation, events and pins.
    pub fn cache_mut(&mut self) -> &mut PrefixCache {
        &mut self.cache
    }

    fn root(&mut self, tenant: TenantId) -> BlockHash {
        if let Some(&root) = self.roots.get(&tenant) {
            return root;
        }
        let salt = self.salts.get(&tenant).cloned().unwrap_or_else(|| {
            let mut own = vec![Self::OWN_SALT];
            own.extend_from_slice(&tenant.get().to_le_bytes());
            own
        });
        let root = self.hasher.root(&self.namespace.clone().with_salt(salt));
        self.roots.insert(tenant, root);
        root
    }

    fn hash(&mut self, scope: &ReuseScope, tokens: &[u32]) {
        let root = self.root(scope.tenant);
        self.hashes.clear();
        let bs = self.cache.block_size() as usize;
        self.hasher.hash_blocks(root, tokens, bs, &mut self.hashes);
    }

    /// Puts the hashes of `tokens`' full blocks in `self.hashes`: `keys` when they are one per
    /// full block (the caller's, from `block_keys` or `extend_keys`), else hashed here.
    fn hash_or_take(&mut self, scope: &ReuseScope, tokens: &[u32], keys: &[StoreKey]) {
        let full = tokens.len() / self.cache.block_size() as usize;
        if keys.len() == full && full > 0 {
            self.hashes.clear();
            self.hashes.extend(keys.iter().map(|k| BlockHash(k.0)));
        } else {
            self.hash(scope, tokens);
        }
    }
}

impl<H: BlockHasher> ScopedIndex<H> {
    /// [`ReuseIndex::offer`], adopting cached copies into `adopted` when given
    /// ([`ReuseIndex::offer_adopting`]).
    fn offer_inner(
        &mut self,
        scope: &ReuseScope,
        offer: Offer<'_>,
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
        adopted: Option<&mut Vec<Adopted>>,
    ) -> Result<(), ReuseError> {
        let full_blocks = offer.tokens.len() / self.cache.block_size() as usize;
        if full_blocks != offer.blocks.len() {
            return Err(ReuseError::LengthMismatch {
                full_blocks,
                blocks: offer.blocks.len(),
            });
        }
        self.now_ms = now_ms;
        self.hash_or_take(scope, offer.tokens, offer.keys);
        let (hashes, blocks, role) = (&self.hashes, offer.blocks, offer.role);
        match adopted {
            Some(adopted) => {
                self.cache
                    .insert_adopting(hashes, blocks, role, now_ms, newly_cached, adopted)
            }
            None => self
                .cache
                .insert_as(hashes, blocks, role, now_ms, newly_cached),
        }
    }
}

impl<H: BlockHasher> ReuseIndex for ScopedIndex<H> {
    fn block_size(&self) -> u32 {
        self.cache.block_size()
    }

    fn lookup(&mut self, scope: &ReuseScope, prompt: &[u32], now_ms: u64) -> PrefixHit {
        self.lookup_keyed(scope, prompt, &[], now_ms)
    }

    fn insert(
        &mut self,
        scope: &ReuseScope,
        tokens: &[u32],
        blocks: &[BlockId],
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
    ) -> Result<(), ReuseError> {
        let offer = Offer {
            tokens,
            keys: &[],
            blocks,
            role: OfferRole::Prompt,
        };
        self.offer(scope, offer, now_ms, newly_cached)
    }

    fn lookup_keyed(
        &mut self,
        scope: &ReuseScope,
        prompt: &[u32],
        keys: &[StoreKey],
        now_ms: u64,
    ) -> PrefixHit {
        self.now_ms = now_ms;
        self.hash_or_take(scope, prompt, keys);
        let hit = self.cache.lookup(&self.hashes, prompt.len(), now_ms);
        PrefixHit {
            blocks: hit.blocks,
            tokens: hit.tokens,
        }
    }

    fn offer(
        &mut self,
        scope: &ReuseScope,
        offer: Offer<'_>,
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
    ) -> Result<(), ReuseError> {
        self.offer_inner(scope, offer, now_ms, newly_cached, None)
    }

    fn offer_adopting(
        &mut self,
        scope: &ReuseScope,
        offer: Offer<'_>,
        now_ms: u64,
        newly_cached: &mut Vec<BlockId>,
        adopted: &mut Vec<Adopted>,
    ) -> Result<(), ReuseError> {
        self.offer_inner(scope, offer, now_ms, newly_cached, Some(adopted))
    }

    fn acquire(&mut self, blocks: &[BlockId]) -> Result<(), ReuseError> {
        self.cache.acquire(blocks)
    }

    fn release(&mut self, blocks: &[BlockId]) -> Result<(), ReuseError> {
        self.cache.release(blocks)
    }

    fn evictable_blocks(&self) -> usize {
        self.cache.evictable_blocks()
    }

    fn evict(&mut self, count: usize, now_ms: u64, evicted: &mut Vec<BlockId>) -> usize {
        self.now_ms = now_ms;
        self.cache.evict(count, now_ms, evicted)
    }

    fn set_retention(&mut self, block_hash: u64, retention: Retention) {
        self.cache
            .set_retention_short(block_hash, retention, self.now_ms);
    }

    fn end_conversation(
        &mut self,
        scope: &ReuseScope,
        tokens: &[u32],
        keep_first: usize,
        now_ms: u64,
    ) -> Result<usize, ReuseError> {
        self.now_ms = now_ms;
        self.hash(scope, tokens);
        match self
            .cache
            .end_conversation(&self.hashes, keep_first, now_ms)
        {
            Ok(end) => Ok(end.demoted),
            Err(EndError::BrokenChain { index }) => Err(ReuseError::BrokenChain { index }),
        }
    }

    fn block_keys(&mut self, scope: &ReuseScope, tokens: &[u32], keys: &mut Vec<StoreKey>) {
        self.hash(scope, tokens);
        keys.extend(self.hashes.iter().map(|h| StoreKey(h.0)));
    }

    fn chain_root(&mut self, scope: &ReuseScope) -> Option<StoreKey> {
        Some(StoreKey(self.root(scope.tenant).0))
    }

    fn extend_keys(&mut self, scope: &ReuseScope, tokens: &[u32], keys: &mut Vec<StoreKey>) {
        let bs = self.cache.block_size() as usize;
        let (known, full) = (keys.len(), tokens.len() / bs);
        if known >= full {
            return;
        }
        // Chained hashes: block `known` is chained from the last key the caller has.
        let parent = match keys.last() {
            Some(key) => BlockHash(key.0),
            None => self.root(scope.tenant),
        };
        self.hashes.clear();
        self.hasher
            .hash_blocks(parent, &tokens[known * bs..full * bs], bs, &mut self.hashes);
        keys.extend(self.hashes.iter().map(|h| StoreKey(h.0)));
    }

    fn cached_key(&self, block: BlockId) -> Option<TierKey> {
        let hash = self.cache.block_hash(block)?;
        Some(TierKey {
            key: StoreKey(hash.0),
            retention: self.cache.block_retention(block)?,
        })
    }

    fn evict_keyed(
        &mut self,
        count: usize,
        now_ms: u64,
        evicted: &mut Vec<BlockId>,
        keys: &mut Vec<Option<TierKey>>,
    ) -> usize {
        self.now_ms = now_ms;
        let mut hashes = Vec::with_capacity(count.min(64));
        let n = self
            .cache
            .evict_with_hashes(count, now_ms, evicted, &mut hashes);
        keys.extend(hashes.into_iter().map(|h| {
            h.map(|(hash, retention)| TierKey {
                key: StoreKey(hash.0),
                retention,
            })
        }));
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Blake3Hasher, PolicyKind};
    use kvc_core::SessionId;

    fn index() -> ScopedIndex<Blake3Hasher> {
        ScopedIndex::new(
            PrefixCache::new(2, PolicyKind::Lru),
            Blake3Hasher,
            HashExtra::new("m", 1),
        )
    }

    #[test]
    fn shared_salts_share_and_distinct_tenants_do_not() {
        let mut idx = index();
        let a = ReuseScope {
            tenant: TenantId(1),
            session: None,
        };
        let b = ReuseScope {
            tenant: TenantId(2),
            session: None,
        };
        let mut newly = Vec::new();
        idx.insert(&a, &[1, 2, 3, 4], &[BlockId(0), BlockId(1)], 0, &mut newly)
            .unwrap();
        assert_eq!(newly.len(), 2);
        assert_eq!(idx.lookup(&b, &[1, 2, 3, 4, 5], 1).tokens, 0);
        idx.release(&[BlockId(0), BlockId(1)]).unwrap();
        idx.set_salt(TenantId(1), *b"team");
        idx.set_salt(TenantId(2), *b"team");
        newly.clear();
        idx.insert(&a, &[1, 2, 3, 4], &[BlockId(2), BlockId(3)], 2, &mut newly)
            .unwrap();
        let hit = idx.lookup(&b, &[1, 2, 3, 4, 5], 3);
        assert_eq!(hit.blocks, [BlockId(2), BlockId(3)]);
        idx.release(&hit.blocks).unwrap();
        assert_eq!(idx.evictable_blocks(), 2, "tenant 1's first chain only");
        idx.release(&[BlockId(2), BlockId(3)]).unwrap();
        assert_eq!(idx.evictable_blocks(), 4);
        // Leaf first: the chain's last block goes before its parent.
        let mut evicted = Vec::new();
        assert_eq!(idx.evict(1, 4, &mut evicted), 1);
        assert!(
            evicted == [BlockId(1)] || evicted == [BlockId(3)],
            "{evicted:?}"
        );
    }

    #[test]
    fn blocks_are_named_by_their_chained_hash_per_tenant_until_evicted() {
        let mut idx = index();
        let a = ReuseScope {
            tenant: TenantId(1),
            session: None,
        };
        let b = ReuseScope {
            tenant: TenantId(2),
            session: None,
        };
        let tokens = [1, 2, 3, 4, 5];
        let mut keys = Vec::new();
        idx.block_keys(&a, &tokens, &mut keys);
        assert_eq!(keys.len(), 2, "full blocks only");
        let mut theirs = Vec::new();
        idx.block_keys(&b, &tokens, &mut theirs);
        assert!(keys.iter().all(|k| !theirs.contains(k)), "tenants differ");
        let mut newly = Vec::new();
        idx.insert(&a, &tokens[..4], &[BlockId(0), BlockId(1)], 0, &mut newly)
            .unwrap();
        let tier_key = |key| TierKey {
            key,
            retention: Retention::DEFAULT,
        };
        assert_eq!(idx.cached_key(BlockId(0)), Some(tier_key(keys[0])));
        assert_eq!(idx.cached_key(BlockId(1)), Some(tier_key(keys[1])));
        assert_eq!(idx.cached_key(BlockId(7)), None);
        idx.release(&[BlockId(0), BlockId(1)]).unwrap();
        let (mut evicted, mut evicted_keys) = (Vec::new(), Vec::new());
        assert_eq!(idx.evict_keyed(1, 1, &mut evicted, &mut evicted_keys), 1);
        assert_eq!(evicted, [BlockId(1)], "leaf first");
        assert_eq!(evicted_keys, [Some(tier_key(keys[1]))]);
        assert_eq!(idx.cached_key(BlockId(1)), None);
        // An invalidated block is handed back without its key.
        let _dropped = idx.cache_mut().invalidate(BlockHash(keys[0].0));
        assert_eq!(idx.cached_key(BlockId(0)), None);
        evicted.clear();
        evicted_keys.clear();
        assert_eq!(idx.evict_keyed(1, 2, &mut evicted, &mut evicted_keys), 1);
        assert_eq!((evicted, evicted_keys), (vec![BlockId(0)], vec![None]));
    }

    #[test]
    fn blocks_leave_for_the_tiers_with_their_retention_priority() {
        let mut idx = index();
        let s = ReuseScope {
            tenant: TenantId(1),
            session: None,
        };
        let tokens = [1, 2, 3, 4, 5, 6];
        let mut keys = Vec::new();
        idx.block_keys(&s, &tokens, &mut keys);
        let mut newly = Vec::new();
        let blocks = [BlockId(0), BlockId(1), BlockId(2)];
        idx.insert(&s, &tokens, &blocks, 0, &mut newly).unwrap();
        idx.release(&blocks).unwrap();
        // The head pinned until t = 100, the tail demoted for good.
        let pin = |priority, until| Retention { priority, until };
        let cache = idx.cache_mut();
        assert!(cache.set_retention(BlockHash(keys[0].0), pin(90, Some(100)), 0));
        assert!(cache.set_retention(BlockHash(keys[2].0), pin(5, None), 0));
        let retention = |idx: &ScopedIndex<Blake3Hasher>, b| idx.cached_key(b).map(|k| k.retention);
        assert_eq!(retention(&idx, BlockId(0)), Some(pin(90, Some(100))));
        assert_eq!(retention(&idx, BlockId(1)), Some(Retention::DEFAULT));
        assert_eq!(retention(&idx, BlockId(2)), Some(pin(5, None)));
        let (mut evicted, mut out) = (Vec::new(), Vec::new());
        assert_eq!(idx.evict_keyed(3, 150, &mut evicted, &mut out), 3);
        assert_eq!(evicted, [BlockId(2), BlockId(1), BlockId(0)]);
        let got: Vec<_> = out
            .iter()
            .map(|k| k.map(|k| (k.key, k.retention)))
            .collect();
        assert_eq!(
            got,
            [
                Some((keys[2], pin(5, None))),
                Some((keys[1], Retention::DEFAULT)),
                // The pin ran out at t = 100: evicted at t = 150 with the default.
                Some((keys[0], Retention::DEFAULT)),
            ]
        );
        // Cached again and pinned until t = 1,000: evicted at t = 200, the pin goes with it.
        newly.clear();
        idx.insert(&s, &tokens, &blocks, 160, &mut newly).unwrap();
        idx.release(&blocks).unwrap();
        assert!(
            idx.cache_mut()
                .set_retention(BlockHash(keys[0].0), pin(90, Some(1_000)), 160)
        );
        let (mut evicted, mut out) = (Vec::new(), Vec::new());
        assert_eq!(idx.evict_keyed(3, 200, &mut evicted, &mut out), 3);
        assert_eq!(evicted, [BlockId(2), BlockId(1), BlockId(0)]);
        assert_eq!(out[2].map(|k| k.retention), Some(pin(90, Some(1_000))));
    }

    #[test]
    fn a_hit_never_covers_the_last_prompt_token() {
        let mut idx = index();
        let s = ReuseScope {
            tenant: TenantId(1),
            session: None,
        };
        let mut newly = Vec::new();
        idx.insert(&s, &[1, 2, 3, 4], &[BlockId(0), BlockId(1)], 0, &mut newly)
            .unwrap();
        assert_eq!(idx.lookup(&s, &[1, 2, 3, 4], 1).tokens, 2);
    }

    #[test]
    fn an_insert_must_give_one_block_per_full_block() {
        let mut idx = index();
        let s = ReuseScope {
            tenant: TenantId(1),
            session: None,
        };
        let mut newly = Vec::new();
        assert_eq!(
            idx.insert(&s, &[1, 2, 3], &[BlockId(0), BlockId(1)], 0, &mut newly),
            Err(ReuseError::LengthMismatch {
                full_blocks: 1,
                blocks: 2
            })
        );
        assert!(newly.is_empty());
        assert!(idx.cache().is_empty());
    }

    #[test]
    fn no_salt_reaches_a_tenant_given_none() {
        let scope = |t| ReuseScope {
            tenant: TenantId(t),
            session: None,
        };
        let tokens = [1, 2, 3, 4];
        let mut idx = index();
        let mut own = Vec::new();
        idx.block_keys(&scope(2), &tokens, &mut own);
        let mut newly = Vec::new();
        idx.insert(&scope(2), &tokens, &[BlockId(0), BlockId(1)], 0, &mut newly)
            .unwrap();
        // Whatever tenant 1 is given, among them the bytes a tenant's own salt is made of,
        // its keys are not tenant 2's and its lookups miss tenant 2's blocks.
        let candidates: [Vec<u8>; 5] = [
            2u32.to_le_bytes().to_vec(),
            [&[0u8][..], &2u32.to_le_bytes()].concat(),
            [&[1u8][..], &2u32.to_le_bytes()].concat(),
            Vec::new(),
            b"team1".to_vec(),
        ];
        for salt in candidates {
            idx.set_salt(TenantId(1), salt.clone());
            let mut keys = Vec::new();
            idx.block_keys(&scope(1), &tokens, &mut keys);
            assert!(keys.iter().all(|k| !own.contains(k)), "salt {salt:?}");
            assert_eq!(idx.lookup(&scope(1), &[1, 2, 3, 4, 5], 1).tokens, 0);
        }
        // Two tenants given the same salt share, as before.
        idx.set_salt(TenantId(3), *b"team1");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        idx.block_keys(&scope(1), &tokens, &mut a);
        idx.block_keys(&scope(3), &tokens, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn sessions_of_one_tenant_share_blocks_as_documented() {
        let mut idx = index();
        let scope = |session| ReuseScope {
            tenant: TenantId(1),
            session: Some(SessionId(session)),
        };
        let mut newly = Vec::new();
        idx.insert(
            &scope(1),
            &[1, 2, 3, 4],
            &[BlockId(0), BlockId(1)],
            0,
            &mut newly,
        )
        .unwrap();
        let hit = idx.lookup(&scope(2), &[1, 2, 3, 4, 5], 1);
        assert_eq!(hit.blocks, [BlockId(0), BlockId(1)]);
    }

    #[test]
    fn keys_grow_with_the_tokens_and_equal_the_keys_of_the_whole() {
        let mut idx = index();
        let s = ReuseScope {
            tenant: TenantId(1),
            session: None,
        };
        let tokens: Vec<u32> = (0..11).collect();
        let mut whole = Vec::new();
        idx.block_keys(&s, &tokens, &mut whole);
        assert_eq!(whole.len(), 5);
        let mut grown = Vec::new();
        for end in [0, 1, 3, 4, 8, 9, 11] {
            idx.extend_keys(&s, &tokens[..end], &mut grown);
            assert_eq!(grown, whole[..end / 2], "after {end} tokens");
        }
        // Already covering every full block: nothing appended.
        idx.extend_keys(&s, &tokens[..6], &mut grown);
        assert_eq!(grown, whole);
        // The root is what the first key is chained from, and moves with the salt.
        let root = idx.chain_root(&s).unwrap();
        assert_eq!(
            Blake3Hasher.chain(BlockHash(root.0), &tokens[..2]),
            BlockHash(whole[0].0)
        );
        idx.set_salt(TenantId(1), *b"team");
        assert_ne!(idx.chain_root(&s), Some(root));
    }

    fn prompt<'a>(tokens: &'a [u32], keys: &'a [StoreKey], blocks: &'a [BlockId]) -> Offer<'a> {
        Offer {
            tokens,
            keys,
            blocks,
            role: OfferRole::Prompt,
        }
    }

    #[test]
    fn keyed_calls_act_as_the_hashing_ones_and_ignore_keys_of_another_length() {
        let s = ReuseScope {
            tenant: TenantId(1),
            session: None,
        };
        let tokens: Vec<u32> = (0..9).collect();
        let blocks = [BlockId(0), BlockId(1), BlockId(2), BlockId(3)];
        let (mut hashing, mut keyed) = (index(), index());
        let mut keys = Vec::new();
        keyed.block_keys(&s, &tokens, &mut keys);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        hashing.insert(&s, &tokens, &blocks, 0, &mut a).unwrap();
        keyed
            .offer(&s, prompt(&tokens, &keys, &blocks), 0, &mut b)
            .unwrap();
        assert_eq!(a, b);
        for idx in [&mut hashing, &mut keyed] {
            idx.release(&blocks).unwrap();
        }
        let other: Vec<u32> = (0..4).chain(100..105).collect();
        let mut other_keys = Vec::new();
        keyed.block_keys(&s, &other, &mut other_keys);
        for (prompt, prompt_keys) in [(&tokens, &keys), (&other, &other_keys)] {
            let want = hashing.lookup(&s, prompt, 1);
            assert_eq!(keyed.lookup_keyed(&s, prompt, prompt_keys, 1), want);
            // Keys of another length than the prompt's full blocks: hashed as `lookup`.
            assert_eq!(keyed.lookup_keyed(&s, prompt, &prompt_keys[..1], 1), want);
        }
        assert_eq!(hashing.lookup(&s, &other, 1).tokens, 4);
        // An insert with too few keys hashes its tokens: the same blocks as without keys.
        let more: Vec<u32> = (200..204).collect();
        let mut more_keys = Vec::new();
        keyed.block_keys(&s, &more, &mut more_keys);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let extra = [BlockId(8), BlockId(9)];
        hashing.insert(&s, &more, &extra, 2, &mut a).unwrap();
        keyed
            .offer(&s, prompt(&more, &more_keys[..1], &extra), 2, &mut b)
            .unwrap();
        assert_eq!((a.len(), &a), (2, &b));
        assert_eq!(
            keyed.offer(&s, prompt(&more, &more_keys, &extra[..1]), 3, &mut b),
            Err(ReuseError::LengthMismatch {
                full_blocks: 2,
                blocks: 1
            })
        );
    }
}
