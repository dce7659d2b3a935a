//! The engine-like replay section: an engine's whole block management for the trace
//! ([`crate::block_replay`]: hashing, lookup, pool allocation, caching, token-by-token decode
//! appends, eviction at the memory limit), timed per request with each block hasher, next to
//! the hit rate it reaches.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kvc_reuse::{BlockHasher, HasherKind, PolicyKind};
use serde::Serialize;

use super::{Mode, ReportData, ReportError};
use crate::block_replay::{BlockReplayConfig, BlockReplayReport, CacheKind, block_replay};
use crate::trace::TraceRequest;

/// The section's heading in `index.md`.
pub const HEADING: &str = "## Engine-like replay (block management per request)";

/// The engine-like replay with every hasher.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EngineReplayResult {
    /// The trace file.
    pub trace: PathBuf,
    /// One replay per cache and hasher: [`CacheKind::ALL`] order, then [`HasherKind::ALL`]
    /// order within each.
    pub runs: Vec<BlockReplayReport>,
}

/// (requests replayed at most, pool capacity in tokens, requests alive at once).
fn plan(mode: Mode) -> (usize, u64, usize) {
    match mode {
        Mode::Tiny => (60, 1_000_000, 16),
        Mode::Quick => (3_000, 3_000_000, 64),
        Mode::Default | Mode::Full => (usize::MAX, 3_000_000, 64),
    }
}

/// Replays the trace as an engine would, once per cache and hasher, with LRU eviction.
pub(crate) fn run(
    path: &Path,
    trace: &[TraceRequest],
    mode: Mode,
    progress: &mut dyn FnMut(String),
) -> Result<EngineReplayResult, ReportError> {
    let (limit, capacity_tokens, alive) = plan(mode);
    let requests = &trace[..limit.min(trace.len())];
    let mut runs = Vec::with_capacity(CacheKind::ALL.len() * HasherKind::ALL.len());
    for (cache, hasher) in CacheKind::ALL
        .into_iter()
        .flat_map(|c| HasherKind::ALL.map(|h| (c, h)))
    {
        progress(format!(
            "engine-like replay: {} requests, {} cache, hasher {}",
            requests.len(),
            cache.name(),
            hasher.name()
        ));
        let cfg = BlockReplayConfig {
            capacity_tokens,
            block_size: 16,
            alive,
            policy: PolicyKind::Lru,
            cache,
            hasher,
            admission: false,
        };
        let r = block_replay(requests, &cfg).map_err(|e| ReportError::Micro {
            bench: "engine-like replay",
            message: e.to_string(),
        })?;
        runs.push(r);
    }
    Ok(EngineReplayResult {
        trace: path.to_path_buf(),
        runs,
    })
}

/// Appends the section to `md`.
pub(crate) fn render(md: &mut String, d: &ReportData) {
    let _ = writeln!(md, "{HEADING}\n");
    let Some(e) = &d.engine_replay else {
        let _ = writeln!(md, "Skipped: no trace (see the hit-rate section).\n");
        return;
    };
    let Some(first) = e.runs.first() else {
        return;
    };
    let _ = writeln!(
        md,
        "Workload: the first {} requests of `{}`, {} alive at once, a block pool of {} tokens \
         ({}-token blocks) shared by running requests and the prefix cache, LRU eviction; each \
         request hashes its prompt, looks up its cached prefix, allocates the rest, caches its \
         full blocks, decodes its output one token at a time and is freed. Timed: that block \
         management (prompt token synthesis excluded). Wall time counts waiting for a core on \
         a busy machine; CPU time does not. `prefix` is `PrefixCache` (a node per block, \
         every policy), `radix` is `RadixCache` (runs of blocks, LRU only); both evict in the \
         same order, so their hit rates and evictions agree. Targets: 40 us per request with \
         xxh3, 80 us with a collision-resistant hasher. Machine: {}; measured {}; command \
         `{}`.\n",
        first.requests,
        e.trace.display(),
        first.alive,
        first.capacity_tokens,
        first.block_size,
        d.host.describe(),
        d.date,
        d.command
    );
    let _ = writeln!(
        md,
        "| cache | hasher | wall us / request | CPU us / request | hit rate | blocks evicted |\n\
         |---|---|---:|---:|---:|---:|"
    );
    for r in &e.runs {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {:.2}% | {} |",
            r.cache,
            r.hasher,
            r.us_per_request,
            r.cpu_us_per_request,
            100.0 * r.hit_rate,
            r.evicted_blocks
        );
    }
    md.push('\n');
}
