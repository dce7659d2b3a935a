//! Paged KV memory as kernels see it: [`PagedLayout`] (one layer's KV tensor with explicit
//! strides), [`PageTable`] (a batch's block tables in CSR form) and [`SlotMapping`] (where each
//! new token's K/V goes). Every constructor validates shapes against the layout, so a kernel
//! handed these types never reads or writes out of bounds; all element offsets are 64-bit.

use thiserror::Error;

use crate::{BlockId, DType, KvLayout};

/// Why a [`PagedLayout`] could not be built.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PagedLayoutError {
    /// A dimension was zero (`num_blocks` may not be zero either: a pool has blocks).
    #[error("paged layout dimension `{dim}` must be at least 1")]
    ZeroDimension {
        /// The dimension's name.
        dim: &'static str,
    },
    /// Two dimensions' strides overlap, so distinct elements would share memory.
    #[error(
        "paged layout strides overlap: `{inner}` spans {span} elements but `{outer}` has stride {stride}"
    )]
    OverlappingStrides {
        /// The inner dimension.
        inner: &'static str,
        /// Elements it spans.
        span: u64,
        /// The next outer dimension.
        outer: &'static str,
        /// That dimension's stride.
        stride: u64,
    },
    /// The tensor's size in elements overflows 64 bits.
    #[error("paged layout too large: element offsets overflow 64 bits")]
    Overflow,
}

/// One layer's paged KV tensor: logically `[num_blocks, 2, kv_heads, block_size, head_dim]`
/// (index 0 of the second dimension is K, 1 is V), placed in memory by explicit element
/// strides. The head dimension is always contiguous (stride 1).
///
/// [`hnd`](Self::hnd) is the dense HND layout (a head's tokens adjacent, K and V of a block
/// adjacent); [`nhd`](Self::nhd) stores a token's heads adjacent instead. Any other
/// non-overlapping placement is accepted by [`with_strides`](Self::with_strides).
///
/// ```
/// use kvc_core::PagedLayout;
///
/// let hnd = PagedLayout::hnd(1024, 8, 16, 128)?;
/// assert_eq!(hnd.offset(3, 1, 2, 5), 3 * 2 * 8 * 16 * 128 + 8 * 16 * 128 + 2 * 16 * 128 + 5 * 128);
/// assert_eq!(hnd.len(), 1024 * 2 * 8 * 16 * 128);
/// let nhd = PagedLayout::nhd(1024, 8, 16, 128)?;
/// assert_eq!(nhd.offset(0, 0, 2, 5), 5 * 8 * 128 + 2 * 128);
/// # Ok::<(), kvc_core::PagedLayoutError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagedLayout {
    num_blocks: u32,
    kv_heads: u32,
    block_size: u32,
    head_dim: u32,
    block_stride: u64,
    kv_stride: u64,
    head_stride: u64,
    token_stride: u64,
    len: u64,
}

impl PagedLayout {
    /// The dense HND layout `[num_blocks, 2, kv_heads, block_size, head_dim]`.
    pub fn hnd(
        num_blocks: u32,
        kv_heads: u32,
        block_size: u32,
        head_dim: u32,
    ) -> Result<Self, PagedLayoutError> {
        let token = u64::from(head_dim);
        let head = token * u64::from(block_size);
        let kv = head
            .checked_mul(u64::from(kv_heads))
            .ok_or(PagedLayoutError::Overflow)?;
        let block = kv.checked_mul(2).ok_or(PagedLayoutError::Overflow)?;
        Self::with_strides(
            num_blocks,
            kv_heads,
            block_size,
            head_dim,
            [block, kv, head, token],
        )
    }

    /// The dense NHD layout `[num_blocks, 2, block_size, kv_heads, head_dim]`.
    pub fn nhd(
        num_blocks: u32,
        kv_heads: u32,
        block_size: u32,
        head_dim: u32,
    ) -> Result<Self, PagedLayoutError> {
        let head = u64::from(head_dim);
        let token = head * u64::from(kv_heads);
        let kv = token
            .checked_mul(u64::from(block_size))
            .ok_or(PagedLayoutError::Overflow)?;
        let block = kv.checked_mul(2).ok_or(PagedLayoutError::Overflow)?;
        Self::with_strides(
            num_blocks,
            kv_heads,
            block_size,
            head_dim,
            [block, kv, head, token],
        )
    }

    /// The HND layout of one layer of `layout` with `num_blocks` blocks.
    pub fn for_kv_layout(layout: &KvLayout, num_blocks: u32) -> Result<Self, PagedLayoutError> {
        Self::hnd(
            num_blocks,
            layout.kv_heads(),
            layout.block_size(),
            layout.head_dim(),
        )
    }

    /// A layout with explicit element strides `[block, kv, head, token]` (the head dimension
    /// has stride 1). Rejects zero dimensions, overlapping strides and sizes past 64 bits.
    pub fn with_strides(
        num_blocks: u32,
        kv_heads: u32,
        block_size: u32,
        head_dim: u32,
        strides: [u64; 4],
    ) -> Result<Self, PagedLayoutError> {
        for (value, dim) in [
            (num_blocks, "num_blocks"),
            (kv_heads, "kv_heads"),
            (block_size, "block_size"),
            (head_dim, "head_dim"),
        ] {
            if value == 0 {
                return Err(PagedLayoutError::ZeroDimension { dim });
            }
        }
        let [block_stride, kv_stride, head_stride, token_stride] = strides;
        // (name, extent, stride), head_dim innermost with stride 1.
        let mut dims = [
            ("head_dim", u64::from(head_dim), 1u64),
            ("token", u64::from(block_size), token_stride),
            ("head", u64::from(kv_heads), head_stride),
            ("kv", 2, kv_stride),
            ("block", u64::from(num_blocks), block_stride),
        ];
        // Dimensions of extent 1 never step, so their stride is free; order the rest by stride
        // and require each to start past the span of everything inside it.
        dims.sort_by_key(|&(_, extent, stride)| (extent > 1, stride));
        let mut span = 1u64;
        let mut inner = "element";
        for &(name, extent, stride) in dims.iter().filter(|d| d.1 > 1) {
            if stride < span {
                return Err(PagedLayoutError::OverlappingStrides {
                    inner,
                    span,
                    outer: name,
                    stride,
                });
            }
            span = (extent - 1)
                .checked_mul(stride)
                .and_then(|v| v.checked_add(span))
                .ok_or(PagedLayoutError::Overflow)?;
            inner = name;
        }
        Ok(Self {
            num_blocks,
            kv_heads,
            block_size,
            head_dim,
            block_stride,
            kv_stride,
            head_stride,
            token_stride,
            len: span,
        })
    }

    /// Blocks in the pool.
    #[must_use]
    pub const fn num_blocks(&self) -> u32 {
        self.num_blocks
    }
    /// Key/value heads.
    #[must_use]
    pub const fn kv_heads(&self) -> u32 {
        self.kv_heads
    }
    /// Tokens per block.
    #[must_use]
    pub const fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Elements per head.
    #[must_use]
    pub const fn head_dim(&self) -> u32 {
        self.head_dim
    }
    /// Element strides `[block, kv, head, token]`.
    #[must_use]
    pub const fn strides(&self) -> [u64; 4] {
        [
            self.block_stride,
            self.kv_stride,
            self.head_stride,
            self.token_stride,
        ]
    }
    /// Elements a buffer must hold for this layout (one past the largest offset).
    #[must_use]
    pub const fn len(&self) -> u64 {
        self.len
    }
    /// Always false: a layout has at least one element.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Elements of one block (its K and V, all heads), when a block occupies a contiguous
    /// range of `block_stride` elements (true of [`hnd`](Self::hnd) and [`nhd`](Self::nhd));
    /// `None` otherwise.
    #[must_use]
    pub const fn contiguous_block_len(&self) -> Option<u64> {
        let inner = 2 * self.kv_heads as u64 * self.block_size as u64 * self.head_dim as u64;
        if self.block_stride == inner && self.len == inner.saturating_mul(self.num_blocks as u64) {
            Some(inner)
        } else {
            None
        }
    }
    /// The offset of element 0 of the head row `(block, kv, head, token)`; the row's
    /// `head_dim` elements follow it. Arguments are not checked: callers index with validated
    /// tables.
    #[inline]
    #[must_use]
    pub const fn offset(&self, block: u32, kv: u32, head: u32, token: u32) -> u64 {
        block as u64 * self.block_stride
            + kv as u64 * self.kv_stride
            + head as u64 * self.head_stride
            + token as u64 * self.token_stride
    }
    /// Whether `other` has the same per-block shape (heads, block size, head size), so blocks
    /// can be copied between the two (a device pool and a host pool, say).
    #[must_use]
    pub const fn same_block_shape(&self, other: &PagedLayout) -> bool {
        self.kv_heads == other.kv_heads
            && self.block_size == other.block_size
            && self.head_dim == other.head_dim
    }
    /// Bytes of the whole tensor for elements of `dtype`.
    #[must_use]
    pub const fn bytes(&self, dtype: DType) -> u64 {
        self.len.saturating_mul(dtype.size_bytes())
    }
}

/// Why a [`PageTable`] was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PageTableError {
    /// An indptr array has the wrong length for the batch.
    #[error("`{array}` has {len} entries, expected {expected} (batch + 1)")]
    IndptrLength {
        /// Which array.
        array: &'static str,
        /// Its length.
        len: usize,
        /// batch + 1.
        expected: usize,
    },
    /// An indptr array does not start at 0, decreases, or does not end at its data length.
    #[error("`{array}` is not a valid CSR index at position {at}")]
    BadIndptr {
        /// Which array.
        array: &'static str,
        /// The first bad position.
        at: usize,
    },
    /// A sequence's pages cannot hold its length.
    #[error("sequence {seq} has {seq_len} tokens but only {pages} pages of {block_size}")]
    TooFewPages {
        /// Index of the sequence in the batch.
        seq: usize,
        /// Its length.
        seq_len: u32,
        /// Pages it has.
        pages: u32,
        /// Tokens per page.
        block_size: u32,
    },
    /// A sequence has more query tokens than KV tokens (queries are aligned to the end).
    #[error("sequence {seq} has {queries} query tokens but only {seq_len} KV tokens")]
    MoreQueriesThanKv {
        /// Index of the sequence in the batch.
        seq: usize,
        /// Its query tokens.
        queries: u32,
        /// Its KV length.
        seq_len: u32,
    },
    /// A page names a block outside the pool.
    #[error("page {page} names {block}, but the pool has {num_blocks} blocks")]
    BlockOutOfRange {
        /// Index into `kv_indices`.
        page: usize,
        /// The block named.
        block: BlockId,
        /// Blocks in the pool.
        num_blocks: u32,
    },
}

/// The block tables of a batch in CSR form (FlashInfer's convention): sequence `i` owns pages
/// `kv_indices[kv_indptr[i]..kv_indptr[i + 1]]`, holds `seq_lens[i]` KV tokens (including the
/// new ones), and has query tokens `qo_indptr[i]..qo_indptr[i + 1]` of the ragged query
/// tensor, aligned to the end of its KV (the last query token sees the whole context).
///
/// ```
/// use kvc_core::{BlockId, PagedLayout, PageTable};
///
/// let layout = PagedLayout::hnd(64, 8, 16, 128)?;
/// // Two decoding sequences of 20 and 3 tokens.
/// let table = PageTable::for_decode(
///     vec![0, 2, 3],
///     vec![BlockId(7), BlockId(9), BlockId(4)],
///     vec![20, 3],
///     &layout,
/// )?;
/// assert_eq!(table.batch(), 2);
/// assert_eq!(table.pages(0), &[BlockId(7), BlockId(9)]);
/// assert_eq!(table.queries(1), 1..2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageTable {
    qo_indptr: Vec<u32>,
    kv_indptr: Vec<u32>,
    kv_indices: Vec<BlockId>,
    seq_lens: Vec<u32>,
    block_size: u32,
}

fn check_indptr(
    array: &'static str,
    indptr: &[u32],
    batch: usize,
    end: usize,
) -> Result<(), PageTableError> {
    if indptr.len() != batch + 1 {
        return Err(PageTableError::IndptrLength {
            array,
            len: indptr.len(),
            expected: batch + 1,
        });
    }
    if indptr[0] != 0 {
        return Err(PageTableError::BadIndptr { array, at: 0 });
    }
    if let Some(at) = indptr.windows(2).position(|w| w[1] < w[0]) {
        return Err(PageTableError::BadIndptr { array, at: at + 1 });
    }
    if indptr[batch] as usize != end {
        return Err(PageTableError::BadIndptr { array, at: batch });
    }
    Ok(())
}

impl PageTable {
    /// Validates a batch page table against `layout`.
    pub fn new(
        qo_indptr: Vec<u32>,
        kv_indptr: Vec<u32>,
        kv_indices: Vec<BlockId>,
        seq_lens: Vec<u32>,
        layout: &PagedLayout,
    ) -> Result<Self, PageTableError> {
        let batch = seq_lens.len();
        check_indptr("kv_indptr", &kv_indptr, batch, kv_indices.len())?;
        let total_q = qo_indptr.last().copied().unwrap_or(0) as usize;
        check_indptr("qo_indptr", &qo_indptr, batch, total_q)?;
        let bs = layout.block_size();
        for (seq, &seq_len) in seq_lens.iter().enumerate() {
            let pages = kv_indptr[seq + 1] - kv_indptr[seq];
            if u64::from(pages) * u64::from(bs) < u64::from(seq_len) {
                return Err(PageTableError::TooFewPages {
                    seq,
                    seq_len,
                    pages,
                    block_size: bs,
                });
            }
            let queries = qo_indptr[seq + 1] - qo_indptr[seq];
            if queries > seq_len {
                return Err(PageTableError::MoreQueriesThanKv {
                    seq,
                    queries,
                    seq_len,
                });
            }
        }
        if let Some(page) = kv_indices
            .iter()
            .position(|b| b.get() >= layout.num_blocks())
        {
            return Err(PageTableError::BlockOutOfRange {
                page,
                block: kv_indices[page],
                num_blocks: layout.num_blocks(),
            });
        }
        Ok(Self {
            qo_indptr,
            kv_indptr,
            kv_indices,
            seq_lens,
            block_size: bs,
        })
    }

    /// A decode batch: one query token per sequence (`qo_indptr = 0, 1, …, batch`).
    pub fn for_decode(
        kv_indptr: Vec<u32>,
        kv_indices: Vec<BlockId>,
        seq_lens: Vec<u32>,
        layout: &PagedLayout,
    ) -> Result<Self, PageTableError> {
        let qo_indptr = (0..=seq_lens.len() as u32).collect();
        Self::new(qo_indptr, kv_indptr, kv_indices, seq_lens, layout)
    }

    /// Sequences in the batch.
    #[must_use]
    pub fn batch(&self) -> usize {
        self.seq_lens.len()
    }
    /// Query tokens of the whole batch.
    #[must_use]
    pub fn total_queries(&self) -> usize {
        self.qo_indptr[self.batch()] as usize
    }
    /// Tokens per page of the layout this table was validated against.
    #[must_use]
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// The query rows of sequence `seq`.
    #[must_use]
    pub fn queries(&self, seq: usize) -> std::ops::Range<usize> {
        self.qo_indptr[seq] as usize..self.qo_indptr[seq + 1] as usize
    }
    /// The pages of sequence `seq`, in token order.
    #[must_use]
    pub fn pages(&self, seq: usize) -> &[BlockId] {
        &self.kv_indices[self.kv_indptr[seq] as usize..self.kv_indptr[seq + 1] as usize]
    }
    /// KV tokens of sequence `seq`.
    #[must_use]
    pub fn seq_len(&self, seq: usize) -> u32 {
        self.seq_lens[seq]
    }
    /// The raw CSR arrays `(qo_indptr, kv_indptr, kv_indices, seq_lens)`, as a device upload
    /// needs them.
    #[must_use]
    pub fn raw(&self) -> (&[u32], &[u32], &[BlockId], &[u32]) {
        (
            &self.qo_indptr,
            &self.kv_indptr,
            &self.kv_indices,
            &self.seq_lens,
        )
    }
    /// Whether this table may be used with `layout`: same block size, and every page inside
    /// its pool.
    #[must_use]
    pub fn fits(&self, layout: &PagedLayout) -> bool {
        layout.block_size() == self.block_size
            && self
                .kv_indices
                .iter()
                .all(|b| b.get() < layout.num_blocks())
    }
}

/// Why a [`SlotMapping`] was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SlotMappingError {
    /// A slot is below −1 or past the pool's last token slot.
    #[error("slot {slot} of token {token} is outside 0..{slots} (or -1 to skip)")]
    OutOfRange {
        /// The token's index.
        token: usize,
        /// The slot given.
        slot: i64,
        /// Slots in the pool (`num_blocks × block_size`).
        slots: u64,
    },
    /// Two tokens write the same slot.
    #[error("tokens {first} and {second} both write slot {slot}")]
    Duplicate {
        /// The earlier token.
        first: usize,
        /// The later token.
        second: usize,
        /// The shared slot.
        slot: i64,
    },
}

/// Where each new token's K/V is written: slot `s` is token `s % block_size` of block
/// `s / block_size`; `-1` skips the token (padding). Validated: every slot is inside the pool
/// and no two tokens share one, so writes can run in parallel.
///
/// ```
/// use kvc_core::{PagedLayout, SlotMapping};
///
/// let layout = PagedLayout::hnd(4, 2, 16, 64)?;
/// let slots = SlotMapping::new(vec![17, -1, 63], &layout)?;
/// assert_eq!(slots.get(0), Some((1, 1)));
/// assert_eq!(slots.get(1), None);
/// assert!(SlotMapping::new(vec![64], &layout).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotMapping {
    slots: Vec<i64>,
    block_size: u32,
}

impl SlotMapping {
    /// Validates `slots` against `layout`.
    pub fn new(slots: Vec<i64>, layout: &PagedLayout) -> Result<Self, SlotMappingError> {
        let total = u64::from(layout.num_blocks()) * u64::from(layout.block_size());
        let mut seen: Vec<(i64, usize)> = Vec::with_capacity(slots.len());
        for (token, &slot) in slots.iter().enumerate() {
            if slot < -1 || (slot >= 0 && slot as u64 >= total) {
                return Err(SlotMappingError::OutOfRange {
                    token,
                    slot,
                    slots: total,
                });
            }
            if slot >= 0 {
                seen.push((slot, token));
            }
        }
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(SlotMappingError::Duplicate {
                first: w[0].1.min(w[1].1),
                second: w[0].1.max(w[1].1),
                slot: w[0].0,
            });
        }
        Ok(Self {
            slots,
            block_size: layout.block_size(),
        })
    }

    /// Tokens mapped (including skipped ones).
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    /// Whether no token is mapped.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    /// Token `token`'s `(block, position in block)`, or `None` when skipped or past the end.
    #[must_use]
    pub fn get(&self, token: usize) -> Option<(u32, u32)> {
        let slot = *self.slots.get(token)?;
        if slot < 0 {
            return None;
        }
        let bs = i64::from(self.block_size);
        Some(((slot / bs) as u32, (slot % bs) as u32))
    }
    /// The raw slots, as a device upload needs them.
    #[must_use]
    pub fn raw(&self) -> &[i64] {
        &self.slots
    }
    /// Tokens per block of the layout this mapping was validated against.
    #[must_use]
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_must_not_overlap() {
        assert_eq!(
            PagedLayout::with_strides(4, 2, 16, 64, [64, 0, 0, 0]),
            Err(PagedLayoutError::OverlappingStrides {
                inner: "element",
                span: 1,
                outer: "token",
                stride: 0
            })
        );
        assert!(PagedLayout::with_strides(4, 2, 16, 64, [4096, 2048, 64, 128]).is_ok());
        // Padding between blocks is allowed.
        let padded = PagedLayout::with_strides(4, 2, 16, 64, [5000, 2048, 1024, 64]).unwrap();
        assert_eq!(padded.len(), 3 * 5000 + 4096);
        assert_eq!(padded.contiguous_block_len(), None);
        assert_eq!(
            PagedLayout::hnd(0, 1, 1, 1),
            Err(PagedLayoutError::ZeroDimension { dim: "num_blocks" })
        );
    }

    #[test]
    fn huge_layouts_use_64_bit_offsets() {
        let l = PagedLayout::hnd(32_768, 64, 32, 256).unwrap();
        assert_eq!(l.len(), 32_768 * 2 * 64 * 32 * 256);
        assert!(l.len() > u64::from(u32::MAX));
        assert_eq!(l.contiguous_block_len(), Some(2 * 64 * 32 * 256));
        assert_eq!(
            PagedLayout::hnd(u32::MAX, u32::MAX, u32::MAX, u32::MAX),
            Err(PagedLayoutError::Overflow)
        );
    }

    #[test]
    fn page_table_validation() {
        let l = PagedLayout::hnd(8, 1, 4, 8).unwrap();
        let ok = PageTable::new(
            vec![0, 3, 4],
            vec![0, 2, 3],
            vec![BlockId(1), BlockId(2), BlockId(7)],
            vec![8, 1],
            &l,
        );
        assert!(ok.is_ok());
        assert_eq!(
            PageTable::for_decode(vec![0, 1], vec![BlockId(1)], vec![5], &l),
            Err(PageTableError::TooFewPages {
                seq: 0,
                seq_len: 5,
                pages: 1,
                block_size: 4
            })
        );
        assert_eq!(
            PageTable::for_decode(vec![0, 1], vec![BlockId(8)], vec![1], &l),
            Err(PageTableError::BlockOutOfRange {
                page: 0,
                block: BlockId(8),
                num_blocks: 8
            })
        );
        assert_eq!(
            PageTable::for_decode(vec![0, 2, 1], vec![BlockId(1)], vec![1, 0], &l),
            Err(PageTableError::BadIndptr {
                array: "kv_indptr",
                at: 2
            })
        );
        assert_eq!(
            PageTable::new(vec![0, 3], vec![0, 1], vec![BlockId(1)], vec![2], &l),
            Err(PageTableError::MoreQueriesThanKv {
                seq: 0,
                queries: 3,
                seq_len: 2
            })
        );
        assert_eq!(
            PageTable::for_decode(vec![0], vec![], vec![1], &l),
            Err(PageTableError::IndptrLength {
                array: "kv_indptr",
                len: 1,
                expected: 2
            })
        );
    }

    #[test]
    fn slot_mapping_validation() {
        let l = PagedLayout::hnd(2, 1, 4, 8).unwrap();
        assert_eq!(
            SlotMapping::new(vec![3, -2], &l),
            Err(SlotMappingError::OutOfRange {
                token: 1,
                slot: -2,
                slots: 8
            })
        );
        assert_eq!(
            SlotMapping::new(vec![5, -1, 5], &l),
            Err(SlotMappingError::Duplicate {
                first: 0,
                second: 2,
                slot: 5
            })
        );
        let m = SlotMapping::new(vec![7, -1, -1], &l).unwrap();
        assert_eq!(m.get(0), Some((1, 3)));
        assert_eq!(m.get(2), None);
        assert_eq!(m.get(3), None);
    }
}
