//! Hardware and model profiles for the cost model and the capacity calculator.
//!
//! GPU figures are the vendors' datasheet numbers for the SXM parts:
//! - H200 SXM: 141 GB HBM3e at 4.8 TB/s; dense BF16 989 TFLOPS (NVIDIA H200 datasheet, the
//!   1,979 TFLOPS headline is with 2:4 sparsity).
//! - H100 SXM5 80 GB: HBM3 at 3.35 TB/s; dense BF16 989 TFLOPS (NVIDIA H100 datasheet).
//! - A100 SXM4 80 GB: HBM2e at 2.039 TB/s; dense BF16 312 TFLOPS (NVIDIA A100 datasheet).
//!
//! Model shapes come from the models' published `config.json` files (Meta Llama 2 and 3):
//! layers, attention heads, KV heads (grouped-query attention), head dimension, and the
//! parameter counts of the released checkpoints.

use kvc_core::{DType, KvLayout, LayoutError};

/// A GPU as the cost model sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuProfile {
    /// Name used on the command line.
    pub name: &'static str,
    /// Device memory in bytes.
    pub memory_bytes: u64,
    /// Memory bandwidth in bytes per second.
    pub memory_bandwidth: f64,
    /// Dense BF16 tensor throughput in FLOP per second.
    pub bf16_flops: f64,
}

/// A decoder-only transformer as the cost model sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelProfile {
    /// Name used on the command line.
    pub name: &'static str,
    /// Transformer layers.
    pub layers: u32,
    /// Query heads.
    pub q_heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Parameters.
    pub params: u64,
}

/// The GPUs the workbench knows.
pub const GPUS: &[GpuProfile] = &[
    GpuProfile {
        name: "H200",
        memory_bytes: 141_000_000_000,
        memory_bandwidth: 4.8e12,
        bf16_flops: 989e12,
    },
    GpuProfile {
        name: "H100",
        memory_bytes: 80_000_000_000,
        memory_bandwidth: 3.35e12,
        bf16_flops: 989e12,
    },
    GpuProfile {
        name: "A100-80GB",
        memory_bytes: 80_000_000_000,
        memory_bandwidth: 2.039e12,
        bf16_flops: 312e12,
    },
];

/// The models the workbench knows.
pub const MODELS: &[ModelProfile] = &[
    ModelProfile {
        name: "Llama-3-8B",
        layers: 32,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        params: 8_030_261_248,
    },
    ModelProfile {
        name: "Llama-2-13B",
        layers: 40,
        q_heads: 40,
        kv_heads: 40,
        head_dim: 128,
        params: 13_015_864_320,
    },
    ModelProfile {
        name: "Llama-3-70B",
        layers: 80,
        q_heads: 64,
        kv_heads: 8,
        head_dim: 128,
        params: 70_553_706_496,
    },
];

/// Finds a GPU by name, ignoring ASCII case.
#[must_use]
pub fn gpu(name: &str) -> Option<&'static GpuProfile> {
    GPUS.iter().find(|g| g.name.eq_ignore_ascii_case(name))
}

/// Finds a model by name, ignoring ASCII case.
#[must_use]
pub fn model(name: &str) -> Option<&'static ModelProfile> {
    MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

impl ModelProfile {
    /// The model's KV layout with blocks of `block_size` tokens in `dtype`.
    pub fn kv_layout(&self, block_size: u32, dtype: DType) -> Result<KvLayout, LayoutError> {
        KvLayout::new(self.layers, self.kv_heads, self.head_dim, block_size, dtype)
    }

    /// Bytes of weights in 16-bit precision.
    #[must_use]
    pub fn weight_bytes(&self) -> u64 {
        self.params * 2
    }
}

/// KV memory left on `gpu` for `model`: `memory × utilisation − weights` (16-bit weights), or
/// `None` when the weights do not fit.
#[must_use]
pub fn kv_capacity_bytes(gpu: &GpuProfile, model: &ModelProfile, utilisation: f64) -> Option<u64> {
    let usable = (gpu.memory_bytes as f64 * utilisation.clamp(0.0, 1.0)) as u64;
    usable.checked_sub(model.weight_bytes()).filter(|&b| b > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama2_13b_takes_800_kib_of_fp16_kv_per_token() {
        let layout = model("llama-2-13b")
            .unwrap()
            .kv_layout(16, DType::F16)
            .unwrap();
        assert_eq!(layout.bytes_per_token(), 800 * 1024);
    }

    #[test]
    fn capacity_subtracts_weights_and_rejects_models_that_do_not_fit() {
        let h100 = gpu("H100").unwrap();
        let l8 = model("Llama-3-8B").unwrap();
        let cap = kv_capacity_bytes(h100, l8, 0.9).unwrap();
        assert_eq!(cap, 72_000_000_000 - 16_060_522_496);
        let l70 = model("Llama-3-70B").unwrap();
        assert_eq!(kv_capacity_bytes(h100, l70, 0.9), None);
        assert!(kv_capacity_bytes(gpu("H200").unwrap(), l70, 0.9).is_none());
    }
}
