//! Admin `GET /tap`: the HTTP requests passing through right now, one JSON line each as their
//! responses end, with what happened to them on the way (route, cluster, each attempt's endpoint and
//! outcome, retries, ejections, the authorization decision, response flags). It answers "why did this
//! request get a 503" without turning on debug logs.
//!
//! Nothing is gathered while no session is open: a request reads one atomic. A session sees the
//! requests its filter matches, at most `max_rate` per second (the others are counted and reported
//! when it ends), for at most its duration; a client that reads slowly loses lines, never slows
//! traffic.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::access_log::Entry;

/// Sessions open at once; one more is refused.
pub const MAX_SESSIONS: usize = 4;
/// The longest a session may last, and the default.
pub const MAX_DURATION: Duration = Duration::from_secs(300);
pub const DEFAULT_DURATION: Duration = Duration::from_secs(30);
/// Lines per second a session may receive, and the default.
pub const MAX_RATE: u32 = 1000;
pub const DEFAULT_RATE: u32 = 100;
/// Lines queued for a session's client; more are dropped (counted).
const QUEUE: usize = 256;

/// Which requests a session sees: each field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapFilter {
    /// The request's authority, exactly (`reviews:9080`).
    pub authority: Option<String>,
    /// A prefix of the request's path.
    pub path_prefix: Option<String>,
    pub method: Option<String>,
    /// The cluster the request was routed to, exactly.
    pub cluster: Option<String>,
    /// The response code (`503`) or class (`5xx`).
    pub status: Option<StatusMatch>,
    /// Only requests with response flags (Envoy's `UO`, `UH`, `URX`...).
    pub flagged: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    Code(u16),
    /// `5` for `5xx`.
    Class(u16),
}

impl StatusMatch {
    /// `503` or `5xx`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        match text.as_bytes() {
            [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => Some(Self::Class(u16::from(c - b'0'))),
            _ => text
                .parse()
                .ok()
                .filter(|code| (100..=599).contains(code))
                .map(Self::Code),
        }
    }

    fn matches(self, code: u16) -> bool {
        match self {
            Self::Code(c) => c == code,
            Self::Class(class) => code / 100 == class,
        }
    }
}

impl TapFilter {
    fn matches(&self, entry: &Entry) -> bool {
        let authority = entry.authority.as_ref().map(|a| a.as_str());
        let path = entry.path.as_ref().map(|p| p.path());
        let equal =
            |want: &Option<String>, have: Option<&str>| want.as_deref().is_none_or(|w| have == Some(w));
        equal(&self.authority, authority)
            && equal(&self.method, entry.method.as_ref().map(|m| m.as_str()))
            && equal(&self.cluster, entry.upstream_cluster.as_deref())
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| path.is_some_and(|p| p.starts_with(prefix)))
            && self.status.is_none_or(|s| s.matches(entry.response_code))
            && (!self.flagged || !entry.flags.is_empty())
    }
}

/// One try of a request at an endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub endpoint: SocketAddr,
    /// The endpoint's status code, or the local failure (`connect_failure`, `reset`,
    /// `per_try_timeout`, `refused_stream`, `timeout`).
    pub outcome: String,
    /// A retry followed this attempt.
    pub retried: bool,
    /// This attempt's failure ejected the endpoint, by this detector (`consecutive_5xx`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected: Option<&'static str>,
}

/// What a tapped request gathers beyond its access-log entry.
#[derive(Debug, Clone, Default)]
pub struct TapFacts {
    /// `inbound` (from a peer, to the app) or `outbound` (from the app).
    pub direction: &'static str,
    pub request_id: Option<String>,
    pub attempts: Vec<Attempt>,
    /// `allowed`, `denied by <policy>` or `denied: no ALLOW policy matched`; `None` where the
    /// listener authorizes nothing (outbound).
    pub authorization: Option<String>,
    /// Why a retry was not made after a retriable failure (`retry budget or max_retries`, ...).
    pub retry_stopped: Option<&'static str>,
}

/// The line a session receives for one request.
#[derive(Serialize)]
struct Line<'a> {
    start_time: Option<String>,
    direction: &'a str,
    method: Option<&'a str>,
    authority: Option<&'a str>,
    path: Option<&'a str>,
    protocol: Option<&'a str>,
    request_id: Option<&'a str>,
    trace_id: Option<&'a str>,
    downstream_remote_address: Option<String>,
    downstream_peer_uri_san: Option<&'a str>,
    authorization: Option<&'a str>,
    route_name: Option<&'a str>,
    upstream_cluster: Option<&'a str>,
    upstream_host: Option<String>,
    attempts: &'a [Attempt],
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_stopped: Option<&'a str>,
    response_code: u16,
    response_flags: String,
    response_code_details: Option<&'a str>,
    upstream_transport_failure_reason: Option<&'a str>,
    duration_ms: f64,
    bytes_received: u64,
    bytes_sent: u64,
}

fn line(entry: &Entry, facts: &TapFacts) -> Bytes {
    let record = Line {
        start_time: entry
            .start
            .map(|t| humantime::format_rfc3339_millis(t).to_string()),
        direction: facts.direction,
        method: entry.method.as_ref().map(|m| m.as_str()),
        authority: entry.authority.as_ref().map(|a| a.as_str()),
        path: entry.path.as_ref().map(|p| p.as_str()),
        protocol: entry.protocol,
        request_id: facts.request_id.as_deref(),
        trace_id: entry.trace_id.as_deref(),
        downstream_remote_address: entry.downstream_remote.map(|a| a.to_string()),
        downstream_peer_uri_san: entry.peer_uri_san.as_deref(),
        authorization: facts.authorization.as_deref(),
        route_name: entry.route_name.as_deref(),
        upstream_cluster: entry.upstream_cluster.as_deref(),
        upstream_host: entry.upstream_host.map(|a| a.to_string()),
        attempts: &facts.attempts,
        retry_stopped: facts.retry_stopped,
        response_code: entry.response_code,
        response_flags: entry.flags.to_string(),
        response_code_details: entry.details,
        upstream_transport_failure_reason: entry.transport_failure.as_deref(),
        duration_ms: entry.duration.as_secs_f64() * 1000.0,
        bytes_received: entry.bytes_received,
        bytes_sent: entry.bytes_sent,
    };
    let mut text = serde_json::to_vec(&record).unwrap_or_default();
    text.push(b'\n');
    Bytes::from(text)
}

/// The proxy's tap sessions.
#[derive(Debug, Default)]
pub struct Taps {
    open: AtomicUsize,
    sessions: Mutex<Vec<Arc<Session>>>,
}

#[derive(Debug)]
struct Session {
    filter: TapFilter,
    tx: mpsc::Sender<Bytes>,
    max_rate: u32,
    /// The current one-second window: when it began and the lines sent in it.
    window: Mutex<(Instant, u32)>,
    dropped: AtomicU64,
}

impl Session {
    fn admit(&self, now: Instant) -> bool {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(window.0) >= Duration::from_secs(1) {
            *window = (now, 0);
        }
        if window.1 >= self.max_rate {
            return false;
        }
        window.1 += 1;
        true
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("{MAX_SESSIONS} tap sessions are already open")]
    TooManySessions,
}

impl Taps {
    /// Whether any session is open: a request gathers tap facts only then.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed) > 0
    }

    /// Opens a session (`max_rate` and `duration` are clamped to their maximums).
    pub fn open(
        self: &Arc<Self>,
        filter: TapFilter,
        max_rate: u32,
        duration: Duration,
    ) -> Result<TapStream, TapError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let session = Arc::new(Session {
            filter,
            tx,
            max_rate: max_rate.clamp(1, MAX_RATE),
            window: Mutex::new((Instant::now(), 0)),
            dropped: AtomicU64::new(0),
        });
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if sessions.len() >= MAX_SESSIONS {
                return Err(TapError::TooManySessions);
            }
            sessions.push(session.clone());
            self.open.store(sessions.len(), Ordering::Relaxed);
        }
        Ok(TapStream {
            rx,
            deadline: Box::pin(tokio::time::sleep(duration.min(MAX_DURATION))),
            session: Some(Closing {
                taps: self.clone(),
                session,
            }),
        })
    }

    /// Sends a finished request to the sessions that match it.
    pub fn publish(&self, entry: &Entry, facts: &TapFacts) {
        let sessions: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|s| s.filter.matches(entry))
            .cloned()
            .collect();
        if sessions.is_empty() {
            return;
        }
        let text = line(entry, facts);
        let now = Instant::now();
        for session in sessions {
            if !session.admit(now) || session.tx.try_send(text.clone()).is_err() {
                session.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn close(&self, session: &Arc<Session>) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|s| !Arc::ptr_eq(s, session));
        self.open.store(sessions.len(), Ordering::Relaxed);
    }
}

/// Removes its session when dropped (the session ended, or its client went away).
#[derive(Debug)]
struct Closing {
    taps: Arc<Taps>,
    session: Arc<Session>,
}

impl Drop for Closing {
    fn drop(&mut self) {
        self.taps.close(&self.session);
    }
}

/// A session's lines, ending with a summary line once its duration is up.
#[derive(Debug)]
pub struct TapStream {
    rx: mpsc::Receiver<Bytes>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    session: Option<Closing>,
}

impl TapStream {
    /// The next line; `None` once the session has ended.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let Some(closing) = &self.session else {
            return Poll::Ready(None);
        };
        // The session holds the sender until it closes, so the queue never ends on its own.
        if let Poll::Ready(Some(line)) = self.rx.poll_recv(cx) {
            return Poll::Ready(Some(line));
        }
        if self.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let dropped = closing.session.dropped.load(Ordering::Relaxed);
        self.session = None;
        let mut text = serde_json::to_vec(&serde_json::json!({
            "tap_ended": "duration",
            "dropped": dropped,
        }))
        .unwrap_or_default();
        text.push(b'\n');
        Poll::Ready(Some(Bytes::from(text)))
    }

    pub async fn next(&mut self) -> Option<Bytes> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(status: u16, path: &str) -> Entry {
        Entry {
            method: Some(http::Method::GET),
            path: Some(path.parse().unwrap()),
            authority: Some("reviews:9080".parse().unwrap()),
            response_code: status,
            upstream_cluster: Some(Arc::from("outbound|9080||reviews")),
            ..Entry::default()
        }
    }

    #[test]
    fn status_matches_codes_and_classes() {
        assert_eq!(StatusMatch::parse("5xx"), Some(StatusMatch::Class(5)));
        assert_eq!(StatusMatch::parse("503"), Some(StatusMatch::Code(503)));
        for bad in ["6xx", "99", "600", "5x", "abc", ""] {
            assert_eq!(StatusMatch::parse(bad), None, "{bad}");
        }
        let filter = TapFilter {
            status: StatusMatch::parse("5xx"),
            path_prefix: Some("/api".into()),
            ..TapFilter::default()
        };
        assert!(filter.matches(&entry(503, "/api/x?q=1")));
        assert!(!filter.matches(&entry(200, "/api/x")));
        assert!(!filter.matches(&entry(503, "/other")));
        let cluster = TapFilter {
            cluster: Some("outbound|9080||reviews".into()),
            method: Some("POST".into()),
            ..TapFilter::default()
        };
        assert!(!cluster.matches(&entry(200, "/")), "the method differs");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_is_rate_bounded_ends_with_its_duration_and_closes() {
        let taps = Arc::new(Taps::default());
        assert!(!taps.is_open());
        let mut stream = taps
            .open(TapFilter::default(), 2, Duration::from_secs(5))
            .unwrap();
        assert!(taps.is_open());
        for _ in 0..5 {
            taps.publish(&entry(200, "/"), &TapFacts::default());
        }
        for _ in 0..2 {
            let line: serde_json::Value = serde_json::from_slice(&stream.next().await.unwrap()).unwrap();
            assert_eq!(line["path"], "/");
        }
        let end: serde_json::Value = serde_json::from_slice(&stream.next().await.unwrap()).unwrap();
        assert_eq!(end, serde_json::json!({ "tap_ended": "duration", "dropped": 3 }));
        assert!(stream.next().await.is_none());
        assert!(!taps.is_open(), "the ended session is gone");

        let sessions: Vec<_> = (0..MAX_SESSIONS)
            .map(|_| {
                taps.open(TapFilter::default(), 1, Duration::from_secs(1))
                    .unwrap()
            })
            .collect();
        assert!(matches!(
            taps.open(TapFilter::default(), 1, Duration::from_secs(1)),
            Err(TapError::TooManySessions)
        ));
        drop(sessions);
        assert!(!taps.is_open(), "a client that goes away closes its session");
    }
}
