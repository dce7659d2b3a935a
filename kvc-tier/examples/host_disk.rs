//! Tiers below the GPU, from `kvc-tier` alone: a host tier over a disk tier, blocks offloaded
//! when the device evicts them, the longest cached prefix looked up and loaded back, the typed
//! errors of bad input, a flush of host memory to disk at shutdown, and an engine restart that
//! finds the whole prefix on disk again.
//!
//! The disk folder is a fresh one under the system's temporary folder, removed at the end.
//!
//! ```sh
//! cargo run -p kvc-tier --example host_disk
//! ```

#![allow(clippy::print_stdout)] // a program: it says what it did

use std::path::Path;

use kvc_tier::{
    DType, DeviceEvent, DiskConfig, DiskTier, HostConfig, HostTier, KvLayout, OffloadMode,
    StoreError, StoreKey, StoreNamespace, TierKind, TierStack,
};

/// A block's bytes: every byte is its key, so a load can be checked.
fn payload(keys: &[StoreKey], block_bytes: usize) -> Vec<u8> {
    keys.iter()
        .flat_map(|k| std::iter::repeat_n(k.0 as u8, block_bytes))
        .collect()
}

/// A host tier of 4 blocks (pages of 2) over a 1 MiB disk tier in `dir`.
fn stack(ns: &StoreNamespace, dir: &Path) -> Result<TierStack, Box<dyn std::error::Error>> {
    let bb = ns.block_bytes();
    let host = HostTier::new(ns.clone(), HostConfig::new(4 * bb, 2))?;
    let disk = DiskTier::open(ns.clone(), &DiskConfig::new(dir, 1 << 20, 2))?;
    Ok(TierStack::new(
        host,
        Some(disk),
        None,
        OffloadMode::WriteBack,
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("kvc-tier-example-{}", std::process::id()));
    let layout = KvLayout::new(2, 2, 8, 16, DType::F16)?; // a toy model: 2 KiB blocks
    let ns = StoreNamespace::new("demo-model", layout, 0, 1)?;
    let bb = ns.block_bytes() as usize;
    // A prompt of 8 blocks, named by their chained block hashes (kvc-reuse computes these).
    let prompt: Vec<StoreKey> = (1..=8).map(StoreKey).collect();
    let bytes = payload(&prompt, bb);

    {
        let tiers = stack(&ns, &dir)?;
        // The device evicts the 8 blocks (write-back): the host takes them and spills the
        // pages it evicts for them to disk.
        let out = tiers.offload(DeviceEvent::Evicted, &prompt, &bytes, 50)?;
        assert_eq!(out.stored, 8);
        // Under write-back, a block the device merely caches is not copied.
        let cached = tiers.offload(DeviceEvent::Cached, &prompt, &bytes, 50)?;
        assert_eq!(cached.stored, 0);

        // A new request with this prompt: which leading blocks do the tiers hold, and where?
        let found = tiers.lookup(&prompt)?;
        assert_eq!(found.len(), 8);
        assert!(found.contains(&TierKind::Host) && found.contains(&TierKind::Disk));
        let mut staging = vec![0u8; found.len() * bb];
        let loaded = tiers.load(&prompt, &found, &mut staging)?;
        assert_eq!(loaded.blocks, 8); // slots 0..8 of the staging buffer, for the device
        assert_eq!(staging, bytes);
        assert!(tiers.stats().promoted > 0); // disk blocks were copied up into the host tier

        // Bad input is a typed error, and nothing is stored or loaded.
        assert!(matches!(
            tiers.offload(DeviceEvent::Evicted, &prompt, &bytes[..10], 50),
            Err(StoreError::BufferSize { .. })
        ));
        let mut short = vec![0u8; 3];
        assert!(matches!(
            tiers.load(&prompt, &found, &mut short),
            Err(StoreError::BufferSize { .. })
        ));
        // A prefix nobody stored is a miss, not an error.
        assert!(tiers.lookup(&[StoreKey(999)])?.is_empty());

        // Shutdown: what only host memory holds is written down, or a restart loses it.
        let flushed = tiers.flush_to_disk()?;
        assert_eq!(flushed.written + flushed.already_on_disk, flushed.held);
    }

    // The engine restarts: the host tier starts empty, the disk tier indexes its folder.
    let tiers = stack(&ns, &dir)?;
    let found = tiers.lookup(&prompt)?;
    assert_eq!(
        found,
        vec![TierKind::Disk; 8],
        "the whole prompt, thanks to the flush"
    );
    let mut staging = vec![0u8; found.len() * bb];
    let loaded = tiers.load(&prompt, &found, &mut staging)?;
    assert_eq!(staging, bytes[..loaded.blocks * bb]);
    println!(
        "after a restart, {} of the prompt's {} blocks loaded from disk",
        loaded.blocks,
        prompt.len()
    );

    // Another model's tier in the same folder never sees these blocks.
    let other = StoreNamespace::new("other-model", layout, 0, 1)?;
    assert!(stack(&other, &dir)?.lookup(&prompt)?.is_empty());

    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
