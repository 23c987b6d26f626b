//! Readiness: the proxy is ready once every startup step has reported done, and stops being ready when it
//! starts draining. The reason for not being ready is always available, for humans reading a probe.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct Readiness {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    waiting_for: BTreeSet<&'static str>,
    draining: bool,
}

impl Readiness {
    /// Not ready until each of `steps` is marked done.
    pub fn new(steps: &[&'static str]) -> Self {
        let state = State {
            waiting_for: steps.iter().copied().collect(),
            draining: false,
        };
        Self {
            inner: Arc::new(Mutex::new(state)),
        }
    }

    pub fn mark_done(&self, step: &'static str) {
        self.with(|s| {
            s.waiting_for.remove(step);
        });
    }

    pub fn set_draining(&self) {
        self.with(|s| s.draining = true);
    }

    /// `Ok` when ready, otherwise why not.
    pub fn check(&self) -> Result<(), String> {
        self.with(|s| {
            if s.draining {
                Err("draining".to_owned())
            } else if s.waiting_for.is_empty() {
                Ok(())
            } else {
                let steps: Vec<_> = s.waiting_for.iter().copied().collect();
                Err(format!("waiting for {}", steps.join(", ")))
            }
        })
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
        assert_eq!(r.check(), Err("waiting for certificate, listeners".into()));
        r.mark_done("listeners");
        assert_eq!(r.check(), Err("waiting for certificate".into()));
        r.mark_done("certificate");
        assert_eq!(r.check(), Ok(()));
        r.set_draining();
        assert_eq!(r.check(), Err("draining".into()));
    }
}
