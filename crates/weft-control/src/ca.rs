//! The certificate authority: a root (made on first start and kept in a directory, or loaded from it),
//! further trusted roots for rotation, and Istio's `CreateCertificate` over gRPC. It signs a CSR only for
//! the identity the caller's token proves, as an X.509-SVID with exactly that URI SAN.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use weft_identity::SpiffeId;
use weft_proto::istio_ca::istio_certificate_service_server::IstioCertificateService;
use weft_proto::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};

use crate::authn::Authenticator;
use crate::monitoring::Refusal;
use crate::tokens::TokenIssuer;

/// Istio's defaults: workload certificates for 24 h, at most 90 days; the root for 10 years.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
pub const MAX_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past, so a proxy whose clock is slightly behind accepts them.
const BACKDATE: Duration = Duration::from_secs(60);

const ROOT_CERT: &str = "ca-cert.pem";
const ROOT_KEY: &str = "ca-key.pem";
/// Further roots to trust (PEM bundle), for rotating the root: old and new are trusted together.
const TRUSTED_ROOTS: &str = "trusted-roots.pem";
const TOKEN_KEY: &str = "token-key";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: String, problem: String },
    #[error("cannot make the root: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("the CSR does not parse or its signature is invalid: {0}")]
    Csr(String),
    #[error("the CSR must name exactly one subject alternative name, a SPIFFE URI; it names {0}")]
    SanCount(usize),
    #[error("the CSR's subject alternative name must be a SPIFFE URI, not {0}")]
    NotSpiffe(String),
    #[error("the CSR asks for {requested} but the caller proves {caller}")]
    OtherIdentity { requested: String, caller: String },
    #[error("cannot sign: {0}")]
    Sign(String),
}

pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    trusted: Vec<String>,
    tokens: TokenIssuer,
    max_validity: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trusted_roots", &self.trusted.len())
            .finish_non_exhaustive()
    }
}

/// The names the control plane is reached by: locally, and as the Service `deploy/` installs
/// (`weft-control` in namespace `weft-system`).
pub const SERVING_NAMES: [&str; 5] = [
    "weft-control",
    "localhost",
    "weft-control.weft-system",
    "weft-control.weft-system.svc",
    "weft-control.weft-system.svc.cluster.local",
];

impl CertificateAuthority {
    /// A CA whose root lives only in memory (tests, the demo).
    pub fn ephemeral(trust_domain: &str) -> Result<Self, CaError> {
        let (root_pem, key) = new_root(trust_domain)?;
        let secret: [u8; 32] = rand::random();
        Self::assemble(&root_pem, key, Vec::new(), &secret, trust_domain, "memory")
    }

    /// Loads the root and token key from `dir`, making them on first start.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| CaError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (cert_path, key_path, token_path) =
            (dir.join(ROOT_CERT), dir.join(ROOT_KEY), dir.join(TOKEN_KEY));
        if !cert_path.exists() {
            let (root_pem, key) = new_root(trust_domain)?;
            write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
            std::fs::write(&cert_path, &root_pem).map_err(io(&cert_path))?;
            tracing::info!(dir = %dir.display(), "made a new root CA");
        }
        if !token_path.exists() {
            let secret: [u8; 32] = rand::random();
            write_private(&token_path, &secret).map_err(io(&token_path))?;
        }
        let root_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key_path.display().to_string(),
            problem: e.to_string(),
        })?;
        let trusted_path = dir.join(TRUSTED_ROOTS);
        let extra = match std::fs::read_to_string(&trusted_path) {
            Ok(bundle) => split_pem(&bundle),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(CaError::Io {
                    path: trusted_path.display().to_string(),
                    source: e,
                });
            }
        };
        let secret = std::fs::read(&token_path).map_err(io(&token_path))?;
        Self::assemble(
            &root_pem,
            key,
            extra,
            &secret,
            trust_domain,
            &cert_path.display().to_string(),
        )
    }

    fn assemble(
        root_pem: &str,
        key: KeyPair,
        extra: Vec<String>,
        secret: &[u8],
        trust_domain: &str,
        origin: &str,
    ) -> Result<Self, CaError> {
        let issuer = Issuer::from_ca_cert_pem(root_pem, key).map_err(|e| CaError::Invalid {
            path: origin.to_owned(),
            problem: e.to_string(),
        })?;
        let mut trusted = vec![root_pem.to_owned()];
        trusted.extend(extra.into_iter().filter(|r| r.trim() != root_pem.trim()));
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            root_pem: root_pem.to_owned(),
            trusted,
            tokens: TokenIssuer::new(secret, trust_domain),
            max_validity: MAX_VALIDITY,
        })
    }

    pub fn with_max_validity(mut self, max: Duration) -> Self {
        self.max_validity = max;
        self
    }

    pub fn tokens(&self) -> &TokenIssuer {
        &self.tokens
    }

    /// Every root proxies should trust (the signing root first).
    pub fn trust_bundle(&self) -> &[String] {
        &self.trusted
    }

    /// The control plane's own serving certificate (for 15012 and the webhook's 15017), signed by the
    /// root proxies trust: a fresh key, the names clients dial ([`SERVING_NAMES`], loopback, and
    /// `extra_ips`: the address it listens on, when that is one address) and the control plane's
    /// SPIFFE ID. Returns (PEM chain, PEM key).
    pub fn serving_certificate(
        &self,
        extra_ips: &[std::net::IpAddr],
    ) -> Result<(Vec<String>, String), SignError> {
        let sign = |e: rcgen::Error| SignError::Sign(e.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign)?;
        let mut params = CertificateParams::default();
        let mut sans = Vec::new();
        for dns in SERVING_NAMES {
            sans.push(SanType::DnsName(dns.try_into().map_err(sign)?));
        }
        for ip in extra_ips {
            sans.push(SanType::IpAddress(*ip));
        }
        sans.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        sans.push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        let id = format!("spiffe://{}/ns/istio-system/sa/weft-control", self.trust_domain);
        sans.push(SanType::URI(id.try_into().map_err(sign)?));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + MAX_VALIDITY;
        let cert = params.signed_by(&key, &self.issuer).map_err(sign)?;
        Ok((vec![cert.pem(), self.root_pem.clone()], key.serialize_pem()))
    }

    /// The signing root, PEM (what clients of 15012 verify the control plane against).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs `csr_pem` for `caller`, valid for `requested` (default 24 h, capped at the maximum).
    pub fn sign(
        &self,
        csr_pem: &str,
        caller: &SpiffeId,
        requested: Duration,
    ) -> Result<Vec<String>, SignError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| SignError::Csr(e.to_string()))?;
        let sans = &csr.params.subject_alt_names;
        if sans.len() != 1 {
            return Err(SignError::SanCount(sans.len()));
        }
        let requested_id = match &sans[0] {
            SanType::URI(uri) => uri.as_str().to_owned(),
            other => return Err(SignError::NotSpiffe(format!("{other:?}"))),
        };
        let parsed: SpiffeId = requested_id
            .parse()
            .map_err(|_| SignError::NotSpiffe(requested_id.clone()))?;
        if &parsed != caller {
            return Err(SignError::OtherIdentity {
                requested: requested_id,
                caller: caller.to_string(),
            });
        }
        let validity = if requested.is_zero() {
            DEFAULT_VALIDITY
        } else {
            requested.min(self.max_validity)
        };

        // Only what the CA decides goes into the certificate; the CSR contributes its key and (checked) SAN.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            caller
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| SignError::Sign(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| SignError::Sign(e.to_string()))?;
        Ok(vec![cert.pem(), self.root_pem.clone()])
    }
}

fn new_root(trust_domain: &str) -> Result<(String, KeyPair), rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "weft root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ROOT_VALIDITY;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key))
}

fn split_pem(bundle: &str) -> Vec<String> {
    bundle
        .split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim)
        .filter(|p| p.contains("-----BEGIN CERTIFICATE-----"))
        .map(|p| format!("{p}\n"))
        .collect()
}

/// Writes a secret readable only by its owner.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(data)
}

/// The gRPC face of the CA: the caller is whoever `authn` says its token proves.
#[derive(Debug, Clone)]
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    authn: Authenticator,
    observed: Arc<crate::Observed>,
}

impl CaService {
    /// `observed`: where signed and refused requests are counted.
    pub fn new(ca: Arc<CertificateAuthority>, authn: Authenticator, observed: Arc<crate::Observed>) -> Self {
        Self { ca, authn, observed }
    }

    fn refused(&self, reason: Refusal) {
        self.observed.monitoring.refused(reason);
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                self.refused(Refusal::unauthenticated);
                Status::unauthenticated("missing `authorization: Bearer <token>`")
            })?;
        let caller = match self.authn.authenticate(token).await {
            Ok(caller) => caller,
            Err(err) if err.is_transient() => {
                tracing::warn!(%err, "cannot authenticate a certificate request");
                self.refused(Refusal::unavailable);
                return Err(Status::unavailable(err.to_string()));
            }
            Err(err) => {
                tracing::warn!(%err, "refused a certificate request");
                self.refused(Refusal::unauthenticated);
                return Err(Status::unauthenticated(err.to_string()));
            }
        };
        let request = request.into_inner();
        let requested = Duration::from_secs(u64::try_from(request.validity_duration).unwrap_or(0));
        match self.ca.sign(&request.csr, &caller, requested) {
            Ok(cert_chain) => {
                tracing::info!(identity = %caller, "signed a workload certificate");
                self.observed.monitoring.signed();
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(err @ SignError::OtherIdentity { .. }) => {
                self.refused(Refusal::other_identity);
                Err(Status::permission_denied(err.to_string()))
            }
            Err(err @ SignError::Sign(_)) => Err(Status::internal(err.to_string())),
            Err(err) => {
                self.refused(Refusal::invalid_csr);
                Err(Status::invalid_argument(err.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests;
