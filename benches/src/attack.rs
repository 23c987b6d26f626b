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
    /// HTTP/2 clients flooding one kind of frame.
    Frames(FrameFlood, usize),
}

impl Attack {
    fn name(self) -> String {
        match self {
            Attack::Slowloris(n) => format!("{n} slowloris"),
            Attack::SlowPost(n) => format!("{n} slow POST"),
            Attack::Silent(n) => format!("{n} silent"),
            Attack::RapidReset(n) => format!("{n} rapid reset"),
            Attack::Frames(flood, n) => format!("{n} {}", flood.name()),
        }
    }

    /// Opens the attack's connections, from an address of their own (another client to the proxy);
    /// a flood runs in tasks until the returned guard is dropped.
    async fn start(self, target: SocketAddr) -> anyhow::Result<Held> {
        match self {
            Attack::RapidReset(n) => return Ok(flood_on_a_thread(n, move || rapid_reset(target))),
            Attack::Frames(flood, n) => return Ok(flood_on_a_thread(n, move || frame_flood(target, flood))),
            _ => {}
        }
        let (n, first): (usize, &[u8]) = match self {
            Attack::Slowloris(n) => (n, b"GET / HTTP/1.1\r\nhost: bench\r\nx-slow: "),
            Attack::SlowPost(n) => (
                n,
                b"POST /sink HTTP/1.1\r\nhost: bench\r\ncontent-length: 1000\r\n\r\nx",
            ),
            Attack::Silent(n) | Attack::RapidReset(n) | Attack::Frames(_, n) => (n, b""),
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

/// `n` flooders, on a thread and runtime of their own so that the flood competes with the bystander
/// for the proxy, not for the load generator; they run until the returned guard is dropped.
fn flood_on_a_thread<F, Fut>(n: usize, flooder: F) -> Held
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let flood: Vec<_> = (0..n).map(|_| tokio::task::spawn_local(flooder())).collect();
            stopped.notified().await;
            for task in flood {
                task.abort();
            }
        });
    });
    Held::Flood {
        stop,
        thread: Some(thread),
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

/// HTTP/2 frames a client floods a connection with (the CVE-2019-951x family and CVE-2024-27316),
/// written raw, never reading what the proxy answers, reconnecting whenever it is closed.
#[derive(Debug, Clone, Copy)]
enum FrameFlood {
    /// PING after PING (CVE-2019-9512): each asks for an ACK.
    Ping,
    /// SETTINGS after SETTINGS (CVE-2019-9515): each asks for an ACK.
    Settings,
    /// Empty DATA frames on an open stream (CVE-2019-9518).
    EmptyData,
    /// A header block that never ends: CONTINUATION after CONTINUATION (CVE-2024-27316).
    Continuation,
}

impl FrameFlood {
    fn name(self) -> &'static str {
        match self {
            FrameFlood::Ping => "PING flood",
            FrameFlood::Settings => "SETTINGS flood",
            FrameFlood::EmptyData => "empty DATA flood",
            FrameFlood::Continuation => "CONTINUATION flood",
        }
    }

    /// What opens the flood on a new connection, and the frames it then repeats.
    fn frames(self) -> (Vec<u8>, Vec<u8>) {
        use weft_test_support::h2_frames::{
            CONTINUATION, DATA, END_HEADERS, HEADERS, PING, PREFACE, SETTINGS, frame,
        };
        // HPACK: POST, http, /, :authority bench.
        let request = [0x83, 0x86, 0x84, 0x01, 0x05, b'b', b'e', b'n', b'c', b'h'];
        let mut opening = PREFACE.to_vec();
        opening.extend(frame(SETTINGS, 0, 0, &[]));
        let repeated = match self {
            FrameFlood::Ping => frame(PING, 0, 0, &[0; 8]),
            FrameFlood::Settings => frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]),
            FrameFlood::EmptyData => {
                opening.extend(frame(HEADERS, END_HEADERS, 1, &request));
                frame(DATA, 0, 1, &[])
            }
            FrameFlood::Continuation => {
                opening.extend(frame(HEADERS, 0, 1, &request));
                // A literal header field `x: y`, without indexing, again and again.
                frame(CONTINUATION, 0, 1, &[0x00, 1, b'x', 1, b'y'])
            }
        };
        (opening, repeated.repeat(64))
    }
}

/// Writes `flood`'s frames as fast as the proxy takes them, on a new connection whenever it closes one.
async fn frame_flood(target: SocketAddr, flood: FrameFlood) {
    let (opening, batch) = flood.frames();
    loop {
        let Ok(socket) = TcpSocket::new_v4() else { return };
        if socket.bind("127.0.0.3:0".parse().expect("literal")).is_err() {
            return;
        }
        let Ok(mut stream) = socket.connect(target).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if stream.write_all(&opening).await.is_err() {
            continue;
        }
        while stream.write_all(&batch).await.is_ok() {}
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
        Attack::Frames(FrameFlood::Ping, 4),
        Attack::Frames(FrameFlood::Settings, 4),
        Attack::Frames(FrameFlood::EmptyData, 4),
        Attack::Frames(FrameFlood::Continuation, 4),
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
