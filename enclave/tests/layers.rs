//! The crate's dependency direction (written at the top of `src/lib.rs`) holds: every
//! `crate::` and `super::` path in `src/` names a module of its own layer or of a layer
//! below, `peer` never reaches into `kre`, and every top-level module is in a layer.
//!
//! Comments (doc links included) and string literals are not imports and are skipped; inline
//! `mod name { ... }` blocks are followed so that `super::` resolves as rustc resolves it.

use std::path::{Path, PathBuf};

/// The layers, lowest first: each layer's name and its top-level modules.
const LAYERS: &[(&str, &[&str])] = &[
    ("codec", &["codec"]),
    ("binding", &["binding"]),
    ("crypto", &["crypto"]),
    ("audit", &["audit"]),
    ("state", &["state"]),
    ("wire", &["wire"]),
    ("kre", &["kre", "core", "nonces"]),
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
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !b.get(i.wrapping_sub(1)).is_some_and(|p| p.is_alphanumeric() || *p == '_') {
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

/// Every top-level module a file refers to, with the line of the reference and its text.
fn references(file_module: &[String], code: &str) -> Vec<(usize, String, String)> {
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
        } else if starts_with(&s, i, "crate::") {
            let after = i + "crate::".len();
            let heads = if s.get(after) == Some(&'{') {
                group_heads(&s, after + 1)
            } else {
                vec![ident_at(&s, after).0]
            };
            for h in heads {
                out.push((line, h.clone(), format!("crate::{h}")));
            }
            i = after;
            continue;
        } else if starts_with(&s, i, "super::") {
            let mut k = 0;
            let mut j = i;
            while starts_with(&s, j, "super::") {
                k += 1;
                j += "super::".len();
            }
            let mut here: Vec<String> = file_module.to_vec();
            here.extend(inline.iter().map(|(n, _)| n.clone()));
            let text: String = s[i..j].iter().collect();
            if k > here.len() {
                out.push((line, "<above the crate root>".to_owned(), text));
            } else if k == here.len() {
                let heads = if s.get(j) == Some(&'{') { group_heads(&s, j + 1) } else { vec![ident_at(&s, j).0] };
                for h in heads {
                    out.push((line, h.clone(), format!("{text}{h}")));
                }
            } else {
                out.push((line, here[0].clone(), text));
            }
            i = j;
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
        let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned()).collect();
        if parts == ["lib"] || parts == ["main"] {
            continue;
        }
        let mut module = parts.clone();
        if module.last().is_some_and(|m| m == "mod") {
            module.pop();
        }
        let top = module[0].clone();
        let Some((mine, my_name)) = layer_of(&top) else {
            bad.push(format!("src/{}: module `{top}` is in no layer (add it to src/lib.rs and LAYERS)", rel.display()));
            continue;
        };
        let src_text = std::fs::read_to_string(&f).expect("read");
        for (line, target, text) in references(&module, &code_only(&src_text)) {
            if target == top || target == "self" {
                continue;
            }
            match layer_of(&target) {
                None => bad.push(format!(
                    "src/{}:{line}: `{text}` names `{target}`, which is in no layer",
                    rel.display()
                )),
                Some((theirs, their_name)) if theirs > mine => bad.push(format!(
                    "src/{}:{line}: `{text}`: {my_name} (layer {}) imports {their_name} (layer {}), a layer above it",
                    rel.display(),
                    mine + 1,
                    theirs + 1
                )),
                Some((_, their_name)) if FORBIDDEN.contains(&(my_name, their_name)) => {
                    bad.push(format!("src/{}:{line}: `{text}`: {my_name} must never import {their_name}", rel.display()))
                }
                Some(_) => {}
            }
        }
    }
    bad
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
    std::fs::write(src.join("peer.rs"), "use crate::core::Kre;\nuse crate::wire::Message;\n").expect("write");
    std::fs::write(src.join("stray.rs"), "").expect("write");
    let bad = violations(src);
    let expected = [
        "src/codec.rs:2: `crate::binding`: codec (layer 1) imports binding (layer 2), a layer above it",
        "src/codec.rs:2: `crate::state`: codec (layer 1) imports state (layer 5), a layer above it",
        "src/peer.rs:1: `crate::core`: peer must never import kre",
        "src/stray.rs: module `stray` is in no layer (add it to src/lib.rs and LAYERS)",
        "src/wire/frame.rs:4: `super::super::super::peer`: wire (layer 6) imports peer (layer 8), a layer above it",
    ];
    assert_eq!(bad, expected);
}
