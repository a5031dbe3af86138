//! The agent crate's floors (ARCHITECTURE.md, "Floors"): reads every file
//! of `agent/src`, resolves each `use` and each `crate::`/`super::`/`self::`
//! path to the module file it names, and fails on
//! - an import circle between module files (two files or more),
//! - an import from a module's top-level floor to a higher floor,
//! - a top-level module missing from the floor table, or a table entry
//!   with no module.
//!
//! The floor table is read from ARCHITECTURE.md itself, so the document
//! and the code cannot drift apart. Test code (`mod tests` blocks, files
//! named `tests.rs` or under a `tests/` directory) and comments are not
//! part of the layering and are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every module file of the crate: its module path (empty for `lib.rs`)
/// and its source without comments and test modules.
fn modules() -> BTreeMap<Module, (PathBuf, String)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().unwrap() != "tests" {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src_dir()).unwrap().with_extension("");
            let mut parts: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let last = parts.last().cloned().unwrap_or_default();
            if last == "tests" || last == "main" {
                continue;
            }
            if last == "mod" || last == "lib" {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            out.insert(parts, (path, strip(&text)));
        }
    }
    out
}

/// Drops comments and everything from a `#[cfg(test)] mod tests` on.
fn strip(text: &str) -> String {
    let mut out = String::new();
    let mut test_attr = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if test_attr && trimmed.starts_with("mod tests") {
            break;
        }
        test_attr = trimmed.starts_with("#[cfg(test)]");
        let code = match find_comment(line) {
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Where a `//` comment starts on `line`, outside string literals.
fn find_comment(line: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    let mut in_str = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            b'/' if !in_str && bytes.get(i + 1) == Some(&b'/') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The paths a `use` tree names, e.g. `crate::a::{b, c::{d, e}}`.
fn expand_use(tree: &str, prefix: &[String], out: &mut Vec<Module>) {
    for part in split_top(tree) {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        if let Some(open) = part.find('{') {
            let close = part.rfind('}').filter(|c| *c > open).unwrap_or(part.len());
            let mut head = prefix.to_vec();
            head.extend(segments(&part[..open]));
            expand_use(&part[open + 1..close], &head, out);
        } else {
            let name = part.split(" as ").next().unwrap_or(part);
            let mut path = prefix.to_vec();
            path.extend(segments(name).into_iter().filter(|s| s != "self"));
            out.push(path);
        }
    }
}

fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut parts) = (0, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn segments(path: &str) -> Vec<String> {
    path.split("::")
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s != "*")
        .collect()
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Every path of the source that starts at `crate`, `super` or `self`, or
/// at a child module of `here`, resolved to an absolute module path.
fn referenced(here: &Module, src: &str, known: &BTreeSet<Module>) -> Vec<Module> {
    let mut raw = Vec::new();
    // `use` items (they may span lines).
    let mut lines = src.lines();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        let Some(tree) = ["use ", "pub use ", "pub(crate) use ", "pub(super) use "]
            .iter()
            .find_map(|p| t.strip_prefix(p))
        else {
            continue;
        };
        let mut item = tree.to_owned();
        while !item.contains(';') {
            let Some(next) = lines.next() else { break };
            item.push_str(next);
        }
        let end = item.find(';').unwrap_or(item.len());
        expand_use(&item[..end], &[], &mut raw);
    }
    // Inline paths: `crate::x::y`, `super::x`, `self::x`.
    for root in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = src[from..].find(root) {
            let start = from + i;
            from = start + root.len();
            if start > 0 && src[..start].ends_with(|c: char| is_ident(c) || c == ':') {
                continue;
            }
            let end = src[start..]
                .find(|c: char| !(is_ident(c) || c == ':'))
                .map_or(src.len(), |e| start + e);
            raw.push(segments(&src[start..end]));
        }
    }
    let mut out = Vec::new();
    for path in raw {
        let Some(first) = path.first() else { continue };
        let abs: Module = match first.as_str() {
            "crate" => path[1..].to_vec(),
            "super" => {
                let mut base = here.clone();
                let mut p = &path[..];
                while p.first().is_some_and(|s| s == "super") {
                    base.pop();
                    p = &p[1..];
                }
                base.extend(p.iter().cloned());
                base
            }
            "self" => here.iter().chain(&path[1..]).cloned().collect(),
            child => {
                let mut m = here.clone();
                m.push(child.to_owned());
                if !known.contains(&m) {
                    continue;
                }
                here.iter().chain(&path).cloned().collect()
            }
        };
        // The longest prefix that is a module file.
        let target = (0..=abs.len())
            .rev()
            .map(|n| abs[..n].to_vec())
            .find(|m| known.contains(m));
        if let Some(t) = target
            && !t.is_empty()
            && &t != here
        {
            out.push(t);
        }
    }
    out
}

/// The floor table of ARCHITECTURE.md: lines `floor N: a, b, c` under the
/// "Floors" heading.
fn floor_table() -> BTreeMap<String, u32> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md");
    let text = std::fs::read_to_string(doc).unwrap();
    let mut floors = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("floor ") else {
            continue;
        };
        let Some((n, names)) = rest.split_once(':') else {
            continue;
        };
        let n: u32 = n.trim().parse().expect("floor number");
        for name in names.split(',') {
            let name = name.trim().trim_matches('`');
            if !name.is_empty() {
                assert!(
                    floors.insert(name.to_owned(), n).is_none(),
                    "ARCHITECTURE.md names `{name}` on two floors"
                );
            }
        }
    }
    assert!(
        !floors.is_empty(),
        "ARCHITECTURE.md has no `floor N:` lines"
    );
    floors
}

fn edges() -> BTreeMap<Module, BTreeSet<Module>> {
    let mods = modules();
    let known: BTreeSet<Module> = mods.keys().cloned().collect();
    mods.iter()
        .map(|(m, (_, src))| (m.clone(), referenced(m, src, &known).into_iter().collect()))
        .collect()
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "lib".to_owned()
    } else {
        m.join("::")
    }
}

/// Import circles: strongly connected components of more than one file.
fn circles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<String>> {
    // Kosaraju: order by finish time, then walk the reversed graph.
    let nodes: Vec<&Module> = edges.keys().collect();
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for &start in &nodes {
        if seen.contains(start) {
            continue;
        }
        let mut stack = vec![(start, false)];
        while let Some((v, done)) = stack.pop() {
            if done {
                order.push(v);
                continue;
            }
            if !seen.insert(v.clone()) {
                continue;
            }
            stack.push((v, true));
            for w in edges.get(v).into_iter().flatten() {
                if !seen.contains(w) {
                    stack.push((w, false));
                }
            }
        }
    }
    let mut reverse: BTreeMap<&Module, Vec<&Module>> = BTreeMap::new();
    for (a, bs) in edges {
        for b in bs {
            reverse.entry(b).or_default().push(a);
        }
    }
    let mut assigned = BTreeSet::new();
    let mut out = Vec::new();
    for &v in order.iter().rev() {
        if assigned.contains(v) {
            continue;
        }
        let mut comp = Vec::new();
        let mut stack = vec![v];
        assigned.insert(v.clone());
        while let Some(x) = stack.pop() {
            comp.push(name(x));
            for &w in reverse.get(x).into_iter().flatten() {
                if assigned.insert(w.clone()) {
                    stack.push(w);
                }
            }
        }
        if comp.len() > 1 {
            comp.sort();
            out.push(comp);
        }
    }
    out
}

#[test]
fn no_import_circle_between_module_files() {
    let circles = circles(&edges());
    assert!(
        circles.is_empty(),
        "import circles in agent/src (each line is one circle):\n{}",
        circles
            .iter()
            .map(|c| c.join(" ↔ "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn no_module_imports_a_higher_floor() {
    let floors = floor_table();
    let edges = edges();
    let top = |m: &Module| m.first().cloned().unwrap_or_else(|| "lib".to_owned());
    let tops: BTreeSet<String> = edges.keys().filter(|m| !m.is_empty()).map(top).collect();
    let unplaced: Vec<&String> = tops.iter().filter(|t| !floors.contains_key(*t)).collect();
    assert!(
        unplaced.is_empty(),
        "modules missing from ARCHITECTURE.md's floor table: {unplaced:?}"
    );
    let stale: Vec<&String> = floors.keys().filter(|f| !tops.contains(*f)).collect();
    assert!(
        stale.is_empty(),
        "ARCHITECTURE.md's floor table names modules that do not exist: {stale:?}"
    );
    let mut upward = Vec::new();
    for (from, tos) in &edges {
        if from.is_empty() {
            continue; // lib.rs declares every module
        }
        for to in tos {
            let (a, b) = (top(from), top(to));
            if floors[&a] < floors[&b] {
                upward.push(format!(
                    "{} (floor {}) imports {} (floor {})",
                    name(from),
                    floors[&a],
                    name(to),
                    floors[&b]
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "upward imports in agent/src:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_checker_sees_imports_of_every_form() {
    let known: BTreeSet<Module> = [
        vec!["a".to_owned()],
        vec!["a".to_owned(), "b".to_owned()],
        vec!["c".to_owned()],
        vec!["d".to_owned()],
        vec!["e".to_owned()],
    ]
    .into_iter()
    .collect();
    let here = vec!["a".to_owned()];
    let src = strip(
        "use crate::{c::X, d::{self, Y}};\nuse b::Z;\nfn f() { crate::e::g(); }\n\
         // crate::nope\nlet s = \"http://x\"; super::a::b::W;\n#[cfg(test)]\nmod tests {\n use crate::e; }\n",
    );
    let got: BTreeSet<String> = referenced(&here, &src, &known).iter().map(name).collect();
    let want: BTreeSet<String> = ["c", "d", "a::b", "e"].map(str::to_owned).into();
    assert_eq!(got, want);
}
