//! [`HostPool`]: the host-side blocks that preempted sequences are swapped out to, handed
//! out lazily: a large configured pool costs nothing until sequences are swapped into it.

use kvc_core::HostBlockId;

/// Free host blocks: ids never handed out are implicit (`next..capacity`), ids given back
/// are kept in a list.
#[derive(Clone, Debug, Default)]
pub(crate) struct HostPool {
    capacity: u32,
    next: u32,
    returned: Vec<HostBlockId>,
}

impl HostPool {
    /// A pool of `capacity` blocks (at most `u32::MAX`), none handed out.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            next: 0,
            returned: Vec::new(),
        }
    }

    /// Blocks free.
    pub(crate) fn free(&self) -> usize {
        self.returned.len() + (self.capacity - self.next) as usize
    }

    /// Takes one free block.
    pub(crate) fn take(&mut self) -> Option<HostBlockId> {
        if let Some(b) = self.returned.pop() {
            return Some(b);
        }
        (self.next < self.capacity).then(|| {
            self.next += 1;
            HostBlockId(self.next - 1)
        })
    }

    /// Gives blocks back, emptying `blocks`.
    pub(crate) fn give_back(&mut self, blocks: &mut Vec<HostBlockId>) {
        self.returned.append(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_pool_allocates_nothing_up_front_and_reuses_returned_blocks() {
        let mut pool = HostPool::new(usize::MAX);
        assert_eq!(pool.free(), u32::MAX as usize);
        assert_eq!(pool.returned.capacity(), 0);
        let mut taken = vec![pool.take().unwrap(), pool.take().unwrap()];
        assert_eq!(taken, [HostBlockId(0), HostBlockId(1)]);
        pool.give_back(&mut taken);
        assert_eq!(pool.take(), Some(HostBlockId(1)));
        let mut tiny = HostPool::new(1);
        assert!(tiny.take().is_some());
        assert_eq!(tiny.take(), None);
        assert_eq!(tiny.free(), 0);
    }
}
