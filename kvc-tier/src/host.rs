//! The host tier: one host memory pool cut into pages of several device blocks, with its own
//! least-recently-used eviction of whole pages.
//!
//! A page holds `blocks_per_page` device blocks side by side. Blocks of one `put` fill the open
//! page slot after slot, so a chain offloaded together lies in consecutive slots and a `get` of
//! that chain copies contiguous runs (one copy per run, not per block): the large pages in host
//! memory, small blocks on the device, of hardware-aware paging. Pick the page from the device
//! block: 4 blocks per page for 2 MiB blocks (8 MiB pages), 16 for small blocks
//! (`docs/tiers.md`).
//!
//! Eviction is by page, in the device's order: lowest retention priority first, and least
//! recently used among pages of one priority (a `get` hit or a repeated `put` touches the
//! page). A page ranks at the highest priority in force among its live blocks; a block's
//! priority decays to [`Retention::DEFAULT_PRIORITY`] when its pin expires
//! ([`BlockStore::put_retained`], the caller's clock), so a prefix pinned for an hour is kept
//! here for that hour and no longer. The live blocks of an evicted page can be handed to the
//! caller (see [`HostTier::put_spilling`]) to demote them to a lower tier. Blocks offered with
//! a retention priority below [`HostConfig::min_priority`] are not stored (TensorRT-LLM's
//! `secondary_offload_min_priority`).
//!
//! The pool is one allocation made at construction (zeroed, so the OS maps it lazily); an
//! engine with a GPU registers it as pinned memory so that copies are DMA transfers. Copies in
//! and out happen under the tier's lock, so a read racing an eviction sees either the whole
//! block or a miss, never bytes of another block.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::sync::{Mutex, MutexGuard};

use ahash::AHashMap;
use kvc_core::{
    BlockStore, PutOutcome, Retention, StoreError, StoreKey, StoreNamespace, StoreUsage,
    check_buffer,
};
use thiserror::Error;

/// How a [`HostTier`] is sized and what it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// Bytes of host memory for the pool (rounded down to whole pages).
    pub capacity_bytes: u64,
    /// Device blocks per host page.
    pub blocks_per_page: u32,
    /// Blocks offered with a lower retention priority are not stored.
    pub min_priority: u8,
}

impl HostConfig {
    /// A pool of `capacity_bytes` with `blocks_per_page` blocks per page, keeping every block.
    #[must_use]
    pub const fn new(capacity_bytes: u64, blocks_per_page: u32) -> Self {
        Self {
            capacity_bytes,
            blocks_per_page,
            min_priority: 0,
        }
    }
}

/// Why a [`HostTier`] could not be built.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HostConfigError {
    /// `blocks_per_page` was zero.
    #[error("host tier: blocks per page must be at least 1")]
    ZeroBlocksPerPage,
    /// The capacity holds no page.
    #[error("host tier: {capacity_bytes} bytes hold no page of {page_bytes} bytes")]
    NoPage {
        /// Capacity asked.
        capacity_bytes: u64,
        /// Bytes per page.
        page_bytes: u64,
    },
    /// The pool does not fit in this machine's address space.
    #[error("host tier: {capacity_bytes} bytes do not fit in memory")]
    TooLarge {
        /// Capacity asked.
        capacity_bytes: u64,
    },
}

/// Counters of a [`HostTier`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Blocks found by `get`.
    pub hits: u64,
    /// Blocks asked of `get` and not found.
    pub misses: u64,
    /// Blocks written.
    pub stored: u64,
    /// Blocks declined for their priority.
    pub below_priority: u64,
    /// Pages evicted.
    pub evicted_pages: u64,
    /// Live blocks dropped by page evictions.
    pub evicted_blocks: u64,
    /// Copies made by `get` (one per contiguous run).
    pub get_copies: u64,
}

/// Blocks an eviction pushed out of the host tier: keys, the retention each was held with, and
/// their bytes back to back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spill {
    /// Keys of the evicted blocks.
    pub keys: Vec<StoreKey>,
    /// The retention each block was stored with (its pin may have expired since: read it at
    /// [`now_ms`](Self::now_ms)).
    pub retentions: Vec<Retention>,
    /// Their payloads, `keys.len() × block_bytes`.
    pub bytes: Vec<u8>,
    /// The host tier's clock when the blocks were evicted (the latest `now_ms` it was given).
    pub now_ms: u64,
}

impl Spill {
    /// Empties the spill, keeping its buffers.
    pub fn clear(&mut self) {
        self.keys.clear();
        self.retentions.clear();
        self.bytes.clear();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    frame: u32,
    slot: u32,
}

#[derive(Clone, Debug)]
struct Frame {
    /// Each slot's key and the retention it was stored with.
    slots: Vec<Option<(StoreKey, Retention)>>,
    filled: u32,
    live: u32,
    tick: u64,
    /// The page's rank: the highest priority in force among its live blocks.
    priority: u8,
    /// The earliest expiry of a pin still in force among its live blocks (queued in
    /// `Inner::expiries`).
    next_expiry: Option<u64>,
    in_use: bool,
}

impl Frame {
    /// The page's place in the eviction order.
    const fn order_key(&self, frame: u32) -> (u8, u64, u32) {
        (self.priority, self.tick, frame)
    }
}

struct Inner {
    data: Vec<u8>,
    frames: Vec<Frame>,
    free: Vec<u32>,
    /// The pages being filled, one per priority offered: (priority, page). Blocks of
    /// different priorities never share a page, so a pin neither spreads to its neighbours
    /// nor loses its blocks with theirs.
    open: Vec<(u8, u32)>,
    /// Pages in use in eviction order: lowest priority first, then least recently used.
    order: BTreeSet<(u8, u64, u32)>,
    /// When the earliest pin in force in a page expires: (until, page), one entry per change
    /// of a page's earliest expiry. A stale entry (the page reused or re-pinned since) only
    /// costs a re-rank.
    expiries: BinaryHeap<Reverse<(u64, u32)>>,
    /// The latest clock a caller gave (ms).
    now_ms: u64,
    map: AHashMap<StoreKey, Slot>,
    tick: u64,
    stats: HostStats,
}

impl Inner {
    /// Moves the clock to `now_ms` (never back) and re-ranks the pages whose pins expired.
    fn advance(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        while let Some(&Reverse((until, frame))) = self.expiries.peek() {
            if until > self.now_ms {
                break;
            }
            self.expiries.pop();
            if self.frames[frame as usize].in_use {
                self.rerank(frame);
            }
        }
    }

    /// Re-reads the page's priority, and the earliest expiry of a pin in force, from its live
    /// blocks.
    fn rerank(&mut self, frame: u32) {
        let now = self.now_ms;
        let f = &mut self.frames[frame as usize];
        let mut priority = None;
        let mut next_expiry: Option<u64> = None;
        for (_, r) in f.slots.iter().flatten() {
            let p = r.priority_at(now);
            priority = priority.max(Some(p));
            if let Some(until) = r.until
                && until > now
                && p != Retention::DEFAULT_PRIORITY
            {
                next_expiry = Some(next_expiry.map_or(until, |e| e.min(until)));
            }
        }
        let priority = priority.unwrap_or(Retention::DEFAULT_PRIORITY);
        if next_expiry != f.next_expiry {
            f.next_expiry = next_expiry;
            if let Some(until) = next_expiry {
                self.expiries.push(Reverse((until, frame)));
            }
        }
        if priority != f.priority {
            self.order.remove(&f.order_key(frame));
            f.priority = priority;
            self.order.insert(f.order_key(frame));
        }
    }

    /// Marks the page used now.
    fn touch(&mut self, frame: u32) {
        let f = &mut self.frames[frame as usize];
        if f.tick == self.tick {
            return; // already the most recently used
        }
        self.order.remove(&f.order_key(frame));
        self.tick += 1;
        f.tick = self.tick;
        self.order.insert(f.order_key(frame));
    }
}

/// A host memory tier: see the [module docs](self).
pub struct HostTier {
    ns: StoreNamespace,
    block_bytes: usize,
    blocks_per_page: u32,
    page_bytes: usize,
    min_priority: u8,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for HostTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTier")
            .field("namespace", &self.ns)
            .field("blocks_per_page", &self.blocks_per_page)
            .field("pages", &self.pages())
            .finish_non_exhaustive()
    }
}

impl HostTier {
    /// A host tier for blocks of `ns`, allocating the whole pool now.
    pub fn new(ns: StoreNamespace, cfg: HostConfig) -> Result<Self, HostConfigError> {
        if cfg.blocks_per_page == 0 {
            return Err(HostConfigError::ZeroBlocksPerPage);
        }
        let too_large = HostConfigError::TooLarge {
            capacity_bytes: cfg.capacity_bytes,
        };
        let page = ns
            .block_bytes()
            .checked_mul(u64::from(cfg.blocks_per_page))
            .ok_or(too_large.clone())?;
        let frames = cfg.capacity_bytes / page;
        if frames == 0 {
            return Err(HostConfigError::NoPage {
                capacity_bytes: cfg.capacity_bytes,
                page_bytes: page,
            });
        }
        let frames = u32::try_from(frames).map_err(|_| too_large.clone())?;
        let page_bytes = usize::try_from(page).map_err(|_| too_large.clone())?;
        let total = page_bytes
            .checked_mul(frames as usize)
            .ok_or(too_large.clone())?;
        let block_bytes = usize::try_from(ns.block_bytes()).map_err(|_| too_large)?;
        let frame = Frame {
            slots: vec![None; cfg.blocks_per_page as usize],
            filled: 0,
            live: 0,
            tick: 0,
            priority: Retention::DEFAULT_PRIORITY,
            next_expiry: None,
            in_use: false,
        };
        Ok(Self {
            ns,
            block_bytes,
            blocks_per_page: cfg.blocks_per_page,
            page_bytes,
            min_priority: cfg.min_priority,
            inner: Mutex::new(Inner {
                data: vec![0; total],
                frames: vec![frame; frames as usize],
                free: (0..frames).rev().collect(),
                open: Vec::new(),
                order: BTreeSet::new(),
                expiries: BinaryHeap::new(),
                now_ms: 0,
                map: AHashMap::new(),
                tick: 0,
                stats: HostStats::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-copied block visible: the map
        // entry is written after the copy. So a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pages in the pool.
    #[must_use]
    pub fn pages(&self) -> u32 {
        self.lock().frames.len() as u32
    }

    /// Device blocks per page.
    #[must_use]
    pub const fn blocks_per_page(&self) -> u32 {
        self.blocks_per_page
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> HostStats {
        self.lock().stats
    }

    /// Like [`BlockStore::put_retained`], and the live blocks of every page evicted to make
    /// room are appended to `spill` (to demote them to a lower tier).
    ///
    /// `now_ms` is the caller's clock for the pins' expiries; the tier keeps the latest clock
    /// it was given, so an older one (or 0, from [`BlockStore::put`]) changes nothing. A block
    /// already held takes the new retention (the latest offer is the device's latest word).
    pub fn put_spilling(
        &self,
        keys: &[StoreKey],
        src: &[u8],
        retention: Retention,
        now_ms: u64,
        spill: Option<&mut Spill>,
    ) -> Result<PutOutcome, StoreError> {
        self.store(keys, src, retention, now_ms, spill, true)
    }

    /// Blocks read back from a lower tier: kept at the default retention whatever the floor
    /// (they were worth keeping once, and a hit says they still are).
    pub(crate) fn promote_spilling(
        &self,
        keys: &[StoreKey],
        src: &[u8],
        spill: Option<&mut Spill>,
    ) -> Result<PutOutcome, StoreError> {
        self.store(keys, src, Retention::DEFAULT, 0, spill, false)
    }

    fn store(
        &self,
        keys: &[StoreKey],
        src: &[u8],
        retention: Retention,
        now_ms: u64,
        mut spill: Option<&mut Spill>,
        floor: bool,
    ) -> Result<PutOutcome, StoreError> {
        check_buffer(keys.len(), self.block_bytes as u64, src.len())?;
        let mut out = PutOutcome::default();
        let mut g = self.lock();
        let inner = &mut *g;
        inner.advance(now_ms);
        let now = inner.now_ms;
        if floor && retention.priority_at(now) < self.min_priority {
            out.skipped = keys.len();
            inner.stats.below_priority += keys.len() as u64;
            return Ok(out);
        }
        // A pin in force that will expire: its page must queue the expiry.
        let pinned = retention.until.is_some_and(|until| until > now)
            && retention.priority != Retention::DEFAULT_PRIORITY;
        for (i, &key) in keys.iter().enumerate() {
            let (slot, same_rank) = match inner.map.get(&key).copied() {
                Some(slot) => {
                    out.present += 1;
                    if let Some((_, r)) =
                        &mut inner.frames[slot.frame as usize].slots[slot.slot as usize]
                    {
                        *r = retention;
                    }
                    (slot, false)
                }
                None => {
                    let class = retention.priority_at(now);
                    let slot = self.next_slot(inner, class, &mut out, spill.as_deref_mut());
                    let at = slot.frame as usize * self.page_bytes
                        + slot.slot as usize * self.block_bytes;
                    let from = i * self.block_bytes;
                    inner.data[at..at + self.block_bytes]
                        .copy_from_slice(&src[from..from + self.block_bytes]);
                    let f = &mut inner.frames[slot.frame as usize];
                    f.slots[slot.slot as usize] = Some((key, retention));
                    f.live += 1;
                    inner.map.insert(key, slot);
                    inner.stats.stored += 1;
                    out.stored += 1;
                    // Another block of the page's own rank with no pin to expire leaves the
                    // page's rank and next expiry as they are.
                    let same_rank = f.live > 1 && f.priority == class && !pinned;
                    (slot, same_rank)
                }
            };
            inner.touch(slot.frame);
            if !same_rank {
                // Its rank, and when it changes next (a pin expiring).
                inner.rerank(slot.frame);
            }
        }
        Ok(out)
    }

    /// The next free slot of the page open for blocks of priority `class`, opening (and if
    /// need be evicting) a page.
    fn next_slot(
        &self,
        inner: &mut Inner,
        class: u8,
        out: &mut PutOutcome,
        spill: Option<&mut Spill>,
    ) -> Slot {
        if let Some(at) = inner.open.iter().position(|&(c, _)| c == class) {
            let open = inner.open[at].1;
            let f = &mut inner.frames[open as usize];
            if f.filled < self.blocks_per_page {
                let slot = f.filled;
                f.filled += 1;
                return Slot { frame: open, slot };
            }
            inner.open.swap_remove(at);
        }
        let frame = match inner.free.pop() {
            Some(frame) => frame,
            None => self.evict_one(inner, out, spill),
        };
        let f = &mut inner.frames[frame as usize];
        f.in_use = true;
        f.filled = 1;
        f.live = 0;
        f.slots.fill(None);
        f.priority = Retention::DEFAULT_PRIORITY;
        f.next_expiry = None;
        inner.open.push((class, frame));
        inner.tick += 1;
        f.tick = inner.tick;
        inner.order.insert(f.order_key(frame));
        Slot { frame, slot: 0 }
    }

    /// Evicts the first page in eviction order (lowest priority, then least recently used)
    /// and returns it, empty. (It is called only when the page open for the blocks at hand is
    /// full, so that page is as fair a victim as any; a page open for another priority may go
    /// too, and is no longer open.)
    fn evict_one(&self, inner: &mut Inner, out: &mut PutOutcome, spill: Option<&mut Spill>) -> u32 {
        // The pool has at least one page and no page is free here, so the order is not
        // empty; fall back to page 0 rather than panic if that ever stops holding.
        let frame = inner.order.pop_first().map_or(0, |(_, _, frame)| frame);
        inner.open.retain(|&(_, f)| f != frame);
        let base = frame as usize * self.page_bytes;
        let mut spill = spill;
        let f = &mut inner.frames[frame as usize];
        for (s, held) in f.slots.iter_mut().enumerate() {
            if let Some((key, retention)) = held.take() {
                inner.map.remove(&key);
                out.evicted += 1;
                inner.stats.evicted_blocks += 1;
                if let Some(sp) = spill.as_deref_mut() {
                    let at = base + s * self.block_bytes;
                    sp.now_ms = inner.now_ms;
                    sp.keys.push(key);
                    sp.retentions.push(retention);
                    sp.bytes
                        .extend_from_slice(&inner.data[at..at + self.block_bytes]);
                }
            }
        }
        f.live = 0;
        f.filled = 0;
        f.in_use = false;
        inner.stats.evicted_pages += 1;
        frame
    }
}

impl BlockStore for HostTier {
    fn namespace(&self) -> &StoreNamespace {
        &self.ns
    }

    fn contains(&self, keys: &[StoreKey], found: &mut Vec<bool>) -> Result<usize, StoreError> {
        let g = self.lock();
        found.clear();
        found.extend(keys.iter().map(|k| g.map.contains_key(k)));
        Ok(found.iter().filter(|&&f| f).count())
    }

    fn get(
        &self,
        keys: &[StoreKey],
        dst: &mut [u8],
        found: &mut Vec<bool>,
    ) -> Result<usize, StoreError> {
        check_buffer(keys.len(), self.block_bytes as u64, dst.len())?;
        found.clear();
        let mut g = self.lock();
        let inner = &mut *g;
        let bb = self.block_bytes;
        let mut hits = 0;
        let mut i = 0;
        while i < keys.len() {
            let Some(first) = inner.map.get(&keys[i]).copied() else {
                found.push(false);
                inner.stats.misses += 1;
                i += 1;
                continue;
            };
            // Extend the run while the next key sits in the next slot of the same page.
            let mut run = 1;
            while i + run < keys.len()
                && inner.map.get(&keys[i + run]).copied()
                    == Some(Slot {
                        frame: first.frame,
                        slot: first.slot + run as u32,
                    })
            {
                run += 1;
            }
            let at = first.frame as usize * self.page_bytes + first.slot as usize * bb;
            dst[i * bb..(i + run) * bb].copy_from_slice(&inner.data[at..at + run * bb]);
            inner.touch(first.frame);
            found.extend(std::iter::repeat_n(true, run));
            inner.stats.hits += run as u64;
            inner.stats.get_copies += 1;
            hits += run;
            i += run;
        }
        Ok(hits)
    }

    fn put(&self, keys: &[StoreKey], src: &[u8], priority: u8) -> Result<PutOutcome, StoreError> {
        let retention = Retention {
            priority,
            until: None,
        };
        self.put_spilling(keys, src, retention, 0, None)
    }

    fn put_retained(
        &self,
        keys: &[StoreKey],
        src: &[u8],
        retention: Retention,
        now_ms: u64,
    ) -> Result<PutOutcome, StoreError> {
        self.put_spilling(keys, src, retention, now_ms, None)
    }

    fn remove(&self, keys: &[StoreKey]) -> Result<usize, StoreError> {
        let mut g = self.lock();
        let inner = &mut *g;
        let mut removed = 0;
        for key in keys {
            let Some(slot) = inner.map.remove(key) else {
                continue;
            };
            removed += 1;
            let f = &mut inner.frames[slot.frame as usize];
            f.slots[slot.slot as usize] = None;
            f.live -= 1;
            if f.live == 0 {
                // Empty, open or not: back to the free list (an empty page must not sit in
                // the eviction order, where it would rank above pages holding blocks).
                let key = f.order_key(slot.frame);
                f.in_use = false;
                f.filled = 0;
                inner.order.remove(&key);
                inner.open.retain(|&(_, f)| f != slot.frame);
                inner.free.push(slot.frame);
            } else {
                inner.rerank(slot.frame);
            }
        }
        Ok(removed)
    }

    fn usage(&self) -> StoreUsage {
        let g = self.lock();
        StoreUsage {
            blocks: g.map.len() as u64,
            bytes: g.map.len() as u64 * self.block_bytes as u64,
            capacity_bytes: Some(g.frames.len() as u64 * self.page_bytes as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvc_core::{DType, KvLayout};

    /// 64-byte blocks.
    fn ns() -> StoreNamespace {
        StoreNamespace::new("t", KvLayout::new(1, 1, 4, 4, DType::F16).unwrap(), 0, 1).unwrap()
    }

    fn block(key: u128) -> Vec<u8> {
        (0..64)
            .map(|i| (key as u8).wrapping_mul(31).wrapping_add(i))
            .collect()
    }

    fn blocks(keys: &[u128]) -> (Vec<StoreKey>, Vec<u8>) {
        (
            keys.iter().map(|&k| StoreKey(k)).collect(),
            keys.iter().flat_map(|&k| block(k)).collect(),
        )
    }

    #[test]
    fn put_get_round_trip_in_contiguous_runs() {
        let host = HostTier::new(ns(), HostConfig::new(64 * 4 * 4, 4)).unwrap();
        assert_eq!(host.pages(), 4);
        let (keys, src) = blocks(&[1, 2, 3, 4, 5, 6]);
        let out = host.put(&keys, &src, 50).unwrap();
        assert_eq!((out.stored, out.present, out.evicted), (6, 0, 0));
        assert_eq!(host.put(&keys[..2], &src[..128], 50).unwrap().present, 2);
        let mut dst = vec![0; src.len()];
        let mut found = Vec::new();
        assert_eq!(host.get(&keys, &mut dst, &mut found).unwrap(), 6);
        assert_eq!(dst, src);
        // Two pages: slots 0..4 of the first and 0..2 of the second, so two copies.
        assert_eq!(host.stats().get_copies, 2);
        let usage = host.usage();
        assert_eq!((usage.blocks, usage.bytes), (6, 384));
        assert_eq!(usage.capacity_bytes, Some(1024));
    }

    #[test]
    fn eviction_drops_the_least_recently_used_page_and_spills_it() {
        let host = HostTier::new(ns(), HostConfig::new(64 * 2 * 2, 2)).unwrap();
        let (k1, s1) = blocks(&[1, 2]);
        let (k2, s2) = blocks(&[3, 4]);
        let (k3, s3) = blocks(&[5, 6]);
        let _ = host.put(&k1, &s1, 0).unwrap();
        let _ = host.put(&k2, &s2, 0).unwrap();
        // Touch the first page: the second is now the least recently used.
        let mut dst = vec![0; 64];
        let mut found = Vec::new();
        assert_eq!(host.get(&k1[..1], &mut dst, &mut found).unwrap(), 1);
        let mut spill = Spill::default();
        let out = host
            .put_spilling(&k3, &s3, pinned(0, None), 0, Some(&mut spill))
            .unwrap();
        assert_eq!((out.stored, out.evicted), (2, 2));
        assert_eq!(spill.keys, k2);
        assert_eq!(spill.bytes, s2);
        assert_eq!(host.contains_prefix(&k1).unwrap(), 2);
        assert_eq!(host.contains(&k2, &mut found).unwrap(), 0);
        let mut dst = vec![0xAA; 128];
        assert_eq!(host.get(&k2, &mut dst, &mut found).unwrap(), 0);
        assert_eq!(found, [false, false]);
        assert!(
            dst.iter().all(|&b| b == 0xAA),
            "a miss leaves the slot alone"
        );
    }

    fn pinned(priority: u8, until: Option<u64>) -> Retention {
        Retention { priority, until }
    }

    /// Which of `keys` the tier holds, as a vector of flags.
    fn held(host: &HostTier, keys: &[StoreKey]) -> Vec<bool> {
        let mut found = Vec::new();
        host.contains(keys, &mut found).unwrap();
        found
    }

    #[test]
    fn pages_are_evicted_lowest_priority_first_then_least_recently_used() {
        // Three pages of one block each.
        let host = HostTier::new(ns(), HostConfig::new(64 * 3, 1)).unwrap();
        let (k, s) = blocks(&[1, 2, 3, 4, 5]);
        let one = |i: usize| (&k[i..=i], &s[i * 64..(i + 1) * 64]);
        let (k0, s0) = one(0);
        let _ = host.put(k0, s0, 80).unwrap(); // pinned, and the oldest
        let (k1, s1) = one(1);
        let _ = host.put(k1, s1, Retention::DEFAULT_PRIORITY).unwrap();
        let (k2, s2) = one(2);
        let _ = host.put(k2, s2, 10).unwrap(); // the newest, but below the default
        let (k3, s3) = one(3);
        let out = host.put(k3, s3, Retention::DEFAULT_PRIORITY).unwrap();
        assert_eq!(out.evicted, 1);
        assert_eq!(
            held(&host, &k[..4]),
            [true, true, false, true],
            "10 goes first"
        );
        let (k4, s4) = one(4);
        let _ = host.put(k4, s4, Retention::DEFAULT_PRIORITY).unwrap();
        assert_eq!(
            held(&host, &k),
            [true, false, false, true, true],
            "then the least recently used default page, never the pinned one"
        );
    }

    #[test]
    fn a_pin_protects_its_page_until_it_expires() {
        let host = HostTier::new(ns(), HostConfig::new(64 * 2, 1)).unwrap();
        let (k, s) = blocks(&[1, 2, 3, 4]);
        let one = |i: usize| (&k[i..=i], &s[i * 64..(i + 1) * 64]);
        let (k0, s0) = one(0);
        let _ = host
            .put_retained(k0, s0, pinned(90, Some(1_000)), 0)
            .unwrap();
        let (k1, s1) = one(1);
        let _ = host.put_retained(k1, s1, Retention::DEFAULT, 10).unwrap();
        let (k2, s2) = one(2);
        let _ = host.put_retained(k2, s2, Retention::DEFAULT, 500).unwrap();
        assert_eq!(held(&host, &k[..3]), [true, false, true], "pinned at 500");
        // At 1,000 the pin has expired: block 0's page is now the least recently used.
        let (k3, s3) = one(3);
        let _ = host
            .put_retained(k3, s3, Retention::DEFAULT, 1_000)
            .unwrap();
        assert_eq!(held(&host, &k), [false, false, true, true]);
    }

    #[test]
    fn blocks_of_different_priorities_fill_different_pages() {
        // Three pages of two blocks.
        let host = HostTier::new(ns(), HostConfig::new(64 * 6, 2)).unwrap();
        let (k, s) = blocks(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let _ = host
            .put(&k[..1], &s[..64], Retention::DEFAULT_PRIORITY)
            .unwrap();
        let _ = host.put(&k[1..2], &s[64..128], 90).unwrap(); // not beside block 0
        let _ = host
            .put(&k[2..3], &s[128..192], Retention::DEFAULT_PRIORITY)
            .unwrap();
        let _ = host.put(&k[3..4], &s[192..256], 90).unwrap();
        // Pages: {0, 2}, and {1, 3} at 90; {4, 5} takes the third page.
        let _ = host
            .put(&k[4..6], &s[256..384], Retention::DEFAULT_PRIORITY)
            .unwrap();
        assert_eq!(host.stats().evicted_pages, 0);
        // Two more default pages' worth push out {0, 2}, then {4, 5}, never the pinned page.
        let _ = host
            .put(&k[6..8], &s[384..512], Retention::DEFAULT_PRIORITY)
            .unwrap();
        let _ = host
            .put(&k[8..10], &s[512..640], Retention::DEFAULT_PRIORITY)
            .unwrap();
        assert_eq!(
            held(&host, &k),
            [
                false, true, false, true, false, false, true, true, true, true
            ]
        );
    }

    #[test]
    fn a_page_ranks_at_its_highest_live_priority_and_drops_when_that_block_goes() {
        // Two pages of two blocks.
        let host = HostTier::new(ns(), HostConfig::new(64 * 4, 2)).unwrap();
        let (k, s) = blocks(&[1, 2, 3, 4, 5, 6]);
        let _ = host.put(&k[..2], &s[..128], 90).unwrap();
        // Block 1 unpinned on the device and offered again: its page still ranks at 90.
        let _ = host.put(&k[1..2], &s[64..128], 20).unwrap();
        let _ = host
            .put(&k[2..4], &s[128..256], Retention::DEFAULT_PRIORITY)
            .unwrap();
        let _ = host
            .put(&k[4..6], &s[256..384], Retention::DEFAULT_PRIORITY)
            .unwrap();
        assert_eq!(held(&host, &k), [true, true, false, false, true, true]);
        // Without its pinned block the first page ranks at 20 and goes next.
        assert_eq!(host.remove(&k[..1]).unwrap(), 1);
        let _ = host
            .put(&k[2..4], &s[128..256], Retention::DEFAULT_PRIORITY)
            .unwrap();
        assert_eq!(held(&host, &k), [false, false, true, true, true, true]);
    }

    #[test]
    fn a_block_offered_again_takes_the_new_retention() {
        let host = HostTier::new(ns(), HostConfig::new(64 * 2, 1)).unwrap();
        let (k, s) = blocks(&[1, 2, 3]);
        let _ = host.put(&k[..1], &s[..64], 90).unwrap();
        let _ = host
            .put(&k[1..2], &s[64..128], Retention::DEFAULT_PRIORITY)
            .unwrap();
        // The device unpinned block 0 and offers it again: now it is an ordinary block,
        // and the most recently used one.
        let out = host
            .put(&k[..1], &s[..64], Retention::DEFAULT_PRIORITY)
            .unwrap();
        assert_eq!(out.present, 1);
        let _ = host
            .put(&k[2..3], &s[128..192], Retention::DEFAULT_PRIORITY)
            .unwrap();
        assert_eq!(held(&host, &k), [true, false, true]);
        // Offered again pinned, it outlives newer default blocks.
        let _ = host.put(&k[..1], &s[..64], 90).unwrap();
        let _ = host
            .put(&k[1..2], &s[64..128], Retention::DEFAULT_PRIORITY)
            .unwrap();
        assert_eq!(held(&host, &k), [true, true, false]);
    }

    #[test]
    fn low_priority_blocks_are_not_offloaded() {
        let mut cfg = HostConfig::new(64 * 8, 4);
        cfg.min_priority = 35;
        let host = HostTier::new(ns(), cfg).unwrap();
        let (keys, src) = blocks(&[1, 2]);
        let out = host.put(&keys, &src, 34).unwrap();
        assert_eq!((out.stored, out.skipped), (0, 2));
        assert_eq!(host.put(&keys, &src, 35).unwrap().stored, 2);
        assert_eq!(host.stats().below_priority, 2);
        // A pin below the floor that has expired is offered at the default, and kept.
        let (more, more_src) = blocks(&[3]);
        let out = host
            .put_retained(&more, &more_src, pinned(5, Some(100)), 100)
            .unwrap();
        assert_eq!(out.stored, 1);
    }

    #[test]
    fn remove_frees_empty_pages() {
        let host = HostTier::new(ns(), HostConfig::new(64 * 2, 2)).unwrap();
        let (keys, src) = blocks(&[1, 2]);
        let _ = host.put(&keys, &src, 0).unwrap();
        // Open a second put: the page is full, the next block takes the only page back.
        assert_eq!(host.remove(&keys).unwrap(), 2);
        assert_eq!(host.remove(&keys).unwrap(), 0);
        assert_eq!(host.usage().blocks, 0);
        let (k2, s2) = blocks(&[3, 4]);
        let out = host.put(&k2, &s2, 0).unwrap();
        assert_eq!((out.stored, out.evicted), (2, 0));
    }

    #[test]
    fn bad_buffers_and_configs_are_errors() {
        let host = HostTier::new(ns(), HostConfig::new(1024, 4)).unwrap();
        assert!(matches!(
            host.put(&[StoreKey(1)], &[0; 63], 0),
            Err(StoreError::BufferSize { .. })
        ));
        let mut found = Vec::new();
        assert!(host.get(&[StoreKey(1)], &mut [0; 65], &mut found).is_err());
        assert_eq!(
            HostTier::new(ns(), HostConfig::new(1024, 0)).err(),
            Some(HostConfigError::ZeroBlocksPerPage)
        );
        assert!(matches!(
            HostTier::new(ns(), HostConfig::new(255, 4)).err(),
            Some(HostConfigError::NoPage { .. })
        ));
    }
}
