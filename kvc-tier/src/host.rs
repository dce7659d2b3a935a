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
//! Each page is one allocation made at construction (zeroed, so the OS maps it lazily); an
//! engine with a GPU registers the pages as pinned memory so that copies are DMA transfers.
//!
//! **Copies happen outside the tier's lock**, so a large load or offload does not stall
//! callers working on other pages. The lock guards only the bookkeeping; each page's bytes sit
//! behind the page's own reader-writer lock, taken for the copy alone. A `put` reserves its
//! slots under the tier's lock (the pages it writes cannot be evicted or freed until it is
//! done), copies its blocks in, and publishes them under the lock again: a block is found only
//! once its bytes are whole. A `get` notes where each block lies and the page's generation
//! (bumped whenever the page is opened afresh), copies, and keeps only the blocks whose page
//! was not reused meanwhile: a read racing an eviction sees either the whole block or a miss,
//! never bytes of another block. Lock order: the tier's lock, then a page's; no caller waits
//! for the tier's lock while holding a page's.

use std::collections::BTreeSet;

use ahash::{AHashMap, AHashSet};
use kvc_core::sync::{Mutex, MutexGuard, RwLock};
use kvc_core::{
    BlockStore, PutOutcome, Retention, StoreError, StoreKey, StoreNamespace, StoreUsage,
    check_buffer,
};
use thiserror::Error;

use crate::clock::{PinClock, clamped, expiry};

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
    /// The capacity is more than this machine's physical memory (read from `/proc/meminfo`
    /// on Linux; not checked elsewhere): a host tier that large would only swap, or be
    /// killed when its pages are written.
    #[error(
        "host tier: {capacity_bytes} bytes asked, but this machine has {machine_bytes} bytes of memory"
    )]
    ExceedsMachine {
        /// Capacity asked.
        capacity_bytes: u64,
        /// The machine's physical memory.
        machine_bytes: u64,
    },
}

/// The machine's physical memory, where the system says (Linux: `MemTotal` of
/// `/proc/meminfo`); `None` elsewhere or when it cannot be read.
fn machine_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
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
    /// Blocks `get` found but lost to an eviction that reused their page while they were
    /// being copied (counted as misses too).
    pub raced_reads: u64,
    /// Blocks `put` did not store because every page was being written by other callers.
    pub no_room: u64,
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
    /// Bumped each time the page is opened afresh: a read planned at an older generation
    /// copied a page that was reused under it.
    generation: u64,
    /// Slots reserved in the page whose bytes are being copied in without the tier's lock:
    /// until they are published, the page is neither evicted nor freed.
    writers: u32,
}

impl Frame {
    /// The page's place in the eviction order.
    const fn order_key(&self, frame: u32) -> (u8, u64, u32) {
        (self.priority, self.tick, frame)
    }
}

struct Inner {
    frames: Vec<Frame>,
    free: Vec<u32>,
    /// The pages being filled, one per priority offered: (priority, page). Blocks of
    /// different priorities never share a page, so a pin neither spreads to its neighbours
    /// nor loses its blocks with theirs.
    open: Vec<(u8, u32)>,
    /// Pages in use in eviction order: lowest priority first, then least recently used.
    order: BTreeSet<(u8, u64, u32)>,
    /// The latest clock, and when the earliest pin in force in a page expires, one entry per
    /// change of a page's earliest expiry (a stale entry, the page reused or re-pinned since,
    /// only costs a re-rank).
    clock: PinClock<u32>,
    map: AHashMap<StoreKey, Slot>,
    tick: u64,
    stats: HostStats,
}

impl Inner {
    /// Moves the clock to `now_ms` (never back) and re-ranks the pages whose pins expired.
    fn advance(&mut self, now_ms: u64) {
        self.clock.set(now_ms);
        while let Some((_, frame)) = self.clock.pop_due() {
            if self.frames[frame as usize].in_use {
                self.rerank(frame);
            }
        }
    }

    /// Re-reads the page's priority, and the earliest expiry of a pin in force, from its live
    /// blocks.
    fn rerank(&mut self, frame: u32) {
        let now = self.clock.now();
        let f = &mut self.frames[frame as usize];
        let mut priority = None;
        let mut next_expiry: Option<u64> = None;
        for (_, r) in f.slots.iter().flatten() {
            priority = priority.max(Some(r.priority_at(now)));
            if let Some(until) = expiry(*r, now) {
                next_expiry = Some(next_expiry.map_or(until, |e| e.min(until)));
            }
        }
        let priority = priority.unwrap_or(Retention::DEFAULT_PRIORITY);
        if next_expiry != f.next_expiry {
            f.next_expiry = next_expiry;
            if let Some(until) = next_expiry {
                self.clock.schedule(until, frame);
            }
        }
        if priority != f.priority {
            self.order.remove(&f.order_key(frame));
            f.priority = priority;
            self.order.insert(f.order_key(frame));
        }
    }

    /// Marks the page used now (if it still holds blocks).
    fn touch(&mut self, frame: u32) {
        let f = &mut self.frames[frame as usize];
        if f.tick == self.tick || !f.in_use {
            return; // already the most recently used, or freed meanwhile
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
    /// The pages' bytes, each behind its own lock (taken after `inner`, never before).
    data: Box<[RwLock<Box<[u8]>>]>,
}

/// Where a run of held blocks lies, as a `get` planned it.
struct Run {
    /// Index of its first key.
    at: usize,
    len: usize,
    slot: Slot,
    generation: u64,
}

/// A block a `put` reserved a slot for: copied in, then published.
#[derive(Clone, Copy)]
struct Reserved {
    /// Index of its key (and bytes) in the batch.
    from: usize,
    slot: Slot,
}

/// Where the bytes of a block an eviction dropped are, for the spill.
enum Spilled {
    /// In a page (evicted, and reopened for the batch: nobody writes it until the batch does).
    Page(Slot),
    /// Still in the batch's source: a block of the batch itself, whose page it evicted.
    Source(usize),
}

/// What a `put` carries through its reservation: its blocks, what it reserved, what it
/// evicted for the spill, and its outcome so far.
struct Batch<'a> {
    keys: &'a [StoreKey],
    retention: Retention,
    reserved: Vec<Reserved>,
    /// Present when the caller wants the evicted blocks.
    spilled: Option<Vec<(StoreKey, Retention, Spilled)>>,
    out: PutOutcome,
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
    ///
    /// Size `cfg.capacity_bytes` from the host memory you can spare: the pages are allocated
    /// here (zeroed lazily by the system: memory is committed as blocks are written). A
    /// capacity above the machine's physical memory is refused where the system says how
    /// much there is (Linux); below that, a capacity other processes have already taken can
    /// still make the allocator abort the process or the system kill it once the pages fill
    /// (an out-of-memory condition, not an error this function can return).
    ///
    /// # Errors
    /// [`HostConfigError::ZeroBlocksPerPage`]; [`HostConfigError::NoPage`] when the capacity
    /// holds no page; [`HostConfigError::TooLarge`] when the pool does not fit in the address
    /// space; [`HostConfigError::ExceedsMachine`] when it is more than the machine's memory.
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
        // The whole pool must be addressable, though each page is its own allocation.
        page_bytes
            .checked_mul(frames as usize)
            .ok_or(too_large.clone())?;
        let block_bytes = usize::try_from(ns.block_bytes()).map_err(|_| too_large)?;
        if let Some(machine_bytes) = machine_memory_bytes()
            && cfg.capacity_bytes > machine_bytes
        {
            return Err(HostConfigError::ExceedsMachine {
                capacity_bytes: cfg.capacity_bytes,
                machine_bytes,
            });
        }
        let frame = Frame {
            slots: vec![None; cfg.blocks_per_page as usize],
            filled: 0,
            live: 0,
            tick: 0,
            priority: Retention::DEFAULT_PRIORITY,
            next_expiry: None,
            in_use: false,
            generation: 0,
            writers: 0,
        };
        Ok(Self {
            ns,
            block_bytes,
            blocks_per_page: cfg.blocks_per_page,
            page_bytes,
            min_priority: cfg.min_priority,
            data: (0..frames)
                .map(|_| RwLock::new(vec![0; page_bytes].into_boxed_slice()))
                .collect(),
            inner: Mutex::new(Inner {
                frames: vec![frame; frames as usize],
                free: (0..frames).rev().collect(),
                open: Vec::new(),
                order: BTreeSet::new(),
                clock: PinClock::new(),
                map: AHashMap::new(),
                tick: 0,
                stats: HostStats::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The bookkeeping is updated with no copy in between, so a poisoned lock is still
        // consistent (a panicking writer leaves its reserved slots unpublished, never visible).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads page `frame`'s bytes.
    fn read_page(&self, frame: u32) -> impl std::ops::Deref<Target = Box<[u8]>> + '_ {
        self.data[frame as usize]
            .read()
            .unwrap_or_else(|e| e.into_inner())
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

    /// Every block held now, least worth keeping first (the order the tier would evict its
    /// pages in: lowest priority in force, then least recently used), each with the
    /// retention it was stored with; returns the tier's clock (the latest `now_ms` it was
    /// given), at which to read those retentions. Blocks stored or evicted by other callers
    /// meanwhile are not reflected: a snapshot of the bookkeeping, no bytes copied.
    pub fn held(&self, keys: &mut Vec<StoreKey>, retentions: &mut Vec<Retention>) -> u64 {
        let g = self.lock();
        for &(_, _, frame) in &g.order {
            for (key, retention) in g.frames[frame as usize].slots.iter().flatten() {
                keys.push(*key);
                retentions.push(*retention);
            }
        }
        g.clock.now()
    }

    /// Like [`BlockStore::put_retained`], and the live blocks of every page evicted to make
    /// room are appended to `spill` (to demote them to a lower tier).
    ///
    /// `now_ms` is the caller's clock for the pins' expiries; the tier keeps the latest clock
    /// it was given, so an older one (or 0, from [`BlockStore::put`]) changes nothing. A block
    /// already held takes the new retention (the latest offer is the device's latest word).
    ///
    /// A batch larger than the pages it may take evicts its own earliest pages as it fills:
    /// those blocks count in both [`PutOutcome::stored`] and [`PutOutcome::evicted`], are
    /// not held afterwards, and go to `spill` like any other evicted block.
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
        spill: Option<&mut Spill>,
        floor: bool,
    ) -> Result<PutOutcome, StoreError> {
        check_buffer(keys.len(), self.block_bytes as u64, src.len())?;
        let retention = clamped(retention);
        let bb = self.block_bytes;
        let mut b = Batch {
            keys,
            retention,
            reserved: Vec::new(),
            spilled: spill.is_some().then(Vec::new),
            out: PutOutcome::default(),
        };
        // 1. Under the lock: a block already held takes the new retention; a new one gets a slot.
        let (class, pinned, now) = {
            let mut g = self.lock();
            let inner = &mut *g;
            inner.advance(now_ms);
            let now = inner.clock.now();
            if floor && retention.priority_at(now) < self.min_priority {
                b.out.skipped = keys.len();
                inner.stats.below_priority += keys.len() as u64;
                return Ok(b.out);
            }
            // A pin in force that will expire: its page must queue the expiry.
            let pinned = expiry(retention, now).is_some();
            let class = retention.priority_at(now);
            let mut offered = AHashSet::new();
            for (i, &key) in keys.iter().enumerate() {
                if let Some(slot) = inner.map.get(&key).copied() {
                    b.out.present += 1;
                    if let Some((_, r)) =
                        &mut inner.frames[slot.frame as usize].slots[slot.slot as usize]
                    {
                        *r = retention;
                    }
                    inner.touch(slot.frame);
                    inner.rerank(slot.frame);
                    continue;
                }
                if !offered.insert(key) {
                    b.out.present += 1; // twice in the batch
                    continue;
                }
                match self.next_slot(inner, class, &mut b) {
                    Some(slot) => {
                        inner.frames[slot.frame as usize].writers += 1;
                        b.reserved.push(Reserved { from: i, slot });
                    }
                    None => {
                        b.out.skipped += 1;
                        inner.stats.no_room += 1;
                    }
                }
            }
            (class, pinned, now)
        };
        // 2. Without the tier's lock: copy out what the evictions dropped (their pages are
        // this batch's now, and it has not written them yet), then copy the blocks in, one
        // run of consecutive slots of a page at a time.
        if let (Some(sp), Some(spilled)) = (spill, &b.spilled)
            && !spilled.is_empty()
        {
            sp.now_ms = now;
            for (key, r, at) in spilled {
                sp.keys.push(*key);
                sp.retentions.push(*r);
                match *at {
                    Spilled::Page(slot) => {
                        let page = self.read_page(slot.frame);
                        let from = slot.slot as usize * bb;
                        sp.bytes.extend_from_slice(&page[from..from + bb]);
                    }
                    Spilled::Source(i) => sp.bytes.extend_from_slice(&src[i * bb..(i + 1) * bb]),
                }
            }
        }
        let reserved = std::mem::take(&mut b.reserved);
        let mut out = b.out;
        let mut j = 0;
        while j < reserved.len() {
            let first = reserved[j];
            let mut run = 1;
            while let Some(next) = reserved.get(j + run) {
                if next.slot.frame != first.slot.frame
                    || next.slot.slot != first.slot.slot + run as u32
                    || next.from != first.from + run
                {
                    break;
                }
                run += 1;
            }
            let mut page = self.data[first.slot.frame as usize]
                .write()
                .unwrap_or_else(|e| e.into_inner());
            let at = first.slot.slot as usize * bb;
            page[at..at + run * bb].copy_from_slice(&src[first.from * bb..(first.from + run) * bb]);
            j += run;
        }
        // 3. Under the lock: publish.
        let mut g = self.lock();
        let inner = &mut *g;
        for r in &reserved {
            let key = keys[r.from];
            inner.frames[r.slot.frame as usize].writers -= 1;
            if inner.map.contains_key(&key) {
                // Another caller stored it meanwhile: this copy is a dead slot.
                out.present += 1;
                self.free_if_empty(inner, r.slot.frame);
                continue;
            }
            let f = &mut inner.frames[r.slot.frame as usize];
            f.slots[r.slot.slot as usize] = Some((key, retention));
            f.live += 1;
            // Another block of the page's own rank with no pin to expire leaves the page's
            // rank and next expiry as they are.
            let same_rank = f.live > 1 && f.priority == class && !pinned;
            inner.map.insert(key, r.slot);
            inner.stats.stored += 1;
            out.stored += 1;
            inner.touch(r.slot.frame);
            if !same_rank {
                // Its rank, and when it changes next (a pin expiring).
                inner.rerank(r.slot.frame);
            }
        }
        Ok(out)
    }

    /// Frees page `frame` if it holds nothing and nobody is writing it: an empty page must not
    /// sit in the eviction order, where it would rank above pages holding blocks.
    fn free_if_empty(&self, inner: &mut Inner, frame: u32) {
        let f = &mut inner.frames[frame as usize];
        if !f.in_use || f.live > 0 || f.writers > 0 {
            return;
        }
        let key = f.order_key(frame);
        f.in_use = false;
        f.filled = 0;
        inner.order.remove(&key);
        inner.open.retain(|&(_, f)| f != frame);
        inner.free.push(frame);
    }

    /// The next free slot of the page open for blocks of priority `class`, opening (and if
    /// need be evicting) a page; `None` when every page is being written by other callers.
    fn next_slot(&self, inner: &mut Inner, class: u8, batch: &mut Batch<'_>) -> Option<Slot> {
        if let Some(at) = inner.open.iter().position(|&(c, _)| c == class) {
            let open = inner.open[at].1;
            let f = &mut inner.frames[open as usize];
            if f.filled < self.blocks_per_page {
                let slot = f.filled;
                f.filled += 1;
                return Some(Slot { frame: open, slot });
            }
            inner.open.swap_remove(at);
        }
        let frame = match inner.free.pop() {
            Some(frame) => frame,
            None => self.evict_one(inner, batch)?,
        };
        let f = &mut inner.frames[frame as usize];
        f.in_use = true;
        f.filled = 1;
        f.live = 0;
        f.slots.fill(None);
        // The rank of the blocks it is opened for, as soon as they are reserved.
        f.priority = class;
        f.next_expiry = None;
        f.generation += 1;
        inner.open.push((class, frame));
        inner.tick += 1;
        f.tick = inner.tick;
        inner.order.insert(f.order_key(frame));
        Some(Slot { frame, slot: 0 })
    }

    /// Evicts the first page in eviction order (lowest priority, then least recently used)
    /// that no other caller is writing, and returns it, empty. (It is called only when the
    /// page open for the blocks at hand is full, so that page is as fair a victim as any; a
    /// page open for another priority may go too, and is no longer open.) Blocks of this
    /// batch reserved in that page are stored and evicted at once, as if copied in first:
    /// their bytes go to the spill from the batch's source.
    fn evict_one(&self, inner: &mut Inner, batch: &mut Batch<'_>) -> Option<u32> {
        let &(rank, tick, frame) = inner.order.iter().find(|&&(_, _, frame)| {
            let writers = inner.frames[frame as usize].writers as usize;
            writers == 0
                || writers
                    == batch
                        .reserved
                        .iter()
                        .filter(|r| r.slot.frame == frame)
                        .count()
        })?;
        inner.order.remove(&(rank, tick, frame));
        inner.open.retain(|&(_, f)| f != frame);
        let f = &mut inner.frames[frame as usize];
        for s in 0..f.filled {
            let slot = Slot { frame, slot: s };
            let (key, retention, at) = match f.slots[s as usize].take() {
                Some((key, retention)) => {
                    inner.map.remove(&key);
                    (key, retention, Spilled::Page(slot))
                }
                None => match batch.reserved.iter().position(|r| r.slot == slot) {
                    Some(at) => {
                        let from = batch.reserved.remove(at).from;
                        f.writers -= 1;
                        batch.out.stored += 1;
                        inner.stats.stored += 1;
                        (batch.keys[from], batch.retention, Spilled::Source(from))
                    }
                    None => continue, // removed, or a dead copy
                },
            };
            batch.out.evicted += 1;
            inner.stats.evicted_blocks += 1;
            if let Some(sp) = batch.spilled.as_mut() {
                sp.push((key, retention, at));
            }
        }
        f.live = 0;
        f.filled = 0;
        f.in_use = false;
        inner.stats.evicted_pages += 1;
        Some(frame)
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
        let bb = self.block_bytes;
        found.clear();
        found.resize(keys.len(), false);
        // 1. Under the lock: where each run of held blocks lies (a run: the next key in the
        // next slot of the same page), and its page's generation.
        let mut runs = Vec::new();
        {
            let g = self.lock();
            let mut i = 0;
            while i < keys.len() {
                let Some(first) = g.map.get(&keys[i]).copied() else {
                    i += 1;
                    continue;
                };
                let mut len = 1;
                while i + len < keys.len()
                    && g.map.get(&keys[i + len]).copied()
                        == Some(Slot {
                            frame: first.frame,
                            slot: first.slot + len as u32,
                        })
                {
                    len += 1;
                }
                runs.push(Run {
                    at: i,
                    len,
                    slot: first,
                    generation: g.frames[first.frame as usize].generation,
                });
                i += len;
            }
        }
        // 2. Without the tier's lock: one copy per run, under its page's read lock.
        for r in &runs {
            let page = self.read_page(r.slot.frame);
            let from = r.slot.slot as usize * bb;
            dst[r.at * bb..(r.at + r.len) * bb].copy_from_slice(&page[from..from + r.len * bb]);
        }
        // 3. Under the lock: keep the runs whose page was not opened afresh meanwhile.
        let mut g = self.lock();
        let inner = &mut *g;
        let mut hits = 0;
        for r in &runs {
            if inner.frames[r.slot.frame as usize].generation == r.generation {
                found[r.at..r.at + r.len].fill(true);
                inner.touch(r.slot.frame);
                inner.stats.get_copies += 1;
                hits += r.len;
            } else {
                inner.stats.raced_reads += r.len as u64;
            }
        }
        inner.stats.hits += hits as u64;
        inner.stats.misses += (keys.len() - hits) as u64;
        Ok(hits)
    }

    fn put(&self, keys: &[StoreKey], src: &[u8], priority: u8) -> Result<PutOutcome, StoreError> {
        let retention = Retention::fixed(priority);
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
                // Empty, open or not: back to the free list, unless a put is copying into it.
                self.free_if_empty(inner, slot.frame);
            }
            if inner.frames[slot.frame as usize].in_use {
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
    fn a_priority_above_the_range_ranks_as_the_highest_not_above_it() {
        // Two pages of one block: a block offered at 250, then a pin at 100, then another.
        let host = HostTier::new(ns(), HostConfig::new(64 * 2, 1)).unwrap();
        let (k, s) = blocks(&[1, 2, 3]);
        let _ = host.put(&k[..1], &s[..64], 250).unwrap();
        let _ = host
            .put(&k[1..2], &s[64..128], Retention::MAX_PRIORITY)
            .unwrap();
        // Both rank at 100: the least recently used of them goes, not the pin offered later.
        let _ = host
            .put(&k[2..3], &s[128..192], Retention::MAX_PRIORITY)
            .unwrap();
        assert_eq!(held(&host, &k), [false, true, true]);
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

    #[test]
    #[cfg(target_os = "linux")]
    fn a_capacity_beyond_the_machine_is_refused_before_anything_is_allocated() {
        let machine = machine_memory_bytes().expect("Linux reports MemTotal");
        // 64 MiB pages, twice the machine: a pool the process could never fill.
        let cfg = HostConfig::new(machine * 2, 1 << 20);
        assert_eq!(
            HostTier::new(ns(), cfg).err(),
            Some(HostConfigError::ExceedsMachine {
                capacity_bytes: machine * 2,
                machine_bytes: machine,
            })
        );
        let err = HostTier::new(ns(), cfg).err().unwrap().to_string();
        assert!(err.contains("bytes of memory"), "{err}");
    }
}
