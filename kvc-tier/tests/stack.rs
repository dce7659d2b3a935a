//! The tier stack: offload modes, demotion from host to disk and promotion back, two
//! engines sharing blocks through a Redis server that dies and comes back, and the stack as
//! the `LowerTiers` a memory manager consults.

mod common;

use std::time::Duration;

use common::{BLOCK, OwnRedis, TempDir, blocks, free_port, ns, redis_url};
use kvc_core::{BlockStore, LowerTiers, Retention, StoreKey};
use kvc_tier::{
    DeviceEvent, DiskConfig, DiskTier, HostConfig, HostTier, OffloadMode, SharedConfig, SharedTier,
    TierKind, TierStack,
};

fn host(pages: u64) -> HostTier {
    HostTier::new(ns("m"), HostConfig::new(pages * 2 * BLOCK as u64, 2)).unwrap()
}

fn shared(url: &str, prefix: &str) -> SharedTier {
    let mut cfg = SharedConfig::new(url);
    cfg.prefix = prefix.to_string();
    cfg.timeout = Duration::from_millis(500);
    cfg.retry_after = Duration::from_millis(100);
    SharedTier::new(ns("m"), cfg).unwrap()
}

fn load(stack: &TierStack, keys: &[StoreKey]) -> (Vec<TierKind>, usize, Vec<u8>) {
    let tiers = stack.lookup(keys).unwrap();
    let mut dst = vec![0; tiers.len() * BLOCK];
    let out = stack.load(keys, &tiers, &mut dst).unwrap();
    dst.truncate(out.blocks * BLOCK);
    (tiers, out.blocks, dst)
}

fn unique(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("kvc-test-{test}-{}-{nanos:x}", std::process::id())
}

#[test]
fn write_back_copies_on_eviction_and_write_through_on_caching() {
    let (keys, src) = blocks([1, 2]);
    let back = TierStack::new(host(4), None, None, OffloadMode::WriteBack);
    assert_eq!(
        back.offload(DeviceEvent::Cached, &keys, &src, 0)
            .unwrap()
            .stored,
        0
    );
    assert_eq!(
        back.offload(DeviceEvent::Evicted, &keys, &src, 0)
            .unwrap()
            .stored,
        2
    );
    let through = TierStack::new(host(4), None, None, OffloadMode::WriteThrough);
    assert_eq!(
        through
            .offload(DeviceEvent::Cached, &keys, &src, 0)
            .unwrap()
            .stored,
        2
    );
    assert_eq!(
        through
            .offload(DeviceEvent::Evicted, &keys, &src, 0)
            .unwrap()
            .stored,
        0
    );
    for s in [&back, &through] {
        let (tiers, n, dst) = load(s, &keys);
        assert_eq!((tiers, n), (vec![TierKind::Host; 2], 2));
        assert_eq!(dst, src);
    }
}

#[test]
fn host_evictions_go_to_disk_and_come_back_through_the_host() {
    let tmp = TempDir::new("stack");
    let disk = DiskTier::open(ns("m"), &DiskConfig::new(&tmp.0, 1 << 20, 2)).unwrap();
    // Two host pages of two blocks.
    let stack = TierStack::new(host(2), Some(disk), None, OffloadMode::WriteBack);
    let (chain, src) = blocks(1..=8);
    for i in 0..4 {
        let r = 2 * i..2 * i + 2;
        let _ = stack
            .offload(
                DeviceEvent::Evicted,
                &chain[r.clone()],
                &src[r.start * BLOCK..r.end * BLOCK],
                0,
            )
            .unwrap();
    }
    // The first four blocks were demoted to disk, the last four are in host memory.
    assert_eq!(stack.stats().demoted, 4);
    let (tiers, n, dst) = load(&stack, &chain);
    assert_eq!(n, 8);
    assert_eq!(dst, src);
    assert_eq!(&tiers[..4], &[TierKind::Disk; 4]);
    assert_eq!(&tiers[4..], &[TierKind::Host; 4]);
    let s = stack.stats();
    assert_eq!(s.loaded, [4, 4, 0]);
    assert_eq!(s.promoted, 4);
    // Promoted blocks are in host memory now.
    assert_eq!(stack.host().contains_prefix(&chain[..4]).unwrap(), 4);
    // A chain with a gap loads its prefix only.
    let gap = [chain[0], StoreKey(999), chain[2]];
    assert_eq!(stack.lookup(&gap).unwrap().len(), 1);
}

#[test]
fn a_pinned_prefix_outlives_host_churn_until_its_pin_expires_then_goes_to_disk_first() {
    let tmp = TempDir::new("stack-pin");
    let disk = DiskTier::open(ns("m"), &DiskConfig::new(&tmp.0, 1 << 20, 2)).unwrap();
    // Two host pages of two blocks: one for the pinned prefix, one for everything else.
    let stack = TierStack::new(host(2), Some(disk), None, OffloadMode::WriteBack);
    let (prefix, prefix_src) = blocks(1..=2);
    let pin = Retention {
        priority: 90,
        until: Some(1_000),
    };
    let out = stack
        .offload_retained(DeviceEvent::Evicted, &prefix, &prefix_src, pin, 0)
        .unwrap();
    assert_eq!(out.stored, 2);
    // Six later chains of default-priority blocks, newer than the prefix, churn the host.
    for c in 0..6u128 {
        let (keys, src) = blocks(100 + 2 * c..=101 + 2 * c);
        let _ = stack
            .offload_retained(
                DeviceEvent::Evicted,
                &keys,
                &src,
                Retention::DEFAULT,
                10 * c as u64,
            )
            .unwrap();
    }
    assert_eq!(
        stack.stats().demoted,
        10,
        "five default chains went to disk"
    );
    let (tiers, n, dst) = load(&stack, &prefix);
    assert_eq!(
        (n, tiers),
        (2, vec![TierKind::Host; 2]),
        "still in host memory"
    );
    assert_eq!(dst, prefix_src);
    // At t = 1,000 the pin has run out: the prefix is an ordinary page, now the least
    // recently used one since the newest chain came after the load, so it is demoted next.
    let (keys, src) = blocks(200..=201);
    let _ = stack
        .offload_retained(DeviceEvent::Evicted, &keys, &src, Retention::DEFAULT, 500)
        .unwrap();
    let (keys, src) = blocks(300..=301);
    let _ = stack
        .offload_retained(DeviceEvent::Evicted, &keys, &src, Retention::DEFAULT, 1_000)
        .unwrap();
    let (tiers, n, dst) = load(&stack, &prefix);
    assert_eq!(
        (n, tiers),
        (2, vec![TierKind::Disk; 2]),
        "demoted once unpinned"
    );
    assert_eq!(dst, prefix_src, "with its bytes");
}

#[test]
fn a_pinned_block_demoted_to_disk_keeps_its_pin_there() {
    let tmp = TempDir::new("stack-disk-pin");
    let probe = DiskTier::open(ns("probe"), &DiskConfig::new(&tmp.0, 1 << 20, 2)).unwrap();
    let (k, s) = blocks([1, 2]);
    let _ = probe.put(&k, &s, 0).unwrap();
    let page_bytes = probe.usage().bytes;
    // Three disk pages, and a host tier of one page: every offer pushes the last one down.
    let disk_cfg = DiskConfig::new(&tmp.0, 3 * page_bytes + page_bytes / 2, 2);
    let disk = DiskTier::open(ns("m"), &disk_cfg).unwrap();
    let stack = TierStack::new(host(1), Some(disk), None, OffloadMode::WriteBack);
    let (prefix, prefix_src) = blocks(1..=2);
    let pin = Retention {
        priority: 90,
        until: Some(10_000),
    };
    let _ = stack
        .offload_retained(DeviceEvent::Evicted, &prefix, &prefix_src, pin, 0)
        .unwrap();
    let churn = |c: u128, now: u64| {
        let (keys, src) = blocks(100 + 2 * c..=101 + 2 * c);
        let _ = stack
            .offload_retained(DeviceEvent::Evicted, &keys, &src, Retention::DEFAULT, now)
            .unwrap();
    };
    // The first chain pushes the pinned page (the host's only one) to disk; the next six
    // push each other through the disk's two other pages.
    for c in 0..7u128 {
        churn(c, 10 * c as u64);
        assert_eq!(
            stack.lookup(&prefix).unwrap(),
            vec![TierKind::Disk; 2],
            "the pinned prefix stays on disk after chain {c}"
        );
    }
    let (first, _) = blocks(100..=101);
    assert!(stack.lookup(&first).unwrap().is_empty(), "old chains go");
    // Once the pin has run out the prefix is the disk's least recently used page.
    churn(7, 10_000);
    churn(8, 10_010);
    assert!(stack.lookup(&prefix).unwrap().is_empty());
}

#[test]
fn a_flush_at_shutdown_lets_a_restart_load_what_only_host_memory_held() {
    let tmp = TempDir::new("stack-flush");
    let disk_cfg = DiskConfig::new(&tmp.0, 1 << 20, 2);
    let (chain, src) = blocks(1..=6);
    {
        let disk = DiskTier::open(ns("m"), &disk_cfg).unwrap();
        let stack = TierStack::new(host(4), Some(disk), None, OffloadMode::WriteBack);
        let _ = stack
            .offload(DeviceEvent::Evicted, &chain, &src, 0)
            .unwrap();
        assert_eq!(stack.stats().demoted, 0, "everything fits in host memory");
        let out = stack.flush_to_disk().unwrap();
        assert_eq!((out.held, out.written, out.already_on_disk), (6, 6, 0));
        assert_eq!((out.skipped, out.gone), (0, 0));
        // Nothing twice, and the host tier keeps its blocks.
        let again = stack.flush_to_disk().unwrap();
        assert_eq!(
            (again.held, again.written, again.already_on_disk),
            (6, 0, 6)
        );
        assert_eq!(stack.host().contains_prefix(&chain).unwrap(), 6);
    }
    // The restart: an empty host tier over the same folder.
    let disk = DiskTier::open(ns("m"), &disk_cfg).unwrap();
    let stack = TierStack::new(host(4), Some(disk), None, OffloadMode::WriteBack);
    let (tiers, n, dst) = load(&stack, &chain);
    assert_eq!((tiers, n), (vec![TierKind::Disk; 6], 6));
    assert_eq!(dst, src, "the bytes that were only in host memory");
    // Without a disk tier there is nothing to flush to.
    let alone = TierStack::new(host(4), None, None, OffloadMode::WriteBack);
    let _ = alone
        .offload(DeviceEvent::Evicted, &chain, &src, 0)
        .unwrap();
    assert_eq!(alone.flush_to_disk().unwrap(), Default::default());
}

#[test]
fn a_flush_into_a_smaller_disk_keeps_the_pinned_blocks() {
    let tmp = TempDir::new("stack-flush-pin");
    let probe = DiskTier::open(ns("probe"), &DiskConfig::new(&tmp.0, 1 << 20, 2)).unwrap();
    let (k, s) = blocks([1, 2]);
    let _ = probe.put(&k, &s, 0).unwrap();
    let page_bytes = probe.usage().bytes;
    // Two disk pages under a host tier of four.
    let disk = DiskTier::open(ns("m"), &DiskConfig::new(&tmp.0, 2 * page_bytes, 2)).unwrap();
    let stack = TierStack::new(host(4), Some(disk), None, OffloadMode::WriteBack);
    let (pinned, pinned_src) = blocks(1..=2);
    let pin = Retention {
        priority: 90,
        until: None,
    };
    let _ = stack
        .offload_retained(DeviceEvent::Evicted, &pinned, &pinned_src, pin, 0)
        .unwrap();
    let (rest, rest_src) = blocks(10..=15);
    let _ = stack
        .offload(DeviceEvent::Evicted, &rest, &rest_src, 50)
        .unwrap();
    let out = stack.flush_to_disk().unwrap();
    assert_eq!(out.held, 8);
    assert_eq!(out.written + out.skipped, 8);
    let disk = stack.disk().unwrap();
    assert_eq!(
        disk.contains_prefix(&pinned).unwrap(),
        2,
        "the pinned page is kept"
    );
    assert!(disk.usage().blocks <= 4, "within the disk's budget");
}

#[test]
fn a_second_engine_loads_blocks_the_first_uploaded() {
    let Some(url) = redis_url("a_second_engine_loads_blocks_the_first_uploaded") else {
        return;
    };
    let prefix = unique("engines");
    let a = TierStack::new(
        host(8),
        None,
        Some(shared(&url, &prefix)),
        OffloadMode::WriteThrough,
    );
    let b = TierStack::new(
        host(8),
        None,
        Some(shared(&url, &prefix)),
        OffloadMode::WriteThrough,
    );
    let (chain, src) = blocks(100..110);
    let _ = a.offload(DeviceEvent::Cached, &chain, &src, 50).unwrap();
    assert_eq!(a.stats().uploaded, 10);
    let (tiers, n, dst) = load(&b, &chain);
    assert_eq!(tiers, vec![TierKind::Shared; 10]);
    assert_eq!((n, dst), (10, src));
    // Loaded once, b keeps them in its host tier.
    assert_eq!(b.lookup(&chain).unwrap(), vec![TierKind::Host; 10]);
}

#[test]
fn serving_goes_on_while_the_shared_server_is_down_and_recovers() {
    let test = "serving_goes_on_while_the_shared_server_is_down_and_recovers";
    let Some(mut server) = OwnRedis::start(test) else {
        return;
    };
    let prefix = unique("down");
    let a = TierStack::new(
        host(16),
        None,
        Some(shared(&server.url(), &prefix)),
        OffloadMode::WriteThrough,
    );
    let b = TierStack::new(
        host(16),
        None,
        Some(shared(&server.url(), &prefix)),
        OffloadMode::WriteThrough,
    );
    let (first, src1) = blocks(1..=4);
    let _ = a.offload(DeviceEvent::Cached, &first, &src1, 0).unwrap();
    server.kill();
    // b misses the shared blocks but its own host tier goes on serving.
    let (own, src_own) = blocks(50..=53);
    let _ = b.offload(DeviceEvent::Cached, &own, &src_own, 0).unwrap();
    assert_eq!(load(&b, &first).1, 0);
    let (_, n, dst) = load(&b, &own);
    assert_eq!((n, dst), (4, src_own));
    // The server returns, empty: new uploads are shared again.
    server.restart().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let (second, src2) = blocks(20..=23);
    let _ = a.offload(DeviceEvent::Cached, &second, &src2, 0).unwrap();
    let (tiers, n, dst) = load(&b, &second);
    assert_eq!(tiers, vec![TierKind::Shared; 4]);
    assert_eq!((n, dst), (4, src2));
}

#[test]
fn the_stack_as_lower_tiers_agrees_with_lookup_and_a_lost_server_is_a_miss() {
    let tmp = TempDir::new("lower");
    let disk = DiskTier::open(ns("m"), &DiskConfig::new(&tmp.0, 1 << 20, 2)).unwrap();
    // A shared tier whose server is not there: every call to it is a miss, never an error.
    let nobody = format!("redis://127.0.0.1:{}/", free_port());
    let stack = TierStack::new(
        host(2),
        Some(disk),
        Some(shared(&nobody, &unique("lower"))),
        OffloadMode::WriteBack,
    );
    let (chain, src) = blocks(1..=8);
    for i in 0..4 {
        let r = 2 * i..2 * i + 2;
        let _ = stack
            .offload(
                DeviceEvent::Evicted,
                &chain[r.clone()],
                &src[r.start * BLOCK..r.end * BLOCK],
                0,
            )
            .unwrap();
    }
    // Four blocks on disk, four in host memory: the whole chain is held.
    let lower: &dyn LowerTiers = &stack;
    let cases: Vec<Vec<StoreKey>> = vec![
        chain.clone(),
        chain[..3].to_vec(),
        chain[4..].to_vec(),
        vec![chain[0], StoreKey(999), chain[2]],
        vec![StoreKey(998), chain[0]],
        Vec::new(),
    ];
    for keys in &cases {
        assert_eq!(
            lower.longest_prefix(keys),
            stack.lookup(keys).unwrap().len(),
            "{keys:?}"
        );
    }
    assert_eq!(lower.longest_prefix(&chain), 8);
    assert_eq!(lower.longest_prefix(&cases[3]), 1);
    assert_eq!(lower.longest_prefix(&cases[4]), 0);
}

#[test]
fn a_failed_disk_write_loses_only_what_it_was_writing_and_says_so() {
    let tmp = TempDir::new("stack-disk-fails");
    let disk = DiskTier::open(ns("m"), &DiskConfig::new(&tmp.0, 1 << 20, 2)).unwrap();
    // Two host pages of two blocks: the third page's blocks push the first page to disk.
    let stack = TierStack::new(host(2), Some(disk), None, OffloadMode::WriteBack);
    let (chain, src) = blocks(1..=6);
    let offload = |r: std::ops::Range<usize>| {
        stack.offload(
            DeviceEvent::Evicted,
            &chain[r.clone()],
            &src[r.start * BLOCK..r.end * BLOCK],
            0,
        )
    };
    for r in [0..2, 2..4] {
        assert_eq!(offload(r).unwrap().stored, 2);
    }
    // The disk's folder goes away (a file stands in its place): its writes fail.
    std::fs::remove_dir_all(&tmp.0).unwrap();
    std::fs::write(&tmp.0, b"not a folder").unwrap();
    assert!(offload(4..6).is_err(), "the failed write is reported");
    let s = stack.stats();
    assert_eq!(
        (s.offloaded, s.demoted, s.lost, s.disk_write_errors),
        (6, 0, 2, 1)
    );
    // The new blocks are in host memory all the same; the two the host evicted are gone.
    assert_eq!(stack.host().contains_prefix(&chain[4..6]).unwrap(), 2);
    assert_eq!(stack.lookup(&chain).unwrap().len(), 0);
    let (tiers, n, _) = load(&stack, &chain[2..]);
    assert_eq!((n, tiers.len()), (4, 4));
    std::fs::remove_file(&tmp.0).unwrap();
}
