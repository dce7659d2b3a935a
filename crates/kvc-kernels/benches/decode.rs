//! CPU decode bandwidth: paged decode over ≥ 256 MiB of KV, the same kernel on a contiguous
//! layout (the paged-overhead ratio), and the machine's read bandwidth measured in the same
//! run (a rayon streaming sum over 512 MiB, timed in turn with the decodes), one line a case.
//!
//! Run: `cargo bench -p kvc-kernels --bench decode` (arguments, such as the criterion ones
//! `cargo xtask bench` passes, are ignored).
#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::time::Instant;

use half::bf16;
use kvc_core::{BlockId, PageTable, PagedLayout};
use kvc_kernels::{AttnParams, DecodeOptions, KvElem, paged_decode};
use rayon::prelude::*;

const RUNS: usize = 9;

/// The median of `RUNS` timed runs of each of `fs`, run in turn (ABCABC…) so that load from
/// elsewhere on the machine falls on all of them alike.
#[allow(clippy::needless_range_loop)] // r indexes the run of every closure
fn interleaved<const N: usize>(fs: &mut [&mut dyn FnMut(); N]) -> [f64; N] {
    for f in fs.iter_mut() {
        f();
    }
    let mut t = [[0f64; RUNS]; N];
    for r in 0..RUNS {
        for (i, f) in fs.iter_mut().enumerate() {
            let start = Instant::now();
            f();
            t[i][r] = start.elapsed().as_secs_f64();
        }
    }
    t.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[RUNS / 2]
    })
}

/// A parallel sum over `words`: the machine's streaming read bandwidth.
fn sum(words: &[u64]) {
    let s: u64 = words
        .par_chunks(1 << 16)
        .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
        .reduce(|| 0, u64::wrapping_add);
    black_box(s);
}

struct Case {
    batch: u32,
    len: u32,
    q_heads: u32,
    kv_heads: u32,
}

/// A decode batch over its own pool: pages in a random order, or each sequence's pages
/// adjacent and in order (`contiguous`).
struct Setup<T> {
    layout: PagedLayout,
    cache: Vec<T>,
    table: PageTable,
    q: Vec<T>,
    out: Vec<f32>,
    lse: Vec<f32>,
    params: AttnParams,
}

impl<T: KvElem> Setup<T> {
    fn new(c: &Case, contiguous: bool) -> Self {
        let (bs, d) = (16u32, 128u32);
        let pages = c.len.div_ceil(bs);
        let num_blocks = c.batch * pages;
        let layout = PagedLayout::hnd(num_blocks, c.kv_heads, bs, d).expect("layout");
        let mut ids: Vec<u32> = (0..num_blocks).collect();
        if !contiguous {
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            for i in (1..ids.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ids.swap(i, (x % (i as u64 + 1)) as usize);
            }
        }
        let indptr: Vec<u32> = (0..=c.batch).map(|s| s * pages).collect();
        let table = PageTable::for_decode(
            indptr,
            ids.into_iter().map(BlockId).collect(),
            vec![c.len; c.batch as usize],
            &layout,
        )
        .expect("table");
        let cache: Vec<T> = (0..layout.len())
            .map(|i| T::from_f32(((i % 61) as f32 - 30.0) / 32.0))
            .collect();
        let q: Vec<T> = (0..c.batch * c.q_heads * d)
            .map(|i| T::from_f32((i % 7) as f32 / 7.0))
            .collect();
        let rows = (c.batch * c.q_heads) as usize;
        Self {
            layout,
            cache,
            table,
            q,
            out: vec![0f32; rows * d as usize],
            lse: vec![0f32; rows],
            params: AttnParams::new(c.q_heads, d),
        }
    }

    fn bytes(&self) -> f64 {
        (self.layout.len() * T::DTYPE.size_bytes()) as f64
    }

    fn run(&mut self) {
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
        .expect("decode");
        black_box(&self.out);
    }
}

fn case<T: KvElem>(name: &str, c: &Case, words: &[u64]) {
    let mut paged = Setup::<T>::new(c, false);
    let mut contiguous = Setup::<T>::new(c, true);
    let bytes = paged.bytes();
    let [tp, tc, tr] =
        interleaved(
            &mut [&mut || paged.run(), &mut || contiguous.run(), &mut || {
                sum(words)
            }],
        );
    let read = (words.len() * 8) as f64 / tr;
    let (p, q) = (bytes / tp, bytes / tc);
    println!(
        "decode {name} b={} L={} {}q/{}kv d=128, {:.0} MiB KV: read {:.2} GB/s | paged {:.2} GB/s = {:.0}% of read | contiguous {:.2} GB/s = {:.0}% of read | paged/contiguous {:.2}",
        c.batch,
        c.len,
        c.q_heads,
        c.kv_heads,
        bytes / f64::from(1u32 << 20),
        read / 1e9,
        p / 1e9,
        100.0 * p / read,
        q / 1e9,
        100.0 * q / read,
        p / q
    );
}

fn main() {
    let threads = rayon::current_num_threads();
    let words: Vec<u64> = (0..(512usize << 20) / 8).map(|i| i as u64).collect();
    println!(
        "CPU decode, {threads} threads; medians of {RUNS} runs, paged, contiguous and a rayon sum of 512 MiB (the read bandwidth) taking turns"
    );
    case::<bf16>(
        "bf16",
        &Case {
            batch: 8,
            len: 8192,
            q_heads: 32,
            kv_heads: 8,
        },
        &words,
    );
    case::<bf16>(
        "bf16",
        &Case {
            batch: 8,
            len: 8192,
            q_heads: 8,
            kv_heads: 8,
        },
        &words,
    );
    case::<f32>(
        "f32",
        &Case {
            batch: 4,
            len: 8192,
            q_heads: 32,
            kv_heads: 8,
        },
        &words,
    );
}
