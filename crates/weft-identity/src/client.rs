//! The CA client: Istio's `CreateCertificate` over gRPC, authenticated by a bearer token.

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
    #[error("cannot reach the CA: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the CA refused: {}: {}", .0.code(), .0.message())]
    Refused(#[from] tonic::Status),
}

#[derive(Debug, Clone)]
pub struct CaClient {
    client: IstioCertificateServiceClient<Channel>,
    authorization: MetadataValue<tonic::metadata::Ascii>,
    timeout: Duration,
}

impl CaClient {
    /// A client for the CA at `address` (`http://host:15010`); connects lazily, reconnects by itself.
    pub fn new(address: &str, token: &str) -> Result<Self, CaError> {
        Self::with_root(address, token, None)
    }

    /// As [`CaClient::new`]; an `https://` address (15012) is verified against `root_pem`.
    pub fn with_root(address: &str, token: &str, root_pem: Option<&str>) -> Result<Self, CaError> {
        let channel = crate::channel::channel(address, root_pem, CONNECT_TIMEOUT)
            .map_err(|e| CaError::Address(e.to_string()))?;
        let authorization = format!("Bearer {token}").parse().map_err(|_| CaError::Token)?;
        let client = IstioCertificateServiceClient::new(channel);
        Ok(Self {
            client,
            authorization,
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
            .insert("authorization", self.authorization.clone());
        request.set_timeout(self.timeout);
        let response = self.client.clone().create_certificate(request).await?;
        Ok(response.into_inner().cert_chain)
    }
}
