//! Keeping a workload certificate fresh.
//!
//! The store asks for a certificate at start (retrying until it gets one), then renews it at half its
//! lifetime, with a little jitter so that proxies started together do not renew together. A failed
//! renewal keeps the certificate in use (it is still valid) and retries with backoff. Each new
//! certificate is published on a watch channel; handshakes read the newest, established connections are
//! untouched.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{CaClient, Credentials, SpiffeId, csr};

/// Renew at this fraction of the lifetime (Istio's SECRET_GRACE_PERIOD_RATIO).
const RENEW_AT: f64 = 0.5;
/// Spread renewals by up to this fraction of the lifetime.
const JITTER: f64 = 0.05;
/// Never renew faster than this, whatever the CA hands out.
const MIN_RENEWAL_DELAY: Duration = Duration::from_millis(250);
const RETRY_BASE: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub id: SpiffeId,
    /// Requested lifetime (the CA may shorten it). Istio's default is 24 h.
    pub validity: Duration,
}

/// What the store reports, for metrics and logs. Called from the store's task.
pub struct StoreEvents {
    pub renewed: Box<dyn Fn(&Credentials) + Send + Sync>,
    pub failed: Box<dyn Fn(&str) + Send + Sync>,
}

impl std::fmt::Debug for StoreEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreEvents")
    }
}

#[derive(Debug, Clone)]
pub struct CredentialStore {
    current: watch::Receiver<Option<Arc<Credentials>>>,
}

impl CredentialStore {
    /// Starts fetching and renewing; runs until `stop` is cancelled.
    pub fn start(config: StoreConfig, ca: CaClient, events: StoreEvents, stop: CancellationToken) -> Self {
        let (tx, current) = watch::channel(None);
        tokio::spawn(async move {
            tokio::select! {
                () = run(config, ca, events, tx) => {}
                () = stop.cancelled() => {}
            }
        });
        Self { current }
    }

    /// The certificate in use, if one has arrived.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.borrow().clone()
    }

    /// A receiver that sees every new certificate.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Credentials>>> {
        self.current.clone()
    }

    /// Waits for the first certificate.
    pub async fn ready(&self) -> Arc<Credentials> {
        let mut rx = self.current.clone();
        loop {
            if let Some(c) = rx.borrow_and_update().clone() {
                return c;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

async fn run(
    config: StoreConfig,
    ca: CaClient,
    events: StoreEvents,
    tx: watch::Sender<Option<Arc<Credentials>>>,
) {
    let mut failures = 0u32;
    loop {
        match fetch(&config, &ca).await {
            Ok(credentials) => {
                failures = 0;
                tracing::info!(
                    id = %credentials.id,
                    serial = %credentials.serial,
                    lifetime = ?credentials.lifetime(),
                    "workload certificate issued"
                );
                (events.renewed)(&credentials);
                let wait = renewal_delay(&credentials);
                let mut credentials = credentials;
                credentials.renew_at = Some(std::time::SystemTime::now() + wait);
                tx.send_replace(Some(Arc::new(credentials)));
                tokio::time::sleep(wait).await;
            }
            Err(reason) => {
                failures = failures.saturating_add(1);
                let still_valid = tx.borrow().as_ref().is_some_and(|c| !c.is_expired());
                tracing::warn!(%reason, still_valid, "certificate request failed; retrying");
                (events.failed)(&reason);
                tokio::time::sleep(backoff(failures)).await;
            }
        }
    }
}

async fn fetch(config: &StoreConfig, ca: &CaClient) -> Result<Credentials, String> {
    let (key, csr) = csr::new_csr(&config.id).map_err(|e| format!("cannot make a CSR: {e}"))?;
    let chain = ca
        .certify(&csr, config.validity)
        .await
        .map_err(|e| e.to_string())?;
    Credentials::new(config.id.clone(), chain, key.serialize_pem()).map_err(|e| e.to_string())
}

/// Half of what remains of a fresh certificate's validity, less up to 5 % jitter. Measured from now, not
/// from `not_before`: CAs backdate certificates for clock skew, and a short-lived certificate timed from
/// its backdated start would be renewed at once, over and over.
fn renewal_delay(c: &Credentials) -> Duration {
    let remaining = c.remaining().as_secs_f64();
    let delay = Duration::from_secs_f64(remaining * (RENEW_AT - JITTER * rand::random::<f64>()));
    delay.max(MIN_RENEWAL_DELAY)
}

fn backoff(failures: u32) -> Duration {
    let cap = RETRY_BASE.saturating_mul(1 << failures.min(10)).min(RETRY_MAX);
    cap.mul_f64(0.5 + 0.5 * rand::random::<f64>())
}
