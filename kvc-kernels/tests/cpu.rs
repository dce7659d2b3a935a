//! The CPU ops against a naive f64 reference that gathers K/V through the page table, over
//! random block ids, NaN-poisoned unused slots, and the shapes of the issue: head sizes
//! {64, 80, 96, 128, 256}, block sizes {1, 5, 8, 16, 32}, head ratios (40,40), (32,8), (64,8),
//! (9,3), f32/f16/bf16 storage. Block movement and writes are checked for exact equality.

mod common;

use common::{Rng, Scenario, max_err, queries, reference, scenario};
use half::{bf16, f16};
use kvc_core::{BlockCopy, BlockId, HostBlockId, PageTable, PagedLayout, SlotMapping};
use kvc_kernels::{
    AttnParams, BlockSwap, DecodeArgs, DecodeOptions, KvElem, ShapeError, copy_blocks,
    merge_states, paged_decode, paged_prefill, swap_in, swap_out, write_kv,
};

const HEAD_DIMS: [u32; 5] = [64, 80, 96, 128, 256];
const BLOCK_SIZES: [u32; 5] = [1, 5, 8, 16, 32];
const RATIOS: [(u32, u32); 4] = [(40, 40), (32, 8), (64, 8), (9, 3)];

fn tolerance<T: KvElem>() -> f64 {
    match T::DTYPE {
        kvc_core::DType::F32 => 1e-3,
        _ => 1.5e-2,
    }
}

/// `paged_decode` with its inputs spelled out.
#[allow(clippy::too_many_arguments)]
fn decode_into<T: KvElem>(
    layout: &PagedLayout,
    cache: &[T],
    table: &PageTable,
    q: &[T],
    params: AttnParams,
    options: DecodeOptions,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<(), ShapeError> {
    let args = DecodeArgs {
        layout,
        cache,
        table,
        q,
        params,
        options,
    };
    paged_decode(&args, out, lse)
}

fn decode<T: KvElem>(
    s: &Scenario<T>,
    q: &[T],
    p: AttnParams,
    split: Option<u32>,
) -> (Vec<f32>, Vec<f32>) {
    let rows = s.table.batch() * p.q_heads as usize;
    let d = s.layout.head_dim() as usize;
    let (mut out, mut lse) = (vec![f32::NAN; rows * d], vec![f32::NAN; rows]);
    let opts = DecodeOptions {
        split_tokens: split,
    };
    decode_into(
        &s.layout, &s.cache, &s.table, q, p, opts, &mut out, &mut lse,
    )
    .unwrap();
    (out, lse)
}

/// Decode over one shape: split (odd chunks that cross pages), unsplit and automatic agree
/// with the reference and with each other, LSE included.
fn check_decode<T: KvElem>(rng: &mut Rng, nhd: bool, (qh, kvh): (u32, u32), bs: u32, d: u32) {
    // Heads are scaled down for the widest ratios so the cross product stays quick.
    let lens = [1 + rng.below(40) as u32, 1 + rng.below(90) as u32];
    let s = scenario::<T>(rng, nhd, kvh, bs, d, &lens, &[1, 1], None);
    let q = queries::<T>(rng, 2, qh, d);
    let p = AttnParams::new(qh, d);
    let (ref_o, ref_l) = reference(&s, &q, qh, p.scale);
    let tol = tolerance::<T>();
    let (uo, ul) = decode(&s, &q, p, Some(u32::MAX));
    let (so, sl) = decode(&s, &q, p, Some(7));
    let (ao, al) = decode(&s, &q, p, None);
    let what = format!("{:?} nhd={nhd} heads=({qh},{kvh}) bs={bs} d={d}", T::DTYPE);
    assert!(
        max_err(&uo, &ref_o) < tol,
        "unsplit out {what}: {}",
        max_err(&uo, &ref_o)
    );
    assert!(
        max_err(&ul, &ref_l) < tol,
        "unsplit lse {what}: {}",
        max_err(&ul, &ref_l)
    );
    assert!(max_err(&so, &ref_o) < tol, "split out {what}");
    assert!(max_err(&sl, &ref_l) < tol, "split lse {what}");
    assert!(max_err(&ao, &ref_o) < tol, "auto out {what}");
    assert!(max_err(&al, &ref_l) < tol, "auto lse {what}");
    let uo64: Vec<f64> = uo.iter().map(|&x| f64::from(x)).collect();
    assert!(max_err(&so, &uo64) < 1e-5, "split vs unsplit {what}");
}

#[test]
fn decode_matches_reference_across_shapes() {
    let mut rng = Rng(1);
    // Every head size × block size, for every dtype, with the head ratios and layouts taking
    // turns; every ratio meets every dtype.
    for (i, (&d, &bs)) in HEAD_DIMS
        .iter()
        .flat_map(|d| BLOCK_SIZES.iter().map(move |b| (d, b)))
        .enumerate()
    {
        let ratio = RATIOS[i % RATIOS.len()];
        let nhd = i % 3 == 1;
        check_decode::<f32>(&mut rng, nhd, ratio, bs, d);
        check_decode::<f16>(&mut rng, !nhd, RATIOS[(i + 1) % 4], bs, d);
        check_decode::<bf16>(&mut rng, nhd, RATIOS[(i + 2) % 4], bs, d);
    }
}

#[test]
fn decode_long_context_in_a_pool_of_32768_blocks() {
    let mut rng = Rng(2);
    let lens = [3000, 17, 1200];
    let s = scenario::<bf16>(&mut rng, false, 2, 1, 64, &lens, &[1, 1, 1], Some(32_768));
    assert_eq!(s.layout.num_blocks(), 32_768);
    let q = queries::<bf16>(&mut rng, 3, 16, 64);
    let p = AttnParams::new(16, 64);
    let (ref_o, ref_l) = reference(&s, &q, 16, p.scale);
    for split in [None, Some(u32::MAX), Some(333)] {
        let (o, l) = decode(&s, &q, p, split);
        assert!(max_err(&o, &ref_o) < 1.5e-2, "{split:?}");
        assert!(max_err(&l, &ref_l) < 1.5e-2, "{split:?}");
    }
    let f = scenario::<f32>(&mut rng, true, 1, 16, 128, &[2500], &[1], Some(32_768));
    let q = queries::<f32>(&mut rng, 1, 8, 128);
    let p = AttnParams::new(8, 128);
    let (ref_o, ref_l) = reference(&f, &q, 8, p.scale);
    let (o, l) = decode(&f, &q, p, None);
    assert!(max_err(&o, &ref_o) < 1e-3);
    assert!(max_err(&l, &ref_l) < 1e-3);
}

fn check_prefill<T: KvElem>(rng: &mut Rng, nhd: bool, (qh, kvh): (u32, u32), bs: u32, d: u32) {
    // A fresh prompt, a chunk of a prompt after cached context, and a single decode token.
    let lens = [1 + rng.below(30) as u32, 20 + rng.below(40) as u32, 5];
    let q_lens = [lens[0], 1 + rng.below(19) as u32, 1];
    let s = scenario::<T>(rng, nhd, kvh, bs, d, &lens, &q_lens, None);
    let q = queries::<T>(rng, s.table.total_queries(), qh, d);
    let p = AttnParams::new(qh, d);
    let (ref_o, ref_l) = reference(&s, &q, qh, p.scale);
    let rows = s.table.total_queries() * qh as usize;
    let (mut o, mut l) = (vec![f32::NAN; rows * d as usize], vec![f32::NAN; rows]);
    paged_prefill(&s.layout, &s.cache, &s.table, &q, p, &mut o, &mut l).unwrap();
    let what = format!("{:?} heads=({qh},{kvh}) bs={bs} d={d}", T::DTYPE);
    assert!(max_err(&o, &ref_o) < tolerance::<T>(), "prefill out {what}");
    assert!(max_err(&l, &ref_l) < tolerance::<T>(), "prefill lse {what}");
}

#[test]
fn prefill_is_causal_bottom_right() {
    let mut rng = Rng(3);
    // A sample of the cross product: every head size, block size, ratio and dtype appears.
    for (i, &d) in HEAD_DIMS.iter().enumerate() {
        let bs = BLOCK_SIZES[(i * 2) % 5];
        let small = |(q, k): (u32, u32)| if q >= 32 { (q / 8, k / 8) } else { (q, k) };
        check_prefill::<f32>(&mut rng, i % 2 == 0, small(RATIOS[i % 4]), bs, d);
        check_prefill::<bf16>(
            &mut rng,
            i % 2 == 1,
            small(RATIOS[(i + 1) % 4]),
            BLOCK_SIZES[(i * 2 + 1) % 5],
            d,
        );
        check_prefill::<f16>(
            &mut rng,
            false,
            small(RATIOS[(i + 3) % 4]),
            BLOCK_SIZES[(i + 3) % 5],
            d,
        );
    }
    check_prefill::<f32>(&mut rng, false, (64, 8), 16, 128);
    check_prefill::<f32>(&mut rng, true, (40, 40), 5, 80);
}

#[test]
fn prefill_of_one_token_is_decode() {
    let mut rng = Rng(4);
    let s = scenario::<f16>(&mut rng, false, 3, 8, 96, &[50, 9], &[1, 1], None);
    let q = queries::<f16>(&mut rng, 2, 9, 96);
    let p = AttnParams::new(9, 96);
    let (o, l) = decode(&s, &q, p, Some(16));
    let (mut po, mut pl) = (vec![0.0; o.len()], vec![0.0; l.len()]);
    paged_prefill(&s.layout, &s.cache, &s.table, &q, p, &mut po, &mut pl).unwrap();
    let o64: Vec<f64> = o.iter().map(|&x| f64::from(x)).collect();
    let l64: Vec<f64> = l.iter().map(|&x| f64::from(x)).collect();
    assert!(max_err(&po, &o64) < 1e-5);
    assert!(max_err(&pl, &l64) < 1e-5);
}

#[test]
fn merging_two_halves_gives_the_whole() {
    let mut rng = Rng(5);
    let (kvh, qh, bs, d) = (2, 8, 16, 64);
    let s = scenario::<f32>(&mut rng, false, kvh, bs, d, &[64], &[1], None);
    let q = queries::<f32>(&mut rng, 1, qh, d);
    let p = AttnParams::new(qh, d);
    let (whole_o, whole_l) = decode(&s, &q, p, Some(u32::MAX));
    // The first 2 pages, and the last 2 pages as their own sequence of 32 tokens.
    let pages = s.table.pages(0).to_vec();
    let part = |blocks: &[BlockId]| {
        let t = PageTable::for_decode(vec![0, 2], blocks.to_vec(), vec![32], &s.layout).unwrap();
        let half = Scenario {
            layout: s.layout,
            cache: s.cache.clone(),
            table: t,
        };
        decode(&half, &q, p, None)
    };
    let (ao, al) = part(&pages[..2]);
    let (bo, bl) = part(&pages[2..]);
    let (mut o, mut l) = (vec![0.0; ao.len()], vec![0.0; al.len()]);
    merge_states(&ao, &al, &bo, &bl, d, &mut o, &mut l).unwrap();
    let w64: Vec<f64> = whole_o.iter().map(|&x| f64::from(x)).collect();
    let wl64: Vec<f64> = whole_l.iter().map(|&x| f64::from(x)).collect();
    assert!(max_err(&o, &w64) < 1e-5);
    assert!(max_err(&l, &wl64) < 1e-5);

    // A side that saw no token contributes nothing.
    let empty_l = vec![f32::NEG_INFINITY; al.len()];
    let zeros = vec![0.0; ao.len()];
    merge_states(&ao, &al, &zeros, &empty_l, d, &mut o, &mut l).unwrap();
    assert_eq!((o.as_slice(), l.as_slice()), (ao.as_slice(), al.as_slice()));
    merge_states(&zeros, &empty_l, &zeros, &empty_l, d, &mut o, &mut l).unwrap();
    assert!(l.iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(o.iter().all(|&x| x == 0.0));
}

fn bits<T: KvElem>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

#[test]
fn write_kv_writes_exactly_its_slots() {
    let mut rng = Rng(6);
    for nhd in [false, true] {
        let (kvh, bs, d) = (3, 5, 80);
        let layout = if nhd {
            PagedLayout::nhd(7, kvh, bs, d)
        } else {
            PagedLayout::hnd(7, kvh, bs, d)
        }
        .unwrap();
        let mut cache = vec![bf16::from_f32(f32::NAN); layout.len() as usize];
        let mut slots: Vec<i64> = rng.distinct(20, 35).into_iter().map(i64::from).collect();
        slots[3] = -1;
        slots[11] = -1;
        let mapping = SlotMapping::new(slots.clone(), &layout).unwrap();
        let n = slots.len() * (kvh * d) as usize;
        let k: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.unit())).collect();
        let v: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.unit())).collect();
        write_kv(&layout, &mut cache, &mapping, &k, &v).unwrap();

        let mut expected = vec![bf16::from_f32(f32::NAN); layout.len() as usize];
        for (t, &slot) in slots.iter().enumerate() {
            if slot < 0 {
                continue;
            }
            let (block, pos) = ((slot / i64::from(bs)) as u32, (slot % i64::from(bs)) as u32);
            for h in 0..kvh {
                for x in 0..d {
                    let src = (t * (kvh * d) as usize) + (h * d + x) as usize;
                    expected[(layout.offset(block, 0, h, pos) + u64::from(x)) as usize] = k[src];
                    expected[(layout.offset(block, 1, h, pos) + u64::from(x)) as usize] = v[src];
                }
            }
        }
        assert_eq!(bits(&cache), bits(&expected), "nhd={nhd}");
    }
}

#[test]
fn copy_blocks_copies_every_layer_exactly() {
    let mut rng = Rng(7);
    // Dense HND and a padded strided layout (block stride larger than the block).
    let padded = PagedLayout::with_strides(12, 2, 4, 64, [1100, 512, 256, 64]).unwrap();
    for layout in [PagedLayout::hnd(12, 2, 4, 64).unwrap(), padded] {
        let mut layers: Vec<Vec<f16>> = (0..3)
            .map(|_| {
                (0..layout.len())
                    .map(|_| f16::from_f32(rng.unit()))
                    .collect()
            })
            .collect();
        let before = layers.clone();
        let pairs = [
            BlockCopy {
                src: BlockId(1),
                dst: BlockId(5),
            },
            BlockCopy {
                src: BlockId(1),
                dst: BlockId(9),
            },
            BlockCopy {
                src: BlockId(11),
                dst: BlockId(0),
            },
        ];
        let mut views: Vec<&mut [f16]> = layers.iter_mut().map(Vec::as_mut_slice).collect();
        copy_blocks(&layout, &mut views, &pairs).unwrap();
        for (after, before) in layers.iter().zip(&before) {
            let mut expected = before.clone();
            for c in &pairs {
                for kv in 0..2 {
                    for h in 0..2 {
                        for t in 0..4 {
                            let s = layout.offset(c.src.get(), kv, h, t) as usize;
                            let d = layout.offset(c.dst.get(), kv, h, t) as usize;
                            expected[d..d + 64].copy_from_slice(&before[s..s + 64]);
                        }
                    }
                }
            }
            assert_eq!(bits(after), bits(&expected));
        }
    }
    let layout = PagedLayout::hnd(4, 1, 1, 8).unwrap();
    let mut one = vec![0f32; layout.len() as usize];
    let conflict = [
        BlockCopy {
            src: BlockId(0),
            dst: BlockId(1),
        },
        BlockCopy {
            src: BlockId(1),
            dst: BlockId(2),
        },
    ];
    assert_eq!(
        copy_blocks(&layout, &mut [one.as_mut_slice()], &conflict),
        Err(ShapeError::CopyConflict {
            pair: 0,
            block: BlockId(1)
        })
    );
    let outside = [BlockCopy {
        src: BlockId(4),
        dst: BlockId(1),
    }];
    assert!(matches!(
        copy_blocks(&layout, &mut [one.as_mut_slice()], &outside),
        Err(ShapeError::BlockOutOfRange { pair: 0, .. })
    ));
}

#[test]
fn swap_out_and_in_round_trips_exactly() {
    let mut rng = Rng(8);
    let device = PagedLayout::hnd(16, 2, 8, 96).unwrap();
    let host = PagedLayout::nhd(6, 2, 8, 96).unwrap();
    let dev: Vec<Vec<bf16>> = (0..2)
        .map(|_| {
            (0..device.len())
                .map(|_| bf16::from_f32(rng.unit()))
                .collect()
        })
        .collect();
    let mut hst: Vec<Vec<bf16>> = vec![vec![bf16::ZERO; host.len() as usize]; 2];
    let out = [
        BlockSwap {
            device: BlockId(3),
            host: HostBlockId(0),
        },
        BlockSwap {
            device: BlockId(15),
            host: HostBlockId(5),
        },
    ];
    let src: Vec<&[bf16]> = dev.iter().map(Vec::as_slice).collect();
    let mut dst: Vec<&mut [bf16]> = hst.iter_mut().map(Vec::as_mut_slice).collect();
    swap_out(&device, &src, &host, &mut dst, &out).unwrap();

    // Back into other device blocks, then compare element by element.
    let mut dev2 = dev.clone();
    let back = [
        BlockSwap {
            device: BlockId(7),
            host: HostBlockId(0),
        },
        BlockSwap {
            device: BlockId(8),
            host: HostBlockId(5),
        },
    ];
    let src: Vec<&[bf16]> = hst.iter().map(Vec::as_slice).collect();
    let mut dst: Vec<&mut [bf16]> = dev2.iter_mut().map(Vec::as_mut_slice).collect();
    swap_in(&host, &src, &device, &mut dst, &back).unwrap();
    for (layer, (a, b)) in dev.iter().zip(&dev2).enumerate() {
        for (from, to) in [(3, 7), (15, 8)] {
            for kv in 0..2 {
                for h in 0..2 {
                    for t in 0..8 {
                        let s = device.offset(from, kv, h, t) as usize;
                        let d = device.offset(to, kv, h, t) as usize;
                        assert_eq!(bits(&a[s..s + 96]), bits(&b[d..d + 96]), "layer {layer}");
                    }
                }
            }
        }
    }
    let other = PagedLayout::hnd(16, 2, 16, 96).unwrap();
    let src: Vec<&[bf16]> = dev.iter().map(Vec::as_slice).collect();
    let mut dst: Vec<&mut [bf16]> = hst.iter_mut().map(Vec::as_mut_slice).collect();
    assert_eq!(
        swap_out(&other, &src, &host, &mut dst, &out),
        Err(ShapeError::BlockShapeMismatch)
    );
    // Host blocks are checked against the host pool, and swap-outs may not share one.
    let outside = [BlockSwap {
        device: BlockId(1),
        host: HostBlockId(6),
    }];
    assert_eq!(
        swap_out(&device, &src, &host, &mut dst, &outside),
        Err(ShapeError::HostBlockOutOfRange {
            pair: 0,
            block: HostBlockId(6),
            num_blocks: 6
        })
    );
    let shared = [
        out[0],
        BlockSwap {
            device: BlockId(4),
            ..out[0]
        },
    ];
    assert_eq!(
        swap_out(&device, &src, &host, &mut dst, &shared),
        Err(ShapeError::HostBlockConflict {
            pair: 1,
            block: HostBlockId(0)
        })
    );
    let src: Vec<&[bf16]> = hst.iter().map(Vec::as_slice).collect();
    let mut dst: Vec<&mut [bf16]> = dev2.iter_mut().map(Vec::as_mut_slice).collect();
    let twice = [
        back[0],
        BlockSwap {
            host: HostBlockId(1),
            ..back[0]
        },
    ];
    assert_eq!(
        swap_in(&host, &src, &device, &mut dst, &twice),
        Err(ShapeError::CopyConflict {
            pair: 1,
            block: BlockId(7)
        })
    );
}

#[test]
fn bad_arguments_are_typed_errors() {
    let mut rng = Rng(9);
    let s = scenario::<f32>(&mut rng, false, 2, 4, 64, &[9], &[1], None);
    let q = queries::<f32>(&mut rng, 1, 4, 64);
    let (mut o, mut l) = (vec![0.0; 4 * 64], vec![0.0; 4]);
    let opts = DecodeOptions::default();
    assert_eq!(
        decode_into(
            &s.layout,
            &s.cache,
            &s.table,
            &q,
            AttnParams::new(3, 64),
            opts,
            &mut o,
            &mut l
        ),
        Err(ShapeError::HeadRatio {
            q_heads: 3,
            kv_heads: 2
        })
    );
    assert_eq!(
        decode_into(
            &s.layout,
            &s.cache,
            &s.table,
            &q[1..],
            AttnParams::new(4, 64),
            opts,
            &mut o,
            &mut l
        ),
        Err(ShapeError::BufferLength {
            buffer: "q",
            len: 255,
            expected: 256
        })
    );
    assert!(matches!(
        decode_into(
            &s.layout,
            &s.cache[1..],
            &s.table,
            &q,
            AttnParams::new(4, 64),
            opts,
            &mut o,
            &mut l
        ),
        Err(ShapeError::CacheTooSmall { .. })
    ));
    let smaller = PagedLayout::hnd(2, 2, 4, 64).unwrap();
    assert!(matches!(
        decode_into(
            &smaller,
            &s.cache,
            &s.table,
            &q,
            AttnParams::new(4, 64),
            opts,
            &mut o,
            &mut l
        ),
        Err(ShapeError::TableMismatch { .. })
    ));
    let prefill = PageTable::new(
        vec![0, 2],
        vec![0, 3],
        s.table.pages(0).to_vec(),
        vec![9],
        &s.layout,
    )
    .unwrap();
    assert_eq!(
        decode_into(
            &s.layout,
            &s.cache,
            &prefill,
            &q,
            AttnParams::new(4, 64),
            opts,
            &mut o,
            &mut l
        ),
        Err(ShapeError::NotDecode { seq: 0, queries: 2 })
    );
    let mut cache = s.cache.clone();
    let big = PagedLayout::hnd(100, 2, 4, 64).unwrap();
    let slots = SlotMapping::new(vec![300], &big).unwrap();
    assert_eq!(
        write_kv(&s.layout, &mut cache, &slots, &q[..128], &q[..128]),
        Err(ShapeError::SlotOutOfPool {
            token: 0,
            slot: 300,
            slots: s.layout.num_blocks() as u64 * 4
        })
    );
}

/// Forces the portable build while alive; dropping it (also when the test panics) restores
/// the process-wide switch, so no later test runs on the wrong build.
struct PortableOnly;

impl PortableOnly {
    fn on() -> Self {
        kvc_kernels::set_portable_only(true);
        Self
    }
}

impl Drop for PortableOnly {
    fn drop(&mut self) {
        kvc_kernels::set_portable_only(false);
    }
}

#[test]
fn portable_build_matches_the_reference() {
    // The AVX2 build runs wherever the CPU has it; check the portable one too.
    let _portable = PortableOnly::on();
    let mut rng = Rng(10);
    check_decode::<bf16>(&mut rng, false, (32, 8), 16, 128);
    check_decode::<f32>(&mut rng, true, (9, 3), 5, 80);
    check_prefill::<f16>(&mut rng, false, (8, 2), 8, 64);
}

#[test]
fn avx2_build_matches_the_reference_where_avx512_bf16_would_run() {
    // bf16 decode with a head size that is a multiple of 32 takes the AVX-512 BF16 path on
    // CPUs that have it; check the AVX2 build of the same shapes too.
    kvc_kernels::set_avx512_disabled(true);
    let mut rng = Rng(11);
    check_decode::<bf16>(&mut rng, false, (32, 8), 16, 128);
    check_decode::<bf16>(&mut rng, true, (9, 3), 5, 96);
    kvc_kernels::set_avx512_disabled(false);
}
