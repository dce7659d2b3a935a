//! [`Lru`]: least recently used eviction as a recency queue in flat arrays.
//!
//! The evictable blocks wait in the sorted recency queue of `recency.rs`: a double-ended queue
//! of entries `(stamp, slot)`, sorted oldest first. Almost every block becomes evictable either
//! with the newest stamp (a release) or with an older stamp than every block queued (a parent
//! whose last child was just evicted), so it joins one end of the queue in constant time, with
//! no allocation. A block that stops being evictable (hit again, or given a child) is not
//! looked for in the queue: its entry just goes stale (its slot here is no longer queued under
//! that stamp) and is skipped when it reaches the front, or dropped with the others once they
//! outnumber the live ones. Eviction reads the queue front to back, so the next victims sit in
//! consecutive memory instead of behind a pointer chase.
//!
//! A block whose place is inside the queue goes there when that is near an end (a short move),
//! and otherwise waits in a small ordered set beside the queue;
//! [`pop_victim`](EvictionPolicy::pop_victim) takes the older of the queue's first live entry
//! and the set's first. The eviction order is therefore exactly the `(stamp, slot)` order,
//! whatever the access pattern.
//!
//! A [`PrefixCache`](crate::PrefixCache) given this policy does not call it: it keeps the same
//! queue itself, checking entries against the stamps in its own nodes instead of the per-slot
//! table here ([`EvictionPolicy::is_plain_lru`]). This type is the policy for other users of
//! the trait (an [`Adaptive`](crate::Adaptive) expert, a cache of your own), and the reference
//! the cache's order is tested against.

use crate::policy::{BlockInfo, EvictionPolicy};
use crate::recency::{Entry, Placed, Recency};

/// A slot's last use, and whether and where it is evictable.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    stamp: u64,
    /// `None` while not evictable.
    placed: Option<Placed>,
}

/// Least recently used: evicts the evictable block whose last use is oldest. A block's last
/// use is the later of its last access (lookup or insert) and its last release, so blocks no
/// one has used for longest go first, and, as in vLLM, blocks freed earlier go before blocks
/// freed later, a request's tail before its head. Ties (never produced by the cache's clock)
/// go to the lower slot. Every operation is constant time in practice; see the module docs.
#[derive(Debug, Default)]
pub struct Lru {
    slots: Vec<Slot>,
    order: Recency,
}

/// Whether a queue entry stands for its slot: the slot is queued under the entry's stamp.
#[inline]
fn live(slots: &[Slot]) -> impl Fn(Entry) -> bool + '_ {
    |e| {
        let s = slots[e.slot as usize];
        s.placed == Some(Placed::Queue) && s.stamp == e.stamp
    }
}

impl Lru {
    /// Makes the non-evictable `slot` evictable at its stamp.
    fn enter(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        s.placed = Some(self.order.enter(s.stamp, slot));
    }

    /// Makes the evictable `slot` not evictable.
    fn leave(&mut self, slot: u32) {
        let s = self.slots[slot as usize];
        self.slots[slot as usize].placed = None;
        match s.placed {
            None => {}
            Some(Placed::Queue) => self.order.leave_queued(live(&self.slots)),
            Some(Placed::Set) => self.order.leave_set(s.stamp, slot),
        }
    }

    /// Sets the last use of `slot`, moving it in the order if it is evictable.
    #[inline]
    fn restamp(&mut self, slot: u32, stamp: u64) {
        if self.slots[slot as usize].placed.is_none() {
            self.slots[slot as usize].stamp = stamp;
        } else {
            self.leave(slot);
            self.slots[slot as usize].stamp = stamp;
            self.enter(slot);
        }
    }
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }
    fn on_insert(&mut self, slot: u32, info: &BlockInfo) {
        let i = slot as usize;
        if self.slots.len() <= i {
            self.slots.resize(i + 1, Slot::default());
        }
        // A reused slot: whatever its old entry says is stale now.
        self.leave(slot);
        self.slots[i].stamp = info.stamp;
    }
    fn on_hit(&mut self, slot: u32, info: &BlockInfo) {
        self.restamp(slot, info.stamp);
    }
    fn on_release(&mut self, slot: u32, stamp: u64) {
        self.restamp(slot, stamp);
    }
    fn on_evictable(&mut self, slot: u32) {
        if self.slots[slot as usize].placed.is_none() {
            self.enter(slot);
        }
    }
    fn on_unevictable(&mut self, slot: u32) {
        self.leave(slot);
    }
    fn on_remove(&mut self, slot: u32) {
        self.leave(slot);
    }
    fn pop_victim(&mut self) -> Option<u32> {
        let (slot, _) = self.order.pop(live(&self.slots))?;
        self.slots[slot as usize].placed = None;
        Some(slot)
    }
    fn is_plain_lru(&self) -> bool {
        true
    }
    fn evicts_next(&mut self, slot: u32, stamp: u64) -> bool {
        // The slot is not evictable, so it is out of the order, as `on_remove` would leave it
        // (its entry here is not read: for a parent whose child was just evicted it is a
        // cache miss).
        self.order.evicts_next(stamp, slot, live(&self.slots))
    }
    fn peek_victims(&self, n: usize, out: &mut Vec<u32>) {
        self.order.peek_live(n, out, live(&self.slots));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::BlockHash;
    use crate::policy::Access;

    fn info(stamp: u64) -> BlockInfo {
        BlockInfo {
            hash: BlockHash(u128::from(stamp)),
            depth: 0,
            stamp,
            request_hit_blocks: 0,
            request_blocks: 1,
            block_size: 16,
            access: Access::Insert,
        }
    }

    /// The reference: the evictable slots ordered by `(stamp, slot)`.
    #[derive(Default)]
    struct Model {
        stamps: Vec<u64>,
        order: BTreeSet<(u64, u32)>,
        evictable: Vec<bool>,
    }

    #[test]
    fn evicts_in_exactly_the_stamp_order_of_an_ordered_set() {
        const SLOTS: u32 = 300;
        let mut lru = Lru::default();
        let mut m = Model::default();
        let mut clock = 0u64;
        for s in 0..SLOTS {
            clock += 1;
            lru.on_insert(s, &info(clock));
            m.stamps.push(clock);
            m.evictable.push(false);
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut peeked = Vec::new();
        for step in 0..60_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let slot = (x % u64::from(SLOTS)) as u32;
            let i = slot as usize;
            match (x >> 32) % 7 {
                0 | 1 => {
                    // Evictable at its own (possibly old) stamp: a parent losing its last child.
                    lru.on_evictable(slot);
                    if !m.evictable[i] {
                        m.evictable[i] = true;
                        m.order.insert((m.stamps[i], slot));
                    }
                }
                2 => {
                    lru.on_unevictable(slot);
                    if m.evictable[i] {
                        m.evictable[i] = false;
                        m.order.remove(&(m.stamps[i], slot));
                    }
                }
                3 => {
                    // An old stamp on purpose: blocks placed in the middle of the order.
                    let stamp = if step % 2 == 0 {
                        clock + 1
                    } else {
                        (x >> 40) % (clock + 1)
                    };
                    clock += 1;
                    lru.on_release(slot, stamp);
                    if m.evictable[i] {
                        m.order.remove(&(m.stamps[i], slot));
                        m.order.insert((stamp, slot));
                    }
                    m.stamps[i] = stamp;
                }
                4 => {
                    clock += 1;
                    lru.on_hit(slot, &info(clock));
                    if m.evictable[i] {
                        m.order.remove(&(m.stamps[i], slot));
                        m.order.insert((clock, slot));
                    }
                    m.stamps[i] = clock;
                }
                5 => {
                    peeked.clear();
                    lru.peek_victims(5, &mut peeked);
                    let want: Vec<u32> = m.order.iter().take(5).map(|&(_, s)| s).collect();
                    assert_eq!(peeked, want, "step {step}");
                }
                _ => {
                    let got = lru.pop_victim();
                    let want = m.order.pop_first().map(|(_, s)| s);
                    assert_eq!(got, want, "step {step}");
                    if let Some(s) = want {
                        m.evictable[s as usize] = false;
                    }
                }
            }
        }
        while let Some((_, s)) = m.order.pop_first() {
            assert_eq!(lru.pop_victim(), Some(s));
        }
        assert_eq!(lru.pop_victim(), None);
    }

    #[test]
    fn releases_append_and_orphaned_parents_go_first() {
        let mut lru = Lru::default();
        for s in 0..4 {
            lru.on_insert(s, &info(u64::from(s) + 1));
        }
        // A chain 0 <- 1 <- 2 released tail first, then an unrelated block 3.
        lru.on_release(2, 10);
        lru.on_evictable(2);
        lru.on_release(1, 11);
        lru.on_release(0, 12);
        lru.on_release(3, 13);
        lru.on_evictable(3);
        assert_eq!(lru.pop_victim(), Some(2));
        // The parent becomes evictable after its child left: older than block 3.
        lru.on_evictable(1);
        assert_eq!(lru.pop_victim(), Some(1));
        lru.on_evictable(0);
        assert_eq!(lru.pop_victim(), Some(0));
        assert_eq!(lru.pop_victim(), Some(3));
        assert_eq!(lru.pop_victim(), None);
    }
}
