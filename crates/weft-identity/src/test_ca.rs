//! A throwaway CA for this crate's tests; each suite adds what it issues.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

pub(crate) struct TestCa {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) root_pem: String,
}

impl TestCa {
    pub(crate) fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::from_ca_cert_pem(&root_pem, key).unwrap(),
            root_pem,
        }
    }
}
