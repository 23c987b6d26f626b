//! A mesh of "pods" on one machine, as Kubernetes would wire it: each pod is a network namespace with a
//! veth pair to a bridge of its own, `weft init`'s rules, a `weft proxy` running as UID 1337, and apps that
//! know nothing of the mesh. `weft control` runs in a pod of its own. Everything is made with `ip`,
//! `setpriv` and the `weft` binary, and everything made is removed on drop: processes killed,
//! namespaces (and with them the veths) and the bridge deleted, also when a test panics.
//!
//! Needs root. [`missing_prerequisite`] says what is missing, so callers can skip with a reason.

pub mod kubelet;
mod mesh;
mod pod;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub use mesh::{CONTROL_PORT, Control};
pub use pod::Pod;

/// The pods' subnet. Each [`Network`] is its own bridge with no address in the host's namespace, so
/// meshes running side by side never see each other's routes.
pub const SUBNET_PREFIX: &str = "10.248.0";
/// The IPv6 prefix pods also get, so `weft init` installs its ip6tables rules as in a dual-stack pod.
pub const SUBNET6_PREFIX: &str = "fd00:248::";
/// The UID and GID the proxies run as (Istio's).
pub const PROXY_UID: u32 = 1337;

/// Why the mesh cannot be built here, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root to create network namespaces, veths and iptables rules".into());
    }
    for tool in ["ip", "iptables-restore", "setpriv"] {
        if !on_path(tool) {
            return Some(format!("`{tool}` is not installed (.ci/run installs it)"));
        }
    }
    None
}

pub(crate) fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Runs a command to completion; the error names it and carries its stderr.
pub fn run(args: &[&str]) -> Result<String, String> {
    let (program, rest) = args.split_first().ok_or("empty command")?;
    let output = Command::new(program)
        .args(rest)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// A bridge the pods plug into, and a directory for their files and logs.
#[derive(Debug)]
pub struct Network {
    /// Short and unique among live networks on the machine: interface names are at most 15 bytes.
    id: String,
    bridge: String,
    dir: PathBuf,
    weft: PathBuf,
    next_pod: AtomicU32,
}

impl Network {
    /// A new bridge; `weft` is the binary every pod runs.
    pub fn create(weft: &Path) -> Result<Self, String> {
        static NETWORKS: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        // The creator's pid in hex, `x`, a counter: names stay short and say whose they are.
        let id = format!(
            "{:x}x{}",
            std::process::id(),
            NETWORKS.fetch_add(1, Ordering::SeqCst)
        );
        let bridge = format!("wb{id}");
        let dir = std::env::temp_dir().join(format!("weft-netns-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Readable by the proxies, which do not run as root.
        set_mode(&dir, 0o755)?;
        let network = Self {
            id,
            bridge,
            dir,
            weft: weft.to_owned(),
            next_pod: AtomicU32::new(10),
        };
        run(&["ip", "link", "add", &network.bridge, "type", "bridge"])?;
        // Bridged frames must not meet the host's firewall (br_netfilter with a FORWARD DROP policy).
        let _ = run(&[
            "ip",
            "link",
            "set",
            &network.bridge,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
            "nf_call_ip6tables",
            "0",
        ]);
        run(&["ip", "link", "set", &network.bridge, "up"])?;
        Ok(network)
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Where pods keep configuration and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn weft(&self) -> &Path {
        &self.weft
    }

    /// A new pod on the bridge: its namespace, `eth0` with the next address, `lo` up. No rules, no proxy
    /// yet (see [`Pod::init`] and [`Pod::start_proxy`]).
    pub fn pod(&self, name: &str) -> Result<Pod, String> {
        let n = self.next_pod.fetch_add(1, Ordering::SeqCst);
        if n > 250 {
            return Err("too many pods on one network".into());
        }
        Pod::create(self, name, n)
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.bridge]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Namespaces and bridges left by a test process that was killed before it could clean up (a `SIGKILL`
/// skips destructors): everything named after a process id that no longer exists.
fn remove_stale() {
    // An id we cannot read is not ours to remove.
    let alive = |id: &str| {
        id.split_once('x')
            .and_then(|(pid, _)| u32::from_str_radix(pid, 16).ok())
            .is_none_or(|pid| Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(list) = run(&["ip", "netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if let Some(id) = name
                .strip_prefix("weftpod-")
                .and_then(|rest| rest.split('-').next())
                && !alive(id)
            {
                let _ = run(&["ip", "netns", "del", name]);
            }
        }
    }
    if let Ok(links) = run(&["ip", "-o", "link", "show", "type", "bridge"]) {
        for name in links.lines().filter_map(|l| l.split(": ").nth(1)) {
            if let Some(id) = name.strip_prefix("wb")
                && !alive(id)
            {
                let _ = run(&["ip", "link", "del", name]);
            }
        }
    }
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))
}
