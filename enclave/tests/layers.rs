//! No crate of the workspace has modules that import each other in a circle, and this
//! crate's dependency direction (written at the top of `src/lib.rs`) holds: every
//! `crate::` and `super::` path in `src/` names a module of its own layer or of a layer
//! below, `peer` never reaches into `kre`, and every top-level module is in a layer.
//!
//! Comments (doc links included) and string literals are not imports and are skipped; inline
//! `mod name { ... }` blocks are followed so that `super::` resolves as rustc resolves it.

use std::path::{Path, PathBuf};

/// The layers, lowest first: each layer's name and its top-level modules.
const LAYERS: &[(&str, &[&str])] = &[
    ("codec", &["codec", "atomic"]),
    ("binding", &["binding"]),
    ("crypto", &["crypto"]),
    ("audit", &["audit"]),
    ("state", &["state"]),
    ("wire", &["wire"]),
    ("kre", &["kre"]),
    ("peer", &["peer"]),
    ("net", &["net"]),
    ("cli", &["cli", "policy_file"]),
];

/// Pairs (importer, imported) of layers that must not meet although the order allows it.
const FORBIDDEN: &[(&str, &str)] = &[("peer", "kre")];

fn layer_of(module: &str) -> Option<(usize, &'static str)> {
    LAYERS.iter().enumerate().find(|(_, (_, mods))| mods.contains(&module)).map(|(i, (name, _))| (i, *name))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read src").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The source with comments, string and char literals blanked (newlines kept), so that
/// only code is scanned and braces balance.
fn code_only(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !b.get(i.wrapping_sub(1)).is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|h| b.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &b[i..j.min(b.len())] {
                out.push(blank(ch));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let close = if next == Some('\\') {
                (i + 2..b.len().min(i + 12)).find(|&k| b[k] == '\'')
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(k) => {
                    for _ in i..=k {
                        out.push(' ');
                    }
                    i = k + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_at(s: &[char], mut i: usize) -> (String, usize) {
    while i < s.len() && s[i].is_whitespace() {
        i += 1;
    }
    let start = i;
    while i < s.len() && (s[i].is_alphanumeric() || s[i] == '_') {
        i += 1;
    }
    (s[start..i].iter().collect(), i)
}

fn starts_with(s: &[char], i: usize, word: &str) -> bool {
    let w: Vec<char> = word.chars().collect();
    s.len() >= i + w.len()
        && s[i..i + w.len()] == w[..]
        && !(i > 0 && (s[i - 1].is_alphanumeric() || s[i - 1] == '_' || s[i - 1] == '$'))
}

/// The first segment of every path in a `{ ... }` group starting at `i` (just after `{`).
fn group_heads(s: &[char], mut i: usize) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect = true;
    while i < s.len() {
        match s[i] {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => expect = true,
            c if expect && (c.is_alphanumeric() || c == '_') => {
                let (id, j) = ident_at(s, i);
                heads.push(id);
                expect = false;
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    heads
}

/// One `crate::` or `super::` path in a file.
struct Ref {
    line: usize,
    /// The path from the crate root, as far as it goes (`["audit", "event", "AuditEntry"]`).
    path: Vec<String>,
    /// The path as written.
    text: String,
    /// Inside an inline `mod tests`.
    in_tests: bool,
}

/// `ident(::ident)*` from `i`, and then, after a trailing `::{`, the first segment of each
/// path in the group: one path per group member.
fn paths_at(s: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let mut segs = Vec::new();
    loop {
        if s.get(i) == Some(&'{') {
            let heads = group_heads(s, i + 1);
            let all = heads
                .into_iter()
                .map(|h| {
                    let mut p = segs.clone();
                    if h != "self" {
                        p.push(h);
                    }
                    p
                })
                .collect();
            return (all, i);
        }
        let (id, j) = ident_at(s, i);
        if id.is_empty() {
            break;
        }
        segs.push(id);
        i = j;
        if s.get(i) == Some(&':') && s.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            break;
        }
    }
    (vec![segs], i)
}

/// Every `crate::` and `super::` path of a file whose module path is `file_module`.
fn references(file_module: &[String], code: &str) -> Vec<Ref> {
    let s: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut depth = 0usize;
    // Inline modules open at a brace depth: (name, depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut pending_mod: Option<String> = None;
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == '\n' {
            line += 1;
        } else if c == '{' {
            depth += 1;
            if let Some(name) = pending_mod.take() {
                inline.push((name, depth));
            }
        } else if c == '}' {
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
        } else if c == ';' {
            pending_mod = None;
        } else if starts_with(&s, i, "mod ") {
            let (name, j) = ident_at(&s, i + 3);
            pending_mod = Some(name);
            i = j;
            continue;
        } else if starts_with(&s, i, "crate::") || starts_with(&s, i, "super::") {
            let mut here: Vec<String> = file_module.to_vec();
            here.extend(inline.iter().map(|(n, _)| n.clone()));
            let in_tests = inline.iter().any(|(n, _)| n == "tests");
            let mut j = i;
            let base = if starts_with(&s, i, "crate::") {
                j += "crate::".len();
                Some(Vec::new())
            } else {
                let mut k = 0;
                while starts_with(&s, j, "super::") {
                    k += 1;
                    j += "super::".len();
                }
                here.len().checked_sub(k).map(|n| here[..n].to_vec())
            };
            let written: String = s[i..j].iter().collect();
            let (paths, end) = paths_at(&s, j);
            for p in paths {
                let text = format!("{written}{}", p.join("::"));
                match &base {
                    Some(b) => {
                        let mut path = b.clone();
                        path.extend(p);
                        out.push(Ref { line, path, text, in_tests });
                    }
                    None => out.push(Ref { line, path: vec!["<above the crate root>".to_owned()], text, in_tests }),
                }
            }
            i = end.max(j);
            continue;
        }
        i += 1;
    }
    out
}

/// The violations in the crate at `src`: one line each, naming file, line and import.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut bad = Vec::new();
    for f in files {
        let rel = f.strip_prefix(src).expect("under src");
        let Some(module) = module_of(rel) else { continue };
        let top = module[0].clone();
        let Some((mine, my_name)) = layer_of(&top) else {
            bad.push(format!("src/{}: module `{top}` is in no layer (add it to src/lib.rs and LAYERS)", rel.display()));
            continue;
        };
        let src_text = std::fs::read_to_string(&f).expect("read");
        for Ref { line, path, text, .. } in references(&module, &code_only(&src_text)) {
            let Some(target) = path.first().cloned() else { continue };
            if target == top {
                continue;
            }
            match layer_of(&target) {
                None => {
                    bad.push(format!("src/{}:{line}: `{text}` names `{target}`, which is in no layer", rel.display()))
                }
                Some((theirs, their_name)) if theirs > mine => bad.push(format!(
                    "src/{}:{line}: `{text}`: {my_name} (layer {}) imports {their_name} (layer {}), a layer above it",
                    rel.display(),
                    mine + 1,
                    theirs + 1
                )),
                Some((_, their_name)) if FORBIDDEN.contains(&(my_name, their_name)) => bad
                    .push(format!("src/{}:{line}: `{text}`: {my_name} must never import {their_name}", rel.display())),
                Some(_) => {}
            }
        }
    }
    bad
}

/// The module path of a file under `src` (`["audit", "event"]`), `None` for the crate roots.
fn module_of(rel: &Path) -> Option<Vec<String>> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned()).collect();
    if parts == ["lib"] || parts == ["main"] {
        return None;
    }
    if parts.last().is_some_and(|m| m == "mod") {
        parts.pop();
    }
    Some(parts)
}

/// Every circle of imports between the crate's modules (files), outside test modules. A
/// child's path to an item of its parent (`super::Item`) is not counted: the parent only
/// declares and re-exports its children.
fn circles(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut modules: Vec<(Vec<String>, PathBuf)> = Vec::new();
    for f in files {
        if let Some(m) = module_of(f.strip_prefix(src).expect("under src")) {
            modules.push((m, f));
        }
    }
    let known: Vec<Vec<String>> = modules.iter().map(|(m, _)| m.clone()).collect();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); known.len()];
    for (from, (module, f)) in modules.iter().enumerate() {
        let text = std::fs::read_to_string(f).expect("read");
        for r in references(module, &code_only(&text)) {
            if r.in_tests {
                continue;
            }
            let target = (1..=r.path.len()).rev().find_map(|n| known.iter().position(|k| k[..] == r.path[..n]));
            if let Some(to) = target {
                let is_ancestor = known[to].len() < module.len() && module[..known[to].len()] == known[to][..];
                if to != from && !is_ancestor && !edges[from].contains(&to) {
                    edges[from].push(to);
                }
            }
        }
    }
    // Depth-first search; a back edge closes a circle.
    let name = |i: usize| known[i].join("::");
    let mut state = vec![0u8; known.len()];
    let mut stack: Vec<usize> = Vec::new();
    let mut found = Vec::new();
    fn visit(v: usize, edges: &[Vec<usize>], state: &mut [u8], stack: &mut Vec<usize>, found: &mut Vec<Vec<usize>>) {
        state[v] = 1;
        stack.push(v);
        for &w in &edges[v] {
            if state[w] == 1 {
                let at = stack.iter().position(|&x| x == w).expect("on the stack");
                let mut c = stack[at..].to_vec();
                c.push(w);
                found.push(c);
            } else if state[w] == 0 {
                visit(w, edges, state, stack, found);
            }
        }
        stack.pop();
        state[v] = 2;
    }
    for v in 0..known.len() {
        if state[v] == 0 {
            visit(v, &edges, &mut state, &mut stack, &mut found);
        }
    }
    found.into_iter().map(|c| c.into_iter().map(name).collect::<Vec<_>>().join(" → ")).collect()
}

/// Every crate of the workspace: this one and its siblings.
const CRATES: &[&str] = &["enclave", "attestation", "eif", "parent", "enclave-dev", "tests"];

#[test]
fn no_module_imports_in_a_circle_in_any_crate() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
    let found: Vec<String> = CRATES
        .iter()
        .flat_map(|c| circles(&workspace.join(c).join("src")).into_iter().map(move |circle| format!("{c}: {circle}")))
        .collect();
    assert!(found.is_empty(), "import circles between modules:\n{}", found.join("\n"));
}

#[test]
fn every_import_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(bad.is_empty(), "imports against the layer order of src/lib.rs:\n{}", bad.join("\n"));
}

#[test]
fn every_layer_module_is_declared_in_lib_rs() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).expect("lib.rs");
    let code = code_only(&lib);
    for line in code.lines() {
        if let Some(name) = line.trim().strip_prefix("pub mod ").or_else(|| line.trim().strip_prefix("mod ")) {
            let name = name.trim_end_matches(';').trim();
            assert!(layer_of(name).is_some(), "src/lib.rs declares `{name}`, which is in no layer");
        }
    }
}

#[test]
fn the_scanner_finds_upward_imports_and_skips_comments_and_strings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    std::fs::create_dir_all(src.join("wire")).expect("mkdir");
    std::fs::write(
        src.join("codec.rs"),
        "//! See [`crate::wire`].\nuse crate::{binding, state::vault};\nconst S: &str = \"crate::net\";\n",
    )
    .expect("write");
    std::fs::write(
        src.join("wire/frame.rs"),
        "use super::messages::X;\nmod tests {\n    use super::*;\n    use super::super::super::peer::client;\n}\n",
    )
    .expect("write");
    std::fs::write(src.join("peer.rs"), "use crate::kre::Kre;\nuse crate::wire::Message;\n").expect("write");
    std::fs::write(src.join("stray.rs"), "").expect("write");
    std::fs::write(src.join("wire/deny.rs"), "use super::frame::Y;\n").expect("write");
    std::fs::write(src.join("wire/messages.rs"), "use crate::wire::deny::Z;\n").expect("write");
    assert_eq!(circles(src), ["wire::deny → wire::frame → wire::messages → wire::deny"]);
    let bad = violations(src);
    let expected = [
        "src/codec.rs:2: `crate::binding`: codec (layer 1) imports binding (layer 2), a layer above it",
        "src/codec.rs:2: `crate::state`: codec (layer 1) imports state (layer 5), a layer above it",
        "src/peer.rs:1: `crate::kre::Kre`: peer must never import kre",
        "src/stray.rs: module `stray` is in no layer (add it to src/lib.rs and LAYERS)",
        "src/wire/frame.rs:4: `super::super::super::peer::client`: wire (layer 6) imports peer (layer 8), a layer above it",
    ];
    assert_eq!(bad, expected);
}
