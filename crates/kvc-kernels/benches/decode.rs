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

/// `len` values of `f(i)` in a buffer that asks for transparent huge pages first when `huge`
/// (as an engine would for its KV pool): decode reads 4 KiB runs scattered over the pool, and
/// on 4 KiB pages each run is also a TLB miss.
fn filled<T>(len: usize, huge: bool, f: impl Fn(usize) -> T) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    if huge {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let (a, b) = (
            start.next_multiple_of(HUGE),
            (start + len * std::mem::size_of::<T>()) / HUGE * HUGE,
        );
        if b > a {
            // SAFETY: [a, b) lies inside `v`'s untouched allocation; madvise only changes how
            // the kernel backs it. A refusal (THP off) leaves ordinary pages, which is fine.
            let _ = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = huge;
    v.extend((0..len).map(f));
    v
}

impl<T: KvElem> Setup<T> {
    fn new(c: &Case, contiguous: bool, huge: bool) -> Self {
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
        let cache: Vec<T> = filled(layout.len() as usize, huge, |i| {
            T::from_f32(((i % 61) as f32 - 30.0) / 32.0)
        });
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
    let mut paged = Setup::<T>::new(c, false, true);
    let mut contiguous = Setup::<T>::new(c, true, true);
    let mut small_pages = Setup::<T>::new(c, false, false);
    let bytes = paged.bytes();
    let [tp, tc, ts, tr] = interleaved(&mut [
        &mut || paged.run(),
        &mut || contiguous.run(),
        &mut || small_pages.run(),
        &mut || sum(words),
    ]);
    let read = (words.len() * 8) as f64 / tr;
    let (p, q, sp) = (bytes / tp, bytes / tc, bytes / ts);
    println!(
        "decode {name} b={} L={} {}q/{}kv d=128, {:.0} MiB KV: read {:.2} GB/s | paged {:.2} GB/s = {:.0}% of read | contiguous {:.2} GB/s = {:.0}% of read | paged/contiguous {:.2} | paged on 4 KiB pages {:.2} GB/s = {:.0}% of read",
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
        p / q,
        sp / 1e9,
        100.0 * sp / read
    );
}

fn main() {
    let threads = rayon::current_num_threads();
    let words: Vec<u64> = filled((512usize << 20) / 8, true, |i| i as u64);
    println!(
        "CPU decode, {threads} threads; medians of {RUNS} runs of paged, contiguous, paged on 4 KiB pages and a rayon sum of 512 MiB (the read bandwidth) taking turns; KV and sum buffers on transparent huge pages unless said"
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
