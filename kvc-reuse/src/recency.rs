//! [`Recency`]: the sorted recency queue behind [`Lru`](crate::Lru), and the prefix cache's
//! own least-recently-used order, used in place of the `Lru` policy object when the cache is
//! built with it.
//!
//! See [`Lru`](crate::Lru)'s module docs for the queue: entries `(stamp, slot)` sorted oldest
//! first, a block joining near an end in constant time, a small ordered set for blocks whose
//! place is far from both ends, stale entries skipped lazily. The queue keeps no per-slot
//! state: its user says whether an entry is live (the slot is still queued under that stamp).
//! `Lru` answers from a per-slot table; the cache answers from its own node, which it reads
//! whenever it touches a block anyway, so releasing, making evictable and evicting a block
//! cost no memory access beyond the node and the queue's ends (a per-slot table was a cache
//! miss per release and per newly cached block).
//!
//! Stamps come from the cache's clock, one tick per stamping, so `(stamp, slot)` names one
//! block at one stamping: a stale entry never turns live again unless its node re-enters the
//! queue with the same stamp, and then the new entry has the same key, so the two sit side by
//! side and either one stands for the block. The eviction order is therefore exactly the
//! `(stamp, slot)` order of the evictable blocks.

use std::collections::{BTreeSet, VecDeque};

/// A queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) stamp: u64,
    pub(crate) slot: u32,
}

impl Entry {
    #[inline]
    fn key(self) -> (u64, u32) {
        (self.stamp, self.slot)
    }
}

/// Where [`Recency::enter`] put a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placed {
    /// In the queue.
    Queue,
    /// In the ordered set.
    Set,
}

/// The least-recently-used order of the evictable default-priority blocks; see the module
/// docs. Every method that may meet stale entries takes `is_live`, which says whether an
/// entry's node is still queued with that stamp.
#[derive(Debug, Default)]
pub(crate) struct Recency {
    queue: VecDeque<Entry>,
    /// Blocks with a live entry in the queue (the other entries are stale).
    queued: usize,
    /// Evictable blocks whose place in the queue was far from both ends.
    set: BTreeSet<(u64, u32)>,
}

impl Recency {
    /// Farthest from an end of the queue a block is placed by moving entries.
    const SHIFT: usize = 32;

    /// Makes the non-evictable `slot`, last used at `stamp`, evictable; the caller records
    /// where it went.
    pub(crate) fn enter(&mut self, stamp: u64, slot: u32) -> Placed {
        let e = Entry { stamp, slot };
        let key = e.key();
        // The queue (stale entries included) stays sorted.
        match (self.queue.front().copied(), self.queue.back().copied()) {
            (_, Some(back)) if back.key() < key => self.queue.push_back(e),
            (None, None) => self.queue.push_back(e),
            (Some(front), _) if key < front.key() => self.queue.push_front(e),
            _ => {
                let at = self.queue.partition_point(|q| q.key() < key);
                if at.min(self.queue.len() - at) > Self::SHIFT {
                    self.set.insert(key);
                    return Placed::Set;
                }
                self.queue.insert(at, e);
            }
        }
        self.queued += 1;
        Placed::Queue
    }

    /// A queued block stopped being evictable: its entry is stale from now on.
    pub(crate) fn leave_queued(&mut self, is_live: impl Fn(Entry) -> bool) {
        self.queued -= 1;
        let stale = self.queue.len() - self.queued;
        if stale > 64 && stale * 2 > self.queue.len() {
            self.queue.retain(|&e| is_live(e));
        }
    }

    /// A block in the set stopped being evictable.
    pub(crate) fn leave_set(&mut self, stamp: u64, slot: u32) {
        self.set.remove(&(stamp, slot));
    }

    /// Drops stale entries from the front; returns the first live one.
    #[inline]
    fn live_front(&mut self, is_live: &impl Fn(Entry) -> bool) -> Option<Entry> {
        while let Some(&e) = self.queue.front() {
            if is_live(e) {
                return Some(e);
            }
            self.queue.pop_front();
        }
        None
    }

    /// Removes the least recently used evictable block and returns its slot and where it
    /// was.
    pub(crate) fn pop(&mut self, is_live: impl Fn(Entry) -> bool) -> Option<(u32, Placed)> {
        let front = self.live_front(&is_live);
        let from_set = match (front, self.set.first()) {
            (None, None) => return None,
            (Some(e), Some(&k)) => k < e.key(),
            (None, Some(_)) => true,
            (Some(_), None) => false,
        };
        if from_set {
            let (_, slot) = self.set.pop_first()?;
            Some((slot, Placed::Set))
        } else {
            let e = self.queue.pop_front()?;
            self.queued -= 1;
            Some((e.slot, Placed::Queue))
        }
    }

    /// Whether the non-evictable `slot`, last used at `stamp`, would be the next victim.
    pub(crate) fn evicts_next(
        &mut self,
        stamp: u64,
        slot: u32,
        is_live: impl Fn(Entry) -> bool,
    ) -> bool {
        let key = (stamp, slot);
        let front = self.live_front(&is_live);
        front.is_none_or(|e| key < e.key()) && self.set.first().is_none_or(|&k| key < k)
    }

    /// Appends the slots of the next `n` victims, in order (live entries only, a block that
    /// re-entered under the same stamp once; changes nothing).
    pub(crate) fn peek_live(&self, n: usize, out: &mut Vec<u32>, is_live: impl Fn(Entry) -> bool) {
        let mut last = None;
        let mut queued = self
            .queue
            .iter()
            .copied()
            .filter(|&e| is_live(e))
            .filter(move |&e| last.replace(e.key()) != Some(e.key()))
            .peekable();
        let mut set = self.set.iter().peekable();
        for _ in 0..n {
            let from_set = match (queued.peek(), set.peek()) {
                (None, None) => break,
                (Some(e), Some(&&k)) => k < e.key(),
                (None, Some(_)) => true,
                (Some(_), None) => false,
            };
            let next = if from_set {
                set.next().map(|&(_, s)| s)
            } else {
                queued.next().map(|e| e.slot)
            };
            out.extend(next);
        }
    }

    /// Appends the slots of the next `n` entries of the queue and of the set (stale ones
    /// included): a hint of the next victims, for prefetching.
    pub(crate) fn peek(&self, n: usize, out: &mut Vec<u32>) {
        // The queue's two halves as slices: an exact-size copy, without a capacity check
        // per entry.
        let (front, back) = self.queue.as_slices();
        let from_front = n.min(front.len());
        let from_back = (n - from_front).min(back.len());
        out.extend(front[..from_front].iter().map(|e| e.slot));
        out.extend(back[..from_back].iter().map(|e| e.slot));
        if !self.set.is_empty() {
            out.extend(self.set.iter().take(n).map(|&(_, s)| s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes as the cache keeps them: a stamp, and whether and where the block is evictable.
    #[derive(Clone, Copy, Default)]
    struct Node {
        stamp: u64,
        placed: Option<Placed>,
    }

    fn live(nodes: &[Node]) -> impl Fn(Entry) -> bool + '_ {
        |e| {
            let n = nodes[e.slot as usize];
            n.placed == Some(Placed::Queue) && n.stamp == e.stamp
        }
    }

    #[test]
    fn evicts_in_exactly_the_stamp_order_of_an_ordered_set() {
        const SLOTS: u32 = 300;
        let mut r = Recency::default();
        let mut nodes = vec![Node::default(); SLOTS as usize];
        let mut order: BTreeSet<(u64, u32)> = BTreeSet::new();
        let mut clock = 0u64;
        for n in nodes.iter_mut() {
            clock += 1;
            n.stamp = clock;
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..60_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let slot = (x % u64::from(SLOTS)) as u32;
            let i = slot as usize;
            let leave = |r: &mut Recency, nodes: &mut Vec<Node>| match nodes[i].placed.take() {
                Some(Placed::Queue) => r.leave_queued(live(nodes)),
                Some(Placed::Set) => r.leave_set(nodes[i].stamp, slot),
                None => {}
            };
            match (x >> 32) % 6 {
                0 | 1 => {
                    // Evictable at its own (possibly old) stamp: a parent losing its last child.
                    if nodes[i].placed.is_none() {
                        nodes[i].placed = Some(r.enter(nodes[i].stamp, slot));
                        order.insert((nodes[i].stamp, slot));
                    }
                }
                2 => {
                    if nodes[i].placed.is_some() {
                        order.remove(&(nodes[i].stamp, slot));
                    }
                    leave(&mut r, &mut nodes);
                }
                3 => {
                    // Used again: a new stamp, then evictable again (a release).
                    if nodes[i].placed.is_some() {
                        order.remove(&(nodes[i].stamp, slot));
                    }
                    leave(&mut r, &mut nodes);
                    clock += 1;
                    nodes[i].stamp = clock;
                    if step % 3 == 0 {
                        nodes[i].placed = Some(r.enter(clock, slot));
                        order.insert((clock, slot));
                    }
                }
                4 => {
                    if nodes[i].placed.is_none() {
                        let key = (nodes[i].stamp, slot);
                        let want = order.first().is_none_or(|&k| key < k);
                        assert_eq!(
                            r.evicts_next(key.0, slot, live(&nodes)),
                            want,
                            "step {step}"
                        );
                    }
                }
                _ => {
                    let got = r.pop(live(&nodes)).map(|(s, p)| {
                        assert_eq!(nodes[s as usize].placed, Some(p));
                        nodes[s as usize].placed = None;
                        s
                    });
                    assert_eq!(got, order.pop_first().map(|(_, s)| s), "step {step}");
                }
            }
        }
        while let Some((_, s)) = order.pop_first() {
            assert_eq!(r.pop(live(&nodes)).map(|(s, _)| s), Some(s));
            nodes[s as usize].placed = None;
        }
        assert_eq!(r.pop(live(&nodes)), None);
    }
}
