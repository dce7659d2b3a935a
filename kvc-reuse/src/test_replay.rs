//! Test support: replays requests given as chains of block ids through a [`PrefixCache`] with
//! any eviction policy, the way an engine would (look up, insert, release, evict down to
//! capacity), so policy tests compare hit counts side by side.

use kvc_core::BlockId;

use crate::policy::EvictionPolicy;
use crate::{BlockHash, PrefixCache};

/// Replays `requests` (each a list of block ids, chained into hashes) through a cache of
/// `capacity` blocks of `block_size` tokens under `policy`, a request at a time; returns the
/// hit blocks.
pub(crate) fn replay(
    requests: &[Vec<u32>],
    capacity: usize,
    block_size: u32,
    policy: Box<dyn EvictionPolicy>,
) -> usize {
    let mut cache = PrefixCache::with_policy(block_size, policy);
    let (mut hits, mut next, mut free) = (0, 0u32, Vec::new());
    for (t, r) in requests.iter().enumerate() {
        let mut parent = 0u128;
        let hashes: Vec<BlockHash> = r
            .iter()
            .map(|&id| {
                parent = parent.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (u128::from(id) + 1);
                BlockHash(parent)
            })
            .collect();
        let prompt_tokens = hashes.len() * block_size as usize + 1;
        let hit = cache.lookup(&hashes, prompt_tokens, t as u64);
        hits += hit.blocks.len();
        let mut blocks = hit.blocks.clone();
        while blocks.len() < hashes.len() {
            blocks.push(free.pop().unwrap_or_else(|| {
                next += 1;
                BlockId(next - 1)
            }));
        }
        let mut newly = Vec::new();
        cache
            .insert(&hashes, &blocks, t as u64, &mut newly)
            .unwrap();
        cache.release(&hit.blocks).unwrap();
        cache.release(&newly).unwrap();
        for b in &blocks[hit.blocks.len()..] {
            if !newly.contains(b) {
                free.push(*b);
            }
        }
        if cache.len() > capacity {
            cache.evict(cache.len() - capacity, t as u64, &mut free);
        }
    }
    hits
}
