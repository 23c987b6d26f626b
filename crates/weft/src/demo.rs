//! `weft demo`: the product on one machine, no root needed.
//!
//! `weft control` serves a `reviews` Service with two versions, a VirtualService (90/10 canary, and
//! `x-canary: true` to v2) and a DestinationRule, from Istio YAML written to a temporary directory. Two
//! small HTTP services (`reviews-v1`, `reviews-v2`) each sit behind a server-side weft; a client-side weft
//! takes all its configuration from the control plane over xDS. The demo sends requests to the service
//! address through the client-side proxy, prints where each went, and ends with the proxy's metrics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use weft_app::{App, OsBinder, Running};
use weft_telemetry::LogControl;

mod collector;
mod netns;

#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    /// Send this many requests, print the summary and exit (non-zero if any failed). Without it the demo
    /// runs until interrupted.
    #[arg(long)]
    requests: Option<u64>,
    /// Requests per second.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Run the mesh as pods made of network namespaces (root): `weft init` rules, proxies as UID 1337,
    /// `weft control` in its own pod, apps that only know the service address.
    #[arg(long)]
    netns: bool,
}

const SERVICES: [&str; 2] = ["reviews-v1", "reviews-v2"];

pub(crate) async fn run(args: DemoArgs) -> ExitCode {
    let result = if args.netns {
        netns::demo(args).await
    } else {
        demo(args).await
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: demo failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    // The control plane first: its CA signs every sidecar's certificate.
    let dir = std::env::temp_dir().join(format!("weft-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let control_plane = weft_control::ControlPlane::start(dir.clone(), "127.0.0.1:0".parse()?).await?;
    let ca = control_plane.ca().clone();
    // Every sidecar sends its spans to the demo's own OTLP collector, every request sampled.
    let collector = collector::Collector::start().await?;
    let tracing = format!(
        "tracing: {{ otlp_endpoint: \"http://{}\", sampling_percent: 100 }}\n",
        collector.addr
    );
    let identity = |sa: &str| -> anyhow::Result<String> {
        let token = ca.tokens().issue("demo", sa, Duration::from_secs(3600))?;
        Ok(format!(
            "identity: {{ ca_address: \"http://{}\", token: \"{token}\" }}\n",
            control_plane.address()
        ))
    };

    let mut server_sides = Vec::new();
    for name in SERVICES {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let app = listener.local_addr()?;
        serve_app(listener, name);
        let log = dir.join(format!("access-{name}.log"));
        let proxy = start_proxy(
            &(server_side_config(name, app, &log) + &identity("reviews")? + &tracing),
            Arc::new(OsBinder),
        )
        .await?;
        let entry = proxy
            .listener_address("inbound")
            .ok_or_else(|| anyhow::anyhow!("no inbound listener"))?;
        println!("service {name:<11} app {app}  <- weft (server side, mTLS STRICT) {entry}");
        server_sides.push((entry, proxy));
    }
    // Write, then rename into place: the control plane never reads half a file.
    let yaml = mesh_yaml(REVIEWS, server_sides[0].0, server_sides[1].0);
    std::fs::write(dir.join(".reviews.yaml.tmp"), yaml)?;
    std::fs::rename(dir.join(".reviews.yaml.tmp"), dir.join("reviews.yaml"))?;
    // The client side starts once the control plane serves the reviews Service.
    let loaded = async {
        while control_plane.catalog().services.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), loaded)
        .await
        .is_err()
    {
        anyhow::bail!(
            "weft control did not load {} within 20 s",
            dir.join("reviews.yaml").display()
        );
    }
    println!(
        "weft control   xDS and CA on {} from {}",
        control_plane.address(),
        dir.join("reviews.yaml").display()
    );

    // Without root there is no iptables: the client-side proxy's outbound listener treats every
    // connection as one the app made to the reviews Service address, as the redirect would.
    let client_log = dir.join("access-productpage.log");
    let client_side = start_proxy(
        &(client_side_config(control_plane.address(), &client_log) + &identity("productpage")? + &tracing),
        Arc::new(RedirectedTo(REVIEWS)),
    )
    .await?;
    let front = client_side
        .outbound_address()
        .ok_or_else(|| anyhow::anyhow!("no outbound listener"))?;
    wait_ready(&client_side).await?;
    println!("client -> weft (client side) {front} as if to {REVIEWS}; configuration from weft control");
    println!(
        "admin: client side http://{}/ (GET /help, /mesh, /config_dump)\n",
        client_side.admin_address()
    );

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let (report, canary) = traffic(&client, front, &args).await;
    println!("\nidentities of each hop (mutual TLS, certificates from weft control's CA):");
    println!(
        "  client side presents  {}",
        certificate_identity(&client, client_side.admin_address()).await?
    );
    for (entry, proxy) in &server_sides {
        println!(
            "  server side {entry} presents {}",
            certificate_identity(&client, proxy.admin_address()).await?
        );
    }
    println!("  the apps saw callers: {:?}", report.callers);
    let request_id = print_access_logs(&dir, &client_log).await;
    print_trace(&collector, request_id.as_deref()).await;
    println!("\nclient-side weft metrics (GET /metrics):");
    for line in fetch_metrics(&client, client_side.admin_address()).await?.lines() {
        if line.starts_with("istio_requests_total") {
            println!("  {line}");
        }
    }

    client_side.shutdown();
    client_side.wait().await;
    for (_, proxy) in server_sides {
        proxy.shutdown();
        proxy.wait().await;
    }
    control_plane.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(verdict(&report, &canary))
}

/// Sends the demo's requests to `front` at the chosen rate (printing a line a second when running until
/// interrupted), then five with `x-canary: true`; prints the summaries.
async fn traffic<C>(client: &Client<C, Empty<Bytes>>, front: SocketAddr, args: &DemoArgs) -> (Report, Report)
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut report = Report::default();
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let mut ticker = tokio::time::interval(period);
    let mut last_print = Instant::now();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        if args.requests.is_some_and(|n| report.total() >= n) {
            break;
        }
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut interrupted => break,
        }
        report.record(send(client, front, report.total(), false).await);
        if args.requests.is_none() && last_print.elapsed() >= Duration::from_secs(1) {
            println!("{}", report.line());
            last_print = Instant::now();
        }
    }
    println!("\n{}", report.summary());
    let mut canary = Report::default();
    for n in 0..5 {
        canary.record(send(client, front, n, true).await);
    }
    println!("  with x-canary: true: {:?}", canary.by_service);
    (report, canary)
}

/// Success when every request was answered and the header sent every canary request to v2.
fn verdict(report: &Report, canary: &Report) -> ExitCode {
    let canary_ok = canary.by_service.get("reviews-v2") == Some(&canary.total());
    if report.failures == 0 && canary_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The last request of the client side's access log, and the same request on the server side that
/// served it (found by its `x-request-id`). Returns that request id.
async fn print_access_logs(dir: &std::path::Path, client_log: &std::path::Path) -> Option<String> {
    // The writers are a batch behind the traffic at most.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    let client = read(client_log);
    let Some(last) = client.lines().last() else {
        println!("\n(no access log lines were written to {})", client_log.display());
        return None;
    };
    println!(
        "\naccess log, one request on both sides of the hop (Istio's format; files in {}):",
        dir.display()
    );
    println!("  client side: {last}");
    // Istio's format quotes the request id as the fifth quoted field.
    let id = last.split('"').nth(9).unwrap_or_default();
    for name in SERVICES {
        let server = read(&dir.join(format!("access-{name}.log")));
        if let Some(line) = server.lines().find(|l| !id.is_empty() && l.contains(id)) {
            println!("  {name}: {line}");
        }
    }
    Some(id.to_owned()).filter(|id| !id.is_empty())
}

/// A trace the sidecars exported: the client side's span and the server side's span under it. The
/// access log's last request when its trace has arrived (the sidecars export in batches, every 5 s),
/// else the latest complete one.
async fn print_trace(collector: &collector::Collector, request_id: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(8);
    let hop = loop {
        let spans = collector.spans();
        let hops: Vec<(collector::Span, collector::Span)> = spans
            .iter()
            .filter(|s| s.parent_id.is_empty() || !spans.iter().any(|p| p.span_id == s.parent_id))
            .filter_map(|client| {
                let server = spans.iter().find(|s| s.parent_id == client.span_id)?;
                Some((client.clone(), server.clone()))
            })
            .collect();
        let wanted = request_id.and_then(|id| hops.iter().find(|(c, _)| c.request_id.as_deref() == Some(id)));
        if let Some(hop) = wanted
            .or(hops.last())
            .filter(|_| wanted.is_some() || Instant::now() > deadline)
        {
            break Some(hop.clone());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let total = collector.spans().len();
    let Some((client, server)) = hop else {
        println!(
            "\n(no trace reached the demo's OTLP collector at {}: {total} spans)",
            collector.addr
        );
        return;
    };
    println!(
        "\ntrace {} of request {} ({total} spans received over OTLP by the demo's collector at {}):",
        client.trace_id,
        client.request_id.as_deref().unwrap_or("-"),
        collector.addr
    );
    println!(
        "  {} span {} {} -> {}",
        client.service,
        client.span_id,
        client.name,
        client.upstream_cluster.as_deref().unwrap_or("-")
    );
    println!(
        "  {} span {} (child of {}) {} -> {}",
        server.service,
        server.span_id,
        server.parent_id,
        server.name,
        server.upstream_cluster.as_deref().unwrap_or("-")
    );
}

fn server_side_config(name: &str, app: SocketAddr, log: &std::path::Path) -> String {
    format!(
        r#"
access_log: {{ path: "{log}" }}
node: {{ workload: {name}, namespace: demo, service_account: reviews }}
admin: {{ address: 127.0.0.1:0 }}
readiness: {{ address: 127.0.0.1:0 }}
outbound: {{ enabled: false }}
inbound: {{ enabled: false }}
listeners:
  - {{ name: inbound, address: 127.0.0.1:0, cluster: app, protocol: http, peer_authentication: strict }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#,
        log = log.display()
    )
}

/// The Service address the demo's client calls.
/// In the loopback range, so nothing the demo does can leave the machine.
const REVIEWS: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 10, 50)),
    9080,
);

fn client_side_config(control_plane: SocketAddr, log: &std::path::Path) -> String {
    format!(
        r#"
access_log: {{ path: "{log}" }}
node: {{ workload: productpage, namespace: demo, service_account: productpage }}
admin: {{ address: 127.0.0.1:0 }}
readiness: {{ address: 127.0.0.1:0 }}
outbound: {{ address: 127.0.0.1:0 }}
inbound: {{ enabled: false }}
xds: {{ address: "http://{control_plane}" }}
"#,
        log = log.display()
    )
}

/// Istio resources as a user writes them: the reviews Service at `service`, its two workloads.
fn mesh_yaml(service: SocketAddr, v1: SocketAddr, v2: SocketAddr) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{ name: reviews, namespace: demo }}
spec:
  clusterIP: {ip}
  selector: {{ app: reviews }}
  ports:
    - {{ name: http, port: {port} }}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{ name: reviews-v1, namespace: demo }}
spec:
  address: {v1ip}
  labels: {{ app: reviews, version: v1, security.istio.io/tlsMode: istio }}
  serviceAccount: reviews
  ports: {{ http: {v1port} }}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{ name: reviews-v2, namespace: demo }}
spec:
  address: {v2ip}
  labels: {{ app: reviews, version: v2, security.istio.io/tlsMode: istio }}
  serviceAccount: reviews
  ports: {{ http: {v2port} }}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: reviews, namespace: demo }}
spec:
  hosts: [reviews]
  http:
    - match: [{{ headers: {{ x-canary: {{ exact: "true" }} }} }}]
      route: [{{ destination: {{ host: reviews, subset: v2 }} }}]
    - route:
        - {{ destination: {{ host: reviews, subset: v1 }}, weight: 90 }}
        - {{ destination: {{ host: reviews, subset: v2 }}, weight: 10 }}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: reviews, namespace: demo }}
spec:
  host: reviews
  subsets:
    - {{ name: v1, labels: {{ version: v1 }} }}
    - {{ name: v2, labels: {{ version: v2 }} }}
"#,
        ip = service.ip(),
        port = service.port(),
        v1ip = v1.ip(),
        v1port = v1.port(),
        v2ip = v2.ip(),
        v2port = v2.port(),
    )
}

/// Stands in for iptables: every connection "was going to" one address.
#[derive(Debug)]
struct RedirectedTo(SocketAddr);

impl weft_app::Binder for RedirectedTo {
    fn original_dst(&self, _conn: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
        Ok(self.0)
    }
}

async fn wait_ready(proxy: &Running) -> anyhow::Result<()> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: hyper::Uri = format!("http://{}/ready", proxy.admin_address()).parse()?;
    for _ in 0..200 {
        if let Ok(response) = client.get(uri.clone()).await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the client-side proxy did not get its configuration from weft control")
}

async fn start_proxy(config: &str, binder: Arc<dyn weft_app::Binder>) -> anyhow::Result<Running> {
    let (bootstrap, mesh) = weft_model::parse(config)?;
    // The process-wide logger belongs to `main`; the demo's proxies get detached controls.
    Ok(App::build(bootstrap, mesh, binder, LogControl::detached("info")).await?)
}

/// A tiny HTTP service that says who it is.
fn serve_app(listener: TcpListener, name: &'static str) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let caller = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.split(';').find_map(|kv| kv.strip_prefix("URI=")))
                        .unwrap_or("-")
                        .to_owned();
                    let body = format!("{name} answered {} {}\n", req.method(), req.uri().path());
                    Response::builder()
                        .header("x-served-by", name)
                        .header("x-caller", caller)
                        .body(Full::new(Bytes::from(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

struct Outcome {
    status: Option<u16>,
    served_by: Option<String>,
    /// The caller's identity as the app saw it (from `x-forwarded-client-cert`).
    caller: Option<String>,
    latency: Duration,
}

async fn send<C>(client: &Client<C, Empty<Bytes>>, front: SocketAddr, n: u64, canary: bool) -> Outcome
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let start = Instant::now();
    let mut request = Request::get(format!("http://{front}/reviews/{n}")).header("host", "reviews");
    if canary {
        request = request.header("x-canary", "true");
    }
    let request = request.body(Empty::new());
    let result = match request {
        Ok(request) => client.request(request).await.ok(),
        Err(_) => None,
    };
    let (status, served_by, caller) = match result {
        Some(response) => {
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let (served_by, caller) = (header("x-served-by"), header("x-caller"));
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            (Some(status), served_by, caller)
        }
        None => (None, None, None),
    };
    Outcome {
        status,
        served_by,
        caller,
        latency: start.elapsed(),
    }
}

/// The identity in a proxy's `GET /identity`.
async fn certificate_identity<C>(
    client: &Client<C, Empty<Bytes>>,
    admin: SocketAddr,
) -> anyhow::Result<String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let certs: serde_json::Value = serde_json::from_str(&admin_get(client, admin, "/identity").await?)?;
    Ok(certs["identity"].as_str().unwrap_or("(none)").to_owned())
}

async fn fetch_metrics<C>(client: &Client<C, Empty<Bytes>>, admin: SocketAddr) -> anyhow::Result<String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    admin_get(client, admin, "/metrics").await
}

async fn admin_get<C>(
    client: &Client<C, Empty<Bytes>>,
    admin: SocketAddr,
    path: &str,
) -> anyhow::Result<String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let response = client
        .request(Request::get(format!("http://{admin}{path}")).body(Empty::new())?)
        .await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[derive(Default)]
struct Report {
    by_service: BTreeMap<String, u64>,
    by_status: BTreeMap<String, u64>,
    callers: std::collections::BTreeSet<String>,
    failures: u64,
    latencies: Vec<Duration>,
}

impl Report {
    fn total(&self) -> u64 {
        self.latencies.len() as u64
    }

    fn record(&mut self, outcome: Outcome) {
        let status = outcome
            .status
            .map_or_else(|| "error".to_owned(), |s| s.to_string());
        if outcome.status != Some(200) {
            self.failures += 1;
        }
        *self.by_status.entry(status).or_default() += 1;
        self.callers.extend(outcome.caller);
        *self
            .by_service
            .entry(outcome.served_by.unwrap_or_else(|| "-".into()))
            .or_default() += 1;
        self.latencies.push(outcome.latency);
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let i = ((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1);
        sorted.get(i).copied().unwrap_or_default()
    }

    fn line(&self) -> String {
        format!(
            "{} requests, by service {:?}, by status {:?}",
            self.total(),
            self.by_service,
            self.by_status
        )
    }

    fn summary(&self) -> String {
        format!(
            "summary: {} requests, {} failed\n  by service: {:?}\n  by status:  {:?}\n  latency through two proxies: p50 {:?}, p99 {:?}",
            self.total(),
            self.failures,
            self.by_service,
            self.by_status,
            self.percentile(0.50),
            self.percentile(0.99),
        )
    }
}
