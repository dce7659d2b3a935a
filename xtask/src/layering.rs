//! The layering rules of `docs/architecture.md`, checked on every `cargo test --workspace`: no
//! kvc library crate depends on a sibling other than `kvc-core` (dev-dependencies aside: tests
//! and examples may wire concrete types together), and `kvc-core` on none of them; and a crate
//! can be adopted without naming `kvc-core`: its examples and doc examples import the
//! `kvc-core` types they use from the crate itself.

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

/// The `.rs` files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The lines of `source` that name `kvc_core` where an adopter reads them: every line of an
/// example, or a doc-comment line (`///`, `//!`) of library code.
fn adopter_lines_naming_kvc_core(source: &str, example: bool) -> Vec<String> {
    source
        .lines()
        .filter(|line| {
            let t = line.trim_start();
            line.contains("kvc_core::")
                && (example
                    || ((t.starts_with("///") || t.starts_with("//!")) && t.contains("use ")))
        })
        .map(|line| line.trim().to_string())
        .collect()
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

#[test]
fn examples_import_kvc_core_types_from_their_own_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root");
    let mut found = Vec::new();
    for krate in LIBRARIES.iter().filter(|k| **k != "kvc-core") {
        for (dir, example) in [("examples", true), ("src", false)] {
            let mut files = Vec::new();
            rust_files(&root.join(krate).join(dir), &mut files);
            for file in files {
                let source = std::fs::read_to_string(&file)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
                for line in adopter_lines_naming_kvc_core(&source, example) {
                    found.push(format!("{}: {line}", file.display()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "examples should import kvc-core's types through the crate's re-exports \
         (docs/architecture.md, \"Architecture invariants\"):\n{}",
        found.join("\n")
    );
}
