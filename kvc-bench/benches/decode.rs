//! CPU decode bandwidth: paged decode over ≥ 256 MiB of KV, the same kernel on a contiguous
//! layout (the paged-overhead ratio), and the machine's read bandwidth measured in the same
//! run (a rayon streaming sum over 512 MiB, timed in turn with the decodes), one line a case.
//!
//! Run: `cargo bench -p kvc-bench --bench decode` (arguments, such as the criterion ones
//! `cargo xtask bench` passes, are ignored).
#![allow(clippy::print_stdout)]

use std::time::Instant;

use half::bf16;
use kvc_bench::kernel_kit::{DecodeBatch, DecodeShape, PageOrder, filled, read_probe};
use kvc_kernels::KvElem;

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

struct Case {
    batch: u32,
    len: u32,
    q_heads: u32,
    kv_heads: u32,
}

fn case<T: KvElem>(name: &str, c: &Case, words: &[u64]) {
    let shape = DecodeShape {
        batch: c.batch,
        len: c.len,
        q_heads: c.q_heads,
        kv_heads: c.kv_heads,
        head_dim: 128,
        block_size: 16,
    };
    let batch = |order, huge| DecodeBatch::<T>::new(shape, order, huge).expect("decode setup");
    let mut paged = batch(PageOrder::Shuffled, true);
    let mut contiguous = batch(PageOrder::InOrder, true);
    let mut small_pages = batch(PageOrder::Shuffled, false);
    let bytes = paged.bytes() as f64;
    let [tp, tc, ts, tr] = interleaved(&mut [
        &mut || paged.run().expect("decode"),
        &mut || contiguous.run().expect("decode"),
        &mut || small_pages.run().expect("decode"),
        &mut || {
            read_probe(words);
        },
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
    let words = filled((512usize << 20) / 8, true, |i| i as u64);
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
