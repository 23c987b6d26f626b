//! The CA client: Istio's `CreateCertificate` over gRPC, authenticated by a bearer token.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use weft_proto::istio_ca::IstioCertificateRequest;
use weft_proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("invalid CA address \"{0}\"")]
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
}

impl CaClient {
    /// A client for the CA at `address` (`http://host:15010`); connects lazily, reconnects by itself.
    pub fn new(address: &str, token: &str) -> Result<Self, CaError> {
        let endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|_| CaError::Address(address.to_owned()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        let authorization = format!("Bearer {token}").parse().map_err(|_| CaError::Token)?;
        Ok(Self {
            client: IstioCertificateServiceClient::new(endpoint.connect_lazy()),
            authorization,
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
        let response = self.client.clone().create_certificate(request).await?;
        Ok(response.into_inner().cert_chain)
    }
}
