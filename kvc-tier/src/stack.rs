//! [`TierStack`]: the host tier with an optional disk and shared tier below it, wired the way
//! an engine uses them.
//!
//! - **Offload**: blocks leaving (write-back) or entering (write-through) device memory go to
//!   the host tier, and are uploaded to the shared tier at the same time so other engines can
//!   find them; blocks the host tier evicts are demoted to the disk tier.
//! - **Lookup**: the longest prefix of a chain that some tier holds, and which tier holds each
//!   block (host first, then disk, then shared).
//! - **Load**: copies that prefix into the caller's buffer; blocks found on disk or on the
//!   shared server are promoted into the host tier. A block gone since the lookup (evicted, or
//!   the server lost) ends the loaded prefix there: the caller computes the rest.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use kvc_core::{BlockStore, LowerTiers, PutOutcome, Retention, StoreError, StoreKey};

use crate::disk::DiskTier;
use crate::host::{HostTier, Spill};
use crate::shared::SharedTier;

/// When device blocks are copied to the host tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OffloadMode {
    /// Copy when the device evicts a cached block: no extra traffic while the block is hot.
    WriteBack,
    /// Copy when the device caches a block: eviction is free, and other engines (through the
    /// shared tier) see the block at once, at the cost of copying blocks that are never evicted.
    WriteThrough,
}

/// What happened to device blocks offered to [`TierStack::offload`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// The device prefix cache took the blocks.
    Cached,
    /// The device prefix cache evicted the blocks (their bytes are still readable).
    Evicted,
}

/// A tier below device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TierKind {
    /// The host memory pool.
    Host,
    /// The disk tier.
    Disk,
    /// The shared server.
    Shared,
}

impl TierKind {
    /// The tier's name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Disk => "disk",
            Self::Shared => "shared",
        }
    }
}

/// Counters of a [`TierStack`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StackStats {
    /// Blocks offered to the host tier by offloads.
    pub offloaded: u64,
    /// Blocks uploaded to the shared tier.
    pub uploaded: u64,
    /// Blocks the host tier evicted and the disk tier took.
    pub demoted: u64,
    /// Blocks the host tier evicted that a failed disk write dropped: in no tier any more.
    pub lost: u64,
    /// Disk writes of evicted blocks that failed (each dropped a run of blocks).
    pub disk_write_errors: u64,
    /// Blocks loaded from disk or shared and copied into the host tier.
    pub promoted: u64,
    /// Blocks loaded, per tier: host, disk, shared.
    pub loaded: [u64; 3],
    /// Bytes loaded, per tier: host, disk, shared.
    pub loaded_bytes: [u64; 3],
    /// Wall time spent in loads, in seconds.
    pub load_seconds: f64,
}

/// What a demotion to the disk tier did.
#[derive(Debug, Default)]
struct Demoted {
    /// Blocks the disk tier took.
    stored: usize,
    /// Blocks of failed writes.
    lost: usize,
    /// Failed writes.
    failed_writes: u64,
    /// The first failure.
    error: Option<StoreError>,
}

impl StackStats {
    fn count(&mut self, d: &Demoted) {
        self.demoted += d.stored as u64;
        self.lost += d.lost as u64;
        self.disk_write_errors += d.failed_writes;
    }
}

/// The result of a [`TierStack::load`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[must_use = "only the first `blocks` slots of the buffer hold loaded KV"]
pub struct LoadOutcome {
    /// Leading blocks loaded: slots `0..blocks` of the buffer hold them.
    pub blocks: usize,
    /// Of those, from each tier: host, disk, shared.
    pub per_tier: [usize; 3],
    /// Wall time of the load, in seconds.
    pub seconds: f64,
}

/// The result of a [`TierStack::flush_to_disk`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use = "blocks not written are lost when the process ends"]
pub struct FlushOutcome {
    /// Blocks the host tier held.
    pub held: usize,
    /// Of those, blocks the disk tier already held.
    pub already_on_disk: usize,
    /// Blocks written to the disk tier now.
    pub written: usize,
    /// Blocks the disk tier did not store (its floor or budget; see [`DiskTier`]).
    pub skipped: usize,
    /// Blocks evicted from the host tier by other callers while the flush ran.
    pub gone: usize,
}

/// The tiers of one engine: see the [module docs](self).
#[derive(Debug)]
pub struct TierStack {
    host: HostTier,
    disk: Option<DiskTier>,
    shared: Option<SharedTier>,
    mode: OffloadMode,
    stats: Mutex<StackStats>,
}

fn idx(t: TierKind) -> usize {
    match t {
        TierKind::Host => 0,
        TierKind::Disk => 1,
        TierKind::Shared => 2,
    }
}

impl TierStack {
    /// A stack of `host` (and `disk` and `shared` below it where given).
    #[must_use]
    pub fn new(
        host: HostTier,
        disk: Option<DiskTier>,
        shared: Option<SharedTier>,
        mode: OffloadMode,
    ) -> Self {
        Self {
            host,
            disk,
            shared,
            mode,
            stats: Mutex::new(StackStats::default()),
        }
    }

    /// The host tier.
    #[must_use]
    pub const fn host(&self) -> &HostTier {
        &self.host
    }
    /// The disk tier, if any.
    #[must_use]
    pub const fn disk(&self) -> Option<&DiskTier> {
        self.disk.as_ref()
    }
    /// The shared tier, if any.
    #[must_use]
    pub const fn shared(&self) -> Option<&SharedTier> {
        self.shared.as_ref()
    }
    /// When device blocks are copied down.
    #[must_use]
    pub const fn mode(&self) -> OffloadMode {
        self.mode
    }

    fn lock(&self) -> MutexGuard<'_, StackStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> StackStats {
        *self.lock()
    }

    /// Offers device blocks after `event`: with the matching mode they are copied to the host
    /// tier (and uploaded to the shared tier), and blocks the host evicts for them are demoted
    /// to disk. Returns the host tier's outcome (all zero when the mode ignores `event`).
    ///
    /// # Errors
    /// The host tier's refusal (nothing changed), or the first failure of a disk write or of
    /// the shared tier's upload: the host tier holds the new blocks all the same, the shared
    /// tier got them unless its own upload failed, and blocks the host evicted that a failed
    /// disk write dropped are counted in [`StackStats::lost`].
    pub fn offload(
        &self,
        event: DeviceEvent,
        keys: &[StoreKey],
        src: &[u8],
        priority: u8,
    ) -> Result<PutOutcome, StoreError> {
        let retention = Retention::fixed(priority);
        self.offload_retained(event, keys, src, retention, 0)
    }

    /// [`offload`](Self::offload) with the retention the blocks had on the device, pin
    /// expiry included (`now_ms` is the caller's clock, as for the device's pins): the host
    /// tier ranks their pages by it until it expires (see [`HostTier`]).
    pub fn offload_retained(
        &self,
        event: DeviceEvent,
        keys: &[StoreKey],
        src: &[u8],
        retention: Retention,
        now_ms: u64,
    ) -> Result<PutOutcome, StoreError> {
        let wanted = matches!(
            (self.mode, event),
            (OffloadMode::WriteBack, DeviceEvent::Evicted)
                | (OffloadMode::WriteThrough, DeviceEvent::Cached)
        );
        if !wanted || keys.is_empty() {
            return Ok(PutOutcome::default());
        }
        let mut spill = Spill::default();
        let out = self.host.put_spilling(
            keys,
            src,
            retention,
            now_ms,
            self.disk.as_ref().map(|_| &mut spill),
        )?;
        // A failed disk write does not stop the rest: the host already holds the new blocks,
        // the shared tier still gets them, and what the disk could not take is counted.
        let demoted = self.demote(&spill);
        let uploaded = match &self.shared {
            // Blocks below the host's retention floor are not shared either.
            Some(shared) if out.skipped < keys.len() => shared
                .put_retained(keys, src, retention, now_ms)
                .map(|o| o.stored),
            _ => Ok(0),
        };
        let mut s = self.lock();
        s.offloaded += keys.len() as u64;
        s.count(&demoted);
        s.uploaded += *uploaded.as_ref().unwrap_or(&0) as u64;
        drop(s);
        match (demoted.error, uploaded) {
            (Some(e), _) | (None, Err(e)) => Err(e),
            (None, Ok(_)) => Ok(out),
        }
    }

    /// Writes every block the host tier holds and the disk tier does not down to the disk
    /// tier, with the retention it has in the host tier, least worth keeping first (so a disk
    /// budget smaller than the host tier keeps the most valuable ones): what an engine calls
    /// at shutdown, so a restart finds on disk what only host memory held. Without a disk
    /// tier it does nothing. Reads go in batches of at most 64 blocks beside other callers;
    /// the host tier keeps every block (the reads count as uses of their pages).
    ///
    /// # Errors
    /// The first [`StoreError`] of a disk write or host read; blocks written before it stay
    /// written.
    pub fn flush_to_disk(&self) -> Result<FlushOutcome, StoreError> {
        let Some(disk) = &self.disk else {
            return Ok(FlushOutcome::default());
        };
        let (mut keys, mut retentions) = (Vec::new(), Vec::new());
        let now_ms = self.host.held(&mut keys, &mut retentions);
        let mut out = FlushOutcome {
            held: keys.len(),
            ..FlushOutcome::default()
        };
        let bb = self.host.block_bytes() as usize;
        let mut on_disk = Vec::new();
        let mut found = Vec::new();
        let mut spill = Spill {
            now_ms,
            ..Spill::default()
        };
        let mut buf = Vec::new();
        let (mut ask, mut ask_retentions) = (Vec::new(), Vec::new());
        for (ks, rs) in keys.chunks(64).zip(retentions.chunks(64)) {
            disk.contains(ks, &mut on_disk)?;
            ask.clear();
            ask_retentions.clear();
            for ((&key, &r), _) in ks.iter().zip(rs).zip(&on_disk).filter(|(_, d)| !**d) {
                ask.push(key);
                ask_retentions.push(r);
            }
            out.already_on_disk += ks.len() - ask.len();
            buf.clear();
            buf.resize(ask.len() * bb, 0);
            self.host.get(&ask, &mut buf, &mut found)?;
            spill.clear();
            for (i, (&key, &r)) in ask.iter().zip(&ask_retentions).enumerate() {
                if found[i] {
                    spill.keys.push(key);
                    spill.retentions.push(r);
                    spill.bytes.extend_from_slice(&buf[i * bb..(i + 1) * bb]);
                } else {
                    out.gone += 1;
                }
            }
            let demoted = self.demote(&spill);
            self.lock().disk_write_errors += demoted.failed_writes;
            if let Some(e) = demoted.error {
                // The host tier keeps every block: nothing is lost.
                return Err(e);
            }
            out.written += demoted.stored;
            out.skipped += spill.keys.len() - demoted.stored;
        }
        Ok(out)
    }

    /// Writes what the host tier evicted to the disk tier, each run of blocks with the
    /// retention it had in the host tier (so a pinned block stays pinned on disk).
    /// Every run is tried: a failed write drops its run's blocks (counted in
    /// [`Demoted::lost`]) and the others are still written.
    fn demote(&self, spill: &Spill) -> Demoted {
        let mut out = Demoted::default();
        let Some(disk) = &self.disk else {
            return out;
        };
        let bb = self.host.block_bytes() as usize;
        let mut start = 0;
        while start < spill.keys.len() {
            let retention = spill.retentions[start];
            let end = spill.retentions[start..]
                .iter()
                .position(|&r| r != retention)
                .map_or(spill.keys.len(), |n| start + n);
            match disk.put_retained(
                &spill.keys[start..end],
                &spill.bytes[start * bb..end * bb],
                retention,
                spill.now_ms,
            ) {
                Ok(put) => out.stored += put.stored,
                Err(e) => {
                    out.lost += end - start;
                    out.failed_writes += 1;
                    out.error.get_or_insert(e);
                }
            }
            start = end;
        }
        out
    }

    /// The longest prefix of `keys` held by some tier, as the tier of each of its blocks.
    pub fn lookup(&self, keys: &[StoreKey]) -> Result<Vec<TierKind>, StoreError> {
        let mut found = Vec::with_capacity(keys.len());
        self.host.contains(keys, &mut found)?;
        let mut tiers: Vec<Option<TierKind>> =
            found.iter().map(|&f| f.then_some(TierKind::Host)).collect();
        let lower: [(Option<&dyn BlockStore>, TierKind); 2] = [
            (
                self.disk.as_ref().map(|d| d as &dyn BlockStore),
                TierKind::Disk,
            ),
            (
                self.shared.as_ref().map(|s| s as &dyn BlockStore),
                TierKind::Shared,
            ),
        ];
        for (store, kind) in lower {
            let Some(store) = store else { continue };
            // Only blocks from the first gap on matter, and only those no tier above holds.
            let Some(first_gap) = tiers.iter().position(Option::is_none) else {
                break;
            };
            let ask: Vec<usize> = (first_gap..keys.len())
                .filter(|&i| tiers[i].is_none())
                .collect();
            let ask_keys: Vec<StoreKey> = ask.iter().map(|&i| keys[i]).collect();
            store.contains(&ask_keys, &mut found)?;
            for (&i, &f) in ask.iter().zip(&found) {
                if f {
                    tiers[i] = Some(kind);
                }
            }
        }
        Ok(tiers.into_iter().map_while(|t| t).collect())
    }

    /// Loads the blocks of `keys` from the tiers `tiers` (a [`lookup`](Self::lookup)) into
    /// `dst`, promoting lower-tier blocks into the host tier.
    ///
    /// The first `min(keys.len(), tiers.len())` blocks are asked for, so `dst` must hold at
    /// least that many blocks of the namespace's `block_bytes()`; a shorter buffer is
    /// [`StoreError::BufferSize`] and nothing is read. The loaded prefix fills the buffer's
    /// leading slots ([`LoadOutcome::blocks`]); it stops at the first block gone since the
    /// lookup or named by a tier the stack does not have.
    pub fn load(
        &self,
        keys: &[StoreKey],
        tiers: &[TierKind],
        dst: &mut [u8],
    ) -> Result<LoadOutcome, StoreError> {
        let start = Instant::now();
        let n = keys.len().min(tiers.len());
        let bb = self.host.block_bytes();
        kvc_core::check_buffer(n, bb, dst.len().min(n * bb as usize))?;
        let bbu = bb as usize;
        let mut ok = vec![false; n];
        let mut found = Vec::new();
        let mut per_tier = [0usize; 3];
        for kind in [TierKind::Host, TierKind::Disk, TierKind::Shared] {
            let store: &dyn BlockStore = match kind {
                TierKind::Host => &self.host,
                TierKind::Disk => match &self.disk {
                    Some(d) => d,
                    None => continue,
                },
                TierKind::Shared => match &self.shared {
                    Some(s) => s,
                    None => continue,
                },
            };
            let which: Vec<usize> = (0..n).filter(|&i| tiers[i] == kind).collect();
            if which.is_empty() {
                continue;
            }
            let ks: Vec<StoreKey> = which.iter().map(|&i| keys[i]).collect();
            let mut buf = vec![0u8; which.len() * bbu];
            store.get(&ks, &mut buf, &mut found)?;
            let mut promote_keys = Vec::new();
            let mut promote_bytes = Vec::new();
            for (j, &i) in which.iter().enumerate() {
                if found[j] {
                    let b = &buf[j * bbu..(j + 1) * bbu];
                    dst[i * bbu..(i + 1) * bbu].copy_from_slice(b);
                    ok[i] = true;
                    if kind != TierKind::Host {
                        promote_keys.push(keys[i]);
                        promote_bytes.extend_from_slice(b);
                    }
                }
            }
            if !promote_keys.is_empty() {
                let mut spill = Spill::default();
                let out = self.host.promote_spilling(
                    &promote_keys,
                    &promote_bytes,
                    self.disk.as_ref().map(|_| &mut spill),
                )?;
                // The load itself succeeded: a failed demotion of what the promotion evicted
                // is counted, not returned.
                let demoted = self.demote(&spill);
                let mut s = self.lock();
                s.promoted += out.stored as u64;
                s.count(&demoted);
            }
        }
        let blocks = ok.iter().take_while(|&&o| o).count();
        for &t in &tiers[..blocks] {
            per_tier[idx(t)] += 1;
        }
        let seconds = start.elapsed().as_secs_f64();
        let mut s = self.lock();
        for (t, &n) in per_tier.iter().enumerate() {
            s.loaded[t] += n as u64;
            s.loaded_bytes[t] += n as u64 * bb;
        }
        s.load_seconds += seconds;
        Ok(LoadOutcome {
            blocks,
            per_tier,
            seconds,
        })
    }
}

/// The stack as a memory manager sees it (`kvc_sched::KvManager::with_tiers`): the length of
/// [`TierStack::lookup`]'s answer. A tier that fails (a lost shared server is already answered
/// as misses; a host or disk error here) makes the whole answer a miss (0), never an error.
impl LowerTiers for TierStack {
    fn longest_prefix(&self, keys: &[StoreKey]) -> usize {
        self.lookup(keys).map_or(0, |tiers| tiers.len())
    }
}
