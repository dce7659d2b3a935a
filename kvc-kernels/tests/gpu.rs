//! Every CUDA op against the CPU path on the same inputs (feature `cuda`). Where no CUDA
//! driver is present each test says so and skips, unless `KVC_REQUIRE_GPU=1` (set by
//! `cargo xtask gpu`), where a missing GPU fails.
#![cfg(feature = "cuda")]
#![allow(clippy::print_stderr)]

mod common;

use common::{Rng, max_err, queries, reference, scenario};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use kvc_core::{BlockCopy, BlockId, HostBlockId, PagedLayout, SlotMapping};
use kvc_kernels::cuda::{CudaElem, CudaError, CudaKernels};
use kvc_kernels::{
    AttnParams, BlockSwap, DecodeArgs, DecodeOptions, KvElem, copy_blocks, paged_prefill, write_kv,
};

fn device() -> Option<CudaKernels> {
    match CudaKernels::new(0) {
        Ok(k) => Some(k),
        Err(e @ (CudaError::NoDriver | CudaError::NoNvrtc)) => {
            assert!(
                std::env::var("KVC_REQUIRE_GPU").as_deref() != Ok("1"),
                "KVC_REQUIRE_GPU=1 but {e}"
            );
            eprintln!("skipping GPU test: {e} (GPU execution not run)");
            None
        }
        Err(e) => panic!("CUDA is present but unusable: {e}"),
    }
}

fn up<T: CudaElem>(k: &CudaKernels, v: &[T]) -> CudaSlice<T> {
    k.stream().clone_htod(v).unwrap()
}

fn down<T: CudaElem>(k: &CudaKernels, v: &CudaSlice<T>) -> Vec<T> {
    k.stream().clone_dtoh(v).unwrap()
}

fn check_decode<T: CudaElem>(
    k: &CudaKernels,
    rng: &mut Rng,
    nhd: bool,
    (qh, kvh): (u32, u32),
    bs: u32,
    d: u32,
) {
    let lens = [1 + rng.below(700) as u32, 1 + rng.below(60) as u32, 3000];
    let s = scenario::<T>(rng, nhd, kvh, bs, d, &lens, &[1, 1, 1], None);
    let q = queries::<T>(rng, 3, qh, d);
    let p = AttnParams::new(qh, d);
    let (ref_o, ref_l) = reference(&s, &q, qh, p.scale);
    let tol = if T::DTYPE == kvc_core::DType::F32 {
        1e-3
    } else {
        1.5e-2
    };
    let cache = up(k, &s.cache);
    let dq = up(k, &q);
    let table = k.upload_table(&s.table).unwrap();
    for split in [None, Some(u32::MAX), Some(100)] {
        let rows = 3 * qh as usize;
        let mut out = k.stream().alloc_zeros::<f32>(rows * d as usize).unwrap();
        let mut lse = k.stream().alloc_zeros::<f32>(rows).unwrap();
        let opts = DecodeOptions {
            split_tokens: split,
        };
        let args = DecodeArgs {
            layout: &s.layout,
            cache: &cache,
            table: &table,
            q: &dq,
            params: p,
            options: opts,
        };
        k.paged_decode(&args, &mut out, &mut lse).unwrap();
        let (o, l) = (down(k, &out), down(k, &lse));
        let what = format!(
            "{:?} heads=({qh},{kvh}) bs={bs} d={d} split={split:?}",
            T::DTYPE
        );
        assert!(
            max_err(&o, &ref_o) < tol,
            "decode out {what}: {}",
            max_err(&o, &ref_o)
        );
        assert!(
            max_err(&l, &ref_l) < tol,
            "decode lse {what}: {}",
            max_err(&l, &ref_l)
        );
    }
}

#[test]
fn decode_matches_the_reference() {
    let Some(k) = device() else { return };
    let mut rng = Rng(11);
    let ratios = [(40, 40), (32, 8), (64, 8), (9, 3)];
    for (i, d) in [64, 80, 96, 128, 256].into_iter().enumerate() {
        for (j, bs) in [1, 5, 8, 16, 32].into_iter().enumerate() {
            let (qh, kvh) = ratios[(i + j) % 4];
            let small = if qh >= 32 {
                (qh / 8, kvh / 8)
            } else {
                (qh, kvh)
            };
            check_decode::<bf16>(&k, &mut rng, (i + j) % 2 == 0, small, bs, d);
            check_decode::<f16>(&k, &mut rng, false, ratios[(i + j + 1) % 4], bs, d);
            check_decode::<f32>(&k, &mut rng, true, ratios[(i + j + 2) % 4], bs, d);
        }
    }
}

#[test]
fn prefill_matches_the_cpu() {
    let Some(k) = device() else { return };
    let mut rng = Rng(12);
    for (d, bs, (qh, kvh)) in [
        (128, 16, (32, 8)),
        (80, 5, (9, 3)),
        (256, 1, (8, 8)),
        (64, 32, (64, 8)),
    ] {
        let lens = [40, 300, 7];
        let q_lens = [40, 33, 1];
        let s = scenario::<bf16>(&mut rng, false, kvh, bs, d, &lens, &q_lens, None);
        let q = queries::<bf16>(&mut rng, s.table.total_queries(), qh, d);
        let p = AttnParams::new(qh, d);
        let rows = s.table.total_queries() * qh as usize;
        let (mut co, mut cl) = (vec![0.0; rows * d as usize], vec![0.0; rows]);
        paged_prefill(&s.layout, &s.cache, &s.table, &q, p, &mut co, &mut cl).unwrap();
        let cache = up(&k, &s.cache);
        let dq = up(&k, &q);
        let table = k.upload_table(&s.table).unwrap();
        let mut out = k.stream().alloc_zeros::<f32>(rows * d as usize).unwrap();
        let mut lse = k.stream().alloc_zeros::<f32>(rows).unwrap();
        k.paged_prefill(&s.layout, &cache, &table, &dq, p, &mut out, &mut lse)
            .unwrap();
        let co64: Vec<f64> = co.iter().map(|&x| f64::from(x)).collect();
        let cl64: Vec<f64> = cl.iter().map(|&x| f64::from(x)).collect();
        assert!(
            max_err(&down(&k, &out), &co64) < 1e-3,
            "prefill d={d} bs={bs}"
        );
        assert!(
            max_err(&down(&k, &lse), &cl64) < 1e-3,
            "prefill lse d={d} bs={bs}"
        );
    }
}

#[test]
fn merge_states_matches_the_cpu() {
    let Some(k) = device() else { return };
    let mut rng = Rng(13);
    let (n, d) = (37, 96);
    let oa: Vec<f32> = (0..n * d).map(|_| rng.unit()).collect();
    let ob: Vec<f32> = (0..n * d).map(|_| rng.unit()).collect();
    let mut la: Vec<f32> = (0..n).map(|_| rng.unit() * 5.0).collect();
    let lb: Vec<f32> = (0..n).map(|_| rng.unit() * 5.0).collect();
    la[3] = f32::NEG_INFINITY;
    let (mut co, mut cl) = (vec![0.0; n * d], vec![0.0; n]);
    kvc_kernels::merge_states(&oa, &la, &ob, &lb, d as u32, &mut co, &mut cl).unwrap();
    let mut out = k.stream().alloc_zeros::<f32>(n * d).unwrap();
    let mut lse = k.stream().alloc_zeros::<f32>(n).unwrap();
    k.merge_states(
        &up(&k, &oa),
        &up(&k, &la),
        &up(&k, &ob),
        &up(&k, &lb),
        d as u32,
        &mut out,
        &mut lse,
    )
    .unwrap();
    let co64: Vec<f64> = co.iter().map(|&x| f64::from(x)).collect();
    let cl64: Vec<f64> = cl.iter().map(|&x| f64::from(x)).collect();
    assert!(max_err(&down(&k, &out), &co64) < 1e-5);
    assert!(max_err(&down(&k, &lse), &cl64) < 1e-5);
}

fn bits<T: KvElem>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

#[test]
fn write_copy_and_swap_match_the_cpu_exactly() {
    let Some(k) = device() else { return };
    let mut rng = Rng(14);
    for layout in [
        PagedLayout::hnd(40, 4, 16, 128).unwrap(),
        PagedLayout::nhd(40, 3, 5, 80).unwrap(),
    ] {
        let n = layout.len() as usize;
        let base: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.unit())).collect();
        let per_token = (layout.kv_heads() * layout.head_dim()) as usize;
        let mut slots: Vec<i64> = rng
            .distinct(50, 40 * layout.block_size())
            .into_iter()
            .map(i64::from)
            .collect();
        slots[7] = -1;
        let mapping = SlotMapping::new(slots, &layout).unwrap();
        let key: Vec<f16> = (0..50 * per_token)
            .map(|_| f16::from_f32(rng.unit()))
            .collect();
        let value: Vec<f16> = (0..50 * per_token)
            .map(|_| f16::from_f32(rng.unit()))
            .collect();
        let mut cpu = base.clone();
        write_kv(&layout, &mut cpu, &mapping, &key, &value).unwrap();
        let mut dev = up(&k, &base);
        k.write_kv(&layout, &mut dev, &mapping, &up(&k, &key), &up(&k, &value))
            .unwrap();
        assert_eq!(bits(&down(&k, &dev)), bits(&cpu), "write_kv");

        let pairs = [
            BlockCopy {
                src: BlockId(2),
                dst: BlockId(30),
            },
            BlockCopy {
                src: BlockId(2),
                dst: BlockId(31),
            },
            BlockCopy {
                src: BlockId(39),
                dst: BlockId(0),
            },
        ];
        let mut cpu_layers = vec![cpu.clone(), base.clone()];
        let mut views: Vec<&mut [f16]> = cpu_layers.iter_mut().map(Vec::as_mut_slice).collect();
        copy_blocks(&layout, &mut views, &pairs).unwrap();
        let mut dev_layers = vec![up(&k, &cpu), up(&k, &base)];
        k.copy_blocks(&layout, &mut dev_layers, &pairs).unwrap();
        for (d, c) in dev_layers.iter().zip(&cpu_layers) {
            assert_eq!(bits(&down(&k, d)), bits(c), "copy_blocks");
        }

        // Swap two blocks out to a host pool and back into other device blocks.
        let host_layout =
            PagedLayout::hnd(4, layout.kv_heads(), layout.block_size(), layout.head_dim()).unwrap();
        let mut host = vec![vec![f16::ZERO; host_layout.len() as usize]; 2];
        let out = [
            BlockSwap {
                device: BlockId(5),
                host: HostBlockId(1),
            },
            BlockSwap {
                device: BlockId(6),
                host: HostBlockId(3),
            },
        ];
        let mut hv: Vec<&mut [f16]> = host.iter_mut().map(Vec::as_mut_slice).collect();
        k.swap_out(&layout, &dev_layers, &host_layout, &mut hv, &out)
            .unwrap();
        let back = [
            BlockSwap {
                device: BlockId(20),
                host: HostBlockId(1),
            },
            BlockSwap {
                device: BlockId(21),
                host: HostBlockId(3),
            },
        ];
        let hv: Vec<&[f16]> = host.iter().map(Vec::as_slice).collect();
        k.swap_in(&host_layout, &hv, &layout, &mut dev_layers, &back)
            .unwrap();
        let mut expected = cpu_layers.clone();
        let moves = [
            BlockCopy {
                src: BlockId(5),
                dst: BlockId(20),
            },
            BlockCopy {
                src: BlockId(6),
                dst: BlockId(21),
            },
        ];
        let mut views: Vec<&mut [f16]> = expected.iter_mut().map(Vec::as_mut_slice).collect();
        copy_blocks(&layout, &mut views, &moves).unwrap();
        for (d, c) in dev_layers.iter().zip(&expected) {
            assert_eq!(bits(&down(&k, d)), bits(c), "swap");
        }
    }
}

#[test]
fn the_probe_never_panics() {
    // With or without a driver, opening a device is a value, not a panic.
    match CudaKernels::new(0) {
        Ok(k) => assert!(k.synchronize().is_ok()),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
