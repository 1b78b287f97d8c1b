//! Layering, in the manner of rust-analyzer's `tidy` tests: a top-level module of `src/`
//! (a file or folder directly under it) may name only modules below it in [`LAYERS`],
//! the order ARCHITECTURE.md gives. A module naming one above it (or one beside it that
//! is not in the list) fails here, so the structure cannot erode unnoticed. Also: no file
//! in `src/` is over 600 lines outside its `#[cfg(test)]` module.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom first. Each may import only those before it.
const LAYERS: &[&str] = &[
    "core",
    "config",
    "telemetry",
    "upstream",
    "auth",
    "cache",
    "notify",
    "http",
    "server",
    "app",
    "sim",
];

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`None` for lib.rs and main.rs).
fn module_of(file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src()).unwrap();
    let first = relative
        .components()
        .next()?
        .as_os_str()
        .to_str()?
        .to_string();
    match first.as_str() {
        "lib.rs" | "main.rs" => None,
        name => Some(name.trim_end_matches(".rs").to_string()),
    }
}

/// The top-level modules a source text names as `crate::NAME`, outside comments.
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            // `graph_session_proxy::...` in doc tests or `$crate::` in macros are not ours.
            let before = &rest[..at];
            rest = &rest[at + "crate::".len()..];
            if before.ends_with('$') || before.ends_with('_') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
        // `use crate::{a, b}` groups.
        if let Some(group) = code.trim_start().strip_prefix("use crate::{") {
            for item in group.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn every_top_level_module_is_a_known_layer() {
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(src()).unwrap() {
        let path = entry.unwrap().path();
        if let Some(module) = module_of(&path) {
            found.insert(module);
        }
    }
    let known: BTreeSet<String> = LAYERS.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        found, known,
        "src/'s top-level modules and tests/tidy.rs's LAYERS (and ARCHITECTURE.md) must agree"
    );
}

#[test]
fn imports_only_go_down() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut violations = Vec::new();
    for file in files {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let own = rank(&module).unwrap_or(usize::MAX);
        let text = std::fs::read_to_string(&file).unwrap();
        for named in named_modules(&text) {
            if named == module || named == "self" || named == "super" {
                continue;
            }
            match rank(&named) {
                Some(other) if other < own => {}
                _ => violations.push(format!(
                    "{} ({module}) names crate::{named}",
                    file.strip_prefix(src()).unwrap().display()
                )),
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports that go up or sideways (order: {}):\n{}",
        LAYERS.join(" < "),
        violations.join("\n")
    );
}

#[test]
fn no_file_is_over_600_lines_outside_its_tests() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut long = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text
            .lines()
            .take_while(|l| l.trim() != "#[cfg(test)]")
            .count();
        if code > 600 {
            long.push(format!(
                "{}: {code} lines",
                file.strip_prefix(src()).unwrap().display()
            ));
        }
    }
    assert!(long.is_empty(), "over 600 lines:\n{}", long.join("\n"));
}

#[test]
fn the_checker_sees_what_it_should() {
    let names = named_modules(
        "use crate::cache::SessionCache;\nuse crate::{config, core::clock};\n// crate::sim in a comment\nlet x = crate::http::error::X;\n",
    );
    let expected: BTreeSet<String> = ["cache", "config", "core", "http"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, expected);
}
