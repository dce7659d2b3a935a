//! [`Lru`]: least recently used eviction as an intrusive doubly linked list in flat arrays.
//!
//! Each slot has one 16-byte link (its last-use stamp and its neighbours); the list holds the
//! evictable blocks in the order `(stamp, slot)`, oldest first. Almost every block becomes
//! evictable either with the newest stamp (a release) or with an older stamp than every block
//! already listed (a parent whose last child was just evicted), so it joins one end of the list
//! in constant time, with no allocation. A block whose place is elsewhere is placed by a short
//! walk from both ends; if that does not find its place within [`Lru::WALK`] steps it waits in
//! a small ordered set beside the list, and [`pop_victim`](EvictionPolicy::pop_victim) takes
//! the older of the list's head and the set's first. The eviction order is therefore exactly
//! the `(stamp, slot)` order, whatever the access pattern.

use std::collections::BTreeSet;

use crate::policy::{BlockInfo, EvictionPolicy};

/// No slot (an end of the list).
const NIL: u32 = u32::MAX;
/// `prev` of a slot that is not evictable.
const OUT: u32 = u32::MAX - 1;
/// `prev` of an evictable slot kept in the ordered set instead of the list.
const SET: u32 = u32::MAX - 2;
/// `prev` of the list's head.
const HEAD: u32 = u32::MAX - 3;

/// A slot's last use and its place in the recency list.
#[derive(Clone, Copy, Debug)]
struct Link {
    stamp: u64,
    /// The previous slot in the list, or [`HEAD`], [`OUT`] or [`SET`].
    prev: u32,
    /// The next slot in the list, or [`NIL`] (meaningful only in the list).
    next: u32,
}

impl Default for Link {
    fn default() -> Self {
        Self {
            stamp: 0,
            prev: OUT,
            next: NIL,
        }
    }
}

/// Least recently used: evicts the evictable block whose last use is oldest. A block's last
/// use is the later of its last access (lookup or insert) and its last release, so blocks no
/// one has used for longest go first, and, as in vLLM, blocks freed earlier go before blocks
/// freed later, a request's tail before its head. Ties (never produced by the cache's clock)
/// go to the lower slot. Every operation is constant time in practice; see the module docs.
#[derive(Debug)]
pub struct Lru {
    links: Vec<Link>,
    head: u32,
    tail: u32,
    /// Evictable blocks whose place in the list was not near either end.
    set: BTreeSet<(u64, u32)>,
}

impl Default for Lru {
    fn default() -> Self {
        Self {
            links: Vec::new(),
            head: NIL,
            tail: NIL,
            set: BTreeSet::new(),
        }
    }
}

impl Lru {
    /// Steps a misplaced block's walk takes from each end before it goes to the set.
    const WALK: usize = 8;

    #[inline]
    fn key(&self, slot: u32) -> (u64, u32) {
        (self.links[slot as usize].stamp, slot)
    }

    #[inline]
    fn is_evictable(&self, slot: u32) -> bool {
        self.links[slot as usize].prev != OUT
    }

    /// Links `slot` (not listed) between `prev` and `next` (each a slot or an end).
    #[inline]
    fn link(&mut self, slot: u32, prev: u32, next: u32) {
        let l = &mut self.links[slot as usize];
        l.prev = if prev == NIL { HEAD } else { prev };
        l.next = next;
        if prev == NIL {
            self.head = slot;
        } else {
            self.links[prev as usize].next = slot;
        }
        if next == NIL {
            self.tail = slot;
        } else {
            self.links[next as usize].prev = slot;
        }
    }

    /// Makes the non-evictable `slot` evictable at its stamp.
    fn enter(&mut self, slot: u32) {
        let key = self.key(slot);
        if self.tail == NIL {
            self.link(slot, NIL, NIL);
            return;
        }
        if self.key(self.tail) < key {
            self.link(slot, self.tail, NIL);
            return;
        }
        if key < self.key(self.head) {
            self.link(slot, NIL, self.head);
            return;
        }
        // Somewhere inside: the first listed slot after it, from the head, or the last one
        // before it, from the tail.
        let (mut fwd, mut back) = (self.links[self.head as usize].next, self.tail);
        for _ in 0..Self::WALK {
            if fwd != NIL && key < self.key(fwd) {
                let prev = self.links[fwd as usize].prev;
                self.link(slot, prev, fwd);
                return;
            }
            let before = self.links[back as usize].prev;
            if before != HEAD && self.key(before) < key {
                self.link(slot, before, back);
                return;
            }
            if fwd == NIL || before == HEAD {
                break;
            }
            fwd = self.links[fwd as usize].next;
            back = before;
        }
        self.links[slot as usize].prev = SET;
        self.set.insert(key);
    }

    /// Makes the evictable `slot` not evictable.
    fn leave(&mut self, slot: u32) {
        let Link { stamp, prev, next } = self.links[slot as usize];
        match prev {
            OUT => return,
            SET => {
                self.set.remove(&(stamp, slot));
            }
            _ => {
                if prev == HEAD {
                    self.head = next;
                } else {
                    self.links[prev as usize].next = next;
                }
                if next == NIL {
                    self.tail = if prev == HEAD { NIL } else { prev };
                } else {
                    self.links[next as usize].prev = prev;
                }
            }
        }
        let l = &mut self.links[slot as usize];
        l.prev = OUT;
        l.next = NIL;
    }

    /// Sets the last use of `slot`, moving it in the order if it is evictable.
    #[inline]
    fn restamp(&mut self, slot: u32, stamp: u64) {
        if self.is_evictable(slot) {
            self.leave(slot);
            self.links[slot as usize].stamp = stamp;
            self.enter(slot);
        } else {
            self.links[slot as usize].stamp = stamp;
        }
    }
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }
    fn on_insert(&mut self, slot: u32, info: &BlockInfo) {
        let i = slot as usize;
        if self.links.len() <= i {
            self.links.resize(i + 1, Link::default());
        }
        self.links[i] = Link {
            stamp: info.stamp,
            prev: OUT,
            next: NIL,
        };
    }
    fn on_hit(&mut self, slot: u32, info: &BlockInfo) {
        self.restamp(slot, info.stamp);
    }
    fn on_release(&mut self, slot: u32, stamp: u64) {
        self.restamp(slot, stamp);
    }
    fn on_evictable(&mut self, slot: u32) {
        if !self.is_evictable(slot) {
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
        let slot = match (self.head, self.set.first()) {
            (NIL, None) => return None,
            (NIL, Some(&(_, s))) => s,
            (h, Some(&(stamp, s))) if (stamp, s) < self.key(h) => s,
            (h, _) => h,
        };
        self.leave(slot);
        Some(slot)
    }
    fn peek_victims(&self, n: usize, out: &mut Vec<u32>) {
        let mut listed = self.head;
        let mut set = self.set.iter().peekable();
        for _ in 0..n {
            let from_set = match (listed, set.peek()) {
                (NIL, None) => break,
                (NIL, Some(_)) => true,
                (l, Some(&&k)) => k < self.key(l),
                (_, None) => false,
            };
            if from_set {
                if let Some(&(_, s)) = set.next() {
                    out.push(s);
                }
            } else {
                out.push(listed);
                listed = self.links[listed as usize].next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
