//! The layering rule of `docs/architecture.md`, checked on every `cargo test --workspace`: no
//! kvc library crate depends on a sibling other than `kvc-core` (dev-dependencies aside: tests
//! and examples may wire concrete types together), and `kvc-core` on none of them.

use std::path::Path;

/// The library crates the rule covers (`kvc-bench` is the workbench: it depends on every one).
const LIBRARIES: &[&str] = &[
    "kvc-core",
    "kvc-alloc",
    "kvc-pin",
    "kvc-reuse",
    "kvc-kernels",
    "kvc-sched",
    "kvc-route",
    "kvc-tier",
];

/// The names under every `[dependencies]` table of a manifest, target-specific ones included,
/// but not `[dev-dependencies]` or `[build-dependencies]`.
fn normal_dependencies(manifest: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]"
                || (line.starts_with("[target.") && line.ends_with(".dependencies]"));
            continue;
        }
        if !in_deps || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name = line
            .split(['=', '.'])
            .next()
            .unwrap_or_default()
            .trim()
            .trim_matches('"');
        names.push(name.to_string());
    }
    names
}

#[test]
fn parses_normal_dependencies_only() {
    let manifest = "[package]\nname = \"x\"\n[dependencies]\nkvc-core.workspace = true\n\
                    serde = { workspace = true }\n[target.'cfg(x)'.dependencies]\nloom = \"1\"\n\
                    [dev-dependencies]\nkvc-alloc.workspace = true\n";
    assert_eq!(
        normal_dependencies(manifest),
        ["kvc-core", "serde", "loom"].map(String::from)
    );
}

#[test]
fn library_crates_depend_on_no_sibling_but_kvc_core() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root");
    for krate in LIBRARIES {
        let path = root.join(krate).join("Cargo.toml");
        let manifest = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let siblings: Vec<String> = normal_dependencies(&manifest)
            .into_iter()
            .filter(|d| d.starts_with("kvc-") && (d != "kvc-core" || *krate == "kvc-core"))
            .collect();
        assert!(
            siblings.is_empty(),
            "{krate} depends on {siblings:?}: library crates meet only through kvc-core \
             (docs/architecture.md, \"Architecture invariants\")"
        );
    }
}
