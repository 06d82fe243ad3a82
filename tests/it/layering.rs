//! The layering of the crate, kept true: a module may use the modules below it, never one
//! above. It reads every `crate::MODULE` path in `src/` and fails on an import that points up
//! (which is also what closes a circle). There are no exceptions.
//!
//! Inside the conduit the same holds between its files (`CONDUIT_LAYERS`): whatever the
//! executor needs of the engine sits below both, so no two files import each other.

use std::collections::BTreeSet;
use std::path::Path;

/// Bottom to top. Modules of one layer may not use each other either way round
/// unless the lower one is listed first.
const LAYERS: &[&str] = &[
    "sys",
    "model",
    "config",
    "telemetry",
    "providers",
    "viaduct",
    "agent",
    "policy",
    "migrators",
    "conduit",
    "broker",
    "api",
    "daemon",
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|m| *m == module)
}

/// Every `(from, to)` where a file of top-level module `from` names `crate::to`.
fn imports(src: &Path) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let first = rel.components().next().unwrap().as_os_str();
            let from = first.to_string_lossy().trim_end_matches(".rs").to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("crate::") {
                let to: String = text[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if to != from && rank(&to).is_some() {
                    out.insert((from.clone(), to));
                }
            }
        }
    }
    out
}

/// The imports of `edges` that point up.
fn new_upward(edges: &BTreeSet<(String, String)>) -> Vec<String> {
    edges
        .iter()
        .filter(|(from, to)| match (rank(from), rank(to)) {
            (Some(f), Some(t)) => t > f,
            _ => false,
        })
        .map(|(from, to)| format!("`{from}` uses `{to}`, which is above it"))
        .collect()
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = imports(&src);
    // Every top-level module has its place.
    for entry in std::fs::read_dir(&src).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        let module = name.trim_end_matches(".rs");
        if !["lib", "main", "client", "relocate"].contains(&module) {
            assert!(rank(module).is_some(), "`{module}` has no place in LAYERS");
        }
    }
    let bad = new_upward(&edges);
    assert!(bad.is_empty(), "imports pointing up:\n{}", bad.join("\n"));
}

#[test]
fn the_check_fails_on_an_import_that_points_up() {
    let mut edges = BTreeSet::new();
    edges.insert(("model".to_string(), "conduit".to_string()));
    edges.insert(("conduit".to_string(), "model".to_string()));
    assert_eq!(
        new_upward(&edges),
        ["`model` uses `conduit`, which is above it"]
    );
}

/// The files of `src/conduit/`, bottom to top. `mod.rs` is the module's face (its public
/// types and re-exports) and is not ranked.
const CONDUIT_LAYERS: &[&str] = &[
    "journal", "progress", "plan", "shared", "executor", "engine",
];

fn conduit_rank(file: &str) -> Option<usize> {
    CONDUIT_LAYERS.iter().position(|m| *m == file)
}

/// The sibling modules one file of a module names: `super::NAME`, `super::{NAME, …}` and
/// `crate::conduit::NAME`.
fn sibling_imports(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for prefix in ["super::", "crate::conduit::"] {
        for (i, _) in text.match_indices(prefix) {
            let rest = &text[i + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Top-level names of the group, skipping nested braces.
                let mut depth = 0;
                let mut start = 0;
                for (k, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            out.insert(ident(&group[start..k]));
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            out.insert(ident(&group[start..k]));
                            start = k + 1;
                        }
                        _ => {}
                    }
                }
            } else {
                out.insert(ident(rest));
            }
        }
    }
    out.retain(|name| !name.is_empty());
    out
}

/// Every `(from, to)` where a file of `src/conduit/` uses another of its files.
fn conduit_imports(dir: &Path) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let from = path.file_stem().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        for to in sibling_imports(&text) {
            if to != from && conduit_rank(&to).is_some() {
                out.insert((from.clone(), to));
            }
        }
    }
    out
}

/// The imports of `edges` between conduit files that point up.
fn conduit_upward(edges: &BTreeSet<(String, String)>) -> Vec<String> {
    edges
        .iter()
        .filter(|(from, to)| match (conduit_rank(from), conduit_rank(to)) {
            (Some(f), Some(t)) => t > f,
            _ => false,
        })
        .map(|(from, to)| format!("`conduit::{from}` uses `conduit::{to}`, which is above it"))
        .collect()
}

#[test]
fn every_file_of_the_conduit_uses_only_the_files_below_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/conduit");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.extension().and_then(|e| e.to_str()) == Some("rs") && file != "mod" {
            assert!(
                conduit_rank(&file).is_some(),
                "`conduit::{file}` has no place in CONDUIT_LAYERS"
            );
        }
    }
    let bad = conduit_upward(&conduit_imports(&dir));
    assert!(bad.is_empty(), "imports pointing up:\n{}", bad.join("\n"));
}

#[test]
fn the_conduit_check_reads_grouped_imports_and_fails_on_one_that_points_up() {
    let text = "use super::journal::StepState;\nuse super::{engine::Shared, plan::{Plan, Step}};\n";
    let names: Vec<String> = sibling_imports(text).into_iter().collect();
    assert_eq!(names, ["engine", "journal", "plan"]);
    let edges: BTreeSet<(String, String)> = names
        .into_iter()
        .map(|to| ("executor".to_string(), to))
        .collect();
    assert_eq!(
        conduit_upward(&edges),
        ["`conduit::executor` uses `conduit::engine`, which is above it"]
    );
}
