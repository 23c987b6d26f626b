//! Authorization where traffic arrives from peers: the workload's RBAC filters, read from the current
//! configuration for every request (so a policy change applies to the next request, and to the next
//! stream of an open HTTP/2 connection), against what the connection proved. Decisions are counted,
//! and denials logged, at a bounded rate.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{Authorization, Decision, Event, Peer, Request};
use weft_telemetry::{AuthzLabels, Label, Metrics};

/// The policy in force now, for one layer of one listener.
pub trait PolicySource: std::fmt::Debug + Send + Sync {
    fn current(&self) -> Arc<Authorization>;
}

/// What a connection proved, and the policy its requests are held to.
#[derive(Debug, Clone)]
pub struct ConnectionAuthz {
    pub policy: Arc<dyn PolicySource>,
    /// The caller's SPIFFE ID, from its verified certificate; `None` for plaintext.
    pub principal: Option<Arc<str>>,
    pub source: IpAddr,
    /// Where the caller was going (the pod's address and the app's port).
    pub destination: SocketAddr,
    pub server_name: Option<Arc<str>>,
}

impl ConnectionAuthz {
    pub fn peer(&self) -> Peer<'_> {
        Peer {
            principal: self.principal.as_deref(),
            source: self.source,
            destination: self.destination,
            server_name: self.server_name.as_deref(),
        }
    }

    /// Decides for a request (`Some`) or for the connection itself (`None`), counting the decision and
    /// logging a denial.
    pub fn decide(&self, request: Option<&Request<'_>>, decisions: &Decisions) -> Decision {
        let policy = self.policy.current();
        if policy.is_empty() {
            return Decision::Allowed;
        }
        let decision = policy.evaluate(&self.peer(), request, &mut |event| decisions.count(event));
        if let Decision::Denied(by) = &decision {
            decisions.log_denial(self, request, by.as_deref());
        }
        decision
    }
}

/// Counts decisions and logs denials, one line per [`DENIAL_LOG_INTERVAL`] at most (a client hammering
/// a denied path must not flood the log); the lines left out are counted in the next one.
#[derive(Debug)]
pub struct Decisions {
    metrics: Arc<Metrics>,
    started: Instant,
    /// Milliseconds since `started` before which no denial is logged.
    next_log_ms: AtomicU64,
    suppressed: AtomicU64,
}

const DENIAL_LOG_INTERVAL: Duration = Duration::from_millis(100);

impl Decisions {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            started: Instant::now(),
            next_log_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    fn count(&self, event: Event<'_>) {
        let labels = AuthzLabels {
            action: event.action.name(),
            policy: event
                .policy
                .map_or_else(|| Label::from("none"), |p| Label::from(p.clone())),
            result: event.result,
        };
        self.metrics.authz_decisions.get_or_create(&labels).inc();
    }

    fn log_denial(&self, conn: &ConnectionAuthz, request: Option<&Request<'_>>, policy: Option<&str>) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_log_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(DENIAL_LOG_INTERVAL.as_millis()).unwrap_or(100);
        if now < next
            || self
                .next_log_ms
                .compare_exchange(next, now + interval, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        let rule = policy.unwrap_or("no ALLOW policy matched");
        let principal = conn.principal.as_deref().unwrap_or("none (plaintext)");
        match request {
            Some(r) => tracing::info!(
                policy = rule, principal, source = %conn.source, destination = %conn.destination,
                method = r.method, path = r.path, authority = r.authority, suppressed,
                "RBAC: access denied"
            ),
            None => tracing::info!(
                policy = rule, principal, source = %conn.source, destination = %conn.destination, suppressed,
                "RBAC: connection denied"
            ),
        }
    }
}
