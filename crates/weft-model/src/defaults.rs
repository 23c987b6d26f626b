//! What the configuration is when it says nothing: Envoy's and Istio's defaults, and Weft's own where
//! it differs from them (each says why).

use std::time::Duration;

/// Envoy's default cluster connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle upstream connections are closed after this long. Kept under the 5 s keep-alive that common app
/// servers (Node.js, Go's default is longer) use, so the proxy closes an idle connection before the app
/// does, rather than racing the app's close with a new request.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// How long to wait for a client's first bytes before calling the connection opaque TCP. Long enough for
/// a client on a busy machine to send its request, short enough that a server-speaks-first protocol
/// (MySQL, SMTP) only sees a small delay before its greeting.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(250);
/// Envoy's default idle timeout for client connections (HTTP connection manager and TCP proxy).
pub const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// A client has this long from a request's first byte to send its whole header block (Envoy's
/// `request_headers_timeout`, which Envoy leaves off; the proxy keeps slowloris out by default).
pub const DEFAULT_REQUEST_HEADERS_TIMEOUT: Duration = Duration::from_secs(30);
/// Envoy's edge recommendations (and, for headers, Envoy's own defaults) for what one client may make
/// the proxy hold.
pub const DEFAULT_MAX_REQUEST_HEADERS_KB: u32 = 60;
pub const DEFAULT_MAX_HEADERS_COUNT: u32 = 100;
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Envoy's edge recommends 64 KiB per stream; that streamed 100 MB over HTTP/2 through the proxy
/// twenty times slower than 256 KiB (`large_bodies_with_bounded_memory_http2`), and HTTP/2 is the
/// sidecar-to-sidecar hop. 256 KiB is also what the proxy opens upstream streams with.
pub const DEFAULT_INITIAL_STREAM_WINDOW_SIZE: u32 = 256 * 1024;
pub const DEFAULT_INITIAL_CONNECTION_WINDOW_SIZE: u32 = 1024 * 1024;
/// Envoy's `initial_fetch_timeout`: after it the proxy serves with part of a configuration.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest xDS response a proxy takes. gRPC's 4 MiB default is about 7,000 clusters; Istio raises
/// it, and so does weft.
pub const DEFAULT_XDS_MAX_MESSAGE_BYTES: usize = 64 << 20;
/// The bounds a configured `xds.max_message_bytes` must keep (gRPC frames a message with a 32-bit
/// length).
pub const XDS_MAX_MESSAGE_BYTES_RANGE: std::ops::RangeInclusive<u64> = (64 << 10)..=(2 << 30);
/// Istio's trust domain and certificate lifetime defaults.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// How long in-flight requests get to finish on shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub const ADMIN_PORT: u16 = 15000;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const READINESS_PORT: u16 = 15021;
/// The pod's status port (Istio's): app probes, merged metrics, readiness, reached from outside the pod.
pub const STATUS_PORT: u16 = 15020;

/// Envoy's default route timeout (it covers all retries).
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's default stream idle timeout: a request or response with no frame for this long is reset.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Envoy's default `healthy_panic_threshold`: below this share of available endpoints, the cluster
/// balances over all of them, as if none were ejected, so that traffic still goes somewhere.
pub const DEFAULT_PANIC_THRESHOLD_PERCENT: f64 = 50.0;
