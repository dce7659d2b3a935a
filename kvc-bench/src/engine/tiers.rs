//! The engine's KV below device memory: its device blocks as [`kvc_tier`] block payloads, the
//! tier configuration, and the counters a run reports.
//!
//! A stored block is one contiguous payload of [`StoreNamespace::block_bytes`] bytes: for each
//! layer in order, the block's K then V, each `[kv_heads, block_size, head_dim]` (the HND order
//! of the engine's pool), as little-endian f32. [`gather_block`] builds it from the per-layer
//! device caches and [`scatter_block`] writes it back, so a block that went device → host →
//! disk → device holds the same bits. The namespace names the model by its shape and weight
//! seed ([`ModelConfig::store_id`]), so two engines with the same model share blocks through
//! the shared tier and engines of other models never read them.

use std::path::PathBuf;
use std::sync::Arc;

use kvc_core::{
    BlockId, DType, KvLayout, LayoutError, NamespaceError, PagedLayout, StoreNamespace,
};
use kvc_tier::{
    DiskConfig, DiskOpenError, DiskTier, HostConfig, HostConfigError, HostTier, OffloadMode,
    SharedConfig, SharedConfigError, SharedTier, StackStats, TierStack,
};
use thiserror::Error;

use super::model::ModelConfig;

/// Where the disk tier keeps its pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    /// The folder (each namespace gets a subfolder).
    pub dir: PathBuf,
    /// Bytes of page files it may keep.
    pub budget_bytes: u64,
}

/// The tiers below the engine's device pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierOptions {
    /// Capacity of the host tier, in device blocks (rounded down to whole pages).
    pub host_blocks: u32,
    /// Device blocks per host (and disk) page.
    pub blocks_per_page: u32,
    /// Blocks offloaded with a lower retention priority are not kept.
    pub min_priority: u8,
    /// The disk tier, if any.
    pub disk: Option<DiskOptions>,
    /// The shared tier's server URL (`redis://host:port/`), if any.
    pub shared_url: Option<String>,
    /// When device blocks are copied down: when the device evicts them (write-back) or when it
    /// caches them (write-through).
    pub mode: OffloadMode,
    /// Run each step's loads on a background thread while the step computes, and scatter and
    /// report them at the start of the next step (as an engine overlaps its host-to-device
    /// copies with compute). Off: loads run within the step, before its compute. Either way a
    /// loading sequence joins the batch the step after its load was planned, so both give the
    /// same schedule and the same tokens.
    pub background_loads: bool,
}

impl TierOptions {
    /// A host tier of `host_blocks` device blocks in pages of 4, write-back, nothing below it.
    #[must_use]
    pub const fn host(host_blocks: u32) -> Self {
        Self {
            host_blocks,
            blocks_per_page: 4,
            min_priority: 0,
            disk: None,
            shared_url: None,
            mode: OffloadMode::WriteBack,
            background_loads: false,
        }
    }
}

/// Why the engine's tiers could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TierSetupError {
    /// The model's KV layout was refused.
    #[error("tiers: {0}")]
    Layout(#[from] LayoutError),
    /// The store namespace was refused.
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// The host tier was refused.
    #[error(transparent)]
    Host(#[from] HostConfigError),
    /// The disk tier could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskOpenError),
    /// The shared tier was refused.
    #[error(transparent)]
    Shared(#[from] SharedConfigError),
}

/// The store namespace of the engine's KV: the model's [`ModelConfig::store_id`], its KV
/// layout at `block_size` tokens per block, f32 (as the engine stores it), one rank.
pub fn namespace(model: &ModelConfig, block_size: u32) -> Result<StoreNamespace, TierSetupError> {
    let layout = KvLayout::new(
        model.layers as u32,
        model.kv_heads as u32,
        model.head_dim as u32,
        block_size,
        DType::F32,
    )?;
    Ok(StoreNamespace::new(model.store_id(), layout, 0, 1)?)
}

/// Builds the tier stack of `opts` for blocks of `ns`.
pub fn build_stack(ns: &StoreNamespace, opts: &TierOptions) -> Result<TierStack, TierSetupError> {
    let mut host_cfg = HostConfig::new(
        u64::from(opts.host_blocks) * ns.block_bytes(),
        opts.blocks_per_page,
    );
    host_cfg.min_priority = opts.min_priority;
    let host = HostTier::new(ns.clone(), host_cfg)?;
    let disk = opts
        .disk
        .as_ref()
        .map(|d| {
            DiskTier::open(
                ns.clone(),
                &DiskConfig::new(&d.dir, d.budget_bytes, opts.blocks_per_page),
            )
        })
        .transpose()?;
    let shared = opts
        .shared_url
        .as_ref()
        .map(|url| SharedTier::new(ns.clone(), SharedConfig::new(url.as_str())))
        .transpose()?;
    Ok(TierStack::new(host, disk, shared, opts.mode))
}

/// Why a block payload could not be gathered or scattered (a plan naming a block outside the
/// pool, or a buffer of the wrong size: bugs, reported rather than panicking).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The block is not in the pool.
    #[error("{block} is outside the pool of {blocks} blocks")]
    BlockOutOfRange {
        /// The block.
        block: BlockId,
        /// Blocks in the pool.
        blocks: u32,
    },
    /// The payload buffer has the wrong length.
    #[error("block payload of {got} bytes, expected {expected}")]
    Length {
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// A layer's cache is smaller than the layout.
    #[error("layer {layer}'s cache holds {got} elements, the layout needs {needed}")]
    Cache {
        /// The layer.
        layer: usize,
        /// Elements needed.
        needed: u64,
        /// Elements held.
        got: usize,
    },
}

/// Bytes of one block's payload for `layers` layers of `layout`.
#[must_use]
pub fn payload_bytes(layout: &PagedLayout, layers: usize) -> usize {
    let per_layer =
        2 * layout.kv_heads() as usize * layout.block_size() as usize * layout.head_dim() as usize;
    per_layer * layers * 4
}

fn check(
    layout: &PagedLayout,
    caches_len: impl Iterator<Item = usize>,
    block: BlockId,
    payload_len: usize,
    layers: usize,
) -> Result<(), PayloadError> {
    if block.0 >= layout.num_blocks() {
        return Err(PayloadError::BlockOutOfRange {
            block,
            blocks: layout.num_blocks(),
        });
    }
    let expected = payload_bytes(layout, layers);
    if payload_len != expected {
        return Err(PayloadError::Length {
            expected,
            got: payload_len,
        });
    }
    for (layer, got) in caches_len.enumerate() {
        if (got as u64) < layout.len() {
            return Err(PayloadError::Cache {
                layer,
                needed: layout.len(),
                got,
            });
        }
    }
    Ok(())
}

/// The head rows of `block` in payload order: `(kv, head, token)` offsets into a layer.
fn rows(layout: &PagedLayout, block: BlockId) -> impl Iterator<Item = usize> + '_ {
    (0..2u32).flat_map(move |kv| {
        (0..layout.kv_heads()).flat_map(move |h| {
            (0..layout.block_size()).map(move |t| layout.offset(block.0, kv, h, t) as usize)
        })
    })
}

/// Copies device `block`'s K and V of every layer (`caches[l]` laid out as `layout`) into
/// `dst`, one payload of [`payload_bytes`].
pub fn gather_block(
    layout: &PagedLayout,
    caches: &[Vec<f32>],
    block: BlockId,
    dst: &mut [u8],
) -> Result<(), PayloadError> {
    check(
        layout,
        caches.iter().map(Vec::len),
        block,
        dst.len(),
        caches.len(),
    )?;
    let hd = layout.head_dim() as usize;
    let mut out = dst.chunks_exact_mut(4);
    for cache in caches {
        for off in rows(layout, block) {
            for (&v, b) in cache[off..off + hd].iter().zip(&mut out) {
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Writes the payload `src` (from [`gather_block`]) into device `block` of every layer.
pub fn scatter_block(
    layout: &PagedLayout,
    caches: &mut [Vec<f32>],
    block: BlockId,
    src: &[u8],
) -> Result<(), PayloadError> {
    check(
        layout,
        caches.iter().map(Vec::len),
        block,
        src.len(),
        caches.len(),
    )?;
    let hd = layout.head_dim() as usize;
    let mut input = src.chunks_exact(4);
    for cache in caches.iter_mut() {
        for off in rows(layout, block) {
            for (v, b) in cache[off..off + hd].iter_mut().zip(&mut input) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
    Ok(())
}

/// What the tiers did during a run (a delta of [`StackStats`] plus the engine's own counts).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TierReport {
    /// Device blocks offered to the tiers (evicted under write-back, cached under
    /// write-through).
    pub offloaded_blocks: u64,
    /// Bytes of those blocks.
    pub offloaded_bytes: u64,
    /// Blocks uploaded to the shared tier.
    pub uploaded_blocks: u64,
    /// Host evictions demoted to disk.
    pub demoted_blocks: u64,
    /// Disk or shared blocks promoted into the host tier by loads.
    pub promoted_blocks: u64,
    /// Load jobs the scheduler planned.
    pub load_jobs: u64,
    /// Of those, ended with fewer blocks than planned (the rest recomputed).
    pub failed_loads: u64,
    /// Admissions put off to wait for another request's load of the same prefix (then served
    /// from the device) instead of loading it a second time.
    pub load_waits: u64,
    /// Blocks planned for loading.
    pub planned_load_blocks: u64,
    /// Blocks loaded from the host tier.
    pub loaded_host_blocks: u64,
    /// Blocks loaded from the disk tier.
    pub loaded_disk_blocks: u64,
    /// Blocks loaded from the shared tier.
    pub loaded_shared_blocks: u64,
    /// Bytes loaded, all tiers.
    pub loaded_bytes: u64,
    /// Tokens of the loaded blocks (prefill the loads saved).
    pub loaded_tokens: u64,
    /// Blocks planned for loading that did not come back (recomputed instead).
    pub missed_load_blocks: u64,
    /// Wall time of the loads (lookup and copy out of the tiers), seconds.
    pub load_s: f64,
    /// Of that, the time steps waited for it: all of it for loads in the step, only the wait
    /// for the previous step's thread with background loads.
    pub load_wait_s: f64,
    /// Wall time of the offloads (gather and store), seconds.
    pub offload_s: f64,
    /// Store errors met (a disk write failing, say); each one degraded to a miss.
    pub store_errors: u64,
}

impl TierReport {
    /// Blocks loaded from every tier.
    #[must_use]
    pub const fn loaded_blocks(&self) -> u64 {
        self.loaded_host_blocks + self.loaded_disk_blocks + self.loaded_shared_blocks
    }

    /// Fills the stack's counters in: the change from `before` to `now`.
    pub(crate) fn with_stack(mut self, before: &StackStats, now: &StackStats) -> Self {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        self.uploaded_blocks = d(now.uploaded, before.uploaded);
        self.demoted_blocks = d(now.demoted, before.demoted);
        self.promoted_blocks = d(now.promoted, before.promoted);
        self
    }
}

/// The engine's tier state: the stack, a staging buffer and the counters.
#[derive(Debug)]
pub(crate) struct EngineTiers {
    pub(crate) stack: Arc<TierStack>,
    pub(crate) block_bytes: usize,
    pub(crate) tokens_per_block: u64,
    pub(crate) buf: Vec<u8>,
    pub(crate) report: TierReport,
    /// Whether loads run on a background thread ([`TierOptions::background_loads`]).
    pub(crate) background: bool,
    /// The loads of the last step, running on their thread.
    pub(crate) in_flight: Option<std::thread::JoinHandle<Vec<FetchedLoad>>>,
}

/// A load job's blocks fetched from the tiers into host memory, not yet scattered into the
/// device blocks nor reported.
pub(crate) struct FetchedLoad {
    pub(crate) job: kvc_sched::LoadJob,
    /// What the stack loaded (`None`: nothing, for a failed lookup or load).
    pub(crate) outcome: Option<kvc_tier::LoadOutcome>,
    /// Store errors met (a lookup or a load that failed).
    pub(crate) errors: u64,
    /// Seconds spent fetching.
    pub(crate) seconds: f64,
    /// The loaded payloads, back to back (for a background load; a load in the step uses the
    /// staging buffer).
    pub(crate) bytes: Vec<u8>,
}

/// Finds `job`'s blocks in the tiers and loads the longest prefix held into `buf` (resized
/// to fit); the blocks are not scattered yet.
pub(crate) fn fetch(
    stack: &TierStack,
    block_bytes: usize,
    job: kvc_sched::LoadJob,
    buf: &mut Vec<u8>,
) -> FetchedLoad {
    let start = std::time::Instant::now();
    let keys: Vec<kvc_core::StoreKey> = job.blocks.iter().map(|b| b.key).collect();
    let mut errors = 0;
    let found = stack.lookup(&keys).unwrap_or_else(|_| {
        errors += 1;
        Vec::new()
    });
    let len = found.len() * block_bytes;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let outcome = if found.is_empty() {
        None
    } else {
        let loaded = stack.load(&keys, &found, &mut buf[..len]).ok();
        errors += u64::from(loaded.is_none());
        loaded
    };
    FetchedLoad {
        job,
        outcome,
        errors,
        seconds: start.elapsed().as_secs_f64(),
        bytes: Vec::new(),
    }
}

impl EngineTiers {
    pub(crate) fn new(
        stack: Arc<TierStack>,
        block_bytes: usize,
        tokens_per_block: u32,
        background: bool,
    ) -> Self {
        Self {
            stack,
            block_bytes,
            tokens_per_block: u64::from(tokens_per_block),
            buf: Vec::new(),
            report: TierReport::default(),
            background,
            in_flight: None,
        }
    }
    /// The staging buffer sized for `blocks` payloads.
    pub(crate) fn staging(&mut self, blocks: usize) -> &mut [u8] {
        let len = blocks * self.block_bytes;
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        &mut self.buf[..len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(layout: &PagedLayout, layers: usize, seed: f32) -> Vec<Vec<f32>> {
        (0..layers)
            .map(|l| {
                (0..layout.len())
                    .map(|i| seed + l as f32 * 1e4 + i as f32 * 0.5)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_block_round_trips_through_its_payload_and_touches_nothing_else() {
        let m = ModelConfig::tiny();
        let layout = PagedLayout::hnd(6, m.kv_heads as u32, 4, m.head_dim as u32).unwrap();
        let ns = namespace(&m, 4).unwrap();
        let bytes = payload_bytes(&layout, m.layers);
        assert_eq!(bytes as u64, ns.block_bytes());
        let src = filled(&layout, m.layers, 1.0);
        let mut payload = vec![0u8; bytes];
        gather_block(&layout, &src, BlockId(3), &mut payload).unwrap();
        // The payload starts with layer 0's K of head 0, token 0: block 3's first element.
        let first = layout.offset(3, 0, 0, 0) as usize;
        assert_eq!(payload[..4], src[0][first].to_le_bytes());

        let mut dst = filled(&layout, m.layers, -7.0);
        let before = dst.clone();
        scatter_block(&layout, &mut dst, BlockId(1), &payload).unwrap();
        let span = layout.contiguous_block_len().unwrap() as usize;
        for l in 0..m.layers {
            // Block 1 of the destination now holds block 3 of the source, bit for bit.
            assert_eq!(
                dst[l][span..2 * span],
                src[l][3 * span..4 * span],
                "layer {l}"
            );
            assert_eq!(dst[l][..span], before[l][..span]);
            assert_eq!(dst[l][2 * span..], before[l][2 * span..]);
        }
        let mut again = vec![0u8; bytes];
        gather_block(&layout, &dst, BlockId(1), &mut again).unwrap();
        assert_eq!(again, payload);
    }

    #[test]
    fn bad_blocks_and_buffers_are_errors() {
        let m = ModelConfig::tiny();
        let layout = PagedLayout::hnd(2, m.kv_heads as u32, 4, m.head_dim as u32).unwrap();
        let mut caches = filled(&layout, m.layers, 0.0);
        let bytes = payload_bytes(&layout, m.layers);
        let mut buf = vec![0u8; bytes];
        assert_eq!(
            gather_block(&layout, &caches, BlockId(2), &mut buf),
            Err(PayloadError::BlockOutOfRange {
                block: BlockId(2),
                blocks: 2
            })
        );
        assert_eq!(
            scatter_block(&layout, &mut caches, BlockId(0), &buf[1..]),
            Err(PayloadError::Length {
                expected: bytes,
                got: bytes - 1
            })
        );
        caches[1].truncate(3);
        assert!(matches!(
            gather_block(&layout, &caches, BlockId(0), &mut buf),
            Err(PayloadError::Cache { layer: 1, .. })
        ));
    }

    #[test]
    fn the_stack_is_built_from_the_options() {
        let m = ModelConfig::tiny();
        let ns = namespace(&m, 4).unwrap();
        let stack = build_stack(&ns, &TierOptions::host(8)).unwrap();
        assert_eq!(stack.host().pages(), 2);
        assert!(stack.disk().is_none() && stack.shared().is_none());
        let mut bad = TierOptions::host(3);
        assert!(matches!(
            build_stack(&ns, &bad),
            Err(TierSetupError::Host(HostConfigError::NoPage { .. }))
        ));
        bad.shared_url = Some("not a url".into());
        bad.host_blocks = 8;
        assert!(matches!(
            build_stack(&ns, &bad),
            Err(TierSetupError::Shared(_))
        ));
        // Another model never shares a namespace.
        let mut other = m;
        other.seed += 1;
        assert_ne!(namespace(&other, 4).unwrap(), ns);
    }
}
