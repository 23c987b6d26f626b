//! TLS ClientHello: server name (SNI) and offered application protocols (ALPN).
//!
//! Parsing is rustls's: its `Acceptor` reads a ClientHello from raw records (fragmented or not) and
//! exposes what the client asked for, without needing any certificate or crypto provider.

use crate::{Detection, Protocol};

/// What a ClientHello asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    pub server_name: Option<String>,
    pub alpn: Vec<String>,
}

/// TLS record content type for handshake messages.
const HANDSHAKE: u8 = 0x16;
/// Every TLS record version (including TLS 1.3's legacy field) starts with major version 3.
const MAJOR_VERSION: u8 = 0x03;

pub(crate) fn match_client_hello(buf: &[u8]) -> Option<Detection> {
    if buf[0] != HANDSHAKE {
        return None;
    }
    match buf.get(1) {
        None => return Some(Detection::NeedMore),
        Some(&MAJOR_VERSION) => {}
        Some(_) => return None,
    }

    let mut acceptor = rustls::server::Acceptor::default();
    let mut input = buf;
    while !input.is_empty() {
        // `read_tls` takes at most one buffer's worth at a time; loop until the prefix is consumed.
        match acceptor.read_tls(&mut input) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            let info = ClientHelloInfo {
                server_name: hello.server_name().map(str::to_owned),
                alpn: hello
                    .alpn()
                    .map(|protocols| {
                        protocols
                            .map(|p| String::from_utf8_lossy(p).into_owned())
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            Some(Detection::Known(Protocol::Tls(info)))
        }
        Ok(None) => Some(Detection::NeedMore),
        Err(_) => None,
    }
}
