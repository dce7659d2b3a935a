//! Software prefetch: asks the CPU to start loading a cache line the cache will read soon, so
//! the misses of independent blocks overlap instead of being paid one after another.
//!
//! This is the crate's one use of `unsafe`: `core::arch::x86_64::_mm_prefetch` is an `unsafe`
//! function (it carries `#[target_feature(enable = "sse")]`, which stays unsafe to call even
//! with SSE in the build's baseline). A prefetch is only a hint: it never faults, even on an
//! invalid address, writes nothing and returns nothing, so it cannot change what the program
//! computes; the address passed here also always comes from a live reference. Off x86_64 the
//! hint is a no-op.

/// Hints that the cache line holding `*value` will be read soon. Changes nothing observable.
#[inline(always)]
#[allow(unsafe_code)]
pub(crate) fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let p = std::ptr::from_ref(value).cast::<i8>();
        // SAFETY: a prefetch instruction never faults and has no architectural effect (it
        // reads nothing the program can observe and writes nothing); `p` comes from a live
        // reference in any case. SSE, which `_mm_prefetch` is gated on, is part of every
        // x86_64 CPU's baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Prefetches `slice[i]` if it exists.
#[inline(always)]
pub(crate) fn prefetch_at<T>(slice: &[T], i: usize) {
    if let Some(v) = slice.get(i) {
        prefetch(v);
    }
}
