//! Pooled upstream connections, one pool per endpoint, protocol and connection settings, so that
//! connections are reused per endpoint (what load balancing needs) while requests keep the authority
//! the app sent. The connect step is [`weft_transport::dial`].
//!
//! HTTP/1 connections are driven by the requests that use them ([`http1`]); an HTTP/2 pool is a
//! hyper-util client whose connector always dials its one endpoint, its connections multiplexed over
//! tasks of their own.

mod http1;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::sync::watch;
use weft_identity::tls::TlsMaterial;
use weft_transport::{DialError, DialSettings, UpstreamIo};

use crate::HttpVersion;
use crate::replay::RequestBody;

pub(crate) use http1::{Http1Connections, UpstreamBody};

/// Larger than any header block we accept downstream, so what we accept we can forward.
pub(crate) const MAX_HEADER_LIST_BYTES: u32 = 96 * 1024;
const UPSTREAM_STREAM_WINDOW: u32 = 256 * 1024;
pub(crate) const UPSTREAM_HTTP1_BUFFER: usize = 32 * 1024;
const MAX_WINDOW: u32 = (1 << 31) - 1;
/// A pool unused for this long (beyond its idle timeout) is dropped, so a proxy that has talked to many
/// passthrough destinations does not keep a client for each forever.
const POOL_EXPIRY_GRACE: Duration = Duration::from_secs(60);
/// How often idle HTTP/1 connections past their idle timeout are closed and unused pools dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A pool's key. Hashed by endpoint and version only: pools of one endpoint with different settings
/// (a configuration change) are rare, and equality still compares everything, so finding a pool never
/// hashes an identity list.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolKey {
    endpoint: SocketAddr,
    version: HttpVersion,
    settings: DialSettings,
    /// HTTP/2: which of the endpoint's connections (each pool holds one).
    lane: u16,
}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.endpoint.hash(state);
        self.version.hash(state);
        self.lane.hash(state);
    }
}

/// Streams the proxy opens at once on one upstream HTTP/2 connection before it opens another: what
/// Weft's own listeners (and Envoy's edge) allow, below nginx's 128 and Go's 250. Requests past a
/// connection's limit would otherwise wait behind other clients' streams.
pub(crate) const STREAMS_PER_CONNECTION: u32 = 100;
/// Upstream HTTP/2 connections to one endpoint, at most.
const MAX_LANES: u16 = 64;

/// A stream counted against its upstream HTTP/2 connection while the request and its response last.
#[derive(Debug)]
pub(crate) struct StreamSlot(Arc<AtomicU32>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) type UpstreamClient = Client<EndpointConnector, RequestBody>;

/// How requests reach one endpoint.
#[derive(Debug, Clone)]
pub(crate) enum PoolClient {
    Http1(Arc<Http1Connections>),
    Http2(Arc<UpstreamClient>),
}

#[derive(Debug)]
struct Entry {
    client: PoolClient,
    /// HTTP/2 streams open on this pool's connection.
    streams: Arc<AtomicU32>,
    /// Milliseconds since the pools were made, at the last use.
    last_used: AtomicU64,
}

type PoolMap = HashMap<PoolKey, Arc<Entry>>;

/// Every upstream pool of the proxy. Requests find their pool through an atomically swapped map,
/// without a lock; adding a pool or sweeping unused ones takes the writers' lock.
#[derive(Debug)]
pub struct Pools {
    pools: ArcSwap<PoolMap>,
    write: Mutex<()>,
    started: Instant,
    /// The current workload certificate, for mutual TLS.
    tls: watch::Receiver<Option<TlsMaterial>>,
}

impl Pools {
    /// The proxy's pools, with the task that sweeps them every [`SWEEP_INTERVAL`] while they exist.
    pub fn new(tls: watch::Receiver<Option<TlsMaterial>>) -> Arc<Self> {
        let pools = Arc::new(Self {
            pools: ArcSwap::default(),
            write: Mutex::new(()),
            started: Instant::now(),
            tls,
        });
        let swept = Arc::downgrade(&pools);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pools) = swept.upgrade() else { return };
                pools.sweep();
            }
        });
        pools
    }

    /// The pool for `endpoint`: for HTTP/2, the first of its connections with a stream to spare (a
    /// new one when all are full), and the stream, counted while the returned slot lives.
    pub(crate) fn client(
        &self,
        endpoint: SocketAddr,
        version: HttpVersion,
        settings: DialSettings,
    ) -> (PoolClient, Option<StreamSlot>) {
        let now = millis(self.started.elapsed());
        let mut key = PoolKey {
            endpoint,
            version,
            settings,
            lane: 0,
        };
        loop {
            let entry = self.entry(&key, now);
            if version == HttpVersion::Http1 {
                return (entry.client.clone(), None);
            }
            let taken = entry
                .streams
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < STREAMS_PER_CONNECTION || key.lane + 1 >= MAX_LANES).then_some(n + 1)
                });
            if taken.is_ok() {
                return (entry.client.clone(), Some(StreamSlot(entry.streams.clone())));
            }
            key.lane += 1;
        }
    }

    fn entry(&self, key: &PoolKey, now: u64) -> Arc<Entry> {
        if let Some(entry) = self.pools.load().get(key) {
            entry.last_used.store(now, Ordering::Relaxed);
            return entry.clone();
        }
        // A poisoned lock only means another thread panicked mid-update of a cache, still usable.
        let _write = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.pools.load_full();
        if let Some(entry) = current.get(key) {
            return entry.clone();
        }
        let entry = Arc::new(Entry {
            client: build(key, self.tls.clone()),
            streams: Arc::default(),
            last_used: AtomicU64::new(now),
        });
        let mut next = PoolMap::clone(&current);
        next.insert(key.clone(), entry.clone());
        self.pools.store(Arc::new(next));
        entry
    }

    /// Closes idle HTTP/1 connections past their idle timeout, and drops pools unused for longer than
    /// their idle timeout and a grace period.
    fn sweep(&self) {
        let Ok(_write) = self.write.try_lock() else {
            return; // a request is adding a pool: the next sweep comes in a second
        };
        let now = millis(self.started.elapsed());
        let current = self.pools.load_full();
        let kept: PoolMap = current
            .iter()
            .filter(|(key, entry)| {
                let open = match &entry.client {
                    PoolClient::Http1(connections) => connections.expire(),
                    PoolClient::Http2(_) => false,
                };
                let unused = now.saturating_sub(entry.last_used.load(Ordering::Relaxed));
                open || entry.streams.load(Ordering::Relaxed) > 0
                    || unused < millis(key.settings.idle_timeout + POOL_EXPIRY_GRACE)
            })
            .map(|(key, entry)| (key.clone(), entry.clone()))
            .collect();
        if kept.len() != current.len() {
            self.pools.store(Arc::new(kept));
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn build(key: &PoolKey, tls: watch::Receiver<Option<TlsMaterial>>) -> PoolClient {
    if key.version == HttpVersion::Http1 {
        return PoolClient::Http1(Arc::new(Http1Connections::new(
            key.endpoint,
            key.settings.clone(),
            tls,
        )));
    }
    let connector = EndpointConnector {
        endpoint: key.endpoint,
        settings: key.settings.clone(),
        tls,
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(key.settings.idle_timeout)
        // The request carries the app's Host header; never replace it with the endpoint address.
        .set_host(false)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        // What a stream's response may buffer while its client reads slowly is its window; the
        // connection's window is as large as HTTP/2 allows, so that slow readers (each holding at most
        // its stream window) never stall the other streams sharing the connection.
        .http2_initial_stream_window_size(UPSTREAM_STREAM_WINDOW)
        .http2_initial_connection_window_size(MAX_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_while_idle(true)
        .http2_only(true);
    PoolClient::Http2(Arc::new(builder.build(connector)))
}

pin_project! {
    /// [`UpstreamIo`] as hyper's client sees it.
    #[derive(Debug)]
    pub(crate) struct PoolIo {
        #[pin]
        inner: TokioIo<UpstreamIo>,
    }
}

impl Connection for PoolIo {
    fn connected(&self) -> Connected {
        let connected = Connected::new().extra(ConnectionUses::default());
        if self.inner.inner().negotiated_h2() {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl hyper::rt::Read for PoolIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PoolIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Responses received on one upstream connection, carried on each response's extensions so that a
/// cluster's `max_requests_per_connection` can retire the connection once it has served its share.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectionUses(Arc<AtomicU32>);

impl ConnectionUses {
    /// Counts one more response; the count after it.
    pub(crate) fn count(&self) -> u32 {
        self.0.fetch_add(1, Ordering::Relaxed).saturating_add(1)
    }
}

/// Dials one fixed endpoint for HTTP/2, whatever the request's URI says.
#[derive(Debug, Clone)]
pub(crate) struct EndpointConnector {
    endpoint: SocketAddr,
    settings: DialSettings,
    tls: watch::Receiver<Option<TlsMaterial>>,
}

impl tower_service::Service<http::Uri> for EndpointConnector {
    type Response = PoolIo;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let io = weft_transport::dial(this.endpoint, &this.settings, &this.tls, &[b"h2"]).await?;
            Ok(PoolIo {
                inner: TokioIo::new(io),
            })
        })
    }
}
