//! A [`Binder`] for whole-proxy tests: instead of asking the kernel where a redirected connection was
//! going, it looks the client's address up in a table that the test filled when it connected.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use weft_transport::Binder;

#[derive(Debug, Default)]
pub struct MockOrigDst {
    table: Mutex<HashMap<SocketAddr, SocketAddr>>,
    /// For connections the test did not make itself (another proxy dialling this one's inbound
    /// listener, as a peer sidecar would dial the pod): where they were "going".
    fallback: Mutex<Option<SocketAddr>>,
}

impl MockOrigDst {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Connects to the proxy's transparent listener `proxy` as if iptables had redirected a connection
    /// the client made to `dst`.
    pub async fn connect(&self, proxy: SocketAddr, dst: SocketAddr) -> io::Result<TcpStream> {
        let source = if proxy.is_ipv4() { "127.0.0.1" } else { "::1" }
            .parse()
            .expect("literal");
        self.connect_from(source, proxy, dst).await
    }

    /// [`MockOrigDst::connect`] from `source` (another loopback address: another client).
    pub async fn connect_from(
        &self,
        source: std::net::IpAddr,
        proxy: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let socket = if proxy.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let local = socket.local_addr()?;
        self.table.lock().expect("orig dst table").insert(local, dst);
        let stream = socket.connect(proxy).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Treats every connection not made through [`MockOrigDst::connect`] as one redirected from `dst`:
    /// a server-side proxy whose peers dial its inbound listener directly.
    pub fn set_fallback(&self, dst: SocketAddr) {
        *self.fallback.lock().expect("fallback") = Some(dst);
    }

    /// A connector for hyper and tonic clients whose every connection is "going to" `dst`.
    pub fn connector(self: &Arc<Self>, proxy: SocketAddr, dst: SocketAddr) -> OrigDstConnector {
        OrigDstConnector {
            table: self.clone(),
            proxy,
            dst,
        }
    }
}

impl Binder for MockOrigDst {
    fn original_dst(&self, conn: &TcpStream) -> io::Result<SocketAddr> {
        let peer = conn.peer_addr()?;
        self.table
            .lock()
            .expect("orig dst table")
            .get(&peer)
            .copied()
            .or(*self.fallback.lock().expect("fallback"))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no original destination recorded for {peer}"),
                )
            })
    }
}

#[derive(Debug, Clone)]
pub struct OrigDstConnector {
    table: Arc<MockOrigDst>,
    proxy: SocketAddr,
    dst: SocketAddr,
}

impl tower_service::Service<http::Uri> for OrigDstConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.table.connect(this.proxy, this.dst).await.map(TokioIo::new) })
    }
}
