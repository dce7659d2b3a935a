//! The cost model that stands in for a GPU: how long one step of a plan takes.
//!
//! A step is bounded by compute or by memory traffic, whichever is slower (a roofline), plus a
//! fixed per-step overhead (kernel launches, sampling, scheduling):
//! - compute: `2 × parameters × new tokens` for the dense layers, plus attention,
//!   `4 × layers × query heads × head dim × new tokens × context` (QKᵀ and PV), over the GPU's
//!   dense BF16 rate;
//! - memory: the weights once per step, plus the K/V read (every context token of every
//!   sequence) and written (every new token), over the memory bandwidth.
//!
//! A prefill-only step is therefore compute-bound and a decode-only step memory-bound, as on
//! real hardware. Efficiency factors scale the peak rates to what kernels reach.

use kvc_core::{DType, KvLayout, LayoutError};

use crate::profiles::{GpuProfile, ModelProfile};

/// The cost of steps on one GPU for one model.
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    /// The GPU.
    pub gpu: GpuProfile,
    /// The model.
    pub model: ModelProfile,
    /// KV layout (fp16/bf16 KV).
    pub layout: KvLayout,
    /// Share of peak FLOP/s reached (model FLOPs utilisation).
    pub compute_efficiency: f64,
    /// Share of peak bandwidth reached.
    pub memory_efficiency: f64,
    /// Fixed time per step, in seconds.
    pub step_overhead_s: f64,
}

impl CostModel {
    /// A cost model with typical efficiencies (60% of peak compute, 80% of peak bandwidth)
    /// and a 2 ms step overhead.
    pub fn new(gpu: GpuProfile, model: ModelProfile, block_size: u32) -> Result<Self, LayoutError> {
        Ok(Self {
            layout: model.kv_layout(block_size, DType::BF16)?,
            gpu,
            model,
            compute_efficiency: 0.6,
            memory_efficiency: 0.8,
            step_overhead_s: 0.002,
        })
    }

    /// Seconds for a step computing `new_tokens[i]` tokens of sequence `i`, whose context
    /// after the step is `context[i]` tokens.
    #[must_use]
    pub fn step_seconds(&self, new_tokens: &[u32], context: &[u32]) -> f64 {
        if new_tokens.is_empty() {
            return 0.0;
        }
        let m = &self.model;
        let new: f64 = new_tokens.iter().map(|&n| f64::from(n)).sum();
        let attn_per_token =
            4.0 * f64::from(m.layers) * f64::from(m.q_heads) * f64::from(m.head_dim);
        let attention: f64 = new_tokens
            .iter()
            .zip(context)
            .map(|(&n, &c)| attn_per_token * f64::from(n) * f64::from(c))
            .sum();
        let flops = 2.0 * m.params as f64 * new + attention;
        let kv_tokens: f64 = context.iter().map(|&c| f64::from(c)).sum::<f64>() + new;
        let bytes = m.weight_bytes() as f64 + kv_tokens * self.layout.bytes_per_token() as f64;
        let compute = flops / (self.gpu.bf16_flops * self.compute_efficiency);
        let memory = bytes / (self.gpu.memory_bandwidth * self.memory_efficiency);
        compute.max(memory) + self.step_overhead_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::{gpu, model};

    #[test]
    fn prefill_is_compute_bound_and_decode_memory_bound() {
        let c = CostModel::new(*gpu("H100").unwrap(), *model("Llama-3-8B").unwrap(), 16).unwrap();
        // Decode of one token at context 1,000: weights (16 GB) over 2.68 TB/s ≈ 6 ms + 2 ms.
        let decode = c.step_seconds(&[1], &[1_000]);
        assert!((decode - (16.06e9 + 1_001.0 * 131_072.0) / (3.35e12 * 0.8) - 0.002).abs() < 1e-4);
        // A 4,096-token prefill: ≈ 6.6e13 FLOPs over 593 TFLOP/s ≈ 0.11 s.
        let prefill = c.step_seconds(&[4_096], &[4_096]);
        assert!(prefill > 0.1 && prefill < 0.13, "{prefill}");
        // Batching decodes is almost free until KV reads dominate.
        let batch = c.step_seconds(&[1; 64], &[1_000; 64]);
        assert!(batch < 2.0 * decode);
        assert_eq!(c.step_seconds(&[], &[]), 0.0);
    }
}
