//! What every connection does once its destination is decided: detect the protocol, then serve it as
//! HTTP (request by request, through the pools) or forward it as opaque TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use weft_http::{HttpContext, PoolSettings, Upstream};
use weft_model::{Protocol, Target};
use weft_telemetry::{Peers, ResponseFlags, TcpLabels};
use weft_transport::PrefixedIo;

use crate::app::Inputs;
use crate::detect::{Handling, detect};

/// Where a connection goes.
#[derive(Debug, Clone)]
pub(crate) enum Destination {
    /// A service or listener: HTTP requests by its routes (looked up again for every request), opaque
    /// bytes to its cluster.
    Target(Target, TargetKey),
    /// One address: the original destination (passthrough) or the app (inbound).
    Direct(SocketAddr, PoolSettings),
}

impl Destination {
    fn protocol(&self) -> Protocol {
        match self {
            Destination::Target(target, _) => target.protocol,
            Destination::Direct(..) => Protocol::Detect,
        }
    }
}

/// How to find a connection's target in a newer configuration snapshot.
#[derive(Debug, Clone)]
pub(crate) enum TargetKey {
    /// The outbound service at this original destination.
    Service(SocketAddr),
    /// The explicit listener of this name.
    Listener(String),
}

/// The routes of one target, read from the configuration snapshot current at each request.
#[derive(Debug)]
pub(crate) struct LiveRoutes {
    pub(crate) mesh: tokio::sync::watch::Receiver<Arc<weft_model::Mesh>>,
    pub(crate) key: TargetKey,
}

impl weft_http::RouteSource for LiveRoutes {
    fn current(&self) -> Option<Arc<weft_model::RouteTable>> {
        let mesh = self.mesh.borrow().clone();
        match &self.key {
            TargetKey::Service(dst) => mesh.outbound.as_ref()?.service_for(*dst).map(|t| t.route.clone()),
            TargetKey::Listener(name) => mesh
                .listeners
                .iter()
                .find(|l| &l.name == name)
                .map(|l| l.target.route.clone()),
        }
    }
}

/// A connection whose destination is decided.
#[derive(Debug)]
pub(crate) struct Routed {
    pub(crate) stream: TcpStream,
    pub(crate) orig_dst: SocketAddr,
    pub(crate) destination: Destination,
    /// Overrides the destination's protocol (inbound ports declare theirs).
    pub(crate) protocol: Option<Protocol>,
    pub(crate) peers: Peers,
    pub(crate) inbound: bool,
}

pub(crate) async fn serve(inputs: Arc<Inputs>, conn: Routed, detect_timeout: std::time::Duration) {
    let protocol = conn.protocol.unwrap_or_else(|| conn.destination.protocol());
    // A connection still waiting for its first bytes has nothing in flight: draining closes it.
    let (io, handling, hello) = tokio::select! {
        detected = detect(conn.stream, protocol, detect_timeout) => detected,
        () = inputs.drain.cancelled() => return,
    };
    let detected = if hello.is_some() { "tls" } else { handling.name() };
    inputs.metrics.count_detection(conn.inbound, detected);
    if let Some(hello) = &hello {
        tracing::debug!(sni = ?hello.server_name, alpn = ?hello.alpn, dst = %conn.orig_dst, "TLS from the client, forwarded as opaque");
    }
    match handling {
        Handling::Http(version) => {
            let upstream = match conn.destination {
                Destination::Target(_, key) => Upstream::Routes(inputs.live_routes(key)),
                Destination::Direct(addr, settings) => Upstream::Direct { addr, settings },
            };
            let ctx = Arc::new(HttpContext {
                upstream,
                orig_dst: conn.orig_dst,
                version,
                peers: conn.peers,
            });
            let forwarder = inputs.forwarder.clone();
            let result = weft_http::serve(io, version, inputs.drain.clone(), move |req| {
                let forwarder = forwarder.clone();
                let ctx = ctx.clone();
                async move { forwarder.forward(req, &ctx).await }
            })
            .await;
            if let Err(err) = result {
                tracing::debug!(error = %err, dst = %conn.orig_dst, "HTTP connection ended with an error");
            }
        }
        Handling::Opaque => forward_tcp(&inputs, io, conn.destination, conn.peers, conn.orig_dst).await,
    }
}

/// Copies bytes both ways until both sides have closed, half-close included: when one side finishes
/// sending, the other side's write half is shut down and the opposite direction keeps flowing.
async fn forward_tcp(
    inputs: &Inputs,
    mut downstream: PrefixedIo<TcpStream>,
    destination: Destination,
    peers: Peers,
    dst: SocketAddr,
) {
    let mut labels = TcpLabels {
        peers,
        response_flags: ResponseFlags::NONE,
    };
    let picked = match &destination {
        Destination::Direct(addr, settings) => Ok((*addr, *settings)),
        Destination::Target(
            Target {
                cluster: Some(cluster),
                ..
            },
            _,
        ) => inputs
            .forwarder
            .pick_endpoint(cluster)
            .ok_or(ResponseFlags::NO_HEALTHY_UPSTREAM),
        Destination::Target(Target { cluster: None, .. }, _) => Err(ResponseFlags::NO_CLUSTER),
    };
    let (endpoint, settings) = match picked {
        Ok(picked) => picked,
        Err(flags) => {
            labels.response_flags = flags;
            inputs.metrics.tcp_closed.get_or_create(&labels).inc();
            tracing::info!(%dst, %flags, "no upstream for this TCP connection; closing it");
            return;
        }
    };
    let mut upstream = match weft_transport::connect(endpoint, settings.connect_timeout).await {
        Ok(stream) => stream,
        Err(err) => {
            labels.response_flags = ResponseFlags::UPSTREAM_CONNECT_FAILURE;
            inputs.metrics.tcp_closed.get_or_create(&labels).inc();
            tracing::info!(%dst, error = %err, "upstream connect failed; closing the connection");
            return;
        }
    };
    inputs.metrics.tcp_opened.get_or_create(&labels).inc();

    let copied = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => copied,
        () = inputs.force_close.cancelled() => {
            labels.response_flags = ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION;
            Ok((0, 0))
        }
    };
    match copied {
        Ok((received, sent)) => {
            inputs
                .metrics
                .tcp_received_bytes
                .get_or_create(&labels)
                .inc_by(received);
            inputs.metrics.tcp_sent_bytes.get_or_create(&labels).inc_by(sent);
            tracing::debug!(%dst, %endpoint, received, sent, "TCP connection closed");
        }
        Err(err) => {
            labels.response_flags = ResponseFlags::UPSTREAM_CONNECTION_TERMINATION;
            tracing::debug!(%dst, %endpoint, error = %err, "TCP connection failed");
        }
    }
    inputs.metrics.tcp_closed.get_or_create(&labels).inc();
}
