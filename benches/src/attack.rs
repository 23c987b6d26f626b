//! `--attack`: what hostile clients do to everyone else. A bystander sends 500 req/s open loop
//! through one proxy, first alone, then while each attack holds its connections; each row is the
//! bystander's latency and errors and the proxy's memory growth, against the pass rule
//! (bystander p99 under 3x its baseline with no errors, proxy RSS grown by under 64 MiB).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::{Proxy, Wire, fixed_rate, plain_yaml, status_kib};

const BYSTANDER_RATE: u64 = 500;

#[derive(Debug, Clone, Copy)]
enum Attack {
    /// Connections that send part of a header block and stop.
    Slowloris(usize),
    /// Uploads that announce 1,000 bytes and send one, to a backend that reads the whole body first.
    SlowPost(usize),
    /// Connections that send nothing.
    Silent(usize),
    /// HTTP/2 clients that open streams and reset each at once, reconnecting when closed (CVE-2023-44487).
    RapidReset(usize),
}

impl Attack {
    fn name(self) -> String {
        match self {
            Attack::Slowloris(n) => format!("{n} slowloris"),
            Attack::SlowPost(n) => format!("{n} slow POST"),
            Attack::Silent(n) => format!("{n} silent"),
            Attack::RapidReset(n) => format!("{n} rapid reset"),
        }
    }

    /// Opens the attack's connections, from an address of their own (another client to the proxy);
    /// a flood runs in tasks until the returned guard is dropped.
    async fn start(self, target: SocketAddr) -> anyhow::Result<Held> {
        if let Attack::RapidReset(n) = self {
            // On a thread and runtime of its own, so that the flood competes with the bystander
            // for the proxy, not for the load generator.
            let stop = std::sync::Arc::new(tokio::sync::Notify::new());
            let stopped = stop.clone();
            let thread = std::thread::spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    return;
                };
                runtime.block_on(async move {
                    let flood: Vec<_> = (0..n).map(|_| tokio::spawn(rapid_reset(target))).collect();
                    stopped.notified().await;
                    for task in flood {
                        task.abort();
                    }
                });
            });
            return Ok(Held::Flood {
                stop,
                thread: Some(thread),
            });
        }
        let (n, first): (usize, &[u8]) = match self {
            Attack::Slowloris(n) => (n, b"GET / HTTP/1.1\r\nhost: bench\r\nx-slow: "),
            Attack::SlowPost(n) => (
                n,
                b"POST /sink HTTP/1.1\r\nhost: bench\r\ncontent-length: 1000\r\n\r\nx",
            ),
            Attack::Silent(n) | Attack::RapidReset(n) => (n, b""),
        };
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let socket = TcpSocket::new_v4()?;
            socket.bind("127.0.0.3:0".parse()?)?;
            let mut stream = socket.connect(target).await?;
            if !first.is_empty() {
                stream.write_all(first).await?;
            }
            held.push(stream);
        }
        Ok(Held::Connections { _open: held })
    }
}

/// What an attack holds while it runs.
enum Held {
    /// Kept open for as long as the attack lasts.
    Connections { _open: Vec<TcpStream> },
    /// A flood running on its own thread until told to stop.
    Flood {
        stop: std::sync::Arc<tokio::sync::Notify>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Held::Flood { stop, thread } = self {
            stop.notify_one();
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Opens a stream and resets it, again and again, on a new connection whenever the proxy closes one.
async fn rapid_reset(target: SocketAddr) {
    loop {
        let Ok(socket) = TcpSocket::new_v4() else { return };
        if socket.bind("127.0.0.3:0".parse().expect("literal")).is_err() {
            return;
        }
        let Ok(stream) = socket.connect(target).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok((client, connection)) = h2::client::handshake(stream).await else {
            continue;
        };
        let driver = tokio::spawn(connection);
        loop {
            let Ok(mut ready) = client.clone().ready().await else {
                break;
            };
            let request = http::Request::builder()
                .uri(format!("http://{target}/"))
                .body(())
                .expect("a request");
            match ready.send_request(request, true) {
                Ok((_, mut send)) => send.send_reset(h2::Reason::CANCEL),
                Err(_) => break,
            }
            // Let the proxy accept the stream before the next one.
            tokio::task::yield_now().await;
        }
        driver.abort();
    }
}

pub(crate) async fn run(weft: &std::path::Path, backend: SocketAddr, seconds: u64) -> anyhow::Result<()> {
    let phase = Duration::from_secs(seconds);
    println!(
        "one proxy (2 threads) per attack, fresh; bystander at {BYSTANDER_RATE} req/s open loop for {seconds} s, alone and then during the attack; attackers from another address"
    );
    println!(
        "{:<16} {:>14} {:>14} {:>10} {:>8} {:>10}  pass",
        "attack", "p50 base/att", "p99 base/att", "p99 ratio", "errors", "RSS +MiB"
    );
    for attack in [
        Attack::Slowloris(2000),
        Attack::SlowPost(1100),
        Attack::Silent(2000),
        Attack::RapidReset(4),
    ] {
        let proxy = Proxy::start_with(weft, 2, |l| plain_yaml(l, backend, ""))?;
        proxy.wait_ready().await?;
        let rss = || status_kib(proxy.child.id(), "VmRSS:");
        let baseline = fixed_rate(proxy.listener, BYSTANDER_RATE, phase, Wire::Http1).await?;
        let before = rss()?;
        let held = attack.start(proxy.listener).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let figures = fixed_rate(proxy.listener, BYSTANDER_RATE, phase, Wire::Http1).await?;
        let grown_mib = rss()?.saturating_sub(before) as f64 / 1024.0;
        let ratio = figures.p99_us as f64 / baseline.p99_us.max(1) as f64;
        let pass = ratio < 3.0 && figures.errors == 0 && grown_mib < 64.0;
        println!(
            "{:<16} {:>14} {:>14} {:>10.2} {:>8} {:>10.1}  {}",
            attack.name(),
            format!("{}/{}", baseline.p50_us, figures.p50_us),
            format!("{}/{}", baseline.p99_us, figures.p99_us),
            ratio,
            figures.errors,
            grown_mib,
            if pass { "yes" } else { "NO" }
        );
        drop(held);
    }
    Ok(())
}
