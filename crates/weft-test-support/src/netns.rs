//! Root-only fixtures: the network-namespace mesh of `weft-netns`, plus ways for a test's own code to act
//! as an app inside a pod (listen, connect, send HTTP) and to read a proxy's admin port there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
pub use weft_netns::*;

/// The `weft` binary the pods run: `WEFT_BIN`, else `weft` beside the test's `deps/` directory (cargo
/// and nextest build it with the workspace).
pub fn weft_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEFT_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test executable");
    let target = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let weft = target.join("weft");
    assert!(
        weft.is_file(),
        "{} is missing: build it with `cargo build -p weft` (or set WEFT_BIN)",
        weft.display()
    );
    weft
}

/// What came back from [`get`].
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// An HTTP/1.1 client on one connection from inside a pod.
#[derive(Debug)]
pub struct PodClient {
    sender: hyper::client::conn::http1::SendRequest<crate::http::TestBody>,
    authority: String,
}

impl PodClient {
    pub async fn connect(pod: &Pod, addr: SocketAddr) -> Result<Self, String> {
        let stream = pod
            .connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake {addr}: {e}"))?;
        tokio::spawn(conn);
        Ok(Self {
            sender,
            authority: addr.to_string(),
        })
    }

    /// `GET path` with `headers`; an error when the connection fails.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
        self.request(http::Method::GET, path, headers).await
    }

    /// `method path` with `headers`; an error when the connection fails.
    pub async fn request(
        &mut self,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = self
            .sender
            .send_request(request.body(crate::http::empty()).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// One `GET` on a new connection from inside `pod`.
pub async fn get(
    pod: &Pod,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    PodClient::connect(pod, addr).await?.get(path, headers).await
}

/// The proxy's admin port in `pod`.
pub async fn admin(pod: &Pod, path: &str) -> Result<Answer, String> {
    get(pod, "127.0.0.1:15000".parse().unwrap(), path, &[]).await
}

/// Waits until the pod's proxy reports ready (first certificate and configuration in place).
pub async fn wait_ready(pod: &Pod) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match admin(pod, "/ready").await {
            Ok(answer) if answer.status == StatusCode::OK => return,
            last => {
                assert!(
                    std::time::Instant::now() < deadline && pod.is_running("proxy"),
                    "the proxy in pod {} never became ready (last: {last:?})\n{}",
                    pod.name(),
                    pod.log("proxy")
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `tcpdump` on the network's bridge, writing every TCP frame between pods to a file.
#[derive(Debug)]
pub struct WireCapture {
    child: std::process::Child,
    file: PathBuf,
}

impl WireCapture {
    /// Starts capturing; returns once tcpdump is listening.
    pub fn start(network: &Network) -> Self {
        let file = network.dir().join("bridge.pcap");
        let stderr_path = network.dir().join("tcpdump.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        // Immediate mode: each packet is written as it comes, so none is left in the capture ring when
        // tcpdump is stopped.
        let child = std::process::Command::new("tcpdump")
            .args(["-i", network.bridge(), "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("tcpdump (.ci/run installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&stderr_path)
            .unwrap_or_default()
            .contains("listening on")
        {
            assert!(std::time::Instant::now() < deadline, "tcpdump did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, file }
    }

    /// Stops the capture; every TCP segment with a payload, in capture order.
    pub fn stop(mut self) -> (Vec<Segment>, Vec<u8>) {
        // SIGINT lets tcpdump flush and close the file.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let raw = std::fs::read(&self.file).unwrap();
        (segments(&raw), raw)
    }
}

impl Drop for WireCapture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One TCP segment seen on the wire.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// TCP segments with payload from a pcap file of Ethernet frames (IPv4 and IPv6).
pub fn segments(pcap: &[u8]) -> Vec<Segment> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    assert!(pcap.len() >= 24, "pcap file too short");
    let little = pcap[..4] == [0xd4, 0xc3, 0xb2, 0xa1];
    let u32_at = |b: &[u8], i: usize| {
        let bytes = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if little {
            u32::from_le_bytes(bytes)
        } else {
            u32::from_be_bytes(bytes)
        }
    };
    let be16 = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let captured = u32_at(pcap, at + 8) as usize;
        let frame = &pcap[at + 16..(at + 16 + captured).min(pcap.len())];
        at += 16 + captured;
        if frame.len() < 14 {
            continue;
        }
        let (ip, packet) = (be16(frame, 12), &frame[14..]);
        let (src, dst, tcp) = match ip {
            0x0800 if packet.len() >= 20 && packet[9] == 6 => {
                let header = usize::from(packet[0] & 0x0f) * 4;
                let total = usize::from(be16(packet, 2)).min(packet.len());
                let addr = |i: usize| {
                    IpAddr::V4(Ipv4Addr::new(
                        packet[i],
                        packet[i + 1],
                        packet[i + 2],
                        packet[i + 3],
                    ))
                };
                (addr(12), addr(16), &packet[header.min(total)..total])
            }
            0x86dd if packet.len() >= 40 && packet[6] == 6 => {
                let total = (40 + usize::from(be16(packet, 4))).min(packet.len());
                let addr = |i: usize| {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&packet[i..i + 16]);
                    IpAddr::V6(Ipv6Addr::from(a))
                };
                (addr(8), addr(24), &packet[40..total])
            }
            _ => continue,
        };
        if tcp.len() < 20 {
            continue;
        }
        let offset = usize::from(tcp[12] >> 4) * 4;
        if tcp.len() > offset {
            out.push(Segment {
                src: SocketAddr::new(src, be16(tcp, 0)),
                dst: SocketAddr::new(dst, be16(tcp, 2)),
                payload: tcp[offset..].to_vec(),
            });
        }
    }
    out
}

/// Checks that each direction of each connection in `segments` is a sequence of TLS records (TLS 1.0
/// to 1.3 record headers, content types 20 to 23); the error names the first connection that is not.
pub fn all_tls(segments: &[Segment]) -> Result<usize, String> {
    let mut streams: std::collections::BTreeMap<(SocketAddr, SocketAddr), Vec<u8>> = Default::default();
    for s in segments {
        streams
            .entry((s.src, s.dst))
            .or_default()
            .extend_from_slice(&s.payload);
    }
    for ((src, dst), bytes) in &streams {
        let mut at = 0;
        while at < bytes.len() {
            let header = bytes
                .get(at..at + 5)
                .ok_or_else(|| format!("{src} -> {dst}: truncated record"))?;
            if !(20..=23).contains(&header[0]) || header[1] != 3 || header[2] > 4 {
                let shown = String::from_utf8_lossy(&bytes[at..bytes.len().min(at + 60)]).into_owned();
                return Err(format!(
                    "{src} -> {dst}: not a TLS record at byte {at}: {shown:?}"
                ));
            }
            at += 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
        }
    }
    Ok(streams.len())
}
