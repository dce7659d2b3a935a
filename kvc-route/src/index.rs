//! [`KvIndex`]: which engine holds which block, per tier, built from the engines' events.
//!
//! Each block key (scope, chained hash) maps to three engine bitsets, one per tier. Because a
//! chained hash covers every token before its block, the overlap of a request with an engine is
//! the number of leading request blocks that engine holds; [`KvIndex::overlaps`] walks the
//! request's hashes once for all engines together, intersecting bitsets and counting per tier
//! with bit-sliced counters, and stops at the first block no live engine can serve.
//!
//! A block in the shared tier can be fetched by any engine, so it extends every engine's
//! prefix; it counts while at least one live engine reports it.
//!
//! Applying an event is idempotent: storing a stored block or removing an absent one changes
//! nothing.

use std::hash::{BuildHasherDefault, Hasher};

use smallvec::SmallVec;
use thiserror::Error;

use crate::event::{ChainHash, EngineId, Event, EventBody, LoadReport, Scope, Snapshot, Tier};

/// A block's key in the index: its hash and its interned scope (blocks only match within one
/// scope). 24 bytes, hashed by one multiply: chained hashes are already uniform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    lo: u64,
    hi: u64,
    scope: u32,
}

impl Key {
    fn new(scope: u32, hash: ChainHash) -> Self {
        Self {
            lo: hash.0 as u64,
            hi: (hash.0 >> 64) as u64,
            scope,
        }
    }
}

impl std::hash::Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.lo ^ u64::from(self.scope).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    }
}

/// A hasher for keys that are already uniformly distributed (chained hashes): it mixes the
/// written words with one multiply instead of running a general-purpose hash.
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(29) ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u128(&mut self, i: u128) {
        self.write_u64(i as u64 ^ (i >> 64) as u64);
    }
    fn write_isize(&mut self, i: isize) {
        self.write_u64(i as u64);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

type Map<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<MixHasher>>;

/// Engine bitsets of one block: `bits[tier × words + w]`.
type Bits = SmallVec<[u64; 3]>;

/// Blocks per tier of one engine's prefix for a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierOverlap {
    /// Leading request blocks on the engine's device.
    pub device: u32,
    /// Leading request blocks in the engine's host memory (not on its device).
    pub host: u32,
    /// Leading request blocks only in the shared tier.
    pub shared: u32,
}

impl TierOverlap {
    /// All leading blocks the engine can serve without computing.
    #[must_use]
    pub const fn total(&self) -> u32 {
        self.device + self.host + self.shared
    }
}

/// What the index knows about one engine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineInfo {
    /// The engine.
    pub id: EngineId,
    /// Its last load report.
    pub load: LoadReport,
    /// Requests routed to it since that report.
    pub routed_since_report: u32,
    /// Blocks it reports per tier (device, host, shared).
    pub blocks: [u64; 3],
    /// When it was last heard from (caller's clock, ms).
    pub last_seen_ms: u64,
}

/// Why an event was not applied.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApplyError {
    /// The engine hashes blocks of another size than the index: its hashes can never match.
    #[error("{engine} stores {found}-token blocks, the index uses {expected}")]
    BlockSize {
        /// The engine.
        engine: EngineId,
        /// The index's block size.
        expected: u32,
        /// The event's.
        found: u32,
    },
}

/// Scratch space of [`KvIndex::overlaps`], reused between calls so routing does not allocate.
#[derive(Clone, Debug, Default)]
pub struct OverlapScratch {
    active: Vec<u64>,
    planes: Vec<u64>,
}

const PLANES: usize = 32;

/// The cluster's block index.
#[derive(Debug)]
pub struct KvIndex {
    block_size: u32,
    words: usize,
    map: Map<Key, Bits>,
    scopes: Map<Scope, u32>,
    slots: Vec<Option<EngineInfo>>,
    by_id: Map<EngineId, usize>,
}

impl KvIndex {
    /// An empty index of `block_size`-token blocks. `block_size` must be the engines' block
    /// size: events of another size are refused ([`ApplyError`] names both). An index made
    /// with 0 refuses every event, and [`Router::new`](crate::Router::new) refuses it.
    #[must_use]
    pub fn new(block_size: u32) -> Self {
        Self {
            block_size,
            words: 1,
            map: Map::default(),
            scopes: Map::default(),
            slots: Vec::new(),
            by_id: Map::default(),
        }
    }

    /// Tokens per block.
    #[must_use]
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Distinct (scope, hash) blocks held anywhere.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no block is held anywhere.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The live engines.
    pub fn engines(&self) -> impl Iterator<Item = &EngineInfo> {
        self.slots.iter().flatten()
    }

    /// One engine, if live.
    #[must_use]
    pub fn engine(&self, id: EngineId) -> Option<&EngineInfo> {
        self.by_id.get(&id).and_then(|&s| self.slots[s].as_ref())
    }

    /// Registers `id` (if new) and marks it heard from at `now_ms`.
    pub fn touch(&mut self, id: EngineId, now_ms: u64) {
        let slot = self.slot(id);
        if let Some(e) = self.slots[slot].as_mut() {
            e.last_seen_ms = e.last_seen_ms.max(now_ms);
        }
    }

    /// Counts a request routed to `id` until its next load report.
    pub fn note_routed(&mut self, id: EngineId) {
        if let Some(&s) = self.by_id.get(&id)
            && let Some(e) = self.slots[s].as_mut()
        {
            e.routed_since_report = e.routed_since_report.saturating_add(1);
        }
    }

    /// Applies one event (idempotent: storing a held block or removing an absent one changes
    /// nothing), and marks its engine heard from at `now_ms`.
    ///
    /// # Errors
    /// [`ApplyError::BlockSize`] for a stored event of another block size; nothing changes.
    pub fn apply(&mut self, event: &Event, now_ms: u64) -> Result<(), ApplyError> {
        if let EventBody::Stored(s) = &event.body
            && s.block_size != self.block_size
        {
            return Err(ApplyError::BlockSize {
                engine: event.engine,
                expected: self.block_size,
                found: s.block_size,
            });
        }
        self.touch(event.engine, now_ms);
        let slot = self.by_id[&event.engine];
        match &event.body {
            EventBody::Stored(s) => {
                let scope = self.intern(s.scope);
                for &hash in &s.hashes {
                    self.set(slot, s.tier, Key::new(scope, hash));
                }
            }
            EventBody::Removed(r) => {
                if let Some(&scope) = self.scopes.get(&r.scope) {
                    for &hash in &r.hashes {
                        self.clear(slot, r.tier, Key::new(scope, hash));
                    }
                }
            }
            EventBody::Cleared { tier } => self.clear_engine(slot, *tier),
            EventBody::Load(l) => {
                if let Some(e) = self.slots[slot].as_mut() {
                    e.load = *l;
                    e.routed_since_report = 0;
                }
            }
        }
        Ok(())
    }

    /// Replaces everything known of the snapshot's engine by the snapshot.
    ///
    /// # Errors
    /// [`ApplyError::BlockSize`] when the snapshot's block size differs; nothing changes.
    pub fn load_snapshot(&mut self, snap: &Snapshot, now_ms: u64) -> Result<(), ApplyError> {
        if snap.block_size != self.block_size {
            return Err(ApplyError::BlockSize {
                engine: snap.engine,
                expected: self.block_size,
                found: snap.block_size,
            });
        }
        self.touch(snap.engine, now_ms);
        let slot = self.by_id[&snap.engine];
        self.clear_engine(slot, None);
        for g in &snap.groups {
            let scope = self.intern(g.scope);
            for &hash in &g.hashes {
                self.set(slot, g.tier, Key::new(scope, hash));
            }
        }
        Ok(())
    }

    /// Forgets an engine and everything it reported. Returns whether it was live.
    pub fn remove_engine(&mut self, id: EngineId) -> bool {
        let Some(slot) = self.by_id.remove(&id) else {
            return false;
        };
        self.clear_engine(slot, None);
        self.slots[slot] = None;
        true
    }

    /// Drops every engine not heard from in the last `timeout_ms` (an engine that stopped
    /// publishing), appending their ids to `dropped`.
    pub fn expire(&mut self, now_ms: u64, timeout_ms: u64, dropped: &mut Vec<EngineId>) {
        let stale: Vec<EngineId> = self
            .engines()
            .filter(|e| now_ms.saturating_sub(e.last_seen_ms) > timeout_ms)
            .map(|e| e.id)
            .collect();
        for id in stale {
            self.remove_engine(id);
            dropped.push(id);
        }
    }

    /// For every live engine, the leading blocks of `hashes` it can serve from each tier,
    /// appended to `out` in slot order.
    pub fn overlaps(
        &self,
        scope: Scope,
        hashes: &[ChainHash],
        scratch: &mut OverlapScratch,
        out: &mut Vec<(EngineId, TierOverlap)>,
    ) {
        let words = self.words;
        scratch.active.clear();
        scratch.active.resize(words, 0);
        for (slot, e) in self.slots.iter().enumerate() {
            if e.is_some() {
                scratch.active[slot / 64] |= 1 << (slot % 64);
            }
        }
        scratch.planes.clear();
        scratch.planes.resize(words * 3 * PLANES, 0);
        // Lookups go in chunks, so the memory accesses of a chunk overlap (the index is far
        // larger than the caches); the bitset work follows per chunk.
        const CHUNK: usize = 32;
        // A scope nothing was stored under matches nothing.
        let scope_id = self.scopes.get(&scope).copied();
        let hashes = if scope_id.is_some() { hashes } else { &[] };
        let scope_id = scope_id.unwrap_or(0);
        'walk: for chunk in hashes.chunks(CHUNK) {
            let mut found: [Option<&Bits>; CHUNK] = [None; CHUNK];
            for (slot, &hash) in found.iter_mut().zip(chunk) {
                *slot = self.map.get(&Key::new(scope_id, hash));
            }
            for bits in &found[..chunk.len()] {
                let Some(bits) = bits else {
                    break 'walk;
                };
                if !self.step(bits, scratch) {
                    break 'walk;
                }
            }
        }
        for (slot, e) in self.slots.iter().enumerate() {
            let Some(e) = e else { continue };
            let (w, bit) = (slot / 64, slot % 64);
            let base = w * 3 * PLANES;
            let count = |t: usize| -> u32 {
                let planes = &scratch.planes[base + t * PLANES..base + (t + 1) * PLANES];
                planes
                    .iter()
                    .enumerate()
                    .map(|(p, &plane)| (((plane >> bit) & 1) as u32) << p)
                    .sum()
            };
            out.push((
                e.id,
                TierOverlap {
                    device: count(0),
                    host: count(1),
                    shared: count(2),
                },
            ));
        }
    }

    /// Advances the walk by one block held somewhere; returns whether any engine still
    /// matches.
    #[inline]
    fn step(&self, bits: &Bits, scratch: &mut OverlapScratch) -> bool {
        let words = self.words;
        let shared_any = bits[2 * words..3 * words].iter().any(|&w| w != 0);
        let mut any = 0;
        for w in 0..words {
            let active = scratch.active[w];
            let dev = active & bits[w];
            let host = active & bits[words + w] & !dev;
            let shared = if shared_any { active & !dev & !host } else { 0 };
            let base = w * 3 * PLANES;
            add_sliced(&mut scratch.planes[base..base + PLANES], dev);
            add_sliced(&mut scratch.planes[base + PLANES..base + 2 * PLANES], host);
            add_sliced(
                &mut scratch.planes[base + 2 * PLANES..base + 3 * PLANES],
                shared,
            );
            scratch.active[w] = dev | host | shared;
            any |= scratch.active[w];
        }
        any != 0
    }

    /// The scope's id, assigned on first use (scopes are few and never forgotten).
    fn intern(&mut self, scope: Scope) -> u32 {
        let next = self.scopes.len() as u32;
        *self.scopes.entry(scope).or_insert(next)
    }

    /// The engine's slot, registering it if new.
    fn slot(&mut self, id: EngineId) -> usize {
        if let Some(&s) = self.by_id.get(&id) {
            return s;
        }
        let info = EngineInfo {
            id,
            load: LoadReport::default(),
            routed_since_report: 0,
            blocks: [0; 3],
            last_seen_ms: 0,
        };
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(s) => {
                self.slots[s] = Some(info);
                s
            }
            None => {
                self.slots.push(Some(info));
                self.slots.len() - 1
            }
        };
        if slot / 64 >= self.words {
            self.grow(slot / 64 + 1);
        }
        self.by_id.insert(id, slot);
        slot
    }

    /// Widens every bitset to `words` words per tier.
    fn grow(&mut self, words: usize) {
        let old = self.words;
        for bits in self.map.values_mut() {
            let mut wide: Bits = SmallVec::from_elem(0, 3 * words);
            for t in 0..3 {
                wide[t * words..t * words + old].copy_from_slice(&bits[t * old..(t + 1) * old]);
            }
            *bits = wide;
        }
        self.words = words;
    }

    fn set(&mut self, slot: usize, tier: Tier, key: Key) {
        let words = self.words;
        let bits = self
            .map
            .entry(key)
            .or_insert_with(|| SmallVec::from_elem(0, 3 * words));
        let i = usize::from(tier.code()) * words + slot / 64;
        let mask = 1u64 << (slot % 64);
        if bits[i] & mask == 0 {
            bits[i] |= mask;
            if let Some(e) = self.slots[slot].as_mut() {
                e.blocks[usize::from(tier.code())] += 1;
            }
        }
    }

    fn clear(&mut self, slot: usize, tier: Tier, key: Key) {
        let words = self.words;
        let Some(bits) = self.map.get_mut(&key) else {
            return;
        };
        let i = usize::from(tier.code()) * words + slot / 64;
        let mask = 1u64 << (slot % 64);
        if bits[i] & mask != 0 {
            bits[i] &= !mask;
            if let Some(e) = self.slots[slot].as_mut() {
                e.blocks[usize::from(tier.code())] -= 1;
            }
            if bits.iter().all(|&w| w == 0) {
                self.map.remove(&key);
            }
        }
    }

    /// Clears one tier (or all) of one engine: a scan of the index (restarts and drops are
    /// rare; routing is not).
    fn clear_engine(&mut self, slot: usize, tier: Option<Tier>) {
        let words = self.words;
        let mask = !(1u64 << (slot % 64));
        let tiers: &[Tier] = match &tier {
            Some(t) => std::slice::from_ref(t),
            None => &Tier::ALL,
        };
        self.map.retain(|_, bits| {
            for t in tiers {
                bits[usize::from(t.code()) * words + slot / 64] &= mask;
            }
            bits.iter().any(|&w| w != 0)
        });
        if let Some(e) = self.slots[slot].as_mut() {
            for t in tiers {
                e.blocks[usize::from(t.code())] = 0;
            }
        }
    }
}

/// Adds one to the bit-sliced counter of every engine whose bit is set in `mask`: plane `p`
/// holds bit `p` of each engine's count.
#[inline]
fn add_sliced(planes: &mut [u64], mut carry: u64) {
    for plane in planes {
        if carry == 0 {
            return;
        }
        let sum = *plane ^ carry;
        carry &= *plane;
        *plane = sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Removed, SaltId, Stored};

    fn stored(engine: u32, seq: u64, tier: Tier, hashes: &[u128]) -> Event {
        Event {
            engine: EngineId(engine),
            seq,
            time_ms: 0,
            body: EventBody::Stored(Stored {
                tier,
                scope: Scope::default(),
                parent: None,
                block_size: 16,
                token_count: 16 * hashes.len() as u32,
                hashes: hashes.iter().map(|&h| ChainHash(h)).collect(),
            }),
        }
    }

    fn overlaps(ix: &KvIndex, scope: Scope, hashes: &[u128]) -> Vec<(EngineId, TierOverlap)> {
        let hashes: Vec<ChainHash> = hashes.iter().map(|&h| ChainHash(h)).collect();
        let mut out = Vec::new();
        ix.overlaps(scope, &hashes, &mut OverlapScratch::default(), &mut out);
        out
    }

    #[test]
    fn overlap_counts_leading_blocks_per_tier() {
        let mut ix = KvIndex::new(16);
        ix.apply(&stored(0, 1, Tier::Device, &[1, 2]), 0).unwrap();
        ix.apply(&stored(0, 2, Tier::Host, &[3]), 0).unwrap();
        ix.apply(&stored(1, 1, Tier::Device, &[1]), 0).unwrap();
        ix.apply(&stored(1, 2, Tier::Shared, &[2, 3, 4]), 0)
            .unwrap();
        let got = overlaps(&ix, Scope::default(), &[1, 2, 3, 4, 5]);
        // Engine 0: device 1, 2; host 3; block 4 from the shared tier engine 1 wrote.
        assert_eq!(
            got[0].1,
            TierOverlap {
                device: 2,
                host: 1,
                shared: 1
            }
        );
        assert_eq!(
            got[1].1,
            TierOverlap {
                device: 1,
                host: 0,
                shared: 3
            }
        );
    }

    #[test]
    fn a_salted_prefix_only_matches_its_tenant() {
        let mut ix = KvIndex::new(16);
        let mut e = stored(0, 1, Tier::Device, &[1, 2]);
        if let EventBody::Stored(s) = &mut e.body {
            s.scope.salt = SaltId(5);
        }
        ix.apply(&e, 0).unwrap();
        assert_eq!(overlaps(&ix, Scope::default(), &[1, 2])[0].1.total(), 0);
        let salted = Scope {
            salt: SaltId(5),
            adapter: None,
        };
        assert_eq!(overlaps(&ix, salted, &[1, 2])[0].1.device, 2);
    }

    #[test]
    fn replays_are_idempotent_and_removal_and_drop_forget() {
        let mut ix = KvIndex::new(16);
        let e = stored(0, 1, Tier::Device, &[1, 2, 3]);
        ix.apply(&e, 0).unwrap();
        ix.apply(&e, 0).unwrap();
        assert_eq!(ix.len(), 3);
        assert_eq!(ix.engine(EngineId(0)).unwrap().blocks, [3, 0, 0]);
        let rm = Event {
            body: EventBody::Removed(Removed {
                tier: Tier::Device,
                scope: Scope::default(),
                hashes: vec![ChainHash(2), ChainHash(9)],
            }),
            ..e.clone()
        };
        ix.apply(&rm, 0).unwrap();
        ix.apply(&rm, 0).unwrap();
        assert_eq!(ix.engine(EngineId(0)).unwrap().blocks, [2, 0, 0]);
        assert_eq!(overlaps(&ix, Scope::default(), &[1, 2, 3])[0].1.device, 1);
        ix.apply(&stored(1, 1, Tier::Device, &[1]), 50).unwrap();
        let mut dropped = Vec::new();
        ix.expire(100, 60, &mut dropped);
        assert_eq!(dropped, vec![EngineId(0)]);
        assert_eq!(ix.len(), 1);
        assert!(ix.engine(EngineId(0)).is_none());
    }

    #[test]
    fn more_than_64_engines_widen_the_bitsets() {
        let mut ix = KvIndex::new(16);
        for e in 0..70 {
            ix.apply(&stored(e, 1, Tier::Device, &[1, 2]), 0).unwrap();
        }
        ix.apply(&stored(69, 2, Tier::Device, &[3]), 0).unwrap();
        let got = overlaps(&ix, Scope::default(), &[1, 2, 3]);
        assert_eq!(got.len(), 70);
        assert!(got[..69].iter().all(|(_, o)| o.device == 2));
        assert_eq!(got[69].1.device, 3);
    }

    #[test]
    fn a_foreign_block_size_is_refused() {
        let mut ix = KvIndex::new(32);
        assert!(matches!(
            ix.apply(&stored(0, 1, Tier::Device, &[1]), 0),
            Err(ApplyError::BlockSize { .. })
        ));
        assert!(ix.is_empty());
    }
}
