//! [`ReuseOdds`]: LRU order shifted by each block's learned odds of being used again (its docs
//! say how).

use std::collections::BTreeSet;

use crate::BlockHash;
use crate::continuation::{Checkpoints, Credits, GapMedian};
use crate::fifo_map::FifoMap;
use crate::policy::{Access, BlockInfo, EvictionPolicy};

/// Where a request ended: left on a few of its last newly cached blocks so a later request
/// that passes one is recognised as its continuation (kept after eviction).
#[derive(Clone, Copy, Debug, Default)]
struct Tip {
    request: u64,
    turn: u32,
    blocks: u32,
    stamp: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    stamp: u64,
    /// Earlier requests that used the block (capped).
    uses: u8,
    /// The block's class at its last access ([`ReuseOdds::UNCLASSED`] before its first walk
    /// ends).
    class: u16,
    evictable: bool,
    /// Evictable but out of the order until its request's walk ends.
    pending: bool,
    /// Cached outside any prompt's walk ([`Access::More`]: a prefill chunk, a reply) and not
    /// yet released by the request that cached it.
    fresh_more: bool,
    hash: BlockHash,
}

/// LRU shifted by each block's learned odds of reuse.
///
/// [`Conversation`](crate::Conversation) learns, per class of request, how often a request is
/// continued, and gives every block the request touched that one probability. But the blocks
/// of one request are not equally likely to come back: the prefix a request shared with an
/// earlier one has already been reused, and a block reused once is reused again far more often
/// than a block just computed (on the Mooncake conversation trace, 42% against 26%; 50% after
/// two reuses). This policy learns a probability per **block** class instead:
///
/// - the request's class, as in `Conversation`: its turn in its conversation (capped at 4)
///   and log2 of its new tokens in units of 512 (capped at 7), found by following the
///   checkpoints earlier requests left at their ends;
/// - the block's own history: how many earlier requests used it (0, 1, 2, 3 or more),
///   remembered after the block is evicted.
///
/// Blocks cached after their request's prompt (its reply: [`Access::More`]) are one more
/// class, whose event is counted when their request releases them: a reply the next turn
/// reads is kept like the prompt, one nothing reads goes first. A block cached as more of a
/// request before its prompt's walk (a prefill chunk) is new to that walk.
///
/// Every access of a block is an event of its class at that time; when the block is accessed
/// again (cached or not: the class is remembered in a ghost list of evicted hashes), that event
/// counts as reused. A class's probability is `(reused + 1) / (events + 2)`. A block's eviction
/// key is its last access stamp plus `kappa × median continuation gap × logit(p)`, so blocks
/// unlikely to be used again age faster. `kappa` is a parameter; [`Adaptive`](crate::Adaptive)
/// runs several values side by side and follows the one that hits most, so no value is fitted
/// to a trace. Before anything is learned (no continuation seen) the order is plain LRU.
#[derive(Debug)]
pub struct ReuseOdds {
    /// One eviction order per `kappa`, over the same evictable blocks. Everything learned is
    /// the same whatever the `kappa` (classes, counts, gaps, ghosts), so [`Adaptive`]'s two
    /// reuse-odds experts share one model and keep two orders.
    ///
    /// [`Adaptive`]: crate::Adaptive
    orders: Vec<Order>,
    slots: Vec<Slot>,
    /// Each slot's shift in each order: `shifts[slot * orders.len() + k]`.
    shifts: Vec<i64>,
    pending: Vec<u32>,
    /// The insert walk in progress: (slot, newly cached).
    walk: Vec<(u32, bool)>,
    walk_src: Option<Tip>,
    tips: Checkpoints<Tip>,
    /// Evicted blocks: (class at last access, uses).
    ghost: FifoMap<(u16, u8)>,
    credited: Credits,
    requests: u64,
    /// Over all classes: (events, reused).
    all: (u64, u64),
    /// Per block class: (events, reused).
    stats: Vec<(u64, u64)>,
    gaps: GapMedian,
}

/// One eviction order of [`ReuseOdds`]: blocks by last access shifted by `kappa × median gap
/// × logit(p)`.
#[derive(Debug)]
struct Order {
    kappa: f64,
    keys: BTreeSet<(i64, u32)>,
}

impl ReuseOdds {
    const TURN_CLASSES: u32 = 5;
    const GROWTH_CLASSES: u32 = 8;
    const USE_CLASSES: u32 = 8;
    const POSITION_CLASSES: u32 = 8;
    const UNCLASSED: u16 = u16::MAX;
    /// The class of blocks cached outside any prompt's walk ([`Access::More`]: a request's
    /// reply, a prefix loaded from the tiers): one event when the request that cached it
    /// releases it, reused when a later prompt's walk passes it. Its odds are learned like
    /// the others', so replies the next turn reads (chat) are kept and replies nothing reads
    /// are evicted before the prompts' blocks. A block a prompt's walk passes before its
    /// request released it (a prefill chunk of that very request) is new to that walk.
    const MORE: u16 =
        (Self::TURN_CLASSES * Self::GROWTH_CLASSES * Self::USE_CLASSES * Self::POSITION_CLASSES)
            as u16;
    /// The `kappa` of the policy's model: if gaps between a block's uses were exponential,
    /// the logit of the probability that a block is used again would fall by one per mean
    /// gap, and the mean of an exponential is its median over ln 2.
    pub const MODEL_KAPPA: f64 = std::f64::consts::LOG2_E;

    /// A policy for a cache of about `capacity_blocks` blocks (its ghost list and checkpoints
    /// remember four caches' worth of hashes, at least 65,536) whose shift is `kappa` median
    /// continuation gaps per unit of logit.
    #[must_use]
    pub fn new(capacity_blocks: usize, kappa: f64) -> Self {
        Self::with_kappas(capacity_blocks, &[kappa])
    }

    /// [`new`](Self::new) with one eviction order per `kappa` (at least one), evicting in the
    /// first unless asked for another ([`pop_victim_in`](Self::pop_victim_in)).
    pub(crate) fn with_kappas(capacity_blocks: usize, kappas: &[f64]) -> Self {
        let memory = capacity_blocks.saturating_mul(4).max(1 << 16);
        let kappas = if kappas.is_empty() {
            &[Self::MODEL_KAPPA][..]
        } else {
            kappas
        };
        Self {
            orders: kappas
                .iter()
                .map(|&kappa| Order {
                    kappa,
                    keys: BTreeSet::new(),
                })
                .collect(),
            slots: Vec::new(),
            shifts: Vec::new(),
            pending: Vec::new(),
            walk: Vec::new(),
            walk_src: None,
            tips: Checkpoints::new(memory),
            ghost: FifoMap::new(memory),
            credited: Credits::new(memory),
            requests: 0,
            all: (0, 0),
            // The prompt walks' classes, then `MORE`.
            stats: vec![(0, 0); Self::MORE as usize + 1],
            gaps: GapMedian::default(),
        }
    }

    /// The learned probability that a block of `class` is used again.
    fn odds(&self, class: u16) -> f64 {
        let (events, reused) = self.stats[class as usize];
        let prior = (self.all.1.min(self.all.0) as f64 + 1.0) / (self.all.0 as f64 + 2.0);
        (reused.min(events) as f64 + 2.0 * prior) / (events as f64 + 2.0)
    }

    /// Sets the slot's shift in every order from `class`'s odds: `kappa × gap × logit(p)`
    /// (the slot is out of every order).
    fn shift_by_odds(&mut self, slot: u32, class: u16, gap: f64) {
        let p = self.odds(class);
        let logit = (p / (1.0 - p)).ln();
        let n = self.orders.len();
        for (k, order) in self.orders.iter().enumerate() {
            self.shifts[slot as usize * n + k] = (order.kappa * gap * logit) as i64;
        }
    }

    /// The slot's key in order `k`.
    #[inline]
    fn key(&self, slot: u32, k: usize) -> (i64, u32) {
        let stamp = self.slots[slot as usize].stamp as i64;
        let shift = self.shifts[slot as usize * self.orders.len() + k];
        (stamp.saturating_add(shift), slot)
    }

    /// Puts the slot in every order (under its current keys).
    fn enter(&mut self, slot: u32) {
        for k in 0..self.orders.len() {
            let key = self.key(slot, k);
            self.orders[k].keys.insert(key);
        }
    }

    /// Takes the slot out of every order but `except` (under its current keys).
    fn leave(&mut self, slot: u32, except: Option<usize>) {
        for k in 0..self.orders.len() {
            if Some(k) != except {
                let key = self.key(slot, k);
                self.orders[k].keys.remove(&key);
            }
        }
    }

    fn flush_pending(&mut self) {
        while let Some(slot) = self.pending.pop() {
            let s = &mut self.slots[slot as usize];
            if s.pending {
                s.pending = false;
                if s.evictable {
                    self.enter(slot);
                }
            }
        }
    }

    /// A block was used again: its previous access's event counts as reused.
    fn reused(&mut self, class: u16) {
        if let Some(s) = self.stats.get_mut(class as usize) {
            s.1 += 1;
            if class != Self::MORE {
                self.all.1 += 1;
            }
        }
    }

    /// The walk reached the request's last block: classify it, count each block's event,
    /// key the blocks and leave checkpoints.
    fn end_walk(&mut self, last: &BlockInfo) {
        let bs = u64::from(last.block_size.max(1));
        let blocks = u64::from(last.request_blocks);
        let (turn, growth_blocks) = match self.walk_src.take() {
            Some(src) => {
                if self.credited.credit(src.request) {
                    self.gaps.record(last.stamp.saturating_sub(src.stamp));
                }
                (src.turn + 1, blocks.saturating_sub(u64::from(src.blocks)))
            }
            None => (0, blocks),
        };
        let growth_tokens = (growth_blocks * bs).max(512);
        let growth = (growth_tokens / 512).ilog2().min(Self::GROWTH_CLASSES - 1);
        let request_class = turn.min(Self::TURN_CLASSES - 1) * Self::GROWTH_CLASSES + growth;
        let gap = self.gaps.get() as f64;
        for i in 0..self.walk.len() {
            let (slot, _) = self.walk[i];
            let uses = u32::from(self.slots[slot as usize].uses).min(Self::USE_CLASSES - 1);
            let from_end = (self.walk.len() - i) as u32;
            let position = from_end.ilog2().min(Self::POSITION_CLASSES - 1);
            let class = ((request_class * Self::USE_CLASSES + uses) * Self::POSITION_CLASSES
                + position) as u16;
            self.stats[class as usize].0 += 1;
            self.all.0 += 1;
            let s = self.slots[slot as usize];
            let ordered = s.evictable && !s.pending;
            if ordered {
                self.leave(slot, None);
            }
            let s = &mut self.slots[slot as usize];
            s.class = class;
            s.uses = s.uses.saturating_add(1).min(Self::USE_CLASSES as u8);
            self.shift_by_odds(slot, class, gap);
            if ordered {
                self.enter(slot);
            }
        }
        self.flush_pending();
        self.requests += 1;
        let tip = Tip {
            request: self.requests,
            turn,
            blocks: last.request_blocks,
            stamp: last.stamp,
        };
        let (walk, slots) = (&self.walk, &self.slots);
        self.tips.leave(
            walk.len(),
            |i| (slots[walk[i].0 as usize].hash, walk[i].1),
            tip,
        );
        self.walk.clear();
    }

    /// The next victim in order `k` (the first order if there is no such order), taken out of
    /// every order.
    pub(crate) fn pop_victim_in(&mut self, k: usize) -> Option<u32> {
        self.flush_pending();
        let k = if k < self.orders.len() { k } else { 0 };
        let (_, slot) = self.orders[k].keys.pop_first()?;
        self.leave(slot, Some(k));
        self.slots[slot as usize].evictable = false;
        Some(slot)
    }

    /// The next `n` victims of order `k` (the first order if there is no such order).
    pub(crate) fn peek_victims_in(&self, k: usize, n: usize, out: &mut Vec<u32>) {
        let k = if k < self.orders.len() { k } else { 0 };
        out.extend(self.orders[k].keys.iter().take(n).map(|&(_, slot)| slot));
    }

    fn walk_step(&mut self, slot: u32, info: &BlockInfo, new: bool) {
        if info.depth == 0 {
            // A new walk; one cut short (an insert error) keeps its old keys.
            self.walk.clear();
            self.walk_src = None;
            self.flush_pending();
        }
        self.walk.push((slot, new));
        if let Some(tip) = self.tips.get(&info.hash) {
            self.walk_src = Some(tip);
        }
        if info.depth + 1 == info.request_blocks {
            self.end_walk(info);
        }
    }
}

impl EvictionPolicy for ReuseOdds {
    fn name(&self) -> &'static str {
        "reuse-odds"
    }
    fn on_insert(&mut self, slot: u32, info: &BlockInfo) {
        let i = slot as usize;
        let n = self.orders.len();
        if self.slots.len() <= i {
            self.slots.resize(i + 1, Slot::default());
            self.shifts.resize((i + 1) * n, 0);
        }
        // A block cached again after eviction keeps its history.
        let uses = match self.ghost.remove(&info.hash) {
            Some((class, uses)) => {
                self.reused(class);
                uses
            }
            None => 0,
        };
        self.shifts[i * n..(i + 1) * n].fill(0);
        self.slots[i] = Slot {
            stamp: info.stamp,
            uses,
            class: Self::UNCLASSED,
            evictable: false,
            pending: false,
            fresh_more: false,
            hash: info.hash,
        };
        match info.access {
            Access::Insert => self.walk_step(slot, info, true),
            Access::More => {
                let s = &mut self.slots[i];
                s.class = Self::MORE;
                s.fresh_more = true;
                self.shift_by_odds(slot, Self::MORE, self.gaps.get() as f64);
            }
            Access::Lookup => {}
        }
    }
    fn on_hit(&mut self, slot: u32, info: &BlockInfo) {
        let s = self.slots[slot as usize];
        if s.evictable && !s.pending {
            self.leave(slot, None);
            self.slots[slot as usize].pending = true;
            self.pending.push(slot);
        }
        self.slots[slot as usize].stamp = info.stamp;
        if info.access == Access::Insert {
            // Every request's insert walk passes each of its blocks once: the block's previous
            // access was followed by a reuse. Its class is counted once; the walk's end gives
            // it a new one.
            // A block cached outside any walk and not released since (a prefill chunk of this
            // very request, offered as more of it) is new to this walk, not a reuse. A block
            // left unclassed by a walk cut short is neither: not a reuse (it has no class to
            // count), and not new, so no checkpoint of this request lands on it.
            let fresh = s.fresh_more;
            if !fresh {
                self.reused(s.class);
            }
            let s = &mut self.slots[slot as usize];
            s.class = Self::UNCLASSED;
            s.fresh_more = false;
            self.walk_step(slot, info, fresh);
        } else {
            self.flush_pending();
        }
    }
    fn on_release(&mut self, slot: u32, stamp: u64) {
        let s = self.slots[slot as usize];
        if s.fresh_more {
            // Its request is done with it: whether another uses it is the `MORE` event.
            self.slots[slot as usize].fresh_more = false;
            self.stats[Self::MORE as usize].0 += 1;
        }
        let ordered = s.evictable && !s.pending;
        if ordered {
            self.leave(slot, None);
        }
        self.slots[slot as usize].stamp = stamp;
        if ordered {
            self.enter(slot);
        }
    }
    fn on_evictable(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        if !s.evictable {
            s.evictable = true;
            if !s.pending {
                self.enter(slot);
            }
        }
    }
    fn on_unevictable(&mut self, slot: u32) {
        let s = self.slots[slot as usize];
        if s.evictable {
            self.slots[slot as usize].evictable = false;
            if !s.pending {
                self.leave(slot, None);
            }
        }
    }
    fn on_remove(&mut self, slot: u32) {
        self.on_unevictable(slot);
        let s = &mut self.slots[slot as usize];
        s.pending = false;
        let (hash, class, uses) = (s.hash, s.class, s.uses);
        self.ghost.insert(hash, (class, uses));
        self.ghost.trim();
    }
    fn pop_victim(&mut self) -> Option<u32> {
        self.pop_victim_in(0)
    }
    fn peek_victims(&self, n: usize, out: &mut Vec<u32>) {
        self.peek_victims_in(0, n, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Lru;

    /// Replays `requests` (chains of ids) through a cache of `capacity` one-token blocks, a
    /// request at a time; returns the hit blocks.
    fn replay(requests: &[Vec<u32>], capacity: usize, policy: Box<dyn EvictionPolicy>) -> usize {
        crate::test_replay::replay(requests, capacity, 1, policy)
    }

    #[test]
    fn blocks_used_again_outlive_one_off_blocks() {
        // 12 conversations of 2 blocks, each coming back every 48 requests; between them
        // one-off prompts of 2 blocks. A 40-block LRU holds 20 requests: it loses every
        // conversation before it comes back. Learning that used blocks come back keeps them.
        let mut requests = Vec::new();
        let mut fresh = 1000u32;
        for round in 0..40u32 {
            for c in 0..12u32 {
                requests.push(vec![2 * c, 2 * c + 1, 5000 + round * 12 + c]);
                for _ in 0..3 {
                    requests.push(vec![fresh, fresh + 1]);
                    fresh += 2;
                }
            }
        }
        let lru = replay(&requests, 40, Box::new(Lru::default()));
        let odds = replay(
            &requests,
            40,
            Box::new(ReuseOdds::new(40, ReuseOdds::MODEL_KAPPA)),
        );
        assert!(odds > lru + 200, "reuse odds {odds} hits, lru {lru}");
    }

    #[test]
    fn a_walk_passing_blocks_of_a_walk_cut_short_leaves_no_checkpoint_on_them() {
        // Request A caches 3 blocks of a 4-block prompt and its walk stops there (its offer
        // ended at a block another request had cached): they stay unclassed. Request B's walk
        // passes them and caches the 4th. B newly cached only the 4th, so only it may carry
        // B's checkpoint; the others were cached by A.
        let info = |s: u32| BlockInfo {
            hash: BlockHash(u128::from(s) + 1),
            depth: s,
            stamp: u64::from(s),
            request_hit_blocks: 0,
            request_blocks: 4,
            block_size: 16,
            access: Access::Insert,
        };
        let mut p = ReuseOdds::new(8, ReuseOdds::MODEL_KAPPA);
        for s in 0..3u32 {
            p.on_insert(s, &info(s));
        }
        for s in 0..3u32 {
            p.on_release(s, u64::from(s));
        }
        for s in 0..3u32 {
            p.on_hit(
                s,
                &BlockInfo {
                    stamp: 10 + u64::from(s),
                    request_hit_blocks: 3,
                    ..info(s)
                },
            );
        }
        p.on_insert(
            3,
            &BlockInfo {
                stamp: 13,
                request_hit_blocks: 3,
                ..info(3)
            },
        );
        assert!(
            p.tips.get(&BlockHash(4)).is_some(),
            "B's newly cached block"
        );
        for s in 0..3u128 {
            assert!(
                p.tips.get(&BlockHash(s + 1)).is_none(),
                "block {s} was cached by A"
            );
        }
    }

    #[test]
    fn every_evictable_block_comes_out_once_and_never_one_in_use() {
        let mut p = ReuseOdds::new(8, ReuseOdds::MODEL_KAPPA);
        for s in 0..6u32 {
            let info = BlockInfo {
                hash: BlockHash(u128::from(s) + 1),
                depth: s,
                stamp: u64::from(s),
                request_hit_blocks: 0,
                request_blocks: 6,
                block_size: 16,
                access: Access::Insert,
            };
            p.on_insert(s, &info);
            p.on_evictable(s);
        }
        p.on_unevictable(2);
        let mut out = Vec::new();
        while let Some(s) = p.pop_victim() {
            p.on_remove(s);
            out.push(s);
        }
        out.sort_unstable();
        assert_eq!(out, [0, 1, 3, 4, 5]);
        // The evicted blocks are remembered with their class.
        for s in [0u128, 1, 3, 4, 5] {
            assert!(p.ghost.get(&BlockHash(s + 1)).is_some());
        }
        assert_eq!(p.ghost.queued(), 5);
    }
}
