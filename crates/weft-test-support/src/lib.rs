//! Shared fixtures for Weft's tests: real servers on loopback (HTTP/1 + h2, gRPC, WebSocket, TCP),
//! a test original-destination binder, in-process proxies, and small assertion helpers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod envoy;
pub mod grpc;
pub mod h2_frames;
pub mod http;
pub mod kube_api;
pub mod netns;
mod orig_dst;
pub mod otlp;
mod proxy;
pub mod tcp;
pub mod xds;

pub use orig_dst::{MockOrigDst, OrigDstConnector};
pub use proxy::{TestProxy, admin_get, admin_post, admin_tap, metric};

/// Test logs go to the test harness's captured output; `RUST_LOG` picks the filter.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Raises the open-file limit to the hard limit, for tests that hold thousands of sockets.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let target = hard.min(1 << 16);
    setrlimit(Resource::RLIMIT_NOFILE, target, hard).expect("setrlimit");
    target
}

/// Retries an assertion until it holds or a deadline passes; for state that settles asynchronously.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!($($msg)+);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}
