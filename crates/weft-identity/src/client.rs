//! The CA client: Istio's `CreateCertificate` over gRPC, authenticated by a bearer token.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use weft_proto::istio_ca::IstioCertificateRequest;
use weft_proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA address: {0}")]
    Address(String),
    #[error("the token cannot be sent as a header")]
    Token,
    #[error("cannot read the token {path}: {error}")]
    TokenFile { path: String, error: String },
    #[error("cannot reach the CA: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the CA refused: {}: {}", .0.code(), .0.message())]
    Refused(#[from] tonic::Status),
}

/// What proves the workload's identity to the CA.
#[derive(Clone, PartialEq, Eq)]
pub enum BearerToken {
    /// Given once: a token from `weft control token` (meshes outside Kubernetes).
    Inline(String),
    /// Read again for every request: the kubelet rewrites a projected service-account token in place
    /// before it expires, so the one read at start would be refused hours later.
    File(PathBuf),
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Inline(_) => f.write_str("Inline(..)"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

impl BearerToken {
    /// The token as it is now, surrounding whitespace removed.
    pub fn read(&self) -> Result<String, CaError> {
        let token = match self {
            Self::Inline(token) => token.trim().to_owned(),
            Self::File(path) => std::fs::read_to_string(path)
                .map_err(|e| CaError::TokenFile {
                    path: path.display().to_string(),
                    error: e.to_string(),
                })?
                .trim()
                .to_owned(),
        };
        if token.is_empty() {
            let path = match self {
                Self::Inline(_) => "(inline)".to_owned(),
                Self::File(path) => path.display().to_string(),
            };
            return Err(CaError::TokenFile {
                path,
                error: "the token is empty".to_owned(),
            });
        }
        Ok(token)
    }

    fn header(&self) -> Result<MetadataValue<tonic::metadata::Ascii>, CaError> {
        format!("Bearer {}", self.read()?)
            .parse()
            .map_err(|_| CaError::Token)
    }
}

#[derive(Debug, Clone)]
pub struct CaClient {
    client: IstioCertificateServiceClient<Channel>,
    token: BearerToken,
    timeout: Duration,
}

impl CaClient {
    /// A client for the CA at `address` (`http://host:15010`); connects lazily, reconnects by itself.
    pub fn new(address: &str, token: BearerToken) -> Result<Self, CaError> {
        Self::with_root(address, token, None)
    }

    /// As [`CaClient::new`]; an `https://` address (15012) is verified against `root_pem`. The token
    /// is read here once, so that one that cannot be read or sent is an error at start.
    pub fn with_root(address: &str, token: BearerToken, root_pem: Option<&str>) -> Result<Self, CaError> {
        token.header()?;
        let channel = crate::channel::channel(address, root_pem, CONNECT_TIMEOUT)
            .map_err(|e| CaError::Address(e.to_string()))?;
        let client = IstioCertificateServiceClient::new(channel);
        Ok(Self {
            client,
            token,
            timeout: REQUEST_TIMEOUT,
        })
    }

    /// Asks for `csr` to be signed for `validity`; returns the PEM chain, leaf first.
    pub async fn certify(&self, csr: &str, validity: Duration) -> Result<Vec<String>, CaError> {
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr.to_owned(),
            validity_duration: i64::try_from(validity.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        request
            .metadata_mut()
            .insert("authorization", self.token.header()?);
        request.set_timeout(self.timeout);
        let response = self.client.clone().create_certificate(request).await?;
        Ok(response.into_inner().cert_chain)
    }
}
