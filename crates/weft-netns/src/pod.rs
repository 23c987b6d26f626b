//! One pod: a network namespace on the bridge, and the processes running in it.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{Network, PROXY_UID, SUBNET_PREFIX, SUBNET6_PREFIX, run, set_mode};

#[derive(Debug)]
pub struct Pod {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
    dir: PathBuf,
    weft: PathBuf,
    processes: Mutex<Vec<Spawned>>,
}

/// A process started in a pod; its output goes to `<pod>-<label>.log` in the network's directory.
#[derive(Debug)]
struct Spawned {
    label: String,
    child: Child,
    log: PathBuf,
}

impl Pod {
    pub(crate) fn create(network: &Network, name: &str, n: u32) -> Result<Self, String> {
        let netns = format!("weftpod-{}-{name}", network.id());
        let veth = format!("wv{}p{n}", network.id());
        let pod = Self {
            name: name.to_owned(),
            ip: format!("{SUBNET_PREFIX}.{n}")
                .parse()
                .map_err(|e| format!("{e}"))?,
            ip6: format!("{SUBNET6_PREFIX}{n:x}")
                .parse()
                .map_err(|e| format!("{e}"))?,
            netns,
            dir: network.dir().to_owned(),
            weft: network.weft().to_owned(),
            processes: Mutex::new(Vec::new()),
        };
        // From here on, dropping `pod` deletes the namespace (and the veth inside it).
        run(&["ip", "netns", "add", &pod.netns])?;
        run(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.netns,
        ])?;
        run(&["ip", "link", "set", &veth, "master", network.bridge(), "up"])?;
        let ip = format!("{}/24", pod.ip);
        let ip6 = format!("{}/64", pod.ip6);
        for args in [
            &["ip", "link", "set", "lo", "up"][..],
            &["ip", "addr", "add", &ip, "dev", "eth0"],
            // No duplicate address detection: the address is usable at once.
            &["ip", "-6", "addr", "add", &ip6, "dev", "eth0", "nodad"],
            &["ip", "link", "set", "eth0", "up"],
            // Service addresses live outside the subnet: they need a route before the rules rewrite them.
            &["ip", "route", "add", "default", "dev", "eth0"],
        ] {
            pod.exec(args)?;
        }
        Ok(pod)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pod's address on the bridge.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Runs a command in the pod to completion; its stdout, or an error with its stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["ip", "netns", "exec", &self.netns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// `weft init` in the pod with `args`; its output.
    pub fn weft_init(&self, args: &[&str]) -> Result<String, String> {
        let weft = self.weft.to_string_lossy();
        let mut full = vec![weft.as_ref(), "init"];
        full.extend_from_slice(args);
        self.exec(&full)
    }

    /// Starts a long-running process in the pod as root.
    pub fn spawn(&self, label: &str, args: &[&str]) -> Result<(), String> {
        self.spawn_as(label, None, &[], args)
    }

    /// Writes `config` to a file and starts `weft proxy` with it, as UID/GID 1337 (the identity the
    /// capture rules leave alone), with the pod's environment as Kubernetes' downward API would give it
    /// (`POD_NAME`, `POD_NAMESPACE`, `SERVICE_ACCOUNT`, `INSTANCE_IP`).
    pub fn start_proxy(&self, config: &str, namespace: &str, service_account: &str) -> Result<(), String> {
        let path = self.dir.join(format!("{}-proxy.yaml", self.name));
        std::fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
        set_mode(&path, 0o644)?;
        let weft = self.weft.to_string_lossy();
        let path = path.to_string_lossy();
        let ip = self.ip.to_string();
        let env = [
            ("POD_NAME", self.name.as_str()),
            ("POD_NAMESPACE", namespace),
            ("SERVICE_ACCOUNT", service_account),
            ("INSTANCE_IP", ip.as_str()),
        ];
        self.spawn_as(
            "proxy",
            Some(PROXY_UID),
            &env,
            &[&weft, "proxy", "--config", &path],
        )
    }

    pub(crate) fn spawn_as(
        &self,
        label: &str,
        uid: Option<u32>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<(), String> {
        let log = self.dir.join(format!("{}-{label}.log", self.name));
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns]);
        if let Some(uid) = uid {
            let id = uid.to_string();
            command.args(["setpriv", "--reuid", &id, "--regid", &id, "--clear-groups"]);
        }
        // `ip netns exec` and `setpriv` exec into the program: the child is the program itself.
        let child = command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {args:?} in pod {}: {e}", self.name))?;
        self.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Spawned {
                label: label.to_owned(),
                child,
                log,
            });
        Ok(())
    }

    /// Kills the process started under `label` (SIGKILL, as a crash would) and waits for it.
    pub fn kill(&self, label: &str) -> Result<(), String> {
        let mut processes = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        let i = processes
            .iter()
            .position(|p| p.label == label)
            .ok_or_else(|| format!("no process `{label}` in pod {}", self.name))?;
        let mut spawned = processes.remove(i);
        let _ = spawned.child.kill();
        let _ = spawned.child.wait();
        Ok(())
    }

    /// Whether the process under `label` is still running.
    pub fn is_running(&self, label: &str) -> bool {
        let mut processes = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        processes
            .iter_mut()
            .find(|p| p.label == label)
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// What the process under `label` has written so far.
    pub fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}-{label}.log", self.name))).unwrap_or_default()
    }

    /// Runs `f` with the calling thread inside the pod's network namespace: sockets it creates belong to
    /// the pod for their whole life, wherever they are used afterwards. The thread returns to its own
    /// namespace before this returns.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T, String> {
        use nix::sched::{CloneFlags, setns};
        let home = File::open("/proc/thread-self/ns/net").map_err(|e| format!("own namespace: {e}"))?;
        let pod = File::open(format!("/var/run/netns/{}", self.netns))
            .map_err(|e| format!("pod {} namespace: {e}", self.name))?;
        setns(&pod, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns into pod {}: {e}", self.name))?;
        let out = f();
        setns(&home, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns back from pod {}: {e}", self.name))?;
        Ok(out)
    }
}

impl Pod {
    /// A listener in the pod, as an app there would open it (needs a Tokio runtime).
    pub fn listen(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let listener = self
            .enter(|| std::net::TcpListener::bind(addr))
            .map_err(std::io::Error::other)??;
        listener.set_nonblocking(true)?;
        TcpListener::from_std(listener)
    }

    /// A connection from inside the pod, as an app there would make it; the pod's rules apply to it.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = self
            .enter(|| {
                if addr.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
            })
            .map_err(std::io::Error::other)??;
        tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect to {addr}")))?
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let processes = std::mem::take(&mut *self.processes.lock().unwrap_or_else(|p| p.into_inner()));
        for mut spawned in processes {
            let _ = spawned.child.kill();
            let _ = spawned.child.wait();
            // A failing test shows what each process said.
            if std::thread::panicking() {
                let log = std::fs::read_to_string(&spawned.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- pod {} {} (last lines) ---", self.name, spawned.label);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        let _ = run(&["ip", "netns", "del", &self.netns]);
    }
}
