//! Running the real `weft` binary as a child process.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `weft proxy` process, killed when dropped.
pub(crate) struct ProxyProcess {
    pub(crate) child: Child,
    pub(crate) admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts `weft proxy` with `yaml` (admin and readiness addresses are added) and waits until ready.
    pub(crate) async fn start(yaml: &str) -> Self {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let readiness = format!("127.0.0.1:{}", free_port());
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("weft.yaml");
        std::fs::write(
            &path,
            format!("admin: {{ address: {admin} }}\nreadiness: {{ address: {readiness} }}\n{yaml}"),
        )
        .unwrap();
        let child = Command::new(WEFT)
            .args(["proxy", "--config"])
            .arg(&path)
            .env("WEFT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let proxy = Self {
            child,
            admin,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(stream) = tokio::net::TcpStream::connect(admin).await {
                drop(stream);
                if weft_test_support::admin_get(admin, "/ready").await.0 == 200 {
                    return proxy;
                }
            }
            assert!(Instant::now() < deadline, "weft proxy did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Peak resident memory (VmHWM) in bytes.
    pub(crate) fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
