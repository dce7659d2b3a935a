//! Prefix hit rate against cache capacity: the trace replayed through the real
//! [`PrefixCache`](kvc_reuse::PrefixCache) with each eviction policy at a handful of
//! capacities, next to the offline optimum (Belady) and an infinite cache, through
//! [`crate::replay::replay`].

use std::path::{Path, PathBuf};

use kvc_reuse::{BlockHasher, HasherKind, PolicyKind};
use serde::Serialize;

use super::ReportError;
use crate::replay::{ReplayConfig, replay};
use crate::trace::{TraceRequest, read_trace};

/// One capacity's hit rates.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CapacityPoint {
    /// Cache capacity in tokens.
    pub capacity_tokens: u64,
    /// `(policy name, hit rate)`, in [`PolicyKind::ALL`] order.
    pub policies: Vec<(String, f64)>,
    /// Offline optimum (Belady) at this capacity.
    pub optimal: f64,
    /// Replay wall time of every policy at this capacity plus the optimum, in seconds.
    pub elapsed_s: f64,
}

/// The hit-rate curve of a trace.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HitRateResult {
    /// The trace file.
    pub trace: PathBuf,
    /// Requests replayed (a prefix of the trace in the smallest mode).
    pub requests: u64,
    /// Requests in the file.
    pub requests_in_file: usize,
    /// Prompt tokens replayed.
    pub input_tokens: u64,
    /// Tokens per cache block.
    pub block_size: u32,
    /// The block hasher.
    pub hasher: &'static str,
    /// One point per capacity, ascending.
    pub points: Vec<CapacityPoint>,
    /// Hit rate of an unbounded cache.
    pub infinite: f64,
}

/// The trace to replay: `given`, else the shared trace relative to the working directory or
/// the repository root. `None` when no trace was given and the default is absent.
#[must_use]
pub fn locate_trace(given: Option<&Path>, default: &str) -> Option<PathBuf> {
    if let Some(path) = given {
        return Some(path.to_path_buf());
    }
    if default == crate::trace::DEFAULT_TRACE {
        return crate::trace::find_default_trace();
    }
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    [Path::new(".").join(default), repo_root.join(default)]
        .into_iter()
        .find(|p| p.is_file())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}

/// Reads the trace at `path`.
pub(crate) fn load(path: &Path) -> Result<Vec<TraceRequest>, ReportError> {
    read_trace(path).map_err(|e| ReportError::Trace {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Replays the first `limit` requests of `trace` at each capacity with every policy, plus the
/// optimum; `progress` hears about each capacity.
pub(crate) fn run(
    path: &Path,
    trace: &[TraceRequest],
    limit: usize,
    block_size: u32,
    capacities: &[u64],
    progress: &mut dyn FnMut(String),
) -> Result<HitRateResult, ReportError> {
    let requests = &trace[..limit.min(trace.len())];
    let hasher = HasherKind::Xxh3;
    let mut points = Vec::with_capacity(capacities.len());
    let (mut infinite, mut input_tokens, mut replayed) = (0.0, 0, 0);
    for (i, &capacity_tokens) in capacities.iter().enumerate() {
        progress(format!(
            "hit rate: capacity {capacity_tokens} tokens ({}/{})",
            i + 1,
            capacities.len()
        ));
        let mut policies = Vec::new();
        let mut optimal = 0.0;
        let mut elapsed_s = 0.0;
        for (p, &policy) in PolicyKind::ALL.iter().enumerate() {
            let cfg = ReplayConfig {
                capacity_tokens,
                block_size,
                policy,
                hasher,
                // The bounds do not depend on the policy: compute them once per capacity.
                optimal: p == 0,
            };
            let start = std::time::Instant::now();
            let r = replay(requests, &cfg).map_err(|source| ReportError::Replay {
                capacity_tokens,
                policy: policy.name(),
                source,
            })?;
            elapsed_s += start.elapsed().as_secs_f64();
            if let (Some(opt), Some(inf)) = (r.optimal_hit_rate, r.infinite_hit_rate) {
                optimal = opt;
                infinite = inf;
            }
            input_tokens = r.input_tokens;
            replayed = r.requests;
            policies.push((policy.name().to_string(), r.hit_rate));
        }
        points.push(CapacityPoint {
            capacity_tokens,
            policies,
            optimal,
            elapsed_s,
        });
    }
    Ok(HitRateResult {
        trace: path.to_path_buf(),
        requests: replayed,
        requests_in_file: trace.len(),
        input_tokens,
        block_size,
        hasher: hasher.name(),
        points,
        infinite,
    })
}
