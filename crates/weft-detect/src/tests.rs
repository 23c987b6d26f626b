use std::sync::Arc;

use super::*;

/// A real ClientHello, written by a rustls client.
fn client_hello(server_name: &str, alpn: &[&str]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write ClientHello");
    }
    out
}

fn known(p: Protocol) -> Detection {
    Detection::Known(p)
}

#[test]
fn http1_request_lines() {
    assert_eq!(
        detect(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        known(Protocol::Http1)
    );
    assert_eq!(detect(b"POST /x?y=1 HTTP/1.0\r\n"), known(Protocol::Http1));
    assert_eq!(detect(b"OPTIONS * HTTP/1.1\n"), known(Protocol::Http1));
    assert_eq!(
        detect(b"CONNECT example.com:443 HTTP/1.1\r\n"),
        known(Protocol::Http1)
    );
}

#[test]
fn http1_prefixes_need_more() {
    for prefix in [
        "G",
        "GET",
        "GET ",
        "GET /index.html",
        "GET / ",
        "GET / HTTP/",
        "GET / HTTP/1.1",
        "GET / HTTP/1.1\r",
    ] {
        assert_eq!(detect(prefix.as_bytes()), Detection::NeedMore, "{prefix:?}");
    }
}

#[test]
fn not_http1() {
    for bytes in [
        &b"\x00\x01"[..],
        b"220 smtp ready\r\n",
        b"SET key value\r\n",
        b"*2\r\n$3\r\nGET\r\n",
        b"PING\r\n",
    ] {
        assert_eq!(detect(bytes), known(Protocol::Opaque), "{bytes:?}");
    }
}

/// Lines that a lenient server could read as a request are HTTP, so the proxy's HTTP server refuses them
/// rather than carrying them, unsanitised, as opaque bytes.
#[test]
fn malformed_requests_are_still_http() {
    for bytes in [
        &b"GET  / HTTP/1.1\r\n"[..],
        b"GET / HTTP/2.0\r\n",
        b"GET / FTP/1.1\r\n",
        b"GET / HTTP/1.1x",
        b"get /\tHTTP/1.1\r\n",
        b"FOO\t/x\tHTTP/1.1\r\n",
        b"GET /a\x01b HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n\r\nXX",
    ] {
        assert_eq!(detect(bytes), known(Protocol::Http1), "{bytes:?}");
    }
}

/// RFC 9112 §2.2: empty lines before the request line are allowed; long targets and long methods are
/// HTTP whatever their length.
#[test]
fn leading_empty_lines_long_targets_and_long_methods() {
    assert_eq!(detect(b"\r\nGET / HTTP/1.1\r\n"), known(Protocol::Http1));
    assert_eq!(detect(b"\n\r\n\r\nGET / HTTP/1.1\r\n"), known(Protocol::Http1));
    assert_eq!(detect(b"\r\n"), Detection::NeedMore);
    let long_method = format!("{} / HTTP/1.1\r\n", "X".repeat(40));
    assert_eq!(detect(long_method.as_bytes()), known(Protocol::Http1));
    let long_target = format!("GET /{} HTTP/1.1\r\n", "a".repeat(20 * 1024));
    assert_eq!(detect(long_target.as_bytes()), known(Protocol::Http1));
    assert_eq!(
        detect(&long_target.as_bytes()[..MAX_DETECT_BYTES - 1]),
        Detection::NeedMore
    );
}

/// When no more bytes come, a prefix that could still become a request is HTTP; nothing at all is
/// opaque (server speaks first).
#[test]
fn final_answers() {
    assert_eq!(detect_final(b""), Protocol::Opaque);
    assert_eq!(detect_final(b"GET /slow"), Protocol::Http1);
    assert_eq!(detect_final(b"X-Forwarded"), Protocol::Http1);
    assert_eq!(detect_final(b"\r\n"), Protocol::Http1);
    assert_eq!(detect_final(b"PRI * HTTP/2"), Protocol::Http1);
    assert_eq!(detect_final(b"\x16\x03\x01\x00"), Protocol::Opaque);
    assert_eq!(detect_final(b"\x00\x01"), Protocol::Opaque);
    assert_eq!(detect_final(H2_PREFACE), Protocol::Http2);
}

#[test]
fn h2_preface() {
    assert_eq!(detect(H2_PREFACE), known(Protocol::Http2));
    let mut with_settings = H2_PREFACE.to_vec();
    with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    assert_eq!(detect(&with_settings), known(Protocol::Http2));
    assert_eq!(detect(b"PRI * HTTP/2"), Detection::NeedMore);
    // The preface shares its first bytes with an HTTP/1 request line; a broken one is refused as HTTP.
    assert_eq!(detect(b"PRI * HTTP/2.0\r\n\r\nXX"), known(Protocol::Http1));
}

#[test]
fn tls_client_hello_with_sni_and_alpn() {
    let hello = client_hello("reviews.default.svc.cluster.local", &["h2", "http/1.1"]);
    let expected = ClientHelloInfo {
        server_name: Some("reviews.default.svc.cluster.local".into()),
        alpn: vec!["h2".into(), "http/1.1".into()],
    };
    assert_eq!(detect(&hello), known(Protocol::Tls(expected)));
}

#[test]
fn tls_client_hello_arrives_in_pieces() {
    let hello = client_hello("example.com", &[]);
    for cut in [1, 2, 5, 40, hello.len() - 1] {
        assert_eq!(detect(&hello[..cut]), Detection::NeedMore, "cut at {cut}");
    }
    let Detection::Known(Protocol::Tls(info)) = detect(&hello) else {
        panic!("full hello not detected");
    };
    assert_eq!(info.server_name.as_deref(), Some("example.com"));
    assert!(info.alpn.is_empty());
}

#[test]
fn tls_lookalikes_are_opaque() {
    assert_eq!(detect(&[0x16, 0x02, 0, 0]), known(Protocol::Opaque));
    // A handshake record whose body is garbage.
    assert_eq!(
        detect(&[0x16, 0x03, 0x01, 0x00, 0x04, 0xff, 0xff, 0xff, 0xff]),
        known(Protocol::Opaque)
    );
}

#[test]
fn endless_request_line_is_http() {
    // Was opaque TCP before: a 16 KiB target carried forged headers past sanitising.
    let mut long = b"GET /".to_vec();
    long.resize(MAX_DETECT_BYTES, b'a');
    assert_eq!(detect(&long), known(Protocol::Http1));
    // The answer stays the same however the line ends later.
    long.extend_from_slice(b" HTTP/1.1\r\n");
    assert_eq!(detect(&long), known(Protocol::Http1));
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap stand-in for the fuzz target: every prefix of a few mixed inputs.
    let hello = client_hello("a.b", &["h2"]);
    let inputs: [&[u8]; 4] = [
        &hello,
        H2_PREFACE,
        b"GET /a HTTP/1.1\r\n",
        &[0x16, 0x03, 0x03, 0xff, 0xff, 0x01],
    ];
    for input in inputs {
        for i in 0..=input.len() {
            let _ = detect(&input[..i]);
            let mut flipped = input[..i].to_vec();
            if let Some(b) = flipped.last_mut() {
                *b ^= 0x5a;
            }
            let _ = detect(&flipped);
        }
    }
}

/// However a client splits its first bytes into segments, the answer is the same: a control byte
/// settles it (no request line holds one), and a line of text that is still open may yet name HTTP.
/// (Found by the `first_bytes` fuzz target: `\0` alone was opaque, `\0…ST /x HTTP/` HTTP.)
#[test]
fn the_answer_does_not_depend_on_how_the_bytes_were_split() {
    let binary = b"\0\0\0\x01bi\x0e\0\x01bi\x0eST /x HTTP/ST /x HTTP/";
    for cut in 1..=binary.len() {
        assert_eq!(detect(&binary[..cut]), known(Protocol::Opaque), "{cut} bytes");
    }
    let text = b"{\"op\": 1} HTTP/1.1\r\n";
    assert_eq!(detect(&text[..9]), Detection::NeedMore);
    assert_eq!(detect(text), known(Protocol::Http1));
    assert_eq!(detect_final(&text[..9]), Protocol::Opaque);
    assert_eq!(detect(b"{\"op\": 1}\n"), known(Protocol::Opaque));
}
