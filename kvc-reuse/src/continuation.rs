//! How the continuation-aware policies ([`Conversation`](crate::Conversation) and
//! [`ReuseOdds`](crate::ReuseOdds)) recognise that a request continues an earlier one, and how
//! long continuations take: [`Checkpoints`] left on a few of each request's last newly cached
//! blocks, [`Credits`] so each earlier request is counted continued once, and [`GapMedian`],
//! the median time from a request to its continuation on the cache's clock.
//!
//! All three are bounded: the oldest entries are forgotten first, so memory stays proportional
//! to the cache, and they outlive the blocks they name (a continuation often arrives after its
//! source was evicted).

use std::collections::VecDeque;

use ahash::AHashSet;

use crate::BlockHash;
use crate::fifo_map::FifoMap;

/// Where requests ended, keyed by the hashes of a few of their last newly cached blocks: a
/// later request whose insert walk passes one of them continues that request.
#[derive(Debug)]
pub(crate) struct Checkpoints<T> {
    tips: FifoMap<T>,
}

impl<T: Copy + Default> Checkpoints<T> {
    /// Positions from the end of a walk that get a checkpoint: the last blocks, then
    /// exponentially further back (a continuation may re-render the end of its source).
    const BACK: [usize; 8] = [0, 1, 2, 4, 8, 16, 32, 64];

    /// An empty book remembering at most `cap` checkpoints.
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            tips: FifoMap::new(cap),
        }
    }

    /// The request that left a checkpoint on `hash`, if one did.
    #[inline]
    pub(crate) fn get(&self, hash: &BlockHash) -> Option<T> {
        self.tips.get(hash)
    }

    /// A request's walk of `len` blocks ended: leaves `tip` on its checkpoint positions whose
    /// block it newly cached. `block(i)` is the hash of the walk's `i`th block and whether the
    /// walk cached it. The oldest checkpoints beyond the cap are forgotten.
    pub(crate) fn leave(&mut self, len: usize, block: impl Fn(usize) -> (BlockHash, bool), tip: T) {
        for back in Self::BACK {
            let Some(i) = len.checked_sub(back + 1) else {
                break;
            };
            let (hash, new) = block(i);
            if new {
                self.tips.insert(hash, tip);
            }
        }
        self.tips.trim();
    }
}

/// The earlier requests already counted as continued (each counts once), the most recent
/// `cap` of them.
#[derive(Debug)]
pub(crate) struct Credits {
    seen: AHashSet<u64>,
    order: VecDeque<u64>,
    cap: usize,
}

impl Credits {
    /// An empty set remembering at most `cap` requests.
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            seen: AHashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    /// Counts `request` as continued; false if it already was.
    pub(crate) fn credit(&mut self, request: u64) -> bool {
        if !self.seen.insert(request) {
            return false;
        }
        self.order.push_back(request);
        if self.order.len() > self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }
}

/// The median of the last [`GapMedian::WINDOW`] continuation gaps, recomputed once a tenth of
/// the window is new (0 until the first gap).
#[derive(Debug, Default)]
pub(crate) struct GapMedian {
    gaps: VecDeque<u64>,
    since_median: usize,
    median: u64,
}

impl GapMedian {
    /// Gaps the median is taken over.
    const WINDOW: usize = 4096;

    /// One more continuation, `gap` clock ticks after its source.
    pub(crate) fn record(&mut self, gap: u64) {
        self.gaps.push_back(gap);
        if self.gaps.len() > Self::WINDOW {
            self.gaps.pop_front();
        }
        self.since_median += 1;
        if self.median == 0 || self.since_median * 10 >= self.gaps.len() {
            let mut sorted: Vec<u64> = self.gaps.iter().copied().collect();
            sorted.sort_unstable();
            self.median = sorted[sorted.len() / 2];
            self.since_median = 0;
        }
    }

    /// The median gap (0 before any).
    #[inline]
    pub(crate) fn get(&self) -> u64 {
        self.median
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_sit_on_new_blocks_at_the_end_and_the_oldest_go_first() {
        let mut c = Checkpoints::new(4);
        let hash = |i: usize| BlockHash(i as u128 + 1);
        // A 10-block walk that cached blocks 5.. : positions 9, 8, 7, 5 are checkpoints
        // (back 0, 1, 2, 4); position 1 (back 8) was not newly cached.
        c.leave(10, |i| (hash(i), i >= 5), 'a');
        assert_eq!(c.get(&hash(9)), Some('a'));
        assert_eq!(c.get(&hash(5)), Some('a'));
        assert_eq!(c.get(&hash(6)), None);
        assert_eq!(c.get(&hash(1)), None);
        // Four more checkpoints push the first four out; an existing one is overwritten.
        c.leave(1, |_| (hash(100), true), 'b');
        assert_eq!(c.get(&hash(9)), None, "oldest forgotten beyond the cap");
        assert_eq!(c.get(&hash(8)), Some('a'));
        assert_eq!(c.get(&hash(100)), Some('b'));
        c.leave(1, |_| (hash(8), true), 'c');
        assert_eq!(c.get(&hash(8)), Some('c'));
    }

    #[test]
    fn a_request_is_credited_once_while_remembered() {
        let mut c = Credits::new(2);
        assert!(c.credit(1));
        assert!(!c.credit(1));
        assert!(c.credit(2));
        assert!(c.credit(3));
        assert!(c.credit(1), "forgotten beyond the cap");
    }

    #[test]
    fn the_median_follows_the_window() {
        let mut g = GapMedian::default();
        assert_eq!(g.get(), 0);
        g.record(10);
        assert_eq!(g.get(), 10);
        for _ in 0..10 {
            g.record(100);
        }
        assert_eq!(g.get(), 100);
    }
}
