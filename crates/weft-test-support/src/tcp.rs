//! Raw TCP servers: an echo server that honours half-close, and a server that speaks first.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone)]
pub struct TcpServer {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl TcpServer {
    /// Echoes every byte back; when the client half-closes, finishes echoing, then closes its side.
    pub async fn echo() -> Self {
        Self::start(None).await
    }

    /// Writes `greeting` as soon as a client connects (like SMTP or MySQL), then echoes.
    pub async fn greeter(greeting: &'static [u8]) -> Self {
        Self::start(Some(greeting)).await
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    async fn start(greeting: Option<&'static [u8]>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp server");
        let addr = listener.local_addr().expect("local addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(echo(stream, greeting));
            }
        });
        Self { addr, connections }
    }
}

async fn echo(mut stream: TcpStream, greeting: Option<&'static [u8]>) {
    if let Some(greeting) = greeting
        && stream.write_all(greeting).await.is_err()
    {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}
