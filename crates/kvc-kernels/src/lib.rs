//! The math on paged KV: `write_kv`, paged decode, paged prefill, state merge, block copy
//! and swap, on the CPU (rayon) always and on CUDA (NVRTC through cudarc) behind feature `cuda`.
//!
//! Not built yet: this crate holds only its description until the kernel work lands.
#![warn(missing_docs)]
