//! The client of the tier-2 round of the load benchmark (`benches/load/tier2.sh`): asks
//! for N distinct paths exactly once each over C keep-alive HTTP/1.1 connections and
//! reports throughput, latency percentiles and the `Cache-Status` of every answer.
//!
//! wrk repeats one path for a fixed time; a tier-2 hit happens only once per key and
//! instance, so this round needs "each of N keys once", which wrk cannot count. The
//! Python load generator can walk keys, but on this 2-CPU machine it saturates a core
//! well below the proxy's hit rate and would measure itself.
//!
//! `cargo bench --bench walk -- --port P --auth KEY --prefix PATH --keys N [--first F]
//! [--conns C] [--threads T]` requests `PATH{F}` .. `PATH{F+N-1}` (a shared counter
//! hands the next key to whichever connection is free) and prints one JSON object.
//! Without `--port` (a plain `cargo bench`) it prints a note and exits 0.
//!
//! Latency is from the request's write to the last byte of its body. The connections
//! are all open before the clock starts. Answers must carry `Content-Length` (the proxy
//! always sends one); anything else counts as an error.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

struct Args {
    port: Option<u16>,
    auth: String,
    prefix: String,
    keys: u64,
    first: u64,
    conns: usize,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        port: None,
        auth: String::new(),
        prefix: String::new(),
        keys: 0,
        first: 0,
        conns: 64,
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let number =
            |name: &str, v: String| v.parse::<u64>().map_err(|e| format!("{name} {v}: {e}"));
        match arg.as_str() {
            "--port" => args.port = Some(number("--port", value("--port")?)? as u16),
            "--auth" => args.auth = value("--auth")?,
            "--prefix" => args.prefix = value("--prefix")?,
            "--keys" => args.keys = number("--keys", value("--keys")?)?,
            "--first" => args.first = number("--first", value("--first")?)?,
            "--conns" => args.conns = number("--conns", value("--conns")?)? as usize,
            "--threads" => args.threads = number("--threads", value("--threads")?)? as usize,
            // cargo passes --bench; anything else unknown is ignored too.
            _ => {}
        }
    }
    if args.port.is_some() && (args.prefix.is_empty() || args.keys == 0 || args.conns == 0) {
        return Err("--prefix, --keys (> 0) and --conns (> 0) are required".into());
    }
    Ok(args)
}

/// What one connection saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    cache: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    body_bytes: u64,
}

/// `hit`, `tier2` (a hit with `detail=tier2`), `miss` (`fwd=miss`), `collapsed`, else the
/// raw second field; `none` without the header.
fn cache_kind(value: Option<&str>) -> String {
    let Some(v) = value else {
        return "none".into();
    };
    if v.contains("detail=tier2") {
        "tier2".into()
    } else if v.contains("collapsed") {
        "collapsed".into()
    } else if v.contains("fwd=miss") {
        "miss".into()
    } else if v.contains("; hit") {
        "hit".into()
    } else {
        v.split(';').nth(1).unwrap_or(v).trim().to_string()
    }
}

/// Reads one answer: (status, Cache-Status, body length).
async fn read_answer(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(u16, Option<String>, usize), String> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 16384];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "head not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let (mut length, mut cache) = (None, None);
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("cache-status") {
                cache = Some(value.trim().to_string());
            }
        }
    }
    let length = length.ok_or("no content-length")?;
    let total = head_end + length;
    while buf.len() < total {
        let mut chunk = [0u8; 16384];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed in body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..total);
    Ok((status, cache, length))
}

async fn connection(
    args: Arc<Args>,
    next: Arc<AtomicU64>,
    start: Arc<Barrier>,
) -> Result<Tally, String> {
    let port = args.port.unwrap_or_default();
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let auth = if args.auth.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {}\r\n", args.auth)
    };
    let mut tally = Tally::default();
    let mut buf = Vec::with_capacity(32 * 1024);
    start.wait().await;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= args.keys {
            return Ok(tally);
        }
        let request = format!(
            "GET {}{} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n",
            args.prefix,
            args.first + i
        );
        let t0 = Instant::now();
        let answer = match stream.write_all(request.as_bytes()).await {
            Ok(()) => read_answer(&mut stream, &mut buf).await,
            Err(e) => Err(format!("write: {e}")),
        };
        match answer {
            Ok((status, cache, len)) => {
                tally.latencies_us.push(t0.elapsed().as_micros() as u64);
                *tally.statuses.entry(status).or_default() += 1;
                *tally.cache.entry(cache_kind(cache.as_deref())).or_default() += 1;
                tally.body_bytes += len as u64;
            }
            Err(e) => {
                // This key is lost; carry on over a new connection.
                *tally.errors.entry(e).or_default() += 1;
                buf.clear();
                stream = TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map_err(|e| format!("reconnect: {e}"))?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
            }
        }
    }
}

/// Nearest rank, as loadgen.py's `pct`.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * sorted.len() as f64 + 0.5).round() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

async fn walk(args: Args) -> serde_json::Value {
    let args = Arc::new(args);
    let next = Arc::new(AtomicU64::new(0));
    // Every connection, plus this task to read the clock once all are open.
    let start = Arc::new(Barrier::new(args.conns + 1));
    let tasks: Vec<_> = (0..args.conns)
        .map(|_| tokio::spawn(connection(args.clone(), next.clone(), start.clone())))
        .collect();
    // A connection that fails to open never reaches the barrier: give up rather than hang.
    if tokio::time::timeout(Duration::from_secs(30), start.wait())
        .await
        .is_err()
    {
        eprintln!("walk: connections not open after 30 s");
        std::process::exit(1);
    }
    let t0 = Instant::now();
    let mut all = Tally::default();
    for task in tasks {
        match task.await {
            Ok(Ok(t)) => {
                all.latencies_us.extend(t.latencies_us);
                for (k, v) in t.statuses {
                    *all.statuses.entry(k).or_default() += v;
                }
                for (k, v) in t.cache {
                    *all.cache.entry(k).or_default() += v;
                }
                for (k, v) in t.errors {
                    *all.errors.entry(k).or_default() += v;
                }
                all.body_bytes += t.body_bytes;
            }
            Ok(Err(e)) => *all.errors.entry(e).or_default() += 1,
            Err(e) => *all.errors.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mut lat = all.latencies_us;
    lat.sort_unstable();
    let answered = lat.len() as u64;
    serde_json::json!({
        "requests": args.keys,
        "answered": answered,
        "connections": args.conns,
        "client_threads": args.threads,
        "seconds": seconds,
        "requests_per_s": answered as f64 / seconds,
        "p50_us": percentile(&lat, 50.0),
        "p99_us": percentile(&lat, 99.0),
        "p999_us": percentile(&lat, 99.9),
        "max_us": lat.last().copied().unwrap_or(0),
        "mean_us": if answered > 0 { lat.iter().sum::<u64>() as f64 / answered as f64 } else { 0.0 },
        "statuses": all.statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "cache_status": all.cache,
        "errors": all.errors,
        "body_bytes_total": all.body_bytes,
    })
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("walk: {e}");
            std::process::exit(2);
        }
    };
    if args.port.is_none() {
        println!(
            "walk: not a benchmark by itself; benches/load/tier2.sh runs it as \
             `--port N --prefix PATH --keys N`. Nothing to do."
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(walk(args));
    println!("{result}");
}
