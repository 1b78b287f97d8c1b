//! The status page of the admin listener: `GET /status` (HTML) and `GET /status.json`.
//!
//! One snapshot ([`snapshot`]) feeds both, so the page shows exactly what the JSON says.
//! The page is self-contained: no scripts at all, one inline style allowed by its hash in
//! a strict `Content-Security-Policy`, an inline SVG sparkline, and a `<meta refresh>`
//! every [`REFRESH_SECONDS`], so it reads (and refreshes) without JavaScript.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::core::http::json_response;
use crate::http::AppState;
use crate::telemetry::GRAPH_OUTCOMES;

/// How often the page reloads itself.
pub const REFRESH_SECONDS: u64 = 5;
/// Callers listed, busiest first.
const BUSIEST: usize = 10;
/// Points of the 15-minute sparkline (10 s each).
const SPARK_POINTS: u64 = 90;

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// What the status page shows, as `/status.json` sends it.
pub fn snapshot(state: &AppState) -> Value {
    let pulse = state.metrics.pulse();
    let recent = pulse.recent();
    let per_second = |n: u64| n as f64 / recent.span;
    let graph_total: u64 = recent.graph.iter().sum();
    let outcomes: serde_json::Map<String, Value> = GRAPH_OUTCOMES
        .iter()
        .zip(recent.graph)
        .map(|(name, n)| ((*name).to_string(), json!(n)))
        .collect();

    let token = state.tokens.state();
    let token_state = match token.expires_in {
        None => "none",
        Some(left) if left.is_zero() => "expired",
        Some(_) => "valid",
    };
    let now = state.cache.now();
    let wall = SystemTime::now();
    let gate = state.cache.gate().view(now);
    let (entries, bytes) = state.cache.usage();
    let shared = state.cache.shared().map(|shared| {
        json!({
            "up": shared.is_up(),
            "last_error": shared.last_error().map(|(at, op, why)| json!({
                "at": rfc3339(at), "operation": op, "message": why,
            })),
        })
    });
    let ready = state.ready.load(Ordering::SeqCst);
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": pulse.uptime().as_secs(),
        "ready": ready,
        "draining": state.draining.load(Ordering::SeqCst),
        "refresh_seconds": REFRESH_SECONDS,
        "requests": {
            "window_seconds": recent.seconds,
            "total": recent.requests,
            "per_second": per_second(recent.requests),
            "hits": recent.hits,
            "misses": recent.misses,
            "hit_ratio": ratio(recent.hits, recent.hits + recent.misses),
            "server_errors": recent.server_errors,
            "p50_seconds": recent.p50,
            "p99_seconds": recent.p99,
            "sparkline_step_seconds": crate::telemetry::PULSE_WINDOW / SPARK_POINTS,
            "sparkline_per_second": pulse.sparkline(SPARK_POINTS),
        },
        "graph": {
            "window_seconds": recent.seconds,
            "total": graph_total,
            "per_second": per_second(graph_total),
            "outcomes": outcomes,
        },
        "token": {
            "state": token_state,
            "age_seconds": token.age.map(|d| d.as_secs()),
            "expires_in_seconds": token.expires_in.map(|d| d.as_secs()),
            "expires_at": token.expires_in.map(|d| rfc3339(wall + d)),
            "last_error": token.last_error.map(|e| json!({
                "at": rfc3339(e.at), "message": e.message, "aadsts": e.aadsts,
            })),
        },
        "gate": {
            "state": gate.state,
            "closed_for_seconds": gate.closed_for.map(|left| left.as_secs_f64().ceil() as u64),
            "until": gate.closed_for.map(|left| rfc3339(wall + left)),
            "reason": gate.closed_for.map(|_| if gate.throttled {
                "Graph answered 429 (or 503 with Retry-After): waiting as it asked"
            } else {
                "Graph kept failing (graph.circuit_failures in a row): cooling down"
            }).or((gate.state == "probing").then_some(
                "one probe call is testing whether Graph answers again",
            )),
            "last_closure": gate.last_closure.map(|(ago, why)| json!({
                "at": rfc3339(wall - ago), "why": why,
            })),
        },
        "shared": shared,
        "cache": {
            "entries": entries,
            "bytes": bytes,
            "max_bytes": state.max_bytes,
        },
        "callers": pulse.busiest(BUSIEST).into_iter().map(|(name, n)| json!({
            "name": &*name, "requests": n, "per_second": per_second(n),
        })).collect::<Vec<_>>(),
    })
}

/// `GET /status.json`.
pub fn json(state: &AppState) -> Response<Full<Bytes>> {
    let mut r = json_response(StatusCode::OK, &snapshot(state));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;color:#1d2430}\
header{background:#1d2430;color:#fff;padding:12px 20px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}\
header h1{font-size:18px;margin:0}header span{opacity:.85}\
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px;padding:16px 20px}\
section{background:#fff;border-radius:6px;padding:12px 16px;box-shadow:0 1px 2px rgba(0,0,0,.12)}\
h2{font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:#5a6472;margin:0 0 8px}\
dl{display:grid;grid-template-columns:auto 1fr;gap:4px 12px;margin:0}dt{color:#5a6472}dd{margin:0;font-variant-numeric:tabular-nums}\
.ok{color:#16794c;font-weight:600}.warn{color:#a15c00;font-weight:600}.bad{color:#b3261e;font-weight:600}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:2px 6px 2px 0;font-variant-numeric:tabular-nums}th{color:#5a6472;font-weight:normal}\
svg{display:block;width:100%;height:48px;margin-top:8px}\
meter{width:100%}footer{padding:0 20px 16px;color:#5a6472}a{color:inherit}";

/// The style's hash, the only source the page's policy allows.
static STYLE_HASH: LazyLock<String> = LazyLock::new(|| {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(STYLE.as_bytes()))
});

/// The page's `Content-Security-Policy`: nothing but its own inline style.
pub fn content_security_policy() -> String {
    format!(
        "default-src 'none'; style-src 'sha256-{}'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        *STYLE_HASH
    )
}

/// Escapes text for HTML element content and quoted attributes.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Whole seconds as people read them: `59m 58s`.
fn seconds_text(v: &Value) -> String {
    v.as_u64().map_or_else(
        || "—".to_string(),
        |s| humantime::format_duration(Duration::from_secs(s)).to_string(),
    )
}

fn latency_text(v: &Value) -> String {
    match v.as_f64() {
        None => "—".to_string(),
        Some(s) if s < 0.001 => format!("{:.0} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
    }
}

fn bytes_text(n: u64) -> String {
    bytesize::ByteSize::b(n).to_string()
}

/// The sparkline of requests per second: an inline SVG polyline, scaled to its maximum.
fn sparkline(points: &[Value]) -> String {
    let values: Vec<f64> = points.iter().filter_map(Value::as_f64).collect();
    let max = values.iter().copied().fold(0.0, f64::max);
    let width = values.len().saturating_sub(1).max(1) as f64;
    let mut line = String::new();
    for (i, v) in values.iter().enumerate() {
        let y = if max > 0.0 {
            46.0 - v / max * 44.0
        } else {
            46.0
        };
        let _ = write!(line, "{:.1},{:.1} ", i as f64 / width * 300.0, y);
    }
    format!(
        "<svg id=\"sparkline\" viewBox=\"0 0 300 48\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"requests per second, last 15 minutes (peak {max:.1}/s)\">\
<polyline fill=\"none\" stroke=\"#2f6fdf\" stroke-width=\"1.5\" points=\"{}\"/></svg>",
        line.trim_end()
    )
}

/// `GET /status`: the snapshot as a page.
pub fn html(state: &AppState) -> Response<Full<Bytes>> {
    let s = snapshot(state);
    let mut page = String::with_capacity(8 * 1024);
    let text = |v: &Value| v.as_str().map(esc).unwrap_or_else(|| "—".to_string());
    let num = |v: &Value| {
        v.as_u64()
            .map_or_else(|| "—".to_string(), |n| n.to_string())
    };
    let rate = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "—".to_string(), |r| format!("{r:.1}/s"))
    };

    let ready = s["ready"].as_bool() == Some(true);
    let _ = write!(
        page,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<link rel=\"icon\" href=\"data:,\"><title>graph-session-proxy status</title><style>{STYLE}</style></head><body>\
<header><h1>graph-session-proxy</h1><span>version <b id=\"version\">{}</b></span>\
<span>up <b id=\"uptime\">{}</b></span><span id=\"ready\" class=\"{}\">{}</span></header><main>",
        text(&s["version"]),
        seconds_text(&s["uptime_seconds"]),
        if ready { "ok" } else { "bad" },
        if s["draining"].as_bool() == Some(true) {
            "draining"
        } else if ready {
            "ready"
        } else {
            "not ready"
        },
    );

    let r = &s["requests"];
    let hit_ratio = r["hit_ratio"]
        .as_f64()
        .map_or_else(|| "—".to_string(), |h| format!("{:.1}%", h * 100.0));
    let _ = write!(
        page,
        "<section id=\"requests\"><h2>Requests, last {}s</h2><dl>\
<dt>Requests</dt><dd id=\"requests-per-second\">{}</dd>\
<dt>Hit ratio</dt><dd id=\"hit-ratio\">{hit_ratio}</dd>\
<dt>p50</dt><dd id=\"p50\">{}</dd><dt>p99</dt><dd id=\"p99\">{}</dd>\
<dt>5xx answers</dt><dd id=\"server-errors\">{}</dd></dl>{}\
<small>requests/s, last 15 minutes</small></section>",
        num(&r["window_seconds"]),
        rate(&r["per_second"]),
        latency_text(&r["p50_seconds"]),
        latency_text(&r["p99_seconds"]),
        num(&r["server_errors"]),
        sparkline(
            r["sparkline_per_second"]
                .as_array()
                .map_or(&[], Vec::as_slice)
        ),
    );

    let g = &s["graph"];
    let _ = write!(
        page,
        "<section id=\"graph\"><h2>Graph calls, last {}s</h2><dl><dt>Calls</dt><dd id=\"graph-per-second\">{}</dd></dl><table><tr><th>outcome</th><th>calls</th></tr>",
        num(&g["window_seconds"]),
        rate(&g["per_second"]),
    );
    if let Some(outcomes) = g["outcomes"].as_object() {
        for (name, n) in outcomes {
            let _ = write!(page, "<tr><td>{}</td><td>{}</td></tr>", esc(name), num(n));
        }
    }
    page.push_str("</table></section>");

    let t = &s["token"];
    let token_class = match t["state"].as_str() {
        Some("valid") => "ok",
        _ => "bad",
    };
    let _ = write!(
        page,
        "<section id=\"token\"><h2>Graph token</h2><dl>\
<dt>State</dt><dd id=\"token-state\" class=\"{token_class}\">{}</dd>\
<dt>Age</dt><dd>{}</dd><dt>Expires in</dt><dd id=\"token-expires-in\">{}</dd><dt>Expires at</dt><dd>{}</dd>\
<dt>Last error</dt><dd id=\"token-error\">{}</dd></dl></section>",
        text(&t["state"]),
        seconds_text(&t["age_seconds"]),
        seconds_text(&t["expires_in_seconds"]),
        text(&t["expires_at"]),
        match t["last_error"].as_object() {
            None => "none".to_string(),
            Some(e) => format!(
                "<span class=\"bad\">{}</span> at {}: {}",
                e.get("aadsts").map_or_else(|| "—".to_string(), text),
                e.get("at").map_or_else(|| "—".to_string(), text),
                e.get("message").map_or_else(|| "—".to_string(), text),
            ),
        },
    );

    let gate = &s["gate"];
    let gate_class = match gate["state"].as_str() {
        Some("open") => "ok",
        Some("probing") => "warn",
        _ => "bad",
    };
    let _ = write!(
        page,
        "<section id=\"gate\"><h2>Graph gate</h2><dl>\
<dt>State</dt><dd id=\"gate-state\" class=\"{gate_class}\">{}</dd>\
<dt>Closed until</dt><dd id=\"gate-until\">{}</dd><dt>Why</dt><dd>{}</dd><dt>Last closed</dt><dd id=\"gate-last\">{}</dd></dl></section>",
        text(&gate["state"]),
        match gate["until"].as_str() {
            Some(until) => format!(
                "{} ({} left)",
                esc(until),
                seconds_text(&gate["closed_for_seconds"])
            ),
            None => "—".to_string(),
        },
        text(&gate["reason"]),
        match gate["last_closure"].as_object() {
            None => "never".to_string(),
            Some(c) => format!(
                "{}: {}",
                c.get("at").map_or_else(|| "—".to_string(), text),
                c.get("why").map_or_else(|| "—".to_string(), text),
            ),
        },
    );

    let shared = &s["shared"];
    let _ = write!(
        page,
        "<section id=\"shared\"><h2>Shared tier (Redis)</h2><dl><dt>State</dt><dd id=\"shared-state\" class=\"{}\">{}</dd><dt>Last error</dt><dd>{}</dd></dl></section>",
        match shared["up"].as_bool() {
            Some(true) => "ok",
            Some(false) => "bad",
            None => "",
        },
        match shared["up"].as_bool() {
            Some(true) => "up",
            Some(false) => "down",
            None => "not configured",
        },
        match shared["last_error"].as_object() {
            None => "none".to_string(),
            Some(e) => format!(
                "{} at {}: {}",
                e.get("operation").map_or_else(|| "—".to_string(), text),
                e.get("at").map_or_else(|| "—".to_string(), text),
                e.get("message").map_or_else(|| "—".to_string(), text),
            ),
        },
    );

    let c = &s["cache"];
    let (bytes, max) = (
        c["bytes"].as_u64().unwrap_or(0),
        c["max_bytes"].as_u64().unwrap_or(0),
    );
    let _ = write!(
        page,
        "<section id=\"cache\"><h2>Cache</h2><dl><dt>Entries</dt><dd id=\"cache-entries\">{}</dd>\
<dt>Bytes</dt><dd id=\"cache-bytes\">{} of {}</dd></dl><meter min=\"0\" max=\"{max}\" value=\"{bytes}\">{}</meter></section>",
        num(&c["entries"]),
        bytes_text(bytes),
        bytes_text(max),
        bytes_text(bytes),
    );

    page.push_str(
        "<section id=\"callers\"><h2>Busiest callers, last minute</h2><table><tr><th>caller</th><th>requests</th><th>rate</th></tr>",
    );
    let callers = s["callers"].as_array().map_or(&[][..], Vec::as_slice);
    if callers.is_empty() {
        page.push_str("<tr><td colspan=\"3\">no requests</td></tr>");
    }
    for caller in callers {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            text(&caller["name"]),
            num(&caller["requests"]),
            rate(&caller["per_second"]),
        );
    }
    let _ = write!(
        page,
        "</table></section></main><footer>Refreshes every {REFRESH_SECONDS} s. The same numbers: \
<a href=\"status.json\">status.json</a>; all counters: <a href=\"metrics\">metrics</a>.</footer></body></html>"
    );

    let mut response = Response::new(Full::new(Bytes::from(page)));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(csp) = HeaderValue::from_str(&content_security_policy()) {
        headers.insert(http::header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn the_policy_allows_exactly_the_page_style() {
        let csp = content_security_policy();
        assert!(csp.starts_with("default-src 'none'; style-src 'sha256-"));
        let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(STYLE));
        assert!(csp.contains(&hash));
        assert!(!csp.contains("unsafe"));
    }

    #[test]
    fn the_sparkline_scales_to_its_peak() {
        let svg = sparkline(&[json!(0.0), json!(5.0), json!(10.0)]);
        assert!(
            svg.contains("points=\"0.0,46.0 150.0,24.0 300.0,2.0\""),
            "{svg}"
        );
        assert!(sparkline(&[]).contains("points=\"\""));
    }
}
