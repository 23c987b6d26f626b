//! Generated code for the protobuf APIs Weft defines itself (under `proto/`).

/// Istio's certificate service: `istio.v1.auth.IstioCertificateService/CreateCertificate`.
pub mod istio_ca {
    #![allow(
        clippy::all,
        clippy::unwrap_used,
        unreachable_pub,
        missing_debug_implementations
    )]
    tonic::include_proto!("istio.v1.auth");
}
