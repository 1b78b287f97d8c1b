//! The repository holds what it cites (issue #12, item 11): every relative link and every
//! repository path named in the README, `docs/`, `deploy/README.md` and the sources
//! exists; and the load-benchmark scripts write their results under `target/` unless
//! asked to record them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Top-level folders whose paths a text may cite.
const TOP: &[&str] = &[
    "src/", "tests/", "docs/", "deploy/", "benches/", "config/", "fuzz/", ".ci/",
];

/// Paths a text cites: Markdown link targets that are not URLs or anchors, and
/// `code spans` or bare words that start with one of [`TOP`] (or name a root file).
fn cited(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let end = rest.find(')').unwrap_or(rest.len());
        let target = rest[..end].split('#').next().unwrap_or("");
        if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
            out.push(target.to_string());
        }
    }
    for word in text.split(|c: char| c.is_whitespace() || "`'\"(),;<>[]|*".contains(c)) {
        // A named path may carry a `#heading` fragment: the path is what must exist.
        let word = word
            .split('#')
            .next()
            .unwrap_or("")
            .trim_end_matches(['.', ':']);
        let root_file = matches!(
            word,
            "README.md" | "ARCHITECTURE.md" | "Cargo.toml" | "Cargo.lock"
        );
        let in_top = TOP.iter().any(|top| word.starts_with(top));
        // `kubectl ... deploy/graph-session-proxy` names a Deployment, not a file.
        let kubectl_resource = word == "deploy/graph-session-proxy";
        if (root_file || in_top)
            && !kubectl_resource
            && !word.contains(['{', '$', '*', '?', '<', '='])
            && !word.contains("...")
        {
            out.push(word.to_string());
        }
    }
    out
}

fn texts() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md"), root().join("deploy/README.md")];
    for dir in ["docs", "src", "src/sim"] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path
                .extension()
                .is_some_and(|e| e == "md" || e == "rs" || e == "toml")
            {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn every_cited_path_exists() {
    let mut missing = Vec::new();
    for file in texts() {
        let text = std::fs::read_to_string(&file).unwrap();
        let base = file.parent().unwrap();
        for path in cited(&text) {
            // Links are relative to the file; named paths to the repository root.
            let candidates = [base.join(&path), root().join(&path)];
            if !candidates.iter().any(|p| p.exists()) {
                missing.push(format!(
                    "{}: {path}",
                    file.strip_prefix(root()).unwrap().display()
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "cited but not in the repository:\n{}",
        missing.join("\n")
    );
}

#[test]
fn design_is_cited_by_its_path_in_the_repository() {
    assert!(root().join("docs/DESIGN.md").is_file());
    for file in texts() {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, _) in text.match_indices("DESIGN.md") {
            let before = &text[..i];
            assert!(
                before.ends_with("docs/") || file.starts_with(root().join("docs")),
                "{} cites DESIGN.md without its path (docs/DESIGN.md)",
                file.display()
            );
        }
    }
}

/// Sources the scripts' common helpers in a scratch root and prints where results go.
fn results_dir(record: Option<&str>) -> String {
    let scratch = std::env::temp_dir().join(format!("gsp-bench-root-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let common = root().join("benches/load/common.sh");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "set -euo pipefail; ROOT='{}'; LOG_TAG=t; WORK_PREFIX=gsp-test; source '{}'; echo \"$RESULTS\"",
            scratch.display(),
            common.display()
        ))
        .env_remove("RECORD");
    if let Some(value) = record {
        cmd.env("RECORD", value);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let relative = Path::new(&dir)
        .strip_prefix(&scratch)
        .unwrap()
        .display()
        .to_string();
    let _ = std::fs::remove_dir_all(&scratch);
    relative
}

#[test]
fn benchmarks_write_results_under_target_unless_recording() {
    assert_eq!(results_dir(None), "target/bench-results");
    assert_eq!(results_dir(Some("0")), "target/bench-results");
    assert_eq!(results_dir(Some("1")), "benches/results");
    // No script writes a tracked results file by its literal path.
    for script in ["compare.sh", "tier2.sh", "instructions.sh"] {
        let text = std::fs::read_to_string(root().join("benches/load").join(script)).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            assert!(
                !line.contains("benches/results"),
                "{script} writes benches/results directly: {line}"
            );
        }
    }
}
