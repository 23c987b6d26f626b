//! Readiness: the proxy is ready once every startup step has reported done, and stops being ready when it
//! starts draining. The reason for not being ready is always available, for humans reading a probe.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// Why the proxy is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// It is draining: ready no more.
    Draining,
    /// These startup steps have not reported done, each with what it still waits for when it said.
    WaitingFor(Vec<String>),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Draining => f.write_str("draining"),
            Self::WaitingFor(steps) => write!(f, "waiting for {}", steps.join(", ")),
        }
    }
}

/// Envoy's server states (`envoy.admin.v3.ServerInfo.State`), with Envoy's `server.state` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    Live = 0,
    Draining = 1,
    Initializing = 3,
}

#[derive(Debug, Clone)]
pub struct Readiness {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    waiting_for: BTreeSet<&'static str>,
    /// What a step still waits for, in its own words.
    details: BTreeMap<&'static str, String>,
    draining: bool,
}

impl Readiness {
    /// Not ready until each of `steps` is marked done.
    pub fn new(steps: &[&'static str]) -> Self {
        let state = State {
            waiting_for: steps.iter().copied().collect(),
            details: BTreeMap::new(),
            draining: false,
        };
        Self {
            inner: Arc::new(Mutex::new(state)),
        }
    }

    pub fn mark_done(&self, step: &'static str) {
        self.with(|s| {
            s.waiting_for.remove(step);
            s.details.remove(step);
        });
    }

    /// What `step` still waits for, shown with it until it is done.
    pub fn set_detail(&self, step: &'static str, detail: String) {
        self.with(|s| {
            if s.waiting_for.contains(step) {
                s.details.insert(step, detail);
            }
        });
    }

    pub fn set_draining(&self) {
        self.with(|s| s.draining = true);
    }

    /// `Ok` when ready, otherwise why not.
    pub fn check(&self) -> Result<(), NotReady> {
        self.with(|s| {
            if s.draining {
                Err(NotReady::Draining)
            } else if s.waiting_for.is_empty() {
                Ok(())
            } else {
                Err(NotReady::WaitingFor(
                    s.waiting_for
                        .iter()
                        .map(|step| match s.details.get(step) {
                            Some(detail) => format!("{step} ({detail})"),
                            None => (*step).to_owned(),
                        })
                        .collect(),
                ))
            }
        })
    }

    /// The server's state as Envoy names it (`server.state`, `/server_info`).
    pub fn state(&self) -> ServerState {
        match self.check() {
            Ok(()) => ServerState::Live,
            Err(NotReady::Draining) => ServerState::Draining,
            Err(NotReady::WaitingFor(_)) => ServerState::Initializing,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // The state stays consistent even if a holder panicked: every update is a single assignment.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_after_every_step_and_not_while_draining() {
        let r = Readiness::new(&["listeners", "certificate"]);
        let reason = |r: &Readiness| r.check().map_err(|e| e.to_string());
        assert_eq!(reason(&r), Err("waiting for certificate, listeners".into()));
        assert_eq!(r.state(), ServerState::Initializing);
        r.set_detail("listeners", "2 of 3 bound".into());
        assert_eq!(
            reason(&r),
            Err("waiting for certificate, listeners (2 of 3 bound)".into())
        );
        r.mark_done("listeners");
        r.set_detail("listeners", "a detail after done is not shown".into());
        assert_eq!(reason(&r), Err("waiting for certificate".into()));
        r.mark_done("certificate");
        assert_eq!(reason(&r), Ok(()));
        assert_eq!(r.state(), ServerState::Live);
        r.set_draining();
        assert_eq!(reason(&r), Err("draining".into()));
        assert_eq!(r.state(), ServerState::Draining);
    }
}
