//! CPU kernel bandwidth against the machine's read bandwidth, measured in the same run: a
//! rayon streaming sum over a buffer as large as the KV (the probe), then `kvc_kernels`'
//! public [`paged_decode`] over the same bytes of bf16 KV in randomly permuted blocks (paged)
//! and in order (contiguous).

use std::hint::black_box;

use half::bf16;
use kvc_core::{BlockId, PageTable, PagedLayout};
use kvc_kernels::{AttnParams, DecodeOptions, KvElem, paged_decode};
use rayon::prelude::*;
use serde::Serialize;

use super::ReportError;
use super::micro::time_batches;

/// The decode shape measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DecodeShape {
    /// Sequences in the batch.
    pub batch: u32,
    /// Context length of each sequence, in tokens.
    pub len: u32,
    /// Query heads.
    pub q_heads: u32,
    /// KV heads.
    pub kv_heads: u32,
    /// Head dimension.
    pub head_dim: u32,
    /// Tokens per block.
    pub block_size: u32,
}

/// What the bandwidth section measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BandwidthResult {
    /// The decode shape.
    pub shape: DecodeShape,
    /// Bytes of KV the decode reads (K and V of every token, bf16).
    pub kv_bytes: u64,
    /// Rayon threads used.
    pub threads: usize,
    /// Timed runs per figure (the median is reported).
    pub runs: usize,
    /// Read bandwidth of the streaming-sum probe over `kv_bytes`, bytes per second.
    pub read_bytes_per_s: f64,
    /// Paged decode (blocks in a random order), KV bytes per second.
    pub paged_bytes_per_s: f64,
    /// The same kernel with blocks in order, KV bytes per second.
    pub contiguous_bytes_per_s: f64,
}

/// Read bandwidth: a parallel sum of `bytes` of u64 words, in bytes per second.
fn read_bandwidth(bytes: u64, runs: usize) -> f64 {
    let words: Vec<u64> = (0..bytes / 8).collect();
    let t = time_batches(runs, 1, || {
        let s: u64 = words
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .reduce(|| 0, u64::wrapping_add);
        black_box(s);
        Ok::<(), ReportError>(())
    });
    match t {
        Ok((median_ns, _)) => bytes as f64 / (median_ns * 1e-9),
        Err(_) => 0.0,
    }
}

/// Block ids in a fixed pseudo-random order (xorshift Fisher–Yates), or in order.
fn block_ids(n: u32, shuffled: bool) -> Vec<BlockId> {
    let mut ids: Vec<u32> = (0..n).collect();
    if shuffled {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for i in (1..ids.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ids.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    ids.into_iter().map(BlockId).collect()
}

/// Paged decode's KV bytes per second over `shape`.
fn decode(shape: DecodeShape, shuffled: bool, runs: usize) -> Result<(u64, f64), ReportError> {
    let pages = shape.len.div_ceil(shape.block_size);
    let num_blocks = shape.batch * pages;
    let layout = PagedLayout::hnd(num_blocks, shape.kv_heads, shape.block_size, shape.head_dim)
        .map_err(|e| ReportError::Kernel(e.to_string()))?;
    let indptr: Vec<u32> = (0..=shape.batch).map(|s| s * pages).collect();
    let table = PageTable::for_decode(
        indptr,
        block_ids(num_blocks, shuffled),
        vec![shape.len; shape.batch as usize],
        &layout,
    )
    .map_err(|e| ReportError::Kernel(e.to_string()))?;
    let cache: Vec<bf16> = (0..layout.len())
        .map(|i| bf16::from_f32(((i % 61) as f32 - 30.0) / 32.0))
        .collect();
    let q: Vec<bf16> = (0..shape.batch * shape.q_heads * shape.head_dim)
        .map(|i| bf16::from_f32((i % 7) as f32 / 7.0))
        .collect();
    let rows = (shape.batch * shape.q_heads) as usize;
    let (mut out, mut lse) = (vec![0f32; rows * shape.head_dim as usize], vec![0f32; rows]);
    let params = AttnParams::new(shape.q_heads, shape.head_dim);
    let (median_ns, _) = time_batches(runs, 1, || {
        paged_decode(
            &layout,
            &cache,
            &table,
            &q,
            params,
            DecodeOptions::default(),
            &mut out,
            &mut lse,
        )
        .map_err(|e| ReportError::Kernel(e.to_string()))?;
        black_box(&out);
        Ok::<(), ReportError>(())
    })?;
    let bytes = layout.len() * <bf16 as KvElem>::DTYPE.size_bytes();
    Ok((bytes, bytes as f64 / (median_ns * 1e-9)))
}

/// Measures decode bandwidth over `shape` and the read probe over the same number of bytes.
pub(crate) fn run(shape: DecodeShape, runs: usize) -> Result<BandwidthResult, ReportError> {
    let (kv_bytes, paged) = decode(shape, true, runs)?;
    let (_, contiguous) = decode(shape, false, runs)?;
    let read = read_bandwidth(kv_bytes, runs);
    Ok(BandwidthResult {
        shape,
        kv_bytes,
        threads: rayon::current_num_threads(),
        runs,
        read_bytes_per_s: read,
        paged_bytes_per_s: paged,
        contiguous_bytes_per_s: contiguous,
    })
}
