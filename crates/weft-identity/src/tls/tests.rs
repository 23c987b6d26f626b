use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::test_ca::TestCa;

impl TestCa {
    /// Credentials for `sa`, valid from `start` for `lifetime` (relative to now).
    fn credentials_at(&self, sa: &str, start: i64, lifetime: i64) -> Arc<Credentials> {
        let id = SpiffeId::new("cluster.local", "default", sa).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        let now = OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(start);
        params.not_after = now + time::Duration::seconds(start + lifetime);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = vec![cert.pem(), self.root_pem.clone()];
        if start + lifetime <= 0 {
            // Credentials::new refuses expired certificates; build the struct directly to test the peer.
            return Arc::new(Credentials {
                id,
                chain_pem: chain,
                key_pem: key.serialize_pem(),
                serial: "expired".into(),
                not_before: std::time::SystemTime::now() - Duration::from_secs(7200),
                not_after: std::time::SystemTime::now() - Duration::from_secs(3600),
                renew_at: None,
            });
        }
        Arc::new(Credentials::new(id, chain, key.serialize_pem()).unwrap())
    }

    fn credentials(&self, sa: &str) -> Arc<Credentials> {
        self.credentials_at(sa, -60, 3600)
    }

    fn material(&self, sa: &str) -> TlsMaterial {
        TlsMaterial::new(self.credentials(sa), &[]).unwrap()
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).unwrap()
}

/// Runs one handshake and a byte exchange. Ok: (client's identity as the server saw it, ALPN).
async fn handshake(
    server: &TlsMaterial,
    client: Option<&TlsMaterial>,
    expect: &[&str],
) -> Result<(Option<SpiffeId>, Option<Vec<u8>>), String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().unwrap());
    let server_task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(stream).await.map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(identity_of);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });

    let config = match client {
        Some(material) => material
            .client_config(&expect.iter().map(|sa| id(sa)).collect(), &ALPN)
            .unwrap(),
        None => {
            // A client with no certificate, trusting the root: what a non-mesh TLS client looks like.
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(server.credentials.root_pem().as_bytes()).unwrap())
                .unwrap();
            Arc::new(
                ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let stream = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("peer.mesh.invalid").unwrap();
    let client_result = async {
        let mut tls = connector.connect(name, stream).await.map_err(|e| e.to_string())?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(buf, b"pong");
        Ok::<_, String>(alpn)
    }
    .await;
    let server_result = server_task.await.unwrap();
    match (client_result, server_result) {
        (Ok(alpn), Ok(peer)) => Ok((peer, alpn)),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

#[tokio::test]
async fn mutual_tls_with_spiffe_identities() {
    let ca = TestCa::new();
    let (peer, alpn) = handshake(
        &ca.material("reviews"),
        Some(&ca.material("productpage")),
        &["reviews"],
    )
    .await
    .unwrap();
    assert_eq!(peer, Some(id("productpage")), "the server knows who called");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn the_wrong_identity_is_refused_naming_both() {
    let ca = TestCa::new();
    let err = handshake(
        &ca.material("ratings"),
        Some(&ca.material("productpage")),
        &["reviews"],
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("expected one of [\"spiffe://cluster.local/ns/default/sa/reviews\"], presented [\"spiffe://cluster.local/ns/default/sa/ratings\"]"),
        "{err}"
    );
}

#[tokio::test]
async fn an_untrusted_ca_is_refused_both_ways() {
    let (ours, theirs) = (TestCa::new(), TestCa::new());
    let err = handshake(
        &theirs.material("reviews"),
        Some(&ours.material("productpage")),
        &["reviews"],
    )
    .await
    .unwrap_err();
    assert!(err.contains("peer certificate rejected"), "{err}");
    let err = handshake(
        &ours.material("reviews"),
        Some(&theirs.material("productpage")),
        &["reviews"],
    )
    .await
    .unwrap_err();
    assert!(
        !err.is_empty(),
        "a client from another CA is refused by the server"
    );
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let ca = TestCa::new();
    let expired = TlsMaterial::new(ca.credentials_at("reviews", -7200, 3600), &[]).unwrap();
    let err = handshake(&expired, Some(&ca.material("productpage")), &["reviews"])
        .await
        .unwrap_err();
    assert!(
        err.contains("peer certificate rejected") && err.to_lowercase().contains("expired"),
        "{err}"
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = TestCa::new();
    let err = handshake(&ca.material("reviews"), None, &[]).await.unwrap_err();
    assert!(!err.is_empty());
}

#[tokio::test]
async fn extra_trusted_roots_allow_rotation() {
    let (old, new) = (TestCa::new(), TestCa::new());
    // A server on the new root, a client whose own chain is from the old root but which trusts both.
    let client = TlsMaterial::new(
        old.credentials("productpage"),
        std::slice::from_ref(&new.root_pem),
    )
    .unwrap();
    let server = TlsMaterial::new(new.credentials("reviews"), std::slice::from_ref(&old.root_pem)).unwrap();
    let (peer, _) = handshake(&server, Some(&client), &["reviews"]).await.unwrap();
    assert_eq!(peer, Some(id("productpage")));
}

#[test]
fn client_configurations_are_built_once_per_identities_and_alpn() {
    let material = TestCa::new().material("client");
    let orders: Arc<[SpiffeId]> = vec![id("orders")].into();
    let first = material.client_config(&orders, &ALPN).unwrap();
    let again = material.client_config(&orders.to_vec().into(), &ALPN).unwrap();
    assert!(
        Arc::ptr_eq(&first, &again),
        "same identities and ALPN: one configuration"
    );
    let other = material
        .client_config(&vec![id("payments")].into(), &ALPN)
        .unwrap();
    assert!(!Arc::ptr_eq(&first, &other));
    let h1 = material.client_config(&orders, &[b"http/1.1"]).unwrap();
    assert!(!Arc::ptr_eq(&first, &h1));
    assert_eq!(h1.alpn_protocols, vec![b"http/1.1".to_vec()]);
}
