//! [`Adaptive`]: an eviction policy that learns online which signal predicts reuse on the
//! traffic it sees, instead of being tuned to one trace.
//!
//! It is a regret-minimising mix of experts in the manner of LeCaR (Vietri et al., HotStorage
//! 2018) and CACHEUS (Rodriguez et al., FAST 2021). Three experts each keep their own order
//! over the evictable blocks:
//! - **recency** ([`Lru`]): the least recently used block first;
//! - **frequency** (LFU with recency tie-breaks): the block used least often first, which
//!   keeps hot documents and hot prefixes through a scan of one-off prompts;
//! - **conversation** ([`Conversation`]): LRU shifted by each request's learned probability
//!   of being continued, for multi-turn chat.
//!
//! Every eviction is made by one expert, drawn with probability proportional to its weight
//! (from a seeded generator, so runs are reproducible). The evicted block's hash goes into a
//! ghost list that remembers which expert evicted it and when. When a request later needs a
//! block that is in the ghost list (it is cached again after a miss), that expert's choice
//! was a mistake: its weight is multiplied by `exp(-rate × discount^age)`, where the age counts
//! evictions since the mistake was made (a mistake found soon after weighs more), and the
//! weights are normalised. A weight never drops below a floor, so an expert that stopped
//! being wrong can win back the traffic when the workload changes.
//!
//! The learning rate and the discount follow LeCaR's published defaults (rate 0.45, a
//! discount that reaches 0.005 after one cache's worth of evictions); nothing is fitted to a
//! trace. Recency starts with half the weight and the other two a quarter each, so before
//! any mistake is observed the policy behaves mostly like LRU, and it stays there when no
//! other signal helps.

use std::collections::{BTreeSet, VecDeque};

use ahash::AHashMap;

use crate::BlockHash;
use crate::policy::{BlockInfo, Conversation, EvictionPolicy, Lru};

/// Least frequently used, least recently used among equals.
#[derive(Debug, Default)]
struct Frequency {
    /// Per slot: (uses, last stamp, evictable).
    slots: Vec<(u32, u64, bool)>,
    order: BTreeSet<(u32, u64, u32)>,
}

impl Frequency {
    fn key(&self, slot: u32) -> (u32, u64, u32) {
        let (f, s, _) = self.slots[slot as usize];
        (f, s, slot)
    }
}

impl EvictionPolicy for Frequency {
    fn name(&self) -> &'static str {
        "lfu"
    }
    fn on_insert(&mut self, slot: u32, info: &BlockInfo) {
        let i = slot as usize;
        if self.slots.len() <= i {
            self.slots.resize(i + 1, (0, 0, false));
        }
        self.slots[i] = (1, info.stamp, false);
    }
    fn on_hit(&mut self, slot: u32, info: &BlockInfo) {
        let evictable = self.slots[slot as usize].2;
        if evictable {
            let key = self.key(slot);
            self.order.remove(&key);
        }
        let s = &mut self.slots[slot as usize];
        s.0 = s.0.saturating_add(1);
        s.1 = info.stamp;
        if evictable {
            let key = self.key(slot);
            self.order.insert(key);
        }
    }
    fn on_release(&mut self, slot: u32, stamp: u64) {
        let evictable = self.slots[slot as usize].2;
        if evictable {
            let key = self.key(slot);
            self.order.remove(&key);
        }
        self.slots[slot as usize].1 = stamp;
        if evictable {
            let key = self.key(slot);
            self.order.insert(key);
        }
    }
    fn on_evictable(&mut self, slot: u32) {
        if !self.slots[slot as usize].2 {
            self.slots[slot as usize].2 = true;
            let key = self.key(slot);
            self.order.insert(key);
        }
    }
    fn on_unevictable(&mut self, slot: u32) {
        if self.slots[slot as usize].2 {
            self.slots[slot as usize].2 = false;
            let key = self.key(slot);
            self.order.remove(&key);
        }
    }
    fn on_remove(&mut self, slot: u32) {
        self.on_unevictable(slot);
    }
    fn pop_victim(&mut self) -> Option<u32> {
        let (_, _, slot) = self.order.pop_first()?;
        self.slots[slot as usize].2 = false;
        Some(slot)
    }
}

/// The adaptive mix of recency, frequency and conversation experts; see the module docs.
#[derive(Debug)]
pub struct Adaptive {
    experts: [Box<dyn EvictionPolicy>; 3],
    weights: [f64; 3],
    /// Hash of each cached slot, to remember it in the ghost list when evicted.
    hashes: Vec<BlockHash>,
    /// Evicted hashes: (expert that evicted it, eviction count at the time).
    ghost: AHashMap<BlockHash, (u8, u64)>,
    ghost_order: VecDeque<BlockHash>,
    ghost_cap: usize,
    evictions: u64,
    discount: f64,
    rng: u64,
    /// Evictions each expert made, and mistakes found, for [`Adaptive::stats`].
    chosen: [u64; 3],
    mistakes: [u64; 3],
}

impl Adaptive {
    /// The learning rate of LeCaR.
    const RATE: f64 = 0.45;
    /// No expert's share falls below this, so each can win the traffic back.
    const FLOOR: f64 = 0.01;
    /// The expert names, in weight order.
    pub const EXPERTS: [&'static str; 3] = ["lru", "lfu", "conversation"];

    /// A policy for a cache of about `capacity_blocks` blocks (sizes the ghost list and the
    /// discount; a capacity of 0 is taken as 65,536 blocks).
    #[must_use]
    pub fn new(capacity_blocks: usize) -> Self {
        let cap = if capacity_blocks == 0 {
            1 << 16
        } else {
            capacity_blocks
        };
        Self {
            experts: [
                Box::new(Lru::default()),
                Box::new(Frequency::default()),
                Box::new(Conversation::new(cap)),
            ],
            weights: [0.5, 0.25, 0.25],
            hashes: Vec::new(),
            ghost: AHashMap::new(),
            ghost_order: VecDeque::new(),
            ghost_cap: cap,
            evictions: 0,
            discount: 0.005f64.powf(1.0 / cap as f64),
            rng: 0x6164_6170_7469_7665,
            chosen: [0; 3],
            mistakes: [0; 3],
        }
    }

    /// Per expert, in [`Adaptive::EXPERTS`] order: (current weight, evictions it made,
    /// mistakes found among them).
    #[must_use]
    pub fn stats(&self) -> [(f64, u64, u64); 3] {
        std::array::from_fn(|e| (self.weights[e], self.chosen[e], self.mistakes[e]))
    }

    fn draw(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick(&mut self) -> usize {
        let mut x = self.draw();
        for (e, &w) in self.weights.iter().enumerate() {
            x -= w;
            if x < 0.0 {
                return e;
            }
        }
        self.weights.len() - 1
    }

    fn learn(&mut self, hash: BlockHash) {
        let Some((expert, at)) = self.ghost.remove(&hash) else {
            return;
        };
        let e = expert as usize;
        self.mistakes[e] += 1;
        let age = self.evictions.saturating_sub(at) as f64;
        let regret = self.discount.powf(age);
        self.weights[e] *= (-Self::RATE * regret).exp();
        let total: f64 = self.weights.iter().sum();
        for w in &mut self.weights {
            *w = (*w / total).max(Self::FLOOR);
        }
        let total: f64 = self.weights.iter().sum();
        for w in &mut self.weights {
            *w /= total;
        }
    }

    fn remember(&mut self, hash: BlockHash, expert: usize) {
        if self
            .ghost
            .insert(hash, (expert as u8, self.evictions))
            .is_none()
        {
            self.ghost_order.push_back(hash);
        }
        while self.ghost_order.len() > self.ghost_cap {
            if let Some(old) = self.ghost_order.pop_front() {
                self.ghost.remove(&old);
            }
        }
    }
}

impl EvictionPolicy for Adaptive {
    fn name(&self) -> &'static str {
        "adaptive"
    }
    fn on_insert(&mut self, slot: u32, info: &BlockInfo) {
        let i = slot as usize;
        if self.hashes.len() <= i {
            self.hashes.resize(i + 1, BlockHash::default());
        }
        self.hashes[i] = info.hash;
        self.learn(info.hash);
        for e in &mut self.experts {
            e.on_insert(slot, info);
        }
    }
    fn on_hit(&mut self, slot: u32, info: &BlockInfo) {
        for e in &mut self.experts {
            e.on_hit(slot, info);
        }
    }
    fn on_release(&mut self, slot: u32, stamp: u64) {
        for e in &mut self.experts {
            e.on_release(slot, stamp);
        }
    }
    fn on_evictable(&mut self, slot: u32) {
        for e in &mut self.experts {
            e.on_evictable(slot);
        }
    }
    fn on_unevictable(&mut self, slot: u32) {
        for e in &mut self.experts {
            e.on_unevictable(slot);
        }
    }
    fn on_remove(&mut self, slot: u32) {
        for e in &mut self.experts {
            e.on_remove(slot);
        }
    }
    fn pop_victim(&mut self) -> Option<u32> {
        let first = self.pick();
        // Every expert orders the same evictable set, so the first one asked normally
        // answers; the others are asked only if it has nothing.
        let n = self.experts.len();
        let experts = &mut self.experts;
        let (expert, slot) = (0..n)
            .map(|k| (first + k) % n)
            .find_map(|e| experts[e].pop_victim().map(|s| (e, s)))?;
        // The others forget it when the cache removes it (`on_remove`), right after this.
        self.evictions += 1;
        self.chosen[expert] += 1;
        let hash = self.hashes[slot as usize];
        self.remember(hash, expert);
        Some(slot)
    }
    fn peek_victims(&self, n: usize, out: &mut Vec<u32>) {
        // The heaviest expert's next victims are the likeliest ones.
        let heaviest = (0..self.weights.len())
            .max_by(|&a, &b| self.weights[a].total_cmp(&self.weights[b]))
            .unwrap_or(0);
        self.experts[heaviest].peek_victims(n, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Access;

    fn info(hash: u128, stamp: u64) -> BlockInfo {
        BlockInfo {
            hash: BlockHash(hash),
            depth: 0,
            stamp,
            request_hit_blocks: 0,
            request_blocks: 1,
            block_size: 16,
            access: Access::Insert,
        }
    }

    #[test]
    fn every_evictable_block_comes_out_once() {
        let mut p = Adaptive::new(8);
        for s in 0..6u32 {
            p.on_insert(s, &info(u128::from(s) + 1, u64::from(s)));
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
    }

    #[test]
    fn a_mistaken_expert_loses_weight() {
        let mut p = Adaptive::new(4);
        p.on_insert(0, &info(10, 0));
        p.on_evictable(0);
        let slot = p.pop_victim().unwrap();
        p.on_remove(slot);
        let blamed = p.chosen.iter().position(|&c| c == 1).unwrap();
        let before = p.weights[blamed];
        // The evicted block is needed again: cached anew under the same hash.
        p.on_insert(1, &info(10, 1));
        assert!(p.weights[blamed] < before);
        assert_eq!(p.mistakes[blamed], 1);
        assert!((p.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(p.weights.iter().all(|&w| w >= Adaptive::FLOOR * 0.99));
    }

    #[test]
    fn frequency_keeps_the_block_used_most() {
        let mut f = Frequency::default();
        for s in 0..3u32 {
            f.on_insert(s, &info(u128::from(s), u64::from(s)));
        }
        f.on_hit(0, &info(0, 10));
        f.on_hit(0, &info(0, 11));
        f.on_hit(2, &info(2, 12));
        for s in 0..3 {
            f.on_evictable(s);
        }
        assert_eq!(f.pop_victim(), Some(1));
        assert_eq!(f.pop_victim(), Some(2));
        assert_eq!(f.pop_victim(), Some(0));
        assert_eq!(f.pop_victim(), None);
    }
}
