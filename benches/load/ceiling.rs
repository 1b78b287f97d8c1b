//! The "ceiling" of the load comparison in `benches/load/compare.sh`: a minimal hyper
//! server that answers every GET with the same bytes, no cache, no authentication, no
//! logging. Whatever the proxy does on top of this costs throughput; this measures how
//! much is left for it on the same machine.
//!
//! `cargo bench --bench ceiling -- --port N --body FILE` serves on `127.0.0.1:N`.
//! Without `--port` (a plain `cargo bench`) it prints a note and exits 0; CI's
//! `cargo bench --no-run` only compiles it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;

struct Args {
    port: Option<u16>,
    body: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        port: None,
        body: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--port" => {
                let v = it.next().ok_or("--port needs a value")?;
                args.port = Some(v.parse().map_err(|e| format!("--port {v}: {e}"))?);
            }
            "--body" => args.body = Some(it.next().ok_or("--body needs a value")?),
            // cargo passes --bench; anything else unknown is ignored too.
            _ => {}
        }
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ceiling: {e}");
            std::process::exit(2);
        }
    };
    let Some(port) = args.port else {
        println!(
            "ceiling: not a benchmark by itself; benches/load/compare.sh runs it as \
             `--port N --body FILE`. Nothing to do."
        );
        return;
    };
    let body = match &args.body {
        Some(path) => match std::fs::read(path) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                eprintln!("ceiling: cannot read {path}: {e}");
                std::process::exit(2);
            }
        },
        None => Bytes::from_static(b"{}"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(serve(SocketAddr::from(([127, 0, 0, 1], port)), body));
}

async fn serve(addr: SocketAddr, body: Bytes) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ceiling: cannot listen on {addr}: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "ceiling: listening on http://{addr} ({} body bytes)",
        body.len()
    );
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ceiling: accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(answer(req.method(), body)) }
            });
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(method: &Method, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = if method == Method::GET || method == Method::HEAD {
        Response::new(Full::new(body))
    } else {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        r
    };
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
