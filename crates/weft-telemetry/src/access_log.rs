//! Access logs with Envoy's semantics: one entry per HTTP request (when its response has ended) and
//! per TCP connection (when it closes). As Envoy does, the worker thread formats the line and appends
//! it to its destination's buffer; one thread per destination takes the buffer whole and writes it,
//! off the request path (writes to a file or a pipe block). A full buffer drops lines and counts them
//! (`weft_access_log_entries_dropped_total`), never waits.

mod format;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;

pub use format::{Format, FormatError, ISTIO_JSON, ISTIO_TEXT, Template, json_fields};

use crate::{Metrics, ResponseFlags};

/// Bytes of lines waiting for a writer; past this lines are dropped (some 16,000 lines of Istio's
/// format).
const PENDING: usize = 4 << 20;
/// How long the writer lets lines gather after the first of a batch: it then wakes once per batch,
/// not once per line (a wake-up per request costs the request path a system call), and writes them
/// in one go. Envoy flushes its access-log buffers every second.
const GATHER: Duration = Duration::from_millis(50);

/// Header fields an entry kept for its format.
pub type HeaderCapture = Vec<(HeaderName, HeaderValue)>;

/// Where entries are written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sink {
    Stdout,
    Stderr,
    File(PathBuf),
}

impl Sink {
    /// `stdout`, `stderr`, or a file path (`/dev/stdout` and `/dev/stderr`, Istio's `accessLogFile`
    /// values, are the streams themselves).
    pub fn parse(path: &str) -> Self {
        match path {
            "stdout" | "/dev/stdout" => Sink::Stdout,
            "stderr" | "/dev/stderr" => Sink::Stderr,
            file => Sink::File(PathBuf::from(file)),
        }
    }
}

impl std::fmt::Display for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Stdout => f.write_str("stdout"),
            Sink::Stderr => f.write_str("stderr"),
            Sink::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// One access log: where, and in which format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    pub sink: Sink,
    pub format: Arc<Format>,
}

/// The access logs of a listener, with the header fields their formats print (worked out once, when
/// the configuration is read).
#[derive(Debug, Clone, Default)]
pub struct AccessLogSet {
    logs: Vec<AccessLogConfig>,
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
}

impl PartialEq for AccessLogSet {
    fn eq(&self, other: &Self) -> bool {
        self.logs == other.logs
    }
}

impl Eq for AccessLogSet {}

impl AccessLogSet {
    pub fn new(logs: Vec<AccessLogConfig>) -> Self {
        let (mut request_headers, mut response_headers) = (Vec::new(), Vec::new());
        for log in &logs {
            log.format.headers(&mut request_headers, &mut response_headers);
        }
        Self {
            logs,
            request_headers,
            response_headers,
        }
    }

    /// No access log at all.
    pub fn off() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
    }

    pub fn logs(&self) -> &[AccessLogConfig] {
        &self.logs
    }
}

impl serde::Serialize for AccessLogSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.logs.iter().map(|l| {
            let format = match &*l.format {
                Format::Text(_) => "text",
                Format::Json(_) => "json",
            };
            format!("{} ({format})", l.sink)
        }))
    }
}

/// What one request or connection leaves in the log. Fields a connection does not have (method,
/// path, headers) stay empty and print as `-`.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub start: Option<SystemTime>,
    pub method: Option<http::Method>,
    /// The path the client sent (before any rewrite).
    pub path: Option<http::uri::PathAndQuery>,
    pub authority: Option<http::uri::Authority>,
    /// `HTTP/1.1`, `HTTP/2`; `None` for a TCP connection.
    pub protocol: Option<&'static str>,
    /// `0` for a TCP connection.
    pub response_code: u16,
    pub flags: ResponseFlags,
    /// Why the response code is what it is (Envoy's `%RESPONSE_CODE_DETAILS%`: `via_upstream`,
    /// `no_healthy_upstream`, `route_not_found`, ...).
    pub details: Option<&'static str>,
    pub transport_failure: Option<String>,
    /// Body bytes from the client (for TCP, every byte).
    pub bytes_received: u64,
    /// Body bytes to the client.
    pub bytes_sent: u64,
    /// From the first byte of the request (or the connection's accept) to the last of the response.
    pub duration: Duration,
    /// To the upstream's response headers.
    pub response_duration: Option<Duration>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<Arc<str>>,
    pub upstream_local: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub downstream_remote: Option<SocketAddr>,
    /// The caller's verified SPIFFE ID.
    pub peer_uri_san: Option<Arc<str>>,
    pub requested_server_name: Option<Arc<str>>,
    pub route_name: Option<Arc<str>>,
    /// Tries made upstream (1 without retries).
    pub attempts: u32,
    /// The request's trace, when it is traced (`%TRACE_ID%`).
    pub trace_id: Option<String>,
    pub request_headers: HeaderCapture,
    pub response_headers: HeaderCapture,
}

/// A destination's lines not yet written, appended by the workers and taken whole by its writer.
#[derive(Debug, Default)]
struct Pending {
    lines: Mutex<Vec<u8>>,
    /// Signalled when lines arrive in an empty buffer.
    arrived: Condvar,
}

impl Pending {
    /// Appends `line`; `false` (nothing appended) when the buffer is full.
    fn push(&self, line: &[u8]) -> bool {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() + line.len() > PENDING {
            return false;
        }
        let was_empty = lines.is_empty();
        lines.extend_from_slice(line);
        drop(lines);
        if was_empty {
            self.arrived.notify_one();
        }
        true
    }
}

/// The writers of a proxy, one thread per sink, started when a sink is first used.
#[derive(Debug)]
pub struct AccessLogWriters {
    writers: Mutex<HashMap<Sink, Arc<Pending>>>,
    dropped: Counter,
    failed: Counter,
}

/// A sink that cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot open access log {sink}: {source}")]
pub struct SinkError {
    pub sink: Sink,
    #[source]
    pub source: std::io::Error,
}

impl AccessLogWriters {
    pub fn new(metrics: &Metrics) -> Arc<Self> {
        Arc::new(Self {
            writers: Mutex::new(HashMap::new()),
            dropped: metrics.access_log_dropped.clone(),
            failed: metrics.access_log_write_failures.clone(),
        })
    }

    /// The access logs of a listener, ready to take entries; `None` when it has none.
    pub fn open(&self, set: &Arc<AccessLogSet>) -> Result<Option<AccessLogs>, SinkError> {
        if set.is_empty() {
            return Ok(None);
        }
        let pending = set
            .logs
            .iter()
            .map(|log| self.writer(&log.sink))
            .collect::<Result<_, _>>()?;
        Ok(Some(AccessLogs {
            set: set.clone(),
            pending,
            dropped: self.dropped.clone(),
        }))
    }

    fn writer(&self, sink: &Sink) -> Result<Arc<Pending>, SinkError> {
        let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pending) = writers.get(sink) {
            return Ok(pending.clone());
        }
        let out: Box<dyn std::io::Write + Send> = match sink {
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::Stderr => Box::new(std::io::stderr()),
            Sink::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SinkError {
                        sink: sink.clone(),
                        source,
                    })?;
                Box::new(file)
            }
        };
        let pending = Arc::new(Pending::default());
        let (name, failed, taken) = (sink.clone(), self.failed.clone(), pending.clone());
        std::thread::Builder::new()
            .name("weft-access-log".into())
            .spawn(move || write_lines(&name, out, &taken, &failed))
            .map_err(|source| SinkError {
                sink: sink.clone(),
                source,
            })?;
        writers.insert(sink.clone(), pending.clone());
        Ok(pending)
    }
}

/// The access logs of one listener.
#[derive(Debug)]
pub struct AccessLogs {
    set: Arc<AccessLogSet>,
    /// Each log's buffer, in the set's order.
    pending: Vec<Arc<Pending>>,
    dropped: Counter,
}

impl AccessLogs {
    /// The request header fields the formats print.
    pub fn capture_request(&self, headers: &HeaderMap) -> HeaderCapture {
        capture(&self.set.request_headers, headers)
    }

    pub fn capture_response(&self, headers: &HeaderMap) -> HeaderCapture {
        capture(&self.set.response_headers, headers)
    }

    /// Formats the entry for every log and appends it to the log's buffer; a full buffer drops it
    /// (counted).
    pub fn log(&self, entry: Entry) {
        thread_local! {
            /// The worker thread's line, reused: formatting allocates nothing once it has grown.
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        LINE.with_borrow_mut(|line| {
            for (log, pending) in self.set.logs.iter().zip(&self.pending) {
                line.clear();
                log.format.write(&entry, line);
                if !pending.push(line.as_bytes()) {
                    self.dropped.inc();
                }
            }
            if line.capacity() > 64 << 10 {
                *line = String::new();
            }
        });
    }
}

fn capture(names: &[HeaderName], headers: &HeaderMap) -> HeaderCapture {
    names
        .iter()
        .filter_map(|name| headers.get(name).map(|v| (name.clone(), v.clone())))
        .collect()
}

/// Writes the buffered lines in batches, as long as a listener's logs may still add some.
fn write_lines(
    sink: &Sink,
    mut out: Box<dyn std::io::Write + Send>,
    pending: &Arc<Pending>,
    failed: &Counter,
) {
    let mut batch = Vec::new();
    let mut warned = false;
    loop {
        {
            let mut lines = pending.lines.lock().unwrap_or_else(|e| e.into_inner());
            while lines.is_empty() {
                // Only this thread holds the buffer: the proxy and its logs are gone.
                if Arc::strong_count(pending) == 1 {
                    return;
                }
                lines = pending
                    .arrived
                    .wait_timeout(lines, Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        std::thread::sleep(GATHER);
        std::mem::swap(
            &mut *pending.lines.lock().unwrap_or_else(|e| e.into_inner()),
            &mut batch,
        );
        let written = out.write_all(&batch).and_then(|()| out.flush());
        if let Err(err) = written {
            failed.inc();
            if !warned {
                tracing::warn!(%sink, error = %err, "cannot write the access log; entries are lost until it can be written again");
                warned = true;
            }
        }
        batch.clear();
        if batch.capacity() > PENDING {
            batch = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests;
