//! [`KvElem`]: the storage types of K/V (f32, f16, bf16); kernels accumulate in f32.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use kvc_core::DType;

/// A K/V storage element. Kernels load rows of these, widen them to f32 and accumulate in f32.
pub trait KvElem: Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widens one element.
    fn to_f32(self) -> f32;
    /// Narrows one value (round to nearest even).
    fn from_f32(v: f32) -> Self;
    /// Widens a row: `dst[i] = src[i].to_f32()` (vectorised where the CPU allows).
    /// `src` and `dst` have equal lengths.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// The row as f32: `src` itself when it already is, else widened into `buf` (same length).
    #[inline(always)]
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        Self::widen(src, buf);
        buf
    }
    /// The slice as bf16 when `Self` is bf16 (the kernels' bf16 fast paths use it).
    #[doc(hidden)]
    #[inline(always)]
    fn as_bf16(_src: &[Self]) -> Option<&[bf16]> {
        None
    }
}

impl KvElem for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn as_f32<'a>(src: &'a [Self], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElem for f16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline]
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl KvElem for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn as_bf16(src: &[Self]) -> Option<&[bf16]> {
        Some(src)
    }
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        // bf16 is the top half of an f32: a shift, which the compiler vectorises.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
}
