//! Typed ids: every id that crosses a crate boundary is a newtype, never a bare integer.

use std::fmt;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            /// The raw value of the id.
            #[inline]
            #[must_use]
            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl From<$inner> for $name {
            #[inline]
            fn from(raw: $inner) -> Self {
                Self(raw)
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

id_type!(
    /// A physical KV block: an index into the block pool (and into every layer's KV tensor).
    BlockId(u32),
    "block#"
);
id_type!(
    /// A block of the host-side (CPU) KV pool that preempted sequences are swapped out to.
    HostBlockId(u32),
    "host-block#"
);
id_type!(
    /// A running sequence (one request, or one branch of a forked request).
    SeqId(u64),
    "seq#"
);
id_type!(
    /// A multi-turn conversation whose KV context is kept between turns.
    SessionId(u64),
    "session#"
);
id_type!(
    /// A tenant: the unit of cache isolation and of quotas.
    TenantId(u32),
    "tenant#"
);
id_type!(
    /// A region of the block pool: a partition with its own free list and quota.
    ///
    /// Every pool has at least [`RegionId::PINNED`] (reserved for high-priority traffic) and
    /// [`RegionId::DYNAMIC`] (shared by everything else). Further regions may be configured.
    RegionId(u8),
    "region#"
);

impl BlockId {
    /// The id as an index into per-block arrays.
    #[inline]
    #[must_use]
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl RegionId {
    /// The pinned region: reserved for high-QoS traffic, never handed to lower classes.
    pub const PINNED: RegionId = RegionId(0);
    /// The dynamic region: shared by all traffic.
    pub const DYNAMIC: RegionId = RegionId(1);

    /// The id as an index into per-region arrays.
    #[inline]
    #[must_use]
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_with_their_kind() {
        assert_eq!(BlockId(7).to_string(), "block#7");
        assert_eq!(format!("{:?}", SeqId(3)), "seq#3");
        assert_eq!(RegionId::DYNAMIC.to_string(), "region#1");
        assert_eq!(TenantId::from(9).get(), 9);
    }
}
