//! The free block queue behaviours vLLM v1 tests (`FreeKVCacheBlockQueue`: initial order,
//! pop from the head, removal from the middle, append at the tail, batch pops and appends),
//! re-expressed against [`BlockPool`]'s free list. Each test observes the list's order by
//! allocating from its head until it is empty.
//!
//! One difference by design: vLLM's queue also holds cached blocks (a pop may evict one);
//! here cached blocks stay allocated (the cache holds a reference) until the prefix cache
//! evicts them, so the free list holds only blocks nobody holds.

use kvc_alloc::{AllocError, BlockPool, PoolConfig};
use kvc_core::{BlockAllocator, BlockId, RefError, RegionId};

const D: RegionId = RegionId::DYNAMIC;

fn pool(blocks: u64) -> BlockPool {
    BlockPool::new(PoolConfig::new(blocks)).unwrap()
}

fn ids(list: &[u32]) -> Vec<BlockId> {
    list.iter().copied().map(BlockId).collect()
}

/// The free list's order: every free block allocated from the head (the pool is left empty).
fn drain(p: &mut BlockPool) -> Vec<BlockId> {
    let mut order = Vec::new();
    while let Ok(b) = p.allocate(D) {
        order.push(b);
    }
    assert_eq!(p.free_blocks(D), Ok(0));
    order
}

// vLLM `test_free_kv_cache_block_queue_initialization`: a new queue holds every block in id
// order, head to tail.
#[test]
fn a_new_pool_hands_out_blocks_in_id_order() {
    let mut p = pool(6);
    assert_eq!(p.free_blocks(D), Ok(6));
    assert_eq!(drain(&mut p), ids(&[0, 1, 2, 3, 4, 5]));
    p.audit().unwrap();
}

// vLLM `test_free_kv_cache_block_queue_operations`: pop from the head, remove from the
// middle, append at the tail, and the count follows each.
#[test]
fn pop_head_remove_middle_append_tail() {
    let mut p = pool(5);
    // Pop the head.
    assert_eq!(p.allocate(D), Ok(BlockId(0)));
    assert_eq!(p.free_blocks(D), Ok(4));
    // Remove from the middle: the physical successor of 2 is taken out of the list wherever
    // it is (allocate_after; vLLM's `remove`).
    assert_eq!(p.allocate_after(D, Some(BlockId(2))), Ok(BlockId(3)));
    assert_eq!(p.free_blocks(D), Ok(3));
    // Append at the tail: a freed block goes last.
    assert_eq!(p.release(BlockId(0)).map(|r| r.is_freed()), Ok(true));
    assert_eq!(p.free_blocks(D), Ok(4));
    assert_eq!(drain(&mut p), ids(&[1, 2, 4, 0]));
    p.audit().unwrap();
}

// vLLM `test_free_kv_cache_block_queue_append_n`: blocks freed in one batch join the tail in
// the batch's order, after those freed before.
#[test]
fn a_batch_release_appends_in_batch_order() {
    let mut p = pool(6);
    let all = drain(&mut p);
    assert!(p.release(all[4]).unwrap().is_freed());
    assert_eq!(p.release_each(&ids(&[2, 0, 5])), Ok(3));
    assert_eq!(p.release_many(&ids(&[3, 1])), Ok(2));
    assert_eq!(drain(&mut p), ids(&[4, 2, 0, 5, 3, 1]));
    p.audit().unwrap();
}

// vLLM `test_free_kv_cache_block_queue_popleft_n`: a batch pop takes blocks from the head in
// order. Differs by design: each block of the batch prefers the physical successor of the
// one before it (contiguous runs for the kernels), wherever it sits in the list.
#[test]
fn a_batch_allocation_takes_the_head_and_then_physical_successors() {
    let mut p = pool(8);
    let all = drain(&mut p);
    // Free list: 6, 2, 3, 0, 7.
    for i in [6, 2, 3, 0, 7] {
        assert!(p.release(all[i]).unwrap().is_freed());
    }
    let mut out = Vec::new();
    p.allocate_many(D, 3, &mut out).unwrap();
    // 6 (head), then 7 (6's successor, from the tail), then the head again: 2.
    assert_eq!(out, ids(&[6, 7, 2]));
    // Continuing the same run: 3 follows 2.
    p.allocate_many(D, 1, &mut out).unwrap();
    assert_eq!(out, ids(&[6, 7, 2, 3]));
    assert_eq!(drain(&mut p), ids(&[0]));
    p.audit().unwrap();
}

// vLLM's `popleft_n` asserts there are enough blocks; here asking for more than are free is a
// typed error and takes nothing.
#[test]
fn a_batch_allocation_larger_than_the_free_list_takes_nothing() {
    let mut p = pool(4);
    let mut out = vec![p.allocate(D).unwrap()];
    assert_eq!(
        p.allocate_many(D, 4, &mut out),
        Err(AllocError::OutOfBlocks {
            region: D,
            requested: 4,
            free: 3
        })
    );
    assert_eq!(out, ids(&[0]));
    assert_eq!(p.free_blocks(D), Ok(3));
    assert_eq!(drain(&mut p), ids(&[1, 2, 3]));
}

// vLLM frees a block only when its reference count reaches 0 (`ref_cnt`); a shared block
// joins the free list on its last release, and a release past that is an error.
#[test]
fn a_shared_block_joins_the_free_list_on_its_last_release() {
    let mut p = pool(3);
    let b = p.allocate(D).unwrap();
    assert_eq!(p.retain(b), Ok(2));
    assert!(!p.release(b).unwrap().is_freed());
    assert_eq!(p.free_blocks(D), Ok(2));
    assert!(p.release(b).unwrap().is_freed());
    assert_eq!(p.release(b), Err(RefError::NotAllocated { block: b }));
    assert_eq!(drain(&mut p), ids(&[1, 2, 0]));
}
