//! The proxy's own HTTP endpoints: the admin server (127.0.0.1:15000 by default) and the readiness
//! server (15021, `/healthz/ready`) that kubelet probes.

mod readiness;
mod server;
mod status;

pub use readiness::{NotReady, Readiness, ServerState};
pub use server::{AdminState, Stat, Views, serve_admin, serve_readiness};
pub use status::{Status, serve_status};
