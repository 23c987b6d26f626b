//! The overload manager (Envoy's): past a global number of client connections, or with memory near the
//! limit the kernel will kill the process at, the proxy sheds load rather than dying. Keep-alive goes
//! first (each client connection closes after its current request, so clients spread over other
//! replicas and the connections' buffers are freed); then new connections are refused.
//!
//! A client caught abusing a connection (an HTTP/2 rapid reset) loses it, and its address may open no
//! new connection for [`ABUSE_PENALTY`]: otherwise reconnecting costs it nothing and the flood goes on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How hard the proxy is pressed, from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Pressure {
    #[default]
    Normal,
    /// Client connections close after their current request.
    NoKeepAlive,
    /// New client connections are closed as soon as they are accepted.
    RefuseConnections,
}

/// The share of the memory limit past which keep-alive is disabled, and past which new connections
/// are refused (Envoy's recommended watermarks are 95 % and 98 % of a fixed heap; RSS, measured here,
/// runs ahead of the heap, so these are lower).
pub(crate) const NO_KEEPALIVE_AT: f64 = 0.90;
pub(crate) const REFUSE_CONNECTIONS_AT: f64 = 0.95;
/// How often memory is measured.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// How long an address caught abusing a connection may open no new one.
pub const ABUSE_PENALTY: Duration = Duration::from_secs(10);
/// Addresses penalized at once, at most (an attacker with many addresses cannot grow the table
/// without bound; past it, abusers only lose their connections).
const MAX_PENALIZED: usize = 10_000;
/// Memory freed by idle connections past which the heap's free pages are handed back to the kernel.
pub(crate) const SHRINK_AFTER_BYTES: u64 = 1 << 20;

/// What the proxy may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadLimits {
    /// Client connections open at once, over all listeners.
    pub max_active_downstream_connections: u64,
    /// Resident memory, in bytes; `None`: not watched.
    pub max_memory_bytes: Option<u64>,
}

/// The proxy's overload state, shared by its listeners and connections.
#[derive(Debug, Clone)]
pub struct Overload {
    inner: Arc<Inner>,
    pressure: watch::Receiver<Pressure>,
}

#[derive(Debug)]
struct Inner {
    limits: OverloadLimits,
    active: AtomicU64,
    memory: watch::Sender<Pressure>,
    /// Bytes freed by connections going idle since the heap was last shrunk.
    released: AtomicU64,
    /// Addresses refused until the given instant; `penalized` counts them so that accepting a
    /// connection takes no lock while there are none.
    penalties: Mutex<HashMap<IpAddr, Instant>>,
    penalized: AtomicUsize,
}

/// A client connection counted against the global limit while it lives.
#[derive(Debug)]
pub struct ConnectionPermit {
    inner: Arc<Inner>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.inner.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Connections,
    Memory,
    /// The client's address abused a connection a moment ago.
    Abuse,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Connections => "connections",
            Refusal::Memory => "memory",
            Refusal::Abuse => "abuse",
        }
    }
}

impl Overload {
    pub fn new(limits: OverloadLimits) -> Self {
        let (memory, pressure) = watch::channel(Pressure::Normal);
        Self {
            inner: Arc::new(Inner {
                limits,
                active: AtomicU64::new(0),
                memory,
                released: AtomicU64::new(0),
                penalties: Mutex::new(HashMap::new()),
                penalized: AtomicUsize::new(0),
            }),
            pressure,
        }
    }

    pub fn limits(&self) -> OverloadLimits {
        self.inner.limits
    }

    /// Counts a new client connection from `source`, or says why it must be refused.
    pub fn admit(&self, source: IpAddr) -> Result<ConnectionPermit, Refusal> {
        if *self.pressure.borrow() == Pressure::RefuseConnections {
            return Err(Refusal::Memory);
        }
        if self.penalized(source) {
            return Err(Refusal::Abuse);
        }
        let max = self.inner.limits.max_active_downstream_connections;
        let admitted = self
            .inner
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
        match admitted {
            Ok(_) => Ok(ConnectionPermit {
                inner: self.inner.clone(),
            }),
            Err(_) => Err(Refusal::Connections),
        }
    }

    /// `source` abused a connection (which is closed): its new connections are refused for
    /// [`ABUSE_PENALTY`].
    pub fn penalize(&self, source: IpAddr) {
        let now = Instant::now();
        let mut penalties = self
            .inner
            .penalties
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if penalties.len() >= MAX_PENALIZED {
            penalties.retain(|_, until| *until > now);
        }
        if penalties.len() < MAX_PENALIZED {
            penalties.insert(source, now + ABUSE_PENALTY);
        }
        self.inner.penalized.store(penalties.len(), Ordering::Release);
    }

    fn penalized(&self, source: IpAddr) -> bool {
        if self.inner.penalized.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut penalties = self
            .inner
            .penalties
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let refused = match penalties.get(&source) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                penalties.remove(&source);
                false
            }
            None => false,
        };
        self.inner.penalized.store(penalties.len(), Ordering::Release);
        refused
    }

    pub fn pressure(&self) -> Pressure {
        *self.pressure.borrow()
    }

    /// The pressure as it changes.
    pub fn subscribe(&self) -> watch::Receiver<Pressure> {
        self.pressure.clone()
    }

    /// Resolves once keep-alive is disabled (at once if it already is).
    pub async fn keepalive_disabled(&self) {
        let mut pressure = self.pressure.clone();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = pressure.wait_for(|p| *p >= Pressure::NoKeepAlive).await;
    }

    /// Sets the pressure from memory in use, in bytes.
    pub fn observe_memory(&self, resident: u64) {
        let Some(limit) = self.inner.limits.max_memory_bytes else {
            return;
        };
        let share = resident as f64 / limit.max(1) as f64;
        let pressure = if share >= REFUSE_CONNECTIONS_AT {
            Pressure::RefuseConnections
        } else if share >= NO_KEEPALIVE_AT {
            Pressure::NoKeepAlive
        } else {
            Pressure::Normal
        };
        self.inner.memory.send_if_modified(|current| {
            let changed = *current != pressure;
            if changed {
                tracing::warn!(
                    resident_mib = resident >> 20,
                    limit_mib = limit >> 20,
                    ?pressure,
                    "memory pressure changed"
                );
            }
            *current = pressure;
            changed
        });
    }

    /// Measures memory every [`SAMPLE_INTERVAL`] until `stop`.
    pub async fn watch_memory(self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            if self.inner.released.load(Ordering::Relaxed) >= SHRINK_AFTER_BYTES {
                self.inner.released.store(0, Ordering::Relaxed);
                crate::heap::shrink();
            }
            if self.inner.limits.max_memory_bytes.is_some()
                && let Some(resident) = resident_bytes()
            {
                self.observe_memory(resident);
            }
        }
    }

    /// Counts memory a connection freed as it went idle (buffers). The allocator keeps freed memory for
    /// reuse; once a megabyte has been freed, the next sample hands the heap's free pages back to the
    /// kernel, so that a burst of connections which then idle does not hold its peak (Envoy's
    /// `shrink_heap` overload action does the same with its allocator).
    pub fn released(&self, bytes: u64) {
        self.inner.released.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The process's resident memory, from `/proc/self/status`.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The memory limit of the proxy's cgroup (v2 `memory.max`, or v1 `memory.limit_in_bytes`), which is
/// the container's limit in Kubernetes; `None` when there is none.
pub fn cgroup_memory_limit() -> Option<u64> {
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
    let v1 = || std::fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes").ok();
    let text = v2.or_else(v1)?;
    let limit: u64 = text.trim().parse().ok()?;
    // v1 says "no limit" with a huge number near i64::MAX.
    (limit < (1 << 60)).then_some(limit)
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does for every program): a proxy's
/// capacity is its descriptors, and the soft default (often 1,024) is far below what the host allows.
/// Returns the soft limit in force afterwards.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Half the open-file limit: each proxied connection holds two descriptors (client and upstream).
pub fn default_max_connections() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft / 2)
        .unwrap_or(512)
        .max(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    #[tokio::test(start_paused = true)]
    async fn an_abusive_address_is_refused_for_the_penalty_and_others_are_not() {
        let overload = Overload::new(OverloadLimits {
            max_active_downstream_connections: 100,
            max_memory_bytes: None,
        });
        let abuser: IpAddr = "10.0.0.9".parse().expect("literal");
        assert!(overload.admit(abuser).is_ok());
        overload.penalize(abuser);
        assert_eq!(overload.admit(abuser).unwrap_err(), Refusal::Abuse);
        assert!(overload.admit(CLIENT).is_ok(), "another address was refused");
        tokio::time::advance(ABUSE_PENALTY - Duration::from_millis(1)).await;
        assert_eq!(overload.admit(abuser).unwrap_err(), Refusal::Abuse);
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(overload.admit(abuser).is_ok(), "still refused after the penalty");
        assert_eq!(overload.inner.penalized.load(Ordering::Acquire), 0);
    }

    #[test]
    fn connections_past_the_limit_are_refused_and_permits_give_places_back() {
        let overload = Overload::new(OverloadLimits {
            max_active_downstream_connections: 2,
            max_memory_bytes: None,
        });
        let a = overload.admit(CLIENT).expect("first");
        let _b = overload.admit(CLIENT).expect("second");
        assert_eq!(overload.admit(CLIENT).unwrap_err(), Refusal::Connections);
        drop(a);
        assert!(overload.admit(CLIENT).is_ok());
    }

    #[tokio::test]
    async fn memory_watermarks_disable_keepalive_then_refuse_connections() {
        let overload = Overload::new(OverloadLimits {
            max_active_downstream_connections: 100,
            max_memory_bytes: Some(1000),
        });
        overload.observe_memory(800);
        assert_eq!(overload.pressure(), Pressure::Normal);
        overload.observe_memory(900);
        assert_eq!(overload.pressure(), Pressure::NoKeepAlive);
        tokio::time::timeout(Duration::from_secs(1), overload.keepalive_disabled())
            .await
            .expect("keep-alive is off");
        assert!(overload.admit(CLIENT).is_ok());
        overload.observe_memory(960);
        assert_eq!(overload.admit(CLIENT).unwrap_err(), Refusal::Memory);
        overload.observe_memory(100);
        assert_eq!(overload.pressure(), Pressure::Normal);
        assert!(overload.admit(CLIENT).is_ok());
    }
}
