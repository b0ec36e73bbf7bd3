//! The import graph of each crate's top-level modules must have no circle:
//! a circle means two modules are one piece in two files, and the layers of
//! docs/architecture.md stop meaning anything. Between crates the compiler
//! already refuses circles; inside one, only this check does.
//!
//! A textual reading, enough for this code base: a file belongs to the
//! top-level module of its path; it uses module `m` when it names
//! `crate::m`, lists `m` in `use crate::{…}`, or names `super::m` where
//! `super` is the crate root. Test modules (`#[cfg(test)] mod tests`) are
//! left out: tests may reach anywhere.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// The source directories of every crate, relative to the workspace root.
pub const CRATES: [&str; 8] = [
    "mesh-common/src",
    "mesh-ebpf/src",
    "mesh-agent/policy/src",
    "mesh-agent/datapath/src",
    "mesh-agent/pki/src",
    "mesh-agent/src",
    "tests/src",
    "xtask/src",
];

/// Fails naming the modules of every circle found.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let mut circles = Vec::new();
    for dir in CRATES {
        let graph = graph(&root.join(dir))?;
        for circle in circles_of(&graph) {
            circles.push(format!("{dir}: {}", circle.join(" ↔ ")));
        }
    }
    if !circles.is_empty() {
        bail!(
            "modules that import each other (move what they share into one of them, or into a \
             module both use):\n  {}",
            circles.join("\n  ")
        );
    }
    Ok(())
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Top-level module → the top-level modules it uses.
fn graph(src: &Path) -> anyhow::Result<Graph> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let modules: BTreeSet<String> = files.iter().map(|f| top_module(src, f)).collect();
    let mut graph = Graph::new();
    for file in &files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let module = top_module(src, file);
        let rel = file.strip_prefix(src).expect("under src");
        // `super` is the crate root in a top-level file and in `dir/mod.rs`.
        let super_is_root = rel.components().count() == 1 || rel.ends_with("mod.rs");
        let uses = graph.entry(module.clone()).or_default();
        for used in used_modules(&without_tests(&text), super_is_root) {
            if used != module && modules.contains(&used) {
                uses.insert(used);
            }
        }
    }
    Ok(graph)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `src/a.rs`, `src/a/mod.rs`, `src/a/b.rs` → `a`; `src/lib.rs` → `lib`.
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a file name");
    let name = first.as_os_str().to_string_lossy();
    name.strip_suffix(".rs").unwrap_or(&name).to_string()
}

/// The text before the file's test module, without comments.
fn without_tests(text: &str) -> String {
    let end = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn used_modules(text: &str, super_is_root: bool) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut prefixes = vec!["crate::"];
    if super_is_root {
        prefixes.push("super::");
    }
    for prefix in prefixes {
        for (at, _) in text.match_indices(prefix) {
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // `$crate::`, `mesh_agent::crate::…`, `a::super::…`
            }
            let rest = &text[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                used.extend(group_heads(group));
            } else {
                used.extend(ident(rest));
            }
        }
    }
    used
}

/// The first name of each top-level item of `a, b::{c, d}, e}`.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            c if item_start && !c.is_whitespace() => {
                item_start = false;
                heads.extend(ident(&group[i..]));
            }
            _ => {}
        }
    }
    heads
}

fn ident(text: &str) -> Option<String> {
    let name: String = text
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty() && name != "self").then_some(name)
}

/// Each strongly connected set of two or more modules (Tarjan).
fn circles_of(graph: &Graph) -> Vec<Vec<String>> {
    struct Walk<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        circles: Vec<Vec<String>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    self.low.insert(v, self.low[v].min(self.low[w]));
                } else if self.stack.contains(&w) {
                    self.low.insert(v, self.low[v].min(self.index[w]));
                }
            }
            if self.low[v] == self.index[v] {
                let mut set = Vec::new();
                while let Some(w) = self.stack.pop() {
                    set.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if set.len() > 1 {
                    set.sort();
                    self.circles.push(set);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        circles: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.circles
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, text: &str) {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn finds_a_circle_through_use_groups_and_super() {
        let dir = std::env::temp_dir().join(format!("xtask-modules-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write(&dir, "lib.rs", "mod a; mod b; mod c;\n");
        write(&dir, "a.rs", "use crate::{b::Thing, self};\n");
        write(&dir, "b/mod.rs", "mod inner;\n");
        write(
            &dir,
            "b/inner.rs",
            "use crate::c; // crate::a in a comment\n",
        );
        write(
            &dir,
            "c.rs",
            "use super::a::X;\n#[cfg(test)]\nmod tests { use crate::b; }\n",
        );
        let found = graph(&dir).unwrap();
        assert_eq!(circles_of(&found), vec![vec!["a", "b", "c"]]);
        // Without the edge c → a, no circle is left.
        write(
            &dir,
            "c.rs",
            "pub struct X;\n#[cfg(test)]\nmod tests { use crate::a; }\n",
        );
        assert!(circles_of(&graph(&dir).unwrap()).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn group_heads_take_the_first_name_of_each_item() {
        assert_eq!(
            group_heads("config::Config, endpoints::{a, b::{c}}, self, flows};"),
            ["config", "endpoints", "flows"]
        );
    }
}
