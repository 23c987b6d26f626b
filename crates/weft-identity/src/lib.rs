//! Workload identity: SPIFFE IDs ([`SpiffeId`]), keys and CSRs made in-process ([`csr`]), the CA client
//! ([`CaClient`], Istio's CreateCertificate with a bearer token), parsed certificates
//! ([`Credentials`]) and the store that keeps them fresh ([`CredentialStore`]): it renews at half life
//! with jittered backoff, keeps a still-valid certificate when a renewal fails, and publishes each new
//! one on a watch channel so the next handshake uses it. A certificate that another agent writes to
//! disk is read, checked and followed the same way ([`files`]).

pub mod channel;
mod client;
mod credentials;
pub mod csr;
pub mod files;
mod spiffe;
mod store;
#[cfg(test)]
mod test_ca;
pub mod tls;

pub use client::{BearerToken, CaClient, CaError};
pub use credentials::{Credentials, CredentialsError};
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use store::{CredentialStore, StoreConfig, StoreEvents};
