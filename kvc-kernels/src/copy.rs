//! Block movement: [`copy_blocks`] (copy-on-write pairs within a pool, all layers in one call)
//! and [`swap_out`] / [`swap_in`] (gather/scatter between the device pool and the host pool,
//! whose blocks are [`HostBlockId`]s).

use kvc_core::{BlockCopy, BlockId, HostBlockId, PagedLayout};
use rayon::prelude::*;

use crate::elem::KvElem;
use crate::error::{ShapeError, check_cache};

pub(crate) fn check_pairs(
    pairs: &[BlockCopy],
    src_blocks: u32,
    dst_blocks: u32,
    same_pool: bool,
) -> Result<(), ShapeError> {
    let mut dsts: Vec<(BlockId, usize)> = Vec::with_capacity(pairs.len());
    for (pair, c) in pairs.iter().enumerate() {
        for (block, num_blocks) in [(c.src, src_blocks), (c.dst, dst_blocks)] {
            if block.get() >= num_blocks {
                return Err(ShapeError::BlockOutOfRange {
                    pair,
                    block,
                    num_blocks,
                });
            }
        }
        dsts.push((c.dst, pair));
    }
    dsts.sort_unstable();
    if let Some(w) = dsts.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(ShapeError::CopyConflict {
            pair: w[1].1,
            block: w[1].0,
        });
    }
    if same_pool {
        for c in pairs {
            if let Ok(i) = dsts.binary_search_by_key(&c.src, |&(b, _)| b) {
                return Err(ShapeError::CopyConflict {
                    pair: dsts[i].1,
                    block: c.src,
                });
            }
        }
    }
    Ok(())
}

/// Every `(offset, len)` run of elements of one block, in the same order for any layout of
/// the same block shape: one run for a contiguous block, else one per head row.
fn block_runs(layout: &PagedLayout, block: u32, runs: &mut Vec<(usize, usize)>) {
    runs.clear();
    if let Some(len) = layout.contiguous_block_len() {
        runs.push((layout.offset(block, 0, 0, 0) as usize, len as usize));
        return;
    }
    let d = layout.head_dim() as usize;
    for kv in 0..2 {
        for h in 0..layout.kv_heads() {
            for t in 0..layout.block_size() {
                runs.push((layout.offset(block, kv, h, t) as usize, d));
            }
        }
    }
}

/// Copies whole blocks (K and V, every head) within a pool, in every layer: `layers[l]` is
/// layer `l`'s cache. Destinations must be distinct and no destination may also be a source,
/// so the result does not depend on order. The copy is exact.
pub fn copy_blocks<T: KvElem>(
    layout: &PagedLayout,
    layers: &mut [&mut [T]],
    pairs: &[BlockCopy],
) -> Result<(), ShapeError> {
    for layer in layers.iter() {
        check_cache("layers", layer.len(), layout.len())?;
    }
    check_pairs(pairs, layout.num_blocks(), layout.num_blocks(), true)?;
    layers.par_iter_mut().for_each(|layer| {
        let (mut src, mut dst) = (Vec::new(), Vec::new());
        for c in pairs {
            block_runs(layout, c.src.get(), &mut src);
            block_runs(layout, c.dst.get(), &mut dst);
            for (&(s, n), &(t, _)) in src.iter().zip(&dst) {
                layer.copy_within(s..s + n, t);
            }
        }
    });
    Ok(())
}

/// One block moved between the device pool and the host pool (out: device to host; in: host
/// to device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockSwap {
    /// The block of the device pool.
    pub device: BlockId,
    /// The block of the host pool.
    pub host: HostBlockId,
}

/// Checks swap pairs against both pools; destinations (host blocks when `out`, device blocks
/// otherwise) must be distinct.
pub(crate) fn check_swaps(
    pairs: &[BlockSwap],
    device_blocks: u32,
    host_blocks: u32,
    out: bool,
) -> Result<(), ShapeError> {
    for (pair, p) in pairs.iter().enumerate() {
        if p.device.get() >= device_blocks {
            return Err(ShapeError::BlockOutOfRange {
                pair,
                block: p.device,
                num_blocks: device_blocks,
            });
        }
        if p.host.get() >= host_blocks {
            return Err(ShapeError::HostBlockOutOfRange {
                pair,
                block: p.host,
                num_blocks: host_blocks,
            });
        }
    }
    let mut dsts: Vec<(u32, usize)> = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| (if out { p.host.get() } else { p.device.get() }, i))
        .collect();
    dsts.sort_unstable();
    if let Some(w) = dsts.windows(2).find(|w| w[0].0 == w[1].0) {
        let pair = w[1].1;
        return Err(if out {
            ShapeError::HostBlockConflict {
                pair,
                block: pairs[pair].host,
            }
        } else {
            ShapeError::CopyConflict {
                pair,
                block: pairs[pair].device,
            }
        });
    }
    Ok(())
}

/// Checks the two sides of a swap: the same block shape, the same number of layers, and
/// layers that span their layouts.
pub(crate) fn check_swap_sides(
    src_layout: &PagedLayout,
    src_layers: &[usize],
    dst_layout: &PagedLayout,
    dst_layers: &[usize],
) -> Result<(), ShapeError> {
    if !src_layout.same_block_shape(dst_layout) {
        return Err(ShapeError::BlockShapeMismatch);
    }
    if src_layers.len() != dst_layers.len() {
        return Err(ShapeError::LayerCount {
            src: src_layers.len(),
            dst: dst_layers.len(),
        });
    }
    for &len in src_layers {
        check_cache("src_layers", len, src_layout.len())?;
    }
    for &len in dst_layers {
        check_cache("dst_layers", len, dst_layout.len())?;
    }
    Ok(())
}

/// Copies block `src` of every `src_layers[l]` to block `dst` of `dst_layers[l]`, per pair.
fn swap_copy<T: KvElem>(
    src_layout: &PagedLayout,
    src_layers: &[&[T]],
    dst_layout: &PagedLayout,
    dst_layers: &mut [&mut [T]],
    blocks: &[(u32, u32)],
) {
    dst_layers
        .par_iter_mut()
        .zip(src_layers.par_iter())
        .for_each(|(dst_layer, src_layer)| {
            let (mut src, mut dst) = (Vec::new(), Vec::new());
            for &(s_block, d_block) in blocks {
                run_pairs(src_layout, s_block, dst_layout, d_block, &mut src, &mut dst);
                for (&(s, n), &(t, _)) in src.iter().zip(&dst) {
                    dst_layer[t..t + n].copy_from_slice(&src_layer[s..s + n]);
                }
            }
        });
}

/// Swap-out: copies device blocks to host blocks in every layer (`pairs[i].device` of
/// `device_layers[l]` to `pairs[i].host` of `host_layers[l]`). The two layouts must share a
/// block shape; their strides and pool sizes may differ. Host blocks must be distinct. The
/// copy is exact; nothing is written when an error is returned.
pub fn swap_out<T: KvElem>(
    device_layout: &PagedLayout,
    device_layers: &[&[T]],
    host_layout: &PagedLayout,
    host_layers: &mut [&mut [T]],
    pairs: &[BlockSwap],
) -> Result<(), ShapeError> {
    let src: Vec<usize> = device_layers.iter().map(|l| l.len()).collect();
    let dst: Vec<usize> = host_layers.iter().map(|l| l.len()).collect();
    check_swap_sides(device_layout, &src, host_layout, &dst)?;
    check_swaps(
        pairs,
        device_layout.num_blocks(),
        host_layout.num_blocks(),
        true,
    )?;
    let blocks: Vec<(u32, u32)> = pairs
        .iter()
        .map(|p| (p.device.get(), p.host.get()))
        .collect();
    swap_copy(
        device_layout,
        device_layers,
        host_layout,
        host_layers,
        &blocks,
    );
    Ok(())
}

/// Swap-in: copies host blocks into device blocks in every layer (`pairs[i].host` of
/// `host_layers[l]` to `pairs[i].device` of `device_layers[l]`). Device blocks must be
/// distinct; otherwise as [`swap_out`].
pub fn swap_in<T: KvElem>(
    host_layout: &PagedLayout,
    host_layers: &[&[T]],
    device_layout: &PagedLayout,
    device_layers: &mut [&mut [T]],
    pairs: &[BlockSwap],
) -> Result<(), ShapeError> {
    let src: Vec<usize> = host_layers.iter().map(|l| l.len()).collect();
    let dst: Vec<usize> = device_layers.iter().map(|l| l.len()).collect();
    check_swap_sides(host_layout, &src, device_layout, &dst)?;
    check_swaps(
        pairs,
        device_layout.num_blocks(),
        host_layout.num_blocks(),
        false,
    )?;
    let blocks: Vec<(u32, u32)> = pairs
        .iter()
        .map(|p| (p.host.get(), p.device.get()))
        .collect();
    swap_copy(
        host_layout,
        host_layers,
        device_layout,
        device_layers,
        &blocks,
    );
    Ok(())
}

/// Runs of a block in two layouts that line up element for element: whole blocks when both
/// are contiguous, head rows otherwise.
pub(crate) fn run_pairs(
    a: &PagedLayout,
    block_a: u32,
    b: &PagedLayout,
    block_b: u32,
    runs_a: &mut Vec<(usize, usize)>,
    runs_b: &mut Vec<(usize, usize)>,
) {
    let same_order = a.strides()[1..] == b.strides()[1..];
    if same_order && a.contiguous_block_len().is_some() && b.contiguous_block_len().is_some() {
        block_runs(a, block_a, runs_a);
        block_runs(b, block_b, runs_b);
        return;
    }
    runs_a.clear();
    runs_b.clear();
    let d = a.head_dim() as usize;
    for kv in 0..2 {
        for h in 0..a.kv_heads() {
            for t in 0..a.block_size() {
                runs_a.push((a.offset(block_a, kv, h, t) as usize, d));
                runs_b.push((b.offset(block_b, kv, h, t) as usize, d));
            }
        }
    }
}
