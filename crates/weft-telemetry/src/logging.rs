//! Log output through `tracing`, with the filter changeable at run time (admin `POST /logging`).

use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter \"{filter}\": {reason}")]
    InvalidFilter { filter: String, reason: String },
    #[error("the log subscriber is gone: {0}")]
    Reload(#[from] reload::Error),
    #[error("a global log subscriber is already installed")]
    AlreadyInstalled,
}

/// Reads and replaces the active log filter (`info`, `weft_http=debug,info`, ...).
#[derive(Clone, Debug)]
pub struct LogControl {
    current: Arc<Mutex<String>>,
    handle: Option<reload::Handle<EnvFilter, Registry>>,
}

impl LogControl {
    /// Installs the process-wide subscriber writing to stderr, as text or one JSON object per line.
    pub fn install(filter: &str, json: bool) -> Result<Self, LogError> {
        let (layer, handle) = reload::Layer::new(parse(filter)?);
        // Colours only for a terminal: a file or a log collector would store the escape codes.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi);
        let result = if json {
            tracing_subscriber::registry()
                .with(layer)
                .with(fmt.json().flatten_event(true))
                .try_init()
        } else {
            tracing_subscriber::registry().with(layer).with(fmt).try_init()
        };
        result.map_err(|_| LogError::AlreadyInstalled)?;
        Ok(Self {
            current: Arc::new(Mutex::new(filter.to_owned())),
            handle: Some(handle),
        })
    }

    /// A control not attached to any subscriber: it validates and remembers filters. For proxies embedded
    /// in tests, where the test harness owns logging.
    pub fn detached(filter: &str) -> Self {
        Self {
            current: Arc::new(Mutex::new(filter.to_owned())),
            handle: None,
        }
    }

    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn set(&self, filter: &str) -> Result<(), LogError> {
        let parsed = parse(filter)?;
        if let Some(handle) = &self.handle {
            handle.reload(parsed)?;
        }
        if let Ok(mut current) = self.current.lock() {
            *current = filter.to_owned();
        }
        tracing::info!(filter, "log filter changed");
        Ok(())
    }
}

/// The HTTP/2 library warns once per misbehaving client connection (a rapid-reset flood would write
/// thousands of lines a second): unless the filter names it, only its errors are logged. What it
/// refuses is counted and logged by the proxy itself.
const QUIET_LIBRARIES: &str = "h2=error";

fn parse(filter: &str) -> Result<EnvFilter, LogError> {
    let names_h2 = filter.split(',').any(|d| d.trim().starts_with("h2"));
    let effective = if names_h2 || filter.trim().is_empty() {
        filter.to_owned()
    } else {
        format!("{filter},{QUIET_LIBRARIES}")
    };
    EnvFilter::builder()
        .parse(&effective)
        .map_err(|e| LogError::InvalidFilter {
            filter: filter.to_owned(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http2_library_logs_only_errors_unless_named() {
        assert_eq!(parse("info").unwrap().to_string(), "h2=error,info");
        assert_eq!(parse("h2=debug,info").unwrap().to_string(), "h2=debug,info");
    }

    #[test]
    fn detached_control_validates() {
        let control = LogControl::detached("info");
        control.set("weft_http=debug,warn").unwrap();
        assert_eq!(control.current(), "weft_http=debug,warn");
        let err = control.set("weft_http=loud").unwrap_err().to_string();
        assert!(err.contains("weft_http=loud"), "{err}");
        assert_eq!(
            control.current(),
            "weft_http=debug,warn",
            "a rejected filter keeps the last good one"
        );
    }
}
