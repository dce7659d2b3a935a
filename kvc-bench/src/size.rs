//! The capacity calculator behind `kvc-bench size`: how much KV a model takes per token, per
//! sequence and per GPU, and how many sequences fit after the weights, on one GPU or several
//! in tensor parallelism.
//!
//! The model is a built-in shape ([`known_models`]) or a Hugging Face `config.json`
//! ([`ModelShape::from_hf_config`]). The KV of one token in one layer takes:
//!
//! - multi-head, grouped-query and multi-query attention (MHA, GQA, MQA): K and V for each KV
//!   head, `2 × kv_heads × head_dim` elements;
//! - multi-head latent attention (MLA, DeepSeek-V2/V3): one compressed latent and one rotary
//!   key shared by all heads, `kv_lora_rank + qk_rope_head_dim` elements.
//!
//! A sliding-window layer keeps only the last `window` tokens of a sequence; a full-attention
//! layer keeps all of them. Every layer rounds its tokens up to whole blocks.
//!
//! With tensor parallelism over `gpus` ranks, the weights are split evenly, the KV heads are
//! split across ranks (a rank holds `ceil(kv_heads / gpus)` heads: with fewer KV heads than
//! ranks each head is replicated), and an MLA latent, which no head owns, is replicated on
//! every rank. The figures are per GPU, which is where memory runs out.
//!
//! ```
//! use kvc_bench::size::{KvDtype, SizeQuery, size};
//!
//! // Llama-3-70B on 8 x H100 with 32k-token sequences and bf16 KV.
//! let mut q = SizeQuery::new("Llama-3-70B", "H100");
//! q.gpus = 8;
//! q.tokens = 32_768;
//! q.dtype = KvDtype::Bf16;
//! let r = size(&q)?;
//! assert_eq!(r.kv_bytes_per_token, 320 * 1024); // 2 x 80 layers x 8 heads x 128 x 2 bytes
//! assert_eq!(r.kv_bytes_per_token_per_gpu, 40 * 1024); // one KV head per GPU
//! assert_eq!(r.sequences, 40); // (72 GB - 17.6 GB of weights) / (40 KiB x 32,768)
//! # Ok::<(), kvc_bench::size::SizeError>(())
//! ```

use std::fmt;

use serde_json::Value;
use thiserror::Error;

use crate::profiles::{self, GpuProfile};

/// Why a capacity question has no answer.
#[derive(Clone, Debug, PartialEq, Error)]
#[non_exhaustive]
pub enum SizeError {
    /// The model name is not a built-in shape.
    #[error("unknown model `{name}` (known: {known}; or pass --model-config config.json)")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The names known.
        known: String,
    },
    /// The GPU name is not in [`profiles::GPUS`].
    #[error("unknown GPU `{name}` (known: {known}; or pass --gpu-memory SIZE)")]
    UnknownGpu {
        /// The name given.
        name: String,
        /// The names known.
        known: String,
    },
    /// The KV dtype name is unknown.
    #[error("unknown KV dtype `{name}` (known: fp16, bf16, fp8, int8)")]
    UnknownDtype {
        /// The name given.
        name: String,
    },
    /// Utilisation must be in (0, 1].
    #[error("GPU memory utilisation must be in (0, 1], got {value}")]
    BadUtilisation {
        /// The value given.
        value: f64,
    },
    /// A setting that must be at least 1 is 0.
    #[error("{name} must be at least 1")]
    Zero {
        /// The setting.
        name: &'static str,
    },
    /// A setting is above its documented maximum.
    #[error("{name} {value} is over the limit of {max}")]
    TooLarge {
        /// The setting.
        name: &'static str,
        /// The value given.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// The attention heads do not split evenly over the GPUs.
    #[error(
        "{model} cannot be split over {gpus} GPUs in tensor parallelism: {heads} attention heads \
         and {kv_heads} KV heads must both divide evenly (try --gpus {hint})"
    )]
    Indivisible {
        /// The model.
        model: String,
        /// GPUs asked.
        gpus: u32,
        /// Attention heads.
        heads: u32,
        /// KV heads.
        kv_heads: u32,
        /// A GPU count that divides evenly.
        hint: u32,
    },
    /// A `config.json` lacks a field the KV size depends on, or has a wrong value.
    #[error("config.json: {problem}")]
    Config {
        /// What is wrong.
        problem: String,
    },
    /// Nothing fits: the weights take the memory, or not one sequence fits beside them. The
    /// message says what would fit.
    #[error("{what}; would fit: {suggestions}")]
    DoesNotFit {
        /// What does not fit.
        what: String,
        /// What would: more GPUs, a smaller KV dtype, a shorter context.
        suggestions: String,
    },
}

/// The element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KvDtype {
    /// IEEE half precision, 2 bytes.
    F16,
    /// bfloat16, 2 bytes (the usual default).
    #[default]
    Bf16,
    /// 8-bit float (e4m3 or e5m2), 1 byte.
    Fp8,
    /// 8-bit integer with per-block scales, 1 byte (the scales are not counted).
    Int8,
}

impl KvDtype {
    /// Every dtype.
    pub const ALL: [KvDtype; 4] = [Self::F16, Self::Bf16, Self::Fp8, Self::Int8];

    /// Bytes per element.
    #[must_use]
    pub const fn size_bytes(self) -> u64 {
        match self {
            Self::F16 | Self::Bf16 => 2,
            Self::Fp8 | Self::Int8 => 1,
        }
    }

    /// The command-line name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::F16 => "fp16",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
            Self::Int8 => "int8",
        }
    }

    /// The dtype named `name` (`fp16`, `bf16`, `fp8`, `int8`; `f16` and `float16` too).
    pub fn from_name(name: &str) -> Result<Self, SizeError> {
        match name.to_ascii_lowercase().as_str() {
            "fp16" | "f16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "fp8" | "fp8_e4m3" | "fp8_e5m2" | "e4m3" | "e5m2" => Ok(Self::Fp8),
            "int8" | "i8" => Ok(Self::Int8),
            _ => Err(SizeError::UnknownDtype {
                name: name.to_owned(),
            }),
        }
    }
}

/// How a layer's attention stores its KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvAttention {
    /// K and V per KV head: MHA when `kv_heads` equals the attention heads, GQA when fewer,
    /// MQA when 1.
    Heads {
        /// KV heads per layer.
        kv_heads: u32,
        /// Elements per head.
        head_dim: u32,
    },
    /// Multi-head latent attention: one latent of `kv_lora_rank` plus a rotary key of
    /// `rope_dim` elements per token and layer, shared by every head.
    Latent {
        /// The compressed KV's width (`kv_lora_rank`).
        kv_lora_rank: u32,
        /// The decoupled rotary key's width (`qk_rope_head_dim`).
        rope_dim: u32,
    },
}

/// A model's shape, as far as KV memory and weight memory go.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    /// The model's name.
    pub name: String,
    /// Transformer layers.
    pub layers: u32,
    /// Query (attention) heads.
    pub heads: u32,
    /// How the KV is stored.
    pub attention: KvAttention,
    /// Sliding-window attention: `(window tokens, layers that use it)`; the other layers
    /// attend to the whole sequence.
    pub sliding: Option<(u64, u32)>,
    /// Parameters (all experts of a mixture of experts: they all sit in memory).
    pub params: u64,
    /// Where the shape comes from.
    pub source: String,
}

impl ModelShape {
    /// The attention's short name: MHA, GQA, MQA or MLA.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self.attention {
            KvAttention::Heads { kv_heads: 1, .. } => "MQA",
            KvAttention::Heads { kv_heads, .. } if kv_heads == self.heads => "MHA",
            KvAttention::Heads { .. } => "GQA",
            KvAttention::Latent { .. } => "MLA",
        }
    }

    /// KV elements of one token in one layer on one of `gpus` tensor-parallel ranks.
    #[must_use]
    pub fn elements_per_token_layer(&self, gpus: u32) -> u64 {
        match self.attention {
            KvAttention::Heads { kv_heads, head_dim } => {
                2 * u64::from(kv_heads.div_ceil(gpus.max(1))) * u64::from(head_dim)
            }
            KvAttention::Latent {
                kv_lora_rank,
                rope_dim,
            } => u64::from(kv_lora_rank) + u64::from(rope_dim),
        }
    }

    /// Reads the fields that set the KV size from a Hugging Face `config.json`:
    /// `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads` (absent: MHA;
    /// Falcon's `multi_query`: 1; it must divide `num_attention_heads`), `head_dim` (absent:
    /// `hidden_size / num_attention_heads`, which must then divide evenly),
    /// `kv_lora_rank` and `qk_rope_head_dim` (MLA), `sliding_window` with `layer_types`,
    /// `use_sliding_window` and `max_window_layers` (which layers use it; Gemma 2: every
    /// other layer). Parameters are estimated from `hidden_size`, `intermediate_size` (and
    /// the mixture-of-experts fields) and `vocab_size`, unless `params` is given.
    pub fn from_hf_config(
        name: &str,
        json: &str,
        params: Option<u64>,
    ) -> Result<ModelShape, SizeError> {
        let bad = |problem: String| SizeError::Config { problem };
        let v: Value = serde_json::from_str(json).map_err(|e| bad(format!("not JSON: {e}")))?;
        // Multimodal configs keep the language model's fields under `text_config`.
        let v = match v.get("text_config") {
            Some(t) if t.is_object() => t.clone(),
            _ => v,
        };
        let get = |keys: &[&str]| keys.iter().find_map(|k| v.get(*k).filter(|x| !x.is_null()));
        let num = |keys: &[&'static str]| -> Result<Option<u64>, SizeError> {
            match get(keys) {
                None => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("`{}` is {x}, expected a whole number", keys[0]))),
            }
        };
        let need = |keys: &[&'static str]| -> Result<u64, SizeError> {
            num(keys)?.ok_or_else(|| bad(format!("missing `{}`", keys[0])))
        };
        let small = |key: &'static str, n: u64| -> Result<u32, SizeError> {
            u32::try_from(n)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| bad(format!("`{key}` is {n}, expected 1 to {}", u32::MAX)))
        };
        let layers = small(
            "num_hidden_layers",
            need(&["num_hidden_layers", "n_layer", "num_layers"])?,
        )?;
        let heads = small(
            "num_attention_heads",
            need(&["num_attention_heads", "n_head", "num_heads"])?,
        )?;
        let hidden = num(&["hidden_size", "n_embd", "d_model"])?;
        let head_dim = match num(&["head_dim"])? {
            Some(d) => small("head_dim", d)?,
            None => {
                let h = hidden.ok_or_else(|| bad("missing `head_dim` and `hidden_size`".into()))?;
                if h % u64::from(heads) != 0 {
                    return Err(bad(format!(
                        "`hidden_size` {h} is not a multiple of `num_attention_heads` {heads}; \
                         give `head_dim`"
                    )));
                }
                small("head_dim", h / u64::from(heads))?
            }
        };
        let attention = match (num(&["kv_lora_rank"])?, num(&["qk_rope_head_dim"])?) {
            (Some(rank), Some(rope)) => KvAttention::Latent {
                kv_lora_rank: small("kv_lora_rank", rank)?,
                rope_dim: u32::try_from(rope)
                    .map_err(|_| bad("`qk_rope_head_dim` too large".into()))?,
            },
            _ => {
                let multi_query = get(&["multi_query"]).and_then(Value::as_bool) == Some(true);
                let kv = match num(&[
                    "num_key_value_heads",
                    "num_kv_heads",
                    "multi_query_group_num",
                ])? {
                    Some(k) => small("num_key_value_heads", k)?,
                    None if multi_query => 1,
                    None => heads,
                };
                if heads % kv != 0 {
                    return Err(bad(format!(
                        "`num_key_value_heads` {kv} does not divide `num_attention_heads` {heads}"
                    )));
                }
                KvAttention::Heads {
                    kv_heads: kv,
                    head_dim,
                }
            }
        };
        let sliding = match num(&["sliding_window"])? {
            Some(window)
                if get(&["use_sliding_window"]).and_then(Value::as_bool) != Some(false) =>
            {
                let sliding_layers = if let Some(Value::Array(types)) = get(&["layer_types"]) {
                    types
                        .iter()
                        .filter(|t| t.as_str() == Some("sliding_attention"))
                        .count() as u32
                } else if get(&["model_type"]).and_then(Value::as_str) == Some("gemma2") {
                    // Gemma 2 alternates local (sliding) and global layers, starting local.
                    layers.div_ceil(2)
                } else if let Some(first_full) =
                    num(&["max_window_layers"])?.filter(|_| get(&["use_sliding_window"]).is_some())
                {
                    // Qwen2: layers from `max_window_layers` on use the window.
                    layers.saturating_sub(u32::try_from(first_full).unwrap_or(u32::MAX))
                } else {
                    layers
                };
                (window > 0 && sliding_layers > 0).then_some((window, sliding_layers))
            }
            _ => None,
        };
        let params = match params {
            Some(p) => p,
            None => estimate_params(&v, hidden, layers, heads, head_dim, attention).ok_or_else(
                || {
                    bad("cannot estimate the parameters (needs `hidden_size`, \
                         `intermediate_size` and `vocab_size`); pass --params"
                        .into())
                },
            )?,
        };
        Ok(ModelShape {
            name: name.to_owned(),
            layers,
            heads,
            attention,
            sliding,
            params,
            source: "config.json".into(),
        })
    }
}

/// Parameters of a decoder from its config: embeddings (twice unless tied), per layer the
/// attention projections, a gated MLP (or its experts) and two norms. Biases are left out
/// (under 0.1% of any model here).
fn estimate_params(
    v: &Value,
    hidden: Option<u64>,
    layers: u32,
    heads: u32,
    head_dim: u32,
    attention: KvAttention,
) -> Option<u64> {
    let get = |k: &str| v.get(k).and_then(Value::as_u64);
    let h = hidden?;
    let vocab = get("vocab_size")?;
    let inter = get("intermediate_size").or_else(|| get("ffn_hidden_size"))?;
    let (l, q, d) = (u64::from(layers), u64::from(heads), u64::from(head_dim));
    let attn = match attention {
        KvAttention::Heads { kv_heads, .. } => {
            let kv = u64::from(kv_heads);
            h * q * d * 2 + h * kv * d * 2
        }
        KvAttention::Latent {
            kv_lora_rank,
            rope_dim,
        } => {
            let (rank, rope) = (u64::from(kv_lora_rank), u64::from(rope_dim));
            let nope = get("qk_nope_head_dim").unwrap_or(d);
            let v_dim = get("v_head_dim").unwrap_or(d);
            let q_proj = match get("q_lora_rank") {
                Some(qr) => h * qr + qr + qr * q * (nope + rope),
                None => h * q * (nope + rope),
            };
            q_proj + h * (rank + rope) + rank + rank * q * (nope + v_dim) + q * v_dim * h
        }
    };
    let dense_mlp = 3 * h * inter;
    let experts = get("n_routed_experts").or_else(|| get("num_local_experts"));
    let mlp = match experts {
        Some(e) => {
            let moe_inter = get("moe_intermediate_size").unwrap_or(inter);
            let shared = get("n_shared_experts").unwrap_or(0);
            let dense_layers = get("first_k_dense_replace").unwrap_or(0).min(l);
            let moe = (e + shared) * 3 * h * moe_inter + h * e;
            return Some(
                vocab * h * embed_copies(v)
                    + h
                    + l * (attn + 2 * h)
                    + dense_layers * dense_mlp
                    + (l - dense_layers) * moe,
            );
        }
        None => dense_mlp,
    };
    Some(vocab * h * embed_copies(v) + h + l * (attn + mlp + 2 * h))
}

fn embed_copies(v: &Value) -> u64 {
    if v.get("tie_word_embeddings").and_then(Value::as_bool) == Some(true) {
        1
    } else {
        2
    }
}

/// The built-in model shapes, each from the model's published `config.json` on the Hugging
/// Face hub (named in [`ModelShape::source`]).
#[must_use]
pub fn known_models() -> Vec<ModelShape> {
    let mut out: Vec<ModelShape> = profiles::MODELS
        .iter()
        .map(|m| ModelShape {
            name: m.name.to_owned(),
            layers: m.layers,
            heads: m.q_heads,
            attention: KvAttention::Heads {
                kv_heads: m.kv_heads,
                head_dim: m.head_dim,
            },
            sliding: None,
            params: m.params,
            source: format!("{}/config.json", hub_repo(m.name)),
        })
        .collect();
    out.extend([
        ModelShape {
            name: "Mistral-7B".into(),
            layers: 32,
            heads: 32,
            attention: KvAttention::Heads {
                kv_heads: 8,
                head_dim: 128,
            },
            sliding: Some((4_096, 32)),
            params: 7_241_732_096,
            source: "mistralai/Mistral-7B-v0.1/config.json".into(),
        },
        ModelShape {
            name: "Gemma-2-9B".into(),
            layers: 42,
            heads: 16,
            attention: KvAttention::Heads {
                kv_heads: 8,
                head_dim: 256,
            },
            sliding: Some((4_096, 21)),
            params: 9_241_705_984,
            source: "google/gemma-2-9b/config.json".into(),
        },
        ModelShape {
            name: "Falcon-7B".into(),
            layers: 32,
            heads: 71,
            attention: KvAttention::Heads {
                kv_heads: 1,
                head_dim: 64,
            },
            sliding: None,
            params: 6_921_720_704,
            source: "tiiuae/falcon-7b/config.json".into(),
        },
        ModelShape {
            name: "DeepSeek-V3".into(),
            layers: 61,
            heads: 128,
            attention: KvAttention::Latent {
                kv_lora_rank: 512,
                rope_dim: 64,
            },
            sliding: None,
            params: 671_000_000_000,
            source: "deepseek-ai/DeepSeek-V3/config.json (671B parameters per its model card)"
                .into(),
        },
    ]);
    out
}

fn hub_repo(name: &str) -> &'static str {
    match name {
        "Llama-3-8B" => "meta-llama/Meta-Llama-3-8B",
        "Llama-2-13B" => "meta-llama/Llama-2-13b-hf",
        "Llama-3-70B" => "meta-llama/Meta-Llama-3-70B",
        _ => "the model's hub repository",
    }
}

/// The built-in shape named `name`, ignoring ASCII case.
pub fn model(name: &str) -> Result<ModelShape, SizeError> {
    let all = known_models();
    let names = all
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    all.iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
        .cloned()
        .ok_or(SizeError::UnknownModel {
            name: name.to_owned(),
            known: names,
        })
}

/// The most GPUs one question may name (a tensor-parallel group larger than this is not a
/// deployment anyone runs).
pub const MAX_GPUS: u32 = 1_024;

/// The longest sequence one question may name: 2³⁰ tokens (a billion; published models stop
/// at ten million).
pub const MAX_TOKENS: u64 = 1 << 30;

/// The largest block one question may name, in tokens.
pub const MAX_BLOCK_SIZE: u32 = 1 << 16;

/// Where the GPU memory figure comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum GpuChoice {
    /// A GPU of [`profiles::GPUS`], by name.
    Named(String),
    /// Memory per GPU in bytes (for a GPU not in the list).
    Memory(u64),
}

/// A capacity question.
#[derive(Clone, Debug, PartialEq)]
pub struct SizeQuery {
    /// The model.
    pub model: ModelShape,
    /// The GPU.
    pub gpu: GpuChoice,
    /// GPUs in one tensor-parallel group.
    pub gpus: u32,
    /// Sequence length to count sequences of.
    pub tokens: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// The KV element type.
    pub dtype: KvDtype,
    /// The weights' element type (bf16 for most checkpoints; DeepSeek-V3 ships in fp8).
    pub weight_dtype: KvDtype,
    /// Share of GPU memory the engine may use.
    pub utilisation: f64,
}

impl SizeQuery {
    /// A question about a built-in model on one named GPU: 1,024-token sequences, 16-token
    /// blocks, bf16 KV, 90% of memory. A name that is not built in gives an empty shape that
    /// [`size`] reports as unknown.
    #[must_use]
    pub fn new(model_name: &str, gpu: &str) -> Self {
        let model = model(model_name).unwrap_or_else(|_| ModelShape {
            name: model_name.to_owned(),
            layers: 0,
            heads: 0,
            attention: KvAttention::Heads {
                kv_heads: 0,
                head_dim: 0,
            },
            sliding: None,
            params: 0,
            source: String::new(),
        });
        Self {
            model,
            gpu: GpuChoice::Named(gpu.to_owned()),
            gpus: 1,
            tokens: 1_024,
            block_size: 16,
            dtype: KvDtype::Bf16,
            weight_dtype: KvDtype::Bf16,
            utilisation: 0.9,
        }
    }
}

/// The answer to a [`SizeQuery`].
#[derive(Clone, Debug, PartialEq)]
pub struct SizeReport {
    /// The question.
    pub query: SizeQuery,
    /// The GPU's name (or "GPU" for a given memory size).
    pub gpu_name: String,
    /// Memory of one GPU.
    pub gpu_memory: u64,
    /// KV bytes of one token (all layers, all ranks together; full-attention layers count).
    pub kv_bytes_per_token: u64,
    /// KV bytes of one token on one GPU.
    pub kv_bytes_per_token_per_gpu: u64,
    /// KV bytes of one sequence of `query.tokens` on one GPU (whole blocks, windows applied).
    pub kv_bytes_per_sequence_per_gpu: u64,
    /// Memory the engine may use on one GPU.
    pub usable_bytes: u64,
    /// Weight bytes on one GPU.
    pub weight_bytes_per_gpu: u64,
    /// KV memory on one GPU after the weights.
    pub kv_bytes: u64,
    /// Sequences of `query.tokens` that fit at once.
    pub sequences: u64,
    /// Tokens in those sequences.
    pub tokens: u64,
}

/// The per-GPU figures of a question, without judging whether anything fits.
struct Figures {
    gpu_name: String,
    gpu_memory: u64,
    usable: u64,
    weights: u64,
    per_token_all: u64,
    per_token: u64,
    per_seq: u64,
}

fn gpu_of(choice: &GpuChoice) -> Result<(String, u64), SizeError> {
    match choice {
        GpuChoice::Memory(bytes) => Ok(("GPU".into(), *bytes)),
        GpuChoice::Named(name) => {
            let g: &GpuProfile = profiles::gpu(name).ok_or_else(|| SizeError::UnknownGpu {
                name: name.clone(),
                known: profiles::GPUS
                    .iter()
                    .map(|g| g.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
            Ok((g.name.into(), g.memory_bytes))
        }
    }
}

fn figures(q: &SizeQuery) -> Result<Figures, SizeError> {
    let m = &q.model;
    if m.layers == 0 {
        return Err(model(&m.name)
            .err()
            .unwrap_or(SizeError::Zero { name: "layers" }));
    }
    for (value, name, max) in [
        (u64::from(q.gpus), "--gpus", u64::from(MAX_GPUS)),
        (q.tokens, "--tokens", MAX_TOKENS),
        (
            u64::from(q.block_size),
            "--block-size",
            u64::from(MAX_BLOCK_SIZE),
        ),
    ] {
        if value == 0 {
            return Err(SizeError::Zero { name });
        }
        if value > max {
            return Err(SizeError::TooLarge { name, value, max });
        }
    }
    if !(q.utilisation > 0.0 && q.utilisation <= 1.0) {
        return Err(SizeError::BadUtilisation {
            value: q.utilisation,
        });
    }
    let (gpu_name, gpu_memory) = gpu_of(&q.gpu)?;
    if let KvAttention::Heads { kv_heads, .. } = m.attention {
        let splits = |g: u32| {
            m.heads.is_multiple_of(g) && (kv_heads.is_multiple_of(g) || g.is_multiple_of(kv_heads))
        };
        if !splits(q.gpus) {
            let hint = (1..q.gpus).rev().find(|&g| splits(g)).unwrap_or(1);
            return Err(SizeError::Indivisible {
                model: m.name.clone(),
                gpus: q.gpus,
                heads: m.heads,
                kv_heads,
                hint,
            });
        }
    }
    let bytes = q.dtype.size_bytes();
    let per_layer = m.elements_per_token_layer(q.gpus) * bytes;
    let per_layer_all = match m.attention {
        KvAttention::Heads { .. } => m.elements_per_token_layer(1) * bytes,
        KvAttention::Latent { .. } => per_layer,
    };
    let (window, sliding_layers) = m.sliding.unwrap_or((u64::MAX, 0));
    let sliding_layers = u64::from(sliding_layers.min(m.layers));
    let full_layers = u64::from(m.layers) - sliding_layers;
    let bs = u64::from(q.block_size);
    let slots = |tokens: u64| tokens.div_ceil(bs) * bs;
    // At most 2^30 tokens x 2^16 block x (2^32 x 2 x 2^32) elements could overflow: saturate,
    // the answer is then "does not fit" either way.
    let per_seq = per_layer
        .saturating_mul(full_layers.saturating_mul(slots(q.tokens)))
        .saturating_add(
            per_layer.saturating_mul(sliding_layers.saturating_mul(slots(q.tokens.min(window)))),
        );
    let usable = (gpu_memory as f64 * q.utilisation) as u64;
    let weights =
        (m.params.saturating_mul(q.weight_dtype.size_bytes())).div_ceil(u64::from(q.gpus));
    Ok(Figures {
        gpu_name,
        gpu_memory,
        usable,
        weights,
        per_token_all: per_layer_all.saturating_mul(u64::from(m.layers)),
        per_token: per_layer.saturating_mul(u64::from(m.layers)),
        per_seq,
    })
}

/// Sequences that fit per GPU, or `None` when the weights alone do not fit.
fn fitting(f: &Figures) -> Option<u64> {
    let kv = f.usable.checked_sub(f.weights)?;
    Some(kv / f.per_seq.max(1))
}

/// Answers a capacity question; when nothing fits, the error says what would.
pub fn size(query: &SizeQuery) -> Result<SizeReport, SizeError> {
    let f = figures(query)?;
    let sequences = fitting(&f).unwrap_or(0);
    if sequences == 0 {
        let what = if f.weights > f.usable {
            format!(
                "{} weights ({} in {}, {} per GPU) do not fit in {} usable on {} x {} ({})",
                query.model.name,
                human_decimal(
                    query
                        .model
                        .params
                        .saturating_mul(query.weight_dtype.size_bytes())
                ),
                query.weight_dtype.name(),
                human_decimal(f.weights),
                human_decimal(f.usable),
                query.gpus,
                f.gpu_name,
                human_decimal(f.gpu_memory)
            )
        } else {
            format!(
                "not one {}-token sequence ({} of {} KV per GPU) fits in the {} left per GPU \
                 after {} of weights on {} x {}",
                query.tokens,
                human_decimal(f.per_seq),
                query.dtype.name(),
                human_decimal(f.usable - f.weights),
                human_decimal(f.weights),
                query.gpus,
                f.gpu_name
            )
        };
        return Err(SizeError::DoesNotFit {
            what,
            suggestions: suggestions(query),
        });
    }
    Ok(SizeReport {
        gpu_name: f.gpu_name,
        gpu_memory: f.gpu_memory,
        kv_bytes_per_token: f.per_token_all,
        kv_bytes_per_token_per_gpu: f.per_token,
        kv_bytes_per_sequence_per_gpu: f.per_seq,
        usable_bytes: f.usable,
        weight_bytes_per_gpu: f.weights,
        kv_bytes: f.usable - f.weights,
        sequences,
        tokens: sequences.saturating_mul(query.tokens),
        query: query.clone(),
    })
}

/// What would fit instead: more GPUs, an 8-bit KV, a shorter context.
fn suggestions(q: &SizeQuery) -> String {
    let fits = |q: &SizeQuery| figures(q).ok().and_then(|f| fitting(&f)).filter(|&s| s > 0);
    let mut out = Vec::new();
    let mut more = q.clone();
    for gpus in (1..=10)
        .map(|k| 1u32 << k)
        .filter(|&g| g > q.gpus && g <= MAX_GPUS)
    {
        more.gpus = gpus;
        if let Some(s) = fits(&more) {
            out.push(format!("--gpus {gpus} ({s} sequences)"));
            break;
        }
    }
    if q.weight_dtype.size_bytes() > 1 {
        let mut fp8 = q.clone();
        fp8.weight_dtype = KvDtype::Fp8;
        if let Some(s) = fits(&fp8) {
            out.push(format!("--weight-dtype fp8 ({s} sequences)"));
        }
    }
    if q.dtype.size_bytes() > 1 {
        let mut fp8 = q.clone();
        fp8.dtype = KvDtype::Fp8;
        if let Some(s) = fits(&fp8) {
            out.push(format!("--kv-dtype fp8 ({s} sequences)"));
        }
    }
    // The longest sequence that fits once, by bisection on whole blocks.
    let mut shorter = q.clone();
    let (mut lo, mut hi) = (0u64, q.tokens);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        shorter.tokens = mid;
        if fits(&shorter).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    if lo > 0 {
        out.push(format!("--tokens {lo} (1 sequence)"));
    }
    if out.is_empty() {
        "nothing on these GPUs; pick a larger GPU (--gpu, --gpu-memory)".into()
    } else {
        out.join(", or ")
    }
}

/// `bytes` in binary units: `800.0 KiB`, `1.25 GiB`.
#[must_use]
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
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

/// `bytes` in decimal units as GPU vendors quote memory: `80.0 GB`, `141.1 GB`.
#[must_use]
pub fn human_decimal(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
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
        let q = &self.query;
        let m = &q.model;
        let tp = if q.gpus > 1 {
            format!(" (tensor parallel {})", q.gpus)
        } else {
            String::new()
        };
        writeln!(
            f,
            "{} on {} x {}{tp}, {} KV, {}-token sequences, {}-token blocks",
            m.name,
            q.gpus,
            self.gpu_name,
            q.dtype.name(),
            q.tokens,
            q.block_size
        )?;
        let shape = match m.attention {
            KvAttention::Heads { kv_heads, head_dim } => {
                format!("{kv_heads} KV heads x {head_dim}")
            }
            KvAttention::Latent {
                kv_lora_rank,
                rope_dim,
            } => format!("latent {kv_lora_rank} + rope {rope_dim}"),
        };
        let window = match m.sliding {
            Some((w, n)) => format!(", {n} of them with a {w}-token window"),
            None => String::new(),
        };
        writeln!(
            f,
            "  shape:           {} layers{window}, {} heads, {shape} ({}), {:.1}B parameters [{}]",
            m.layers,
            m.heads,
            m.kind(),
            m.params as f64 / 1e9,
            m.source
        )?;
        writeln!(
            f,
            "  KV per token:    {} ({} bytes){}",
            human(self.kv_bytes_per_token),
            self.kv_bytes_per_token,
            if q.gpus > 1 {
                format!(
                    "; per GPU {} ({} bytes)",
                    human(self.kv_bytes_per_token_per_gpu),
                    self.kv_bytes_per_token_per_gpu
                )
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "  KV per sequence: {} per GPU",
            human_decimal(self.kv_bytes_per_sequence_per_gpu)
        )?;
        writeln!(
            f,
            "  per GPU:         {} usable ({:.0}% of {}) - {} weights {} = {} for KV",
            human_decimal(self.usable_bytes),
            100.0 * q.utilisation,
            human_decimal(self.gpu_memory),
            q.weight_dtype.name(),
            human_decimal(self.weight_bytes_per_gpu),
            human_decimal(self.kv_bytes)
        )?;
        write!(
            f,
            "  fits:            {} sequences of {} tokens at once ({} tokens)",
            self.sequences, q.tokens, self.tokens
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(model: &str, gpu: &str) -> SizeQuery {
        SizeQuery::new(model, gpu)
    }

    #[test]
    fn llama2_13b_on_a100_matches_the_vllm_paper_figures() {
        // vLLM paper (Kwon et al., SOSP'23, §3): Llama-2-13B... its 13B model takes 800 KB of
        // KV per token: 2 (K, V) x 5120 (hidden) x 40 (layers) x 2 bytes = 819,200 bytes.
        let mut q = query("Llama-2-13B", "A100-80GB");
        q.dtype = KvDtype::F16;
        let r = size(&q).unwrap();
        assert_eq!(r.kv_bytes_per_token, 2 * 5_120 * 40 * 2);
        // 80 GB x 0.9 minus 13,015,864,320 parameters x 2 bytes, in 1,024-token sequences of
        // 64 blocks of 16 tokens.
        assert_eq!(r.kv_bytes, 72_000_000_000 - 2 * 13_015_864_320);
        assert_eq!(r.sequences, r.kv_bytes / (819_200 * 1_024));
        assert!(r.to_string().contains("800.0 KiB"), "{r}");
    }

    #[test]
    fn llama3_70b_on_8_h100_at_32k() {
        // meta-llama/Meta-Llama-3-70B config.json: 80 layers, 64 heads, 8 KV heads,
        // hidden 8192 (head_dim 128). Per token in bf16: 2 x 80 x 8 x 128 x 2 = 327,680 bytes;
        // over 8 GPUs each holds one KV head: 40,960 bytes.
        let mut q = query("Llama-3-70B", "H100");
        q.gpus = 8;
        q.tokens = 32_768;
        let r = size(&q).unwrap();
        assert_eq!(r.kv_bytes_per_token, 327_680);
        assert_eq!(r.kv_bytes_per_token_per_gpu, 40_960);
        let weights = (70_553_706_496u64 * 2).div_ceil(8);
        assert_eq!(r.weight_bytes_per_gpu, weights);
        let per_seq = 40_960 * 32_768;
        assert_eq!(r.kv_bytes_per_sequence_per_gpu, per_seq);
        assert_eq!(r.sequences, (72_000_000_000 - weights) / per_seq);
        assert_eq!(r.sequences, 40);
        // fp8 halves the KV, so twice as many (within one of rounding).
        q.dtype = KvDtype::Fp8;
        assert_eq!(
            size(&q).unwrap().sequences,
            (72_000_000_000 - weights) / (per_seq / 2)
        );
    }

    #[test]
    fn mqa_mla_and_sliding_windows() {
        // tiiuae/falcon-7b config.json: 32 layers, 71 heads of 4544/71 = 64, multi_query.
        let r = size(&query("Falcon-7B", "H100")).unwrap();
        assert_eq!(r.kv_bytes_per_token, 2 * 32 * 64 * 2);
        // deepseek-ai/DeepSeek-V3 config.json: 61 layers, kv_lora_rank 512,
        // qk_rope_head_dim 64: (512 + 64) x 61 x 2 bytes, the same on every rank.
        // Its checkpoint is fp8 (671 GB): 8 x H200 hold it.
        let mut q = query("DeepSeek-V3", "H200");
        q.gpus = 8;
        q.weight_dtype = KvDtype::Fp8;
        let r = size(&q).unwrap();
        assert_eq!(r.kv_bytes_per_token, 576 * 61 * 2);
        assert_eq!(r.kv_bytes_per_token_per_gpu, 576 * 61 * 2);
        // mistralai/Mistral-7B-v0.1 config.json: 32 layers, 8 KV heads of 128, window 4096.
        // A 32k sequence keeps 4,096 tokens per layer: 32 x 4096 x 2 x 8 x 128 x 2 bytes.
        let mut q = query("Mistral-7B", "H100");
        q.tokens = 32_768;
        let r = size(&q).unwrap();
        assert_eq!(r.kv_bytes_per_token, 131_072);
        assert_eq!(r.kv_bytes_per_sequence_per_gpu, 4_096 * 131_072);
        // google/gemma-2-9b config.json: 42 layers, half of them with a 4096-token window,
        // 8 KV heads of 256. At 8k: 21 layers x 8192 + 21 layers x 4096 tokens.
        let mut q = query("Gemma-2-9B", "H100");
        q.tokens = 8_192;
        let r = size(&q).unwrap();
        let per_layer = 2 * 8 * 256 * 2;
        assert_eq!(
            r.kv_bytes_per_sequence_per_gpu,
            per_layer * (21 * 8_192 + 21 * 4_096)
        );
    }

    #[test]
    fn hugging_face_configs_read_like_the_built_in_shapes() {
        // The fields of meta-llama/Meta-Llama-3-70B/config.json that size the model.
        let llama = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
            "intermediate_size": 28672, "num_attention_heads": 64, "num_hidden_layers": 80,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16"}"#;
        let m = ModelShape::from_hf_config("llama-70b", llama, None).unwrap();
        let builtin = model("Llama-3-70B").unwrap();
        assert_eq!(m.attention, builtin.attention);
        assert_eq!((m.layers, m.heads), (80, 64));
        // The estimate counts embeddings, attention, gated MLP and norms: it is the
        // checkpoint's parameter count exactly.
        assert_eq!(m.params, 70_553_706_496);
        // deepseek-ai/DeepSeek-V3 config.json (MLA and mixture of experts): the estimate
        // lands on the model card's 671B (main model, without the multi-token-prediction
        // module) within 0.5%.
        let v3 = r#"{"hidden_size": 7168, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
            "first_k_dense_replace": 3, "vocab_size": 129280, "q_lora_rank": 1536,
            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "num_attention_heads": 128, "num_key_value_heads": 128,
            "num_hidden_layers": 61, "tie_word_embeddings": false}"#;
        let m = ModelShape::from_hf_config("v3", v3, None).unwrap();
        assert_eq!(m.kind(), "MLA");
        let off = (m.params as f64 - 671e9).abs() / 671e9;
        assert!(off < 0.005, "{} parameters", m.params);
        // Falcon's multi_query; DeepSeek's MLA; Mistral's window; Gemma 2's alternation.
        let falcon = r#"{"hidden_size": 4544, "n_head": 71, "n_layer": 32, "multi_query": true}"#;
        let m = ModelShape::from_hf_config("falcon", falcon, Some(7_000_000_000)).unwrap();
        assert_eq!(
            m.attention,
            KvAttention::Heads {
                kv_heads: 1,
                head_dim: 64
            }
        );
        let ds = r#"{"num_hidden_layers": 61, "num_attention_heads": 128, "hidden_size": 7168,
            "kv_lora_rank": 512, "qk_rope_head_dim": 64, "num_key_value_heads": 128}"#;
        let m = ModelShape::from_hf_config("ds", ds, Some(671_000_000_000)).unwrap();
        assert_eq!(m.kind(), "MLA");
        let mistral = r#"{"hidden_size": 4096, "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "sliding_window": 4096}"#;
        let m = ModelShape::from_hf_config("m", mistral, Some(1)).unwrap();
        assert_eq!(m.sliding, Some((4_096, 32)));
        let gemma = r#"{"model_type": "gemma2", "head_dim": 256, "num_attention_heads": 16,
            "num_hidden_layers": 42, "num_key_value_heads": 8, "sliding_window": 4096}"#;
        let m = ModelShape::from_hf_config("g", gemma, Some(1)).unwrap();
        assert_eq!(m.sliding, Some((4_096, 21)));
        let qwen = r#"{"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "sliding_window": 4096, "use_sliding_window": false}"#;
        assert_eq!(
            ModelShape::from_hf_config("q", qwen, Some(1))
                .unwrap()
                .sliding,
            None
        );
        let typed = r#"{"head_dim": 64, "num_attention_heads": 8, "num_hidden_layers": 4,
            "num_key_value_heads": 2, "sliding_window": 128, "layer_types": ["sliding_attention",
            "sliding_attention", "sliding_attention", "full_attention"]}"#;
        assert_eq!(
            ModelShape::from_hf_config("t", typed, Some(1))
                .unwrap()
                .sliding,
            Some((128, 3))
        );
        for (bad, needle) in [
            ("[1]", "missing `num_hidden_layers`"),
            ("{\"num_hidden_layers\": 2}", "num_attention_heads"),
            ("{\"num_hidden_layers\": -2}", "whole number"),
            ("not json", "not JSON"),
            (
                r#"{"num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 8}"#,
                "--params",
            ),
        ] {
            let msg = ModelShape::from_hf_config("x", bad, None)
                .unwrap_err()
                .to_string();
            assert!(msg.contains(needle), "{bad}: {msg}");
        }
    }

    #[test]
    fn what_does_not_fit_says_what_would() {
        // 70B in 16 bits is 141 GB: not on one H100, yes on two.
        let mut q = query("Llama-3-70B", "H100");
        q.tokens = 32_768;
        let msg = size(&q).unwrap_err().to_string();
        assert!(msg.contains("weights") && msg.contains("--gpus 4"), "{msg}");
        assert_eq!(msg.lines().count(), 1);
        // Weights fit on an H200, but a 1M-token sequence in bf16 does not: 8-bit or shorter.
        let mut q = query("Llama-3-8B", "H200");
        q.tokens = 1_000_000;
        let msg = size(&q).unwrap_err().to_string();
        assert!(msg.contains("not one 1000000-token sequence"), "{msg}");
        assert!(
            msg.contains("--kv-dtype fp8") && msg.contains("--tokens "),
            "{msg}"
        );
    }

    #[test]
    fn a_config_whose_heads_do_not_divide_is_refused() {
        // These were read as 64 KV heads of "GQA" under 32 query heads, and as a head size
        // of 127 (4095 / 32 rounded down).
        let more_kv = r#"{"num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 64, "hidden_size": 4096}"#;
        let msg = ModelShape::from_hf_config("m", more_kv, Some(8_000_000_000))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("`num_key_value_heads` 64 does not divide"),
            "{msg}"
        );
        let uneven = r#"{"num_hidden_layers": 32, "num_attention_heads": 32,
            "hidden_size": 4095}"#;
        let msg = ModelShape::from_hf_config("m", uneven, Some(8_000_000_000))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("not a multiple") && msg.contains("head_dim"),
            "{msg}"
        );
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
        let mut q = query("Llama-3-8B", "H100");
        q.utilisation = 1.5;
        assert!(matches!(size(&q), Err(SizeError::BadUtilisation { .. })));
        q.utilisation = 0.9;
        q.block_size = 0;
        assert!(matches!(size(&q), Err(SizeError::Zero { .. })));
        q.block_size = 16;
        q.tokens = 0;
        assert!(matches!(
            size(&q),
            Err(SizeError::Zero { name: "--tokens" })
        ));
        q.tokens = u64::MAX;
        assert!(matches!(size(&q), Err(SizeError::TooLarge { .. })));
        q.tokens = 1024;
        q.gpus = 3; // 32 heads, 8 KV heads
        let msg = size(&q).unwrap_err().to_string();
        assert!(msg.contains("try --gpus 2"), "{msg}");
        q.gpus = 16; // 8 KV heads replicated twice: allowed
        assert!(size(&q).is_ok());
        q.gpus = u32::MAX;
        assert!(matches!(size(&q), Err(SizeError::TooLarge { .. })));
        assert!(KvDtype::from_name("fp4").is_err());
        for d in KvDtype::ALL {
            assert_eq!(KvDtype::from_name(d.name()), Ok(d));
        }
    }
}
