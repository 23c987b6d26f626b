use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use weft_identity::{Credentials, SpiffeId, csr};

use super::*;

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

#[test]
fn signs_an_svid_for_the_caller() {
    let ca = CertificateAuthority::ephemeral("cluster.local").unwrap();
    let (key, csr) = csr::new_csr(&id("reviews")).unwrap();
    let chain = ca.sign(&csr, &id("reviews"), Duration::from_secs(3600)).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], ca.trust_bundle()[0], "the chain ends in the root");
    let creds = Credentials::new(id("reviews"), chain, key.serialize_pem()).unwrap();
    let lifetime = creds.lifetime();
    assert!(
        lifetime >= Duration::from_secs(3600) && lifetime <= Duration::from_secs(3600 + 61),
        "{lifetime:?}"
    );
}

#[test]
fn validity_defaults_to_a_day_and_is_capped() {
    let ca = CertificateAuthority::ephemeral("cluster.local")
        .unwrap()
        .with_max_validity(Duration::from_secs(7200));
    let (key, csr) = csr::new_csr(&id("a")).unwrap();
    let chain = ca
        .sign(&csr, &id("a"), Duration::from_secs(365 * 24 * 3600))
        .unwrap();
    let creds = Credentials::new(id("a"), chain, key.serialize_pem()).unwrap();
    assert!(
        creds.lifetime() <= Duration::from_secs(7200 + 60),
        "capped: {:?}",
        creds.lifetime()
    );
    let ca = CertificateAuthority::ephemeral("cluster.local").unwrap();
    let chain = ca.sign(&csr, &id("a"), Duration::ZERO).unwrap();
    let creds = Credentials::new(id("a"), chain, key.serialize_pem()).unwrap();
    assert!(creds.lifetime() >= DEFAULT_VALIDITY, "{:?}", creds.lifetime());
}

#[test]
fn refuses_someone_elses_identity() {
    let ca = CertificateAuthority::ephemeral("cluster.local").unwrap();
    let (_, csr) = csr::new_csr(&id("admin")).unwrap();
    let err = ca.sign(&csr, &id("reviews"), DEFAULT_VALIDITY).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the CSR asks for spiffe://cluster.local/ns/default/sa/admin but the caller proves spiffe://cluster.local/ns/default/sa/reviews"
    );
}

#[test]
fn refuses_extra_and_non_spiffe_sans() {
    let ca = CertificateAuthority::ephemeral("cluster.local").unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr_with = |sans: Vec<SanType>| {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    };
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    let two = csr_with(vec![
        uri("spiffe://cluster.local/ns/default/sa/reviews"),
        SanType::DnsName("evil.example.com".try_into().unwrap()),
    ]);
    assert_eq!(
        ca.sign(&two, &id("reviews"), DEFAULT_VALIDITY).unwrap_err(),
        SignError::SanCount(2)
    );
    let dns = csr_with(vec![SanType::DnsName("reviews.default.svc".try_into().unwrap())]);
    assert!(matches!(
        ca.sign(&dns, &id("reviews"), DEFAULT_VALIDITY),
        Err(SignError::NotSpiffe(_))
    ));
    let https = csr_with(vec![uri("https://reviews/")]);
    assert!(matches!(
        ca.sign(&https, &id("reviews"), DEFAULT_VALIDITY),
        Err(SignError::NotSpiffe(_))
    ));
    assert!(matches!(
        ca.sign("not a csr", &id("reviews"), DEFAULT_VALIDITY),
        Err(SignError::Csr(_))
    ));
}

#[test]
fn root_and_token_key_persist_and_extra_roots_are_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let first = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
    let token = first
        .tokens()
        .issue("default", "reviews", Duration::from_secs(60))
        .unwrap();
    let again = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
    assert_eq!(
        again.trust_bundle(),
        first.trust_bundle(),
        "the same root after a restart"
    );
    assert_eq!(
        again.tokens().verify(&token).unwrap(),
        id("reviews"),
        "tokens survive a restart"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the root key is private");

    // Rotation: a second root is trusted alongside the signing one.
    let other = CertificateAuthority::ephemeral("cluster.local").unwrap();
    std::fs::write(dir.path().join("trusted-roots.pem"), &other.trust_bundle()[0]).unwrap();
    let rotated = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
    assert_eq!(rotated.trust_bundle().len(), 2);
    assert_eq!(
        rotated.trust_bundle()[0],
        first.trust_bundle()[0],
        "the signing root comes first"
    );
}
