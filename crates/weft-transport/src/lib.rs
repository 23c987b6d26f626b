//! Sockets: binding listeners, learning where a redirected connection was going, replaying bytes read
//! during protocol detection, and connecting upstream.
//!
//! The [`Binder`] trait is the seam that lets whole-proxy tests run without iptables: the real one asks the
//! kernel for the original destination (SO_ORIGINAL_DST), a test one answers from a table.

mod binder;
mod connect;
mod dial;
pub mod heap;
mod idle;
mod overload;
mod prefixed;

pub use binder::{Accepted, Binder, OsBinder, accept, bind_listener};
pub use connect::{ConnectError, connect};
pub use dial::{DialError, DialSettings, Direct, UpstreamIo, dial};
pub use idle::{Activity, IdleIo, InFlight};
pub use overload::{
    ABUSE_PENALTY, ConnectionPermit, Overload, OverloadLimits, Pressure, Refusal, cgroup_memory_limit,
    default_max_connections, raise_open_file_limit, resident_bytes,
};
pub use prefixed::PrefixedIo;
