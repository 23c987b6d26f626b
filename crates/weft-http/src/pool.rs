//! Pooled upstream connections, one pool per endpoint and protocol.
//!
//! Each pool is a hyper-util client whose connector always dials its one endpoint, so connections are
//! reused per endpoint (what load balancing needs) while requests keep the authority the app sent.
//! This connector is where TLS to mesh peers is added.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use weft_transport::ConnectError;

use crate::HttpVersion;

/// Larger than any header block we accept downstream, so what we accept we can forward.
pub(crate) const MAX_HEADER_LIST_BYTES: u32 = 96 * 1024;
/// A pool unused for this long (beyond its idle timeout) is dropped, so a proxy that has talked to many
/// passthrough destinations does not keep a client for each forever.
const POOL_EXPIRY_GRACE: Duration = Duration::from_secs(60);
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Connection settings of a pool; part of its key, so a config change gets a fresh pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PoolKey {
    endpoint: SocketAddr,
    version: HttpVersion,
    settings: PoolSettings,
}

pub(crate) type UpstreamClient = Client<EndpointConnector, Incoming>;

#[derive(Debug)]
struct Entry {
    client: UpstreamClient,
    last_used: Instant,
}

/// Every upstream pool of the proxy.
#[derive(Debug)]
pub struct Pools {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    pools: HashMap<PoolKey, Entry>,
    last_sweep: Instant,
}

impl Default for Pools {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                pools: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        }
    }
}

impl Pools {
    pub(crate) fn client(
        &self,
        endpoint: SocketAddr,
        version: HttpVersion,
        settings: PoolSettings,
    ) -> UpstreamClient {
        let key = PoolKey {
            endpoint,
            version,
            settings,
        };
        let now = Instant::now();
        // The lock is never held across an await; a poisoned lock only means another thread panicked
        // mid-update of a cache, which is still usable.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(inner.last_sweep) > SWEEP_INTERVAL {
            inner.last_sweep = now;
            inner
                .pools
                .retain(|k, e| now.duration_since(e.last_used) < k.settings.idle_timeout + POOL_EXPIRY_GRACE);
        }
        let entry = inner.pools.entry(key).or_insert_with(|| Entry {
            client: build(key),
            last_used: now,
        });
        entry.last_used = now;
        entry.client.clone()
    }

    /// Number of live pools (for the admin view and tests).
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.pools.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn build(key: PoolKey) -> UpstreamClient {
    let connector = EndpointConnector {
        endpoint: key.endpoint,
        timeout: key.settings.connect_timeout,
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(key.settings.idle_timeout)
        // The request carries the app's Host header; never replace it with the endpoint address.
        .set_host(false)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_while_idle(true);
    if key.version == HttpVersion::Http2 {
        builder.http2_only(true);
    }
    builder.build(connector)
}

/// Dials one fixed endpoint, whatever the request's URI says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EndpointConnector {
    endpoint: SocketAddr,
    timeout: Duration,
}

impl tower_service::Service<http::Uri> for EndpointConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let Self { endpoint, timeout } = *self;
        Box::pin(async move { weft_transport::connect(endpoint, timeout).await.map(TokioIo::new) })
    }
}
