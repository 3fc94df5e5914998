//! The layering of `server/src`, enforced: the module map at the top of
//! `lib.rs` lists every top-level module under its layer, lowest first;
//! a module may import (name `crate::other`) only modules of its own layer
//! or a lower one, and imports between modules form no cycle. Imports are
//! read as text, as `../shared/tools/modgraph.py` reads them: every
//! `crate::name` and `crate::{name, ...}` outside test code (files named
//! `tests.rs` or `*_tests.rs`, and whatever follows a file's first
//! `#[cfg(test)]`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layers of the map in `lib.rs`: a line `//! - **Name**` starts a
/// layer, a line `//!   - `a`, `b`: ...` lists modules of it.
fn layers(lib_rs: &str) -> Vec<(String, Vec<String>)> {
    let mut layers: Vec<(String, Vec<String>)> = Vec::new();
    for line in lib_rs.lines().take_while(|l| l.starts_with("//!")) {
        let body = line.trim_start_matches("//!");
        if let Some(name) = body.strip_prefix(" - **") {
            layers.push((name.split("**").next().unwrap_or_default().to_string(), Vec::new()));
        } else if let (Some(item), Some((_, modules))) = (body.strip_prefix("   - "), layers.last_mut()) {
            let names = item.split(':').next().unwrap_or_default();
            modules.extend(names.split(',').map(|n| n.trim().trim_matches('`').to_string()).filter(|n| !n.is_empty()));
        }
    }
    layers
}

/// Top-level modules: every `*.rs` (but lib.rs and main.rs) and directory
/// in `src`.
fn modules(src: &Path) -> BTreeSet<String> {
    let mut mods = BTreeSet::new();
    for entry in std::fs::read_dir(src).expect("read src") {
        let entry = entry.expect("read src entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() {
            mods.insert(name);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if stem != "lib" && stem != "main" {
                mods.insert(stem.to_string());
            }
        }
    }
    mods
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("read dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Identifiers at the start of a `crate::` path, and in a `crate::{...}`
/// group.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect()
    };
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or_default();
            names.extend(group.split(',').map(|item| ident(item.trim())));
        } else {
            names.insert(ident(rest));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

/// module -> the modules it imports.
fn import_graph(src: &Path, mods: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name == "tests.rs" || name.ends_with("_tests.rs") {
            continue;
        }
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
        let top = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if !mods.contains(&top) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let imports = graph.entry(top.clone()).or_default();
        imports.extend(crate_imports(code).into_iter().filter(|n| mods.contains(n) && *n != top));
    }
    graph
}

/// A cycle in `graph`, if any, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<&'a str>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| *p == m) {
            return Some(path[at..].iter().chain(std::iter::once(&m)).map(|s| s.to_string()).collect());
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for next in graph.get(m).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|m| visit(m, graph, &mut done, &mut Vec::new()))
}

#[test]
fn every_module_is_on_the_map_and_imports_follow_the_layers() {
    let src = src();
    let lib_rs = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let layers = layers(&lib_rs);
    assert!(layers.len() >= 5, "no layered module map found in lib.rs: {layers:?}");
    let mut rank = BTreeMap::new();
    for (i, (layer, modules)) in layers.iter().enumerate() {
        for m in modules {
            assert!(rank.insert(m.clone(), (i, layer.clone())).is_none(), "{m} is on the map twice");
        }
    }
    let mods = modules(&src);
    let missing: Vec<_> = mods.iter().filter(|m| !rank.contains_key(*m)).collect();
    assert!(missing.is_empty(), "modules missing from the map in lib.rs: {missing:?}");
    let stale: Vec<_> = rank.keys().filter(|m| !mods.contains(*m)).collect();
    assert!(stale.is_empty(), "the map in lib.rs names modules that do not exist: {stale:?}");

    let graph = import_graph(&src, &mods);
    let mut upward = Vec::new();
    for (from, imports) in &graph {
        for to in imports {
            let (f, t) = (&rank[from], &rank[to]);
            if t.0 > f.0 {
                upward.push(format!("{from} ({}) imports {to} ({})", f.1, t.1));
            }
        }
    }
    assert!(upward.is_empty(), "imports against the layers:\n{}", upward.join("\n"));
    assert_eq!(find_cycle(&graph), None, "modules import each other in a cycle");
}

#[test]
fn the_checker_sees_imports_cycles_and_test_code_as_intended() {
    let imports = crate_imports("use crate::a::B;\nuse crate::{b, c::D, e};\nfn f() { crate::f::g(); }");
    assert_eq!(imports, ["a", "b", "c", "e", "f"].iter().map(|s| s.to_string()).collect());
    let graph: BTreeMap<String, BTreeSet<String>> = [("x", vec!["y"]), ("y", vec!["z"]), ("z", vec!["x"])]
        .into_iter()
        .map(|(m, to)| (m.to_string(), to.into_iter().map(String::from).collect()))
        .collect();
    assert_eq!(find_cycle(&graph), Some(vec!["x".into(), "y".into(), "z".into(), "x".into()]));
    let map = "//! - **Low**\n//!   - `a`, `b`: things\n//! - **High**\n//!   - `c`: more\n";
    assert_eq!(layers(map), vec![("Low".into(), vec!["a".into(), "b".into()]), ("High".into(), vec!["c".into()])]);
}
