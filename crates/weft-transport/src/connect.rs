//! Upstream TCP connects. TLS to mesh peers is layered over the stream this returns.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// Why an upstream connection could not be made. Both cases are "connect failures" (Envoy flag `UF`).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connect to {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Connects with a deadline, from `source` when given (port chosen by the kernel), and sets the options
/// every proxied connection gets.
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let io = |source| ConnectError::Io { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io)?;
    if let Some(source) = source {
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| ConnectError::Io {
                addr,
                source: std::io::Error::new(e.kind(), format!("cannot bind source address {source}: {e}")),
            })?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout { addr, timeout })?
        .map_err(|source| ConnectError::Io { addr, source })?;
    stream
        .set_nodelay(true)
        .map_err(|source| ConnectError::Io { addr, source })?;
    Ok(stream)
}
