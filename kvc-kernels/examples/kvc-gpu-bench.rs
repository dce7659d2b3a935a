//! The GPU kernel benchmark of `cargo xtask gpu`: measures a device-to-device copy, then each
//! kernel over KV far larger than L2 (flushed before every timed run), and prints one line per
//! kernel with its achieved bandwidth and its ratio to the copy measured in the same run.
//!
//! Usage: `kvc-gpu-bench [--gib N]` (KV pool size for decode, default 2 GiB).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use cudarc::driver::CudaSlice;
use cudarc::driver::sys::CUevent_flags;
use kvc_kernels::cuda::{CudaError, CudaKernels};
use kvc_kernels::{
    AttnParams, BlockCopy, BlockId, DecodeArgs, DecodeOptions, PageTable, PagedLayout, SlotMapping,
    bf16,
};

/// Timed runs per measurement (the median is reported).
const RUNS: usize = 7;

type Result<T> = std::result::Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

struct Bench {
    k: CudaKernels,
    flush: CudaSlice<u8>,
    copy_bw: f64,
}

impl Bench {
    /// Median seconds of `f`, with L2 flushed (a 512 MiB memset) before each run.
    fn time(
        &mut self,
        mut f: impl FnMut(&CudaKernels) -> std::result::Result<(), CudaError>,
    ) -> Result<f64> {
        f(&self.k).map_err(err)?; // warm-up (and kernel compile)
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            self.k.stream().memset_zeros(&mut self.flush).map_err(err)?;
            let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
            let start = self.k.stream().record_event(flags).map_err(err)?;
            f(&self.k).map_err(err)?;
            let end = self.k.stream().record_event(flags).map_err(err)?;
            end.synchronize().map_err(err)?;
            times.push(f64::from(start.elapsed_ms(&end).map_err(err)?) / 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[RUNS / 2])
    }

    fn report(&self, name: &str, bytes: f64, secs: f64) {
        let bw = bytes / secs;
        println!(
            "{name:<44} {:>8.3} GB {:>9.1} µs {:>8.0} GB/s {:>6.2} of copy",
            bytes / 1e9,
            secs * 1e6,
            bw / 1e9,
            bw / self.copy_bw
        );
    }
}

/// Fills a buffer with small values (bf16 bit patterns near ±1) without a host round trip
/// of the whole pool: one host chunk copied repeatedly.
fn fill(k: &CudaKernels, buf: &mut CudaSlice<bf16>) -> Result<()> {
    let chunk: Vec<bf16> = (0..1 << 20)
        .map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) / 64.0))
        .collect();
    let n = buf.len();
    let mut at = 0;
    while at < n {
        let len = chunk.len().min(n - at);
        k.stream()
            .memcpy_htod(&chunk[..len], &mut buf.slice_mut(at..at + len))
            .map_err(err)?;
        at += len;
    }
    Ok(())
}

struct Decode {
    batch: u32,
    len: u32,
    q_heads: u32,
    kv_heads: u32,
    contiguous: bool,
}

fn decode(b: &mut Bench, pool_gib: f64, c: &Decode) -> Result<()> {
    let (bs, d) = (16u32, 128u32);
    let block_bytes = 2.0 * f64::from(c.kv_heads * bs * d) * 2.0;
    let num_blocks = (pool_gib * f64::from(1u32 << 30) / block_bytes) as u32;
    let pages = c.len.div_ceil(bs);
    let batch = c.batch.min(num_blocks / pages);
    let layout = PagedLayout::hnd(num_blocks, c.kv_heads, bs, d).map_err(err)?;
    let mut ids: Vec<u32> = (0..num_blocks).collect();
    if !c.contiguous {
        // A fixed pseudo-random permutation (a multiplicative walk mod a prime above n).
        let mut x = 1u64;
        for i in (1..ids.len()).rev() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ids.swap(i, (x >> 33) as usize % (i + 1));
        }
    }
    let used = (batch * pages) as usize;
    let indices: Vec<BlockId> = ids[..used].iter().map(|&i| BlockId(i)).collect();
    let indptr: Vec<u32> = (0..=batch).map(|s| s * pages).collect();
    let table = PageTable::for_decode(indptr, indices, vec![c.len; batch as usize], &layout)
        .map_err(err)?;
    let mut cache =
        b.k.stream()
            .alloc_zeros::<bf16>(layout.len() as usize)
            .map_err(err)?;
    fill(&b.k, &mut cache)?;
    let q: Vec<bf16> = (0..batch * c.q_heads * d)
        .map(|i| bf16::from_f32((i % 13) as f32 / 13.0))
        .collect();
    let dq = b.k.stream().clone_htod(&q).map_err(err)?;
    let dt = b.k.upload_table(&table).map_err(err)?;
    let rows = (batch * c.q_heads) as usize;
    let mut out =
        b.k.stream()
            .alloc_zeros::<f32>(rows * d as usize)
            .map_err(err)?;
    let mut lse = b.k.stream().alloc_zeros::<f32>(rows).map_err(err)?;
    let p = AttnParams::new(c.q_heads, d);
    let secs = b.time(|k| {
        let args = DecodeArgs {
            layout: &layout,
            cache: &cache,
            table: &dt,
            q: &dq,
            params: p,
            options: DecodeOptions::default(),
        };
        k.paged_decode(&args, &mut out, &mut lse)
    })?;
    let bytes = f64::from(batch) * f64::from(c.len) * f64::from(c.kv_heads * d) * 2.0 * 2.0;
    let name = format!(
        "decode bf16 {} b={batch} L={} {}q/{}kv d=128",
        if c.contiguous { "contiguous" } else { "paged" },
        c.len,
        c.q_heads,
        c.kv_heads
    );
    b.report(&name, bytes, secs);
    Ok(())
}

fn write_kv(b: &mut Bench) -> Result<()> {
    let (kvh, bs, d, tokens) = (8u32, 16u32, 128u32, 131_072u32);
    let layout = PagedLayout::hnd(2 * tokens / bs, kvh, bs, d).map_err(err)?;
    let mut cache =
        b.k.stream()
            .alloc_zeros::<bf16>(layout.len() as usize)
            .map_err(err)?;
    // Every other block, so writes land across the pool.
    let slots: Vec<i64> = (0..i64::from(tokens))
        .map(|t| (t / i64::from(bs)) * 2 * i64::from(bs) + t % i64::from(bs))
        .collect();
    let mapping = SlotMapping::new(slots, &layout).map_err(err)?;
    let n = (tokens * kvh * d) as usize;
    let key = b.k.stream().alloc_zeros::<bf16>(n).map_err(err)?;
    let value = b.k.stream().alloc_zeros::<bf16>(n).map_err(err)?;
    let secs = b.time(|k| k.write_kv(&layout, &mut cache, &mapping, &key, &value))?;
    // Read K and V once, write them once.
    b.report(
        "write_kv bf16 131072 tokens 8kv d=128",
        2.0 * 2.0 * n as f64 * 2.0,
        secs,
    );
    Ok(())
}

fn copy_blocks(b: &mut Bench) -> Result<()> {
    let (kvh, bs, d, blocks) = (8u32, 16u32, 128u32, 16_384u32);
    let layout = PagedLayout::hnd(blocks, kvh, bs, d).map_err(err)?;
    let mut layers = vec![
        b.k.stream()
            .alloc_zeros::<bf16>(layout.len() as usize)
            .map_err(err)?,
    ];
    let pairs: Vec<BlockCopy> = (0..blocks / 2)
        .map(|i| BlockCopy {
            src: BlockId(i),
            dst: BlockId(blocks / 2 + i),
        })
        .collect();
    let secs = b.time(|k| k.copy_blocks(&layout, &mut layers, &pairs))?;
    let bytes = layout.len() as f64 / 2.0 * 2.0 * 2.0; // half the pool, 2 bytes, read + write
    b.report("copy_blocks bf16 8192 pairs 8kv bs=16 d=128", bytes, secs);
    Ok(())
}

fn run(pool_gib: f64) -> Result<()> {
    let k = CudaKernels::new(0).map_err(err)?;
    let name = k.context().name().unwrap_or_else(|_| "unknown GPU".into());
    let flush = k.stream().alloc_zeros::<u8>(512 << 20).map_err(err)?;
    let mut b = Bench {
        k,
        flush,
        copy_bw: 1.0,
    };

    // The copy: 1 GiB device to device, bytes read plus bytes written.
    let n = 1usize << 30;
    let src = b.k.stream().alloc_zeros::<u8>(n).map_err(err)?;
    let mut dst = b.k.stream().alloc_zeros::<u8>(n).map_err(err)?;
    let secs = b.time(|k| {
        k.stream()
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| CudaError::Driver {
                context: "copy",
                message: e.to_string(),
            })
    })?;
    b.copy_bw = 2.0 * n as f64 / secs;
    drop((src, dst));
    println!("GPU: {name}; KV pool {pool_gib} GiB; median of {RUNS} runs, L2 flushed before each");
    b.report(
        "device-to-device copy 1 GiB (read + write)",
        2.0 * n as f64,
        secs,
    );

    for c in [
        Decode {
            batch: 32,
            len: 16_384,
            q_heads: 64,
            kv_heads: 8,
            contiguous: false,
        },
        Decode {
            batch: 32,
            len: 16_384,
            q_heads: 64,
            kv_heads: 8,
            contiguous: true,
        },
        Decode {
            batch: 32,
            len: 16_384,
            q_heads: 8,
            kv_heads: 8,
            contiguous: false,
        },
        Decode {
            batch: 256,
            len: 2_048,
            q_heads: 32,
            kv_heads: 8,
            contiguous: false,
        },
        Decode {
            batch: 4,
            len: 131_072,
            q_heads: 32,
            kv_heads: 8,
            contiguous: false,
        },
    ] {
        decode(&mut b, pool_gib, &c)?;
    }
    write_kv(&mut b)?;
    copy_blocks(&mut b)?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pool_gib = match args.as_slice() {
        [] => 2.0,
        [flag, v] if flag == "--gib" => match v.parse::<f64>() {
            Ok(g) if g > 0.0 => g,
            _ => {
                eprintln!("kvc-gpu-bench: --gib takes a positive number, not `{v}`");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("usage: kvc-gpu-bench [--gib N]");
            return ExitCode::from(2);
        }
    };
    match run(pool_gib) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvc-gpu-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
