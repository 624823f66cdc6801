//! The crate's shape, kept by a test: layers whose imports only go down.
//!
//! ```text
//! two_phase, integrations   atomic commit across engines; tower / axum
//! front                     registry, engines, sessions, per-request container, replicas
//! tx                        transaction guard, options, listeners, connection map, retry
//! pool                      one named bb8 pool: connection + state machine, ready stack, cache
//! base                      error, config, sql (control detection, Table, Value), telemetry, guard
//! ```
//!
//! A module may name items of its own layer and of the layers below it,
//! never of a layer above (the transaction layer reports upward through
//! traits it defines itself). This test reads `src/` and fails on the first
//! upward reference, naming the file, the line and the layers.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Layers from the bottom up; a top-level module's rank is its position.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "base",
        &[
            "error",
            "config",
            "sql",
            "telemetry",
            "guard",
            "tokio_postgres",
        ],
    ),
    ("pool", &["pool"]),
    ("tx", &["tx"]),
    ("front", &["front"]),
    ("two_phase", &["two_phase"]),
    ("integrations", &["integrations", "testing"]),
];

fn rank_of_module(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Names re-exported at the crate root (`pub use front::session::Session;`)
/// → the top-level module they come from, so `crate::Session` counts as an
/// import from `front`.
fn root_reexports(lib: &str) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let flat = lib.replace('\n', " ");
    for stmt in flat.split(';') {
        let stmt = stmt.trim();
        let Some(rest) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let module = rest.split("::").next().unwrap_or("").trim().to_owned();
        let names = match (rest.find('{'), rest.rfind('}')) {
            (Some(a), Some(b)) => rest[a + 1..b].to_owned(),
            _ => rest.rsplit("::").next().unwrap_or("").to_owned(),
        };
        for name in names.split(',') {
            let name = name.trim().rsplit("::").next().unwrap_or("").trim();
            let name = name.split(" as ").last().unwrap_or(name).trim();
            if !name.is_empty() {
                map.insert(name.to_owned(), module.clone());
            }
        }
    }
    map
}

/// Every `crate::<segment>` on the code lines of `text` (comments skipped).
fn crate_references(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" //").next().unwrap_or(code);
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let segment: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !segment.is_empty() {
                out.push((n + 1, segment));
            }
            rest = after;
        }
        // `use crate::{a, b::c}` groups.
        if let Some(at) = code.find("crate::{") {
            let group = &code[at + "crate::{".len()..];
            for item in group.split(',') {
                let segment: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !segment.is_empty() {
                    out.push((n + 1, segment));
                }
            }
        }
    }
    out
}

#[test]
fn imports_only_go_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let reexports = root_reexports(&lib);
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" {
            continue;
        }
        let rank = rank_of_module(&top).unwrap_or_else(|| {
            panic!(
                "src/{} is in no layer: add it to LAYERS",
                relative.display()
            )
        });
        let text = fs::read_to_string(file).unwrap();
        for (line, segment) in crate_references(&text) {
            checked += 1;
            let module = match rank_of_module(&segment) {
                Some(_) => segment.clone(),
                None => match reexports.get(&segment) {
                    Some(m) => m.clone(),
                    None => continue, // a crate-root macro or item of lib.rs itself
                },
            };
            let Some(target) = rank_of_module(&module) else {
                continue;
            };
            if target > rank {
                violations.push(format!(
                    "src/{}:{line}: `crate::{segment}` — {} ({}) imports from {} ({})",
                    relative.display(),
                    top,
                    LAYERS[rank].0,
                    module,
                    LAYERS[target].0,
                ));
            }
        }
    }
    assert!(
        checked > 50,
        "the scan found almost no imports: is it reading src/?"
    );
    assert!(
        violations.is_empty(),
        "imports that point up a layer:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_scanner_sees_what_it_must() {
    let refs = crate_references(
        "use crate::front::session::Session;\n// use crate::tx::x;\nuse crate::{error::Error, pool::manager};\nlet x = crate::Registry::builder();",
    );
    let segments: Vec<&str> = refs.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(segments, ["front", "error", "pool", "Registry"]);
    let map = root_reexports(
        "pub use front::engine::{Engine, EngineStats};\npub use error::{Error, Result};",
    );
    assert_eq!(map["Engine"], "front");
    assert_eq!(map["Result"], "error");
}
