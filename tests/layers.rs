//! The crate's layers import one way (docs/architecture.md). Every top-level module of src/ has
//! a layer; a module may use only modules of lower layers. This test reads every source file,
//! finds each `crate::<module>` path (and `super::` chains that climb to the crate root), and
//! fails on any use of the same or a higher layer, naming the file and line, and on a top-level
//! module the table below does not place. Comments count: a lower layer that needs to name a
//! higher one in prose can say it in words.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// (module, layer): lower layers first. Keep in step with docs/architecture.md.
const LAYERS: &[(&str, u32)] = &[
    ("util", 0),
    ("io", 1),
    ("dist", 1),
    ("ops", 2),
    ("quant", 3),
    ("kernels", 4),
    ("model", 4),
    ("text", 4),
    ("vae", 4),
    ("safety", 4),
    ("adapters", 5),
    ("engine", 6),
    ("plan", 6),
    ("pipeline", 6),
    ("sample", 7),
    ("train", 8),
    ("serve", 9),
    ("cli", 10),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules a line names: `crate::m`, or `super::…::m` climbing to the root from a
/// file `depth` modules deep.
fn named_modules(line: &str, depth: usize) -> Vec<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let mut out = Vec::new();
    for (i, _) in line.match_indices("crate::") {
        let before = line[..i].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `flux_kernels_crate::`, not ours
        }
        out.push(ident(&line[i + 7..]));
    }
    let mut rest = line;
    while let Some(i) = rest.find("super::") {
        let mut j = i;
        let mut ups = 0;
        while rest[j..].starts_with("super::") {
            ups += 1;
            j += 7;
        }
        if ups >= depth {
            out.push(ident(&rest[j..]));
        }
        rest = &rest[j..];
    }
    out
}

#[test]
fn layers_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().to_string()).collect();
        let top = parts[0].trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(&own) = layer.get(top.as_str()) else {
            problems.push(format!("src/{top}: a top-level module without a layer in tests/layers.rs"));
            continue;
        };
        // Module depth of the file: src/a.rs and src/a/mod.rs are 1, src/a/b.rs is 2, …
        let last = parts.last().unwrap();
        let depth = parts.len() - usize::from(last == "mod.rs");
        let text = std::fs::read_to_string(f).unwrap();
        // An inline `mod tests {` adds a level for `super::` (such blocks close the file).
        let mut inline = 0;
        for (n, line) in text.lines().enumerate() {
            let t = line.trim_start().trim_start_matches("pub(crate) ").trim_start_matches("pub ");
            if t.starts_with("mod ") && t.trim_end().ends_with('{') {
                inline += 1;
            }
            for m in named_modules(line, depth + inline) {
                if m == top || m.is_empty() {
                    continue;
                }
                match layer.get(m.as_str()) {
                    Some(&l) if l < own => {}
                    Some(&l) => problems.push(format!(
                        "src/{}:{}: `{top}` (layer {own}) uses `{m}` (layer {l}): imports go to lower layers only",
                        rel.display(),
                        n + 1
                    )),
                    None => problems.push(format!("src/{}:{}: `{m}` is not a layer", rel.display(), n + 1)),
                }
            }
        }
    }
    assert!(problems.is_empty(), "{} layer violations:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn the_checker_sees_what_it_must() {
    assert_eq!(named_modules("use crate::model::flux::FluxInputs;", 1), ["model"]);
    assert_eq!(named_modules("    let x = crate::util::thousands(3); // crate::io too", 2), ["util", "io"]);
    // src/engine/cuda/blocks.rs is three deep: `super::super::super::x` is crate::x.
    assert_eq!(named_modules("use super::super::super::train::X;", 3), ["train"]);
    assert!(named_modules("use super::weights::X;", 3).is_empty());
    assert!(named_modules("use flux_kernels::model::X;", 1).is_empty());
}
