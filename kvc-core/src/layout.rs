//! The shape of KV memory: how many bytes a token and a block of tokens take.

use thiserror::Error;

/// The storage type of K and V elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit float (e4m3), for quantised KV caches.
    Fp8E4M3,
}

impl DType {
    /// Bytes per element.
    #[inline]
    #[must_use]
    pub const fn size_bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Fp8E4M3 => 1,
        }
    }
}

/// A dimension of a [`KvLayout`], named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutDim {
    /// Transformer layers.
    Layers,
    /// Key/value heads per layer.
    KvHeads,
    /// Elements per head.
    HeadDim,
    /// Tokens per block.
    BlockSize,
}

/// Why a [`KvLayout`] could not be built.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// A dimension was zero.
    #[error("KV layout dimension {dim:?} must be at least 1")]
    ZeroDimension {
        /// The dimension that was zero.
        dim: LayoutDim,
    },
    /// Bytes per block do not fit in 64 bits.
    #[error("KV layout too large: bytes per block overflow 64 bits")]
    Overflow,
}

/// The shape of a model's KV cache, enough to size memory.
///
/// Per layer, K and V of one token take `2 × kv_heads × head_dim` elements.
///
/// ```
/// use kvc_core::{DType, KvLayout};
/// // Llama-2-13B: 40 layers, 40 KV heads of 128, fp16.
/// let layout = KvLayout::new(40, 40, 128, 16, DType::F16).unwrap();
/// assert_eq!(layout.bytes_per_token(), 800 * 1024);
/// assert_eq!(layout.bytes_per_block(), 16 * 800 * 1024);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvLayout {
    num_layers: u32,
    kv_heads: u32,
    head_dim: u32,
    block_size: u32,
    dtype: DType,
    bytes_per_token: u64,
    bytes_per_block: u64,
}

impl KvLayout {
    /// Builds a layout, rejecting zero dimensions and sizes that overflow `u64`.
    pub fn new(
        num_layers: u32,
        kv_heads: u32,
        head_dim: u32,
        block_size: u32,
        dtype: DType,
    ) -> Result<Self, LayoutError> {
        for (value, dim) in [
            (num_layers, LayoutDim::Layers),
            (kv_heads, LayoutDim::KvHeads),
            (head_dim, LayoutDim::HeadDim),
            (block_size, LayoutDim::BlockSize),
        ] {
            if value == 0 {
                return Err(LayoutError::ZeroDimension { dim });
            }
        }
        let bytes_per_token = 2u64
            .checked_mul(u64::from(num_layers))
            .and_then(|v| v.checked_mul(u64::from(kv_heads)))
            .and_then(|v| v.checked_mul(u64::from(head_dim)))
            .and_then(|v| v.checked_mul(dtype.size_bytes()))
            .ok_or(LayoutError::Overflow)?;
        let bytes_per_block = bytes_per_token
            .checked_mul(u64::from(block_size))
            .ok_or(LayoutError::Overflow)?;
        Ok(Self {
            num_layers,
            kv_heads,
            head_dim,
            block_size,
            dtype,
            bytes_per_token,
            bytes_per_block,
        })
    }

    /// Transformer layers.
    #[must_use]
    pub const fn num_layers(&self) -> u32 {
        self.num_layers
    }
    /// Key/value heads per layer.
    #[must_use]
    pub const fn kv_heads(&self) -> u32 {
        self.kv_heads
    }
    /// Elements per head.
    #[must_use]
    pub const fn head_dim(&self) -> u32 {
        self.head_dim
    }
    /// Tokens per block.
    #[must_use]
    pub const fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Element type.
    #[must_use]
    pub const fn dtype(&self) -> DType {
        self.dtype
    }
    /// Bytes of K and V for one token across all layers.
    #[must_use]
    pub const fn bytes_per_token(&self) -> u64 {
        self.bytes_per_token
    }
    /// Bytes of K and V for one block across all layers.
    #[must_use]
    pub const fn bytes_per_block(&self) -> u64 {
        self.bytes_per_block
    }
    /// Blocks needed to hold `tokens` tokens (the last block may be partly filled).
    #[must_use]
    pub const fn blocks_for_tokens(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.block_size as u64)
    }
    /// Whole blocks that fit in `bytes` of memory.
    #[must_use]
    pub const fn blocks_in_bytes(&self, bytes: u64) -> u64 {
        bytes / self.bytes_per_block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_dimensions_are_named() {
        assert_eq!(
            KvLayout::new(1, 0, 64, 16, DType::F16),
            Err(LayoutError::ZeroDimension {
                dim: LayoutDim::KvHeads
            })
        );
        assert_eq!(
            KvLayout::new(1, 1, 64, 0, DType::F16),
            Err(LayoutError::ZeroDimension {
                dim: LayoutDim::BlockSize
            })
        );
    }

    #[test]
    fn overflow_is_an_error() {
        assert_eq!(
            KvLayout::new(u32::MAX, u32::MAX, u32::MAX, 1, DType::F32),
            Err(LayoutError::Overflow)
        );
        assert_eq!(
            KvLayout::new(u32::MAX, u32::MAX, 2, u32::MAX, DType::F32),
            Err(LayoutError::Overflow)
        );
    }

    #[test]
    fn llama3_8b_sizes() {
        // 32 layers, 8 KV heads of 128, bf16: 128 KiB per token.
        let l = KvLayout::new(32, 8, 128, 16, DType::BF16).unwrap();
        assert_eq!(l.bytes_per_token(), 131_072);
        assert_eq!(l.bytes_per_block(), 2_097_152);
        assert_eq!(l.blocks_for_tokens(17), 2);
        assert_eq!(l.blocks_for_tokens(0), 0);
        assert_eq!(l.blocks_in_bytes(10 * 2_097_152 + 5), 10);
    }
}
