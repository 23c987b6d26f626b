//! gRPC channels to the control plane: plaintext for `http://` (development, port 15010), TLS verified
//! against the control plane's root for `https://` (port 15012).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("invalid control plane address \"{0}\"")]
    Address(String),
    #[error("{0} needs the control plane's root certificate to verify it")]
    NoRoot(String),
    #[error("the control plane root does not parse: {0}")]
    Root(String),
}

/// A lazily connecting channel; it reconnects by itself.
pub fn channel(
    address: &str,
    root_pem: Option<&str>,
    connect_timeout: Duration,
) -> Result<Channel, ChannelError> {
    let endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(|_| ChannelError::Address(address.to_owned()))?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if !address.starts_with("https://") {
        return Ok(endpoint.connect_lazy());
    }
    let root = root_pem.ok_or_else(|| ChannelError::NoRoot(address.to_owned()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root.as_bytes()) {
        let cert = cert.map_err(|e| ChannelError::Root(e.to_string()))?;
        roots.add(cert).map_err(|e| ChannelError::Root(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ChannelError::Root(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let service = tower::service_fn(move |uri: Uri| {
        let connector = connector.clone();
        async move {
            let host = uri
                .host()
                .unwrap_or("localhost")
                .trim_matches(['[', ']'])
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host).map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(service))
}
