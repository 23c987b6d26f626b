//! What every connection does once its destination is decided: detect the protocol, then serve it as
//! HTTP (request by request, through the pools) or forward it as opaque TCP.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite};
use weft_http::HttpVersion;
use weft_http::{HttpContext, Upstream};

use crate::tcp::TcpConnectError;
use weft_model::{HttpSettings, PeerAuthentication, Protocol, Target};
use weft_telemetry::access_log::{AccessLogs, Entry};
use weft_telemetry::{ConnectionSecurity, Label, Peers, Reporter, ResponseFlags, TcpLabels};
use weft_transport::PrefixedIo;

use crate::destination::{AuthzKey, Destination, LivePolicy, Routed};
use crate::detect::{Handling, Patience, Sniffed, detect};
use crate::inputs::Inputs;

/// What a connection does once its protocol and peer are known (the HTTP server, the TCP copy), for as
/// long as it lasts.
pub(crate) type Stage = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One connection's first steps: detect, terminate mutual TLS where peers arrive, and decide how to
/// forward it; `None` when it is closed before that.
///
/// The lasting stage is returned rather than awaited, and the large steps (the TLS handshake, detection)
/// are boxed, so that once this future is dropped an idle keep-alive connection costs its HTTP server's
/// state, not this function's nor a TLS handshake's.
pub(crate) async fn serve(
    inputs: Arc<Inputs>,
    conn: Routed,
    detect_timeout: std::time::Duration,
) -> Option<Stage> {
    let declared = conn.protocol.unwrap_or_else(|| conn.destination.protocol());
    // Mesh peers speak TLS first, so where mutual TLS is possible the first bytes are read whatever the
    // port declares. A connection still waiting for its first bytes has nothing in flight: draining
    // closes it.
    let sniffed = if conn.peer_authentication == PeerAuthentication::Disable {
        declared
    } else {
        Protocol::Detect
    };
    let patience = Patience {
        detect_timeout,
        silent: inputs.silent.clone(),
        idle_timeout: inputs.mesh().idle_timeout,
        request_headers_timeout: conn.http.request_headers_timeout,
        max_head_bytes: usize::try_from(conn.http.limits.max_request_headers_bytes()).unwrap_or(usize::MAX),
        metrics: inputs.metrics.clone(),
    };
    let Sniffed {
        io,
        handling,
        hello,
        silent,
    } = tokio::select! {
        detected = Box::pin(detect(conn.stream, sniffed, &patience)) => detected,
        () = inputs.drain.cancelled() => return None,
    };
    let Routed {
        orig_dst,
        destination,
        mut peers,
        inbound,
        peer_authentication,
        source,
        authz,
        http,
        access_log,
        tracing,
        ..
    } = conn;
    let access_log = inputs.access_log(&access_log);
    let tracer = inputs.tracer(&tracing);
    let server_name: Option<Arc<str>> = hello
        .as_ref()
        .and_then(|h| h.server_name.as_deref())
        .map(Arc::from);
    let authz = authz.map(|key| Authz {
        key,
        source,
        destination: orig_dst,
        server_name: server_name.clone(),
    });
    let detected = if hello.is_some() { "tls" } else { handling.name() };
    inputs.metrics.count_detection(inbound, detected);

    let terminate = hello.is_some() && peer_authentication != PeerAuthentication::Disable;
    if terminate {
        let Some(material) = inputs.tls.borrow().clone() else {
            tracing::warn!(dst = %orig_dst, "mutual TLS connection before the first certificate arrived; closing it");
            return None;
        };
        let config = match material.server_config() {
            Ok(config) => config,
            Err(err) => {
                tracing::error!(error = %err, "cannot build the TLS server configuration");
                return None;
            }
        };
        let handshake = Box::pin(tokio_rustls::TlsAcceptor::from(config).accept(io));
        let accepted = tokio::select! {
            accepted = handshake => accepted,
            () = inputs.drain.cancelled() => return None,
        };
        let tls = match accepted {
            Ok(tls) => tls,
            Err(err) => {
                tracing::info!(dst = %orig_dst, error = %err, "mutual TLS handshake failed; closing");
                return None;
            }
        };
        let (_, session) = tls.get_ref();
        let client = session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(weft_identity::tls::identity_of);
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        peers.connection_security_policy = ConnectionSecurity::mutual_tls;
        peers.source_principal = client
            .as_ref()
            .map_or_else(Label::unknown, |id| Label::from(id.to_string()));
        let principal: Option<Arc<str>> = client.as_ref().map(|id| Arc::from(id.to_string()));
        let client_cert = client.map(|id| format!("By={};URI={id}", material.credentials.id));
        let handling = match alpn.as_deref() {
            Some(b"h2") => Some(Handling::Http(HttpVersion::Http2)),
            Some(b"http/1.1") => Some(Handling::Http(HttpVersion::Http1)),
            _ => None,
        };
        let (io, handling) = match handling {
            Some(handling) => (PrefixedIo::new(Default::default(), tls), handling),
            None => {
                let sniffed = Box::pin(detect(tls, declared, &patience)).await;
                (sniffed.io, sniffed.handling)
            }
        };
        return Some(forward(
            inputs,
            io,
            handling,
            Connection {
                source,
                orig_dst,
                destination,
                peers,
                client: match &principal {
                    Some(id) => client_key(id.as_bytes()),
                    None => client_key(source.ip().to_string().as_bytes()),
                },
                client_cert,
                peer_identity: principal.clone(),
                server_name,
                authz: authz.map(|a| (a, principal)),
                http,
                access_log,
                tracer,
                silent,
            },
        ));
    }
    if peer_authentication == PeerAuthentication::Strict {
        tracing::info!(dst = %orig_dst, "plaintext connection refused: mutual TLS is STRICT here");
        let labels = TcpLabels {
            peers,
            response_flags: ResponseFlags::NONE,
        };
        inputs.metrics.tcp_closed.get_or_create(&labels).inc();
        return None;
    }
    if let Some(hello) = &hello {
        tracing::debug!(sni = ?hello.server_name, alpn = ?hello.alpn, dst = %orig_dst, "TLS from the client, forwarded as opaque");
    }
    // Sniffed only for mutual TLS: the port's declared protocol still decides.
    let handling = match (declared, handling) {
        (Protocol::Tcp, _) => Handling::Opaque,
        (Protocol::Http2, _) => Handling::Http(HttpVersion::Http2),
        (Protocol::Http, Handling::Opaque) => Handling::Http(HttpVersion::Http1),
        (_, handling) => handling,
    };
    let stage = forward(
        inputs,
        io,
        handling,
        Connection {
            source,
            orig_dst,
            destination,
            peers,
            client: client_key(source.ip().to_string().as_bytes()),
            client_cert: None,
            peer_identity: None,
            server_name,
            authz: authz.map(|a| (a, None)),
            http,
            access_log,
            tracer,
            silent,
        },
    );
    Some(stage)
}

/// What authorizing a connection needs besides the caller's identity.
struct Authz {
    key: AuthzKey,
    source: SocketAddr,
    destination: SocketAddr,
    server_name: Option<Arc<str>>,
}

/// What forwarding a connection needs once its protocol and peer are known.
struct Connection {
    /// The client's address.
    source: SocketAddr,
    orig_dst: SocketAddr,
    destination: Destination,
    peers: Peers,
    /// Who the client is, hashed: its verified identity, else its address.
    client: u64,
    /// `x-forwarded-client-cert` for the app, when the client proved an identity.
    client_cert: Option<String>,
    /// The SPIFFE ID the client proved.
    peer_identity: Option<Arc<str>>,
    /// The TLS server name the client asked for.
    server_name: Option<Arc<str>>,
    access_log: Option<Arc<AccessLogs>>,
    /// Spans for its HTTP requests.
    tracer: Option<Arc<weft_telemetry::traces::Tracing>>,
    /// Where peers arrive: the policy, and the principal the connection proved.
    authz: Option<(Authz, Option<Arc<str>>)>,
    http: HttpSettings,
    /// The silent budget's place, for a connection that began silent: held until it ends (its stage
    /// holds it).
    silent: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Connection {
    fn authorization(&self, inputs: &Inputs, http: bool) -> Option<weft_authz::connection::ConnectionAuthz> {
        let (authz, principal) = self.authz.as_ref()?;
        Some(weft_authz::connection::ConnectionAuthz {
            policy: Arc::new(LivePolicy {
                mesh: inputs.mesh_changes(),
                key: authz.key.clone(),
                http,
            }),
            principal: principal.clone(),
            source: authz.source.ip(),
            destination: authz.destination,
            server_name: authz.server_name.clone(),
        })
    }
}

/// The lasting stage of a connection. It holds only its protocol's state (for an idle connection, all
/// that it costs), none of what setting it up needed.
fn forward<S>(inputs: Arc<Inputs>, io: PrefixedIo<S>, handling: Handling, conn: Connection) -> Stage
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match handling {
        Handling::Close => {
            tracing::debug!(dst = %conn.orig_dst, "closing a connection whose client never spoke");
            Box::pin(std::future::ready(()))
        }
        Handling::Http(version) => {
            let authorization = conn.authorization(&inputs, true);
            let upstream = match conn.destination {
                Destination::Target(_, key) => Upstream::Routes(inputs.live_routes(key)),
                Destination::Direct(direct) => Upstream::Direct(direct),
            };
            let ctx = Arc::new(HttpContext {
                authorization,
                upstream,
                orig_dst: conn.orig_dst,
                version,
                peers: conn.peers,
                client_cert: conn
                    .client_cert
                    .and_then(|v| http::HeaderValue::from_str(&v).ok()),
                stream_idle_timeout: conn.http.stream_idle_timeout,
                request_timeout: conn.http.request_timeout,
                client: conn.client,
                source: Some(conn.source),
                peer_identity: conn.peer_identity,
                server_name: conn.server_name,
                access_log: conn.access_log,
                tracing: conn.tracer,
            });
            let forwarder = inputs.forwarder.clone();
            let settings = weft_http::ServeSettings {
                idle: inputs.mesh().idle_timeout,
                request_headers: conn.http.request_headers_timeout,
                limits: conn.http.limits,
                overload: inputs.overload.clone(),
                parked: inputs.metrics.downstream_connections_parked.clone(),
                source: Some(conn.source.ip()),
            };
            let served = weft_http::serve(io, version, inputs.drain.clone(), settings, move |req| {
                let forwarder = forwarder.clone();
                let ctx = ctx.clone();
                async move { forwarder.forward(req, &ctx).await }
            });
            let orig_dst = conn.orig_dst;
            let silent = conn.silent;
            // Mapped, not awaited in an async block, which would hold the future's space twice.
            Box::pin(served.map(move |result| {
                drop(silent);
                if let Err(err) = result {
                    tracing::debug!(error = %err, dst = %orig_dst, "HTTP connection ended with an error");
                }
            }))
        }
        Handling::Opaque => {
            let authz = conn.authorization(&inputs, false);
            let log = conn.access_log.clone().map(|logs| TcpLog {
                logs,
                start: std::time::SystemTime::now(),
                began: std::time::Instant::now(),
                source: conn.source,
                destination: conn.orig_dst,
                peer_identity: conn.peer_identity.clone(),
                server_name: conn.server_name.clone(),
                cluster: match &conn.destination {
                    Destination::Target(Target { cluster: Some(c), .. }, _) => {
                        Some(Arc::from(c.name.as_str()))
                    }
                    _ => None,
                },
            });
            let silent = conn.silent;
            Box::pin(
                forward_tcp(
                    inputs,
                    io,
                    conn.destination,
                    conn.peers,
                    conn.orig_dst,
                    authz,
                    log,
                )
                .map(move |()| drop(silent)),
            )
        }
    }
}

/// What an opaque connection's access-log entry needs, known when it is accepted.
struct TcpLog {
    logs: Arc<AccessLogs>,
    start: std::time::SystemTime,
    began: std::time::Instant,
    source: SocketAddr,
    destination: SocketAddr,
    peer_identity: Option<Arc<str>>,
    server_name: Option<Arc<str>>,
    cluster: Option<Arc<str>>,
}

impl TcpLog {
    /// The connection's entry, when it has closed (or was refused).
    fn write(self, flags: ResponseFlags, upstream: Option<SocketAddr>, received: u64, sent: u64) {
        self.logs.log(Entry {
            start: Some(self.start),
            flags,
            bytes_received: received,
            bytes_sent: sent,
            duration: self.began.elapsed(),
            upstream_host: upstream,
            upstream_cluster: self.cluster,
            downstream_local: Some(self.destination),
            downstream_remote: Some(self.source),
            peer_uri_san: self.peer_identity,
            requested_server_name: self.server_name,
            ..Entry::default()
        });
    }
}

/// How often an open TCP connection's byte counters are reported (Istio's `tcp_reporting_duration`).
const TCP_REPORTING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

/// Copies bytes both ways until both sides have closed, half-close included: when one side finishes
/// sending, the other side's write half is shut down and the opposite direction keeps flowing.
async fn forward_tcp<S>(
    inputs: Arc<Inputs>,
    downstream: PrefixedIo<S>,
    destination: Destination,
    peers: Peers,
    dst: SocketAddr,
    authz: Option<weft_authz::connection::ConnectionAuthz>,
    log: Option<TcpLog>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut labels = TcpLabels {
        peers,
        response_flags: ResponseFlags::NONE,
    };
    let refused = |labels: &TcpLabels, log: Option<TcpLog>| {
        inputs.metrics.tcp_closed.get_or_create(labels).inc();
        if let Some(log) = log {
            log.write(labels.response_flags, None, 0, 0);
        }
    };
    // Opaque connections are authorized on what exists at L4 before anything reaches the app.
    if let Some(authz) = &authz
        && !authz.decide(None, inputs.forwarder.decisions()).is_allowed()
    {
        labels.response_flags = ResponseFlags::RBAC_DENIED;
        refused(&labels, log);
        return;
    }
    let connected = match &destination {
        Destination::Direct(direct) => weft_transport::dial(direct.addr, &direct.settings, &inputs.tls, &[])
            .await
            .map(|io| (io, direct.addr, None, None))
            .map_err(TcpConnectError::Connect),
        Destination::Target(
            Target {
                cluster: Some(cluster),
                ..
            },
            _,
        ) => crate::tcp::connect_cluster(inputs.forwarder.clusters(), &inputs.tls, cluster)
            .await
            .map(|c| (c.io, c.endpoint, c.workload, Some(c.held))),
        Destination::Target(Target { cluster: None, .. }, _) => {
            labels.response_flags = ResponseFlags::NO_CLUSTER;
            refused(&labels, log);
            tracing::info!(%dst, "no cluster for this TCP connection; closing it");
            return;
        }
    };
    let (mut upstream, endpoint, workload, _held) = match connected {
        Ok(connected) => connected,
        Err(err) => {
            labels.response_flags = err.flags();
            refused(&labels, log);
            tracing::info!(%dst, error = %err, "no upstream connection; closing the connection");
            return;
        }
    };
    // The client side names the workload it reached as discovery's endpoint metadata does (opaque
    // TCP carries no metadata exchange); the server side knows itself already.
    if let Some(workload) = workload.filter(|_| labels.peers.reporter == Reporter::source) {
        labels.peers.set_destination(&workload);
    }
    inputs.metrics.tcp_opened.get_or_create(&labels).inc();

    // No bytes either way for the idle timeout closes both sides (Envoy's TCP proxy idle_timeout).
    let activity = weft_transport::Activity::new();
    let mut downstream = weft_transport::IdleIo::new(downstream, activity.clone());
    let idle = async {
        match inputs.mesh().idle_timeout {
            Some(timeout) => activity.idle(timeout).await,
            None => std::future::pending().await,
        }
    };
    // The byte counters report while the connection is open (Istio's `tcp_reporting_duration`), so a
    // long-lived connection shows its traffic before it closes; the rest is added when it does.
    let mut reported = (0, 0);
    let report = |labels: &TcpLabels, reported: &mut (u64, u64)| {
        let (received, sent) = activity.bytes();
        inputs
            .metrics
            .tcp_received_bytes
            .get_or_create(labels)
            .inc_by(received - reported.0);
        inputs
            .metrics
            .tcp_sent_bytes
            .get_or_create(labels)
            .inc_by(sent - reported.1);
        *reported = (received, sent);
    };
    let copy = tokio::io::copy_bidirectional(&mut downstream, &mut upstream);
    let revoked = revoked(&inputs, authz.as_ref());
    tokio::pin!(copy, idle, revoked);
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::now() + TCP_REPORTING_INTERVAL,
        TCP_REPORTING_INTERVAL,
    );
    let copied = loop {
        tokio::select! {
            copied = &mut copy => break copied.map(|_| ()),
            _ = ticks.tick() => report(&labels, &mut reported),
            () = &mut idle => {
                tracing::debug!(%dst, %endpoint, "closing an idle TCP connection");
                break Ok(());
            }
            () = inputs.force_close.cancelled() => {
                labels.response_flags = ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION;
                break Ok(());
            }
            () = &mut revoked => {
                tracing::info!(%dst, %endpoint, "closing a TCP connection the authorization policy no longer allows");
                labels.response_flags = ResponseFlags::RBAC_DENIED;
                break Ok(());
            }
        }
    };
    if let Err(err) = copied {
        labels.response_flags = ResponseFlags::UPSTREAM_CONNECTION_TERMINATION;
        tracing::debug!(%dst, %endpoint, error = %err, "TCP connection failed");
    }
    // Counted as they passed, so a connection closed by a timeout or a failure reports what it carried.
    // The bytes reported while it was open carry the labels it had then (no flags).
    let (received, sent) = activity.bytes();
    report(&labels, &mut reported);
    tracing::debug!(%dst, %endpoint, received, sent, "TCP connection closed");
    inputs.metrics.tcp_closed.get_or_create(&labels).inc();
    if let Some(log) = log {
        log.write(labels.response_flags, Some(endpoint), received, sent);
    }
}

/// Resolves when a configuration change leaves the connection no longer allowed (Envoy's network RBAC
/// closes such connections); never without a policy.
async fn revoked(inputs: &Inputs, authz: Option<&weft_authz::connection::ConnectionAuthz>) {
    let Some(authz) = authz else {
        return std::future::pending().await;
    };
    let mut changes = inputs.mesh_changes();
    while changes.changed().await.is_ok() {
        if !authz.decide(None, inputs.forwarder.decisions()).is_allowed() {
            return;
        }
    }
    std::future::pending().await
}

fn client_key(who: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    who.hash(&mut hasher);
    hasher.finish()
}
