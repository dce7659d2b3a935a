//! [`Request`]: what an engine's front end submits, and why a submission can be refused.

use kvc_core::{QosClass, SeqId, SessionId, TenantId};
use thiserror::Error;

/// A generation request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The caller's id for the sequence; unique among live requests.
    pub id: SeqId,
    /// Whose request it is (cache isolation, quotas).
    pub tenant: TenantId,
    /// Its QoS class (0 = most important).
    pub qos: QosClass,
    /// The multi-turn session it continues, if any.
    pub session: Option<SessionId>,
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// At most this many tokens are generated.
    pub max_new_tokens: u32,
    /// Arrival time on the caller's clock (ms): FCFS order within a class, and aging.
    pub arrival_ms: u64,
}

/// Why a request was not accepted. The request is handed back unchanged where it was moved.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The prompt is empty.
    #[error("{seq}: empty prompt")]
    EmptyPrompt {
        /// The request.
        seq: SeqId,
    },
    /// `max_new_tokens` is zero.
    #[error("{seq}: max_new_tokens must be at least 1")]
    NoNewTokens {
        /// The request.
        seq: SeqId,
    },
    /// Prompt plus generation exceed the model's context.
    #[error("{seq}: {tokens} tokens (prompt + max_new_tokens) exceed the model context of {max}")]
    TooLong {
        /// The request.
        seq: SeqId,
        /// Prompt plus new tokens.
        tokens: u64,
        /// The configured maximum.
        max: u64,
    },
    /// Even with every block of the pool free, the request would not fit.
    #[error("{seq}: needs {blocks} blocks but the pool has {total}; it can never run")]
    Impossible {
        /// The request.
        seq: SeqId,
        /// Blocks it needs at its longest.
        blocks: u64,
        /// Blocks in the pool.
        total: u64,
    },
    /// A live request already has this id.
    #[error("{seq} is already waiting or running")]
    DuplicateId {
        /// The request.
        seq: SeqId,
    },
    /// The class is not one of the scheduler's configured classes.
    #[error("{seq}: unknown QoS class {class}")]
    UnknownClass {
        /// The request.
        seq: SeqId,
        /// The class given.
        class: QosClass,
    },
}
