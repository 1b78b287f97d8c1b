//! The monitoring pack in `deploy/monitoring/` (issue #18) names what exists: every metric
//! an alerting rule or a dashboard query uses is one the proxy exports on `/metrics` after a
//! little traffic (against the simulator, with change notifications on, and a second proxy
//! with a shared tier that is down and tight caller limits), and every alert's `runbook_url`
//! is the anchor of a heading in `docs/operations.md`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use graph_session_proxy::config::{NotificationSettings, Settings, SharedSettings};
use graph_session_proxy::sim::{Faults, SimConfig};
use saphyr::{LoadableYamlNode, Scalar, Yaml};
use serde_json::Value;

const PREFIX: &str = "graph_session_proxy_";

fn read(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A YAML node as JSON (the rule files use string keys, sequences and scalars only).
fn to_json(node: &Yaml) -> Value {
    match node {
        Yaml::Value(Scalar::Null) => Value::Null,
        Yaml::Value(Scalar::Boolean(b)) => Value::Bool(*b),
        Yaml::Value(Scalar::Integer(i)) => Value::from(*i),
        Yaml::Value(Scalar::FloatingPoint(f)) => Value::from(f.into_inner()),
        Yaml::Value(Scalar::String(s)) => Value::from(s.as_ref()),
        Yaml::Sequence(items) => items.iter().map(to_json).collect(),
        Yaml::Mapping(map) => Value::Object(
            map.iter()
                .map(|(k, v)| match k {
                    Yaml::Value(Scalar::String(key)) => (key.to_string(), to_json(v)),
                    other => panic!("a mapping key that is not a string: {other:?}"),
                })
                .collect(),
        ),
        other => panic!("unexpected YAML node {other:?}"),
    }
}

fn yaml(rel: &str) -> Value {
    let docs = Yaml::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(docs.len(), 1, "{rel}: want one document");
    to_json(&docs[0])
}

/// The alerting rules of both rule files: (where, rule).
fn rules() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (rel, groups) in [
        ("deploy/monitoring/prometheus-rules.yaml", "/groups"),
        ("deploy/monitoring/prometheusrule.yaml", "/spec/groups"),
    ] {
        let doc = yaml(rel);
        for group in doc.pointer(groups).and_then(Value::as_array).unwrap() {
            for rule in group["rules"].as_array().unwrap() {
                let name = rule["alert"].as_str().unwrap_or("?");
                out.push((format!("{rel}: {name}"), rule.clone()));
            }
        }
    }
    out
}

/// Every PromQL text of the rules and the dashboard: (where, expression). The dashboard's
/// are each panel target's `expr` and each query variable's query.
fn expressions() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = rules()
        .into_iter()
        .map(|(at, rule)| (at, rule["expr"].as_str().unwrap().to_string()))
        .collect();
    let rel = "deploy/monitoring/grafana-dashboard.json";
    let dashboard: Value = serde_json::from_str(&read(rel)).unwrap();
    let mut panels: Vec<&Value> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        panels.push(panel);
        // Panels inside a collapsed row.
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            let expr = target["expr"].as_str();
            let expr =
                expr.unwrap_or_else(|| panic!("{rel}: panel {title:?} has a target without expr"));
            out.push((format!("{rel}: panel {title:?}"), expr.to_string()));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let query = match &variable["query"] {
            Value::String(s) => s.clone(),
            Value::Object(q) => q["query"].as_str().unwrap_or_default().to_string(),
            _ => String::new(),
        };
        if variable["type"] == "query" {
            out.push((format!("{rel}: variable {}", variable["name"]), query));
        }
    }
    out
}

/// The metric names an expression uses: identifiers starting with [`PREFIX`], outside
/// quoted strings (label values) and comments.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                let mut escaped = false;
                for (_, d) in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' && c != '`' {
                        escaped = true;
                    } else if d == c {
                        break;
                    }
                }
            }
            '#' => {
                for (_, d) in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let mut end = at + c.len_utf8();
                while let Some(&(i, d)) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                        end = i + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let word = &expr[at..end];
                if word.starts_with(PREFIX) {
                    names.insert(word.to_string());
                }
            }
            _ => {}
        }
    }
    names
}

/// The sample names of a `/metrics` text: a histogram's are its `_bucket`, `_sum` and
/// `_count` series, which is what a query must name.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// The families `src/telemetry/mod.rs` declares in `names` (each with its help text).
fn declared() -> BTreeSet<String> {
    let source = read("src/telemetry/mod.rs");
    let names = source
        .split("pub mod names {")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .expect("src/telemetry/mod.rs has `pub mod names`");
    names
        .lines()
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_string)
        .collect()
}

/// Where each name is used, for the names `have` lacks.
fn missing(
    used: &[(String, String)],
    have: &BTreeSet<String>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (at, expr) in used {
        for name in metric_names(expr) {
            if !have.contains(&name) {
                out.entry(name).or_default().insert(at.clone());
            }
        }
    }
    out
}

fn with_notifications(s: &mut Settings, addr: SocketAddr) {
    s.notifications = Some(NotificationSettings {
        notification_url: format!("http://{addr}/notifications"),
        client_state: Some("monitoring-test-state-81c2".to_string().into()),
        ..NotificationSettings::default()
    });
}

/// Waits (real time, up to 5 s) until `/metrics` at `admin` has every one of `names`.
async fn scrape_until(h: &Harness, admin: SocketAddr, names: &[&str]) -> String {
    let mut text = String::new();
    for _ in 0..100 {
        text = metrics(h, admin).await;
        let have = exported(&text);
        if names.iter().all(|n| have.contains(*n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    text
}

/// `/metrics` of a proxy with change notifications after a miss, a hit, a 404, a 401, a
/// Graph 504 retried, and a purge; and of one whose shared tier (Redis) cannot be reached
/// and whose caller limits refuse a burst.
async fn scrapes() -> String {
    let h = Harness::with_addr(with_notifications, SimConfig::default()).await;
    assert_eq!(h.get(&h.seed_url()).await.status(), 200, "miss");
    assert_eq!(h.get(&h.seed_url()).await.status(), 200, "hit");
    let missing = h.url(
        "townhalls",
        TOWNHALL_EVENT,
        "6a0b1c2d-0000-0000-0000-000000000000",
    );
    assert_eq!(h.get(&missing).await.status(), 404);
    assert_eq!(h.http.get(h.seed_url()).send().await.unwrap().status(), 401);
    h.faults(Faults {
        graph_status: Some(504),
        graph_status_count: Some(1),
        ..Faults::default()
    });
    let retried = h.url("webinars", SEED_EVENT, "gen-retried");
    assert_eq!(h.get(&retried).await.status(), 200, "retried after a 504");
    let purge = format!("/cache/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}");
    assert_eq!(h.admin_delete(&purge).await.status(), 200);
    let first = scrape_until(
        &h,
        h.admin,
        &[
            "graph_session_proxy_subscriptions",
            "graph_session_proxy_subscription_calls_total",
            "graph_session_proxy_notifications_total",
        ],
    )
    .await;

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_redis = format!("redis://{}", closed.local_addr().unwrap());
    drop(closed);
    let limited = Harness::with(
        |s| {
            s.cache.shared = Some(SharedSettings {
                redis_url: Some(dead_redis.into()),
                connect_timeout: Duration::from_millis(200),
                timeout: Duration::from_millis(200),
                ..SharedSettings::default()
            });
            s.limits.requests_per_second = 1;
            s.limits.requests_burst = 2;
        },
        SimConfig::default(),
    )
    .await;
    let mut refused = 0;
    for i in 0..5 {
        let url = limited.url("webinars", SEED_EVENT, &format!("gen-limited-{i}"));
        match limited.get(&url).await.status().as_u16() {
            200 => {}
            429 => refused += 1,
            other => panic!("{url}: {other}"),
        }
    }
    assert!(refused > 0, "the caller limit refused nothing");
    let second = scrape_until(
        &limited,
        limited.admin,
        &[
            "graph_session_proxy_shared_up",
            "graph_session_proxy_rate_limited_total",
        ],
    )
    .await;
    assert!(
        second.contains("graph_session_proxy_shared_up 0"),
        "{second}"
    );
    format!("{first}\n{second}")
}

#[tokio::test]
async fn every_metric_the_rules_and_the_dashboard_use_is_exported() {
    let used = expressions();
    let names: BTreeSet<String> = used.iter().flat_map(|(_, e)| metric_names(e)).collect();
    // The tokenizer found the pack's metrics (a broken one would pass trivially).
    assert!(names.len() >= 15, "only {names:?}");
    assert_eq!(rules().len(), 16, "8 alerts in each rule file");

    let undeclared = missing(&used, &declared());
    // A histogram is declared by its family name; its series carry suffixes.
    let undeclared: BTreeMap<_, _> = undeclared
        .into_iter()
        .filter(|(name, _)| {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s));
            !family.is_some_and(|f| declared().contains(f))
        })
        .collect();
    assert!(
        undeclared.is_empty(),
        "not families of src/telemetry/mod.rs: {undeclared:#?}"
    );

    let text = scrapes().await;
    let absent = missing(&used, &exported(&text));
    assert!(
        absent.is_empty(),
        "used by the monitoring pack but not in /metrics: {absent:#?}\n\n{text}"
    );
}

#[test]
fn the_checker_sees_a_misspelt_name() {
    let used = vec![(
        "a panel".to_string(),
        r#"sum by (le) (rate(graph_session_proxy_request_duration_second_bucket{cache!="graph_session_proxy_not_a_metric"}[5m])) / graph_session_proxy_ready"#
            .to_string(),
    )];
    assert_eq!(
        metric_names(&used[0].1),
        BTreeSet::from([
            "graph_session_proxy_request_duration_second_bucket".to_string(),
            "graph_session_proxy_ready".to_string(),
        ]),
        "label values are not metric names"
    );
    let have = exported(
        "# TYPE graph_session_proxy_ready gauge\ngraph_session_proxy_ready 1\ngraph_session_proxy_request_duration_seconds_bucket{le=\"0.1\"} 3\n",
    );
    let absent = missing(&used, &have);
    assert_eq!(
        absent.keys().collect::<Vec<_>>(),
        ["graph_session_proxy_request_duration_second_bucket"]
    );
}

/// GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces
/// to `-`; a repeated anchor gets `-1`, `-2`...
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let text = line.trim_start_matches('#');
        if !text.starts_with(' ') {
            continue;
        }
        let slug: String = text
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

#[test]
fn every_runbook_link_is_a_heading_of_docs_operations() {
    let have = anchors(&read("docs/operations.md"));
    let mut broken = Vec::new();
    for (at, rule) in rules() {
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        let anchor = url.strip_prefix("docs/operations.md#");
        match anchor {
            Some(a) if have.contains(a) => {}
            _ => broken.push(format!("{at}: {url:?}")),
        }
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{at}: no {key}"
            );
        }
    }
    assert!(
        broken.is_empty(),
        "runbook_url not a heading of docs/operations.md: {broken:#?}\n(anchors: {have:?})"
    );
    assert_eq!(
        anchors("## Runbook\n### Token refresh failing\n# Two words: `a.b`\n### Token refresh failing\n"),
        BTreeSet::from([
            "runbook".to_string(),
            "token-refresh-failing".to_string(),
            "token-refresh-failing-1".to_string(),
            "two-words-ab".to_string(),
        ])
    );
}
