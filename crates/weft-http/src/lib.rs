//! HTTP forwarding: a downstream HTTP/1 or HTTP/2 server per connection whose requests are forwarded,
//! streaming, to an upstream endpoint over a pooled connection of the same protocol.
//!
//! Request-level policy lives here too: routing, retries with a budget, timeouts, circuit breakers,
//! least-request balancing and outlier detection (their state is `weft_balance`'s).

mod body;
mod error;
mod exchange;
mod forward;
mod frame_guard;
mod head_timeout;
mod headers;
mod hop;
mod http1;
mod pool;
mod replay;
mod retry;
mod server;

pub use body::ProxyBody;
pub use error::{LocalReply, Origin, UpstreamError};
pub use forward::{Forwarder, HttpContext, RouteSource, Upstream};
pub use pool::Pools;
pub use replay::MAX_REPLAY_BYTES;
pub use server::{HttpVersion, ServeSettings, Served, serve};
