//! Chained block hashing: `h_i = H(h_{i-1}, tokens of full block i)`, with `h_{-1}` a root
//! derived from the namespace (model id and version), the adapter id and the tenant's cache
//! salt, so those are mixed into the first block and hence into every block after it.
//!
//! Block identity must be the same in every process, on every platform and in every version of
//! this crate (KV events and shared tiers compare hashes), so the encoding is fixed here:
//! tokens are little-endian `u32`s, the parent is its 16 little-endian bytes, and the root
//! encodes each field with a length prefix after a domain tag. Never `DefaultHasher` or
//! `ahash` (seeded per process) for block identity; those are for in-memory maps only.
//!
//! Three hashers:
//! - [`Blake3Hasher`] (the default): BLAKE3 truncated to 128 bits. Collision resistant: safe
//!   when tenants do not trust each other (no one can craft a prompt whose blocks collide with
//!   another tenant's, or probe for them).
//! - [`Blake3KeyedHasher`]: BLAKE3 keyed by the parent hash, truncated to 128 bits. Just as
//!   collision resistant and safe across tenants, and about twice as fast: a 16-token block
//!   is one BLAKE3 compression. Its hashes differ from [`Blake3Hasher`]'s, so a deployment
//!   picks one and keeps it (KV events and shared tiers compare hashes).
//! - [`Xxh3Hasher`]: XXH3-128, several times faster, stable and well distributed, but **not**
//!   collision resistant: an adversary can construct colliding blocks. Use it for a single
//!   tenant, or tenants that trust each other, and for replay and benchmarks.

use std::fmt;

/// The identity of a cached block: the chained hash of its tokens and all tokens before it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct BlockHash(pub u128);

impl BlockHash {
    /// The low 64 bits: the short form used where a `u64` key is expected (for example
    /// `kvc_core::ReuseIndex::set_retention` and KV event consumers that take 64-bit hashes).
    #[inline]
    #[must_use]
    pub const fn short(self) -> u64 {
        self.0 as u64
    }

    /// The 16 little-endian bytes of the hash.
    #[inline]
    #[must_use]
    pub const fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({:032x})", self.0)
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// What, besides the tokens, decides whether two blocks hold the same KV: mixed into the root
/// of every chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct HashExtra {
    /// The model id (for example `"meta-llama/Llama-3.1-8B"`).
    pub model: String,
    /// The model version: bump it on any weight or tokenizer change, and no older block hits.
    pub model_version: u32,
    /// The LoRA / adapter id, if any.
    pub adapter: Option<u64>,
    /// The tenant's cache salt: tenants with different salts never share a block.
    pub salt: Vec<u8>,
}

impl HashExtra {
    /// The extra for `model` at `version`, with no adapter and an empty salt.
    #[must_use]
    pub fn new(model: impl Into<String>, model_version: u32) -> Self {
        Self {
            model: model.into(),
            model_version,
            adapter: None,
            salt: Vec::new(),
        }
    }

    /// The same extra with a tenant cache salt.
    #[must_use]
    pub fn with_salt(mut self, salt: impl Into<Vec<u8>>) -> Self {
        self.salt = salt.into();
        self
    }

    /// The same extra with an adapter id.
    #[must_use]
    pub fn with_adapter(mut self, adapter: u64) -> Self {
        self.adapter = Some(adapter);
        self
    }

    /// The fixed byte encoding of the extra that the root hash covers.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.model.len() + self.salt.len());
        out.extend_from_slice(ROOT_TAG);
        out.extend_from_slice(&(self.model.len() as u64).to_le_bytes());
        out.extend_from_slice(self.model.as_bytes());
        out.extend_from_slice(&self.model_version.to_le_bytes());
        match self.adapter {
            None => out.push(0),
            Some(a) => {
                out.push(1);
                out.extend_from_slice(&a.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.salt.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.salt);
        out
    }
}

/// Domain tag of root hashes (version 1 of the encoding).
const ROOT_TAG: &[u8] = b"kvc-reuse/block-hash/v1/root";

/// A stable chained block hasher.
pub trait BlockHasher {
    /// A short name (`"blake3"`, `"xxh3"`).
    fn name(&self) -> &'static str;

    /// The root of every chain under `extra`: the "parent" of the first block.
    fn root(&self, extra: &HashExtra) -> BlockHash;

    /// The hash of a block of `tokens` whose predecessor (or root) is `parent`.
    fn chain(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash;

    /// Appends to `out` the hashes of every full `block_size`-token block of `tokens`, chained
    /// from `root`. A trailing partial block is not hashed. `block_size` 0 hashes nothing.
    fn hash_blocks(
        &self,
        root: BlockHash,
        tokens: &[u32],
        block_size: usize,
        out: &mut Vec<BlockHash>,
    ) {
        if block_size == 0 {
            return;
        }
        let mut parent = root;
        for block in tokens.chunks_exact(block_size) {
            parent = self.chain(parent, block);
            out.push(parent);
        }
    }
}

/// Calls `f` with the little-endian bytes of `tokens`, without allocating for small blocks
/// (and, for blocks of up to 16 tokens, the usual size, with a 64-byte buffer to fill).
#[inline]
fn with_le_bytes<R>(tokens: &[u32], f: impl FnOnce(&[u8]) -> R) -> R {
    const SMALL: usize = 16;
    const STACK: usize = 128;
    if tokens.len() <= SMALL {
        let mut buf = [0u8; SMALL * 4];
        for (dst, t) in buf.chunks_exact_mut(4).zip(tokens) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        f(&buf[..tokens.len() * 4])
    } else if tokens.len() <= STACK {
        let mut buf = [0u8; STACK * 4];
        for (dst, t) in buf.chunks_exact_mut(4).zip(tokens) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        f(&buf[..tokens.len() * 4])
    } else {
        let buf: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        f(&buf)
    }
}

/// BLAKE3 truncated to 128 bits: collision resistant, the default. Safe across tenants that
/// do not trust each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Blake3Hasher;

impl BlockHasher for Blake3Hasher {
    fn name(&self) -> &'static str {
        "blake3"
    }

    fn root(&self, extra: &HashExtra) -> BlockHash {
        let digest = blake3::hash(&extra.encode());
        BlockHash(first_16(digest.as_bytes()))
    }

    #[inline]
    fn chain(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        let mut h = blake3::Hasher::new();
        h.update(&parent.to_le_bytes());
        with_le_bytes(tokens, |bytes| {
            h.update(bytes);
        });
        BlockHash(first_16(h.finalize().as_bytes()))
    }
}

fn first_16(bytes: &[u8; 32]) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&bytes[..16]);
    u128::from_le_bytes(b)
}

/// Key of [`Blake3KeyedHasher`]'s chain: the parent's 16 bytes, then this tag.
const KEYED_TAG: &[u8; 16] = b"kvc-b3-keyed/v1\0";

/// BLAKE3 in keyed mode, the parent hash as the key, truncated to 128 bits: collision
/// resistant like [`Blake3Hasher`] and safe across tenants that do not trust each other, and
/// about twice as fast (a 16-token block is 64 bytes: one BLAKE3 compression, where hashing
/// parent and tokens together takes two).
///
/// Chaining through the key is how BLAKE3 itself chains the blocks of a chunk (each block's
/// compression is keyed by the previous one's output), so it relies on nothing BLAKE3 does not.
/// The key is the parent's 16 little-endian bytes followed by a fixed 16-byte tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Blake3KeyedHasher;

impl BlockHasher for Blake3KeyedHasher {
    fn name(&self) -> &'static str {
        "blake3-keyed"
    }

    fn root(&self, extra: &HashExtra) -> BlockHash {
        let mut encoded = extra.encode();
        encoded.extend_from_slice(KEYED_TAG);
        BlockHash(first_16(blake3::hash(&encoded).as_bytes()))
    }

    #[inline]
    fn chain(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(&parent.to_le_bytes());
        key[16..].copy_from_slice(KEYED_TAG);
        let digest = with_le_bytes(tokens, |bytes| blake3::keyed_hash(&key, bytes));
        BlockHash(first_16(digest.as_bytes()))
    }
}

/// XXH3-128 seeded by the parent: fast and stable, **not** collision resistant. For one
/// tenant or tenants that trust each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Xxh3Hasher;

impl BlockHasher for Xxh3Hasher {
    fn name(&self) -> &'static str {
        "xxh3"
    }

    fn root(&self, extra: &HashExtra) -> BlockHash {
        BlockHash(xxhash_rust::xxh3::xxh3_128(&extra.encode()))
    }

    #[inline]
    fn chain(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        let lo = parent.0 as u64;
        let hi = (parent.0 >> 64) as u64;
        let seed = lo ^ hi.rotate_left(32);
        let h = with_le_bytes(tokens, |bytes| {
            xxhash_rust::xxh3::xxh3_128_with_seed(bytes, seed)
        });
        // Fold the parent's high half in as well, so parents that differ only there still
        // yield different children.
        BlockHash(h ^ (u128::from(hi) << 64))
    }
}

/// The hasher to use, chosen at run time (for a CLI or a config file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HasherKind {
    /// [`Blake3Hasher`].
    #[default]
    Blake3,
    /// [`Xxh3Hasher`].
    Xxh3,
    /// [`Blake3KeyedHasher`].
    Blake3Keyed,
}

impl HasherKind {
    /// Every kind.
    pub const ALL: [HasherKind; 3] = [
        HasherKind::Blake3,
        HasherKind::Xxh3,
        HasherKind::Blake3Keyed,
    ];

    /// The kind named `name` (`"blake3"`, `"xxh3"` or `"blake3-keyed"`).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "blake3" => Some(Self::Blake3),
            "xxh3" => Some(Self::Xxh3),
            "blake3-keyed" => Some(Self::Blake3Keyed),
            _ => None,
        }
    }
}

impl BlockHasher for HasherKind {
    fn name(&self) -> &'static str {
        match self {
            Self::Blake3 => Blake3Hasher.name(),
            Self::Xxh3 => Xxh3Hasher.name(),
            Self::Blake3Keyed => Blake3KeyedHasher.name(),
        }
    }

    fn root(&self, extra: &HashExtra) -> BlockHash {
        match self {
            Self::Blake3 => Blake3Hasher.root(extra),
            Self::Xxh3 => Xxh3Hasher.root(extra),
            Self::Blake3Keyed => Blake3KeyedHasher.root(extra),
        }
    }

    #[inline]
    fn chain(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        match self {
            Self::Blake3 => Blake3Hasher.chain(parent, tokens),
            Self::Xxh3 => Xxh3Hasher.chain(parent, tokens),
            Self::Blake3Keyed => Blake3KeyedHasher.chain(parent, tokens),
        }
    }

    fn hash_blocks(
        &self,
        root: BlockHash,
        tokens: &[u32],
        block_size: usize,
        out: &mut Vec<BlockHash>,
    ) {
        match self {
            Self::Blake3 => Blake3Hasher.hash_blocks(root, tokens, block_size, out),
            Self::Xxh3 => Xxh3Hasher.hash_blocks(root, tokens, block_size, out),
            Self::Blake3Keyed => Blake3KeyedHasher.hash_blocks(root, tokens, block_size, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_of(h: &dyn BlockHasher, extra: &HashExtra, tokens: &[u32]) -> Vec<BlockHash> {
        let mut out = Vec::new();
        h.hash_blocks(h.root(extra), tokens, 4, &mut out);
        out
    }

    #[test]
    fn same_prefix_same_hashes_and_divergence_propagates() {
        let extra = HashExtra::new("m", 1);
        for h in [
            &Blake3Hasher as &dyn BlockHasher,
            &Xxh3Hasher,
            &Blake3KeyedHasher,
        ] {
            let a = chain_of(h, &extra, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
            let b = chain_of(h, &extra, &[1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12]);
            assert_eq!(a.len(), 3, "the partial block is not hashed");
            assert_eq!(a[0], b[0]);
            assert_ne!(a[1], b[1]);
            assert_ne!(a[2], b[2], "a change in block 1 changes every later block");
        }
    }

    #[test]
    fn every_extra_field_changes_the_first_block() {
        let base = HashExtra::new("m", 1);
        let variants = [
            HashExtra::new("m2", 1),
            HashExtra::new("m", 2),
            base.clone().with_adapter(7),
            base.clone().with_salt(*b"tenant-a"),
        ];
        for h in [
            &Blake3Hasher as &dyn BlockHasher,
            &Xxh3Hasher,
            &Blake3KeyedHasher,
        ] {
            let first = h.chain(h.root(&base), &[1, 2, 3, 4]);
            for v in &variants {
                assert_ne!(first, h.chain(h.root(v), &[1, 2, 3, 4]), "{v:?}");
            }
        }
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        let h = Blake3Hasher;
        let a = HashExtra::new("ab", 1).with_salt(*b"c");
        let b = HashExtra::new("a", 1).with_salt(*b"bc");
        assert_ne!(h.root(&a), h.root(&b));
    }

    /// Pinned values: block identity must never change across platforms or crate versions.
    /// If this test fails, the hash encoding changed, which breaks persisted caches and KV
    /// event consumers: bump the domain tag instead of editing these values.
    #[test]
    fn known_values_are_pinned() {
        let extra = HashExtra::new("llama", 3).with_salt(*b"s");
        let tokens: Vec<u32> = (0..32).collect();
        let mut b3 = Vec::new();
        Blake3Hasher.hash_blocks(Blake3Hasher.root(&extra), &tokens, 16, &mut b3);
        let mut x3 = Vec::new();
        Xxh3Hasher.hash_blocks(Xxh3Hasher.root(&extra), &tokens, 16, &mut x3);
        let got: Vec<String> = b3.iter().chain(&x3).map(ToString::to_string).collect();
        assert_eq!(got, PINNED);
        let mut k3 = Vec::new();
        let keyed = Blake3KeyedHasher;
        keyed.hash_blocks(keyed.root(&extra), &tokens, 16, &mut k3);
        let got: Vec<String> = k3.iter().map(ToString::to_string).collect();
        assert_eq!(got, PINNED_KEYED);
    }

    const PINNED_KEYED: [&str; 2] = [
        "b8e6f8343f75c71a4bba4a6e05bb20ba",
        "a795288c13ada90902ac4b92761e0ea1",
    ];

    #[test]
    fn keyed_chain_is_blake3_keyed_by_the_parent() {
        let tokens: Vec<u32> = (0..200).collect();
        for n in [16, 200] {
            let bytes: Vec<u8> = tokens[..n].iter().flat_map(|t| t.to_le_bytes()).collect();
            let parent = BlockHash(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
            let mut key = [0u8; 32];
            key[..16].copy_from_slice(&parent.to_le_bytes());
            key[16..].copy_from_slice(b"kvc-b3-keyed/v1\0");
            let mut h = blake3::Hasher::new_keyed(&key);
            h.update(&bytes);
            assert_eq!(
                Blake3KeyedHasher.chain(parent, &tokens[..n]),
                BlockHash(first_16(h.finalize().as_bytes()))
            );
        }
    }

    const PINNED: [&str; 4] = [
        "7b80bbcb9989743a247f2310d1fd26ac",
        "228eb49071dddbde9f3baee8c13085c9",
        "57437b82ebc18b03f67f4f0215a996d2",
        "a8f4119ed58c2c3e649d8482d5b96b3b",
    ];

    #[test]
    fn underlying_hashes_match_their_published_vectors() {
        // BLAKE3 of the empty input (BLAKE3 spec test vectors), XXH3-128 of the empty input
        // with seed 0 (xxHash reference), so a dependency change cannot silently move ids.
        assert_eq!(
            blake3::hash(b"").to_hex().as_str(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(
            xxhash_rust::xxh3::xxh3_128(b""),
            0x99aa_06d3_0147_98d8_6001_c324_468d_497f
        );
    }

    #[test]
    fn large_blocks_hash_like_small_ones() {
        // The byte paths (64-byte buffer, stack, heap) must agree: a block of any size equals
        // its bytes hashed.
        let tokens: Vec<u32> = (0..200).collect();
        for n in [5, 16, 17, 128, 129, 200] {
            let bytes: Vec<u8> = tokens[..n].iter().flat_map(|t| t.to_le_bytes()).collect();
            let parent = BlockHash(5);
            let mut h = blake3::Hasher::new();
            h.update(&parent.to_le_bytes());
            h.update(&bytes);
            assert_eq!(
                Blake3Hasher.chain(parent, &tokens[..n]),
                BlockHash(first_16(h.finalize().as_bytes())),
                "{n} tokens"
            );
        }
    }
}
