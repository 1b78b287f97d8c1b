//! The README stays short and true, and every link in it and in `docs/` resolves (issue #18).
//!
//! **Runnable blocks.** A fenced code block in README.md whose opening fence is directly
//! below a line `<!-- runnable -->` is a shell script this test runs (`bash -euo pipefail`,
//! from the repository root), and it must exit 0. Before it runs, the addresses the README
//! documents for the demo are replaced by those of a demo this test starts on free ports
//! (`127.0.0.1:8080` the proxy, `127.0.0.1:9090` the admin listener, `127.0.0.1:<sim port>`
//! the simulator), `cargo run --release --` by `graph-session-proxy`, and the test's build
//! of `graph-session-proxy` is first on the `PATH`. A block directly below `<!-- output -->`
//! is the gist of what the runnable block before it prints: each of its lines must match a
//! line of the output, in order, where `...` stands for any text. Mark only blocks that run
//! in seconds on a bare machine (no Redis, no tenant, no long-running server).
//!
//! **Links.** Every relative link and image in README.md and `docs/**/*.md` (outside code)
//! names an existing file, and a `#fragment` names a heading of the target (GitHub's
//! anchors: lowercase, punctuation but `-` and `_` dropped, spaces as `-`, repeats `-1`,
//! `-2`...). External `http(s)` links are checked for syntax only.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).unwrap()
}

#[test]
fn the_readme_fits_on_a_screen() {
    let lines = readme().lines().count();
    assert!(lines <= 160, "README.md has {lines} lines (at most 160)");
}

/// The README opens with the two set-up commands.
#[test]
fn the_readme_opens_with_the_two_commands() {
    let text = readme();
    let first = fenced_blocks(&text)
        .into_iter()
        .next()
        .expect("a code block");
    let commands: Vec<&str> = first.body.lines().collect();
    assert!(
        commands[0].starts_with("cargo run --release -- demo "),
        "{first:?}"
    );
    assert!(commands[1].starts_with(".ci/test "), "{first:?}");
}

/// A fenced code block: its info string, its text, and the line above its opening fence.
#[derive(Debug)]
struct Block {
    info: String,
    body: String,
    above: String,
}

fn fenced_blocks(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut previous = "";
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            let mut body = String::new();
            for inner in lines.by_ref() {
                if inner.trim_start().starts_with("```") {
                    break;
                }
                body.push_str(inner);
                body.push('\n');
            }
            blocks.push(Block {
                info: info.trim().to_string(),
                body,
                above: previous.trim().to_string(),
            });
            previous = "";
        } else {
            previous = line;
        }
    }
    blocks
}

/// A runnable block and the gist of its output, if one is declared.
fn runnable_blocks(text: &str) -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for block in fenced_blocks(text) {
        match block.above.as_str() {
            "<!-- runnable -->" => {
                assert!(
                    matches!(block.info.as_str(), "sh" | "bash" | "shell"),
                    "a runnable block is a shell block: {block:?}"
                );
                out.push((block.body, None));
            }
            "<!-- output -->" => {
                let last = out
                    .last_mut()
                    .expect("an output block follows a runnable one");
                assert!(last.1.is_none(), "one output block per runnable block");
                last.1 = Some(block.body);
            }
            _ => {}
        }
    }
    out
}

/// Where the pieces of `pattern` around its `...`s end in `line`, found in order.
fn matches(pattern: &str, line: &str) -> Option<usize> {
    let mut end = 0;
    for piece in pattern.split("...") {
        end += line[end..].find(piece)? + piece.len();
    }
    Some(end)
}

/// The first pattern of `gist` that `output` does not hold, in order: each pattern within
/// one line, after where the one before it ended (curl's bodies end without a newline,
/// so the next answer may start on the same line).
fn unmatched<'a>(gist: &'a str, output: &str) -> Option<&'a str> {
    let lines: Vec<&str> = output.lines().map(|l| l.trim_end_matches('\r')).collect();
    let (mut line, mut offset) = (0, 0);
    'patterns: for pattern in gist.lines().map(str::trim).filter(|p| !p.is_empty()) {
        while line < lines.len() {
            if let Some(end) = matches(pattern, &lines[line][offset..]) {
                offset += end;
                continue 'patterns;
            }
            line += 1;
            offset = 0;
        }
        return Some(pattern);
    }
    None
}

/// The demo on free ports, killed when dropped.
struct Demo {
    child: Child,
    proxy: String,
    admin: String,
    sim: String,
    /// The curl lines it printed.
    curls: Vec<String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo() -> Demo {
    let mut child = Command::new(env!("CARGO_BIN_EXE_graph-session-proxy"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut demo = Demo {
        child,
        proxy: String::new(),
        admin: String::new(),
        sim: String::new(),
        curls: Vec::new(),
    };
    let address = |line: &str, after: &str| -> String {
        let start = line
            .find(after)
            .unwrap_or_else(|| panic!("{after} in {line}"))
            + after.len();
        let rest = &line[start..];
        rest[..rest.find([',', ' ']).unwrap_or(rest.len())].to_string()
    };
    while demo.curls.len() < 5 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the demo prints its addresses and five curl lines");
        if line.starts_with("graph-session-proxy demo:") {
            demo.proxy = address(&line, "proxy on http://");
            demo.sim = address(&line, "simulated Graph on http://");
            demo.admin = address(&line, "admin on http://");
        } else if line.trim_start().starts_with("curl ") {
            demo.curls.push(line.trim().to_string());
        }
    }
    wait_ready(&demo.admin);
    demo
}

/// Waits for the demo's `/readyz` to answer 200.
fn wait_ready(admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{admin}/readyz"))
            .output()
            .expect("curl");
        if out.stdout == b"200" {
            return;
        }
        assert!(Instant::now() < deadline, "the demo never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The README's documented addresses replaced by the demo's.
fn substitute(script: &str, demo: &Demo) -> String {
    script
        .replace("127.0.0.1:<sim port>", &demo.sim)
        .replace("127.0.0.1:8080", &demo.proxy)
        .replace("127.0.0.1:9090", &demo.admin)
        .replace("cargo run --release --", "graph-session-proxy")
}

/// Runs a script with bash (at most a minute): its exit status and what it printed
/// (stdout and stderr).
fn run(script: &str) -> (Option<i32>, String) {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_graph-session-proxy"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // One file per run: tests run on several threads.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_file = std::env::temp_dir().join(format!("gsp-readme-{}-{n}.out", std::process::id()));
    let out = std::fs::File::create(&out_file).unwrap();
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(root())
        .env("PATH", path)
        .stderr(out.try_clone().unwrap())
        .stdout(out)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_file).unwrap_or_default();
    let _ = std::fs::remove_file(&out_file);
    (status, output)
}

#[test]
fn every_runnable_block_of_the_readme_runs() {
    let blocks = runnable_blocks(&readme());
    assert!(
        blocks.iter().any(|(s, _)| s.contains("curl ")),
        "the tour is a runnable block"
    );
    assert!(
        blocks.iter().any(|(s, _)| s.contains("check-config")),
        "a configuration check is a runnable block"
    );
    let demo = start_demo();
    // The tour shows every call the demo prints, as it prints it.
    let tour = blocks.iter().find(|(s, _)| s.contains("curl ")).unwrap();
    let tour_lines = substitute(&tour.0, &demo);
    for curl in &demo.curls {
        assert!(
            tour_lines.lines().any(|l| l.trim() == curl),
            "the demo prints a call the README's tour does not show: {curl}"
        );
    }
    for (script, gist) in &blocks {
        let script = substitute(script, &demo);
        let (status, output) = run(&script);
        assert_eq!(status, Some(0), "README block failed:\n{script}\n{output}");
        if let Some(gist) = gist {
            if let Some(pattern) = unmatched(gist, &output) {
                panic!("README block:\n{script}\nprinted no line like `{pattern}`:\n{output}");
            }
        }
    }
}

#[test]
fn gist_matching() {
    assert!(matches("a; ttl=...", "x a; ttl=297").is_some());
    assert!(matches("a...b", "b a").is_none());
    assert_eq!(unmatched("one\ntwo", "zero\none\nthree\ntwo\n"), None);
    assert_eq!(unmatched("two\none", "one\ntwo\n"), Some("one"));
    assert_eq!(unmatched("{...}\n{x", "{a}{x"), None);
    assert_eq!(unmatched("{x\n{a", "{a}{x"), Some("{a"));
    assert_eq!(run("true").0, Some(0));
    assert_ne!(
        run("false; true").0,
        Some(0),
        "a failing command fails its block"
    );
}

// ---- links ----

fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut files = vec![root().join("README.md")];
    walk(&root().join("docs"), &mut files);
    files
}

/// The text outside fenced blocks, with inline code spans emptied.
fn prose(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut kept = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                kept.push_str(part);
            }
        }
        out.push(kept);
    }
    out
}

/// Link targets: `[text](target)` and `![alt](target)`, without a `"title"`.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(text) {
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            let target = rest[..end].split_whitespace().next().unwrap_or("");
            out.push(target.to_string());
        }
    }
    out
}

/// GitHub's anchor of a heading's text.
fn anchor(heading: &str) -> String {
    // A link in a heading counts by its text.
    let mut text = String::new();
    let mut rest = heading;
    while let Some(at) = rest.find("](") {
        text.push_str(&rest[..at]);
        rest = &rest[at..];
        rest = &rest[rest.find(')').map_or(rest.len(), |e| e + 1)..];
    }
    text.push_str(rest);
    text.to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code), repeats numbered.
fn anchors(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text
        .lines()
        .scan(false, |fenced, line| {
            if line.trim_start().starts_with("```") {
                *fenced = !*fenced;
                return Some(None);
            }
            Some((!*fenced).then_some(line))
        })
        .flatten()
    {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            let base = anchor(line[hashes..].trim());
            let repeats = out
                .iter()
                .filter(|a| **a == base || a.starts_with(&format!("{base}-")))
                .filter(|a| **a == base || a[base.len() + 1..].chars().all(|c| c.is_ascii_digit()))
                .count();
            out.push(if repeats == 0 {
                base
            } else {
                format!("{base}-{repeats}")
            });
        }
    }
    out
}

#[test]
fn anchors_follow_github() {
    assert_eq!(
        anchor("Admin listener (`server.admin_listen`, loopback by default)"),
        "admin-listener-serveradmin_listen-loopback-by-default"
    );
    assert_eq!(
        anchor("Fair share: per-caller limits (`[limits]`)"),
        "fair-share-per-caller-limits-limits"
    );
    assert_eq!(
        anchors("# A\n```\n# not\n```\n## A\n# b"),
        ["a", "a-1", "b"]
    );
}

#[test]
fn every_link_resolves() {
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(root()).unwrap().display().to_string();
        for target in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                match reqwest::Url::parse(&target) {
                    Ok(url) if url.host_str().is_some_and(|h| h.contains('.')) => {}
                    _ => broken.push(format!("{name}: {target}: not a URL")),
                }
                continue;
            }
            if target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((path, fragment)) => (path, Some(fragment)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            if path.is_empty() && fragment.is_none() || !resolved.exists() {
                broken.push(format!("{name}: {target}: no such file"));
                continue;
            }
            if let Some(fragment) = fragment {
                let headings = std::fs::read_to_string(&resolved)
                    .map(|t| anchors(&t))
                    .unwrap_or_default();
                if !headings.iter().any(|h| h == fragment) {
                    broken.push(format!("{name}: {target}: no such heading"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
