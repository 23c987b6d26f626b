//! `weft demo --netns` (root): the same demo with the real kernel path. Pods are network namespaces on a
//! bridge; each gets `weft init`'s rules and a `weft proxy` running as UID 1337; `weft control` runs in a
//! pod of its own. The reviews apps listen on their pod's port 9080 and the client in `productpage` only
//! knows the Service address; nothing in them knows about the mesh.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use weft_netns::{Control, Network, Pod};

use super::{
    DemoArgs, SERVICES, admin_get, certificate_identity, fetch_metrics, mesh_yaml, serve_app, traffic,
    verdict,
};

/// The reviews Service address the client calls (not on any interface: only the rules know it).
const REVIEWS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 50)), 9080);
const APP_PORT: u16 = 9080;
const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15000);

pub(super) async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if let Some(missing) = weft_netns::missing_prerequisite() {
        anyhow::bail!("--netns: {missing}");
    }
    let network = Network::create(&std::env::current_exe()?).map_err(anyhow::Error::msg)?;
    let client = Arc::new(network.pod("productpage").map_err(anyhow::Error::msg)?);
    let mut servers = Vec::new();
    for name in SERVICES {
        servers.push(Arc::new(network.pod(name).map_err(anyhow::Error::msg)?));
    }
    let entry = |pod: &Pod| SocketAddr::new(pod.ip().into(), APP_PORT);
    let yaml = mesh_yaml(REVIEWS, entry(&servers[0]), entry(&servers[1]));
    let control = Control::start(&network, &[("reviews.yaml", &yaml)]).map_err(anyhow::Error::msg)?;
    println!(
        "weft control   pod {} ({}), xDS and CA on {}",
        control.pod().netns(),
        control.pod().ip(),
        control.url()
    );

    for (name, pod) in SERVICES.into_iter().zip(&servers) {
        serve_app(pod.listen(SocketAddr::new([0, 0, 0, 0].into(), APP_PORT))?, name);
        control
            .inject(pod, "demo", "reviews", &[])
            .map_err(anyhow::Error::msg)?;
        println!(
            "pod {:<12} {:<12} app on :{APP_PORT}, weft init + weft proxy (UID 1337)",
            name,
            pod.ip()
        );
    }
    control
        .inject(&client, "demo", "productpage", &[])
        .map_err(anyhow::Error::msg)?;
    println!(
        "pod {:<12} {:<12} the client; it calls {REVIEWS} and nothing else",
        "productpage",
        client.ip()
    );

    let clients: Vec<(Arc<Pod>, PodClient)> = std::iter::once(client.clone())
        .chain(servers.iter().cloned())
        .map(|pod| {
            (
                pod.clone(),
                Client::builder(TokioExecutor::new()).build(PodConnector(pod)),
            )
        })
        .collect();
    for (pod, admin) in &clients {
        wait_ready(pod, admin).await?;
    }
    println!(
        "\nwatch the wire between pods (only TLS):  tcpdump -i {} -nn -A tcp port {APP_PORT}",
        network.bridge()
    );
    println!(
        "look inside a pod:  ip netns exec {} iptables-save -t nat   |   ip netns exec {} curl -s 127.0.0.1:15000/clusters\n",
        client.netns(),
        client.netns()
    );

    let (_, app) = &clients[0];
    let (report, canary) = traffic(app, REVIEWS, &args).await;
    println!("\nidentities of each hop (mutual TLS, certificates from weft control's CA):");
    for (pod, admin) in &clients {
        println!(
            "  {:<12} presents {}",
            pod.name(),
            certificate_identity(admin, ADMIN).await?
        );
    }
    println!("  the apps saw callers: {:?}", report.callers);
    let capture_rules = client
        .exec(&["iptables-save", "-t", "nat"])
        .map_err(anyhow::Error::msg)?
        .lines()
        .filter(|l| l.starts_with("-A") && l.contains("WEFT_"))
        .count();
    println!(
        "  capture rules in {}: {capture_rules} (weft init)",
        client.name()
    );
    println!("\nclient-side weft metrics (GET /metrics in {}):", client.name());
    for line in fetch_metrics(app, ADMIN).await?.lines() {
        if line.starts_with("istio_requests_total") {
            println!("  {line}");
        }
    }
    // Dropping the pods and the network kills every process and deletes the namespaces and the bridge.
    Ok(verdict(&report, &canary))
}

async fn wait_ready(pod: &Pod, admin: &PodClient) -> anyhow::Result<()> {
    for _ in 0..300 {
        if admin_get(admin, ADMIN, "/ready")
            .await
            .is_ok_and(|body| body == "ready\n")
        {
            return Ok(());
        }
        if !pod.is_running("proxy") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "the proxy in pod {} did not become ready:\n{}",
        pod.name(),
        pod.log("proxy")
    )
}

/// An HTTP client whose connections start inside a pod.
type PodClient = Client<PodConnector, Empty<Bytes>>;

/// Connects from inside a pod: the socket is made in the pod's network namespace, so the pod's rules
/// and loopback apply to it.
#[derive(Debug, Clone)]
struct PodConnector(Arc<Pod>);

impl tower_service::Service<hyper::Uri> for PodConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let pod = self.0.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("{uri}: not ip:port")))?;
            Ok(TokioIo::new(pod.connect(addr).await?))
        })
    }
}
