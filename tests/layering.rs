//! The layering of the crate, kept true: a module may use the modules below it, never one
//! above. It reads every `crate::MODULE` path in `src/` and fails on an import that points up
//! (which is also what closes a circle), except the ones listed in `KNOWN_UPWARD`, which are
//! there to be removed, never added to.

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

/// Upward imports that exist today, each to be removed (the architecture issue's list).
const KNOWN_UPWARD: &[(&str, &str)] = &[
    // `check` reads app and VM settings and config-file rules with the drivers' parsers.
    ("config", "providers"),
    ("config", "migrators"),
    // The plan's types and the hooks still live in the conduit.
    ("migrators", "conduit"),
    // The loader checks the API token the daemon will read.
    ("broker", "api"),
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

/// The imports of `edges` that point up and are not known.
fn new_upward(edges: &BTreeSet<(String, String)>) -> Vec<String> {
    edges
        .iter()
        .filter(|(from, to)| match (rank(from), rank(to)) {
            (Some(f), Some(t)) => t > f,
            _ => false,
        })
        .filter(|(from, to)| !KNOWN_UPWARD.contains(&(from.as_str(), to.as_str())))
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
    let gone: Vec<_> = KNOWN_UPWARD
        .iter()
        .filter(|(f, t)| !edges.contains(&(f.to_string(), t.to_string())))
        .collect();
    assert!(
        gone.is_empty(),
        "these known upward imports are gone: take them out of KNOWN_UPWARD: {gone:?}"
    );
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
