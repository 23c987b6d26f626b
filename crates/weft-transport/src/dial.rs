//! Dialling an upstream endpoint: plain TCP, or mutual TLS to a mesh peer that must prove one of the
//! identities the configuration expects. Used by the HTTP pools and by opaque TCP alike.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use weft_identity::SpiffeId;
use weft_identity::tls::TlsMaterial;

/// The server name sent in mesh handshakes. Peers are verified by SPIFFE identity, not by name.
const MESH_SNI: &str = "outbound.weft.mesh";

/// How connections to an endpoint are made; part of the pool key, so a configuration change gets a
/// fresh pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DialSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Mutual TLS: the identities the endpoint may present. `None`: plaintext.
    pub tls: Option<Arc<[SpiffeId]>>,
    /// The local address to connect from; `None`: the kernel's choice.
    pub source: Option<std::net::IpAddr>,
}

impl DialSettings {
    /// How connections to `cluster`'s endpoints are made.
    pub fn for_cluster(cluster: &weft_model::Cluster) -> Self {
        Self {
            connect_timeout: cluster.connect_timeout,
            idle_timeout: cluster.idle_timeout,
            tls: cluster.tls.as_ref().map(|t| t.identities.clone()),
            source: None,
        }
    }
}

/// One address, dialled as it says: the original destination (egress passthrough) or the app beside
/// the proxy (inbound). What a connection or request goes to when no cluster is involved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Direct {
    pub addr: SocketAddr,
    pub settings: DialSettings,
}

/// Why an upstream connection could not be made; all are connect failures (`UF`).
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error(transparent)]
    Tcp(#[from] crate::ConnectError),
    #[error("no workload certificate yet for mutual TLS to {0}")]
    NoCertificate(SocketAddr),
    #[error("mutual TLS to {endpoint} failed: {reason}")]
    Tls { endpoint: SocketAddr, reason: String },
}

/// Connects to `endpoint`: plain TCP, or mutual TLS offering `alpn`.
pub async fn dial(
    endpoint: SocketAddr,
    settings: &DialSettings,
    tls: &watch::Receiver<Option<TlsMaterial>>,
    alpn: &[&[u8]],
) -> Result<UpstreamIo, DialError> {
    let stream = crate::connect(endpoint, settings.source, settings.connect_timeout).await?;
    let Some(expected) = &settings.tls else {
        return Ok(UpstreamIo::Plain { stream });
    };
    let material = tls.borrow().clone().ok_or(DialError::NoCertificate(endpoint))?;
    let config = material
        .client_config(expected, alpn)
        .map_err(|e| DialError::Tls {
            endpoint,
            reason: e.to_string(),
        })?;
    let name = rustls::pki_types::ServerName::try_from(MESH_SNI).map_err(|e| DialError::Tls {
        endpoint,
        reason: e.to_string(),
    })?;
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, stream);
    let tls = tokio::time::timeout(settings.connect_timeout, handshake)
        .await
        .map_err(|_| DialError::Tls {
            endpoint,
            reason: "handshake timed out".into(),
        })?
        .map_err(|e| {
            let reason = e.to_string();
            // Names the identities expected and presented when they differ.
            tracing::warn!(%endpoint, %reason, "mutual TLS handshake failed");
            DialError::Tls { endpoint, reason }
        })?;
    Ok(UpstreamIo::Tls {
        stream: Box::new(tls),
    })
}

pin_project! {
    /// An upstream connection: plain, or mutual TLS.
    #[project = UpstreamIoProj]
    #[derive(Debug)]
    pub enum UpstreamIo {
        Plain { #[pin] stream: TcpStream },
        Tls { #[pin] stream: Box<tokio_rustls::client::TlsStream<TcpStream>> },
    }
}

impl UpstreamIo {
    /// Whether ALPN chose HTTP/2.
    pub fn negotiated_h2(&self) -> bool {
        match self {
            UpstreamIo::Plain { .. } => false,
            UpstreamIo::Tls { stream } => stream.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.project() {
            UpstreamIoProj::Plain { stream } => stream.poll_read(cx, buf),
            UpstreamIoProj::Tls { stream } => stream.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.project() {
            UpstreamIoProj::Plain { stream } => stream.poll_write(cx, buf),
            UpstreamIoProj::Tls { stream } => stream.poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.project() {
            UpstreamIoProj::Plain { stream } => stream.poll_flush(cx),
            UpstreamIoProj::Tls { stream } => stream.poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.project() {
            UpstreamIoProj::Plain { stream } => stream.poll_shutdown(cx),
            UpstreamIoProj::Tls { stream } => stream.poll_shutdown(cx),
        }
    }
}
