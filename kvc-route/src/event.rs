//! KV events and their binary encoding (version 1).
//!
//! An engine tells the cluster what its KV cache holds through a stream of [`Event`]s: blocks
//! stored in a tier, blocks removed from a tier, a tier cleared, and load reports (which are
//! also its heartbeat). Every event carries the engine's [`EngineId`] and a per-engine sequence
//! number that increases by one per event, so a subscriber can tell a lost event from a
//! duplicate. A [`Snapshot`] is the whole of one engine's reported holdings at one sequence
//! number; a subscriber that missed events resynchronises from it.
//!
//! # Frame (all integers little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"KVCE"` |
//! | 4 | 1 | version (`1`) |
//! | 5 | 1 | kind: 1 stored, 2 removed, 3 cleared, 4 load, 5 snapshot |
//! | 6 | 2 | reserved, `0` |
//! | 8 | 4 | engine id |
//! | 12 | 8 | sequence number |
//! | 20 | 8 | publisher's clock, ms |
//! | 28 | 4 | body length `L` in bytes |
//! | 32 | `L` | body (below) |
//! | 32 + `L` | 8 | XXH3-64 of bytes `0..32 + L` |
//!
//! A *scope* is `tier u8, flags u8 (bit 0: parent present, bit 1: adapter present; other bits
//! 0), reserved u16 = 0, salt u64, [adapter u64]`. A hash is 16 bytes (`u128`).
//!
//! - **stored**: scope, block size `u32`, token count `u32`, `[parent u128]`, count `u32`,
//!   hashes. The count must equal ⌈token count / block size⌉.
//! - **removed**: scope, count `u32`, hashes.
//! - **cleared**: tier `u8` (`0xFF`: every tier).
//! - **load**: queued `u32`, running `u32`, KV blocks used `u32`, KV blocks total `u32`.
//! - **snapshot**: block size `u32`, group count `u32`, then per group: scope, count `u32`,
//!   hashes.
//!
//! A decoder rejects a version above its own (`UnsupportedVersion`), so a new field means a new
//! version; readers of version `n` keep reading every version up to `n`. Any frame that fails a
//! check (length, checksum, flags, counts) is a [`DecodeError`] and changes nothing.

use std::fmt;

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

/// The version of the encoding this crate writes and the highest it reads.
pub const WIRE_VERSION: u8 = 1;
/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"KVCE";
/// Bytes of the frame header.
pub const HEADER_LEN: usize = 32;
/// Bytes of the trailing checksum.
pub const CHECKSUM_LEN: usize = 8;

macro_rules! wire_id {
    ($(#[$meta:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl $name {
            /// The raw value.
            #[must_use]
            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

wire_id!(
    /// One engine (one replica of the model) in the cluster.
    EngineId(u32),
    "engine#"
);
wire_id!(
    /// A tenant's cache salt, as a number: blocks stored under one salt only ever match
    /// requests under the same salt (engines map each tenant's salt bytes to one id).
    SaltId(u64),
    "salt#"
);
wire_id!(
    /// A LoRA adapter (or other weight variant) whose KV differs from the base model's.
    AdapterId(u64),
    "adapter#"
);

impl From<kvc_core::TenantId> for SaltId {
    /// A tenant's salt id is its tenant id unless the deployment sets another (as kvc-reuse's
    /// scoped index does).
    fn from(t: kvc_core::TenantId) -> Self {
        SaltId(u64::from(t.0))
    }
}

/// The chained hash of one block, as the engine's prefix cache computes it (kvc-reuse's
/// `BlockHash`): it covers the block's tokens and every token before them, so equal hashes
/// mean equal prefixes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ChainHash(pub u128);

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hash#{:032x}", self.0)
    }
}

/// Where a block is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// The engine's GPU memory: a hit costs nothing.
    Device,
    /// The engine's host memory: a hit costs a copy over PCIe.
    Host,
    /// A store shared by every engine (for example on Redis or Valkey): any engine can fetch
    /// the block over the network.
    Shared,
}

impl Tier {
    /// All tiers, fastest first.
    pub const ALL: [Tier; 3] = [Tier::Device, Tier::Host, Tier::Shared];

    /// The tier's wire code.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Tier::Device => 0,
            Tier::Host => 1,
            Tier::Shared => 2,
        }
    }

    /// The tier of a wire code.
    #[must_use]
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Tier::Device),
            1 => Some(Tier::Host),
            2 => Some(Tier::Shared),
            _ => None,
        }
    }

    /// Lower-case name (`device`, `host`, `shared`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host => "host",
            Tier::Shared => "shared",
        }
    }
}

/// The cache namespace of a block: blocks only match within one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Scope {
    /// The tenant's salt.
    pub salt: SaltId,
    /// The adapter, if any.
    pub adapter: Option<AdapterId>,
}

/// Blocks newly kept in a tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The tier.
    pub tier: Tier,
    /// Whose blocks.
    pub scope: Scope,
    /// The hash of the block before the first one, if any (absent for a prompt's first block).
    pub parent: Option<ChainHash>,
    /// Tokens per block.
    pub block_size: u32,
    /// Tokens the blocks hold: ⌈token count / block size⌉ = `hashes.len()`.
    pub token_count: u32,
    /// The blocks' chained hashes, in prompt order.
    pub hashes: Vec<ChainHash>,
}

/// Blocks no longer kept in a tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    /// The tier.
    pub tier: Tier,
    /// Whose blocks.
    pub scope: Scope,
    /// The blocks' hashes.
    pub hashes: Vec<ChainHash>,
}

/// An engine's load, reported periodically; also its heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LoadReport {
    /// Requests waiting for admission.
    pub queued: u32,
    /// Requests running.
    pub running: u32,
    /// KV blocks in use on the device.
    pub kv_used_blocks: u32,
    /// KV blocks on the device.
    pub kv_total_blocks: u32,
}

impl LoadReport {
    /// Used over total device blocks, 0 when the total is unknown.
    #[must_use]
    pub fn kv_load(&self) -> f64 {
        if self.kv_total_blocks == 0 {
            0.0
        } else {
            f64::from(self.kv_used_blocks) / f64::from(self.kv_total_blocks)
        }
    }
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventBody {
    /// Blocks stored.
    Stored(Stored),
    /// Blocks removed.
    Removed(Removed),
    /// Every block of one tier (or of all tiers, `None`) dropped, for example at a restart.
    Cleared {
        /// The tier, or every tier.
        tier: Option<Tier>,
    },
    /// Load and liveness.
    Load(LoadReport),
}

/// One event of one engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The engine.
    pub engine: EngineId,
    /// Its sequence number: 1 for the engine's first event, then one more per event.
    pub seq: u64,
    /// The publisher's clock, in milliseconds (informational).
    pub time_ms: u64,
    /// What happened.
    pub body: EventBody,
}

/// One group of a snapshot: the blocks of one scope in one tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotGroup {
    /// The tier.
    pub tier: Tier,
    /// Whose blocks.
    pub scope: Scope,
    /// The blocks.
    pub hashes: Vec<ChainHash>,
}

/// Everything one engine holds after its event `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The engine.
    pub engine: EngineId,
    /// The last event the snapshot includes (0: none).
    pub seq: u64,
    /// The publisher's clock, in milliseconds.
    pub time_ms: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// The holdings.
    pub groups: Vec<SnapshotGroup>,
}

/// Why a frame was rejected.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than a header and checksum.
    #[error("frame of {len} bytes is shorter than a header")]
    TooShort {
        /// Bytes received.
        len: usize,
    },
    /// Not a KV event frame.
    #[error("bad magic")]
    BadMagic,
    /// Written by a newer encoder.
    #[error("wire version {found} is newer than {WIRE_VERSION}")]
    UnsupportedVersion {
        /// The frame's version.
        found: u8,
    },
    /// The kind byte names nothing (or not what was asked for).
    #[error("unexpected frame kind {kind}")]
    BadKind {
        /// The byte.
        kind: u8,
    },
    /// The body length disagrees with the frame's size (a truncated or padded frame).
    #[error("body length {declared} does not match the {available} bytes received")]
    Length {
        /// The header's body length.
        declared: u64,
        /// Body bytes present.
        available: usize,
    },
    /// The checksum does not match: the frame was altered.
    #[error("checksum mismatch")]
    Checksum,
    /// A field holds an impossible value.
    #[error("bad field `{field}`")]
    BadField {
        /// The field.
        field: &'static str,
    },
}

/// Encodes an event as one frame.
#[must_use]
pub fn encode_event(event: &Event) -> Vec<u8> {
    let (kind, body) = match &event.body {
        EventBody::Stored(s) => {
            let mut b = Vec::with_capacity(48 + 16 * s.hashes.len());
            put_scope(&mut b, s.tier, s.scope, s.parent.is_some());
            b.extend_from_slice(&s.block_size.to_le_bytes());
            b.extend_from_slice(&s.token_count.to_le_bytes());
            if let Some(p) = s.parent {
                b.extend_from_slice(&p.0.to_le_bytes());
            }
            put_hashes(&mut b, &s.hashes);
            (1, b)
        }
        EventBody::Removed(r) => {
            let mut b = Vec::with_capacity(32 + 16 * r.hashes.len());
            put_scope(&mut b, r.tier, r.scope, false);
            put_hashes(&mut b, &r.hashes);
            (2, b)
        }
        EventBody::Cleared { tier } => (3, vec![tier.map_or(0xFF, Tier::code)]),
        EventBody::Load(l) => {
            let mut b = Vec::with_capacity(16);
            for v in [l.queued, l.running, l.kv_used_blocks, l.kv_total_blocks] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            (4, b)
        }
    };
    frame(kind, event.engine, event.seq, event.time_ms, &body)
}

/// Encodes a snapshot as one frame.
#[must_use]
pub fn encode_snapshot(snap: &Snapshot) -> Vec<u8> {
    let total: usize = snap.groups.iter().map(|g| 32 + 16 * g.hashes.len()).sum();
    let mut b = Vec::with_capacity(8 + total);
    b.extend_from_slice(&snap.block_size.to_le_bytes());
    b.extend_from_slice(&(snap.groups.len() as u32).to_le_bytes());
    for g in &snap.groups {
        put_scope(&mut b, g.tier, g.scope, false);
        put_hashes(&mut b, &g.hashes);
    }
    frame(5, snap.engine, snap.seq, snap.time_ms, &b)
}

/// Decodes one event frame.
///
/// # Errors
/// Any check the frame fails; nothing is partially decoded.
pub fn decode_event(bytes: &[u8]) -> Result<Event, DecodeError> {
    let (h, mut r) = open_frame(bytes)?;
    let body = match h.kind {
        1 => {
            let (tier, scope, has_parent) = r.scope(true)?;
            let block_size = r.u32()?;
            let token_count = r.u32()?;
            let parent = if has_parent {
                Some(ChainHash(r.u128()?))
            } else {
                None
            };
            let hashes = r.hashes()?;
            if block_size == 0 {
                return Err(DecodeError::BadField {
                    field: "block_size",
                });
            }
            if u64::from(token_count).div_ceil(u64::from(block_size)) != hashes.len() as u64 {
                return Err(DecodeError::BadField {
                    field: "token_count",
                });
            }
            EventBody::Stored(Stored {
                tier,
                scope,
                parent,
                block_size,
                token_count,
                hashes,
            })
        }
        2 => {
            let (tier, scope, _) = r.scope(false)?;
            let hashes = r.hashes()?;
            EventBody::Removed(Removed {
                tier,
                scope,
                hashes,
            })
        }
        3 => {
            let code = r.u8()?;
            let tier = if code == 0xFF {
                None
            } else {
                Some(Tier::from_code(code).ok_or(DecodeError::BadField { field: "tier" })?)
            };
            EventBody::Cleared { tier }
        }
        4 => EventBody::Load(LoadReport {
            queued: r.u32()?,
            running: r.u32()?,
            kv_used_blocks: r.u32()?,
            kv_total_blocks: r.u32()?,
        }),
        kind => return Err(DecodeError::BadKind { kind }),
    };
    r.finish()?;
    Ok(Event {
        engine: h.engine,
        seq: h.seq,
        time_ms: h.time_ms,
        body,
    })
}

/// Decodes one snapshot frame.
///
/// # Errors
/// Any check the frame fails.
pub fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, DecodeError> {
    let (h, mut r) = open_frame(bytes)?;
    if h.kind != 5 {
        return Err(DecodeError::BadKind { kind: h.kind });
    }
    let block_size = r.u32()?;
    let n = r.u32()? as usize;
    // Every group takes at least 16 bytes: bound the allocation by what is there.
    if n > r.remaining() / 16 {
        return Err(DecodeError::BadField { field: "groups" });
    }
    let mut groups = Vec::with_capacity(n);
    for _ in 0..n {
        let (tier, scope, _) = r.scope(false)?;
        let hashes = r.hashes()?;
        groups.push(SnapshotGroup {
            tier,
            scope,
            hashes,
        });
    }
    r.finish()?;
    Ok(Snapshot {
        engine: h.engine,
        seq: h.seq,
        time_ms: h.time_ms,
        block_size,
        groups,
    })
}

fn frame(kind: u8, engine: EngineId, seq: u64, time_ms: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CHECKSUM_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(WIRE_VERSION);
    out.push(kind);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&engine.0.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&time_ms.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

fn put_scope(b: &mut Vec<u8>, tier: Tier, scope: Scope, has_parent: bool) {
    b.push(tier.code());
    let flags = u8::from(has_parent) | (u8::from(scope.adapter.is_some()) << 1);
    b.push(flags);
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&scope.salt.0.to_le_bytes());
    if let Some(a) = scope.adapter {
        b.extend_from_slice(&a.0.to_le_bytes());
    }
}

fn put_hashes(b: &mut Vec<u8>, hashes: &[ChainHash]) {
    b.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
    for h in hashes {
        b.extend_from_slice(&h.0.to_le_bytes());
    }
}

struct Header {
    kind: u8,
    engine: EngineId,
    seq: u64,
    time_ms: u64,
}

fn open_frame(bytes: &[u8]) -> Result<(Header, Reader<'_>), DecodeError> {
    if bytes.len() < 6 {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    if bytes[..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if bytes[4] > WIRE_VERSION || bytes[4] == 0 {
        return Err(DecodeError::UnsupportedVersion { found: bytes[4] });
    }
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    let mut r = Reader { b: bytes, at: 5 };
    let kind = r.u8()?;
    if r.u16()? != 0 {
        return Err(DecodeError::BadField { field: "reserved" });
    }
    let engine = EngineId(r.u32()?);
    let seq = r.u64()?;
    let time_ms = r.u64()?;
    let declared = r.u32()?;
    let available = bytes.len() - HEADER_LEN - CHECKSUM_LEN;
    if declared as usize != available {
        return Err(DecodeError::Length {
            declared: u64::from(declared),
            available,
        });
    }
    let end = HEADER_LEN + available;
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&bytes[end..]);
    if u64::from_le_bytes(sum) != xxh3_64(&bytes[..end]) {
        return Err(DecodeError::Checksum);
    }
    Ok((
        Header {
            kind,
            engine,
            seq,
            time_ms,
        },
        Reader {
            b: &bytes[..end],
            at: HEADER_LEN,
        },
    ))
}

/// A bounds-checked little-endian reader over a frame's body.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.at.checked_add(N).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(DecodeError::BadField { field: "body" });
        };
        let mut out = [0u8; N];
        out.copy_from_slice(&self.b[self.at..end]);
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn u128(&mut self) -> Result<u128, DecodeError> {
        Ok(u128::from_le_bytes(self.take()?))
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.at
    }
    fn scope(&mut self, parent_allowed: bool) -> Result<(Tier, Scope, bool), DecodeError> {
        let tier = Tier::from_code(self.u8()?).ok_or(DecodeError::BadField { field: "tier" })?;
        let flags = self.u8()?;
        let allowed = if parent_allowed { 0b11 } else { 0b10 };
        if flags & !allowed != 0 {
            return Err(DecodeError::BadField { field: "flags" });
        }
        if self.u16()? != 0 {
            return Err(DecodeError::BadField { field: "reserved" });
        }
        let salt = SaltId(self.u64()?);
        let adapter = if flags & 0b10 != 0 {
            Some(AdapterId(self.u64()?))
        } else {
            None
        };
        Ok((tier, Scope { salt, adapter }, flags & 1 != 0))
    }
    fn hashes(&mut self) -> Result<Vec<ChainHash>, DecodeError> {
        let n = self.u32()? as usize;
        if n > self.remaining() / 16 {
            return Err(DecodeError::BadField { field: "count" });
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(ChainHash(self.u128()?));
        }
        Ok(out)
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.at == self.b.len() {
            Ok(())
        } else {
            Err(DecodeError::BadField {
                field: "trailing bytes",
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> Event {
        Event {
            engine: EngineId(7),
            seq: 42,
            time_ms: 1_000,
            body: EventBody::Stored(Stored {
                tier: Tier::Host,
                scope: Scope {
                    salt: SaltId(3),
                    adapter: Some(AdapterId(9)),
                },
                parent: Some(ChainHash(0xABCD)),
                block_size: 16,
                token_count: 40,
                hashes: vec![ChainHash(1), ChainHash(2), ChainHash(3)],
            }),
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let mut events = vec![stored()];
        events.push(Event {
            body: EventBody::Removed(Removed {
                tier: Tier::Device,
                scope: Scope::default(),
                hashes: vec![ChainHash(u128::MAX)],
            }),
            ..stored()
        });
        for tier in [None, Some(Tier::Shared)] {
            events.push(Event {
                body: EventBody::Cleared { tier },
                ..stored()
            });
        }
        events.push(Event {
            body: EventBody::Load(LoadReport {
                queued: 1,
                running: 2,
                kv_used_blocks: 3,
                kv_total_blocks: 4,
            }),
            ..stored()
        });
        for e in events {
            assert_eq!(decode_event(&encode_event(&e)), Ok(e));
        }
        let snap = Snapshot {
            engine: EngineId(1),
            seq: 5,
            time_ms: 6,
            block_size: 16,
            groups: vec![SnapshotGroup {
                tier: Tier::Shared,
                scope: Scope::default(),
                hashes: vec![ChainHash(5)],
            }],
        };
        assert_eq!(decode_snapshot(&encode_snapshot(&snap)), Ok(snap));
    }

    #[test]
    fn the_header_layout_is_fixed() {
        let bytes = encode_event(&Event {
            engine: EngineId(0x0102_0304),
            seq: 5,
            time_ms: 6,
            body: EventBody::Cleared { tier: None },
        });
        assert_eq!(&bytes[..6], b"KVCE\x01\x03");
        assert_eq!(&bytes[8..12], &[4, 3, 2, 1]);
        assert_eq!(bytes[12], 5);
        assert_eq!(bytes[20], 6);
        assert_eq!(&bytes[28..32], &[1, 0, 0, 0]);
        assert_eq!(bytes[32], 0xFF);
        assert_eq!(bytes.len(), HEADER_LEN + 1 + CHECKSUM_LEN);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_rejected() {
        let bytes = encode_event(&stored());
        for len in 0..bytes.len() {
            assert!(decode_event(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode_event(&b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn newer_versions_and_wrong_counts_are_rejected() {
        let mut b = encode_event(&stored());
        b[4] = 2;
        assert_eq!(
            decode_event(&b),
            Err(DecodeError::UnsupportedVersion { found: 2 })
        );
        let mut e = stored();
        if let EventBody::Stored(s) = &mut e.body {
            s.token_count = 100;
        }
        assert_eq!(
            decode_event(&encode_event(&e)),
            Err(DecodeError::BadField {
                field: "token_count"
            })
        );
        assert!(matches!(
            decode_snapshot(&encode_event(&stored())),
            Err(DecodeError::BadKind { kind: 1 })
        ));
    }
}
