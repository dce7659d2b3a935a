//! The capacity calculator behind `kvc-bench size`: how much KV a model takes per token and
//! per block, and how many tokens and sequences fit on a GPU after the weights.

use std::fmt;

use kvc_core::{DType, KvLayout, LayoutError};
use thiserror::Error;

use crate::profiles::{self, GpuProfile, ModelProfile};

/// Why a capacity question has no answer.
#[derive(Clone, Debug, PartialEq, Error)]
#[non_exhaustive]
pub enum SizeError {
    /// The model name is not in [`profiles::MODELS`].
    #[error("unknown model `{name}` (known: {known})")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The names known.
        known: String,
    },
    /// The GPU name is not in [`profiles::GPUS`].
    #[error("unknown GPU `{name}` (known: {known})")]
    UnknownGpu {
        /// The name given.
        name: String,
        /// The names known.
        known: String,
    },
    /// Utilisation must be in (0, 1].
    #[error("GPU memory utilisation must be in (0, 1], got {value}")]
    BadUtilisation {
        /// The value given.
        value: f64,
    },
    /// The KV layout is invalid (for example a zero block size).
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The weights alone take the memory.
    #[error(
        "{model} weights ({weights} bytes) do not fit in {usable} usable bytes of {gpu} memory"
    )]
    WeightsDoNotFit {
        /// The model.
        model: &'static str,
        /// The GPU.
        gpu: &'static str,
        /// Weight bytes.
        weights: u64,
        /// Usable memory.
        usable: u64,
    },
}

/// A capacity question.
#[derive(Clone, Debug, PartialEq)]
pub struct SizeQuery {
    /// Model name.
    pub model: String,
    /// GPU name.
    pub gpu: String,
    /// Sequence length to count sequences of.
    pub tokens: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// Share of GPU memory the engine may use.
    pub utilisation: f64,
}

/// The answer to a [`SizeQuery`] (fp16/bf16 KV and weights).
#[derive(Clone, Debug, PartialEq)]
pub struct SizeReport {
    /// The model.
    pub model: &'static ModelProfile,
    /// The GPU.
    pub gpu: &'static GpuProfile,
    /// The KV layout.
    pub layout: KvLayout,
    /// Memory the engine may use.
    pub usable_bytes: u64,
    /// KV memory left after the weights.
    pub kv_bytes: u64,
    /// Whole blocks in that memory.
    pub blocks: u64,
    /// Tokens those blocks hold.
    pub tokens: u64,
    /// The sequence length asked about.
    pub seq_len: u64,
    /// Sequences of `seq_len` tokens that fit at once (each rounded up to whole blocks).
    pub sequences: u64,
}

/// Answers a capacity question.
pub fn size(query: &SizeQuery) -> Result<SizeReport, SizeError> {
    let names = |it: &mut dyn Iterator<Item = &'static str>| it.collect::<Vec<_>>().join(", ");
    let model = profiles::model(&query.model).ok_or_else(|| SizeError::UnknownModel {
        name: query.model.clone(),
        known: names(&mut profiles::MODELS.iter().map(|m| m.name)),
    })?;
    let gpu = profiles::gpu(&query.gpu).ok_or_else(|| SizeError::UnknownGpu {
        name: query.gpu.clone(),
        known: names(&mut profiles::GPUS.iter().map(|g| g.name)),
    })?;
    if !(query.utilisation > 0.0 && query.utilisation <= 1.0) {
        return Err(SizeError::BadUtilisation {
            value: query.utilisation,
        });
    }
    let layout = model.kv_layout(query.block_size, DType::F16)?;
    let usable_bytes = (gpu.memory_bytes as f64 * query.utilisation) as u64;
    let kv_bytes = profiles::kv_capacity_bytes(gpu, model, query.utilisation).ok_or(
        SizeError::WeightsDoNotFit {
            model: model.name,
            gpu: gpu.name,
            weights: model.weight_bytes(),
            usable: usable_bytes,
        },
    )?;
    let blocks = layout.blocks_in_bytes(kv_bytes);
    let per_seq = layout.blocks_for_tokens(query.tokens).max(1);
    Ok(SizeReport {
        model,
        gpu,
        layout,
        usable_bytes,
        kv_bytes,
        blocks,
        tokens: blocks * u64::from(query.block_size),
        seq_len: query.tokens,
        sequences: blocks / per_seq,
    })
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl fmt::Display for SizeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.layout;
        writeln!(
            f,
            "{} on {} (fp16 KV; {} layers x {} KV heads x {} head dim)",
            self.model.name,
            self.gpu.name,
            l.num_layers(),
            l.kv_heads(),
            l.head_dim()
        )?;
        writeln!(
            f,
            "  KV per token:   {} ({} bytes)",
            human(l.bytes_per_token()),
            l.bytes_per_token()
        )?;
        writeln!(
            f,
            "  KV per block:   {} ({} tokens)",
            human(l.bytes_per_block()),
            l.block_size()
        )?;
        writeln!(
            f,
            "  usable memory:  {} - weights {} = {} for KV",
            human(self.usable_bytes),
            human(self.model.weight_bytes()),
            human(self.kv_bytes)
        )?;
        writeln!(
            f,
            "  fits:           {} blocks = {} tokens",
            self.blocks, self.tokens
        )?;
        write!(
            f,
            "  sequences of {} tokens at once: {}",
            self.seq_len, self.sequences
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(model: &str, gpu: &str) -> SizeQuery {
        SizeQuery {
            model: model.into(),
            gpu: gpu.into(),
            tokens: 1024,
            block_size: 16,
            utilisation: 0.9,
        }
    }

    #[test]
    fn llama2_13b_on_a100_matches_the_vllm_paper_figures() {
        // vLLM paper: 800 KiB per token, so 1K tokens ≈ 0.8 GB.
        let r = size(&query("Llama-2-13B", "A100-80GB")).unwrap();
        assert_eq!(r.layout.bytes_per_token(), 819_200);
        assert_eq!(r.layout.bytes_per_token() * 1024, 838_860_800);
        assert_eq!(r.kv_bytes, 72_000_000_000 - 26_031_728_640);
        assert_eq!(r.blocks, r.kv_bytes / (16 * 819_200));
        assert_eq!(r.sequences, r.blocks / 64);
        assert!(r.to_string().contains("800.0 KiB"));
    }

    #[test]
    fn bad_questions_are_typed_errors() {
        assert!(matches!(
            size(&query("gpt-9", "H100")),
            Err(SizeError::UnknownModel { .. })
        ));
        assert!(matches!(
            size(&query("Llama-3-8B", "TPU")),
            Err(SizeError::UnknownGpu { .. })
        ));
        assert!(matches!(
            size(&query("Llama-3-70B", "H100")),
            Err(SizeError::WeightsDoNotFit { .. })
        ));
        let mut q = query("Llama-3-8B", "H100");
        q.utilisation = 1.5;
        assert!(matches!(size(&q), Err(SizeError::BadUtilisation { .. })));
        q.utilisation = 0.9;
        q.block_size = 0;
        assert!(matches!(size(&q), Err(SizeError::Layout(_))));
    }
}
