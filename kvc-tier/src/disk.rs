//! The disk tier: one file per page under a configured folder, bounded by a byte budget,
//! found again after a restart.
//!
//! **Why one file per page** (rather than segment files with an index): a page is written to a
//! temporary name and renamed into place, so a crash never leaves a half-written page under a
//! page name; eviction is one `unlink`, which gives the space back at once with no compaction
//! or garbage collection of segments; and the index is nothing but the page headers, read
//! again at start-up. Pages are large (several device blocks: 8–32 MiB for an 8B model), so the
//! per-file cost (one open, one inode) is small next to the transfer. Segment files would win
//! for many tiny pages (thousands of files per GiB); pick more blocks per page then.
//!
//! A page file holds a header (the namespace encoding, the block size, the keys, one XXH3-64
//! checksum per block and a checksum of the header) and the blocks back to back. Each namespace
//! has its own subfolder (named by its fingerprint), and headers are compared byte for byte, so
//! a block of another model, layout, dtype or rank is never read back. At start-up a page whose
//! header is damaged or whose length is not what the header says (a truncated write) is
//! deleted; a block whose checksum does not match when it is read is a miss, and its whole page
//! is deleted. A read that races the eviction of its page finds the file gone: a miss.
//!
//! A namespace's folder serves one open tier at a time: [`DiskTier::open`] locks its `lock`
//! file, and a second open of the folder (another engine given the same folder, in this
//! process or another) is [`DiskOpenError::InUse`].
//!
//! Eviction is by page, in the device's order: lowest retention priority first, and least
//! recently used among pages of one priority (a hit touches the page). A page ranks at the
//! retention it was written with ([`BlockStore::put_retained`]; the host tier passes on each
//! spilled block's own); a pinned page's rank decays to [`Retention::DEFAULT_PRIORITY`] when its
//! pin expires on the caller's clock, which the tier keeps as the latest `now_ms` it was given.
//! A block offered again while held raises its page's rank if the new retention ranks higher.
//! Pages found at start-up rank at the default (pins are in the engine's clock, which does not
//! survive a restart) and count as used in the order they were written.

use std::collections::BTreeSet;
use std::fs::{self, File, TryLockError};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use ahash::{AHashMap, AHashSet};
use kvc_core::{
    BlockStore, PutOutcome, Retention, StoreError, StoreKey, StoreNamespace, StoreUsage,
    check_buffer,
};
use thiserror::Error;

use crate::clock::{PinClock, clamped, expiry};
use crate::codec::{PageHeader, checksum};

/// Where a [`DiskTier`] keeps its pages and how much it may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The folder (created if needed); each namespace gets a subfolder.
    pub dir: PathBuf,
    /// Bytes of page files (headers included) the tier may keep.
    pub budget_bytes: u64,
    /// Device blocks per page file.
    pub blocks_per_page: u32,
    /// `fsync` each page before it is renamed into place (durable across power loss; slower).
    /// Without it a page lost in the page cache by a crash is caught by its checksums.
    pub sync: bool,
}

impl DiskConfig {
    /// Pages of `blocks_per_page` blocks under `dir`, at most `budget_bytes`, without fsync.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>, budget_bytes: u64, blocks_per_page: u32) -> Self {
        Self {
            dir: dir.into(),
            budget_bytes,
            blocks_per_page,
            sync: false,
        }
    }
}

/// Why a [`DiskTier`] could not be opened.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DiskOpenError {
    /// `blocks_per_page` was zero.
    #[error("disk tier: blocks per page must be at least 1")]
    ZeroBlocksPerPage,
    /// The folder could not be created or listed.
    #[error("disk tier: cannot use {path}: {source}")]
    Dir {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Another disk tier (in this process or another) has this namespace's folder open: two
    /// tiers numbering pages in one folder would overwrite each other's pages. Give each
    /// engine its own [`DiskConfig::dir`], or share blocks through the shared tier. The lock
    /// goes with the last handle on the tier: an engine dropped while a background load
    /// still reads from it keeps the folder until that load ends, so a restart on the same
    /// folder at once may see this and should try again shortly.
    #[error("disk tier: {path} is in use by another disk tier")]
    InUse {
        /// The namespace's folder.
        path: PathBuf,
    },
}

/// Counters of a [`DiskTier`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Blocks found by `get`.
    pub hits: u64,
    /// Blocks asked of `get` and not found (including corrupt and raced ones).
    pub misses: u64,
    /// Page files written.
    pub pages_written: u64,
    /// Pages evicted for the budget.
    pub evicted_pages: u64,
    /// Pages dropped because a block failed its checksum or the file was short on read.
    pub corrupt_pages: u64,
    /// Reads that found their page evicted in between (a miss).
    pub raced_reads: u64,
    /// Pages found intact at start-up.
    pub recovered_pages: u64,
    /// Files deleted at start-up: damaged, truncated or unfinished pages.
    pub dropped_at_open: u64,
    /// Blocks not stored because one page of them exceeds the whole budget.
    pub over_budget: u64,
}

#[derive(Clone, Debug)]
struct Page {
    keys: Vec<Option<StoreKey>>,
    sums: Vec<u64>,
    header_len: u64,
    file_bytes: u64,
    live: u32,
    tick: u64,
    /// The retention the page was written with (or raised to by a later offer).
    retention: Retention,
    /// Its rank in `Inner::order`: the retention's priority in force.
    rank: u8,
}

impl Page {
    fn order_key(&self, id: u64) -> (u8, u64, u64) {
        (self.rank, self.tick, id)
    }
}

struct Inner {
    pages: AHashMap<u64, Page>,
    map: AHashMap<StoreKey, (u64, u32)>,
    /// Pages in eviction order: lowest rank first, then least recently used.
    order: BTreeSet<(u8, u64, u64)>,
    /// The latest clock, and when each page's pin expires (an entry whose page is gone or
    /// whose pin changed since is stale and skipped).
    clock: PinClock<u64>,
    used: u64,
    next_id: u64,
    tick: u64,
    stats: DiskStats,
}

impl Inner {
    /// Moves the clock to `now_ms` (never back) and re-ranks the pages whose pins expired.
    fn advance(&mut self, now_ms: u64) {
        self.clock.set(now_ms);
        let now = self.clock.now();
        while let Some((until, id)) = self.clock.pop_due() {
            if let Some(page) = self.pages.get_mut(&id)
                && page.retention.until == Some(until)
            {
                self.order.remove(&page.order_key(id));
                page.rank = page.retention.priority_at(now);
                self.order.insert(page.order_key(id));
            }
        }
    }

    /// Gives page `id` `retention` if it ranks higher now than the page's own.
    fn raise(&mut self, id: u64, retention: Retention) {
        let now = self.clock.now();
        let Some(page) = self.pages.get_mut(&id) else {
            return;
        };
        let rank = retention.priority_at(now);
        if rank <= page.rank {
            return;
        }
        self.order.remove(&page.order_key(id));
        page.retention = retention;
        page.rank = rank;
        self.order.insert(page.order_key(id));
        if let Some(until) = expiry(retention, now) {
            self.clock.schedule(until, id);
        }
    }
}

/// A disk tier: see the [module docs](self).
pub struct DiskTier {
    ns: StoreNamespace,
    ns_bytes: Vec<u8>,
    dir: PathBuf,
    block_bytes: u64,
    blocks_per_page: u32,
    budget: u64,
    sync: bool,
    inner: Mutex<Inner>,
    /// The namespace folder's lock file, locked exclusively for the tier's lifetime.
    _lock: File,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("dir", &self.dir)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

const PAGE_EXT: &str = "kvcpage";
const TMP_EXT: &str = "tmp";
/// The lock file a tier holds in its namespace folder while open.
const LOCK_FILE: &str = "lock";

/// The id of a page file named `stem`, when the tier could have written that name: exactly the
/// 16 lowercase hex digits `page_path` writes, below `u64::MAX` (the tier numbers its
/// pages from one past the highest found). Any other name is not a page of the tier's and is
/// left alone: a `1.kvcpage` beside `0000000000000001.kvcpage` must not be taken for it.
fn page_id(stem: &str) -> Option<u64> {
    let digits = stem.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if stem.len() != 16 || !digits {
        return None;
    }
    u64::from_str_radix(stem, 16)
        .ok()
        .filter(|&id| id < u64::MAX)
}

fn io_err(op: &'static str, e: &io::Error) -> StoreError {
    StoreError::Io {
        op,
        message: e.to_string(),
    }
}

impl DiskTier {
    /// Opens (or creates) the tier for `ns` under `cfg.dir`, indexing the pages already there.
    ///
    /// Pages already there beyond `cfg.budget_bytes` (the folder was filled under a larger
    /// budget) are deleted at once, the earliest written first: opening with a smaller budget
    /// discards KV on disk. A budget smaller than one page file opens, but stores nothing
    /// (every put is declined as [`PutOutcome::skipped`](kvc_core::PutOutcome::skipped)).
    ///
    /// A namespace's folder serves one tier at a time: the tier holds a lock on its `lock`
    /// file until it is dropped (where the file system has locks), so a second open of the
    /// same folder and namespace, in this process or another, is refused rather than left to
    /// overwrite the first tier's pages.
    ///
    /// # Errors
    /// [`DiskOpenError::ZeroBlocksPerPage`]; [`DiskOpenError::Dir`] when the folder cannot
    /// be created or listed; [`DiskOpenError::InUse`] when another open tier holds it.
    pub fn open(ns: StoreNamespace, cfg: &DiskConfig) -> Result<Self, DiskOpenError> {
        if cfg.blocks_per_page == 0 {
            return Err(DiskOpenError::ZeroBlocksPerPage);
        }
        let dir = cfg.dir.join(format!("ns-{:016x}", ns.fingerprint()));
        let dir_err = |source| DiskOpenError::Dir {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(dir_err)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(dir_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(DiskOpenError::InUse { path: dir.clone() });
            }
            // A file system without locks: open as before, unguarded.
            Err(TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => {}
            Err(TryLockError::Error(e)) => return Err(dir_err(e)),
        }
        let tier = Self {
            ns_bytes: ns.encode(),
            block_bytes: ns.block_bytes(),
            ns,
            dir: dir.clone(),
            blocks_per_page: cfg.blocks_per_page,
            budget: cfg.budget_bytes,
            sync: cfg.sync,
            _lock: lock,
            inner: Mutex::new(Inner {
                pages: AHashMap::new(),
                map: AHashMap::new(),
                order: BTreeSet::new(),
                clock: PinClock::new(),
                used: 0,
                next_id: 0,
                tick: 0,
                stats: DiskStats::default(),
            }),
        };
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(dir_err)? {
            let path = entry.map_err(dir_err)?.path();
            let id = path.file_stem().and_then(|s| s.to_str()).and_then(page_id);
            match (path.extension().and_then(|e| e.to_str()), id) {
                (Some(PAGE_EXT), Some(id)) => ids.push(id),
                (Some(TMP_EXT), _) => {
                    // An unfinished write from before a crash.
                    let _ = fs::remove_file(&path);
                    tier.lock().stats.dropped_at_open += 1;
                }
                _ => {}
            }
        }
        ids.sort_unstable();
        let mut g = tier.lock();
        for id in ids {
            g.next_id = g.next_id.max(id + 1);
            let path = tier.page_path(id);
            match tier.read_header(&path) {
                Some(page) => {
                    let bytes = page.file_bytes;
                    if tier.index_page(&mut g, id, page) {
                        g.used += bytes;
                        g.stats.recovered_pages += 1;
                    }
                }
                None => {
                    let _ = fs::remove_file(&path);
                    g.stats.dropped_at_open += 1;
                }
            }
        }
        // The budget may have shrunk since the pages were written.
        while g.used > tier.budget {
            if !tier.evict_first(&mut g) {
                break;
            }
        }
        drop(g);
        Ok(tier)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The index is updated only after each file operation, so it stays consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The folder holding this namespace's pages.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> DiskStats {
        self.lock().stats
    }

    fn page_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.{PAGE_EXT}"))
    }

    /// The header of the page at `path`, if intact, of this namespace and as long as it says.
    fn read_header(&self, path: &Path) -> Option<Page> {
        let mut f = File::open(path).ok()?;
        let file_bytes = f.metadata().ok()?.len();
        let fixed = PageHeader::encoded_len(self.ns_bytes.len(), 0);
        let mut head = vec![0; fixed];
        f.read_exact(&mut head).ok()?;
        let count_at = fixed - 12;
        let count = u32::from_le_bytes(head[count_at..count_at + 4].try_into().ok()?) as usize;
        let header_len = PageHeader::encoded_len(self.ns_bytes.len(), count);
        if (header_len as u64) > file_bytes {
            return None;
        }
        head.resize(header_len, 0);
        f.read_exact(&mut head[fixed..]).ok()?;
        let (h, len) = PageHeader::decode(&head, &self.ns_bytes)?;
        let expected = (len as u64).checked_add((count as u64).checked_mul(h.block_bytes)?)?;
        if h.block_bytes != self.block_bytes || expected != file_bytes {
            return None;
        }
        Some(Page {
            keys: h.keys.into_iter().map(Some).collect(),
            sums: h.sums,
            header_len: len as u64,
            file_bytes,
            live: 0,
            tick: 0,
            retention: Retention::DEFAULT,
            rank: Retention::DEFAULT_PRIORITY,
        })
    }

    /// Indexes page `id`; false (and the file deleted) when every block of it is held by
    /// another page already. The caller accounts for the file's bytes.
    fn index_page(&self, inner: &mut Inner, id: u64, mut page: Page) -> bool {
        for (s, slot) in page.keys.iter_mut().enumerate() {
            match slot {
                Some(key) if !inner.map.contains_key(key) => {
                    inner.map.insert(*key, (id, s as u32));
                    page.live += 1;
                }
                // Held by another page already: this copy is dead.
                _ => *slot = None,
            }
        }
        if page.live == 0 {
            let _ = fs::remove_file(self.page_path(id));
            return false;
        }
        inner.tick += 1;
        page.tick = inner.tick;
        let now = inner.clock.now();
        page.rank = page.retention.priority_at(now);
        if let Some(until) = expiry(page.retention, now) {
            inner.clock.schedule(until, id);
        }
        inner.order.insert(page.order_key(id));
        inner.pages.insert(id, page);
        true
    }

    /// Deletes page `id` and forgets its blocks.
    fn drop_page(&self, inner: &mut Inner, id: u64) {
        if let Some(page) = inner.pages.remove(&id) {
            inner.order.remove(&page.order_key(id));
            for key in page.keys.iter().flatten() {
                inner.map.remove(key);
            }
            inner.used -= page.file_bytes;
            let _ = fs::remove_file(self.page_path(id));
        }
    }

    /// Evicts the first page in eviction order (lowest rank, then least recently used);
    /// false when there is none.
    fn evict_first(&self, inner: &mut Inner) -> bool {
        let Some(&(_, _, id)) = inner.order.first() else {
            return false;
        };
        self.drop_page(inner, id);
        inner.stats.evicted_pages += 1;
        true
    }

    fn write_page(&self, id: u64, header: &[u8], blocks: &[&[u8]]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{id:016x}.{TMP_EXT}"));
        let result = (|| {
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            w.write_all(header)?;
            for b in blocks {
                w.write_all(b)?;
            }
            let f = w.into_inner().map_err(io::IntoInnerError::into_error)?;
            if self.sync {
                f.sync_all()?;
            }
            drop(f);
            fs::rename(&tmp, self.page_path(id))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Reads `run` slots from `slot` of page `id` into `dst`.
    fn read_slots(&self, id: u64, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        let mut f = File::open(self.page_path(id))?;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(dst)
    }
}

impl BlockStore for DiskTier {
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
        check_buffer(keys.len(), self.block_bytes, dst.len())?;
        let bb = self.block_bytes as usize;
        // Where each key lies, taken under the lock; the reads happen without it.
        struct Want {
            id: u64,
            slot: u32,
            sum: u64,
            offset: u64,
        }
        let wants: Vec<Option<Want>> = {
            let g = self.lock();
            keys.iter()
                .map(|k| {
                    let &(id, slot) = g.map.get(k)?;
                    let page = g.pages.get(&id)?;
                    Some(Want {
                        id,
                        slot,
                        sum: page.sums[slot as usize],
                        offset: page.header_len + u64::from(slot) * self.block_bytes,
                    })
                })
                .collect()
        };
        found.clear();
        found.resize(keys.len(), false);
        let (mut corrupt, mut raced, mut touched) = (Vec::new(), 0u64, Vec::new());
        let mut i = 0;
        while i < keys.len() {
            let Some(w) = &wants[i] else {
                i += 1;
                continue;
            };
            // One read for a run of consecutive slots of one page.
            let mut run = 1;
            while let Some(Some(next)) = wants.get(i + run) {
                if next.id != w.id || next.slot != w.slot + run as u32 {
                    break;
                }
                run += 1;
            }
            let out = &mut dst[i * bb..(i + run) * bb];
            match self.read_slots(w.id, w.offset, out) {
                Ok(()) => {
                    let mut intact = true;
                    for r in 0..run {
                        let want = wants[i + r].as_ref().map_or(0, |w| w.sum);
                        if checksum(&out[r * bb..(r + 1) * bb]) == want {
                            found[i + r] = true;
                        } else {
                            intact = false;
                        }
                    }
                    if intact {
                        touched.push(w.id);
                    } else {
                        corrupt.push(w.id);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => raced += 1,
                // Short (truncated) or unreadable: never trust this page again.
                Err(_) => corrupt.push(w.id),
            }
            i += run;
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let corrupt: AHashSet<u64> = corrupt.into_iter().collect();
        for &id in &corrupt {
            if inner.pages.contains_key(&id) {
                inner.stats.corrupt_pages += 1;
                self.drop_page(inner, id);
            }
        }
        // A page found corrupt drops every block of it, even those read intact just now.
        for (i, w) in wants.iter().enumerate() {
            if let Some(w) = w
                && corrupt.contains(&w.id)
            {
                found[i] = false;
            }
        }
        let hits = found.iter().filter(|&&f| f).count();
        for id in touched {
            if let Some(page) = inner.pages.get_mut(&id) {
                inner.order.remove(&page.order_key(id));
                inner.tick += 1;
                page.tick = inner.tick;
                inner.order.insert(page.order_key(id));
            }
        }
        inner.stats.raced_reads += raced;
        inner.stats.hits += hits as u64;
        inner.stats.misses += (keys.len() - hits) as u64;
        Ok(hits)
    }

    /// Stores the blocks at `priority` with no expiry: see [`put_retained`](Self::put_retained).
    fn put(&self, keys: &[StoreKey], src: &[u8], priority: u8) -> Result<PutOutcome, StoreError> {
        let retention = Retention::fixed(priority);
        self.put_retained(keys, src, retention, 0)
    }

    /// Writes the blocks not held yet to new pages ranked at `retention` (until it expires on
    /// the clock `now_ms`); a block already held raises its page to `retention` if that ranks
    /// higher now.
    fn put_retained(
        &self,
        keys: &[StoreKey],
        src: &[u8],
        retention: Retention,
        now_ms: u64,
    ) -> Result<PutOutcome, StoreError> {
        check_buffer(keys.len(), self.block_bytes, src.len())?;
        let retention = clamped(retention);
        let bb = self.block_bytes as usize;
        let mut out = PutOutcome::default();
        // The blocks not held yet, each once.
        let mut fresh: Vec<usize> = Vec::with_capacity(keys.len());
        {
            let mut g = self.lock();
            g.advance(now_ms);
            let mut seen = AHashSet::new();
            for (i, k) in keys.iter().enumerate() {
                if let Some(&(id, _)) = g.map.get(k) {
                    out.present += 1;
                    g.raise(id, retention);
                } else if !seen.insert(*k) {
                    out.present += 1;
                } else {
                    fresh.push(i);
                }
            }
        }
        let ns_len = self.ns_bytes.len();
        let mut header = Vec::new();
        for chunk in fresh.chunks(self.blocks_per_page as usize) {
            let header_len = PageHeader::encoded_len(ns_len, chunk.len()) as u64;
            let file_bytes = header_len + chunk.len() as u64 * self.block_bytes;
            if file_bytes > self.budget {
                out.skipped += chunk.len();
                self.lock().stats.over_budget += chunk.len() as u64;
                continue;
            }
            // Reserve the space and an id under the lock, evicting as needed.
            let id = {
                let mut g = self.lock();
                while g.used + file_bytes > self.budget {
                    let before = g.map.len();
                    if !self.evict_first(&mut g) {
                        break;
                    }
                    out.evicted += before - g.map.len();
                }
                g.used += file_bytes;
                g.next_id += 1;
                g.next_id - 1
            };
            let blocks: Vec<&[u8]> = chunk.iter().map(|&i| &src[i * bb..(i + 1) * bb]).collect();
            let h = PageHeader {
                keys: chunk.iter().map(|&i| keys[i]).collect(),
                sums: blocks.iter().map(|b| checksum(b)).collect(),
                block_bytes: self.block_bytes,
            };
            header.clear();
            h.encode(&self.ns_bytes, &mut header);
            let written = self.write_page(id, &header, &blocks);
            let mut g = self.lock();
            if let Err(e) = written {
                g.used -= file_bytes;
                return Err(io_err("disk page write", &e));
            }
            g.stats.pages_written += 1;
            let before = g.map.len();
            let kept = self.index_page(
                &mut g,
                id,
                Page {
                    keys: h.keys.into_iter().map(Some).collect(),
                    sums: h.sums,
                    header_len,
                    file_bytes,
                    live: 0,
                    tick: 0,
                    retention,
                    rank: retention.priority_at(now_ms),
                },
            );
            if !kept {
                g.used -= file_bytes;
            }
            let added = g.map.len() - before;
            out.stored += added;
            // Blocks another writer stored meanwhile.
            out.present += chunk.len() - added;
        }
        Ok(out)
    }

    fn remove(&self, keys: &[StoreKey]) -> Result<usize, StoreError> {
        let mut g = self.lock();
        let inner = &mut *g;
        let mut removed = 0;
        for key in keys {
            let Some((id, slot)) = inner.map.remove(key) else {
                continue;
            };
            removed += 1;
            let empty = inner.pages.get_mut(&id).is_some_and(|p| {
                p.keys[slot as usize] = None;
                p.live -= 1;
                p.live == 0
            });
            if empty {
                self.drop_page(inner, id);
            }
        }
        Ok(removed)
    }

    fn usage(&self) -> StoreUsage {
        let g = self.lock();
        StoreUsage {
            blocks: g.map.len() as u64,
            bytes: g.used,
            capacity_bytes: Some(self.budget),
        }
    }
}
