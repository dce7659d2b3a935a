//! CPU kernel bandwidth against the machine's read bandwidth, measured in the same run: a
//! rayon streaming sum over a buffer as large as the KV (the probe), and `kvc_kernels`'
//! public [`paged_decode`] over the same bytes of bf16 KV in randomly permuted blocks (paged)
//! and in order (contiguous), on buffers that ask for transparent huge pages as an engine's
//! KV pool would, plus paged on ordinary pages; all four take turns run by run.

use std::time::Instant;

use crate::kernel_kit::{DecodeBatch, PageOrder, filled, read_probe};
use half::bf16;
use serde::Serialize;

use super::{ReportError, machine};

/// The decode shape measured.
pub use crate::kernel_kit::DecodeShape;

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

fn kernel_err(e: impl std::fmt::Display) -> ReportError {
    ReportError::Kernel(e.to_string())
}

/// Measures paged decode and contiguous decode on KV that asked for huge pages, paged decode
/// on ordinary pages, and the read probe over the same bytes, taking turns run by run (after
/// one warm-up each) so that load from elsewhere falls on all four alike; reports each one's
/// median.
pub(crate) fn run(shape: DecodeShape, runs: usize) -> Result<BandwidthResult, ReportError> {
    let runs = runs.max(1);
    let batch = |order, huge| DecodeBatch::<bf16>::new(shape, order, huge);
    let mut paged = batch(PageOrder::Shuffled, true).map_err(kernel_err)?;
    let mut contiguous = batch(PageOrder::InOrder, true).map_err(kernel_err)?;
    let mut small_pages = batch(PageOrder::Shuffled, false).map_err(kernel_err)?;
    let kv_bytes = paged.bytes();
    let words = filled(
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
            d.run().map_err(kernel_err)?;
            if r > 0 {
                t[i].push(start.elapsed().as_secs_f64());
            }
        }
        let start = Instant::now();
        read_probe(&words);
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
