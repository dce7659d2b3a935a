//! Measuring decode against the machine: a ready-made decode batch over a pool of its own
//! ([`DecodeBatch`]), a streaming read-bandwidth probe ([`read_probe`]) and 2 MiB-aligned
//! buffers that ask for transparent huge pages ([`filled`]). The decode benchmark
//! (`cargo bench -p kvc-bench --bench decode`) and the report's bandwidth section both measure
//! with these, so their figures mean the same thing.

use std::hint::black_box;

use kvc_core::{BlockId, PageTable, PageTableError, PagedLayout, PagedLayoutError};
use rayon::prelude::*;
use thiserror::Error;

use kvc_kernels::{AttnParams, DecodeArgs, DecodeOptions, KvElem, ShapeError, paged_decode};

/// The shape of a decode batch: `batch` sequences of `len` tokens each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
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

/// Where a batch's pages lie in its pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageOrder {
    /// In a fixed pseudo-random order over the whole pool, as after a long-running engine.
    Shuffled,
    /// Each sequence's pages adjacent and in order: the contiguous baseline.
    InOrder,
}

/// Why a decode batch could not be set up.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The layout was refused.
    #[error(transparent)]
    Layout(#[from] PagedLayoutError),
    /// The page table was refused.
    #[error(transparent)]
    Table(#[from] PageTableError),
    /// The pool does not fit in this machine's address space.
    #[error("a pool of {elements} elements does not fit in memory")]
    TooLarge {
        /// Elements asked for.
        elements: u64,
    },
}

/// A buffer of plain values aligned to 2 MiB (a KV pool's alignment: every block, and every
/// head's run of K or V rows, starts where the layout says relative to a page boundary).
pub struct Pool<T> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: `Pool` owns its elements like a `Vec<T>`.
unsafe impl<T: Send> Send for Pool<T> {}
// SAFETY: shared access only hands out `&[T]`.
unsafe impl<T: Sync> Sync for Pool<T> {}

impl<T> std::ops::Deref for Pool<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialised values (see `filled`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> std::ops::DerefMut for Pool<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `deref`, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for Pool<T> {
    fn drop(&mut self) {
        // SAFETY: the values were initialised, and the allocation was made with `layout`.
        unsafe {
            std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ));
            if self.layout.size() > 0 {
                std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout);
            }
        }
    }
}

/// `len` values of `f(i)` in a 2 MiB-aligned buffer that first asks the kernel for
/// transparent huge pages when `huge` (as an engine would for its KV pool: decode reads runs
/// scattered over the pool, and on 4 KiB pages each run is also a TLB miss). A refusal
/// leaves ordinary pages.
///
/// # Panics
///
/// As `Vec::with_capacity` does: when `len` values of `T` exceed `isize::MAX` bytes, or the
/// allocator fails.
pub fn filled<T>(len: usize, huge: bool, f: impl Fn(usize) -> T) -> Pool<T> {
    const ALIGN: usize = 2 << 20;
    let bytes = len
        .checked_mul(std::mem::size_of::<T>())
        .expect("pool size overflows");
    let layout = std::alloc::Layout::from_size_align(bytes, ALIGN.max(std::mem::align_of::<T>()))
        .expect("pool layout");
    let ptr = if bytes == 0 {
        std::ptr::NonNull::<T>::dangling()
    } else {
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        std::ptr::NonNull::new(raw.cast::<T>())
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
    };
    #[cfg(target_os = "linux")]
    if huge && bytes >= ALIGN {
        // SAFETY: the range lies inside the fresh allocation, which nothing has touched yet;
        // madvise only changes how the kernel backs those pages.
        let _ = unsafe {
            libc::madvise(
                ptr.as_ptr().cast(),
                bytes / ALIGN * ALIGN,
                libc::MADV_HUGEPAGE,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = huge;
    for i in 0..len {
        // SAFETY: `i < len` is inside the allocation; each slot is written once.
        unsafe { ptr.as_ptr().add(i).write(f(i)) };
    }
    Pool { ptr, len, layout }
}

/// A parallel sum over `words`: timed, it gives the machine's streaming read bandwidth.
pub fn read_probe(words: &[u64]) -> u64 {
    let s = words
        .par_chunks(1 << 16)
        .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
        .reduce(|| 0, u64::wrapping_add);
    black_box(s)
}

/// Block ids `0..n` in a fixed pseudo-random order (xorshift Fisher–Yates), or in order.
fn block_ids(n: u32, order: PageOrder) -> Vec<BlockId> {
    let mut ids: Vec<u32> = (0..n).collect();
    if order == PageOrder::Shuffled {
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

/// One decode batch over a pool of its own, ready to run again and again.
///
/// ```
/// use kvc_bench::kernel_kit::{DecodeBatch, DecodeShape, PageOrder};
///
/// let shape = DecodeShape { batch: 2, len: 40, q_heads: 4, kv_heads: 2, head_dim: 64, block_size: 16 };
/// let mut decode = DecodeBatch::<f32>::new(shape, PageOrder::Shuffled, false)?;
/// decode.run()?;
/// assert_eq!(decode.bytes(), 2 * 3 * 2 * 2 * 16 * 64 * 4); // 6 blocks of K and V, f32
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DecodeBatch<T> {
    layout: PagedLayout,
    table: PageTable,
    cache: Pool<T>,
    q: Vec<T>,
    out: Vec<f32>,
    lse: Vec<f32>,
    params: AttnParams,
}

impl<T: KvElem> DecodeBatch<T> {
    /// Builds the pool (on huge pages when `huge`), fills it and the queries with fixed values.
    pub fn new(shape: DecodeShape, order: PageOrder, huge: bool) -> Result<Self, BenchError> {
        let pages = shape.len.div_ceil(shape.block_size.max(1));
        let num_blocks = shape.batch * pages;
        let layout =
            PagedLayout::hnd(num_blocks, shape.kv_heads, shape.block_size, shape.head_dim)?;
        let indptr: Vec<u32> = (0..=shape.batch).map(|s| s * pages).collect();
        let table = PageTable::for_decode(
            indptr,
            block_ids(num_blocks, order),
            vec![shape.len; shape.batch as usize],
            &layout,
        )?;
        let len = usize::try_from(layout.len()).map_err(|_| BenchError::TooLarge {
            elements: layout.len(),
        })?;
        let cache = filled(len, huge, |i| T::from_f32(((i % 61) as f32 - 30.0) / 32.0));
        let q = (0..shape.batch * shape.q_heads * shape.head_dim)
            .map(|i| T::from_f32((i % 7) as f32 / 7.0))
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

    /// Bytes of KV one decode reads (the whole pool).
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.layout.len() * T::DTYPE.size_bytes()
    }

    /// Runs the decode once.
    pub fn run(&mut self) -> Result<(), ShapeError> {
        let args = DecodeArgs {
            layout: &self.layout,
            cache: &self.cache[..],
            table: &self.table,
            q: self.q.as_slice(),
            params: self.params,
            options: DecodeOptions::default(),
        };
        paged_decode(&args, &mut self.out, &mut self.lse)?;
        black_box(&self.out);
        Ok(())
    }
}
