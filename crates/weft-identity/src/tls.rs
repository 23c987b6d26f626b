//! Mutual TLS between sidecars: rustls configurations built from the current credentials.
//!
//! Both sides speak TLS 1.3 only and verify the peer's chain against the trust bundle. The client then
//! requires the server's single URI SAN to be one of the identities it was told to expect; the server
//! requires a client certificate and reports the client's identity. Configurations are rebuilt for each
//! new certificate, so the next handshake uses it and established connections are untouched.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::{Credentials, SpiffeId};

/// ALPN offered between sidecars.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("PEM does not parse: {0}")]
    Pem(String),
    #[error("the trust bundle has no usable root: {0}")]
    Roots(String),
    #[error("the certificate does not chain to a trusted root: {0}")]
    Untrusted(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// What admin shows of one certificate (Envoy's `CertificateDetails`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// Lowercase hex, as Envoy prints it.
    pub serial_number: String,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub not_before: std::time::SystemTime,
    pub not_after: std::time::SystemTime,
}

impl CertificateSummary {
    /// `None` for DER that does not parse (never the case for certificates a handshake accepted).
    fn of(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
        let names = x509
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| san.value.general_names.clone())
            .unwrap_or_default();
        let sans = |uri: bool| {
            names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(name) if uri => Some((*name).to_owned()),
                    GeneralName::DNSName(name) if !uri => Some((*name).to_owned()),
                    _ => None,
                })
                .collect()
        };
        let time = |t: x509_parser::time::ASN1Time| {
            let seconds = u64::try_from(t.timestamp()).unwrap_or(0);
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds)
        };
        Some(Self {
            serial_number: x509.raw_serial().iter().map(|b| format!("{b:02x}")).collect(),
            uri_sans: sans(true),
            dns_sans: sans(false),
            not_before: time(x509.validity().not_before),
            not_after: time(x509.validity().not_after),
        })
    }
}

/// Everything a handshake needs, for one certificate generation.
#[derive(Clone)]
pub struct TlsMaterial {
    pub credentials: Arc<Credentials>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    root_ders: Arc<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
    /// The server configuration is the same for every inbound connection: built once per certificate.
    server: Arc<std::sync::OnceLock<Arc<ServerConfig>>>,
    /// Client configurations by what they expect and offer, built once per certificate.
    clients: Arc<std::sync::Mutex<HashMap<ClientKey, Arc<ClientConfig>>>>,
}

/// What distinguishes one client configuration from another for the same certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    expected: Arc<[SpiffeId]>,
    alpn: Vec<Vec<u8>>,
}

/// More distinct (identities, ALPN) pairs than this in one certificate's lifetime start the cache over.
const MAX_CLIENT_CONFIGS: usize = 4096;

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.credentials.id)
            .field("serial", &self.credentials.serial)
            .finish()
    }
}

impl TlsMaterial {
    /// `trust_bundle`: the PEM roots to trust; the root the chain ends in is always one of them.
    pub fn new(credentials: Arc<Credentials>, trust_bundle: &[String]) -> Result<Self, TlsError> {
        let mut chain = Vec::new();
        for pem in &credentials.chain_pem[..credentials.chain_pem.len().saturating_sub(1)] {
            chain.push(
                CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))?,
            );
        }
        let key = PrivateKeyDer::from_pem_slice(credentials.key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        let mut root_ders = Vec::new();
        for pem in std::iter::once(credentials.root_pem()).chain(trust_bundle.iter().map(String::as_str)) {
            let der =
                CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))?;
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| TlsError::Roots(e.to_string()))?
                .to_owned();
            if root_ders.contains(&der) {
                continue;
            }
            roots
                .add(der.clone())
                .map_err(|e| TlsError::Roots(e.to_string()))?;
            anchors.push(anchor);
            root_ders.push(der);
        }
        Ok(Self {
            credentials,
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            anchors: Arc::new(anchors),
            root_ders: Arc::new(root_ders),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            server: Arc::new(std::sync::OnceLock::new()),
            clients: Arc::default(),
        })
    }

    /// The trusted roots as PEM.
    pub fn roots_pem(&self) -> String {
        self.root_ders.iter().map(|der| pem_certificate(der)).collect()
    }

    /// Whether the workload's own chain leads to one of the trusted roots, as a peer will check it.
    pub fn verify_own_chain(&self) -> Result<(), TlsError> {
        let Some((leaf, intermediates)) = self.chain.split_first() else {
            return Err(TlsError::Pem("the chain is empty".to_owned()));
        };
        let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| TlsError::Pem(e.to_string()))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| TlsError::Untrusted(e.to_string()))
    }

    /// The workload chain as presented (leaf first) and the trusted roots, for admin.
    pub fn summaries(&self) -> (Vec<CertificateSummary>, Vec<CertificateSummary>) {
        let summarize = |ders: &[CertificateDer<'static>]| {
            ders.iter().filter_map(|d| CertificateSummary::of(d)).collect()
        };
        (summarize(&self.chain), summarize(&self.root_ders))
    }

    /// SHA-256 fingerprints of the trusted roots, as `openssl x509 -fingerprint -sha256` prints them.
    pub fn root_fingerprints(&self) -> Vec<String> {
        self.root_ders
            .iter()
            .map(|der| {
                let digest = ring::digest::digest(&ring::digest::SHA256, der);
                digest
                    .as_ref()
                    .iter()
                    .map(|b| format!("{b:02X}"))
                    .collect::<Vec<_>>()
                    .join(":")
            })
            .collect()
    }

    /// For the inbound side: a client certificate chained to the trust bundle is required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some(config) = self.server.get() {
            return Ok(config.clone());
        }
        let config = self.build_server_config()?;
        Ok(self.server.get_or_init(|| config).clone())
    }

    fn build_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| TlsError::Roots(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// For an outbound connection: the server must prove one of `expected`. `alpn`: what to offer
    /// (the protocol the connection will carry). Built once per certificate and (identities, ALPN).
    pub fn client_config(
        &self,
        expected: &Arc<[SpiffeId]>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let key = ClientKey {
            expected: expected.clone(),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        };
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(config) = clients.get(&key) {
            return Ok(config.clone());
        }
        let config = self.build_client_config(expected.to_vec(), alpn)?;
        if clients.len() >= MAX_CLIENT_CONFIGS {
            clients.clear();
        }
        clients.insert(key, config.clone());
        Ok(config)
    }

    fn build_client_config(
        &self,
        expected: Vec<SpiffeId>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = SpiffeServerVerifier {
            anchors: self.anchors.clone(),
            expected,
            algorithms: self.provider.signature_verification_algorithms,
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Every handshake proves the server's identity afresh: a resumed session would skip the
        // certificate, and with it the identity check.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// One certificate as PEM text.
pub(crate) fn pem_certificate(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The SPIFFE identity in a peer's leaf certificate (its single URI SAN), if it has one.
pub fn identity_of(certificate: &CertificateDer<'_>) -> Option<SpiffeId> {
    let cert = webpki::EndEntityCert::try_from(certificate).ok()?;
    let uris: Vec<&str> = cert.valid_uri_names().collect();
    match uris.as_slice() {
        [uri] => uri.parse().ok(),
        _ => None,
    }
}

/// Checks the chain like any TLS client, but instead of a DNS name requires the SPIFFE identity the
/// control plane said this endpoint has.
struct SpiffeServerVerifier {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    expected: Vec<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("bad certificate: {e}")))?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("peer certificate rejected: {e}")))?;
        let presented: Vec<&str> = cert.valid_uri_names().collect();
        let matches = match presented.as_slice() {
            [uri] => uri
                .parse::<SpiffeId>()
                .is_ok_and(|id| self.expected.contains(&id)),
            _ => false,
        };
        if matches {
            Ok(ServerCertVerified::assertion())
        } else {
            let expected: Vec<String> = self.expected.iter().map(ToString::to_string).collect();
            Err(rustls::Error::General(format!(
                "peer identity mismatch: expected one of {expected:?}, presented {presented:?}"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
