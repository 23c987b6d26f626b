//! Sockets: binding listeners, learning where a redirected connection was going, replaying bytes read
//! during protocol detection, and connecting upstream.
//!
//! The [`Binder`] trait is the seam that lets whole-proxy tests run without iptables: the real one asks the
//! kernel for the original destination (SO_ORIGINAL_DST), a test one answers from a table.

mod binder;
mod connect;
mod dial;
mod idle;
mod prefixed;

pub use binder::{Accepted, Binder, OsBinder, accept, bind_listener};
pub use connect::{ConnectError, connect};
pub use dial::{DialError, DialSettings, UpstreamIo, dial};
pub use idle::{Activity, IdleIo, InFlight};
pub use prefixed::PrefixedIo;
