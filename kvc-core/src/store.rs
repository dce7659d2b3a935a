//! [`BlockStore`]: a store of KV blocks below device memory (a host pool, a disk, a shared
//! server), keyed by the chained block hash within a [`StoreNamespace`].
//!
//! The namespace pins down everything besides the tokens that decides what the bytes of a block
//! mean: the model, the KV layout (layers, heads, head size, tokens per block), the element type
//! and the tensor-parallel rank that holds this slice of the heads. A store is opened for one
//! namespace; stores that persist data (a disk folder, a shared server) keep the namespace in
//! every stored value and check it on every read, so a block written by another model, layout,
//! dtype or rank is never read back as KV, even when its hash collides.
//!
//! Every operation is batched: keys come as a slice and payloads as one contiguous buffer of
//! `keys.len() × block_bytes` bytes, so a transfer can move large contiguous runs. Methods take
//! `&self`: stores are internally synchronised, so a loader thread and a scheduler can share one.
//!
//! ```
//! use kvc_core::{DType, KvLayout, StoreNamespace};
//!
//! let layout = KvLayout::new(32, 8, 128, 16, DType::BF16)?;
//! let ns = StoreNamespace::new("meta-llama/Llama-3.1-8B", layout, 0, 1)?;
//! assert_eq!(ns.block_bytes(), 2 << 20);
//! let other_rank = StoreNamespace::new("meta-llama/Llama-3.1-8B", layout, 1, 2)?;
//! assert_ne!(ns.fingerprint(), other_rank.fingerprint());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use thiserror::Error;

use crate::{DType, KvLayout};

/// The key of a stored block: the chained block hash of its tokens and every token before it
/// (the value of `kvc_reuse::BlockHash`), which already mixes in the model version, adapter
/// and tenant salt.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct StoreKey(pub u128);

impl StoreKey {
    /// The 16 little-endian bytes of the key.
    #[inline]
    #[must_use]
    pub const fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    /// The key from its 16 little-endian bytes.
    #[inline]
    #[must_use]
    pub const fn from_le_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_le_bytes(bytes))
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key#{:032x}", self.0)
    }
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Why a [`StoreNamespace`] could not be built.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NamespaceError {
    /// The model id was empty.
    #[error("store namespace: the model id is empty")]
    EmptyModel,
    /// The model id is longer than 255 bytes.
    #[error("store namespace: the model id is {len} bytes, at most 255")]
    ModelTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The tensor-parallel rank is not below the tensor-parallel size.
    #[error("store namespace: tensor-parallel rank {rank} of {size} ranks")]
    BadRank {
        /// The rank.
        rank: u32,
        /// The number of ranks.
        size: u32,
    },
}

/// What a stored block's bytes mean besides its tokens: model, layout, dtype, tensor-parallel
/// rank and block size (the last two inside [`KvLayout`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StoreNamespace {
    model: String,
    layout: KvLayout,
    tp_rank: u32,
    tp_size: u32,
}

const NAMESPACE_TAG: &[u8] = b"kvc-store-ns/1";

/// The stable code of a dtype in stored headers (never reorder).
const fn dtype_code(dtype: DType) -> u8 {
    match dtype {
        DType::F32 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
        DType::Fp8E4M3 => 4,
    }
}

impl StoreNamespace {
    /// The namespace of `model`'s KV as held by tensor-parallel rank `tp_rank` of `tp_size`;
    /// `layout` is this rank's slice (its KV heads).
    pub fn new(
        model: impl Into<String>,
        layout: KvLayout,
        tp_rank: u32,
        tp_size: u32,
    ) -> Result<Self, NamespaceError> {
        let model = model.into();
        if model.is_empty() {
            return Err(NamespaceError::EmptyModel);
        }
        if model.len() > 255 {
            return Err(NamespaceError::ModelTooLong { len: model.len() });
        }
        if tp_rank >= tp_size {
            return Err(NamespaceError::BadRank {
                rank: tp_rank,
                size: tp_size,
            });
        }
        Ok(Self {
            model,
            layout,
            tp_rank,
            tp_size,
        })
    }

    /// The model id.
    #[must_use]
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The KV layout of this rank.
    #[must_use]
    pub const fn layout(&self) -> KvLayout {
        self.layout
    }

    /// The tensor-parallel rank and the number of ranks.
    #[must_use]
    pub const fn tp(&self) -> (u32, u32) {
        (self.tp_rank, self.tp_size)
    }

    /// Bytes of one stored block (K and V of all layers of this rank).
    #[must_use]
    pub const fn block_bytes(&self) -> u64 {
        self.layout.bytes_per_block()
    }

    /// The canonical encoding stored in every persisted block header and compared byte for
    /// byte on read: a domain tag, then each field little-endian, the model id length-prefixed.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let l = &self.layout;
        let mut out = Vec::with_capacity(NAMESPACE_TAG.len() + 1 + self.model.len() + 25);
        out.extend_from_slice(NAMESPACE_TAG);
        // The constructor bounds the model id to 255 bytes.
        out.push(self.model.len() as u8);
        out.extend_from_slice(self.model.as_bytes());
        for v in [l.num_layers(), l.kv_heads(), l.head_dim(), l.block_size()] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(dtype_code(l.dtype()));
        out.extend_from_slice(&self.tp_rank.to_le_bytes());
        out.extend_from_slice(&self.tp_size.to_le_bytes());
        out
    }

    /// A stable 64-bit digest of [`encode`](Self::encode) (FNV-1a), the same in every process
    /// and version: stores put it in file and key names. Not collision resistant; stores
    /// compare the full encoding too.
    #[must_use]
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.encode() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

/// Why a store operation failed. Misses (a block evicted, corrupt, written under another
/// namespace, or a shared server out of reach) are not errors: they are reported as not found.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The payload buffer is not `blocks × block_bytes` bytes long.
    #[error("buffer of {len} bytes for {blocks} blocks of {block_bytes} bytes")]
    BufferSize {
        /// Keys in the batch.
        blocks: usize,
        /// Bytes per block of the store.
        block_bytes: u64,
        /// The buffer's length.
        len: usize,
    },
    /// The store's medium failed (a disk write error, say) in a way that is not a miss.
    #[error("store {op} failed: {message}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The cause.
        message: String,
    },
}

/// What a [`BlockStore::put`] did with each block of the batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use = "the outcome says which blocks were not stored"]
pub struct PutOutcome {
    /// Blocks written.
    pub stored: usize,
    /// Blocks the store already held (not rewritten).
    pub present: usize,
    /// Blocks the store declined: below its minimum retention priority, larger than its
    /// budget, or being uploaded by another writer (a lease).
    pub skipped: usize,
    /// Blocks not stored because the medium was out of reach (a shared server down).
    pub unavailable: usize,
    /// Blocks the store evicted to make room.
    pub evicted: usize,
}

impl PutOutcome {
    /// Adds another outcome's counts to this one.
    pub fn add(&mut self, other: PutOutcome) {
        self.stored += other.stored;
        self.present += other.present;
        self.skipped += other.skipped;
        self.unavailable += other.unavailable;
        self.evicted += other.evicted;
    }
}

/// How full a store is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Blocks held. A store whose server expires or evicts entries on its own, out of its
    /// sight, reports an upper bound instead (`kvc_tier::SharedTier`: the blocks it stored).
    pub blocks: u64,
    /// Bytes held (payload and headers); an upper bound where `blocks` is one.
    pub bytes: u64,
    /// The byte budget, if the store has one it can see (a shared server's is its own).
    pub capacity_bytes: Option<u64>,
}

/// A store of KV blocks below device memory, for one [`StoreNamespace`].
///
/// `found` vectors are cleared and filled with one flag per key. Payload buffers hold the
/// blocks of the batch back to back, `keys.len() × block_bytes()` bytes; a buffer of another
/// length is [`StoreError::BufferSize`] and nothing is done.
pub trait BlockStore {
    /// The namespace this store serves.
    fn namespace(&self) -> &StoreNamespace;

    /// Bytes of one block.
    fn block_bytes(&self) -> u64 {
        self.namespace().block_bytes()
    }

    /// Which keys the store holds; returns how many. A hint: the block may be gone by the time
    /// it is read.
    fn contains(&self, keys: &[StoreKey], found: &mut Vec<bool>) -> Result<usize, StoreError>;

    /// Copies the held blocks of `keys` into their slots of `dst`; returns how many were found.
    /// Use only the slots `found` marks: the slot of a block not found may hold partial data
    /// (a disk page found corrupt halfway through its read, say).
    fn get(
        &self,
        keys: &[StoreKey],
        dst: &mut [u8],
        found: &mut Vec<bool>,
    ) -> Result<usize, StoreError>;

    /// Stores the blocks of `src` under `keys` with retention `priority` (0–100, as
    /// [`Retention`](crate::Retention)), in force for as long as the store keeps them.
    fn put(&self, keys: &[StoreKey], src: &[u8], priority: u8) -> Result<PutOutcome, StoreError>;

    /// [`put`](Self::put) with a retention that may expire: its priority is in force until
    /// `retention.until` (the caller's clock, in ms, as `now_ms`) and the default after, as on
    /// the device. A store that ranks what it keeps by priority (the host tier) honours the
    /// expiry; the default stores at the priority in force at `now_ms`.
    fn put_retained(
        &self,
        keys: &[StoreKey],
        src: &[u8],
        retention: crate::Retention,
        now_ms: u64,
    ) -> Result<PutOutcome, StoreError> {
        self.put(keys, src, retention.priority_at(now_ms))
    }

    /// Forgets `keys`; returns how many were held.
    fn remove(&self, keys: &[StoreKey]) -> Result<usize, StoreError>;

    /// How full the store is (see [`StoreUsage`]: an upper bound for a store whose server
    /// drops entries on its own).
    fn usage(&self) -> StoreUsage;

    /// How many leading keys the store holds (the longest stored prefix of a chain).
    fn contains_prefix(&self, keys: &[StoreKey]) -> Result<usize, StoreError> {
        let mut found = Vec::with_capacity(keys.len());
        self.contains(keys, &mut found)?;
        Ok(found.iter().take_while(|&&f| f).count())
    }
}

/// Checks that `len` bytes hold `blocks` blocks of `block_bytes` bytes.
pub fn check_buffer(blocks: usize, block_bytes: u64, len: usize) -> Result<(), StoreError> {
    let expected = (blocks as u128) * u128::from(block_bytes);
    if expected == len as u128 {
        Ok(())
    } else {
        Err(StoreError::BufferSize {
            blocks,
            block_bytes,
            len,
        })
    }
}

/// The tiers below device memory as a memory manager consults them after a device miss: how
/// many leading blocks of a prompt some tier holds.
///
/// Implemented by `kvc_tier::TierStack`. A memory manager (kvc-sched's `KvManager`) may not
/// depend on the tiers' crate, so the two meet through this trait. It only answers lookups: the
/// bytes move in the engine, which executes the manager's offload and load lists against the
/// tiers themselves.
///
/// ```
/// use std::collections::HashSet;
/// use kvc_core::{LowerTiers, StoreKey};
///
/// /// Tiers that hold a fixed set of blocks.
/// #[derive(Debug)]
/// struct Held(HashSet<StoreKey>);
///
/// impl LowerTiers for Held {
///     fn longest_prefix(&self, keys: &[StoreKey]) -> usize {
///         keys.iter().take_while(|k| self.0.contains(k)).count()
///     }
/// }
///
/// let tiers = Held([StoreKey(1), StoreKey(2)].into_iter().collect());
/// assert_eq!(tiers.longest_prefix(&[StoreKey(1), StoreKey(2), StoreKey(3)]), 2);
/// assert_eq!(tiers.longest_prefix(&[StoreKey(2)]), 1);
/// assert_eq!(tiers.longest_prefix(&[StoreKey(3), StoreKey(1)]), 0);
/// ```
pub trait LowerTiers: Send + Sync + fmt::Debug {
    /// How many leading `keys` some tier below device memory holds (the longest prefix, each
    /// block in any tier). An unreachable tier counts as a miss, never an error or a hang.
    /// A later load may still find fewer blocks (evicted meanwhile): the answer is a hint.
    fn longest_prefix(&self, keys: &[StoreKey]) -> usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(block: u32, dtype: DType) -> KvLayout {
        KvLayout::new(2, 2, 8, block, dtype).unwrap()
    }

    #[test]
    fn every_field_changes_the_encoding() {
        let base = StoreNamespace::new("m", layout(16, DType::F16), 0, 1).unwrap();
        let others = [
            StoreNamespace::new("n", layout(16, DType::F16), 0, 1).unwrap(),
            StoreNamespace::new("m", layout(8, DType::F16), 0, 1).unwrap(),
            StoreNamespace::new("m", layout(16, DType::BF16), 0, 1).unwrap(),
            StoreNamespace::new("m", layout(16, DType::F16), 0, 2).unwrap(),
            StoreNamespace::new("m", layout(16, DType::F16), 1, 2).unwrap(),
            StoreNamespace::new("m", KvLayout::new(2, 4, 8, 16, DType::F16).unwrap(), 0, 1)
                .unwrap(),
        ];
        for o in &others {
            assert_ne!(base.encode(), o.encode(), "{o:?}");
            assert_ne!(base.fingerprint(), o.fingerprint(), "{o:?}");
        }
        // Stable across processes and versions: a fixed value.
        let again = StoreNamespace::new("m", layout(16, DType::F16), 0, 1).unwrap();
        assert_eq!(base.fingerprint(), again.fingerprint());
        assert_eq!(base.fingerprint(), 11_122_341_944_651_452_128);
        assert_eq!(base.block_bytes(), 2 * 2 * 2 * 8 * 2 * 16);
    }

    #[test]
    fn bad_namespaces_are_refused() {
        let l = layout(16, DType::F16);
        assert_eq!(
            StoreNamespace::new("", l, 0, 1),
            Err(NamespaceError::EmptyModel)
        );
        assert_eq!(
            StoreNamespace::new("x".repeat(256), l, 0, 1),
            Err(NamespaceError::ModelTooLong { len: 256 })
        );
        assert_eq!(
            StoreNamespace::new("m", l, 2, 2),
            Err(NamespaceError::BadRank { rank: 2, size: 2 })
        );
    }

    #[test]
    fn buffers_must_match_the_batch() {
        assert!(check_buffer(3, 10, 30).is_ok());
        assert_eq!(
            check_buffer(3, 10, 29),
            Err(StoreError::BufferSize {
                blocks: 3,
                block_bytes: 10,
                len: 29
            })
        );
        let mut total = PutOutcome {
            stored: 1,
            ..PutOutcome::default()
        };
        total.add(PutOutcome {
            stored: 2,
            evicted: 1,
            ..PutOutcome::default()
        });
        assert_eq!((total.stored, total.evicted), (3, 1));
        assert_eq!(StoreKey(1).to_le_bytes()[0], 1);
        assert_eq!(
            StoreKey::from_le_bytes(StoreKey(77).to_le_bytes()),
            StoreKey(77)
        );
    }
}
