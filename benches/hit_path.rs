//! The hit path, in process (no sockets): path parsing and id validation, and a whole
//! request answered from the cache through the handler, with and without a matching ETag.
//! `cargo bench` runs them; CI only compiles them.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use graph_session_proxy::config::{Purpose, Settings};
use graph_session_proxy::route;
use graph_session_proxy::sim::{SimConfig, Simulator, SEED_EVENT, SEED_SESSION};
use graph_session_proxy::Clock;
use graph_session_proxy::{handle, Proxy};
use http::{Method, Request};
use http_body_util::Empty;

const KEY: &str = "bench-key";

fn routing(c: &mut Criterion) {
    let path = format!("/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}");
    c.bench_function("route seed path", |b| {
        b.iter(|| route(&Method::GET, black_box(&path), None))
    });
    let encoded = "/sessions/townhalls/f8ce2a5f-0e6a-4186-aa90-1f64bc023566%405466a424-aadf-425c-9b24-034ca28d4bdd/MSpkYzE3%3D%2B";
    c.bench_function("route encoded path", |b| {
        b.iter(|| route(&Method::GET, black_box(encoded), None))
    });
}

fn hit_path(c: &mut Criterion) {
    hit_path_with(c, "handler", "");
    // The same hits with per-caller limits high enough never to refuse: the cost of the
    // limit phase itself (issue #14: at most a few percent).
    hit_path_with(
        c,
        "handler with limits",
        "[limits]\nrequests_per_second = 10000000\ngraph_per_minute = 600000\n",
    );
}

fn hit_path_with(c: &mut Criterion, name: &str, limits: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (proxy, uri) = rt.block_on(async {
        let clock = Clock::new();
        let sim_addr = Simulator::new(SimConfig::default(), clock.clone())
            .spawn()
            .await
            .expect("simulator");
        let sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(KEY))
        };
        let mut settings = Settings::from_toml(
            &format!(
                "{limits}[auth]\ntenant_id = \"5466a424-aadf-425c-9b24-034ca28d4bdd\"\nclient_id = \"00000000-0000-0000-0000-00000000c11e\"\nclient_secret = \"sim-client-secret\"\n[cache]\nttl = \"1h\"\n[callers]\nmode = \"api_key\"\n[[callers.api_keys]]\nname = \"bench\"\nsha256 = \"{sha}\"\n"
            ),
            Purpose::Embedded,
        )
        .expect("settings");
        settings.graph.base_url = Some(format!("http://{sim_addr}"));
        settings.auth.token_url = Some(format!("http://{sim_addr}/{{tenant}}/oauth2/v2.0/token"));
        let proxy = Proxy::build(&settings, clock).expect("proxy");
        let uri = format!("/sessions/webinars/{SEED_EVENT}/{SEED_SESSION}");
        let warm = handle(&proxy.state, request(&uri, None)).await;
        assert_eq!(warm.status(), 200);
        (proxy, uri)
    });
    let etag = rt
        .block_on(handle(&proxy.state, request(&uri, None)))
        .headers()["etag"]
        .to_str()
        .expect("etag")
        .to_string();

    let mut group = c.benchmark_group(name);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("cache hit 200", |b| {
        b.to_async(&rt).iter(|| async {
            let r = handle(&proxy.state, request(&uri, None)).await;
            assert_eq!(r.status(), 200);
            r
        })
    });
    group.bench_function("cache hit 304", |b| {
        b.to_async(&rt).iter(|| async {
            let r = handle(&proxy.state, request(&uri, Some(&etag))).await;
            assert_eq!(r.status(), 304);
            r
        })
    });
    group.finish();
}

fn request(uri: &str, etag: Option<&str>) -> Request<Empty<Bytes>> {
    // HTTP/1.1 requires Host (RFC 9112 3.2): the proxy answers 400 without one.
    let mut builder = Request::get(uri)
        .header("host", "graph-session-proxy.internal")
        .header("authorization", format!("Bearer {KEY}"));
    if let Some(etag) = etag {
        builder = builder.header("if-none-match", etag);
    }
    builder.body(Empty::new()).expect("request")
}

criterion_group!(benches, routing, hit_path);
criterion_main!(benches);
