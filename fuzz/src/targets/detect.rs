//! A connection's first bytes, as protocol detection reads them, and TLS ClientHellos in particular.

use std::sync::Arc;

use weft_detect::{Detection, Protocol};

/// Detection never panics; once it has decided on a prefix, more bytes do not change its answer; and
/// what it decides on the bytes so far is what it decides once they are known to be all there is.
pub(crate) fn first_bytes(data: &[u8]) {
    let full = weft_detect::detect(data);
    for cut in 0..data.len() {
        if let Detection::Known(protocol) = weft_detect::detect(&data[..cut]) {
            assert_eq!(
                full,
                Detection::Known(protocol),
                "decided at {cut} bytes, changed later"
            );
            break;
        }
    }
    let last = weft_detect::detect_final(data);
    if let Detection::Known(decided) = full {
        assert_eq!(
            decided, last,
            "decided before the end, and differently at the end"
        );
    }
    if let Protocol::Tls(hello) = &last {
        check_hello(hello);
    }
}

/// A ClientHello body (after the handshake header) in a TLS record.
pub(crate) fn client_hello(body: &[u8]) {
    let mut handshake = vec![0x01];
    let len = u32::try_from(body.len()).unwrap_or(0).min(0xff_ffff);
    handshake.extend_from_slice(&len.to_be_bytes()[1..]);
    handshake.extend_from_slice(body);
    let record_len = u16::try_from(handshake.len()).unwrap_or(u16::MAX);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&record_len.to_be_bytes());
    record.extend_from_slice(&handshake);
    first_bytes(&record);
}

fn check_hello(hello: &weft_detect::ClientHelloInfo) {
    if let Some(name) = &hello.server_name {
        assert!(!name.is_empty() && name.len() <= 255, "server name {name:?}");
    }
    for protocol in &hello.alpn {
        assert!(!protocol.is_empty() && protocol.len() <= 255, "ALPN {protocol:?}");
    }
}

/// The bytes a rustls client sends first.
fn rustls_hello(server_name: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("rustls's defaults")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).expect("a server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("a client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("the ClientHello");
    out
}

pub(crate) fn first_bytes_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = [
        &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\r\n\r\nPOST /x HTTP/1.0\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x00\x00\x00\x01binary",
        b"*1\r\n$4\r\nPING\r\n",
        b"M-SEARCH * HTTP/1.1\r\n",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect();
    seeds.push(rustls_hello(
        "order-svc.default.svc.cluster.local",
        &[b"h2", b"http/1.1"],
    ));
    seeds.push(rustls_hello("a", &[b"istio-peer-exchange", b"istio"]));
    seeds
}

pub(crate) fn client_hello_seeds() -> Vec<Vec<u8>> {
    [
        rustls_hello("order-svc.default.svc.cluster.local", &[b"h2", b"http/1.1"]),
        rustls_hello("x.example", &[]),
    ]
    .into_iter()
    .map(|record| record.get(9..).map(<[u8]>::to_vec).unwrap_or_default())
    .collect()
}
