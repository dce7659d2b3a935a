//! [`write_kv`]: append new tokens' K/V into the paged cache through a slot mapping.

use kvc_core::{PagedLayout, SlotMapping};

use crate::elem::KvElem;
use crate::error::{ShapeError, check_cache, check_len};

/// Writes token `i`'s K and V (`key` and `value` are `[tokens, kv_heads, head_dim]`) into
/// the slot `slots` gives it; tokens mapped to `-1` are skipped. The copy is exact (no
/// conversion). Checked before anything is written.
pub fn write_kv<T: KvElem>(
    layout: &PagedLayout,
    cache: &mut [T],
    slots: &SlotMapping,
    key: &[T],
    value: &[T],
) -> Result<(), ShapeError> {
    check_cache("cache", cache.len(), layout.len())?;
    if slots.block_size() != layout.block_size() {
        return Err(ShapeError::SlotMismatch {
            mapping: slots.block_size(),
            layout: layout.block_size(),
        });
    }
    let d = layout.head_dim() as usize;
    let kvh = layout.kv_heads();
    let per_token = u64::from(kvh) * d as u64;
    let expected = slots.len() as u64 * per_token;
    check_len("key", key.len(), expected)?;
    check_len("value", value.len(), expected)?;
    // Slots were checked against a pool of the same block size; check this pool's size too.
    let total = u64::from(layout.num_blocks()) * u64::from(layout.block_size());
    if let Some(token) = slots
        .raw()
        .iter()
        .position(|&s| s >= 0 && s as u64 >= total)
    {
        return Err(ShapeError::SlotOutOfPool {
            token,
            slot: slots.raw()[token],
            slots: total,
        });
    }
    for token in 0..slots.len() {
        let Some((block, pos)) = slots.get(token) else {
            continue;
        };
        for h in 0..kvh {
            let src = (token as u64 * per_token + u64::from(h) * d as u64) as usize;
            for (kv, data) in [(0, key), (1, value)] {
                let dst = layout.offset(block, kv, h, pos) as usize;
                cache[dst..dst + d].copy_from_slice(&data[src..src + d]);
            }
        }
    }
    Ok(())
}
