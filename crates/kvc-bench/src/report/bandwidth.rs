//! CPU kernel bandwidth against the machine's read bandwidth, measured in the same run: a
//! rayon streaming sum over a buffer as large as the KV (the probe), and `kvc_kernels`'
//! public [`paged_decode`] over the same bytes of bf16 KV in randomly permuted blocks (paged)
//! and in order (contiguous), on buffers that ask for transparent huge pages as an engine's
//! KV pool would, plus paged on ordinary pages; all four take turns run by run.

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
    /// the buffers ask for huge pages with `madvise`, which only `never` refuses.
    pub huge_pages: String,
    /// Read bandwidth of the streaming-sum probe over `kv_bytes`, bytes per second.
    pub read_bytes_per_s: f64,
    /// Paged decode (blocks in a random order), KV bytes per second.
    pub paged_bytes_per_s: f64,
    /// The same kernel with blocks in order, KV bytes per second.
    pub contiguous_bytes_per_s: f64,
    /// Paged decode on KV that did not ask for huge pages, KV bytes per second.
    pub paged_small_pages_bytes_per_s: f64,
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

/// `len` values of `f(i)` in a buffer that first asks the kernel for transparent huge pages
/// when `huge` (as an engine would for its KV pool: decode reads 4 KiB runs scattered over the
/// pool, and on 4 KiB pages each run is also a TLB miss).
fn filled<T>(len: usize, huge: bool, f: impl Fn(usize) -> T) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    if huge {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let end = start + len * std::mem::size_of::<T>();
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if b > a {
            // SAFETY: [a, b) lies inside `v`'s allocation, which nothing has touched yet;
            // madvise only changes how the kernel backs those pages. A refusal (huge pages
            // off) leaves ordinary pages, which is fine.
            let _ = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = huge;
    v.extend((0..len).map(f));
    v
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
    fn new(shape: DecodeShape, shuffled: bool, huge: bool) -> Result<Self, ReportError> {
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
        let len = usize::try_from(layout.len()).map_err(kernel_err)?;
        let cache: Vec<bf16> = filled(len, huge, |i| {
            bf16::from_f32(((i % 61) as f32 - 30.0) / 32.0)
        });
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

/// Measures paged decode and contiguous decode on KV that asked for huge pages, paged decode
/// on ordinary pages, and the read probe over the same bytes, taking turns run by run (after
/// one warm-up each) so that load from elsewhere falls on all four alike; reports each one's
/// median.
pub(crate) fn run(shape: DecodeShape, runs: usize) -> Result<BandwidthResult, ReportError> {
    let runs = runs.max(1);
    let mut paged = Decode::new(shape, true, true)?;
    let mut contiguous = Decode::new(shape, false, true)?;
    let mut small_pages = Decode::new(shape, true, false)?;
    let kv_bytes = paged.bytes();
    let words: Vec<u64> = filled(
        usize::try_from(kv_bytes / 8).map_err(kernel_err)?,
        true,
        |i| i as u64,
    );
    let mut t = [const { Vec::new() }; 4];
    // Run 0 is the warm-up, not recorded.
    for r in 0..=runs {
        for (i, d) in [&mut paged, &mut contiguous, &mut small_pages]
            .into_iter()
            .enumerate()
        {
            let start = Instant::now();
            d.run()?;
            if r > 0 {
                t[i].push(start.elapsed().as_secs_f64());
            }
        }
        let start = Instant::now();
        sum(&words);
        if r > 0 {
            t[3].push(start.elapsed().as_secs_f64());
        }
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
        read_bytes_per_s: rate(&mut t[3]),
        paged_bytes_per_s: rate(&mut t[0]),
        contiguous_bytes_per_s: rate(&mut t[1]),
        paged_small_pages_bytes_per_s: rate(&mut t[2]),
    })
}
