//! CPU decode bandwidth: paged decode over ≥ 256 MiB of KV, the same kernel on a contiguous
//! layout (the paged-overhead ratio), and the machine's read bandwidth measured in the same
//! run (a rayon streaming sum over a buffer as large as the KV), printed as one line each.
//!
//! Run: `cargo bench -p kvc-kernels --bench decode` (optional filter-free; criterion-style
//! arguments from `cargo xtask bench` are ignored).
#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::time::Instant;

use half::bf16;
use kvc_core::{BlockId, PageTable, PagedLayout};
use kvc_kernels::{AttnParams, DecodeOptions, KvElem, paged_decode};
use rayon::prelude::*;

const RUNS: usize = 7;

fn median(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[RUNS / 2]
}

/// Read bandwidth: a parallel sum of `bytes` of u64 words, in bytes per second.
fn read_bandwidth(bytes: usize) -> f64 {
    let words: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let secs = median(|| {
        let s: u64 = words
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .reduce(|| 0, u64::wrapping_add);
        black_box(s);
    });
    bytes as f64 / secs
}

struct Case {
    batch: u32,
    len: u32,
    q_heads: u32,
    kv_heads: u32,
}

fn decode<T: KvElem>(c: &Case, contiguous: bool) -> (f64, f64) {
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
    let (mut out, mut lse) = (vec![0f32; rows * d as usize], vec![0f32; rows]);
    let p = AttnParams::new(c.q_heads, d);
    let secs = median(|| {
        paged_decode(
            &layout,
            &cache,
            &table,
            &q,
            p,
            DecodeOptions::default(),
            &mut out,
            &mut lse,
        )
        .expect("decode");
        black_box(&out);
    });
    let bytes = (layout.len() * T::DTYPE.size_bytes()) as f64;
    (bytes, bytes / secs)
}

fn main() {
    let threads = rayon::current_num_threads();
    let cases = [
        (
            "bf16",
            Case {
                batch: 8,
                len: 8192,
                q_heads: 32,
                kv_heads: 8,
            },
        ),
        (
            "bf16",
            Case {
                batch: 8,
                len: 8192,
                q_heads: 8,
                kv_heads: 8,
            },
        ),
        (
            "f32",
            Case {
                batch: 4,
                len: 8192,
                q_heads: 32,
                kv_heads: 8,
            },
        ),
    ];
    let read = read_bandwidth(512 << 20);
    println!(
        "CPU decode, {threads} threads, median of {RUNS}; read bandwidth (rayon sum of 512 MiB): {:.2} GB/s",
        read / 1e9
    );
    for (name, c) in &cases {
        let run = |contiguous| match *name {
            "f32" => decode::<f32>(c, contiguous),
            _ => decode::<bf16>(c, contiguous),
        };
        let (bytes, paged) = run(false);
        let (_, contiguous) = run(true);
        println!(
            "decode {name} b={} L={} {}q/{}kv d=128: {:.0} MiB KV, paged {:.2} GB/s ({:.0}% of read), contiguous {:.2} GB/s ({:.0}% of read), paged/contiguous {:.2}",
            c.batch,
            c.len,
            c.q_heads,
            c.kv_heads,
            bytes / f64::from(1u32 << 20),
            paged / 1e9,
            100.0 * paged / read,
            contiguous / 1e9,
            100.0 * contiguous / read,
            paged / contiguous
        );
    }
}
