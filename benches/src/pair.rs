//! The mesh hop as users deploy it: a client sidecar (plain HTTP in, mutual TLS out, the server's
//! identity verified) and a server sidecar (mutual TLS in, a client certificate required, plain HTTP to
//! the backend). Measured for a Weft pair and for an HAProxy pair doing the same job with certificates
//! from the same CA (`weft control`'s, in process), against the same backend, in one run; every figure
//! is printed as a ratio to HAProxy's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

use crate::{Args, Figures, Proxy, cpu_seconds, fixed_rate, free_addr, saturate, status_kib};

const TRUST_DOMAIN: &str = "cluster.local";
/// Open-loop rates at which latency and CPU are measured.
const RATES: [u64; 2] = [500, 2000];
/// Idle keep-alive client connections held open for the memory figure.
const IDLE_CONNECTIONS: usize = 1000;

/// The processes of one pair and the address its clients use.
trait Pair {
    fn entry(&self) -> SocketAddr;
    fn pids(&self) -> Vec<u32>;
    /// The server side's admin address, where it counts the mutual TLS connections it accepted.
    fn server_admin(&self) -> Option<SocketAddr> {
        None
    }
}

struct WeftPair {
    client: Proxy,
    server: Proxy,
}

impl Pair for WeftPair {
    fn entry(&self) -> SocketAddr {
        self.client.listener
    }
    fn pids(&self) -> Vec<u32> {
        vec![self.client.child.id(), self.server.child.id()]
    }
    fn server_admin(&self) -> Option<SocketAddr> {
        Some(self.server.admin)
    }
}

struct HaproxyPair {
    child: Child,
    entry: SocketAddr,
}

impl Pair for HaproxyPair {
    fn entry(&self) -> SocketAddr {
        self.entry
    }
    fn pids(&self) -> Vec<u32> {
        vec![self.child.id()]
    }
}

impl Drop for HaproxyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run measures for one path (direct, or through a pair).
#[derive(Debug, Default, Clone)]
struct PairFigures {
    saturation: Figures,
    /// CPU seconds of the pair per request at saturation.
    cpu_us_per_request: f64,
    /// Latency and the pair's cores, per rate in `RATES`.
    at_rate: Vec<(Figures, f64)>,
    idle_rss_kib: u64,
    peak_rss_kib: u64,
    /// RSS with `IDLE_CONNECTIONS` idle keep-alive client connections open.
    connections_rss_kib: u64,
    /// Mutual TLS connections the server side had accepted after each phase (Weft only).
    peer_connections: Vec<(&'static str, u64)>,
}

/// The server sidecar's count of accepted mutual TLS connections.
async fn tls_accepted(admin: SocketAddr) -> anyhow::Result<u64> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(admin).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get("/metrics")
        .header("host", "admin")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let body = sender
        .send_request(request)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("weft_protocol_detections_total{") && l.contains("protocol=\"tls\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

fn total(pids: &[u32], f: impl Fn(u32) -> anyhow::Result<f64>) -> anyhow::Result<f64> {
    pids.iter().map(|&p| f(p)).sum()
}

fn rss(pids: &[u32], field: &str) -> anyhow::Result<u64> {
    pids.iter().map(|&p| status_kib(p, field)).sum()
}

async fn measure(pair: Option<&dyn Pair>, direct: SocketAddr, args: &Args) -> anyhow::Result<PairFigures> {
    let phase = Duration::from_secs(args.seconds);
    let target = pair.map_or(direct, |p| p.entry());
    let pids = pair.map(|p| p.pids()).unwrap_or_default();
    let mut figures = PairFigures {
        idle_rss_kib: rss(&pids, "VmRSS:")?,
        ..PairFigures::default()
    };
    let admin = pair.and_then(|p| p.server_admin());
    let count = async |figures: &mut PairFigures, phase: &'static str| -> anyhow::Result<()> {
        if let Some(admin) = admin {
            figures.peer_connections.push((phase, tls_accepted(admin).await?));
        }
        Ok(())
    };
    count(&mut figures, "start").await?;
    let before = total(&pids, cpu_seconds)?;
    figures.saturation = saturate(target, args.connections, phase, crate::Wire::of(args)).await?;
    let cpu = total(&pids, cpu_seconds)? - before;
    figures.cpu_us_per_request = cpu * 1e6 / (figures.saturation.rps * phase.as_secs_f64()).max(1.0);
    count(&mut figures, "saturation").await?;
    for rate in RATES {
        let before = total(&pids, cpu_seconds)?;
        let latency = fixed_rate(target, rate, phase, crate::Wire::of(args)).await?;
        let cores = (total(&pids, cpu_seconds)? - before) / phase.as_secs_f64();
        figures.at_rate.push((latency, cores));
        count(
            &mut figures,
            if rate == RATES[0] {
                "500 req/s"
            } else {
                "2000 req/s"
            },
        )
        .await?;
    }
    figures.peak_rss_kib = rss(&pids, "VmHWM:")?;
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        idle.push(one_request_kept_open(target).await?);
    }
    tokio::time::sleep(IDLE_SETTLE).await;
    figures.connections_rss_kib = rss(&pids, "VmRSS:")?;
    count(&mut figures, "idle connections").await?;
    drop(idle);
    Ok(figures)
}

/// How long idle connections are left before their memory is read: longer than a Weft sidecar waits
/// before it frees an idle HTTP/1 connection's buffers (1 s) and hands the freed memory back to the
/// kernel (at its next one-second sample), so that the figure is what a connection costs while it
/// stays idle, not during its first seconds.
pub(crate) const IDLE_SETTLE: Duration = Duration::from_secs(3);

/// A client connection that made one request and stays open, idle.
pub(crate) async fn one_request_kept_open(
    target: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(target).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(crate::REQUEST_PATH)
        .header("host", "backend")
        .body(http_body_util::Empty::new())?;
    let response = sender.send_request(request).await?;
    response.into_body().collect().await?;
    Ok(sender)
}

/// A certificate for `spiffe://cluster.local/ns/default/sa/{sa}` from the CA, written as one PEM file
/// (chain without the root, then the key), as HAProxy's `crt` takes it.
fn haproxy_certificate(
    ca: &weft_control::ca::CertificateAuthority,
    sa: &str,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let id: weft_identity::SpiffeId = format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}").parse()?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    let chain = ca.sign(&csr, &id, Duration::from_secs(24 * 3600))?;
    let mut pem = chain[..chain.len().saturating_sub(1)].concat();
    pem.push_str(&key.serialize_pem());
    let path = dir.join(format!("{sa}.pem"));
    std::fs::write(&path, pem)?;
    Ok(path)
}

fn start_haproxy(
    ca: &weft_control::ca::CertificateAuthority,
    backend: SocketAddr,
    threads: u16,
    dir: &Path,
    policies: bool,
    h2: bool,
) -> anyhow::Result<HaproxyPair> {
    let haproxy = installed_haproxy()?;
    let client_pem = haproxy_certificate(ca, "client", dir)?;
    let server_pem = haproxy_certificate(ca, "server", dir)?;
    let root = dir.join("root.pem");
    std::fs::write(&root, ca.root_pem())?;
    let entry = free_addr()?;
    let server = free_addr()?;
    let config = format!(
        "global
  nbthread {threads}
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend client_out
  bind {entry}
  default_backend peer
backend peer
{peer_policies}  server server {server} ssl crt {client_pem} ca-file {root} verify required ssl-min-ver TLSv1.3 alpn {alpn}{server_policies}
frontend server_in
  bind {server} ssl crt {server_pem} ca-file {root} verify required ssl-min-ver TLSv1.3 alpn {alpn}
  default_backend app
backend app
  server app {backend}{app_proto}
",
        // The same policies in HAProxy's words: least connections, three retries that may go to
        // another server, and a server marked down after five consecutive 5xx.
        peer_policies = if policies {
            "  balance leastconn\n  retries 3\n  option redispatch\n  retry-on conn-failure 500 502 503 504\n"
        } else {
            ""
        },
        server_policies = if policies {
            " check observe layer7 error-limit 5 on-error mark-down"
        } else {
            ""
        },
        app_proto = if h2 { " proto h2" } else { "" },
        alpn = if h2 { "h2" } else { "http/1.1" },
        client_pem = client_pem.display(),
        server_pem = server_pem.display(),
        root = root.display(),
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config)?;
    let child = Command::new(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .context("starting haproxy")?;
    let mut pair = HaproxyPair { child, entry };
    std::thread::sleep(Duration::from_millis(300));
    if let Some(status) = pair.child.try_wait()? {
        anyhow::bail!(
            "haproxy exited at start ({status}): it refused {}",
            path.display()
        );
    }
    Ok(pair)
}

/// The haproxy binary, installed with apt-get first when it is missing (as root; the peer this benchmark
/// compares against).
fn installed_haproxy() -> anyhow::Result<PathBuf> {
    if let Some(path) = which("haproxy") {
        return Ok(path);
    }
    if which("apt-get").is_none() {
        bail!("haproxy not found and there is no apt-get to install it: install haproxy 2.6 or later");
    }
    eprintln!("haproxy not found: installing it with apt-get");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "haproxy"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
    };
    let installed = install().is_ok_and(|s| s.success())
        || (Command::new("apt-get")
            .args(["update", "-q"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            && install().is_ok_and(|s| s.success()));
    match which("haproxy") {
        Some(path) if installed => Ok(path),
        _ => bail!("installing haproxy with apt-get failed (run as root, or apt-get install haproxy first)"),
    }
}

fn which(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(binary))
        .find(|p| p.exists())
}

/// Weft's pair: certificates come over gRPC from the in-process control plane's CA, as in a mesh.
fn start_weft(
    weft: &Path,
    cp: &weft_control::ControlPlane,
    backend: SocketAddr,
    threads: u16,
    args_upgrade: bool,
    policies: bool,
) -> anyhow::Result<WeftPair> {
    let identity = |sa: &str| -> anyhow::Result<String> {
        let token = cp
            .ca()
            .tokens()
            .issue("default", sa, Duration::from_secs(24 * 3600))?;
        Ok(format!(
            "node: {{ workload: {sa}, namespace: default, service_account: {sa} }}\n\
             identity: {{ ca_address: \"http://{}\", token: \"{token}\" }}\n",
            cp.address()
        ))
    };
    let server_identity = identity("server")?;
    let client_identity = identity("client")?;
    let server = Proxy::start_with(weft, threads, |listener| {
        format!(
            "{server_identity}listeners:\n  - name: server-in\n    address: {listener}\n    peer_authentication: strict\n    cluster: app\n    protocol: http\n\
             clusters: [{{ name: app, endpoints: [{backend}] }}]\n"
        )
    })?;
    let server_addr = server.listener;
    let upgrade = args_upgrade;
    let client = Proxy::start_with(weft, threads, |listener| {
        let tls = format!(
            "    tls: {{ identities: [\"spiffe://{TRUST_DOMAIN}/ns/default/sa/server\"], http2_upgrade: {upgrade} }}\n"
        );
        if policies {
            // Retries, outlier detection and least-request on the client sidecar, as the seed's
            // VirtualService and DestinationRule put them.
            return format!(
                "{client_identity}listeners:\n  - name: client-out\n    address: {listener}\n    route: out\n    protocol: http\n\
                 clusters:\n  - name: server\n    endpoints: [{server_addr}]\n    lb_policy: LEAST_REQUEST\n    outlier_detection: {{}}\n{tls}\
                 routes:\n  - name: out\n    virtual_hosts:\n      - name: out\n        routes:\n\
                 \x20         - match: {{ prefix: / }}\n\
                 \x20           cluster: server\n\
                 \x20           retry: {{ retry_on: \"5xx,connect-failure\", num_retries: 3, per_try_timeout: 2s }}\n"
            );
        }
        format!(
            "{client_identity}listeners:\n  - name: client-out\n    address: {listener}\n    cluster: server\n    protocol: http\n\
             clusters:\n  - name: server\n    endpoints: [{server_addr}]\n{tls}"
        )
    })?;
    Ok(WeftPair { client, server })
}

async fn wait_serving(target: SocketAddr) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if one_request_kept_open(target).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{target} never answered")
}

pub(crate) fn run(
    args: &Args,
    weft: &Path,
    backend: SocketAddr,
    client_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("weft-bench-pair-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // The control plane runs on its own thread, as it would in its own process.
    let cp_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cp = cp_rt.block_on(weft_control::ControlPlane::start(
        dir.join("mesh"),
        "127.0.0.1:0".parse()?,
    ))?;
    std::fs::create_dir_all(dir.join("mesh"))?;
    std::thread::spawn(move || cp_rt.block_on(std::future::pending::<()>()));

    let threads = args.proxy_threads;
    let mut weft_pair = start_weft(weft, &cp, backend, threads, args.http2_upgrade, args.policies)?;
    let haproxy = start_haproxy(
        cp.ca(),
        backend,
        threads,
        &dir,
        args.policies,
        crate::Wire::of(args).h2(),
    )?;
    client_rt.block_on(weft_pair.client.wait_ready())?;
    client_rt.block_on(weft_pair.server.wait_ready())?;
    client_rt.block_on(wait_serving(weft_pair.entry()))?;
    client_rt.block_on(wait_serving(haproxy.entry()))?;

    let direct = client_rt.block_on(measure(None, backend, args))?;
    let peer = client_rt.block_on(measure(Some(&haproxy), backend, args))?;
    let ours = client_rt.block_on(measure(Some(&weft_pair), backend, args))?;
    report(args, &direct, &peer, &ours);
    weft_pair.client.stop();
    weft_pair.server.stop();
    drop(haproxy);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn report(args: &Args, direct: &PairFigures, peer: &PairFigures, ours: &PairFigures) {
    println!(
        "sidecar pair, mutual TLS between them, {}, 13-byte responses; {} s per phase, {} connections at saturation, {} proxy threads; weft hop: {}; policies: {}",
        match crate::Wire::of(args) {
            crate::Wire::Http1 => "HTTP/1.1 GET",
            crate::Wire::H2c => "h2c (HTTP/2 on every hop) GET",
            crate::Wire::Grpc => "gRPC unary (h2c on every hop)",
        },
        args.seconds,
        args.connections,
        args.proxy_threads,
        if crate::Wire::of(args).h2() {
            "HTTP/2"
        } else if args.http2_upgrade {
            "HTTP/2 (upgraded)"
        } else {
            "HTTP/1.1"
        },
        if args.policies {
            "on (retries, outlier detection, least-request on both pairs)"
        } else {
            "off"
        }
    );
    println!(
        "{:<34}{:>12}{:>12}{:>12}{:>14}",
        "", "direct", "haproxy", "weft", "weft/haproxy"
    );
    let row = |name: &str, d: f64, h: f64, w: f64| {
        println!(
            "{name:<34}{d:>12.1}{h:>12.1}{w:>12.1}{:>14.2}",
            w / h.max(f64::MIN_POSITIVE)
        );
    };
    row(
        "max req/s",
        direct.saturation.rps,
        peer.saturation.rps,
        ours.saturation.rps,
    );
    row(
        "max req/s / direct",
        1.0,
        peer.saturation.rps / direct.saturation.rps,
        ours.saturation.rps / direct.saturation.rps,
    );
    row(
        "pair CPU per request (us)",
        0.0,
        peer.cpu_us_per_request,
        ours.cpu_us_per_request,
    );
    for (i, rate) in RATES.iter().enumerate() {
        let (d, _) = &direct.at_rate[i];
        let (h, h_cores) = &peer.at_rate[i];
        let (w, w_cores) = &ours.at_rate[i];
        row(&format!("pair vCPU at {rate} req/s"), 0.0, *h_cores, *w_cores);
        for (q, pick) in [
            ("p50", (|f: &Figures| f.p50_us) as fn(&Figures) -> u64),
            ("p99", |f: &Figures| f.p99_us),
            ("p99.9", |f: &Figures| f.p999_us),
        ] {
            let added = |f: &Figures| pick(f) as f64 - pick(d) as f64;
            row(
                &format!("added {q} at {rate} req/s (us)"),
                pick(d) as f64,
                added(h),
                added(w),
            );
        }
    }
    let mib = |k: u64| k as f64 / 1024.0;
    row(
        "pair RSS idle (MiB)",
        0.0,
        mib(peer.idle_rss_kib),
        mib(ours.idle_rss_kib),
    );
    row(
        "pair RSS peak (MiB)",
        0.0,
        mib(peer.peak_rss_kib),
        mib(ours.peak_rss_kib),
    );
    row(
        &format!("pair RSS, {IDLE_CONNECTIONS} idle conns (MiB)"),
        0.0,
        mib(peer.connections_rss_kib),
        mib(ours.connections_rss_kib),
    );
    let counts: Vec<String> = ours
        .peer_connections
        .iter()
        .map(|(phase, n)| format!("{phase} {n}"))
        .collect();
    println!(
        "mutual TLS connections the Weft server side had accepted, after each phase: {}",
        counts.join(", ")
    );
    let errors = |f: &PairFigures| f.saturation.errors + f.at_rate.iter().map(|(l, _)| l.errors).sum::<u64>();
    println!(
        "errors: direct {}, haproxy {}, weft {}; the direct column of an 'added' row is the direct latency",
        errors(direct),
        errors(peer),
        errors(ours)
    );
}
