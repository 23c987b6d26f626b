//! Weft's benchmark harness: the same client against the same backend, directly and through a `weft proxy`
//! process, in one run, so the figures are ratios measured under identical conditions.
//!
//! Measured per path: requests/s at saturation (closed loop, N keep-alive connections) and latency at a
//! fixed request rate (open loop: each request's latency counts from when it was *scheduled*, so a
//! stalled server cannot hide its stall; no coordinated omission). For the proxy: CPU time per request
//! and peak RSS, read from /proc.
//!
//! Usage: see docs/benchmarks.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Parser, Debug)]
#[command(about = "Client -> backend directly vs client -> weft -> backend, in one run")]
struct Args {
    /// The weft binary (build it with `cargo build --release -p weft`).
    #[arg(long, env = "WEFT_BIN")]
    weft: Option<PathBuf>,
    /// Length of each measured phase, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Keep-alive connections for the saturation phase.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Requests per second for the fixed-rate latency phase.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Print one JSON object with every figure instead of the table.
    #[arg(long)]
    json: bool,
    /// Route through the resilience policies: a retry policy (5xx, connect-failure, 3 retries, 2 s per
    /// try), outlier detection and least-request balancing (`policies: on` in the output).
    #[arg(long)]
    policies: bool,
    /// Instead of the usual table: CPU per request through two proxies in the same run, one without an
    /// authorization policy and one enforcing the seed's AuthorizationPolicy shape (two sources, GET and
    /// POST on `/orders/*`; the sources are the client's address, as this harness has no mTLS), phases
    /// alternated.
    #[arg(long)]
    compare_authz: bool,
    /// Instead of the usual table: CPU per request through a route table of 3 services and one of N
    /// (Istio's per-port table, each service with its eight domains), the requests' service last.
    #[arg(long)]
    compare_services: Option<usize>,
    /// Instead of the usual table: CPU per request through a proxy without an access log and one
    /// writing Istio's text format to a file, phases alternated.
    #[arg(long)]
    compare_access_log: bool,
    /// Instead of the usual table: CPU per request through a proxy without tracing and one sampling
    /// 1 % of requests into spans exported to an OTLP receiver in this process, phases alternated.
    #[arg(long)]
    compare_tracing: bool,
    /// Instead of the usual table: CPU per request through the weft binary at PATH (an earlier build)
    /// and through this one, same configuration, phases alternated: what a change bought.
    #[arg(long, value_name = "PATH")]
    compare_binary: Option<PathBuf>,
    /// Alternated rounds of each `--compare-*` mode (medians and spread over them).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Instead of the usual table: a Weft sidecar pair with mutual TLS between them against an HAProxy
    /// pair doing the same job (haproxy is installed with apt-get when missing), ratios to HAProxy.
    #[arg(long)]
    pair: bool,
    /// Worker threads of each proxy in `--pair` (weft `--concurrency`, HAProxy `nbthread`).
    #[arg(long, default_value_t = 2)]
    proxy_threads: u16,
    /// In `--pair`: HTTP/1 between the Weft sidecars travels as HTTP/2 (`http2_upgrade`, Istio's
    /// `h2UpgradePolicy: UPGRADE`).
    #[arg(long)]
    http2_upgrade: bool,
    /// In `--pair`: the client speaks HTTP/2 with prior knowledge (h2c), and both pairs keep HTTP/2 on
    /// every hop (HAProxy: `proto h2` / `alpn h2`; the backend serves HTTP/1.1 and h2c).
    #[arg(long)]
    h2c: bool,
    /// In `--pair`: gRPC unary calls (h2c, `application/grpc`, a 13-byte message each way, answered
    /// with `grpc-status: 0` in trailers; a call counts only when that status arrives).
    #[arg(long)]
    grpc: bool,
    /// Instead of the usual table: the memory one idle keep-alive client connection costs a proxy
    /// (VmRSS before and after N connections that each made one request and stay open), alone, so
    /// that memory kept from earlier phases does not count.
    #[arg(long)]
    idle_memory: Option<usize>,
    /// Instead of the usual table: a bystander's latency and errors, and the proxy's memory, while
    /// hostile clients attack (2,000 slowloris, 1,100 slow POST, 2,000 silent connections, 4 HTTP/2
    /// rapid-reset flooders).
    #[arg(long)]
    attack: bool,
    /// Instead of the usual table: a proxy's memory with a 10-service mesh, a 1,010-service mesh, and
    /// the 1,010 with a Sidecar scoping the proxy to its namespace's 10 (ADS from `weft control`).
    #[arg(long)]
    scoped_memory: bool,
    /// Instead of the usual table: for each mesh size (services, comma-separated), weft control's load
    /// time and memory, a whole-mesh and a Sidecar-scoped proxy's readiness and memory, and how long a
    /// VirtualService edit and an endpoint change take to be applied (`weft control` and `weft proxy`
    /// processes, ADS).
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    mesh_scale: Vec<usize>,
}

/// The path every benchmark request asks for (the seed's policy allows `/orders/*`).
const REQUEST_PATH: &str = "/orders/1";

/// The seed's AuthorizationPolicy with its `from` on addresses instead of principals.
const SEED_SHAPED_POLICY: &str = "    authorization_policies:
      - name: order-service-policy
        spec:
          rules:
            - from:
                - source: { ipBlocks: [\"127.0.0.2/32\"] }
                - source: { ipBlocks: [\"127.0.0.1/32\"] }
              to:
                - operation: { methods: [GET, POST], paths: [\"/orders/*\"] }
";

#[derive(Debug, Default, Clone)]
struct Figures {
    rps: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    errors: u64,
    max_send_lag_us: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let weft = args.weft.clone().unwrap_or_else(default_weft_path);
    if !weft.exists() {
        bail!(
            "{} not found; build it first: cargo build --release -p weft",
            weft.display()
        );
    }

    // The backend gets its own single-threaded runtime, the client another; the proxy is a process.
    let backend_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let backend = backend_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let backend_addr = backend.local_addr()?;
    std::thread::spawn(move || backend_rt.block_on(serve_backend(backend)));

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.pair {
        return pair::run(&args, &weft, backend_addr, &client_rt);
    }
    if !args.mesh_scale.is_empty() {
        return scale::run(&weft, &args.mesh_scale, &client_rt);
    }
    if args.scoped_memory {
        return scoping::run(&weft, &client_rt);
    }
    if args.attack {
        return client_rt.block_on(attack::run(&weft, backend_addr, args.seconds));
    }
    if let Some(connections) = args.idle_memory {
        return client_rt.block_on(idle_memory(&weft, backend_addr, connections));
    }
    if args.compare_authz {
        return compare_cpu(
            &args,
            &client_rt,
            [
                (
                    "no policy",
                    Proxy::start(&weft, |l| plain_yaml(l, backend_addr, ""))?,
                ),
                (
                    "seed policy",
                    Proxy::start(&weft, |l| plain_yaml(l, backend_addr, SEED_SHAPED_POLICY))?,
                ),
            ],
        );
    }
    if args.compare_access_log {
        let file = std::env::temp_dir().join(format!("weft-bench-access-{}.log", std::process::id()));
        let logged = format!("access_log: {{ path: \"{}\" }}\n", file.display());
        let result = compare_cpu(
            &args,
            &client_rt,
            [
                (
                    "no access log",
                    Proxy::start(&weft, |l| plain_yaml(l, backend_addr, ""))?,
                ),
                (
                    "access log to a file",
                    Proxy::start(&weft, |l| logged.clone() + &plain_yaml(l, backend_addr, ""))?,
                ),
            ],
        );
        let lines = std::fs::read_to_string(&file)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        println!("access log lines written: {lines}");
        let _ = std::fs::remove_file(&file);
        return result;
    }
    if args.compare_tracing {
        let receiver_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let receiver = receiver_rt.block_on(weft_test_support::otlp::OtlpReceiver::start());
        std::thread::spawn(move || receiver_rt.block_on(std::future::pending::<()>()));
        let traced = format!(
            "tracing: {{ otlp_endpoint: \"{}\", sampling_percent: 1 }}\n",
            receiver.endpoint()
        );
        let result = compare_cpu(
            &args,
            &client_rt,
            [
                (
                    "no tracing",
                    Proxy::start(&weft, |l| plain_yaml(l, backend_addr, ""))?,
                ),
                (
                    "tracing at 1 %",
                    Proxy::start(&weft, |l| traced.clone() + &plain_yaml(l, backend_addr, ""))?,
                ),
            ],
        );
        println!("spans received: {}", receiver.spans().len());
        return result;
    }
    if let Some(earlier) = &args.compare_binary {
        return compare_cpu(
            &args,
            &client_rt,
            [
                (
                    "earlier build",
                    Proxy::start(earlier, |l| plain_yaml(l, backend_addr, ""))?,
                ),
                (
                    "this build",
                    Proxy::start(&weft, |l| plain_yaml(l, backend_addr, ""))?,
                ),
            ],
        );
    }
    if let Some(services) = args.compare_services {
        return compare_cpu(
            &args,
            &client_rt,
            [
                (
                    "3 services",
                    Proxy::start(&weft, |l| services_yaml(l, backend_addr, 3))?,
                ),
                (
                    &format!("{services} services"),
                    Proxy::start(&weft, |l| services_yaml(l, backend_addr, services))?,
                ),
            ],
        );
    }
    let policies = args.policies;
    let mut proxy = Proxy::start(&weft, |l| {
        if policies {
            policies_yaml(l, backend_addr)
        } else {
            plain_yaml(l, backend_addr, "")
        }
    })?;
    client_rt.block_on(proxy.wait_ready())?;

    let phase = Duration::from_secs(args.seconds);
    let direct_sat = client_rt.block_on(saturate(backend_addr, args.connections, phase, Wire::Http1))?;
    let cpu_before = proxy.cpu_seconds()?;
    let proxied_sat = client_rt.block_on(saturate(proxy.listener, args.connections, phase, Wire::Http1))?;
    let cpu_saturation = proxy.cpu_seconds()? - cpu_before;
    let direct_lat = client_rt.block_on(fixed_rate(backend_addr, args.rate, phase, Wire::Http1))?;
    let cpu_before = proxy.cpu_seconds()?;
    let proxied_lat = client_rt.block_on(fixed_rate(proxy.listener, args.rate, phase, Wire::Http1))?;
    let cpu_fixed = proxy.cpu_seconds()? - cpu_before;
    let peak_rss_mib = proxy.peak_rss_kib()? as f64 / 1024.0;

    let proxied_requests = proxied_sat.rps * phase.as_secs_f64();
    let cpu_us_per_request = cpu_saturation * 1e6 / proxied_requests.max(1.0);
    let cpu_cores_at_rate = cpu_fixed / phase.as_secs_f64();

    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "direct": { "rps": direct_sat.rps, "p50_us": direct_lat.p50_us, "p99_us": direct_lat.p99_us },
                "weft": { "rps": proxied_sat.rps, "p50_us": proxied_lat.p50_us, "p99_us": proxied_lat.p99_us },
                "ratio": {
                    "rps": proxied_sat.rps / direct_sat.rps,
                    "p50": proxied_lat.p50_us as f64 / direct_lat.p50_us.max(1) as f64,
                    "p99": proxied_lat.p99_us as f64 / direct_lat.p99_us.max(1) as f64,
                },
                "proxy": { "peak_rss_mib": peak_rss_mib, "cpu_us_per_request": cpu_us_per_request, "cpu_cores_at_rate": cpu_cores_at_rate },
                "errors": direct_sat.errors + proxied_sat.errors + direct_lat.errors + proxied_lat.errors,
                "max_send_lag_us": direct_lat.max_send_lag_us.max(proxied_lat.max_send_lag_us),
                "settings": { "seconds": args.seconds, "connections": args.connections, "rate": args.rate, "policies": args.policies },
            })
        );
    } else {
        println!(
            "HTTP/1.1 GET, 13-byte responses; {} s per phase, {} connections, {} req/s fixed rate; policies: {}",
            args.seconds,
            args.connections,
            args.rate,
            if args.policies { "on" } else { "off" }
        );
        println!("{:<28}{:>14}{:>14}{:>10}", "", "direct", "via weft", "ratio");
        println!(
            "{:<28}{:>14.0}{:>14.0}{:>10.2}",
            "requests/s (saturation)",
            direct_sat.rps,
            proxied_sat.rps,
            proxied_sat.rps / direct_sat.rps
        );
        for (name, d, w) in [
            ("p50 latency at rate (us)", direct_lat.p50_us, proxied_lat.p50_us),
            ("p99 latency at rate (us)", direct_lat.p99_us, proxied_lat.p99_us),
        ] {
            println!(
                "{:<28}{:>14}{:>14}{:>10.2}",
                name,
                d,
                w,
                w as f64 / d.max(1) as f64
            );
        }
        println!(
            "proxy peak RSS: {peak_rss_mib:.1} MiB; CPU: {cpu_us_per_request:.1} us per request at saturation, {:.2} cores at {} req/s",
            cpu_cores_at_rate, args.rate
        );
        let errors = direct_sat.errors + proxied_sat.errors + direct_lat.errors + proxied_lat.errors;
        println!(
            "errors: {errors}; generator max send lag: direct {} us, via weft {} us",
            direct_lat.max_send_lag_us, proxied_lat.max_send_lag_us
        );
    }
    proxy.stop();
    Ok(())
}

/// Two proxies saturated in alternation (three phases each); the CPU per request of each is the median
/// of its phases, and the second is reported as a ratio to the first.
fn compare_cpu(
    args: &Args,
    client_rt: &tokio::runtime::Runtime,
    proxies: [(&str, Proxy); 2],
) -> anyhow::Result<()> {
    let [(base_name, mut base), (other_name, mut other)] = proxies;
    client_rt.block_on(base.wait_ready())?;
    client_rt.block_on(other.wait_ready())?;
    let phase = Duration::from_secs(args.seconds);
    let mut samples: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut errors = 0;
    for _ in 0..args.rounds.max(1) {
        for (i, proxy) in [&base, &other].into_iter().enumerate() {
            let before = proxy.cpu_seconds()?;
            let figures =
                client_rt.block_on(saturate(proxy.listener, args.connections, phase, Wire::Http1))?;
            let cpu = proxy.cpu_seconds()? - before;
            errors += figures.errors;
            samples[i].push(cpu * 1e6 / (figures.rps * phase.as_secs_f64()).max(1.0));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |v: &[f64]| format!("{:.1}-{:.1}", v[0], v[v.len() - 1]);
    let (a, b) = (median(&mut samples[0]), median(&mut samples[1]));
    println!(
        "CPU per request at saturation ({} connections, {} x {} s each, alternated; median, spread): {base_name} {a:.1} us ({}), {other_name} {b:.1} us ({}), ratio {:.3}; errors: {errors}",
        args.connections,
        args.rounds.max(1),
        args.seconds,
        spread(&samples[0]),
        spread(&samples[1]),
        b / a
    );
    base.stop();
    other.stop();
    Ok(())
}

/// One explicit listener to the backend; `listener_extra`: more fields of the listener (indented YAML),
/// such as its policies.
fn plain_yaml(listener: SocketAddr, backend: SocketAddr, listener_extra: &str) -> String {
    format!(
        "listeners:\n  - name: bench\n    address: {listener}\n    cluster: backend\n    protocol: http\n{listener_extra}\
         clusters: [{{ name: backend, endpoints: [{backend}] }}]\n"
    )
}

/// The listener routes through the resilience layer: retries, outlier detection, least request.
fn policies_yaml(listener: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "listeners: [{{ name: bench, address: {listener}, route: bench, protocol: http }}]\n\
         clusters:\n  - name: backend\n    endpoints: [{backend}]\n    lb_policy: LEAST_REQUEST\n    outlier_detection: {{}}\n\
         routes:\n  - name: bench\n    virtual_hosts:\n      - name: bench\n        routes:\n\
         \x20         - match: {{ prefix: / }}\n\
         \x20           cluster: backend\n\
         \x20           retry: {{ retry_on: \"5xx,connect-failure\", num_retries: 3, per_try_timeout: 2s }}\n"
    )
}

/// A route table shaped as Istio emits one per port: `services` virtual hosts, each with the domains
/// Istio gives a service (short name, namespaced, FQDN, cluster IP, each with and without the port),
/// the requests' own (`backend`) last.
fn services_yaml(listener: SocketAddr, backend: SocketAddr, services: usize) -> String {
    let mut yaml = format!(
        "listeners: [{{ name: bench, address: {listener}, route: \"8080\", protocol: http }}]\n\
         clusters: [{{ name: backend, endpoints: [{backend}] }}]\n\
         routes:\n  - name: \"8080\"\n    virtual_hosts:\n"
    );
    for i in 0..services.saturating_sub(1) {
        let name = format!("svc-{i}");
        let ip = format!("10.96.{}.{}", i / 256, i % 256);
        yaml.push_str(&format!(
            "      - name: {name}\n        domains: [{name}, \"{name}:8080\", {name}.default, \"{name}.default:8080\", {name}.default.svc.cluster.local, \"{name}.default.svc.cluster.local:8080\", {ip}, \"{ip}:8080\"]\n        routes: [{{ match: {{ prefix: / }}, cluster: backend }}]\n"
        ));
    }
    yaml.push_str(
        "      - name: backend\n        domains: [backend, \"backend:8080\", backend.default.svc.cluster.local]\n        routes: [{ match: { prefix: / }, cluster: backend }]\n",
    );
    yaml
}

fn default_weft_path() -> PathBuf {
    // Beside this binary: target/release/weft-bench -> target/release/weft.
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("weft")))
        .unwrap_or_else(|| PathBuf::from("target/release/weft"))
}

/// VmRSS of a proxy before and after `connections` idle keep-alive client connections, each of which made
/// one request (so its HTTP state is what a kept-alive connection holds).
async fn idle_memory(weft: &std::path::Path, backend: SocketAddr, connections: usize) -> anyhow::Result<()> {
    let proxy = Proxy::start_with(weft, 2, |l| plain_yaml(l, backend, ""))?;
    proxy.wait_ready().await?;
    let mut warm = Vec::new();
    for _ in 0..10 {
        warm.push(pair::one_request_kept_open(proxy.listener).await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = status_kib(proxy.child.id(), "VmRSS:")?;
    let mut idle = Vec::with_capacity(connections);
    for _ in 0..connections {
        idle.push(pair::one_request_kept_open(proxy.listener).await?);
    }
    tokio::time::sleep(pair::IDLE_SETTLE).await;
    let after = status_kib(proxy.child.id(), "VmRSS:")?;
    println!(
        "one proxy, {connections} idle HTTP/1.1 keep-alive client connections: VmRSS {before} KiB before, {after} KiB after, {:.1} KiB per connection",
        after.saturating_sub(before) as f64 / connections.max(1) as f64
    );
    Ok(())
}

type BackendBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// 13 bytes; for gRPC, the call's message back, then `grpc-status: 0` in trailers.
async fn backend_response(req: hyper::Request<Incoming>, grpc: bool) -> hyper::Response<BackendBody> {
    if !grpc {
        // `/sink` reads the whole request body before it answers (what the slow-POST attack needs).
        if req.uri().path() == "/sink" {
            let _ = req.into_body().collect().await;
        }
        let body = Full::new(Bytes::from_static(b"hello, world\n")).map_err(|never| match never {});
        return hyper::Response::new(body.boxed());
    }
    let _ = req.into_body().collect().await;
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
    let body = Full::new(grpc_message())
        .map_err(|never| match never {})
        .with_trailers(async move { Some(Ok(trailers)) });
    let mut response = hyper::Response::new(body.boxed());
    response.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The backend: the smallest useful HTTP/1.1, h2c and gRPC server, answering every request with 13 bytes.
async fn serve_backend(listener: tokio::net::TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                let grpc = req
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                Ok::<_, std::convert::Infallible>(backend_response(req, grpc).await)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// What the load generator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Http1,
    /// HTTP/2 with prior knowledge.
    H2c,
    /// gRPC unary over h2c.
    Grpc,
}

impl Wire {
    fn of(args: &Args) -> Self {
        match (args.grpc, args.h2c) {
            (true, _) => Wire::Grpc,
            (false, true) => Wire::H2c,
            (false, false) => Wire::Http1,
        }
    }

    fn h2(self) -> bool {
        self != Wire::Http1
    }

    /// The request, addressed to `authority`. `pooled`: for hyper-util's client, which wants the URI
    /// absolute and writes Host from it.
    fn request(self, authority: &str, pooled: bool) -> hyper::Request<Full<Bytes>> {
        let request = match self {
            Wire::Http1 if pooled => hyper::Request::get(format!("http://{authority}{REQUEST_PATH}")),
            // HTTP/1.1 names the authority in Host; HTTP/2 in the URI.
            Wire::Http1 => hyper::Request::get(REQUEST_PATH).header("host", authority),
            Wire::H2c => hyper::Request::get(format!("http://{authority}{REQUEST_PATH}")),
            Wire::Grpc => {
                return hyper::Request::post(format!("http://{authority}/bench.Echo/Unary"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(Full::new(grpc_message()))
                    .expect("request");
            }
        };
        request.body(Full::new(Bytes::new())).expect("request")
    }

    /// Whether the response is a success, read to its end.
    async fn succeeded(self, response: hyper::Response<Incoming>) -> bool {
        if !response.status().is_success() {
            return false;
        }
        match response.into_body().collect().await {
            Ok(collected) if self == Wire::Grpc => collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .is_some_and(|s| s == "0"),
            Ok(_) => true,
            Err(_) => false,
        }
    }
}

/// A gRPC message: uncompressed, 13 bytes.
fn grpc_message() -> Bytes {
    let mut message = vec![0, 0, 0, 0, 13];
    message.extend_from_slice(b"hello, world\n");
    Bytes::from(message)
}

/// One client connection of the closed loop: HTTP/1.1, or HTTP/2 with prior knowledge (one stream at a
/// time, so that both keep the same number of requests in flight).
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn connect(target: SocketAddr, wire: Wire) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        let io = TokioIo::new(stream);
        if wire.h2() {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            return Ok(Sender::Http2(sender));
        }
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(Sender::Http1(sender))
    }

    async fn send(&mut self, wire: Wire) -> hyper::Result<hyper::Response<Incoming>> {
        let request = wire.request("backend", false);
        match self {
            Sender::Http1(sender) => sender.send_request(request).await,
            Sender::Http2(sender) => sender.send_request(request).await,
        }
    }
}

/// Closed loop: each connection sends its next request as soon as the previous response ends.
async fn saturate(
    target: SocketAddr,
    connections: usize,
    duration: Duration,
    wire: Wire,
) -> anyhow::Result<Figures> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut sender = Sender::connect(target, wire).await?;
        let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = match sender.send(wire).await {
                    Ok(response) => wire.succeeded(response).await,
                    Err(_) => false,
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    for task in tasks {
        task.await?;
    }
    Ok(Figures {
        rps: done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
        ..Figures::default()
    })
}

/// Open loop: request i is sent at start + i/rate, whatever happened to earlier ones, so a slow response
/// never delays later sends (no coordinated omission). Latency runs from the send to the end of the
/// response. The timer that paces sends ticks every millisecond; how late sends left is reported as
/// `send_lag`, so a generator that fell behind shows.
async fn fixed_rate(
    target: SocketAddr,
    rate: u64,
    duration: Duration,
    wire: Wire,
) -> anyhow::Result<Figures> {
    let client: Client<HttpConnector, Full<Bytes>> = {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Client::builder(TokioExecutor::new())
            .http2_only(wire.h2())
            .build(connector)
    };
    let authority = target.to_string();
    // Warm the pool so connection setup is not measured.
    for _ in 0..4 {
        let response = client.request(wire.request(&authority, true)).await?;
        response.into_body().collect().await?;
    }
    let total = rate * duration.as_secs();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due).await;
        let client = client.clone();
        let request = wire.request(&authority, true);
        tasks.push(tokio::spawn(async move {
            let sent = tokio::time::Instant::now();
            let ok = match client.request(request).await {
                Ok(response) => wire.succeeded(response).await,
                Err(_) => false,
            };
            (ok, sent.elapsed(), sent - due)
        }));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    let mut max_send_lag = Duration::ZERO;
    for task in tasks {
        let (ok, latency, lag) = task.await?;
        max_send_lag = max_send_lag.max(lag);
        if ok {
            histogram.record(latency.as_micros().max(1) as u64)?;
        } else {
            errors += 1;
        }
    }
    Ok(Figures {
        rps: histogram.len() as f64 / duration.as_secs_f64(),
        p50_us: histogram.value_at_quantile(0.50),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        errors,
        max_send_lag_us: max_send_lag.as_micros() as u64,
    })
}

/// A `weft proxy` process with one explicit listener in front of the backend.
struct Proxy {
    child: Child,
    admin: SocketAddr,
    listener: SocketAddr,
    dir: PathBuf,
}

mod attack;
mod pair;
mod scale;
mod scoping;

impl Proxy {
    /// A proxy whose listeners, clusters and routes are `proxied(listener address)` (YAML).
    fn start(weft: &std::path::Path, proxied: impl FnOnce(SocketAddr) -> String) -> anyhow::Result<Self> {
        Self::start_with(weft, 1, proxied)
    }

    /// The same with `threads` workers.
    fn start_with(
        weft: &std::path::Path,
        threads: u16,
        proxied: impl FnOnce(SocketAddr) -> String,
    ) -> anyhow::Result<Self> {
        let admin = free_addr()?;
        let listener = free_addr()?;
        let readiness = free_addr()?;
        let dir = std::env::temp_dir().join(format!("weft-bench-{}-{}", std::process::id(), listener.port()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("weft.yaml");
        let mut common = format!(
            "admin: {{ address: {admin} }}\nreadiness: {{ address: {readiness} }}\noutbound: {{ enabled: false }}\ninbound: {{ enabled: false }}\n"
        );
        let proxied = proxied(listener);
        // As a sidecar in a pod runs by default (`--compare-access-log` measures it on).
        if !proxied.contains("access_log:") {
            common.push_str("access_log: { path: off }\n");
        }
        std::fs::write(&config, common + &proxied)?;
        let child = Command::new(weft)
            .args(["proxy", "--concurrency", &threads.to_string(), "--config"])
            .arg(&config)
            .env("WEFT_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", weft.display()))?;
        Ok(Self {
            child,
            admin,
            listener,
            dir,
        })
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let uri: hyper::Uri = format!("http://{}/ready", self.admin).parse()?;
        while Instant::now() < deadline {
            if let Ok(response) = client.get(uri.clone()).await
                && response.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("weft did not become ready")
    }

    /// User + system CPU time of the proxy process so far.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.child.id())
    }

    fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        status_kib(self.child.id(), "VmHWM:")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A run that ends early (an error) stops its proxies too.
impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// User + system CPU time of process `pid` (all its threads) so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    Ok((utime + stime) / clock_ticks_per_second())
}

/// A `/proc/PID/status` figure in KiB: `VmRSS:` (now) or `VmHWM:` (peak).
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

/// USER_HZ: 100 on every Linux architecture the proxy targets.
fn clock_ticks_per_second() -> f64 {
    100.0
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}
