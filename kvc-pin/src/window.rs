//! [`PercentileWindow`]: a sliding window of demand observations with O(log n) percentiles.
//!
//! Observations are block counts in `0..=max_value` (larger ones are clamped). A ring of
//! `(time, value)` pairs remembers the order of arrival; a Fenwick tree over the values counts
//! how many observations of each value are in the window. Adding or expiring an observation and
//! reading any percentile are O(log max_value), with no allocation once the ring is full.

use std::collections::VecDeque;

/// A time- and count-bounded window of observations that answers percentile queries.
///
/// ```
/// use kvc_pin::PercentileWindow;
///
/// let mut w = PercentileWindow::new(1_000, 60_000, 100);
/// for t in 0..100u64 {
///     w.push(t, (t % 10) as usize); // values 0..=9, ten of each
/// }
/// assert_eq!(w.len(), 100);
/// assert_eq!(w.percentile(0.5), Some(4));
/// assert_eq!(w.percentile(0.99), Some(9));
/// ```
#[derive(Clone, Debug)]
pub struct PercentileWindow {
    /// Fenwick tree: `tree[i]` (1-based) counts observations of values in a power-of-two range.
    tree: Vec<u32>,
    ring: VecDeque<(u64, u32)>,
    max_value: usize,
    window_ms: u64,
    max_samples: usize,
}

impl PercentileWindow {
    /// The largest `max_value` honoured (16,777,216 blocks): the counts take 4 bytes per value,
    /// so this bounds them at 64 MiB.
    pub const MAX_VALUE: usize = 1 << 24;

    /// A window keeping at most `max_samples` observations, none older than `window_ms`, of
    /// values up to `max_value` (larger values are recorded as `max_value`; `max_value` itself
    /// is capped at [`MAX_VALUE`](Self::MAX_VALUE)). Takes `4 × max_value` bytes of counts.
    #[must_use]
    pub fn new(max_value: usize, window_ms: u64, max_samples: usize) -> Self {
        let max_value = max_value.min(Self::MAX_VALUE);
        Self {
            tree: vec![0; max_value + 2],
            ring: VecDeque::with_capacity(max_samples.clamp(1, 1 << 20)),
            max_value,
            window_ms,
            max_samples: max_samples.max(1),
        }
    }

    /// Observations in the window.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether the window is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// The largest value recorded exactly.
    #[must_use]
    pub fn max_value(&self) -> usize {
        self.max_value
    }

    /// Records `value` at `now_ms`, first dropping observations older than the window and, if
    /// the window is full, the oldest one.
    pub fn push(&mut self, now_ms: u64, value: usize) {
        self.expire(now_ms);
        if self.ring.len() == self.max_samples
            && let Some((_, old)) = self.ring.pop_front()
        {
            self.add(old as usize, Count::Remove);
        }
        let value = value.min(self.max_value);
        // `max_value` fits in u32 (capped in `new`).
        self.ring.push_back((now_ms, value as u32));
        self.add(value, Count::Insert);
    }

    /// Drops observations made `window_ms` or more before `now_ms`: the window is the half-open
    /// interval `(now_ms - window_ms, now_ms]`.
    pub fn expire(&mut self, now_ms: u64) {
        let Some(horizon) = now_ms.checked_sub(self.window_ms) else {
            return;
        };
        while let Some(&(t, v)) = self.ring.front() {
            if t > horizon {
                break;
            }
            self.ring.pop_front();
            self.add(v as usize, Count::Remove);
        }
    }

    /// The nearest-rank `p`-quantile (`p` in 0..=1; 0.99 is the p99) of the window, or `None`
    /// when it is empty. `p` outside 0..=1 is clamped.
    #[must_use]
    pub fn percentile(&self, p: f64) -> Option<usize> {
        let n = self.ring.len();
        if n == 0 {
            return None;
        }
        let p = if p.is_nan() { 1.0 } else { p.clamp(0.0, 1.0) };
        // Nearest rank: the smallest value with at least ceil(p * n) observations at or below.
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        Some(self.lower_bound(rank as u32))
    }

    fn add(&mut self, value: usize, change: Count) {
        let mut i = value + 1;
        while i < self.tree.len() {
            match change {
                Count::Insert => self.tree[i] += 1,
                Count::Remove => self.tree[i] -= 1,
            }
            i += i & i.wrapping_neg();
        }
    }

    /// The smallest value whose cumulative count reaches `rank` (1-based).
    fn lower_bound(&self, mut rank: u32) -> usize {
        let size = self.tree.len() - 1;
        let mut pos = 0;
        let mut step = size.next_power_of_two();
        while step > 0 {
            let next = pos + step;
            if next <= size && self.tree[next] < rank {
                pos = next;
                rank -= self.tree[next];
            }
            step >>= 1;
        }
        // `pos` is the count of values strictly below the answer, i.e. the answer's value.
        pos.min(self.max_value)
    }
}

/// Whether a value enters or leaves the counting tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Count {
    Insert,
    Remove,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(values: &[usize], p: f64) -> usize {
        let mut v = values.to_vec();
        v.sort_unstable();
        let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }

    #[test]
    fn matches_a_sorted_reference() {
        let mut w = PercentileWindow::new(500, u64::MAX, 300);
        let mut all = Vec::new();
        let mut x: u64 = 12345;
        for t in 0..1_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = ((x >> 33) % 600) as usize;
            w.push(t, v);
            all.push(v.min(500));
            let tail = &all[all.len().saturating_sub(300)..];
            for p in [0.0, 0.1, 0.5, 0.9, 0.99, 1.0] {
                assert_eq!(w.percentile(p), Some(naive(tail, p)), "t={t} p={p}");
            }
        }
    }

    #[test]
    fn huge_ranges_are_capped() {
        let mut w = PercentileWindow::new(usize::MAX, 10, 4);
        assert_eq!(w.max_value(), PercentileWindow::MAX_VALUE);
        w.push(0, usize::MAX);
        assert_eq!(w.percentile(0.5), Some(PercentileWindow::MAX_VALUE));
    }

    #[test]
    fn old_observations_leave_the_window() {
        let mut w = PercentileWindow::new(100, 1_000, 10_000);
        w.push(0, 90);
        w.push(500, 10);
        assert_eq!(w.percentile(1.0), Some(90));
        w.push(1_200, 20);
        assert_eq!(w.len(), 2);
        assert_eq!(w.percentile(1.0), Some(20));
        w.expire(10_000);
        assert!(w.is_empty());
        assert_eq!(w.percentile(0.99), None);
    }
}
