//! Workload certificates from the control plane's CA over gRPC: issued for the identity a token proves,
//! refused for anything else, renewed at half life, and kept while still valid when the CA is away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weft_control::ControlPlane;
use weft_control::ca::CertificateAuthority;
use weft_identity::{
    BearerToken, CaClient, CaError, CredentialStore, SpiffeId, StoreConfig, StoreEvents, csr,
};

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

async fn control_plane(ca: Arc<CertificateAuthority>, listen: SocketAddr) -> ControlPlane {
    let dir = tempfile::tempdir().unwrap();
    ControlPlane::start_with_ca(dir.keep(), listen, ca).await.unwrap()
}

fn counting_events() -> (StoreEvents, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (renewed, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, f) = (renewed.clone(), failed.clone());
    let events = StoreEvents {
        renewed: Box::new(move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        }),
        failed: Box::new(move |_| {
            f.fetch_add(1, Ordering::SeqCst);
        }),
    };
    (events, renewed, failed)
}

#[tokio::test]
async fn the_ca_signs_only_what_the_token_proves() {
    let ca = Arc::new(CertificateAuthority::ephemeral("cluster.local").unwrap());
    let cp = control_plane(ca.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let url = format!("http://{}", cp.address());
    let token = ca
        .tokens()
        .issue("default", "reviews", Duration::from_secs(300))
        .unwrap();

    let client = CaClient::new(&url, BearerToken::Inline(token.clone())).unwrap();
    let (_, mine) = csr::new_csr(&id("reviews")).unwrap();
    let chain = client.certify(&mine, Duration::from_secs(600)).await.unwrap();
    assert_eq!(chain.len(), 2);

    // A CSR for someone else's identity.
    let (_, theirs) = csr::new_csr(&id("payments")).unwrap();
    let CaError::Refused(status) = client
        .certify(&theirs, Duration::from_secs(600))
        .await
        .unwrap_err()
    else {
        panic!()
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("asks for spiffe://cluster.local/ns/default/sa/payments but the caller proves spiffe://cluster.local/ns/default/sa/reviews"), "{}", status.message());

    // An expired token, a forged one (another CA's key), none at all.
    let expired = ca.tokens().issue("default", "reviews", Duration::ZERO).unwrap();
    let forged = CertificateAuthority::ephemeral("cluster.local")
        .unwrap()
        .tokens()
        .issue("default", "reviews", Duration::from_secs(300))
        .unwrap();
    for (token, expect) in [
        (expired.as_str(), "expired"),
        (forged.as_str(), "signature is not valid"),
        ("nonsense", "malformed"),
    ] {
        let client = CaClient::new(&url, BearerToken::Inline(token.to_owned())).unwrap();
        let CaError::Refused(status) = client.certify(&mine, Duration::from_secs(600)).await.unwrap_err()
        else {
            panic!()
        };
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token:?}");
        assert!(status.message().contains(expect), "{}", status.message());
    }
    // An empty token is not sent at all.
    let err = CaClient::new(&url, BearerToken::Inline(" \n".into())).unwrap_err();
    assert!(err.to_string().contains("the token is empty"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_at_half_life() {
    weft_test_support::init_tracing();
    let ca = Arc::new(CertificateAuthority::ephemeral("cluster.local").unwrap());
    let cp = control_plane(ca.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let token = ca
        .tokens()
        .issue("default", "reviews", Duration::from_secs(300))
        .unwrap();
    let client = CaClient::new(
        &format!("http://{}", cp.address()),
        BearerToken::Inline(token.clone()),
    )
    .unwrap();
    let (events, renewed, failed) = counting_events();
    let stop = CancellationToken::new();
    // A 2 s lifetime: renewals about every second (the CA also backdates by 60 s, which the timing must
    // not count).
    let store = CredentialStore::start(
        StoreConfig {
            id: id("reviews"),
            validity: Duration::from_secs(2),
        },
        client,
        events,
        stop.clone(),
    );
    let first = store.ready().await;
    assert_eq!(first.id, id("reviews"));
    let mut serials = vec![first.serial.clone()];
    let mut rx = store.watch();
    rx.borrow_and_update();
    let mut last = std::time::Instant::now();
    while serials.len() < 3 {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("no renewal")
            .unwrap();
        // Half of a (second-granular) 2 s validity: never much sooner. A renewal loop that ignored the
        // lifetime would show here.
        assert!(
            last.elapsed() >= Duration::from_millis(400),
            "renewed after only {:?}",
            last.elapsed()
        );
        last = std::time::Instant::now();
        let now = rx.borrow_and_update().clone().unwrap();
        assert!(
            !serials.contains(&now.serial),
            "a renewal brings a new certificate"
        );
        serials.push(now.serial.clone());
    }
    assert_eq!(renewed.load(Ordering::SeqCst), 3);
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_keeps_the_valid_certificate_until_the_ca_returns() {
    let ca = Arc::new(CertificateAuthority::ephemeral("cluster.local").unwrap());
    let cp = control_plane(ca.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let address = cp.address();
    let token = ca
        .tokens()
        .issue("default", "reviews", Duration::from_secs(300))
        .unwrap();
    let client = CaClient::new(&format!("http://{address}"), BearerToken::Inline(token.clone())).unwrap();
    let (events, _, failed) = counting_events();
    let stop = CancellationToken::new();
    let store = CredentialStore::start(
        StoreConfig {
            id: id("reviews"),
            validity: Duration::from_secs(6),
        },
        client,
        events,
        stop.clone(),
    );
    let first = store.ready().await;

    cp.stop().await;
    // Renewal is due after about 3 s; it fails while the CA is away, and the valid certificate stays.
    weft_test_support::assert_eventually!(failed.load(Ordering::SeqCst) >= 2, "no failed renewal");
    let current = store.current().unwrap();
    assert_eq!(
        current.serial, first.serial,
        "the old certificate is still in use"
    );
    assert!(!current.is_expired());

    // The CA returns (same root, same address): the next retry renews.
    let cp = control_plane(ca, address).await;
    weft_test_support::assert_eventually!(
        store.current().unwrap().serial != first.serial,
        "never renewed after the CA returned"
    );
    stop.cancel();
    cp.stop().await;
}
