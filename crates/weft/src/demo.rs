//! `weft demo`: the product on one machine, no root needed.
//!
//! Two small HTTP services (`reviews-v1`, `reviews-v2`), each behind its own server-side weft, and a
//! client-side weft that balances a `reviews` cluster over them. The demo sends requests through the
//! client-side proxy, prints where each went, and ends with the proxies' own metrics.

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

#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    /// Send this many requests, print the summary and exit (non-zero if any failed). Without it the demo
    /// runs until interrupted.
    #[arg(long)]
    requests: Option<u64>,
    /// Requests per second.
    #[arg(long, default_value_t = 20)]
    rate: u32,
}

const SERVICES: [&str; 2] = ["reviews-v1", "reviews-v2"];

pub(crate) async fn run(args: DemoArgs) -> ExitCode {
    match demo(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: demo failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut server_sides = Vec::new();
    for name in SERVICES {
        let app = start_service(name).await?;
        let proxy = start_proxy(&server_side_config(name, app)).await?;
        let entry = proxy
            .listener_address("inbound")
            .ok_or_else(|| anyhow::anyhow!("no inbound listener"))?;
        println!("service {name:<11} app {app}  <- weft (server side) {entry}");
        server_sides.push((entry, proxy));
    }
    let endpoints: Vec<SocketAddr> = server_sides.iter().map(|(entry, _)| *entry).collect();
    let client_side = start_proxy(&client_side_config(&endpoints)).await?;
    let front = client_side
        .listener_address("reviews")
        .ok_or_else(|| anyhow::anyhow!("no reviews listener"))?;
    println!("client -> weft (client side) {front}, cluster reviews = {endpoints:?}");
    println!(
        "admin: client side http://{}/ (GET /help)\n",
        client_side.admin_address()
    );

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
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
        report.record(send(&client, front, report.total()).await);
        if args.requests.is_none() && last_print.elapsed() >= Duration::from_secs(1) {
            println!("{}", report.line());
            last_print = Instant::now();
        }
    }

    println!("\n{}", report.summary());
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
    Ok(if report.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn server_side_config(name: &str, app: SocketAddr) -> String {
    format!(
        r#"
node: {{ workload: {name}, namespace: demo }}
admin: {{ address: 127.0.0.1:0 }}
readiness: {{ address: 127.0.0.1:0 }}
outbound: {{ enabled: false }}
inbound: {{ enabled: false }}
listeners:
  - {{ name: inbound, address: 127.0.0.1:0, cluster: app, protocol: http }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#
    )
}

fn client_side_config(endpoints: &[SocketAddr]) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
node: {{ workload: productpage, namespace: demo }}
admin: {{ address: 127.0.0.1:0 }}
readiness: {{ address: 127.0.0.1:0 }}
outbound: {{ enabled: false }}
inbound: {{ enabled: false }}
listeners:
  - {{ name: reviews, address: 127.0.0.1:0, cluster: reviews }}
clusters:
  - {{ name: reviews, endpoints: [{}] }}
"#,
        endpoints.join(", ")
    )
}

async fn start_proxy(config: &str) -> anyhow::Result<Running> {
    let (bootstrap, mesh) = weft_model::parse(config)?;
    // The process-wide logger belongs to `main`; the demo's proxies get detached controls.
    Ok(App::build(bootstrap, mesh, Arc::new(OsBinder), LogControl::detached("info")).await?)
}

/// A tiny HTTP service that says who it is.
async fn start_service(name: &'static str) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let body = format!("{name} answered {} {}\n", req.method(), req.uri().path());
                    Response::builder()
                        .header("x-served-by", name)
                        .body(Full::new(Bytes::from(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

struct Outcome {
    status: Option<u16>,
    served_by: Option<String>,
    latency: Duration,
}

async fn send<C>(client: &Client<C, Empty<Bytes>>, front: SocketAddr, n: u64) -> Outcome
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let start = Instant::now();
    let request = Request::get(format!("http://{front}/reviews/{n}"))
        .header("host", "reviews")
        .body(Empty::new());
    let result = match request {
        Ok(request) => client.request(request).await.ok(),
        Err(_) => None,
    };
    let (status, served_by) = match result {
        Some(response) => {
            let served_by = response
                .headers()
                .get("x-served-by")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            (Some(status), served_by)
        }
        None => (None, None),
    };
    Outcome {
        status,
        served_by,
        latency: start.elapsed(),
    }
}

async fn fetch_metrics<C>(client: &Client<C, Empty<Bytes>>, admin: SocketAddr) -> anyhow::Result<String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let response = client
        .request(Request::get(format!("http://{admin}/metrics")).body(Empty::new())?)
        .await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[derive(Default)]
struct Report {
    by_service: BTreeMap<String, u64>,
    by_status: BTreeMap<String, u64>,
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
