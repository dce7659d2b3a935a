//! The byte formats of persisted blocks: disk page files and shared-tier values. Both carry the
//! full namespace encoding and per-block checksums (XXH3-64), so a block is only ever read back
//! as KV when its namespace, key, length and checksum all match.

use kvc_core::StoreKey;
use xxhash_rust::xxh3::xxh3_64;

/// The checksum of a payload.
#[inline]
#[must_use]
pub(crate) fn checksum(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

const PAGE_MAGIC: &[u8; 8] = b"KVCPAGE1";
const BLOCK_MAGIC: &[u8; 8] = b"KVCBLK01";

/// A little reader over a byte slice that fails instead of panicking on short input.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn key(&mut self) -> Option<StoreKey> {
        Some(StoreKey::from_le_bytes(self.take(16)?.try_into().ok()?))
    }
}

/// The header of a disk page file: which blocks it holds and their checksums. The payload
/// (`keys.len() × block_bytes`) follows the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PageHeader {
    /// Block keys, in slot order.
    pub keys: Vec<StoreKey>,
    /// Checksum of each slot's payload.
    pub sums: Vec<u64>,
    /// Bytes per block.
    pub block_bytes: u64,
}

impl PageHeader {
    /// Bytes of the encoded header for `ns_len` namespace bytes and `count` blocks.
    pub(crate) fn encoded_len(ns_len: usize, count: usize) -> usize {
        8 + 2 + ns_len + 8 + 4 + count * 24 + 8
    }

    /// Encodes the header for namespace `ns` into `out`.
    pub(crate) fn encode(&self, ns: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(PAGE_MAGIC);
        // Namespace encodings are a few hundred bytes at most (the model id is ≤ 255).
        out.extend_from_slice(&(ns.len() as u16).to_le_bytes());
        out.extend_from_slice(ns);
        out.extend_from_slice(&self.block_bytes.to_le_bytes());
        out.extend_from_slice(&(self.keys.len() as u32).to_le_bytes());
        for k in &self.keys {
            out.extend_from_slice(&k.to_le_bytes());
        }
        for s in &self.sums {
            out.extend_from_slice(&s.to_le_bytes());
        }
        let sum = checksum(&out[start..]);
        out.extend_from_slice(&sum.to_le_bytes());
    }

    /// Decodes a header that must belong to namespace `ns`. `None` when the bytes are short,
    /// damaged or of another namespace.
    pub(crate) fn decode(bytes: &[u8], ns: &[u8]) -> Option<(Self, usize)> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(8)? != PAGE_MAGIC {
            return None;
        }
        let ns_len = usize::from(r.u16()?);
        if r.take(ns_len)? != ns {
            return None;
        }
        let block_bytes = r.u64()?;
        let count = r.u32()? as usize;
        // A damaged count cannot make us allocate more than the bytes at hand.
        if count.checked_mul(24)? > bytes.len() {
            return None;
        }
        let mut keys = Vec::with_capacity(count);
        for _ in 0..count {
            keys.push(r.key()?);
        }
        let mut sums = Vec::with_capacity(count);
        for _ in 0..count {
            sums.push(r.u64()?);
        }
        let body = r.at;
        let sum = r.u64()?;
        if checksum(&bytes[..body]) != sum {
            return None;
        }
        Some((
            Self {
                keys,
                sums,
                block_bytes,
            },
            r.at,
        ))
    }
}

/// Encodes one shared-tier value: header (namespace, key, length, checksum) and payload.
pub(crate) fn encode_block(ns: &[u8], key: StoreKey, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(8 + 2 + ns.len() + 16 + 8 + 8 + payload.len());
    out.extend_from_slice(BLOCK_MAGIC);
    out.extend_from_slice(&(ns.len() as u16).to_le_bytes());
    out.extend_from_slice(ns);
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The payload of a shared-tier value if it is a whole, intact block of `key` in namespace
/// `ns` with `block_bytes` bytes; `None` otherwise.
pub(crate) fn decode_block<'a>(
    value: &'a [u8],
    ns: &[u8],
    key: StoreKey,
    block_bytes: u64,
) -> Option<&'a [u8]> {
    let mut r = Reader {
        bytes: value,
        at: 0,
    };
    if r.take(8)? != BLOCK_MAGIC {
        return None;
    }
    let ns_len = usize::from(r.u16()?);
    if r.take(ns_len)? != ns || r.key()? != key || r.u64()? != block_bytes {
        return None;
    }
    let sum = r.u64()?;
    let payload = r.take(usize::try_from(block_bytes).ok()?)?;
    if r.at != value.len() || checksum(payload) != sum {
        return None;
    }
    Some(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_headers_round_trip_and_reject_damage() {
        let h = PageHeader {
            keys: vec![StoreKey(1), StoreKey(2)],
            sums: vec![10, 20],
            block_bytes: 64,
        };
        let mut bytes = Vec::new();
        h.encode(b"ns", &mut bytes);
        assert_eq!(bytes.len(), PageHeader::encoded_len(2, 2));
        let (back, len) = PageHeader::decode(&bytes, b"ns").unwrap();
        assert_eq!((back, len), (h, bytes.len()));
        assert!(PageHeader::decode(&bytes, b"other").is_none());
        assert!(PageHeader::decode(&bytes[..bytes.len() - 1], b"ns").is_none());
        for i in [0, 12, 30, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(PageHeader::decode(&bad, b"ns").is_none(), "byte {i}");
        }
    }

    #[test]
    fn block_values_check_namespace_key_length_and_sum() {
        let payload = [7u8; 32];
        let mut v = Vec::new();
        encode_block(b"ns", StoreKey(9), &payload, &mut v);
        assert_eq!(decode_block(&v, b"ns", StoreKey(9), 32), Some(&payload[..]));
        assert_eq!(decode_block(&v, b"nz", StoreKey(9), 32), None);
        assert_eq!(decode_block(&v, b"ns", StoreKey(8), 32), None);
        assert_eq!(decode_block(&v, b"ns", StoreKey(9), 31), None);
        assert_eq!(
            decode_block(&v[..v.len() - 1], b"ns", StoreKey(9), 32),
            None
        );
        let mut bad = v.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(decode_block(&bad, b"ns", StoreKey(9), 32), None);
    }
}
