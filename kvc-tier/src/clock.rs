//! The clock the host and disk tiers rank pinned pages by: the latest time a caller passed
//! (pins are in the engine's clock, in ms), and a queue of when each page's pin runs out.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use kvc_core::Retention;

/// When `retention`, in force at `now_ms`, stops being a pin: `Some(until)` for a priority
/// other than the default that will expire, `None` when nothing will change.
pub(crate) fn expiry(retention: Retention, now_ms: u64) -> Option<u64> {
    retention
        .until
        .filter(|&until| until > now_ms && retention.priority != Retention::DEFAULT_PRIORITY)
}

/// `retention` with its priority held to the documented range (0 to
/// [`Retention::MAX_PRIORITY`]), as the device's prefix cache holds it: a larger number is
/// the highest priority, not one above every pin.
pub(crate) fn clamped(retention: Retention) -> Retention {
    Retention {
        priority: retention.priority.min(Retention::MAX_PRIORITY),
        ..retention
    }
}

/// The latest clock, and the pin expiries queued per page `P`. An expiry whose page was reused
/// or re-pinned since is stale: the caller checks what it pops.
#[derive(Debug)]
pub(crate) struct PinClock<P> {
    now_ms: u64,
    due: BinaryHeap<Reverse<(u64, P)>>,
}

impl<P: Ord + Copy> PinClock<P> {
    pub(crate) fn new() -> Self {
        Self {
            now_ms: 0,
            due: BinaryHeap::new(),
        }
    }

    /// The latest time a caller passed.
    pub(crate) const fn now(&self) -> u64 {
        self.now_ms
    }

    /// Moves the clock to `now_ms`; an older time (or 0) changes nothing.
    pub(crate) fn set(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Queues the pin of `page` running out at `until`.
    pub(crate) fn schedule(&mut self, until: u64, page: P) {
        self.due.push(Reverse((until, page)));
    }

    /// The next queued expiry due by now, `(until, page)`, taken off the queue.
    pub(crate) fn pop_due(&mut self) -> Option<(u64, P)> {
        let &Reverse((until, page)) = self.due.peek()?;
        if until > self.now_ms {
            return None;
        }
        self.due.pop();
        Some((until, page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries_come_due_in_time_order_and_the_clock_never_goes_back() {
        let mut c = PinClock::new();
        c.schedule(30, 'b');
        c.schedule(10, 'a');
        c.schedule(50, 'c');
        c.set(40);
        c.set(5);
        assert_eq!(c.now(), 40);
        assert_eq!(c.pop_due(), Some((10, 'a')));
        assert_eq!(c.pop_due(), Some((30, 'b')));
        assert_eq!(c.pop_due(), None);
        c.set(50);
        assert_eq!(c.pop_due(), Some((50, 'c')));
    }

    #[test]
    fn priorities_above_the_range_are_the_highest() {
        let r = clamped(Retention {
            priority: 250,
            until: Some(7),
        });
        assert_eq!((r.priority, r.until), (Retention::MAX_PRIORITY, Some(7)));
        assert_eq!(clamped(Retention::DEFAULT), Retention::DEFAULT);
    }

    #[test]
    fn only_a_pin_in_force_other_than_the_default_expires() {
        let pin = |priority, until| Retention { priority, until };
        assert_eq!(expiry(pin(90, Some(100)), 50), Some(100));
        assert_eq!(
            expiry(pin(10, Some(100)), 50),
            Some(100),
            "a demotion expires too"
        );
        assert_eq!(expiry(pin(90, Some(100)), 100), None, "already over");
        assert_eq!(expiry(pin(90, None), 50), None, "never expires");
        assert_eq!(
            expiry(pin(Retention::DEFAULT_PRIORITY, Some(100)), 50),
            None
        );
    }
}
