//! HTTP forwarding: a downstream HTTP/1 or HTTP/2 server per connection whose requests are forwarded,
//! streaming, to an upstream endpoint over a pooled connection of the same protocol.
//!
//! Request-level policy (routing, retries, timeouts) builds on [`forward`].

mod balance;
mod body;
mod error;
mod forward;
mod headers;
mod pool;
mod server;

pub use body::ProxyBody;
pub use error::UpstreamError;
pub use forward::{Forwarder, HttpContext, RouteSource, Upstream};
pub use pool::{ConnectError, PoolSettings, Pools, UpstreamIo};
pub use server::{HttpVersion, serve};
