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
//! Four hashers:
//! - [`Blake3Hasher`] (the default): BLAKE3 truncated to 128 bits. Collision resistant: safe
//!   when tenants do not trust each other (no one can craft a prompt whose blocks collide with
//!   another tenant's, or probe for them).
//! - [`Blake3KeyedHasher`]: BLAKE3 keyed by the parent hash, truncated to 128 bits. Just as
//!   collision resistant and safe across tenants, and about twice as fast: a 16-token block
//!   is one BLAKE3 compression. Its hashes differ from [`Blake3Hasher`]'s, so a deployment
//!   picks one and keeps it (KV events and shared tiers compare hashes).
//! - [`Sha256Hasher`]: SHA-256's compression function with the parent hash (plus a tag and the
//!   block length) as the chaining value, truncated to 128 bits. Collision resistant and safe
//!   across tenants like the two above; a 16-token block is one SHA-256 compression, which the
//!   CPU's SHA extensions (x86 SHA-NI, ARMv8 SHA2) run in hardware where present, making it the
//!   fastest collision-resistant hasher on such CPUs.
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
        // An exact-size iterator: `out` grows once, not a capacity check per block.
        out.extend(tokens.chunks_exact(block_size).map(|block| {
            parent = self.chain(parent, block);
            parent
        }));
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

/// Tag in the chaining value of [`Sha256Hasher`]: the parent's 16 bytes, this tag, then the
/// block length in tokens (`u32`, little-endian).
const SHA256_TAG: &[u8; 12] = b"kvc-sha256/1";

/// SHA-256 compressions chained through the parent hash, truncated to 128 bits: collision
/// resistant and safe across tenants that do not trust each other, like [`Blake3Hasher`] and
/// [`Blake3KeyedHasher`], and on CPUs with SHA extensions (x86 SHA-NI, ARMv8 SHA2) the fastest
/// of the three: a 16-token block is 64 bytes, **one** SHA-256 compression.
///
/// The block's hash is SHA-256's own Merkle–Damgård iteration started from a chaining value
/// made of the parent: the parent's 16 little-endian bytes, a fixed 12-byte tag and the block
/// length in tokens (`u32`, little-endian), read as SHA-256's eight big-endian state words.
/// The tokens' little-endian bytes, zero-padded to a whole number of 64-byte blocks (at least
/// one), are compressed into it, and the first 16 bytes of the big-endian state are the hash.
/// Since the length is in the chaining value, the zero padding is unambiguous, and SHA-256's
/// length padding block (a second compression for 64 bytes) is not needed. Chaining through
/// the chaining value is how SHA-256 itself links its blocks, and how HMAC keys it.
/// The root is standard SHA-256 of the encoded [`HashExtra`] and the tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sha256Hasher;

impl Sha256Hasher {
    /// The chaining value a block of `len` tokens under `parent` starts from.
    #[inline]
    fn start_state(parent: BlockHash, len: usize) -> [u32; 8] {
        let mut cv = [0u8; 32];
        cv[..16].copy_from_slice(&parent.to_le_bytes());
        cv[16..28].copy_from_slice(SHA256_TAG);
        // A block longer than u32::MAX tokens cannot exist in memory on 32-bit targets and is
        // far past any block size; saturate rather than wrap.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        cv[28..].copy_from_slice(&len.to_le_bytes());
        let mut state = [0u32; 8];
        for (w, b) in state.iter_mut().zip(cv.chunks_exact(4)) {
            *w = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        }
        state
    }

    /// The hash: the first 16 bytes of the big-endian state.
    #[inline]
    fn finish(state: &[u32; 8]) -> BlockHash {
        let mut out = [0u8; 16];
        for (dst, w) in out.chunks_exact_mut(4).zip(&state[..4]) {
            dst.copy_from_slice(&w.to_be_bytes());
        }
        BlockHash(u128::from_le_bytes(out))
    }
}

impl BlockHasher for Sha256Hasher {
    fn name(&self) -> &'static str {
        "sha256"
    }

    fn root(&self, extra: &HashExtra) -> BlockHash {
        use sha2::Digest;
        let mut encoded = extra.encode();
        encoded.extend_from_slice(SHA256_TAG);
        let digest: [u8; 32] = sha2::Sha256::digest(&encoded).into();
        BlockHash(first_16(&digest))
    }

    #[inline]
    fn chain(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        let mut state = Self::start_state(parent, tokens.len());
        if let Ok(block) = <&[u32; 16]>::try_from(tokens) {
            // The usual 16-token block: one compression of a fixed 64 bytes, without the
            // general loop's variable-length copy and padding (same bytes, same hash).
            let mut bytes = [0u8; 64];
            for (dst, t) in bytes.chunks_exact_mut(4).zip(block) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            sha2::block_api::compress256(&mut state, &[bytes]);
            return Self::finish(&state);
        }
        let mut rest = tokens;
        loop {
            let (now, later) = rest.split_at(rest.len().min(16));
            let mut block = [0u8; 64];
            for (dst, t) in block.chunks_exact_mut(4).zip(now) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            sha2::block_api::compress256(&mut state, &[block]);
            if later.is_empty() {
                break;
            }
            rest = later;
        }
        Self::finish(&state)
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
        let h = if let Ok(block) = <&[u32; 16]>::try_from(tokens) {
            // The usual 16-token block as a fixed 64 bytes: the hash's length-dependent
            // branches fold away and the call is inlined (same bytes, same hash).
            let mut bytes = [0u8; 64];
            for (dst, t) in bytes.chunks_exact_mut(4).zip(block) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            xxhash_rust::xxh3::xxh3_128_with_seed(&bytes, seed)
        } else {
            with_le_bytes(tokens, |bytes| {
                xxhash_rust::xxh3::xxh3_128_with_seed(bytes, seed)
            })
        };
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
    /// [`Sha256Hasher`].
    Sha256,
}

impl HasherKind {
    /// Every kind.
    pub const ALL: [HasherKind; 4] = [
        HasherKind::Blake3,
        HasherKind::Xxh3,
        HasherKind::Blake3Keyed,
        HasherKind::Sha256,
    ];

    /// The kind named `name` (`"blake3"`, `"xxh3"`, `"blake3-keyed"` or `"sha256"`).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "blake3" => Some(Self::Blake3),
            "xxh3" => Some(Self::Xxh3),
            "blake3-keyed" => Some(Self::Blake3Keyed),
            "sha256" => Some(Self::Sha256),
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
            Self::Sha256 => Sha256Hasher.name(),
        }
    }

    fn root(&self, extra: &HashExtra) -> BlockHash {
        match self {
            Self::Blake3 => Blake3Hasher.root(extra),
            Self::Xxh3 => Xxh3Hasher.root(extra),
            Self::Blake3Keyed => Blake3KeyedHasher.root(extra),
            Self::Sha256 => Sha256Hasher.root(extra),
        }
    }

    #[inline]
    fn chain(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        match self {
            Self::Blake3 => Blake3Hasher.chain(parent, tokens),
            Self::Xxh3 => Xxh3Hasher.chain(parent, tokens),
            Self::Blake3Keyed => Blake3KeyedHasher.chain(parent, tokens),
            Self::Sha256 => Sha256Hasher.chain(parent, tokens),
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
            Self::Sha256 => Sha256Hasher.hash_blocks(root, tokens, block_size, out),
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
            &Sha256Hasher,
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
            &Sha256Hasher,
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
        let mut s2 = Vec::new();
        Sha256Hasher.hash_blocks(Sha256Hasher.root(&extra), &tokens, 16, &mut s2);
        let got: Vec<String> = s2.iter().map(ToString::to_string).collect();
        assert_eq!(got, PINNED_SHA256);
        // SHA-256 itself, against the published vector, so a dependency change cannot move ids.
        use sha2::Digest;
        let abc: [u8; 32] = sha2::Sha256::digest(b"abc").into();
        let hex: String = abc.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    const PINNED_SHA256: [&str; 2] = [
        "8f457c9df248ff85aef0e2b32b39f83a",
        "61a324525d2622e039b5ff0fdfc3fde4",
    ];

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

    #[test]
    fn sha256_chain_is_the_sha256_compression_from_the_parent() {
        // Reference: a byte-wise SHA-256 compression (FIPS 180-4) written out here, started
        // from the documented chaining value, so the layout cannot drift unnoticed.
        fn reference(parent: BlockHash, tokens: &[u32]) -> BlockHash {
            let mut cv = Vec::new();
            cv.extend_from_slice(&parent.to_le_bytes());
            cv.extend_from_slice(b"kvc-sha256/1");
            cv.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
            let mut state: Vec<u32> = cv
                .chunks_exact(4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let mut bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
            let blocks = bytes.len().div_ceil(64).max(1);
            bytes.resize(blocks * 64, 0);
            for block in bytes.chunks_exact(64) {
                reference_compress(&mut state, block);
            }
            let out: Vec<u8> = state[..4].iter().flat_map(|w| w.to_be_bytes()).collect();
            BlockHash(u128::from_le_bytes(out.try_into().expect("16 bytes")))
        }
        let tokens: Vec<u32> = (0..200).map(|i| i * 7919).collect();
        let parent = BlockHash(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        for n in [0, 1, 15, 16, 17, 32, 200] {
            assert_eq!(
                Sha256Hasher.chain(parent, &tokens[..n]),
                reference(parent, &tokens[..n]),
                "{n} tokens"
            );
        }
        // The length is part of the chaining value: a block and the same block with a zero
        // token appended (same zero-padded bytes) differ.
        assert_ne!(
            Sha256Hasher.chain(parent, &[1, 2, 3]),
            Sha256Hasher.chain(parent, &[1, 2, 3, 0])
        );
    }

    /// SHA-256's compression function as FIPS 180-4 §6.2.2 writes it.
    fn reference_compress(state: &mut [u32], block: &[u8]) {
        const K: [u32; 64] = [
            0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
            0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
            0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
            0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
            0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
            0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
            0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
            0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
            0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
            0xc67178f2,
        ];
        let mut w = [0u32; 64];
        for (i, b) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let mut v = [0u32; 8];
        v.copy_from_slice(state);
        for i in 0..64 {
            let [a, b, c, d, e, f, g, h] = v;
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = h
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            v = [t1.wrapping_add(t2), a, b, c, d.wrapping_add(t1), e, f, g];
        }
        for (s, x) in state.iter_mut().zip(v) {
            *s = s.wrapping_add(x);
        }
    }

    #[test]
    fn reference_compression_gives_sha256_of_abc() {
        // FIPS 180-2 appendix B.1: SHA-256("abc"), one padded block from the standard IV.
        let mut state = [
            0x6a09e667u32,
            0xbb67ae85,
            0x3c6ef372,
            0xa54ff53a,
            0x510e527f,
            0x9b05688c,
            0x1f83d9ab,
            0x5be0cd19,
        ];
        let mut block = [0u8; 64];
        block[..3].copy_from_slice(b"abc");
        block[3] = 0x80;
        block[63] = 24;
        reference_compress(&mut state, &block);
        let hex: String = state.iter().map(|w| format!("{w:08x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
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

    #[test]
    fn xxh3_fixed_16_token_path_matches_the_byte_path() {
        // The 16-token block is hashed from a fixed 64-byte array; every size must still equal
        // its little-endian bytes hashed with the parent's seed.
        let tokens: Vec<u32> = (0..64)
            .map(|i| 0x9e37_79b9u32.wrapping_mul(i + 1))
            .collect();
        let parent = BlockHash(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        let lo = parent.0 as u64;
        let hi = (parent.0 >> 64) as u64;
        for n in [1, 15, 16, 17, 32, 64] {
            let bytes: Vec<u8> = tokens[..n].iter().flat_map(|t| t.to_le_bytes()).collect();
            let want = xxhash_rust::xxh3::xxh3_128_with_seed(&bytes, lo ^ hi.rotate_left(32))
                ^ (u128::from(hi) << 64);
            assert_eq!(
                Xxh3Hasher.chain(parent, &tokens[..n]),
                BlockHash(want),
                "{n} tokens"
            );
        }
    }
}
