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
}

impl Attack {
    fn name(self) -> String {
        match self {
            Attack::Slowloris(n) => format!("{n} slowloris"),
            Attack::SlowPost(n) => format!("{n} slow POST"),
            Attack::Silent(n) => format!("{n} silent"),
        }
    }

    /// Opens the attack's connections, from an address of their own (another client to the proxy).
    async fn start(self, target: SocketAddr) -> anyhow::Result<Vec<TcpStream>> {
        let (n, first): (usize, &[u8]) = match self {
            Attack::Slowloris(n) => (n, b"GET / HTTP/1.1\r\nhost: bench\r\nx-slow: "),
            Attack::SlowPost(n) => (
                n,
                b"POST /sink HTTP/1.1\r\nhost: bench\r\ncontent-length: 1000\r\n\r\nx",
            ),
            Attack::Silent(n) => (n, b""),
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
        Ok(held)
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
