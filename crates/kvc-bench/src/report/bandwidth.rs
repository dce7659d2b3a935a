//! CPU kernel bandwidth against the machine's read bandwidth, measured in the same run: a
//! rayon streaming sum over a buffer as large as the KV (the probe), and `kvc_kernels`'
//! public [`paged_decode`] over the same bytes of bf16 KV in randomly permuted blocks (paged)
//! and in order (contiguous), taking turns run by run.

use std::hint::black_box;
use std::time::Instant;

use half::bf16;
use kvc_core::{BlockId, PageTable, PagedLayout};
use kvc_kernels::{AttnParams, DecodeOptions, KvElem, paged_decode};
use rayon::prelude::*;
use serde::Serialize;

use super::{ReportError, machine};

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
    /// The kernel's transparent huge page mode (`always`, `madvise`, `never`, or `unknown`):
    /// the buffers are ordinary allocations, so they get huge pages only under `always`.
    pub huge_pages: String,
    /// Read bandwidth of the streaming-sum probe over `kv_bytes`, bytes per second.
    pub read_bytes_per_s: f64,
    /// Paged decode (blocks in a random order), KV bytes per second.
    pub paged_bytes_per_s: f64,
    /// The same kernel with blocks in order, KV bytes per second.
    pub contiguous_bytes_per_s: f64,
}

/// A parallel sum over `words`: the machine's streaming read bandwidth.
fn sum(words: &[u64]) {
    let s: u64 = words
        .par_chunks(1 << 16)
        .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
        .reduce(|| 0, u64::wrapping_add);
    black_box(s);
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

fn kernel_err(e: impl std::fmt::Display) -> ReportError {
    ReportError::Kernel(e.to_string())
}

/// One decode over `shape`, ready to run again and again.
struct Decode {
    layout: PagedLayout,
    table: PageTable,
    cache: Vec<bf16>,
    q: Vec<bf16>,
    out: Vec<f32>,
    lse: Vec<f32>,
    params: AttnParams,
}

impl Decode {
    fn new(shape: DecodeShape, shuffled: bool) -> Result<Self, ReportError> {
        let pages = shape.len.div_ceil(shape.block_size);
        let num_blocks = shape.batch * pages;
        let layout = PagedLayout::hnd(num_blocks, shape.kv_heads, shape.block_size, shape.head_dim)
            .map_err(kernel_err)?;
        let indptr: Vec<u32> = (0..=shape.batch).map(|s| s * pages).collect();
        let table = PageTable::for_decode(
            indptr,
            block_ids(num_blocks, shuffled),
            vec![shape.len; shape.batch as usize],
            &layout,
        )
        .map_err(kernel_err)?;
        let cache: Vec<bf16> = (0..layout.len())
            .map(|i| bf16::from_f32(((i % 61) as f32 - 30.0) / 32.0))
            .collect();
        let q: Vec<bf16> = (0..shape.batch * shape.q_heads * shape.head_dim)
            .map(|i| bf16::from_f32((i % 7) as f32 / 7.0))
            .collect();
        let rows = (shape.batch * shape.q_heads) as usize;
        Ok(Self {
            layout,
            table,
            cache,
            q,
            out: vec![0f32; rows * shape.head_dim as usize],
            lse: vec![0f32; rows],
            params: AttnParams::new(shape.q_heads, shape.head_dim),
        })
    }

    fn bytes(&self) -> u64 {
        self.layout.len() * <bf16 as KvElem>::DTYPE.size_bytes()
    }

    fn run(&mut self) -> Result<(), ReportError> {
        paged_decode(
            &self.layout,
            &self.cache,
            &self.table,
            &self.q,
            self.params,
            DecodeOptions::default(),
            &mut self.out,
            &mut self.lse,
        )
        .map_err(kernel_err)?;
        black_box(&self.out);
        Ok(())
    }
}

/// Measures paged decode, contiguous decode and the read probe over the same bytes, taking
/// turns run by run (after one warm-up each) so that load from elsewhere falls on all three
/// alike; reports each one's median.
pub(crate) fn run(shape: DecodeShape, runs: usize) -> Result<BandwidthResult, ReportError> {
    let runs = runs.max(1);
    let mut paged = Decode::new(shape, true)?;
    let mut contiguous = Decode::new(shape, false)?;
    let kv_bytes = paged.bytes();
    let words: Vec<u64> = (0..kv_bytes / 8).collect();
    paged.run()?;
    contiguous.run()?;
    sum(&words);
    let mut t = [const { Vec::new() }; 3];
    for _ in 0..runs {
        let start = Instant::now();
        paged.run()?;
        t[0].push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        contiguous.run()?;
        t[1].push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        sum(&words);
        t[2].push(start.elapsed().as_secs_f64());
    }
    let rate = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        kv_bytes as f64 / v[v.len() / 2].max(1e-12)
    };
    Ok(BandwidthResult {
        shape,
        kv_bytes,
        threads: rayon::current_num_threads(),
        runs,
        huge_pages: machine::transparent_huge_pages(),
        read_bytes_per_s: rate(&mut t[2]),
        paged_bytes_per_s: rate(&mut t[0]),
        contiguous_bytes_per_s: rate(&mut t[1]),
    })
}
