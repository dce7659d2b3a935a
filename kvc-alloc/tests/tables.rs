//! Block tables under edge cases: token counts that would overflow, and forks that must take
//! their own references.

use kvc_alloc::{AllocError, BlockPool, BlockTable, ChunkedBlockTable, PoolConfig, TableError};
use kvc_core::{BlockAllocator, RefError, RegionId};

const D: RegionId = RegionId::DYNAMIC;

#[test]
fn a_block_table_append_that_overflows_the_token_count_changes_nothing() {
    let mut pool = BlockPool::new(PoolConfig::new(8)).unwrap();
    let mut table = BlockTable::new(16);
    table.append_tokens(&mut pool, D, 20).unwrap();
    let free = pool.free_blocks(D).unwrap();
    assert_eq!(
        table.append_tokens(&mut pool, D, u64::MAX),
        Err(AllocError::TooManyTokens {
            tokens: 20,
            extra: u64::MAX
        })
    );
    assert_eq!(table.num_tokens(), 20);
    assert_eq!(table.num_blocks(), 2);
    assert_eq!(pool.free_blocks(D), Ok(free));
    assert_eq!(table.blocks_needed(u64::MAX), usize::MAX);
    table.release_all(&mut pool).unwrap();
    assert_eq!(pool.free_blocks(D), Ok(8));
}

#[test]
fn a_chunked_table_append_that_overflows_the_token_count_changes_nothing() {
    let mut pool = BlockPool::new(PoolConfig::new(8)).unwrap();
    let mut table = ChunkedBlockTable::new(16);
    let _ = table.append_tokens(&mut pool, D, 20).unwrap();
    let free = pool.free_blocks(D).unwrap();
    let err = table.append_tokens(&mut pool, D, u64::MAX).unwrap_err();
    assert_eq!(
        err,
        TableError::Alloc(AllocError::TooManyTokens {
            tokens: 20,
            extra: u64::MAX
        })
    );
    assert_eq!((table.num_tokens(), table.num_blocks()), (20, 2));
    assert_eq!(pool.free_blocks(D), Ok(free));
    table.release(&mut pool).unwrap();
    assert_eq!(pool.free_blocks(D), Ok(8));
}

#[test]
fn a_forked_block_table_holds_its_own_references() {
    let mut pool = BlockPool::new(PoolConfig::new(8)).unwrap();
    let mut table = BlockTable::new(4);
    table.append_tokens(&mut pool, D, 10).unwrap();
    let mut fork = table.fork(&mut pool).unwrap();
    assert_eq!(fork, table);
    for &b in table.blocks() {
        assert_eq!(pool.refcount(b), Ok(2));
    }
    // Releasing one keeps the other's blocks allocated; releasing both frees them.
    table.release_all(&mut pool).unwrap();
    assert_eq!(pool.free_blocks(D), Ok(5));
    fork.release_all(&mut pool).unwrap();
    assert_eq!(pool.free_blocks(D), Ok(8));
    pool.audit().unwrap();
}

#[test]
fn a_fork_of_a_table_with_a_released_block_takes_nothing() {
    let mut pool = BlockPool::new(PoolConfig::new(8)).unwrap();
    let mut table = BlockTable::new(4);
    table.append_tokens(&mut pool, D, 12).unwrap();
    let last = table.blocks()[2];
    // Released behind the table's back: the fork must fail and give back what it took.
    assert_eq!(pool.release(last), Ok(kvc_core::Released::Freed));
    assert_eq!(
        table.fork(&mut pool),
        Err(RefError::NotAllocated { block: last })
    );
    assert_eq!(pool.refcount(table.blocks()[0]), Ok(1));
    assert_eq!(pool.refcount(table.blocks()[1]), Ok(1));
    pool.retain(last).unwrap_err();
    assert!(table.release_all(&mut pool).is_err());
    assert_eq!(pool.free_blocks(D), Ok(8));
}

#[test]
fn a_chunked_fork_shares_references_through_its_chunks() {
    let mut pool = BlockPool::new(PoolConfig::new(16)).unwrap();
    let mut table = ChunkedBlockTable::new(4);
    let _ = table.append_tokens(&mut pool, D, 8).unwrap();
    let mut fork = table.fork();
    // Released in either order, the blocks are freed exactly once.
    table.release(&mut pool).unwrap();
    assert_eq!(
        pool.free_blocks(D),
        Ok(14),
        "the fork still holds the chunk"
    );
    fork.release(&mut pool).unwrap();
    assert_eq!(pool.free_blocks(D), Ok(16));
    pool.audit().unwrap();
}

#[test]
fn a_forked_block_table_copies_its_shared_last_block_on_write() {
    let mut pool = BlockPool::new(PoolConfig::new(8)).unwrap();
    let mut prompt = BlockTable::new(16);
    prompt.append_tokens(&mut pool, D, 40).unwrap(); // 3 blocks, the last holds 8 tokens
    let shared = prompt.blocks()[2];
    let mut sample = prompt.fork(&mut pool).unwrap();

    let copy = sample
        .make_last_writable(&mut pool, D)
        .unwrap()
        .expect("the last block is shared and partly filled");
    assert_eq!(copy.src, shared);
    assert_eq!(sample.blocks()[2], copy.dst);
    assert_eq!(prompt.blocks()[2], shared);
    assert_eq!(pool.refcount(shared), Ok(1));
    assert_eq!(pool.refcount(copy.dst), Ok(1));
    // Both tables now own their last block: no further copy.
    assert_eq!(sample.make_last_writable(&mut pool, D), Ok(None));
    assert_eq!(prompt.make_last_writable(&mut pool, D), Ok(None));

    sample.release_all(&mut pool).unwrap();
    prompt.release_all(&mut pool).unwrap();
    assert_eq!(pool.free_blocks(D), Ok(8));
    pool.audit().unwrap();
}

#[test]
fn a_block_table_copies_nothing_at_a_block_boundary_and_fails_cleanly_when_full() {
    let mut pool = BlockPool::new(PoolConfig::new(3)).unwrap();
    let mut empty = BlockTable::new(16);
    assert_eq!(empty.make_last_writable(&mut pool, D), Ok(None));

    let mut full = BlockTable::new(16);
    full.append_tokens(&mut pool, D, 16).unwrap();
    let mut fork = full.fork(&mut pool).unwrap();
    // Block-aligned: the next token goes to a fresh block, nothing shared is written.
    assert_eq!(fork.make_last_writable(&mut pool, D), Ok(None));
    fork.release_all(&mut pool).unwrap();
    full.release_all(&mut pool).unwrap();

    let mut prompt = BlockTable::new(16);
    prompt.append_tokens(&mut pool, D, 40).unwrap(); // takes all 3 blocks
    let mut sample = prompt.fork(&mut pool).unwrap();
    let before = sample.blocks().to_vec();
    assert!(matches!(
        sample.make_last_writable(&mut pool, D),
        Err(kvc_core::CowError::Alloc(AllocError::OutOfBlocks { .. }))
    ));
    assert_eq!(sample.blocks(), &before[..]);
    assert_eq!(pool.refcount(before[2]), Ok(2));
    sample.release_all(&mut pool).unwrap();
    prompt.release_all(&mut pool).unwrap();
    pool.audit().unwrap();
}

/// `release_all` hands the table to `BlockAllocator::release_each`: the pool's one-pass
/// override and the trait's default (through a `&SharedBlockPool`) give the same error, the
/// same freed blocks and the same free-list order, the blocks after a bad one included.
#[test]
fn release_all_releases_past_an_error_through_the_pool_and_the_default() {
    let setup = || {
        let mut pool = BlockPool::new(PoolConfig::new(8)).unwrap();
        let mut table = BlockTable::new(4);
        table.append_tokens(&mut pool, D, 20).unwrap();
        let (shared, bad) = (table.blocks()[0], table.blocks()[2]);
        pool.retain(shared).unwrap(); // a second owner: stays allocated
        assert_eq!(pool.release(bad), Ok(kvc_core::Released::Freed));
        (pool, table, shared, bad)
    };
    let (mut pool, mut table, shared, bad) = setup();
    assert_eq!(
        table.release_all(&mut pool),
        Err(RefError::NotAllocated { block: bad })
    );
    assert_eq!(table.num_blocks(), 0);
    assert_eq!(pool.refcount(shared), Ok(1));
    assert_eq!(pool.free_blocks(D), Ok(7));

    let (pool_b, mut table_b, _, _) = setup();
    let shared_pool = kvc_alloc::SharedBlockPool::new(pool_b);
    assert_eq!(
        table_b.release_all(&mut &shared_pool),
        Err(RefError::NotAllocated { block: bad })
    );
    assert_eq!(table_b.num_blocks(), 0);
    // The same free-list order: the same blocks handed out next, in the same order.
    let mut next_a = Vec::new();
    let mut next_b = Vec::new();
    pool.allocate_many(D, 7, &mut next_a).unwrap();
    shared_pool.allocate_many(D, 7, &mut next_b).unwrap();
    assert_eq!(next_a, next_b);
}

/// `push_blocks` leaves a table as one `push_block` per block does, past the table's inline
/// capacity and from an empty slice: the same blocks, the same room for tokens, and the same
/// releases.
#[test]
fn push_blocks_is_push_block_per_block() {
    let mut pool = BlockPool::new(PoolConfig::new(32)).unwrap();
    let mut blocks = Vec::new();
    pool.allocate_many(D, 20, &mut blocks).unwrap();
    pool.retain_many(&blocks).unwrap(); // a reference for each table
    let (mut one_by_one, mut batched) = (BlockTable::new(4), BlockTable::new(4));
    for chunk in [&blocks[..3], &blocks[3..3], &blocks[3..12], &blocks[12..]] {
        for &b in chunk {
            one_by_one.push_block(b);
        }
        batched.push_blocks(chunk);
        assert_eq!(batched, one_by_one);
        let tokens = 4 * batched.num_blocks() as u64 - batched.num_tokens();
        assert_eq!(batched.advance(tokens), one_by_one.advance(tokens));
        assert_eq!(batched, one_by_one);
    }
    assert_eq!(batched.blocks(), &blocks[..]);
    assert_eq!(batched.release_all(&mut pool), Ok(()));
    assert_eq!(one_by_one.release_all(&mut pool), Ok(()));
    assert_eq!(pool.free_blocks(D), Ok(32));
}
