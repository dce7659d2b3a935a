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
//! Eviction is by page, least recently used first (a `get` hit or a repeated `put` touches the
//! page); the live blocks of an evicted page can be handed to the caller (see
//! [`HostTier::put_spilling`]) to demote them to a lower tier. Blocks offered with a retention
//! priority below [`HostConfig::min_priority`] are not stored (TensorRT-LLM's
//! `secondary_offload_min_priority`).
//!
//! The pool is one allocation made at construction (zeroed, so the OS maps it lazily); an
//! engine with a GPU registers it as pinned memory so that copies are DMA transfers. Copies in
//! and out happen under the tier's lock, so a read racing an eviction sees either the whole
//! block or a miss, never bytes of another block.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use ahash::AHashMap;
use kvc_core::{
    BlockStore, PutOutcome, StoreError, StoreKey, StoreNamespace, StoreUsage, check_buffer,
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

/// Blocks an eviction pushed out of the host tier: keys and their bytes back to back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spill {
    /// Keys of the evicted blocks.
    pub keys: Vec<StoreKey>,
    /// Their payloads, `keys.len() × block_bytes`.
    pub bytes: Vec<u8>,
}

impl Spill {
    /// Empties the spill, keeping its buffers.
    pub fn clear(&mut self) {
        self.keys.clear();
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
    keys: Vec<Option<StoreKey>>,
    filled: u32,
    live: u32,
    tick: u64,
    in_use: bool,
}

struct Inner {
    data: Vec<u8>,
    frames: Vec<Frame>,
    free: Vec<u32>,
    open: Option<u32>,
    lru: BTreeSet<(u64, u32)>,
    map: AHashMap<StoreKey, Slot>,
    tick: u64,
    stats: HostStats,
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
            keys: vec![None; cfg.blocks_per_page as usize],
            filled: 0,
            live: 0,
            tick: 0,
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
                open: None,
                lru: BTreeSet::new(),
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

    /// Like [`BlockStore::put`], and the live blocks of every page evicted to make room are
    /// appended to `spill` (to demote them to a lower tier).
    pub fn put_spilling(
        &self,
        keys: &[StoreKey],
        src: &[u8],
        priority: u8,
        mut spill: Option<&mut Spill>,
    ) -> Result<PutOutcome, StoreError> {
        check_buffer(keys.len(), self.block_bytes as u64, src.len())?;
        let mut out = PutOutcome::default();
        if priority < self.min_priority {
            out.skipped = keys.len();
            self.lock().stats.below_priority += keys.len() as u64;
            return Ok(out);
        }
        let mut g = self.lock();
        let inner = &mut *g;
        for (i, &key) in keys.iter().enumerate() {
            if let Some(slot) = inner.map.get(&key).copied() {
                touch(inner, slot.frame);
                out.present += 1;
                continue;
            }
            let slot = self.next_slot(inner, &mut out, spill.as_deref_mut());
            let at = slot.frame as usize * self.page_bytes + slot.slot as usize * self.block_bytes;
            let from = i * self.block_bytes;
            inner.data[at..at + self.block_bytes]
                .copy_from_slice(&src[from..from + self.block_bytes]);
            let f = &mut inner.frames[slot.frame as usize];
            f.keys[slot.slot as usize] = Some(key);
            f.live += 1;
            inner.map.insert(key, slot);
            inner.stats.stored += 1;
            out.stored += 1;
        }
        Ok(out)
    }

    /// The next free slot of the open page, opening (and if need be evicting) a page.
    fn next_slot(
        &self,
        inner: &mut Inner,
        out: &mut PutOutcome,
        spill: Option<&mut Spill>,
    ) -> Slot {
        if let Some(open) = inner.open {
            let f = &mut inner.frames[open as usize];
            if f.filled < self.blocks_per_page {
                let slot = f.filled;
                f.filled += 1;
                touch(inner, open);
                return Slot { frame: open, slot };
            }
        }
        let frame = match inner.free.pop() {
            Some(frame) => frame,
            None => self.evict_one(inner, out, spill),
        };
        let f = &mut inner.frames[frame as usize];
        f.in_use = true;
        f.filled = 1;
        f.live = 0;
        f.keys.fill(None);
        inner.open = Some(frame);
        inner.tick += 1;
        f.tick = inner.tick;
        inner.lru.insert((inner.tick, frame));
        Slot { frame, slot: 0 }
    }

    /// Evicts the least recently used page and returns it, empty. (It is called only when the
    /// open page is full, so the open page is as fair a victim as any.)
    fn evict_one(&self, inner: &mut Inner, out: &mut PutOutcome, spill: Option<&mut Spill>) -> u32 {
        let victim = inner.lru.iter().next().copied();
        // The pool has at least one page and no page is free here, so the LRU list is not
        // empty; fall back to page 0 rather than panic if that ever stops holding.
        let (tick, frame) = victim.unwrap_or((inner.frames[0].tick, 0));
        inner.lru.remove(&(tick, frame));
        if inner.open == Some(frame) {
            inner.open = None;
        }
        let base = frame as usize * self.page_bytes;
        let mut spill = spill;
        let f = &mut inner.frames[frame as usize];
        for (s, key) in f.keys.iter_mut().enumerate() {
            if let Some(key) = key.take() {
                inner.map.remove(&key);
                out.evicted += 1;
                inner.stats.evicted_blocks += 1;
                if let Some(sp) = spill.as_deref_mut() {
                    let at = base + s * self.block_bytes;
                    sp.keys.push(key);
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

fn touch(inner: &mut Inner, frame: u32) {
    let f = &mut inner.frames[frame as usize];
    inner.lru.remove(&(f.tick, frame));
    inner.tick += 1;
    f.tick = inner.tick;
    inner.lru.insert((inner.tick, frame));
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
            touch(inner, first.frame);
            found.extend(std::iter::repeat_n(true, run));
            inner.stats.hits += run as u64;
            inner.stats.get_copies += 1;
            hits += run;
            i += run;
        }
        Ok(hits)
    }

    fn put(&self, keys: &[StoreKey], src: &[u8], priority: u8) -> Result<PutOutcome, StoreError> {
        self.put_spilling(keys, src, priority, None)
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
            f.keys[slot.slot as usize] = None;
            f.live -= 1;
            if f.live == 0 && inner.open != Some(slot.frame) {
                let tick = f.tick;
                f.in_use = false;
                f.filled = 0;
                inner.lru.remove(&(tick, slot.frame));
                inner.free.push(slot.frame);
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
        let out = host.put_spilling(&k3, &s3, 0, Some(&mut spill)).unwrap();
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
