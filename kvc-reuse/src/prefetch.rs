//! Memory hints. Software prefetch: asks the CPU to start loading a cache line the cache will
//! read soon, so the misses of independent blocks overlap instead of being paid one after
//! another. Huge pages: asks the kernel to back the cache's big tables with transparent huge
//! pages, so random reads into them rarely miss the TLB too (see [`advise_huge_pages`]).
//!
//! These are the crate's uses of `unsafe`: `core::arch::x86_64::_mm_prefetch` is an `unsafe`
//! function (it carries `#[target_feature(enable = "sse")]`, which stays unsafe to call even
//! with SSE in the build's baseline). A prefetch is only a hint: it never faults, even on an
//! invalid address, writes nothing and returns nothing, so it cannot change what the program
//! computes; the address passed here also always comes from a live reference. Off x86_64 the
//! hint is a no-op. `libc::madvise` is a foreign function; `MADV_HUGEPAGE` changes only how
//! the kernel backs the pages, never their contents, and is asked only for whole 2 MiB ranges
//! inside one live allocation of the caller. Off Linux it is a no-op.

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

/// Asks the kernel to back the whole 2 MiB ranges inside `buf`'s allocation (its capacity,
/// used or not) with transparent huge pages, where the system allows it (`madvise` mode).
/// Pages not touched yet then fault in as huge pages. Changes nothing observable; a refusal
/// (no THP support) is ignored. Tables under 2 MiB are left alone.
#[allow(unsafe_code)]
pub(crate) fn advise_huge_pages<T>(buf: &Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_ptr() as usize;
        let bytes = buf.capacity().saturating_mul(std::mem::size_of::<T>());
        let lo = start.next_multiple_of(HUGE);
        let hi = start.saturating_add(bytes) / HUGE * HUGE;
        if hi > lo {
            // SAFETY: `lo..hi` lies inside the allocation `buf` owns (its start rounded up,
            // its end rounded down, to 2 MiB, which is a multiple of every page size), so the
            // advice concerns no other memory; `MADV_HUGEPAGE` only changes how the kernel
            // backs those pages, never their contents, and its result is only a hint taken or
            // refused.
            let _ = unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// A vector of `len` copies of `value`, its allocation advised to use huge pages (see
/// [`advise_huge_pages`]) before anything is written to it.
pub(crate) fn huge_vec<T: Clone>(len: usize, value: T) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    advise_huge_pages(&v);
    v.resize(len, value);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_change_no_contents() {
        // 8 MiB: several whole 2 MiB ranges get the advice.
        let v = huge_vec(1 << 20, 7u64);
        assert_eq!(v.len(), 1 << 20);
        assert!(v.iter().all(|&x| x == 7));
        let w: Vec<u64> = (0..1 << 20).collect();
        advise_huge_pages(&w);
        prefetch_at(&w, 12_345);
        prefetch_at(&w, usize::MAX);
        assert!(w.iter().enumerate().all(|(i, &x)| x == i as u64));
        assert!(huge_vec(0, 1u8).is_empty());
    }
}
