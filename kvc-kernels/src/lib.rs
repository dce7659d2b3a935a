//! The math on paged KV: [`write_kv`], [`paged_decode`], [`paged_prefill`], [`merge_states`],
//! [`copy_blocks`], [`swap_out`] and [`swap_in`], on the CPU (rayon, f32/f16/bf16 storage with f32
//! accumulation) always, and on CUDA (`.cu` sources compiled at run time with NVRTC through
//! cudarc) behind feature `cuda`.
//!
//! The crate knows nothing of policies: it takes a [`PagedLayout`]
//! (one layer's `[num_blocks, 2, kv_heads, block_size, head_dim]` tensor with explicit
//! strides), a [`PageTable`] (CSR block tables) or a
//! [`SlotMapping`], and buffers. Every op validates its arguments
//! first and returns a [`ShapeError`] instead of touching memory out of bounds.
//!
//! The crate re-exports the `kvc-core` types its API takes ([`PagedLayout`], [`PageTable`],
//! [`SlotMapping`], [`BlockId`], [`HostBlockId`], [`BlockCopy`], [`DType`], [`KvLayout`] and
//! the layout and table errors) and the `half` storage types [`f16`](struct@f16) and [`bf16`], so it can
//! be used without depending on `kvc-core` or `half` directly.
//!
//! ```
//! use kvc_kernels::{
//!     AttnParams, BlockId, DecodeArgs, DecodeOptions, PageTable, PagedLayout, SlotMapping, f16,
//!     paged_decode, write_kv,
//! };
//!
//! // A pool of 4 blocks of 16 tokens, 2 KV heads of 64, fp16.
//! let layout = PagedLayout::hnd(4, 2, 16, 64)?;
//! let mut cache = vec![f16::ZERO; layout.len() as usize];
//!
//! // Write 3 tokens of one sequence into block 2.
//! let k = vec![f16::from_f32(0.5); 3 * 2 * 64];
//! let v = vec![f16::from_f32(1.0); 3 * 2 * 64];
//! let slots = SlotMapping::new(vec![32, 33, 34], &layout)?;
//! write_kv(&layout, &mut cache, &slots, &k, &v)?;
//!
//! // Decode one token with 4 query heads (GQA 2:1).
//! let table = PageTable::for_decode(vec![0, 1], vec![BlockId(2)], vec![3], &layout)?;
//! let q = vec![f16::from_f32(0.1); 4 * 64];
//! let (mut out, mut lse) = (vec![0.0; 4 * 64], vec![0.0; 4]);
//! let args = DecodeArgs {
//!     layout: &layout,
//!     cache: cache.as_slice(),
//!     table: &table,
//!     q: q.as_slice(),
//!     params: AttnParams::new(4, 64),
//!     options: DecodeOptions::default(),
//! };
//! paged_decode(&args, &mut out, &mut lse)?;
//! assert!((out[0] - 1.0).abs() < 1e-3); // every V is 1
//! assert!((lse[0] - (0.1 * 0.5 * 64.0 / 8.0 + 3f32.ln())).abs() < 1e-2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod attention;
mod copy;
#[cfg(target_arch = "x86_64")]
mod decode_avx512;
mod elem;
mod error;
mod write;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use attention::{
    AttnParams, DecodeArgs, DecodeOptions, merge_states, paged_decode, paged_prefill,
    set_avx512_disabled, set_portable_only,
};
pub use copy::{BlockSwap, copy_blocks, swap_in, swap_out};
pub use elem::KvElem;
pub use error::ShapeError;
pub use write::write_kv;

/// The `half` storage types the kernels take (with `f32`).
pub use half::{bf16, f16};
/// The `kvc-core` types this crate's API takes, so users need not depend on `kvc-core`
/// directly.
pub use kvc_core::{
    BlockCopy, BlockId, DType, HostBlockId, KvLayout, LayoutError, PageTable, PageTableError,
    PagedLayout, PagedLayoutError, SlotMapping, SlotMappingError,
};
