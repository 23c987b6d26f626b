//! Serving xDS and the CA over TLS (Istio's 15012): the control plane's certificate comes from its own
//! CA, so proxies verify it with the root they already trust for workload certificates.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::ca::CertificateAuthority;

pin_project! {
    /// A TLS connection as tonic's server takes it.
    pub struct TlsConn {
        #[pin]
        inner: tokio_rustls::server::TlsStream<TcpStream>,
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Accepts TLS connections on `listener`; each handshake runs on its own task so a slow client never
/// holds up the others.
pub fn incoming(
    listener: TcpListener,
    ca: &CertificateAuthority,
    alpn: &[&[u8]],
) -> io::Result<ReceiverStream<Result<TlsConn, io::Error>>> {
    // Clients that dial the listener's own address (not a name) verify it too.
    let ip = listener.local_addr()?.ip();
    let ips: Vec<std::net::IpAddr> = match ip.is_unspecified() || ip.is_loopback() {
        true => Vec::new(),
        false => vec![ip],
    };
    let (chain, key) = ca.serving_certificate(&ips).map_err(io::Error::other)?;
    let certs = chain
        .iter()
        .take(1)
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).map_err(io::Error::other))
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(io::Error::other)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(io::Error::other)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tracing::warn!(error = %err, "TLS accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let (acceptor, conns) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(tls) => {
                        let _ = conns.send(Ok(TlsConn { inner: tls })).await;
                    }
                    Err(err) => tracing::debug!(%peer, error = %err, "TLS handshake with a client failed"),
                }
            });
        }
    });
    Ok(ReceiverStream::new(rx))
}
